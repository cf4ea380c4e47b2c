"""The packing plan: which samples go into which pack, and which packs into which shard.

Computed once (the plan phase of ``tools/pack_offline.py``) from the sample table
(:mod:`.sample_store`) and stored as files, so that any write task can be run alone:

- ``members.npy`` (int64): sample-table rows in write order, pack after pack, each pack's
  samples in (source, record) order;
- ``pack_offsets.npy`` (int64, packs + 1): pack ``k`` is ``members[offsets[k]:offsets[k+1]]``;
- ``shard_offsets.npy`` (int64, shards + 1): shard ``s`` holds packs
  ``shard_offsets[s]:shard_offsets[s+1]``;
- ``plan.json``: counts and the report's packing statistics.

Steps: best-fit-decreasing over lengths (:func:`.packing.best_fit_decreasing_assign`);
optionally :func:`.packing.balance_cost` of the ViT cost; a seeded permutation of the pack order
(so that shards mix long and short samples); shards of contiguous packs bounded by count and
estimated bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .packing import (
    balance_cost,
    best_fit_decreasing_assign,
    max_over_mean,
    pack_members,
    pack_statistics_of,
)

PLAN_DIR = "plan"
#: Bytes added per sample to a shard's size estimate (tar headers + JSON).
SAMPLE_OVERHEAD_BYTES = 4096
#: ViT cost of one image of p patches, in units of one patch's linear FLOPs: per layer a patch
#: costs ≈ 24·d² FLOPs in the linear layers and 4·d FLOPs per attended patch, so
#: cost ∝ 6·d·p + p² with the Rice ViT width d = 1024.
VIT_COST_LINEAR = 6 * 1024


def vit_cost(patches: np.ndarray, patches_sq: np.ndarray) -> np.ndarray:
    """Per-sample ViT cost (integer): ``6·1024·Σ patches + Σ patches²``."""
    return VIT_COST_LINEAR * patches.astype(np.int64) + patches_sq.astype(np.int64)


@dataclass(frozen=True)
class Plan:
    members: np.ndarray
    pack_offsets: np.ndarray
    shard_offsets: np.ndarray
    info: dict[str, Any]

    @property
    def num_shards(self) -> int:
        return len(self.shard_offsets) - 1


def make_plan(
    table: np.ndarray,
    seq_len: int,
    seed: int,
    max_packs_per_shard: int,
    max_shard_bytes: int,
    balance_vision: bool,
    one_sample_per_pack: bool = False,
) -> Plan:
    """Pack the sample table (see the module docstring); with ``one_sample_per_pack`` every
    sample is its own pack (unpacked data, e.g. the release's stage 2)."""
    lengths = np.ascontiguousarray(table["length"])
    if one_sample_per_pack:
        if len(lengths) and lengths.max() > seq_len:
            bad = int(np.argmax(lengths))
            raise ValueError(f"item {bad} has length {int(lengths[bad])}, outside 1..{seq_len}")
        pack_of = np.arange(len(lengths), dtype=np.int64)
    else:
        pack_of = best_fit_decreasing_assign(lengths, seq_len)
    num_packs = int(pack_of.max()) + 1 if len(pack_of) else 0
    patches = np.ascontiguousarray(table["patches"])
    patches_sq = np.ascontiguousarray(table["patches_sq"])
    cost = vit_cost(patches, patches_sq)
    balance: dict[str, Any] = {
        "enabled": balance_vision,
        "cost": f"{VIT_COST_LINEAR}·Σ patches + Σ per-image patches²",
        "without": vit_cost_spread(pack_of, num_packs, cost, patches, patches_sq),
        "with": None,
    }
    if balance_vision and num_packs > 1 and not one_sample_per_pack:
        pack_of = balance_cost(lengths, pack_of, cost)
        balance["with"] = vit_cost_spread(pack_of, num_packs, cost, patches, patches_sq)
    del cost, patches_sq
    # pack at position k of the write order: the BFD pack id permutation[k]
    permutation = np.random.default_rng(seed).permutation(num_packs)
    rank = np.empty(num_packs, dtype=pack_of.dtype)
    rank[permutation] = np.arange(num_packs, dtype=pack_of.dtype)
    members, pack_offsets = pack_members(pack_of, rank)
    del rank
    bytes_by_id = np.bincount(pack_of, weights=table["image_bytes"], minlength=num_packs)
    bytes_by_id += SAMPLE_OVERHEAD_BYTES * np.bincount(pack_of, minlength=num_packs)
    pack_bytes = bytes_by_id[permutation]
    patches_per_pack = np.bincount(pack_of, weights=patches, minlength=num_packs)
    del pack_of, patches
    shard_offsets = _shard_offsets(pack_bytes.tolist(), max_packs_per_shard, max_shard_bytes)
    tokens = int(lengths.sum(dtype=np.int64))
    stats = pack_statistics_of(len(lengths), num_packs, tokens, seq_len)
    info = {
        "samples": len(lengths),
        "packs": num_packs,
        "packs_lower_bound": -(-tokens // seq_len),
        "shards": len(shard_offsets) - 1,
        "tokens": tokens,
        "samples_per_pack": stats["samples_per_pack"],
        "fill_efficiency": stats["fill_efficiency"],
        "padding_compression": (
            stats["padding_compression"] if stats["padding_compression"] != float("inf") else None
        ),
        "length_histogram": length_histogram(lengths, seq_len),
        "vision_patches_per_pack": {
            "min": int(patches_per_pack.min()) if num_packs else 0,
            "max": int(patches_per_pack.max()) if num_packs else 0,
            "mean": float(patches_per_pack.mean()) if num_packs else 0.0,
        },
        "vision_balance": balance,
    }
    return Plan(members, pack_offsets, shard_offsets, info)


def vit_cost_spread(
    pack_of: np.ndarray,
    num_packs: int,
    cost: np.ndarray,
    patches: np.ndarray,
    patches_sq: np.ndarray,
) -> dict[str, float]:
    """max/mean (and p99/mean, std/mean of the ViT cost) over packs."""
    totals = np.bincount(pack_of, weights=cost, minlength=num_packs)
    mean = float(totals.mean()) if num_packs else 0.0
    scale = 1.0 / mean if mean else 0.0
    return {
        "vit_cost_max_over_mean": round(max_over_mean(totals), 6),
        "vit_cost_p99_over_mean": round(float(np.percentile(totals, 99)) * scale, 6),
        "vit_cost_std_over_mean": round(float(totals.std()) * scale, 6),
        "patches_max_over_mean": round(
            max_over_mean(np.bincount(pack_of, weights=patches, minlength=num_packs)), 6
        ),
        "patches_sq_max_over_mean": round(
            max_over_mean(np.bincount(pack_of, weights=patches_sq, minlength=num_packs)), 6
        ),
    }


def _shard_offsets(pack_bytes: list[float], max_packs: int, max_bytes: int) -> np.ndarray:
    """Contiguous runs of packs, each ≤ ``max_packs`` packs and ≤ ``max_bytes`` (estimated;
    a single larger pack gets a shard of its own)."""
    offsets = [0]
    count, size = 0, 0.0
    for index, pack_size in enumerate(pack_bytes):
        if count and (count >= max_packs or size + pack_size > max_bytes):
            offsets.append(index)
            count, size = 0, 0.0
        count += 1
        size += pack_size
    if count:
        offsets.append(len(pack_bytes))
    return np.asarray(offsets, dtype=np.int64)


def length_histogram(lengths: np.ndarray, seq_len: int, bins: int = 16) -> dict[str, list[int]]:
    width = max(1, -(-seq_len // bins))
    edges = list(range(0, seq_len + width, width))[: bins + 1]
    edges[-1] = max(edges[-1], seq_len)
    count = len(edges) - 1
    which = np.minimum((np.asarray(lengths, dtype=np.int64) - 1) // width, count - 1)
    return {"bin_edges": edges, "counts": np.bincount(which, minlength=count).tolist()}


def save_plan(plan: Plan, directory: Path) -> None:
    """Write the plan files into ``directory`` (via a temp folder renamed when complete)."""
    temp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    for name, array in (
        ("members", plan.members),
        ("pack_offsets", plan.pack_offsets),
        ("shard_offsets", plan.shard_offsets),
    ):
        with open(temp / f"{name}.npy", "wb") as stream:
            np.save(stream, array.astype(np.int64, copy=False))
            stream.flush()
            os.fsync(stream.fileno())
    (temp / "plan.json").write_text(json.dumps(plan.info, indent=2, sort_keys=True))
    os.replace(temp, directory)


def load_plan(directory: Path) -> Plan:
    return Plan(
        np.load(directory / "members.npy", mmap_mode="r"),
        np.load(directory / "pack_offsets.npy", mmap_mode="r"),
        np.load(directory / "shard_offsets.npy"),
        json.loads((directory / "plan.json").read_text()),
    )
