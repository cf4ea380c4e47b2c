"""Bin-packing of sample lengths into sequences of at most ``capacity`` tokens.

- :func:`best_fit_decreasing` (ours): items by decreasing length (ties: input order), each into
  the open pack with the *least* room that still fits it (ties: oldest pack), else a new pack.
  Deterministic, O(n log C) with a segment tree over "room left" values.
  :func:`best_fit_decreasing_assign` is the same on numpy arrays (the packer's path);
  :func:`balance_cost` then evens out a per-item cost (ViT FLOPs) over the packs without
  changing any pack's lengths.

Packs are lists of item indices (each pack sorted by index); :func:`check_lengths` refuses an
item longer than ``capacity``. The baselines this packing is measured against (first-fit, an
approximation of the release's bucket scheme) are not part of the package: they live in
``benchmarks/packing_baselines.py``.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np


class _FirstAtLeast:
    """Set of integers in ``[0, size)`` with "smallest member ≥ x" in O(log size)."""

    def __init__(self, size: int) -> None:
        self.leaves = 1 << max(1, (size - 1).bit_length())
        self.tree = bytearray(2 * self.leaves)

    def set(self, index: int, present: bool) -> None:
        node = index + self.leaves
        self.tree[node] = present
        node >>= 1
        while node:
            value = self.tree[2 * node] | self.tree[2 * node + 1]
            if self.tree[node] == value:
                break
            self.tree[node] = value
            node >>= 1

    def first_at_least(self, index: int) -> int:
        tree, node = self.tree, index + self.leaves
        if tree[node]:
            return index
        while node > 1:
            if not node & 1 and tree[node + 1]:
                node += 1
                break
            node >>= 1
        else:
            return -1
        while node < self.leaves:
            node = 2 * node if tree[2 * node] else 2 * node + 1
        return node - self.leaves


def check_lengths(lengths: Sequence[int], capacity: int) -> None:
    """Raise ``ValueError`` naming the first item outside ``1..capacity`` (and on ``capacity``
    ≤ 0): every packing here, and the baselines of ``benchmarks/``, start with this check."""
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    for index, length in enumerate(lengths):
        if not 0 < length <= capacity:
            raise ValueError(f"item {index} has length {length}, outside 1..{capacity}")


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Deterministic best-fit-decreasing packing (see module docstring)."""
    check_lengths(lengths, capacity)
    pack_of = best_fit_decreasing_assign(np.asarray(lengths, dtype=np.int64), capacity)
    packs: list[list[int]] = [[] for _ in range(int(pack_of.max()) + 1 if len(pack_of) else 0)]
    for index, pack_id in enumerate(pack_of.tolist()):
        packs[pack_id].append(index)
    return packs


def best_fit_decreasing_assign(
    lengths: np.ndarray, capacity: int, chunk: int = 1 << 16
) -> np.ndarray:
    """:func:`best_fit_decreasing` as an array: ``pack_of[i]`` = pack id of item ``i`` (packs
    numbered in creation order). Memory: a few bytes per item plus one heap entry per pack."""
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    lengths = np.asarray(lengths)
    if len(lengths) and (lengths.min() <= 0 or lengths.max() > capacity):
        bad = int(np.flatnonzero((lengths <= 0) | (lengths > capacity))[0])
        raise ValueError(f"item {bad} has length {int(lengths[bad])}, outside 1..{capacity}")
    order = np.argsort(-lengths, kind="stable")  # ties: input order
    pack_of = np.empty(len(lengths), dtype=np.int32 if len(lengths) < 2**31 else np.int64)
    rooms = _FirstAtLeast(capacity + 1)
    by_room: dict[int, list[int]] = {}  # room left -> heap of pack ids
    num_packs = 0
    for start in range(0, len(order), chunk):
        items = order[start : start + chunk]
        ids = []
        for length in lengths[items].tolist():
            room = rooms.first_at_least(length)
            if room < 0:
                pack_id, new_room = num_packs, capacity - length
                num_packs += 1
            else:
                heap = by_room[room]
                pack_id = heapq.heappop(heap)
                if not heap:
                    rooms.set(room, False)
                new_room = room - length
            ids.append(pack_id)
            heap = by_room.setdefault(new_room, [])
            if not heap:
                rooms.set(new_room, True)
            heapq.heappush(heap, pack_id)
        pack_of[items] = ids
    return pack_of


def pack_members(pack_of: np.ndarray, pack_rank: np.ndarray | None = None) -> tuple:
    """``(members, offsets)``: item indices grouped by pack (in ``pack_rank`` order if given,
    else pack id order), each pack's items in index order; pack ``k`` is
    ``members[offsets[k]:offsets[k + 1]]``."""
    key = pack_of if pack_rank is None else pack_rank[pack_of]
    members = np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=int(pack_of.max()) + 1 if len(pack_of) else 0)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return members, offsets


def balance_cost(
    lengths: np.ndarray, pack_of: np.ndarray, cost: np.ndarray, passes: int = 3
) -> np.ndarray:
    """Re-deal items of equal length among the packs that hold them so that the per-pack sums
    of ``cost`` even out; every pack keeps its multiset of lengths (same fill, same count).

    For each length class (longest first; each pass over all classes), its items are taken out
    of their packs and dealt back: the costliest item into the slot whose pack has the least
    cost left (anti-sorted pairing, which minimises both the largest and the sum of squared
    pack totals for that step; a class holding several items of one pack is dealt in rounds of
    distinct packs). Deterministic (stable
    sorts, integer costs). Returns the new ``pack_of``."""
    pack_of = pack_of.copy()
    cost = np.asarray(cost, dtype=np.int64)
    totals = np.zeros(int(pack_of.max()) + 1 if len(pack_of) else 0, dtype=np.int64)
    np.add.at(totals, pack_of, cost)
    lengths = np.asarray(lengths)
    by_length = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[by_length]
    bounds = np.flatnonzero(np.diff(sorted_lengths)) + 1
    classes = [c for c in np.split(by_length, bounds) if len(c) > 1]
    classes = [c for c in classes if cost[c].min() != cost[c].max()]
    for _ in range(passes):
        for items in classes:
            for sub in _distinct_pack_rounds(items, pack_of):
                slots = pack_of[sub]
                item_cost = cost[sub]
                totals[slots] -= item_cost  # slots are distinct packs
                slots = slots[np.argsort(totals[slots], kind="stable")]  # least cost left first
                pack_of[sub[np.argsort(-item_cost, kind="stable")]] = slots
                totals[slots] += np.sort(item_cost)[::-1]
    return pack_of


def _distinct_pack_rounds(items: np.ndarray, pack_of: np.ndarray) -> list[np.ndarray]:
    """Split ``items`` so that no part holds two items of the same pack (the k-th item of each
    pack goes to part k): dealing within a part then never raises the sum of squared totals."""
    slots = pack_of[items]
    order = np.argsort(slots, kind="stable")
    sorted_slots = slots[order]
    starts = np.flatnonzero(np.r_[True, sorted_slots[1:] != sorted_slots[:-1]])
    if len(starts) == len(items):
        return [items] if len(items) > 1 else []
    rank = np.empty(len(items), dtype=np.int64)
    rank[order] = np.arange(len(items)) - np.repeat(starts, np.diff(np.r_[starts, len(items)]))
    parts = [items[rank == r] for r in range(int(rank.max()) + 1)]
    return [part for part in parts if len(part) > 1]


def max_over_mean(values: np.ndarray) -> float:
    """``max / mean`` of per-pack values (1.0 = perfectly even; 0.0 if all are zero)."""
    mean = float(np.mean(values)) if len(values) else 0.0
    return float(np.max(values)) / mean if mean > 0 else 0.0


def pack_statistics(lengths: Sequence[int], packs: Sequence[Sequence[int]], capacity: int) -> dict:
    """``samples_per_pack``, ``fill_efficiency`` and ``padding_compression``.

    Definitions: docs/data-reference.md §2.
    """
    n_raw, n_packed = sum(len(pack) for pack in packs), len(packs)
    total = sum(lengths[index] for pack in packs for index in pack)
    return pack_statistics_of(n_raw, n_packed, total, capacity)


def pack_statistics_of(n_raw: int, n_packed: int, total: int, capacity: int) -> dict:
    """:func:`pack_statistics` from counts: samples, packs, tokens."""
    padding_after = n_packed * capacity - total
    return {
        "samples_per_pack": n_raw / n_packed if n_packed else 0.0,
        "fill_efficiency": total / (n_packed * capacity) if n_packed else 0.0,
        "padding_compression": (
            (n_raw * capacity - total) / padding_after if padding_after else float("inf")
        ),
    }


def lower_bound_packs(lengths: Sequence[int], capacity: int) -> int:
    """⌈Σ l / C⌉: no packing can use fewer packs."""
    return -(-sum(lengths) // capacity)
