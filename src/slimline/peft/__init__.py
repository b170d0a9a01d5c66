"""Parameter-efficient fine-tuning: LoRA / DoRA / QLoRA adapters, PEFT-compatible on disk.

``lora.py`` holds the ``lora`` step and the reusable ``add_adapters`` / ``merge_adapters``;
``layer.py`` the adapter layer and its maths; ``peft_format.py`` ``save_adapter`` /
``load_adapter`` in the ``peft`` package's directory layout.
"""
