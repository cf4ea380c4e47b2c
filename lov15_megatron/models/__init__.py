"""Model definitions as Megatron-Core specs."""
