"""Novelty-aware exit: how far an image's features are from the training data, as a conformal p-value.

Score: the distance of an L2-normalised feature vector to its ``k``-th nearest neighbour (``reduce=
"kth"``, Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors") or the mean
of its ``k`` nearest distances (``reduce="mean"``) among reference features (the run's train rows,
subsampled to ``reference_size`` with ``seed``), found by scikit-learn's ``NearestNeighbors``.
``metric="euclidean"`` is the distance between unit vectors, ``"cosine"`` is 1 - cos = d^2 / 2
(the same order, another scale). Higher = more novel.

p-value: ``(1 + #{calibration scores >= s}) / (n_cal + 1)`` against the val_calib scores. The
reference is train, so val_calib and a new image are scored by one fixed function; when the new
image is exchangeable with val_calib, P(p <= a) <= a for every a (Vovk et al. 2005). Deferring
``p < alpha_n`` therefore costs at most a share ``alpha_n`` of coverage on exchangeable images,
and defers the images that lie far from everything the head and the certificate saw.

State: ``to_dict()`` (JSON: parameters, sizes, a digest of the arrays) and ``tensors()`` (the
reference features and the sorted calibration scores, for a safetensors file; never pickled);
``NoveltyScorer.from_state(d, tensors)`` rebuilds it; ``write_novelty`` / ``read_novelty`` do the
file side (``NOVELTY_FILE`` in a run folder or a bundle). numpy + scikit-learn only (no torch).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stage1._core.errors import ConfigError, DataError
from stage1._core.params import Param, Params

NOVELTY_SCHEMA_VERSION = 1
#: the safetensors file beside policy.json (run folder) or bundle.json (bundle).
NOVELTY_FILE = "novelty.safetensors"
#: tensor names inside NOVELTY_FILE.
REFERENCE_TENSOR = "novelty_reference"
CALIB_TENSOR = "novelty_calib_scores"
METRICS = ("euclidean", "cosine")
if TYPE_CHECKING:  # pragma: no cover
    from stage1.policies.decision import Decision
REDUCES = ("kth", "mean")


class NoveltyScorer:
    """k-NN distance to reference (train) features, turned into a conformal p-value against val_calib."""

    name = "knn"
    PARAMS = Params(
        Param("k", int, 10, "Neighbours: the score is the k-th (or mean of k) nearest reference distance.",
              low=1, high=10_000),
        Param("metric", str, "euclidean", "Distance between L2-normalised features (cosine = 1 - cos).",
              choices=METRICS),
        Param("reduce", str, "kth", "kth: the k-th nearest distance; mean: the mean of the k nearest.",
              choices=REDUCES),
        Param("reference_size", int, 5000, "Reference rows kept (a seeded random subsample of train).",
              low=1),
        Param("seed", int, 0, "Seed of the reference subsample.", low=0),
    )

    def __init__(self, **params: Any) -> None:
        resolved = self.PARAMS.resolve(params, owner="novelty scorer")
        self.k: int = resolved["k"]
        self.metric: str = resolved["metric"]
        self.reduce: str = resolved["reduce"]
        self.reference_size: int = resolved["reference_size"]
        self.seed: int = resolved["seed"]
        self.reference_: np.ndarray | None = None  # [m, D] float32, unit rows
        self.calib_scores_: np.ndarray | None = None  # [n] float64, sorted
        self.n_reference_total_: int = 0
        self._nn: Any = None

    def params(self) -> dict[str, Any]:
        """The declared parameters and their values."""
        return {p: getattr(self, p) for p in self.PARAMS.names()}

    # -- fitting ----------------------------------------------------------------------------------
    def fit(self, reference: np.ndarray, calib: np.ndarray) -> "NoveltyScorer":
        """Keep a seeded subsample of ``reference`` [N, D] (train), score ``calib`` [n, D] (val_calib)."""
        ref = _as_features(reference, "reference (train) features")
        if self.k > len(ref):
            raise ConfigError(f"novelty k={self.k} is larger than the {len(ref)} reference (train) rows; "
                              f"use k <= {len(ref)}")
        cal = _as_features(calib, "calibration (val_calib) features", dim=ref.shape[1])
        if len(cal) == 0:
            raise DataError("novelty: no calibration (val_calib) rows to compute p-values against")
        self.n_reference_total_ = int(len(ref))
        if len(ref) > self.reference_size:
            keep = np.sort(np.random.default_rng(self.seed).choice(len(ref), self.reference_size, replace=False))
            ref = ref[keep]
            if self.k > len(ref):
                raise ConfigError(f"novelty k={self.k} is larger than reference_size={self.reference_size}")
        self.reference_ = _unit(ref).astype(np.float32)
        self._build()
        self.calib_scores_ = np.sort(self.score(cal))
        return self

    def _build(self) -> None:
        from sklearn.neighbors import NearestNeighbors

        self._nn = NearestNeighbors(n_neighbors=self.k, metric="euclidean").fit(self.reference_)

    @property
    def fitted(self) -> bool:
        """True once ``fit`` (or ``from_state``) has set the reference and calibration scores."""
        return self.reference_ is not None and self.calib_scores_ is not None

    @property
    def dim(self) -> int:
        """Feature width the scorer expects."""
        self._need()
        return int(self.reference_.shape[1])

    def _need(self) -> None:
        if self.reference_ is None:
            raise RuntimeError("novelty scorer is not fitted; call fit(reference, calib) first")

    # -- scoring ----------------------------------------------------------------------------------
    def score(self, features: np.ndarray) -> np.ndarray:
        """Novelty scores [n] of features [n, D] (higher = farther from the reference)."""
        self._need()
        x = _unit(_as_features(features, "features", dim=self.dim)).astype(np.float32)
        if len(x) == 0:
            return np.zeros(0)
        dist, _ = self._nn.kneighbors(x, n_neighbors=self.k)
        dist = dist.astype(np.float64)
        if self.metric == "cosine":
            dist = dist ** 2 / 2.0
        return dist[:, -1] if self.reduce == "kth" else dist.mean(axis=1)

    def pvalues_of_scores(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-values (1 + #{cal >= s}) / (n_cal + 1) of novelty scores."""
        if self.calib_scores_ is None:
            raise RuntimeError("novelty scorer is not fitted; call fit(reference, calib) first")
        s = np.asarray(scores, dtype=np.float64)
        cal = self.calib_scores_
        at_least = len(cal) - np.searchsorted(cal, s, side="left")
        return (1.0 + at_least) / (len(cal) + 1.0)

    def pvalues(self, features: np.ndarray) -> np.ndarray:
        """Conformal novelty p-values [n] of features [n, D] (small = novel)."""
        return self.pvalues_of_scores(self.score(features))

    # -- state ------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays to store as safetensors: reference features and sorted calibration scores."""
        self._need()
        return {REFERENCE_TENSOR: np.ascontiguousarray(self.reference_, dtype=np.float32),
                CALIB_TENSOR: np.ascontiguousarray(self.calib_scores_, dtype=np.float64)}

    def to_dict(self) -> dict[str, Any]:
        """JSON state (the arrays go to ``tensors()``; ``arrays_sha256`` ties the two together)."""
        self._need()
        return {"schema_version": NOVELTY_SCHEMA_VERSION, "scorer": self.name, "params": self.params(),
                "dim": self.dim, "n_reference": int(len(self.reference_)),
                "n_reference_total": int(self.n_reference_total_), "n_calib": int(len(self.calib_scores_)),
                "arrays_sha256": _arrays_digest(self.tensors())}

    @classmethod
    def from_state(cls, d: dict[str, Any], tensors: dict[str, np.ndarray], where: str = "novelty state"
                   ) -> "NoveltyScorer":
        """Rebuild a fitted scorer from ``to_dict()`` and ``tensors()``; a DataError naming ``where``."""
        if not isinstance(d, dict) or d.get("schema_version") != NOVELTY_SCHEMA_VERSION:
            got = d.get("schema_version") if isinstance(d, dict) else None
            raise DataError(f"{where}: novelty schema_version {got!r} is not supported "
                            f"(expected {NOVELTY_SCHEMA_VERSION}); re-run calibrate --novelty")
        try:
            scorer = cls(**(d.get("params") or {}))
        except ConfigError as exc:
            raise DataError(f"{where}: {exc}") from None
        missing = [t for t in (REFERENCE_TENSOR, CALIB_TENSOR) if t not in tensors]
        if missing:
            raise DataError(f"{where}: missing arrays {', '.join(missing)}; re-run calibrate --novelty")
        ref = np.asarray(tensors[REFERENCE_TENSOR], dtype=np.float32)
        cal = np.asarray(tensors[CALIB_TENSOR], dtype=np.float64)
        if ref.ndim != 2 or cal.ndim != 1 or len(cal) == 0 or len(ref) < scorer.k:
            raise DataError(f"{where}: reference {ref.shape} / calibration {cal.shape} arrays do not fit k="
                            f"{scorer.k}; re-run calibrate --novelty")
        if not (np.isfinite(ref).all() and np.isfinite(cal).all()):
            raise DataError(f"{where}: the novelty arrays hold NaN or infinite values; re-run calibrate --novelty")
        if d.get("dim") not in (None, ref.shape[1]) or d.get("arrays_sha256") not in (
                None, _arrays_digest({REFERENCE_TENSOR: ref, CALIB_TENSOR: cal})):
            raise DataError(f"{where}: the novelty arrays do not match their JSON record (dim / sha256); "
                            "the file was replaced or corrupted: re-run calibrate --novelty")
        scorer.reference_ = ref
        scorer.calib_scores_ = np.sort(cal)
        scorer.n_reference_total_ = int(d.get("n_reference_total", len(ref)))
        scorer._build()
        return scorer


def defer_mask(p: np.ndarray, alpha_n: float) -> np.ndarray:
    """True where a novelty p-value is below ``alpha_n``: defer that image before the exit rule."""
    if not 0.0 <= alpha_n < 1.0:
        raise ConfigError(f"--novelty alpha_n={alpha_n}: expected a level in [0, 1) (e.g. 0.01)")
    return np.asarray(p, dtype=np.float64) < alpha_n


def defer_novel(decision: "Decision", p: np.ndarray, alpha_n: float) -> "Decision":
    """``decision`` with every exit whose novelty p-value is below ``alpha_n`` turned into a defer
    (pred_set {0, 1}, level UNCERTAIN; label and p_roadwork kept): novelty is checked before the exit rule."""
    from dataclasses import replace

    from stage1.policies.decision import SET_01, UNCERTAIN

    p = np.asarray(p, dtype=np.float64)
    if len(p) != len(decision):
        raise DataError(f"novelty: {len(p)} p-values for {len(decision)} decisions")
    novel = defer_mask(p, alpha_n) & decision.exit
    if not novel.any():
        return decision
    return replace(decision, exit=decision.exit & ~novel,
                   pred_set=np.where(novel, SET_01, decision.pred_set).astype(decision.pred_set.dtype),
                   level=np.where(novel, UNCERTAIN, decision.level).astype(decision.level.dtype))


def novelty_clause(entry: dict[str, Any]) -> str:
    """The sentence policy.json / bundle statements append when ``entry`` (policy.json["novelty"]) is set."""
    return f"; images with novelty p-value < {float(entry['alpha_n']):g} are deferred before the exit rule"


def fit_novelty(train_features: np.ndarray, calib_features: np.ndarray, **params: Any) -> NoveltyScorer:
    """A scorer fitted on train (reference) and val_calib (calibration) features: the calibrate step."""
    return NoveltyScorer(**params).fit(train_features, calib_features)


def write_novelty(folder: str | os.PathLike[str], scorer: NoveltyScorer, alpha_n: float) -> dict[str, Any]:
    """Write ``NOVELTY_FILE`` into ``folder`` atomically; the entry for policy.json["novelty"]."""
    from stage1._core.io import save_safetensors_atomic, sha256_file

    defer_mask(np.zeros(0), alpha_n)  # validates alpha_n
    path = Path(folder) / NOVELTY_FILE
    save_safetensors_atomic(scorer.tensors(), path, metadata={"format": "stage1-novelty",
                                                               "schema_version": str(NOVELTY_SCHEMA_VERSION)})
    return {**scorer.to_dict(), "alpha_n": float(alpha_n), "file": NOVELTY_FILE, "sha256": sha256_file(path)}


def read_novelty(folder: str | os.PathLike[str], entry: dict[str, Any]) -> NoveltyScorer:
    """The scorer that ``entry`` (policy.json["novelty"]) describes, from ``folder``/NOVELTY_FILE."""
    from stage1._core.io import load_safetensors, sha256_file

    path = Path(folder) / NOVELTY_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing, but policy.json records a novelty scorer; re-run calibrate --novelty "
                        "(and export again)")
    if entry.get("sha256") not in (None, sha256_file(path)):
        raise DataError(f"{path}: sha256 does not match policy.json's novelty entry; re-run calibrate --novelty")
    return NoveltyScorer.from_state(entry, load_safetensors(path), where=str(path))


def _as_features(x: Any, what: str, dim: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1 and dim is not None and a.shape[0] == dim:
        a = a[None, :]
    if a.ndim != 2:
        raise DataError(f"novelty: {what} must be a 2-D array [rows, dim], got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise DataError(f"novelty: {what} have width {a.shape[1]}, the reference has {dim}; use features of "
                        "the same backbone the scorer was fitted on")
    if not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        raise DataError(f"novelty: {what} hold NaN or infinite values in {len(bad)} row(s) (first: {int(bad[0])}); "
                        "drop or re-extract those rows")
    return a


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _arrays_digest(tensors: dict[str, np.ndarray]) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()
