"""edge-peft: personalise models on the device with LoRA-FA adapters and ONNX Runtime training."""

__version__ = "0.1.0"
