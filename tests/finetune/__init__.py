"""Tests of stage1.finetune (mirrors src/stage1/finetune)."""
