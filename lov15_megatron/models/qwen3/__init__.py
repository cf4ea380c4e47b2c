"""The Qwen3 dense language model (4B, 8B, 14B, …): ``model.py`` builds it from Megatron-Core's
GPT model with the layer specs of ``specs.py``, ``hf_mapping.py`` maps it to and from
``Qwen3ForCausalLM``, ``step.py`` turns a training micro-batch into its inputs, and ``family.py``
registers it as ``qwen3``."""
