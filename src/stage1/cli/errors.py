"""The one mapping from errors to what a user sees: a one-line click error, never a traceback.

``Stage1Error`` subclasses with ``usage = True`` exit 2 (fix the command line), the others exit 1;
OS errors (permissions, a full disk) exit 1 naming the file. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import click

from stage1._core.errors import Stage1Error

T = TypeVar("T")


def click_error(exc: BaseException) -> click.ClickException | None:
    """The click error for ``exc``, or None when it is not an error a user can cause."""
    if isinstance(exc, Stage1Error):
        return click.UsageError(str(exc)) if exc.usage else click.ClickException(str(exc))
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return click.ClickException(f"{where}{exc.strerror or exc}")
    return None


def run_mapping_errors(fn: Callable[[], T]) -> T:
    """Call ``fn``; re-raise a user-caused error as its click error (chained cause dropped)."""
    try:
        return fn()
    except click.ClickException:
        raise
    except Exception as exc:  # noqa: BLE001 - re-raised below unless it is ours
        mapped = click_error(exc)
        if mapped is None:
            raise
        raise mapped from None


class Stage1Command(click.Command):
    """A click command whose user-caused errors print as one line (also when invoked directly,
    as tests and other programs do, not only through the ``stage1`` group)."""

    def invoke(self, ctx: click.Context) -> Any:
        return run_mapping_errors(lambda: super(Stage1Command, self).invoke(ctx))


def command(name: str | None = None, **attrs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """``@click.command`` for every stage1 command: the same, with the one error mapping."""
    return click.command(name, cls=Stage1Command, **attrs)
