"""The planner's memory estimates (``lov15_megatron/plan.py``) against a CPU training step.

The Qwen3-4B language model's width (``configs/models/qwen3_4b.yaml``: hidden 2560, 32 heads,
8 KV groups, head dim 128, ffn 9728, tied embeddings) cut to ``--layers`` decoder layers, with
a ``--vocab``-word vocabulary (the real 151 936 words' logits need more memory than a shared
2-core box has), one sequence of ``--seq`` tokens, bf16 weights (the config's), built with the
trainer's own set-up (Megatron DDP, distributed optimizer, Adam) and trained one step on the
synthetic stream, without and with full recomputation (uniform, one layer per chunk). Measured:

- weights, fp32 gradient buffers and the optimizer's state: the bytes of the tensors it holds;
- activations: every tensor autograd saves for the backward pass (``saved_tensors_hooks``,
  parameters excluded, one count per storage), split into those saved inside the decoder
  layers and outside them (embedding, final norm, logits and loss), in the forward pass (kept
  until the backward) and during the backward pass (what full recomputation saves again).

Next to each, the planner's estimate for the same config and pack. Results go to
``docs/parallelism-choice.md``.

    python benchmarks/plan_memory.py [--layers 2] [--seq 2048] [--vocab 32768]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _overrides(layers: int, seq: int, vocab: int, recompute: str) -> list[str]:
    out = [f"model.language.num_layers={layers}", f"model.language.vocab_size={vocab}",
           "model.language.max_position_embeddings=4096", f"data.seq_length={seq}",
           "train.micro_batch_size=1", "train.global_batch_size=1", "train.train_iters=1",
           "runtime.device=cpu", "optimizer.lr=1e-4"]  # fmt: skip
    if recompute == "full":
        out += ["train.recompute.granularity=full", "train.recompute.num_layers=1"]
    return out


def run_case(layers: int, seq: int, vocab: int, recompute: str) -> dict:
    """Inside one rank: build, one training step with saved-tensor accounting; measure."""
    import torch
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from lov15_megatron.config import load_config
    from lov15_megatron.models.registry import family_for_config
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import setup, synthetic
    from lov15_megatron.training.step import train_step

    cfg = load_config("configs/models/qwen3_4b.yaml", _overrides(layers, seq, vocab, recompute))
    distributed.initialize(cfg)
    model = setup.wrap_ddp(cfg, setup.build_model_chunks(cfg, family_for_config(cfg).build_model))
    optimizer = setup.build_optimizer(cfg, model)
    scheduler = setup.build_scheduler(cfg, optimizer)
    params = [p for c in model for p in c.module.parameters()]
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    state = {"phase": "forward", "in_layer": 0}
    seen: dict[tuple[str, str], dict[int, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            where = "layers" if state["in_layer"] else "outside"
            seen.setdefault((state["phase"], where), {})[storage.data_ptr()] = storage.nbytes()
        return t

    def enter(*_):
        state["in_layer"] += 1

    def leave(*_):
        state["in_layer"] -= 1

    def forward_done(*_):
        state["phase"] = "backward"

    gpt = model[0].module
    for m in gpt.modules():
        if isinstance(m, TransformerLayer):
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave)
    gpt.register_forward_hook(forward_done)
    data = synthetic.synthetic_batches(cfg)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(cfg, data, model, optimizer, scheduler, setup.num_microbatches(cfg))
    grads = sum(p.main_grad.numel() * p.main_grad.element_size() for p in params)
    opt = 0
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in chained.optimizer.state.values():
            opt += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
        # bf16 weights: the distributed optimizer's fp32 master copies of its shards
        for group in getattr(chained, "shard_fp32_from_float16_groups", []):
            opt += sum(p.numel() * p.element_size() for p in group)
    distributed.shutdown()
    return {
        "recompute": recompute,
        "weights": sum(p.numel() * p.element_size() for p in params),
        "grads": grads,
        "optimizer": opt,
        **{f"{phase}_{where}": sum(d.values()) for (phase, where), d in seen.items()},
    }


def planned(layers: int, seq: int, vocab: int, recompute: str) -> dict:
    """The planner's numbers for the same run (one GPU, one pack of ``seq`` tokens)."""
    from lov15_megatron.config import load_config
    from lov15_megatron.plan import (
        Hardware,
        PackShape,
        lm_layer_activation_bytes,
        plan_layout,
    )

    cfg = load_config("configs/models/qwen3_4b.yaml", _overrides(layers, seq, vocab, recompute))
    shape = PackShape(seq, seq, 1, loss_tokens=seq)  # synthetic: every position a loss token
    (stage,) = plan_layout(cfg, shape, 1, Hardware()).stages
    size = 2 if cfg.model.params_dtype == "bfloat16" else 4
    return {
        "weights": stage.weights_gb * 1e9,
        "grads": stage.grads_gb * 1e9,
        "optimizer": stage.optimizer_gb * 1e9,
        "activations": stage.activations_gb * 1e9,
        "per_layer": lm_layer_activation_bytes(cfg, seq, 1),
        "layer_input": seq * cfg.model.language.hidden_size * size,
        # logits, their fp32 copy for the cross-entropy (bf16 only) and fp32 gradient
        "logits": seq * cfg.model.language.vocab_size * (size + (4 if size == 2 else 0) + 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    args = ap.parse_args()
    from lov15_megatron.runtime.launch import run_ranks

    mib = 2.0**20
    print(f"Qwen3-4B width, {args.layers} layers, vocab {args.vocab}, seq {args.seq}, bf16 "
          f"weights, one step on CPU")  # fmt: skip
    print("| recompute | quantity | measured | planner | planner / measured |")
    print("| --- | --- | --- | --- | --- |")
    outside_none = 0
    for recompute in ("none", "full"):
        case = (args.layers, args.seq, args.vocab, recompute)
        (m,) = run_ranks(1, run_case, *case, timeout=3600.0)
        p = planned(*case)
        print(json.dumps({"measured": m, "planned": p}), file=sys.stderr, flush=True)
        rows = [("weights", m["weights"], p["weights"]), ("grad buffers", m["grads"], p["grads"]),
                ("optimizer state", m["optimizer"], p["optimizer"])]  # fmt: skip
        if recompute == "none":
            rows.append(("saved in one decoder layer", m.get("forward_layers", 0) / args.layers,
                         p["per_layer"]))  # fmt: skip
            outside_none = m.get("forward_outside", 0)
        else:  # the chunk inputs are saved outside the layers: the excess over no recompute
            rows.append(("kept layer inputs, all layers", m.get("forward_outside", 0)
                         - outside_none, p["layer_input"] * args.layers))  # fmt: skip
            rows.append(("re-saved per layer in backward", m.get("backward_layers", 0)
                         / args.layers, p["per_layer"]))  # fmt: skip
        if recompute == "none":  # measured: forward only (the logits' gradient comes later)
            rows.append(("saved outside the layers (logits, loss)", m.get("forward_outside", 0),
                         p["logits"]))  # fmt: skip
        for name, got, want in rows:
            ratio = want / got if got else float("nan")
            print(f"| {recompute} | {name} | {got / mib:.1f} MiB | {want / mib:.1f} MiB | "
                  f"{ratio:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
