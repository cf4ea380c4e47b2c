"""Packed sequences: positions, masks, THD parameters and the context-parallel index logic."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from helpers import packed_attention_mask
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import attention_mask_func

from lov15_megatron.data.special_tokens import IGNORE_INDEX, PAD_ID
from lov15_megatron.models.packed_seq import (
    DEFAULT_PAD_VALUES,
    cp_partition_indices,
    flat_cu_seqlens,
    pad_for_context_parallel,
    position_ids_from_cu_seqlens,
    row_cu_seqlens_from_flat,
    shard_batch_for_context_parallel,
    thd_packed_seq_params,
)

# b=2, s=8: row 0 = two sub-samples (3, 2) + a padding tail of 3; row 1 = three (2, 2, 4).
ROWS = [torch.tensor([0, 3, 5]), torch.tensor([0, 2, 4, 8])]
S = 8


# ------------------------------------------------------------------------------------------
# Hand-checked layouts
# ------------------------------------------------------------------------------------------


def test_positions_restart_per_sub_sample_and_for_the_padding_tail() -> None:
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 0, 1, 2, 3]])
    got = position_ids_from_cu_seqlens(ROWS, S)
    assert got.dtype == torch.long
    assert torch.equal(got, expected)
    # plain int lists are accepted as well; a row with no sub-sample is all tail
    assert torch.equal(
        position_ids_from_cu_seqlens([[0], [0, 4]], 4), torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    )


def test_flat_cu_seqlens_and_back() -> None:
    flat = flat_cu_seqlens(ROWS, S)
    assert flat.dtype == torch.int32
    assert flat.tolist() == [0, 3, 5, 8, 10, 12, 16]  # tail of row 0 is the segment 5..8
    rows = row_cu_seqlens_from_flat(flat, 2, S)
    assert [r.tolist() for r in rows] == [[0, 3, 5, 8], [0, 2, 4, 8]]
    assert torch.equal(flat_cu_seqlens(rows, S), flat)
    assert torch.equal(position_ids_from_cu_seqlens(rows, S), position_ids_from_cu_seqlens(ROWS, S))
    with pytest.raises(ValueError, match="crosses the boundary of row 0"):
        row_cu_seqlens_from_flat(torch.tensor([0, 3, 10, 16]), 2, S)


def _allowed(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


def test_mask_hand_checked_causal_and_bidirectional() -> None:
    """The tests' reference mask (``helpers.packed_attention_mask``) against hand-written rows."""
    rows = [torch.tensor([0, 2, 4]), torch.tensor([0, 5])]  # row 0: (2, 2) + tail 1; row 1: (5)
    causal = packed_attention_mask(rows, 5, causal=True)
    bidir = packed_attention_mask(rows, 5, causal=False)
    assert causal.shape == (2, 1, 5, 5) and causal.dtype == torch.bool
    # True = masked out, so compare the complement with the allowed pattern
    assert torch.equal(~causal[0, 0], _allowed(["10000", "11000", "00100", "00110", "00001"]))
    assert torch.equal(~bidir[0, 0], _allowed(["11000", "11000", "00110", "00110", "00001"]))
    assert torch.equal(~causal[1, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    assert torch.equal(~bidir[1, 0], torch.ones(5, 5, dtype=torch.bool))
    # no fully masked query row anywhere
    assert bool((~causal).any(-1).all()) and bool((~bidir).any(-1).all())


@pytest.mark.parametrize(
    "rows, match",
    [
        ([[1, 3]], "start at 0"),
        ([[0, 3, 3]], "strictly increasing"),
        ([[0, 9]], "beyond the row length"),
        ([], "one entry per row"),
    ],
)
def test_bad_cu_seqlens(rows: list[list[int]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        position_ids_from_cu_seqlens(rows, S)


# ------------------------------------------------------------------------------------------
# Mask equivalence with per-sub-sample attention
# ------------------------------------------------------------------------------------------


def _segments(rows: list[torch.Tensor], s: int) -> list[list[tuple[int, int]]]:
    """(start, end) of every segment of every row, padding tail included."""
    out = []
    for cu in rows:
        b = cu.tolist() + ([s] if int(cu[-1]) < s else [])
        out.append(list(zip(b, b[1:], strict=False)))
    return out


def _megatron_local_attention(q, k, v, mask):  # [b, h, s, d], mask True = masked out
    softmax = FusedScaleMaskSoftmax(
        input_in_fp16=False,
        input_in_bf16=False,
        attn_mask_type=AttnMaskType.padding,
        scaled_masked_softmax_fusion=False,
        mask_func=attention_mask_func,
        softmax_in_fp32=True,
        scale=None,
    )
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return softmax(scores, mask) @ v


@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_equals_each_sub_sample_alone(causal: bool) -> None:
    torch.manual_seed(0)
    s, h, d = 16, 2, 8
    rows = [torch.tensor([0, 5, 9, 13]), torch.tensor([0, 1, 11])]  # tails of 3 and 5
    q, k, v = (torch.randn(2, h, s, d, dtype=torch.float64) for _ in range(3))
    mask = packed_attention_mask(rows, s, causal=causal)
    packed_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)
    packed_megatron = _megatron_local_attention(q, k, v, mask)
    assert not packed_sdpa.isnan().any()
    n_segments = 0
    for i, segments in enumerate(_segments(rows, s)):
        for a, e in segments:
            alone = F.scaled_dot_product_attention(
                q[i : i + 1, :, a:e], k[i : i + 1, :, a:e], v[i : i + 1, :, a:e], is_causal=causal
            )
            torch.testing.assert_close(packed_sdpa[i : i + 1, :, a:e], alone, rtol=0, atol=1e-12)
            torch.testing.assert_close(
                packed_megatron[i : i + 1, :, a:e], alone, rtol=0, atol=1e-12
            )
            n_segments += 1
    assert n_segments == 7


# ------------------------------------------------------------------------------------------
# THD parameters
# ------------------------------------------------------------------------------------------


def test_thd_params_without_cp_flatten_the_micro_batch() -> None:
    p = thd_packed_seq_params(ROWS, S)
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_q.tolist() == p.cu_seqlens_kv.tolist() == [0, 3, 5, 8, 10, 12, 16]
    assert p.cu_seqlens_q_padded is None and p.cu_seqlens_kv_padded is None
    assert p.max_seqlen_q == p.max_seqlen_kv == 4 and isinstance(p.max_seqlen_q, int)


def test_thd_params_with_cp_carry_the_padded_layout() -> None:
    p = thd_packed_seq_params(ROWS, S, cp=2)
    # real segment lengths 3,2,3,2,2,4 → padded to multiples of 4
    assert p.cu_seqlens_q.tolist() == [0, 3, 5, 8, 10, 12, 16]
    assert p.cu_seqlens_q_padded.tolist() == p.cu_seqlens_kv_padded.tolist()
    assert p.cu_seqlens_q_padded.tolist() == [0, 4, 8, 12, 16, 20, 24]
    assert p.cu_seqlens_q_padded.dtype == torch.int32
    assert p.max_seqlen_q == p.max_seqlen_kv == 4
    with pytest.raises(ValueError, match="cp > 1"):
        thd_packed_seq_params(ROWS, S, total_multiple_of=4)


# ------------------------------------------------------------------------------------------
# Context parallelism: padding and index logic
# ------------------------------------------------------------------------------------------


def test_pad_for_context_parallel_hand_checked() -> None:
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    assert pad_for_context_parallel(cu, 2).tolist() == [0, 8, 12]
    assert pad_for_context_parallel(cu, 1).tolist() == [0, 6, 10]
    assert pad_for_context_parallel(cu, 4).tolist() == [0, 8, 16]
    # total a multiple of cp·tp = 8: the extra chunk goes to the last segment
    assert pad_for_context_parallel(cu, 2, total_multiple_of=8).tolist() == [0, 8, 16]


def test_partition_indices_hand_checked() -> None:
    """The worked example of docs/packed-sequences.md: lengths 5 and 3 at CP=2."""
    padded = torch.tensor([0, 8, 12])
    assert cp_partition_indices(padded, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert cp_partition_indices(padded, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    assert cp_partition_indices(padded, 1, 0).tolist() == list(range(12))


def _reference_indices(cu_seqlens_padded: list[int], cp: int, rank: int) -> list[int]:
    """Brute force: cut every padded sub-sequence into 2·cp chunks, take chunks r, 2·cp−1−r."""
    held = []
    for start, end in zip(cu_seqlens_padded, cu_seqlens_padded[1:], strict=False):
        size = (end - start) // (2 * cp)
        chunks = []
        for c in range(2 * cp):
            chunks.append([start + c * size + j for j in range(size)])
        held += chunks[rank]
        held += chunks[2 * cp - 1 - rank]
    return held


def _random_cu_seqlens(rng: random.Random) -> torch.Tensor:
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(1, 7))]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


@pytest.mark.parametrize("cp", [2, 4])
def test_partition_indices_match_brute_force_on_random_layouts(cp: int) -> None:
    rng = random.Random(cp)
    for _ in range(50):
        cu = _random_cu_seqlens(rng)
        padded = pad_for_context_parallel(cu, cp)
        real, pad = (cu[1:] - cu[:-1]).tolist(), (padded[1:] - padded[:-1]).tolist()
        # smallest multiple of 2·cp that holds the segment
        assert all(
            p % (2 * cp) == 0 and r <= p < r + 2 * cp for r, p in zip(real, pad, strict=True)
        )
        total = int(padded[-1])
        per_rank = [cp_partition_indices(padded, cp, r) for r in range(cp)]
        for r, idx in enumerate(per_rank):
            assert idx.dtype == torch.long
            assert idx.tolist() == _reference_indices(padded.tolist(), cp, r)
            assert idx.numel() == total // cp
        union = torch.cat(per_rank)
        assert torch.equal(union.sort().values, torch.arange(total))  # each position exactly once


@pytest.mark.parametrize("cp", [2, 4])
def test_shard_positions_agree_with_megatron_thd_rope(cp: int) -> None:
    """Megatron's THD RoPE slices each padded sub-sequence's positions for a CP rank on its own
    (``_get_thd_freqs_on_this_cp_rank``); the positions our shard carries must be the same."""
    rng = random.Random(cp + 20)
    batch, rows = _random_batch(rng, 2, 26)
    for r in range(cp):
        shard = shard_batch_for_context_parallel(batch, rows, cp, r)
        padded = shard.packed_seq_params.cu_seqlens_q_padded.long()
        freqs = torch.arange(shard.packed_seq_params.max_seqlen_q).view(-1, 1, 1, 1)
        rope_positions = [
            _get_thd_freqs_on_this_cp_rank(r, cp, torch.empty(int(n) // cp), freqs).flatten()
            for n in padded[1:] - padded[:-1]
        ]
        assert torch.equal(shard.batch["position_ids"][0], torch.cat(rope_positions))


def test_partition_indices_errors() -> None:
    with pytest.raises(ValueError, match="multiple of 2·cp = 4"):
        cp_partition_indices(torch.tensor([0, 6]), 2, 0)
    with pytest.raises(ValueError, match="cp_rank"):
        cp_partition_indices(torch.tensor([0, 8]), 2, 2)
    with pytest.raises(ValueError, match="≥ 1"):
        pad_for_context_parallel(torch.tensor([0, 8]), 0)


# ------------------------------------------------------------------------------------------
# Context parallelism: sharding a batch
# ------------------------------------------------------------------------------------------


def _random_batch(rng: random.Random, b: int, s: int) -> tuple[dict, list[torch.Tensor]]:
    rows = []
    for _ in range(b):
        cu = [0]
        while True:
            n = rng.randint(1, 9)
            if cu[-1] + n > s - rng.randint(0, 3):
                break
            cu.append(cu[-1] + n)
        rows.append(torch.tensor(cu))
    input_ids = torch.randint(0, 1000, (b, s))
    positions = position_ids_from_cu_seqlens(rows, s)
    labels = torch.randint(0, 1000, (b, s))
    for i, cu in enumerate(rows):
        labels[i, cu[:-1]] = IGNORE_INDEX  # every sub-sample starts with a masked token
        labels[i, int(cu[-1]) :] = IGNORE_INDEX  # the padding tail
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": (labels != IGNORE_INDEX).float(),
        "position_ids": positions,
        "pixel_values": torch.randn(7, 588),
        "attention_mask": packed_attention_mask(rows, s, causal=True),
    }
    return batch, rows


@pytest.mark.parametrize("cp", [2, 4])
def test_shard_keeps_labels_positions_and_loss_with_their_tokens(cp: int) -> None:
    rng = random.Random(100 + cp)
    for _ in range(10):
        b, s = 2, rng.randint(12, 30)
        batch, rows = _random_batch(rng, b, s)
        flat = {
            k: batch[k].reshape(-1) for k in ("input_ids", "labels", "loss_mask", "position_ids")
        }
        expected_params = thd_packed_seq_params(rows, s, cp=cp)
        padded = expected_params.cu_seqlens_q_padded.long()
        total = int(padded[-1])
        stream = {k: torch.empty(total, dtype=v.dtype) for k, v in flat.items()}
        seen_sources = []
        loss_tokens = 0.0
        for r in range(cp):
            shard = shard_batch_for_context_parallel(batch, rows, cp, r)
            out = shard.batch
            assert set(out) == {"input_ids", "labels", "loss_mask", "position_ids", "pixel_values"}
            assert out["pixel_values"] is batch["pixel_values"]
            for key in flat:
                assert out[key].shape == (1, total // cp) and out[key].dtype == flat[key].dtype
            p = shard.packed_seq_params
            assert torch.equal(p.cu_seqlens_q, expected_params.cu_seqlens_q)
            assert torch.equal(p.cu_seqlens_q_padded, expected_params.cu_seqlens_q_padded)
            assert p.max_seqlen_q == expected_params.max_seqlen_q

            src = shard.source_index
            real = src >= 0
            for key in flat:  # real tokens bring their own values along
                assert torch.equal(out[key][0, real], flat[key][src[real]])
            # padding: pad token, no label, no loss
            assert bool((out["input_ids"][0, ~real] == PAD_ID).all())
            assert bool((out["labels"][0, ~real] == IGNORE_INDEX).all())
            assert bool((out["loss_mask"][0, ~real] == 0).all())
            seen_sources.append(src[real])
            loss_tokens += float(out["loss_mask"].sum())
            index = cp_partition_indices(padded, cp, r)
            for key in flat:
                stream[key][index] = out[key][0]

        # every input token is held by exactly one rank, and the loss token count is unchanged
        assert torch.equal(torch.cat(seen_sources).sort().values, torch.arange(b * s))
        assert loss_tokens == float(batch["loss_mask"].sum())
        # reassembled padded stream: each segment's tokens, then padding with continuing positions
        cu = expected_params.cu_seqlens_q.long()
        for k in range(len(cu) - 1):
            a, e, pa, pe = int(cu[k]), int(cu[k + 1]), int(padded[k]), int(padded[k + 1])
            n = e - a
            assert torch.equal(stream["input_ids"][pa : pa + n], flat["input_ids"][a:e])
            assert torch.equal(stream["labels"][pa : pa + n], flat["labels"][a:e])
            assert bool((stream["input_ids"][pa + n : pe] == PAD_ID).all())
            assert torch.equal(stream["position_ids"][pa:pe], torch.arange(pe - pa))


def test_shard_computes_positions_when_absent_and_rejects_unknown_sequence_keys() -> None:
    rng = random.Random(7)
    batch, rows = _random_batch(rng, 2, 20)
    with_pos = shard_batch_for_context_parallel(batch, rows, 2, 1).batch
    del batch["position_ids"]
    without_pos = shard_batch_for_context_parallel(batch, rows, 2, 1).batch
    assert torch.equal(with_pos["position_ids"], without_pos["position_ids"])
    batch["extra"] = torch.zeros(2, 20)
    with pytest.raises(ValueError, match="no pad value"):
        shard_batch_for_context_parallel(batch, rows, 2, 0)
    shard = shard_batch_for_context_parallel(
        batch, rows, 2, 0, pad_values={**DEFAULT_PAD_VALUES, "extra": 0}
    )
    assert set(shard.batch) >= {"extra", "labels", "position_ids"}
    with pytest.raises(ValueError, match="rows"):
        shard_batch_for_context_parallel(batch, rows[:1], 2, 0)


def test_shard_total_multiple_of_for_sequence_parallel() -> None:
    batch, rows = _random_batch(random.Random(3), 2, 18)
    cp, tp = 2, 4
    shards = [
        shard_batch_for_context_parallel(batch, rows, cp, r, total_multiple_of=cp * tp)
        for r in range(cp)
    ]
    n = shards[0].batch["input_ids"].shape[1]
    assert n % tp == 0 and all(sh.batch["input_ids"].shape[1] == n for sh in shards)
    assert int(shards[0].packed_seq_params.cu_seqlens_q_padded[-1]) == n * cp
    assert sum(float(sh.batch["loss_mask"].sum()) for sh in shards) == float(
        batch["loss_mask"].sum()
    )
