"""Search spaces that parse but would fail every trial are refused with one line before the first trial."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stage1 import cli
from stage1.workflows.space import SearchSpace, SpaceError

BAD_SPACES = [
    ("[head.mlp]\nlr = { low = 1e-4, high = 1e-2, log = true, step = 1e-3 }\n", "log = true and a step cannot be combined"),
    ("[head.mlp]\nhidden = { low = 1, high = 8, step = 2, log = true }\n", "log = true and a step cannot be combined"),
    ("[head.mlp]\nepochs = { low = 1, high = 3, step = 0 }\n", "step must be a number > 0, not 0"),
    ("[head.mlp]\nepochs = { low = 1, high = 3, step = -1 }\n", "step must be a number > 0, not -1"),
    ("[head.mlp]\nlr = { low = 1e-4, high = 1e-2, step = 'x' }\n", "step must be a number > 0, not 'x'"),
    ("[head.mlp]\nlr = { low = 1e-4, high = 1e-2, log = 'yes' }\n", "log must be true or false"),
    ("[head.mlp]\nlr = { low = 'a', high = 1 }\n", "low and high must be numbers"),
    ("[head.mlp]\ndropout = { low = false, high = true }\n", "low and high must be numbers"),
    ("[head.mlp]\nepochs = { low = 1.0, high = 3.0 }\n", "an int parameter needs int low, high and step"),
    ("[objective]\nalpha = 'x'\n[head.mlp]\n", "alpha must be a number in (0, 1), not 'x'"),
    ("[objective]\nrisk = ['fnr_exit']\n[head.mlp]\n", "[objective] risk"),
    ("objective = 1\n[head.mlp]\n", "objective must be a table"),
]


def _load(tmp_path: Path, text: str) -> SearchSpace:
    p = tmp_path / "s.toml"
    p.write_text(text if "[policy." in text else text + "[policy.threshold]\n")
    return SearchSpace.load(p)


@pytest.mark.parametrize("text, needle", BAD_SPACES)
def test_invalid_ranges_and_objectives_are_refused(tmp_path: Path, text: str, needle: str) -> None:
    from stage1.heads import HEADS
    from stage1.policies import POLICIES

    with pytest.raises(SpaceError) as exc:
        _load(tmp_path, text).check_names(HEADS.names(), POLICIES.names())
    assert needle in str(exc.value) and "s.toml" in str(exc.value) and "\n" not in str(exc.value)


def test_a_combination_the_part_refuses_is_caught_at_a_range_end(tmp_path: Path) -> None:
    """ltt with risk selective_error refuses eps: check_bounds (fixed values and choices only) let it pass."""
    from stage1.heads import HEADS
    from stage1.policies import POLICIES

    space = _load(tmp_path, "[objective]\nrisk = 'selective_error'\n[head.mlp]\nepochs = 1\n"
                            "[policy.ltt]\nrisk = 'selective_error'\neps = { low = 0.01, high = 0.1 }\n")
    space.check_params()
    space.check_bounds()
    with pytest.raises(SpaceError, match=r"\[policy.ltt\]: every trial drawing .*eps=0.01.* would fail: eps bounds"):
        space.check_names(HEADS.names(), POLICIES.names())


def test_valid_spaces_pass_the_sampling_check(tmp_path: Path) -> None:
    from stage1.heads import HEADS
    from stage1.policies import POLICIES
    from stage1.workflows.space import shipped_spaces, studies_dir

    for name in shipped_spaces():
        SearchSpace.load(studies_dir() / f"{name}.toml").check_sampling()
    space = _load(tmp_path, "[head.mlp]\nepochs = { low = 1, high = 9, step = 2 }\nhidden = { low = 4, high = 64, log = true }\n"
                            "lr = { low = 1e-4, high = 1e-2, step = 1e-4 }\n")
    space.check_names(HEADS.names(), POLICIES.names())


def _store(path: Path) -> Path:
    from stage1.featstore.splits import write_splits
    from stage1.featstore.store import write_store

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    x = rng.normal(size=(120, 1, 4)).astype(np.float32)
    x[:, 0, 0] += 2 * y
    write_store(path, x, y).close()
    write_splits(path, seed=0)
    return path


@pytest.mark.parametrize("text, needle", BAD_SPACES[:3])
def test_sweep_refuses_before_the_first_trial(tmp_path: Path, text: str, needle: str) -> None:
    import sqlite3

    store = _store(tmp_path / "st")
    space = tmp_path / "s.toml"
    space.write_text(text + "[policy.threshold]\n")
    db = tmp_path / "x.db"
    res = CliRunner().invoke(cli.main, ["sweep", str(store), "--study", "s", "--space", str(space),
                                        "--storage", f"sqlite:///{db}", "--trials", "2"])
    assert res.exit_code == 1 and needle in res.output and "Traceback" not in res.output, res.output
    assert isinstance(res.exception, SystemExit)
    if db.exists():  # refused before any trial: no trial was recorded
        con = sqlite3.connect(db)
        try:
            assert con.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'trials'").fetchone()[0] == 0 or \
                con.execute("SELECT COUNT(*) FROM trials").fetchone()[0] == 0
        finally:
            con.close()
