"""Compare a converted Megatron checkpoint with the Hugging Face model on the same inputs.

The Megatron side runs in its own ranks (``tp × pp`` of them, gloo on CPU / NCCL on GPU) started
by :func:`~lov15_megatron.runtime.launch.run_ranks`, through Megatron-Core's pipeline schedule in
forward-only mode; logits are gathered over the tensor-parallel vocab shards and cut to the HF
vocabulary. The HF side runs in the calling process in fp32.

Inputs (``--inputs``: a dict saved with ``torch.save``; else the family's default inputs):
``input_ids`` ``[batch, seq]`` and, for the VLM, the HF model's keyword arguments as they are:
``pixel_values``/``image_grid_thw`` and ``pixel_values_videos``/``video_grid_thw`` (rows
``[t, h, w]``; each frame one ViT segment on both sides). The VLM's default inputs hold three
images and a two-frame video.

Metrics: ``max_abs_diff`` = max |mcore − hf|; ``max_rel_diff`` = max_abs_diff / max |hf|;
``top1_agreement`` = fraction of positions whose arg-max token agrees.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    logits = model(attention_mask=None, **batch)
    return logits, lambda out: (out.sum() * 0.0, {"logits": out.detach()})


def megatron_logits(
    model_name: str, load_dir: str, tp: int, pp: int, ep: int, inputs: dict, world: int = 0
):
    """Runs in each rank: load the checkpoint at TP×PP×EP; return full-vocab logits (or None).

    Under expert parallelism the data-parallel ranks all run the same inputs (their tokens
    still travel to the experts of other ranks through the all-to-all dispatcher); so do the
    data-parallel replicas of a layout run in a larger launch (``world`` ranks; 0: the layout's
    own :func:`world_size`).

    ``inputs`` holds ``input_ids`` and, for the VLM, ``pixel_values`` and ``image_grid_thw``,
    and for videos ``pixel_values_videos`` and ``video_grid_thw`` (the model's forward takes
    them as the HF model does).
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from lov15_megatron.config import config_from_dict, config_to_dict
    from lov15_megatron.convert.core import run_config_of_checkpoint
    from lov15_megatron.models.qwen3.model import zero_vocab_padding
    from lov15_megatron.models.registry import get_family
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import checkpointing, setup

    converter = get_family(model_name)
    raw = config_to_dict(run_config_of_checkpoint(load_dir, tp, pp, ep))
    input_ids = inputs["input_ids"]
    batch, seq = input_ids.shape
    raw["data"]["seq_length"] = seq
    dp = (world or world_size(tp, pp, ep)) // (tp * pp)
    raw["train"].update(micro_batch_size=batch, global_batch_size=batch * dp)
    raw["runtime"]["device"] = "auto"
    cfg = config_from_dict(raw)
    rt = distributed.initialize(cfg)
    chunks = setup.build_model_chunks(cfg, converter.build_model)
    checkpointing.load_model_weights(chunks, load_dir)
    for chunk in chunks:
        zero_vocab_padding(chunk, cfg.model.language.vocab_size)
        chunk.eval()
    data = {k: v.to(rt.device) for k, v in inputs.items()}
    data["position_ids"] = torch.arange(seq, device=rt.device).expand(batch, seq).contiguous()
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter([data]) if len(chunks) == 1 else [iter([data]) for _ in chunks],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=1,
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(out[0]["logits"])
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    return logits[..., : cfg.model.language.vocab_size].float().cpu()


Layout = tuple[int, int, int]  # (tp, pp, ep)


def layouts_logits(
    model_name: str, load_dir: str, layouts: list[Layout], inputs: dict, world: int
) -> list:
    """Runs in each rank: :func:`megatron_logits` for each layout, one after the other."""
    return [megatron_logits(model_name, load_dir, *layout, inputs, world) for layout in layouts]


def parse_layout(text: str) -> Layout:
    """``TPxPP`` or ``TPxPPxEP`` (e.g. ``2x1``, ``2x1x2``) -> (tp, pp, ep)."""
    parts = text.lower().split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"layout {text!r}: expected TPxPP or TPxPPxEP with positive integers")
    tp, pp, *ep = map(int, parts)
    return tp, pp, ep[0] if ep else 1


def world_size(tp: int, pp: int, ep: int) -> int:
    """Ranks for a TP×PP×EP check: EP (expert TP 1) is carved out of TP × DP."""
    return tp * pp * (ep // math.gcd(ep, tp))


def compare(mcore: torch.Tensor, hf: torch.Tensor) -> dict[str, float]:
    diff = (mcore - hf).abs()
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / hf.abs().max().clamp_min(1e-12)),
        "top1_agreement": float((mcore.argmax(-1) == hf.argmax(-1)).float().mean()),
    }


def verify(
    model_name: str,
    hf_dir: str | os.PathLike,
    load_dir: str | os.PathLike,
    tp: int = 1,
    pp: int = 1,
    inputs: str | os.PathLike | None = None,
    dump_logits: str | os.PathLike | None = None,
    ep: int = 1,
) -> dict:
    """Run both models on the same inputs; returns the metrics (and dumps logits if asked)."""
    (result,) = verify_layouts(model_name, hf_dir, load_dir, [(tp, pp, ep)], inputs, dump_logits)
    return result


def verify_layouts(
    model_name: str,
    hf_dir: str | os.PathLike,
    load_dir: str | os.PathLike,
    layouts: list[Layout],
    inputs: str | os.PathLike | None = None,
    dump_logits: str | os.PathLike | None = None,
) -> list[dict]:
    """:func:`verify` at several (tp, pp, ep) layouts in one launch of ranks (as many as the
    largest layout needs; a smaller layout runs data-parallel replicas) and one HF forward.
    One metrics dict per layout, in order; ``dump_logits`` takes a single layout."""
    from lov15_megatron.config import ConfigError, validate_world_size
    from lov15_megatron.convert.core import run_config_of_checkpoint
    from lov15_megatron.convert.hf_io import HFCheckpointReader
    from lov15_megatron.models.registry import get_family
    from lov15_megatron.runtime.launch import run_ranks

    if not layouts:
        raise ConfigError("verify: no layout given")
    if dump_logits and len(layouts) > 1:
        raise ConfigError(f"verify: --dump-logits takes one layout, got {len(layouts)}")
    converter = get_family(model_name)
    HFCheckpointReader(hf_dir)  # a missing or unreadable HF directory is named here
    # Each layout must fit the model (heads, layers) before any rank starts: a ConfigError.
    world = max(world_size(*layout) for layout in layouts)
    for tp, pp, ep in layouts:
        validate_world_size(run_config_of_checkpoint(load_dir, tp, pp, ep), world_size(tp, pp, ep))
        if world % world_size(tp, pp, ep):
            raise ConfigError(
                f"verify: layout {tp}x{pp}x{ep} needs {world_size(tp, pp, ep)} ranks, which do "
                f"not divide the {world} ranks of the largest layout; verify it separately"
            )
    cfg = run_config_of_checkpoint(load_dir)
    data = torch.load(inputs) if inputs else converter.default_inputs(cfg)
    per_rank = run_ranks(world, layouts_logits, model_name, str(load_dir), layouts, data, world)
    hf_model = converter.hf_model_class().from_pretrained(str(hf_dir), dtype=torch.float32)
    hf_model.eval()
    with torch.no_grad():
        hf = hf_model(**data).logits.float()
    results = []
    for i, (tp, pp, ep) in enumerate(layouts):
        mcore = next(r[i] for r in per_rank if r[i] is not None)
        if dump_logits:
            Path(dump_logits).parent.mkdir(parents=True, exist_ok=True)
            torch.save(mcore, dump_logits)
        metrics = compare(mcore, hf)
        layout = {"tp": tp, "pp": pp, "ep": ep}
        results.append({"model": model_name, **layout, "shape": list(mcore.shape), **metrics})
    return results
