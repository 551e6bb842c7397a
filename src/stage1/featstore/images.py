"""Image reading and preprocessing without torchvision: PIL decode, EXIF, any mode -> RGB, normalise.

Every failure to read an image becomes a ``BadImage`` with a short ``reason`` code (see ``REASONS``)
so extraction can quarantine it and carry on instead of dying or silently dropping it.
"""
from __future__ import annotations

import errno
import io
import math
import os
import stat
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Default pixel limit (PIL's own default); larger images are treated as decompression bombs.
from stage1._core.constants import DEFAULT_MAX_PIXELS as MAX_PIXELS
from stage1._core.errors import EnvironmentProblem, Stage1Error

from .limits import MAX_BYTES

#: Reason codes a ``BadImage`` may carry (stable: they appear in stores and ``info``).
REASONS = (
    "missing",
    "zero bytes",
    "not an image",
    "truncated",
    "decompression bomb",
    "unreadable",
    "unsupported mode",
    "not a regular file",
    "too large",
)

#: Resize rule recorded in provenance: the whole image, squashed to size x size, bicubic.
RESIZE_RULE = "bicubic-square"


class BadImage(Stage1Error):
    """An image that cannot be used; ``reason`` is one of ``REASONS``, ``str(exc)`` has the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SystemReadError(EnvironmentProblem):
    """Reading an image failed for a reason of the machine (EIO, out of memory, no file handles), not the image."""


#: errno values that say something about the machine or file system, never about one image.
SYSTEM_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EIO", "ENOMEM", "ENFILE", "EMFILE", "ENOSPC", "ESTALE", "ETIMEDOUT", "ENOTCONN", "EHOSTDOWN", "EREMOTEIO",
    "ENXIO", "EDEADLK", "ENOLCK", "EBUSY", "EAGAIN") if hasattr(errno, name))


def is_system_error(exc: BaseException) -> bool:
    """True for failures of the machine (out of memory, I/O error, ...) that must not quarantine an image."""
    if isinstance(exc, (MemoryError, EnvironmentProblem)):
        return True
    return isinstance(exc, OSError) and exc.errno in SYSTEM_ERRNOS


def read_bytes(path: str | os.PathLike[str], max_bytes: int | None = MAX_BYTES) -> bytes:
    """Read an image file's bytes, mapping missing / empty / unreadable files to ``BadImage``.

    Only a regular file is read: the file is opened non-blocking (a FIFO without a writer cannot
    hang the open) and checked with ``fstat`` on the open descriptor before any read, so a FIFO,
    socket or device is refused as ``"not a regular file"``. At most ``max_bytes`` are read (None: no
    cap); a larger file is ``"too large"``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise BadImage("missing", f"{path} does not exist") from None
    except IsADirectoryError:
        raise BadImage("unreadable", f"{path} is a directory") from None
    except OSError as exc:
        raise _read_error(path, exc) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BadImage("unreadable", f"{path} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise BadImage("not a regular file", f"{path} is a {_file_kind(st.st_mode)}, not a regular file; "
                                                  "only regular files are read")
        if max_bytes is not None and st.st_size > max_bytes:
            raise BadImage("too large", f"{path} is {st.st_size} bytes > limit {max_bytes} (--max-bytes)")
        limit = -1 if max_bytes is None else max_bytes + 1
        with open(fd, "rb", closefd=False) as fh:
            data = fh.read(limit)
    except OSError as exc:
        raise _read_error(path, exc) from None
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:  # grew while being read
        raise BadImage("too large", f"{path} is more than {max_bytes} bytes (--max-bytes)")
    if not data:
        raise BadImage("zero bytes", f"{path} is empty")
    return data


def _read_error(path: str | os.PathLike[str], exc: OSError) -> Stage1Error:
    """A failed open / read: the machine's fault (``SystemReadError``) or this file's (``BadImage``).

    A special file that cannot even be opened (a socket gives ENXIO) is this file's fault, not the machine's.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        return BadImage("not a regular file", f"{path} is a {_file_kind(mode)}, not a regular file; "
                                              "only regular files are read")
    if exc.errno in SYSTEM_ERRNOS:
        return SystemReadError(f"{path}: {exc.strerror or exc} (errno {errno.errorcode.get(exc.errno, exc.errno)})")
    return BadImage("unreadable", f"{path}: {exc.strerror or exc}")


def _file_kind(mode: int) -> str:
    """A word for a non-regular file type (FIFO, socket, device)."""
    for test, word in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return word
    return "special file"


def quarantine_reason(exc: Exception, name: str) -> tuple[str, str]:
    """(reason, detail) for an error met while reading image ``name``: a BadImage's own, else "unreadable"."""
    if isinstance(exc, BadImage):
        return exc.reason, exc.detail
    return "unreadable", f"{name}: {type(exc).__name__}: {exc}"


def draft_size_for(size: int, views: int) -> int:
    """JPEG draft target: ``size`` for the clean view; larger when random crops (area >= 0.2) follow.

    Callers use ``Preprocessing.draft_size`` (featstore.preprocessing), which applies the spec's draft flag.
    """
    return size if views <= 1 else int(math.ceil(size / math.sqrt(0.2)))


def decode(
    data: bytes,
    name: str = "<bytes>",
    draft_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Decode image bytes to a loaded RGB PIL image (EXIF orientation applied).

    ``draft_size`` lets libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale while keeping both sides
    >= draft_size, which is several times faster than a full decode followed by a downscale.
    """
    if not data:
        raise BadImage("zero bytes", f"{name} is empty")
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # ``max_pixels`` is the one limit: PIL's own (which refuses at 2x its value) is lifted while
            # the header is read, and the size is checked below before any pixel is decoded.
            Image.MAX_IMAGE_PIXELS = None
            try:
                img = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(
                    "decompression bomb", f"{name} is {w}x{h} = {w * h} pixels > limit {max_pixels}"
                )
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
    except BadImage:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImage("decompression bomb", f"{name}: {exc}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image", f"{name} is not a format PIL can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc)
        low = msg.lower()
        if "truncated" in low or isinstance(exc, EOFError) or "broken data stream" in low:
            raise BadImage("truncated", f"{name}: {msg}") from None
        raise BadImage("unreadable", f"{name}: {type(exc).__name__}: {msg}") from None
    try:
        img = ImageOps.exif_transpose(img) or img
    except Exception:  # a corrupt EXIF block must not lose the image; keep it unrotated
        pass
    return to_rgb(img, name)


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map an integer or float single-channel array to uint8 (16-bit -> /257, float in [0,1] -> *255)."""
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64))
        scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    arr = arr.astype(np.int64)
    if arr.size and int(arr.max()) > 255:
        return np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, 16-bit and float scaled, CMYK converted."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        grey = _scale_to_uint8(np.asarray(img))
        if grey.ndim == 3:  # e.g. 16-bit multi-channel read as an array
            grey = grey[..., 0]
        return Image.fromarray(grey, mode="L").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise BadImage("unsupported mode", f"{name}: mode {mode} cannot be converted to RGB ({exc})") from None


def load_rgb(
    path: str | os.PathLike[str],
    draft_size: int | None = None,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """Read and decode ``path`` to RGB (EXIF applied, JPEG draft mode when ``draft_size`` is given)."""
    return decode(read_bytes(path), str(path), draft_size=draft_size, max_pixels=max_pixels)


def preprocess(
    img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Resize the whole image to ``size`` x ``size`` (bicubic) and normalise: float32 [3, size, size]."""
    if img.mode != "RGB":
        img = to_rgb(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
