"""Activation recomputation of the whole model (Rice ViT + merger + Qwen3) through Megatron's knobs.

From identical weights and one packed micro-batch (several images, uneven sub-samples), every
recompute setting must give the gradients of the run without it (fp32, within 2.3e-5 relative:
``tests/tolerances.py``) and hold fewer activation bytes for the backward pass. Activation memory
is measured exactly, as the bytes of the distinct tensors autograd saves during the forward pass
(``saved_tensors_hooks``), which is what recomputation trades for compute; peak RSS at real
widths is in ``benchmarks/attention_memory.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import pack_rows, vlm_sample
from tolerances import fp32_rel_tol

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "none": ["train.recompute.granularity=none"],
    "full_uniform": ["train.recompute.granularity=full", "train.recompute.method=uniform"],
    "full_block": ["train.recompute.granularity=full", "train.recompute.method=block",
                   "train.recompute.num_layers=2"],
    "full_lm_only": ["train.recompute.granularity=full", "train.recompute.vision=false"],
    "selective": ["train.recompute.granularity=selective"],
}  # fmt: skip


def _saved_bytes_and_grads(model, batch) -> tuple[int, list[torch.Tensor]]:
    from lov15_megatron.models.packed_seq import thd_model_inputs

    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        if t.device.type == "cpu" and t.untyped_storage().nbytes():
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    inputs = thd_model_inputs(batch, image_token_id=151655)
    keys = ("input_ids", "position_ids", "pixel_values", "image_grid_thw", "packed_seq_params",
            "labels", "loss_mask")  # fmt: skip
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(**{k: inputs[k] for k in keys})
    loss = (losses * inputs["loss_mask"]).sum()
    loss.backward()  # Megatron's (reentrant) checkpointing needs .backward(), not autograd.grad
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return sum(seen.values()), grads


def recompute_checks() -> dict:
    from lov15_megatron.config import load_config
    from lov15_megatron.models.llava_ov.model import build_llava_ov_model
    from lov15_megatron.runtime import distributed

    common = ["runtime.device=cpu", "data.loader=synthetic", "data.seq_length=64"]
    out: dict = {}
    reference = None
    state = None
    batch = pack_rows(
        [[vlm_sample(1, [(4, 4), (2, 2)]), vlm_sample(2, [])], [vlm_sample(3, [(2, 6)])]], 64
    )
    for name, extra in SETTINGS.items():
        cfg = load_config(ROOT / "configs/tiny/model.yaml", [*common, *extra])
        if reference is None:
            distributed.initialize(cfg)
        model = build_llava_ov_model(cfg)
        model.train()
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        saved, grads = _saved_bytes_and_grads(model, batch)
        if reference is None:
            reference = grads
        rel = max(
            float((g - r).norm() / r.norm().clamp_min(1e-30))
            for g, r in zip(grads, reference, strict=True)
        )
        lm = model.language_model.decoder.config
        vit = model.vision_model.decoder.config
        out[name] = {
            "saved_bytes": saved,
            "grad_rel": rel,
            "lm": (lm.recompute_granularity, lm.recompute_method, lm.recompute_num_layers),
            "vit": (vit.recompute_granularity, vit.recompute_method, vit.recompute_num_layers),
        }
    return out


def test_recompute_gives_equal_gradients_and_holds_less():
    from lov15_megatron.runtime.launch import run_ranks

    (out,) = run_ranks(1, recompute_checks)
    none = out["none"]["saved_bytes"]
    assert out["full_uniform"]["lm"] == ("full", "uniform", 1)
    assert out["full_uniform"]["vit"] == ("full", "uniform", 1)
    assert out["full_block"]["vit"] == ("full", "block", 2)
    assert out["full_lm_only"]["vit"] == (None, None, None)
    assert out["selective"]["lm"][0] == "selective" == out["selective"]["vit"][0]
    for name, r in out.items():
        # Longest reduction: the ViT's patch embedding (3·14·14 inputs; docs/tolerances.md).
        assert r["grad_rel"] < fp32_rel_tol(3 * 14 * 14), (name, r)
        if name != "none":
            assert r["saved_bytes"] < none, (name, r["saved_bytes"], none)
    # Recomputing the ViT as well saves more than the LM alone; full saves more than selective.
    assert out["full_uniform"]["saved_bytes"] < out["full_lm_only"]["saved_bytes"]
    assert out["full_uniform"]["saved_bytes"] < out["selective"]["saved_bytes"]
