"""Run a function in N ranks the way torchrun would, and collect what each rank returns.

Starting Python with torch and Megatron-Core costs seconds per process on a small machine, so a
test should launch once and run a whole group of checks inside the ranks (for example every
parallel layout in turn), returning plain values or tensors that the test then asserts on.

    results = run_ranks(2, check_layouts, cfg_overrides)   # one list entry per rank

The target must be a module-level function. Each rank gets torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and one CPU thread;
results travel back through ``torch.save`` files. If any rank fails, the others are stopped and
the failing rank's traceback and log tail are raised in the caller.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lov15_megatron.runtime.distributed import free_port


class RankFailure(RuntimeError):
    """A rank raised, crashed or timed out."""


def _target_spec(target: Callable | str) -> dict[str, str]:
    if isinstance(target, str):
        module, _, name = target.partition(":")
        return {"module": module, "name": name, "file": ""}
    module = sys.modules[target.__module__]
    return {"module": target.__module__, "name": target.__qualname__, "file": module.__file__ or ""}


def run_ranks(
    nproc: int,
    target: Callable | str,
    *args: Any,
    timeout: float = 900.0,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``target(*args, **kwargs)`` in ``nproc`` ranks; return the per-rank results."""
    with tempfile.TemporaryDirectory(prefix="multirank-") as tmp:
        work = Path(tmp)
        torch.save(
            {"target": _target_spec(target), "args": args, "kwargs": kwargs}, work / "job.pt"
        )
        port = free_port()
        procs = []
        for rank in range(nproc):
            rank_env = {
                **os.environ,
                "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                **(env or {}),
            }  # fmt: skip
            log = open(work / f"rank{rank}.log", "w")  # noqa: SIM115 - closed below
            cmd = [sys.executable, "-m", "lov15_megatron.runtime.launch", str(work)]
            procs.append(
                (subprocess.Popen(cmd, env=rank_env, stdout=log, stderr=subprocess.STDOUT), log)
            )
        deadline = time.monotonic() + timeout
        failed: list[int] = []
        try:
            while any(p.poll() is None for p, _ in procs):
                failed = [r for r, (p, _) in enumerate(procs) if p.returncode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            for p, log in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                log.close()
        failed = [r for r, (p, _) in enumerate(procs) if p.returncode != 0]
        if failed:
            reasons = []
            for r in failed:
                tb = work / f"rank{r}.error"
                text = tb.read_text() if tb.exists() else ""
                tail = (work / f"rank{r}.log").read_text()[-4000:]
                code = procs[r][0].returncode
                reasons.append(f"--- rank {r} (exit {code}) ---\n{text or tail}")
            timed_out = time.monotonic() > deadline
            what = f"timed out after {timeout:.0f}s" if timed_out else "failed"
            raise RankFailure(
                f"{nproc}-rank run of {_target_spec(target)['name']} {what}:\n" + "\n".join(reasons)
            )
        return [torch.load(work / f"rank{r}.result", weights_only=False) for r in range(nproc)]


def _load_target(spec: dict[str, str]) -> Callable:
    name = spec["module"]
    if name == "__main__":  # a script's function: load the script under another name
        name = "__multirank_target__"
    if name in sys.modules or not spec["file"]:
        module = importlib.import_module(name)
    else:  # its sibling imports resolve as they would for a script in that folder
        folder = str(Path(spec["file"]).parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        loader_spec = importlib.util.spec_from_file_location(name, spec["file"])
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
    obj: Any = module
    for part in spec["name"].split("."):
        obj = getattr(obj, part)
    return obj


def _worker(work: Path) -> int:
    rank = int(os.environ["RANK"])
    job = torch.load(work / "job.pt", weights_only=False)
    try:
        result = _load_target(job["target"])(*job["args"], **job["kwargs"])
        torch.save(result, work / f"rank{rank}.result")
    except BaseException:
        (work / f"rank{rank}.error").write_text(traceback.format_exc())
        sys.stderr.write(traceback.format_exc())
        return 1
    finally:
        from lov15_megatron.runtime.distributed import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))
