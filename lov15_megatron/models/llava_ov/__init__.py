"""LLaVA-OneVision-1.5: the Rice ViT and its 2×2 patch merger in front of a qwen3 or qwen3-moe
language model.

- ``rice_vit.py``: the vision tower and merger modules; ``vit_specs.py``: their layer specs.
- ``model.py``: the vision-language model (features scattered into the image-pad positions).
- ``hf_mapping.py``: the HF ⇄ Megatron rows and the vision-config translation.
- ``step.py``: how a packed training micro-batch becomes the model's inputs.
- ``stage0.py``: the stage-0 builder's rules (MLCD/Rice ViT + Qwen3 → an untrained VLM).
- ``family.py``: registers the whole as ``llava-ov-1.5``.
"""
