"""Workstation side: HF model directory -> LoRA-FA adapters -> quantized ONNX -> ORT training artifact."""
