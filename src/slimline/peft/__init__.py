"""Parameter-efficient fine-tuning: LoRA / DoRA adapters, PEFT-compatible on disk."""
