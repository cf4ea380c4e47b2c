"""Peak memory and time of packed attention at the release's widths, on CPU.

One Rice ViT layer (width 1024, 16 heads, ffn 4096; packs of images of realistic sizes, each image
its own bidirectional segment) and one Qwen3-4B-width decoder layer (hidden 2560, 32 heads, 8 KV
groups, head dim 128, ffn 9728; packs of causal sub-samples of uneven lengths), forward +
backward, fp32, for packs of 2k … 32k tokens:

- ``packed``: our core (``models/attention.py``: THD, per-segment SDPA, never S×S);
- ``dense``: Megatron's ``DotProductAttention`` with the block-diagonal ``[1, 1, S, S]`` mask the
  local spec used before (it materialises ``[heads, S, S]`` scores); only up to
  ``--max-dense-tokens`` (the estimate of its scores alone is printed beyond);
- each with and without full recomputation of the layer.

Every case runs in a fresh process; it reports the resident memory it added during forward +
backward above what the weights and inputs hold (``peak``), what the forward pass leaves held for
the backward pass (``held``: what recomputation saves per layer), and the time of one
forward + backward. Results go to ``docs/packed-sequences.md``.

    python benchmarks/attention_memory.py [--parts vit lm] [--tokens 2048 8192 16384 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VIT = {"hidden": 1024, "heads": 16, "groups": 16, "ffn": 4096, "head_dim": 64}
LM = {"hidden": 2560, "heads": 32, "groups": 8, "ffn": 9728, "head_dim": 128}
# Image grids (patches) of realistic sizes: 504×672, 392×392, 560×420, 336×560 px at patch 14.
IMAGE_GRIDS = [(36, 48), (28, 28), (40, 30), (24, 40)]
SUBSAMPLE_LENGTHS = [700, 1500, 400, 2300, 1100, 900]


def segments(part: str, tokens: int) -> list[int]:
    """Segment lengths summing to ``tokens``: images (+1 class token) or text sub-samples."""
    sizes = [h * w + 1 for h, w in IMAGE_GRIDS] if part == "vit" else SUBSAMPLE_LENGTHS
    out, i = [], 0
    while sum(out) < tokens:
        out.append(min(sizes[i % len(sizes)], tokens - sum(out)))
        i += 1
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(part: str, tokens: int, path: str, recompute: bool) -> dict:
    """In a fresh process: build one layer, run forward + backward on one pack."""
    import torch
    import torch.nn.functional as F
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
    )

    from lov15_megatron.models.attention import PackedSequenceAttention
    from lov15_megatron.models.llava_ov.vit_specs import rice_vit_layer_spec
    from lov15_megatron.models.qwen3.specs import swap_modules
    from lov15_megatron.runtime import cpu_backend
    from lov15_megatron.runtime.distributed import init_process_group

    cpu_backend.enable()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 1000))
    init_process_group(torch.device("cpu"))
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)

    shape = VIT if part == "vit" else LM
    vit = part == "vit"
    config = TransformerConfig(
        num_layers=1,
        hidden_size=shape["hidden"],
        ffn_hidden_size=shape["ffn"],
        num_attention_heads=shape["heads"],
        num_query_groups=shape["groups"],
        kv_channels=shape["head_dim"],
        normalization="LayerNorm" if vit else "RMSNorm",
        gated_linear_unit=not vit,
        activation_func=F.gelu if vit else F.silu,
        add_bias_linear=vit,
        add_qkv_bias=vit,
        qk_layernorm=not vit,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        **(
            {
                "recompute_granularity": "full",
                "recompute_method": "uniform",
                "recompute_num_layers": 1,
            }
            if recompute
            else {}
        ),  # fmt: skip
    )
    if vit:
        layer = rice_vit_layer_spec(False, PackedSequenceAttention)
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from lov15_megatron.models.norms import TorchNormFactory

        layer = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        swaps = {WrappedTorchNorm: TorchNormFactory, DotProductAttention: PackedSequenceAttention}
        layer = swap_modules(layer, swaps)
    if path == "dense":  # the old local path: Megatron's attention with an explicit mask
        layer = swap_modules(layer, {PackedSequenceAttention: DotProductAttention})
        layer.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.arbitrary}
    block = TransformerBlock(
        config, TransformerBlockSubmodules(layer_specs=[layer], layer_norm=None),
        post_layer_norm=False,
    )  # fmt: skip
    lengths = segments(part, tokens)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    hidden = torch.randn(tokens, 1, shape["hidden"], requires_grad=True)
    d = shape["head_dim"]
    if vit:  # per-token angles (2-D RoPE), as the tower passes them
        rotary = torch.randn(tokens, 1, 1, d)
    else:  # positions restarting per sub-sample
        pos = torch.cat([torch.arange(n) for n in lengths]).float()
        inv = 1.0 / (1e6 ** (torch.arange(0, d, 2).float() / d))
        angles = pos[:, None] * inv
        rotary = torch.cat([angles, angles], -1)[:, None, None, :]
    if path == "dense":
        seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        allowed = seg[:, None] == seg[None, :]
        if not vit:
            allowed &= torch.ones(tokens, tokens, dtype=torch.bool).tril()
        mask, packed = (~allowed)[None, None], None
    else:
        mask = None
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))  # fmt: skip
    block.train()
    base = _rss()
    t0 = time.perf_counter()
    out = block(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary,
                packed_seq_params=packed)  # fmt: skip
    held = _rss() - base
    out.float().pow(2).mean().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"part": part, "tokens": tokens, "path": path, "recompute": recompute,
            "segments": len(lengths), "peak_gib": peak / 2**30, "held_gib": held / 2**30,
            "seconds": seconds}  # fmt: skip


def dense_scores_gib(part: str, tokens: int) -> float:
    shape = VIT if part == "vit" else LM
    return shape["heads"] * tokens * tokens * 4 / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["vit", "lm"], choices=["vit", "lm"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192, 16384, 32768])
    ap.add_argument(
        "--max-dense-tokens", type=int, default=4096,
        help="largest pack the dense path is run at (it needs heads·S² scores)",
    )  # fmt: skip
    ap.add_argument("--no-recompute", action="store_true", help="skip the recompute cases")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(**json.loads(args.case))))
        return
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    print("| part | pack tokens | segments | path | recompute | peak GiB | held GiB | s/pack |")
    print("|---|---|---|---|---|---|---|---|")
    for part in args.parts:
        for tokens in args.tokens:
            for path in ("packed", "dense"):
                for recompute in (False,) if args.no_recompute else (False, True):
                    if path == "dense" and tokens > args.max_dense_tokens:
                        if not recompute:
                            gib = dense_scores_gib(part, tokens)
                            print(f"| {part} | {tokens} | | dense | | not run: scores alone "
                                  f"{gib:.1f} GiB | | |", flush=True)  # fmt: skip
                        continue
                    case = {"part": part, "tokens": tokens, "path": path, "recompute": recompute}
                    proc = subprocess.run(
                        [sys.executable, __file__, "--case", json.dumps(case)],
                        capture_output=True, text=True, env=env,
                    )  # fmt: skip
                    if proc.returncode != 0:
                        why = proc.stderr.strip().splitlines()[-1][:80]
                        print(f"| {part} | {tokens} | | {path} | {recompute} | failed: "
                              f"{why} | | |", flush=True)  # fmt: skip
                        continue
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    rows.append(r)
                    print(f"| {part} | {tokens} | {r['segments']} | {path} | "
                          f"{'full' if recompute else 'none'} | {r['peak_gib']:.2f} | "
                          f"{r['held_gib']:.2f} | {r['seconds']:.1f} |", flush=True)  # fmt: skip
    print(f"{len(rows)} cases run")


if __name__ == "__main__":
    main()
