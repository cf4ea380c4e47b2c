"""The GPU check (``benchmarks/gpu_check.sh``) end to end on CPU with ``--cpu-smoke``: its report
has every field, and the numbers in it are sane: finite losses, a loss that falls, bf16 within
the derived bound of fp32 (and measurably different from it, so bf16 really ran), the attention
core within its bounds in both precisions, positive throughput, and the packs' ViT share.

One launch of the shell script (the same code the GPU machine runs, at tiny sizes), shared by
the tests of this module; the varlen wrapper for older torch builds is checked without a GPU on
stand-in kernels.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import benchmark_module
from tolerances import fp32_rel_tol

ROOT = Path(__file__).resolve().parents[1]


gpu_check = benchmark_module("gpu_check")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    """``bash benchmarks/gpu_check.sh --cpu-smoke``: (the JSON report, the markdown table)."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = {
        **os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
        "LOV15_WHEELS": str(out / "no-wheels"),  # the installed environment, nothing carried
    }  # fmt: skip
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert not list(out.glob("*.tmp")), "a temporary file was left behind"
    return report, (out / "gpu_check.md").read_text()


def test_report_fields_and_checks(smoke):
    report, md = smoke
    assert report["errors"] == [] and report["oom_attempts"] == []
    assert all(report["checks"].values()), report["checks"]
    env = report["environment"]
    for key in ("torch", "megatron_core", "transformers", "python", "date", "device"):
        assert env[key], key
    assert env["device"] == "cpu" and report["settings"]["name"] == "cpu-smoke"
    for heading in ("## Attention core", "## Training", "tokens/s", "MFU", "HFU", "## Checks"):
        assert heading in md, heading
    assert "FAIL" not in md


def test_training_numbers_are_sane(smoke):
    report, _ = smoke
    train, s = report["training"], report["settings"]
    steps = train["steps"]
    assert len(steps) == s["warmup_steps"] + s["timed_steps"] == train["timed_steps"] + 1
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    # a random-initialised model starts at ln(vocabulary) and Adam's first update lowers it
    vocab = 4096
    assert abs(steps[0]["loss"] - math.log(vocab)) < 0.5, steps[0]["loss"]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert train["tokens_per_s"] > 0 and train["model_tflops"] > 0
    # full recompute runs the forward once more: hardware FLOPs exceed model FLOPs
    assert train["hardware_tflops"] > train["model_tflops"]
    assert train["peak_tflops"] is None and train["mfu"] is None and train["hfu"] is None  # CPU
    assert train["memory"]["peak_rss_gib"] > 0
    for r in steps:
        assert r["tokens"] == s["packs_per_step"] * s["seq_len"]
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    # the layer-fitting estimate counts every parameter (it sizes the GPU run)
    assert train["parameters"] == train["parameters_estimate"]
    assert train["lm_layers"] == 2 and train["vit_layers"] == 2
    assert set(train["parameter_dtypes"]) <= {"bfloat16", "float32"}
    assert train["parameter_dtypes"]["bfloat16"] > train["parameter_dtypes"].get("float32", 0)


def test_bf16_agrees_with_fp32_within_the_derived_bound(smoke):
    report, _ = smoke
    a = report["training"]["agreement"]
    bound = gpu_check.bf16_logit_bound(2, 2)
    assert a["logit_rel_bound"] == pytest.approx(bound)
    # bf16 really ran (rounding at 2^-8 shows), and stayed within the bound
    assert 0.1 * gpu_check.BF16_UNIT_ROUNDOFF < a["logit_rel_rms_diff"] <= bound
    # per token, |Δ loss| ≤ 2·max |Δ logit|: the eval-path losses obey it on the mean
    assert a["loss_abs_diff"] <= a["loss_bound_from_logits"] * (1 + 1e-3) + 1e-5 * a["loss_fp32"]
    # the trainer's bf16 loss path (logits at loss positions only) is a second bf16 evaluation
    # of the same forward: within twice that bound of fp32
    assert abs(a["train_step1_loss"] - a["loss_fp32"]) <= 2 * a["loss_bound_from_logits"]
    assert a["train_step1_loss"] == report["training"]["steps"][0]["loss"]
    assert a["packs"] == report["settings"]["packs_per_step"] and a["loss_tokens"] > 0


def test_attention_core_within_bounds(smoke):
    report, _ = smoke
    cases = {c["case"]: c for c in report["attention"]}
    assert set(cases) == {"lm", "vit"}
    assert cases["lm"]["causal"] and not cases["vit"]["causal"]
    assert cases["lm"]["groups"] < cases["lm"]["heads"]  # GQA goes through the core
    for c in cases.values():
        bounds = gpu_check.attention_bounds(c["longest_segment"])
        bf16, fp32 = c["bf16"], c["fp32"]
        assert bf16["kernel"] == fp32["kernel"] == "segment_sdpa"  # CPU: no varlen kernel
        assert 0 < bf16["out_max_abs_over_max_v"] <= bounds["bf16_out"]
        assert all(0 < g <= bounds["bf16_grad"] for g in bf16["grad_rel"].values())
        tol = fp32_rel_tol(c["longest_segment"])  # docs/tolerances.md
        assert fp32["out_max_abs_over_max_v"] <= tol
        assert all(g <= tol for g in fp32["grad_rel"].values()), fp32["grad_rel"]
        assert bf16["fwd_bwd_ms"] > 0 and bf16["tflops"] > 0 and fp32["tflops"] > 0


def test_packs_have_the_release_shape(smoke):
    report, _ = smoke
    p, s = report["packs"], report["settings"]
    assert p["tokens"] == s["seq_len"]
    # benchmarks/packing.py's mix: ~10 samples per pack, ~61 % image tokens, 4 patches each
    assert 5 <= p["segments"] <= 16
    assert 0.35 <= p["image_tokens"] / p["tokens"] <= 0.85
    assert p["patches"] == pytest.approx(4 * p["image_tokens"])
    assert 0 < p["loss_tokens"] < p["tokens"] - p["image_tokens"]


def _old_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False):
    """Stand-in for torch 2.10's varlen_attn: no enable_gqa, is_causal instead of window_size;
    records what it was given."""
    _old_varlen.calls.append({"heads": (q.shape[1], k.shape[1], v.shape[1]), "scale": scale,
                              "causal": is_causal, "k": k})  # fmt: skip
    return q


def _new_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                enable_gqa=False):  # fmt: skip
    return q


def test_varlen_wrapper_for_older_torch():
    from lov15_megatron.models.attention import varlen_compat

    assert varlen_compat(_new_varlen) is None  # nothing to adapt
    _old_varlen.calls = []
    wrapped = varlen_compat(_old_varlen)
    q, k = torch.zeros(6, 4, 2), torch.arange(6 * 2 * 2.0).reshape(6, 2, 2)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    wrapped(q, k, k, cu, cu, 6, 6, scale=0.5, window_size=(-1, 0), enable_gqa=True)
    wrapped(q, q, q, cu, cu, 6, 6, scale=0.5, window_size=(-1, -1))
    first, second = _old_varlen.calls
    assert first["heads"] == (4, 4, 4) and first["causal"] and first["scale"] == 0.5
    # KV head g serves query heads 2g and 2g+1 (GQA's grouping)
    assert torch.equal(first["k"], k.repeat_interleave(2, dim=1))
    assert not second["causal"] and second["heads"] == (4, 4, 4)
    with pytest.raises(ValueError, match="window_size"):
        wrapped(q, q, q, cu, cu, 6, 6, window_size=(128, 0))


def test_gpu_sizes_and_packs_of_the_release_shape():
    """The GPU run's sizes without a GPU: the parameter count of the 4B width (the layer fit's
    input) and the 8k packs' ViT share."""
    from gpu_packs import plan_packs

    cfg = gpu_check.run_config(gpu_check.GPU, 36)
    fixed, per_layer = gpu_check.parameter_counts(cfg)
    # Qwen3-4B: 36 layers + the tied 151,936 × 2560 embedding = 4.02 B (its model card);
    # LLaVA-OV-1.5-4B adds the untied head, the Rice ViT-L and the merger
    head = 151936 * 2560
    assert 36 * per_layer + head + 2560 == pytest.approx(4.022e9, rel=1e-3)
    assert fixed + 36 * per_layer == pytest.approx(4.74e9, rel=1e-2)
    fit = gpu_check.layers_that_fit
    # an H100 (≈ 78.5 GiB free) holds about half the LM; an H200 the whole model
    assert fit(78.5 * 2**30, fixed, per_layer, 16.0, 36) == 19
    assert fit(139 * 2**30, fixed, per_layer, 16.0, 36) == 36
    assert fit(10 * 2**30, fixed, per_layer, 16.0, 36) == 1

    packs = plan_packs(32, 8192, seed=0)
    tokens = [sum(s.length(4) for s in p) for p in packs]
    patches = [sum(h * w for s in p for h, w in s.grids) for p in packs]
    assert all(0.97 * 8192 <= t <= 8192 for t in tokens)
    # benchmarks/packing.py's mix: 61 % of a pack's tokens are image tokens, 4 patches each
    share = sum(patches) / 4 / sum(tokens)
    assert 0.5 < share < 0.72, share
    assert 16_000 < sum(patches) / len(packs) < 24_000
