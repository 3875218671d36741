"""Device side: torch-free training loop, data, inference, checkpoints. Never imports torch."""
