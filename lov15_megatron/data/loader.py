"""Energon train loader for VLM data: one call for training, per data-parallel rank.

``path`` is a packed dataset folder or a metadataset YAML (blends with weights, per-dataset
``subflavors: {kind: ...}``); data-parallel sharding comes from the
:class:`~megatron.energon.WorkerConfig` (``rank``/``world_size`` = DP rank/size). The loader is
energon's savable loader: ``save_state_rank()`` / ``restore_state_rank(state)`` per DP rank
(state is tied to DP size and worker count).
"""

from __future__ import annotations

from pathlib import Path

from megatron.energon import (
    SavableDataLoader,
    WorkerConfig,
    get_savable_loader,
    get_train_dataset,
)

from .image_processing import DEFAULT_IMAGE_CONFIG, ImageConfig
from .task_encoder import VLMTaskEncoder
from .tokenizer import Tokenizer


def data_parallel_worker_config(
    dp_rank: int, dp_size: int, num_workers: int, seed: int = 0
) -> WorkerConfig:
    """Worker config of one data-parallel rank (``seed`` offsets energon's shuffling)."""
    return WorkerConfig(rank=dp_rank, world_size=dp_size, num_workers=num_workers, seed_offset=seed)


def build_train_loader(
    path: str | Path,
    *,
    tokenizer: Tokenizer,
    micro_batch_size: int,
    worker_config: WorkerConfig,
    image_config: ImageConfig = DEFAULT_IMAGE_CONFIG,
    default_kind: str | None = None,
    seq_len: int | None = None,
    pad_to_multiple_of: int = 1,
    shuffle_buffer_size: int | None = 100,
    max_samples_per_sequence: int | None = 100,
) -> SavableDataLoader:
    """A savable, infinitely repeating loader of :class:`.task_encoder.VLMBatch` batches."""
    encoder = VLMTaskEncoder(
        tokenizer,
        image_config,
        default_kind=default_kind,
        seq_len=seq_len,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    dataset = get_train_dataset(
        str(path),
        worker_config=worker_config,
        batch_size=micro_batch_size,
        shuffle_buffer_size=shuffle_buffer_size,
        max_samples_per_sequence=max_samples_per_sequence,
        task_encoder=encoder,
    )
    return get_savable_loader(dataset)
