"""Tests of stage1._core (mirrors src/stage1/_core)."""
