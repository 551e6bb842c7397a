"""Choosing among candidates without voiding the certificate.

A certificate says P(risk > alpha) <= delta over the draw of the data it was fitted on. Choosing
the best of K candidates by how they certified on that same data breaks it (best of 20: 21% false
certificates at delta 0.1 in simulation). So val_calib is split once, deterministically and
stratified by label, into a *choose* part (candidates are fitted and compared there, and nothing
fitted there is a guarantee) and a *certify* part that the choice never sees; the chosen
candidate's policy is then fitted on the certify part alone, where its guarantee holds at delta.
When several chosen candidates are certified on the same certify part (the sweep's top-k run
folders), delta is split over them (Bonferroni), so all of them hold together.

With few candidates known in advance (the demo's heads) the other valid route costs less data:
certify every candidate on all of val_calib at delta / K (``choose_split_delta``); then the chance
that *any* of them is falsely certified is at most delta, so whichever is chosen holds at delta.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from stage1._core.errors import ConfigError, DataError

#: The parts of val_calib (and "all" = no split, for a single candidate that was not chosen).
PARTS: tuple[str, ...] = ("all", "choose", "certify")
#: Default share of val_calib held out for the final certificate.
DEFAULT_CERTIFY_FRACTION = 0.5
#: Seed of the choose / certify split used by the sweep, the demo and `calibrate --part`: fixed, so
#: every trial, resume and re-certification agrees on which rows were held out.
PART_SEED = 0


def _rank_key(seed: int, row: int) -> str:
    return hashlib.sha256(f"{seed}:{row}".encode()).hexdigest()


def holdout_parts(rows: np.ndarray, y: np.ndarray, fraction: float = DEFAULT_CERTIFY_FRACTION,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Boolean masks ``{"choose", "certify"}`` over val_calib rows, stratified by label.

    Keyed on the store row numbers and ``seed`` (not on positions), so every trial of a sweep, the
    demo and a later re-certification agree on the parts whatever order the rows come in.
    """
    rows = np.asarray(rows, dtype=np.int64)
    y = np.asarray(y)
    if rows.shape != y.shape:
        raise DataError(f"rows {rows.shape} and labels {y.shape} differ in shape")
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"certify fraction must be in (0, 1), got {fraction}")
    certify = np.zeros(len(rows), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        order = sorted(idx, key=lambda i: _rank_key(seed, int(rows[i])))
        certify[order[: int(round(fraction * len(idx)))]] = True
    return {"choose": ~certify, "certify": certify}


def part_mask(part: str, rows: np.ndarray, y: np.ndarray, fraction: float = DEFAULT_CERTIFY_FRACTION,
              seed: int = 0) -> np.ndarray:
    """The mask of ``part`` ("all", "choose" or "certify") over val_calib rows."""
    if part not in PARTS:
        raise ConfigError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if part == "all":
        return np.ones(len(rows), dtype=bool)
    return holdout_parts(rows, y, fraction, seed)[part]


@dataclass(frozen=True)
class SelectionRecord:
    """How a policy's data relate to a choice among candidates; written into policy.json."""

    method: str  # "none" | "holdout" | "bonferroni" | "unadjusted"
    candidates: int
    part: str  # the val_calib part this policy was fitted on
    certify_fraction: float
    seed: int
    delta_split: int = 1  # policies certified together on the certify part (Bonferroni divisor)
    chosen_by: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "candidates": self.candidates, "part": self.part,
                "certify_fraction": self.certify_fraction, "seed": self.seed,
                "delta_split": self.delta_split, "chosen_by": self.chosen_by}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SelectionRecord":
        """The record ``to_dict`` wrote (policy.json ``selection``); missing keys take their defaults."""
        return cls(str(d.get("method", "none")), int(d.get("candidates", 1)), str(d.get("part", "all")),
                   float(d.get("certify_fraction", DEFAULT_CERTIFY_FRACTION)), int(d.get("seed", PART_SEED)),
                   int(d.get("delta_split", 1)), str(d.get("chosen_by", "")))

    @property
    def is_guarantee(self) -> bool:
        """False for a fit on the choose part (it served a comparison), and for a choice made with
        certificates that were not adjusted for it: either promises nothing."""
        return self.part != "choose" and self.method != "unadjusted"

    def statement(self) -> str:
        """One sentence for reports: what the certificate's data were and were not used for."""
        if self.part == "choose":
            return (f"fitted on the choose part of val_calib to compare {self.candidates} candidates; "
                    "not a guarantee")
        if self.method == "unadjusted":
            return (f"chosen among {self.candidates} candidates ({self.chosen_by}) with certificates not adjusted "
                    "for that choice; not a guarantee (certify one rule fixed in advance, or use a policy "
                    "whose delta can be split over the candidates)")
        if self.method == "bonferroni":
            return (f"chosen among {self.candidates} candidates ({self.chosen_by}), each certified on all of "
                    f"val_calib at delta / {self.delta_split} (Bonferroni), so the chosen one holds at delta")
        if self.method == "holdout":
            split = f", delta split over {self.delta_split}" if self.delta_split > 1 else ""
            return (f"chosen among {self.candidates} candidates on the choose part ({self.chosen_by}); "
                    f"certified on the held-out certify part of val_calib, unseen by the choice{split}")
        return "fitted on all of val_calib; no choice among candidates was made on it"


@dataclass
class Selection:
    """The outcome of ``choose_then_certify``: the winner and its held-out certified policy."""

    winner: int
    policy: Any  # ExitPolicy fitted on the certify part
    choose_keys: list[tuple[float, ...]]
    record: SelectionRecord
    choose_policies: list[Any] = field(default_factory=list)


def certified_coverage_key(policy: Any, scores: Mapping[str, np.ndarray]) -> tuple[float, ...]:
    """Default ranking on the choose part: certified first, then coverage (larger is better)."""
    cov = float(np.mean(policy.decide(dict(scores)).exit)) if len(next(iter(scores.values()))) else 0.0
    return (1.0 if policy.certified else 0.0, cov if policy.certified else 0.0)


def _subset(scores: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[mask] for k, v in scores.items()}


def choose_then_certify(candidates: Sequence[Mapping[str, np.ndarray]], y: np.ndarray, rows: np.ndarray,
                        make_policy: Callable[[int], Any], *, fraction: float = DEFAULT_CERTIFY_FRACTION,
                        seed: int = 0,
                        rank: Callable[[Any, Mapping[str, np.ndarray]], tuple[float, ...]] = certified_coverage_key,
                        ) -> Selection:
    """Fit ``make_policy(i)`` for every candidate's val_calib scores on the choose part, pick the one
    with the largest ``rank`` (first on ties), then fit a fresh policy for it on the certify part.

    The returned policy's certificate holds at its own delta: the certify rows were not used to
    choose. ``rows`` are the store rows of val_calib (the same for every candidate).
    """
    if not candidates:
        raise ConfigError("choose_then_certify needs at least one candidate")
    parts = holdout_parts(rows, y, fraction, seed)
    choose, certify = parts["choose"], parts["certify"]
    keys, fitted = [], []
    for i, scores in enumerate(candidates):
        sub = _subset(scores, choose)
        pol = make_policy(i).fit(sub, np.asarray(y)[choose])
        fitted.append(pol)
        keys.append(tuple(rank(pol, sub)))
    winner = max(range(len(candidates)), key=lambda i: (keys[i], -i))
    final = make_policy(winner).fit(_subset(candidates[winner], certify), np.asarray(y)[certify])
    record = SelectionRecord("holdout", len(candidates), "certify", fraction, seed, 1,
                             "certified coverage on the choose part")
    return Selection(winner, final, keys, record, fitted)


def choose_split_delta(candidates: Sequence[Mapping[str, np.ndarray]], y: np.ndarray,
                       make_policy: Callable[[int, int], Any],
                       rank: Callable[[Any, Mapping[str, np.ndarray]], tuple[float, ...]] = certified_coverage_key,
                       ) -> Selection:
    """Fit ``make_policy(i, K)`` (a policy at delta / K) for each of the K candidates on all rows and
    pick the largest ``rank``. By the union bound no candidate is falsely certified with
    probability >= 1 - delta, so the winner's certificate holds at delta whatever the choice."""
    if not candidates:
        raise ConfigError("choose_split_delta needs at least one candidate")
    k = len(candidates)
    fitted = [make_policy(i, k).fit(dict(c), np.asarray(y)) for i, c in enumerate(candidates)]
    keys = [tuple(rank(pol, c)) for pol, c in zip(fitted, candidates)]
    winner = max(range(k), key=lambda i: (keys[i], -i))
    record = SelectionRecord("bonferroni", k, "all", DEFAULT_CERTIFY_FRACTION, PART_SEED, k,
                             "certified coverage")
    return Selection(winner, fitted[winner], keys, record, fitted)
