"""``Preprocessing``: the one spec that keeps served features identical to the trained ones.

``extract`` records it in a store's provenance (``provenance["preprocessing"]``), ``train`` copies
it into the run's config.json, ``export`` into bundle.json, and ``Stage1Predictor`` decodes and
normalises new images with it. ``to_dict()`` writes exactly the JSON object extract has always
written, so stores, runs and bundles made by 0.1.0 read back equal and a resume still matches.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from stage1._core.errors import DataError

from .images import MAX_PIXELS, RESIZE_RULE, decode, draft_size_for, preprocess
from .views import RECIPE, VALIDATOR_SIZE, validator_clean

#: Clean-view (view 0) rules: ``squash`` = the whole image resized to size x size (0.1.0's, the default);
#: ``validator`` = the validator's level 0 (centre square, bilinear resize to 224) + JPEG q75 round trip,
#: then the same bicubic resize to size x size. Stores and bundles record ``clean`` only when not squash.
CLEAN_RULES = ("squash", "validator")

#: How transparent pixels become RGB (``images.to_rgb``), recorded next to the resize rule.
ALPHA_RULE = "composite-on-white"


class PreprocessingError(DataError):
    """A recorded preprocessing object that cannot be read (missing or malformed field)."""


class PreprocessingMismatch(PreprocessingError):
    """Two preprocessing specs differ, so features made with one would not match the other."""


@dataclass(frozen=True)
class ViewRecipe:
    """The extra distorted views per image: count ``n`` (1 = the clean view only), recipe, levels, seed."""

    n: int = 1
    recipe: str = RECIPE
    levels: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "n", int(self.n))
        object.__setattr__(self, "levels", tuple(int(lv) for lv in self.levels))
        object.__setattr__(self, "seed", int(self.seed))

    @classmethod
    def of(cls, n: int, levels: Sequence[int] = (), seed: int = 0, recipe: str = RECIPE) -> "ViewRecipe":
        """The recipe extract records for ``n`` views: recipe, levels and seed only matter (and are kept) when n > 1."""
        if int(n) <= 1:
            return cls(n=int(n))
        return cls(n=int(n), recipe=str(recipe), levels=tuple(levels), seed=int(seed))

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessing["views"]`` JSON object."""
        return {"n": self.n, "recipe": self.recipe, "levels": list(self.levels), "seed": self.seed}


@dataclass(frozen=True)
class Preprocessing:
    """Decode + resize + normalise settings of view 0, and the views recipe of the extra views.

    size: square input side; resize: resize rule (``images.RESIZE_RULE``); mean / std: per-channel
    normalisation; draft: JPEG draft decode on; exif_transpose / alpha: orientation and transparency
    handling; views: the ``ViewRecipe``; clean: the view-0 rule (``CLEAN_RULES``). Equal specs give byte-identical pixels for the same file.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = RESIZE_RULE
    draft: bool = True
    views: ViewRecipe = field(default_factory=ViewRecipe)
    exif_transpose: bool = True
    alpha: str = ALPHA_RULE
    clean: str = "squash"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        object.__setattr__(self, "draft", bool(self.draft))
        object.__setattr__(self, "exif_transpose", bool(self.exif_transpose))

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def for_backbone(cls, backbone: Any, size: int, *, draft: bool = True,
                     views: ViewRecipe | None = None, clean: str = "squash") -> "Preprocessing":
        """The spec this version applies for ``backbone`` (its mean / std) at input side ``size``."""
        return cls(size=size, mean=tuple(backbone.mean), std=tuple(backbone.std), draft=draft,
                   views=views if views is not None else ViewRecipe(), clean=clean)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored as ``provenance["preprocessing"]`` (0.1.0's keys, plus ``clean`` unless squash)."""
        out = {
            "size": self.size,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
            "draft": self.draft,
            "exif_transpose": self.exif_transpose,
            "alpha": self.alpha,
            "views": self.views.to_dict(),
        }
        if self.clean != "squash":
            out["clean"] = self.clean
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "preprocessing",
                  error: type[Exception] = PreprocessingError) -> "Preprocessing":
        """Read a recorded preprocessing object; ``error`` (PreprocessingError) naming ``where`` when unusable."""
        redo = "re-extract the store and re-export the run"
        if not isinstance(d, Mapping):
            raise error(f"{where}: records no preprocessing object (got {type(d).__name__}); {redo}")
        views = d.get("views") or {}
        _refuse_unknown(d, cls, "preprocessing", where, error)
        if isinstance(views, Mapping):
            _refuse_unknown(views, ViewRecipe, "preprocessing.views", where, error)
        missing = [key for key in ("size", "mean", "std", "resize") if key not in d]
        if missing:
            raise error(f"{where}: preprocessing records no {missing[0]!r}; {redo}")
        # Shapes written by 0.1.0 (store attributes, run config.json["store"]["provenance"], bundle.json)
        # are this very object; "draft", "views", "exif_transpose" and "alpha" are read with the values
        # 0.1.0 applied when absent (as its predictor did: draft on, one clean view), so a trimmed
        # record still reads equal to the spec its features were made with.
        try:
            recipe = ViewRecipe(n=views.get("n", 1), recipe=str(views.get("recipe", RECIPE)),
                                levels=views.get("levels", ()), seed=views.get("seed", 0))
            prep = cls(size=d["size"], mean=d["mean"], std=d["std"], resize=str(d["resize"]),
                       draft=d.get("draft", True), views=recipe, exif_transpose=d.get("exif_transpose", True),
                       alpha=str(d.get("alpha", ALPHA_RULE)), clean=str(d.get("clean", "squash")))
        except (TypeError, ValueError, AttributeError) as exc:
            raise error(f"{where}: malformed preprocessing ({exc}); {redo}") from None
        if prep.size < 1 or len(prep.mean) != 3 or len(prep.std) != 3 or prep.views.n < 1:
            raise error(f"{where}: preprocessing needs size >= 1, 3 means, 3 stds and views.n >= 1 (got size "
                        f"{prep.size}, {len(prep.mean)} means, {len(prep.std)} stds, views.n {prep.views.n}); {redo}")
        return prep

    # -- what the spec implies -----------------------------------------------------------------------
    @property
    def draft_size(self) -> int | None:
        """JPEG draft target when decoding (None with draft off): the same for view 0 and its views."""
        return self.draft_size_for(self.views.n)

    def draft_size_for(self, n_views: int) -> int | None:
        """Draft target for a decode that feeds ``n_views`` views (larger when random crops follow).

        The validator clean rule and the validator recipes work at 224 px before the backbone's
        resize, so their draft keeps at least that; squash / validator-v1 keep 0.1.0's targets.
        """
        if not self.draft:
            return None
        base = self.size
        if self.clean == "validator" or (n_views > 1 and self.views.recipe != RECIPE):
            base = max(base, VALIDATOR_SIZE)
        return draft_size_for(base, n_views)

    def with_views(self, views: ViewRecipe) -> "Preprocessing":
        """A copy with another views recipe."""
        return replace(self, views=views)

    def decode(self, data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> Image.Image:
        """Image bytes -> RGB PIL image, decoded as this spec says (draft size, EXIF, alpha)."""
        return decode(data, name, draft_size=self.draft_size, max_pixels=max_pixels)

    def pixels(self, img: Image.Image) -> np.ndarray:
        """A decoded image (or view) -> float32 [3, size, size], resized and normalised."""
        return preprocess(img, self.size, self.mean, self.std)

    def clean_pixels(self, img: Image.Image) -> np.ndarray:
        """A decoded image -> view-0 pixels [3, size, size] by the ``clean`` rule (what predict serves)."""
        if self.clean == "validator":
            img = validator_clean(img)
        elif self.clean != "squash":
            raise PreprocessingMismatch(f"preprocessing.clean {self.clean!r} is not one of {CLEAN_RULES}")
        return self.pixels(img)

    # -- comparison ----------------------------------------------------------------------------------
    def differences(self, other: "Preprocessing") -> list[tuple[str, Any, Any]]:
        """(field, this value, other value) for each differing field; nested views fields as ``views.n``."""
        a, b = _flat(self.to_dict()), _flat(other.to_dict())
        return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]

    def require_equal(self, other: "Preprocessing", *, where: str, mine: str = "recorded",
                      theirs: str = "given", fix: str = "use the settings the features were made with",
                      error: type[Exception] = PreprocessingMismatch) -> None:
        """Raise ``error`` naming the first differing field (and how many more) unless the specs are equal."""
        diffs = self.differences(other)
        if not diffs:
            return
        key, a, b = diffs[0]
        more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:])})" if len(diffs) > 1 else ""
        raise error(f"{where}: preprocessing.{key} differs ({mine} {a!r}, {theirs} {b!r}){more}; {fix}")

    def supported(self) -> "Preprocessing":
        """This spec with the fixed rules this version implements (resize, EXIF, alpha, a known clean rule) put in."""
        clean = self.clean if self.clean in CLEAN_RULES else "squash"
        return replace(self, resize=RESIZE_RULE, exif_transpose=True, alpha=ALPHA_RULE, clean=clean)

    def require_supported(self, where: str, error: type[Exception] = PreprocessingMismatch) -> None:
        """Refuse a spec whose resize / EXIF / alpha rule this version cannot reproduce, naming the field."""
        self.require_equal(self.supported(), where=where, mine="recorded", theirs="this version implements",
                           fix="re-extract the store and re-export with this version", error=error)


def _refuse_unknown(d: Mapping[str, Any], kind: type, name: str, where: str, error: type[Exception]) -> None:
    """Refuse fields ``kind`` does not have: a newer version's spec must not be read as a narrower one."""
    unknown = sorted(set(d) - {f.name for f in fields(kind)})
    if unknown:
        raise error(f"{where}: unknown {name} field(s) {', '.join(map(str, unknown))} (written by a newer "
                    "version?); upgrade stage1 to read it")


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
