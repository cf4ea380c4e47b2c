"""Tensor-name correspondence between ``transformers``' ``MLCDVisionModel`` and the Rice ViT.

The Rice ViT checkpoint the model starts from uses the MLCD layout. Differences:

- MLCD keeps separate ``q_proj``/``k_proj``/``v_proj``; the Rice ViT fuses them into ``qkv``
  with rows ``[Q; K; V]`` (weights and biases concatenated along dim 0).
- MLCD's ``post_layernorm`` only normalises its pooled class-token output; the Rice ViT has no
  final norm (the merger's ``ln_q`` plays that role), so it is dropped.
- Forward-wise MLCD processes one image in raster patch order with the class token at index 0
  of ``last_hidden_state``; the Rice ViT processes 2x2-merge order and removes class tokens.
  ``last_hidden_state[0, 1:]`` permuted from raster to merge order equals
  ``RiceViTModel.get_vision_features`` on the same image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_MLCD_PREFIX = "vision_model."

_DIRECT = {
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.class_embedding": "class_embedding",
    "class_pos_emb": "class_pos_emb",
    "pre_layrnorm.weight": "pre_layernorm.weight",
    "pre_layrnorm.bias": "pre_layernorm.bias",
}

_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")

_LAYER_DIRECT = {
    "layer_norm1.weight": "norm1.weight",
    "layer_norm1.bias": "norm1.bias",
    "layer_norm2.weight": "norm2.weight",
    "layer_norm2.bias": "norm2.bias",
    "self_attn.out_proj.weight": "attn.proj.weight",
    "self_attn.out_proj.bias": "attn.proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}

_DROPPED = ("post_layernorm.weight", "post_layernorm.bias")


def mlcd_to_rice_vit_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "visual."
) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) an MLCD vision state dict into Rice ViT names.

    Accepts keys with or without the ``vision_model.`` prefix. Returns names under ``prefix``
    (``"visual."`` gives the LLaVA-OV-1.5 on-disk names; ``""`` the ``RiceViTModel`` ones).
    The merger is not part of MLCD and is not produced. Unknown keys raise ``KeyError``.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix(_MLCD_PREFIX)
        if name in _DROPPED:
            continue
        if name in _DIRECT:
            out[prefix + _DIRECT[name]] = tensor
            continue
        match = _LAYER.match(name)
        if match is None:
            raise KeyError(f"unexpected MLCD tensor {key!r}")
        layer, rest = match.groups()
        if rest in _LAYER_DIRECT:
            out[f"{prefix}blocks.{layer}.{_LAYER_DIRECT[rest]}"] = tensor
            continue
        qkv_match = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv_match is None:
            raise KeyError(f"unexpected MLCD tensor {key!r}")
        which, kind = qkv_match.groups()
        qkv.setdefault((layer, kind), {})[which] = tensor
    for (layer, kind), parts in qkv.items():
        missing = {"q", "k", "v"} - parts.keys()
        if missing:
            raise KeyError(f"MLCD layer {layer}: missing {sorted(missing)} projection {kind}")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"{prefix}blocks.{layer}.attn.qkv.{kind}"] = fused
    return out


def raster_to_merge_order(height: int, width: int, merge_size: int = 2) -> torch.Tensor:
    """Index ``idx`` with ``merge_ordered = raster_ordered[idx]`` for an ``height x width`` grid."""
    rows = torch.arange(height * width).view(height, width)
    rows = rows.view(height // merge_size, merge_size, width // merge_size, merge_size)
    return rows.permute(0, 2, 1, 3).flatten()


__all__ = ["mlcd_to_rice_vit_state_dict", "raster_to_merge_order"]
