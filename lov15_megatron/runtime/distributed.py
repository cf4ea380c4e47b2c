"""Process-level set-up: torch.distributed, Megatron-Core parallel state, seeds.

Everything a rank does before it builds a model lives here, so that the training entry point,
the converters and the tests share one code path:

* the device is resolved from ``runtime.device`` (``auto`` → CUDA when present, else CPU); on CPU
  the :mod:`~lov15_megatron.runtime.cpu_backend` redirect is switched on here and nowhere else;
* ``torch.distributed`` is initialised from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) with NCCL on GPU and gloo on CPU; a plain
  ``python`` process without those variables becomes a world of one;
* Megatron-Core's parallel state is built from ``cfg.parallel`` (DP is derived);
* Python, NumPy, torch and Megatron's tensor-parallel RNG tracker are seeded.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from lov15_megatron.config import ConfigError, RunConfig, validate_world_size
from lov15_megatron.runtime import cpu_backend


@dataclass(frozen=True)
class Runtime:
    """What a rank knows about its place in the job after :func:`initialize`."""

    device: torch.device
    backend: str
    rank: int
    world_size: int
    local_rank: int
    tensor_parallel: int
    pipeline_parallel: int
    context_parallel: int
    data_parallel: int

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"


def resolve_device(requested: str) -> torch.device:
    """``auto``: ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU: error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda but no CUDA device is visible to this process")
    return torch.device(requested)


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(device: torch.device, timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Initialise ``torch.distributed`` from torchrun env vars; returns (rank, world, local)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" not in os.environ:  # plain `python …`: a world of one
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )  # fmt: skip
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(
        backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    return rank, world, local_rank


def initialize_model_parallel(cfg: RunConfig, world_size: int) -> int:
    """Build Megatron-Core's parallel groups from ``cfg.parallel``; returns the DP size."""
    from megatron.core import parallel_state

    dp = validate_world_size(cfg, world_size)
    p = cfg.parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size,
    )
    return dp


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's RNG tracker the way Megatron-LM does.

    Each pipeline stage gets its own offset (its layers differ); tensor-parallel ranks get
    distinct model-parallel RNG streams through Megatron's tracker; DP replicas share a seed.
    """
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(cfg: RunConfig) -> Runtime:
    """Set up this rank for ``cfg``: device, process group, parallel state, seeds."""
    device = resolve_device(cfg.runtime.device)
    if device.type == "cpu":
        cpu_backend.enable()
    if cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True)
    rank, world, local_rank = init_process_group(device)
    dp = initialize_model_parallel(cfg, world)
    set_seed(cfg.runtime.seed)
    p = cfg.parallel
    return Runtime(
        device=torch.device("cuda", local_rank) if device.type == "cuda" else device,
        backend=dist.get_backend(),
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        tensor_parallel=p.tensor_model_parallel_size,
        pipeline_parallel=p.pipeline_model_parallel_size,
        context_parallel=p.context_parallel_size,
        data_parallel=dp,
    )


def shutdown() -> None:
    """Tear down parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def print_rank_0(*args: object) -> None:
    """Print from global rank 0 only (or always, before the process group exists)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)
