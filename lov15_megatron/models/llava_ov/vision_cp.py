"""The vision tower split over context-parallel ranks: whole images per rank, balanced by patches.

Under context parallelism (CP) every CP rank holds the whole micro-batch's ``pixel_values`` and
``image_grid_thw`` but only its load-balanced part of the LM tokens. Instead of every rank
running the Rice ViT on every image, the images are dealt out whole (an image is one attention
segment of the tower, so it is never cut): :func:`assign_images` puts the largest image first
onto the least-loaded rank, by patch count, deterministically (every rank computes the same
assignment from the same grids, no communication). Each rank runs the tower and the merger on
its own images, and :func:`gather_image_features` all-gathers the merged features over the CP
group so that every rank can place those its ``<|image_pad|>`` tokens need
(``image_feature_index``).

Gradients: a rank's features are used by the LM slices of *all* CP ranks, so the backward of
the all-gather is a reduce-scatter (Megatron's ``gather_from_sequence_parallel_region`` with
``tensor_parallel_output_grad=True``): the owner receives the sum of every rank's gradient for
its rows. The tower's parameter gradients then hold only the owner's images on each rank, and
the DP×CP gradient reduction that Megatron already does sums them, as it summed the per-rank
partial gradients before.

Ranks may own no image (fewer images than CP ranks): they run no tower, but still take part in
the all-gather (with zero rows) and, in training, give every trainable tower parameter an exact
zero gradient through ``0·Σp`` (the caller's term), so that the reduce-scatter runs on every rank
in the backward and DDP's gradient buckets fill on every rank. ``docs/rice-vit.md``, "Context
parallelism", has the rules and the measured costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


def assign_images(patch_counts: Sequence[int], cp: int) -> list[int]:
    """The CP rank that runs each image: largest image first onto the least-loaded rank.

    Deterministic: images of equal size in their order, a tie in load goes to the lower rank.
    The heaviest rank carries at most ``max(largest image, mean load + largest image)`` patches
    (greedy list scheduling); one image larger than the rest together is alone on its rank.
    """
    if cp < 1:
        raise ValueError(f"context parallel size must be >= 1, got {cp}")
    owners = [0] * len(patch_counts)
    load = [0] * cp
    for image in sorted(range(len(patch_counts)), key=lambda i: (-patch_counts[i], i)):
        rank = min(range(cp), key=lambda r: (load[r], r))
        owners[image] = rank
        load[rank] += patch_counts[image]
    return owners


@dataclass(frozen=True)
class ImageSplit:
    """Which images (and which ``pixel_values`` rows, which merged features) each CP rank holds.

    ``grids`` are the images' ``(h, w)`` in micro-batch order, ``owners`` their ranks
    (:func:`assign_images`), ``merge`` the spatial merge size (an image gives ``h·w / merge²``
    merged features).
    """

    grids: tuple[tuple[int, int], ...]
    owners: tuple[int, ...]
    cp: int
    merge: int

    @classmethod
    def of(cls, grids: Sequence[tuple[int, int]], cp: int, merge: int) -> ImageSplit:
        owners = assign_images([h * w for h, w in grids], cp)
        return cls(tuple(grids), tuple(owners), cp, merge)

    def images_of(self, rank: int) -> list[int]:
        """The images ``rank`` runs, in micro-batch order."""
        return [i for i, owner in enumerate(self.owners) if owner == rank]

    def patches_per_rank(self) -> list[int]:
        load = [0] * self.cp
        for (h, w), owner in zip(self.grids, self.owners, strict=True):
            load[owner] += h * w
        return load

    def features_per_rank(self) -> list[int]:
        return [p // (self.merge * self.merge) for p in self.patches_per_rank()]

    def patch_rows(self, rank: int, device: torch.device) -> torch.Tensor:
        """Indices of ``rank``'s images' rows in ``pixel_values`` (images in order)."""
        starts = [0]
        for h, w in self.grids:
            starts.append(starts[-1] + h * w)
        ranges = [torch.arange(starts[i], starts[i + 1]) for i in self.images_of(rank)]
        rows = torch.cat(ranges) if ranges else torch.empty(0, dtype=torch.long)
        return rows.to(device)

    def gather_index(self, device: torch.device) -> torch.Tensor:
        """For every merged feature in micro-batch order, its row in the all-gathered tensor.

        Rank ``r``'s features sit at ``r·longest …`` (``longest`` = most features on a rank;
        shorter ranks are padded to it), its images one after another in micro-batch order.
        """
        longest = max(self.features_per_rank())
        group = self.merge * self.merge
        next_row = [r * longest for r in range(self.cp)]
        index = []
        for (h, w), owner in zip(self.grids, self.owners, strict=True):
            n = h * w // group
            index.append(torch.arange(next_row[owner], next_row[owner] + n, device=device))
            next_row[owner] += n
        return torch.cat(index)


def gather_image_features(
    local: torch.Tensor, split: ImageSplit, rank: int, group: torch.distributed.ProcessGroup
) -> torch.Tensor:
    """CP rank ``rank``'s merged features ``[n_r, h]`` → all images' ``[Σ n, h]`` in micro-batch
    order, on every CP rank. Backward: the gradients of a rank's rows summed over the CP group
    (reduce-scatter). Every CP rank must call it, also with ``n_r = 0``."""
    counts = split.features_per_rank()
    if local.shape[0] != counts[rank]:
        raise ValueError(
            f"CP rank {rank} has {local.shape[0]} merged image features, expected {counts[rank]}"
        )
    padded = F.pad(local, (0, 0, 0, max(counts) - local.shape[0]))
    gathered = gather_from_sequence_parallel_region(
        padded, tensor_parallel_output_grad=True, group=group
    )
    return gathered[split.gather_index(local.device)]
