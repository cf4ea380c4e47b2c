"""Helpers shared by test modules (``tests/`` is on ``sys.path`` under pytest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONVERT = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``tools/convert_checkpoint.py`` with these arguments (one thread, repo root)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CONVERT, *args], capture_output=True, text=True, env=env, cwd=ROOT)


def ok(*args: str) -> str:
    """``cli`` that must succeed; returns its stdout."""
    out = cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


# --------------------------------------------------------------------------------------------
# Packed vision-language micro-batches in the task encoder's layout
# --------------------------------------------------------------------------------------------

IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
TEXT_VOCAB = 5000  # random text ids come from here (below every special token)


def vlm_sample(seed: int, grids: list[tuple[int, int]], text_len: int = 5) -> dict:
    """One sub-sample: text, then an image block per grid, then text; labels already shifted."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = torch.randint(0, TEXT_VOCAB, (text_len,), generator=gen).tolist()
    pixels, thw = [], []
    for h, w in grids:
        ids += [VISION_START, *([IMAGE_PAD] * (h * w // 4)), VISION_END]
        ids += torch.randint(0, TEXT_VOCAB, (3,), generator=gen).tolist()
        pixels.append(torch.randn(h * w, 588, generator=gen))
        thw.append([1, h, w])
    labels = ids[1:] + [-100]
    labels = [-100 if t in (IMAGE_PAD, VISION_START, VISION_END) else t for t in labels]
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.cat(pixels) if pixels else torch.zeros(0, 588),
        "image_grid_thw": torch.tensor(thw, dtype=torch.long).reshape(-1, 3),
    }


def pack_rows(rows: list[list[dict]], seq_len: int) -> dict:
    """Task-encoder layout: rows of sub-samples, padded to ``seq_len``, flat ``cu_seqlens``."""
    ids, labels, pixels, grids, bounds = [], [], [], [], [0]
    for r, row in enumerate(rows):
        row_ids = [t for s in row for t in s["input_ids"]]
        row_labels = [t for s in row for t in s["labels"]]
        for s in row:
            bounds.append(bounds[-1] + len(s["input_ids"]))
            pixels.append(s["pixel_values"])
            grids.append(s["image_grid_thw"])
        pad = seq_len - len(row_ids)
        assert pad >= 0
        if pad:
            bounds.append((r + 1) * seq_len)
        ids.append(row_ids + [151643] * pad)
        labels.append(row_labels + [-100] * pad)
    from lov15_megatron.models.packed_seq import (
        position_ids_from_cu_seqlens,
        row_cu_seqlens_from_flat,
    )

    cu = torch.tensor(bounds, dtype=torch.int32)
    labels_t = torch.tensor(labels)
    return {
        "input_ids": torch.tensor(ids),
        "labels": labels_t,
        "loss_mask": (labels_t != -100).float(),
        "position_ids": position_ids_from_cu_seqlens(
            row_cu_seqlens_from_flat(cu, len(rows), seq_len), seq_len
        ),
        "pixel_values": torch.cat(pixels),
        "image_grid_thw": torch.cat(grids),
        "cu_seqlens": cu,
    }
