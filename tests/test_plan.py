"""Uneven pipeline splits (config and Megatron layout) and the layout planner (``lov15-plan``).

No ranks: the PP=2 uneven-split training runs are in ``test_parallel_training.py`` (language
model) and ``test_training.py`` (the VLM with a vision-only first stage, also under VPP).
"""

from __future__ import annotations

import json
import re

import pytest

from lov15_megatron.cli import plan as cli
from lov15_megatron.config import ConfigError, load_config
from lov15_megatron.plan import (
    Hardware,
    PackShape,
    balanced_split,
    pack_flops,
    plan_layout,
    stage_flops,
    total_params,
    with_parallel,
)

TINY = "configs/tiny_gpt.yaml"
VISION = ("model.vision={num_layers: 2, hidden_size: 32, ffn_hidden_size: 64, "
          "num_attention_heads: 4, image_token_id: 255, vision_start_token_id: 253, "
          "vision_end_token_id: 254}")  # fmt: skip
PP = "parallel.pipeline_model_parallel_size"
VPP = "parallel.virtual_pipeline_model_parallel_size"
FIRST = "parallel.num_layers_in_first_pipeline_stage"
LAST = "parallel.num_layers_in_last_pipeline_stage"


def _cfg(*overrides: str):
    return load_config(TINY, ["model.language.num_layers=4", *overrides])


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([f"{FIRST}=1"], f"{FIRST}=1 has no effect with {PP}=1"),
        ([f"{PP}=2", f"{FIRST}=-1"], f"{FIRST}=-1 must be >= 0"),
        ([f"{PP}=2", f"{LAST}=0"], f"{LAST}=0 must be >= 1 (the last stage's layers end in "
         "the final norm before the LM head)"),
        ([f"{PP}=2", f"{FIRST}=0"], f"{FIRST}=0 leaves the first stage only the embedding: a "
         "vision-only first stage needs a vision tower (model.vision)"),
        ([f"{PP}=2", f"{FIRST}=1", f"{LAST}=1"], f"{FIRST}=1, {LAST}=1 with "
         f"model.language.num_layers=4 and {PP}=2: the stages hold 2 layers, not 4"),
        ([f"{PP}=2", f"{FIRST}=5"], f"{FIRST}=5 with model.language.num_layers=4: the first "
         "and last stages alone hold 5 layers"),
        ([f"{PP}=2", f"{FIRST}=4"], f"{FIRST}=4 with model.language.num_layers=4 leaves 0 "
         "layers for the other 1 pipeline stage(s): they must split evenly, at least one each"),
        ([f"{PP}=3", f"{FIRST}=1"], f"{FIRST}=1 with model.language.num_layers=4 leaves 3 "
         "layers for the other 2 pipeline stage(s): they must split evenly, at least one each"),
        ([f"{PP}=2", f"{VPP}=2", f"{FIRST}=0", VISION], f"{FIRST}=0 with {VPP}=2: the first "
         "stage's other model chunks would hold nothing (a vision-only first stage is one chunk; "
         "drop the virtual pipeline or give the first stage LM layers)"),
        ([f"{PP}=2", f"{VPP}=2", f"{LAST}=3"], f"{LAST}=3 with model.language.num_layers=4: "
         f"pipeline stage 0 holds 1 layers, not divisible by {VPP}=2 (its model chunks)"),
    ],
)  # fmt: skip
def test_uneven_split_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        _cfg(*overrides)
    assert str(e.value) == message


def pipeline_layout(cfg):
    return cfg.parallel.pipeline_layout(cfg.model.language.num_layers)


def test_uneven_split_layers_and_megatron_layout():
    cfg = load_config(TINY, ["model.language.num_layers=12", f"{PP}=4", f"{FIRST}=3"])
    assert cfg.parallel.stage_layers(12) == [3, 3, 3, 3]  # even split spelled out: accepted
    cfg = load_config(TINY, ["model.language.num_layers=12", f"{PP}=4", f"{FIRST}=0", VISION])
    assert cfg.parallel.stage_layers(12) == [0, 4, 4, 4]  # LLaVA-OV-2's 0,12,12,12 shape
    assert pipeline_layout(cfg) == [["embedding"], ["decoder"] * 4, ["decoder"] * 4,
                                    ["decoder"] * 4 + ["loss"]]  # fmt: skip
    cfg = _cfg(f"{PP}=2", f"{LAST}=2", "model.language.num_layers=6", f"{VPP}=2")
    # chunks in Megatron's order: (vpp 0, pp 0), (vpp 0, pp 1), (vpp 1, pp 0), (vpp 1, pp 1)
    assert pipeline_layout(cfg) == [["embedding", "decoder", "decoder"], ["decoder"],
                                    ["decoder", "decoder"], ["decoder", "loss"]]  # fmt: skip
    assert pipeline_layout(_cfg(f"{PP}=2")) is None  # even split: Megatron's own rule


def test_recompute_block_bound_uses_the_largest_chunk():
    full = ["train.recompute.granularity=full", "train.recompute.method=block"]
    _cfg(f"{PP}=2", f"{FIRST}=1", *full, "train.recompute.num_layers=3")  # stage 1 holds 3
    with pytest.raises(ConfigError, match="exceeds the 3 language-model layers of the largest"):
        _cfg(f"{PP}=2", f"{FIRST}=1", *full, "train.recompute.num_layers=4")


# ----------------------------------------------------------------------------- FLOPs


def _gemm(m: float, n: float, k: float) -> float:
    return 2.0 * m * n * k


def _hand_forward(seq: int, samples: int, tokens_per_sample: int, loss: int, images: int,
                  patches_per_image: int) -> dict[str, float]:  # fmt: skip
    """The tiny VLM's forward FLOPs GEMM by GEMM (shapes written out, not from the config).

    LM: 4 layers, h 64, 4 heads × 16 (q 64), 2 groups (kv 32), SwiGLU 128, vocab 256; causal
    attention = half of QKᵀ and AV. ViT: 2 layers, 32 wide, MLP 64, patch 3·14·14, one class
    token per image; merger 4·32 → 128 → 64."""
    lm_layer = (_gemm(seq, 64, 64) + 2 * _gemm(seq, 32, 64) + _gemm(seq, 64, 64)
                + 2 * _gemm(seq, 128, 64) + _gemm(seq, 64, 128))  # fmt: skip
    lm_attn = samples * (_gemm(tokens_per_sample, tokens_per_sample, 64) * 2) / 2
    n = patches_per_image + 1
    vit_layer = images * (_gemm(n, 96, 32) + _gemm(n, 32, 32) + _gemm(n, 64, 32)
                          + _gemm(n, 32, 64))  # fmt: skip
    vit_attn = images * _gemm(n, n, 32) * 2
    merged = images * patches_per_image // 4
    other = _gemm(images * n, 32, 588) + _gemm(merged, 128, 128) + _gemm(merged, 64, 128)
    return {"lm": 4 * (lm_layer + lm_attn), "head": _gemm(loss, 256, 64),
            "vit": 2 * (vit_layer + vit_attn) + other, "vit_layers": 2 * (vit_layer + vit_attn),
            "lm_layers": 4 * (lm_layer + lm_attn),
            # by part, for the frozen-part counts below
            "lm_gemm": 4 * lm_layer, "lm_attn": 4 * lm_attn, "vit_gemm": 2 * vit_layer,
            "vit_attn": 2 * vit_attn, "patch": _gemm(images * n, 32, 588),
            "merger": _gemm(merged, 128, 128) + _gemm(merged, 64, 128)}  # fmt: skip


def _hand_lora(seq: int, layers: int, rank: int, linears: list[tuple[int, int]]) -> float:
    """LoRA's forward GEMMs over ``layers`` layers: A [r, in] then B [out, r] per linear."""
    return layers * sum(_gemm(seq, rank, i) + _gemm(seq, o, rank) for i, o in linears)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_flops_match_a_hand_count(recompute):
    extra = [] if recompute == "none" else ["train.recompute.granularity=full"]
    cfg = _cfg(VISION, "data.seq_length=64", *extra)
    # 3 samples of 20 tokens, each with one 4×4-patch image (4 LM image tokens): loss on 48
    shape = PackShape(seq_length=64, tokens=60, samples=3, patches=48, images=3)
    hand = _hand_forward(64, 3, 20, 60 - 12, 3, 16)
    again = recompute == "full"  # full recompute runs the layers' forward once more
    want = {
        "lm": (4 if again else 3) * hand["lm"],
        "head": 3 * hand["head"],
        "vit": 3 * hand["vit"] + (hand["vit_layers"] if again else 0.0),
    }
    got = pack_flops(cfg, shape)
    assert got == pytest.approx(want, rel=1e-12)
    split = stage_flops(with_parallel(cfg, pipeline_model_parallel_size=2,
                                      num_layers_in_first_pipeline_stage=1), shape)  # fmt: skip
    assert split == pytest.approx([want["lm"] / 4 + want["vit"], 3 * want["lm"] / 4 + want["head"]])


@pytest.mark.parametrize("recipe", ["stage1", "lora"])
def test_frozen_parts_match_a_hand_count(recipe):
    # Full recompute of the LM and the ViT; a part re-runs only where its backward runs.
    base = [VISION, "data.seq_length=64", "train.recompute.granularity=full"]
    shape = PackShape(seq_length=64, tokens=60, samples=3, patches=48, images=3)
    h = _hand_forward(64, 3, 20, 60 - 12, 3, 16)
    vit_fwd = h["vit_gemm"] + h["vit_attn"] + h["patch"]
    if recipe == "stage1":  # merger only: ViT forward only, LM and head 2× (dgrad), merger 3×
        cfg = _cfg(*base, "train.trainable=[merger]")
        want = {"lm": 3 * h["lm_gemm"] + 4 * h["lm_attn"], "head": 2 * h["head"],
                "vit": vit_fwd + 3 * h["merger"]}  # fmt: skip
    else:  # LoRA on the LM's four linears [out, in]: qkv [128, 64], proj [64, 64],
        # fc1 [256, 64] (SwiGLU gate + up), fc2 [64, 128]; base GEMMs forward + dgrad
        cfg = _cfg(*base, "checkpoint.pretrained=/base", "peft={rank: 2}")
        adapters = _hand_lora(64, 4, 2, [(64, 128), (64, 64), (64, 256), (128, 64)])
        want = {"lm": 3 * h["lm_gemm"] + 4 * h["lm_attn"] + 4 * adapters,
                "head": 2 * h["head"], "vit": vit_fwd + h["merger"]}  # fmt: skip
    assert pack_flops(cfg, shape) == pytest.approx(want, rel=1e-12)


def _hand_8b_flops(lora: bool) -> float:
    """Hardware FLOPs of one 8k pack of the 8B (shapes written out): 8192 positions, 8000
    tokens in 7 samples, 7 images of 30000/7 patches (+ a class token each), loss on the
    500 text tokens; full recompute of every LM and ViT layer. LM: 36 layers, h 4096, q 4096,
    kv 2 × 1024, SwiGLU 12288, vocab 151936; ViT: 24 layers, 1024 wide, MLP 4096; merger
    4096 → 4096 → 4096. LoRA: rank 16 on the LM's four linears."""
    s, sub, n = 8192, 8000 / 7, 30000 / 7 + 1
    lm = 36 * (_gemm(s, 6144, 4096) + _gemm(s, 4096, 4096) + _gemm(s, 24576, 4096)
               + _gemm(s, 4096, 12288))  # fmt: skip
    attn = 36 * 7 * _gemm(sub, sub, 4096)  # QKᵀ and AV, causal: half each
    head = _gemm(500, 151936, 4096)
    vit = 24 * 7 * (_gemm(n, 3072, 1024) + _gemm(n, 1024, 1024) + _gemm(n, 4096, 1024)
                    + _gemm(n, 1024, 4096))  # fmt: skip
    vit_attn = 24 * 7 * 2 * _gemm(n, n, 1024)
    other = _gemm(7 * n, 1024, 588) + 2 * _gemm(7500, 4096, 4096)  # patch embed, merger
    if not lora:  # 3 × forward + the recomputed forward of the layers
        return 4 * (lm + attn + vit + vit_attn) + 3 * (head + other)
    adapters = _hand_lora(s, 36, 16, [(4096, 6144), (4096, 4096), (4096, 24576), (12288, 4096)])
    # base GEMMs: forward + dgrad + recompute; attention 3 + 1; frozen ViT forward only
    return 3 * lm + 4 * attn + 4 * adapters + 2 * head + vit + vit_attn + other


def test_lora_recipe_step_time_falls_by_the_skipped_backward():
    config = "configs/llava_ov_1_5/8b/stage2_lora.yaml"
    lora = cli.load_run_config(config, ["checkpoint.pretrained=/base"])
    full = cli.load_run_config(config, ["checkpoint.pretrained=/base", "peft=null"])
    shape = PackShape(seq_length=8192, tokens=8000, samples=7, patches=30000, images=7)
    want = _hand_8b_flops(lora=True) / _hand_8b_flops(lora=False)
    assert 0.6 < want < 0.7  # LoRA skips a third of the LM's work and the ViT's backward
    for layout in ({}, {"tensor_model_parallel_size": 2, "sequence_parallel": True}):
        times = [plan_layout(with_parallel(c, **layout), shape, 8).step_seconds
                 for c in (lora, full)]  # fmt: skip
        # rel 1e-6: PackShape.counts rounds Σl² and the patch counts to integers
        assert times[0] / times[1] == pytest.approx(want, rel=1e-6)


def test_parameter_counts_match_the_published_models():
    # docs/model-reference.md: the HF models have 4.742 B (4B) and 8.527 B (8B) parameters
    for size, billions in (("4b", 4.742), ("8b", 8.527)):
        cfg = cli.load_run_config(f"configs/llava_ov_1_5/{size}/stage1_5_mid_training.yaml", [])
        assert round(total_params(cfg) / 1e9, 3) == billions


# ----------------------------------------------------------------------------- balance


def test_balanced_split_evens_out_a_heavy_first_stage():
    # A ViT worth several LM layers on stage 0: the even 4/4 split leaves stage 0 the slowest.
    cfg = load_config(TINY, ["model.language.num_layers=8", "data.seq_length=64", f"{PP}=2",
                             VISION.replace("num_layers: 2", "num_layers: 6")])  # fmt: skip
    shape = PackShape(seq_length=64, tokens=60, samples=3, patches=300, images=3)
    even = stage_flops(cfg, shape)
    assert even[0] > even[1]
    first, last = balanced_split(cfg, shape)
    assert (first, last) == (first, None) and first < 4
    best = max(stage_flops(with_parallel(cfg, num_layers_in_first_pipeline_stage=first), shape))
    for n in range(0, 8):  # every split the config accepts is no better
        others = stage_flops(with_parallel(cfg, num_layers_in_first_pipeline_stage=n), shape)
        assert best <= max(others)
    assert best < max(even)
    # Under VPP 2 only even per-stage counts are valid: the best of those
    vpp = with_parallel(cfg, virtual_pipeline_model_parallel_size=2)
    first_vpp, _ = balanced_split(vpp, shape)
    assert first_vpp % 2 == 0 and first_vpp < 4


def test_memory_counts_bytes_per_parameter():
    cfg = _cfg("model.params_dtype=bfloat16", "train.global_batch_size=8")
    plan = plan_layout(cfg, PackShape(32, 32, 1), world_size=4, hardware=Hardware())
    (stage,) = plan.stages
    assert plan.dp == 4 and stage.params == total_params(cfg)  # tied: one embedding
    assert stage.weights_gb == pytest.approx(2 * stage.params / 1e9)  # bf16
    assert stage.grads_gb == pytest.approx(4 * stage.params / 1e9)  # fp32 grad buffers
    # fp32 master + two Adam moments, sharded over the 4 DP ranks
    assert stage.optimizer_gb == pytest.approx(12 * stage.params / 4 / 1e9)


def _hand_activations(recipe: str) -> float:
    """Bytes the tiny VLM keeps for one pack of 64 positions (3 images of 16 patches + a class
    token; 12 image tokens, loss on 48), fp32, no recomputation, one micro-batch in flight;
    shapes written out: LM h 64, q 64, kv 32, SwiGLU 128, vocab 256; ViT 32 wide, MLP 64.

    A layer where a backward runs keeps its non-linear ops' inputs: per LM token the two norm
    inputs (2·64), q/k/v before and after QK-norm and the attention output (the planner's
    5·q + 3·kv), the SwiGLU input (2·128); per ViT token 2·32 + 3·32 + 2·32 + 64. Weight
    gradients add the inputs of linear_qkv and linear_fc1 (the norm outputs) and of linear_fc2
    (the SwiGLU/GELU output); linear_proj's is the attention output, kept anyway."""
    lm_nonlinear = 2 * 64 + (5 * 64 + 3 * 32) + 2 * 128
    lm_linear_inputs = 64 + 64 + 128
    vit = 2 * 32 + 3 * 32 + 2 * 32 + 64 + (32 + 32 + 64)  # full training only
    logits = 48 * 256 * (4 + 4)  # fp32 logits and their gradient
    if recipe == "full":
        return 4 * 64 * 4 * (lm_nonlinear + lm_linear_inputs) + 2 * 51 * 4 * vit + logits
    if recipe == "stage1":  # ViT: no backward, only its output (51 × 32) for the merger
        return 4 * 64 * 4 * lm_nonlinear + 51 * 32 * 4 + logits
    # LoRA (rank 2) on the LM: the adapters keep their inputs (qkv's and fc1's: the norm
    # outputs; proj's: the attention output, kept anyway; fc2's: the SwiGLU output) and A·x
    adapters = 4 * (64 + 0 + 64 + 128 + 4 * 2)
    if recipe == "lora_dropout":  # the dropped copies (4 B) and bool masks (1 B) instead
        adapters = (64 + 64 + 64 + 128) * (4 + 1) + 4 * 4 * 2
    # ViT and merger frozen and before every adapter: only the merged features (12 × 64)
    return 4 * 64 * (4 * lm_nonlinear + adapters) + 12 * 64 * 4 + logits


@pytest.mark.parametrize("recipe", ["full", "stage1", "lora", "lora_dropout"])
def test_activations_keep_only_what_a_backward_needs(recipe):
    base = [VISION, "data.seq_length=64", "train.micro_batch_size=1",
            "train.global_batch_size=1"]  # fmt: skip
    extra = {
        "full": [],
        "stage1": ["train.trainable=[merger]"],
        "lora": ["checkpoint.pretrained=/base", "peft={rank: 2}"],
        "lora_dropout": ["checkpoint.pretrained=/base", "peft={rank: 2, dropout: 0.1}"],
    }
    cfg = _cfg(*base, *extra[recipe])
    shape = PackShape(seq_length=64, tokens=60, samples=3, patches=48, images=3)
    (stage,) = plan_layout(cfg, shape, 1).stages
    assert stage.activations_gb * 1e9 == pytest.approx(_hand_activations(recipe), rel=1e-12)
    if recipe == "stage1":  # full recompute: the LM keeps its 4 layer inputs (64 × 64 fp32),
        # one layer's activations during its backward; the ViT still nothing but its output
        cfg = _cfg(*base, *extra[recipe], "train.recompute.granularity=full")
        (stage,) = plan_layout(cfg, shape, 1).stages
        lm_layer = 64 * 4 * (2 * 64 + (5 * 64 + 3 * 32) + 2 * 128)
        want = 4 * 64 * 64 * 4 + 51 * 32 * 4 + max(lm_layer, 48 * 256 * 8)
        assert stage.activations_gb * 1e9 == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------- CLI


def test_pack_shape_from_a_packer_report():
    report = {"packs": 10, "seq_len": 8192, "tokens": 80000, "samples_per_pack": 10.5,
              "vision_patches_per_pack": {"min": 100, "max": 40000, "mean": 29000.0}}  # fmt: skip
    shape = PackShape.from_report(report, images_per_sample=1.0)
    assert (shape.seq_length, shape.tokens, shape.samples) == (8192, 8000, 10.5)
    assert (shape.patches, shape.images) == (29000.0, 10.5)


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_the_balanced_split(capsys, tmp_path):
    config = "configs/llava_ov_1_5/8b/stage1_5_mid_training.yaml"
    code, out, err = _main(capsys, "--config", config, "--gpus", "128", "--tokens-per-pack",
                           "8028", "--samples-per-pack", "10.84", "--patches-per-pack", "30000",
                           "--json", str(tmp_path / "plan.json"), "train.global_batch_size=128",
                           f"{PP}=2", "parallel.tensor_model_parallel_size=1",
                           "parallel.sequence_parallel=false")  # fmt: skip
    assert code == 0, err
    balanced = json.loads((tmp_path / "plan.json").read_text())["balanced"]
    layers = [s["lm_layers"] for s in balanced["stages"]]
    assert sum(layers) == 36 and layers[0] < 18  # the ViT's stage takes fewer LM layers
    assert re.search(rf"balanced split: TP 1 · PP 2 · CP 1 \({layers[0]}/{layers[1]}\)", out)
    assert "candidate layouts on 128 GPUs" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus", "8"], "error: give --pack-report, or --tokens-per-pack and --samples-per-pack"),
        (["--gpus", "8", "--pack-report", "/nonexistent.json"],
         "error: --pack-report /nonexistent.json: [Errno 2] No such file or directory: "
         "'/nonexistent.json'"),
        (["--gpus", "3", "--tokens-per-pack", "30", "--samples-per-pack", "2"],
         "error: world size 3 is not divisible by parallel.tensor_model_parallel_size=2 x "
         "parallel.pipeline_model_parallel_size=1 x parallel.context_parallel_size=1 = 2"),
        (["--gpus", "8", "--tokens-per-pack", "40", "--samples-per-pack", "2"],
         "error: pack shape: 40 tokens per pack exceed the pack length 32"),
        (["--gpus", "8", "--tokens-per-pack", "30", "--samples-per-pack", "2", "--hfu", "0"],
         "error: --hfu=0.0 must be > 0"),
    ],
)  # fmt: skip
def test_cli_errors_are_one_line(capsys, argv, message):
    code, out, err = _main(capsys, "--config", TINY, *argv,
                           "parallel.tensor_model_parallel_size=2")  # fmt: skip
    assert (code, err.strip(), out) == (2, message, "")
