"""Full-image mode: PEFT (LoRA / DoRA through ``peft``) and ExPLoRA domain adaptation."""
