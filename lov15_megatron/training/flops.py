"""Model and hardware FLOPs of a training step, for TFLOP/s per GPU, MFU and HFU.

Counted per micro-batch from what the data actually holds (the ``CountingIterator`` wraps the
data stream). *Model* FLOPs are what the model needs (training = 3 × forward); *hardware* FLOPs
add what activation recomputation runs again (one more forward of the recomputed parts), as in
the release's "HFU". Per part, forward:

Language model, per token position (padding included, as it is computed):
``2·L·(h·(q + 2·kv) + q·h + 3·h·f)`` (QKV, output projection, SwiGLU), plus causal attention per
packed sub-sample of length ``l``: ``2·L·l²·q`` (QKᵀ and AV, half the square each). The LM head
``2·h·V`` is counted only at **loss positions**: the training loss computes logits nowhere else
(:mod:`lov15_megatron.models.lm_loss`). ``q = heads·head_dim``, ``kv = query_groups·head_dim``.

Rice ViT, per patch (class tokens included): ``2·Lv·(4·hv² + 2·hv·fv) + 2·P·hv`` (QKV + proj,
GELU MLP, patch embedding, ``P = 3·14·14``), plus bidirectional attention per image of ``n``
tokens: ``4·Lv·n²·hv``; merger per LM image token: ``2·(4hv·4hv + 4hv·h)``.

Recomputation (``train.recompute``): ``full`` re-runs the forward of the recomputed layers
(``uniform``: all of them; ``block``: ``num_layers`` per pipeline chunk), ``selective`` with
``core_attn`` re-runs the attention core (the ``l²`` terms); the ViT likewise when
``train.recompute.vision``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lov15_megatron.config import RunConfig

# Dense bf16 peak per GPU (TFLOP/s) for MFU; CPU runs report MFU as n/a.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A800": 312.0, "A100": 312.0}


@dataclass
class StepCounts:
    token_positions: int = 0
    loss_positions: int = 0  # where the LM head runs (loss_mask set)
    attention_sq: int = 0  # Σ l² over LM sub-samples
    patches: int = 0  # ViT tokens incl. class tokens
    vit_attention_sq: int = 0  # Σ n² over images
    image_tokens: int = 0  # LM tokens coming out of the merger
    samples: int = 0  # rows (packs) seen

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([float(v) for v in vars(self).values()], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> StepCounts:
        return cls(*[int(v) for v in t.tolist()])


@dataclass
class CountingIterator:
    """Wraps a micro-batch iterator and accumulates :class:`StepCounts` of what it yields."""

    inner: Iterator
    counts: StepCounts = field(default_factory=StepCounts)

    def __iter__(self) -> CountingIterator:
        return self

    def __next__(self) -> dict:
        batch = next(self.inner)
        c = self.counts
        b, s = batch["input_ids"].shape
        c.token_positions += b * s
        mask = batch.get("loss_mask")
        c.loss_positions += int((mask > 0).sum()) if mask is not None else b * s
        c.samples += b
        cu = batch.get("cu_seqlens")
        if cu is not None:
            c.attention_sq += int((cu[1:] - cu[:-1]).long().pow(2).sum())
        else:
            c.attention_sq += b * s * s
        grid = batch.get("image_grid_thw")
        if grid is not None and grid.numel():
            n = grid.prod(-1).long()
            c.patches += int((n + 1).sum())
            c.vit_attention_sq += int((n + 1).pow(2).sum())
            c.image_tokens += int(n.sum()) // 4
        return batch

    def take(self) -> StepCounts:
        counts, self.counts = self.counts, StepCounts()
        return counts


@dataclass
class ForwardFlops:
    """Forward FLOPs of the counted micro-batches, by the parts recomputation distinguishes."""

    lm_layers: float = 0.0  # dense part of the decoder layers
    lm_attention: float = 0.0  # the attention core (l² terms)
    lm_head: float = 0.0
    vit_layers: float = 0.0
    vit_attention: float = 0.0
    other: float = 0.0  # patch embedding, merger

    @property
    def total(self) -> float:
        return sum(vars(self).values())


def forward_flops(cfg: RunConfig, c: StepCounts) -> ForwardFlops:
    lm = cfg.model.language
    d = lm.kv_channels or lm.hidden_size // lm.num_attention_heads
    q, kv = lm.num_attention_heads * d, lm.num_query_groups * d
    h, f = lm.hidden_size, lm.ffn_hidden_size
    out = ForwardFlops(
        lm_layers=c.token_positions * 2 * lm.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * f),
        lm_attention=2 * lm.num_layers * q * c.attention_sq,
        lm_head=c.loss_positions * 2 * h * lm.vocab_size,
    )
    v = cfg.model.vision
    if v is not None and c.patches:
        hv, fv, m = v.hidden_size, v.ffn_hidden_size, v.spatial_merge_size**2
        patch = v.in_channels * v.patch_size**2
        merger_hidden = v.merger_hidden_size or hv * m
        out.vit_layers = c.patches * 2 * v.num_layers * (4 * hv * hv + 2 * hv * fv)
        out.vit_attention = 4 * v.num_layers * hv * c.vit_attention_sq
        out.other = c.patches * 2 * patch * hv
        out.other += c.image_tokens * 2 * (hv * m * merger_hidden + merger_hidden * h)
    return out


def _recomputed_fraction(cfg: RunConfig, num_layers: int, chunks: int) -> float:
    """Fraction of ``num_layers`` layers whose forward ``full`` recompute runs twice."""
    r = cfg.train.recompute
    if r.method == "uniform":
        return 1.0
    per_chunk = num_layers // chunks
    return min(r.num_layers, per_chunk) * chunks / num_layers


def step_flops(cfg: RunConfig, c: StepCounts, *, hardware: bool = False) -> float:
    """Training (forward + backward) FLOPs of the counted micro-batches: model FLOPs, or with
    ``hardware`` the FLOPs actually run, recomputation included."""
    fwd = forward_flops(cfg, c)
    total = 3.0 * fwd.total
    r = cfg.train.recompute
    if not hardware or r.granularity == "none":
        return total
    p = cfg.parallel
    chunks = p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)
    if r.granularity == "full":
        lm = _recomputed_fraction(cfg, cfg.model.language.num_layers, chunks)
        total += lm * (fwd.lm_layers + fwd.lm_attention)
        if r.vision and cfg.model.vision is not None:
            vit = _recomputed_fraction(cfg, cfg.model.vision.num_layers, 1)
            total += vit * (fwd.vit_layers + fwd.vit_attention)
    elif "core_attn" in r.modules:
        total += fwd.lm_attention + (fwd.vit_attention if r.vision else 0.0)
    return total


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of this GPU, if known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
