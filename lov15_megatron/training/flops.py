"""Model and hardware FLOPs of a training step, for TFLOP/s per GPU, MFU and HFU.

Counted per micro-batch from what the data actually holds (the ``CountingIterator`` wraps the
data stream). *Model* FLOPs are what the training math needs: each part's forward, plus the
backward that runs for it (:func:`multipliers`: 3 × forward for a trained part, 2 × for a frozen
one the gradient crosses, 1 × for a frozen one before everything trained; LoRA's base weights
are frozen); *hardware* FLOPs add what activation recomputation runs again (one more forward of
the recomputed parts, where their backward runs), as in the release's "HFU". Per part, forward:

Language model, per token position (padding included, as it is computed):
``2·L·(h·(q + 2·kv) + q·h + 3·h·f)`` (QKV, output projection, SwiGLU), plus causal attention per
packed sub-sample of length ``l``: ``2·L·l²·q`` (QKᵀ and AV, half the square each). The LM head
``2·h·V`` is counted only at **loss positions**: the training loss computes logits nowhere else
(:mod:`lov15_megatron.models.lm_loss`). ``q = heads·head_dim``, ``kv = query_groups·head_dim``.

Rice ViT, per patch (class tokens included): ``2·Lv·(4·hv² + 2·hv·fv) + 2·P·hv`` (QKV + proj,
GELU MLP, patch embedding, ``P = 3·14·14``), plus bidirectional attention per image of ``n``
tokens: ``4·Lv·n²·hv``; merger per LM image token: ``2·(4hv·4hv + 4hv·h)``.

LoRA (``peft``): per token of an adapted tower and adapted linear ``[out, in]``,
``2·r·(in + out)`` (``A·x`` then ``B·(A·x)``); the LM's ``linear_fc1`` has ``out = 2·f``.

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
from lov15_megatron.config.schema import TRAINABLE_GROUPS

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
    """Forward FLOPs of the counted micro-batches by part (what is frozen, recomputed or placed
    on a pipeline stage differs between parts); :func:`multipliers` gives each part's factor."""

    lm_layers: float = 0.0  # the decoder layers' GEMMs (base weights)
    lm_attention: float = 0.0  # the attention core (l² terms): no weights
    lm_head: float = 0.0
    vit_layers: float = 0.0
    vit_attention: float = 0.0
    patch_embed: float = 0.0
    merger: float = 0.0
    lm_adapters: float = 0.0  # LoRA's A and B of the adapted linears (peft), per tower
    vit_adapters: float = 0.0
    merger_adapters: float = 0.0

    @property
    def total(self) -> float:
        return sum(vars(self).values())

    def weighted(self, factors: ForwardFlops) -> float:
        """Σ part × factor (training FLOPs from forward FLOPs and :func:`multipliers`)."""
        return sum(v * getattr(factors, k) for k, v in vars(self).items())


def _lora_dims(cfg: RunConfig, tower: str) -> list[tuple[int, int]]:
    """(in, out) of each linear LoRA adapts in one layer of ``tower`` (the merger: itself)."""
    pe = cfg.peft
    if pe is None or tower not in pe.towers:
        return []
    lm, v = cfg.model.language, cfg.model.vision
    if tower == "language":
        d = lm.kv_channels or lm.hidden_size // lm.num_attention_heads
        h, q, kv, f = (lm.hidden_size, lm.num_attention_heads * d, lm.num_query_groups * d,
                       lm.ffn_hidden_size)  # fmt: skip
        # linear_fc1 is SwiGLU's gate and up projections: 2·f outputs
        dims = {"linear_qkv": (h, q + 2 * kv), "linear_proj": (q, h),
                "linear_fc1": (h, 2 * f), "linear_fc2": (f, h)}  # fmt: skip
    elif tower == "vision" and v is not None:
        hv, fv = v.hidden_size, v.ffn_hidden_size
        dims = {"linear_qkv": (hv, 3 * hv), "linear_proj": (hv, hv),
                "linear_fc1": (hv, fv), "linear_fc2": (fv, hv)}  # fmt: skip
    elif tower == "merger" and v is not None:
        merged = v.hidden_size * v.spatial_merge_size**2
        mid = v.merger_hidden_size or merged
        dims = {"linear_fc1": (merged, mid), "linear_fc2": (mid, lm.hidden_size)}
    else:
        return []
    return [dims[t] for t in pe.target_modules if t in dims]


def forward_flops(cfg: RunConfig, c: StepCounts) -> ForwardFlops:
    lm = cfg.model.language
    d = lm.kv_channels or lm.hidden_size // lm.num_attention_heads
    q, kv = lm.num_attention_heads * d, lm.num_query_groups * d
    h, f = lm.hidden_size, lm.ffn_hidden_size
    # LoRA: A [r, in] and B [out, r] per adapted linear, 2·r·(in + out) per token
    r = cfg.peft.rank if cfg.peft is not None else 0
    lora = {t: sum(2 * r * (i + o) for i, o in _lora_dims(cfg, t))
            for t in ("language", "vision", "merger")}  # fmt: skip
    out = ForwardFlops(
        lm_layers=c.token_positions * 2 * lm.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * f),
        lm_attention=2 * lm.num_layers * q * c.attention_sq,
        lm_head=c.loss_positions * 2 * h * lm.vocab_size,
        lm_adapters=c.token_positions * lm.num_layers * lora["language"],
    )
    v = cfg.model.vision
    if v is not None and c.patches:
        hv, fv, m = v.hidden_size, v.ffn_hidden_size, v.spatial_merge_size**2
        patch = v.in_channels * v.patch_size**2
        merger_hidden = v.merger_hidden_size or hv * m
        out.vit_layers = c.patches * 2 * v.num_layers * (4 * hv * hv + 2 * hv * fv)
        out.vit_attention = 4 * v.num_layers * hv * c.vit_attention_sq
        out.patch_embed = c.patches * 2 * patch * hv
        out.merger = c.image_tokens * 2 * (hv * m * merger_hidden + merger_hidden * h)
        out.vit_adapters = c.patches * v.num_layers * lora["vision"]
        out.merger_adapters = c.image_tokens * lora["merger"]
    return out


# The forward order of the towers (the config's trainable groups are listed in it): a gradient
# runs back through a tower only if some trainable parameter sits in it or in a tower before it.
TOWER_ORDER = TRAINABLE_GROUPS


def trained_towers(cfg: RunConfig) -> tuple[set[str], set[str]]:
    """(towers whose base weights train, towers with LoRA adapters): ``train.trainable`` (None:
    all) for a full fine-tune; with ``peft`` no base weight trains and ``peft.towers`` adapt."""
    if cfg.peft is not None:
        return set(), set(cfg.peft.towers)
    return set(cfg.train.trainable or TOWER_ORDER), set()


def backward_towers(cfg: RunConfig) -> set[str]:
    """The towers a backward pass runs through: the first one with a trainable parameter (base
    weight or adapter) and every tower after it (:data:`TOWER_ORDER`). The others run forward
    only (and keep no activations, ``plan.py``)."""
    full, adapted = trained_towers(cfg)
    crossed: set[str] = set()
    for tower in TOWER_ORDER:  # a gradient reaches back to the first trainable tower
        if crossed or tower in full | adapted:
            crossed.add(tower)
    return crossed


def _recomputed_fraction(cfg: RunConfig, num_layers: int, chunks: int) -> float:
    """Fraction of ``num_layers`` layers whose forward ``full`` recompute runs twice."""
    r = cfg.train.recompute
    if r.method == "uniform":
        return 1.0
    per_chunk = num_layers // chunks
    return min(r.num_layers, per_chunk) * chunks / num_layers


def multipliers(cfg: RunConfig, *, hardware: bool = False) -> ForwardFlops:
    """Training FLOPs per forward FLOP of each part (a :class:`ForwardFlops` of factors).

    A GEMM's backward is two GEMMs of its forward's size: the input gradient (dgrad), run when
    a trainable parameter sits in its tower or an earlier one (:data:`TOWER_ORDER`), and the
    weight gradient (wgrad), run when its weight trains. So a part costs 1 (forward) + 1 (dgrad)
    + 1 (wgrad): 3 in a full fine-tune; 2 for a frozen part that the gradient crosses (the LM and
    head of stage 1, every base GEMM of a LoRA-adapted tower and the towers after it); 1 for a
    frozen part before every trainable one (the ViT in stage 1 and in a language-only LoRA run).
    The attention cores have no weights: 1 + 2 where a gradient crosses them. LoRA's adapters
    train: 3 (forward, their dgrad, their wgrad).

    These are *model* FLOPs (MFU): the forward and backward the training math needs, without
    recomputation, as Megatron-Bridge, NeMo AutoModel and MaxText count frozen weights (docs:
    docs/parallelism-choice.md). ``hardware`` adds what recomputation runs again (HFU): one
    more forward of the recomputed parts, only where their backward runs (a tower without a
    backward keeps nothing to recompute).

    Approximation (per tower, not per GEMM): the input gradient of a tower's *first* trainable
    GEMM is counted although autograd skips it when nothing before requires a gradient: the
    patch embedding's (pixels) in a full fine-tune, and the base GEMMs of the lowest LoRA layer
    in front of its first adapter (one QKV GEMM for the default targets: < 0.5 % of an 8B LM's
    backward). Stage 1's merger is exact (its trainable norm precedes its first GEMM).
    """
    full, adapted = trained_towers(cfg)
    crossed = backward_towers(cfg)

    def gemm(tower: str) -> float:
        return 1.0 + (tower in crossed) + (tower in full)

    def core(tower: str) -> float:
        return 1.0 + 2.0 * (tower in crossed)

    out = ForwardFlops(
        lm_layers=gemm("language"), lm_attention=core("language"), lm_head=gemm("language"),
        vit_layers=gemm("vision"), vit_attention=core("vision"), patch_embed=gemm("vision"),
        merger=gemm("merger"),
        lm_adapters=3.0 * ("language" in adapted), vit_adapters=3.0 * ("vision" in adapted),
        merger_adapters=3.0 * ("merger" in adapted),
    )  # fmt: skip
    r = cfg.train.recompute
    if not hardware or r.granularity == "none":
        return out
    lm_back, vit_back = "language" in crossed, "vision" in crossed and r.vision
    if r.granularity == "full":
        p = cfg.parallel
        chunks = p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)
        if lm_back:
            again = _recomputed_fraction(cfg, cfg.model.language.num_layers, chunks)
            out.lm_layers += again
            out.lm_attention += again
            out.lm_adapters += again * ("language" in adapted)
        if vit_back and cfg.model.vision is not None:
            again = _recomputed_fraction(cfg, cfg.model.vision.num_layers, 1)
            out.vit_layers += again
            out.vit_attention += again
            out.vit_adapters += again * ("vision" in adapted)
    elif "core_attn" in r.modules:
        out.lm_attention += lm_back
        out.vit_attention += vit_back
    return out


def step_flops(cfg: RunConfig, c: StepCounts, *, hardware: bool = False) -> float:
    """Training FLOPs of the counted micro-batches: model FLOPs (forward and the backward that
    runs, :func:`multipliers`), or with ``hardware`` the FLOPs actually run, recomputation
    included."""
    return forward_flops(cfg, c).weighted(multipliers(cfg, hardware=hardware))


def peak_tflops(device: torch.device) -> float | None:
    """Dense bf16 peak of this GPU, if known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
