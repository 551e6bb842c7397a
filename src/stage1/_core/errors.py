"""One error family: every error a user can cause derives from ``Stage1Error``.

The CLI maps a ``Stage1Error`` to a one-line message (``usage`` errors exit 2, the rest 1), so no
command catches domain errors by hand. Each subclass also derives from the builtin it replaces
(ValueError, KeyError, ...) so callers that caught the builtin keep working.
"""
from __future__ import annotations


class Stage1Error(Exception):
    """Base of the errors this package raises for bad input, state or environment."""

    #: True when the fix is a different command line (exit 2), False for bad files or state (exit 1).
    usage: bool = False

    def __str__(self) -> str:  # KeyError would quote its message; ours never does
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(Stage1Error, ValueError):
    """A parameter or option value that is not acceptable (out of range, wrong type, conflicting)."""

    usage = True


class UnknownNameError(Stage1Error, KeyError, ValueError):
    """A name that no registry (heads, policies, calibrators, backbones, risks) knows: a lookup
    miss (KeyError) and a bad parameter value (ValueError) alike, for callers catching either."""

    usage = True


class DataError(Stage1Error, ValueError):
    """Input data that cannot be used as given (too few rows, a missing class, a bad file format)."""


class MissingError(Stage1Error, FileNotFoundError):
    """A file or folder a step needs is not there; the message says which step makes it."""


class ExistsError(Stage1Error, FileExistsError):
    """An output that is already there and would be overwritten (the fix: another --out)."""

    usage = True


class EnvironmentProblem(Stage1Error, RuntimeError):
    """The machine lacks something the command asked for (CUDA, a package, a free lock)."""
