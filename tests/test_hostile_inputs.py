"""Trust nothing on disk: hand-edited or hostile files are refused at load with one clear line.

Covers the parts whose tests live in folders other engineers own (featstore's splits and interop)
and the cross-cutting cases of the issue "Trust nothing on disk".
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stage1 import cli
from stage1._core.errors import DataError, ExistsError


def _store(path: Path, n: int = 12, dtype: type = np.float32):
    from stage1.featstore.store import write_store

    rng = np.random.default_rng(0)
    return write_store(path, rng.normal(size=(n, 1, 4)).astype(dtype), rng.integers(0, 2, n))


# -- interop: import-features --dtype float16, export-features --out ----------------------------------
def test_import_float16_refuses_values_beyond_its_range(tmp_path: Path) -> None:
    from stage1.featstore.interop import import_features

    feats = np.ones((4, 3), dtype=np.float32)
    feats[2, 1] = 1e6  # float16 ends at 65504: the cast would store inf
    np.savez(tmp_path / "f.npz", features=feats, labels=np.array([0, 1, 0, 1]))
    with pytest.raises(DataError, match=r"f\.npz.*float16.*--dtype float32"):
        import_features(tmp_path / "f.npz", tmp_path / "st", dtype="float16")
    assert not (tmp_path / "st").exists()
    res = CliRunner().invoke(cli.main, ["import-features", str(tmp_path / "f.npz"), "--out", str(tmp_path / "st"),
                                        "--dtype", "float16"])
    assert res.exit_code == 1 and "--dtype float32" in res.output and "Traceback" not in res.output
    st = import_features(tmp_path / "f.npz", tmp_path / "ok", dtype="float32")  # float32 holds it
    assert float(st.load_features(dtype=None).max()) == 1e6


@pytest.mark.parametrize("fmt", ["h5", "npy"])
def test_export_refuses_to_overwrite_without_force(tmp_path: Path, fmt: str) -> None:
    from stage1.featstore.interop import export_features

    _store(tmp_path / "st")
    out = tmp_path / f"x.{fmt}"
    if fmt == "h5":
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "precious.txt").write_text("precious")
    with pytest.raises(ExistsError, match="--force"):
        export_features(tmp_path / "st", fmt, out)
    assert (out.read_text() if fmt == "h5" else (out / "precious.txt").read_text()) == "precious"
    res = CliRunner().invoke(cli.main, ["export-features", str(tmp_path / "st"), "--format", fmt, "--out", str(out)])
    assert res.exit_code == 2 and "--force" in res.output
    assert export_features(tmp_path / "st", fmt, out, force=True) == out  # replaced by a complete export
    assert (out.is_file() and out.stat().st_size > 100) if fmt == "h5" else sorted(p.name for p in out.iterdir()) == [
        "features.npy", "ids.npy", "labels.npy", "provenance.json", "sha256.npy"]


def test_export_force_replaces_only_the_same_kind(tmp_path: Path) -> None:
    from stage1.featstore.interop import export_features

    _store(tmp_path / "st")
    (tmp_path / "dir.h5").mkdir()
    with pytest.raises(ExistsError, match="is a folder"):
        export_features(tmp_path / "st", "h5", tmp_path / "dir.h5", force=True)
    (tmp_path / "file.npy").write_text("x")
    with pytest.raises(ExistsError, match="is a file"):
        export_features(tmp_path / "st", "npy", tmp_path / "file.npy", force=True)


# -- splits.json ------------------------------------------------------------------------------------
def _edit_splits(store: Path, edit) -> None:
    p = store / "splits.json"
    d = json.loads(p.read_text())
    edit(d)
    p.write_text(json.dumps(d))


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["rows"]["test"].append(d["rows"]["train"][0]), "in both train and test"),
    (lambda d: d["rows"]["val_calib"].append(10_000), "outside the store's rows"),
    (lambda d: d["rows"]["val_calib"].append(-1), "outside the store's rows"),
    (lambda d: d["rows"]["val_calib"].append(1.5), "integer row numbers"),
    (lambda d: d["rows"]["val_calib"].append(True), "integer row numbers"),
    (lambda d: d["rows"].update(holdout=[]), "unknown split"),
    (lambda d: d["rows"].pop("test"), "missing test"),
    (lambda d: d["rows"]["train"].append(d["rows"]["train"][0]), "lists a row twice"),
])
def test_hand_edited_splits_are_refused_at_load(tmp_path: Path, edit, match: str) -> None:
    from stage1.featstore.splits import SplitError, load_splits, write_splits

    _store(tmp_path / "st", n=40)
    write_splits(tmp_path / "st", seed=0)
    assert sum(len(v) for v in load_splits(tmp_path / "st").values()) == 40  # as written: fine
    _edit_splits(tmp_path / "st", edit)
    with pytest.raises(SplitError, match=match) as info:
        load_splits(tmp_path / "st", n_rows=40)
    assert "splits.json" in str(info.value) and "stage1 split" in str(info.value)


def test_train_refuses_overlapping_splits(tmp_path: Path) -> None:
    from stage1.featstore.splits import write_splits

    _store(tmp_path / "st", n=40)
    write_splits(tmp_path / "st", seed=0)
    _edit_splits(tmp_path / "st", lambda d: d["rows"]["test"].extend(d["rows"]["train"][:3]))
    res = CliRunner().invoke(cli.main, ["train", str(tmp_path / "st"), "--head", "mlp", "--out", str(tmp_path / "run"),
                                        "--epochs", "1", "--quiet"])
    assert res.exit_code == 1 and "in both train and test" in res.output and "Traceback" not in res.output


# -- policy.json: parameters and fitted state -----------------------------------------------------
def _fitted(name: str = "ltt", **params):
    from stage1.policies import POLICIES

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 3000)
    logits = np.stack([np.zeros(3000), (2 * y - 1) * rng.uniform(1, 8, 3000) + rng.normal(0, 1, 3000)], 1)
    params = {"alpha": 0.05, "delta": 0.1, **params} if name == "ltt" else params
    return POLICIES.create(name, **params).fit({"logits": logits}, y), logits


def _set(d: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    node = d
    for key in parents:
        node = node[key]
    node[last] = value
    return d


@pytest.mark.parametrize("path, value, match", [
    ("state.calibrator.state.temperature", -1.0, "temperature"),
    ("state.calibrator.state.temperature", 0.0, "temperature"),
    ("state.calibrator.state.temperature", "1", "temperature"),
    ("state.t0", float("nan"), "t0"),
    ("state.t1", "Infinity", "t1"),
    ("state.t1", True, "t1"),
    ("state.certified", "yes", "certified"),
    ("state.certified", 1, "certified"),
    ("state.n_needed", 2.5, "n_needed"),
    ("state.n_needed", -3, "n_needed"),
    ("state.summary", [1, 2], "summary"),
    ("state.reason", None, "reason"),
    ("state.calibrator.name", "platt", "calibrator"),
    ("params.alpha", 2.0, "alpha"),
    ("params.delta", float("inf"), "delta"),
    ("policy", "nope", "unknown policy"),
])
def test_hand_edited_policy_json_is_refused_at_load(path: str, value, match: str) -> None:
    from stage1.policies import policy_from_dict

    pol, _ = _fitted()
    d = json.loads(json.dumps(pol.to_dict()))
    assert policy_from_dict(d).certified  # as written: fine
    with pytest.raises(DataError, match=match) as info:
        policy_from_dict(_set(d, path, value), where="run/policy.json")
    assert str(info.value).startswith("run/policy.json: ") and "\n" not in str(info.value)


def test_crc_exit_everything_threshold_still_loads() -> None:
    from stage1.policies import policy_from_dict

    pol, logits = _fitted("crc", alpha=0.5, calibrator=None)
    assert pol.t0 == -np.inf and pol.to_dict()["state"]["t0"] == "-inf"
    back = policy_from_dict(json.loads(json.dumps(pol.to_dict())))
    assert back.decide({"logits": logits}).equals(pol.decide({"logits": logits}))


@pytest.mark.parametrize("name, key, value, match", [
    ("platt", "a", float("nan"), "finite"),
    ("platt", "b", "0", "finite"),
    ("isotonic", "x", lambda v: v[::-1], "increasing"),
    ("isotonic", "y", lambda v: v[::-1], "non-decreasing"),
    ("isotonic", "y", [0.0], "one length"),
    ("dirichlet", "W", [[1.0, 0.0], [0.0, float("inf")]], "finite"),
    ("dirichlet", "b", [0.0, 0.0, 0.0], "W must be"),
    ("matrix", "lam", -1.0, "lam"),
    ("beta", "W", [[1.0]], "W must be"),
])
def test_hand_edited_calibrator_state_is_refused(name: str, key: str, value, match: str) -> None:
    from stage1.policies.calibrators import CALIBRATORS, calibrator_from_dict

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    x = np.stack([np.zeros(200), (2 * y - 1) * 2.0 + rng.normal(0, 1, 200)], 1)
    d = json.loads(json.dumps(CALIBRATORS.create(name, **({"lam": 0.0} if name in ("dirichlet", "matrix") else {}))
                              .fit(x, y).to_dict()))
    calibrator_from_dict(d)  # as written: fine
    d["state"][key] = value(d["state"][key]) if callable(value) else value
    with pytest.raises(DataError, match=match):
        calibrator_from_dict(d)


def test_evaluate_refuses_a_tampered_policy(tmp_path: Path) -> None:
    run = _trained_run(tmp_path)
    assert CliRunner().invoke(cli.main, ["calibrate", str(run), "--policy", "ltt"]).exit_code == 0
    p = run / "policy.json"
    d = json.loads(p.read_text())
    d["state"]["calibrator"]["state"]["temperature"] = -1.0  # would invert every prediction
    p.write_text(json.dumps(d))
    res = CliRunner().invoke(cli.main, ["evaluate", str(run)])
    assert res.exit_code == 1 and "policy.json" in res.output and "temperature" in res.output


# -- head.json / head.safetensors -------------------------------------------------------------------
def _trained_run(tmp_path: Path) -> Path:
    from stage1.featstore.splits import write_splits

    _store(tmp_path / "st", n=120)
    write_splits(tmp_path / "st", seed=0)
    res = CliRunner().invoke(cli.main, ["train", str(tmp_path / "st"), "--head", "mlp", "--out", str(tmp_path / "run"),
                                        "--epochs", "1", "--hidden", "8", "--quiet"])
    assert res.exit_code == 0, res.output
    return tmp_path / "run"


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["hparams"].update(hidden=-4), "hidden"),
    (lambda m: m["hparams"].update(dropout=float("nan")), "dropout"),
    (lambda m: m["hparams"].update(bogus=1), "bogus"),
    (lambda m: m.update(in_dim=5), "shape"),
    (lambda m: m.update(in_dim="4"), "in_dim"),
    (lambda m: m["hparams"].update(hidden=16), "shape"),
    (lambda m: m.update(standardize_active="yes"), "standardize_active"),
])
def test_hand_edited_head_json_is_refused_at_load(tmp_path: Path, edit, match: str) -> None:
    from stage1.heads import load_head

    run = _trained_run(tmp_path)
    load_head(run)  # as written: fine
    p = run / "head.json"
    meta = json.loads(p.read_text())
    edit(meta)
    p.write_text(json.dumps(meta))
    with pytest.raises(DataError, match=match) as info:
        load_head(run)
    assert "head.json" in str(info.value) and "\n" not in str(info.value)


def test_non_finite_head_weights_are_refused(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from stage1.heads import load_head

    run = _trained_run(tmp_path)
    tensors = load_file(run / "head.safetensors")
    key = next(k for k, v in tensors.items() if v.dtype.kind == "f" and v.size)
    tensors[key] = np.full_like(tensors[key], np.nan)
    save_file(tensors, run / "head.safetensors")
    with pytest.raises(DataError, match="NaN or infinite"):
        load_head(run)


def test_export_features_cli_refuses_to_overwrite_without_force(tmp_path) -> None:
    """`export-features --out` over an existing export is a one-line error; --force replaces it."""
    import numpy as np
    from click.testing import CliRunner

    from stage1.featstore.commands import export_features
    from stage1.featstore.store import write_store

    store = tmp_path / "s.zarr"
    write_store(store, np.ones((2, 1, 3), np.float32), labels=[0, 1])
    out = tmp_path / "x.h5"
    args = [str(store), "--format", "h5", "--out", str(out)]
    assert CliRunner().invoke(export_features, args).exit_code == 0
    res = CliRunner().invoke(export_features, args)
    assert res.exit_code == 2 and "--force" in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)  # a message, not a traceback
    assert CliRunner().invoke(export_features, [*args, "--force"]).exit_code == 0


# -- backbone identity: config.json is pinned next to the weights ------------------------------------
def _legacy_copy(tmp_path: Path, with_config_hash: bool) -> tuple[Path, Path]:
    import shutil

    from stage1._core.io import sha256_file
    from stage1.workflows.bundle import manifest_digest

    legacy = Path(__file__).parent / "data" / "legacy_v0_1"
    bundle, backbone = tmp_path / "bundle", tmp_path / "backbone"
    shutil.copytree(legacy / "bundle", bundle)
    shutil.copytree(legacy / "backbone", backbone)
    if with_config_hash:  # as a bundle exported now records it
        manifest = json.loads((bundle / "bundle.json").read_text())
        manifest["backbone"]["config_sha256"] = sha256_file(backbone / "config.json")
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (bundle / "bundle.json").write_text(json.dumps(manifest))
    return bundle, backbone


def test_predictor_refuses_same_weights_with_an_edited_config(tmp_path: Path) -> None:
    from stage1.workflows.bundle import BundleError
    from stage1.workflows.predictor import Stage1Predictor

    bundle, backbone = _legacy_copy(tmp_path, with_config_hash=True)
    Stage1Predictor.from_bundle(bundle, backbone=backbone)  # the recorded config loads
    config = json.loads((backbone / "config.json").read_text())
    config["hidden_act"] = "relu" if config.get("hidden_act") != "relu" else "gelu"
    (backbone / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="config.json sha256"):
        Stage1Predictor.from_bundle(bundle, backbone=backbone)


def test_bundle_without_config_hash_still_loads_and_says_so(tmp_path: Path, capsys) -> None:
    from stage1.workflows.predictor import Stage1Predictor

    bundle, backbone = _legacy_copy(tmp_path, with_config_hash=False)
    Stage1Predictor.from_bundle(bundle, backbone=backbone)
    assert "does not record its backbone's config.json hash" in capsys.readouterr().err


# -- a damaged store: every command refuses it -----------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["train", "{st}", "--head", "mlp", "--out", "{run}", "--epochs", "1", "--quiet"],
    ["split", "{st}"],
    ["export-features", "{st}", "--format", "npy", "--out", "{run}"],
    ["info", "{st}"],
])
def test_commands_refuse_a_store_with_a_deleted_chunk(tmp_path: Path, args: list[str]) -> None:
    from stage1.featstore.store import write_store

    rng = np.random.default_rng(0)
    from stage1.featstore.splits import write_splits

    write_store(tmp_path / "st", rng.normal(size=(40, 1, 4)).astype(np.float32), rng.integers(0, 2, 40), chunk_rows=16)
    if args[0] == "train":
        write_splits(tmp_path / "st", seed=0)
    (tmp_path / "st" / "features" / "c" / "1" / "0" / "0").unlink()
    res = CliRunner().invoke(cli.main, [a.format(st=tmp_path / "st", run=tmp_path / "out") for a in args])
    assert res.exit_code == 1 and "is missing" in res.output and "Traceback" not in res.output, res.output
