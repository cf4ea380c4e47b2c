"""The ``llava-ov-1.5`` family: the Rice ViT and merger over a registered language family.

The HF side is the release's on-disk layout (``visual.…``, ``model.…``, ``lm_head.weight``);
``mcore-to-hf`` writes ``config.json`` with ``auto_map`` and the remote code of
``lov15_megatron/hf/remote_code`` next to the weights, so an export loads with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from lov15_megatron.config import RunConfig
from lov15_megatron.config.schema import IMAGE_TOKEN_FIELDS, video_token_id_of
from lov15_megatron.convert.converter import conversion_run_config
from lov15_megatron.convert.mapping import ConversionError, MappingTable
from lov15_megatron.data.special_tokens import FIRST_SPECIAL_ID
from lov15_megatron.models.llava_ov.hf_mapping import (
    hf_vision_config,
    llava_ov_rows,
    vision_config_from_hf,
    vision_of,
)
from lov15_megatron.models.registry import (
    ModelFamily,
    families,
    language_family,
    language_family_of_hf,
    register_family,
)

#: The vision token ids read from (and, where set, written to) ``config.json``'s top level.
VISION_TOKEN_FIELDS = (*IMAGE_TOKEN_FIELDS, "video_token_id")


@register_family
class LLaVAOneVision(ModelFamily):
    """LLaVA-OV-1.5 for the trainer, the converter, ``verify`` and the HF export.

    The language model is any registered LM family (``qwen3``, ``qwen3-moe``): picked by the
    HF ``text_config.model_type`` on the way in and by ``model.language`` on the way out.
    """

    name = "llava-ov-1.5"
    summary = "LLaVA-OneVision-1.5: Rice ViT + merger over a qwen3 or qwen3-moe LM"
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
        # The image block's ids are top-level config.json fields of the same names (absent:
        # the release's ids, as in the HF configuration class).
        ids = {name: hf_config[name] for name in VISION_TOKEN_FIELDS if name in hf_config}
        vision = replace(vision_config_from_hf(hf_config["vision_config"]), **ids)
        return conversion_run_config({"language": asdict(lm), "vision": asdict(vision)}, tp, pp)

    def accepts(self, cfg: RunConfig) -> bool:
        return cfg.model.vision is not None

    def table(self, cfg: RunConfig) -> MappingTable:
        return MappingTable(llava_ov_rows(cfg))

    def build_model(self, cfg: RunConfig, vp_stage: int | None = None) -> torch.nn.Module:
        from lov15_megatron.models.llava_ov.model import build_llava_ov_model

        return build_llava_ov_model(cfg, vp_stage=vp_stage)

    def tower_prefixes(self) -> dict[str, str]:
        """The freeze groups' modules: ``vision_model.``, ``vision_projection.``,
        ``language_model.``."""
        from lov15_megatron.models.llava_ov.model import GROUP_MODULES

        return {group: f"{module}." for group, module in GROUP_MODULES.items()}

    def forward_inputs(
        self, cfg: RunConfig, batch: dict[str, Any], layout: dict[str, int]
    ) -> dict[str, Any]:
        from lov15_megatron.models.llava_ov.step import vlm_model_inputs

        v = vision_of(cfg)
        video = video_token_id_of(v, cfg.model.language.vocab_size)
        return vlm_model_inputs(batch, layout, v.image_token_id, video)

    def step_losses(self, cfg: RunConfig, num_microbatches: int) -> dict[str, float]:
        """The language model's (router losses of a qwen3-moe LM)."""
        return language_family(cfg.model.language).step_losses(cfg, num_microbatches)

    def discard_step_losses(self) -> None:
        for family in families().values():
            if family.is_language_model:
                family.discard_step_losses()

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
                **hf_vision_config(vision_of(cfg), lm.hidden_size),
            },
            tie_word_embeddings=False,
            **{name: getattr(vision_of(cfg), name) for name in IMAGE_TOKEN_FIELDS},
        )
        video = vision_of(cfg).video_token_id
        if video is not None:  # None: the template's (or the HF default 151656)
            out["video_token_id"] = video
        return out

    def write_extra(self, directory: Path, image: Any = None) -> None:
        """The code next to the weights (``auto_map`` points at it) and every processor,
        tokenizer, chat-template and generation file the directory does not have yet (files
        copied from ``--hf-template`` stay byte for byte; ``image`` rewrites the processor's
        image settings)."""
        from lov15_megatron.hf.export import write_hf_assets, write_model_code

        write_model_code(directory)
        write_hf_assets(directory, image=image, keep_existing=True)

    def hf_model_class(self) -> type:
        from lov15_megatron.hf import LLaVAOneVision1_5_ForConditionalGeneration

        return LLaVAOneVision1_5_ForConditionalGeneration

    def default_inputs(self, cfg: RunConfig, seed: int = 0) -> dict[str, torch.Tensor]:
        """Two rows with text, three images of different sizes and, when the model has a video
        token, a two-frame video before the second row's image (``pixel_values_videos``,
        ``video_grid_thw``: the HF model's form); the vision blocks use the config's token ids,
        the text none of them."""
        v = vision_of(cfg)
        video_id = video_token_id_of(v, cfg.model.language.vocab_size)
        ids = [getattr(v, name) for name in IMAGE_TOKEN_FIELDS]
        special = torch.tensor(ids + ([] if video_id is None else [video_id]))
        text_ids = torch.arange(min(cfg.model.language.vocab_size, FIRST_SPECIAL_ID))
        text_ids = text_ids[~torch.isin(text_ids, special)]
        gen = torch.Generator().manual_seed(seed)
        grids = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4]])
        merge = v.spatial_merge_size**2
        n_tokens = [int(g.prod()) // merge for g in grids]
        patch = v.in_channels * v.patch_size**2
        pixels = torch.randn(int(grids.prod(-1).sum()), patch, generator=gen)

        def text(n: int) -> list[int]:
            return text_ids[torch.randint(0, len(text_ids), (n,), generator=gen)].tolist()

        def image(n: int, pad: int = v.image_token_id) -> list[int]:
            return [v.vision_start_token_id, *([pad] * n), v.vision_end_token_id]

        row0 = text(3) + image(n_tokens[0]) + text(4) + image(n_tokens[1]) + text(2)
        row1 = text(5) + image(n_tokens[2]) + text(3)
        videos: dict[str, torch.Tensor] = {}
        if video_id is not None:
            video_grid = torch.tensor([[2, 2, 4]])  # two frames of 2×4 patches each
            video_pixels = torch.randn(int(video_grid.prod()), patch, generator=gen)
            row1 = text(2) + image(int(video_grid.prod()) // merge, video_id) + row1
            videos = {"pixel_values_videos": video_pixels, "video_grid_thw": video_grid}
        length = max(len(row0), len(row1))
        row0 += text(length - len(row0))
        row1 += text(length - len(row1))
        return {
            "input_ids": torch.tensor([row0, row1]),
            "pixel_values": pixels,
            "image_grid_thw": grids,
            **videos,
        }
