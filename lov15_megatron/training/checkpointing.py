"""Model weights as Megatron-Core distributed checkpoints (``torch_dist``).

A distributed checkpoint stores every tensor once, with its global shape and each rank's shard
offsets, so it loads at any TP×PP layout that the shapes allow: the layout of the writer does not
matter to the reader. Directories are written under a temporary name and renamed when complete,
so a half-written checkpoint never looks like a checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def model_sharded_state_dict(chunks: list) -> dict:
    """Sharded state dict of all chunks (``model`` or ``model0``, ``model1`` … under VPP)."""
    if len(chunks) == 1:
        return {"model": _unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_model_weights(chunks: list, path: str | os.PathLike) -> Path:
    """Write the model weights of all ranks to ``path`` atomically (collective call)."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    dist.barrier()
    return final


def load_model_weights(chunks: list, path: str | os.PathLike, strict: bool = True) -> None:
    """Load weights written by :func:`save_model_weights` at any layout (collective call)."""
    path = Path(path)
    if not (path / "metadata.json").exists():
        raise FileNotFoundError(
            f"{path} is not a Megatron-Core distributed checkpoint (no metadata.json)"
        )
    state = dist_checkpointing.load(model_sharded_state_dict(chunks), str(path))
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for key, chunk in zip(keys, chunks, strict=True):
        _unwrap(chunk).load_state_dict(state[key], strict=strict)
