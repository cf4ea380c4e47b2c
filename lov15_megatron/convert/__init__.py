"""Hugging Face ⇄ Megatron-Core checkpoint conversion (declarative tables, streaming I/O)."""
