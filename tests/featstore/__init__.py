"""Tests of stage1.featstore (mirrors src/stage1/featstore)."""
