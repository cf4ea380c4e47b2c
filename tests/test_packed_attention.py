"""The packed-sequence attention core against the dense block-diagonal-mask reference.

The reference is written here from the definition (scores, mask, softmax) in float64, independent
of the implementation; the CP check runs the real CP all-gather on 2 gloo ranks.
"""

from __future__ import annotations

import math

import pytest
import torch

from lov15_megatron.models.attention import PackedSequenceAttention, segment_attention
from lov15_megatron.models.packed_seq import (
    cp_partition_indices,
    pad_for_context_parallel,
)

HEADS, GROUPS, DIM = 4, 2, 8


def dense_reference(q, k, v, cu_seqlens, causal):
    """Attention with an explicit [t, t] block-diagonal mask (the old local path)."""
    t = q.shape[0]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool).tril()
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv)


def _qkv(t: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    make = lambda heads: torch.randn(t, heads, DIM, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(HEADS), make(GROUPS), make(GROUPS)


@pytest.mark.parametrize("causal", [True, False])
def test_segment_attention_equals_dense_mask(causal):
    # Uneven lengths, repeated lengths (batched together), a length-1 segment.
    cu = torch.tensor([0, 7, 14, 30, 31, 38, 50])
    q, k, v = _qkv(50)
    out = segment_attention(q, k, v, cu, causal=causal, scale=1 / math.sqrt(DIM))
    ref = dense_reference(q, k, v, cu, causal)
    assert (out - ref).abs().max() < 1e-12
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a - b).abs().max() < 1e-11


def test_core_module_thd_and_sbhd_and_errors():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    config = TransformerConfig(
        num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
        num_query_groups=GROUPS, attention_dropout=0.0, use_cpu_initialization=True,
    )  # fmt: skip

    class _Group:
        def size(self):
            return 1

    class _Groups:
        cp = _Group()

    core = PackedSequenceAttention(config, 1, AttnMaskType.causal, "self", pg_collection=_Groups())
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    q, k, v = _qkv(20, seed=1)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=8, max_seqlen_kv=8)  # fmt: skip
    out = core(q, k, v, None, packed_seq_params=params)
    assert out.shape == (20, HEADS * DIM)
    ref = dense_reference(q, k, v, cu.long(), True).reshape(20, -1)
    assert (out - ref).abs().max() < 1e-12

    # SBHD: [s, b, heads, d], one causal sequence per row = a THD stream of equal segments.
    s, b = 6, 3
    qs, ks, vs = (
        x.detach()[: s * b].reshape(b, s, *x.shape[1:]).transpose(0, 1) for x in (q, k, v)
    )
    out = core(qs, ks, vs, None)
    ref = dense_reference(
        *(x.transpose(0, 1).reshape(b * s, *x.shape[2:]) for x in (qs, ks, vs)),
        torch.arange(0, b * s + 1, s), True,
    )  # fmt: skip
    assert (out.transpose(0, 1).reshape(b * s, -1) - ref.reshape(b * s, -1)).abs().max() < 1e-12

    with pytest.raises(ValueError, match="no dense attention mask"):
        core(qs, ks, vs, torch.zeros(1, 1, s, s, dtype=torch.bool))
    bad = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu[:-1], cu_seqlens_kv=cu[:-1])
    with pytest.raises(ValueError, match="cu_seqlens ends at 12"):
        core(q, k, v, None, packed_seq_params=bad)
    dropout = TransformerConfig(
        num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
        attention_dropout=0.1, use_cpu_initialization=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="attention dropout"):
        PackedSequenceAttention(dropout, 1, AttnMaskType.causal, "self", pg_collection=_Groups())


def cp_attention_checks() -> dict:
    """In each of 2 ranks: CP attention of this rank's chunks = the full stream's rows, with
    gradients (K/V gradients reduce-scattered back)."""
    import torch.distributed as dist

    from lov15_megatron.models import attention
    from lov15_megatron.runtime import cpu_backend
    from lov15_megatron.runtime.distributed import init_process_group

    cpu_backend.enable()
    rank, world, _ = init_process_group(torch.device("cpu"))
    cp = world
    cu = torch.tensor([0, 13, 17, 40, 41])  # real segments of uneven lengths
    padded = pad_for_context_parallel(cu, cp).long()
    q, k, v = _qkv(int(padded[-1]), seed=3)
    full = segment_attention(q, k, v, padded, causal=True, scale=1 / math.sqrt(DIM))
    weights = torch.randn(full.shape, generator=torch.Generator().manual_seed(9), dtype=full.dtype)
    ref_grads = torch.autograd.grad((full * weights).sum(), (q, k, v))

    held = cp_partition_indices(padded, cp, rank)
    group = dist.new_group(list(range(world)))
    ql, kl, vl = (x.detach()[held].clone().requires_grad_() for x in (q, k, v))
    out = attention.context_parallel_segment_attention(
        ql, kl, vl, padded, group, scale=1 / math.sqrt(DIM)
    )
    grads = torch.autograd.grad((out * weights[held]).sum(), (ql, kl, vl))
    pairs = zip(grads, ref_grads, strict=True)
    return {
        "out_diff": float((out - full[held]).abs().max()),
        "grad_diff": max(float((g - r[held]).abs().max()) for g, r in pairs),
        "tokens": int(held.numel()),
    }


def test_context_parallel_attention_matches_full_stream():
    from lov15_megatron.runtime.launch import run_ranks

    results = run_ranks(2, cp_attention_checks)
    for r in results:
        assert r["out_diff"] < 1e-12, results
        assert r["grad_diff"] < 1e-11, results
    assert sum(r["tokens"] for r in results) == 48  # 13, 4, 23, 1 padded to 16, 4, 24, 4


def test_te_backend_without_te_is_one_line_exit_2():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "lov15_megatron.train", "--config", "configs/tiny_gpt.yaml",
            "runtime.device=cpu", "model.attention_backend=te", "train.train_iters=2"]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, cwd=root)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("config error")]
    assert lines == [
        "config error: model.attention_backend='te' needs the Transformer Engine spec: "
        "Transformer Engine is not importable"
    ], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
