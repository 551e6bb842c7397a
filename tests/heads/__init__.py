"""Tests of stage1.heads (mirrors src/stage1/heads)."""
