"""Backbones registry: the hf loader, CLS features, provenance with the weights' sha256."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_backbone_dir, make_image
from stage1.featstore.backbones import BACKBONES, check_image_size, load_backbone
from stage1.featstore.images import preprocess
from stage1._core.io import sha256_file


def test_registry_lists_hf_and_rejects_unknown_kind(tiny_backbone_dir: Path) -> None:
    assert "hf" in BACKBONES.names()
    with pytest.raises(KeyError, match="unknown backbone 'nope'"):
        load_backbone(tiny_backbone_dir, kind="nope")


def test_dinov3_cls_embedding_and_provenance(tiny_backbone_dir: Path) -> None:
    bb = load_backbone(tiny_backbone_dir)
    assert bb.hidden_size == 32 and bb.patch_size == 16 and bb.device.type == "cpu"
    imgs = [preprocess(make_image(i), 32, bb.mean, bb.std) for i in range(3)]
    x = torch.from_numpy(np.stack(imgs))
    feats = bb.embed(x)
    assert feats.shape == (3, 32) and feats.dtype == torch.float32
    with torch.no_grad():
        ref = bb.model(pixel_values=x).last_hidden_state[:, 0]
    torch.testing.assert_close(feats, ref)
    prov = bb.provenance()
    assert prov["class"] == "DINOv3ViTModel" and prov["hidden_size"] == 32 and prov["feature"] == "cls"
    assert prov["weights_sha256"] == sha256_file(tiny_backbone_dir / "model.safetensors")
    assert prov["precision"] == "float32"
    json.dumps(prov)  # provenance must be JSON-serialisable
    # the model is frozen and in eval mode
    assert not bb.model.training and not any(p.requires_grad for p in bb.model.parameters())


def test_dinov2_folder_with_preprocessor_stats(tmp_path: Path) -> None:
    folder = make_backbone_dir(tmp_path / "d2", kind="dinov2")
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    bb = load_backbone(folder)
    assert bb.provenance()["class"] == "Dinov2Model"
    assert bb.mean == (0.1, 0.2, 0.3) and bb.std == (0.4, 0.5, 0.6)
    assert bb.embed(torch.zeros(2, 3, 32, 32)).shape == (2, 32)


def test_missing_folder_and_bad_image_size(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(tmp_path)
    check_image_size(224, 14)
    with pytest.raises(ValueError, match="multiple of the backbone's patch size 16"):
        check_image_size(40, 16)


@pytest.mark.parametrize("kind", BACKBONES.names())
def test_every_registered_backbone_keeps_the_contract(kind: str, tiny_backbone_dir: Path) -> None:
    """Frozen, CLS features [B, D] in float32, JSON provenance pinning the weights (over BACKBONES.names())."""
    bb = load_backbone(tiny_backbone_dir, kind=kind)
    x = torch.zeros(2, 3, 32, 32)
    feats = bb.embed(x)
    assert feats.shape == (2, bb.hidden_size) and feats.dtype == torch.float32
    torch.testing.assert_close(bb.embed(x), feats)  # deterministic: eval mode, no dropout
    prov = bb.provenance()
    assert {"class", "hidden_size", "feature", "weights_sha256", "precision"} <= set(prov)
    json.dumps(prov)
    assert not any(p.requires_grad for p in bb.model.parameters())
