"""Attention for packed sequences that never builds an S×S tensor: a Megatron-Core core attention.

:class:`PackedSequenceAttention` is a drop-in ``core_attention`` submodule for Megatron-Core's
``SelfAttention`` (same constructor and ``forward`` as ``DotProductAttention`` /
``TEDotProductAttention``). It takes the layouts that Transformer Engine takes:

* **THD** (``packed_seq_params.qkv_format == "thd"``): query ``[t, heads, d]``, key/value
  ``[t, groups, d]`` for one stream of ``t`` tokens cut into segments by ``cu_seqlens``
  (``cu_seqlens_q_padded`` when set, as under context parallelism). Attention stays inside each
  segment: causal for the language model (``AttnMaskType.causal``), bidirectional for the ViT
  (any other mask type).
* **SBHD** (no ``packed_seq_params``): ``[s, b, heads, d]``, one sequence per row, causal or not;
  no explicit mask is accepted (padding after the last real token is invisible to causal
  attention, and the ViT always runs THD).

Kernels, picked per call:

* CUDA, bf16/fp16, torch with ``torch.nn.attention.varlen.varlen_attn``: PyTorch's varlen flash
  kernel over the whole stream (``context_parallel_size == 1``).
* otherwise (CPU, fp32, older torch): segments of equal length are gathered into one batch and go
  through ``scaled_dot_product_attention`` together (one call per distinct length, no Python
  loop per token). On CPU, SDPA without an explicit mask takes its flash kernel, which works in
  blocks: memory is linear in the number of tokens.

Context parallelism (``cp > 1``, THD, causal only): every CP rank holds chunks ``r`` and
``2·cp − 1 − r`` of every padded segment (the layout of
:func:`lov15_megatron.models.packed_seq.cp_partition_indices`, which is Transformer Engine's).
Keys and values are all-gathered over the CP group with Megatron's
``gather_from_sequence_parallel_region`` (its backward reduce-scatters their gradients back), and
each local query chunk ``j`` attends to the segment's key chunks ``0 … j``. The causal rule for a
chunk that sits at the end of a longer key range is applied by padding the queries in front with
zeros to a square and using SDPA's causal kernel: the padded rows' outputs are dropped, so their
gradient is exactly zero. This costs up to twice the attention FLOPs of the ideal schedule; on GPU
with Transformer Engine, TE's own CP (ring / all-to-all) is used instead.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


def varlen_compat(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor] | None:
    """A wrapper of torch's ``varlen_attn`` taking the keywords this core passes (``scale``,
    ``window_size``, ``enable_gqa``), or None when ``fn`` takes them all.

    torch 2.10 has ``is_causal`` instead of ``window_size`` (and may lack ``scale``: ours is then
    the default ``1/√d``); ``enable_gqa`` came later than ``window_size`` (pytorch#179468, April
    2026), so a GPU image's torch may lack it. The wrapper then repeats the KV heads to the
    query heads (what GQA computes) and passes causality the way ``fn`` takes it."""
    params = inspect.signature(fn).parameters
    if "enable_gqa" in params and "window_size" in params:
        return None

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
               enable_gqa=False):  # fmt: skip
        kwargs: dict[str, Any] = {}
        if "scale" in params:
            kwargs["scale"] = scale
        elif scale is not None and not math.isclose(scale, q.shape[-1] ** -0.5):
            raise ValueError(f"this torch's varlen_attn takes no scale ({scale})")
        if enable_gqa and "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif enable_gqa and k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        window = tuple(window_size)
        if "window_size" in params:
            kwargs["window_size"] = window
        elif window == (-1, 0):
            kwargs["is_causal"] = True
        elif window != (-1, -1):
            raise ValueError(f"this torch's varlen_attn takes no window_size {window}")
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    return varlen


try:  # torch >= 2.10 ships a varlen flash-attention entry point (CUDA only)
    from torch.nn.attention.varlen import varlen_attn as _torch_varlen_attn
except ImportError:  # pragma: no cover - depends on the torch build
    _torch_varlen_attn = None
#: The kernel as this core calls it (adapted where this torch's signature is older), and what
#: the adaptation does (None: torch's own).
_varlen_attn = (
    (varlen_compat(_torch_varlen_attn) or _torch_varlen_attn) if _torch_varlen_attn else None
)
VARLEN_COMPAT = (
    "torch's varlen_attn lacks enable_gqa/window_size: KV heads repeated / is_causal used"
    if _torch_varlen_attn is not None and _varlen_attn is not _torch_varlen_attn
    else None
)


def _bounds(cu_seqlens: torch.Tensor) -> list[int]:
    return [int(v) for v in cu_seqlens.tolist()]


def _expand_groups(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., groups, d]`` → ``[..., heads, d]`` (grouped-query attention)."""
    groups = x.shape[-2]
    return x if groups == heads else x.repeat_interleave(heads // groups, dim=-2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """SDPA over ``[n, L, heads, d]`` batches (keys already expanded to the query heads)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale
    )
    return out.transpose(1, 2)


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Attention inside every segment of a THD stream, ``[t, heads, d]`` in and out.

    Segments of equal length are batched into one SDPA call; the output is put back in stream
    order with one inverse permutation (autograd-friendly, no in-place writes).
    """
    heads = q.shape[1]
    bounds = _bounds(cu_seqlens)
    if bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} but the stream holds {q.shape[0]}")
    by_length: dict[int, list[int]] = defaultdict(list)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            by_length[end - start].append(start)
    pieces, order = [], []
    for length, starts in sorted(by_length.items()):
        index = torch.tensor(starts, device=q.device)[:, None] + torch.arange(
            length, device=q.device
        )  # [n, L]
        qs, ks, vs = q[index], _expand_groups(k[index], heads), _expand_groups(v[index], heads)
        pieces.append(_sdpa(qs, ks, vs, causal, scale).reshape(-1, heads, q.shape[-1]))
        order.append(index.reshape(-1))
    out = torch.cat(pieces)
    inverse = torch.empty_like(torch.cat(order))
    inverse[torch.cat(order)] = torch.arange(inverse.numel(), device=q.device)
    return out[inverse]


def context_parallel_segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_padded: torch.Tensor,
    cp_group: torch.distributed.ProcessGroup,
    *,
    scale: float,
) -> torch.Tensor:
    """Causal attention of this CP rank's query chunks against the keys they may see.

    ``q``, ``k``, ``v``: this rank's ``t / cp`` tokens (chunks ``r`` and ``2·cp − 1 − r`` of every
    segment of the padded stream described by ``cu_seqlens_padded``, whole-stream offsets).
    """
    cp, rank = cp_group.size(), cp_group.rank()
    heads, d = q.shape[1], q.shape[2]
    bounds = _bounds(cu_seqlens_padded)
    local = q.shape[0]
    if bounds[-1] != local * cp:
        raise ValueError(
            f"cu_seqlens_padded ends at {bounds[-1]}, but {cp} CP ranks hold {local} tokens each"
        )
    # [cp·local, groups, d]: rank i's tokens at rows i·local … (i+1)·local − 1.
    k_all, v_all = (
        gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=cp_group)
        for x in (k, v)
    )

    # Group (segment, held chunk j) pairs by (chunk length, j): one SDPA call per group.
    jobs: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        length = end - start
        if length == 0:
            continue
        if length % (2 * cp):
            raise ValueError(
                f"segment [{start}, {end}) of cu_seqlens_padded is not a multiple of 2·cp = "
                f"{2 * cp}"
            )
        chunk = length // (2 * cp)
        local_start = start // cp
        for slot, j in enumerate((rank, 2 * cp - 1 - rank)):
            jobs[(chunk, j)].append((local_start + slot * chunk, local_start))

    device = q.device
    pieces, order = [], []
    for (chunk, j), entries in sorted(jobs.items()):
        steps = torch.arange(chunk, device=device)
        q_index = torch.tensor([e[0] for e in entries], device=device)[:, None] + steps
        # Key chunk i of a segment lives on rank i (i < cp) or 2·cp − 1 − i, at local offset
        # 0 (first held chunk) or `chunk` (second).
        key_rows = []
        for i in range(j + 1):
            owner, slot = (i, 0) if i < cp else (2 * cp - 1 - i, 1)
            key_rows.append(owner * local + slot * chunk)
        key_rows = torch.tensor(key_rows, device=device)
        seg_local = torch.tensor([e[1] for e in entries], device=device)
        k_index = (seg_local[:, None, None] + key_rows[None, :, None] + steps).reshape(
            len(entries), -1
        )  # [n, (j+1)·chunk]
        qs = q[q_index]  # [n, chunk, heads, d]
        if j:  # queries padded in front to the causal square; those rows are dropped
            qs = torch.cat([qs.new_zeros(len(entries), j * chunk, heads, d), qs], dim=1)
        ks = _expand_groups(k_all[k_index], heads)
        vs = _expand_groups(v_all[k_index], heads)
        out = _sdpa(qs, ks, vs, True, scale)[:, j * chunk :]
        pieces.append(out.reshape(-1, heads, d))
        order.append(q_index.reshape(-1))
    out = torch.cat(pieces)
    inverse = torch.empty_like(torch.cat(order))
    inverse[torch.cat(order)] = torch.arange(inverse.numel(), device=device)
    return out[inverse]


class PackedSequenceAttention(MegatronModule):
    """Megatron-Core ``core_attention`` for packed (THD) and plain (SBHD) sequences, in PyTorch.

    Same constructor and call as Megatron's ``DotProductAttention``; attention dropout is not
    supported (the release trains without it).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention dropout {dropout} is not supported by the torch attention backend"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = pg_collection.cp
        self.layer_number = layer_number
        self.causal = attn_mask_type == AttnMaskType.causal
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by PackedSequenceAttention")
        if attention_mask is not None:
            raise ValueError(
                "PackedSequenceAttention takes no dense attention mask: describe packed "
                "sequences with packed_seq_params (THD cu_seqlens)"
            )
        causal = self.causal if attn_mask_type is None else attn_mask_type == AttnMaskType.causal
        cp = 1 if self.cp_group is None else self.cp_group.size()
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            if cp > 1:
                raise ValueError("context parallelism needs the THD layout (packed_seq_params)")
            s, b, heads, d = query.shape
            out = _sdpa(
                query.transpose(0, 1),
                _expand_groups(key, heads).transpose(0, 1),
                _expand_groups(value, heads).transpose(0, 1),
                causal,
                self.softmax_scale,
            )  # [b, s, heads, d]
            return out.transpose(0, 1).reshape(s, b, heads * d)

        p = packed_seq_params
        cu = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
        if cp > 1:
            if not causal:
                raise ValueError("context parallelism is implemented for causal attention only")
            out = context_parallel_segment_attention(
                query, key, value, cu, self.cp_group, scale=self.softmax_scale
            )
        elif self._use_varlen(query):
            out = _varlen_attn(
                query,
                key,
                value,
                cu.to(torch.int32),
                cu.to(torch.int32),
                p.max_seqlen_q,
                p.max_seqlen_kv,
                scale=self.softmax_scale,
                window_size=(-1, 0) if causal else (-1, -1),
                enable_gqa=key.shape[1] != query.shape[1],
            )
        else:
            out = segment_attention(query, key, value, cu, causal=causal, scale=self.softmax_scale)
        return out.reshape(out.shape[0], -1)

    @staticmethod
    def _use_varlen(query: torch.Tensor) -> bool:
        return (
            _varlen_attn is not None
            and query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
        )
