"""Model and hardware FLOPs on a hand-computed example (training/flops.py)."""

from __future__ import annotations

import torch

from lov15_megatron.config import load_config
from lov15_megatron.training.flops import CountingIterator, StepCounts, step_flops

# A language model small enough to count by hand:
# L=2, h=8, heads=2 (head dim 4: q=8), groups=1 (kv=4), f=16, V=100.
LM = [
    "model.language.num_layers=2", "model.language.hidden_size=8",
    "model.language.num_attention_heads=2", "model.language.num_query_groups=1",
    "model.language.ffn_hidden_size=16", "model.language.vocab_size=100",
    "data.seq_length=6", "train.micro_batch_size=1", "train.global_batch_size=1",
]  # fmt: skip


def _counts() -> StepCounts:
    """One packed row of 6 tokens: sub-samples of 4 and 2; loss at 3 positions."""
    batch = {
        "input_ids": torch.zeros(1, 6, dtype=torch.long),
        "loss_mask": torch.tensor([[0.0, 1, 1, 0, 1, 0]]),
        "cu_seqlens": torch.tensor([0, 4, 6], dtype=torch.int32),
    }
    it = CountingIterator(iter([batch]))
    next(it)
    return it.take()


def test_counts_of_a_packed_row():
    c = _counts()
    assert (c.token_positions, c.loss_positions, c.attention_sq, c.samples) == (6, 3, 20, 1)


def test_model_flops_count_the_head_at_loss_positions_only():
    cfg = load_config(None, LM)
    # Per token: 2·L·(h·(q + 2kv) + q·h + 3·h·f) = 2·2·(8·16 + 64 + 384) = 2304 → ×6 = 13824.
    # Attention: 2·L·q·Σl² = 2·2·8·20 = 640. Head: 2·h·V = 1600 per loss position → ×3 = 4800.
    forward = 13824 + 640 + 4800
    assert step_flops(cfg, _counts()) == 3 * forward
    # Counting the head at every position (the old count) would give 3·(13824 + 640 + 9600).
    assert step_flops(cfg, _counts()) < 3 * (13824 + 640 + 6 * 1600)


def test_hardware_flops_add_the_recomputed_forward():
    c = _counts()
    layers, attention, head = 13824, 640, 4800
    model = 3 * (layers + attention + head)
    cfg = load_config(None, LM)
    assert step_flops(cfg, c, hardware=True) == model  # no recompute: HFU = MFU
    full = load_config(None, [*LM, "train.recompute.granularity=full"])
    assert step_flops(full, c) == model  # model FLOPs never include recompute
    assert step_flops(full, c, hardware=True) == model + layers + attention
    block_recompute = ["train.recompute.method=block", "train.recompute.num_layers=1"]
    block = load_config(None, [*LM, "train.recompute.granularity=full", *block_recompute])
    assert step_flops(block, c, hardware=True) == model + (layers + attention) / 2
    selective = load_config(None, [*LM, "train.recompute.granularity=selective"])
    assert step_flops(selective, c, hardware=True) == model + attention


def test_vision_flops_and_vision_recompute_switch():
    vision = [*LM, "model.vision={num_layers: 1, hidden_size: 4, ffn_hidden_size: 8, "
              "num_attention_heads: 1, patch_size: 1, in_channels: 1, image_token_id: 99, "
              "vision_start_token_id: 97, vision_end_token_id: 98}"]  # fmt: skip
    c = StepCounts(token_positions=0, loss_positions=0, patches=5, vit_attention_sq=25,
                   image_tokens=1)  # fmt: skip
    # ViT layers: 5·2·1·(4·16 + 2·4·8) = 1280; attention: 4·1·4·25 = 400;
    # patch embed 5·2·1·4 = 40; merger (hidden 16): 1·2·(16·16 + 16·8) = 768.
    cfg = load_config(None, vision)
    assert step_flops(cfg, c) == 3 * (1280 + 400 + 40 + 768)
    full = load_config(None, [*vision, "train.recompute.granularity=full"])
    assert step_flops(full, c, hardware=True) == 3 * (1280 + 400 + 40 + 768) + 1280 + 400
    lm_only = load_config(None, [*vision, "train.recompute.granularity=full",
                                 "train.recompute.vision=false"])  # fmt: skip
    assert step_flops(lm_only, c, hardware=True) == 3 * (1280 + 400 + 40 + 768)
