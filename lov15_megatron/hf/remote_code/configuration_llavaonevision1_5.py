"""Configuration classes of the Hugging Face-side LLaVA-OneVision-1.5 model.

Self-contained on purpose: this file is copied next to exported weights (``auto_map``) and
imported by ``transformers`` as remote code, so it imports only ``transformers`` and
``huggingface_hub`` (which ``transformers`` depends on).

Two classes:

- :class:`RiceViTConfig` (``model_type`` ``rice_vit``): the Rice ViT vision tower and the 2x2
  patch merger on top of it.
- :class:`LLaVAOneVision1_5_Config` (``model_type`` ``llavaonevision1_5``): the composite config
  with ``vision_config`` (a :class:`RiceViTConfig`), ``text_config`` (a ``transformers``
  ``Qwen3Config``, or ``Qwen3MoeConfig`` for the mixture-of-experts LM) and the special token ids.

The defaults describe the released 4B model (Rice ViT large + Qwen3-4B).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

#: Qwen3 language-model fields of the released 4B model (Qwen3-4B-Instruct-2507, untied).
QWEN3_4B_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "rope_theta": 5_000_000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

#: Qwen3 language-model fields of the released 8B model (Qwen3-8B, untied).
QWEN3_8B_TEXT_CONFIG: dict[str, Any] = {
    **QWEN3_4B_TEXT_CONFIG,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "rope_theta": 1_000_000.0,
}


#: ``text_config.model_type`` in the release's checkpoints (its own text-config class, written
#: by its merge script and by its 30B-A3B code); the fields are Qwen3's, plus the expert fields
#: for the mixture-of-experts LM.
RELEASE_TEXT_MODEL_TYPE = "LLaVAOneVision1_5_text"

#: The Rice ViT's rotary base in the release: a constant of its code, so its ``vision_config``
#: has no ``rope_theta`` field; an absent field means this value.
RELEASE_VISION_ROPE_THETA = 10000.0


def text_model_type(text_config: dict[str, Any]) -> str:
    """The ``transformers`` model_type of a ``text_config`` dict: ``qwen3``, ``qwen3_moe``, or
    the release's ``LLaVAOneVision1_5_text`` resolved by its fields (``qwen3_moe`` when it has
    experts, ``num_experts`` > 0 as in the release's decoder, else ``qwen3``). A dict without
    a model_type is ``qwen3``."""
    model_type = text_config.get("model_type") or "qwen3"
    if model_type != RELEASE_TEXT_MODEL_TYPE:
        return model_type
    experts = text_config.get("num_experts") or text_config.get("num_local_experts")
    return "qwen3_moe" if experts else "qwen3"


@strict
class RiceViTConfig(PretrainedConfig):
    """Rice ViT vision tower (+ 2x2 patch merger) configuration.

    ``embed_dim`` is the ViT width used everywhere inside the tower. ``hidden_size`` is a
    field of the released ``config.json`` kept for compatibility; the computation never reads
    it (set it equal to ``embed_dim``). ``text_hidden_size`` is the merger's output width (the
    LM hidden size); left ``None`` the composite config fills it from
    ``text_config.hidden_size``.

    Rotary embedding: with head dim ``d`` each of the two axes (row, column) gets ``d/4``
    frequencies ``inv_freq_j = rope_theta^(-2j/(d/2))``, ``j = 0..d/4-1``; the per-token angles
    ``[r*inv_freq, c*inv_freq]`` (``d/2`` values) are doubled to ``d`` and applied rotate-half
    style. The class token's ``d/2`` angles are the learned ``class_pos_emb``.
    """

    model_type = "rice_vit"
    base_config_key = "vision_config"
    attribute_map = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}

    depth: int = 24
    embed_dim: int = 1024
    hidden_size: int = 1024
    hidden_act: str = "gelu"
    intermediate_size: int = 4096
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 1
    layer_norm_eps: float = 1e-5
    text_hidden_size: int | None = None
    rope_theta: float = RELEASE_VISION_ROPE_THETA
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"rice_vit: embed_dim {self.embed_dim} is not divisible by "
                f"num_heads {self.num_heads}"
            )
        if self.head_dim % 4 != 0:
            raise ValueError(
                f"rice_vit: head dim {self.head_dim} must be a multiple of 4 for the 2-D rotary "
                "embedding (two axes, rotate-half)"
            )
        if self.temporal_patch_size != 1:
            raise ValueError(
                f"rice_vit: temporal_patch_size {self.temporal_patch_size} is not supported "
                "(LLaVA-OneVision-1.5 uses 1)"
            )

    @property
    def head_dim(self) -> int:
        """Per-head dimension of the vision attention."""
        return self.embed_dim // self.num_heads

    @property
    def rotary_freqs_per_axis(self) -> int:
        """Number of rotary frequencies per spatial axis (``head_dim / 4``)."""
        return self.head_dim // 4

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of ``pixel_values`` (3*14*14 = 588)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@strict
class LLaVAOneVision1_5_Config(PretrainedConfig):
    """Composite LLaVA-OneVision-1.5 configuration (``model_type`` ``llavaonevision1_5``).

    ``text_config`` is a plain ``transformers.Qwen3Config`` (or, with ``model_type``
    ``qwen3_moe``, a ``Qwen3MoeConfig``; the release's ``LLaVAOneVision1_5_text`` is read as
    either, see :func:`text_model_type`); ``vision_config`` a :class:`RiceViTConfig`. The logits
    have ``text_config.vocab_size`` entries (151936 for the release); we write no top-level
    ``vocab_size`` (the release's default of 152064 disagrees with the text vocabulary; a
    released ``config.json`` that has it keeps it, and nothing reads it).
    """

    model_type = "llavaonevision1_5"
    sub_configs_defaults = {
        "vision_config": RiceViTConfig,
        # By its model_type: qwen3 (Qwen3Config) or qwen3_moe (Qwen3MoeConfig, the 30B-A3B).
        "text_config": SubConfigSpec(
            AutoConfig, model_type="qwen3", init_kwargs=dict(QWEN3_4B_TEXT_CONFIG)
        ),
    }
    keys_to_ignore_at_inference = ["past_key_values"]

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.text_config, dict):
            self.text_config = {**self.text_config, "model_type": text_model_type(self.text_config)}
        super().__post_init__(**kwargs)
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        text_hidden = self.text_config.hidden_size
        if self.vision_config.text_hidden_size is None:
            self.vision_config.text_hidden_size = text_hidden
        elif self.vision_config.text_hidden_size != text_hidden:
            raise ValueError(
                f"vision_config.text_hidden_size {self.vision_config.text_hidden_size} does not "
                f"match text_config.hidden_size {text_hidden}: the merger output feeds the LM"
            )
        vocab = self.text_config.vocab_size
        for name in ("image_token_id", "video_token_id", "vision_start_token_id"):
            token_id = getattr(self, name)
            if not 0 <= token_id < vocab:
                raise ValueError(f"{name} {token_id} is outside the text vocabulary [0, {vocab})")

    def to_dict(self) -> dict[str, Any]:
        """Serialise, adding the legacy ``text_config.rope_theta`` field older readers expect."""
        output = super().to_dict()
        text = output.get("text_config")
        rope = getattr(self.text_config, "rope_parameters", None) or {}
        if isinstance(text, dict) and "rope_theta" in rope:
            text["rope_theta"] = rope["rope_theta"]
        return output


__all__ = [
    "QWEN3_4B_TEXT_CONFIG",
    "QWEN3_8B_TEXT_CONFIG",
    "RELEASE_TEXT_MODEL_TYPE",
    "RELEASE_VISION_ROPE_THETA",
    "LLaVAOneVision1_5_Config",
    "RiceViTConfig",
    "text_model_type",
]
