"""Hugging Face <-> moejax weights: streaming safetensors reads and per-architecture key maps."""
