"""Qwen3-MoE (30B-A3B, …): Qwen3's attention with a routed-experts MLP in every layer. The model
is Qwen3's builder with Megatron-Core's MoE layer spec (``models/qwen3/specs.py``);
``hf_mapping.py`` maps it to and from ``Qwen3MoeForCausalLM``, ``metrics.py`` reports its router
losses, and ``family.py`` registers it as ``qwen3-moe``."""
