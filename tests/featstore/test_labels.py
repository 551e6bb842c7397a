"""Labels CSV: BOM, optional header, escapes, absolute paths, duplicates, bad labels, split column; the writer."""
from __future__ import annotations

from pathlib import Path

import pytest

from stage1.featstore.labels import (
    ImageEntry, LabelsError, image_list_sha256, list_images, parse_labels_csv, write_labels_csv,
)


def write(tmp_path: Path, text: str, name: str = "labels.csv", encoding: str = "utf-8") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


def test_header_optional_and_bom(tmp_path: Path) -> None:
    with_header, has_split = parse_labels_csv(write(tmp_path, "path,label\na.jpg,0\nsub/b c.png,1\nd.jpg,\n"))
    without, _ = parse_labels_csv(write(tmp_path, "a.jpg,0\nsub/b c.png,1\n\nd.jpg,\n", "b.csv"))
    bom, _ = parse_labels_csv(write(tmp_path, "\ufeffpath,label\r\na.jpg,0\r\nsub/b c.png,1\r\nd.jpg,\r\n", "c.csv"))
    expected = [ImageEntry("a.jpg", 0), ImageEntry("sub/b c.png", 1), ImageEntry("d.jpg", -1)]
    assert with_header == without == bom == expected and not has_split
    only_paths, _ = parse_labels_csv(write(tmp_path, "path\nx.jpg\n./y.jpg\n", "d.csv"))
    assert only_paths == [ImageEntry("x.jpg", -1), ImageEntry("y.jpg", -1)]


def test_header_columns_in_any_order_with_split(tmp_path: Path) -> None:
    entries, has_split = parse_labels_csv(write(tmp_path, "label,notes,path,split\n1,hi,a.jpg,test\n0,,b.jpg,\n"))
    assert has_split and entries == [ImageEntry("a.jpg", 1, "test"), ImageEntry("b.jpg", 0, "")]
    entries, has_split = parse_labels_csv(write(tmp_path, "a.jpg,1,val_calib\n", "n.csv"))
    assert has_split and entries == [ImageEntry("a.jpg", 1, "val_calib")]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("path,label\na.jpg,0\n../up.jpg,1\n", 3, "escapes --images"),
        ("path,label\nsub/../../up.jpg,1\n", 2, "escapes --images"),
        ("a.jpg,0\n/etc/passwd,1\n", 2, "absolute path"),
        ("a.jpg,0\nC:\\img.jpg,1\n", 2, "absolute path"),
        ("path,label\na.jpg,0\nb.jpg,1\n./a.jpg,1\n", 4, "duplicate of line 2"),
        ("path,label\na.jpg,2\n", 2, "label '2' is not 0, 1 or empty"),
        ("path,label\na.jpg,0\nb.jpg,yes\n", 3, "label 'yes'"),
        ("path,label\na.jpg,0.5\n", 2, "label '0.5'"),
        ("path,label,split\na.jpg,0,validation\n", 2, "split 'validation' is not one of"),
        ("a.jpg,0,train,extra\n", 1, "4 columns without a header"),
        ("path,label\n,1\n", 2, "empty path"),
        ("file,label\na.jpg,0\n", 1, "has no 'path' column"),
        ("label,path\n1,a.jpg\n0\n", 3, "no path in column 2"),
    ],
)
def test_bad_rows_are_refused_naming_the_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    csv = write(tmp_path, text)
    with pytest.raises(LabelsError) as err:
        parse_labels_csv(csv)
    msg = str(err.value)
    assert f"{csv} line {line}:" in msg and fragment in msg


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match="file not found"):
        parse_labels_csv(tmp_path / "nope.csv")
    with pytest.raises(LabelsError, match="not UTF-8"):
        parse_labels_csv(write(tmp_path, "caf\xe9.jpg,1\n", encoding="latin-1"))
    with pytest.raises(LabelsError, match="no image rows"):
        parse_labels_csv(write(tmp_path, "path,label\n\n", "e.csv"))


def test_list_images_and_list_hash(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    for name in ("b.JPG", "a.png", "s/c.webp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [e.path for e in list_images(tmp_path)] == ["a.png", "b.JPG", "s/c.webp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(LabelsError, match="no image files"):
        list_images(tmp_path / "empty")
    a = [ImageEntry("a.jpg", 0), ImageEntry("b.jpg", 1)]
    assert image_list_sha256(a) == image_list_sha256(list(a))
    assert image_list_sha256(a) != image_list_sha256([ImageEntry("a.jpg", 1), ImageEntry("b.jpg", 1)])
    assert image_list_sha256(a) != image_list_sha256(a[::-1])


def test_write_labels_csv_round_trips_through_the_reader(tmp_path: Path) -> None:
    """Commas, quotes, spaces, non-ASCII and line breaks in paths survive; tuples and entries both work."""
    rows = [
        ("images/cone (1).jpg", 1, ""),
        ("a,b/c.jpg", 0, "train"),
        ('say "hi".png', -1, "test"),
        ('both, "x".jpg', 1, "val_calib"),
        ("caf\u00e9/\u56fe.png", 0, "val_select"),
        ("line\nbreak.jpg", 1, ""),
    ]
    out = write_labels_csv(tmp_path / "sub" / "labels.csv", rows)
    assert out == tmp_path / "sub" / "labels.csv"
    assert out.read_text(encoding="utf-8").splitlines()[:2] == ["path,label,split", "images/cone (1).jpg,1,"]
    entries, has_split = parse_labels_csv(out)
    assert has_split and entries == [ImageEntry(p, lab, split) for p, lab, split in rows]
    # what the reader returns goes back through the writer unchanged
    again = write_labels_csv(tmp_path / "again.csv", entries)
    assert parse_labels_csv(again)[0] == entries and again.read_bytes() == out.read_bytes()
    assert not list(tmp_path.rglob("*.partial"))  # written atomically: no temp file left


def test_write_labels_csv_refuses_what_the_reader_would(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match="label 2"):
        write_labels_csv(tmp_path / "l.csv", [("a.jpg", 0, ""), ("b.jpg", 2, "")])
    with pytest.raises(LabelsError, match="split 'validation'"):
        write_labels_csv(tmp_path / "l.csv", [("a.jpg", 0, "validation")])
    assert not (tmp_path / "l.csv").exists()
