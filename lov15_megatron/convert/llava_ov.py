"""LLaVA-OneVision-1.5: the HF ⇄ Megatron table (Rice ViT + merger + Qwen3) and configs.

The HF side is the release's on-disk layout (``visual.…``, ``model.…``, ``lm_head.weight``);
``mcore-to-hf`` writes ``config.json`` with ``auto_map`` and the modeling code from
``lov15_megatron/hf`` next to the weights, so an export loads with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lov15_megatron.config import RunConfig, config_from_dict
from lov15_megatron.convert.converter import Converter, parallel_layout
from lov15_megatron.convert.mapping import ConversionError, MappingTable
from lov15_megatron.convert.registry import language_family, language_family_of_hf
from lov15_megatron.convert.rice_vit import hf_vision_config, rice_vit_rows, vision_config_from_hf
from lov15_megatron.data.special_tokens import IMAGE_PAD_ID, VISION_END_ID, VISION_START_ID


class LLaVAOneVisionConverter(Converter):
    """What the generic converter (``convert/core.py``) needs to know about LLaVA-OV-1.5.

    The language model is any registered LM family (``qwen3``, ``qwen3-moe``): picked by the
    HF ``text_config.model_type`` on the way in and by ``model.language`` on the way out.
    """

    name = "llava-ov-1.5"
    hf_architecture = "LLaVAOneVision1_5_ForConditionalGeneration"

    def run_config(self, hf_config: dict[str, Any], tp: int = 1, pp: int = 1) -> RunConfig:
        if "text_config" not in hf_config or "vision_config" not in hf_config:
            raise ConversionError("config.json has no text_config/vision_config: not LLaVA-OV-1.5")
        lm = language_family_of_hf(hf_config["text_config"]).language_config(
            hf_config["text_config"]
        )
        if not lm.untie_embeddings_and_output_weights:
            raise ConversionError(
                "text_config.tie_word_embeddings=true: LLaVA-OV-1.5 keeps lm_head separate "
                "(build stage-0 checkpoints with tools/make_stage0.py, which unties them)"
            )
        vision = vision_config_from_hf(hf_config["vision_config"])
        return config_from_dict(
            {
                "model": {"language": asdict(lm), "vision": asdict(vision)},
                "parallel": parallel_layout(lm, tp, pp),
                "data": {"seq_length": min(32, lm.max_position_embeddings)},
                "runtime": {"device": "cpu"},
            },
            source="config.json",
        )

    def table(self, cfg: RunConfig) -> MappingTable:
        family = language_family(cfg.model.language)
        rows = rice_vit_rows(cfg) + family.rows(cfg, mcore="language_model.", hf="model.")
        return MappingTable(rows)

    def build_model(self, cfg: RunConfig, vp_stage: int | None = None):
        from lov15_megatron.models.llava_ov import build_llava_ov_model

        return build_llava_ov_model(cfg, vp_stage=vp_stage)

    def hf_config(self, cfg: RunConfig, template: dict[str, Any]) -> dict[str, Any]:
        from lov15_megatron.hf.export import AUTO_MAP

        lm = cfg.model.language
        family = language_family(lm)
        text_template = template.get("text_config", {"model_type": family.hf_model_type})
        text = family.hf_text_config(lm, text_template)
        text.setdefault("model_type", family.hf_model_type)
        out = dict(template)
        out.update(
            model_type="llavaonevision1_5",
            architectures=[self.hf_architecture],
            auto_map=dict(AUTO_MAP),
            text_config=text,
            vision_config={
                **template.get("vision_config", {}),
                **hf_vision_config(cfg.model.vision, lm.hidden_size),
            },
            tie_word_embeddings=False,
        )
        out.setdefault("image_token_id", IMAGE_PAD_ID)
        out.setdefault("vision_start_token_id", VISION_START_ID)
        out.setdefault("vision_end_token_id", VISION_END_ID)
        return out

    def write_extra(self, directory: Path, image: Any = None) -> None:
        """The code next to the weights (``auto_map`` points at it) and every processor,
        tokenizer, chat-template and generation file the directory does not have yet (files
        copied from ``--hf-template`` stay byte for byte; ``image`` rewrites the processor's
        image settings)."""
        from lov15_megatron.hf.export import write_hf_assets, write_model_code

        write_model_code(directory)
        write_hf_assets(directory, image=image, keep_existing=True)

    def hf_model_class(self):
        from lov15_megatron.hf import LLaVAOneVision1_5_ForConditionalGeneration

        return LLaVAOneVision1_5_ForConditionalGeneration

    def default_inputs(self, cfg: RunConfig, seed: int = 0) -> dict[str, torch.Tensor]:
        """Two rows with text and three images of different sizes (one row text-only)."""
        v = cfg.model.vision
        gen = torch.Generator().manual_seed(seed)
        grids = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4]])
        merge = v.spatial_merge_size**2
        n_tokens = [int(g.prod()) // merge for g in grids]
        patch = v.in_channels * v.patch_size**2
        pixels = torch.randn(int(grids.prod(-1).sum()), patch, generator=gen)

        def text(n: int) -> list[int]:
            return torch.randint(
                0, min(cfg.model.language.vocab_size, 151643), (n,), generator=gen
            ).tolist()

        def image(n: int) -> list[int]:
            return [VISION_START_ID, *([IMAGE_PAD_ID] * n), VISION_END_ID]

        row0 = text(3) + image(n_tokens[0]) + text(4) + image(n_tokens[1]) + text(2)
        row1 = text(5) + image(n_tokens[2]) + text(3)
        length = max(len(row0), len(row1))
        row0 += text(length - len(row0))
        row1 += text(length - len(row1))
        return {
            "input_ids": torch.tensor([row0, row1]),
            "pixel_values": pixels,
            "image_grid_thw": grids,
        }


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "config.json").read_text())
