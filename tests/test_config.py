"""Tests for the typed config system (YAML, overrides, ``base:`` chains, validation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lov15_megatron.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    format_config,
    load_config,
    validate,
    validate_world_size,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_gpt.yaml"
# A VLM on TINY's 256-token vocabulary names image token ids inside it.
SMALL_VOCAB_IDS = [
    "model.vision.image_token_id=255",
    "model.vision.vision_start_token_id=253",
    "model.vision.vision_end_token_id=254",
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_tiny_config_values():
    cfg = load_config(TINY)
    lm = cfg.model.language
    assert (lm.num_layers, lm.hidden_size, lm.ffn_hidden_size) == (2, 64, 128)
    assert (lm.num_attention_heads, lm.num_query_groups, lm.vocab_size) == (4, 2, 256)
    assert (cfg.train.micro_batch_size, cfg.train.global_batch_size) == (2, 8)
    assert cfg.train.train_iters == 30 and cfg.data.seq_length == 32
    assert cfg.optimizer.lr == 1e-2 and cfg.optimizer.min_lr == 1e-3
    assert isinstance(cfg.optimizer.lr, float)
    assert cfg.scheduler.warmup_iters == 2 and cfg.scheduler.decay_style == "cosine"
    assert cfg.model.params_dtype == "float32"  # untouched key keeps its default


def test_overrides_and_yaml_round_trip(tmp_path):
    cfg = load_config(
        TINY,
        [
            "model.language.num_layers=4",
            "optimizer.lr=3e-3",  # PyYAML reads this as a string; float fields accept it
            "optimizer.weight_decay=1",  # int -> float
            "parallel.use_distributed_optimizer=false",
            "model.language.kv_channels=32",
            "model.language.kv_channels=null",  # applied in order
            "checkpoint.save=/tmp/ckpt",
            "model.vision={num_layers: 1, hidden_size: 64, ffn_hidden_size: 128, "
            "num_attention_heads: 4, image_token_id: 255}",
            "model.vision.vision_start_token_id=250",  # the vocabulary is 256: ids inside it
            "model.vision.vision_end_token_id=251",
            "train.trainable=[merger,language]",
            "model.params_dtype=bfloat16",
            "model.language={hidden_size: 128, ffn_hidden_size: 256}",  # mapping onto a section
        ],
    )
    assert cfg.model.language.num_layers == 4
    assert cfg.optimizer.lr == 3e-3 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.weight_decay == 1.0 and isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.parallel.use_distributed_optimizer is False
    assert cfg.model.language.kv_channels is None
    assert cfg.checkpoint.save == "/tmp/ckpt"
    assert cfg.train.trainable == ["merger", "language"]
    assert cfg.model.params_dtype == "bfloat16"
    assert cfg.model.language.hidden_size == 128 and cfg.model.language.ffn_hidden_size == 256
    assert cfg.model.language.num_layers == 4  # section merge keeps the other fields
    v = cfg.model.vision
    assert (v.image_token_id, v.vision_start_token_id, v.vision_end_token_id) == (255, 250, 251)

    text = config_to_yaml(cfg)
    again = load_config(_write(tmp_path / "dump.yaml", text))
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert format_config(cfg).splitlines()[0].startswith("====")
    assert "train_iters: 30" in format_config(cfg)


def test_defaults_without_file():
    assert load_config() == RunConfig()
    assert load_config(None, ["train.train_iters=3"]).train.train_iters == 3


def test_base_inheritance_deep_merge(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "root.yaml", "model:\n  language:\n    num_layers: 4\n    hidden_size: 32\n")
    _write(
        tmp_path / "sub" / "mid.yaml",
        "base: ../root.yaml\nmodel:\n  language:\n    hidden_size: 128\ntrain:\n  train_iters: 7\n",
    )
    leaf = _write(tmp_path / "leaf.yaml", "base: sub/mid.yaml\nmodel:\n  init_method_std: 0.01\n")
    cfg = load_config(leaf)
    assert cfg.model.language.num_layers == 4  # from root, survives two merges
    assert cfg.model.language.hidden_size == 128  # mid overrides root
    assert cfg.train.train_iters == 7
    assert cfg.model.init_method_std == 0.01
    assert cfg.model.language.vocab_size == 256  # default


def test_base_cycle(tmp_path):
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found.*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = _write(tmp_path / "bad.yaml", "model: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML in .*bad.yaml"):
        load_config(bad)
    base_missing = _write(tmp_path / "c.yaml", "base: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml"):
        load_config(base_missing)


def test_unknown_key_yaml(tmp_path):
    path = _write(tmp_path / "x.yaml", "model:\n  language:\n    hidden: 3\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'model.language.hidden' in .*x.yaml; did you mean 'hidden_size'",
    ):
        load_config(path)


def test_unknown_key_in_base_names_that_file(tmp_path):
    _write(tmp_path / "parent.yaml", "train:\n  train_itres: 3\n")
    child = _write(tmp_path / "child.yaml", "base: parent.yaml\n")
    with pytest.raises(ConfigError, match=r"'train.train_itres' in .*parent.yaml.*'train_iters'"):
        load_config(child)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optimizer.lrr=1", r"unknown key 'optimizer.lrr' in override.*did you mean 'lr'"),
        ("modle.language.num_layers=1", r"unknown key 'modle'.*did you mean 'model'"),
        ("train.train_iters", r"bad override.*key.path=value"),
        ("model.language=3", r"'model.language' is a section, not a leaf"),
        ("optimizer=adam", r"'optimizer' is a section"),
        ("train.train_iters.x=1", r"'train.train_iters' is a leaf"),
        (
            "model.language.num_layers=two",
            r"model.language.num_layers: expected int, got str 'two'",
        ),
        ("model.language.num_layers=2.5", r"num_layers: expected int, got float"),
        ("model.language.num_layers=true", r"num_layers: expected int, got bool"),
        ("model.language.qk_layernorm=1", r"qk_layernorm: expected bool, got int"),
        ("optimizer.lr=fast", r"optimizer.lr: expected float, got str 'fast'"),
        ("checkpoint.save=123", r"checkpoint.save: expected str \| None, got int"),
        ("model.language.num_layers=null", r"num_layers: expected int, got NoneType"),
        ("train.trainable=merger", r"train.trainable: expected list\[str\]"),
        ("train.trainable=[1]", r"train.trainable\[0\]: expected str"),
        ("optimizer.name=adamw", r"optimizer.name: 'adamw' is not allowed.*'adam', 'sgd'"),
        ("runtime.device=gpu", r"runtime.device.*allowed values: 'auto', 'cpu', 'cuda'"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [override])


@pytest.mark.parametrize(
    ("yaml_text", "match"),
    [
        ("model:\n  language:\n    num_layers: '3'\n", r"num_layers: expected int, got str '3'"),
        ("model:\n  params_dtype: fp16\n", r"model.params_dtype: 'fp16' is not allowed"),
        ("train: 5\n", r"train: expected a mapping for TrainConfig"),
        ("- 1\n", r"top level must be a mapping"),
        ("base: 3\n", r"'base' must be a path or a list of paths"),
    ],
)
def test_bad_yaml_values(tmp_path, yaml_text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path / "bad.yaml", yaml_text))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["parallel.tensor_model_parallel_size=3", "model.language.num_query_groups=4"],
            r"parallel.tensor_model_parallel_size=3 does not divide "
            r"model.language.num_attention_heads=4",
        ),
        (
            ["parallel.tensor_model_parallel_size=4", "model.language.num_query_groups=2"],
            r"tensor_model_parallel_size=4 does not divide model.language.num_query_groups=2",
        ),
        (
            ["model.language.num_query_groups=3"],
            r"num_query_groups=3 does not divide model.language.num_attention_heads=4",
        ),
        (
            ["parallel.pipeline_model_parallel_size=3"],
            r"pipeline_model_parallel_size=3 does not divide model.language.num_layers=2",
        ),
        (
            [
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
            ],
            r"virtual_pipeline_model_parallel_size=2 does not divide model.language.num_layers",
        ),
        (
            ["parallel.virtual_pipeline_model_parallel_size=2"],
            r"virtual_pipeline_model_parallel_size=2 requires "
            r"parallel.pipeline_model_parallel_size > 1",
        ),
        (
            ["parallel.sequence_parallel=true"],
            r"parallel.sequence_parallel=true requires parallel.tensor_model_parallel_size > 1",
        ),
        (
            ["train.global_batch_size=7"],
            r"train.global_batch_size=7 is not divisible by train.micro_batch_size=2",
        ),
        (
            ["data.seq_length=64", "model.language.max_position_embeddings=32"],
            r"data.seq_length=64 exceeds model.language.max_position_embeddings=32",
        ),
        (
            ["data.seq_length=30", "parallel.context_parallel_size=2"],
            r"data.seq_length=30 must be divisible by 2 x parallel.context_parallel_size=2",
        ),
        (["data.loader=energon"], r"data.loader='energon' requires data.path"),
        (["train.trainable=[vision, decoder]"], r"train.trainable .*'decoder'"),
        (["train.trainable=[]"], r"train.trainable"),
        (["optimizer.lr_mult={decoder: 0.1}"], r"optimizer.lr_mult has unknown group.*'decoder'"),
        (["optimizer.lr_mult={vision: 0}"], r"optimizer.lr_mult.vision=0.0 must be > 0"),
        (["model.language.num_layers=0"], r"model.language.num_layers=0 must be >= 1"),
        (["parallel.context_parallel_size=0"], r"parallel.context_parallel_size=0 must be >= 1"),
        (["train.train_iters=0"], r"train.train_iters=0 must be >= 1"),
        (["train.micro_batch_size=0"], r"train.micro_batch_size=0 must be >= 1"),
        (["optimizer.lr=-1"], r"optimizer.lr=-1.0 must be >= 0"),
        (["optimizer.min_lr=1"], r"optimizer.min_lr=1.0 must be <= optimizer.lr"),
        (["scheduler.warmup_iters=31"], r"scheduler.warmup_iters=31 exceeds the decay length 30"),
        (
            ["scheduler.warmup_iters=5", "scheduler.decay_iters=4"],
            r"scheduler.warmup_iters=5 exceeds the decay length 4",
        ),
        # Settings that would be accepted and then ignored:
        (
            ["scheduler.warmup_iters=2", "scheduler.warmup_fraction=0.1"],
            r"scheduler.warmup_iters=2 and scheduler.warmup_fraction=0.1 are both set",
        ),
        (
            ["scheduler.warmup_iters=0", "scheduler.warmup_fraction=1.5"],
            r"scheduler.warmup_fraction=1.5 must be in \[0, 1\)",
        ),
        (
            ["optimizer.lr_mult={vision: 0.2}"],
            r"optimizer.lr_mult names \['vision'\], but this "
            r"is a language-only model",
        ),  # fmt: skip
        (
            ["train.trainable=[merger]"],
            r"train.trainable names \['merger'\], but this is a "
            r"language-only model",
        ),  # fmt: skip
        (
            ["scheduler.decay_style=constant", "scheduler.decay_iters=10"],
            r"scheduler.decay_iters=10 has no effect with decay_style=constant",
        ),
        (
            ["scheduler.decay_style=constant", "optimizer.min_lr=1e-5"],
            r"optimizer.min_lr=1e-05 has no effect with scheduler.decay_style=constant",
        ),
        (
            ["train.recompute.method=block"],
            r"train.recompute.method/num_layers \(block, 1\) have no effect",
        ),
        (
            ["train.recompute.granularity=full", "train.recompute.modules=[mlp]"],
            r"train.recompute.modules=\['mlp'\] has no effect unless",
        ),
        (["data.num_workers=2"], r"data.num_workers=2 has no effect with data.loader=synthetic"),
        (["data.path=/x"], r"data.path='/x' has no effect with data.loader=synthetic"),
        (
            [
                "train.recompute.granularity=full",
                "train.recompute.method=block",
                "train.recompute.num_layers=3",
            ],
            r"train.recompute.num_layers=3 exceeds the 2 language-model layers of the largest "
            r"pipeline chunk",
        ),  # fmt: skip
        # The VLM's image token ids (defaults: the Qwen ids) must be distinct ids of its vocabulary.
        (
            ["model.vision={num_attention_heads: 4}"],
            r"model.vision.image_token_id=151655 is outside the vocabulary: it must be in "
            r"\[0, model.language.vocab_size=256\)",
        ),
        (
            ["model.vision={}", *SMALL_VOCAB_IDS, "model.vision.vision_end_token_id=-1"],
            r"model.vision.vision_end_token_id=-1 is outside the vocabulary",
        ),
        (
            ["model.vision={}", *SMALL_VOCAB_IDS, "model.vision.vision_start_token_id=255"],
            r"model.vision.vision_start_token_id=255 equals model.vision.image_token_id: ",
        ),
    ],
)
def test_cross_field_validation(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, overrides)


def test_valid_parallel_layouts_pass():
    cfg = load_config(
        TINY,
        [
            "parallel.tensor_model_parallel_size=2",
            "parallel.sequence_parallel=true",
            "parallel.pipeline_model_parallel_size=2",
            "model.language.num_layers=4",
            "parallel.virtual_pipeline_model_parallel_size=2",
            "data.loader=energon",
            "data.path=/data/wds",
            "model.vision={num_attention_heads: 4}",
            *SMALL_VOCAB_IDS,
            "train.trainable=[vision, merger, language]",
        ],
    )
    assert cfg.parallel.virtual_pipeline_model_parallel_size == 2


def test_validate_on_code_built_config():
    cfg = RunConfig()
    cfg.parallel.tensor_model_parallel_size = 3
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=3 does not divide"):
        validate(cfg)
    cfg = RunConfig()
    cfg.optimizer.name = "lion"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="optimizer.name: 'lion' is not allowed"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"unknown key 'train.iters' in <dict>"):
        config_from_dict({"train": {"iters": 3}})


def test_validate_world_size():
    cfg = load_config(TINY, ["parallel.tensor_model_parallel_size=2"])
    assert validate_world_size(cfg, 2) == 1
    assert validate_world_size(cfg, 8) == 4  # 8 = 2 (mbs) x 4 (dp)
    with pytest.raises(
        ConfigError,
        match=r"world size 3 is not divisible by parallel.tensor_model_parallel_size=2",
    ):
        validate_world_size(cfg, 3)
    with pytest.raises(
        ConfigError,
        match=r"train.global_batch_size=8 is not divisible by train.micro_batch_size=2 "
        r"x data-parallel size 3 \(world size 6\)",
    ):
        validate_world_size(cfg, 6)
    cp = load_config(
        TINY, ["parallel.context_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
    )
    with pytest.raises(ConfigError, match=r"context_parallel_size=2 = 4"):
        validate_world_size(cp, 6)
    assert validate_world_size(cp, 4) == 1


def test_image_token_id_defaults_are_the_qwen_tokenizer_ids():
    from lov15_megatron.config import VisionModelConfig
    from lov15_megatron.data import special_tokens as st

    v = VisionModelConfig()
    assert (v.image_token_id, v.vision_start_token_id, v.vision_end_token_id) == (
        st.IMAGE_PAD_ID,
        st.VISION_START_ID,
        st.VISION_END_ID,
    )


@pytest.mark.parametrize(
    ("field", "value", "token"),
    [
        ("image_token_id", 151656, "<|image_pad|> id 151655"),
        ("vision_start_token_id", 151654, "<|vision_start|> id 151652"),
        ("vision_end_token_id", 0, "<|vision_end|> id 151653"),
        ("video_token_id", 151654, "<|video_pad|> id 151656"),
    ],
)
def test_training_refuses_image_ids_other_than_the_tokenizers(
    tmp_path, capsys, field, value, token
):
    """The data is tokenized with the tokenizer's ids: a training run whose model.vision ids
    differ ends in one line naming the field, exit 2, before anything is built."""
    from lov15_megatron.train import main

    data = tmp_path / "packed"
    (data / ".nv-meta").mkdir(parents=True)
    (data / ".nv-meta" / "dataset.yaml").write_text("{}\n")
    tiny_vlm = str(TINY.parent / "tiny" / "model.yaml")
    code = main(["--config", tiny_vlm, f"data.path={data}", f"model.vision.{field}={value}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"config error: model.vision.{field}={value} differs from the {token} ")
    assert "data.tokenizer=qwen-offline" in err


def test_image_token_ids_are_checked_only_against_energon_data():
    from lov15_megatron.training.preflight import check_image_token_ids

    tiny_vlm = TINY.parent / "tiny" / "model.yaml"
    check_image_token_ids(load_config(tiny_vlm, ["data.path=/data"]))  # the Qwen ids: accepted
    other = ["data.loader=synthetic", "data.path=null", "model.vision.image_token_id=7"]
    check_image_token_ids(load_config(tiny_vlm, other))  # no tokenized data to disagree with
