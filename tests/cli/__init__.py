"""Tests of stage1.cli (mirrors src/stage1/cli)."""
