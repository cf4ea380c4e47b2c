"""Energon loaders for VLM data, per data-parallel rank: the training loader and the validation
loader, both through the same :class:`.task_encoder.VLMTaskEncoder`.

``path`` is a packed dataset folder or a metadataset YAML (blends with weights, per-dataset
``subflavors: {kind: ...}``); data-parallel sharding comes from the
:class:`~megatron.energon.WorkerConfig` (``rank``/``world_size`` = DP rank/size). The training
loader is energon's savable loader: ``save_state_rank()`` / ``restore_state_rank(state)`` per DP
rank (state is tied to DP size and worker count). The validation loader reads its dataset once,
from the beginning, in its stored order (energon's validation mode: no shuffling, no repetition).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, Unpack

from megatron.energon import (
    SavableDataLoader,
    WorkerConfig,
    get_loader,
    get_savable_loader,
    get_train_dataset,
    get_val_dataset,
)

from .image_processing import ImageConfig
from .task_encoder import VLMTaskEncoder
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from megatron.energon.savable_loader import BasicDataLoader


def data_parallel_worker_config(
    dp_rank: int, dp_size: int, num_workers: int, seed: int = 0
) -> WorkerConfig:
    """Worker config of one data-parallel rank (``seed`` offsets energon's shuffling)."""
    return WorkerConfig(rank=dp_rank, world_size=dp_size, num_workers=num_workers, seed_offset=seed)


class EncoderOptions(TypedDict, total=False):
    """How both loaders make batches: :class:`.task_encoder.VLMTaskEncoder`'s arguments after the
    tokenizer (its defaults where left out), so that validation batches are made as training's."""

    image_config: ImageConfig
    default_kind: str | None
    seq_len: int | None
    pad_to_multiple_of: int


def build_train_loader(
    path: str | Path,
    *,
    tokenizer: Tokenizer,
    micro_batch_size: int,
    worker_config: WorkerConfig,
    shuffle_buffer_size: int | None = 100,
    max_samples_per_sequence: int | None = 100,
    **encoder: Unpack[EncoderOptions],
) -> SavableDataLoader:
    """A savable, infinitely repeating loader of :class:`.task_encoder.VLMBatch` batches."""
    dataset = get_train_dataset(
        str(path),
        worker_config=worker_config,
        batch_size=micro_batch_size,
        shuffle_buffer_size=shuffle_buffer_size,
        max_samples_per_sequence=max_samples_per_sequence,
        task_encoder=VLMTaskEncoder(tokenizer, **encoder),
    )
    return get_savable_loader(dataset)


def build_valid_loader(
    path: str | Path,
    *,
    tokenizer: Tokenizer,
    micro_batch_size: int,
    worker_config: WorkerConfig,
    **encoder: Unpack[EncoderOptions],
) -> BasicDataLoader:
    """A loader of :class:`.task_encoder.VLMBatch` batches that reads ``path`` once, in order.

    It reads the dataset's ``train`` split: the packer (``tools/pack_offline.py``) writes every
    sample there, a held-out set included.
    """
    dataset = get_val_dataset(
        str(path),
        split_part="train",
        worker_config=worker_config,
        batch_size=micro_batch_size,
        task_encoder=VLMTaskEncoder(tokenizer, **encoder),
    )
    return get_loader(dataset)
