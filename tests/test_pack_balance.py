"""ViT-cost balancing (packing.balance_cost): same packs' lengths, lower spread, deterministic."""

from __future__ import annotations

import numpy as np

from lov15_megatron.data.pack_plan import vit_cost
from lov15_megatron.data.packing import (
    balance_cost,
    best_fit_decreasing,
    best_fit_decreasing_assign,
    max_over_mean,
)


def _lengths_by_pack(lengths: np.ndarray, pack_of: np.ndarray) -> list[list[int]]:
    packs: list[list[int]] = [[] for _ in range(int(pack_of.max()) + 1)]
    for length, pack in zip(lengths.tolist(), pack_of.tolist(), strict=True):
        packs[pack].append(length)
    return [sorted(pack) for pack in packs]


def test_hand_example_is_dealt_evenly():
    lengths = np.array([5, 5, 5, 5])
    balanced = balance_cost(lengths, np.array([0, 0, 1, 1]), np.array([10, 10, 0, 0]))
    assert balanced.tolist() == [1, 0, 0, 1]  # each pack: one costly, one free item


def test_array_bfd_matches_list_bfd():
    lengths = np.random.default_rng(1).integers(1, 300, size=2000)
    pack_of = best_fit_decreasing_assign(lengths, 1024)
    packs = best_fit_decreasing(lengths.tolist(), 1024)
    assert all(pack_of[index] == pack_id for pack_id, p in enumerate(packs) for index in p)


def test_balancing_keeps_every_pack_lengths_and_lowers_the_spread():
    rng = np.random.default_rng(0)
    count = 20_000
    image_tokens = np.where(rng.random(count) < 0.7, rng.integers(16, 1200, size=count), 0)
    lengths = image_tokens + rng.integers(20, 400, size=count)
    patches = 4 * image_tokens
    cost = vit_cost(patches, patches**2)
    pack_of = best_fit_decreasing_assign(lengths, 4096)
    balanced = balance_cost(lengths, pack_of, cost)
    assert _lengths_by_pack(lengths, balanced) == _lengths_by_pack(lengths, pack_of)
    assert np.array_equal(balanced, balance_cost(lengths, pack_of, cost))  # deterministic
    packs = int(pack_of.max()) + 1
    before = np.bincount(pack_of, weights=cost, minlength=packs)
    after = np.bincount(balanced, weights=cost, minlength=packs)
    assert max_over_mean(after) < 0.9 * max_over_mean(before)
    assert after.std() < before.std()
