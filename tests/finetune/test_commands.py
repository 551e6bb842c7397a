"""`finetune` and `adapt` end to end on a tiny random DINOv3: outputs load offline and feed `extract`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_image

from stage1 import cli
from stage1._core.io import read_json, sha256_file

TINY = ["--image-size", "32", "--batch-size", "4", "--lora-rank", "4"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 generated images (labels alternate) plus one broken file, listed in labels.csv."""
    folder = tmp_path_factory.mktemp("ft_images")
    lines = ["path,label"]
    for i in range(24):
        make_image(100 + i, size=(40 + i, 36)).save(folder / f"i{i}.png")
        lines.append(f"i{i}.png,{i % 2}")
    (folder / "broken.jpg").write_bytes(b"not an image")
    lines.append("broken.jpg,1")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _invoke(args: list[str]) -> tuple[int, str, str]:
    """(exit code, all output, stdout only)."""
    res = CliRunner().invoke(cli.main, args)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output, res.stdout


def _state(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(path), local_files_only=True).state_dict()


def _changed(parent: Path, child: Path) -> set[str]:
    a, b = _state(parent), _state(child)
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_finetune_writes_a_backbone_that_loads_offline_and_feeds_extract(
    labelled: Path, tiny_backbone_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "ft"
    code, output, stdout = _invoke(["finetune", "--images", str(labelled), "--labels", str(labelled / "labels.csv"),
                                    "--backbone", str(tiny_backbone_dir), "--out", str(out), "--peft", "dora",
                                    "--blocks", "1", "--epochs", "2", "--head-param", "hidden=8", *TINY])
    assert code == 0, output
    summary = json.loads(stdout)
    assert summary["quarantined"] == 1 and summary["n_images"] == 24
    prov = read_json(out / "provenance.json")
    assert prov["schema_version"] == 1 and prov["kind"] == "finetune"
    assert prov["parent"]["weights_sha256"] == sha256_file(tiny_backbone_dir / "model.safetensors")
    assert prov["output"]["weights_sha256"] == sha256_file(out / "model.safetensors")
    assert prov["method"]["peft"] == "dora" and prov["method"]["rank"] == 4 and prov["method"]["blocks"] == 1
    quarantined = prov["data"]["quarantined"]
    assert [(q["path"], q["reason"]) for q in quarantined] == [("broken.jpg", "not an image")]
    assert sorted(quarantined[0]) == ["detail", "path", "reason"] and "broken.jpg" in quarantined[0]["detail"]
    split = prov["data"]["split"]
    assert split["used"] == ["train", "val_select"] and split["n_train"] == split["counts"]["train"]["n"]
    # merged weights: a plain transformers model whose only changes are the last block's projections
    changed = _changed(tiny_backbone_dir, out)
    assert changed and all(k.startswith("model.layer.1.") and k.endswith("_proj.weight") for k in changed)
    # the jointly trained head loads with heads.load_head
    from stage1.heads import load_head

    head = load_head(out / "head")
    assert head.hparams["hidden"] == 8 and prov["method"]["head_hparams"]["hidden"] == 8
    assert head.predict_scores(np.zeros((2, 32), np.float32))["logits"].shape == (2, 2)
    # ... and the folder is a valid --backbone for extract
    store = tmp_path / "store"
    code, output, *_ = _invoke(["extract", "--images", str(labelled), "--labels", str(labelled / "labels.csv"),
                            "--backbone", str(out), "--out", str(store), "--image-size", "32", "--workers", "0"])
    assert code == 0, output
    from stage1.featstore import open_store

    st = open_store(store)
    assert st.rows == 24 and st.dim == 32
    assert st.provenance["backbone"]["weights_sha256"] == prov["output"]["weights_sha256"]
    # refuses to overwrite the output folder
    code, output, *_ = _invoke(["finetune", "--images", str(labelled), "--labels", str(labelled / "labels.csv"),
                            "--backbone", str(tiny_backbone_dir), "--out", str(out), *TINY])
    assert code == 2 and "not empty" in output


@pytest.mark.parametrize("train_norms", [True, False])
def test_adapt_trains_only_the_explora_parameters_then_finetune_records_lineage(
    train_norms: bool, labelled: Path, tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapted"
    flag = "--train-norms" if train_norms else "--no-train-norms"
    code, output, *_ = _invoke(["adapt", "--images", str(labelled), "--backbone", str(tiny_backbone_dir),
                            "--out", str(out), "--epochs", "1", "--unfreeze", "1", "--lora-on", "qv",
                            "--out-dim", "32", "--head-warmup", "0", "--keep", "student", "--lr", "1e-3",
                            flag, *TINY])
    assert code == 0, output
    prov = read_json(out / "provenance.json")
    assert prov["kind"] == "adapt" and prov["method"]["unfrozen_blocks"] == [1]
    assert prov["method"]["lora_blocks"] == [0] and prov["data"]["n_used"] == 24
    assert prov["training"]["keep"] == "student" and prov["training"]["epochs"] == 1
    changed = _changed(tiny_backbone_dir, out)
    lora_weights = {"model.layer.0.attention.q_proj.weight", "model.layer.0.attention.v_proj.weight"}
    block1 = {k for k in _state(tiny_backbone_dir) if k.startswith("model.layer.1.")}
    norms = {"norm.weight", "norm.bias", *(f"model.layer.0.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias"))}
    assert lora_weights <= changed and changed & block1
    allowed = lora_weights | block1 | (norms if train_norms else set())
    assert changed <= allowed
    if train_norms:
        assert changed & norms
    if not train_norms:
        return
    # ExPLoRA's second stage: supervised PEFT on the adapted backbone; provenance keeps the chain
    ft = tmp_path / "ft"
    code, output, *_ = _invoke(["finetune", "--images", str(labelled), "--labels", str(labelled / "labels.csv"),
                            "--backbone", str(out), "--out", str(ft), "--epochs", "1", *TINY])
    assert code == 0, output
    lineage = read_json(ft / "provenance.json")["parent"]["lineage"]
    assert lineage["kind"] == "adapt" and lineage["output"]["weights_sha256"] == prov["output"]["weights_sha256"]


def test_bad_input_gives_one_line_errors(labelled: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    base = ["finetune", "--images", str(labelled), "--labels", str(labelled / "labels.csv"),
            "--backbone", str(tiny_backbone_dir)]
    code, output, *_ = _invoke([*base, "--out", str(tmp_path / "a"), "--head", "nope", *TINY])
    assert code == 2 and "unknown head 'nope'" in output
    code, output, *_ = _invoke([*base, "--out", str(tmp_path / "b"), "--image-size", "30"])
    assert code == 2 and "multiple of the backbone's patch size 16" in output  # a bad option value, as in extract
    code, output, *_ = _invoke([*base, "--out", str(tmp_path / "c"), "--head", "gate", "--epochs", "1", *TINY])
    assert code == 1 and "in_sample" in output  # the gate's cross-fitted target is not available here
    code, output, *_ = _invoke([*base, "--out", str(tmp_path / "d"), "--blocks", "3", *TINY])
    assert code == 2 and "blocks must be between 0 and 2" in output  # a bad option value
    code, output, *_ = _invoke([*base, "--out", str(tmp_path / "e"), "--aug-levels", "1,7", *TINY])
    assert code == 2 and "levels must be from 0-3" in output
    code, output, *_ = _invoke([*base, "--out", str(tmp_path / "f"), "--head-param", "hidden", *TINY])
    assert code == 2 and "KEY=VALUE" in output
    code, output, *_ = _invoke([*base, "--out", str(tmp_path / "g"), "--head-param", "widht=3", *TINY])
    assert code == 2 and "no hyperparameter(s) widht" in output
    assert not any((tmp_path / name).exists() for name in "abcdefg")  # nothing half-written


def test_finetune_accepts_lion_and_names_the_optimizers_otherwise(labelled: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    base = ["finetune", "--images", str(labelled), "--labels", str(labelled / "labels.csv"),
            "--backbone", str(tiny_backbone_dir), "--epochs", "1", "--head-param", "hidden=8", *TINY]
    code, output, _ = _invoke([*base, "--out", str(tmp_path / "lion"), "--optimizer", "lion", "--lr", "2e-5",
                               "--weight-decay", "0.1"])
    assert code == 0, output
    training = read_json(tmp_path / "lion" / "provenance.json")["training"]
    assert training["optimizer"] == "lion" and training["lr"] == 2e-5 and training["weight_decay"] == 0.1
    assert _changed(tiny_backbone_dir, tmp_path / "lion")  # Lion stepped the adapters
    code, output, _ = _invoke([*base, "--out", str(tmp_path / "sgd"), "--optimizer", "sgd"])
    assert code == 2 and "unknown optimizer 'sgd'; choose one of: adamw, fsam, lion" in output
    assert not (tmp_path / "sgd").exists()
    help_text = "".join(_invoke(["finetune", "--help"])[1].split())
    assert "adamw,fsam,lion" in help_text and "3-10xsmallerlearningrate" in help_text


def test_adapt_accepts_multi_crop_and_ibot(labelled: Path, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapted"
    code, output, *_ = _invoke(["adapt", "--images", str(labelled), "--backbone", str(tiny_backbone_dir),
                                "--out", str(out), "--epochs", "1", "--out-dim", "32", "--head-warmup", "0",
                                "--keep", "student", "--lr", "1e-3", "--multi-crop", "2", "--ibot-weight", "0.5",
                                *TINY])
    assert code == 0, output
    prov = read_json(out / "provenance.json")
    assert prov["training"]["multi_crop"] == 2 and prov["training"]["ibot_weight"] == 0.5
    assert prov["method"]["local_crop_size"] == 16
    assert "2 student-only local crops" in prov["method"]["objective"] and "iBOT" in prov["method"]["objective"]
    assert len(prov["training"]["history"]["step_ibot_loss"]) == len(prov["training"]["history"]["step_loss"])
    assert "embeddings.mask_token" in _changed(tiny_backbone_dir, out)  # iBOT trains the mask token
    help_text = "".join(_invoke(["adapt", "--help"])[1].split())  # (help wraps lines at hyphens too)
    assert "simplifiedDINOobjective" in help_text and "CLS-tokenself-distillationonly" in help_text
    assert "noiBOTmasked-patchlossandnomulti-crop" in help_text
    code, output, *_ = _invoke(["adapt", "--images", str(labelled), "--backbone", str(tiny_backbone_dir),
                                "--out", str(tmp_path / "bad"), "--multi-crop", "-1", *TINY])
    assert code == 2 and "--multi-crop" in output


@pytest.mark.parametrize("command", ["finetune", "adapt"])
def test_a_labels_row_escaping_images_through_a_symlink_is_refused(command: str, tiny_backbone_dir: Path,
                                                                   tmp_path: Path) -> None:
    from conftest import make_image

    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    make_image(0).save(images / "ok.png")
    make_image(1).save(outside / "inner.png")
    (images / "linkdir").symlink_to(outside, target_is_directory=True)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\nok.png,0\nlinkdir/inner.png,1\n")
    option = "--labels" if command == "finetune" else "--list"
    code, output, *_ = _invoke([command, "--images", str(images), option, str(csv), "--backbone",
                                str(tiny_backbone_dir), "--out", str(tmp_path / "out"), *TINY])
    assert code == 2 and "'linkdir/inner.png'" in output and "outside the --images folder" in output, output
