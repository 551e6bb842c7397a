"""The image list: a labels CSV (`path,label[,split]`, header optional) or every image in a folder.

Paths are relative to --images and must stay inside it; labels are 0, 1 or empty (unlabelled).
Bad rows are refused with the file, the line and the fix, never silently dropped. The CSV reader
(``parse_labels_csv``) and the one writer (``write_labels_csv``) live together so what one writes
the other reads back unchanged.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from stage1._core.constants import SPLIT_NAMES
from stage1._core.errors import DataError
from stage1._core.io import atomic_write_text

#: File endings `extract` picks up when no labels CSV is given.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class LabelsError(DataError):
    """A labels CSV that cannot be used; the message names the file and line."""

    usage = True  # the fix is another --labels file (exit 2, as the CLI has always answered)


@dataclass(frozen=True)
class ImageEntry:
    """One listed image: path relative to the images folder, label (-1 = unlabelled), split ('' = any);
    ``line``: its line in the labels CSV (0 = not from a CSV), for messages only (not compared)."""

    path: str
    label: int
    split: str = ""
    line: int = field(default=0, compare=False)


def _clean_path(raw: str, where: str) -> str:
    """Normalise a CSV path to a relative POSIX path, refusing absolute paths and ../ escapes."""
    p = raw.strip().replace("\\", "/")
    if not p:
        raise LabelsError(f"{where}: empty path; give the image path relative to --images")
    if p.startswith("/") or (len(p) > 1 and p[1] == ":"):
        raise LabelsError(f"{where}: absolute path {raw!r}; give paths relative to --images")
    norm = posixpath.normpath(p)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise LabelsError(f"{where}: path {raw!r} escapes --images; keep images inside the --images folder")
    return norm


def _parse_label(raw: str, where: str) -> int:
    value = raw.strip()
    if value == "":
        return -1
    if value in ("0", "1"):
        return int(value)
    raise LabelsError(f"{where}: label {raw!r} is not 0, 1 or empty; fix it (empty = unlabelled)")


def parse_labels_csv(csv_path: str | os.PathLike[str]) -> tuple[list[ImageEntry], bool]:
    """Read a labels CSV into entries; returns (entries, has_split_column).

    Accepts a UTF-8 BOM, an optional header row (`path,label[,split]`; with a header, any column
    order and extra columns, which are ignored), blank lines; refuses escapes, absolute paths, duplicates and bad labels.
    """
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise LabelsError(f"{csv_path}: file not found; pass --labels PATH to an existing CSV") from None
    except UnicodeDecodeError as exc:
        raise LabelsError(f"{csv_path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    rows = list(csv.reader(io.StringIO(text)))
    entries: list[ImageEntry] = []
    seen: dict[str, int] = {}
    columns = {"path": 0, "label": 1, "split": 2}
    has_split = False
    start = 0
    first = next((i for i, r in enumerate(rows) if any(c.strip() for c in r)), None)
    header = [c.strip().lower() for c in rows[first]] if first is not None else []
    if any(h in ("path", "label", "split") for h in header):
        named = [h for h in header if h]
        if "path" not in header:
            raise LabelsError(f"{csv_path} line {first + 1}: header {rows[first]!r} has no 'path' column")
        if len(set(named)) != len(named):
            raise LabelsError(f"{csv_path} line {first + 1}: repeated column name in header {rows[first]!r}")
        columns = {name: header.index(name) for name in ("path", "label", "split") if name in header}
        has_split = "split" in columns
        start = first + 1  # type: ignore[operator]
    elif first is not None and _looks_like_header(rows[first]):
        raise LabelsError(f"{csv_path} line {first + 1}: header {rows[first]!r} is not recognised; name the columns "
                          "path,label (and optionally split), or remove the header line")
    for i in range(start, len(rows)):
        row = rows[i]
        where = f"{csv_path} line {i + 1}"
        if not any(c.strip() for c in row):
            continue
        if start == 0 and len(row) > 3:
            raise LabelsError(f"{where}: {len(row)} columns without a header; expected path,label[,split]")
        if start == 0 and len(row) == 3:
            has_split = True
        if columns["path"] >= len(row):
            raise LabelsError(f"{where}: {len(row)} column(s), no path in column {columns['path'] + 1}; fill in the row")
        path = _clean_path(row[columns["path"]], where)
        li = columns.get("label")
        label = _parse_label(row[li] if li is not None and li < len(row) else "", where)
        si = columns.get("split")
        split = row[si].strip() if si is not None and si < len(row) else ""
        if split and split not in SPLIT_NAMES:
            raise LabelsError(f"{where}: split {split!r} is not one of {', '.join(SPLIT_NAMES)} (or empty)")
        if path in seen:
            raise LabelsError(f"{where}: duplicate of line {seen[path]} ({path}); list each image once")
        seen[path] = i + 1
        entries.append(ImageEntry(path, label, split, line=i + 1))
    if not entries:
        raise LabelsError(f"{csv_path}: no image rows; expected lines of path,label")
    return entries, has_split


def _looks_like_header(row: Sequence[str]) -> bool:
    """True for a first row that names columns this reader does not know (``filename,target``): its
    label cell is a word, not a label, and its path cell does not name an image file."""
    if len(row) < 2:
        return False
    path, label = row[0].strip(), row[1].strip()
    return (label not in ("", "0", "1") and label.replace("_", "").isalpha()
            and not path.lower().endswith(IMAGE_SUFFIXES))


def write_labels_csv(
    path: str | os.PathLike[str], rows: Iterable[ImageEntry | tuple[str, int, str]]
) -> Path:
    """Write ``path,label,split`` rows atomically (label < 0: empty = unlabelled); returns ``path``.

    ``rows`` are ``ImageEntry`` objects or (path, label, split) tuples. Quoting is ``csv.writer``'s,
    so paths with commas, quotes or line breaks read back unchanged through ``parse_labels_csv``.
    A label other than 0, 1 or unlabelled, or an unknown split, is refused before anything is written.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("path", "label", "split"))
    for i, row in enumerate(rows):
        rel, label, split = (row.path, row.label, row.split) if isinstance(row, ImageEntry) else row
        label = int(label)
        if label > 1:
            raise LabelsError(f"{path}: row {i + 1} ({rel}) has label {label}; labels are 0, 1 or < 0 (unlabelled)")
        if split and split not in SPLIT_NAMES:
            raise LabelsError(f"{path}: row {i + 1} ({rel}) has split {split!r}, not one of {', '.join(SPLIT_NAMES)}")
        writer.writerow((rel, "" if label < 0 else label, split or ""))
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def list_images(images_dir: str | os.PathLike[str]) -> list[ImageEntry]:
    """Every image file under ``images_dir`` (sorted, unlabelled), for `extract` without --labels."""
    return scan_images(images_dir)[0]


def scan_images(images_dir: str | os.PathLike[str]) -> tuple[list[ImageEntry], list[str]]:
    """(every image file under ``images_dir``, sorted and unlabelled; every other file, sorted).

    The second list names what the scan skipped (files whose suffix is not one of ``IMAGE_SUFFIXES``,
    e.g. a ``.heic``) so the caller can report it instead of dropping it silently.
    """
    root = Path(images_dir)
    found, skipped = [], []
    for p in root.rglob("*"):
        if p.is_dir():
            continue
        rel = p.relative_to(root).as_posix()
        (found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES else skipped).append(rel)
    found.sort()
    skipped.sort()
    if not found:
        extra = f" ({len(skipped)} other files, e.g. {', '.join(skipped[:3])})" if skipped else ""
        raise LabelsError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}){extra}; check --images")
    entries = [ImageEntry(p, -1) for p in found]
    confine_entries(root, entries, f"{root} (no --labels: every image under it)")
    return entries, skipped


def describe_skipped(skipped: Sequence[str], where: str, examples: int = 5,
                     hint: str = "or list them with --labels to include them") -> str:
    """One line naming how many files a folder scan skipped, and a few of them (``hint`` ends it)."""
    shown = ", ".join(repr(s) for s in skipped[:examples])
    more = f" and {len(skipped) - examples} more" if len(skipped) > examples else ""
    return (f"{where}: skipped {len(skipped)} file(s) that are not {'/'.join(IMAGE_SUFFIXES)} by name: {shown}{more}; "
            f"rename them (e.g. a .heic holding JPEG bytes to .jpg) {hint}".rstrip())


def confine_entries(images_dir: str | os.PathLike[str], entries: Sequence[ImageEntry], source: str) -> None:
    """Refuse any entry whose real path (symlinks resolved) lies outside the real ``images_dir``.

    ``source`` names where the list came from (the CSV, or the folder scan) for the message. Entries
    that do not exist are left to extraction (quarantined as missing).
    """
    root = os.path.realpath(images_dir)
    prefix = root.rstrip(os.sep) + os.sep
    for e in entries:
        real = os.path.realpath(os.path.join(root, e.path))
        if real != root and not real.startswith(prefix):
            raise LabelsError(
                f"{source}: row {e.path!r} resolves (through a symlink) to {real}, outside the --images folder "
                f"{root}; copy the image into --images or remove the row"
            )


def image_list_sha256(entries: Sequence[ImageEntry]) -> str:
    """Hash of the ordered list (path, label, split): a resume must see exactly the same list."""
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.path}\t{e.label}\t{e.split}\n".encode("utf-8"))
    return h.hexdigest()
