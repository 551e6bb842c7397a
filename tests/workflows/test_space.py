"""workflows.space: the [train] table (train on every cached view, or view 0 only) and its use in a trial."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stage1.workflows.space import SearchSpace, SpaceError

BASE = "[head.mlp]\nepochs = 1\nhidden = 8\n[policy.threshold]\n"


def _space(tmp_path: Path, text: str) -> SearchSpace:
    p = tmp_path / "s.toml"
    p.write_text(text)
    return SearchSpace.load(p)


def test_train_views_default_fixed_and_searched(tmp_path: Path) -> None:
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sp = _space(tmp_path, BASE)
    trial = study.ask()
    assert sp.suggest_train(trial) == {"views": True} and "train.views" not in trial.params
    assert sp.resolve_train({}) == {"views": True}
    sp = _space(tmp_path, "[train]\nviews = false\n" + BASE)
    assert sp.suggest_train(study.ask()) == {"views": False}
    sp = _space(tmp_path, "[train]\nviews = { choices = [true, false] }\n" + BASE)
    seen = set()
    for _ in range(12):
        trial = study.ask()
        got = sp.suggest_train(trial)
        assert sp.resolve_train(trial.params) == got
        seen.add(got["views"])
        study.tell(trial, 0.0)
    assert seen == {True, False}


@pytest.mark.parametrize("text, needle", [
    ("[train]\nview = true\n", "unknown key(s) view"),
    ("[train]\nviews = 'yes'\n", "must be true or false"),
    ("[train]\nviews = { choices = [true, 2] }\n", "must be true or false"),
    ("[train]\nviews = { low = 0, high = 1 }\n", "use a value or choices"),
    ("[train]\nviews = { choices = [] }\n", "non-empty list"),
])
def test_bad_train_tables_are_refused(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(SpaceError, match=None) as err:
        _space(tmp_path, text + BASE)
    assert needle in str(err.value)


def test_fit_trial_trains_on_view0_only_when_asked(monkeypatch) -> None:
    from stage1.heads import HEADS
    from stage1.workflows.sweep.data import SweepData
    from stage1.workflows.sweep.objective import fit_trial

    rng = np.random.default_rng(0)
    x = {"train": rng.normal(size=(60, 3, 4)).astype(np.float32),
         "val_select": rng.normal(size=(20, 4)).astype(np.float32),
         "val_calib": rng.normal(size=(20, 4)).astype(np.float32)}
    y = {s: (np.arange(len(v)) % 2).astype(np.int64) for s, v in x.items()}
    data = SweepData(x=x, y=y, rows={s: np.arange(len(v)) for s, v in x.items()}, store_path="-", fingerprint="-")
    shapes = []
    cls = HEADS.get("mlp")
    orig = cls.fit

    def spy(self, X, *a, **k):
        shapes.append(np.asarray(X).shape)
        return orig(self, X, *a, **k)

    monkeypatch.setattr(cls, "fit", spy)
    for views in (True, False):
        fit_trial(data, "mlp", {"epochs": 1, "hidden": 8}, "threshold", {}, seed=0, train_views=views)
    assert shapes == [(60, 3, 4), (60, 1, 4)]
