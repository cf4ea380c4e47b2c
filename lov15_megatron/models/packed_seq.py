"""Packed sequences: positions, THD parameters and context-parallel sharding.

Pure functions (torch only, CPU or GPU) shared by the model, the training step and the tests. The
design and a worked example are in ``docs/packed-sequences.md``.

Batch convention
================

A micro-batch holds ``b`` packed **rows** of the same length ``s`` (``input_ids``, ``labels``,
``loss_mask``, ``position_ids``: ``[b, s]``). Row ``i`` holds ``n_i ≥ 0`` sub-samples back to back
from its start, described by a per-row **cu_seqlens**: a list of ``b`` 1-D integer tensors (or
int sequences), row ``i``'s being ``[0, l₁, l₁+l₂, …, Σl]`` (``n_i + 1`` entries, strictly
increasing, last ``≤ s``). The tokens after the last sub-sample (``Σl … s``) are the row's
**padding tail**.

- A padding tail is treated as **one more segment** of the row: its positions restart at 0 and
  it attends only to itself. This is exactly what the task encoder's flattened ``cu_seqlens``
  describe (:mod:`lov15_megatron.data.task_encoder`, where each pack's padding tail is one more
  segment); :func:`row_cu_seqlens_from_flat` converts that form into this one, and
  :func:`flat_cu_seqlens` converts back. Padding never carries loss (label -100, loss mask 0);
  the data side guarantees it for tails and :func:`shard_batch_for_context_parallel` for the
  padding it adds.
- Segments of a row never attend to each other; no token is left with nothing to attend to
  (every token sees at least itself), so no softmax implementation produces NaN.

THD stream (Transformer Engine)
===============================

Megatron's THD path requires batch size 1 (``Attention`` squeezes the batch dimension of
``[t, 1, h]``), so a micro-batch with ``b > 1`` is **flattened row-major** into one stream of
``b·s`` tokens (``input_ids.view(1, -1)``). Its segment boundaries, :func:`flat_cu_seqlens`, are
every row's boundaries (tail included) shifted by ``i·s``: rows never share a segment, so the
stream computes exactly what the ``b`` rows compute separately.

Context parallelism (Transformer Engine's THD rule)
===================================================

With ``cp > 1`` every segment of the THD stream is padded at its end to a multiple of ``2·cp``
(:func:`pad_for_context_parallel`), cut into ``2·cp`` equal chunks, and CP rank ``r`` holds chunks
``r`` and ``2·cp − 1 − r`` of **every** segment, in stream order (segment by segment, chunk ``r``
before chunk ``2·cp − 1 − r``); this balances causal-attention work. This is the layout
Megatron-Core 0.16.1 builds in ``megatron.core.utils.get_thd_batch_on_this_cp_rank``: it calls
``tex.thd_get_partitioned_indices(cu_seqlens_padded, total_tokens, cp_size, cp_rank)`` and
``index_select``\\ s dimension 1 of every batch tensor with the result, passing
``cu_seqlens_q/kv`` (real lengths, no offsets) and ``cu_seqlens_q/kv_padded`` (offsets in the
padded stream), both for the **whole** stream, not per rank. Megatron's THD RoPE
(``rope_utils._get_thd_freqs_on_this_cp_rank``) slices positions with the same rule, using
``cu_seqlens_q_padded`` when set, so padding tokens get the positions that continue their
segment. :func:`cp_partition_indices` reimplements the rule with the per-token formula of TE's
``thd_partition_indices`` kernel. TE is not installed in the CPU environment, so it is verified
against a literal chunk-by-chunk reference and against Megatron's own RoPE slicing (tests), not
against TE itself.

No dense ``[b, 1, s, s]`` mask is built here: every backend takes the THD stream
(``docs/packed-sequences.md``, "What runs where"). The tests' dense reference mask, written from
the attention rule above, is ``tests/helpers.py``'s ``packed_attention_mask``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from lov15_megatron.data.special_tokens import IGNORE_INDEX, PAD_ID

#: Per-row cumulative sub-sample lengths: a 1-D integer tensor or a sequence of ints.
CuSeqlensLike = torch.Tensor | Sequence[int]

#: Fill values for the padding :func:`shard_batch_for_context_parallel` inserts, by batch key.
#: ``position_ids`` is not listed: its padding continues the positions of its segment.
DEFAULT_PAD_VALUES: Mapping[str, int | float] = {
    "input_ids": PAD_ID,
    "tokens": PAD_ID,
    "labels": IGNORE_INDEX,
    "loss_mask": 0,
}

#: Batch keys that describe the unsharded layout and are dropped by the CP shard (superseded by
#: its ``PackedSeqParams``).
_LAYOUT_KEYS = frozenset({"attention_mask", "cu_seqlens", "max_seqlen"})


# --------------------------------------------------------------------------------------------
# Per-row layout
# --------------------------------------------------------------------------------------------


def _as_int_list(cu: CuSeqlensLike, what: str) -> list[int]:
    if isinstance(cu, torch.Tensor):
        if cu.dim() != 1 or cu.is_floating_point() or cu.is_complex():
            raise ValueError(
                f"{what} must be a 1-D integer tensor, got {cu.dtype} {tuple(cu.shape)}"
            )
        return [int(v) for v in cu.tolist()]
    return [int(v) for v in cu]


def _row_segments(cu_seqlens: Sequence[CuSeqlensLike], seq_length: int) -> list[list[int]]:
    """Validated segment boundaries of every row, the padding tail appended as a segment."""
    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    if len(cu_seqlens) == 0:
        raise ValueError("cu_seqlens must hold one entry per row, got none")
    rows = []
    for i, cu in enumerate(cu_seqlens):
        bounds = _as_int_list(cu, f"cu_seqlens[{i}]")
        if not bounds or bounds[0] != 0:
            raise ValueError(f"cu_seqlens[{i}] must start at 0, got {bounds}")
        if any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"cu_seqlens[{i}] must be strictly increasing, got {bounds}")
        if bounds[-1] > seq_length:
            raise ValueError(
                f"cu_seqlens[{i}] ends at {bounds[-1]}, beyond the row length {seq_length}"
            )
        if bounds[-1] < seq_length:
            bounds = [*bounds, seq_length]
        rows.append(bounds)
    return rows


def _segment_starts(rows: list[list[int]]) -> torch.Tensor:
    """``[b, s]``: the start of the segment each token of each row belongs to."""
    starts = []
    for bounds in rows:
        cu = torch.tensor(bounds, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        starts.append(torch.repeat_interleave(cu[:-1], lengths))
    return torch.stack(starts)


def row_cu_seqlens_from_flat(
    cu_seqlens: torch.Tensor, batch_size: int, seq_length: int
) -> list[torch.Tensor]:
    """Split the boundaries of a flattened ``[b·s]`` stream into per-row ``cu_seqlens``.

    ``cu_seqlens`` is the task encoder's form (:class:`lov15_megatron.data.task_encoder.VLMBatch`):
    every row boundary ``i·s`` must be a segment boundary. Padding tails come back as ordinary
    sub-samples, which changes nothing here (a tail is a segment either way).
    """
    bounds = _as_int_list(cu_seqlens, "cu_seqlens")
    if not bounds or bounds[0] != 0 or bounds[-1] != batch_size * seq_length:
        raise ValueError(
            f"flat cu_seqlens must run from 0 to batch_size·seq_length = "
            f"{batch_size * seq_length}, got {bounds[:1]}…{bounds[-1:]}"
        )
    present = set(bounds)
    rows = []
    for i in range(batch_size):
        lo, hi = i * seq_length, (i + 1) * seq_length
        if lo not in present or hi not in present:
            raise ValueError(f"a segment crosses the boundary of row {i} (offset {lo} or {hi})")
        rows.append(torch.tensor([b - lo for b in bounds if lo <= b <= hi], dtype=torch.int32))
    return rows


def flat_cu_seqlens(cu_seqlens: Sequence[CuSeqlensLike], seq_length: int) -> torch.Tensor:
    """Segment boundaries (int32) of the micro-batch flattened row-major into ``b·s`` tokens.

    Row ``i``'s sub-samples and padding tail, shifted by ``i·s``; equal to the task encoder's
    ``cu_seqlens``.
    """
    rows = _row_segments(cu_seqlens, seq_length)
    flat = [0]
    for i, bounds in enumerate(rows):
        flat.extend(i * seq_length + b for b in bounds[1:])
    return torch.tensor(flat, dtype=torch.int32)


def position_ids_from_cu_seqlens(
    cu_seqlens: Sequence[CuSeqlensLike], seq_length: int
) -> torch.Tensor:
    """RoPE positions ``[b, s]`` (int64) restarting at 0 for every sub-sample.

    The padding tail of a row restarts at 0 too (it is one more segment), as in the task encoder
    and as Megatron's THD RoPE computes it from the flattened ``cu_seqlens``.
    """
    starts = _segment_starts(_row_segments(cu_seqlens, seq_length))
    return torch.arange(seq_length).expand_as(starts) - starts


# --------------------------------------------------------------------------------------------
# THD and context parallelism
# --------------------------------------------------------------------------------------------


def _check_cp(cp: int, cp_rank: int | None = None) -> None:
    if cp < 1:
        raise ValueError(f"context parallel size must be ≥ 1, got {cp}")
    if cp_rank is not None and not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank must be in [0, {cp}), got {cp_rank}")


def _check_flat(cu_seqlens: torch.Tensor, what: str) -> torch.Tensor:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0 or cu_seqlens.is_floating_point():
        raise ValueError(f"{what} must be a non-empty 1-D integer tensor")
    cu = cu_seqlens.to(device="cpu", dtype=torch.long)
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{what} must start at 0 and be non-decreasing, got {cu.tolist()}")
    return cu


def pad_for_context_parallel(
    cu_seqlens: torch.Tensor, cp: int, *, total_multiple_of: int = 1
) -> torch.Tensor:
    """``cu_seqlens_padded``: every segment's length rounded up to a multiple of ``2·cp``.

    Args:
        cu_seqlens: boundaries of a THD stream (1-D, from 0, non-decreasing), e.g.
            :func:`flat_cu_seqlens`.
        cp: context-parallel size.
        total_multiple_of: additionally make the padded total a multiple of this (e.g.
            ``cp·tp`` so that each rank's ``total/cp`` tokens split evenly for sequence
            parallelism); the extra ``2·cp``-sized chunks go to the last segment.

    Returns:
        int32 boundaries of the padded stream, same length as ``cu_seqlens``. Each padded segment
        starts with its real tokens; the padding follows them.
    """
    _check_cp(cp)
    if total_multiple_of < 1:
        raise ValueError(f"total_multiple_of must be ≥ 1, got {total_multiple_of}")
    cu = _check_flat(cu_seqlens, "cu_seqlens")
    unit = 2 * cp
    lengths = cu[1:] - cu[:-1]
    padded = (lengths + unit - 1) // unit * unit
    total = int(padded.sum())
    if total_multiple_of > 1:
        if padded.numel() == 0:
            raise ValueError("cannot pad an empty stream to total_multiple_of")
        while total % total_multiple_of:
            padded[-1] += unit
            total += unit
    out = torch.zeros_like(cu)
    out[1:] = torch.cumsum(padded, 0)
    return out.to(torch.int32)


def cp_partition_indices(cu_seqlens_padded: torch.Tensor, cp: int, cp_rank: int) -> torch.Tensor:
    """Indices (int64, into the padded THD stream) of the tokens CP rank ``cp_rank`` holds.

    The rule of Transformer Engine's ``thd_get_partitioned_indices`` (as called by
    ``megatron.core.utils.get_thd_batch_on_this_cp_rank``): every padded segment is cut into
    ``2·cp`` equal chunks and the rank holds chunks ``cp_rank`` and ``2·cp − 1 − cp_rank`` of
    every segment, in stream order. Computed as TE's kernel does, per output token ``t``:
    the local segment boundaries are ``cu_seqlens_padded / cp``; ``t`` in local segment ``k`` at
    offset ``j`` with half-length ``h`` maps to ``start_k + j + h·(cp_rank if j < h else
    2·cp − 2 − cp_rank)``. Every rank holds ``cu_seqlens_padded[-1] / cp`` tokens.

    Raises:
        ValueError: a segment length is not a multiple of ``2·cp`` (pad first with
            :func:`pad_for_context_parallel`), or bad ``cp``/``cp_rank``.
    """
    _check_cp(cp, cp_rank)
    cu = _check_flat(cu_seqlens_padded, "cu_seqlens_padded")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths % (2 * cp)).any()):
        raise ValueError(
            f"every segment of cu_seqlens_padded must be a multiple of 2·cp = {2 * cp}, "
            f"got lengths {lengths.tolist()}"
        )
    local_cu = cu // cp
    token = torch.arange(int(local_cu[-1]))
    seg = torch.searchsorted(local_cu, token, right=True) - 1
    offset = token - local_cu[seg]
    half = (local_cu[seg + 1] - local_cu[seg]) // 2
    chunk_shift = torch.where(offset < half, cp_rank, 2 * cp - 2 - cp_rank)
    return cu[seg] + offset + half * chunk_shift


def thd_packed_seq_params(
    cu_seqlens: Sequence[CuSeqlensLike],
    seq_length: int,
    *,
    cp: int = 1,
    total_multiple_of: int = 1,
    device: torch.device | str | None = None,
) -> PackedSeqParams:
    """``PackedSeqParams`` for Transformer Engine's THD attention over the flattened micro-batch.

    - ``cp == 1``: the stream is ``input_ids.view(1, -1)`` (``b·s`` tokens); ``cu_seqlens_q/kv``
      are :func:`flat_cu_seqlens` and the ``_padded`` variants are ``None`` (no padding between
      segments).
    - ``cp > 1``: the stream is the CP-padded one that :func:`shard_batch_for_context_parallel`
      builds and splits; ``cu_seqlens_q/kv`` are the real segment lengths (cumulative, without
      offsets) and ``cu_seqlens_q/kv_padded`` the offsets in the padded stream, both for the whole
      stream (TE and Megatron's RoPE divide by ``cp`` themselves).

    ``max_seqlen_q/kv`` are Python ints, the longest (padded, if padded) segment: Megatron builds
    the RoPE table from them and slices it with the padded lengths. ``cu_seqlens`` are int32 on
    ``device`` (TE wants them on the GPU).
    """
    _check_cp(cp)
    flat = flat_cu_seqlens(cu_seqlens, seq_length)
    if cp == 1:
        if total_multiple_of != 1:
            raise ValueError("total_multiple_of applies to cp > 1; pad the rows instead")
        return _params(flat, None, device)
    return _params(
        flat, pad_for_context_parallel(flat, cp, total_multiple_of=total_multiple_of), device
    )


def _params(
    flat: torch.Tensor, padded: torch.Tensor | None, device: torch.device | str | None
) -> PackedSeqParams:
    layout = flat if padded is None else padded
    max_seqlen = int((layout[1:] - layout[:-1]).max())
    cu = flat.to(device=device, dtype=torch.int32)
    cu_padded = None if padded is None else padded.to(device=device, dtype=torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu_padded,
        cu_seqlens_kv_padded=cu_padded,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


class ContextParallelShard(NamedTuple):
    """One CP rank's part of a packed micro-batch (:func:`shard_batch_for_context_parallel`)."""

    #: Sequence tensors as ``[1, total_padded / cp, …]``; other entries passed through.
    batch: dict[str, Any]
    #: THD parameters of the whole padded stream (identical on every CP rank).
    packed_seq_params: PackedSeqParams
    #: ``[total_padded / cp]`` int64: index of each held token in the flattened ``[b·s]`` input
    #: (row ``i``, column ``j`` → ``i·s + j``), -1 for padding added here (on the batch's
    #: device, like ``packed_seq_params``' tensors). Use it to pick, e.g.,
    #: which image features land on this rank's ``<|image_pad|>`` tokens.
    source_index: torch.Tensor


def shard_batch_for_context_parallel(
    batch: Mapping[str, Any],
    cu_seqlens: Sequence[CuSeqlensLike],
    cp: int,
    cp_rank: int,
    *,
    pad_values: Mapping[str, int | float] = DEFAULT_PAD_VALUES,
    total_multiple_of: int = 1,
) -> ContextParallelShard:
    """Flatten, pad and split a packed micro-batch for TE's THD context parallelism.

    The ``[b, s]`` rows are flattened into one THD stream (:func:`flat_cu_seqlens`: sub-samples
    and padding tails as segments), every segment is padded at its end to a multiple of ``2·cp``
    (:func:`pad_for_context_parallel`), and the tokens of rank ``cp_rank``
    (:func:`cp_partition_indices`) are selected from every sequence tensor, so each token keeps
    its label, loss mask and position. Padding added here gets ``pad_values[key]`` (token
    :data:`~lov15_megatron.data.special_tokens.PAD_ID`, label -100, loss mask 0: never loss) and
    positions that continue its segment (``last + 1, last + 2, …``), which is what Megatron's
    THD RoPE gives them.

    Args:
        batch: sequence tensors ``[b, s, …]`` under the keys of ``pad_values`` and/or
            ``position_ids`` (computed with :func:`position_ids_from_cu_seqlens` if absent);
            ``attention_mask``, ``cu_seqlens`` and ``max_seqlen`` are dropped; anything else
            (``pixel_values``, …) is passed through unchanged.
        cu_seqlens: per-row sub-sample boundaries (module docstring).
        cp, cp_rank: context-parallel size and this rank.
        pad_values: fill value per sequence key.
        total_multiple_of: see :func:`pad_for_context_parallel`.

    Returns:
        :class:`ContextParallelShard` (``batch``, ``packed_seq_params``, ``source_index``).

    Raises:
        ValueError: inconsistent shapes, no sequence tensor, or a ``[b, s]`` tensor under a key
            without a pad value.
    """
    _check_cp(cp, cp_rank)
    seq_keys = [k for k in batch if k in pad_values or k == "position_ids"]
    if not seq_keys:
        raise ValueError(
            f"batch has no sequence tensor (keys {sorted(pad_values)} or position_ids)"
        )
    b, s = (int(d) for d in batch[seq_keys[0]].shape[:2])
    if len(cu_seqlens) != b:
        raise ValueError(f"cu_seqlens has {len(cu_seqlens)} rows, the batch {b}")
    for key in seq_keys:
        if tuple(batch[key].shape[:2]) != (b, s):
            raise ValueError(
                f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected [{b}, {s}, …]"
            )

    device = batch[seq_keys[0]].device
    flat = flat_cu_seqlens(cu_seqlens, s).long()
    padded = pad_for_context_parallel(flat, cp, total_multiple_of=total_multiple_of).long()
    # For every position of the padded stream: its segment, offset in it, and source token.
    token = torch.arange(int(padded[-1]))
    seg = torch.searchsorted(padded, token, right=True) - 1
    offset = token - padded[seg]
    length = flat[seg + 1] - flat[seg]
    is_real = offset < length
    last_real = flat[seg] + length - 1  # the segment's last real token (segments are non-empty)
    source = torch.where(is_real, flat[seg] + offset, torch.full_like(token, -1))

    index = cp_partition_indices(padded, cp, cp_rank)
    held_source = source[index]
    held_real = is_real[index]
    gather = torch.where(held_real, held_source, last_real[index])

    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key in _LAYOUT_KEYS:
            continue
        if key not in seq_keys:
            if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == (b, s):
                raise ValueError(
                    f"batch[{key!r}] looks like a [b, s] sequence tensor but has no pad value; "
                    "add it to pad_values"
                )
            out[key] = value
            continue
        stream = value.reshape(b * s, *value.shape[2:])
        picked = stream[gather.to(stream.device)]
        mask = held_real.to(stream.device).view(-1, *([1] * (stream.dim() - 1)))
        if key == "position_ids":
            continuation = (offset[index] - length[index] + 1).to(stream.device)
            filler = picked + continuation.view_as(mask).to(picked.dtype)
        else:
            filler = torch.full_like(picked, pad_values[key])
        out[key] = torch.where(mask, picked, filler).unsqueeze(0)
    if "position_ids" not in out:
        positions = position_ids_from_cu_seqlens(cu_seqlens, s).reshape(-1)
        continuation = offset[index] - length[index] + 1
        out["position_ids"] = (
            torch.where(held_real, positions[gather], positions[gather] + continuation)
            .unsqueeze(0)
            .to(device)
        )
    return ContextParallelShard(out, _params(flat, padded, device), held_source.to(device))


# --------------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------------

#: Keys of a micro-batch that are ``[b, s]`` token tensors (everything else passes through).
_TOKEN_KEYS = ("input_ids", "labels", "loss_mask", "position_ids")


def image_feature_index(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """``[b, s]`` int64: for each ``<|image_pad|>`` token the index of the merged image feature it
    takes (features in sample order, row-major), -1 elsewhere."""
    is_image = input_ids == image_token_id
    order = torch.cumsum(is_image.reshape(-1).long(), 0).reshape(is_image.shape) - 1
    return torch.where(is_image, order, torch.full_like(order, -1))


def thd_model_inputs(
    batch: Mapping[str, Any],
    *,
    cp: int = 1,
    cp_rank: int = 0,
    total_multiple_of: int = 1,
    image_token_id: int | None = None,
) -> dict[str, Any]:
    """A ``[b, s]`` micro-batch as model inputs in the THD layout, this CP rank's part of it.

    ``batch`` holds ``input_ids``, ``labels``, ``loss_mask`` (and optionally ``position_ids``)
    ``[b, s]``, and for packed rows the task encoder's flat ``cu_seqlens``; without
    ``cu_seqlens`` each row is one sequence. Other entries (``pixel_values``,
    ``image_grid_thw``) pass through. The result has the token tensors as ``[1, t]`` and
    ``packed_seq_params``:

    - ``cp == 1``: the rows flattened (``t = b·s``, every sub-sample and padding tail a segment);
    - ``cp > 1``: :func:`shard_batch_for_context_parallel` (``t = padded total / cp``), and with
      ``image_token_id`` an ``image_feature_index`` ``[1, t]`` saying which merged image feature
      each of the rank's ``<|image_pad|>`` tokens takes (:func:`image_feature_index`).
    """
    _check_cp(cp, cp_rank)
    b, s = (int(d) for d in batch["input_ids"].shape)
    device = batch["input_ids"].device
    flat = batch.get("cu_seqlens")
    rows = row_cu_seqlens_from_flat(flat, b, s) if flat is not None else [[0, s] for _ in range(b)]
    rest = {k: v for k, v in batch.items() if k not in _LAYOUT_KEYS and k not in _TOKEN_KEYS}
    if cp == 1:
        if total_multiple_of != 1 and (b * s) % total_multiple_of:
            raise ValueError(
                f"the micro-batch holds {b}·{s} tokens, not a multiple of {total_multiple_of}"
            )
        out = {k: batch[k].reshape(1, -1) for k in _TOKEN_KEYS if k in batch}
        out["packed_seq_params"] = thd_packed_seq_params(rows, s, device=device)
        return {**rest, **out}
    tokens = {k: batch[k] for k in _TOKEN_KEYS if k in batch}
    pad_values = dict(DEFAULT_PAD_VALUES)
    if image_token_id is not None:
        tokens["image_feature_index"] = image_feature_index(batch["input_ids"], image_token_id)
        pad_values["image_feature_index"] = -1
    shard = shard_batch_for_context_parallel(
        tokens, rows, cp, cp_rank, pad_values=pad_values, total_multiple_of=total_multiple_of
    )
    return {**rest, **shard.batch, "packed_seq_params": shard.packed_seq_params}
