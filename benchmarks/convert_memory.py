"""Convert a random Qwen3-4B-shaped checkpoint HF → Megatron → HF; report time and peak RSS.

    python benchmarks/convert_memory.py [--workdir DIR] [--config configs/models/qwen3_4b.yaml]
        [--num-layers N]

A config with ``model.language.num_experts`` (``configs/models/qwen3_30b_a3b.yaml``) writes a
``Qwen3MoeForCausalLM`` checkpoint (router and per-expert weights, the released layout) and
converts it as ``qwen3-moe``; ``--num-layers`` scales the layer count down (width unchanged) to
fit the disk and memory at hand.

The HF checkpoint is generated tensor by tensor (bf16, 2 GiB shards), so generating it needs no
more memory than one tensor. Each conversion runs as its own ``tools/convert_checkpoint.py``
process; its peak resident set size is read from ``getrusage(RUSAGE_CHILDREN)`` in a fresh
wrapper process and reported relative to the checkpoint size. The round trip is checked
bit-exact on a sample of tensors. Results go to stdout as one JSON line per step.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lov15_megatron.config import load_config  # noqa: E402


def hf_tensor_shapes(cfg) -> dict[str, tuple[int, ...]]:
    lm = cfg.model.language
    h, f, d = lm.hidden_size, lm.ffn_hidden_size, lm.kv_channels
    q, kv = lm.num_attention_heads * d, lm.num_query_groups * d
    shapes = {"model.embed_tokens.weight": (lm.vocab_size, h), "model.norm.weight": (h,)}
    if lm.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (lm.vocab_size, h)
    for i in range(lm.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
        })  # fmt: skip
        if lm.num_experts is None:
            shapes.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                           p + "mlp.down_proj.weight": (h, f)})  # fmt: skip
            continue
        m = lm.moe_ffn_hidden_size
        shapes[p + "mlp.gate.weight"] = (lm.num_experts, h)
        for e in range(lm.num_experts):
            x = f"{p}mlp.experts.{e}."
            shapes.update({x + "gate_proj.weight": (m, h), x + "up_proj.weight": (m, h),
                           x + "down_proj.weight": (h, m)})  # fmt: skip
    return shapes


def hf_config(cfg) -> dict:
    lm = cfg.model.language
    out = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
        "hidden_size": lm.hidden_size, "intermediate_size": lm.ffn_hidden_size,
        "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_attention_heads,
        "num_key_value_heads": lm.num_query_groups, "head_dim": lm.kv_channels,
        "vocab_size": lm.vocab_size, "max_position_embeddings": lm.max_position_embeddings,
        "rope_theta": lm.rotary_base, "rms_norm_eps": lm.norm_epsilon, "attention_bias": False,
        "tie_word_embeddings": not lm.untie_embeddings_and_output_weights,
        "torch_dtype": "bfloat16",
    }  # fmt: skip
    if lm.num_experts is not None:
        out.update({
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "num_experts": lm.num_experts, "num_experts_per_tok": lm.moe_router_topk,
            "moe_intermediate_size": lm.moe_ffn_hidden_size,
            "norm_topk_prob": lm.moe_norm_topk_prob, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "router_aux_loss_coef": lm.moe_aux_loss_coeff,
        })  # fmt: skip
    return out


def write_random_checkpoint(cfg, out: Path, shard_bytes: int = 2 * 2**30) -> int:
    out.mkdir(parents=True)
    shapes = hf_tensor_shapes(cfg)
    gen = torch.Generator().manual_seed(0)
    shards, pending, size, total = [], {}, 0, 0
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen, dtype=torch.float32).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if pending and size + nbytes > shard_bytes:
            shards.append(pending)
            save_file(pending, out / f"shard{len(shards)}.tmp")
            pending, size = {}, 0
        pending[name], size, total = t, size + nbytes, total + nbytes
    shards.append(pending)
    save_file(pending, out / f"shard{len(shards)}.tmp")
    n, weight_map = len(shards), {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / f"shard{i}.tmp").rename(out / name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(hf_config(cfg)))
    return total


def run_measured(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one CLI run, measured in a fresh wrapper."""
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter();"
        "r = subprocess.run(sys.argv[1:]); dt = time.perf_counter() - t;"
        "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    cmd = [sys.executable, "-c", wrapper, sys.executable, str(ROOT / "tools/convert_checkpoint.py")]
    out = subprocess.run(cmd + args, capture_output=True, text=True, check=True)
    seconds, rss_kib = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(rss_kib) * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/lov15-convert-bench")
    parser.add_argument("--config", default=str(ROOT / "configs/models/qwen3_4b.yaml"))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--num-layers", type=int, help="fewer layers than the config (same width)")
    args = parser.parse_args()
    layers = [f"model.language.num_layers={args.num_layers}"] if args.num_layers else []
    cfg = load_config(args.config, layers)
    model = "qwen3" if cfg.model.language.num_experts is None else "qwen3-moe"
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    size = write_random_checkpoint(cfg, work / "hf")
    tensors = len(hf_tensor_shapes(cfg))
    seconds = round(time.perf_counter() - start, 1)
    print(json.dumps({"step": "generate", "layers": cfg.model.language.num_layers,
                      "tensors": tensors, "bytes": size, "seconds": seconds}))  # fmt: skip
    for step, cli_args in (
        ("hf-to-mcore", ["hf-to-mcore", "--model", model, "--hf-dir", str(work / "hf"),
                         "--save-dir", str(work / "mcore")]),
        ("mcore-to-hf", ["mcore-to-hf", "--model", model, "--load-dir", str(work / "mcore"),
                         "--save-dir", str(work / "hf_back"), "--hf-template", str(work / "hf")]),
    ):  # fmt: skip
        seconds, rss = run_measured(cli_args)
        print(json.dumps({
            "step": step, "seconds": round(seconds, 1), "peak_rss_gib": round(rss / 2**30, 2),
            "peak_rss_over_checkpoint": round(rss / size, 3),
            "throughput_gib_s": round(size / 2**30 / seconds, 2),
        }))  # fmt: skip
    index_name = "model.safetensors.index.json"
    original = json.loads((work / "hf" / index_name).read_text())["weight_map"]
    exported = json.loads((work / "hf_back" / index_name).read_text())["weight_map"]
    checked = 0
    for name in sorted(exported)[::25]:
        files = [work / "hf" / original[name], work / "hf_back" / exported[name]]
        a, b = (safe_open(f, framework="pt").get_tensor(name) for f in files)
        assert torch.equal(a, b), name
        checked += 1
    print(json.dumps({"step": "round-trip", "tensors_checked_bit_exact": checked}))
    if not args.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
