"""Search spaces for ``sweep``: head x policy x hyperparameters, written as TOML.

A space file has an optional ``[objective]`` table (the risk the constraint checks and its
target) and one table per head (``[head.NAME]``) and per policy (``[policy.NAME]``). Inside those,
a plain value is fixed; a table is a distribution::

    lr = { low = 1e-4, high = 3e-3, log = true }   # float (int when low, high are integers)
    epochs = { low = 5, high = 20, step = 5 }        # int with a step
    hidden = { choices = [128, 256] }                # categorical

Optuna parameter names are ``head`` / ``policy`` (which part) and ``NAME.param`` (its settings),
so every head keeps its own distributions and a trial can be rebuilt from its params alone.

An optional ``[train]`` table sets how heads train: ``views = true`` (every cached view, the
default), ``false`` (view 0 only) or ``{ choices = [true, false] }`` (searched; Optuna name
``train.views``).

``check_names`` (run before a sweep starts) refuses parts that are not registered and parameters a
part does not declare, and checks every fixed value, choice and range end against the part's
declaration (``PARAMS``: type and range); ``check_sampling`` then builds every range as Optuna will
and every part at its ranges' ends, so a space that parses but would fail every trial is refused
with one line before the first trial. The objective's risk is any registered risk
(``stage1.policies.risks.RISKS``); its constraint is measured_risk - alpha <= 0.
"""
from __future__ import annotations

import os
import tomllib
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from stage1._core.errors import ConfigError, DataError, MissingError
from stage1._core.params import Params


class SpaceError(DataError):
    """A search-space file that cannot be used (bad table, distribution, part or parameter)."""


class SpaceNotFoundError(MissingError):
    """``--space`` names neither a file nor a shipped space (a usage error: fix the option)."""

    usage = True


DEFAULT_OBJECTIVE: dict[str, Any] = {"risk": "fnr_exit", "alpha": 0.02, "coverage_split": "val_select"}
#: keys of the ``[train]`` table and their defaults (each a bool: fixed, or ``{ choices = [...] }``).
TRAIN_DEFAULTS: dict[str, bool] = {"views": True}


def studies_dir() -> Path:
    """Folder of the shipped search spaces (``workflows/studies``)."""
    return Path(str(resources.files("stage1.workflows") / "studies"))


def shipped_spaces() -> list[str]:
    """Names of the shipped search spaces (file stems)."""
    return sorted(p.stem for p in studies_dir().glob("*.toml"))


def resolve_space_path(space: str | os.PathLike[str] | None, study: str) -> Path:
    """The TOML file for ``--space`` (a path or a shipped name); default: the study's name, else ``default``."""
    if space is not None:
        path = Path(space)
        if path.is_file():
            return path
        shipped = studies_dir() / f"{space}.toml"
        if shipped.is_file():
            return shipped
        raise SpaceNotFoundError(
            f"--space {space}: no such file and no shipped space of that name "
            f"(shipped: {', '.join(shipped_spaces())})"
        )
    shipped = studies_dir() / f"{study}.toml"
    return shipped if shipped.is_file() else studies_dir() / "default.toml"


def _is_number(x: Any) -> bool:
    """True for an int or float that is not a bool (TOML's true is no range end)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_dist(where: str, spec: Any) -> None:
    """Refuse a malformed distribution table with a message naming it."""
    if not isinstance(spec, dict):
        return
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"]:
            raise SpaceError(f"{where}: choices must be a non-empty list")
        extra = set(spec) - {"choices"}
    else:
        if "low" not in spec or "high" not in spec:
            raise SpaceError(f"{where}: a distribution needs either choices = [...] or low and high")
        if not all(_is_number(spec[k]) for k in ("low", "high")):
            raise SpaceError(f"{where}: low and high must be numbers (got {spec['low']!r}, {spec['high']!r}); "
                             "use choices = [...] for other values")
        if not spec["low"] <= spec["high"]:
            raise SpaceError(f"{where}: low ({spec['low']}) must be <= high ({spec['high']})")
        if "log" in spec and not isinstance(spec["log"], bool):
            raise SpaceError(f"{where}: log must be true or false, not {spec['log']!r}")
        if spec.get("log") and spec["low"] <= 0:
            raise SpaceError(f"{where}: log = true needs low > 0")
        if "step" in spec:
            step = spec["step"]
            if not _is_number(step) or not step > 0:
                raise SpaceError(f"{where}: step must be a number > 0, not {step!r}")
            integer = all(isinstance(spec[k], int) for k in ("low", "high", "step"))
            if spec.get("log") and not (integer and step == 1):
                raise SpaceError(f"{where}: log = true and a step cannot be combined (Optuna samples a log range "
                                 "without a step; an int range only with step = 1): drop one of them")
        extra = set(spec) - {"low", "high", "log", "step"}
    if extra:
        raise SpaceError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")


@dataclass
class SearchSpace:
    """A parsed search space: parts to choose from, each with fixed values and distributions."""

    heads: dict[str, dict[str, Any]]
    policies: dict[str, dict[str, Any]]
    objective: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_OBJECTIVE))
    source: str = ""
    train: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "SearchSpace":
        """Validate and build a space from parsed TOML."""
        unknown = set(data) - {"objective", "head", "policy", "description", "train"}
        if unknown:
            raise SpaceError(f"{source}: unknown table(s) {', '.join(sorted(unknown))}; use [objective], [train], "
                             "[head.NAME], [policy.NAME]")
        train = _check_train(data.get("train") or {}, source)
        heads = data.get("head") or {}
        policies = data.get("policy") or {}
        if not heads or not policies:
            raise SpaceError(f"{source}: needs at least one [head.NAME] and one [policy.NAME] table")
        for kind, parts in (("head", heads), ("policy", policies)):
            for name, params in parts.items():
                if not isinstance(params, dict):
                    raise SpaceError(f"{source}: [{kind}.{name}] must be a table")
                for key, spec in params.items():
                    _check_dist(f"{source}: {kind}.{name}.{key}", spec)
        if not isinstance(data.get("objective") or {}, dict):
            raise SpaceError(f"{source}: objective must be a table ([objective] with risk, alpha, coverage_split)")
        objective = {**DEFAULT_OBJECTIVE, **(data.get("objective") or {})}
        bad = set(objective) - set(DEFAULT_OBJECTIVE)
        if bad:
            raise SpaceError(f"{source}: [objective] unknown key(s) {', '.join(sorted(bad))}")
        from stage1.policies.risks import RISKS

        if not isinstance(objective["risk"], str) or objective["risk"] not in RISKS:
            raise SpaceError(f"{source}: [objective] risk {objective['risk']!r}; choose one of {', '.join(RISKS.names())}")
        if not _is_number(objective["alpha"]) or not 0.0 < float(objective["alpha"]) < 1.0:
            raise SpaceError(f"{source}: [objective] alpha must be a number in (0, 1), not {objective['alpha']!r}")
        if not isinstance(objective["coverage_split"], str) or objective["coverage_split"] not in ("val_select", "val_calib"):
            raise SpaceError(f"{source}: [objective] coverage_split must be val_select or val_calib (never test)")
        return cls(heads=heads, policies=policies, objective=objective, source=source, train=train)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SearchSpace":
        """Parse a TOML space file (errors name the file)."""
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise SpaceError(f"{path}: not valid TOML ({exc})") from None
        return cls.from_dict(data, source=str(path))

    def check_names(self, head_names: list[str], policy_names: list[str]) -> None:
        """Refuse parts that are not registered (names listed so the fix is obvious), then check
        every part's parameters against its declaration (``check_params``)."""
        for kind, parts, valid in (("head", self.heads, head_names), ("policy", self.policies, policy_names)):
            bad = sorted(set(parts) - set(valid))
            if bad:
                raise SpaceError(f"{self.source}: unknown {kind}(s) {', '.join(bad)}; registered: {', '.join(valid)}")
        self.check_params()
        self.check_bounds()
        self.check_sampling()

    def check_sampling(self, heads: Any = None, policies: Any = None) -> None:
        """Refuse, before the first trial, what would make trials fail: build every distribution as
        Optuna will (its own checks), then build each part from its fixed values with every range at
        its low end, then at its high end, and with each choice (a parameter combination the part
        refuses). Registries default to HEADS and POLICIES."""
        import optuna

        if heads is None:
            from stage1.heads import HEADS as heads
        if policies is None:
            from stage1.policies import POLICIES as policies
        for kind, parts, registry in (("head", self.heads, heads), ("policy", self.policies, policies)):
            for name, specs in parts.items():
                where = f"{self.source}: [{kind}.{name}]"
                for key, spec in specs.items():
                    if isinstance(spec, dict) and "choices" not in spec:
                        try:
                            with warnings.catch_warnings():  # e.g. a step not dividing the range: Optuna adjusts it
                                warnings.simplefilter("ignore")
                                _distribution(optuna, spec)
                        except (ValueError, TypeError) as exc:
                            raise SpaceError(f"{where} {key}: Optuna refuses this range ({exc})") from None
                for params in _corners(specs):
                    try:
                        registry.create(name, **params)
                    except (ValueError, TypeError) as exc:
                        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
                        raise SpaceError(f"{where}: every trial drawing {shown or 'the defaults'} would fail: "
                                         f"{exc}; change the space") from None

    def check_bounds(self, policies: Any = None) -> None:
        """Refuse a policy whose certificate cannot bound the objective's risk: its "certified"
        would be a promise about another risk (crc bounds E[miss rate], never FNR_exit). Each
        choice of a searched parameter (e.g. ``risk``) is tried; ranges keep their defaults.
        Baselines that certify nothing (threshold, coverage) stay allowed: their certified
        coverage is always 0, so they are compared honestly."""
        if policies is None:
            from stage1.policies import POLICIES as policies
        risk = self.objective["risk"]
        for name, specs in self.policies.items():
            variants: list[dict[str, Any]] = [{k: v for k, v in specs.items() if not isinstance(v, dict)}]
            for key, spec in specs.items():
                if isinstance(spec, dict) and "choices" in spec:
                    variants = [{**v, key: c} for v in variants for c in spec["choices"]]
            bounds = set()
            for params in variants:
                bounds |= set(policies.create(name, **params).certifies())
            if bounds and risk not in bounds:
                raise SpaceError(
                    f"{self.source}: [policy.{name}] certifies {', '.join(sorted(bounds)) or 'nothing'}, not the "
                    f"objective's risk {risk}; a trial it certifies would promise nothing about {risk}. Remove it, "
                    f"or make [objective] risk one it bounds")

    def check_params(self, heads: Any = None, policies: Any = None) -> None:
        """Each ``[head.NAME]`` / ``[policy.NAME]`` may only name declared parameters, and each fixed
        value, choice and ``low`` / ``high`` must be valid for it (registries default to HEADS, POLICIES)."""
        if heads is None:
            from stage1.heads import HEADS as heads
        if policies is None:
            from stage1.policies import POLICIES as policies
        for kind, parts, registry in (("head", self.heads, heads), ("policy", self.policies, policies)):
            for name, specs in parts.items():
                check_part(f"{self.source}: [{kind}.{name}]", registry.get(name).PARAMS, specs,
                           "hyperparameter" if kind == "head" else "parameter")

    def suggest(self, trial: Any) -> tuple[str, dict[str, Any], str, dict[str, Any]]:
        """Draw (head, head params, policy, policy params) for an Optuna trial."""
        head = trial.suggest_categorical("head", sorted(self.heads))
        policy = trial.suggest_categorical("policy", sorted(self.policies))
        return head, _suggest_part(trial, head, self.heads[head]), policy, _suggest_part(trial, policy, self.policies[policy])

    def suggest_train(self, trial: Any) -> dict[str, bool]:
        """How the trial's head trains, ``{"views": bool}`` (searched keys are Optuna's ``train.KEY``)."""
        return {key: (bool(trial.suggest_categorical(f"train.{key}", spec["choices"])) if isinstance(spec, dict)
                      else bool(spec)) for key, spec in {**TRAIN_DEFAULTS, **self.train}.items()}

    def resolve_train(self, params: dict[str, Any]) -> dict[str, bool]:
        """Rebuild what ``suggest_train`` returned from a finished trial's ``params``."""
        return {key: (bool(params[f"train.{key}"]) if isinstance(spec, dict) else bool(spec))
                for key, spec in {**TRAIN_DEFAULTS, **self.train}.items()}

    def resolve(self, params: dict[str, Any]) -> tuple[str, dict[str, Any], str, dict[str, Any]]:
        """Rebuild what ``suggest`` returned from a finished trial's ``params``."""
        head, policy = params["head"], params["policy"]
        return head, _resolve_part(params, head, self.heads[head]), policy, _resolve_part(params, policy, self.policies[policy])


def check_part(where: str, declared: Params, specs: Mapping[str, Any], noun: str = "parameter") -> None:
    """SpaceError unless every key of ``specs`` is a declared parameter and every value it can take
    (a fixed value, each choice, the ``low`` / ``high`` ends) is valid for the declaration."""
    try:
        declared.check_names(specs, where, noun)
        for key, spec in specs.items():
            p = declared[key]
            if not isinstance(spec, dict):
                p.validate(spec, where)
            elif "choices" in spec:
                for choice in spec["choices"]:
                    p.validate(choice, where)
            else:
                if p.type not in (int, float):
                    raise SpaceError(f"{where} {key}: low / high need a number parameter ({key} is {p.describe()}); "
                                     "use choices = [...]")
                p.validate(spec["low"], where)
                p.validate(spec["high"], where)
                if p.type is int and not all(isinstance(spec.get(k, 1), int) for k in ("low", "high", "step")):
                    raise SpaceError(f"{where} {key}: an int parameter needs int low, high and step (a float end "
                                     "would draw non-integers)")
    except ConfigError as exc:
        raise SpaceError(str(exc)) from None


def _check_train(table: Any, source: str) -> dict[str, Any]:
    """The ``[train]`` table: known keys only, each a bool or ``{ choices = [bool, ...] }``."""
    if not isinstance(table, dict):
        raise SpaceError(f"{source}: [train] must be a table")
    bad = sorted(set(table) - set(TRAIN_DEFAULTS))
    if bad:
        raise SpaceError(f"{source}: [train] unknown key(s) {', '.join(bad)}; known: {', '.join(TRAIN_DEFAULTS)}")
    for key, spec in table.items():
        where = f"{source}: train.{key}"
        _check_dist(where, spec)
        if isinstance(spec, dict) and "choices" not in spec:
            raise SpaceError(f"{where}: a true / false setting; use a value or choices = [true, false]")
        values = spec["choices"] if isinstance(spec, dict) else [spec]
        if not all(isinstance(v, bool) for v in values):
            raise SpaceError(f"{where}: must be true or false (train on every cached view, or on view 0 only)")
    return dict(table)


def _is_int_range(spec: dict[str, Any]) -> bool:
    """True when ``_suggest_part`` draws this range as an int (integer ends and step)."""
    return all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("low", "high")) and \
        isinstance(spec.get("step", 1), int)


def _distribution(optuna: Any, spec: dict[str, Any]) -> Any:
    """The Optuna distribution ``_suggest_part`` draws a range from (its constructor checks the range)."""
    if _is_int_range(spec):
        return optuna.distributions.IntDistribution(spec["low"], spec["high"], log=bool(spec.get("log", False)),
                                                    step=spec.get("step", 1))
    return optuna.distributions.FloatDistribution(float(spec["low"]), float(spec["high"]),
                                                  log=bool(spec.get("log", False)), step=spec.get("step"))


def _corners(specs: dict[str, Any]) -> list[dict[str, Any]]:
    """Parameter sets a part is built with before a sweep: fixed values, plus every range at its low
    end (then its high end) and the first choices; then each further choice in turn."""
    fixed = {k: v for k, v in specs.items() if not isinstance(v, dict)}
    ranges = {k: v for k, v in specs.items() if isinstance(v, dict) and "choices" not in v}
    choices = {k: v["choices"] for k, v in specs.items() if isinstance(v, dict) and "choices" in v}

    def end(spec: dict[str, Any], which: str) -> Any:
        return spec[which] if _is_int_range(spec) else float(spec[which])

    first = {k: c[0] for k, c in choices.items()}
    out = [{**fixed, **first, **{k: end(v, which) for k, v in ranges.items()}} for which in ("low", "high")]
    for key, values in choices.items():
        out += [{**out[0], key: value} for value in values[1:]]
    return out


def _suggest_part(trial: Any, prefix: str, specs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, spec in specs.items():
        name = f"{prefix}.{key}"
        if not isinstance(spec, dict):
            out[key] = spec
        elif "choices" in spec:
            out[key] = trial.suggest_categorical(name, spec["choices"])
        elif _is_int_range(spec):
            out[key] = trial.suggest_int(name, spec["low"], spec["high"], step=spec.get("step", 1),
                                         log=bool(spec.get("log", False)))
        else:
            out[key] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                           step=spec.get("step"), log=bool(spec.get("log", False)))
    return out


def _resolve_part(params: dict[str, Any], prefix: str, specs: dict[str, Any]) -> dict[str, Any]:
    return {key: (params[f"{prefix}.{key}"] if isinstance(spec, dict) else spec) for key, spec in specs.items()}
