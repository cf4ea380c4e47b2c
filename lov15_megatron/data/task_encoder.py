"""Energon task encoder: packs (or single samples) → model-ready batches.

``encode_sample`` splits a :class:`.energon_dataset.PackedVLMSample` into its sub-samples, encodes
each with exactly the packer's code (:func:`.chat.encode_conversation` with image token counts
from :func:`.image_processing.preprocess_image`), checks each length against the one the packer
recorded, and concatenates them.

Batch layout (:class:`VLMBatch`, micro-batch size B ≥ 1):

- ``input_ids``, ``labels``, ``loss_mask``, ``position_ids``: ``[B, S]``, S = longest pack
  (rounded up to ``pad_to_multiple_of``); shorter packs are padded with ``<|endoftext|>``,
  label -100, loss mask 0;
- ``labels`` are already shifted (see :mod:`.chat`): ``labels[b, i]`` is the target at position
  ``i``; ``loss_mask = labels != -100`` as float;
- ``position_ids`` restart at 0 for every sub-sample (and for every padding tail);
- ``cu_seqlens`` (int32, ``[n_segments + 1]``) are the segment boundaries of the *flattened*
  ``[B·S]`` token stream: each sub-sample is one segment, each pack's padding tail is one more
  segment; so ``input_ids.view(1, -1)`` with ``cu_seqlens`` is a valid THD packed batch, and row
  ``b`` of ``[B, S]`` holds exactly the segments between offsets ``b·S`` and ``(b+1)·S``;
  ``max_seqlen`` is the longest segment;
- ``pixel_values`` ``[Σ h·w, 588]`` and ``image_grid_thw`` ``[n_images, 3]``: all images *and
  video frames* of the batch in the order of their ``<|image_pad|>`` / ``<|video_pad|>`` runs in
  the flattened token stream; a video of ``t`` frames is ``t`` rows ``(1, h, w)``, its frames one
  after another (every frame is its own ViT segment, as an image is).

Videos (packed with ``pack_offline.py --videos pack``, layout in :mod:`.pack_format`): the
frames the packer chose (the sub-sample's ``videos[k].frames``, indices into the decoded frames
of the stored video file or into its stored frame images) are decoded with
:mod:`.video`'s decoder, resized (bicubic) to ``grid_thw[1:] · 14`` and normalised like images;
nothing is sampled again. A video that no longer decodes is a one-line :class:`ValueError`
naming the pack and sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from megatron.energon import Batch, DefaultTaskEncoder, Sample, edataclass

from .chat import EncodedText, Message, check_kind, encode_conversation
from .energon_dataset import PackedVLMSample
from .image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_IMAGE_CONFIG,
    PATCH_DIM,
    PATCH_SIZE,
    ImageConfig,
    ProcessedImage,
    decode_image,
    patchify,
    preprocess_image,
)
from .special_tokens import IGNORE_INDEX, IMAGE_PAD_ID, PAD_ID, VIDEO_PAD_ID
from .tokenizer import Tokenizer
from .video import VideoError, decode_frames, resize_frames


@edataclass
class EncodedPack(Sample):
    """One pack, tokenised and with processed images (before batching)."""

    input_ids: torch.Tensor  # [L] int64
    labels: torch.Tensor  # [L] int64, shifted, -100 = no loss
    position_ids: torch.Tensor  # [L] int64, restart per sub-sample
    seqlens: list[int]  # sub-sample lengths, Σ = L
    pixel_values: torch.Tensor  # [Σ h·w, 588] float32
    image_grid_thw: torch.Tensor  # [n_images, 3] int64
    sample_ids: list[str]  # each sample's origin ("file:record N"), or its packer id


@edataclass
class VLMBatch(Batch):
    """A micro-batch of packs (layout in the module docstring)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    seqlens: list[list[int]]
    sample_ids: list[list[str]]


def frame_pixel_values(frames: np.ndarray) -> np.ndarray:
    """Frames ``[t, H, W, 3]`` uint8 (already at their multiple-of-28 size) → ``[t·h·w, 588]``
    float32: each frame rescaled, CLIP-normalised and patchified exactly as an image
    (:func:`.image_processing.preprocess_image` after its resize), frame after frame."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    rows = []
    for frame in frames:
        pixels = np.asarray(frame, dtype=np.float32) * (1.0 / 255.0)
        rows.append(patchify(((pixels - mean) / std).transpose(2, 0, 1)))
    return np.concatenate(rows)


def load_packed_video(video: dict[str, Any], parts: dict[str, bytes]) -> list[ProcessedImage]:
    """The frames of one packed video (a ``videos`` entry of :mod:`.pack_format`) as images
    ``(1, h, w)``, in order: decoded at the stored frame indices, resized to the stored grid.
    Raises :class:`.video.VideoError` if the stored bytes do not give those frames."""
    t, h, w = (int(x) for x in video["grid_thw"])
    indices = [int(i) for i in video["frames"]]
    if len(indices) != t:
        raise VideoError(f"{len(indices)} frame indices for grid_thw t={t}")
    names = video["parts"]
    if video.get("fps") is None:  # frame images: the indices point into the parts
        frames = np.stack([np.asarray(decode_image(parts[names[i]])) for i in indices])
    else:  # a video file: the indices point into its decoded frames
        frames = decode_frames(parts[names[0]], indices)
    frames = resize_frames(frames, h * PATCH_SIZE, w * PATCH_SIZE)
    pixels = frame_pixel_values(frames)
    per_frame = h * w
    return [
        ProcessedImage(pixels[i * per_frame : (i + 1) * per_frame], (1, h, w)) for i in range(t)
    ]


def encode_subsample(
    record: dict[str, Any],
    images: dict[str, bytes],
    tokenizer: Tokenizer,
    kind: str,
    image_config: ImageConfig,
) -> tuple[EncodedText, list[ProcessedImage]]:
    """Tokens/labels of one sub-sample record of a pack, and its processed images and video
    frames in the order of their pad runs in the tokens (see the module docstring)."""
    messages = [Message(turn["role"], turn["content"]) for turn in record["messages"]]
    processed = [preprocess_image(images[name], image_config) for name in record["images"]]
    videos = [load_packed_video(video, images) for video in record.get("videos") or ()]
    text = encode_conversation(
        tokenizer,
        messages,
        [image.num_tokens for image in processed],
        kind,
        [sum(frame.num_tokens for frame in frames) for frames in videos],
    )
    if not videos:
        return text, processed
    # Images and videos in the order their pad runs appear (a <video> may precede an <image>).
    ordered: list[ProcessedImage] = []
    next_image = next_video = 0
    previous = None
    for token in text.input_ids:
        if token == IMAGE_PAD_ID and previous != IMAGE_PAD_ID:
            ordered.append(processed[next_image])
            next_image += 1
        elif token == VIDEO_PAD_ID and previous != VIDEO_PAD_ID:
            ordered.extend(videos[next_video])
            next_video += 1
        previous = token
    return text, ordered


class VLMTaskEncoder(DefaultTaskEncoder[PackedVLMSample, EncodedPack, VLMBatch, VLMBatch]):
    """Task encoder for packed and unpacked VLM datasets.

    Args:
        tokenizer: the tokenizer (same as the packer's).
        image_config: pixel budget (same as the packer's).
        default_kind: sample kind when the dataset sets no ``kind`` subflavor (the packer always
            sets one); ``None`` makes a missing kind an error.
        seq_len: if set, packs longer than this are an error.
        pad_to_multiple_of: round the batch's sequence length up to a multiple of this (e.g.
            TP size with sequence parallelism).
        check_lengths: compare each sub-sample's length with the packer's recorded one.
    """

    decoder = None  # images arrive as encoded bytes

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_config: ImageConfig = DEFAULT_IMAGE_CONFIG,
        default_kind: str | None = None,
        seq_len: int | None = None,
        pad_to_multiple_of: int = 1,
        check_lengths: bool = True,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.default_kind = check_kind(default_kind) if default_kind is not None else None
        self.seq_len = seq_len
        self.pad_to_multiple_of = pad_to_multiple_of
        self.check_lengths = check_lengths

    def kind_of(self, sample: Sample) -> str:
        kind = (sample.__subflavors__ or {}).get("kind", self.default_kind)
        if kind is None:
            raise ValueError(
                f"{sample.__key__}: dataset sets no 'kind' subflavor and no default_kind given"
            )
        return check_kind(kind)

    def encode_sample(self, sample: PackedVLMSample) -> EncodedPack:  # type: ignore[override]
        kind = self.kind_of(sample)
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        seqlens: list[int] = []
        pixels: list[np.ndarray] = []
        grids: list[tuple[int, int, int]] = []
        for record in sample.samples:
            try:
                text, processed = encode_subsample(
                    record, sample.images, self.tokenizer, kind, self.image_config
                )
            except VideoError as error:
                raise ValueError(
                    f"{sample.__key__}/{record.get('origin') or record.get('id')}: packed video "
                    f"unusable: {error}"
                ) from error
            expected = record.get("length")
            if self.check_lengths and expected is not None and expected != len(text):
                raise ValueError(
                    f"{sample.__key__}/{record.get('id')}: encoded length {len(text)} != packer "
                    f"length {expected} (different tokenizer, pixel budget or kind?)"
                )
            ids.extend(text.input_ids)
            labels.extend(text.labels)
            positions.extend(range(len(text)))
            seqlens.append(len(text))
            pixels.extend(image.pixel_values for image in processed)
            grids.extend(image.grid_thw for image in processed)
        if self.seq_len is not None and len(ids) > self.seq_len:
            raise ValueError(f"{sample.__key__}: pack has {len(ids)} tokens > {self.seq_len}")
        return EncodedPack.derive_from(
            sample,
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
            seqlens=seqlens,
            pixel_values=(
                torch.from_numpy(np.concatenate(pixels))
                if pixels
                else torch.zeros(0, PATCH_DIM, dtype=torch.float32)
            ),
            image_grid_thw=torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
            # "file:record" of every sample: unique across packing runs (held-out checks).
            sample_ids=[str(record.get("origin") or record.get("id")) for record in sample.samples],
        )

    def batch(self, samples: list[EncodedPack]) -> VLMBatch:  # type: ignore[override]
        return collate_packs(samples, self.pad_to_multiple_of)

    def encode_batch(self, batch: VLMBatch) -> VLMBatch:  # type: ignore[override]
        return batch


def collate_packs(packs: Sequence[EncodedPack], pad_to_multiple_of: int = 1) -> VLMBatch:
    """Batch encoded packs (layout in the module docstring)."""
    longest = max(len(pack.input_ids) for pack in packs)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    size = (len(packs), width)
    input_ids = torch.full(size, PAD_ID, dtype=torch.long)
    labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(size, dtype=torch.long)
    boundaries = [0]
    for row, pack in enumerate(packs):
        length = len(pack.input_ids)
        input_ids[row, :length] = pack.input_ids
        labels[row, :length] = pack.labels
        position_ids[row, :length] = pack.position_ids
        position_ids[row, length:] = torch.arange(width - length)
        offset = row * width
        for seqlen in pack.seqlens:
            offset += seqlen
            boundaries.append(offset)
        if length < width:
            boundaries.append((row + 1) * width)
    cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
    return VLMBatch(
        __key__=[pack.__key__ for pack in packs],
        __restore_key__=(),
        __subflavors__=[pack.__subflavors__ for pack in packs],
        __sources__=tuple(source for pack in packs for source in (pack.__sources__ or ())),
        input_ids=input_ids,
        labels=labels,
        loss_mask=(labels != IGNORE_INDEX).float(),
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        pixel_values=torch.cat([pack.pixel_values for pack in packs]),
        image_grid_thw=torch.cat([pack.image_grid_thw for pack in packs]),
        seqlens=[list(pack.seqlens) for pack in packs],
        sample_ids=[list(pack.sample_ids) for pack in packs],
    )
