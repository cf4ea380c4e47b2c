"""The CPU backend, the runtime set-up and the multi-rank harness."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lov15_megatron.config import ConfigError, load_config
from lov15_megatron.runtime.launch import RankFailure, run_ranks

pytestmark = pytest.mark.compat  # scripts/test_py312.sh runs this file


def _in_fresh_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_cpu_backend_is_not_an_import_side_effect():
    out = _in_fresh_python(
        "import torch; before = torch.cuda.current_device\n"
        "import lov15_megatron.runtime.cpu_backend as cb, lov15_megatron.runtime.distributed\n"
        "import lov15_megatron.models.qwen3.model, lov15_megatron.train\n"
        "print(cb.is_enabled(), torch.cuda.current_device is before)"
    )
    assert out == "False True"


def test_cpu_backend_redirects_cuda_calls_and_disables_cleanly():
    from megatron.core.tensor_parallel import random as mcore_random

    from lov15_megatron.runtime import cpu_backend

    original = (torch.cuda.current_device, mcore_random._set_cuda_rng_state)
    cpu_backend.enable()
    try:
        assert cpu_backend.is_enabled()
        assert torch.empty(3, device="cuda").device.type == "cpu"
        assert torch.zeros(2, device=torch.device("cuda", 1)).device.type == "cpu"
        t = torch.ones(2)
        assert t.cuda() is t
        assert t.to("cuda").device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.to(torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
        assert torch.cuda.current_device() == torch.device("cpu")
        # The CUDA RNG API is backed by the CPU generator (what Megatron's RNG tracker uses).
        torch.cuda.manual_seed(7)
        state = torch.cuda.get_rng_state()
        a = torch.rand(4)
        mcore_random._set_cuda_rng_state(state)
        assert torch.equal(a, torch.rand(4))
    finally:
        cpu_backend.disable()
    assert not cpu_backend.is_enabled()
    assert (torch.cuda.current_device, mcore_random._set_cuda_rng_state) == original
    assert torch.ones(1).type() == "torch.FloatTensor"


def test_cuda_device_without_gpu_and_te_attention_on_cpu_are_rejected():
    from lov15_megatron.models.backend import attention_backend
    from lov15_megatron.runtime import distributed

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="runtime.device=cuda"):
            distributed.resolve_device("cuda")
    cfg = load_config(None, ["runtime.device=cpu", "parallel.context_parallel_size=2",
                             "data.seq_length=32"])  # fmt: skip
    assert attention_backend(cfg) == "torch"  # CP runs on the torch core, on CPU too
    cfg.model.attention_backend = "te"
    with pytest.raises(ConfigError, match="model.attention_backend='te' needs the Transformer"):
        attention_backend(cfg)


def _describe_rank(tp: int, pp: int) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from lov15_megatron.runtime import cpu_backend, distributed

    cfg = load_config(None, [f"parallel.tensor_model_parallel_size={tp}",
                             f"parallel.pipeline_model_parallel_size={pp}",
                             "runtime.device=auto", "runtime.seed=42"])  # fmt: skip
    rt = distributed.initialize(cfg)
    # Ranks of one TP group share the data-parallel seed; torch's stream must agree there.
    draw = torch.rand(1).item()
    with get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(1).item()
    return {
        "cpu_backend": cpu_backend.is_enabled(),
        "backend": rt.backend,
        "dp": rt.data_parallel,
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "draw": draw,
        "tp_draw": tp_draw,
    }


def test_runtime_builds_parallel_state_and_seeds():
    tp = run_ranks(2, _describe_rank, 2, 1)
    assert [r["tp_rank"] for r in tp] == [0, 1]
    assert all(r["cpu_backend"] and r["backend"] == "gloo" and r["dp"] == 1 for r in tp)
    assert tp[0]["draw"] == tp[1]["draw"], "default stream is shared within a TP group"
    assert tp[0]["tp_draw"] != tp[1]["tp_draw"], "model-parallel stream differs per TP rank"
    dp = run_ranks(2, _describe_rank, 1, 1)
    assert [r["dp_rank"] for r in dp] == [0, 1] and dp[0]["dp"] == 2
    assert dp[0]["draw"] == dp[1]["draw"] and dp[0]["tp_draw"] == dp[1]["tp_draw"]


def _fail_on_rank_1(value: int) -> int:
    import os

    if os.environ["RANK"] == "1":
        raise ValueError(f"rank 1 refuses {value}")
    return value * 10


def test_harness_returns_per_rank_results_and_reports_failures():
    assert run_ranks(1, _fail_on_rank_1, 4) == [40]
    with pytest.raises(RankFailure, match=r"rank 1 \(exit 1\)[\s\S]*ValueError: rank 1 refuses 5"):
        run_ranks(2, _fail_on_rank_1, 5)
