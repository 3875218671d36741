"""The artifact contract between exporter, device and store.

- ``manifest``: ``manifest.json`` (schema, model figures, backends) with the adapter section nested
  (``adapter_section.AdapterSpec``, also the store's wire description of a base) and a typed memory
  section (``memory_section.MemoryFigures``).
- ``files``: the name of every file of an artifact, of a run directory and of a PEFT adapter directory.
- ``names``: tensor and graph-value names: PEFT keys <-> ONNX names, LoRA factors, AdamW moments,
  gradients, batch inputs.

This package imports nothing heavier than numpy; import its modules directly (this file re-exports
nothing, so that importing ``names`` never drags the rest in).
"""
