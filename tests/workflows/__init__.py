"""Tests of stage1.workflows (mirrors src/stage1/workflows)."""
