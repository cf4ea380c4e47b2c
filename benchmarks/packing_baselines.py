"""Packing baselines that ``lov15_megatron.data.packing.best_fit_decreasing`` is measured
against (``benchmarks/packing.py``, ``docs/data-packing.md``); not part of the package, since
nothing but the benchmark and its tests uses them.

- :func:`first_fit`: items in input order into the first pack with room.
- :func:`release_style`: an approximation of the release's bucket scheme
  (docs/data-reference.md §2): length buckets, greedy "seed + largest filler" rounds accepting
  packs at ≥ 96/94/92/90 % full, then a random next-fit sweep of the leftovers.

Both return packs as lists of item indices (each pack sorted by index) and raise on an item
longer than ``capacity`` (``check_lengths``, the package's rule).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

from lov15_megatron.data.packing import check_lengths


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


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit in input order (baseline)."""
    check_lengths(lengths, capacity)
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
    check_lengths(lengths, capacity)
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
