"""Packs of the release's shape for ``benchmarks/gpu_check.py``: synthetic tokens and pixels with
the lengths and ViT patch share of the release's 8k packs, in the task encoder's batch layout.

The samples follow the length model of ``benchmarks/packing.py`` (the one the packing results in
``docs/data-packing.md`` were measured on): 70 % caption-like samples, one image whose width and
height are drawn log-normally around 512 px and resized by the real ``smart_resize``, a
log-normal caption (median 120 tokens) and 25 template tokens; 30 % instruct-like samples with
0-3 images and a log-normal dialogue (median 350 tokens). At ``seq_len = 8192`` the packs
below hold about 9.9 samples at 99 % fill (the packer's best-fit-decreasing: 10.7), 61 % of
their tokens are ``<|image_pad|>`` and they carry about 20,000 ViT patches (4 per image
token). A shorter ``seq_len`` (the CPU smoke) scales every text length by
``seq_len / 8192`` and every image side by its square root, which keeps those shares.

Packs are filled first-fit from a window of drawn samples and padded to ``seq_len`` (padding =
``<|endoftext|>``, label −100, its own segment), so ``cu_seqlens``, ``position_ids``,
``pixel_values`` (``[Σ h·w, 588]``, 2×2-merge order is irrelevant for random pixels) and
``image_grid_thw`` look exactly like the task encoder's ``VLMBatch`` at micro-batch 1. Text ids are
random below the special tokens; the loss is on caption and answer text only (template, image
and padding positions are masked), as in the release's packed stages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from lov15_megatron.data.image_processing import PATCH_DIM, ImageConfig, image_grid

RELEASE_PACK = 8192  # the release's pack length (docs/release-recipe.md)
PAD_ID = 151643  # <|endoftext|>, the task encoder's padding
TEMPLATE = 25  # template tokens per sample (per turn pair for instruct samples), no loss
FIRST_SPECIAL = 151643  # text ids are drawn below the Qwen special tokens


@dataclass
class Sample:
    """One sub-sample: its text lengths and image grids ``(h, w)`` in patches."""

    text: int  # loss-bearing text tokens (caption / answers)
    template: int  # masked text tokens
    grids: list[tuple[int, int]] = field(default_factory=list)

    def length(self, merge: int) -> int:
        return self.text + self.template + sum(h * w // merge + 2 for h, w in self.grids)


def draw_sample(rng: random.Random, seq_len: int, image_config: ImageConfig) -> Sample:
    """One sample of ``benchmarks/packing.py``'s mix, scaled to ``seq_len``."""
    scale = seq_len / RELEASE_PACK
    side = scale**0.5

    def grid() -> tuple[int, int] | None:
        width = max(16, int(rng.lognormvariate(6.24, 0.5) * side))  # median ~512 px at 8k
        height = max(16, int(width * rng.lognormvariate(-0.2, 0.3)))
        try:
            _, h, w = image_grid(height, width, image_config)
        except ValueError:
            return None
        return h, w

    if rng.random() < 0.7:
        grids = [grid()]
        text, template = max(1, int(rng.lognormvariate(4.79, 0.6) * scale)), TEMPLATE
    else:
        count = rng.choices((0, 1, 2, 3), weights=(0.2, 0.6, 0.15, 0.05))[0]
        turns = 1 + int(rng.expovariate(1.0))
        grids = [grid() for _ in range(count)]
        text, template = max(1, int(rng.lognormvariate(5.86, 1.0) * scale)), TEMPLATE * turns
    template = max(1, round(template * scale))
    return Sample(text, template, [g for g in grids if g is not None])


def plan_packs(count: int, seq_len: int, seed: int, merge: int = 4) -> list[list[Sample]]:
    """``count`` packs of at most ``seq_len`` tokens, filled first-fit from a window of 64 drawn
    samples (samples longer than a pack are redrawn)."""
    image_config = ImageConfig()  # the release's pixel budget (min 4 LM tokens per image)
    rng = random.Random(seed)
    window: list[Sample] = []
    packs: list[list[Sample]] = []
    while len(packs) < count:
        while len(window) < 64:
            s = draw_sample(rng, seq_len, image_config)
            if s.length(merge) <= seq_len:
                window.append(s)
        pack, used = [], 0
        for s in list(window):
            if used + s.length(merge) <= seq_len:
                pack.append(s)
                used += s.length(merge)
                window.remove(s)
        packs.append(pack)
    return packs


def pack_batch(
    pack: list[Sample],
    seq_len: int,
    seed: int,
    vocab_size: int,
    token_ids: tuple[int, int, int],
    merge: int = 4,
) -> dict[str, torch.Tensor]:
    """The task encoder's micro-batch (``[1, seq_len]`` rows) of one planned pack.

    ``token_ids``: ``(image_token_id, vision_start_token_id, vision_end_token_id)``."""
    # imported here: planning packs needs no Megatron (and its import takes seconds)
    from lov15_megatron.models.packed_seq import position_ids_from_cu_seqlens

    image_id, start_id, end_id = token_ids
    pad_id = PAD_ID if PAD_ID < vocab_size else 0  # a small test vocabulary has no <|endoftext|>
    gen = torch.Generator().manual_seed(seed)
    special = torch.tensor(token_ids)
    text_ids = torch.arange(min(vocab_size, FIRST_SPECIAL))
    text_ids = text_ids[~torch.isin(text_ids, special)]

    def text(n: int) -> torch.Tensor:
        return text_ids[torch.randint(0, len(text_ids), (n,), generator=gen)]

    ids, loss, bounds, grids = [], [], [0], []
    for s in pack:
        parts = [(text(s.template), False)]
        for h, w in s.grids:
            block = torch.tensor([start_id, *([image_id] * (h * w // merge)), end_id])
            parts.append((block, False))
            grids.append((h, w))
        parts.append((text(s.text), True))
        sample_ids = torch.cat([p for p, _ in parts])
        # label i = token i + 1; it counts where the *predicted* token is loss-bearing text
        target_loss = torch.cat([torch.full((len(p),), flag) for p, flag in parts])
        ids.append(sample_ids)
        loss.append(torch.cat([target_loss[1:], torch.tensor([False])]))
        bounds.append(bounds[-1] + len(sample_ids))
    used = bounds[-1]
    if used < seq_len:
        ids.append(torch.full((seq_len - used,), pad_id))
        loss.append(torch.zeros(seq_len - used, dtype=torch.bool))
        bounds.append(seq_len)
    input_ids = torch.cat(ids)
    mask = torch.cat(loss)
    labels = torch.where(mask, torch.roll(input_ids, -1), torch.full_like(input_ids, -100))
    cu = torch.tensor(bounds, dtype=torch.int32)
    patches = sum(h * w for h, w in grids)
    return {
        "input_ids": input_ids[None],
        "labels": labels[None],
        "loss_mask": mask.float()[None],
        "position_ids": position_ids_from_cu_seqlens([cu], seq_len),
        "cu_seqlens": cu,
        "pixel_values": torch.randn(patches, PATCH_DIM, generator=gen),
        "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids], dtype=torch.long).reshape(
            -1, 3
        ),
    }


def pack_shape(batch: dict[str, torch.Tensor], image_token_id: int) -> dict[str, int]:
    """What a pack holds: tokens, sub-samples, images, ViT patches, image and loss tokens."""
    grid = batch["image_grid_thw"]
    return {
        "tokens": int(batch["input_ids"].numel()),
        "segments": int(batch["cu_seqlens"].numel()) - 1,
        "images": int(grid.shape[0]),
        "patches": int(grid.prod(-1).sum()) if grid.numel() else 0,
        "image_tokens": int((batch["input_ids"] == image_token_id).sum()),
        "loss_tokens": int(batch["loss_mask"].sum()),
    }
