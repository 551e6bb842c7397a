"""Extraction: decode images in worker processes while the backbone runs, write chunk-aligned blocks.

Images are taken in fixed windows of ``batch_size`` list entries ([k*B, (k+1)*B)); each window is
decoded by one DataLoader worker and embedded as one batch. A resumed run restarts at the window
holding the first uncommitted entry, so every batch has exactly the same contents as in an
uninterrupted run and the features come out byte-identical.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .backbones import Backbone, check_image_size, load_backbone
from .images import MAX_BYTES, MAX_PIXELS, is_system_error, quarantine_reason, read_bytes
from stage1._core.io import sha256_bytes
from .labels import ImageEntry, confine_entries, describe_skipped, image_list_sha256, parse_labels_csv, scan_images
from .preprocessing import Preprocessing, ViewRecipe
from .store import DEFAULT_CHUNK_ROWS, ProvenanceMismatch, Store, unfinished_creation
from .preprocessing import CLEAN_RULES
from .splits import CONFLICTS_SHOWN, label_conflicts, warn_label_conflicts  # noqa: F401 (re-exported)
from .views import DEFAULT_RECIPE, LEVELS, PARAM_NAMES, VIEW_RECIPES, empty_params, view_recipe, view_seed
from stage1._core.errors import ConfigError, DataError, EnvironmentProblem


@dataclass
class ExtractConfig:
    """Everything `extract` needs; the CLI fills it from its options."""

    images: str
    backbone: str
    out: str
    labels: str | None = None
    batch_size: int = 32
    image_size: int = 224
    dtype: str = "float16"
    views: int = 1
    #: None: the recipe's default levels (validator: 0-3, each drawn with p 0.25), or a resumed store's
    view_levels: Sequence[int] | None = None
    view_seed: int = 0
    #: None: ``validator`` for a new store, the recorded recipe when resuming
    view_recipe: str | None = None
    #: view-0 rule (``preprocessing.CLEAN_RULES``); None: ``squash`` for a new store, the recorded one when resuming
    preprocess: str | None = None
    device: str = "cpu"
    workers: int = 2
    threads: int = 0
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    max_pixels: int = MAX_PIXELS
    #: larger image files are quarantined ("too large") without being read
    max_bytes: int = MAX_BYTES
    draft: bool = True
    progress: bool = True
    backbone_kind: str = "hf"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecodeSpec:
    """What a decode worker needs (picklable; no torch model inside)."""

    root: str
    prep: Preprocessing
    max_pixels: int
    max_bytes: int | None = MAX_BYTES


def decode_entry(spec: DecodeSpec, rel_path: str) -> tuple[np.ndarray, str, np.ndarray, np.ndarray]:
    """Pixels [V, 3, S, S] (view 0 clean, then distorted views), the file's sha256, each view's level
    int8 [V] (-1: view 0 squashed) and parameter record float32 [V, P] (``views.PARAM_NAMES``); BadImage on failure."""
    path = Path(spec.root) / rel_path
    data = read_bytes(path, spec.max_bytes)
    digest = sha256_bytes(data)
    prep = spec.prep
    img = prep.decode(data, rel_path, max_pixels=spec.max_pixels)
    n = prep.views.n
    out = np.empty((n, 3, prep.size, prep.size), dtype=np.float32)
    levels = np.full(n, -1, dtype=np.int8)
    params = np.stack([empty_params()] * n)
    out[0] = prep.clean_pixels(img)
    if prep.clean == "validator":
        levels[0] = 0
    maker = view_recipe(prep.views.recipe) if n > 1 else None
    for v in range(1, n):
        view, levels[v], params[v] = maker.view(img, view_seed(digest, v, prep.views.seed), v,  # type: ignore[union-attr]
                                                prep.views.levels, prep.size)
        out[v] = prep.pixels(view)
    return out, digest, levels, params


class WindowDataset(torch.utils.data.Dataset):
    """Item k = the decoded window [ (first+k)*B, (first+k+1)*B ) of the image list."""

    def __init__(self, spec: DecodeSpec, paths: Sequence[str], batch_size: int, first_window: int) -> None:
        self.spec = spec
        self.paths = list(paths)
        self.batch_size = batch_size
        self.first_window = first_window
        self.n_windows = math.ceil(len(self.paths) / batch_size)

    def __len__(self) -> int:
        return max(0, self.n_windows - self.first_window)

    def __getitem__(self, k: int) -> dict[str, Any]:
        w = self.first_window + k
        lo, hi = w * self.batch_size, min(len(self.paths), (w + 1) * self.batch_size)
        pixels, good, sha, bad, levels, params = [], [], [], [], [], []
        fatal = None
        for i in range(lo, hi):
            try:
                arr, digest, lv, pr = decode_entry(self.spec, self.paths[i])
            except Exception as exc:  # a bad image is quarantined; a failure of the machine stops the run
                if is_system_error(exc):
                    fatal = (self.paths[i], f"{type(exc).__name__}: {exc}", isinstance(exc, MemoryError))
                    break
                bad.append((i, *quarantine_reason(exc, self.paths[i])))
                continue
            pixels.append(arr)
            good.append(i)
            sha.append(digest)
            levels.append(lv)
            params.append(pr)
        s = self.spec.prep.size
        stacked = np.concatenate(pixels) if pixels else np.empty((0, 3, s, s), np.float32)
        return {
            "window": w,
            "lo": lo,
            "hi": hi,
            "pixels": torch.from_numpy(stacked),
            "good": good,
            "sha": sha,
            "bad": bad,
            "levels": levels,
            "params": params,
            "fatal": fatal,
        }


def resolve_defaults(cfg: ExtractConfig, recorded: Preprocessing | None = None) -> ExtractConfig:
    """Fill the options left unset (None): from the store being resumed (``recorded``), else the defaults.

    A resume keeps the recipe, levels and clean rule the store records (a 0.1.0 store: validator-v1,
    squash); a new store gets the ``validator`` recipe with its levels 0-3 and the ``squash`` clean rule.
    """
    recipe = cfg.view_recipe
    levels = cfg.view_levels
    clean = cfg.preprocess
    if recorded is not None:
        recipe = recipe if recipe is not None else recorded.views.recipe
        if levels is None and recorded.views.levels:
            levels = recorded.views.levels
        clean = clean if clean is not None else recorded.clean
    recipe = recipe if recipe is not None else DEFAULT_RECIPE
    if levels is None:
        levels = VIEW_RECIPES.create(recipe).default_levels if recipe in VIEW_RECIPES else LEVELS
    return replace(cfg, view_recipe=recipe, view_levels=tuple(int(lv) for lv in levels),
                   preprocess=clean if clean is not None else "squash")


def build_preprocessing(backbone: Backbone, cfg: ExtractConfig) -> Preprocessing:
    """The preprocessing spec of this extraction: the backbone's mean / std, size, draft, views and clean rule."""
    cfg = resolve_defaults(cfg)
    return Preprocessing.for_backbone(
        backbone, cfg.image_size, draft=cfg.draft, clean=str(cfg.preprocess),
        views=ViewRecipe.of(cfg.views, cfg.view_levels or (), cfg.view_seed, str(cfg.view_recipe)),
    )


def build_provenance(backbone: Backbone, cfg: ExtractConfig, entries: Sequence[ImageEntry]) -> dict[str, Any]:
    """The attributes a resume must match: backbone, preprocessing, views, storage, image list."""
    return {
        "kind": "extracted",
        "backbone": backbone.provenance(),
        "feature": "cls",
        "preprocessing": build_preprocessing(backbone, cfg).to_dict(),
        "storage": {"dtype": cfg.dtype, "chunk_rows": cfg.chunk_rows},
        "image_list_sha256": image_list_sha256(entries),
        "n_images": len(entries),
        "max_pixels": int(cfg.max_pixels),
        "max_bytes": int(cfg.max_bytes),
        "images_root": str(Path(cfg.images).resolve()),
        **({"labels_csv": str(Path(cfg.labels).resolve())} if cfg.labels else {}),
    }


#: Committed rows whose image file a resume re-hashes (first, last and evenly spaced between).
RESUME_SAMPLE = 8


def check_resume_content(store: Store, images: str) -> None:
    """Refuse to resume from an --images folder whose files differ from those already committed.

    Re-reads a sample of committed rows' images (first, last, evenly spaced) from ``images`` and
    compares their sha256 with the stored one, so another folder holding the same names cannot be
    mixed into the store (``images_root`` itself is informational: a moved folder still resumes).
    """
    n = store.rows
    if n == 0 or store.provenance.get("kind") != "extracted":
        return
    ids, hashes = store.ids, store.sha256
    for r in sorted({int(round(x)) for x in np.linspace(0, n - 1, min(n, RESUME_SAMPLE))}):
        path = Path(images) / ids[r]
        try:
            digest = sha256_bytes(read_bytes(path, None))
        except Exception as exc:  # missing / unreadable now
            digest = f"<{quarantine_reason(exc, ids[r])[0]}>"
        if digest != hashes[r]:
            raise ProvenanceMismatch(
                f"{store.path}: row {r} ({ids[r]!r}) in --images {images} is not the image this store was "
                f"extracted from (sha256 {digest[:12]}, stored {hashes[r][:12]}); resume with the original "
                "--images folder, or write to a new --out"
            )


def check_resume(store: Store, provenance: dict[str, Any]) -> None:
    """Refuse to resume ``store`` with other settings, naming the first differing attribute.

    The preprocessing is compared as a ``Preprocessing`` (so a store made by 0.1.0 resumes however
    its record is spelled); everything else attribute by attribute, by ``Store.check_provenance``.
    """
    for key in ("max_pixels", "max_bytes"):
        if key not in store.provenance:  # written before it was recorded: not compared
            provenance = {k: v for k, v in provenance.items() if k != key}
    stored_bb = store.provenance.get("backbone")
    new_bb = provenance.get("backbone")
    if isinstance(stored_bb, dict) and isinstance(new_bb, dict) and "config_sha256" in new_bb \
            and "config_sha256" not in stored_bb:
        sys.stderr.write(f"extract: {store.path} does not record its backbone's config.json hash (written before "
                         "it was); only the weights hash is checked\n")
        provenance = {**provenance, "backbone": {k: v for k, v in new_bb.items() if k != "config_sha256"}}
    stored = store.provenance.get("preprocessing")
    if stored is not None and provenance.get("preprocessing") is not None:
        recorded = Preprocessing.from_dict(stored, where=f"{store.path}: provenance")
        if recorded == Preprocessing.from_dict(provenance["preprocessing"]):
            provenance = {**provenance, "preprocessing": stored}  # equal specs: only the rest is compared
    store.check_provenance(provenance)


def load_entries(cfg: ExtractConfig) -> tuple[list[ImageEntry], bool]:
    """The image list from --labels, or every image under --images."""
    if cfg.labels:
        entries, has_split = parse_labels_csv(cfg.labels)
        confine_entries(cfg.images, entries, str(cfg.labels))
        return entries, has_split
    entries, skipped = scan_images(cfg.images)
    if skipped:
        sys.stderr.write(f"extract: {describe_skipped(skipped, f'--images {cfg.images}')}\n")
    return entries, False


def validate_config(cfg: ExtractConfig) -> None:
    """Refuse impossible option values with a message naming the option."""
    checks = [
        (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        (cfg.views >= 1, "--views must be >= 1"),
        (cfg.workers >= 0, "--workers must be >= 0"),
        (cfg.threads >= 0, "--threads must be >= 0"),
        (cfg.chunk_rows >= 1, "--chunk-rows must be >= 1"),
        (cfg.max_pixels >= 1, "--max-pixels must be >= 1"),
        (cfg.max_bytes >= 1, "--max-bytes must be >= 1"),
        (cfg.dtype in ("float16", "float32"), "--dtype must be float16 or float32"),
        (cfg.view_levels is None or (all(lv in LEVELS for lv in cfg.view_levels) and len(cfg.view_levels) > 0),
         "--view-levels must be levels 0-3"),
        (cfg.preprocess is None or cfg.preprocess in CLEAN_RULES, f"--preprocess must be one of {', '.join(CLEAN_RULES)}"),
        (cfg.view_recipe is None or cfg.view_recipe in VIEW_RECIPES,
         f"--view-recipe must be one of {', '.join(VIEW_RECIPES.names())}"),
        (Path(cfg.images).is_dir(), f"--images {cfg.images} is not a folder"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def run_extract(cfg: ExtractConfig, backbone: Backbone | None = None) -> dict[str, Any]:
    """Extract (or resume extracting) CLS features of the listed images into the store ``cfg.out``."""
    validate_config(cfg)
    previous_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, backbone)
    finally:
        torch.set_num_threads(previous_threads)  # in-process callers keep their own setting


def _run(cfg: ExtractConfig, backbone: Backbone | None) -> dict[str, Any]:
    entries, has_split = load_entries(cfg)
    if backbone is None:
        backbone = load_backbone(cfg.backbone, device=cfg.device, kind=cfg.backbone_kind)
    check_image_size(cfg.image_size, backbone.patch_size)
    out = Path(cfg.out)
    if (out / "zarr.json").exists() and not unfinished_creation(out):  # an interrupted creation starts again
        store = Store.open(out, mode="r+")
        try:
            recorded = store.provenance.get("preprocessing")
            cfg = resolve_defaults(cfg, Preprocessing.from_dict(recorded, where=f"{out}: provenance")
                                   if recorded is not None else None)
            check_resume(store, build_provenance(backbone, cfg, entries))
            check_resume_content(store, cfg.images)
        except BaseException:
            store.close()
            raise
        started_with = int(store.attrs.get("batch_size", cfg.batch_size))
        if started_with != cfg.batch_size:  # same windows as the first run, so features stay byte-identical
            sys.stderr.write(f"extract: resuming {out} with the batch size it was started with "
                             f"({started_with}; --batch-size {cfg.batch_size} ignored)\n")
            cfg = replace(cfg, batch_size=started_with)
    else:
        cfg = resolve_defaults(cfg)
        store = Store.create(
            out, len(entries), cfg.views, backbone.hidden_size, build_provenance(backbone, cfg, entries), dtype=cfg.dtype,
            chunk_rows=cfg.chunk_rows, with_split=has_split, extra_attrs={"n_listed": len(entries), "batch_size": cfg.batch_size},
            view_param_names=PARAM_NAMES,
        )
    with store:
        return _extract_into(store, cfg, backbone, entries)


def nothing_kept(cfg: ExtractConfig, n: int, quarantined: Sequence[dict[str, str]]) -> DataError:
    """The error of a run that kept no row: every listed image quarantined, with the commonest reason and a hint."""
    from collections import Counter

    reasons = Counter(q.get("reason", "?") for q in quarantined)
    reason, count = reasons.most_common(1)[0] if reasons else ("?", 0)
    example = next((q for q in quarantined if q.get("reason") == reason), {"path": "?", "detail": ""})
    hints = {
        "missing": (f"check that --images {cfg.images} is the folder the listed paths are relative to"
                    + (f" and that {cfg.labels} is comma-separated (path,label)" if cfg.labels else "")),
        "decompression bomb": f"raise --max-pixels (now {cfg.max_pixels}) if these images are trusted",
        "too large": f"raise --max-bytes (now {cfg.max_bytes}) if these files are trusted",
        "not a regular file": "only regular files are read; replace FIFOs, sockets and devices by the image files",
    }
    hint = hints.get(reason, "check the images (`info` lists every quarantined one)")
    return DataError(
        f"extract: no image was kept: all {n} listed images were quarantined ({count} {reason!r}, e.g. "
        f"{example['path']!r}: {example.get('detail', '')}); {hint}. Delete --out {cfg.out} before re-running"
    )


def _extract_into(store: Store, cfg: ExtractConfig, backbone: Backbone, entries: list[ImageEntry]) -> dict[str, Any]:
    from tqdm import tqdm

    n = len(entries)
    consumed = int(store.attrs.get("n_consumed", 0))
    start_rows = row = store.rows
    quarantined = store.quarantined
    summary = {"store": str(store.path), "listed": n, "resumed_from_entry": consumed, "processed": 0}
    if store.complete and store.rows == 0 and n:
        raise nothing_kept(cfg, n, quarantined)
    if store.complete:
        summary.update(rows=store.rows, quarantined=len(quarantined), seconds=0.0, img_per_s=0.0, complete=True)
        return summary
    B = cfg.batch_size
    spec = DecodeSpec(root=str(Path(cfg.images)), prep=build_preprocessing(backbone, cfg), max_pixels=cfg.max_pixels,
                      max_bytes=cfg.max_bytes)
    dataset = WindowDataset(spec, [e.path for e in entries], B, consumed // B)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=cfg.workers,
        prefetch_factor=2 if cfg.workers else None, pin_memory=backbone.device.type == "cuda",
    )
    cr = store.chunk_rows
    V, D = cfg.views, backbone.hidden_size
    buf_f: list[np.ndarray] = []
    buf_e: list[ImageEntry] = []
    buf_s: list[str] = []
    buf_l: list[np.ndarray] = []
    buf_p: list[np.ndarray] = []
    pending_q: list[dict[str, str]] = []

    def flush(consumed_to: int) -> None:
        nonlocal row
        if buf_f:
            store.write_block(
                row, np.stack(buf_f), np.array([e.label for e in buf_e], np.int8), [e.path for e in buf_e],
                buf_s, [e.split for e in buf_e], view_levels=np.stack(buf_l), view_params=np.stack(buf_p),
            )
        quarantined.extend(pending_q)
        row += len(buf_f)
        store.commit(row, n_consumed=consumed_to, quarantined=quarantined)
        for buf in (buf_f, buf_e, buf_s, buf_l, buf_p, pending_q):
            buf.clear()

    t0 = time.perf_counter()
    bar = tqdm(total=n - consumed, unit="img", desc="extract", disable=not cfg.progress, smoothing=0.1)
    processed = 0
    for win in loader:
        if win.get("fatal"):
            path, detail, memory = win["fatal"]
            hint = ("out of memory: lower --image-size (now {0}), --batch-size or --workers".format(cfg.image_size)
                    if memory else "check the disk or file system holding --images")
            raise EnvironmentProblem(
                f"extract: reading {path} failed for a system reason ({detail}); no image was quarantined for it. "
                f"{hint[0].upper() + hint[1:]}, then re-run the same command to resume ({store.rows} rows are committed)"
            )
        feats = None
        if len(win["good"]):
            feats = backbone.embed(win["pixels"]).cpu().numpy().reshape(len(win["good"]), V, D)
        result: dict[int, tuple] = {i: ("ok", k) for k, i in enumerate(win["good"])}
        result.update({int(i): ("bad", reason, detail) for i, reason, detail in win["bad"]})
        for i in range(int(win["lo"]), int(win["hi"])):
            if i < consumed:
                continue  # committed before an interruption; the window was re-run only to keep batches identical
            kind = result[i]
            if kind[0] == "ok":
                buf_f.append(feats[kind[1]])  # type: ignore[index]
                buf_e.append(entries[i])
                buf_s.append(win["sha"][kind[1]])
                buf_l.append(np.asarray(win["levels"][kind[1]], dtype=np.int8))
                buf_p.append(np.asarray(win["params"][kind[1]], dtype=np.float32))
            else:
                pending_q.append({"path": entries[i].path, "reason": kind[1], "detail": kind[2]})
            processed += 1
            if len(buf_f) == cr:
                flush(i + 1)
        bar.update(int(win["hi"]) - max(int(win["lo"]), consumed))
        bar.set_postfix(quarantined=len(quarantined) + len(pending_q), refresh=False)
    bar.close()
    if row == 0 and not buf_f and n:
        store.commit(0, n_consumed=consumed, quarantined=quarantined)  # nothing kept: left incomplete, not finalized
        raise nothing_kept(cfg, n, quarantined + pending_q)
    flush(n)
    store.finalize()
    conflicts = label_conflicts(store.ids, store.sha256, store.labels)
    warn_label_conflicts(conflicts, "extract")
    summary["label_conflicts"] = len(conflicts)
    seconds = time.perf_counter() - t0
    summary.update(
        rows=store.rows, new_rows=store.rows - start_rows, quarantined=len(quarantined), processed=processed,
        seconds=round(seconds, 3), img_per_s=round(processed / seconds, 2) if seconds > 0 else 0.0, complete=True,
    )
    return summary
