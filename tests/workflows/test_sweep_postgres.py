"""sweep on a real PostgreSQL server (``postgresql://`` storage): 1 and 2 workers, resume, and the same
figures as SQLite for the same seeds.

The server: ``STAGE1_TEST_POSTGRES_URL`` (``.ci/run`` starts one with ``.ci/postgres.sh`` and sets it),
else ``postgresql://postgres@127.0.0.1:5432/postgres`` if one answers there. No server: skipped, with
the reason, except in CI (``CI`` set), where that is a failure.

What can be equal: with 1 worker, trial by trial (number, params, values, constraint): the sampler is
seeded and the objective is a function of the params and --seed only. With 2 workers, which worker
takes which trial number depends on timing, and past TPE's random start-up trials (10) each worker
samples from whatever the other has finished by then; within the start-up trials each worker's draws
come from its own seeded sampler, so the *set* of (params, values) is the same on both storages while
the trial numbers are not. These tests stay within the start-up trials.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from stage1 import cli

from .test_sweep import TINY_SPACE, _store

ENV = "STAGE1_TEST_POSTGRES_URL"
LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _reachable(url: str) -> str | None:
    """None when ``url``'s server accepts a connection within 3 s, else the first line of why not."""
    try:
        import sqlalchemy as sa

        from stage1.workflows.sweep.storage import with_installed_driver

        engine = sa.create_engine(with_installed_driver(url), connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as con:
                con.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means: no server to test against
        return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
    return None


@pytest.fixture(scope="module")
def pg_url() -> str:
    url = os.environ.get(ENV)
    why = _reachable(url or LOCAL)
    if why is None:
        return url or LOCAL
    reason = (f"{ENV}={url} is not reachable ({why})" if url else
              f"no PostgreSQL server: {ENV} is unset and {LOCAL} does not answer ({why}); "
              "start one with `.ci/postgres.sh start` and export its URL as " + ENV)
    if url or os.environ.get("CI"):
        pytest.fail(reason + ("; CI must run the PostgreSQL tests" if os.environ.get("CI") else ""))
    pytest.skip(reason)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _store(tmp_path_factory.mktemp("pgsweep") / "store")


@pytest.fixture(scope="module")
def space_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("pgspace") / "tiny.toml"
    p.write_text(TINY_SPACE)
    return p


@pytest.fixture
def study(pg_url: str):
    """A fresh study name on the server (the database may outlive the test), deleted afterwards."""
    import optuna

    from stage1.workflows.sweep import make_storage

    name = f"stage1-test-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        optuna.delete_study(study_name=name, storage=make_storage(pg_url))
    except KeyError:
        pass


def _sweep(store: Path, space: Path, storage: str, name: str, trials: int, workers: int) -> dict:
    res = CliRunner().invoke(cli.main, ["sweep", str(store), "--study", name, "--storage", storage, "--space",
                                        str(space), "--trials", str(trials), "--workers", str(workers),
                                        "--seed", "1", "--threads", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _figures(storage: str, name: str) -> list[tuple[int, str, str, tuple[float, ...], str]]:
    """(number, state, params, values, constraints) of every trial, in trial-number order."""
    import optuna

    from stage1.workflows.sweep import make_storage, trial_constraints

    return [(t.number, t.state.name, json.dumps(t.params, sort_keys=True), tuple(t.values or ()),
             json.dumps(trial_constraints(t), sort_keys=True))
            for t in optuna.load_study(study_name=name, storage=make_storage(storage)).trials]


def test_one_worker_on_postgres_gives_sqlite_s_figures_and_resumes(pg_url: str, study: str, store: Path,
                                                                   space_file: Path, tmp_path: Path) -> None:
    sqlite = f"sqlite:///{tmp_path / 'ref.db'}"
    for trials, before in ((3, 0), (2, 3)):  # a first run, then a resume in a second call
        pg = _sweep(store, space_file, pg_url, study, trials, 1)
        ref = _sweep(store, space_file, sqlite, study, trials, 1)
        assert (pg["n_before"], pg["n_after"]) == (before, before + trials) == (ref["n_before"], ref["n_after"])
        assert pg["states"] == ref["states"] == {"COMPLETE": before + trials}
    got, want = _figures(pg_url, study), _figures(sqlite, study)
    assert [g[:3] + g[4:] for g in got] == [w[:3] + w[4:] for w in want]
    for g, w in zip(got, want):  # float8 columns: the values come back as the objective returned them
        assert g[3] == pytest.approx(w[3], rel=1e-12, abs=1e-15)
    assert len({g[2] for g in got}) == 5  # the resume drew new params (its sampler seed differs)


def test_two_workers_on_postgres_give_sqlite_s_figures_as_a_set_and_resume(pg_url: str, study: str, store: Path,
                                                                         space_file: Path, tmp_path: Path) -> None:
    sqlite = f"sqlite:///{tmp_path / 'ref2.db'}"
    # 2 workers, then a resume with 1 (in process: spawning workers is the slow part of this test)
    for trials, workers, before in ((4, 2, 0), (1, 1, 4)):
        pg = _sweep(store, space_file, pg_url, study, trials, workers)
        ref = _sweep(store, space_file, sqlite, study, trials, workers)
        assert pg["worker_exit_codes"] == ref["worker_exit_codes"] == [0] * workers
        assert (pg["n_before"], pg["n_after"]) == (before, before + trials) == (ref["n_before"], ref["n_after"])
        assert pg["states"] == ref["states"] == {"COMPLETE": before + trials}
    got, want = _figures(pg_url, study), _figures(sqlite, study)
    assert [g[0] for g in got] == list(range(5))
    key = lambda f: f[2]  # noqa: E731 - which worker took which trial number is timing; the params are not
    for g, w in zip(sorted(got[:4], key=key) + got[4:], sorted(want[:4], key=key) + want[4:]):
        assert (g[1], g[2], g[4]) == (w[1], w[2], w[4])
        assert g[3] == pytest.approx(w[3], rel=1e-12, abs=1e-15)
    assert len({g[2] for g in got}) == 5


def test_a_bare_postgresql_url_uses_whichever_driver_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLAlchemy 2.1 defaults postgresql:// to psycopg 3, 2.0 to psycopg2: either one installed serves
    (so the dev extra's psycopg2-binary works with both); none installed is one line naming the driver."""
    import builtins
    import importlib.util

    from sqlalchemy.engine import make_url

    from stage1._core.errors import EnvironmentProblem
    from stage1.workflows.sweep import storage as storage_mod

    url = "postgresql://bob:s3cr3t@127.0.0.1:1/db"
    default = make_url(url).get_dialect().driver  # this SQLAlchemy's own choice
    real_import, real_find = builtins.__import__, importlib.util.find_spec
    for installed in (("psycopg2",), ("psycopg",), ()):
        def gone(name: str) -> bool:
            return name.split(".")[0] in ("psycopg", "psycopg2") and name.split(".")[0] not in installed

        def fake_import(name, *args, **kwargs):
            if gone(name):
                raise ImportError(f"No module named {name!r}")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", fake_import)
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if gone(n) else real_find(n, *a))
        got = storage_mod.with_installed_driver(url)
        if not installed:
            assert got == url
            with pytest.raises(EnvironmentProblem) as exc:
                storage_mod.check_storage_url(got)
            assert "driver is not installed" in str(exc.value) and "s3cr3t" not in str(exc.value)
        elif installed[0] == default:
            assert got == url
        else:
            assert got == f"postgresql+{installed[0]}://bob:s3cr3t@127.0.0.1:1/db"
            storage_mod.check_storage_url(got)  # importable now: no error
        monkeypatch.undo()
