"""The layout planner: per-stage FLOPs, memory per GPU and step time of a training layout.

From a run config (model shape, recipe, parallel layout) and the shape of one pack (tokens,
sub-samples, images and ViT patches per pack: the packer's ``pack_report.json``), it estimates

* the training FLOPs of each pipeline stage for one pack (``training/flops.py``'s per-part
  counts and multipliers, the trainer's HFU count: frozen parts skip their weight gradients,
  parts before everything trained their backward; recomputation included; the first stage
  carries the vision tower, the patch merger and the embedding, the last one the LM head), and
  the first/last-stage LM layer counts (``parallel.num_layers_in_{first,last}_pipeline_stage``)
  that balance them;
* the memory per GPU of every stage: weights, fp32 gradient buffers, the (distributed)
  optimizer's master weights and Adam moments, and activations with or without recomputation,
  for the micro-batches a stage holds at once under the 1F1B schedule; what a layer keeps
  follows what trains (``training/flops.backward_towers``): a tower no backward runs through
  keeps only its output, a frozen one the gradient crosses keeps no inputs of its linears;
* the step time at an assumed hardware FLOPs utilisation (HFU), pipeline bubble included.

Everything is an estimate from shapes: communication is not modelled (it is inside the assumed
HFU), nor the allocator's fragmentation or the CUDA context (``overhead_gb``). The formulas are
in ``docs/parallelism-choice.md``; ``benchmarks/plan_memory.py`` checks them against CPU runs.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from lov15_megatron.config import ConfigError, RunConfig, validate
from lov15_megatron.config.schema import validate_world_size
from lov15_megatron.training.flops import (
    ForwardFlops,
    StepCounts,
    backward_towers,
    forward_flops,
    multipliers,
    trained_towers,
)

GB = 1e9


@dataclass(frozen=True)
class PackShape:
    """One pack (micro-batch of one row) as the planner sees it; averages over a data set."""

    seq_length: int  # positions computed (packs are padded to this under pipeline parallelism)
    tokens: float  # real tokens per pack
    samples: float  # sub-samples per pack
    patches: float = 0.0  # ViT patches per pack (class tokens not included)
    images: float = 0.0  # images per pack
    loss_tokens: float | None = None  # loss positions; None: real tokens minus image tokens

    def __post_init__(self) -> None:
        for name in ("seq_length", "tokens", "samples"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"pack shape: {name}={getattr(self, name)} must be > 0")
        if self.tokens > self.seq_length:
            raise ConfigError(
                f"pack shape: {self.tokens:g} tokens per pack exceed the pack length "
                f"{self.seq_length}"
            )
        if self.loss_tokens is not None and not 0 <= self.loss_tokens <= self.seq_length:
            raise ConfigError(
                f"pack shape: loss_tokens={self.loss_tokens:g} must be in [0, {self.seq_length}]"
            )
        if self.patches < 0 or self.images < 0 or (self.patches > 0) != (self.images > 0):
            raise ConfigError(
                f"pack shape: patches={self.patches:g} and images={self.images:g} must be both "
                f"0 or both > 0"
            )

    @classmethod
    def from_report(cls, report: dict[str, Any], images_per_sample: float = 1.0) -> PackShape:
        """The mean pack of ``pack_report.json`` (``data/offline_packing.py``). The report has
        no image count: ``images_per_sample`` (1 for caption data) supplies it."""
        try:
            packs = int(report["packs"])
            patches = float(report["vision_patches_per_pack"]["mean"])
            seq, tokens = int(report["seq_len"]), float(report["tokens"]) / max(packs, 1)
            samples = float(report["samples_per_pack"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"pack report: missing or bad field {e}") from None
        if packs < 1:
            raise ConfigError("pack report: packs=0, nothing to plan from")
        images = samples * images_per_sample if patches > 0 else 0.0
        return cls(seq, tokens, samples, patches, images)

    def counts(self, merge: int = 4) -> StepCounts:
        """The pack as ``training/flops.py``'s counts (sub-samples and images of mean size)."""
        per_sample = self.tokens / self.samples
        per_image = self.patches / self.images + 1 if self.images else 0.0  # + class token
        image_tokens = self.patches / merge
        loss = self.loss_tokens if self.loss_tokens is not None else self.tokens - image_tokens
        return StepCounts(
            token_positions=self.seq_length,
            loss_positions=round(max(loss, 0.0)),
            attention_sq=round(self.samples * per_sample**2),
            patches=round(self.patches + self.images),
            vit_attention_sq=round(self.images * per_image**2),
            image_tokens=round(image_tokens),
            samples=1,
        )


@dataclass
class Hardware:
    """The GPU the plan is for."""

    memory_gb: float = 80.0
    peak_tflops: float = 312.0  # dense bf16 (A800/A100: 312, H100: 989)
    hfu: float = 0.45  # assumed hardware FLOPs utilisation (recomputation counted)
    overhead_gb: float = 5.0  # CUDA context, communication buffers, fragmentation


# ----------------------------------------------------------------------------- parameters


def lm_layer_params(cfg: RunConfig) -> tuple[int, int]:
    """(dense, expert) parameters of one language-model decoder layer."""
    lm = cfg.model.language
    d = lm.kv_channels or lm.hidden_size // lm.num_attention_heads
    h, q, kv = lm.hidden_size, lm.num_attention_heads * d, lm.num_query_groups * d
    dense = h * (q + 2 * kv) + q * h + 2 * h + (2 * d if lm.qk_layernorm else 0)
    if lm.num_experts is None:
        return dense + 3 * h * lm.ffn_hidden_size, 0
    fm = lm.moe_ffn_hidden_size or lm.ffn_hidden_size
    return dense + lm.num_experts * h, lm.num_experts * 3 * h * fm


def vision_params(cfg: RunConfig) -> tuple[int, int]:
    """(vision tower, patch merger) parameters; (0, 0) for a language-only model."""
    v = cfg.model.vision
    if v is None:
        return 0, 0
    hv, fv, m = v.hidden_size, v.ffn_hidden_size, v.spatial_merge_size**2
    layer = 4 * hv * hv + 4 * hv + 2 * hv * fv + fv + hv + 4 * hv
    tower = v.num_layers * layer + v.in_channels * v.patch_size**2 * hv + 3 * hv
    tower += hv // v.num_attention_heads // 2  # class_pos_emb
    merged, h = hv * m, cfg.model.language.hidden_size
    mid = v.merger_hidden_size or merged
    return tower, 2 * hv + merged * mid + mid + mid * h + h


def total_params(cfg: RunConfig) -> int:
    """All parameters of the model (the HF checkpoint's count)."""
    lm = cfg.model.language
    dense, experts = lm_layer_params(cfg)
    embed = lm.vocab_size * lm.hidden_size
    head = embed if lm.untie_embeddings_and_output_weights else 0
    return (
        lm.num_layers * (dense + experts) + embed + head + lm.hidden_size + sum(vision_params(cfg))
    )


# ----------------------------------------------------------------------------- per stage


@dataclass
class Stage:
    """One pipeline stage of a layout, per GPU (after TP/CP/EP splits)."""

    index: int
    lm_layers: int
    flops: float  # hardware FLOPs per pack on this GPU (training, recomputation included)
    params: float  # parameters held by this GPU
    weights_gb: float = 0.0
    grads_gb: float = 0.0
    optimizer_gb: float = 0.0
    activations_gb: float = 0.0
    in_flight: int = 1  # micro-batches whose activations the stage holds at once

    @property
    def memory_gb(self) -> float:
        return self.weights_gb + self.grads_gb + self.optimizer_gb + self.activations_gb


@dataclass
class Plan:
    """A layout's estimate: its stages, the worst GPU's memory and the step time."""

    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    vpp: int | None
    first: int | None
    last: int | None
    micro_batches: int  # per DP rank and step
    stages: list[Stage] = field(default_factory=list)
    step_seconds: float = 0.0
    memory_gb: float = 0.0  # the fullest GPU, overhead included
    fits: bool = True

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for stage, raw in zip(self.stages, out["stages"], strict=True):
            raw["memory_gb"] = stage.memory_gb
        return out


def _hardware_flops(cfg: RunConfig, fwd: ForwardFlops) -> dict[str, float]:
    """Training FLOPs by part for one pack, recomputation included: each forward part times
    ``training/flops.py``'s :func:`~lov15_megatron.training.flops.multipliers` (the trainer's
    HFU count), grouped by where the part runs: ``lm`` (decoder layers, their attention and
    adapters), ``head``, ``vit`` (tower, patch embedding, merger and their adapters)."""
    factor = multipliers(cfg, hardware=True)
    part = {k: v * getattr(factor, k) for k, v in vars(fwd).items()}
    lm = part["lm_layers"] + part["lm_attention"] + part["lm_adapters"]
    return {"lm": lm, "head": part["lm_head"], "vit": sum(part.values()) - lm - part["lm_head"]}


def _merge(cfg: RunConfig) -> int:
    return cfg.model.vision.spatial_merge_size**2 if cfg.model.vision else 4


def pack_flops(cfg: RunConfig, shape: PackShape) -> dict[str, float]:
    """Hardware FLOPs of one pack by part: ``lm`` (all decoder layers), ``head``, ``vit``
    (tower, patch embedding and merger)."""
    return _hardware_flops(cfg, forward_flops(cfg, shape.counts(_merge(cfg))))


def _split_flops(parts: dict[str, float], layers: list[int]) -> list[float]:
    total = sum(layers)
    out = [parts["lm"] * n / total for n in layers]
    out[0] += parts["vit"]
    out[-1] += parts["head"]
    return out


def stage_flops(cfg: RunConfig, shape: PackShape) -> list[float]:
    """Hardware FLOPs of each pipeline stage for one pack (whole stage, before TP/CP)."""
    layers = cfg.parallel.stage_layers(cfg.model.language.num_layers)
    return _split_flops(pack_flops(cfg, shape), layers)


def _bytes(cfg: RunConfig) -> int:
    return 2 if cfg.model.params_dtype == "bfloat16" else 4


def _adapter_bytes(cfg: RunConfig, tower: str, inputs: dict[str, tuple[float, bool]]) -> float:
    """Elements per token (in units of the weights' bytes, masks converted) that the LoRA adapters
    of one layer of ``tower`` keep: for each adapted linear its input (``inputs``: width per GPU,
    and whether a non-linear op keeps that tensor anyway) and the rank-``r`` intermediate
    ``A·x`` that ``B``'s weight gradient needs. With ``peft.dropout`` the adapter keeps its
    dropped copy and the dropout's mask (1 byte per element) instead of the base's input."""
    pe = cfg.peft
    if pe is None or tower not in pe.towers:
        return 0.0
    size, out = _bytes(cfg), 0.0
    for target in pe.target_modules:
        if target not in inputs:
            continue
        width, kept_anyway = inputs[target]
        if pe.dropout:
            out += width * (1 + 1 / size)  # dropout(x) and its bool mask
        elif not kept_anyway:
            out += width
        out += pe.rank  # A·x, B's input (not split over TP: r is tiny)
    return out


def lm_layer_activation_bytes(cfg: RunConfig, tokens: float, tp: int) -> float:
    """Bytes one LM decoder layer keeps for its backward pass (no recomputation), per GPU.

    Kept wherever a backward runs through the LM (``training/flops.backward_towers``): the two
    norm inputs, q and k before QK-norm, q/k/v into the attention core and its output (flash
    attention: no score matrix; counted as ``5·q + 3·kv``), the SwiGLU input (``2·f``). Kept
    only for a weight gradient, i.e. when the LM's base weights train: the inputs of
    ``linear_qkv`` and ``linear_fc1`` (the norm outputs, ``2·h``) and of ``linear_fc2`` (the
    SwiGLU output, ``f``); ``linear_proj``'s input is the attention core's output, kept anyway.
    A frozen LM that a gradient crosses (stage 1, LoRA's base) keeps the first group only, plus
    what its LoRA adapters keep (:func:`_adapter_bytes`); an LM no backward runs through keeps
    nothing. Under TP the parts inside attention and the MLP are split; with sequence
    parallelism all of it."""
    if "language" not in backward_towers(cfg):
        return 0.0
    lm = cfg.model.language
    d = lm.kv_channels or lm.hidden_size // lm.num_attention_heads
    h, q, kv = lm.hidden_size, lm.num_attention_heads * d, lm.num_query_groups * d
    f = lm.ffn_hidden_size
    if lm.num_experts is not None:  # each token passes through top-k experts
        f = (lm.moe_ffn_hidden_size or lm.ffn_hidden_size) * lm.moe_router_topk
    rows = tp if cfg.parallel.sequence_parallel else 1  # the h-wide parts: split under SP only
    kept = 2 * h / rows + (5 * q + 3 * kv + 2 * f) / tp
    linear = {"linear_qkv": (h / rows, False), "linear_proj": (q / tp, True),
              "linear_fc1": (h / rows, False), "linear_fc2": (f / tp, False)}  # fmt: skip
    if "language" in trained_towers(cfg)[0]:
        kept += sum(width for width, anyway in linear.values() if not anyway)
    kept += _adapter_bytes(cfg, "language", linear)
    return tokens * _bytes(cfg) * kept


def vit_layer_activation_bytes(cfg: RunConfig, patches: float, tp: int) -> float:
    """Bytes one Rice ViT layer keeps for backward (no recomputation, no SP in the ViT), by the
    rule of :func:`lm_layer_activation_bytes`: the norm inputs, the attention core's inputs and
    output (``5·hv``) and the GELU input wherever a backward runs through the ViT; the inputs
    of ``linear_qkv``, ``linear_fc1`` (the norm outputs) and ``linear_fc2`` (the GELU output)
    only when its weights train; LoRA adapters' own. Zero when no backward runs through it."""
    v = cfg.model.vision
    if v is None or "vision" not in backward_towers(cfg):
        return 0.0
    hv, fv = v.hidden_size, v.ffn_hidden_size
    kept = 2 * hv + (3 * hv + 2 * hv + fv) / tp
    linear = {"linear_qkv": (float(hv), False), "linear_proj": (hv / tp, True),
              "linear_fc1": (float(hv), False), "linear_fc2": (fv / tp, False)}  # fmt: skip
    if "vision" in trained_towers(cfg)[0]:
        kept += sum(width for width, anyway in linear.values() if not anyway)
    kept += _adapter_bytes(cfg, "vision", linear)
    return patches * _bytes(cfg) * kept


def forward_only_output_bytes(cfg: RunConfig, shape: PackShape, micro_batch: int) -> float:
    """Bytes of what the vision side hands on when no backward runs through its first towers
    (:func:`~lov15_megatron.training.flops.backward_towers`), per GPU: they keep no activations,
    only their output while the micro-batch runs: the ViT's (``patches × hv``, the merger's
    input) when the merger trains (stage 1), the merged features (``image tokens × h``) when
    neither ViT nor merger has a backward (LoRA on the LM only). 0 when the ViT runs a
    backward (its activations are counted per layer) or there is no ViT."""
    v, crossed = cfg.model.vision, backward_towers(cfg)
    if v is None or "vision" in crossed:
        return 0.0
    counts = shape.counts(_merge(cfg))
    if "merger" in crossed:
        elements = counts.patches * v.hidden_size
    else:
        elements = counts.image_tokens * cfg.model.language.hidden_size
    cp = cfg.parallel.context_parallel_size
    return elements * micro_batch / cp * _bytes(cfg)


def _stored(
    cfg: RunConfig, layers: int, per_layer: float, layer_input: float, vision: bool
) -> tuple[float, float]:
    """Activation bytes of ``layers`` layers under ``train.recompute``: (kept per micro-batch
    until its backward pass, working set of the one micro-batch in its backward pass). Full
    recomputation keeps each recomputed chunk's input; the chunk being recomputed holds its
    layers' activations only while its backward runs."""
    r = cfg.train.recompute
    if layers == 0:
        return 0.0, 0.0
    if r.granularity != "full" or (vision and not r.vision):
        return layers * per_layer, 0.0  # selective core_attn frees no flash-sized state
    n = min(r.num_layers, layers)
    if r.method == "uniform":
        return math.ceil(layers / n) * layer_input, n * per_layer
    return n * layer_input + (layers - n) * per_layer, per_layer


def _in_flight(stage: int, pp: int, vpp: int | None, micro: int) -> float:
    """Micro-batches (in units of a whole stage's layers) a stage holds at once: 1F1B keeps
    ``pp - stage`` in its warm-up; the interleaved schedule's warm-up is counted in chunks."""
    if vpp is None:
        return min(micro, pp - stage)
    chunks = min(micro * vpp, (pp - stage - 1) * 2 + (vpp - 1) * pp + 1)
    return chunks / vpp


def plan_layout(
    cfg: RunConfig, shape: PackShape, world_size: int, hardware: Hardware | None = None
) -> Plan:
    """The estimate for ``cfg.parallel`` on ``world_size`` GPUs (the config must validate)."""
    hw = hardware or Hardware()
    validate(cfg)
    dp = validate_world_size(cfg, world_size)
    p, lm, t = cfg.parallel, cfg.model.language, cfg.train
    tp, pp, cp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                      p.context_parallel_size, p.expert_model_parallel_size)  # fmt: skip
    etp, vpp = p.expert_tensor_parallel_size or tp, p.virtual_pipeline_model_parallel_size
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    mb = t.micro_batch_size
    trainable, _ = trained_towers(cfg)  # LoRA: none (the adapters' few parameters not counted)
    dense, experts = lm_layer_params(cfg)
    tower, merger = vision_params(cfg)
    embed = lm.vocab_size * lm.hidden_size
    w_bytes = _bytes(cfg)
    # Optimizer bytes per trainable parameter: fp32 master (bf16 weights only) + Adam moments.
    opt_bytes = (4 if w_bytes == 2 else 0) + (8 if cfg.optimizer.name == "adam" else 0)
    shard = dp * cp if p.use_distributed_optimizer else 1
    expert_shard = max(1, dp * cp * tp // (ep * etp)) if p.use_distributed_optimizer else 1
    parts = pack_flops(cfg, shape)
    layers = p.stage_layers(lm.num_layers)
    crossed = backward_towers(cfg)  # towers that keep activations for a backward
    # TP and CP split the work (the ViT's too: whole images are dealt out over the CP ranks,
    # balanced by patch count, models/llava_ov/vision_cp.py; the mean pack splits evenly)
    flops = [x / (tp * cp) for x in _split_flops(parts, layers)]
    tokens = shape.seq_length * mb / cp
    patches = (shape.patches + shape.images) * mb / cp
    lm_act = lm_layer_activation_bytes(cfg, tokens, tp)
    lm_input = tokens * w_bytes * lm.hidden_size / (tp if p.sequence_parallel else 1)
    vit_act = vit_layer_activation_bytes(cfg, patches, tp)
    vit_input = patches * w_bytes * (cfg.model.vision.hidden_size if cfg.model.vision else 0)
    loss_tokens = shape.counts(_merge(cfg)).loss_positions * mb / cp
    logit_bytes = (w_bytes + (4 if w_bytes == 2 else 0) + 4) * lm.vocab_size / tp
    stages = []
    for i, n in enumerate(layers):
        # (trainable?, parameters per GPU, optimizer shard) of what this stage holds
        held = [("language" in trainable, n * dense / tp, shard),
                ("language" in trainable, n * experts / (ep * etp), expert_shard)]  # fmt: skip
        kept, working = _stored(cfg, n, lm_act, lm_input, vision=False)
        if i == 0:
            held += [("language" in trainable, embed / tp, shard),
                     ("vision" in trainable, tower / tp, shard),
                     ("merger" in trainable, merger / tp, shard)]  # fmt: skip
            if cfg.model.vision is not None and "vision" in crossed:
                vit = _stored(cfg, cfg.model.vision.num_layers, vit_act, vit_input, vision=True)
                kept, working = kept + vit[0], max(working, vit[1])  # backwards run in turn
            kept += forward_only_output_bytes(cfg, shape, mb)  # ViT without a backward
        if i == pp - 1:
            head = embed if lm.untie_embeddings_and_output_weights or pp > 1 else 0
            held.append(("language" in trainable, head / tp + lm.hidden_size, shard))
        stage = Stage(i, n, flops[i] * mb, sum(x for _, x, _ in held))
        stage.weights_gb = stage.params * w_bytes / GB
        stage.grads_gb = sum(x for grad, x, _ in held if grad) * 4 / GB
        stage.optimizer_gb = sum(x / s for grad, x, s in held if grad) * opt_bytes / GB
        held_mb = _in_flight(i, pp, vpp, micro)
        stage.in_flight = math.ceil(held_mb)
        if i == pp - 1:  # logits, their fp32 copy and gradient: one micro-batch at a time
            working = max(working, loss_tokens * logit_bytes)
        stage.activations_gb = (kept * held_mb + working) / GB
        stages.append(stage)
    slowest = max(s.flops for s in stages) / (hw.peak_tflops * 1e12 * hw.hfu)
    bubble = (pp - 1) / (p.virtual_pipeline_model_parallel_size or 1)
    out = Plan(tp, pp, cp, ep, dp, p.virtual_pipeline_model_parallel_size,
               p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage,
               micro, stages)  # fmt: skip
    out.step_seconds = slowest * (micro + bubble)
    out.memory_gb = max(s.memory_gb for s in stages) + hw.overhead_gb
    out.fits = out.memory_gb <= hw.memory_gb
    return out


def with_parallel(cfg: RunConfig, **fields: Any) -> RunConfig:
    """A copy of ``cfg`` with ``parallel`` fields replaced (validated)."""
    out = copy.deepcopy(cfg)
    for name, value in fields.items():
        setattr(out.parallel, name, value)
    validate(out)
    return out


def balanced_split(cfg: RunConfig, shape: PackShape) -> tuple[int | None, int | None]:
    """``(num_layers_in_first_pipeline_stage, num_layers_in_last_pipeline_stage)`` that make
    the slowest stage fastest (ties: the fewest fields set, the first stage's preferred);
    ``(None, None)`` at PP 1 or when the even split is best. Only splits the config accepts."""
    p = cfg.parallel
    if p.pipeline_model_parallel_size == 1:
        return None, None
    L = cfg.model.language.num_layers
    parts = pack_flops(cfg, shape)
    trial = copy.deepcopy(p)
    keys = []
    for first, last in itertools.product([None, *range(L + 1)], [None, *range(1, L + 1)]):
        trial.num_layers_in_first_pipeline_stage = first
        trial.num_layers_in_last_pipeline_stage = last
        layers = trial.stage_layers(L)
        if sum(layers) != L or min(layers[1:]) < 1:
            continue
        fields = (first is not None) + (last is not None)
        keys.append((max(_split_flops(parts, layers)), fields, last is not None, first, last))
    for *_, first, last in sorted(keys, key=lambda k: k[:3]):
        try:
            with_parallel(cfg, num_layers_in_first_pipeline_stage=first,
                          num_layers_in_last_pipeline_stage=last)  # fmt: skip
        except ConfigError:
            continue
        return first, last
    raise ConfigError("no pipeline split of this layout is valid")


def candidate_layouts(
    cfg: RunConfig,
    shape: PackShape,
    world_size: int,
    hardware: Hardware | None = None,
    sizes: Iterable[int] = (1, 2, 4, 8),
) -> list[Plan]:
    """Every TP×PP×CP(×EP) layout of ``world_size`` GPUs that the config accepts, each with its
    balanced split; sorted by fit, step time, then model-parallel size."""
    moe = cfg.model.language.num_experts is not None
    plans = []
    for tp, pp, cp, ep in itertools.product(sizes, sizes, sizes, sizes if moe else (1,)):
        fields: dict[str, Any] = dict(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            context_parallel_size=cp, expert_model_parallel_size=ep,
            sequence_parallel=tp > 1, virtual_pipeline_model_parallel_size=None,
            num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None,
            expert_tensor_parallel_size=1 if ep > 1 else None,
        )  # fmt: skip
        try:
            trial = with_parallel(cfg, **fields)
            first, last = balanced_split(trial, shape)
            trial = with_parallel(trial, num_layers_in_first_pipeline_stage=first,
                                  num_layers_in_last_pipeline_stage=last)  # fmt: skip
            plans.append(plan_layout(trial, shape, world_size, hardware))
        except ConfigError:
            continue
    # TP/CP/EP communication is not modelled: among equal times, fewer model-parallel GPUs
    plans.sort(key=lambda x: (not x.fits, round(x.step_seconds, 6), x.tp * x.pp * x.cp * x.ep,
                              x.memory_gb))  # fmt: skip
    return plans


def training_days(plan: Plan, cfg: RunConfig, samples: float, shape: PackShape) -> float:
    """Days to train on ``samples`` samples at ``shape.samples`` samples per pack."""
    steps = samples / shape.samples / cfg.train.global_batch_size
    return steps * plan.step_seconds / 86400
