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

#: Prefix of the ViT tensor names in MLCD checkpoints saved by ``transformers`` 4.x (and the
#: released Rice ViT); ``transformers`` 5 saves the same tensors without it. Both are accepted.
MLCD_PREFIX = "vision_model."

#: MLCD tensors that have no place in the Rice ViT.
MLCD_DROPPED = ("post_layernorm.weight", "post_layernorm.bias")

#: The one name table: Rice ViT name (under ``visual.`` in the release layout) -> MLCD name(s),
#: ``*`` = layer index. Several names are concatenated along dim 0 (``qkv`` rows are
#: ``[Q; K; V]``). Used here in memory and by ``models/llava_ov/stage0.py`` on disk.
VIT_MAPPING: dict[str, tuple[str, ...]] = {
    "patch_embed.proj.weight": ("embeddings.patch_embedding.weight",),
    "class_embedding": ("embeddings.class_embedding",),
    "class_pos_emb": ("class_pos_emb",),
    "pre_layernorm.weight": ("pre_layrnorm.weight",),
    "pre_layernorm.bias": ("pre_layrnorm.bias",),
    **{
        f"blocks.*.{ours}": (f"encoder.layers.*.{theirs}",)
        for ours, theirs in (
            ("norm1.weight", "layer_norm1.weight"),
            ("norm1.bias", "layer_norm1.bias"),
            ("norm2.weight", "layer_norm2.weight"),
            ("norm2.bias", "layer_norm2.bias"),
            ("attn.proj.weight", "self_attn.out_proj.weight"),
            ("attn.proj.bias", "self_attn.out_proj.bias"),
            ("mlp.fc1.weight", "mlp.fc1.weight"),
            ("mlp.fc1.bias", "mlp.fc1.bias"),
            ("mlp.fc2.weight", "mlp.fc2.weight"),
            ("mlp.fc2.bias", "mlp.fc2.bias"),
        )
    },
    "blocks.*.attn.qkv.weight": tuple(f"encoder.layers.*.self_attn.{p}_proj.weight" for p in "qkv"),
    "blocks.*.attn.qkv.bias": tuple(f"encoder.layers.*.self_attn.{p}_proj.bias" for p in "qkv"),
}

_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def _mlcd_to_rice() -> dict[str, tuple[str, int]]:
    """MLCD name (layer as ``*``) -> (Rice ViT name, position in the concatenation)."""
    return {
        source: (ours, i)
        for ours, sources in VIT_MAPPING.items()
        for i, source in enumerate(sources)
    }


def mlcd_to_rice_vit_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix: str = "visual."
) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) an MLCD vision state dict into Rice ViT names.

    Accepts keys with or without the ``vision_model.`` prefix. Returns names under ``prefix``
    (``"visual."`` gives the LLaVA-OV-1.5 on-disk names; ``""`` the ``RiceViTModel`` ones).
    The merger is not part of MLCD and is not produced. Unknown keys raise ``KeyError``.
    """
    table = _mlcd_to_rice()
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name = key.removeprefix(MLCD_PREFIX)
        if name in MLCD_DROPPED:
            continue
        match = _LAYER.match(name)
        layer, pattern = (
            (match.group(1), f"encoder.layers.*.{match.group(2)}") if match else ("", name)
        )
        if pattern not in table:
            raise KeyError(f"unexpected MLCD tensor {key!r}")
        ours, index = table[pattern]
        parts.setdefault(ours.replace("*", layer), {})[index] = tensor
    out: dict[str, torch.Tensor] = {}
    for ours, pieces in parts.items():
        pattern = re.sub(r"^blocks\.\d+\.", "blocks.*.", ours)
        if len(pieces) != len(VIT_MAPPING[pattern]):
            missing = [
                VIT_MAPPING[pattern][i] for i in range(len(VIT_MAPPING[pattern])) if i not in pieces
            ]
            raise KeyError(f"MLCD tensors for {ours!r}: missing {missing}")
        ordered = [pieces[i] for i in range(len(pieces))]
        out[prefix + ours] = ordered[0] if len(ordered) == 1 else torch.cat(ordered, dim=0)
    return out


def raster_to_merge_order(height: int, width: int, merge_size: int = 2) -> torch.Tensor:
    """Index ``idx`` with ``merge_ordered = raster_ordered[idx]`` for an ``height x width`` grid."""
    rows = torch.arange(height * width).view(height, width)
    rows = rows.view(height // merge_size, merge_size, width // merge_size, merge_size)
    return rows.permute(0, 2, 1, 3).flatten()


__all__ = [
    "MLCD_DROPPED",
    "MLCD_PREFIX",
    "VIT_MAPPING",
    "mlcd_to_rice_vit_state_dict",
    "raster_to_merge_order",
]
