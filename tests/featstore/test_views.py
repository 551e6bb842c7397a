"""Validator-style views: deterministic per seed, the right geometry per level, distortions that act."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import make_image
from stage1.featstore.views import (
    LEVELS, blur, colour_noise, contrast, jpeg_like, make_view, saturation, view_level, view_seed,
)

IMG = make_image(3, (64, 48))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), level=st.sampled_from(LEVELS), size=st.one_of(st.none(), st.integers(8, 40)))
def test_views_are_deterministic_rgb(seed: int, level: int, size: int | None) -> None:
    a = make_view(IMG, seed, level, size=size)
    b = make_view(IMG, seed, level, size=size)
    assert a.mode == "RGB" and a.tobytes() == b.tobytes()
    w, h = a.size
    assert w == h  # every level ends in a square crop, as the validators serve
    if size is not None:
        assert a.size == (size, size)
    assert IMG.size == (64, 48)  # the input is never modified


def test_level_zero_is_the_centre_square_and_others_vary_with_seed() -> None:
    v0 = make_view(IMG, 1, 0)
    np.testing.assert_array_equal(np.asarray(v0), np.asarray(IMG)[:, 8:56])
    assert make_view(IMG, 1, 0).tobytes() == make_view(IMG, 2, 0).tobytes()
    for level in (1, 2, 3):
        outs = {make_view(IMG, s, level, size=32).tobytes() for s in range(6)}
        assert len(outs) == 6


def test_level2_adds_photometric_distortions_on_the_same_geometry() -> None:
    """Levels share the geometric draws for a seed; level 2 then sometimes (not always) distorts."""
    same = differ = 0
    for s in range(40):
        v1 = np.asarray(make_view(IMG, s, 1, size=32))
        v2 = np.asarray(make_view(IMG, s, 2, size=32))
        if np.array_equal(v1, v2):
            same += 1
        else:
            differ += 1
    assert same > 0 and differ > same


def test_seed_mixes_image_view_and_base_seed() -> None:
    seeds = {view_seed("a" * 64, v, b) for v in (1, 2) for b in (0, 1)} | {view_seed("b" * 64, 1, 0)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)
    assert view_seed("a" * 64, 1, 0) == view_seed("a" * 64, 1, 0)
    assert [view_level(v) for v in range(1, 7)] == [1, 2, 3, 1, 2, 3]
    assert [view_level(v, (3,)) for v in range(1, 3)] == [3, 3]
    with pytest.raises(ValueError):
        view_level(0)
    with pytest.raises(ValueError, match="level must be one of"):
        make_view(IMG, 0, 4)


def test_each_distortion_does_what_it_says() -> None:
    img = make_image(5, (64, 64))
    arr = np.asarray(img, dtype=np.float64)
    grey = np.asarray(saturation(img, 0.0), dtype=np.float64)
    assert np.abs(grey - grey.mean(axis=2, keepdims=True)).max() <= 2  # no chroma left
    assert np.asarray(saturation(img, 1.0), dtype=np.float64).std() == pytest.approx(arr.std(), rel=0.02)
    np.testing.assert_allclose(np.asarray(contrast(img, 0.5), dtype=np.float64), np.floor(arr * 0.5), atol=1)

    def detail(x: Image.Image) -> float:
        a = np.asarray(x, dtype=np.float64)
        return float(np.abs(np.diff(a, axis=1)).mean())

    assert detail(jpeg_like(img, 3)) < 0.8 * detail(img) and jpeg_like(img, 3).size == img.size
    assert detail(blur(img, 9)) < 0.8 * detail(img)
    noisy = np.asarray(colour_noise(Image.new("RGB", (64, 64), (128, 128, 128)), 0.002, np.random.default_rng(0)), dtype=np.float64)
    assert 5 < noisy.std() < 25  # sqrt(0.002) * 255 ~ 11 in Y/Cb/Cr, mixed into RGB


# ---- the subnet-faithful "validator" recipe -------------------------------------------------------
from stage1.featstore import views as V  # noqa: E402


def test_validator_contrast_truncates_and_saturation_scales_chroma() -> None:
    px = np.array([[[200, 101, 3], [7, 250, 128]]], dtype=np.uint8)
    expect = np.floor(px.astype(np.float32) * np.float32(0.85)).astype(np.uint8)
    np.testing.assert_array_equal(V.cc_bgr(px, 0.85), expect)
    ycc = V.bgr_to_ycbcr(px)  # studio range: Y * 219/255 + 16/255, chroma * 224/255 + 16/255 (cv2 float delta 0.5)
    b, g, r = px[..., 0].astype(np.float32), px[..., 1].astype(np.float32), px[..., 2].astype(np.float32)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    np.testing.assert_allclose(ycc[..., 0], (y * 219 + 16) / 255, rtol=1e-5)
    np.testing.assert_allclose(ycc[..., 1], (((b - y) * 0.564 + 0.5) * 224 + 16) / 255, rtol=1e-5)
    np.testing.assert_allclose(V.ycbcr_to_bgr(ycc), px.astype(np.float32), atol=0.1)  # cv2 coefficients are rounded
    out = V.cs_bgr(px, 0.4).astype(np.float32)  # chroma (B - Y, R - Y) pulled to 0.4x, luma kept
    np.testing.assert_allclose(out[..., 0] - y, 0.4 * (b - y), atol=1.6)
    np.testing.assert_allclose(out[..., 2] - y, 0.4 * (r - y), atol=1.6)


def test_validator_downscale_blur_and_noise_follow_their_formulas() -> None:
    a = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    small = V.linear_resize(a, 4, 4)  # factor 2: the mean of each 2x2 block
    np.testing.assert_array_equal(small, np.rint(a.reshape(4, 2, 4, 2, 3).astype(float).mean((1, 3))).astype(np.uint8))
    assert V.downscale_bgr(a, 2).shape == a.shape
    nine = np.arange(9 * 9 * 3, dtype=np.uint8).reshape(9, 9, 3)
    np.testing.assert_array_equal(V.linear_resize(nine, 3, 3), nine[1::3, 1::3])  # factor 3: the centre pixels
    for k in V.BLUR_KERNEL:
        g = V.gaussian_kernel(k, k / 6)
        assert len(g) == k and g.sum() == pytest.approx(1) and g[0] / g[k // 2] == pytest.approx(np.exp(-((k // 2) ** 2) / (2 * (k / 6) ** 2)))
        imp = np.zeros((21, 21, 3), np.uint8)
        imp[10, 10] = 255
        r = k // 2
        np.testing.assert_array_equal(V.blur_bgr(imp, k)[10 - r:11 + r, 10 - r:11 + r, 0], np.rint(255 * np.outer(g, g)).astype(np.uint8))
    grey = np.full((96, 96, 3), 128, np.uint8)
    for var in V.NOISE_VAR:
        out = V.noise_bgr(grey, var, np.random.default_rng(0))
        d = (V.bgr_to_ycbcr(out) - V.bgr_to_ycbcr(grey))[..., 0] / 255  # the noise is added to bgr2ycbcr(img) / 255
        assert np.std(d) == pytest.approx(np.sqrt(var), rel=0.1)


def test_validator_levels_are_drawn_with_p_quarter_and_distortion_levels_uniform() -> None:
    maker = V.view_recipe("validator")
    assert maker.default_levels == (0, 1, 2, 3)
    levels = np.array([maker.level(V.view_seed(f"{i:064x}", 1), 1, maker.default_levels) for i in range(4000)])
    freq = np.bincount(levels, minlength=4) / len(levels)
    assert np.all(np.abs(freq - 0.25) < 0.03), freq
    img = Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8))
    p2 = np.stack([V.validator_view(img, s, 2, jpeg=False)[1] for s in range(40)])
    p3 = np.stack([V.validator_view(img, s, 3, jpeg=False)[1] for s in range(40)])
    assert set(p2[:, 6:9].ravel()) == {0, 1} and np.isnan(p2[:, 9:]).all()
    assert set(p3[:, 6:].ravel()) == {0, 1, 2}
    assert np.all(np.abs(p3[:, 0]) <= 20) and np.all(p3[:, 3] >= 1)


def test_validator_views_never_flip_and_end_as_224_jpeg() -> None:
    img = Image.fromarray((np.random.default_rng(2).random((50, 70, 3)) * 255).astype(np.uint8))
    flips = np.stack([V.validator_view(img, s, 1, jpeg=False)[1][4:6] for s in range(30)])
    assert (flips == 0).all()
    fired = np.stack([V.view_recipe("validator-flips").make(img, s, 1, 32)[1][4:6] for s in range(30)])
    assert fired.any() and not fired.all()
    for level in (0, 1, 2, 3):
        a, pa = V.validator_view(img, 9, level)
        b, pb = V.validator_view(img, 9, level)
        assert a.size == (224, 224) and a.tobytes() == b.tobytes()
        np.testing.assert_array_equal(pa, pb)
    # level 0 = torchvision CenterCrop + bilinear Resize(224), then JPEG q75 with Pillow
    top, left, side = V.centre_crop_box(70, 50)
    assert (top, left, side) == (0, 10, 50)
    ref = img.crop((10, 0, 60, 50)).resize((224, 224), Image.BILINEAR)
    assert V.validator_clean(img, jpeg=False).tobytes() != b""
    np.testing.assert_allclose(np.asarray(V.validator_clean(img, jpeg=False), float), np.asarray(ref, float), atol=1)
    assert V.validator_clean(img).tobytes() == V.jpeg_roundtrip(V.validator_clean(img, jpeg=False)).tobytes()
