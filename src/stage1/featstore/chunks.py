"""The raw chunk reader: rows of the ``features`` array copied straight from memory-mapped chunk files.

Reading through zarr costs a decode call per chunk and per selection; for the stores this package
writes (one uncompressed chunk file per ``chunk_rows`` rows, native byte order) the file *is* the
array, so rows are copied out of an ``mmap`` in one step, like a ``.npy`` memmap. ``raw_readable``
decides from the array's codec objects (``isinstance`` on zarr's codec classes, never their names)
whether that holds; anything else (compressed, transposed, sharded, other byte order, chunks split
along views or width) goes through zarr instead.
"""
from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from zarr.codecs import BytesCodec, Endian

from .errors import StoreError

#: Item sizes the raw reader handles (the store's float16 / float32).
RAW_ITEMSIZES = (2, 4)


def raw_readable(array: Any) -> bool:
    """True when ``array``'s chunk files hold its values as plain bytes in this machine's byte order.

    That is: the only codec is a ``zarr.codecs.BytesCodec`` (no filter, compressor or sharding)
    whose endianness is the machine's, a 2- or 4-byte native dtype, and chunks spanning every view
    and feature (only rows are chunked). ``array`` is a zarr v3 array (anything with ``metadata.codecs``,
    ``dtype``, ``chunks`` and ``shape``).
    """
    codecs = tuple(array.metadata.codecs)
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return False
    dtype = np.dtype(array.dtype)
    return (
        codecs[0].endian == Endian(sys.byteorder)
        and dtype.isnative
        and dtype.itemsize in RAW_ITEMSIZES
        and tuple(array.chunks[1:]) == tuple(array.shape[1:])
    )


class RawChunkReader:
    """Rows of a [N, V, D] zarr array read from its chunk files (check ``raw_readable`` first)."""

    def __init__(self, folder: Path, array: Any) -> None:
        """``folder``: the array's folder (STORE/features); ``array``: the zarr array stored there."""
        self.folder = Path(folder)
        self.array = array
        self.chunk_rows = int(array.chunks[0])
        self.views = int(array.shape[1])
        self.dim = int(array.shape[2])
        self.dtype = np.dtype(array.dtype)

    def chunk_file(self, index: int) -> Path:
        """The file of row-chunk ``index``."""
        return self.folder / self.array.metadata.encode_chunk_key((index, 0, 0))

    def map_chunk(self, index: int) -> tuple[mmap.mmap | None, np.ndarray | None]:
        """Memory-map chunk ``index`` as [chunk_rows, V, D] (None, None when never written = fill value)."""
        path = self.chunk_file(index)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            return None, None
        with fh:
            shape = (self.chunk_rows, self.views, self.dim)
            expected = int(np.prod(shape)) * self.dtype.itemsize
            size = os.fstat(fh.fileno()).st_size
            if size != expected:
                raise StoreError(f"{path}: chunk has {size} bytes, expected {expected}; re-run extract")
            # MAP_POPULATE maps the whole chunk in one go instead of one page fault per 4 KiB
            mm = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)
        return mm, np.frombuffer(mm, dtype=self.dtype).reshape(shape)

    def read(
        self, idx: np.ndarray | None, start: int, stop: int, vsel: np.ndarray | None, out_dtype: np.dtype
    ) -> np.ndarray:
        """Rows ``idx`` (any order, repeats allowed) or, when None, rows [start, stop); views ``vsel`` (None = all).

        Copies straight from the memory-mapped chunk files into the output (one copy per row);
        chunks never written read as the fill value 0.
        """
        cr, D = self.chunk_rows, self.dim
        nv = self.views if vsel is None else len(vsel)
        n = (stop - start) if idx is None else len(idx)
        out = np.empty((n, nv, D), dtype=out_dtype)
        if n == 0:
            return out
        if idx is None:
            chunks: range | list[int] = range(start // cr, (stop - 1) // cr + 1)
            groups = None
        else:
            chunk_of = idx // cr
            order = np.argsort(chunk_of, kind="stable")
            groups = np.split(order, np.flatnonzero(np.diff(chunk_of[order])) + 1)
            chunks = [int(chunk_of[g[0]]) for g in groups]
        for k, c in enumerate(chunks):
            c0 = c * cr
            mm, arr = self.map_chunk(c)
            try:
                if groups is None:
                    lo, hi = max(start, c0), min(stop, c0 + cr)
                    dest = out[lo - start : hi - start]
                    if arr is None:
                        dest[...] = 0
                    elif vsel is None:
                        dest[...] = arr[lo - c0 : hi - c0]
                    else:
                        dest[...] = arr[lo - c0 : hi - c0][:, vsel]
                else:
                    pos = groups[k]
                    if arr is None:
                        out[pos] = 0
                    else:
                        local = idx[pos] - c0  # type: ignore[index]
                        out[pos] = arr[local] if vsel is None else arr[local][:, vsel]
            finally:
                del arr
                if mm is not None:
                    mm.close()
        return out
