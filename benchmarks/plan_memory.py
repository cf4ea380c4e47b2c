"""The planner's memory estimates (``lov15_megatron/plan.py``) against a CPU training step.

The Qwen3-4B language model's width (``configs/models/qwen3_4b.yaml``: hidden 2560, 32 heads,
8 KV groups, head dim 128, ffn 9728, tied embeddings) cut to ``--layers`` decoder layers, with
a ``--vocab``-word vocabulary (the real 151 936 words' logits need more memory than a shared
2-core box has), one sequence of ``--seq`` tokens, bf16 weights (the config's), built with the
trainer's own set-up (Megatron DDP, distributed optimizer, Adam) and trained one step on the
synthetic stream. The cases (``--cases``):

- ``none``, ``full``: full training without and with full recomputation (uniform, one layer
  per chunk);
- ``lora``: LoRA on that LM with the ``stage2_lora.yaml`` recipe's values (rank 16, alpha 32,
  dropout 0.05, the four linears): frozen base linears, whose inputs the planner does not count;
- ``stage1``: the LLaVA-OV-1.5-4B VLM (``configs/models/llava_ov_1_5_4b.yaml``, its real
  vocabulary for the image token ids, the ViT cut to 2 layers) with only the merger trained, on
  one packed row holding one 32 × 32-patch image (256 image tokens): the ViT runs no backward
  and should keep nothing, the frozen LM only its non-linear ops' inputs.

Measured:

- weights, fp32 gradient buffers and the optimizer's state: the bytes of the tensors it holds;
- activations: every tensor autograd saves for the backward pass (``saved_tensors_hooks``,
  parameters excluded, one count per storage), by where it is saved (each LM decoder layer, the
  ViT, the merger, outside them: embedding, final norm, logits and loss) and when (in the
  forward pass, kept until the backward; during the backward pass, what full recomputation
  saves again). In the frozen cases the last decoder layer is compared: with no recomputation
  the first layer's input needs no gradient (nothing before it trains), so its first norm keeps
  nothing.

Next to each, the planner's estimate for the same config and pack. Results go to
``docs/parallelism-choice.md``.

    python benchmarks/plan_memory.py [--layers 2] [--seq 2048] [--vocab 32768] \\
        [--cases none full lora stage1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


LORA = "peft={rank: 16, alpha: 32.0, dropout: 0.05}"  # the stage2_lora.yaml recipe's values
IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653  # the released tokenizer's ids
GRID = 32  # the stage-1 case's one image: 32 × 32 patches of 14 px, 256 LM image tokens


def _overrides(layers: int, seq: int, vocab: int, recompute: str, recipe: str) -> list[str]:
    out = [f"model.language.num_layers={layers}", "model.language.max_position_embeddings=4096",
           f"data.seq_length={seq}", "train.micro_batch_size=1", "train.global_batch_size=1",
           "train.train_iters=1", "runtime.device=cpu", "optimizer.lr=1e-4"]  # fmt: skip
    if recipe == "stage1":  # the VLM's real vocabulary (its image ids); the ViT cut to 2 layers
        out += ["model.vision.num_layers=2", "train.trainable=[merger]"]
    else:
        out.append(f"model.language.vocab_size={vocab}")
    if recipe == "lora":
        out += ["checkpoint.pretrained=/base", LORA]
    if recompute == "full":
        out += ["train.recompute.granularity=full", "train.recompute.num_layers=1"]
    return out


def _config(layers: int, seq: int, vocab: int, recompute: str, recipe: str):
    from lov15_megatron.config import load_config

    model = "llava_ov_1_5_4b" if recipe == "stage1" else "qwen3_4b"
    return load_config(f"configs/models/{model}.yaml",
                       _overrides(layers, seq, vocab, recompute, recipe))  # fmt: skip


def _image_batch(seq: int) -> dict:
    """One packed row in the task encoder's layout: text, one GRID × GRID image, text; the
    loss on the text."""
    import torch

    gen = torch.Generator().manual_seed(0)
    image = [VISION_START, *[IMAGE_PAD] * (GRID * GRID // 4), VISION_END]
    text = torch.randint(0, 5000, (seq + 1 - len(image),), generator=gen).tolist()
    ids = torch.tensor(text[:8] + image + text[8:])
    labels = ids[1:].clone()
    labels[(labels == IMAGE_PAD) | (labels == VISION_START) | (labels == VISION_END)] = -100
    return {
        "input_ids": ids[None, :-1], "labels": labels[None],
        "loss_mask": (labels[None] != -100).float(),
        "position_ids": torch.arange(seq)[None],
        "pixel_values": torch.randn(GRID * GRID, 588, generator=gen),
        "image_grid_thw": torch.tensor([[1, GRID, GRID]]),
        "cu_seqlens": torch.tensor([0, seq], dtype=torch.int32),
    }  # fmt: skip


def run_case(layers: int, seq: int, vocab: int, recompute: str, recipe: str) -> dict:
    """Inside one rank: build, one training step with saved-tensor accounting; measure."""
    import torch
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from lov15_megatron.models.registry import family_for_config
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import setup, synthetic
    from lov15_megatron.training.step import train_step

    cfg = _config(layers, seq, vocab, recompute, recipe)
    distributed.initialize(cfg)
    model = setup.wrap_ddp(cfg, setup.build_model_chunks(cfg, family_for_config(cfg).build_model))
    optimizer = setup.build_optimizer(cfg, model)
    scheduler = setup.build_scheduler(cfg, optimizer)
    params = [p for c in model for p in c.module.parameters()]
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    state: dict = {"phase": "forward", "where": ["outside"]}
    seen: dict[tuple[str, str], dict[int, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            key = (state["phase"], state["where"][-1])
            seen.setdefault(key, {})[storage.data_ptr()] = storage.nbytes()
        return t

    def label(module: torch.nn.Module, name: str) -> None:
        def enter(*_) -> None:
            state["where"].append(name)

        def leave(*_) -> None:  # returns None: the module's output stays
            state["where"].pop()

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    def forward_done(*_):
        state["phase"] = "backward"

    top = model[0].module
    lm_layers = 0
    for name, m in top.named_modules():
        if name in ("vision_model", "vision_projection"):
            label(m, "vit" if name == "vision_model" else "merger")
        elif isinstance(m, TransformerLayer) and not name.startswith("vision"):
            label(m, f"layer{lm_layers}")  # the LM's decoder layers, in order
            lm_layers += 1
    top.register_forward_hook(forward_done)
    data = iter([_image_batch(seq)]) if recipe == "stage1" else synthetic.synthetic_batches(cfg)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(cfg, data, model, optimizer, scheduler, setup.num_microbatches(cfg))
    grads = sum(p.main_grad.numel() * p.main_grad.element_size() for p in params
                if p.requires_grad)  # fmt: skip
    opt = 0
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in chained.optimizer.state.values():
            opt += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
        # bf16 weights: the distributed optimizer's fp32 master copies of its shards
        for group in getattr(chained, "shard_fp32_from_float16_groups", []):
            opt += sum(p.numel() * p.element_size() for p in group)
    distributed.shutdown()
    out = {"recompute": recompute, "recipe": recipe,
           "weights": sum(p.numel() * p.element_size() for p in params), "grads": grads,
           "optimizer": opt}  # fmt: skip
    for (phase, where), d in seen.items():
        out[f"{phase}_{where}"] = sum(d.values())
    for phase in ("forward", "backward"):  # all decoder layers together
        out[f"{phase}_layers"] = sum(v for k, v in out.items() if k.startswith(f"{phase}_layer"))
    return out


def planned(layers: int, seq: int, vocab: int, recompute: str, recipe: str) -> dict:
    """The planner's numbers for the same run (one GPU, one pack of ``seq`` tokens)."""
    from lov15_megatron.plan import (
        Hardware,
        PackShape,
        forward_only_output_bytes,
        lm_layer_activation_bytes,
        plan_layout,
        vit_layer_activation_bytes,
    )

    cfg = _config(layers, seq, vocab, recompute, recipe)
    if recipe == "stage1":  # loss on the text tokens (the labels are shifted: one fewer)
        loss = seq - GRID * GRID // 4 - 3
        shape = PackShape(seq, seq, 1, GRID * GRID, 1, loss_tokens=loss)
    else:  # synthetic: every position a loss token
        shape = PackShape(seq, seq, 1, loss_tokens=seq)
    (stage,) = plan_layout(cfg, shape, 1, Hardware()).stages
    size = 2 if cfg.model.params_dtype == "bfloat16" else 4
    return {
        "weights": stage.weights_gb * 1e9,
        "grads": stage.grads_gb * 1e9,
        "optimizer": stage.optimizer_gb * 1e9,
        "activations": stage.activations_gb * 1e9,
        "per_layer": lm_layer_activation_bytes(cfg, seq, 1),
        "vit_layer": vit_layer_activation_bytes(cfg, GRID * GRID + 1, 1),
        "vit_output": forward_only_output_bytes(cfg, shape, 1),
        "layer_input": seq * cfg.model.language.hidden_size * size,
        # logits, their fp32 copy for the cross-entropy (bf16 only) and fp32 gradient
        "logits": seq * cfg.model.language.vocab_size * (size + (4 if size == 2 else 0) + 4),
    }


def _rows(m: dict, p: dict, layers: int, outside_none: float) -> list[tuple[str, float, float]]:
    """(quantity, measured, planner) of one case."""
    rows = [("weights", m["weights"], p["weights"]), ("gradient buffers", m["grads"], p["grads"]),
            ("optimizer state", m["optimizer"], p["optimizer"])]  # fmt: skip
    if m["recipe"] == "full" and m["recompute"] == "none":
        rows.append(("saved in one decoder layer", m["forward_layers"] / layers, p["per_layer"]))
        # forward only (the logits' gradient comes later)
        rows.append(("saved outside the layers (logits, loss)", m.get("forward_outside", 0),
                     p["logits"]))  # fmt: skip
    elif m["recipe"] == "full":  # the chunk inputs are saved outside the layers
        rows.append(("kept layer inputs, all layers", m.get("forward_outside", 0)
                     - outside_none, p["layer_input"] * layers))  # fmt: skip
        rows.append(("re-saved per layer in backward", m["backward_layers"] / layers,
                     p["per_layer"]))  # fmt: skip
    else:  # the last layer: the first one's input needs no gradient (nothing before trains)
        rows.append((f"saved in decoder layer {layers} of {layers}",
                     m.get(f"forward_layer{layers - 1}", 0), p["per_layer"]))  # fmt: skip
    if m["recipe"] == "stage1":
        rows.append(("saved in the ViT's layers", m.get("forward_vit", 0), p["vit_layer"]))
        rows.append(("saved in the merger (planner: its input, the ViT's output)",
                     m.get("forward_merger", 0), p["vit_output"]))  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--cases", nargs="+", default=["none", "full", "lora", "stage1"],
                    choices=["none", "full", "lora", "stage1"],
                    help="none/full: full training without/with full recomputation; lora: LoRA "
                    "on the LM; stage1: the VLM with only the merger trained")  # fmt: skip
    args = ap.parse_args()
    from lov15_megatron.runtime.launch import run_ranks

    mib = 2.0**20
    print(f"Qwen3-4B width, {args.layers} layers, vocab {args.vocab}, seq {args.seq}, bf16 "
          f"weights, one step on CPU", flush=True)  # fmt: skip
    print("| case | quantity | measured | planner | planner / measured |")
    print("| --- | --- | --- | --- | --- |")
    outside_none = 0.0
    for name in args.cases:
        recompute = "full" if name == "full" else "none"
        recipe = name if name in ("lora", "stage1") else "full"
        case = (args.layers, args.seq, args.vocab, recompute, recipe)
        (m,) = run_ranks(1, run_case, *case, timeout=3600.0)
        p = planned(*case)
        print(json.dumps({"measured": m, "planned": p}), file=sys.stderr, flush=True)
        if name == "none":
            outside_none = m.get("forward_outside", 0)
        for quantity, got, want in _rows(m, p, args.layers, outside_none):
            ratio = f"{want / got:.2f}" if got else ("—" if want else "both 0")
            print(f"| {name} | {quantity} | {got / mib:.1f} MiB | {want / mib:.1f} MiB | "
                  f"{ratio} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
