"""MLCD → Rice ViT: the mapping rows the stage-0 builder reads the vision tower with.

The Rice ViT checkpoint the model starts from is in the layout of ``transformers``'
``MLCDVisionModel``. This module is the one table between the two, written as
:class:`~lov15_megatron.convert.mapping.ParamMapping` rows like every other mapping: the row's
target (its ``megatron`` field) is the release's on-disk Rice ViT name (``visual.…``,
docs/model-reference.md §7), its sources (``hf``) the MLCD names without the ``vision_model.``
prefix, ``*`` the layer index. ``models/llava_ov/stage0.py`` resolves every vision tensor of the
output through it. The differences it encodes:

- MLCD keeps separate ``q_proj``/``k_proj``/``v_proj``; the Rice ViT fuses them into ``qkv``
  with rows ``[Q; K; V]`` (weights and biases concatenated along dim 0: ``Concat``).
- MLCD's ``post_layernorm`` only normalises its pooled class-token output; the Rice ViT has no
  final norm (the merger's ``ln_q`` plays that role), so it has no row and is dropped
  (:data:`MLCD_DROPPED`).
- Forward-wise MLCD processes one image in raster patch order with the class token at index 0
  of ``last_hidden_state``; the Rice ViT processes 2x2-merge order and removes class tokens, so
  ``last_hidden_state[0, 1:]`` permuted from raster to merge order equals
  ``RiceViTModel.get_vision_features`` on the same image (``tests/test_hf_model.py``).
"""

from __future__ import annotations

from lov15_megatron.convert.mapping import Concat, MappingTable, ParamMapping

#: Prefix of the ViT tensor names in MLCD checkpoints saved by ``transformers`` 4.x (and the
#: released Rice ViT); ``transformers`` 5 saves the same tensors without it. Both are accepted.
MLCD_PREFIX = "vision_model."

#: MLCD tensors (unprefixed) that have no place in the Rice ViT.
MLCD_DROPPED = ("post_layernorm.weight", "post_layernorm.bias")


def mlcd_rows(hidden_size: int, rice: str = "visual.") -> list[ParamMapping]:
    """Rows: Rice ViT name under ``rice`` ⇐ unprefixed MLCD name(s), for a ViT ``hidden_size``
    wide (the ``qkv`` split sizes). ``rice="visual."`` gives the release's on-disk names,
    ``""`` the names of a bare ``RiceViTModel``."""
    qkv = Concat((hidden_size,) * 3)
    block, layer = f"{rice}blocks.*.", "encoder.layers.*."
    rows = [
        ParamMapping(f"{rice}patch_embed.proj.weight", ("embeddings.patch_embedding.weight",)),
        ParamMapping(f"{rice}class_embedding", ("embeddings.class_embedding",)),
        ParamMapping(f"{rice}class_pos_emb", ("class_pos_emb",)),
    ]
    for p in ("weight", "bias"):
        rows += [
            ParamMapping(f"{rice}pre_layernorm.{p}", (f"pre_layrnorm.{p}",)),  # MLCD's spelling
            ParamMapping(f"{block}norm1.{p}", (f"{layer}layer_norm1.{p}",)),
            ParamMapping(
                f"{block}attn.qkv.{p}",
                tuple(f"{layer}self_attn.{x}_proj.{p}" for x in "qkv"),
                qkv,
            ),
            ParamMapping(f"{block}attn.proj.{p}", (f"{layer}self_attn.out_proj.{p}",)),
            ParamMapping(f"{block}norm2.{p}", (f"{layer}layer_norm2.{p}",)),
            ParamMapping(f"{block}mlp.fc1.{p}", (f"{layer}mlp.fc1.{p}",)),
            ParamMapping(f"{block}mlp.fc2.{p}", (f"{layer}mlp.fc2.{p}",)),
        ]
    return rows


def mlcd_table(hidden_size: int, rice: str = "visual.") -> MappingTable:
    """:func:`mlcd_rows` as a table (``resolve(rice_name) -> (row, MLCD names)``)."""
    return MappingTable(mlcd_rows(hidden_size, rice))


__all__ = ["MLCD_DROPPED", "MLCD_PREFIX", "mlcd_rows", "mlcd_table"]
