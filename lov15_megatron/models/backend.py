"""What a run's model is built from: Transformer Engine or local modules, the attention core,
device/dtype fields and activation recomputation, decided once from the config for the language
model and the Rice ViT alike.

- ``model.transformer_impl`` (``auto`` | ``local`` | ``transformer_engine``) picks the layer spec:
  Megatron-Core's TE spec (fused LayerNorm+linear, TE attention) or its local spec. ``auto`` is TE
  where it can run: a GPU run (not ``runtime.device=cpu``) with TE importable.
- ``model.attention_backend`` (``auto`` | ``te`` | ``torch``) picks the core attention inside that
  spec: TE's ``TEDotProductAttention`` or our
  :class:`~lov15_megatron.models.attention.PackedSequenceAttention`. ``auto`` = TE's whenever the
  TE spec is used. ``te`` needs the TE spec; ``torch`` works in either.
- ``train.recompute`` becomes Megatron's ``recompute_granularity`` / ``recompute_method`` /
  ``recompute_num_layers`` / ``recompute_modules`` (the ViT gets them too unless
  ``train.recompute.vision`` is false).
"""

from __future__ import annotations

from typing import Any

import torch

from lov15_megatron.config import ConfigError, RunConfig
from lov15_megatron.runtime.dtypes import TORCH_DTYPES


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def runs_on_gpu(cfg: RunConfig) -> bool:
    return torch.cuda.is_available() and cfg.runtime.device != "cpu"


def use_transformer_engine(cfg: RunConfig) -> bool:
    impl = cfg.model.transformer_impl
    if impl == "auto":  # TE where it can run: a GPU run (not runtime.device=cpu) with TE
        return runs_on_gpu(cfg) and _te_importable()
    return impl == "transformer_engine"


def fused_kernels(cfg: RunConfig) -> bool:
    """Fused kernels come with Transformer Engine on GPU; the local spec uses plain torch ops."""
    return runs_on_gpu(cfg) and use_transformer_engine(cfg)


def attention_backend(cfg: RunConfig) -> str:
    """``"te"`` or ``"torch"``: the core attention of this run (raises ``ConfigError``)."""
    want, te_spec = cfg.model.attention_backend, use_transformer_engine(cfg)
    if want == "auto":
        return "te" if te_spec else "torch"
    if want == "te" and not te_spec:
        why = (
            "Transformer Engine is not importable"
            if not _te_importable()
            else f"model.transformer_impl={cfg.model.transformer_impl!r} builds the local spec"
            + ("" if runs_on_gpu(cfg) else " (this run is not on a GPU)")
        )
        raise ConfigError(f"model.attention_backend='te' needs the Transformer Engine spec: {why}")
    return want


def core_attention_module(cfg: RunConfig) -> type:
    """The ``core_attention`` class of this run's specs."""
    if attention_backend(cfg) == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    from lov15_megatron.models.attention import PackedSequenceAttention

    return PackedSequenceAttention


def moe_without_transformer_engine() -> None:
    """Let Megatron-Core's MoE router run where Transformer Engine is not installed.

    megatron-core 0.16.1's router gating (``moe_utils.RouterGatingLinearFunction``) tests
    ``te_general_gemm is not None`` but defines that name only when TE imports, so without TE it
    raises ``NameError``. ``None`` is the value its own check expects for "no TE": the plain
    ``torch.mm`` path then runs. A no-op where the name exists (TE installed, or fixed upstream).
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def moe_loss_scale_per_token(tp_cp: int) -> int:
    """Factor for the MoE aux/z-loss coefficients under per-token loss weighting.

    With ``calculate_per_token_loss`` Megatron-Core pre-multiplies each rank's aux and z losses
    by its token count. Up to 0.16.1 that is the rank's *local* count, which under sequence
    (and context) parallelism makes the gradients 1/(TP·CP) of the TP=CP=1 run's; later
    releases multiply by ``tp_cp_group.size()`` as well (0.19.2 does). Where the installed
    router lacks that factor, the coefficients carry it instead (the logged loss / coefficient
    is unchanged), so the objective is the same at every layout.
    """
    import inspect

    from megatron.core.transformer.moe.router import TopKRouter

    source = inspect.getsource(TopKRouter.attach_and_log_load_balancing_loss)
    return 1 if "tp_cp_group.size()" in source else tp_cp


def fp8_config_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """``TransformerConfig`` FP8 fields (``model.fp8``), refused where they cannot run.

    FP8 GEMMs are Transformer Engine's: the run must build the TE spec on a GPU. ``fp8_recipe``
    is Megatron's ``delayed`` (amax history) or ``tensorwise`` (current scaling). Untested
    until a GPU run checks it (docs/parallelism-choice.md §7).
    """
    m = cfg.model
    if m.fp8 is None:
        return {}
    if not _te_importable():
        raise ConfigError(f"model.fp8={m.fp8!r} needs Transformer Engine, which is not importable")
    if not runs_on_gpu(cfg):
        raise ConfigError(f"model.fp8={m.fp8!r} needs a GPU run (this run is on the CPU)")
    if not use_transformer_engine(cfg):
        raise ConfigError(
            f"model.fp8={m.fp8!r} needs the Transformer Engine spec "
            f"(model.transformer_impl={m.transformer_impl!r} builds the local spec)"
        )
    return {"fp8": m.fp8, "fp8_recipe": m.fp8_recipe}


def device_config_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """``TransformerConfig`` fields decided by dtype and device, shared by the LM and the ViT."""
    dtype = TORCH_DTYPES[cfg.model.params_dtype]
    on_gpu, te = runs_on_gpu(cfg), fused_kernels(cfg)
    return {
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "use_cpu_initialization": not on_gpu,
        "masked_softmax_fusion": te,
        "persist_layer_norm": te,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
    }


def recompute_config_kwargs(cfg: RunConfig, *, vision: bool = False) -> dict[str, Any]:
    """``TransformerConfig`` recompute fields for the LM (or, with ``vision``, the ViT)."""
    r = cfg.train.recompute
    if r.granularity == "none" or (vision and not r.vision):
        return {}
    if r.granularity == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(r.modules)}
    return {
        "recompute_granularity": "full",
        "recompute_method": r.method,
        "recompute_num_layers": r.num_layers,
    }
