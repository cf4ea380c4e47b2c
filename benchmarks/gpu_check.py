"""One-GPU check of the release's shapes: bf16 training steps of a 4B-width LLaVA-OV-1.5 on 8k
packs, our attention core on CUDA, throughput, memory and bf16-against-fp32 agreement.

    bash benchmarks/gpu_check.sh               # on a GPU machine (docs/gpu-runs.md)
    bash benchmarks/gpu_check.sh --cpu-smoke   # the same code end to end on CPU, tiny sizes

Three parts, in one process, results in ``gpu_check.json`` and ``gpu_check.md`` under ``--out``
(default ``$OUT`` where set, else ``outputs/gpu_check``):

1. **Attention core.** :class:`~lov15_megatron.models.attention.PackedSequenceAttention` on one
   LM pack (causal, 32 heads, 8 KV groups, head dim 128) and on the ViT segments of one pack
   (bidirectional, 16 heads of 64), forward and backward: in bf16 (on CUDA this is torch's varlen
   flash kernel) and in fp32 (the per-segment SDPA path), each against the attention written out
   from its definition in fp32 (float64 on CPU) on the same bf16-rounded inputs.
2. **bf16 against fp32.** The model of part 3, built by the trainer's own set-up, and an fp32
   copy holding the same (bf16) weights: logits and loss of the first step's packs.
3. **Training.** The LLaVA-OV-1.5-4B stage-1.5 recipe (``configs/llava_ov_1_5/4b/
   stage1_5_mid_training.yaml``: all towers train, full uniform recompute, distributed
   optimizer, bf16) with the local (no Transformer Engine) spec and the torch attention core,
   Qwen3-4B width (hidden 2560, 32 heads, 8 KV groups, FFN 9728, vocabulary 151,936), the real
   Rice ViT (24 layers, 1024 wide) and as many LM layers as the GPU's memory holds (or
   ``--lm-layers``), on packs of ``benchmarks/gpu_packs.py`` (8192 tokens, the release's ViT patch
   share). Steps go through Megatron-Core's schedule (``training.step.train_step``); FLOPs are
   the trainer's own count (``training.flops``): model FLOPs for MFU, recomputation added for HFU,
   against the dense bf16 peak of ``training.flops.PEAK_TFLOPS`` (H100 and H200: 989 TFLOP/s).

The bounds that each check is held to are derived in :func:`bf16_logit_bound` and
:func:`attention_bounds`; ``docs/gpu-runs.md`` says what the report holds.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

STAGE_CONFIG = "configs/llava_ov_1_5/4b/stage1_5_mid_training.yaml"
BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits: round-to-nearest error ≤ 2^-8
FP32_UNIT_ROUNDOFF = 2.0**-24
FP32_SAFETY = 16.0  # docs/tolerances.md: two orders, a dozen reductions in series, tail margin
# bf16 weight 2 + fp32 grad buffer 4 + fp32 master copy 4 + Adam moments 8, + 4 for the fp32
# temporary of torch's multi-tensor AdamW (Megatron's optimizer without TE or Apex)
BYTES_PER_PARAM = 22


@dataclass
class Settings:
    """Sizes of one run: the GPU check or the CPU smoke (same code, other numbers)."""

    name: str
    device: str  # runtime.device
    seq_len: int
    packs_per_step: int  # global batch in packs (micro-batch 1)
    warmup_steps: int
    timed_steps: int
    lm_layers: int | None  # None: as many as fit (GPU)
    max_lm_layers: int
    model_overrides: list[str] = field(default_factory=list)
    attention_lm: tuple[int, int, int] = (32, 8, 128)  # heads, KV groups, head dim
    attention_vit: tuple[int, int, int] = (16, 16, 64)
    activation_reserve_gib: float = 16.0  # memory left for activations when fitting layers
    time_budget_s: float = 420.0  # stop timed steps early to end inside 8 minutes


GPU = Settings(
    name="gpu", device="cuda", seq_len=8192, packs_per_step=4, warmup_steps=1, timed_steps=4,
    lm_layers=None, max_lm_layers=36,
)  # fmt: skip

SMOKE = Settings(
    name="cpu-smoke", device="cpu", seq_len=256, packs_per_step=2, warmup_steps=1,
    timed_steps=1, lm_layers=2, max_lm_layers=2,
    model_overrides=[
        "model.language.hidden_size=64", "model.language.ffn_hidden_size=128",
        "model.language.num_attention_heads=4", "model.language.num_query_groups=2",
        "model.language.kv_channels=16", "model.vision.num_layers=2",
        "model.vision.hidden_size=64", "model.vision.ffn_hidden_size=128",
        "model.vision.num_attention_heads=4", "train.recompute.num_layers=1",
        # a 4k vocabulary (the image tokens at its top): the real one's logits would dominate
        # the smoke's time and memory
        "model.language.vocab_size=4096", "model.vision.image_token_id=4093",
        "model.vision.vision_start_token_id=4094", "model.vision.vision_end_token_id=4095",
    ],
    attention_lm=(4, 2, 16), attention_vit=(4, 4, 16), time_budget_s=100.0,
)  # fmt: skip


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------ bounds


def bf16_logit_bound(lm_layers: int, vit_layers: int) -> float:
    """Bound on ``‖z_bf16 − z_fp32‖ / ‖z_fp32‖`` over all logits, for the same weights.

    The bf16 forward is the fp32 forward with every stored tensor rounded to bf16: a relative
    error of at most ``u = 2^-8`` per element, uniform, so ``u/√3`` RMS. A pre-norm transformer
    layer stores about 12 tensors along its longest path (norm, QKV, q/k norm and RoPE, attention,
    projection, residual sum, norm, FC1, SwiGLU/GELU, FC2, residual sum); the merger and the
    head add 4. Independent roundings carried along the residual stream add in quadrature:
    ``u·√(R/3)`` RMS relative for ``R`` roundings. A factor 4 covers gains above 1 where the
    perturbation crosses a norm, softmax or the head (the random-initialised model's weights
    are small, so the residual stream carries it almost unchanged). Matmuls accumulate in fp32
    in both runs, so their reductions add only fp32-level error."""
    roundings = 12 * (lm_layers + vit_layers) + 4
    return 4.0 * BF16_UNIT_ROUNDOFF * math.sqrt(roundings / 3.0)


def attention_bounds(longest_segment: int) -> dict[str, float]:
    """Bounds for the attention core against its definition in fp32/float64 (same bf16 inputs).

    - ``bf16_out`` (max |Δo| / max |v|): the output ``o = Σ p_j v_j / Σ p_j`` is a convex
      combination of value rows. A flash kernel rounds the probabilities to bf16 before the PV
      product (``≤ u·Σ p_j|v_j| ≤ u·max|v|``) and rounds the output (``≤ u·max|v|``); the scores,
      exponentials and sums stay fp32. 2u, doubled for the online softmax's rescaling: 4u.
    - ``bf16_grad`` (‖Δg‖ / ‖g‖ per gradient): P and dS rounded to bf16 for the matmuls (u),
      the output rounded (u), ``D = rowsum(dO∘O)`` from the bf16 output (2u at dP's scale):
      4u, doubled: 8u.
    - ``fp32`` (both): docs/tolerances.md's fp32 bound ``16·√K·2^-24`` for the longest
      reduction, the longest segment ``K``.
    """
    return {
        "bf16_out": 4.0 * BF16_UNIT_ROUNDOFF,
        "bf16_grad": 8.0 * BF16_UNIT_ROUNDOFF,
        "fp32": FP32_SAFETY * math.sqrt(longest_segment) * FP32_UNIT_ROUNDOFF,
    }


# --------------------------------------------------------------------------------- attention


def reference_attention(q, k, v, dout, bounds: list[int], causal: bool, scale: float, dtype):
    """Attention and its gradients written out from the definition, segment by segment, in
    ``dtype``: ``[t, heads, d]`` queries, ``[t, groups, d]`` keys/values (GQA), returns
    ``(out, dq, dk, dv)`` in the inputs' layout. Chunks of heads keep every score matrix below
    2^28 elements."""
    import torch

    heads, groups = q.shape[1], k.shape[1]
    rep = heads // groups
    q, k, v, dout = (x.to(dtype) for x in (q, k, v, dout))
    out, dq = torch.zeros_like(q), torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        n = end - start
        if n == 0:
            continue
        step = max(1, min(heads, (1 << 28) // (n * n)))
        step = max(rep, step - step % rep)  # whole KV groups per chunk
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device)
        if causal:
            mask = torch.tril(mask)
        for h0 in range(0, heads, step):
            h1 = min(heads, h0 + step)
            g = torch.arange(h0, h1, device=q.device) // rep
            qs = q[start:end, h0:h1].transpose(0, 1)  # [h, n, d]
            ks, vs = k[start:end, g].transpose(0, 1), v[start:end, g].transpose(0, 1)
            do = dout[start:end, h0:h1].transpose(0, 1)
            s = (qs @ ks.transpose(1, 2)) * scale
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
            o = p @ vs
            dp = do @ vs.transpose(1, 2)
            ds = p * (dp - (do * o).sum(-1, keepdim=True))
            out[start:end, h0:h1] = o.transpose(0, 1)
            dq[start:end, h0:h1] = ((ds @ ks) * scale).transpose(0, 1)
            dk_h = ((ds.transpose(1, 2) @ qs) * scale).transpose(0, 1)  # [n, h, d]
            dv_h = (p.transpose(1, 2) @ do).transpose(0, 1)
            dk[start:end].index_add_(1, g, dk_h)
            dv[start:end].index_add_(1, g, dv_h)
    return out, dq, dk, dv


def attention_case(name: str, shape: tuple[int, int, int], bounds: list[int], causal: bool,
                   device, seed: int) -> dict[str, Any]:  # fmt: skip
    """Our core in bf16 and fp32 against :func:`reference_attention` on one THD stream."""
    import torch
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from lov15_megatron.models import attention
    from lov15_megatron.models.packed_seq import thd_packed_seq_params

    heads, groups, d = shape
    t = bounds[-1]
    config = TransformerConfig(
        num_layers=1, hidden_size=heads * d, num_attention_heads=heads,
        num_query_groups=groups, kv_channels=d, attention_dropout=0.0, hidden_dropout=0.0,
    )  # fmt: skip
    mask_type = AttnMaskType.causal if causal else AttnMaskType.no_mask
    core = attention.PackedSequenceAttention(config, 1, mask_type, "self")
    cu = torch.tensor(bounds, dtype=torch.int32)
    params = thd_packed_seq_params([cu], t, device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v, dout = (
        torch.randn(t, n, d, generator=gen).to(device=device, dtype=torch.bfloat16)
        for n in (heads, groups, groups, heads)
    )
    scale = 1.0 / math.sqrt(d)
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = reference_attention(q, k, v, dout, bounds, causal, scale, ref_dtype)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    limits = attention_bounds(longest)
    v_scale = float(v.abs().max())
    result: dict[str, Any] = {
        "case": name, "tokens": t, "segments": len(bounds) - 1, "longest_segment": longest,
        "heads": heads, "groups": groups, "head_dim": d, "causal": causal,
    }  # fmt: skip
    # model FLOPs of forward + backward (3 × forward): QKᵀ and PV, 2·d per score each
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    scores = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    flops = 3 * 4 * scores * heads * d
    repeats = 3 if device.type == "cuda" else 1
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        inputs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        kernel = "varlen" if core._use_varlen(inputs[0]) else "segment_sdpa"
        out = core(*inputs, None, packed_seq_params=params).reshape(t, heads, d)
        out.backward(dout.to(dtype))
        out = out.detach()
        out_err = float((out.to(ref_dtype) - ref[0]).abs().max()) / v_scale
        grads = {}
        for gname, got, want in zip(("dq", "dk", "dv"), inputs, ref[1:], strict=True):
            diff = (got.grad.to(ref_dtype) - want).norm() / want.norm().clamp_min(1e-30)
            grads[gname] = float(diff)
        del out
        _synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):  # timed after the first call (kernel selection, warm-up)
            core(*inputs, None, packed_seq_params=params).backward(dout.reshape(t, -1).to(dtype))
        _synchronize(device)
        seconds = (time.perf_counter() - t0) / repeats
        out_bound = limits["bf16_out" if label == "bf16" else "fp32"]
        grad_bound = limits["bf16_grad" if label == "bf16" else "fp32"]
        result[label] = {
            "kernel": kernel,
            "out_max_abs_over_max_v": out_err,
            "out_bound": out_bound,
            "grad_rel": grads,
            "grad_bound": grad_bound,
            "fwd_bwd_ms": 1e3 * seconds,
            "tflops": flops / seconds / 1e12,
            "ok": out_err <= out_bound and all(g <= grad_bound for g in grads.values()),
        }
        del inputs
    return result


def attention_check(settings: Settings, batch: dict, device) -> list[dict[str, Any]]:
    """The LM case on one pack's sub-samples, the ViT case on its images (class token + patches
    per image, as the Rice ViT's THD stream)."""
    lm_bounds = [int(b) for b in batch["cu_seqlens"].tolist()]
    vit_bounds = [0]
    for _, h, w in batch["image_grid_thw"].tolist():
        vit_bounds.append(vit_bounds[-1] + h * w + 1)
    cases = [
        attention_case("lm", settings.attention_lm, lm_bounds, True, device, 1),
        attention_case("vit", settings.attention_vit, vit_bounds, False, device, 2),
    ]
    for c in cases:
        log(
            f"attention {c['case']}: {c['tokens']} tokens in {c['segments']} segments; bf16 "
            f"({c['bf16']['kernel']}) out {c['bf16']['out_max_abs_over_max_v']:.2e} "
            f"(bound {c['bf16']['out_bound']:.1e}), grads "
            + ", ".join(f"{k} {v:.2e}" for k, v in c["bf16"]["grad_rel"].items())
            + f"; fp32 ({c['fp32']['kernel']}) out {c['fp32']['out_max_abs_over_max_v']:.2e}"
        )
    return cases


# ------------------------------------------------------------------------------------- model


def run_config(settings: Settings, lm_layers: int, dtype: str = "bfloat16"):
    from lov15_megatron.config import load_config

    overrides = [
        "data.loader=synthetic", "data.num_workers=0", f"data.seq_length={settings.seq_len}",
        f"model.language.num_layers={lm_layers}", f"model.params_dtype={dtype}",
        "model.transformer_impl=local", "model.attention_backend=torch",
        f"runtime.device={settings.device}", "train.micro_batch_size=1",
        f"train.global_batch_size={settings.packs_per_step}",
        f"train.train_iters={settings.warmup_steps + settings.timed_steps}",
        *settings.model_overrides,
    ]  # fmt: skip
    return load_config(str(ROOT / STAGE_CONFIG), overrides)


def parameter_counts(cfg) -> tuple[int, int]:
    """(parameters outside the LM's layers, parameters per LM layer), from the config."""
    lm, v = cfg.model.language, cfg.model.vision
    h, f = lm.hidden_size, lm.ffn_hidden_size
    d = lm.kv_channels or h // lm.num_attention_heads
    q, kv = lm.num_attention_heads * d, lm.num_query_groups * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h + 2 * d
    step = lm.make_vocab_size_divisible_by
    vocab = -(-lm.vocab_size // step) * step
    fixed = vocab * h * (2 if lm.untie_embeddings_and_output_weights else 1) + h
    hv, fv, m = v.hidden_size, v.ffn_hidden_size, v.spatial_merge_size**2
    # QKV and projection with biases, two LayerNorms (weight and bias), GELU MLP with biases
    vit_layer = 4 * hv * hv + 2 * hv * fv + 8 * hv + fv
    # LayerNorm, then 4·hv → 4·hv → h with biases
    merger = 2 * hv + (hv * m) ** 2 + hv * m + hv * m * h + h
    # patch embedding (no bias), class embedding and its rotary angles
    vit_fixed = v.in_channels * v.patch_size**2 * hv + hv + hv // v.num_attention_heads // 2
    fixed += v.num_layers * vit_layer + merger + vit_fixed + 4 * hv  # pre- and post-LayerNorm
    return fixed, per_layer


def layers_that_fit(free_bytes: float, fixed: int, per_layer: int, reserve_gib: float,
                    most: int) -> int:  # fmt: skip
    """LM layers whose weights, gradients and optimizer state (``BYTES_PER_PARAM`` each) fit in
    ``free_bytes`` next to the rest of the model and ``reserve_gib`` of activations; 1 … most."""
    budget = free_bytes - reserve_gib * 2**30 - fixed * BYTES_PER_PARAM
    return max(1, min(most, int(budget // (per_layer * BYTES_PER_PARAM))))


def fit_lm_layers(settings: Settings, device) -> tuple[int, dict[str, float]]:
    """As many LM layers as the GPU's free memory holds (:func:`layers_that_fit`; full recompute
    keeps one chunk's activations, the ViT's and the head's at a time)."""
    import torch

    fixed, per_layer = parameter_counts(run_config(settings, 1))
    free, total = torch.cuda.mem_get_info(device)
    reserve = settings.activation_reserve_gib
    layers = layers_that_fit(free, fixed, per_layer, reserve, settings.max_lm_layers)
    info = {
        "free_gib": free / 2**30, "total_gib": total / 2**30,
        "fixed_params": fixed, "params_per_lm_layer": per_layer,
        "bytes_per_param": BYTES_PER_PARAM, "activation_reserve_gib": reserve,
    }  # fmt: skip
    return layers, info


def make_batches(settings: Settings, cfg, count: int, seed: int = 0) -> list[dict]:
    from gpu_packs import pack_batch, plan_packs

    v = cfg.model.vision
    ids = (v.image_token_id, v.vision_start_token_id, v.vision_end_token_id)
    merge = v.spatial_merge_size**2
    packs = plan_packs(count, settings.seq_len, seed, merge)
    return [
        pack_batch(p, settings.seq_len, seed * 1000 + i, cfg.model.language.vocab_size, ids, merge)
        for i, p in enumerate(packs)
    ]


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def agreement(cfg, family, chunk, batches: list[dict], device) -> dict[str, Any]:
    """bf16 model against an fp32 copy with the same weights on ``batches`` (no update)."""
    import torch

    from lov15_megatron.models.lm_loss import token_losses
    from lov15_megatron.training import setup

    cfg32 = run_config_like(cfg, "float32")
    (model32,) = setup.build_model_chunks(cfg32, family.build_model)
    state = {k: v for k, v in chunk.state_dict().items() if "_extra_state" not in k}
    missing, unexpected = model32.load_state_dict(state, strict=False)
    missing = [k for k in missing if "_extra_state" not in k]
    if missing or unexpected:
        raise RuntimeError(f"fp32 copy: missing {missing[:3]}, unexpected {unexpected[:3]}")
    vocab = cfg.model.language.vocab_size
    layout = {"cp": 1, "cp_rank": 0, "total_multiple_of": 1}
    sums = {"diff_sq": 0.0, "ref_sq": 0.0, "max_abs": 0.0, "max_logit": 0.0, "mean_tok_max": 0.0}
    loss = {"fp32": 0.0, "bf16": 0.0, "tokens": 0.0}
    chunk.eval()
    model32.eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            for batch in batches:
                on_device = {k: t.to(device) for k, t in batch.items()}
                inputs = family.forward_inputs(cfg, on_device, layout)
                inputs["labels"] = inputs["loss_mask"] = None
                labels, mask = on_device["labels"], on_device["loss_mask"]
                z32 = model32(**inputs)[..., :vocab].float()
                loss["fp32"] += float((token_losses(z32.clone(), labels, vocab) * mask).sum())
                z16 = chunk(**inputs)[..., :vocab].float()
                loss["bf16"] += float((token_losses(z16.clone(), labels, vocab) * mask).sum())
                loss["tokens"] += float(mask.sum())
                for rows in torch.split(torch.arange(z32.shape[1], device=device), 1024):
                    a, b = z16[0, rows], z32[0, rows]
                    diff = (a - b).abs()
                    sums["diff_sq"] += float(diff.double().square().sum())
                    sums["ref_sq"] += float(b.double().square().sum())
                    sums["max_abs"] = max(sums["max_abs"], float(diff.max()))
                    sums["max_logit"] = max(sums["max_logit"], float(b.abs().max()))
                    tok_max = diff.max(-1).values * mask[0, rows]
                    sums["mean_tok_max"] += float(tok_max.sum())
                del z32, z16
    finally:
        chunk.train()
    del model32
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    loss32, loss16 = loss["fp32"] / loss["tokens"], loss["bf16"] / loss["tokens"]
    lm_layers, vit_layers = cfg.model.language.num_layers, cfg.model.vision.num_layers
    rel = math.sqrt(sums["diff_sq"] / sums["ref_sq"])
    # |Δ loss_i| ≤ |Δ lse_i| + |Δ z_i,label| ≤ 2·max_j |Δ z_ij|: a mean over the loss tokens
    loss_bound = 2.0 * sums["mean_tok_max"] / loss["tokens"]
    return {
        "packs": len(batches),
        "loss_tokens": int(loss["tokens"]),
        "loss_fp32": loss32,
        "loss_bf16": loss16,
        "loss_abs_diff": abs(loss16 - loss32),
        "loss_rel_diff": abs(loss16 - loss32) / abs(loss32),
        "loss_bound_from_logits": loss_bound,
        "logit_rel_rms_diff": rel,
        "logit_rel_bound": bf16_logit_bound(lm_layers, vit_layers),
        "logit_max_abs_diff": sums["max_abs"],
        "logit_max_abs": sums["max_logit"],
    }


def run_config_like(cfg, dtype: str):
    """``cfg`` with another ``model.params_dtype`` (and nothing else changed)."""
    import copy

    from lov15_megatron.config import validate

    other = copy.deepcopy(cfg)
    other.model.params_dtype = dtype
    validate(other)
    return other


def memory_now(device) -> dict[str, float]:
    import torch

    if device.type == "cuda":
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def train_phase(settings: Settings, lm_layers: int, device, started: float) -> dict[str, Any]:
    """Build (the trainer's set-up), check bf16 against fp32, train; returns the measurements."""
    import torch
    from gpu_packs import pack_shape

    from lov15_megatron.models.registry import family_for_config
    from lov15_megatron.training import flops, setup
    from lov15_megatron.training.step import make_forward_step, train_step

    cfg = run_config(settings, lm_layers)
    family = family_for_config(cfg)
    steps = settings.warmup_steps + settings.timed_steps
    batches = make_batches(settings, cfg, settings.packs_per_step * steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    chunks = setup.build_model_chunks(cfg, family.build_model)
    params = sum(p.numel() for c in chunks for p in c.parameters())
    dtypes: dict[str, int] = {}
    for p in (p for c in chunks for p in c.parameters()):
        name = str(p.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + p.numel()
    log(f"built {family.name}: {lm_layers} LM layers, {params / 1e6:,.1f} M parameters "
        f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    fixed, per_layer = parameter_counts(cfg)
    first_step = batches[: settings.packs_per_step]
    t0 = time.perf_counter()
    agree = agreement(cfg, family, chunks[0], first_step, device)
    log(
        f"bf16 vs fp32 on {agree['packs']} packs: loss {agree['loss_bf16']:.5f} vs "
        f"{agree['loss_fp32']:.5f}, logits rel rms {agree['logit_rel_rms_diff']:.2e} (bound "
        f"{agree['logit_rel_bound']:.2e}) ({time.perf_counter() - t0:.1f} s)"
    )
    agree["memory"] = memory_now(device)  # the peak while both copies were held
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = setup.wrap_ddp(cfg, chunks)
    optimizer = setup.build_optimizer(cfg, model)
    scheduler = setup.build_scheduler(cfg, optimizer)
    forward_step = make_forward_step(family, cfg)
    n_micro = setup.num_microbatches(cfg)
    data = flops.CountingIterator(iter(batches))
    peak = flops.peak_tflops(device)
    rows: list[dict[str, Any]] = []
    stopped_for_time = False
    for step in range(1, steps + 1):
        if rows and step > settings.warmup_steps + 1:
            elapsed = time.perf_counter() - started
            if elapsed + 1.5 * rows[-1]["seconds"] > settings.time_budget_s:
                stopped_for_time = True
                log(f"stopping before step {step}: {elapsed:.0f} s of the time budget spent")
                break
        _synchronize(device)
        t0 = time.perf_counter()
        res = train_step(cfg, data, model, optimizer, scheduler, n_micro, forward_step)
        _synchronize(device)
        dt = time.perf_counter() - t0
        counts = data.take()
        model_tf = flops.step_flops(cfg, counts) / dt / 1e12
        hw_tf = flops.step_flops(cfg, counts, hardware=True) / dt / 1e12
        row = {
            "step": step, "warmup": step <= settings.warmup_steps, "loss": res.loss,
            "grad_norm": res.grad_norm, "seconds": dt, "tokens": counts.token_positions,
            "patches": counts.patches, "tokens_per_s": counts.token_positions / dt,
            "model_tflops": model_tf, "hardware_tflops": hw_tf,
            "mfu": model_tf / peak if peak else None, "hfu": hw_tf / peak if peak else None,
        }  # fmt: skip
        rows.append(row)
        log(
            f"step {step}{' (warm-up)' if row['warmup'] else ''}: loss {res.loss:.5f}, "
            f"{dt:.2f} s, {row['tokens_per_s']:,.0f} tokens/s, {model_tf:.1f} TFLOP/s model, "
            f"{hw_tf:.1f} hardware"
        )
    timed = [r for r in rows if not r["warmup"]] or rows
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    model_tf = sum(r["model_tflops"] * r["seconds"] for r in timed) / seconds
    hw_tf = sum(r["hardware_tflops"] * r["seconds"] for r in timed) / seconds
    first_loss = rows[0]["loss"]
    shapes = [pack_shape(b, cfg.model.vision.image_token_id) for b in batches]
    result = {
        "packs": {k: sum(p[k] for p in shapes) / len(shapes) for k in shapes[0]},
        "lm_layers": lm_layers,
        "vit_layers": cfg.model.vision.num_layers,
        "parameters": params,
        "parameters_estimate": fixed + lm_layers * per_layer,
        "parameter_dtypes": dtypes,  # the local spec's norms keep fp32 weights
        "recompute": f"{cfg.train.recompute.granularity}/{cfg.train.recompute.method}/"
        f"{cfg.train.recompute.num_layers}",
        "packs_per_step": settings.packs_per_step,
        "steps": rows,
        "stopped_for_time": stopped_for_time,
        "timed_steps": len(timed),
        "tokens_per_s": tokens / seconds,
        "model_tflops": model_tf,
        "hardware_tflops": hw_tf,
        "peak_tflops": peak,
        "mfu": model_tf / peak if peak else None,
        "hfu": hw_tf / peak if peak else None,
        "memory": memory_now(device),
        "agreement": {
            **agree,
            # step 1 is the forward of the same packs before any update, in the trainer's loss
            # path (logits only at loss positions), bf16
            "train_step1_loss": first_loss,
            "train_step1_rel_diff": abs(first_loss - agree["loss_fp32"]) / agree["loss_fp32"],
        },
    }
    del model, optimizer, scheduler, chunks
    gc.collect()
    return result


# ---------------------------------------------------------------------------------- reporting


def environment(device) -> dict[str, Any]:
    import megatron.core
    import torch

    from lov15_megatron.models import attention

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "varlen_attn_in_torch": attention._varlen_attn is not None,
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a machine without it fails earlier
        env["transformers"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = props.total_memory / 2**30
        env["gpu_sms"] = props.multi_processor_count
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def checks(report: dict[str, Any]) -> dict[str, bool]:
    """The pass/fail lines of the report (every bound is derived in this module)."""
    out = {"no_errors": not report["errors"]}
    if not report.get("skip_training"):
        out["training_ran"] = "training" in report
    for case in report["attention"]:
        for label in ("bf16", "fp32"):
            out[f"attention_{case['case']}_{label}"] = case[label]["ok"]
    train = report.get("training")
    if train:
        a = train["agreement"]
        out["losses_finite"] = all(math.isfinite(r["loss"]) for r in train["steps"])
        out["logits_within_bound"] = a["logit_rel_rms_diff"] <= a["logit_rel_bound"]
        # the eval-path loss difference is at most 2·mean(max |Δz|) (+ fp32 rounding)
        out["loss_within_logit_bound"] = (
            a["loss_abs_diff"] <= a["loss_bound_from_logits"] * (1 + 1e-3) + 1e-5 * a["loss_fp32"]
        )
        out["tokens_per_s_positive"] = train["tokens_per_s"] > 0
    return out


def markdown(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    where = env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads)"
    lines = [
        f"# gpu_check ({s['name']}) — {env['date']}",
        "",
        f"{where}; torch {env['torch']} (CUDA {env['cuda']}), megatron-core "
        f"{env['megatron_core']}, transformers {env['transformers']}; local spec, torch "
        f"attention core (varlen in torch: {env['varlen_attn_in_torch']}). Wall time "
        f"{report['wall_s']:.0f} s.",
        "",
        "## Attention core (max |Δo| / max |v|; ‖Δgrad‖ / ‖grad‖)",
        "",
        "| case | tokens | segments | longest | path | kernel | out | bound | dq | dk | dv | "
        "grad bound | fwd+bwd ms | TFLOP/s | ok |",
        "|" + " --- |" * 15,
    ]
    for c in report["attention"]:
        for label in ("bf16", "fp32"):
            r = c[label]
            g = r["grad_rel"]
            lines.append(
                f"| {c['case']} | {c['tokens']} | {c['segments']} | {c['longest_segment']} | "
                f"{label} | {r['kernel']} | {r['out_max_abs_over_max_v']:.2e} | "
                f"{r['out_bound']:.1e} | {g['dq']:.2e} | {g['dk']:.2e} | {g['dv']:.2e} | "
                f"{r['grad_bound']:.1e} | {r['fwd_bwd_ms']:.1f} | {r['tflops']:.2f} | {r['ok']} |"
            )
    train = report.get("training")
    if train:
        a, m = train["agreement"], train["memory"]
        pct = (lambda x: f"{100 * x:.1f} %") if train["peak_tflops"] else (lambda x: "n/a")
        mem = ", ".join(f"{k} {v:.2f}" for k, v in m.items())
        p = train["packs"]
        lines += [
            "",
            "## Training (bf16, the 4B stage-1.5 recipe)",
            "",
            f"{train['lm_layers']} LM layers + {train['vit_layers']} ViT layers, "
            f"{train['parameters'] / 1e6:,.1f} M parameters; recompute {train['recompute']}; "
            f"{train['packs_per_step']} packs of {p['tokens']:.0f} tokens per step (mean "
            f"{p['segments']:.1f} samples, {p['images']:.1f} images, {p['patches']:.0f} ViT "
            f"patches, {p['loss_tokens']:.0f} loss tokens per pack).",
            "",
            "| timed steps | tokens/s | model TFLOP/s | hardware TFLOP/s | peak TFLOP/s | MFU | "
            "HFU | memory (GiB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            f"| {train['timed_steps']} | {train['tokens_per_s']:,.0f} | "
            f"{train['model_tflops']:.2f} | {train['hardware_tflops']:.2f} | "
            f"{train['peak_tflops'] or 'n/a'} | {pct(train['mfu'] or 0)} | "
            f"{pct(train['hfu'] or 0)} | {mem} |",
            "",
            "| bf16 vs fp32 (same weights) | value | bound |",
            "| --- | --- | --- |",
            f"| loss fp32 / bf16 (eval path, {a['packs']} packs) | {a['loss_fp32']:.5f} / "
            f"{a['loss_bf16']:.5f} | |",
            f"| loss abs diff | {a['loss_abs_diff']:.2e} | {a['loss_bound_from_logits']:.2e} |",
            f"| train step 1 loss (bf16 trainer path) | {a['train_step1_loss']:.5f} "
            f"(rel diff {a['train_step1_rel_diff']:.2e}) | |",
            f"| logits ‖Δz‖/‖z‖ | {a['logit_rel_rms_diff']:.2e} | {a['logit_rel_bound']:.2e} |",
            f"| logits max abs diff (max abs logit) | {a['logit_max_abs_diff']:.3f} "
            f"({a['logit_max_abs']:.2f}) | |",
            "",
            "| step | loss | grad norm | s | tokens/s | model TFLOP/s | hardware TFLOP/s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in train["steps"]:
            gn = "n/a" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
            lines.append(
                f"| {r['step']}{' (warm-up)' if r['warmup'] else ''} | {r['loss']:.5f} | {gn} | "
                f"{r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | {r['model_tflops']:.2f} | "
                f"{r['hardware_tflops']:.2f} |"
            )
    if report["environment"].get("varlen_compat"):
        lines += ["", f"Note: {report['environment']['varlen_compat']}."]
    if report["oom_attempts"]:
        lines += ["", "Out of memory at: " + ", ".join(
            f"{a['lm_layers']} LM layers" for a in report["oom_attempts"])]  # fmt: skip
    if report["errors"]:
        lines += ["", "## Errors", ""]
        lines += [f"- {e['phase']}: `{e['error']}`" for e in report["errors"]]
    lines += ["", "## Checks", ""]
    lines += [f"- {name}: {'pass' if ok else 'FAIL'}" for name, ok in report["checks"].items()]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (under 2 min)")
    ap.add_argument("--out", type=Path, default=None, help="output folder ($OUT, else outputs/)")
    ap.add_argument("--lm-layers", type=int, default=None, help="LM layers (GPU default: fit)")
    ap.add_argument("--seq-len", type=int, default=None, help="pack length (GPU default 8192)")
    ap.add_argument("--packs-per-step", type=int, default=None)
    ap.add_argument("--timed-steps", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds before steps stop")
    ap.add_argument("--skip-training", action="store_true", help="the attention part only")
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = replace(SMOKE if args.cpu_smoke else GPU)  # a copy: the defaults stay as written
    for name, value in (
        ("lm_layers", args.lm_layers), ("seq_len", args.seq_len),
        ("packs_per_step", args.packs_per_step), ("timed_steps", args.timed_steps),
        ("time_budget_s", args.time_budget),
    ):  # fmt: skip
        if value is not None:
            if value <= 0:
                raise SystemExit(f"gpu_check: --{name.replace('_', '-')} must be > 0, got {value}")
            setattr(s, name, value)
    if s.lm_layers is not None:
        s.max_lm_layers = max(s.max_lm_layers, s.lm_layers)
    return s


def record_error(report: dict[str, Any], phase: str, error: BaseException) -> None:
    """A failed part goes into the report (one line, and the traceback's tail) instead of ending
    the run: one device run should bring back everything that worked."""
    import traceback

    line = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    tail = traceback.format_exception(error)[-6:]
    report["errors"].append({"phase": phase, "error": line, "traceback": "".join(tail)[-3000:]})
    log(f"{phase} failed: {line}")


def training_with_retries(settings: Settings, device, started: float, report: dict) -> None:
    """Part 3 with as many LM layers as fit; an out-of-memory error retries with 70 % of them
    (at most twice), each attempt recorded."""
    import torch

    layers = settings.lm_layers
    if layers is None:
        layers, report["fit"] = fit_lm_layers(settings, device)
        log(f"{report['fit']['free_gib']:.1f} GiB free: {layers} LM layers fit")
    while True:
        try:
            report["training"] = train_phase(settings, layers, device, started)
            return
        except torch.cuda.OutOfMemoryError as e:
            report["oom_attempts"].append({"lm_layers": layers, "error": str(e).splitlines()[0]})
            log(f"out of memory with {layers} LM layers")
            if len(report["oom_attempts"]) > 2 or layers == 1:
                raise
        # outside the except block: the traceback (and the model in its frames) is gone
        gc.collect()
        torch.cuda.empty_cache()
        layers = max(1, int(layers * 0.7))


class TimeUp(BaseException):
    """SIGTERM (``gpu_check.sh``'s timeout): stop the part in progress and write the report."""


def _time_up(signum: int, frame: object) -> None:
    raise TimeUp(f"signal {signum}: the run's time limit")


def save_report(out: Path, report: dict[str, Any], started: float) -> list[str]:
    """Write the JSON and the markdown (under temporary names, then renamed); returns the
    failed checks. Called after each part, so that a run stopped later still brings back the
    parts it finished."""
    report["wall_s"] = time.perf_counter() - started
    report["checks"] = checks(report)
    write_atomic(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / "gpu_check.md", markdown(report))
    return [name for name, ok in report["checks"].items() if not ok]


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    settings = settings_from(args)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "outputs" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (use --cpu-smoke on CPU)", file=sys.stderr)
        return 2
    from gpu_packs import pack_shape

    from lov15_megatron.runtime import distributed

    cfg = run_config(settings, settings.lm_layers or 1)
    rt = distributed.initialize(cfg)
    device = rt.device
    report: dict[str, Any] = {
        "environment": environment(device), "settings": asdict(settings), "errors": [],
        "attention": [], "oom_attempts": [], "skip_training": args.skip_training,
    }  # fmt: skip
    from lov15_megatron.models.attention import VARLEN_COMPAT

    report["environment"]["varlen_compat"] = VARLEN_COMPAT
    log(f"{report['environment'].get('gpu', 'CPU')}: torch {torch.__version__}, megatron-core "
        f"{report['environment']['megatron_core']}")  # fmt: skip
    if report["environment"]["varlen_compat"]:
        log(report["environment"]["varlen_compat"])
    signal.signal(signal.SIGTERM, _time_up)
    try:
        probe = make_batches(settings, cfg, 1, seed=99)[0]
        report["packs"] = pack_shape(probe, cfg.model.vision.image_token_id)
        try:
            report["attention"] = attention_check(settings, probe, device)
        except Exception as e:  # noqa: BLE001 - reported, and the training part still runs
            record_error(report, "attention", e)
        save_report(out, report, started)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.skip_training:
            try:
                training_with_retries(settings, device, started, report)
                report["packs"] = report["training"]["packs"]
            except Exception as e:  # noqa: BLE001 - reported
                record_error(report, "training", e)
    except TimeUp as e:
        record_error(report, "time limit", e)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        failed = save_report(out, report, started)
        log(f"wrote {out / 'gpu_check.json'} and gpu_check.md in {report['wall_s']:.0f} s")
        distributed.shutdown()
    if failed:
        log(f"checks failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
