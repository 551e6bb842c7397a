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


# ==================================================================================================
# The corpus: every bad-input kind through extract, import, train, calibrate, export and predict (and
# info / split / sweep). Each case must end in a one-line error or a quarantine entry (an error record,
# for predict), never a traceback, never a hang (each case under a timeout), and must leave what was
# already written as it was. ``Case.category`` is where issue 14 filed the input: traceback, silent (a
# wrong result, exit 0), hang, unclear (a message without the file, row or option), skip (a silent skip),
# or fine (already a clear error or quarantine when the issue was filed; kept so it stays so).
# ==================================================================================================
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_image, png_header_only  # noqa: E402

CORPUS_FAST = ["--image-size", "32", "--batch-size", "4", "--chunk-rows", "8", "--threads", "1", "--quiet",
               "--workers", "0"]
N_IMAGES = 24


@dataclass
class Work:
    """One case's private copies of a finished pipeline (images, labels, store, run, bundle)."""

    tmp: Path
    images: Path
    labels: Path
    store: Path
    run: Path
    bundle: Path
    backbone: Path

    def extract(self, *extra: str, out: str = "s", labels: bool = True) -> list[str]:
        return ["extract", "--images", str(self.images), "--backbone", str(self.backbone), "--out", str(self.tmp / out),
                *CORPUS_FAST, *(["--labels", str(self.labels)] if labels else []), *extra]

    def add_row(self, name: str, label: int = 1) -> Path:
        with open(self.labels, "a") as fh:
            fh.write(f"{name},{label}\n")
        return self.images / name

    def train(self, *extra: str) -> list[str]:
        return ["train", str(self.store), "--head", "mlp", "--out", str(self.tmp / "run2"), "--epochs", "1",
                "--hidden", "8", "--quiet", *extra]

    def predict(self, *images: Path, backbone: Path | None = None) -> list[str]:
        return ["predict", str(self.bundle), *map(str, images), "--backbone", str(backbone or self.backbone)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, tiny_backbone_dir: Path) -> Path:
    """images -> extract -> split -> train -> calibrate -> export, once for the corpus."""
    root = tmp_path_factory.mktemp("corpus")
    images = root / "images"
    images.mkdir()
    lines = ["path,label"]
    for i in range(N_IMAGES):
        make_image(100 + i, size=(40 + i, 32 + i % 5)).save(images / f"img{i}.png")
        lines.append(f"img{i}.png,{i % 2}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    steps = [
        ["extract", "--images", str(images), "--labels", str(root / "labels.csv"), "--backbone", str(tiny_backbone_dir),
         "--out", str(root / "store"), *CORPUS_FAST],
        ["split", str(root / "store"), "--fractions", "0.5,0.1,0.3,0.1"],
        ["train", str(root / "store"), "--head", "mlp", "--out", str(root / "run"), "--epochs", "2", "--hidden", "8",
         "--quiet"],
        ["calibrate", str(root / "run"), "--policy", "ltt"],  # a temperature calibrator inside (too few rows to certify)
        ["export", str(root / "run"), "--out", str(root / "bundle")],
    ]
    for args in steps:
        res = runner.invoke(cli.main, args)
        assert res.exit_code == 0, (args, res.output)
    return root


@pytest.fixture
def work(pipeline: Path, tiny_backbone_dir: Path, tmp_path: Path) -> Work:
    for name in ("images", "store", "run", "bundle"):
        shutil.copytree(pipeline / name, tmp_path / name, symlinks=True)
    shutil.copy(pipeline / "labels.csv", tmp_path / "labels.csv")
    return Work(tmp_path, tmp_path / "images", tmp_path / "labels.csv", tmp_path / "store", tmp_path / "run",
                tmp_path / "bundle", tiny_backbone_dir)


# -- helpers that make bad inputs ---------------------------------------------------------------------
def _attrs(store: Path, **kv) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"].update(kv)
    (store / "zarr.json").write_text(json.dumps(meta))


def _json_edit(path: Path, fn: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _backbone_copy(w: Work) -> Path:
    bb = w.tmp / "bb"
    shutil.copytree(w.backbone, bb)
    return bb


def _pickled_backbone(w: Work) -> Path:
    import pickle

    bb = _backbone_copy(w)
    (bb / "model.safetensors").unlink()
    (bb / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": 1}))
    return bb


def _nan_into_chunk(store: Path) -> None:
    """Overwrite the first feature of row 1 with NaN bytes in place (same file size)."""
    from stage1.featstore import open_store

    st = open_store(str(store))
    arr = st._array("features")
    f = store / "features" / "c" / "0" / "0" / "0"
    raw = bytearray(f.read_bytes())
    item = np.dtype(arr.dtype).itemsize
    offset = 1 * st.views * st.dim * item
    raw[offset:offset + item] = np.array([np.nan], dtype=arr.dtype).tobytes()
    f.write_bytes(bytes(raw))


def _npz(w: Work, name: str = "f.npz", **arrays) -> Path:
    p = w.tmp / name
    np.savez(p, **arrays)
    return p


def _fifo(w: Work, name: str) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(w.images / name)
    return w.images / name


def _enospc(monkeypatch) -> None:
    import errno

    import zarr.storage._local as local

    real = local._put
    seen = {"n": 0}

    def put(path, value, *args, **kwargs):  # zarr's private _put: its signature varies by release
        if "/features/c/" in str(path).replace(os.sep, "/"):
            seen["n"] += 1
            if seen["n"] > 1:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, value, *args, **kwargs)

    monkeypatch.setattr(local, "_put", put)


@dataclass(frozen=True)
class Case:
    """A bad input: ``make(work, monkeypatch)`` creates it and returns the command line; ``expect`` is
    "error" (exit 1 or 2, one line holding ``needle``), "quarantine" (exit 0, a quarantine entry
    with reason ``needle``), "record" (predict: exit 0, a record with error / reason ``needle``) or
    "reported" (exit 0, ``needle`` on stderr); ``keep`` names the Work paths that must not change."""

    id: str
    stage: str
    category: str
    make: Callable[[Work, object], list[str]]
    expect: str
    needle: str
    keep: tuple[str, ...] = ("images", "labels")


def _corrupt_image(w: Work, name: str = "bad.png") -> Path:
    (w.images / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return w.images / name


def _truncated(w: Work) -> Path:
    raw = (w.images / "img0.png").read_bytes()
    (w.images / "cut.png").write_bytes(raw[: len(raw) // 2])
    return w.images / "cut.png"


def _symlink_out(w: Work) -> list[str]:
    outside = w.tmp / "outside"
    outside.mkdir()
    make_image(5).save(outside / "x.png")
    (w.images / "link").symlink_to(outside, target_is_directory=True)
    w.add_row("link/x.png")
    return w.extract()


def _other_images(w: Work) -> list[str]:
    assert CliRunner().invoke(cli.main, w.extract("--chunk-rows", "8", out="s")).exit_code == 0
    other = w.tmp / "other"
    other.mkdir()
    for i in range(N_IMAGES):
        make_image(900 + i).save(other / f"img{i}.png")
    _attrs(w.tmp / "s", complete=False, n_consumed=8, n_committed=8,
           chunk_files={"0": json.loads((w.tmp / "s" / "zarr.json").read_text())["attributes"]["chunk_files"]["0"]})
    args = w.extract(out="s")
    args[args.index("--images") + 1] = str(other)
    return args


CORPUS: list = [  # Case, or pytest.param(Case, marks=...) for a known gap outside these files
    # ---------------------------------------------------------------- extract: bad images (quarantined)
    Case("corrupt-image", "extract", "fine", lambda w, m: (w.add_row(_corrupt_image(w).name), w.extract())[1],
         "quarantine", "not an image"),
    Case("truncated-image", "extract", "fine", lambda w, m: (w.add_row(_truncated(w).name), w.extract())[1],
         "quarantine", "truncated"),
    Case("zero-bytes", "extract", "fine", lambda w, m: ((w.images / "z.png").write_bytes(b""), w.add_row("z.png"),
                                                        w.extract())[2], "quarantine", "zero bytes"),
    Case("decompression-bomb", "extract", "fine",
         lambda w, m: (png_header_only(w.images / "bomb.png", 30000, 30000), w.add_row("bomb.png"), w.extract())[2],
         "quarantine", "decompression bomb"),
    Case("missing-file", "extract", "fine", lambda w, m: (w.add_row("gone.png"), w.extract())[1], "quarantine",
         "missing"),
    Case("fifo-listed", "extract", "hang", lambda w, m: (w.add_row(_fifo(w, "pipe.png").name), w.extract())[1],
         "quarantine", "not a regular file"),
    Case("text-as-jpg", "extract", "fine",
         lambda w, m: ((w.images / "t.jpg").write_text("hello"), w.add_row("t.jpg"), w.extract())[2], "quarantine",
         "not an image"),
    Case("too-large", "extract", "fine",
         lambda w, m: w.extract("--max-bytes", str(max((w.images / f"img{i}.png").stat().st_size
                                                       for i in range(N_IMAGES)) - 1)), "quarantine", "too large"),
    # ---------------------------------------------------------------- extract: bad lists and options (errors)
    Case("symlink-escape", "extract", "silent", lambda w, m: _symlink_out(w), "error", "outside the --images folder"),
    Case("bad-label", "extract", "fine", lambda w, m: (w.add_row("img0.png", 7), w.extract())[1], "error",
         "is not 0, 1 or empty"),
    Case("unknown-header", "extract", "unclear",
         lambda w, m: (w.labels.write_text("filename,target\nimg0.png,1\n"), w.extract())[1], "error",
         "is not recognised"),
    Case("dotdot-path", "extract", "fine", lambda w, m: (w.add_row("../x.png"), w.extract())[1], "error",
         "escapes --images"),
    Case("absolute-path", "extract", "fine", lambda w, m: (w.add_row("/etc/passwd"), w.extract())[1], "error",
         "absolute path"),
    Case("duplicate-row", "extract", "fine", lambda w, m: (w.add_row("img0.png", 0), w.extract())[1], "error",
         "duplicate of line"),
    Case("csv-not-utf8", "extract", "fine",
         lambda w, m: (w.labels.write_bytes(b"path,label\n\xff\xfe.png,1\n"), w.extract())[1], "error", "not UTF-8"),
    Case("csv-semicolons", "extract", "silent",
         lambda w, m: (w.labels.write_text("\n".join(f"img{i}.png;{i % 2}" for i in range(N_IMAGES)) + "\n"),
                       w.extract())[1], "error", "no image was kept"),
    Case("csv-empty", "extract", "fine", lambda w, m: (w.labels.write_text("path,label\n"), w.extract())[1], "error",
         "no image rows"),
    Case("all-images-bad", "extract", "silent",
         lambda w, m: ([(w.images / f"img{i}.png").write_bytes(b"junk") for i in range(N_IMAGES)], w.extract())[1],
         "error", "no image was kept", keep=("labels",)),
    Case("pickle-backbone", "extract", "traceback",
         lambda w, m: (lambda bb: w.extract()[:4] + [str(bb)] + w.extract()[5:])(_pickled_backbone(w)), "error",
         "never unpickles"),
    Case("image-size-not-patch-multiple", "extract", "fine",
         lambda w, m: [a if a != "32" else "30" for a in w.extract()], "error", "multiple of the backbone's patch"),
    Case("max-bytes-0", "extract", "fine", lambda w, m: w.extract("--max-bytes", "0"), "error", "--max-bytes"),
    Case("views-0", "extract", "fine", lambda w, m: w.extract("--views", "0"), "error", "--views"),
    Case("no-images-in-folder", "extract", "fine",
         lambda w, m: ([p.unlink() for p in w.images.iterdir()], w.extract(labels=False))[1], "error",
         "no image files", keep=("labels",)),
    Case("disk-full", "extract", "unclear", lambda w, m: (_enospc(m), w.extract())[1], "error",
         "free space on that disk or pick another --out"),
    Case("resume-other-images", "extract", "silent", lambda w, m: _other_images(w), "error",
         "is not the image this store was extracted from", keep=("images", "labels", "s")),
    Case("identical-images-conflicting-labels", "extract", "skip",
         lambda w, m: (shutil.copy(w.images / "img0.png", w.images / "copy.png"), w.add_row("copy.png", 1),
                       w.extract())[2], "reported", "conflicting labels"),
    Case("resume-other-max-pixels", "extract", "silent",
         lambda w, m: (CliRunner().invoke(cli.main, w.extract()), w.extract("--max-pixels", "100"))[1], "error",
         "max_pixels", keep=("images", "labels", "s")),
    Case("heic-without-labels", "extract", "skip",
         lambda w, m: (shutil.copy(w.images / "img0.png", w.images / "photo.heic"), w.extract(labels=False))[1],
         "reported", "'photo.heic'"),
    # ---------------------------------------------------------------- import-features
    Case("import-float16-overflow", "import", "silent",
         lambda w, m: ["import-features", str(_npz(w, features=np.full((3, 2), 1e6, np.float32), labels=[0, 1, 0])),
                       "--out", str(w.tmp / "imp"), "--dtype", "float16"], "error", "--dtype float32"),
    Case("import-d0", "import", "traceback",
         lambda w, m: ["import-features", str(_npz(w, features=np.ones((3, 0), np.float32), labels=[0, 1, 0])),
                       "--out", str(w.tmp / "imp")], "error", "D >= 1"),
    Case("import-v0", "import", "traceback",
         lambda w, m: ["import-features", str(_npz(w, features=np.ones((3, 0, 2), np.float32), labels=[0, 1, 0])),
                       "--out", str(w.tmp / "imp")], "error", "D >= 1"),
    Case("import-nan", "import", "unclear",
         lambda w, m: ["import-features", str(_npz(w, features=np.array([[1.0, 2.0], [np.nan, 0.0]], np.float32),
                                                   labels=[0, 1])), "--out", str(w.tmp / "imp")], "error",
         "1 row(s) (1)"),
    Case("import-bad-labels", "import", "fine",
         lambda w, m: ["import-features", str(_npz(w, features=np.ones((2, 2), np.float32), labels=[0, 2])),
                       "--out", str(w.tmp / "imp")], "error", "labels must be 0, 1 or -1"),
    Case("import-object-arrays", "import", "fine",
         lambda w, m: ["import-features", str(_npz(w, features=np.ones((2, 2), np.float32), labels=[0, 1],
                                                   ids=np.array(["a", 1], dtype=object))),
                       "--out", str(w.tmp / "imp")], "error", "without pickle"),
    Case("import-not-a-zip", "import", "fine",
         lambda w, m: ["import-features", str((w.tmp / "f.npz", (w.tmp / "f.npz").write_text("x"))[0]),
                       "--out", str(w.tmp / "imp")], "error", "not a .npz"),
    Case("import-damaged-h5", "import", "fine",
         lambda w, m: ["import-features", str((w.tmp / "f.h5", (w.tmp / "f.h5").write_text("x"))[0]),
                       "--out", str(w.tmp / "imp")], "error", "not a readable HDF5 file"),
    Case("import-over-a-store", "import", "fine",
         lambda w, m: ["import-features", str(_npz(w, features=np.ones((2, 2), np.float32), labels=[0, 1])),
                       "--out", str(w.store)], "error", "not empty", keep=("store",)),
    Case("import-row-mismatch", "import", "fine",
         lambda w, m: ["import-features", str(_npz(w, features=np.ones((3, 2), np.float32), labels=[0, 1])),
                       "--out", str(w.tmp / "imp")], "error", "2 labels for 3 feature rows"),
    # ---------------------------------------------------------------- a damaged store: train, info, split
    Case("deleted-chunk", "train", "silent",
         lambda w, m: ((w.store / "features" / "c" / "1" / "0" / "0").unlink(), w.train())[1], "error", "is missing",
         keep=("store", "run")),
    Case("short-chunk", "train", "silent",
         lambda w, m: ((lambda f: f.write_bytes(f.read_bytes()[:-4]))(w.store / "features" / "c" / "0" / "0" / "0"),
                       w.train())[1], "error", "bytes, expected", keep=("store", "run")),
    Case("n-committed-1000", "train", "silent", lambda w, m: (_attrs(w.store, n_committed=1000), w.train())[1],
         "error", "n_committed", keep=("store", "run")),
    Case("n-committed-negative", "train", "silent", lambda w, m: (_attrs(w.store, n_committed=-5), w.train())[1],
         "error", "n_committed", keep=("store", "run")),
    Case("n-committed-string", "train", "silent", lambda w, m: (_attrs(w.store, n_committed="24"), w.train())[1],
         "error", "n_committed", keep=("store", "run")),
    Case("nan-in-a-chunk", "train", "unclear", lambda w, m: (_nan_into_chunk(w.store), w.train())[1], "error",
         "(rows 1)", keep=("store", "run")),
    Case("splits-overlap", "train", "silent",
         lambda w, m: (_json_edit(w.store / "splits.json", lambda d: d["rows"]["test"].append(d["rows"]["train"][0])),
                       w.train())[1], "error", "in both train and test", keep=("store", "run")),
    Case("splits-row-out-of-range", "train", "traceback",
         lambda w, m: (_json_edit(w.store / "splits.json", lambda d: d["rows"]["val_calib"].append(999)), w.train())[1],
         "error", "outside the store's rows", keep=("store", "run")),
    Case("splits-missing", "train", "fine", lambda w, m: ((w.store / "splits.json").unlink(), w.train())[1], "error",
         "stage1 split", keep=("store", "run")),
    Case("splits-of-another-store-state", "train", "silent",
         lambda w, m: (_json_edit(w.store / "splits.json", lambda d: d["store"].update(rows=10, n_committed=10)),
                       w.train())[1], "error", "made when the store had 10 rows", keep=("store", "run")),
    Case("lr-inf", "train", "unclear", lambda w, m: w.train("--lr", "inf"), "error", "lr", keep=("store", "run")),
    Case("hidden-0", "train", "skip", lambda w, m: w.train("--hidden", "0"), "error", "hidden=0",
         keep=("store", "run")),
    Case("label-smoothing-2", "train", "traceback", lambda w, m: w.train("--label-smoothing", "2"), "error",
         "label_smoothing", keep=("store", "run")),
    Case("provenance-a-string", "info", "traceback", lambda w, m: (_attrs(w.store, provenance="x"), ["info", str(w.store)])[1],
         "error", "attribute provenance", keep=("store",)),
    Case("provenance-null", "info", "traceback",
         lambda w, m: (_attrs(w.store, provenance=None), ["info", str(w.store), "--json"])[1], "error",
         "attribute provenance", keep=("store",)),
    Case("garbage-zarr-json", "info", "traceback",
         lambda w, m: ((w.store / "zarr.json").write_text("{garbage"), ["info", str(w.store)])[1], "error",
         "not valid JSON", keep=("store",)),
    Case("garbage-zarr-json-train", "train", "traceback",
         lambda w, m: ((w.store / "zarr.json").write_text("{garbage"), w.train())[1], "error", "not valid JSON",
         keep=("store", "run")),
    Case("info-verify-flipped-byte", "info", "silent",
         lambda w, m: ((lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:]))(
             w.store / "features" / "c" / "0" / "0" / "0"), ["info", str(w.store), "--verify"])[1], "error",
         "does not match its recorded sha256", keep=("store",)),
    Case("export-features-over-a-file", "export", "silent",
         lambda w, m: ((w.tmp / "x.h5").write_text("precious"),
                       ["export-features", str(w.store), "--format", "h5", "--out", str(w.tmp / "x.h5")])[1], "error",
         "--force", keep=("store", "x.h5")),
    Case("split-deleted-chunk", "split", "silent",
         lambda w, m: ((w.store / "labels" / "c" / "0").unlink(), ["split", str(w.store)])[1], "error", "is missing",
         keep=("store",)),
    # ---------------------------------------------------------------- calibrate
    Case("unknown-policy", "calibrate", "traceback", lambda w, m: ["calibrate", str(w.run), "--policy", "nope"], "error",
         "nope", keep=("run",)),
    Case("alpha-2", "calibrate", "fine", lambda w, m: ["calibrate", str(w.run), "--policy", "ltt", "--alpha", "2"],
         "error", "alpha", keep=("run",)),
    Case("threshold-1e400", "calibrate", "traceback",
         lambda w, m: ["calibrate", str(w.run), "--policy", "threshold", "--threshold", "1e400"], "error", "threshold",
         keep=("run",)),
    Case("scores-corrupt", "calibrate", "traceback",
         lambda w, m: ((w.run / "scores.safetensors").write_bytes(b"junk" * 10),
                       ["calibrate", str(w.run), "--policy", "ltt"])[1], "error", "scores.safetensors",
         keep=("store",)),
    # ---------------------------------------------------------------- export
    Case("policy-certified-yes", "export", "silent",
         lambda w, m: (_json_edit(w.run / "policy.json", lambda d: d["state"].update(certified="yes")),
                       ["export", str(w.run), "--out", str(w.tmp / "b2")])[1], "error", "certified", keep=("run",)),
    Case("policy-temperature-negative", "export", "silent",
         lambda w, m: (_json_edit(w.run / "policy.json",
                                  lambda d: d["state"]["calibrator"]["state"].update(temperature=-1.0)),
                       ["export", str(w.run), "--out", str(w.tmp / "b2")])[1], "error", "temperature", keep=("run",)),
    Case("policy-temperature-negative-evaluate", "export", "silent",
         lambda w, m: (_json_edit(w.run / "policy.json",
                                  lambda d: d["state"]["calibrator"]["state"].update(temperature=-1.0)),
                       ["evaluate", str(w.run)])[1], "error", "temperature", keep=("run",)),
    Case("policy-threshold-nan", "export", "silent",
         lambda w, m: (_json_edit(w.run / "policy.json", lambda d: d["state"].update(t0="NaN")),
                       ["export", str(w.run), "--out", str(w.tmp / "b2")])[1], "error", "t0", keep=("run",)),
    Case("head-safetensors-corrupt", "export", "traceback",
         lambda w, m: ((w.run / "head.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"),
                       ["export", str(w.run), "--out", str(w.tmp / "b2")])[1], "error", "head.safetensors",
         keep=("run",)),
    Case("export-over-a-bundle", "export", "fine", lambda w, m: ["export", str(w.run), "--out", str(w.bundle)],
         "error", "--force", keep=("run", "bundle")),
    # ---------------------------------------------------------------- predict
    Case("predict-corrupt-image", "predict", "fine", lambda w, m: w.predict(_corrupt_image(w)), "record",
         "not an image", keep=("bundle",)),
    Case("predict-zero-bytes", "predict", "fine",
         lambda w, m: ((w.images / "z.png").write_bytes(b""), w.predict(w.images / "z.png"))[1], "record",
         "zero bytes", keep=("bundle",)),
    Case("predict-fifo", "predict", "hang", lambda w, m: w.predict(_fifo(w, "pipe.png")), "record",
         "not a regular file", keep=("bundle",)),
    Case("predict-missing-image", "predict", "fine", lambda w, m: w.predict(w.images / "gone.png"), "record",
         "missing", keep=("bundle",)),
    Case("predict-heic-in-a-folder", "predict", "skip",
         lambda w, m: (shutil.copy(w.images / "img0.png", w.images / "photo.heic"), w.predict(w.images))[1],
         "reported", "'photo.heic'", keep=("bundle", "images")),
    Case("predict-tampered-bundle", "predict", "silent",
         lambda w, m: (_json_edit(w.bundle / "policy.json", lambda d: d["state"].update(t0=0.0)),
                       w.predict(w.images / "img0.png"))[1], "error", "policy.json", keep=("bundle",)),
    Case("predict-edited-backbone-config", "predict", "silent",
         lambda w, m: (lambda bb: (_json_edit(bb / "config.json", lambda d: d.update(layer_norm_eps=0.5)),
                                   w.predict(w.images / "img0.png", backbone=bb))[1])(_backbone_copy(w)),
         "error", "config.json", keep=("bundle",)),
    Case("predict-pickle-backbone", "predict", "traceback",
         lambda w, m: w.predict(w.images / "img0.png", backbone=_pickled_backbone(w)), "error", "never unpickles",
         keep=("bundle",)),
    # ---------------------------------------------------------------- sweep
    Case("sweep-bad-storage", "sweep", "traceback",
         lambda w, m: ["sweep", str(w.store), "--study", "s", "--storage", "nonsense", "--trials", "1"], "error",
         "--storage", keep=("store",)),
    Case("sweep-invalid-space", "sweep", "traceback",
         lambda w, m: ((w.tmp / "s.toml").write_text("[head.mlp]\nepochs = { low = 1, high = 3, step = 0 }\n"
                                                      "[policy.threshold]\n"),
                       ["sweep", str(w.store), "--study", "s", "--space", str(w.tmp / "s.toml"),
                        "--storage", f"sqlite:///{w.tmp / 'x.db'}", "--trials", "2"])[1], "error", "step must be",
         keep=("store",)),
]


def _case(entry) -> Case:
    """The Case of a CORPUS entry (a pytest.param carries it as its only value)."""
    return entry if isinstance(entry, Case) else entry.values[0]


def _snapshot(paths: list[Path]) -> dict[str, bytes]:
    """Every file under ``paths`` (relative name -> bytes; FIFOs and lock files skipped)."""
    import stat

    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*"))
        for p in files:
            if p.is_symlink() or not stat.S_ISREG(p.lstat().st_mode) or p.name == ".featstore.lock":
                continue
            out[str(p)] = p.read_bytes()
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CORPUS, ids=[_case(c).id for c in CORPUS])
def test_bad_input_corpus(case: Case, work: Work, monkeypatch) -> None:
    args = case.make(work, monkeypatch)
    kept = [getattr(work, name) if hasattr(work, name) else work.tmp / name for name in case.keep]
    before = _snapshot(kept)
    res = CliRunner().invoke(cli.main, args)
    out = res.output
    assert "Traceback" not in out and (res.exception is None or isinstance(res.exception, SystemExit)), \
        (case.id, out, repr(res.exception))
    if case.expect == "error":
        assert res.exit_code in (1, 2), (case.id, res.exit_code, out)
        errors = [line for line in out.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1 and case.needle in errors[0], (case.id, out)
    else:
        assert res.exit_code == 0, (case.id, out)
    if case.expect == "quarantine":
        from stage1.featstore import open_store

        reasons = {q["reason"] for q in open_store(str(work.tmp / "s")).quarantined}
        assert case.needle in reasons, (case.id, reasons)
    if case.expect == "record":
        records = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]  # stdout only
        assert records and all(r.get("error") or r.get("reason") for r in records), (case.id, out)
        assert any(case.needle in f"{r.get('error')} {r.get('reason')}" for r in records), (case.id, records)
    if case.expect == "reported":
        assert case.needle in out, (case.id, out)
    after = _snapshot(kept)
    assert after == before, (case.id, sorted(set(before) ^ set(after)) or
                             [k for k in before if before[k] != after.get(k)])


def test_corpus_covers_every_stage() -> None:
    cases = [_case(c) for c in CORPUS]
    assert {"extract", "import", "train", "calibrate", "export", "predict"} <= {c.stage for c in cases}
    assert len({c.id for c in cases}) == len(cases)
    assert {c.expect for c in cases} <= {"error", "quarantine", "record", "reported"}
