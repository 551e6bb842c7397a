"""Click options that several commands share, declared once (name, type, range, wording).

Each is a factory because commands differ in their default (predict batches 16 images, extract
32); the meaning, the type and the range never differ.
"""
from __future__ import annotations

from typing import Any, Callable

import click

from stage1._core.constants import DEFAULT_IMAGE_SIZE

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def device_option(help: str = "cpu, or cuda / cuda:N (bf16 autocast) where a GPU is present.") -> Decorator:
    """--device: where the backbone (or finetune) runs."""
    return click.option("--device", default="cpu", show_default=True, help=help)


def batch_size_option(default: int = 32, help: str = "Images per backbone pass.") -> Decorator:
    """--batch-size: images per forward pass (>= 1)."""
    return click.option("--batch-size", type=click.IntRange(min=1), default=default, show_default=True, help=help)


def image_size_option(default: int | None = DEFAULT_IMAGE_SIZE,
                      help: str = "Square backbone input side in pixels; a multiple of the patch size.") -> Decorator:
    """--image-size: square input side (>= 1)."""
    return click.option("--image-size", type=click.IntRange(min=1), default=default,
                        show_default=default is not None, help=help)


def seed_option(help: str = "Random seed.") -> Decorator:
    """--seed: an integer seed (default 0)."""
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


def workers_option(default: int = 0, minimum: int = 0,
                   help: str = "Decode processes running beside the forward pass (0 = decode inline).") -> Decorator:
    """--workers: helper processes."""
    return click.option("--workers", type=click.IntRange(min=minimum), default=default, show_default=True, help=help)


def threads_option(default: int = 0, minimum: int = 0,
                   help: str = "Torch threads (0 = torch's default).") -> Decorator:
    """--threads: torch intra-op threads."""
    return click.option("--threads", type=click.IntRange(min=minimum), default=default, show_default=True, help=help)
