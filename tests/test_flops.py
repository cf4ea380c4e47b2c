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


VISION = [*LM, "model.vision={num_layers: 1, hidden_size: 4, ffn_hidden_size: 8, "
          "num_attention_heads: 1, patch_size: 1, in_channels: 1, image_token_id: 99, "
          "vision_start_token_id: 97, vision_end_token_id: 98}"]  # fmt: skip


def test_vision_flops_and_vision_recompute_switch():
    vision = VISION
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


# Forward FLOPs of the parts of the VLM above on the packed row of _counts() plus one image of
# 5 patches (vision figures as in test_vision_flops_and_vision_recompute_switch).
LM_GEMMS, LM_ATTN, HEAD = 13824, 640, 4800
VIT_GEMMS, VIT_ATTN, PATCH, MERGER = 1280, 400, 40, 768


def _vlm_counts() -> StepCounts:
    c = _counts()
    c.patches, c.vit_attention_sq, c.image_tokens = 5, 25, 1
    return c


def test_stage1_runs_the_vit_forward_only_and_no_lm_weight_gradients():
    # trainable merger: ViT forward only (1×), merger 3×, LM and head 2× (input gradients to
    # reach the merger), attention cores 3× where the gradient crosses them, 1× in the ViT.
    stage1 = [*VISION, "train.trainable=[merger]"]
    want = (VIT_GEMMS + VIT_ATTN + PATCH) + 3 * MERGER + 2 * (LM_GEMMS + HEAD) + 3 * LM_ATTN
    assert step_flops(load_config(None, stage1), _vlm_counts()) == want
    # Full recompute, ViT included: only the LM re-runs (the ViT has no backward to feed).
    full = load_config(None, [*stage1, "train.recompute.granularity=full"])
    assert step_flops(full, _vlm_counts()) == want  # model FLOPs: no recompute
    assert step_flops(full, _vlm_counts(), hardware=True) == want + LM_GEMMS + LM_ATTN
    selective = load_config(None, [*stage1, "train.recompute.granularity=selective"])
    assert step_flops(selective, _vlm_counts(), hardware=True) == want + LM_ATTN
    # Vision only: every part lies after it, so all take input gradients; weight gradients only
    # in the ViT (the patch embedding's input gradient is counted: the per-tower rule).
    vision = load_config(None, [*VISION, "train.trainable=[vision]"])
    want = 3 * (VIT_GEMMS + VIT_ATTN + PATCH + LM_ATTN) + 2 * (MERGER + LM_GEMMS + HEAD)
    assert step_flops(vision, _vlm_counts()) == want
    # Everything trained: the conventional 3 × forward.
    everything = VIT_GEMMS + VIT_ATTN + PATCH + MERGER + LM_GEMMS + LM_ATTN + HEAD
    assert step_flops(load_config(None, VISION), _vlm_counts()) == 3 * everything


def test_lora_counts_the_adapters_and_no_base_weight_gradients():
    lora = [*VISION, "checkpoint.pretrained=/base", "peft={rank: 2, towers: [language]}"]
    # Adapters per token and LM layer, 2·r·(in + out) over linear_qkv [16, 8], linear_proj
    # [8, 8], linear_fc1 [32, 8] (SwiGLU gate + up), linear_fc2 [8, 16]:
    # 2·2·(24 + 16 + 40 + 24) = 416 → × 2 layers × 6 positions = 4992.
    adapters = 4992
    want = (VIT_GEMMS + VIT_ATTN + PATCH + MERGER) + 2 * (LM_GEMMS + HEAD) + 3 * LM_ATTN
    want += 3 * adapters
    cfg = load_config(None, lora)
    assert step_flops(cfg, _vlm_counts()) == want
    full = load_config(None, [*lora, "train.recompute.granularity=full"])
    assert step_flops(full, _vlm_counts(), hardware=True) == want + LM_GEMMS + LM_ATTN + adapters
    # Only linear_proj adapted, on the ViT and the LM: the ViT takes input gradients too now.
    # ViT adapter [4, 4]: 2·2·8 = 32 per patch → 160; LM linear_proj: 2·2·16 · 2 · 6 = 768.
    both = load_config(None, [*VISION, "checkpoint.pretrained=/base",
                              "peft={rank: 2, target_modules: [linear_proj], "
                              "towers: [vision, language]}"])  # fmt: skip
    want = (PATCH + VIT_GEMMS + MERGER + LM_GEMMS + HEAD) * 2 + 3 * (VIT_ATTN + LM_ATTN)
    assert step_flops(both, _vlm_counts()) == want + 3 * (160 + 768)
