"""Images for full-image training: decode with the store's reader, distort with the store's views.

The same ``featstore.images`` / ``featstore.views`` code that fills the feature store feeds the
backbone here, so fine-tuning sees exactly the preprocessing and validator-style distortions the
cached features were made with. View seeds are keyed on (content hash, epoch, view, run seed), so
every epoch's batches are reproducible. For ``adapt --multi-crop`` the dataset also gives DINO-style
local crops: small crops of the image at a smaller input size (``local_view``, ``local_size_for``).
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from stage1.featstore.preprocessing import Preprocessing
from stage1._core.errors import ConfigError

#: DINO's local crops: 96 px where its global views are 224 px ...
LOCAL_SIZE_RATIO = 96 / 224
#: ... cut from 5-40% of the image area
LOCAL_SCALE = (0.05, 0.4)

#: one dataset item: (views [n_views, 3, S, S], label, index), plus local crops [n_local, 3, s, s]
#: as a fourth element when the dataset has local crops
Sample = Union[tuple[torch.Tensor, int, int], tuple[torch.Tensor, int, int, torch.Tensor]]


def local_size_for(image_size: int, patch_size: int) -> int:
    """The input side of local crops: DINO's 96/224 of ``image_size``, a multiple of the patch size."""
    return max(patch_size, int(round(image_size * LOCAL_SIZE_RATIO / patch_size)) * patch_size)


def local_view(img: Any, seed: int, level: int, size: int) -> Any:
    """A DINO-style local crop of ``img`` (PIL RGB): a random square of 5-40% of its area, then the
    store's view distortion at ``level`` (``featstore.views.make_view``) at ``size`` x ``size``.

    Deterministic in (img, seed, level). At levels >= 1 ``make_view`` crops again (to 20-100% of
    the square, after a rotation), so a local crop covers about 1-40% of the image (DINO: 5-40%).
    """
    from stage1.featstore.views import make_view

    rng = np.random.default_rng(seed)
    w, h = img.size
    side = max(1, min(w, h, int(round(math.sqrt(rng.uniform(*LOCAL_SCALE) * w * h)))))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    square = img.crop((left, top, left + side, top + side))
    return make_view(square, int(rng.integers(0, 2**62)), level, size=size)


@dataclass(frozen=True)
class Item:
    """One usable image: absolute path, path relative to --images, label (-1 unlabelled), content hash."""

    path: str
    rel: str
    label: int
    sha256: str


def content_sha256(items: Sequence[Item]) -> str:
    """Hash over the images' content hashes in order: pins the exact pixels trained on."""
    return hashlib.sha256("\n".join(it.sha256 for it in items).encode()).hexdigest()


class ViewDataset(Dataset):
    """Items -> ``(pixels [n_views, 3, S, S] float32, label, index)``.

    ``levels=None`` gives the clean preprocessed image (the store's view 0; used for evaluation).
    Otherwise each view is the store's ``make_view(img, seed, level, size)``, with the seed from
    ``featstore.views.view_seed`` keyed on (content hash, epoch and view, run seed) and the level
    drawn from ``levels`` by that seed. Call ``set_epoch`` before each epoch so views differ between
    epochs but not between runs. ``preprocessing`` is the store's spec of the clean view (size, mean,
    std, draft); ``from_preprocessing`` builds the dataset from one.

    ``n_local > 0`` (``adapt --multi-crop``; needs ``levels``) adds a fourth element to each item:
    ``n_local`` local crops (``local_view``) at ``local_size``, seeded apart from the global views
    (so the global views are the same with or without local crops).
    """

    def __init__(
        self,
        items: Sequence[Item],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        seed: int = 0,
        n_views: int = 1,
        levels: Sequence[int] | None = None,
        draft: bool = True,
        n_local: int = 0,
        local_size: int | None = None,
    ) -> None:
        from stage1.featstore.views import LEVELS

        if n_views < 1:
            raise ConfigError("n_views must be >= 1")
        if n_local < 0 or (n_local and (levels is None or not local_size or local_size < 1)):
            raise ConfigError("local crops need n_local >= 0, view levels and a local size >= 1")
        if levels is not None and (not levels or any(lv not in LEVELS for lv in levels)):
            raise ConfigError(f"view levels must be a non-empty list of {LEVELS}, got {list(levels)}")
        self.items = list(items)
        self.preprocessing = Preprocessing(size=size, mean=tuple(mean), std=tuple(std), draft=draft)
        self.size = self.preprocessing.size
        self.seed = int(seed)
        self.n_views = int(n_views)
        self.levels = None if levels is None else tuple(int(lv) for lv in levels)
        self.n_local = int(n_local)
        self.local_size = int(local_size) if n_local else None
        self.epoch = 0
        # random crops (area >= 0.2) follow the decode of a distorted view: draft-decode larger, as extract does
        self.draft_size = self.preprocessing.draft_size_for(1 if self.levels is None else 2)

    @classmethod
    def from_preprocessing(cls, items: Sequence[Item], preprocessing: Preprocessing, *, seed: int = 0,
                           n_views: int = 1, levels: Sequence[int] | None = None, n_local: int = 0,
                           local_size: int | None = None) -> "ViewDataset":
        """The dataset that decodes and normalises as ``preprocessing`` says (its views recipe is not used)."""
        prep = preprocessing
        return cls(items, prep.size, prep.mean, prep.std, seed=seed, n_views=n_views, levels=levels, draft=prep.draft,
                   n_local=n_local, local_size=local_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        from stage1.featstore.images import load_rgb
        from stage1.featstore.views import make_view, view_seed

        item = self.items[index]
        img = load_rgb(item.path, draft_size=self.draft_size)
        key = item.sha256 or item.rel
        views = []
        for v in range(self.n_views):
            view = img
            if self.levels is not None:
                seed = view_seed(key, 1 + self.epoch * self.n_views + v, self.seed)
                view = make_view(img, seed, self.levels[seed % len(self.levels)], size=self.size)
            views.append(self.preprocessing.pixels(view))
        sample = torch.from_numpy(np.stack(views)), int(item.label), index
        if not self.n_local:
            return sample
        assert self.levels is not None and self.local_size is not None
        local_prep = replace(self.preprocessing, size=self.local_size)
        crops = []
        for j in range(self.n_local):  # negative view numbers: never a global view's seed
            seed = view_seed(key, -(1 + self.epoch * self.n_local + j), self.seed)
            crop = local_view(img, seed, self.levels[seed % len(self.levels)], self.local_size)
            crops.append(local_prep.pixels(crop))
        return (*sample, torch.from_numpy(np.stack(crops)))


def collect_items(
    images_dir: str | os.PathLike[str], entries: Sequence[Any], size: int
) -> tuple[list[Item], list[dict[str, str]], list[int]]:
    """Check and hash every listed image: (usable items, quarantined {path, reason, detail}, entry indices kept).

    Unreadable images are quarantined with the store's reason codes and reported, never fatal and
    never silently dropped. ``entries`` are ``featstore.labels.ImageEntry`` rows.
    """
    from stage1.featstore.images import decode, draft_size_for, quarantine_reason, read_bytes
    from stage1._core.io import sha256_bytes

    root = Path(images_dir)
    items: list[Item] = []
    quarantined: list[dict[str, str]] = []
    kept: list[int] = []
    for index, entry in enumerate(entries):
        path = root / entry.path
        try:
            data = read_bytes(path)
            decode(data, entry.path, draft_size=draft_size_for(size, 1))
        except Exception as exc:  # as extract does: never fatal, quarantined with the reason and error text
            reason, detail = quarantine_reason(exc, entry.path)
            quarantined.append({"path": entry.path, "reason": reason, "detail": detail})
            continue
        items.append(Item(str(path), entry.path, int(entry.label), sha256_bytes(data)))
        kept.append(index)
    return items, quarantined, kept


def loader(dataset: ViewDataset, batch_size: int, *, shuffle: bool, seed: int, workers: int = 0) -> torch.utils.data.DataLoader:
    """A seeded DataLoader; ``drop_last`` when shuffling so batch statistics stay stable."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(dataset) > batch_size,
        num_workers=workers,
        generator=gen,
        persistent_workers=False,
    )
