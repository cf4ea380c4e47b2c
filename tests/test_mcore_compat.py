"""The installed Megatron-Core against what this package assumes of it.

Runs on both test environments (megatron-core 0.16.1 on Python 3.11, 0.19.2 on Python 3.12;
README "Versions"); every failure names the installed release. Two kinds of assumption:

- the private touch points in ``lov15_megatron/models/mcore_private.py`` (the ``_postprocess``
  loss hook, the output layer's ``sequence_parallel`` switch): checked by signature/source, and
  by behaviour at TP=2 with sequence parallelism;
- the CPU backend's redirects (``runtime/cpu_backend.py``): real ``train()`` runs (TP=2+SP with
  save and resume, PP=2, DP=2 with the distributed optimizer) must not reach a single call that
  would initialise CUDA, even one that Megatron-Core catches.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from tolerances import fp32_abs_tol

from lov15_megatron.runtime import cpu_backend
from lov15_megatron.runtime.launch import RankFailure, run_ranks

pytestmark = pytest.mark.compat  # scripts/test_py312.sh runs this file

MCORE = cpu_backend.megatron_core_version()
CONFIG = "configs/tiny_gpt.yaml"
COMMON = ["runtime.device=cpu", "train.global_batch_size=4", "train.micro_batch_size=2",
          "scheduler.warmup_iters=1", "logging.log_interval=100"]  # fmt: skip
TP2_SP = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]


def test_private_touch_points_hold_on_the_installed_megatron_core():
    from lov15_megatron.models import mcore_private

    mcore_private.check_assumptions.cache_clear()
    mcore_private.check_assumptions()  # raises MegatronCoreAssumptionError naming the release


def test_a_moved_touch_point_fails_naming_the_release(monkeypatch):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from lov15_megatron.models import mcore_private

    def postprocess_without_loss_mask(self, hidden_states, input_ids, position_ids, labels):
        return hidden_states

    def forward_ignoring_sequence_parallel(self, input_, weight=None):
        return input_

    cases = [
        (GPTModel, "_postprocess", postprocess_without_loss_mask, r"no longer takes \['loss_mask'"),
        (ColumnParallelLinear, "forward", forward_ignoring_sequence_parallel, "sequence_parallel"),
    ]
    try:
        for owner, name, replacement, what in cases:
            with monkeypatch.context() as m:
                m.setattr(owner, name, replacement)
                mcore_private.check_assumptions.cache_clear()
                with pytest.raises(mcore_private.MegatronCoreAssumptionError, match=what) as e:
                    mcore_private.check_assumptions()
            assert str(e.value).startswith(f"megatron-core {MCORE}: ")
    finally:
        mcore_private.check_assumptions.cache_clear()


def test_a_cuda_call_escaping_the_backend_raises_naming_the_release():
    cpu_backend.enable()
    try:
        assert cpu_backend.cuda_escapes() == []
        torch.cuda.current_stream().wait_stream(torch.cuda.current_stream())  # redirected
        with pytest.raises(cpu_backend.CudaEscapeError, match=f"megatron-core {MCORE}"):
            torch.cuda.get_device_properties(0)
        # The device redirect is a thread-local torch function mode: a CUDA tensor made in
        # another thread gets past it and must still be caught (and recorded).
        errors: list[BaseException] = []

        def cuda_tensor_in_a_thread() -> None:
            try:
                torch.empty(1, device="cuda")
            except BaseException as e:  # noqa: BLE001 - inspected below
                errors.append(e)

        thread = threading.Thread(target=cuda_tensor_in_a_thread)
        thread.start()
        thread.join()
        assert len(errors) == 1 and f"megatron-core {MCORE}" in str(errors[0]), errors
        escapes = cpu_backend.cuda_escapes()
        assert len(escapes) == 2
        assert "get_device_properties" in escapes[0] and "cuda_tensor_in_a_thread" in escapes[1]
    finally:
        cpu_backend.disable()
    assert torch.cuda._lazy_init is not cpu_backend._refuse_cuda_init


def test_a_renamed_private_rng_helper_fails_naming_the_release(monkeypatch):
    from megatron.core.tensor_parallel import random as mcore_random

    before = torch.cuda.current_device
    monkeypatch.delattr(mcore_random, "_get_cuda_rng_state")
    with pytest.raises(RuntimeError, match=f"megatron-core {MCORE}, .*_get_cuda_rng_state"):
        cpu_backend.enable()
    assert not cpu_backend.is_enabled() and torch.cuda.current_device is before


def _loss_hook_check() -> dict:
    """TP=2 + SP: the training loss path (both touch points) against full logits."""
    from lov15_megatron.config import load_config
    from lov15_megatron.models.lm_loss import token_losses
    from lov15_megatron.models.registry import get_family
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import setup, synthetic

    cfg = load_config(CONFIG, [*COMMON, *TP2_SP])
    distributed.initialize(cfg)
    (model,) = setup.build_model_chunks(cfg, get_family("qwen3").build_model)
    batch = next(synthetic.synthetic_batches(cfg))
    mask = batch["loss_mask"].clone()
    mask[:, ::3] = 0.0
    mask[1] = 0.0
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    full = model(**inputs, attention_mask=None)
    full = token_losses(full.clone(), batch["labels"], model.true_vocab_size) * mask
    picked = model(**inputs, attention_mask=None, labels=batch["labels"], loss_mask=mask)
    return {
        "picked_vs_full": float((picked - full).abs().max()),
        "loss_scale": float(full.abs().max()),
        "outside_mask": float(picked[mask == 0].abs().max()),
        "output_layer_sequence_parallel_after": bool(model.output_layer.sequence_parallel),
    }


def compat_ranks(work: str) -> dict:
    """Runs in each of 2 ranks: the loss-hook check, then real ``train()`` runs."""
    from lov15_megatron.config import load_config
    from lov15_megatron.train import train

    out = {"loss_hook": _loss_hook_check(), "runs": {}}
    ckpt = str(Path(work) / "tp2_sp")
    runs = {
        "tp2_sp": [*TP2_SP, "train.train_iters=2", f"checkpoint.save={ckpt}"],
        "tp2_sp_resumed": [*TP2_SP, "train.train_iters=3", f"checkpoint.save={ckpt}"],
        "pp2": ["parallel.pipeline_model_parallel_size=2", "train.train_iters=2"],
        "dp2_distopt": ["parallel.use_distributed_optimizer=true", "train.train_iters=2"],
    }
    for name, overrides in runs.items():
        result = train(load_config(CONFIG, [*COMMON, *overrides]))
        out["runs"][name] = (result.first_iteration, result.last_iteration, result.losses)
    out["escapes"] = cpu_backend.cuda_escapes()
    out["backend_on"] = cpu_backend.is_enabled()
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    try:
        return run_ranks(2, compat_ranks, str(tmp_path_factory.mktemp("compat")))
    except RankFailure as e:
        pytest.fail(f"megatron-core {MCORE}, torch {torch.__version__}: {e}")


def test_training_on_cpu_reaches_no_cuda_call(ranks):
    for rank, r in enumerate(ranks):
        assert r["backend_on"]
        assert r["escapes"] == [], (
            f"megatron-core {MCORE}: rank {rank}: {len(r['escapes'])} call(s) tried to "
            "initialise CUDA behind the CPU backend (caught by the caller); first from:\n"
            + r["escapes"][0]
        )
    runs = ranks[0]["runs"]
    assert runs["tp2_sp"][:2] == (0, 2) and runs["tp2_sp_resumed"][:2] == (2, 3)
    for name, (_, _, losses) in runs.items():
        assert losses and all(torch.isfinite(torch.tensor(losses))), (MCORE, name, losses)


def test_loss_hook_and_sequence_parallel_switch_hold_at_tp2_sp(ranks):
    for r in ranks:
        hook = r["loss_hook"]
        assert hook["loss_scale"] > 1.0, hook  # real cross-entropy values over 256 tokens
        # per-token cross entropy: logits over hidden 64, the 256-word vocabulary's log-sum-exp
        # counting as 9 terms (docs/tolerances.md)
        assert hook["picked_vs_full"] < fp32_abs_tol(64, hook["loss_scale"]), (MCORE, hook)
        assert hook["outside_mask"] == 0.0, (MCORE, hook)
        assert hook["output_layer_sequence_parallel_after"], (MCORE, hook)


def test_dockerfile_installs_the_python312_dependencies_but_torch():
    """The GPU image keeps NGC's torch and installs every other runtime dependency, pinned as
    pyproject.toml pins it for Python 3.12 (the container's Python)."""
    import re
    import tomllib

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    env = {"python_version": "3.12", "python_full_version": "3.12.0"}
    wanted = set()
    for line in deps:
        req = Requirement(line)
        if req.name != "torch" and (req.marker is None or req.marker.evaluate(env)):
            wanted.add(f"{req.name}{req.specifier}")
    install = (root / "Dockerfile").read_text().split("RUN pip install", 1)[1].split("&&", 1)[0]
    installed = {str(Requirement(r)) for r in re.findall(r'"([^"]+)"', install)}
    assert installed == {str(Requirement(w)) for w in wanted}
