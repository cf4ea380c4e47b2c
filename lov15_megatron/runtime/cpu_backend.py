"""Run unmodified Megatron-Core on a machine without a GPU.

Megatron-Core assumes CUDA in a handful of places: it asks for ``torch.cuda.current_device()``,
allocates small tensors with ``device="cuda"`` or ``.cuda()``, keeps dropout RNG states through
the CUDA RNG API, and checks ``param.type() == "torch.cuda.FloatTensor"``. This module redirects
exactly those calls to the CPU for the whole process so that the real model specs, tensor /
pipeline / data parallelism (gloo), the distributed optimizer, the pipeline schedules and
distributed checkpointing run as they do on a GPU cluster.

Scope and limits (see ``docs/cpu-backend.md``):

* It is **process-global** and is switched on explicitly by :func:`enable` (the runtime does so
  only when no GPU is present or the config says ``runtime.device: cpu``). Importing this module
  changes nothing.
* Local (non-Transformer-Engine) specs only; Transformer Engine needs CUDA.
* Context parallelism runs with our attention core (``models/attention.py``), not TE's.
* fp32 and bf16 compute only (no fp16 loss scaling kernels, no fused CUDA kernels).
* All CUDA streams/events/graphs stay unavailable; code paths that need them (overlapped grad
  reduce, CUDA graphs) must stay switched off on CPU. ``torch.cuda.current_stream()`` (which
  megatron-core 0.19 asks for on every grad sync, only to wait on CUDA-graph events) gets
  torch's CPU stand-in stream, whose waits are no-ops.
* Any other call that would initialise CUDA (``torch.cuda._lazy_init``, reached by every
  torch.cuda function that needs a GPU and by CUDA tensors made outside the redirect) raises
  :class:`CudaEscapeError` naming the installed megatron-core and is recorded in
  :func:`cuda_escapes`, so a newer Megatron-Core that needs another redirect fails loudly, and
  tests can check that nothing escaped even where a caller swallowed the error.

Tested with megatron-core 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12).
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_lock = threading.Lock()
_mode: _CudaToCpuMode | None = None
_saved: list[tuple[Any, str, Any]] = []
_escapes: list[str] = []


class CudaEscapeError(RuntimeError):
    """A call tried to initialise CUDA while the CPU backend is on (a missing redirect)."""


def megatron_core_version() -> str:
    """The installed megatron-core release (for error messages), without importing it."""
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return "not installed"


def _redirect(device: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, ``0``) to CPU."""
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, str):
        return _CPU if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = dict(kwargs) if kwargs else {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return (
                name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
            )
        if "device" in kwargs:
            kwargs["device"] = _redirect(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _redirect(args[1]), *args[2:])
        return func(*args, **kwargs)


def _patch(owner: Any, name: str, value: Any) -> None:
    if not hasattr(owner, name):  # e.g. megatron's private _get_cuda_rng_state renamed
        raise RuntimeError(
            f"megatron-core {megatron_core_version()}, torch {torch.__version__}: "
            f"{owner.__name__}.{name} no longer exists; the CPU backend "
            "(lov15_megatron/runtime/cpu_backend.py) must be adapted to this release"
        )
    _saved.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def _cpu_get_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _noop(*_args: Any, **_kwargs: Any) -> None:
    return None


def _cpu_current_stream(*_args: Any, **_kwargs: Any) -> Any:
    return torch.cpu.current_stream()


def _refuse_cuda_init(*_args: Any, **_kwargs: Any) -> None:
    """Stands in for ``torch.cuda._lazy_init``: every path to a real CUDA context ends here."""
    where = "".join(traceback.format_stack(limit=12)[:-1])
    _escapes.append(where)
    raise CudaEscapeError(
        f"a CUDA call escaped the CPU backend (megatron-core {megatron_core_version()}, torch "
        f"{torch.__version__}); lov15_megatron/runtime/cpu_backend.py needs a redirect for it. "
        f"Called from:\n{where}"
    )


def cuda_escapes() -> list[str]:
    """Stack traces of the calls that tried to initialise CUDA since :func:`enable`."""
    return list(_escapes)


def is_enabled() -> bool:
    """Whether the CPU redirect is active in this process."""
    return _mode is not None


def enable() -> None:
    """Switch the CUDA→CPU redirect on for this process (idempotent)."""
    global _mode
    with _lock:
        if _mode is not None:
            return
        from megatron.core.tensor_parallel import random as mcore_random

        current: Callable[[], torch.device] = lambda: _CPU  # noqa: E731
        try:
            # megatron's private RNG-state helpers first: if a release renamed them, nothing
            # else is patched yet (and everything patched is undone below anyway).
            _patch(mcore_random, "_get_cuda_rng_state", _cpu_get_rng_state)
            _patch(mcore_random, "_set_cuda_rng_state", _cpu_set_rng_state)
            _patch(torch.cuda, "current_device", current)
            _patch(torch.cuda, "synchronize", _noop)
            _patch(torch.cuda, "empty_cache", _noop)
            _patch(torch.cuda, "current_stream", _cpu_current_stream)  # megatron-core >= 0.19
            for owner in (torch.cuda, torch.cuda.memory, torch.cuda.random):  # each binds its own
                _patch(owner, "_lazy_init", _refuse_cuda_init)
            for owner in (torch.cuda, torch.cuda.random):
                _patch(owner, "get_rng_state", _cpu_get_rng_state)
                _patch(owner, "set_rng_state", _cpu_set_rng_state)
                _patch(owner, "manual_seed", _cpu_manual_seed)
        except BaseException:
            _restore()
            raise
        _escapes.clear()
        _mode = _CudaToCpuMode()
        _mode.__enter__()


def _restore() -> None:
    while _saved:
        owner, name, value = _saved.pop()
        setattr(owner, name, value)


def disable() -> None:
    """Undo :func:`enable` (used by tests that need a clean process state)."""
    global _mode
    with _lock:
        if _mode is None:
            return
        _mode.__exit__(None, None, None)
        _mode = None
        _restore()
