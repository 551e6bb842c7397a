"""Tests of stage1.runs (mirrors src/stage1/runs)."""
