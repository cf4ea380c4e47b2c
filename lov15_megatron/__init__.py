"""lov15-megatron: LLaVA-OneVision-1.5 pretraining on Megatron-Core."""

__version__ = "0.1.0"
