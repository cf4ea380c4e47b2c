"""Clean stop on SIGTERM (Slurm preemption / time limit): finish the step, save, exit.

The handler only sets a flag; the loop asks :meth:`ExitSignal.received` once per iteration,
which all-reduces the flag so every rank stops after the same iteration (one rank may get the
signal before the others).
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class ExitSignal:
    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum
        self._flag = False
        self._previous = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self._flag = True

    def received(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self._flag else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        signal.signal(self.signum, self._previous)
