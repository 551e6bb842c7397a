"""Tests of stage1.policies (mirrors src/stage1/policies)."""
