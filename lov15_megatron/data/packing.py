"""Bin-packing of sample lengths into sequences of at most ``capacity`` tokens.

- :func:`best_fit_decreasing` (ours): items by decreasing length (ties: input order), each into
  the open pack with the *least* room that still fits it (ties: oldest pack), else a new pack.
  Deterministic, O(n log C) with a segment tree over "room left" values.
  :func:`best_fit_decreasing_assign` is the same on numpy arrays (the packer's path);
  :func:`balance_cost` then evens out a per-item cost (ViT FLOPs) over the packs without
  changing any pack's lengths.
- :func:`first_fit`: items in input order into the first pack with room (baseline).
- :func:`release_style`: an approximation of the release's bucket scheme
  (docs/data-reference.md §2): length buckets, greedy "seed + largest filler" rounds accepting
  packs at ≥ 96/94/92/90 % full, then a random next-fit sweep of the leftovers.

All return packs as lists of item indices (each pack sorted by index) and raise on an item
longer than ``capacity``.
"""

from __future__ import annotations

import bisect
import heapq
import random
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


class _FirstWithRoom:
    """Packs' room left in a max-segment tree: first pack (lowest index) with room ≥ x."""

    def __init__(self, capacity_hint: int) -> None:
        self.leaves = 1 << max(1, (max(capacity_hint, 2) - 1).bit_length())
        self.tree = [0] * (2 * self.leaves)
        self.count = 0

    def _grow(self) -> None:
        old, old_leaves = self.tree, self.leaves
        self.leaves *= 2
        self.tree = [0] * (2 * self.leaves)
        self.tree[self.leaves : self.leaves + old_leaves] = old[old_leaves : 2 * old_leaves]
        for node in range(self.leaves - 1, 0, -1):
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])

    def append(self, room: int) -> int:
        if self.count == self.leaves:
            self._grow()
        self.count += 1
        self.update(self.count - 1, room)
        return self.count - 1

    def update(self, index: int, room: int) -> None:
        tree, node = self.tree, index + self.leaves
        tree[node] = room
        node >>= 1
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node >>= 1

    def first_with_room(self, need: int) -> int:
        tree = self.tree
        if tree[1] < need:
            return -1
        node = 1
        while node < self.leaves:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        return node - self.leaves


def _check(lengths: Sequence[int], capacity: int) -> None:
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    for index, length in enumerate(lengths):
        if not 0 < length <= capacity:
            raise ValueError(f"item {index} has length {length}, outside 1..{capacity}")


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Deterministic best-fit-decreasing packing (see module docstring)."""
    _check(lengths, capacity)
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


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit in input order (baseline)."""
    _check(lengths, capacity)
    tree = _FirstWithRoom(1024)
    rooms: list[int] = []
    packs: list[list[int]] = []
    for index, length in enumerate(lengths):
        pack_id = tree.first_with_room(length)
        if pack_id < 0:
            pack_id = tree.append(capacity)
            rooms.append(capacity)
            packs.append([])
        rooms[pack_id] -= length
        tree.update(pack_id, rooms[pack_id])
        packs[pack_id].append(index)
    return packs


def release_style(
    lengths: Sequence[int],
    capacity: int,
    thresholds: Sequence[float] = (0.96, 0.94, 0.92, 0.90),
    seed: int = 0,
) -> list[list[int]]:
    """Approximation of the release's bucket scheme (see module docstring). Drops nothing."""
    _check(lengths, capacity)
    buckets: dict[int, list[int]] = {}
    for index in sorted(range(len(lengths)), key=lambda i: (lengths[i], -i)):
        buckets.setdefault(lengths[index], []).append(index)
    available = sorted(buckets)  # distinct lengths with items left

    def take(max_length: int) -> int:
        position = bisect.bisect_right(available, max_length) - 1
        if position < 0:
            return -1
        length = available[position]
        item = buckets[length].pop()
        if not buckets[length]:
            available.pop(position)
        return item

    def give_back(item: int) -> None:
        length = lengths[item]
        if not buckets.get(length):
            buckets[length] = []
            bisect.insort(available, length)
        buckets[length].append(item)

    packs: list[list[int]] = []
    for threshold in thresholds:
        while available:
            pack, room = [], capacity
            while (item := take(room)) >= 0:
                pack.append(item)
                room -= lengths[item]
            if capacity - room >= threshold * capacity:
                packs.append(sorted(pack))
                continue
            for item in reversed(pack):
                give_back(item)
            break
    leftovers = [item for length in available for item in buckets[length]]
    random.Random(seed).shuffle(leftovers)
    pack, room = [], capacity
    for item in leftovers:
        if lengths[item] > room:
            packs.append(sorted(pack))
            pack, room = [], capacity
        pack.append(item)
        room -= lengths[item]
    if pack:
        packs.append(sorted(pack))
    return packs


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
