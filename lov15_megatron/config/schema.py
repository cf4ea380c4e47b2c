"""The one config schema: typed dataclasses with defaults, plus cross-field validation.

Loading/overrides/type checking live in :mod:`lov15_megatron.config.loader`, which is generic over
this tree and knows nothing of it: add a field here (with a default and a comment) and it is
loadable and overridable. :func:`load_config` / :func:`config_from_dict` (at the end) apply that
machinery to :class:`RunConfig` and validate the result.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Literal

from lov15_megatron.config.bundled import find_config
from lov15_megatron.config.loader import ConfigError, build, check_types, load

TRAINABLE_GROUPS = ("vision", "merger", "language")


@dataclass
class LanguageModelConfig:
    """The decoder-only language model (Qwen-style: GQA, RoPE, RMSNorm, optional QK-norm)."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128  # MLP intermediate size
    num_attention_heads: int = 4
    num_query_groups: int = 2  # GQA key/value heads
    kv_channels: int | None = None  # head dim; None -> hidden_size // num_attention_heads
    vocab_size: int = 256  # tokenizer vocab (padded by make_vocab_size_divisible_by * TP)
    max_position_embeddings: int = 4096
    rotary_base: float = 1000000.0  # RoPE theta
    norm_epsilon: float = 1e-6
    qk_layernorm: bool = True  # RMSNorm on per-head queries/keys
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    # Mixture of experts (Qwen3-MoE): every layer's MLP is a Megatron MoELayer when set.
    num_experts: int | None = None  # None: a dense model
    moe_ffn_hidden_size: int | None = None  # per-expert intermediate size (moe_intermediate_size)
    moe_router_topk: int = 2  # experts per token (num_experts_per_tok)
    moe_norm_topk_prob: bool = True  # renormalise the top-k softmax weights (norm_topk_prob)
    moe_aux_loss_coeff: float = 0.0  # load-balancing auxiliary loss coefficient (logged)
    moe_z_loss_coeff: float | None = None  # router z-loss coefficient; None: off


@dataclass
class VisionModelConfig:
    """The Rice ViT vision tower and the 2×2 patch merger (defaults: the release's ViT-L/14)."""

    num_layers: int = 24
    hidden_size: int = 1024
    ffn_hidden_size: int = 4096
    num_attention_heads: int = 16  # head dim = hidden_size // num_attention_heads
    patch_size: int = 14
    in_channels: int = 3
    spatial_merge_size: int = 2  # the merger joins merge×merge patches into one LM token
    norm_epsilon: float = 1e-5  # LayerNorm eps of the blocks, pre_layernorm and merger
    rope_theta: float = 10000.0  # 2-D RoPE base
    merger_hidden_size: int | None = None  # None -> hidden_size * spatial_merge_size**2
    # The image block's token ids in the LM vocabulary (the HF config.json fields of the same
    # names; defaults: the Qwen tokenizer's <|image_pad|>, <|vision_start|>, <|vision_end|>, as
    # data/special_tokens.py). Merged image features replace the embeddings at image_token_id.
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # <|video_pad|>: merged video frame features replace the embeddings at this id (the HF
    # config.json field of the same name). None: the Qwen tokenizer's 151656 when the vocabulary
    # holds it (and no image-block id above is it), else the model has no video token (a small
    # vocabulary sets one explicitly); a set id is checked like image_token_id
    # (video_token_id_of).
    video_token_id: int | None = None


@dataclass
class ModelConfig:
    """The whole model: a language model, plus a vision tower and merger for the VLM."""

    language: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    vision: VisionModelConfig | None = None  # None: a language-only model
    init_method_std: float = 0.02  # std of the normal weight init
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"  # auto: TE if usable
    # Core attention of the LM and the ViT: te = Transformer Engine's (THD, its own CP), torch =
    # ours (models/attention.py: per-segment SDPA / varlen flash, never S×S); auto = te where the
    # TE spec is used, else torch.
    attention_backend: Literal["auto", "te", "torch"] = "auto"
    # FP8 GEMMs on the Transformer Engine path (Megatron's fp8 format): null = off, hybrid =
    # e4m3 forward / e5m2 backward, e4m3 = e4m3 both ways. Untested until a GPU run checks it.
    fp8: Literal["hybrid", "e4m3"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise"] = "delayed"  # TE scaling: delayed or current


@dataclass
class ParallelConfig:
    """Model parallelism; data parallelism is derived from the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None  # model chunks per PP stage
    context_parallel_size: int = 1
    sequence_parallel: bool = False  # shard activations along sequence over TP ranks
    expert_model_parallel_size: int = 1  # MoE experts split over this many ranks (EP)
    expert_tensor_parallel_size: int | None = None  # TP inside each expert; None -> TP size
    use_distributed_optimizer: bool = True  # shard optimizer state over DP ranks
    # Uneven pipeline stages (Megatron-Core's fields of the same names; null: an even split).
    # The first stage also holds the vision tower, merger and embedding, the last the final
    # norm and LM head: fewer LM layers there balance the stages (``lov15-plan`` proposes a
    # split). 0 on the first stage = a vision-only first stage (only for a VLM). The layers left
    # are split evenly over the middle stages; under VPP each stage's count splits evenly over
    # its model chunks.
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None

    def stage_layers(self, num_layers: int) -> list[int]:
        """Language-model layers on each pipeline stage, first to last (no validation)."""
        pp = self.pipeline_model_parallel_size
        first, last = (
            self.num_layers_in_first_pipeline_stage,
            self.num_layers_in_last_pipeline_stage,
        )
        fixed = [n for n in (first, last) if n is not None]
        middle = pp - len(fixed)
        rest = num_layers - sum(fixed)
        each = rest // middle if middle > 0 else 0
        counts = [each] * pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
        return counts

    def pipeline_layout(self, num_layers: int) -> list[list[str]] | None:
        """Megatron-Core's ``pipeline_model_parallel_layout`` of an uneven split, else None.

        The two fields become Megatron's layout (one list per model chunk, virtual stage by
        virtual stage, pipeline stage by pipeline stage) rather than Megatron's fields of the
        same names, which refuse 0 layers on the first stage. Each stage's layers split evenly
        over its virtual chunks; the embedding opens the first chunk, the loss closes the last.
        Checkpoints store layers by global index, so any split loads any checkpoint.
        """
        if self.num_layers_in_first_pipeline_stage is None and (
            self.num_layers_in_last_pipeline_stage is None
        ):
            return None
        pp, vpp = self.pipeline_model_parallel_size, self.virtual_pipeline_model_parallel_size or 1
        per_stage = self.stage_layers(num_layers)
        chunks = [["decoder"] * (per_stage[i] // vpp) for _ in range(vpp) for i in range(pp)]
        chunks[0].insert(0, "embedding")
        chunks[-1].append("loss")
        return chunks


@dataclass
class OptimizerConfig:
    """Optimizer and gradient clipping."""

    name: Literal["adam", "sgd"] = "adam"  # adam is AdamW (decoupled weight decay)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 0.0  # floor reached at the end of decay
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clip; 0 disables
    # Per module group (vision/merger/language) multiplier of lr and min_lr, e.g. {vision: 0.2}
    # (LLaVA-OneVision trains the ViT at a fifth of the LM's lr); unlisted groups use 1.
    lr_mult: dict[str, float] = field(default_factory=dict)


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: linear warmup to ``optimizer.lr``, then decay to ``min_lr``."""

    warmup_iters: int = 0
    warmup_fraction: float | None = None  # if set: warmup = fraction × decay iterations
    decay_style: Literal["constant", "linear", "cosine"] = "cosine"
    decay_iters: int | None = None  # None -> train.train_iters


@dataclass
class DataConfig:
    """Training data source."""

    # What feeds training: the synthetic token stream (language model only) or Energon over
    # data.path. (A sample's caption|instruct kind is a property of the data set, set when packing.)
    loader: Literal["synthetic", "energon"] = "synthetic"
    path: str | None = None  # energon dataset dir or metadataset YAML (required for energon)
    seq_length: int = 32  # tokens per sample / pack length (packed rows are padded to this)
    num_workers: int = 0  # dataloader worker processes per DP rank
    seed: int = 1234  # data order / synthetic data seed
    tokenizer: str = "qwen-offline"  # HF tokenizer dir, or qwen-offline (bundled Qwen vocab)
    min_pixels: int = 4 * 28 * 28  # image resize bounds (Qwen2-VL smart resize)
    max_pixels: int = 1600 * 1600
    # Longest image side in pixels before the min/max-pixels resize (the release's stage 2:
    # 1000); None: no cap. Packed data must have been packed with the same cap.
    max_image_side: int | None = None
    valid_path: str | None = None  # energon dataset of held-out samples (validation loss)


@dataclass
class RecomputeConfig:
    """Activation recomputation (Megatron-Core's knobs), for the LM and, if ``vision``, the ViT."""

    granularity: Literal["none", "selective", "full"] = "none"
    method: Literal["uniform", "block"] = "uniform"  # full: chunks of num_layers / first num_layers
    num_layers: int = 1  # full: layers per recomputed chunk (uniform) or recomputed layers (block)
    # selective: Megatron's recompute_modules (core_attn, mlp, moe_act, layernorm, ...)
    modules: list[str] = field(default_factory=lambda: ["core_attn"])
    vision: bool = True  # apply the same setting to the Rice ViT blocks


@dataclass
class TrainConfig:
    """Training loop size and batch shape."""

    train_iters: int = 10
    micro_batch_size: int = 1  # samples per forward/backward per DP rank
    global_batch_size: int = 8  # samples per optimizer step across all DP ranks
    trainable: list[str] | None = (
        None  # module groups to train (vision/merger/language); None = all
    )
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    # token: every loss token of the global batch weighs the same (layout-independent);
    # micro_batch: mean per micro-batch, then averaged (the release's Megatron-LM default).
    loss_weighting: Literal["token", "micro_batch"] = "token"
    # Validation on data.valid_path: every eval_interval iterations (None: only at the end of
    # the run), eval_iters global batches each time.
    eval_interval: int | None = None
    eval_iters: int = 1
    exit_interval: int | None = None  # save and stop after an iteration divisible by this


@dataclass
class CheckpointConfig:
    """Checkpoint save/resume."""

    save: str | None = None  # directory to save checkpoints in
    load: str | None = None  # directory to resume from (model, optimizer, scheduler, iteration)
    pretrained: str | None = None  # weights-only start (ignored when resuming from load)
    save_interval: int | None = None  # iterations between saves; None -> only at the end
    keep_last: int = 2  # number of most recent checkpoints kept
    # Resume at another data-parallel size / data.num_workers: the Energon loader state cannot
    # be mapped, so such a resume is refused unless this accepts restarting the data order.
    allow_data_restart: bool = False


@dataclass
class LoggingConfig:
    """Metrics logging."""

    log_interval: int = 1  # iterations between log lines
    tensorboard_dir: str | None = None
    wandb_project: str | None = None


@dataclass
class RuntimeConfig:
    """Process/device settings."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu
    seed: int = 1234  # model init / dropout seed
    deterministic: bool = False  # request deterministic kernels


#: LoRA targets: Megatron-Core's names of the linear layers (attention's fused q/k/v and output
#: projection, the MLP's fused gate/up and down projection).
PEFT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
#: Which towers can take adapters (the VLM's; a language model has only ``language``).
PEFT_TOWERS = ("language", "vision", "merger")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning: LoRA adapters on frozen base weights (docs/lora.md).

    Each targeted linear layer W of the chosen towers computes W·x + (alpha/rank)·B·A·dropout(x)
    with A [rank, in] and B [out, rank] the only trained parameters; the base weights come from
    ``checkpoint.pretrained`` at every start (resume included) and stay frozen.
    """

    type: Literal["lora"] = "lora"
    rank: int = 16  # r: the adapters' inner width
    alpha: float = 32.0  # scaling alpha/rank of the adapter's output
    dropout: float = 0.0  # dropout on the adapter's input (training only), in [0, 1)
    # Megatron-Core's names: linear_qkv, linear_proj, linear_fc1, linear_fc2.
    target_modules: list[str] = field(default_factory=lambda: list(PEFT_TARGETS))
    towers: list[str] = field(default_factory=lambda: ["language"])  # language, vision, merger


@dataclass
class RunConfig:
    """Root of a training run's configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    peft: PeftConfig | None = None  # None: full fine-tune (of train.trainable)


# Fields that must be >= 1 (skipped when None) and >= 0.
_AT_LEAST_ONE = (
    "model.language.num_layers",
    "model.language.hidden_size",
    "model.language.ffn_hidden_size",
    "model.language.num_attention_heads",
    "model.language.num_query_groups",
    "model.language.kv_channels",
    "model.language.vocab_size",
    "model.language.max_position_embeddings",
    "model.language.make_vocab_size_divisible_by",
    "parallel.tensor_model_parallel_size",
    "parallel.pipeline_model_parallel_size",
    "parallel.virtual_pipeline_model_parallel_size",
    "parallel.context_parallel_size",
    "parallel.expert_model_parallel_size",
    "parallel.expert_tensor_parallel_size",
    "model.language.num_experts",
    "model.language.moe_ffn_hidden_size",
    "model.language.moe_router_topk",
    "scheduler.decay_iters",
    "data.seq_length",
    "train.train_iters",
    "train.micro_batch_size",
    "train.global_batch_size",
    "train.recompute.num_layers",
    "train.eval_interval",
    "train.eval_iters",
    "data.max_image_side",
    "checkpoint.save_interval",
    "checkpoint.keep_last",
    "logging.log_interval",
)
_NON_NEGATIVE = (
    "model.language.moe_aux_loss_coeff",
    "model.language.moe_z_loss_coeff",
    "optimizer.lr",
    "optimizer.min_lr",
    "optimizer.weight_decay",
    "optimizer.clip_grad",
    "scheduler.warmup_iters",
    "data.num_workers",
)
_POSITIVE = (
    "model.language.rotary_base",
    "model.language.norm_epsilon",
    "model.init_method_std",
    "optimizer.adam_eps",
)


def _get(cfg: Any, path: str) -> Any:
    return reduce(getattr, path.split("."), cfg)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: RunConfig) -> None:
    """Type-check ``cfg`` and check cross-field constraints; raise :class:`ConfigError`."""
    check_types(cfg)
    for paths, op, what in (
        (_AT_LEAST_ONE, operator.ge, ">= 1"),
        (_NON_NEGATIVE, operator.ge, ">= 0"),
        (_POSITIVE, operator.gt, "> 0"),
    ):
        bound = 1 if what == ">= 1" else 0
        for path in paths:
            value = _get(cfg, path)
            _require(value is None or op(value, bound), f"{path}={value!r} must be {what}")

    lm, p, o, t, d = cfg.model.language, cfg.parallel, cfg.optimizer, cfg.train, cfg.data
    tp, pp, vpp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.virtual_pipeline_model_parallel_size,
    )
    for name in ("adam_beta1", "adam_beta2"):
        beta = getattr(o, name)
        _require(0 <= beta < 1, f"optimizer.{name}={beta} must be in [0, 1)")
    _require(o.min_lr <= o.lr, f"optimizer.min_lr={o.min_lr} must be <= optimizer.lr={o.lr}")

    heads, groups = lm.num_attention_heads, lm.num_query_groups
    _require(
        heads % groups == 0,
        f"model.language.num_query_groups={groups} does not divide "
        f"model.language.num_attention_heads={heads}",
    )
    _require(
        lm.kv_channels is not None or lm.hidden_size % heads == 0,
        f"model.language.num_attention_heads={heads} does not divide model.language.hidden_size="
        f"{lm.hidden_size}; set model.language.kv_channels explicitly",
    )
    for what, n in (("num_attention_heads", heads), ("num_query_groups", groups)):
        _require(
            n % tp == 0,
            f"parallel.tensor_model_parallel_size={tp} does not divide model.language.{what}={n}",
        )
    if vpp is not None:
        _require(
            pp > 1,
            f"parallel.virtual_pipeline_model_parallel_size={vpp} requires "
            f"parallel.pipeline_model_parallel_size > 1 (got {pp})",
        )
    stages = pp * (vpp or 1)
    if p.num_layers_in_first_pipeline_stage is None and p.num_layers_in_last_pipeline_stage is None:
        _require(
            lm.num_layers % stages == 0,
            f"parallel.pipeline_model_parallel_size={pp}"
            + (f" x parallel.virtual_pipeline_model_parallel_size={vpp}" if vpp else "")
            + f" does not divide model.language.num_layers={lm.num_layers}",
        )
    else:
        _validate_uneven_pipeline(p, lm.num_layers, vision=cfg.model.vision is not None)
    _require(
        not p.sequence_parallel or tp > 1,
        f"parallel.sequence_parallel=true requires parallel.tensor_model_parallel_size > 1 "
        f"(got {tp})",
    )
    _require(
        not p.sequence_parallel or d.seq_length % tp == 0,
        f"data.seq_length={d.seq_length} must be divisible by "
        f"parallel.tensor_model_parallel_size={tp} when parallel.sequence_parallel=true",
    )
    cp = p.context_parallel_size
    _require(
        cp == 1 or d.seq_length % (2 * cp) == 0,
        f"data.seq_length={d.seq_length} must be divisible by 2 x "
        f"parallel.context_parallel_size={cp}",
    )

    r = t.recompute
    if r.granularity == "full" and r.method == "block":
        per_chunk = max(p.stage_layers(lm.num_layers)) // (vpp or 1)
        _require(
            r.num_layers <= per_chunk,
            f"train.recompute.num_layers={r.num_layers} exceeds the {per_chunk} language-model "
            f"layers of the largest pipeline chunk (method block recomputes the first num_layers "
            f"of each)",
        )
    if r.granularity == "selective":
        _require(bool(r.modules), "train.recompute.modules=[] recomputes nothing; set a module")

    _require(
        t.global_batch_size % t.micro_batch_size == 0,
        f"train.global_batch_size={t.global_batch_size} is not divisible by "
        f"train.micro_batch_size={t.micro_batch_size}",
    )
    if t.trainable is not None:
        _require(bool(t.trainable), "train.trainable=[] trains nothing; use null to train all")
        bad = sorted(set(t.trainable) - set(TRAINABLE_GROUPS))
        _require(
            not bad,
            f"train.trainable has unknown group(s) {bad}; allowed: {list(TRAINABLE_GROUPS)}",
        )
    bad = sorted(set(cfg.optimizer.lr_mult) - set(TRAINABLE_GROUPS))
    _require(
        not bad, f"optimizer.lr_mult has unknown group(s) {bad}; allowed: {list(TRAINABLE_GROUPS)}"
    )
    for group, mult in cfg.optimizer.lr_mult.items():
        _require(mult > 0, f"optimizer.lr_mult.{group}={mult} must be > 0")

    _require(
        d.seq_length <= lm.max_position_embeddings,
        f"data.seq_length={d.seq_length} exceeds "
        f"model.language.max_position_embeddings={lm.max_position_embeddings}",
    )
    _require(d.loader != "energon" or bool(d.path), "data.loader='energon' requires data.path")
    _validate_moe(cfg)
    if cfg.model.vision is not None:
        _validate_vision(cfg.model.vision, tp)
        _validate_image_token_ids(cfg.model.vision, lm.vocab_size)
        _validate_video_token_id(cfg.model.vision, lm.vocab_size)

    s = cfg.scheduler
    decay = s.decay_iters if s.decay_iters is not None else t.train_iters
    _require(
        s.warmup_iters <= decay,
        f"scheduler.warmup_iters={s.warmup_iters} exceeds the decay length {decay} "
        f"(scheduler.decay_iters, or train.train_iters when null)",
    )
    _reject_fields_without_effect(cfg)
    if cfg.peft is not None:
        _validate_peft(cfg, cfg.peft)


_FIRST, _LAST = (
    "parallel.num_layers_in_first_pipeline_stage",
    "parallel.num_layers_in_last_pipeline_stage",
)


def _validate_uneven_pipeline(p: ParallelConfig, num_layers: int, vision: bool) -> None:
    """An uneven split must be meaningful (PP > 1), add up to the model's layers, leave the
    middle stages an even share and, under VPP, split evenly into each stage's chunks."""
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    given = ", ".join(
        f"{name}={n}" for name, n in ((_FIRST, first), (_LAST, last)) if n is not None
    )
    _require(pp > 1, f"{given} has no effect with parallel.pipeline_model_parallel_size=1")
    _require(first is None or first >= 0, f"{_FIRST}={first} must be >= 0")
    _require(last is None or last >= 1, f"{_LAST}={last} must be >= 1 (the last stage's layers "
             f"end in the final norm before the LM head)")  # fmt: skip
    _require(
        first != 0 or vision,
        f"{_FIRST}=0 leaves the first stage only the embedding: a vision-only first stage needs "
        f"a vision tower (model.vision)",
    )
    fixed = [n for n in (first, last) if n is not None]
    middle, rest = pp - len(fixed), num_layers - sum(fixed)
    split = f"{given} with model.language.num_layers={num_layers}"
    _require(rest >= 0, f"{split}: the first and last stages alone hold {sum(fixed)} layers")
    if middle == 0:
        _require(rest == 0, f"{split} and parallel.pipeline_model_parallel_size={pp}: the "
                 f"stages hold {sum(fixed)} layers, not {num_layers}")  # fmt: skip
    else:
        _require(
            rest >= middle and rest % middle == 0,
            f"{split} leaves {rest} layers for the other {middle} pipeline stage(s): "
            f"they must split evenly, at least one each",
        )
    if vpp is not None:
        _require(
            first != 0,
            f"{_FIRST}=0 with parallel.virtual_pipeline_model_parallel_size={vpp}: the first "
            f"stage's other model chunks would hold nothing (a vision-only first stage is one "
            f"chunk; drop the virtual pipeline or give the first stage LM layers)",
        )
        for stage, n in enumerate(p.stage_layers(num_layers)):
            _require(
                n % vpp == 0,
                f"{split}: pipeline stage {stage} holds {n} layers, not divisible by "
                f"parallel.virtual_pipeline_model_parallel_size={vpp} (its model chunks)",
            )


def _reject_fields_without_effect(cfg: RunConfig) -> None:
    """Settings that the run would accept and then ignore are errors that say why."""
    s, t, d, o = cfg.scheduler, cfg.train, cfg.data, cfg.optimizer
    _require(
        s.warmup_fraction is None or s.warmup_iters == 0,
        f"scheduler.warmup_iters={s.warmup_iters} and scheduler.warmup_fraction="
        f"{s.warmup_fraction} are both set; the fraction would win: set one of them "
        f"(scheduler.warmup_fraction=null to use warmup_iters)",
    )
    if s.warmup_fraction is not None:
        _require(
            0 <= s.warmup_fraction < 1,
            f"scheduler.warmup_fraction={s.warmup_fraction} must be in [0, 1)",
        )
    if s.decay_style == "constant":
        _require(
            s.decay_iters is None,
            f"scheduler.decay_iters={s.decay_iters} has no effect with decay_style=constant",
        )
        _require(
            o.min_lr == 0.0,
            f"optimizer.min_lr={o.min_lr} has no effect with scheduler.decay_style=constant",
        )
    if cfg.model.vision is None:
        for what, groups in (
            ("train.trainable", t.trainable or []),
            ("optimizer.lr_mult", o.lr_mult),
        ):
            extra = sorted(set(groups) - {"language"})
            _require(
                not extra,
                f"{what} names {extra}, but this is a language-only model (model.vision is null)",
            )
    r = t.recompute
    if r.granularity == "none":
        _require(
            r.method == "uniform" and r.num_layers == 1,
            f"train.recompute.method/num_layers ({r.method}, {r.num_layers}) have no effect with "
            f"train.recompute.granularity=none",
        )
    if r.granularity != "selective":
        _require(
            r.modules == ["core_attn"],
            f"train.recompute.modules={r.modules} has no effect unless "
            f"train.recompute.granularity=selective",
        )
    _require(
        t.eval_interval is None or d.valid_path is not None,
        f"train.eval_interval={t.eval_interval} needs data.valid_path (an Energon dataset of "
        f"held-out samples, packed like the training data)",
    )
    _require(
        d.valid_path is None or d.loader == "energon",
        "data.valid_path needs data.loader=energon (the synthetic stream has no validation split)",
    )
    if d.loader == "synthetic":
        _require(d.path is None, f"data.path={d.path!r} has no effect with data.loader=synthetic")
        _require(
            d.num_workers == 0,
            f"data.num_workers={d.num_workers} has no effect with data.loader=synthetic",
        )


def _validate_peft(cfg: RunConfig, pe: PeftConfig) -> None:
    """LoRA settings: known names, a base to adapt, and nothing that would have no effect."""
    _require(pe.rank >= 1, f"peft.rank={pe.rank} must be >= 1")
    _require(pe.alpha > 0, f"peft.alpha={pe.alpha} must be > 0")
    _require(0 <= pe.dropout < 1, f"peft.dropout={pe.dropout} must be in [0, 1)")
    for what, names, allowed in (
        ("target_modules", pe.target_modules, PEFT_TARGETS),
        ("towers", pe.towers, PEFT_TOWERS),
    ):
        _require(bool(names), f"peft.{what}=[] adapts nothing; allowed: {list(allowed)}")
        bad = sorted(set(names) - set(allowed))
        _require(not bad, f"peft.{what} has unknown name(s) {bad}; allowed: {list(allowed)}")
        _require(len(set(names)) == len(names), f"peft.{what}={names} names one twice")
    if cfg.model.vision is None:
        extra = sorted(set(pe.towers) - {"language"})
        _require(
            not extra,
            f"peft.towers names {extra}, but this is a language-only model (model.vision is null)",
        )
    fc = {"linear_fc1", "linear_fc2"}
    _require(
        "merger" not in pe.towers or bool(fc & set(pe.target_modules)),
        f"peft.towers includes merger, but the merger has only linear_fc1/linear_fc2 and "
        f"peft.target_modules={pe.target_modules} names neither",
    )
    moe_fc = sorted(fc & set(pe.target_modules))
    _require(
        cfg.model.language.num_experts is None or "language" not in pe.towers or not moe_fc,
        f"peft.target_modules names {moe_fc}, but the language model's MLPs are experts "
        f"(model.language.num_experts={cfg.model.language.num_experts}), which take no adapters: "
        f"use peft.target_modules=[linear_qkv, linear_proj] for its attention",
    )
    t, o = cfg.train, cfg.optimizer
    _require(
        t.trainable is None,
        f"train.trainable={t.trainable} and peft are both set: with peft only the adapters "
        f"train (choose them with peft.towers); remove train.trainable, or peft for a full "
        f"fine-tune of those groups",
    )
    idle = sorted(set(o.lr_mult) - set(pe.towers))
    _require(
        not idle,
        f"optimizer.lr_mult names {idle}, which take no adapters (peft.towers={pe.towers}): "
        f"its multiplier would have no effect",
    )
    _require(
        cfg.checkpoint.pretrained is not None,
        "peft adapts a base model: set checkpoint.pretrained to its weights (loaded at every "
        "start, resume included; the LoRA checkpoint holds only the adapters)",
    )


_MOE_FIELDS = ("moe_ffn_hidden_size", "moe_router_topk", "moe_norm_topk_prob", "moe_aux_loss_coeff",
               "moe_z_loss_coeff")  # fmt: skip


def _validate_moe(cfg: RunConfig) -> None:
    """Mixture-of-experts fields: consistent, and without effect on a dense model = error."""
    lm, p = cfg.model.language, cfg.parallel
    _require(
        cfg.model.fp8 is not None or cfg.model.fp8_recipe == "delayed",
        f"model.fp8_recipe={cfg.model.fp8_recipe!r} has no effect unless model.fp8 is set",
    )
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
    if lm.num_experts is None:
        defaults = LanguageModelConfig()
        for name in _MOE_FIELDS:
            value = getattr(lm, name)
            _require(
                value == getattr(defaults, name),
                f"model.language.{name}={value!r} has no effect on a dense model "
                f"(model.language.num_experts is null)",
            )
        for name, value in (("expert_model_parallel_size", ep),
                            ("expert_tensor_parallel_size", etp)):  # fmt: skip
            _require(
                value in (None, 1),
                f"parallel.{name}={value} needs a mixture-of-experts model "
                f"(model.language.num_experts is null)",
            )
        return
    n = lm.num_experts
    _require(
        lm.moe_router_topk <= n,
        f"model.language.moe_router_topk={lm.moe_router_topk} exceeds "
        f"model.language.num_experts={n}",
    )
    _require(
        n % ep == 0,
        f"parallel.expert_model_parallel_size={ep} does not divide model.language.num_experts={n}",
    )
    _require(
        p.tensor_model_parallel_size == 1 or p.sequence_parallel,
        f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size} with a "
        f"mixture-of-experts model needs parallel.sequence_parallel=true (Megatron-Core's MoE "
        f"layer requires it under tensor parallelism)",
    )
    ffn = lm.moe_ffn_hidden_size or lm.ffn_hidden_size
    _require(
        ffn % (etp or p.tensor_model_parallel_size) == 0,
        f"parallel.expert_tensor_parallel_size={etp or p.tensor_model_parallel_size} does not "
        f"divide the expert intermediate size {ffn} (model.language.moe_ffn_hidden_size)",
    )


def _validate_vision(v: VisionModelConfig, tp: int) -> None:
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "patch_size", "in_channels", "spatial_merge_size"):  # fmt: skip
        _require(getattr(v, name) >= 1, f"model.vision.{name}={getattr(v, name)} must be >= 1")
    heads = v.num_attention_heads
    _require(
        v.hidden_size % heads == 0,
        f"model.vision.num_attention_heads={heads} does not divide "
        f"model.vision.hidden_size={v.hidden_size}",
    )
    _require(
        (v.hidden_size // heads) % 4 == 0,
        f"model.vision head dim {v.hidden_size // heads} must be divisible by 4 (2-D RoPE)",
    )
    _require(
        heads % tp == 0,
        f"parallel.tensor_model_parallel_size={tp} does not divide "
        f"model.vision.num_attention_heads={heads}",
    )


#: The VLM's image-block token id fields of ``model.vision``.
IMAGE_TOKEN_FIELDS = ("image_token_id", "vision_start_token_id", "vision_end_token_id")


def _validate_image_token_ids(v: VisionModelConfig, vocab_size: int) -> None:
    """The image-block ids must be distinct ids of the LM vocabulary."""
    for name in IMAGE_TOKEN_FIELDS:
        value = getattr(v, name)
        _require(
            0 <= value < vocab_size,
            f"model.vision.{name}={value} is outside the vocabulary: it must be in "
            f"[0, model.language.vocab_size={vocab_size})",
        )
    seen: dict[int, str] = {}
    for name in IMAGE_TOKEN_FIELDS:
        value = getattr(v, name)
        _require(
            value not in seen,
            f"model.vision.{name}={value} equals model.vision.{seen.get(value)}: the image "
            f"block's tokens must differ",
        )
        seen[value] = name


#: The Qwen tokenizer's ``<|video_pad|>`` id (data/special_tokens.py), the default video token.
DEFAULT_VIDEO_TOKEN_ID = 151656


def video_token_id_of(v: VisionModelConfig, vocab_size: int) -> int | None:
    """The VLM's ``<|video_pad|>`` id: ``model.vision.video_token_id``, or when that is None the
    default 151656 if the vocabulary holds it and no image-block id is it (None: this model has
    no video token)."""
    if v.video_token_id is not None:
        return v.video_token_id
    taken = {getattr(v, name) for name in IMAGE_TOKEN_FIELDS}
    default = DEFAULT_VIDEO_TOKEN_ID
    return default if default < vocab_size and default not in taken else None


def _validate_video_token_id(v: VisionModelConfig, vocab_size: int) -> None:
    """A set video token, like the image block's ids: inside the vocabulary, distinct from them
    (None resolves by :func:`video_token_id_of`)."""
    value = v.video_token_id
    if value is None:
        return
    _require(
        0 <= value < vocab_size,
        f"model.vision.video_token_id={value} is outside the vocabulary: it must be in "
        f"[0, model.language.vocab_size={vocab_size})",
    )
    for name in IMAGE_TOKEN_FIELDS:
        _require(
            getattr(v, name) != value,
            f"model.vision.video_token_id={value} equals model.vision.{name}: video frames "
            f"and the image block need their own tokens",
        )


def validate_world_size(cfg: RunConfig, world_size: int) -> int:
    """Check ``cfg.parallel`` and batch sizes against ``world_size``; return the DP size."""
    p, t = cfg.parallel, cfg.train
    tp, pp, cp = (
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.context_parallel_size,
    )
    _require(world_size >= 1, f"world size must be >= 1, got {world_size}")
    model_parallel = tp * pp * cp
    _require(
        world_size % model_parallel == 0,
        f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size={tp} x "
        f"parallel.pipeline_model_parallel_size={pp} x parallel.context_parallel_size={cp} "
        f"= {model_parallel}",
    )
    dp = world_size // model_parallel
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or tp
    _require(
        (tp * cp * dp) % (ep * etp) == 0,
        f"parallel.expert_model_parallel_size={ep} x expert tensor-parallel size {etp} must "
        f"divide tensor x context x data parallel = {tp} x {cp} x {dp} (world size {world_size})",
    )
    _require(
        t.global_batch_size % (t.micro_batch_size * dp) == 0,
        f"train.global_batch_size={t.global_batch_size} is not divisible by "
        f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {dp} "
        f"(world size {world_size}) = {t.micro_batch_size * dp}",
    )
    return dp


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """Load a :class:`RunConfig`: YAML (with ``base:`` chain), then overrides, then ``validate``.

    A ``path`` that does not exist names one of the configs shipped with the package
    (:func:`~lov15_megatron.config.bundled.find_config`).
    """
    cfg = load(RunConfig, find_config(path) if path is not None else None, overrides)
    validate(cfg)
    return cfg


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> RunConfig:
    """Build and validate a :class:`RunConfig` from a plain nested mapping."""
    cfg = build(RunConfig, d, "", source)
    validate(cfg)
    return cfg
