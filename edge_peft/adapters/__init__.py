"""Adapters on the numpy side (no torch): PEFT-format I/O, rank channels, compact files."""
