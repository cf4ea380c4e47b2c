"""Qwen3-MoE on Megatron-Core: router and MoE block against transformers, expert-parallel
training equivalence and resharding resume, all in two launches.

One 1-rank launch (1) checks Megatron's ``MoELayer`` against transformers'
``Qwen3MoeSparseMoeBlock`` holding the same weights: the same experts with the same weights
per token (also where router rows are duplicated, so that logits tie exactly) and the same block
output; (2) trains the EP=1 reference with the load-balancing and z losses on, from initial
weights it saves. One 2-rank launch then trains from those weights at EP=2 (DP=2) and at
TP=2×EP=2 (expert TP 1), and saves at EP=2 after 3 steps and resumes that checkpoint at EP=1.
Every step's loss, grad norm and aux losses must agree with the reference within the fp32
reduction-order bounds of ``tests/tolerances.py`` (docs/tolerances.md; measured: EP=2 ≤ 1.1e-7,
TP=2×EP=2 grad norm 4.8e-6 here and 1.3e-5 on another CPU, the rest ≤ 2.3e-7; the resumed
losses ≤ 4.3e-8; docs/parallelism-choice.md §6).
"""

from __future__ import annotations

import contextlib
import io

import pytest
from tolerances import assert_close_training, fp32_abs_tol

from lov15_megatron.runtime.launch import run_ranks

pytestmark = pytest.mark.compat  # scripts/test_py312.sh runs this file

CONFIG = "configs/tiny_gpt.yaml"
STEPS, SAVE_AT = 6, 3
MOE = ["model.language.num_experts=8", "model.language.moe_ffn_hidden_size=32",
       "model.language.moe_router_topk=2", "model.language.moe_aux_loss_coeff=0.01",
       "model.language.moe_z_loss_coeff=0.001"]  # fmt: skip
COMMON = [*MOE, f"train.train_iters={STEPS}", "runtime.device=cpu", "train.global_batch_size=8",
          "train.micro_batch_size=2", "scheduler.warmup_iters=1", "optimizer.lr=5e-3",
          "model.language.num_layers=2"]  # fmt: skip
LAYOUTS = {
    "ep2": ["parallel.expert_model_parallel_size=2"],
    "tp2_ep2": [
        "parallel.tensor_model_parallel_size=2",
        "parallel.expert_model_parallel_size=2",
        "parallel.expert_tensor_parallel_size=1",
        "parallel.sequence_parallel=true",  # Megatron requires SP for MoE under TP
    ],
}
# The longest reduction: the 256 tokens a weight gradient sums over (global batch 8 × 32), also
# the vocabulary's 256 entries.
REDUCTION_LEN = 256


def _run(overrides: list[str]) -> dict:
    """Runs inside a rank: ``train.train`` with the log captured."""
    from lov15_megatron.config import load_config
    from lov15_megatron.train import train

    cfg = load_config(CONFIG, overrides)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        result = train(cfg)
    return {
        "losses": result.losses,
        "grad_norms": result.grad_norms,
        "moe": result.moe_losses,
        "log": log.getvalue(),
    }


def _save_initial_weights(init_dir: str) -> None:
    from lov15_megatron.config import load_config
    from lov15_megatron.models.registry import family_for_config
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import checkpointing, setup

    cfg = load_config(CONFIG, COMMON)
    distributed.initialize(cfg)
    model = setup.wrap_ddp(cfg, setup.build_model_chunks(cfg, family_for_config(cfg).build_model))
    checkpointing.save_model_weights(model, init_dir)


def _router_and_block_check() -> dict:
    """Megatron's MoELayer vs transformers' Qwen3MoeSparseMoeBlock with the same weights."""
    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from lov15_megatron.config import load_config
    from lov15_megatron.models.qwen3.model import build_qwen3_model
    from lov15_megatron.runtime import distributed

    cfg = load_config(CONFIG, [*MOE, "runtime.device=cpu", "model.language.hidden_size=64"])
    distributed.initialize(cfg)
    lm = cfg.model.language
    moe = build_qwen3_model(cfg).decoder.layers[0].mlp
    hf_config = Qwen3MoeConfig(
        hidden_size=lm.hidden_size, moe_intermediate_size=lm.moe_ffn_hidden_size,
        num_experts=lm.num_experts, num_experts_per_tok=lm.moe_router_topk, norm_topk_prob=True,
    )  # fmt: skip
    block = Qwen3MoeSparseMoeBlock(hf_config)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for case in ("random", "ties"):
        with torch.no_grad():
            for p in moe.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            router = moe.router.weight
            if case == "ties":  # experts 1 = 0 and 5 = 4: their logits are equal for every token
                router[1], router[5] = router[0], router[4]
            experts = moe.experts.local_experts
            block.gate.weight.copy_(router)
            block.experts.gate_up_proj.copy_(torch.stack([e.linear_fc1.weight for e in experts]))
            block.experts.down_proj.copy_(torch.stack([e.linear_fc2.weight for e in experts]))
        moe.eval()
        tokens = torch.randn(2048, 1, lm.hidden_size, generator=gen)
        with torch.no_grad():
            probs, routing_map = moe.router(tokens)
            _, hf_weights, hf_index = block.gate(tokens.view(-1, lm.hidden_size))
            hf_probs = torch.zeros_like(probs).scatter(1, hf_index, hf_weights)
            ours = moe(tokens)[0].view(-1, lm.hidden_size)
            theirs = block(tokens.view(1, -1, lm.hidden_size)).view(-1, lm.hidden_size)
        scores = torch.softmax(tokens.view(-1, lm.hidden_size) @ router.T, dim=-1)
        kth, k = scores.sort(dim=-1, descending=True).values, lm.moe_router_topk
        out[case] = {
            "same_experts": bool(torch.equal(routing_map, hf_probs > 0)),
            "max_weight_diff": float((probs - hf_probs).abs().max()),
            "max_output_diff": float((ours - theirs).abs().max()),
            "output_scale": float(theirs.abs().max()),
            # tokens whose k-th and (k+1)-th probabilities are exactly equal (a tie at the cut)
            "ties_at_cut": int((kth[:, k - 1] == kth[:, k]).sum()),
        }
    return out


def reference_launch(init_dir: str) -> dict:
    checks = _router_and_block_check()
    _save_initial_weights(init_dir)
    return {"checks": checks, "ep1": _run([*COMMON, f"checkpoint.pretrained={init_dir}"])}


def parallel_launch(init_dir: str, save_dir: str) -> dict:
    runs = {
        name: _run([*COMMON, *extra, f"checkpoint.pretrained={init_dir}"])
        for name, extra in LAYOUTS.items()
    }
    save = [f"checkpoint.save={save_dir}", f"train.exit_interval={SAVE_AT}"]
    runs["ep2_saved"] = _run([*COMMON, *LAYOUTS["ep2"], f"checkpoint.pretrained={init_dir}", *save])
    runs["ep1_resumed"] = _run([*COMMON, f"checkpoint.save={save_dir}"])
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    init_dir, save_dir = str(root / "init"), str(root / "ckpt")
    (reference,) = run_ranks(1, reference_launch, init_dir)
    per_rank = run_ranks(2, parallel_launch, init_dir, save_dir)
    for name in per_rank[0]:
        assert per_rank[0][name]["losses"] == per_rank[1][name]["losses"], name
    return reference, per_rank[0]


@pytest.mark.parametrize("case", ["random", "ties"])
def test_router_and_block_match_transformers(runs, case):
    check = runs[0]["checks"][case]
    assert check["same_experts"], check
    # The router's logits reduce over hidden 64, the experts over 64 and 32: fp32_abs_tol(64, ·)
    assert check["max_weight_diff"] < fp32_abs_tol(64, 1.0), check  # probabilities ≤ 1
    assert check["max_output_diff"] < fp32_abs_tol(64, check["output_scale"]), check
    if case == "ties":
        assert check["ties_at_cut"] > 0, "the tie case must put tied experts at the top-k cut"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_training_matches_ep1(runs, layout):
    reference, got = runs[0]["ep1"], runs[1][layout]
    assert len(got["losses"]) == STEPS
    assert_close_training(reference["losses"], got["losses"], REDUCTION_LEN, f"{layout} loss")
    assert_close_training(
        reference["grad_norms"],
        got["grad_norms"],
        REDUCTION_LEN,
        f"{layout} grad norm",
        grad_norm=True,
    )
    for name in reference["moe"][0]:
        assert_close_training(
            [step[name] for step in reference["moe"]],
            [step[name] for step in got["moe"]],
            REDUCTION_LEN,
            f"{layout} {name}",
        )


def test_aux_losses_are_logged_and_move(runs):
    reference = runs[0]["ep1"]
    balance = [step["load_balancing_loss"] for step in reference["moe"]]
    z_loss = [step["z_loss"] for step in reference["moe"]]
    assert len(balance) == STEPS and len(set(balance)) == STEPS, balance
    assert all(b >= 1.0 - 1e-6 for b in balance), balance  # the Switch balance term is >= 1
    assert len(set(z_loss)) == STEPS and all(z > 0 for z in z_loss), z_loss
    line = f"iteration {STEPS}: moe load_balancing_loss {balance[-1]:.6f}, z_loss {z_loss[-1]:.6f}"
    assert line in reference["log"]
    assert reference["losses"][-1] < reference["losses"][0]


def test_checkpoint_saved_at_ep2_resumes_at_ep1(runs):
    reference, parallel = runs[0]["ep1"], runs[1]
    saved, resumed = parallel["ep2_saved"], parallel["ep1_resumed"]
    assert len(saved["losses"]) == SAVE_AT and len(resumed["losses"]) == STEPS - SAVE_AT
    assert "resumed from" in resumed["log"] and f"at iteration {SAVE_AT}" in resumed["log"]
    # The first three steps are the EP=2 run's own; the rest continue at EP=1.
    assert saved["losses"] == parallel["ep2"]["losses"][:SAVE_AT]
    assert_close_training(
        reference["losses"],
        saved["losses"] + resumed["losses"],
        REDUCTION_LEN,
        "ep2 → ep1 resumed loss",
    )
    assert_close_training(
        reference["grad_norms"][SAVE_AT:],
        resumed["grad_norms"],
        REDUCTION_LEN,
        "ep2 → ep1 resumed grad norm",
        first_step=SAVE_AT,
        grad_norm=True,
    )
