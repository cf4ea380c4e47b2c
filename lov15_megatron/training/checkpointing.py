"""Checkpoints as Megatron-Core distributed checkpoints (``torch_dist``).

A distributed checkpoint stores every tensor once, with its global shape and each rank's shard
offsets, so model weights load at any TP×PP layout that the shapes allow.

Two kinds are written here:

* **weights** (:func:`save_model_weights` / :func:`load_model_weights`): the model only — what
  the converter writes and what a stage starts from (``checkpoint.pretrained``);
* **training checkpoints** (:func:`save_checkpoint` / :func:`load_checkpoint`): model, optimizer
  (distributed-optimizer state sharded over DP), LR scheduler, RNG states of every rank,
  iteration and consumed-sample counters, and the Energon loader state of every DP rank
  (``dataloader/dp_rank_XXX.pt``) — everything an exact resume needs. Layout:
  ``<save>/iter_0000100/`` plus ``<save>/latest_checkpointed_iteration.txt``.

A **LoRA run** (``peft``) keeps its base weights out of its training checkpoints: those hold
the adapters (``*.lora_A``/``*.lora_B``), their optimizer state and the rest as above, and the
base is loaded from ``checkpoint.pretrained`` at every start (:func:`load_base_weights`). The
checkpoint's ``lov15_model.json`` names the base (``peft.base``: its path and
:func:`base_fingerprint`), and a resume onto another base is refused (:func:`check_lora_resume`).

Every directory is written under a temporary name and renamed when complete; the ``latest``
file is replaced atomically after the rename, and only the last ``keep_last`` are kept. A
half-written checkpoint never looks like a checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject

from lov15_megatron.checkpoint_dir import (
    MODEL_FILE,
    iteration_dir,
    model_file_text,
    read_latest,
    read_model_file,
    resolve,
    saved_iterations,
    write_latest,
)
from lov15_megatron.config import ConfigError
from lov15_megatron.models.lora import (
    fingerprint_digest,
    fingerprint_sample,
    fingerprint_tensors,
    is_adapter_key,
    lora_modules,
)

Part = Literal["all", "base", "adapters"]


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def has_adapters(chunks: list) -> bool:
    """Whether the model carries LoRA adapters (a ``peft`` run)."""
    return any(True for c in chunks for _ in lora_modules(c))


def _part(sharded: dict, part: Part) -> dict:
    if part == "all":
        return sharded
    adapters = part == "adapters"
    return {k: v for k, v in sharded.items() if is_adapter_key(k) == adapters}


def model_sharded_state_dict(chunks: list, part: Part = "all") -> dict:
    """Sharded state dict of all chunks (``model`` or ``model0``, ``model1`` … under VPP);
    ``part`` keeps only the base weights or only the LoRA adapters."""
    if len(chunks) == 1:
        return {"model": _part(_unwrap(chunks[0]).sharded_state_dict(), part)}
    return {f"model{i}": _part(_unwrap(c).sharded_state_dict(), part) for i, c in enumerate(chunks)}


def _load_model_state(chunks: list, state: dict, strict: bool = True, part: Part = "all") -> None:
    """Copy loaded tensors into the chunks; a ``part`` must cover exactly that part."""
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks, strict=True):
        if part == "all":
            _unwrap(chunk).load_state_dict(state[key], strict=strict)
            continue
        result = _unwrap(chunk).load_state_dict(state[key], strict=False)
        adapters = part == "adapters"
        missing = [k for k in result.missing_keys if is_adapter_key(k) == adapters]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"loading the {part}: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}"
            )


def _atomic_dir_save(final: Path, write) -> Path:
    """Run collective ``write(tmp_dir)`` and rename ``tmp_dir`` to ``final`` when all are done."""
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    write(tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    dist.barrier()
    return final


def save_model_weights(chunks: list, path: str | os.PathLike) -> Path:
    """Write the model weights of all ranks to ``path`` atomically (collective call)."""
    sharded = model_sharded_state_dict(chunks)
    return _atomic_dir_save(Path(path), lambda tmp: dist_checkpointing.save(sharded, str(tmp)))


def load_model_weights(chunks: list, path: str | os.PathLike, strict: bool = True) -> None:
    """Load weights written by :func:`save_model_weights`, the converter or a training
    checkpoint, at any layout (collective call). A model with LoRA adapters loads its base
    weights only (:func:`load_base_weights`)."""
    path = resolve(path)  # a training checkpoint root: its latest iteration
    if not (path / "metadata.json").exists():
        raise FileNotFoundError(f"{path} is not a Megatron-Core distributed checkpoint")
    if (read_model_file(path) or {}).get("peft"):
        raise ConfigError(f"{path} is a LoRA checkpoint (adapters only), not model weights")
    part: Part = "base" if has_adapters(chunks) else "all"
    state = dist_checkpointing.load(model_sharded_state_dict(chunks, part), str(path))
    _load_model_state(chunks, state, strict, part)


# ------------------------------------------------------------------ LoRA: the base weights


def load_base_weights(chunks: list, path: str | os.PathLike) -> dict[str, str]:
    """Load a LoRA run's frozen base weights from ``path`` (``checkpoint.pretrained``); returns
    ``{"path", "fingerprint"}`` naming the base (collective call).

    A LoRA training checkpoint is no base (it holds no base weights): one-line ConfigError.
    """
    load_model_weights(chunks, path)
    return {"path": str(Path(path).resolve()), "fingerprint": base_fingerprint(chunks)}


def base_fingerprint(chunks: list) -> str:
    """A digest of the base weights that is the same at every TP/PP/DP layout and cheap
    (:func:`~lov15_megatron.models.lora.fingerprint_digest`: the first values of the first row
    of every base tensor, by its global checkpoint key; collective call).

    Each tensor's first row starts in the shard at the global origin, which exactly one rank
    holds as its main replica; the ranks' samples are gathered and hashed in key order. Two
    bases that differ in training differ there almost surely.
    """
    samples: dict[str, bytes] = {}
    for value in fingerprint_tensors(nested_values(model_sharded_state_dict(chunks, "base"))):
        row = value.data.reshape(-1, value.data.shape[-1])[0]
        samples[value.key] = fingerprint_sample(row, value.global_shape[-1])
    gathered: list[dict[str, bytes] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, samples)
    return fingerprint_digest({k: v for part in gathered for k, v in (part or {}).items()})


def check_lora_resume(resume_dir: str | os.PathLike, base: dict[str, str] | None) -> None:
    """Refuse (one-line ConfigError) a resume that would put a checkpoint's adapters on another
    base than they were trained on, or mix a LoRA checkpoint with a full run."""
    saved = (read_model_file(resume_dir) or {}).get("peft")
    if base is None and saved:
        raise ConfigError(
            f"{resume_dir} is a LoRA checkpoint (adapters on {saved['base']['path']}); "
            f"resume it with its peft section, or save this full run elsewhere"
        )
    if base is None:
        return
    if not saved:
        raise ConfigError(
            f"{resume_dir} holds a full training checkpoint, not LoRA adapters; save this "
            f"peft run elsewhere (checkpoint.save) or remove peft"
        )
    if saved["base"]["fingerprint"] != base["fingerprint"]:
        raise ConfigError(
            f"the adapters in {resume_dir} were trained on the base {saved['base']['path']}, "
            f"but checkpoint.pretrained={base['path']} holds other weights (fingerprint "
            f"{base['fingerprint'][:12]} != {saved['base']['fingerprint'][:12]})"
        )


# ------------------------------------------------------------------ training checkpoints


def _rng_state() -> dict[str, Any]:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data: Any) -> ShardedObject:
    """One RNG state per (PP, TP) position, replicated over DP (as Megatron-LM stores it)."""
    ps = parallel_state
    pp, tp = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    dp = ps.get_data_parallel_rank(with_context_parallel=True)
    return ShardedObject("rng_state", data, shape, (pp, tp), replica_id=dp)


# The distributed optimizer's state is saved per DP shard as it lives in memory ("dp_reshardable",
# Megatron-LM's default): fully parallel, no gather; a resume may change DP but not TP/PP.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
# A mixture-of-experts model's optimizer state is stored per parameter (Megatron's reshardable
# format): the experts' optimizer shards depend on the EP size, and a resume may change it.
MOE_OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _optimizer_metadata(chunks) -> dict:
    from megatron.core.utils import get_model_config

    moe = get_model_config(chunks[0]).num_moe_experts is not None
    return MOE_OPTIMIZER_METADATA if moe else OPTIMIZER_METADATA


def _init_torch_adam_state(optimizer) -> None:
    """Give a fresh torch Adam(W) its state (step 0, zero moments) before a load.

    Without Transformer Engine/Apex, Megatron-Core's distributed optimizer wraps torch's AdamW,
    and its ``state_dict()`` (needed to build the load template) expects every parameter to
    have a ``step`` already — true after one step, not on a fresh optimizer.
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(
                        step=torch.tensor(0.0),
                        exp_avg=torch.zeros_like(p.data),
                        exp_avg_sq=torch.zeros_like(p.data),
                    )


def _load_reshardable_optimizer(optimizer, saved: Any) -> None:
    """``optimizer.load_state_dict`` for the ``fully_reshardable`` format, one part at a time.

    megatron-core 0.16.1 without Apex/TE adds torch Adam's ``step`` to every parameter's state
    and then copies the saved per-parameter tensors (param, moments: no ``step``) over every
    state entry, failing on ``step``. The common state is loaded first, ``step`` is taken out
    for the tensor copy, and the saved step is put back per optimizer.
    """
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [saved] if len(chained) == 1 else [v for _, v in sorted(saved.items())]
    for opt, state in zip(chained, states, strict=True):
        param_state = state.pop("param_state", None)
        state.pop("param_state_sharding_type", None)
        opt.load_state_dict(state)
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for per_param in inner.state.values():
                per_param.pop("step", None)
        if param_state is not None:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        state["param_state"] = param_state
        _restore_torch_adam_step(opt, state)


def _restore_torch_adam_step(optimizer, saved: dict) -> None:
    """Put the saved Adam step count back into torch's per-parameter ``step`` state.

    With torch's AdamW (no TE/Apex) the distributed optimizer keeps the step in its param
    groups; its load path leaves torch's per-parameter ``step`` at the freshly initialised 0,
    which would change the bias correction of every step after a resume.
    """
    groups = saved.get("optimizer", {}).get("param_groups", [])
    steps = {float(g["step"]) for g in groups if "step" in g}
    if len(steps) != 1:
        return
    (step,) = steps
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for per_param in inner.state.values():
                per_param["step"] = torch.tensor(step)


def _training_state_dict(chunks, optimizer, scheduler, progress, is_loading: bool) -> dict:
    if is_loading:
        _init_torch_adam_state(optimizer)
    # A LoRA run's checkpoint holds the adapters, not the frozen base (loaded at every start).
    model_sd = model_sharded_state_dict(chunks, "adapters" if has_adapters(chunks) else "all")
    return {
        **model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_optimizer_metadata(chunks)
        ),
        "scheduler": scheduler.state_dict(),
        "progress": progress,
        "rng_state": _rng_sharded_object(_rng_state()),
    }


def _loader_file(directory: Path) -> Path | None:
    """This rank's loader-state file if it is the one that writes it for its DP rank."""
    ps = parallel_state
    writer = (
        ps.get_tensor_model_parallel_rank() == 0
        and ps.get_pipeline_model_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )
    name = f"dp_rank_{ps.get_data_parallel_rank():03d}.pt"
    return directory / "dataloader" / name if writer else None


def save_checkpoint(
    root: str | os.PathLike,
    iteration: int,
    chunks: list,
    optimizer,
    scheduler,
    progress: dict[str, Any],
    loader_state: Any = None,
    keep_last: int = 2,
    model_file: dict | None = None,
) -> Path:
    """Write a full training checkpoint for ``iteration`` (collective call).

    ``model_file`` (see :func:`describe_model`) is written as ``lov15_model.json`` so that
    ``tools/convert_checkpoint.py mcore-to-hf`` can export the checkpoint directly.
    """
    root = Path(root)
    sharded = _training_state_dict(chunks, optimizer, scheduler, progress, is_loading=False)

    def write(tmp: Path) -> None:
        dist_checkpointing.save(sharded, str(tmp))
        loader_path = _loader_file(tmp)
        if loader_path is not None and loader_state is not None:
            loader_path.parent.mkdir(exist_ok=True)
            torch.save(loader_state, loader_path)
        if model_file is not None and dist.get_rank() == 0:
            (tmp / MODEL_FILE).write_text(model_file_text(model_file))

    final = _atomic_dir_save(iteration_dir(root, iteration), write)
    if dist.get_rank() == 0:
        write_latest(root, iteration)
        for old in saved_iterations(root)[:-keep_last]:
            shutil.rmtree(iteration_dir(root, old), ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(
    root: str | os.PathLike, chunks: list, optimizer, scheduler
) -> tuple[dict[str, Any], Any]:
    """Restore the latest training checkpoint under ``root``; returns (progress, loader state)."""
    root = Path(root)
    directory = iteration_dir(root, read_latest(root))
    template = _training_state_dict(chunks, optimizer, scheduler, {}, is_loading=True)
    state = dist_checkpointing.load(template, str(directory))
    _load_model_state(chunks, state, part="adapters" if has_adapters(chunks) else "all")
    with torch.no_grad():  # fp32 training: the optimizer's main params are the model's leaves
        if _optimizer_metadata(chunks) is MOE_OPTIMIZER_METADATA:
            _load_reshardable_optimizer(optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
    _restore_torch_adam_step(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng_state"]
    _set_rng_state(rng[0] if isinstance(rng, list) else rng)
    name = f"dp_rank_{parallel_state.get_data_parallel_rank():03d}.pt"
    loader_path = directory / "dataloader" / name
    loader_state = torch.load(loader_path, weights_only=False) if loader_path.exists() else None
    return state["progress"], loader_state
