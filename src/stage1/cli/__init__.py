"""Command-line entry point (``stage1``, ``python -m stage1``): a lazily loading click group.

Each command lives next to the code it drives (``stage1/featstore/commands.py``, ...); the group
maps names to them and imports a command's module only when it runs, so ``stage1 --help`` never
imports torch. Errors are turned into one-line messages in one place (``stage1.cli.errors``).
"""
from __future__ import annotations

import importlib

import click

from .errors import run_mapping_errors

#: command name -> "module:attribute" of a click.Command.
COMMANDS: dict[str, str] = {
    "extract": "stage1.featstore.commands:extract",
    "info": "stage1.featstore.commands:info",
    "split": "stage1.featstore.commands:split",
    "export-features": "stage1.featstore.commands:export_features",
    "import-features": "stage1.featstore.commands:import_features",
    "train": "stage1.runs.commands:train",
    "calibrate": "stage1.runs.commands:calibrate",
    "evaluate": "stage1.runs.commands:evaluate",
    "sweep": "stage1.workflows.commands:sweep",
    "export": "stage1.workflows.commands:export",
    "predict": "stage1.workflows.commands:predict",
    "serve": "stage1.workflows.commands:serve",
    "demo": "stage1.workflows.commands:demo",
    "monitor": "stage1.workflows.commands:monitor",
    "finetune": "stage1.finetune.commands:finetune",
    "adapt": "stage1.finetune.commands:adapt",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module the first time the command is needed.

    Errors are mapped by each command (``errors.Stage1Command``); the group maps those raised
    while it loads a command."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        return run_mapping_errors(lambda: super(LazyGroup, self).invoke(ctx))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stage1-featstore", message="%(prog)s %(version)s")
def main() -> None:
    """Stage-1 roadwork classifiers on cached backbone features.

    Typical flow: extract -> split -> train -> calibrate -> evaluate -> export -> predict.
    `demo` runs all of it on a small bundled example.
    """
