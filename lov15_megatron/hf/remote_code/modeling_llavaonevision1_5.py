"""Hugging Face-side LLaVA-OneVision-1.5 model: Rice ViT + 2x2 patch merger + Qwen3 LM.

Written from the model's published description (``docs/model-reference.md``) independently of
the Megatron-Core implementation; it is the reference in parity tests and the modeling file shipped
next to exported weights. It is self-contained: it imports only ``torch``, ``transformers`` and
its sibling configuration file (relative import), so it can be copied into a checkpoint directory
and loaded with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

Videos (``pixel_values_videos`` ``[Σ t·h·w, C·p·p]``, ``video_grid_thw`` rows ``[t, h, w]``, the
temporal patch size being 1): every frame is its own ViT segment, exactly an image of grid
``(1, h, w)`` (its own class token, the same 2-D RoPE positions in each frame) and each frame's
own class token is removed after the tower (the release's training rule; its HF code removes the
later segments' class tokens at the wrong offset, which for a video hits every frame after the
first). The merged features replace the ``<|video_pad|>`` tokens (``video_token_id``) in order;
LM positions stay 1-D.

Module names equal the on-disk tensor names of the release (``visual.…``, ``model.…``,
``lm_head.weight``), so ``state_dict()`` and ``save_pretrained`` use them directly. The newer
spelling (``model.visual.…``, ``model.language_model.…``) is accepted when loading.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen3Model, Qwen3MoeModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llavaonevision1_5 import LLaVAOneVision1_5_Config, RiceViTConfig

#: Renames applied when loading a checkpoint written with the newer in-memory spelling.
ALTERNATE_KEY_MAPPING: dict[str, str] = {
    r"^model\.visual\.": "visual.",
    r"^model\.language_model\.": "model.",
}


# --------------------------------------------------------------------------------------------
# Rice ViT
# --------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (halves, not interleaved)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def merge_order_positions(height: int, width: int, merge_size: int) -> torch.Tensor:
    """(row, col) of every patch of an ``height x width`` grid in 2x2-merge order.

    The nesting is (block_row, block_col, in_row, in_col): ``row = m*block_row + in_row`` and
    ``col = m*block_col + in_col``. Returns a long tensor ``[height*width, 2]``.
    """
    rows = torch.arange(height).unsqueeze(1).expand(height, width)
    cols = torch.arange(width).unsqueeze(0).expand(height, width)

    def to_merge_order(grid: torch.Tensor) -> torch.Tensor:
        grid = grid.reshape(height // merge_size, merge_size, width // merge_size, merge_size)
        return grid.permute(0, 2, 1, 3).flatten()

    return torch.stack([to_merge_order(rows), to_merge_order(cols)], dim=-1)


def validate_image_grid(
    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, config: RiceViTConfig
) -> list[tuple[int, int]]:
    """Check ``pixel_values``/``image_grid_thw`` against each other; return ``[(h, w), ...]``."""
    if pixel_values.ndim != 2 or pixel_values.shape[1] != config.patch_dim:
        raise ValueError(
            f"pixel_values must have shape [num_patches, {config.patch_dim}], "
            f"got {tuple(pixel_values.shape)}"
        )
    if image_grid_thw.ndim != 2 or image_grid_thw.shape[1] != 3:
        raise ValueError(
            f"image_grid_thw must have shape [num_images, 3], got {tuple(image_grid_thw.shape)}"
        )
    merge = config.spatial_merge_size
    grids: list[tuple[int, int]] = []
    for index, (t, h, w) in enumerate(image_grid_thw.tolist()):
        if t != 1:
            raise ValueError(f"image {index}: grid t={t}; only images (t=1) are supported")
        if h <= 0 or w <= 0 or h % merge or w % merge:
            raise ValueError(
                f"image {index}: grid h={h}, w={w} must be positive multiples of the merge "
                f"size {merge}"
            )
        grids.append((h, w))
    total = sum(h * w for h, w in grids)
    if total != pixel_values.shape[0]:
        raise ValueError(
            f"image_grid_thw describes {total} patches but pixel_values has "
            f"{pixel_values.shape[0]} rows"
        )
    return grids


def video_frame_grids(video_grid_thw: torch.Tensor) -> torch.Tensor:
    """``[n_videos, 3]`` rows ``[t, h, w]`` -> ``[Σ t, 3]`` rows ``[1, h, w]``: every frame as an
    image (a video's ``pixel_values_videos`` rows are its frames one after another)."""
    if video_grid_thw.ndim != 2 or video_grid_thw.shape[1] != 3:
        raise ValueError(
            f"video_grid_thw must have shape [num_videos, 3], got {tuple(video_grid_thw.shape)}"
        )
    if bool((video_grid_thw[:, 0] <= 0).any()):
        raise ValueError(f"video_grid_thw {video_grid_thw.tolist()}: every video needs frames")
    frames = video_grid_thw.repeat_interleave(video_grid_thw[:, 0], dim=0).clone()
    frames[:, 0] = 1
    return frames


class RiceViTPatchEmbed(nn.Module):
    """Conv2d patch embedding (kernel = stride = patch size, no bias) on flattened patches."""

    def __init__(self, config: RiceViTConfig) -> None:
        super().__init__()
        self.in_channels = config.in_channels
        self.patch_size = config.patch_size
        self.proj = nn.Conv2d(
            config.in_channels,
            config.embed_dim,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=False,
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, C*p*p]`` (channel-major rows) -> ``[N, embed_dim]``."""
        patches = pixel_values.view(-1, self.in_channels, self.patch_size, self.patch_size)
        patches = patches.to(self.proj.weight.dtype)
        return self.proj(patches).view(patches.shape[0], -1)


class RiceViTAttention(nn.Module):
    """Bidirectional multi-head attention with fused ``qkv`` (rows ``[Q; K; V]``) and 2-D RoPE."""

    def __init__(self, config: RiceViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=True)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim, bias=True)

    def forward(
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]
    ) -> torch.Tensor:
        """Attend within each packed segment of ``seqlens`` tokens; ``cos``/``sin`` are fp32."""
        seq_len = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).view(seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.unbind(dim=1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query = (query.float() * cos + rotate_half(query.float()) * sin).to(value.dtype)
        key = (key.float() * cos + rotate_half(key.float()) * sin).to(value.dtype)
        outputs = []
        for q, k, v in zip(
            query.split(seqlens), key.split(seqlens), value.split(seqlens), strict=True
        ):
            # [L, H, D] -> [1, H, L, D]; full (non-causal) attention inside one image
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0),
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                scale=self.head_dim**-0.5,
            )
            outputs.append(out.squeeze(0).transpose(0, 1).reshape(q.shape[0], -1))
        return self.proj(torch.cat(outputs, dim=0))


class RiceViTMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with biases; the activation is exact GELU by default."""

    def __init__(self, config: RiceViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.intermediate_size, bias=True)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.embed_dim, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class RiceViTBlock(nn.Module):
    """Pre-LN transformer block: ``x += attn(norm1(x))``; ``x += mlp(norm2(x))``."""

    def __init__(self, config: RiceViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = RiceViTAttention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = RiceViTMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), cos, sin, seqlens)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class RiceViTPatchMerger(nn.Module):
    """LayerNorm per patch -> concat each 2x2 block -> Linear -> GELU -> Linear (to LM width)."""

    def __init__(self, config: RiceViTConfig) -> None:
        super().__init__()
        merged = config.embed_dim * config.spatial_merge_size**2
        out_dim = config.text_hidden_size or config.embed_dim
        self.merged_dim = merged
        self.ln_q = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(merged, merged, bias=True),
            nn.GELU(),
            nn.Linear(merged, out_dim, bias=True),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[Σ h·w, embed_dim]`` in 2x2-merge order -> ``[Σ h·w / 4, text_hidden_size]``."""
        return self.mlp(self.ln_q(features).view(-1, self.merged_dim))


class RiceViTPreTrainedModel(PreTrainedModel):
    """Weight initialisation shared by the vision tower and the full model."""

    config: RiceViTConfig
    config_class = RiceViTConfig
    base_model_prefix = "visual"
    main_input_name = "pixel_values"
    _no_split_modules = ["RiceViTBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RiceViTModel):
            width = module.config.embed_dim
            init.normal_(module.class_embedding, mean=0.0, std=width**-0.5)
            init.normal_(module.class_pos_emb, mean=0.0, std=(module.config.head_dim // 2) ** -0.5)


class RiceViTModel(RiceViTPreTrainedModel):
    """Rice ViT over packed variable-resolution images, with the 2x2 patch merger on top.

    ``pixel_values`` ``[Σ h·w, C·p·p]`` hold every image's patches in 2x2-merge order and
    ``grid_thw`` ``[n_images, 3]`` their grids (t = 1). Each image gets its own class token
    (``class_embedding``, rotary angles ``class_pos_emb``); attention is confined to each image.
    :meth:`get_vision_features` returns the ViT output with the class tokens removed,
    :meth:`forward` the merger output (one LM token per 2x2 block).
    """

    def __init__(self, config: RiceViTConfig) -> None:
        super().__init__(config)
        self.patch_embed = RiceViTPatchEmbed(config)
        self.class_embedding = nn.Parameter(torch.zeros(config.embed_dim))
        self.class_pos_emb = nn.Parameter(torch.zeros(1, config.head_dim // 2))
        self.pre_layernorm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList([RiceViTBlock(config) for _ in range(config.depth)])
        self.merger = RiceViTPatchMerger(config)
        self.post_init()

    def rotary_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """``theta^(-2j/(d/2))`` for ``j = 0..d/4-1`` (d = head dim), fp32."""
        axis_dim = self.config.head_dim // 2
        exponents = torch.arange(0, axis_dim, 2, dtype=torch.float32, device=device) / axis_dim
        return 1.0 / (self.config.rope_theta**exponents)

    def rotary_angles(self, grids: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """Per-token angles ``[Σ (h·w + 1), d/2]`` (fp32): class token first in each image."""
        inv_freq = self.rotary_inv_freq(device)
        class_angles = self.class_pos_emb.float()
        pieces = []
        for h, w in grids:
            positions = merge_order_positions(h, w, self.config.spatial_merge_size).to(device)
            angles = positions.float().unsqueeze(-1) * inv_freq  # [h*w, 2, d/4], row first
            pieces += [class_angles, angles.flatten(1)]
        return torch.cat(pieces, dim=0)

    def get_vision_features(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> torch.Tensor:
        """ViT output ``[Σ h·w, embed_dim]`` in 2x2-merge order, each class token removed."""
        grids = validate_image_grid(pixel_values, grid_thw, self.config)
        patches = self.patch_embed(pixel_values)
        counts = [h * w for h, w in grids]
        cls = self.class_embedding.to(patches.dtype).unsqueeze(0)
        pieces = []
        for image_patches in patches.split(counts):
            pieces += [cls, image_patches]
        hidden_states = self.pre_layernorm(torch.cat(pieces, dim=0))

        angles = self.rotary_angles(grids, patches.device)
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        seqlens = [n + 1 for n in counts]
        for block in self.blocks:
            hidden_states = block(hidden_states, cos, sin, seqlens)

        # Drop exactly each image's own class token (the first token of every segment).
        keep = torch.ones(hidden_states.shape[0], dtype=torch.bool, device=hidden_states.device)
        starts = torch.tensor([0, *seqlens[:-1]], device=hidden_states.device).cumsum(0)
        keep[starts] = False
        return hidden_states[keep]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merger output ``[Σ h·w / 4, text_hidden_size]`` in image order."""
        return self.merger(self.get_vision_features(pixel_values, grid_thw))


# --------------------------------------------------------------------------------------------
# Full model
# --------------------------------------------------------------------------------------------


#: The language model by ``text_config.model_type`` (dense Qwen3 or Qwen3-MoE).
TEXT_MODELS = {"qwen3": Qwen3Model, "qwen3_moe": Qwen3MoeModel}


class LLaVAOneVision1_5_PreTrainedModel(PreTrainedModel):
    """Base class of the composite model (config class, capabilities, initialisation)."""

    config: LLaVAOneVision1_5_Config
    config_class = LLaVAOneVision1_5_Config
    base_model_prefix = "model"
    _no_split_modules = ["RiceViTBlock", "Qwen3DecoderLayer", "Qwen3MoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, RiceViTModel):
            RiceViTPreTrainedModel._init_weights(module, module)


class LLaVAOneVision1_5_ForConditionalGeneration(
    LLaVAOneVision1_5_PreTrainedModel, GenerationMixin
):
    """Rice ViT + merger + Qwen3 LM producing next-token logits over the text vocabulary.

    Children: ``visual`` (:class:`RiceViTModel`, merger included), ``model``
    (``transformers.Qwen3Model``, or ``Qwen3MoeModel`` for a ``qwen3_moe`` text config) and
    ``lm_head``. The merger output replaces, in order, the
    embeddings at every ``image_token_id`` position; positions are plain 1-D.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LLaVAOneVision1_5_Config) -> None:
        super().__init__(config)
        self.visual = RiceViTModel._from_config(config.vision_config)
        self.model = TEXT_MODELS[config.text_config.model_type]._from_config(config.text_config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained`` that also accepts the newer key spelling.

        Keys ``model.visual.*`` / ``model.language_model.*`` are renamed to ``visual.*`` /
        ``model.*``. The renaming is not remembered, so ``save_pretrained`` always writes the
        release's on-disk names.
        """
        user_mapping = kwargs.pop("key_mapping", None) or {}
        kwargs["key_mapping"] = {**ALTERNATE_KEY_MAPPING, **user_mapping}
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._weight_conversions = None
        return loaded

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> nn.Module:
        return self.model

    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> torch.Tensor:
        """Merger output ``[Σ h·w / 4, text hidden]`` for packed images."""
        return self.visual(pixel_values, image_grid_thw)

    def get_video_features(
        self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor
    ) -> torch.Tensor:
        """Merger output ``[Σ t·h·w / 4, text hidden]`` for packed videos: every frame one ViT
        segment with its own class token (removed after the tower)."""
        return self.visual(pixel_values_videos, video_frame_grids(video_grid_thw))

    def merge_image_features(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        image_features: torch.Tensor,
        token_id: int | None = None,
        kind: str = "image",
    ) -> torch.Tensor:
        """Replace, in order, the embeddings at every ``image_token_id`` position (or
        ``token_id``'s, e.g. the video token for ``kind="video"``).

        Raises ``ValueError`` if the number of tokens differs from the number of feature rows
        (never truncates).
        """
        token_id = self.config.image_token_id if token_id is None else token_id
        unit = "frame" if kind == "video" else "image"
        mask = input_ids == token_id
        num_tokens = int(mask.sum())
        if num_tokens != image_features.shape[0]:
            raise ValueError(
                f"{kind.capitalize()} features and {kind} tokens do not match: the text has "
                f"{num_tokens} {kind} tokens (id {token_id}) but the {kind}s give "
                f"{image_features.shape[0]} features (h*w/4 per {unit})"
            )
        mask = mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_token_type_ids: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Compute logits (and the mean next-token loss if ``labels`` are given).

        ``pixel_values`` ``[Σ h·w, 588]`` (2x2-merge order) and ``image_grid_thw``
        ``[n_images, 3]`` describe the images of the whole batch, in the order their
        ``<|image_pad|>`` runs appear in ``input_ids`` (row-major over the batch).

        The other keys that our processor and transformers' Qwen2/2.5-VL processors return are
        accepted: ``mm_token_type_ids`` (1 at image tokens, 2 at video tokens; checked against
        ``input_ids`` when both cover the same positions); ``second_per_grid_ts`` is ignored (LM
        positions are 1-D).

        Videos: ``pixel_values_videos`` ``[Σ t·h·w, 588]`` (frame after frame, each in 2x2-merge
        order) and ``video_grid_thw`` ``[n_videos, 3]`` rows ``[t, h, w]``, in the order of their
        ``<|video_pad|>`` runs (module docstring).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        if mm_token_type_ids is not None and input_ids is not None:
            if mm_token_type_ids.shape == input_ids.shape:
                for value, token_id, kind in (
                    (1, self.config.image_token_id, "image"),
                    (2, self.config.video_token_id, "video"),
                ):
                    if not torch.equal(mm_token_type_ids == value, input_ids == token_id):
                        raise ValueError(
                            f"mm_token_type_ids do not mark the {kind} tokens of input_ids "
                            f"(id {token_id}): the processor's output was altered"
                        )
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)

        prefilled = past_key_values is not None and past_key_values.get_seq_length() > 0
        for values, grid, values_name, grid_name, token_id, kind, features_of in (
            (pixel_values, image_grid_thw, "pixel_values", "image_grid_thw",
             self.config.image_token_id, "image", self.get_image_features),
            (pixel_values_videos, video_grid_thw, "pixel_values_videos", "video_grid_thw",
             self.config.video_token_id, "video", self.get_video_features),
        ):  # fmt: skip
            if values is not None:
                if grid is None:
                    raise ValueError(f"{values_name} were given without {grid_name}")
                if input_ids is None:
                    raise ValueError(f"{values_name} need input_ids to locate the {kind} tokens")
                inputs_embeds = self.merge_image_features(
                    input_ids, inputs_embeds, features_of(values, grid), token_id, kind
                )
            elif input_ids is not None and not prefilled and bool((input_ids == token_id).any()):
                raise ValueError(
                    f"{kind.capitalize()} features and {kind} tokens do not match: input_ids "
                    f"contain {kind} tokens (id {token_id}) but no {values_name} were given"
                )

        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        else:
            keep = logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                **kwargs,
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "ALTERNATE_KEY_MAPPING",
    "LLaVAOneVision1_5_ForConditionalGeneration",
    "LLaVAOneVision1_5_PreTrainedModel",
    "RiceViTModel",
    "RiceViTPreTrainedModel",
    "merge_order_positions",
    "video_frame_grids",
]
