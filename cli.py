"""Command-line entry point: a click group whose commands are imported only when used.

Each command lives next to the code it drives (``featstore/commands.py``, ``heads/commands.py``,
``workflows/commands.py``, ``finetune/commands.py``); this file only maps names to them, so
``python cli.py --help`` stays fast and never imports torch.
"""
from __future__ import annotations

import importlib
import os
import sys

import click

# Make the checkout importable when run as ``python cli.py`` from anywhere.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: command name -> "module:attribute" of a click.Command.
COMMANDS: dict[str, str] = {
    "extract": "featstore.commands:extract",
    "info": "featstore.commands:info",
    "split": "featstore.commands:split",
    "export-features": "featstore.commands:export_features",
    "import-features": "featstore.commands:import_features",
    "train": "heads.commands:train",
    "calibrate": "heads.commands:calibrate",
    "evaluate": "heads.commands:evaluate",
    "sweep": "workflows.commands:sweep",
    "export": "workflows.commands:export",
    "predict": "workflows.commands:predict",
    "demo": "workflows.commands:demo",
    "finetune": "finetune.commands:finetune",
    "adapt": "finetune.commands:adapt",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module the first time the command is needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="stage1-featstore", message="%(prog)s %(version)s")
def main() -> None:
    """Stage-1 roadwork classifiers on cached backbone features.

    Typical flow: extract -> split -> train -> calibrate -> evaluate -> export -> predict.
    `demo` runs all of it on a small bundled example.
    """


if __name__ == "__main__":
    main()
