"""sweep --storage: a bad URL, an unknown database kind, a missing driver or a database that cannot be
opened is one line naming --storage (its password never shown), before any trial runs. A missing
driver: tests/workflows/test_sweep_postgres.py (hides the installed drivers)."""
from __future__ import annotations

from pathlib import Path

import pytest

from stage1._core.errors import ConfigError, EnvironmentProblem
from stage1.workflows.sweep.storage import make_storage


@pytest.mark.parametrize("url, error, needle", [
    ("nonsense", ConfigError, "not a database URL"),
    ("", ConfigError, "not a database URL"),
    ("foo://bar", ConfigError, "unknown database kind 'foo'"),
    ("sqlite://", ConfigError, "names no database file"),
])
def test_bad_storage_urls_are_usage_errors(url: str, error: type, needle: str) -> None:
    with pytest.raises(error) as exc:
        make_storage(url)
    assert needle in str(exc.value) and str(exc.value).startswith("--storage ") and "\n" not in str(exc.value)


@pytest.mark.parametrize("make", [lambda t: t / "st" / "not-a-db.json", lambda t: t / "file" / "sub" / "x.db"])
def test_a_database_file_that_cannot_be_opened(tmp_path: Path, make) -> None:
    path = make(tmp_path)
    if path.name == "not-a-db.json":
        path.parent.mkdir()
        path.write_text('{"not": "sqlite"}' * 100)
    else:
        (tmp_path / "file").write_text("a file where a folder should be")
    with pytest.raises(EnvironmentProblem, match=r"^--storage sqlite:///.*: cannot open the database \("):
        make_storage(f"sqlite:///{path}")


def test_the_sweep_command_says_it_in_one_line(tmp_path: Path) -> None:
    import numpy as np
    from click.testing import CliRunner

    from stage1 import cli
    from stage1.featstore.splits import write_splits
    from stage1.featstore.store import write_store

    rng = np.random.default_rng(0)
    write_store(tmp_path / "st", rng.normal(size=(60, 1, 4)).astype(np.float32), rng.integers(0, 2, 60)).close()
    write_splits(tmp_path / "st")
    for url, code in (("nonsense", 2), (f"sqlite:///{tmp_path / 'st' / 'zarr.json'}", 1)):
        res = CliRunner().invoke(cli.main, ["sweep", str(tmp_path / "st"), "--study", "s", "--storage", url,
                                            "--trials", "1"])
        assert res.exit_code == code and "--storage" in res.output and "Traceback" not in res.output, res.output
        assert isinstance(res.exception, SystemExit)


def test_a_good_url_still_works(tmp_path: Path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 'ok.db'}")
    assert storage is not None and (tmp_path / "ok.db").exists()
