"""LoRA adapters on Megatron-Core's own tensor-parallel linear layers, for every model family.

:func:`apply_lora` turns each targeted linear layer of a model chunk into an adapted one *in
place*: the module keeps its class (a subclass is swapped in), its name, its base parameters and
their checkpoint keys, and gains two parameters, ``lora_A`` and ``lora_B``::

    y = W·x (+ bias)  +  (alpha / rank) · B · A · dropout(x)

with x the layer's input as the base layer sees it (for Transformer Engine's fused
``TELayerNormColumnParallelLinear``: the *normed* input, returned by TE with
``return_layernorm_output``, as Megatron-Bridge's LoRA does). Every other parameter of the chunk
is frozen (``requires_grad=False``), so Megatron's DDP gives only the adapters gradient buffers
and the (distributed) optimizer holds only them; base weights stay in the configured dtype.

Tensor parallelism follows the base layer, so TP (with or without sequence parallelism) computes
the same function as one rank:

* **column-parallel base** (``linear_qkv``, ``linear_fc1``; output rows split over TP): ``A``
  ``[r, in]`` is replicated, ``B`` ``[out/tp, r]`` is split like the base's rows. ``A·x`` is
  computed on the rank's tokens; under SP those are a slice of the sequence, gathered (r wide,
  not hidden wide) before ``B``, whose backward reduce-scatters; ``A``'s gradient is then a
  partial sum over tokens and is all-reduced over TP like a sequence-parallel norm weight.
  Without SP the r-wide activation enters the TP region (backward all-reduce), as the base's
  input does.
* **row-parallel base** (``linear_proj``, ``linear_fc2``; input split over TP): ``A``
  ``[r, in/tp]`` is split like the base's columns, its partial ``A·x`` is all-reduced (or
  reduce-scattered along the sequence under SP) as the base's output is, and ``B`` ``[out, r]``
  is replicated (its gradient all-reduced over TP under SP).

Initialisation is that of ``peft``: ``A`` kaiming-uniform (a = √5, i.e. U(±1/√in)), ``B`` zero,
so the adapted model starts equal to the base. The *full* ``A`` is drawn from a generator seeded
by ``runtime.seed`` and the layer's global name (layer numbers counted over all pipeline stages)
and each rank keeps its shard: every TP/PP layout starts from the same adapters.

Checkpoints: the adapters' ``sharded_state_dict`` entries are ``<layer>.lora_A`` /
``<layer>.lora_B`` with global shapes ``[r, in]`` / ``[out, r]`` in Megatron's layout of the
base weight's rows, so a checkpoint loads at any TP size: ``linear_qkv``'s ``B`` rows follow its
per-query-group q/k/v interleave, and a gated ``linear_fc1``'s ``B`` is stored as
``[B_gate; B_up]`` with the same SwiGLU shard factory Megatron uses for the weight.

API (phase 2, the merged and PEFT exports, builds on these):

* :func:`apply_lora` (chunk, ``cfg.peft``, the family's tower prefixes, seed) → adapted names;
* :class:`LoRALinear` (``isinstance`` of every adapted layer): ``lora_A``, ``lora_B`` (local
  shards), ``lora_scaling`` (alpha/rank), ``lora_layout`` (:class:`LoRALayout`);
* :func:`lora_modules` (chunk) → ``(name, layer)`` of its adapted layers;
* :func:`is_adapter_key` (a state-dict or checkpoint key) → whether it is a ``lora_A``/``lora_B``;
* :func:`set_full_adapter` / :func:`shard_adapter`: global ``A``/``B`` → this rank's shards;
* :func:`merged_delta` (global ``A``, ``B``, scaling) → the ``ΔW = (alpha/r)·B·A`` a merged
  export adds to the base weight in Megatron's layout (rows then go through the same
  ``GroupedQKV``/``Concat`` transforms as the weight; a PEFT adapter keeps ``A`` for each of the
  fused parts and takes their rows of ``B``).
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from lov15_megatron.config import ConfigError
from lov15_megatron.config.schema import PeftConfig

ADAPTER_PARAMS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class LoRALayout:
    """How one adapted layer splits over tensor parallelism (global shapes ``[r, in]``,
    ``[out, r]``)."""

    parallel: Literal["column", "row"]
    in_features: int  # global
    out_features: int  # global
    rank: int
    tp_rank: int
    tp_size: int
    sequence_parallel: bool
    glu: bool  # a gated linear_fc1: B's global rows are [gate; up], each split over TP
    norm_in_base: bool  # TE's fused LayerNorm-linear: the adapter takes the normed input


def _te_classes() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(fused norm-column, column, row) Transformer Engine linears; empty without TE."""
    try:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )
    except ImportError:  # no Transformer Engine: only the local spec's linears exist
        return (), (), ()
    return (TELayerNormColumnParallelLinear,), (TEColumnParallelLinear,), (TERowParallelLinear,)


def _is(layer: Any, classes: tuple[type, ...]) -> bool:
    return bool(classes) and isinstance(layer, classes)


def _tp_group(layer: torch.nn.Module) -> Any:
    group = getattr(layer, "tp_group", None) or getattr(layer, "_tp_group", None)
    return group if group is not None else parallel_state.get_tensor_model_parallel_group()


def _layout(layer: Any, name: str, rank: int) -> LoRALayout:
    """The adapter layout of a target layer, or ConfigError/TypeError for one LoRA cannot wrap."""
    group = _tp_group(layer)
    tp_size, tp_rank = dist.get_world_size(group), dist.get_rank(group)
    if getattr(layer, "is_expert", False) or ".experts." in name:
        raise ConfigError(f"peft: {name} is an MoE expert's linear, which takes no adapters")
    leaf = name.rsplit(".", 1)[-1]
    glu = leaf == "linear_fc1" and bool(layer.config.gated_linear_unit)
    sp = bool(getattr(layer, "sequence_parallel", False))
    te_norm_col, te_col, te_row = _te_classes()
    if isinstance(layer, ColumnParallelLinear):
        if layer.gather_output:
            raise TypeError(f"LoRA does not wrap {name}: a column-parallel layer gathering output")
        return LoRALayout("column", layer.input_size, layer.output_size, rank, tp_rank, tp_size,
                          sp, glu, False)  # fmt: skip
    if isinstance(layer, RowParallelLinear):
        if not layer.input_is_parallel:
            raise TypeError(f"LoRA does not wrap {name}: a row-parallel layer scattering input")
        return LoRALayout("row", layer.input_size, layer.output_size, rank, tp_rank, tp_size,
                          sp, False, False)  # fmt: skip
    if _is(layer, te_norm_col + te_col):  # TE: out_features is this rank's share
        norm = _is(layer, te_norm_col)
        return LoRALayout("column", layer.in_features, layer.out_features * tp_size, rank,
                          tp_rank, tp_size, sp, glu, norm)  # fmt: skip
    if _is(layer, te_row):  # TE: in_features is this rank's share
        return LoRALayout("row", layer.in_features * tp_size, layer.out_features, rank, tp_rank,
                          tp_size, sp, False, False)  # fmt: skip
    raise TypeError(f"LoRA cannot wrap {name} of type {type(layer).__name__}")


def _rows(full: torch.Tensor, layout: LoRALayout) -> torch.Tensor:
    """This rank's rows of a column-parallel layer's global ``B`` (SwiGLU: of each half)."""
    if layout.glu:
        return torch.cat([_rows_plain(half, layout) for half in full.chunk(2, dim=0)])
    return _rows_plain(full, layout)


def _rows_plain(full: torch.Tensor, layout: LoRALayout) -> torch.Tensor:
    return full.chunk(layout.tp_size, dim=0)[layout.tp_rank]


def shard_adapter(
    a_full: torch.Tensor, b_full: torch.Tensor, layout: LoRALayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(A, B)`` of global ``A`` ``[r, in]`` and ``B`` ``[out, r]``."""
    if tuple(a_full.shape) != (layout.rank, layout.in_features) or tuple(b_full.shape) != (
        layout.out_features,
        layout.rank,
    ):
        raise ValueError(
            f"adapter shapes {tuple(a_full.shape)}, {tuple(b_full.shape)} do not match "
            f"[{layout.rank}, {layout.in_features}], [{layout.out_features}, {layout.rank}]"
        )
    if layout.parallel == "column":
        return a_full, _rows(b_full, layout)
    return a_full.chunk(layout.tp_size, dim=1)[layout.tp_rank], b_full


class LoRALinear(torch.nn.Module):
    """Mixin of every adapted layer (``type(layer).__mro__`` = this, then the base class).

    Do not instantiate: :func:`apply_lora` swaps ``LoRA<Base>`` in as the class of an existing
    layer and adds the parameters.
    """

    lora_A: torch.nn.Parameter
    lora_B: torch.nn.Parameter
    lora_scaling: float
    lora_layout: LoRALayout
    lora_dropout: torch.nn.Module

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(x, *args, **kwargs)
        normed = x
        if self.lora_layout.norm_in_base:  # TE returns (out, ln_out) or (out, bias, ln_out)
            if len(out) == 3:
                y, bias, normed = out
            else:
                (y, normed), bias = out
        else:
            y, bias = out
        return y + self.lora_delta(normed).to(y.dtype), bias

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``(alpha/r)·B·A·dropout(x)`` in the base output's layout on this rank."""
        lay, group = self.lora_layout, _tp_group(self)
        h = F.linear(self._dropout(x).to(self.lora_A.dtype), self.lora_A)
        if lay.parallel == "column":
            if lay.sequence_parallel:  # tokens split over TP: gather the r-wide activation
                h = gather_from_sequence_parallel_region(h, True, group)
            else:  # backward: sum the r-wide gradient over the ranks' rows of B
                h = copy_to_tensor_model_parallel_region(h, group)
        elif lay.sequence_parallel:
            h = reduce_scatter_to_sequence_parallel_region(h, group)
        else:
            h = reduce_from_tensor_model_parallel_region(h, group)
        return F.linear(h, self.lora_B) * self.lora_scaling

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.lora_dropout, torch.nn.Identity) or not self.training:
            return x
        lay = self.lora_layout
        if lay.tp_size > 1 and (lay.parallel == "row" or lay.sequence_parallel):
            # Input split over TP: each rank's slice gets its own mask (Megatron's TP stream).
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.lora_dropout(x)
        return self.lora_dropout(x)  # input replicated over TP: the same mask on every rank

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> dict[str, Any]:
        """The base layer's entries plus ``lora_A``/``lora_B`` split as they are over TP."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        lay = self.lora_layout
        axes = {"lora_B": 0} if lay.parallel == "column" else {"lora_A": 1}
        adapters = {name: getattr(self, name) for name in ADAPTER_PARAMS}
        sharded.update(
            make_sharded_tensors_for_checkpoint(
                adapters,
                prefix,
                axes,
                sharded_offsets,
                tp_group=_tp_group(self),
                dp_cp_group=metadata["dp_cp_group"],
            )
        )
        if lay.glu:
            key = f"{prefix}lora_B"
            singleton = metadata.get("singleton_local_shards", False)
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets, singleton)
        return sharded


_LORA_CLASSES: dict[type, type] = {}


def _lora_class(base: type) -> type:
    if base not in _LORA_CLASSES:
        _LORA_CLASSES[base] = type(f"LoRA{base.__name__}", (LoRALinear, base), {})
    return _LORA_CLASSES[base]


_LAYER_INDEX = re.compile(r"^(.*?\blayers\.)(\d+)(\..*)$")


def _global_name(chunk: torch.nn.Module, name: str) -> str:
    """``name`` with its layer index counted over all pipeline stages (``layer_number - 1``)."""
    match = _LAYER_INDEX.match(name)
    if match is None:
        return name
    layer = chunk.get_submodule(match.group(1) + match.group(2))
    number = getattr(layer, "layer_number", None)
    index = int(match.group(2)) if number is None else number - 1
    return f"{match.group(1)}{index}{match.group(3)}"


def _initial_a(global_name: str, layout: LoRALayout, seed: int) -> torch.Tensor:
    """The full ``A`` of a layer: peft's kaiming-uniform (a = √5) bound 1/√in, from a generator
    of the run seed and the layer's global name (the same whatever the layout)."""
    gen = torch.Generator().manual_seed(
        (seed * 1_000_003 + zlib.crc32(global_name.encode())) % 2**63
    )
    bound = 1.0 / math.sqrt(layout.in_features)
    return torch.empty(layout.rank, layout.in_features).uniform_(-bound, bound, generator=gen)


def _initial_b(global_name: str, layout: LoRALayout, seed: int) -> torch.Tensor:
    """The full ``B`` of a layer: zero, so that the adapted model starts as the base."""
    return torch.zeros(layout.out_features, layout.rank)


def _tower(name: str, tower_prefixes: Mapping[str, str]) -> str | None:
    """The tower whose module prefix ``name`` starts with (the longest prefix wins)."""
    best: tuple[int, str | None] = (-1, None)
    for tower, prefix in tower_prefixes.items():
        if name.startswith(prefix) and len(prefix) > best[0]:
            best = (len(prefix), tower)
    return best[1]


def apply_lora(
    chunk: torch.nn.Module, peft: PeftConfig, tower_prefixes: Mapping[str, str], seed: int
) -> list[str]:
    """Adapt ``peft.target_modules`` of ``peft.towers`` in ``chunk`` in place and freeze all
    else; returns the adapted layers' global names (layer index over all pipeline stages).

    ``tower_prefixes`` maps each tower of the model to its module-name prefix
    (``ModelFamily.tower_prefixes``). Call before wrapping in DDP and building the optimizer.
    """
    missing = sorted(set(peft.towers) - set(tower_prefixes))
    if missing:
        raise ConfigError(
            f"peft.towers names {missing}; this model's towers: {list(tower_prefixes)}"
        )
    for param in chunk.parameters():
        param.requires_grad_(False)
    adapted = []
    for name, layer in list(chunk.named_modules()):
        if name.rsplit(".", 1)[-1] not in peft.target_modules:
            continue
        if _tower(name, tower_prefixes) not in peft.towers or isinstance(layer, LoRALinear):
            continue
        layout = _layout(layer, name, peft.rank)
        global_name = _global_name(chunk, name)
        a_full = _initial_a(global_name, layout, seed)
        _wrap(layer, layout, peft, a_full, _initial_b(global_name, layout, seed))
        adapted.append(global_name)
    return adapted


def require_grad_at_block_inputs(chunk: torch.nn.Module) -> int:
    """Make the input of every Megatron-Core ``TransformerBlock`` in ``chunk`` require a
    gradient (a forward pre-hook, in training only); returns the number of blocks hooked.

    Activation recomputation runs each layer inside an autograd function whose output needs a
    gradient only if one of its *inputs* does: the adapters are parameters of the layer, not
    inputs. With the base frozen, the first layer's input (a frozen embedding's output, or the
    pixels' patch embedding) needs none, so without this the recomputed layers return outputs
    without a backward and their adapters get no gradient at all. The hook gives that input a
    gradient (one more activation gradient per block, the input's), as ``peft`` asks of
    ``transformers``' gradient checkpointing with ``enable_input_require_grads``. Inputs that
    already need one (a pipeline stage's received activations, features of a trained tower)
    are left as they are."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not (module.training and torch.is_grad_enabled()):
            return None
        if "hidden_states" in kwargs:
            x = kwargs["hidden_states"]
            if isinstance(x, torch.Tensor) and not x.requires_grad:
                kwargs = {**kwargs, "hidden_states": x.detach().requires_grad_()}
            return args, kwargs
        if args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs
        return None

    blocks = [m for m in chunk.modules() if isinstance(m, TransformerBlock)]
    for block in blocks:
        block.register_forward_pre_hook(hook, with_kwargs=True)
    return len(blocks)


def _wrap(
    layer: torch.nn.Module,
    layout: LoRALayout,
    peft: PeftConfig,
    a_full: torch.Tensor,
    b_full: torch.Tensor,
) -> None:
    weight = layer.weight
    a, b = shard_adapter(a_full, b_full, layout)
    layer.__class__ = _lora_class(type(layer))
    for name, value, split_dim in (("lora_A", a, 1), ("lora_B", b, 0)):
        param = torch.nn.Parameter(value.to(device=weight.device, dtype=weight.dtype))
        split = (layout.parallel == "row") == (name == "lora_A")  # A of row, B of column
        set_tensor_model_parallel_attributes(param, split and layout.tp_size > 1, split_dim, 1)
        # Sequence parallelism: a partial sum over this rank's tokens, all-reduced over TP by
        # finalize_model_grads (A of a column-parallel layer, B of a row-parallel one).
        param.sequence_parallel = layout.sequence_parallel and not split
        layer.register_parameter(name, param)
    layer.lora_scaling = peft.alpha / peft.rank
    layer.lora_layout = layout
    layer.lora_dropout = torch.nn.Dropout(peft.dropout) if peft.dropout else torch.nn.Identity()
    if layout.norm_in_base:  # TE's fused norm: hand the normed input out, this rank's tokens
        layer.return_layernorm_output = True
        layer.return_layernorm_output_gathered = False


def lora_modules(chunk: torch.nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(name, layer)`` of every adapted layer of a chunk (DDP-wrapped or not)."""
    module = getattr(chunk, "module", chunk)
    for name, layer in module.named_modules():
        if isinstance(layer, LoRALinear):
            yield name, layer


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict / checkpoint key names an adapter tensor."""
    return key.rsplit(".", 1)[-1] in ADAPTER_PARAMS


@torch.no_grad()
def set_full_adapter(layer: LoRALinear, a_full: torch.Tensor, b_full: torch.Tensor) -> None:
    """Put global ``A`` ``[r, in]`` and ``B`` ``[out, r]`` (Megatron's row layout) into a layer."""
    a, b = shard_adapter(a_full, b_full, layer.lora_layout)
    layer.lora_A.copy_(a)
    layer.lora_B.copy_(b)


def merged_delta(a_full: torch.Tensor, b_full: torch.Tensor, scaling: float) -> torch.Tensor:
    """``ΔW = scaling·B·A`` (fp32) of global adapters, in the base weight's Megatron layout."""
    return scaling * (b_full.float() @ a_full.float())


# ------------------------------------------------------------------ the base's fingerprint

FINGERPRINT_ELEMENTS = 8  # per tensor: the first elements of its first row


def fingerprint_tensors(values: Iterable[Any]) -> Iterator[ShardedTensor]:
    """The entries of a (flattened) sharded state dict that a base's fingerprint samples: each
    tensor's shard at the global origin, once (its main replica)."""
    for value in values:
        if not isinstance(value, ShardedTensor) or not is_main_replica(value.replica_id):
            continue
        if not any(value.global_offset) and value.data is not None:
            yield value


def fingerprint_sample(first_row: torch.Tensor, global_width: int) -> bytes:
    """What one base tensor adds to its fingerprint: the first ``FINGERPRINT_ELEMENTS`` values
    (fp32) of its first global row, given the shard that starts at the global origin."""
    count = min(FINGERPRINT_ELEMENTS, global_width)
    return first_row.reshape(-1)[:count].detach().float().cpu().numpy().tobytes()


def fingerprint_digest(samples: Mapping[str, bytes]) -> str:
    """The fingerprint of a base: every tensor's sample, hashed in checkpoint-key order (the
    same at every TP/PP/DP layout; training and the export compute it alike)."""
    digest = hashlib.sha256()
    for key in sorted(samples):
        digest.update(key.encode() + b"\0" + samples[key])
    return digest.hexdigest()
