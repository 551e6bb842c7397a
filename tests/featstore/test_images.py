"""Image pipeline: draft mode, EXIF, mode conversion to RGB, bad-image reasons, preprocessing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import png_header_only
from PIL import Image

from stage1.featstore.images import BadImage, MAX_PIXELS, decode, load_rgb, preprocess, quarantine_reason


def test_draft_mode_decodes_large_jpeg_at_reduced_scale(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(path, quality=90)
    full = load_rgb(path)
    drafted = load_rgb(path, draft_size=224)
    assert full.size == (1600, 1200)
    assert drafted.size == (400, 300)  # 1/4 scale: the smallest libjpeg scale keeping both sides >= 224
    assert min(drafted.size) >= 224 and drafted.mode == "RGB"
    # a PNG has no draft mode: decoded at full size whatever draft_size says
    Image.new("RGB", (300, 250)).save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png", draft_size=32).size == (300, 250)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_rgb(path)
    assert out.size == (20, 40)
    arr = np.asarray(out)
    assert arr[2, 10, 2] > 200 and arr[2, 10, 0] < 60  # the blue strip is now on top


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), (255, 255, 255)),
        (lambda: Image.fromarray(np.full((8, 8), 32896, np.uint16)), (128, 128, 128)),
        (lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
        (lambda: Image.new("RGBA", (8, 8), (0, 255, 0, 255)), (0, 255, 0)),
        (lambda: Image.new("LA", (8, 8), (0, 255)), (0, 0, 0)),
        (lambda: Image.new("L", (8, 8), 77), (77, 77, 77)),
        (lambda: Image.new("1", (8, 8), 1), (255, 255, 255)),
        (lambda: Image.new("F", (8, 8), 0.5), (128, 128, 128)),
    ],
    ids=["cmyk", "png16-max", "png16-mid", "rgba-transparent", "rgba-opaque", "la", "l", "1bit", "float"],
)
def test_any_mode_becomes_rgb(tmp_path: Path, make, expected) -> None:
    img = make()
    fmt = {"CMYK": "jpg", "F": "tif"}.get(img.mode, "png")
    path = tmp_path / f"x.{fmt}"
    img.save(path, **({"quality": 100} if fmt == "jpg" else {}))
    reread = Image.open(path)
    if img.mode.startswith("I;16") or img.mode == "I":
        assert reread.mode.startswith("I")  # really a 16-bit PNG on disk
    out = load_rgb(path)
    assert out.mode == "RGB"
    np.testing.assert_allclose(np.asarray(out)[4, 4], expected, atol=3)


def test_palette_with_transparency_goes_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 4, 8))
    img.info["transparency"] = 0
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    arr = np.asarray(load_rgb(path))
    assert tuple(arr[0, 0]) == (255, 0, 0) and tuple(arr[0, 7]) == (255, 255, 255)


def test_bad_images_carry_reasons(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image")
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    png = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    (tmp_path / "trunc.png").write_bytes(png.read_bytes()[:300])
    png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    (tmp_path / "adir.jpg").mkdir()
    cases = {
        "nope.jpg": "missing",
        "empty.jpg": "zero bytes",
        "text.jpg": "not an image",
        "trunc.jpg": "truncated",
        "trunc.png": "truncated",
        "bomb.png": "decompression bomb",
        "adir.jpg": "unreadable",
    }
    for name, reason in cases.items():
        with pytest.raises(BadImage) as err:
            load_rgb(tmp_path / name)
        assert err.value.reason == reason, (name, str(err.value))
        assert name in str(err.value)
    assert load_rgb(good).size == (64, 64)
    assert quarantine_reason(BadImage("truncated", "x.jpg: cut"), "x.jpg") == ("truncated", "x.jpg: cut")
    assert quarantine_reason(MemoryError("too big"), "y.png") == ("unreadable", "y.png: MemoryError: too big")


def test_pixel_limit_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (100, 100)).save(path)
    assert load_rgb(path, max_pixels=10_000).size == (100, 100)
    with pytest.raises(BadImage, match="decompression bomb"):
        load_rgb(path, max_pixels=9_999)
    assert MAX_PIXELS > 10_000_000
    with pytest.raises(BadImage, match="zero bytes"):
        decode(b"")


def test_max_pixels_above_pils_own_limit_is_honoured(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # PIL alone would refuse 10,000 px (> 2x)
    assert load_rgb(path, max_pixels=20_000).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1_000  # PIL's setting is restored afterwards
    with pytest.raises(BadImage, match="decompression bomb"):
        load_rgb(path, max_pixels=9_999)
    with pytest.raises(BadImage, match="zero bytes"):
        decode(b"")


def test_preprocess_resizes_whole_image_and_normalises() -> None:
    img = Image.new("RGB", (50, 30), (255, 0, 128))
    mean, std = (0.5, 0.25, 0.1), (0.5, 0.25, 0.2)
    x = preprocess(img, 32, mean, std)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(x[:, 5, 5], [(1 - 0.5) / 0.5, (0 - 0.25) / 0.25, (128 / 255 - 0.1) / 0.2], atol=1e-5)
    grey = preprocess(Image.new("L", (32, 32), 255), 32, (0, 0, 0), (1, 1, 1))
    np.testing.assert_allclose(grey, 1.0)
