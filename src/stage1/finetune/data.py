"""Images for full-image training: decode with the store's reader, distort with the store's views.

The same ``featstore.images`` / ``featstore.views`` code that fills the feature store feeds the
backbone here, so fine-tuning sees exactly the preprocessing and validator-style distortions the
cached features were made with. View seeds are keyed on (content hash, epoch, view, run seed), so
every epoch's batches are reproducible.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from stage1.featstore.preprocessing import Preprocessing
from stage1._core.errors import ConfigError


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
    ) -> None:
        from stage1.featstore.views import LEVELS

        if n_views < 1:
            raise ConfigError("n_views must be >= 1")
        if levels is not None and (not levels or any(lv not in LEVELS for lv in levels)):
            raise ConfigError(f"view levels must be a non-empty list of {LEVELS}, got {list(levels)}")
        self.items = list(items)
        self.preprocessing = Preprocessing(size=size, mean=tuple(mean), std=tuple(std), draft=draft)
        self.size = self.preprocessing.size
        self.seed = int(seed)
        self.n_views = int(n_views)
        self.levels = None if levels is None else tuple(int(lv) for lv in levels)
        self.epoch = 0
        # random crops (area >= 0.2) follow the decode of a distorted view: draft-decode larger, as extract does
        self.draft_size = self.preprocessing.draft_size_for(1 if self.levels is None else 2)

    @classmethod
    def from_preprocessing(cls, items: Sequence[Item], preprocessing: Preprocessing, *, seed: int = 0,
                           n_views: int = 1, levels: Sequence[int] | None = None) -> "ViewDataset":
        """The dataset that decodes and normalises as ``preprocessing`` says (its views recipe is not used)."""
        prep = preprocessing
        return cls(items, prep.size, prep.mean, prep.std, seed=seed, n_views=n_views, levels=levels, draft=prep.draft)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        from stage1.featstore.images import load_rgb
        from stage1.featstore.views import make_view, view_seed

        item = self.items[index]
        img = load_rgb(item.path, draft_size=self.draft_size)
        views = []
        for v in range(self.n_views):
            view = img
            if self.levels is not None:
                seed = view_seed(item.sha256 or item.rel, 1 + self.epoch * self.n_views + v, self.seed)
                view = make_view(img, seed, self.levels[seed % len(self.levels)], size=self.size)
            views.append(self.preprocessing.pixels(view))
        return torch.from_numpy(np.stack(views)), int(item.label), index


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
