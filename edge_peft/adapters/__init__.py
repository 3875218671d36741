"""Adapters: the torch-side LoRA layers (``layer``/``inject``) and the numpy-side PEFT format."""
