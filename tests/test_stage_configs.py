"""The shipped configs: every YAML validates; the 4B/8B stage configs carry the release's recipe
(docs/release-recipe.md) and the model shapes (docs/model-reference.md §1), and their parallel
layouts fit the node counts they are meant for; the tiny CPU configs have the shapes tests rely
on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lov15_megatron.config import (
    ConfigError,
    RunConfig,
    config_to_dict,
    load_config,
    validate,
    validate_world_size,
)
from lov15_megatron.config.loader import load

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
STAGES = ("stage1_alignment", "stage1_5_mid_training", "stage2_instruct")
SIZES = ("4b", "8b")
ALL = ["vision", "merger", "language"]

# docs/release-recipe.md (the release's quick-start recipe), one row per stage:
# trainable, lr, min lr, weight decay, Adam beta2, iterations, micro batch, global batch
RELEASE = {
    "stage1_alignment": (["merger"], 1e-4, 1e-6, 0.0, 0.99, 2500, 1, 8),
    "stage1_5_mid_training": (ALL, 1e-5, 1e-6, 0.01, 0.95, 20000, 1, 16),
    "stage2_instruct": (ALL, 1e-5, 1e-6, 0.0, 0.99, 3500, 1, 224),
}
# docs/model-reference.md §1: LM (layers, hidden, ffn, q heads, kv heads, head dim, rope theta),
# total params
SHAPES = {
    "4b": ((36, 2560, 9728, 32, 8, 128, 5e6), 4.74e9),
    "8b": ((36, 4096, 12288, 32, 8, 128, 1e6), 8.53e9),
}
# (size, stage) -> (TP, PP, CP, SP) as chosen in docs/parallelism-choice.md
LAYOUT = {
    ("4b", "stage1_alignment"): (1, 1, 1, False),
    ("4b", "stage1_5_mid_training"): (1, 1, 1, False),
    ("4b", "stage2_instruct"): (1, 1, 1, False),
    ("8b", "stage1_alignment"): (1, 1, 1, False),
    ("8b", "stage1_5_mid_training"): (2, 1, 1, True),
    ("8b", "stage2_instruct"): (2, 1, 1, True),
}
# Where the stages are meant to run: (size, stage, GPUs, overrides) -> (DP, micro-batches/step).
# The defaults are the #SBATCH --nodes of the wrappers (1 / 2 / 4 nodes); the 8B rows at 112 and
# 128 GPUs are the release-scale 85M mid-training run (GBS 112 as the release on 14 nodes; on
# 16 nodes GBS 128 with the same number of packs, 61,250 x 128 = 70,000 x 112).
FULL_85M_112 = ("train.global_batch_size=112", "train.train_iters=70000")
FULL_85M_128 = ("train.global_batch_size=128", "train.train_iters=61250")
PLACEMENTS = [
    ("4b", "stage1_alignment", 8, (), (8, 1)),
    ("4b", "stage1_5_mid_training", 16, (), (16, 1)),
    ("4b", "stage1_5_mid_training", 8, (), (8, 2)),
    ("4b", "stage2_instruct", 32, (), (32, 7)),
    ("4b", "stage2_instruct", 8, (), (8, 28)),
    ("8b", "stage1_alignment", 8, (), (8, 1)),
    ("8b", "stage1_5_mid_training", 16, (), (8, 2)),
    ("8b", "stage2_instruct", 32, (), (16, 14)),
    ("8b", "stage2_instruct", 64, (), (32, 7)),
    ("8b", "stage1_5_mid_training", 112, FULL_85M_112, (56, 2)),
    ("8b", "stage1_5_mid_training", 128, FULL_85M_128, (64, 2)),
]


def stage_config(size: str, stage: str, *overrides: str) -> RunConfig:
    path = CONFIGS / "llava_ov_1_5" / size / f"{stage}.yaml"
    return load_config(path, ["data.path=/data/packed", *overrides])


def test_every_yaml_under_configs_validates():
    paths = sorted(CONFIGS.rglob("*.yaml"))
    assert len(paths) >= 20
    for path in paths:
        cfg = load(RunConfig, path)  # YAML + base chain, no cross-field checks yet
        if cfg.data.loader == "energon":
            assert cfg.data.path is None, f"{path}: data paths come from the command line"
            cfg.data.path = "/data/packed"
        if cfg.peft is not None:
            assert cfg.checkpoint.pretrained is None, f"{path}: the base comes from the launcher"
            cfg.checkpoint.pretrained = "/base"
        validate(cfg)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("size", SIZES)
def test_stage_recipe_is_the_release(size, stage):
    cfg = stage_config(size, stage)
    o, t, s = cfg.optimizer, cfg.train, cfg.scheduler
    got = (t.trainable, o.lr, o.min_lr, o.weight_decay, o.adam_beta2, t.train_iters,
           t.micro_batch_size, t.global_batch_size)  # fmt: skip
    assert got == RELEASE[stage]
    assert (o.name, o.adam_beta1, o.adam_eps, o.clip_grad) == ("adam", 0.9, 1e-5, 1.0)
    sched = (s.decay_style, s.warmup_fraction, s.warmup_iters, s.decay_iters)
    assert sched == ("cosine", 0.002, 0, None)
    assert (cfg.model.init_method_std, cfg.model.params_dtype) == (0.02, "bfloat16")
    assert cfg.model.transformer_impl == "auto" and cfg.runtime.device == "cuda"
    r = t.recompute  # the release: full / uniform, 4 layers per chunk (stage 2: 1), ViT too
    layers = 1 if stage == "stage2_instruct" else 4
    assert (r.granularity, r.method, r.num_layers, r.vision) == ("full", "uniform", layers, True)
    assert cfg.parallel.use_distributed_optimizer
    # Stage 2 as the release runs it: unpacked samples (one per sequence, 16k upper bound),
    # longest image side capped at 1000 px, loss averaged per sample (micro-batch 1).
    stage2 = stage == "stage2_instruct"
    assert (cfg.data.loader, cfg.data.seq_length) == ("energon", 16384 if stage2 else 8192)
    assert cfg.data.max_image_side == (1000 if stage2 else None)
    assert cfg.train.loss_weighting == ("micro_batch" if stage2 else "token")
    assert cfg.checkpoint.save_interval == 2000
    c = cfg.checkpoint
    assert (c.save, c.load, c.pretrained) == (None, None, None), "paths come from the launcher"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("size", SIZES)
def test_stage_model_and_layout(size, stage):
    cfg = stage_config(size, stage)
    lm, v, p = cfg.model.language, cfg.model.vision, cfg.parallel
    shape = (lm.num_layers, lm.hidden_size, lm.ffn_hidden_size, lm.num_attention_heads,
             lm.num_query_groups, lm.kv_channels, lm.rotary_base)  # fmt: skip
    assert shape == SHAPES[size][0]
    assert lm.vocab_size == 151936 and lm.untie_embeddings_and_output_weights
    assert lm.qk_layernorm and lm.norm_epsilon == 1e-6
    vision = (v.num_layers, v.hidden_size, v.ffn_hidden_size, v.num_attention_heads,
              v.patch_size, v.spatial_merge_size, v.norm_epsilon, v.rope_theta)  # fmt: skip
    assert vision == (24, 1024, 4096, 16, 14, 2, 1e-5, 10000.0)
    assert cfg.model == load_config(CONFIGS / "models" / f"llava_ov_1_5_{size}.yaml").model
    layout = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
              p.context_parallel_size, p.sequence_parallel)  # fmt: skip
    assert layout == LAYOUT[(size, stage)]


def test_4b_and_8b_share_everything_but_model_and_layout():
    for stage in STAGES:
        a, b = (config_to_dict(stage_config(size, stage)) for size in SIZES)
        for d in (a, b):
            del d["model"], d["parallel"]
        assert a == b, stage


@pytest.mark.parametrize(("size", "stage", "gpus", "overrides", "expected"), PLACEMENTS)
def test_layouts_fit_their_node_counts(size, stage, gpus, overrides, expected):
    cfg = stage_config(size, stage, *overrides)
    dp = validate_world_size(cfg, gpus)
    assert (dp, cfg.train.global_batch_size // dp) == expected


@pytest.mark.parametrize(
    ("size", "stage", "gpus", "overrides", "match"),
    [
        ("4b", "stage1_alignment", 16, (), "train.global_batch_size=8 is not divisible"),
        ("8b", "stage2_instruct", 128, (), "train.global_batch_size=224 is not divisible"),
        ("8b", "stage1_5_mid_training", 128, FULL_85M_112, "data-parallel size 64"),
        ("8b", "stage2_instruct", 9, (), "world size 9 is not divisible by parallel.tensor"),
    ],
)
def test_layouts_that_do_not_fit_are_named(size, stage, gpus, overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_world_size(stage_config(size, stage, *overrides), gpus)


def test_stage_configs_need_a_data_path():
    with pytest.raises(ConfigError, match="data.loader='energon' requires data.path"):
        load_config(CONFIGS / "llava_ov_1_5" / "4b" / "stage1_alignment.yaml")


@pytest.mark.parametrize("size", SIZES)
def test_total_parameters_match_the_release(size):
    """The HF-side model (lov15_megatron.hf) built on the meta device from the config's shapes."""
    from lov15_megatron.hf import (
        LLaVAOneVision1_5_Config,
        LLaVAOneVision1_5_ForConditionalGeneration,
    )
    from lov15_megatron.models.registry import get_family

    cfg = load_config(CONFIGS / "models" / f"llava_ov_1_5_{size}.yaml")
    hf = get_family("llava-ov-1.5").hf_config(cfg, {})
    config = LLaVAOneVision1_5_Config(
        **{k: v for k, v in hf.items() if k not in ("model_type", "architectures", "auto_map")}
    )
    with torch.device("meta"):
        model = LLaVAOneVision1_5_ForConditionalGeneration(config)
    names = dict(model.named_parameters())
    total = sum(p.numel() for p in names.values())
    assert len(model.state_dict()) == 698  # docs/model-reference.md §7
    assert abs(total - SHAPES[size][1]) < 0.005e9, total
    merger = sum(p.numel() for n, p in names.items() if ".merger." in n)
    hidden = cfg.model.language.hidden_size
    assert merger == 2 * 1024 + 4096 * 4096 + 4096 + hidden * 4096 + hidden


# ---- tiny CPU configs ---------------------------------------------------------------------------

TINY = {"stage1": ["merger"], "stage1_5": ALL, "stage2": ALL}


@pytest.mark.parametrize("stage", list(TINY))
def test_tiny_configs(stage):
    cfg = load_config(CONFIGS / "tiny" / f"{stage}.yaml", ["data.path=/data/tiny"])
    lm, v, t = cfg.model.language, cfg.model.vision, cfg.train
    assert (lm.num_layers, lm.hidden_size, lm.num_attention_heads, lm.num_query_groups,
            lm.kv_channels, lm.vocab_size) == (2, 64, 4, 2, 16, 151936)  # fmt: skip
    assert lm.untie_embeddings_and_output_weights
    assert (v.num_layers, v.hidden_size, v.num_attention_heads) == (2, 64, 4)
    assert (cfg.model.params_dtype, cfg.model.transformer_impl) == ("float32", "local")
    assert (cfg.runtime.device, cfg.data.loader, cfg.data.seq_length) == ("cpu", "energon", 512)
    assert (t.micro_batch_size, t.global_batch_size, t.trainable) == (1, 4, TINY[stage])
    assert 20 <= t.train_iters <= 60
    release = RELEASE[{"stage1": STAGES[0], "stage1_5": STAGES[1], "stage2": STAGES[2]}[stage]]
    assert (cfg.optimizer.weight_decay, cfg.optimizer.adam_beta2) == release[3:5]
    # the layouts the CPU tests and the quickstart use: 1 rank, or 2 ranks as TP, PP or DP
    assert validate_world_size(cfg, 1) == 1 and validate_world_size(cfg, 2) == 2
    path = CONFIGS / "tiny" / f"{stage}.yaml"
    for layout in ("tensor_model_parallel_size=2", "pipeline_model_parallel_size=2"):
        two = load_config(path, ["data.path=/data/tiny", f"parallel.{layout}"])
        assert validate_world_size(two, 2) == 1


def test_model_configs_are_pure_model():
    """configs/models/llava_ov_1_5_*.yaml set only `model:` (stage files add the recipe)."""
    default = config_to_dict(RunConfig())
    for size in SIZES:
        d = config_to_dict(load_config(CONFIGS / "models" / f"llava_ov_1_5_{size}.yaml"))
        assert {k: v for k, v in d.items() if k != "model"} == {
            k: v for k, v in default.items() if k != "model"
        }


@pytest.mark.parametrize("size", SIZES)
def test_packed_stage2_variant_consumes_about_the_release_samples(size):
    """stage2_instruct_packed: the stage-2 recipe on 8k packs, 32 packs per step = 224 samples
    at the 7 samples per pack its comment assumes; tokens weigh equally."""
    packed = load_config(
        CONFIGS / "llava_ov_1_5" / size / "stage2_instruct_packed.yaml", ["data.path=/d"]
    )
    unpacked = stage_config(size, "stage2_instruct")
    assert packed.train.global_batch_size * 7 == unpacked.train.global_batch_size == 224
    assert (packed.data.seq_length, packed.train.loss_weighting) == (8192, "token")
    assert packed.data.max_image_side == 1000
    same = ("lr", "min_lr", "weight_decay", "adam_beta2")
    assert [getattr(packed.optimizer, k) for k in same] == [
        getattr(unpacked.optimizer, k) for k in same
    ]
    assert packed.train.train_iters == unpacked.train.train_iters == 3500


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_lora_recipe_is_automodels_on_one_node(size):
    """stage2_lora: NeMo AutoModel's LLaVA-OV-1.5-8B LoRA values (rank 16, alpha 32, dropout
    0.05, the language model's linears, AdamW 1e-4 constant, weight decay 0.01, betas 0.9/0.95)
    on 8 packs per step, TP 1 on one node of 8 GPUs."""
    cfg = stage_config(size, "stage2_lora", "checkpoint.pretrained=/released_instruct")
    pe = cfg.peft
    assert pe is not None
    assert (pe.rank, pe.alpha, pe.dropout, pe.towers) == (16, 32.0, 0.05, ["language"])
    assert pe.target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    o = cfg.optimizer
    assert (o.lr, o.min_lr, o.weight_decay, o.adam_beta1, o.adam_beta2) == (1e-4, 0, 0.01, 0.9,
                                                                             0.95)  # fmt: skip
    assert cfg.scheduler.decay_style == "constant" and cfg.train.trainable is None
    assert cfg.train.global_batch_size == 8 and cfg.data.seq_length == 8192
    p = cfg.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (1, 1)
    validate_world_size(cfg, 8)  # one node: DP 8
