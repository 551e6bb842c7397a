"""Adapter placement on tiny random ViTs: the right modules, only the intended parameters, exact merge."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_backbone_dir
from torch import nn

from stage1.finetune.adapters import PEFT_METHODS, AdapterSpec, attach, base_model, merge, trainable
from stage1.finetune.targets import (
    block_indices,
    block_parameter_names,
    find_blocks,
    linear_targets,
    norm_parameter_names,
)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_backbone_dir(tmp_path_factory.mktemp("tiny_dinov2"), kind="dinov2")


def _load(path: Path) -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), local_files_only=True).eval()


def _cls(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).last_hidden_state[:, 0]


@pytest.mark.parametrize("kind", ["dinov3", "dinov2"])
def test_blocks_and_projections_found_generically(kind: str, tiny_backbone_dir: Path, dinov2_dir: Path) -> None:
    model = _load(tiny_backbone_dir if kind == "dinov3" else dinov2_dir)
    blocks = find_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers == 2
    assert blocks.prefix == ("model.layer" if kind == "dinov3" else "encoder.layer")
    modules = dict(model.named_modules())
    every = linear_targets(model, [1], "all")
    # every Linear of the last block, and nothing outside it
    expected = {n for n, m in modules.items() if isinstance(m, nn.Linear) and n.startswith(blocks.prefix + ".1.")}
    assert set(every) == expected and len(every) == 6  # q, k, v, o + two MLP projections
    attention = linear_targets(model, [1], "attention")
    assert len(attention) == 4 and all(".attention." in n for n in attention)
    qv = linear_targets(model, [0, 1], "qv")
    assert sorted(n.rsplit(".", 1)[1] for n in qv) == ["q_proj", "q_proj", "v_proj", "v_proj"]


def test_block_selection_and_errors(tiny_backbone_dir: Path) -> None:
    assert block_indices(12, 2) == [10, 11]
    assert block_indices(12, 0) == []
    with pytest.raises(ValueError, match="between 0 and 12"):
        block_indices(12, 13)
    with pytest.raises(ValueError, match="unknown target kind"):
        linear_targets(_load(tiny_backbone_dir), [1], "mlp-only")
    with pytest.raises(ValueError, match="no encoder block list"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    assert PEFT_METHODS.names() == ["dora", "lora"]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_only_adapters_of_last_blocks_train_and_merge_is_exact(method: str, tiny_backbone_dir: Path) -> None:
    torch.manual_seed(0)
    model = _load(tiny_backbone_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 32, 32)
    ref = _cls(model, x).detach()
    targets = linear_targets(model, [1], "all")
    peft_model = attach(model, AdapterSpec(method, rank=4, alpha=8, targets=targets))
    names = list(trainable(peft_model))
    kinds = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if method == "dora" else set())
    assert names and all(any(k in n for k in kinds) for n in names)
    assert all(".layer.1." in n for n in names)  # the last block only
    # an untrained adapter is the identity
    torch.testing.assert_close(_cls(peft_model, x), ref, atol=1e-5, rtol=0)
    # a few optimiser steps on a toy objective change the adapters only
    opt = torch.optim.AdamW(trainable(peft_model).values(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        _cls(peft_model, x).pow(2).mean().backward()
        opt.step()
    base_now = base_model(peft_model).state_dict()
    for key, value in before.items():
        wrapped = key.rsplit(".", 1)
        current = base_now.get(key, base_now.get(f"{wrapped[0]}.base_layer.{wrapped[1]}"))
        assert torch.equal(current, value), f"{key} changed"
    peft_model.eval()
    out_adapted = _cls(peft_model, x).detach()
    assert (out_adapted - ref).abs().max() > 1e-3  # training did something
    merged = merge(peft_model)
    assert type(merged).__name__ == "DINOv3ViTModel"
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_cls(merged, x), out_adapted, atol=1e-5, rtol=0)
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= {f"{t}.weight" for t in targets}


def test_explora_split_of_unfrozen_and_lora(tiny_backbone_dir: Path) -> None:
    model = _load(tiny_backbone_dir)
    unfrozen = block_parameter_names(model, [1])
    unfrozen += [n for n in norm_parameter_names(model) if n not in unfrozen]
    assert "norm.weight" in unfrozen and "model.layer.0.norm1.weight" in unfrozen
    spec = AdapterSpec("lora", 4, 8, targets=linear_targets(model, [0], "qv"), unfrozen=unfrozen)
    peft_model = attach(model, spec)
    names = set(trainable(peft_model))
    lora = {n for n in names if "lora_" in n}
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in lora} == {"q_proj", "v_proj"}
    assert all(".layer.0." in n for n in lora)
    assert {n.removeprefix("base_model.model.") for n in names - lora} == set(unfrozen)
    assert not any("embeddings" in n for n in names)
    with pytest.raises(ValueError, match="both LoRA-wrapped and fully unfrozen"):
        fresh = _load(tiny_backbone_dir)
        attach(fresh, AdapterSpec("lora", 4, 8, targets=linear_targets(fresh, [1], "qv"),
                                  unfrozen=block_parameter_names(fresh, [1])))
