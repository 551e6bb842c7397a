"""``Stage1Predictor``: a verified bundle + its backbone -> one decision per image (what a miner answers).

Images go through featstore's own decode and preprocessing with the bundle's recorded settings,
so features match the ones the head was trained on. Bad images give an error record, never a crash.
Every record carries ``answer``, the float a miner sends: p_roadwork when the policy exits, -1
(abstain) for an image that could not be scored and, by default, for a deferred one (see ``answer_for``).
A bundle calibrated with ``--novelty`` also gives ``novelty_score``, ``novelty_p`` and
``novelty_deferred`` in every record (null / false when the image could not be scored).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from stage1.policies.decision import Decision
from stage1.workflows.bundle import (IMGFOCUS_WEIGHTS_SHA256, BundleError, check_backbone, recover_bundle,
                                     verify_files)

#: file extensions ``predict DIR`` picks up (case-insensitive).
from stage1.featstore.labels import IMAGE_SUFFIXES as IMAGE_EXTENSIONS  # noqa: E402 (one list of image suffixes)

ImageInput = Any  # str | os.PathLike | PIL.Image.Image | bytes

#: the answer that abstains: validators pay 0 for that round and keep it out of the MCC / accuracy windows
#: (a 0.5 would be scored as class 0, a silent guess; ../shared/SUBNET.md "The reward").
ABSTAIN = -1.0
#: what a deferred image answers: "abstain" (-1; no Stage-2 behind this miner) or "answer" (send p_roadwork).
ON_DEFER = ("abstain", "answer")


def check_on_defer(on_defer: str) -> str:
    """``on_defer`` if it is one of ON_DEFER, else a ConfigError naming the choices."""
    from stage1._core.errors import ConfigError

    if on_defer not in ON_DEFER:
        raise ConfigError(f"--on-defer {on_defer!r}: choose one of {', '.join(ON_DEFER)}")
    return on_defer


def answer_for(record: dict[str, Any], on_defer: str = "abstain") -> float:
    """The float a miner sends for one record: -1 when it could not be scored (never 0.5, which is
    scored as class 0); p_roadwork when the policy exits; on defer -1 (abstain) or p_roadwork (answer)."""
    if "error" in record:
        return ABSTAIN
    if record["decision"] == "exit" or check_on_defer(on_defer) == "answer":
        return float(record["p_roadwork"])
    return ABSTAIN


def expand_inputs(items: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Files as given, folders expanded to their image files (recursive, sorted); order kept. Other
    files in a folder are not silently dropped: stderr names how many and a few of them."""
    from stage1.featstore.labels import describe_skipped

    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found, skipped = [], []
            for f in sorted(p.rglob("*")):
                if f.is_dir():
                    continue
                (found if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS else skipped).append(str(f))
            out.extend(found)
            if skipped:
                sys.stderr.write("predict: " + describe_skipped([os.path.relpath(x, p) for x in skipped], str(p),
                                                                hint="or pass them as files to include them") + "\n")
        else:
            out.append(str(p))
    return out


def resolve_backbone(manifest: dict[str, Any], backbone: str | os.PathLike[str] | None) -> Path:
    """The backbone folder to use: the given one, the recorded path, or the demo's cached DINOv2-S."""
    if backbone is not None:
        return Path(backbone)
    recorded = manifest["backbone"].get("path")
    if recorded and (Path(recorded) / "config.json").is_file():
        return Path(recorded)
    if manifest["backbone"].get("weights_sha256") == IMGFOCUS_WEIGHTS_SHA256:
        from stage1.workflows.imgfocus import ensure_backbone

        return ensure_backbone()
    raise BundleError(f"the bundle's backbone {recorded} is not on this machine; pass --backbone PATH "
                      "to a folder with the same weights")


class Stage1Predictor:
    """Backbone -> head -> exit policy, built from a verified bundle.

    Build it with ``from_bundle`` (it refuses a tampered file, an unknown schema, or a backbone
    of other weights or width); ``predict`` / ``iter_predict`` take paths, bytes or PIL images and
    give one record per image: path, p_roadwork, decision (exit | defer), label, pred_set,
    select_score, level and answer (an image that cannot be read gets a deferred record with its
    error and answer -1). ``on_defer`` ("abstain" or "answer") sets a deferred image's answer.
    When the bundle has a novelty scorer (``calibrate --novelty``), an image whose novelty p-value
    is below its alpha_n is deferred after the exit rule chose to exit it (``novelty_deferred``
    true); every record then also has ``novelty_score`` and ``novelty_p``.

    Examples
    --------
    The whole path on a tiny random backbone: extract, split, train, calibrate, export, predict.

    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np
    >>> from PIL import Image
    >>> from transformers import Dinov2Config, Dinov2Model
    >>> from stage1.featstore.extract import ExtractConfig, run_extract
    >>> from stage1.featstore.splits import write_splits
    >>> from stage1.runs.steps import calibrate_run, train_run
    >>> from stage1.workflows.bundle import export_bundle
    >>> tmp = Path(tempfile.mkdtemp())
    >>> Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                          intermediate_size=32, patch_size=16, image_size=32)).save_pretrained(tmp / "bb")
    >>> (tmp / "img").mkdir()
    >>> rng = np.random.default_rng(0)
    >>> rows = ["path,label"]
    >>> for i in range(40):
    ...     Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp / "img" / f"{i}.png")
    ...     rows.append(f"{i}.png,{i % 2}")
    >>> _ = (tmp / "labels.csv").write_text("\\n".join(rows))
    >>> _ = run_extract(ExtractConfig(images=str(tmp / "img"), labels=str(tmp / "labels.csv"),
    ...                               backbone=str(tmp / "bb"), out=str(tmp / "s"), image_size=32,
    ...                               workers=0, progress=False))
    >>> _ = write_splits(tmp / "s", seed=0)
    >>> _ = train_run(tmp / "s", "mlp", tmp / "run", {"epochs": 2, "hidden": 8}, progress=False)
    >>> _ = calibrate_run(tmp / "run", "threshold", {"threshold": 0.5})
    >>> bundle = export_bundle(tmp / "run", tmp / "bundle")
    >>> predictor = Stage1Predictor.from_bundle(bundle)
    >>> records = predictor.predict([str(tmp / "img" / "0.png"), b"not an image"])
    >>> sorted(records[0])
    ['answer', 'decision', 'label', 'level', 'p_roadwork', 'path', 'pred_set', 'select_score']
    >>> 0.0 <= records[0]["p_roadwork"] <= 1.0, records[1]["decision"], "error" in records[1], records[1]["answer"]
    (True, 'defer', True, -1.0)
    """

    def __init__(self, manifest: dict[str, Any], backbone: Any, head: Any, policy: Any,
                 bundle_dir: str | os.PathLike[str], on_defer: str = "abstain", novelty: Any = None,
                 novelty_alpha: float | None = None) -> None:
        from stage1.featstore.preprocessing import Preprocessing

        where = str(Path(bundle_dir) / "bundle.json")
        prep = Preprocessing.from_dict(manifest.get("preprocessing"), where=where, error=BundleError)
        prep.require_supported(where, error=BundleError)
        self.manifest = manifest
        self.backbone = backbone
        self.head = head
        self.policy = policy
        self.bundle_dir = str(bundle_dir)
        #: what a deferred image answers: "abstain" (-1) or "answer" (p_roadwork); see ``answer_for``
        self.on_defer = check_on_defer(on_defer)
        #: how images are decoded and normalised: the spec the head's training features were made with
        self.preprocessing = prep
        if (novelty is None) != (novelty_alpha is None):
            raise ValueError("novelty and novelty_alpha go together")
        #: the fitted ``policies.novelty.NoveltyScorer`` (None: no novelty deferral) and its alpha_n
        self.novelty = novelty
        self.novelty_alpha = None if novelty_alpha is None else float(novelty_alpha)

    @classmethod
    def from_bundle(cls, path: str | os.PathLike[str], backbone: str | os.PathLike[str] | None = None,
                    device: str = "cpu", on_defer: str = "abstain") -> "Stage1Predictor":
        """Verify the bundle (schema, every file hash), check the backbone's hash and width, load all."""
        from stage1.featstore.backbones import config_sha256, load_backbone, weights_sha256
        from stage1._core.io import read_json
        from stage1.heads import load_head
        from stage1.policies import policy_from_dict

        if not Path(path).exists():
            recover_bundle(path)  # an `export --force` interrupted mid-swap left the old copy aside
        manifest = verify_files(path)
        folder = resolve_backbone(manifest, backbone)
        if not (folder / "config.json").is_file():
            raise BundleError(f"--backbone {folder}: no config.json; pass a local Hugging Face model folder")
        _, digest = weights_sha256(folder)
        hidden = read_json(folder / "config.json").get("hidden_size")
        check_backbone(manifest, digest, int(hidden) if hidden is not None else -1, str(folder),
                       config_sha256=config_sha256(folder))
        bb = load_backbone(folder, device=device, kind=manifest["backbone"].get("kind", "hf"))
        check_backbone(manifest, digest, bb.hidden_size, str(folder))
        head = load_head(path)
        if int(head.in_dim_) != int(bb.hidden_size):
            raise BundleError(f"{path}: head expects width {head.in_dim_}, backbone gives {bb.hidden_size}")
        policy_json = read_json(Path(path) / "policy.json")
        policy = policy_from_dict(policy_json, where=str(Path(path) / "policy.json"))
        novelty, alpha_n = None, None
        if "novelty" in policy_json:
            novelty, alpha_n = _load_novelty(path, policy_json["novelty"], int(bb.hidden_size))
        return cls(manifest, bb, head, policy, path, on_defer=on_defer, novelty=novelty, novelty_alpha=alpha_n)

    # -- steps (separately callable so their cost can be measured) ----------------------------------
    def load_pixels(self, item: ImageInput) -> np.ndarray:
        """One image -> float32 [3, S, S] exactly as ``extract`` prepares view 0; BadImage on failure."""
        from PIL import Image

        from stage1.featstore.images import read_bytes, to_rgb

        prep = self.preprocessing
        if isinstance(item, Image.Image):
            img = to_rgb(item)
        elif isinstance(item, (bytes, bytearray)):
            img = prep.decode(bytes(item), "<bytes>")
        else:
            img = prep.decode(read_bytes(item), str(item))
        return prep.clean_pixels(img)

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Backbone CLS features [B, D] of preprocessed pixels [B, 3, S, S]."""
        import torch

        return self.backbone.embed(torch.from_numpy(np.ascontiguousarray(pixels))).cpu().numpy()

    def decide_features(self, features: np.ndarray) -> list[dict[str, Any]]:
        """Head + policy (+ novelty deferral) on features [B, D]: one record per row (rows with non-finite
        scores, or with a novelty scorer non-finite features, get an error)."""
        feats = np.asarray(features, dtype=np.float32)
        scores = self.head.predict_scores(feats)
        logits = np.asarray(scores["logits"], dtype=np.float64)
        ok = np.isfinite(logits).all(axis=1)
        if scores.get("select") is not None:
            ok &= np.isfinite(np.asarray(scores["select"], dtype=np.float64))
        if self.novelty is not None:
            ok &= np.isfinite(feats).all(axis=1)
        records = Decision.deferred(len(ok), error="non-finite head output", reason="non_finite_output").to_records()
        if ok.any():
            sub = {k: np.asarray(v)[ok] for k, v in scores.items()}
            decision = self.policy.decide(sub)
            novel = None
            if self.novelty is not None:
                decision, novel = self._defer_novel(decision, feats[ok])
            for j, (i, rec) in enumerate(zip(np.flatnonzero(ok), decision.to_records())):
                p = rec["p_roadwork"]
                rec["p_roadwork"] = min(1.0, max(0.0, p)) if math.isfinite(p) else 0.5
                if novel is not None:
                    rec.update(novelty_score=float(novel["score"][j]), novelty_p=float(novel["p"][j]),
                               novelty_deferred=bool(novel["deferred"][j]))
                records[i] = rec
        for rec in records:
            self._novelty_fields(rec)
            rec["answer"] = answer_for(rec, self.on_defer)
        return records

    def _defer_novel(self, decision: Decision, feats: np.ndarray) -> tuple[Decision, dict[str, np.ndarray]]:
        """``decision`` with the exits of novel images (p-value < alpha_n) deferred; the per-row figures."""
        from stage1.policies.novelty import defer_novel

        score = self.novelty.score(feats)
        p = self.novelty.pvalues_of_scores(score)
        after = defer_novel(decision, p, self.novelty_alpha)
        return after, {"score": score, "p": p, "deferred": decision.exit & ~after.exit}

    def _novelty_fields(self, rec: dict[str, Any]) -> dict[str, Any]:
        """With a novelty scorer, give a record that has no novelty figures (it could not be scored)
        null ones, so every record of this bundle has the same keys."""
        if self.novelty is not None and "novelty_p" not in rec:
            rec.update(novelty_score=None, novelty_p=None, novelty_deferred=False)
        return rec

    def failed(self, name: str, detail: str, reason: str) -> dict[str, Any]:
        """The record of an image this bundle could not score: ``failed_record`` with this bundle's
        novelty keys (null) so every record of one bundle has the same keys, ``answer`` (-1) last."""
        rec = failed_record(name, detail, reason)
        answer = rec.pop("answer")
        return {**self._novelty_fields(rec), "answer": answer}

    # -- the API ---------------------------------------------------------------------------------------
    def iter_predict(self, images: Iterable[ImageInput], batch_size: int = 16) -> Iterator[dict[str, Any]]:
        """Yield one record per image, in input order, processing ``batch_size`` images at a time."""
        from stage1.featstore.images import BadImage

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch: list[tuple[str, ImageInput]] = []
        for index, item in enumerate(images):
            batch.append((_name(item, index), item))
            if len(batch) == batch_size:
                yield from self._predict_batch(batch, BadImage)
                batch = []
        if batch:
            yield from self._predict_batch(batch, BadImage)

    def predict(self, images: Sequence[ImageInput] | ImageInput, batch_size: int = 16) -> list[dict[str, Any]]:
        """Records for ``images`` (paths, PIL images or bytes; one item or a list)."""
        if isinstance(images, (str, os.PathLike, bytes, bytearray)) or not isinstance(images, Iterable):
            images = [images]
        return list(self.iter_predict(images, batch_size=batch_size))

    def _predict_batch(self, batch: list[tuple[str, ImageInput]], bad_image: type) -> list[dict[str, Any]]:
        names = [name for name, _ in batch]
        out: list[dict[str, Any] | None] = [None] * len(batch)
        pixels, good = [], []
        for i, (_, item) in enumerate(batch):
            try:
                pixels.append(self.load_pixels(item))
                good.append(i)
            except bad_image as exc:
                out[i] = self.failed(names[i], str(exc), exc.reason)
            except Exception as exc:  # never fatal: report the image and carry on
                out[i] = self.failed(names[i], f"{type(exc).__name__}: {exc}", "unreadable")
        if good:
            records = self.decide_features(self.embed(np.stack(pixels)))
            for i, rec in zip(good, records):
                out[i] = {"path": names[i], **rec}
        return [r for r in out if r is not None]


def _load_novelty(bundle: str | os.PathLike[str], entry: Any, width: int) -> tuple[Any, float]:
    """The bundle's novelty scorer and alpha_n (policy.json["novelty"]); a BundleError when unusable."""
    from stage1._core.errors import DataError
    from stage1.policies.novelty import read_novelty

    where = Path(bundle) / "policy.json"
    alpha_n = entry.get("alpha_n") if isinstance(entry, dict) else None
    if not isinstance(alpha_n, (int, float)) or isinstance(alpha_n, bool) or not 0.0 < alpha_n < 1.0:
        raise BundleError(f"{where}: novelty must be an object with alpha_n in (0, 1); re-run calibrate --novelty and export")
    try:
        scorer = read_novelty(bundle, entry)
    except DataError as exc:
        raise BundleError(str(exc)) from None
    if scorer.dim != width:
        raise BundleError(f"{where}: the novelty reference has width {scorer.dim}, the backbone gives {width}; "
                          "re-run calibrate --novelty and export")
    return scorer, float(entry["alpha_n"])


def failed_record(name: str, error: str, reason: str) -> dict[str, Any]:
    """The deferred, flagged record for an image that could not be scored (see ``Decision.deferred``);
    its answer is -1 (abstain), never the record's placeholder p_roadwork 0.5."""
    rec = Decision.deferred(1, error=error, reason=reason).to_records(paths=[name])[0]
    rec["answer"] = ABSTAIN
    return rec


def _name(item: ImageInput, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return getattr(item, "filename", None) or f"<image {index}>"
