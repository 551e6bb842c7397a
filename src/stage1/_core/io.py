"""Small I/O helpers every package uses: atomic writes, JSON, hashing, safetensors.

Artifacts are written to a temp file in the same folder and renamed into place, so a crash never
leaves a half-written file under the final name.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

PARTIAL_SUFFIX = ".partial"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: mkstemp / mkdtemp create private (0600 / 0700) entries; finished files get the usual mode instead.
_UMASK = _umask()


@contextmanager
def atomic_path(path: str | os.PathLike[str], fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is (fsynced and) renamed onto ``path``.

    For writers that need a file name (h5py, numpy memmaps, PIL). On any error the temp file is
    removed and ``path`` is untouched; a killed process leaves only a ``*.partial`` to sweep.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike[str], keep_theirs: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` (an old one is swapped out).

    Callers decide beforehand whether an existing ``path`` may be replaced. On any error the temp
    folder is removed and ``path`` is untouched, so a crash never leaves a half-written folder.

    ``keep_theirs`` is for caches that several processes may fill at once: when ``keep_theirs(path)``
    holds at the end (another writer finished first, also when it wins the race for the final
    rename), that ``path`` stays and this temp folder is discarded. An existing ``path`` that fails
    the test (a broken leftover) is replaced as usual.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent))
    try:
        yield work
        os.chmod(work, 0o777 & ~_UMASK)
        if keep_theirs is not None and keep_theirs(path):
            return
        old: Path | None = None
        try:
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", suffix=PARTIAL_SUFFIX, dir=path.parent))
                os.replace(path, old / path.name)
            os.rename(work, path)
        except OSError:
            if keep_theirs is None or not keep_theirs(path):
                raise  # (an old folder already swapped out stays in ``old``: nothing is lost)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def json_safe(obj: Any) -> Any:
    """Plain-JSON copy: numpy scalars/arrays, dataclasses and paths -> python, NaN / inf -> None.

    Artifacts are strict JSON (``atomic_write_json`` refuses NaN), so everything goes through here.
    """
    import dataclasses

    import numpy as np

    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read JSON from ``path`` with an error that names the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); restore or regenerate the file") from None


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def save_safetensors_atomic(
    tensors: dict[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Save numpy arrays with safetensors, atomically. Arrays must be contiguous numpy arrays."""
    import numpy as np
    from safetensors.numpy import save

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write_bytes(path, save(arrays, metadata=metadata))


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a safetensors file into a dict of numpy arrays (no pickle involved); a file that is not
    valid safetensors is a ``DataError`` naming it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from stage1._core.errors import DataError

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise DataError(f"{path}: not a readable safetensors file ({exc}); it is corrupt or truncated: "
                        "restore it or re-create it with the command that wrote it") from None


def utc_timestamp() -> str:
    """Now in UTC as ISO 8601 to the second (``2026-12-03T17:05:42+00:00``): every artifact's clock."""
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
