"""Click options whose type, choices and help come from parameter declarations (``_core.params``).

A command names the declared parameter an option sets and how to find its declarations (a function
returning ``(owner, Param)`` pairs, e.g. every policy that has ``alpha``). The lookup runs only
when the option is parsed or its help is shown, so building the command (``stage1 --help``)
imports no part module. The option's click type is a ``Choice`` when every declaration restricts
the value to choices, else the declared Python type; ranges are left to the part, whose
``ConfigError`` names the parameter and the valid range.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import click

from stage1._core.params import Param

__all__ = ["DeclaredType", "declared_option", "declared_help", "lazy_help_option"]

#: ``(owner, Param)`` for each part declaring the parameter; owner "" when there is one kind.
Found = Sequence[tuple[str, Param]]

_CLICK_TYPES: dict[type, click.ParamType] = {int: click.INT, float: click.FLOAT, str: click.STRING,
                                             bool: click.BOOL}


def declared_help(found: Found, owners: Sequence[str] = ()) -> str:
    """Help text from the declarations: each distinct help with its range, labelled by the owners
    that declare it unless every owner in ``owners`` shares it."""
    groups: dict[tuple[str, str], list[str]] = {}
    for owner, p in found:
        groups.setdefault((p.help, p.range_text()), []).append(owner)
    texts = []
    for (text, rng), who in groups.items():
        body = text.rstrip(".") + (f"; {rng}" if rng and _no_choices(found, text) else "") + "."
        everyone = len(groups) == 1 and set(who) >= set(owners)
        label = ", ".join(o for o in who if o)
        texts.append(f"{label}: {body}" if label and not everyone else body)
    return " ".join(texts)


def _no_choices(found: Found, text: str) -> bool:
    """True when the parameters with help ``text`` are bounded by a range, not choices (those show
    in the option's metavar already)."""
    return all(p.choices is None for _, p in found if p.help == text)


class DeclaredType(click.ParamType):
    """The click type of a declared parameter, looked up on first use (see the module docstring)."""

    def __init__(self, find: Callable[[], Found], extra_choices: Sequence[str] = ()) -> None:
        self._find = find
        self._extra = tuple(extra_choices)
        self._type: click.ParamType | None = None

    def target(self) -> click.ParamType:
        """The real click type (resolved once)."""
        if self._type is None:
            found = self._find()
            choice_lists = [p.valid_choices() for _, p in found]
            if found and all(c is not None for c in choice_lists):
                names: list[str] = []
                for c in choice_lists:
                    names += [str(v) for v in c if str(v) not in names]  # type: ignore[union-attr]
                if len({tuple(c) for c in choice_lists if c is not None}) > 1:
                    names.sort()  # parts differ: list the union alphabetically
                self._type = click.Choice([*names, *self._extra], case_sensitive=False)
            else:
                self._type = _CLICK_TYPES.get(found[0][1].type, click.STRING) if found else click.STRING
        return self._type

    @property  # type: ignore[override]
    def name(self) -> str:  # click's metavar for plain types: INTEGER, FLOAT, TEXT
        return self.target().name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return self.target().convert(value, param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> str | None:
        return self.target().get_metavar(param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        return self.target().shell_complete(ctx, param, incomplete)


class _LazyHelpOption(click.Option):
    """A click option whose help text is computed when help is shown."""

    def __init__(self, *args: Any, help_fn: Callable[[], str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._help_fn = help_fn

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        if self.help is None:
            self.help = self._help_fn()
        return super().get_help_record(ctx)


def declared_option(*decls: str, find: Callable[[], Found], owners: Callable[[], Sequence[str]] = lambda: (),
                    extra_choices: Sequence[str] = (), extra_help: str = "", **kwargs: Any
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``click.option`` for a declared parameter: type / choices and help derived from ``find()``."""

    def help_fn() -> str:
        return (declared_help(find(), owners()) + (" " + extra_help if extra_help else "")).strip()

    return click.option(*decls, cls=_LazyHelpOption, type=DeclaredType(find, extra_choices), help_fn=help_fn,
                        **kwargs)


def lazy_help_option(*decls: str, help_fn: Callable[[], str], **kwargs: Any
                     ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``click.option`` whose help is computed when shown (e.g. it lists a registry's names)."""
    return click.option(*decls, cls=_LazyHelpOption, help_fn=help_fn, **kwargs)
