"""Declared parameters (``PARAMS``), one contract over every registered head, calibrator and policy:
defaults round-trip through ``params()`` / ``get_params()``, out-of-range values are ConfigErrors
naming the parameter and its valid range, and a sweep's TOML space may only name declared
parameters within their range. New parts are picked up from the registries automatically."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest
from click.testing import CliRunner

from stage1._core.errors import ConfigError
from stage1._core.params import Param, Params
from stage1.heads import HEADS
from stage1.policies import CALIBRATORS, POLICIES
from stage1.workflows.space import SearchSpace, SpaceError

REGISTRIES = {"head": HEADS, "calibrator": CALIBRATORS, "policy": POLICIES}
PARTS = [(kind, name) for kind, reg in REGISTRIES.items() for name in reg.names()]
PARAMS = [(kind, name, p.name) for kind, name in PARTS for p in REGISTRIES[kind].get(name).PARAMS]
SPACE_PARTS = [(kind, name) for kind, name in PARTS if kind in ("head", "policy")]


def _ids(case: tuple) -> str:
    return ":".join(map(str, case))


def declared(kind: str, name: str) -> Params:
    return REGISTRIES[kind].get(name).PARAMS


def create(kind: str, name: str, **params: Any) -> Any:
    return REGISTRIES[kind].create(name, **params)


def current(part: Any) -> dict[str, Any]:
    return part.get_params() if hasattr(part, "get_params") else part.params()


def invalid_value(p: Param) -> Any:
    """A value the declaration refuses: outside the choices or the range, else of the wrong type."""
    if p.choices is not None:
        return "__not_a_choice__"
    if p.low is not None:
        return p.low if p.low_open else p.low - 1
    if p.high is not None:
        return p.high if p.high_open else p.high + 1
    return {bool: "maybe", int: "many", float: "lots", str: 12345, dict: 5}.get(p.type, "not-a-list")


def test_every_registry_has_parts():
    assert len(HEADS.names()) >= 4 and len(CALIBRATORS.names()) >= 7 and len(POLICIES.names()) >= 4


@pytest.mark.parametrize("kind,name", PARTS, ids=map(_ids, PARTS))
def test_defaults_round_trip(kind, name):
    decl = declared(kind, name)
    part = create(kind, name)
    assert current(part) == decl.defaults()
    again = create(kind, name, **current(part))
    assert current(again) == current(part)
    if kind == "head":
        assert type(part).default_hparams() == decl.defaults()


@pytest.mark.parametrize("kind,name", PARTS, ids=map(_ids, PARTS))
def test_every_parameter_is_documented_and_its_default_is_valid(kind, name):
    for p in declared(kind, name):
        assert p.help.strip(), f"{kind} {name}: {p.name} has no help"
        assert p.validate(p.default, "test") == p.default


@pytest.mark.parametrize("kind,name,param", PARAMS, ids=map(_ids, PARAMS))
def test_invalid_value_is_a_config_error_naming_the_parameter(kind, name, param):
    p = declared(kind, name)[param]
    bad = invalid_value(p)
    with pytest.raises(ConfigError) as exc:
        create(kind, name, **{param: bad})
    msg = str(exc.value)
    assert param in msg and name in msg and "\n" not in msg
    if p.choices is not None:
        assert all(str(c) in msg for c in p.valid_choices())
    else:
        assert p.describe() in msg


@pytest.mark.parametrize("kind,name", PARTS, ids=map(_ids, PARTS))
def test_unknown_parameter_is_refused(kind, name):
    with pytest.raises(ConfigError, match="not_a_param"):
        create(kind, name, not_a_param=1)


def _space(kind: str, name: str, table: dict[str, Any]) -> SearchSpace:
    data = {"head": {"mlp": {}}, "policy": {"threshold": {}}}
    data[kind] = {name: table}
    return SearchSpace.from_dict(data, source="space.toml")


@pytest.mark.parametrize("kind,name", SPACE_PARTS, ids=map(_ids, SPACE_PARTS))
def test_toml_space_refuses_an_unknown_parameter(kind, name):
    sp = _space(kind, name, {"not_a_param": 1})
    with pytest.raises(SpaceError, match="not_a_param") as exc:
        sp.check_names(HEADS.names(), POLICIES.names())
    assert "space.toml" in str(exc.value) and f"{kind}.{name}" in str(exc.value)


@pytest.mark.parametrize("kind,name", SPACE_PARTS, ids=map(_ids, SPACE_PARTS))
def test_toml_space_checks_values_and_ranges(kind, name):
    decl = declared(kind, name)
    fixed = {p.name: p.default for p in decl if p.default is not None and p.type is not dict}
    _space(kind, name, fixed).check_params()  # the defaults are fine (the risk match is check_bounds')
    for p in decl:
        if not p.has_range:
            continue
        bad = invalid_value(p)
        spec = {"choices": [p.default, bad]} if p.choices is not None else {"low": bad, "high": p.default}
        if p.choices is None and p.type is float:
            spec = {"low": float(bad), "high": float(p.high if p.high is not None else bad + 10)}
        with pytest.raises(SpaceError, match=p.name):
            _space(kind, name, {p.name: spec}).check_params()


def test_shipped_spaces_pass_the_parameter_check():
    from stage1.workflows.space import shipped_spaces, studies_dir

    for space in shipped_spaces():
        SearchSpace.load(studies_dir() / f"{space}.toml").check_names(HEADS.names(), POLICIES.names())


def test_trainer_settings_are_all_declared():
    from stage1.heads.base import COMMON_PARAMS
    from stage1.heads.trainer import TrainConfig

    for f in fields(TrainConfig):
        p = COMMON_PARAMS[f.name]
        assert p.default == f.default and p.help, f.name


def test_cli_help_and_choices_come_from_the_declarations():
    from stage1 import cli
    from stage1.policies.risks import RISKS

    runner = CliRunner()
    out = runner.invoke(cli.main, ["calibrate", "--help"]).output
    for risk in RISKS.names():
        assert risk in out
    for cal in CALIBRATORS.names():
        assert cal in out
    assert "in (0, 1)" in out  # alpha / delta ranges
    out = runner.invoke(cli.main, ["train", "--help"]).output
    assert "Maximum epochs; >= 1" in out and "augrc|aurc|coverage_at_risk" in out
    res = runner.invoke(cli.main, ["calibrate", ".", "--policy", "ltt", "--risk", "auc"])
    assert res.exit_code == 2 and "auc" in res.output
