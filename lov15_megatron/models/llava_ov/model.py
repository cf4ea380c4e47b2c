"""LLaVA-OneVision-1.5 on Megatron-Core: Rice ViT → 2×2 patch merger → Qwen3.

The vision tower (``vision_model``) and the merger (``vision_projection``) live on the first
pipeline stage only (first virtual chunk); every stage holds its slice of the Qwen3
``language_model`` (a ``GPTModel``). On the first stage the merger output replaces, in order, the
embeddings at every ``<|image_pad|>`` position (the id ``model.vision.image_token_id``; a count
mismatch is an error), then — with sequence parallelism — the merged embeddings are scattered to
the sequence-parallel region.

Packed sequences (several sub-samples per row, micro-batch size ≥ 1) reach the model as one THD
stream ``[1, t]`` with ``PackedSeqParams`` (``cu_seqlens``), on every backend: causal attention
within each sub-sample (TE's attention or ours, :mod:`lov15_megatron.models.attention`) and RoPE
restarting per sub-sample (Megatron's ``rope`` with ``cu_seqlens``).
:func:`lov15_megatron.models.packed_seq.thd_model_inputs` builds that stream from a packed
micro-batch, cut for this context-parallel rank; ``image_feature_index`` then says which merged
image feature lands on each of the rank's ``<|image_pad|>`` tokens. Under context parallelism
each CP rank runs the towers on its own whole images only and the merged features are
all-gathered over the CP group (:mod:`~lov15_megatron.models.llava_ov.vision_cp`).

Videos: every frame is its own tower segment, exactly an image of grid ``(1, h, w)`` (its own
class token, the same 2-D RoPE positions in every frame), and the merged features of a video
replace its ``<|video_pad|>`` tokens (``model.vision.video_token_id``). They come in one of two
forms (:func:`frames_as_images`):

- the training batch (the task encoder's): each video's frames are rows of ``pixel_values`` /
  ``image_grid_thw`` with ``t = 1``, images and frames in the order of their pad tokens in the
  stream, and the ``<|image_pad|>`` and ``<|video_pad|>`` tokens together take the features in
  that order (under CP ``image_feature_index`` counts both; frames are dealt out over CP ranks as
  images);
- the HF model's inputs (``verify``): ``pixel_values_videos`` / ``video_grid_thw`` rows
  ``[t, h, w]`` beside the images, images filling the ``<|image_pad|>`` tokens and videos the
  ``<|video_pad|>`` tokens, each in order.

A micro-batch without images (text-only packs: empty ``pixel_values``) skips the towers; in
training their parameters still get zero gradients, so every parallel layout treats it like any
other (``docs/packed-sequences.md``, "Packs without images").

The module names follow Megatron's ``LLaVAModel`` (``vision_model``, ``vision_projection``,
``language_model``) and the freeze groups are ``vision``, ``merger`` and ``language``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from lov15_megatron.config import TRAINABLE_GROUPS, ConfigError, RunConfig
from lov15_megatron.config.schema import video_token_id_of
from lov15_megatron.models.llava_ov.rice_vit import (
    build_patch_merger,
    build_rice_vit,
    check_image_grid,
)
from lov15_megatron.models.llava_ov.vision_cp import ImageSplit, gather_image_features
from lov15_megatron.models.qwen3.model import build_qwen3_model, qwen3_transformer_config

GROUP_MODULES = {
    "vision": "vision_model",
    "merger": "vision_projection",
    "language": "language_model",
}


class LLaVAOneVisionModel(MegatronModule):
    """One pipeline chunk of LLaVA-OV-1.5 (vision tower and merger on the first one)."""

    def __init__(
        self,
        cfg: RunConfig,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        vp_stage: int | None = None,
    ) -> None:
        if cfg.model.vision is None:
            raise ConfigError("model.vision is required for the LLaVA-OneVision model")
        config = qwen3_transformer_config(cfg)
        super().__init__(config=config)
        ps = parallel_state
        if pre_process is None:
            pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        if post_process is None:
            post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.add_encoder = pre_process
        if self.add_encoder:
            self.vision_model = build_rice_vit(cfg)
            self.vision_projection = build_patch_merger(cfg)
        self.language_model = build_qwen3_model(
            cfg,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
            config=config,
            scatter_embedding_sequence_parallel=False,
        )
        self.share_embeddings_and_output_weights = (
            self.language_model.share_embeddings_and_output_weights
        )
        self.image_token_id = cfg.model.vision.image_token_id  # where the features go
        self.video_token_id = video_token_id_of(cfg.model.vision, cfg.model.language.vocab_size)
        self.tower_images = 0  # images the tower ran on in the last forward (this rank)

    # Pipeline / embedding hooks Megatron-Core calls on the outermost module.
    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def freeze(self, trainable: Iterable[str] | None) -> None:
        """Train only the named groups (``vision``, ``merger``, ``language``); None = all."""
        keep = set(TRAINABLE_GROUPS if trainable is None else trainable)
        unknown = keep - set(TRAINABLE_GROUPS)
        if unknown:
            raise ConfigError(f"unknown trainable group(s) {sorted(unknown)}")
        for group, attr in GROUP_MODULES.items():
            module = getattr(self, attr, None)
            if module is not None:
                for param in module.parameters():
                    param.requires_grad_(group in keep)

    def _visual_slots(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens that take vision features: ``<|image_pad|>`` and ``<|video_pad|>``."""
        is_visual = input_ids == self.image_token_id
        if self.video_token_id is not None:
            is_visual = is_visual | (input_ids == self.video_token_id)
        return is_visual

    def _merge_image_embeddings(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        image_feature_index: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings ``[s, b, h]`` with vision features at the ``<|image_pad|>`` and
        ``<|video_pad|>`` slots (the two input forms of the module docstring).

        Without ``image_feature_index`` the slots take the features in order (all of the
        micro-batch's vision tokens are here); with it (a context-parallel part of the stream),
        token ``i`` takes feature ``image_feature_index[i]`` where that is ≥ 0.
        """
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        is_image = self._visual_slots(input_ids)
        n_slots = int(is_image.sum())
        order = None
        if pixel_values_videos is not None or video_grid_thw is not None:
            if image_feature_index is not None:
                raise ValueError(
                    "pixel_values_videos under context parallelism: pass videos as frames in "
                    "pixel_values (the training batch's form)"
                )
            pixel_values, image_grid_thw, order = frames_as_images(
                input_ids,
                (self.image_token_id, self.video_token_id),
                pixel_values,
                image_grid_thw,
                pixel_values_videos,
                video_grid_thw,
                self.vision_model.spatial_merge_size,
            )
        if pixel_values is not None and pixel_values.numel() > 0:
            features = self._image_features(pixel_values, image_grid_thw)
            if order is not None:
                features = features[order]  # images' features, then the videos', by slot
            if image_feature_index is not None:
                picked = image_feature_index >= 0
                if not torch.equal(picked, is_image):
                    raise ValueError("image_feature_index does not mark the <|image_pad|> tokens")
                features = features[image_feature_index[picked]]  # this rank's slots, in order
            elif features.shape[0] != n_slots:
                grids = image_grid_thw.tolist()
                raise ValueError(
                    f"the micro-batch has {n_slots} <|image_pad|> tokens (with <|video_pad|>) "
                    f"but its images and frames give {features.shape[0]} merged features "
                    f"(image_grid_thw={grids})"
                )
            batch_first = embeddings.transpose(0, 1).clone()  # [b, s, h]: images in sample order
            batch_first[is_image] = features.to(batch_first.dtype)
            embeddings = batch_first.transpose(0, 1).contiguous()
        elif n_slots:
            raise ValueError(f"{n_slots} <|image_pad|>/<|video_pad|> tokens but no pixel_values")
        else:
            self.tower_images = 0
            zero = self._zero_tower_term()
            if zero is not None:
                embeddings = embeddings + zero
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def _zero_tower_term(self, outside_training: bool = False) -> torch.Tensor | None:
        """``0·Σp`` over every trainable tower parameter in training (with ``outside_training``
        whenever autograd records), else None.

        Where the towers do not run (a micro-batch, or under CP a rank, without images), adding
        this gives every trainable tower parameter a gradient that is exactly zero rather than
        none. Megatron DDP with overlap_grad_reduce starts a bucket's reduction only once each
        of its parameters has reported a gradient (as often as in the first step): without one
        the bucket is never reduced and DDP's bookkeeping asserts. Zero is also exactly what a
        rank without images adds to the DP reduction of the towers' gradients.
        """
        if not torch.is_grad_enabled() or not (self.training or outside_training):
            return None
        encoder = [*self.vision_model.parameters(), *self.vision_projection.parameters()]
        dummy = sum(p.sum() for p in encoder if p.requires_grad)
        return 0.0 * dummy if isinstance(dummy, torch.Tensor) else None

    def _image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> torch.Tensor:
        """Merged features ``[Σ h·w / merge², LM hidden]`` of all the micro-batch's images.

        Under context parallelism each CP rank runs the towers on its own whole images only
        (:mod:`~lov15_megatron.models.llava_ov.vision_cp`: balanced by patch count) and the
        merged features are all-gathered over the CP group; a rank without images joins the
        gather with none (and, in training, the zero term of :meth:`_zero_tower_term`). Sets
        ``tower_images``, the number of images this rank ran the tower on.
        """
        cp = parallel_state.get_context_parallel_world_size()
        if cp == 1:
            self.tower_images = int(image_grid_thw.shape[0])
            return self.vision_projection(self.vision_model(pixel_values, image_grid_thw))
        tower = self.vision_model
        grids = check_image_grid(
            pixel_values, image_grid_thw, tower.patch_dim, tower.spatial_merge_size
        )
        split = ImageSplit.of(grids, cp, tower.spatial_merge_size)
        rank = parallel_state.get_context_parallel_rank()
        mine = split.images_of(rank)
        self.tower_images = len(mine)
        if mine:
            rows = split.patch_rows(rank, pixel_values.device)
            own_grids = image_grid_thw[torch.tensor(mine, device=image_grid_thw.device)]
            local = self.vision_projection(tower(pixel_values[rows], own_grids))
        else:
            dtype = next(self.vision_projection.parameters()).dtype
            local = pixel_values.new_zeros(0, self.config.hidden_size, dtype=dtype)
            # Whenever the owners' features carry a gradient, so must this rank's (empty) part:
            # the gather's backward is a collective that every CP rank must enter.
            zero = self._zero_tower_term(outside_training=True)
            if zero is not None:
                local = local + zero
        return gather_image_features(
            local, split, rank, parallel_state.get_context_parallel_group()
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        image_feature_index: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """On the last stage: logits ``[b, s, V_padded/TP]``, or with ``labels`` and
        ``loss_mask`` the per-token losses ``[b, s]`` (0 outside the mask; see
        :mod:`lov15_megatron.models.lm_loss`). Hidden states on the other stages.

        Packed rows come as one THD stream (``input_ids`` ``[1, t]``, ``packed_seq_params`` with
        ``cu_seqlens``); without ``packed_seq_params`` every row is one causal sequence.
        ``attention_mask`` must be None (no dense masks); ``position_ids`` are not used (RoPE
        positions restart per THD segment). Videos: the module docstring.
        """
        decoder_input = None
        if self.pre_process:
            decoder_input = self._merge_image_embeddings(
                input_ids,
                pixel_values,
                image_grid_thw,
                image_feature_index,
                pixel_values_videos,
                video_grid_thw,
            )
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            packed_seq_params=packed_seq_params,
            labels=labels,
            loss_mask=loss_mask,
        )


def frames_as_images(
    input_ids: torch.Tensor,
    token_ids: tuple[int, int | None],
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    pixel_values_videos: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    merge_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The HF form (images, and videos ``[t, h, w]`` apart) as one tower input: the images' rows,
    then every video frame as an image ``(1, h, w)`` (a video's rows are frame after frame);
    and ``order``, for each vision slot of ``input_ids`` (``<|image_pad|>`` or
    ``<|video_pad|>``, in stream order) the merged feature it takes: the images' features fill
    the image slots in order, the videos' the video slots."""
    image_id, video_id = token_ids
    if video_id is None:
        raise ValueError(
            "pixel_values_videos given, but the model has no video token "
            "(model.vision.video_token_id)"
        )
    if pixel_values_videos is None or video_grid_thw is None:
        raise ValueError("pixel_values_videos and video_grid_thw go together")
    if video_grid_thw.ndim != 2 or video_grid_thw.shape[1] != 3:
        shape = tuple(video_grid_thw.shape)
        raise ValueError(f"video_grid_thw must be [num_videos, 3], got {shape}")
    frames = video_grid_thw.repeat_interleave(video_grid_thw[:, 0], dim=0).clone()
    frames[:, 0] = 1
    if pixel_values is None or image_grid_thw is None or image_grid_thw.numel() == 0:
        pixel_values = pixel_values_videos.new_zeros(0, pixel_values_videos.shape[-1])
        image_grid_thw = video_grid_thw.new_zeros(0, 3)
    n_image = int((image_grid_thw.prod(-1) // merge_size**2).sum())
    n_video = int((video_grid_thw.prod(-1) // merge_size**2).sum())
    ids = input_ids.reshape(-1)
    is_image, is_video = ids == image_id, ids == video_id
    if int(is_image.sum()) != n_image or int(is_video.sum()) != n_video:
        raise ValueError(
            f"the inputs have {int(is_image.sum())} <|image_pad|> and {int(is_video.sum())} "
            f"<|video_pad|> tokens but the images give {n_image} and the videos {n_video} "
            f"merged features (image_grid_thw={image_grid_thw.tolist()}, "
            f"video_grid_thw={video_grid_thw.tolist()})"
        )
    slot_of = torch.zeros_like(ids)
    slot_of[is_image] = torch.arange(n_image, device=ids.device)
    slot_of[is_video] = n_image + torch.arange(n_video, device=ids.device)
    order = slot_of[is_image | is_video]
    pixels = torch.cat([pixel_values.to(pixel_values_videos.dtype), pixel_values_videos])
    return pixels, torch.cat([image_grid_thw, frames.to(image_grid_thw.dtype)]), order


def build_llava_ov_model(cfg: RunConfig, vp_stage: int | None = None) -> LLaVAOneVisionModel:
    """Model provider for ``training.setup.build_model_chunks`` and the converter."""
    model = LLaVAOneVisionModel(cfg, vp_stage=vp_stage)
    model.freeze(cfg.train.trainable)
    return model
