"""The CLI's help must list every command and stay light: no torch import for --help."""
from __future__ import annotations

import os
import subprocess
import sys

from stage1 import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_help_lists_every_command_without_importing_torch() -> None:
    code = (
        "import sys, runpy; sys.argv=['stage1','--help'];\n"
        "try:\n    runpy.run_module('stage1', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'zarr', 'optuna', 'peft') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in cli.COMMANDS:
        assert name in out.stdout
    assert "HEAVY []" in out.stdout, out.stdout


def test_each_command_has_its_own_help() -> None:
    from click.testing import CliRunner

    runner = CliRunner()
    for name in cli.COMMANDS:
        res = runner.invoke(cli.main, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert "Usage:" in res.output and len(res.output.splitlines()) > 3
