"""Bin-packing of sample lengths into sequences of at most ``capacity`` tokens.

- :func:`best_fit_decreasing` (ours): items by decreasing length (ties: input order), each into
  the open pack with the *least* room that still fits it (ties: oldest pack), else a new pack.
  Deterministic, O(n log C) with a segment tree over "room left" values.
- :func:`first_fit`: items in input order into the first pack with room (baseline).
- :func:`release_style`: an approximation of the release's bucket scheme (data-and-stages.md §2):
  length buckets, greedy "seed + largest filler" rounds accepting packs at ≥ 96/94/92/90 % full,
  then a random next-fit sweep of the leftovers.

All return packs as lists of item indices (each pack sorted by index) and raise on an item
longer than ``capacity``.
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections.abc import Sequence


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
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    rooms = _FirstAtLeast(capacity + 1)
    by_room: dict[int, list[int]] = {}  # room left -> heap of pack ids
    packs: list[list[int]] = []
    for index in order:
        length = lengths[index]
        room = rooms.first_at_least(length)
        if room < 0:
            pack_id, new_room = len(packs), capacity - length
            packs.append([index])
        else:
            heap = by_room[room]
            pack_id = heapq.heappop(heap)
            if not heap:
                rooms.set(room, False)
            packs[pack_id].append(index)
            new_room = room - length
        heap = by_room.setdefault(new_room, [])
        if not heap:
            rooms.set(new_room, True)
        heapq.heappush(heap, pack_id)
    for pack in packs:
        pack.sort()
    return packs


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
    """``samples_per_pack``, ``fill_efficiency`` and ``padding_compression`` (spec §2)."""
    n_raw, n_packed = sum(len(pack) for pack in packs), len(packs)
    total = sum(lengths[index] for pack in packs for index in pack)
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
