"""Real Megatron-Core training on CPU: TP=2 (±SP), PP=2 (±VPP, ±uneven split), CP=2 and DP=2
reproduce one rank.

One 1-rank launch trains the reference and writes its initial weights as a distributed
checkpoint; one 2-rank launch then trains every parallel layout in turn from those weights
(resharded at load) on the same data. Each step's global loss and global gradient norm (before
clipping) must agree within the fp32 reduction-order bounds of ``tests/tolerances.py``
(docs/tolerances.md: loss 1.5e-5 at the first step growing by that much per step; grad norm
1.5e-5 at the first step, ~8e-3 after Adam's first update; measured: loss <1.2e-6, grad norm
<2.3e-5 after 8 Adam steps, up to 1.1e-4 over 12). The gradient norm is compared as well
because Adam is nearly invariant to a uniform gradient scale: a wrong DP/SP/PP reduction factor
could leave the losses close but never the norms (the first step's, compared tightly).
"""

from __future__ import annotations

import math

import pytest
from tolerances import assert_close_training

from lov15_megatron.runtime.launch import run_ranks

pytestmark = pytest.mark.compat  # scripts/test_py312.sh runs this file

CONFIG = "configs/tiny_gpt.yaml"
STEPS = 8
COMMON = [f"train.train_iters={STEPS}", "runtime.device=cpu", "train.global_batch_size=8",
          "train.micro_batch_size=2", "scheduler.warmup_iters=1",
          "model.language.num_layers=4", "optimizer.lr=5e-3"]  # fmt: skip
LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "pp2_vpp2": [
        "parallel.pipeline_model_parallel_size=2",
        "parallel.virtual_pipeline_model_parallel_size=2",
    ],
    # 1 + 3 layers (the first stage lighter, as for a VLM whose first stage holds the ViT)
    "pp2_uneven": [
        "parallel.pipeline_model_parallel_size=2",
        "parallel.num_layers_in_first_pipeline_stage=1",
    ],
    "cp2": ["parallel.context_parallel_size=2"],  # micro-batch 2, THD stream split over CP
    "dp2": [],
    "dp2_no_distopt": ["parallel.use_distributed_optimizer=false"],
}
# VPP with an uneven split needs more layers than COMMON's 4: a 6-layer model split 4 + 2 into
# chunks [0, 1] [2] [3, 4] [5], against the same model's even PP 2 (trained first in the same
# launch, which writes the initial weights both load).
SIX = ["model.language.num_layers=6", "parallel.pipeline_model_parallel_size=2"]
VPP_UNEVEN = [*SIX, "parallel.virtual_pipeline_model_parallel_size=2",
              "parallel.num_layers_in_first_pipeline_stage=4"]  # fmt: skip
# The release's weighting (mean per micro-batch): DP and CP must reproduce its single rank too
# (a wrong CP or DP scale of the micro-batch means would show in the grad norms).
MICRO_BATCH = ["train.loss_weighting=micro_batch"]
MICRO_BATCH_LAYOUTS = {
    "dp2_micro_batch": MICRO_BATCH,
    "cp2_micro_batch": [*MICRO_BATCH, "parallel.context_parallel_size=2"],
}
# The longest reduction: the 256 tokens a weight gradient sums over (global batch 8 × 32), also
# the vocabulary's 256 entries.
REDUCTION_LEN = 256


def _train(overrides: list[str], init_dir: str, save_init: bool) -> list[tuple[float, float]]:
    """Runs inside a rank: build, (save|load) initial weights, train; (loss, grad norm) per step.

    The global indices of the decoder layers this rank built go to ``BUILT_LAYERS``.
    """
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from lov15_megatron.config import load_config
    from lov15_megatron.models.registry import get_family
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import checkpointing, setup, synthetic
    from lov15_megatron.training.step import train_step

    cfg = load_config(CONFIG, overrides)
    distributed.initialize(cfg)
    model = setup.wrap_ddp(cfg, setup.build_model_chunks(cfg, get_family("qwen3").build_model))
    BUILT_LAYERS[" ".join(overrides)] = [
        [m.layer_number - 1 for m in chunk.modules() if isinstance(m, TransformerLayer)]
        for chunk in model
    ]
    if save_init:
        checkpointing.save_model_weights(model, init_dir)
    else:
        checkpointing.load_model_weights(model, init_dir)
    optimizer = setup.build_optimizer(cfg, model)
    scheduler = setup.build_scheduler(cfg, optimizer)
    data = [synthetic.synthetic_batches(cfg) for _ in model]  # one stream per virtual stage
    n_micro = setup.num_microbatches(cfg)
    data = data[0] if len(data) == 1 else data
    steps = [train_step(cfg, data, model, optimizer, scheduler, n_micro) for _ in range(STEPS)]
    return [(r.loss, r.grad_norm) for r in steps]


def reference_run(init_dir: str) -> dict[str, list[tuple[float, float]]]:
    return {
        "token": _train(COMMON, init_dir, save_init=True),
        "micro_batch": _train(COMMON + MICRO_BATCH, init_dir, save_init=False),
    }


BUILT_LAYERS: dict[str, list[list[int]]] = {}


def layout_runs(init_dir: str) -> dict[str, list]:
    layouts = {**LAYOUTS, **MICRO_BATCH_LAYOUTS}
    out: dict[str, list] = {
        name: _train(COMMON + extra, init_dir, save_init=False) for name, extra in layouts.items()
    }
    out["six_pp2"] = _train(COMMON + SIX, init_dir + "_6", save_init=True)
    out["six_pp2_vpp2_uneven"] = _train(COMMON + VPP_UNEVEN, init_dir + "_6", save_init=False)
    out["built_layers"] = [BUILT_LAYERS[" ".join(COMMON + LAYOUTS["pp2_uneven"])],
                           BUILT_LAYERS[" ".join(COMMON + VPP_UNEVEN)]]  # fmt: skip
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    init_dir = str(tmp_path_factory.mktemp("init") / "weights")
    (references,) = run_ranks(1, reference_run, init_dir)
    per_rank = run_ranks(2, layout_runs, init_dir)
    built = [ranks.pop("built_layers") for ranks in per_rank]
    assert per_rank[0] == per_rank[1], "every rank must report the same global loss"
    return references, per_rank[0], built


@pytest.fixture(scope="module")
def losses(runs):
    references, layouts, _ = runs
    return references["token"], layouts


def test_uneven_split_builds_the_layers_it_names(runs):
    """The splits really are uneven: the global layer indices each rank's chunks built."""
    (uneven_0, vpp_0), (uneven_1, vpp_1) = runs[2]
    assert (uneven_0, uneven_1) == ([[0]], [[1, 2, 3]])  # pp2_uneven: 1 + 3
    assert (vpp_0, vpp_1) == ([[0, 1], [3, 4]], [[2], [5]])  # 4 + 2, two chunks per stage


def test_uneven_virtual_pipeline_matches_even_pipeline(runs):
    _, layouts, _ = runs
    _assert_close_steps(layouts["six_pp2"], layouts["six_pp2_vpp2_uneven"], "pp2_vpp2 4+2")


def test_reference_loss_decreases(losses):
    reference = [loss for loss, _ in losses[0]]
    assert all(math.isfinite(x) for x in reference)
    half = STEPS // 2
    assert reference[-1] < reference[0] - 0.1, reference
    assert sum(reference[half:]) < sum(reference[:half]), reference


def _assert_close_steps(reference: list, got: list, layout: str) -> None:
    (loss_a, norm_a), (loss_b, norm_b) = zip(*reference, strict=True), zip(*got, strict=True)
    assert_close_training(loss_a, loss_b, REDUCTION_LEN, f"{layout} loss")
    assert_close_training(norm_a, norm_b, REDUCTION_LEN, f"{layout} grad norm", grad_norm=True)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_rank(losses, layout):
    reference, runs = losses
    got = runs[layout]
    assert len(got) == STEPS
    _assert_close_steps(reference, got, layout)


@pytest.mark.parametrize("layout", list(MICRO_BATCH_LAYOUTS))
def test_micro_batch_weighting_layout_matches_single_rank(runs, layout):
    references, layouts, _ = runs
    _assert_close_steps(references["micro_batch"], layouts[layout], layout)
