"""The training data stream of one rank, with a state that checkpoints save and restore.

* ``data.loader: synthetic`` — the learnable token stream of :mod:`.synthetic` (language model);
  its state is the next iteration.
* ``data.loader: energon`` — packed (or unpacked) Energon shards through the VLM task encoder
  (:func:`lov15_megatron.data.loader.build_train_loader`), sharded by data-parallel rank; its
  state is Energon's savable-loader state of this DP rank.

:func:`energon_loader` turns the run config into the loader's arguments, for training and for
the held-out set of :mod:`.validation` alike, so that both see batches made the same way.

Every rank of a DP group (its TP/PP/CP peers) reads the same stream. Under virtual pipelining
each model chunk gets its own iterator over the same micro-batches (``itertools.tee``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from megatron.core import parallel_state

from lov15_megatron.config import ConfigError, RunConfig
from lov15_megatron.training import synthetic
from lov15_megatron.training.flops import CountingIterator

BATCH_KEYS = (
    "input_ids", "labels", "loss_mask", "position_ids", "cu_seqlens", "pixel_values",
    "image_grid_thw",
)  # fmt: skip


@dataclass
class TrainData:
    iterators: list[Iterator]  # one per model chunk
    counter: CountingIterator
    loader: Any = None  # energon savable loader
    next_iteration: int = 0  # synthetic stream position
    consumed_sample_ids: list[str] | None = None  # energon sample keys, in order

    def state(self) -> Any:
        if self.loader is not None:
            return {"energon": self.loader.save_state_rank()}
        return {"iteration": self.next_iteration}

    def for_schedule(self) -> Iterator | list[Iterator]:
        return self.iterators[0] if len(self.iterators) == 1 else self.iterators


def image_config(cfg: RunConfig):
    """The run's image rule (pixel budget and longest-side cap) for its loaders."""
    from lov15_megatron.data.image_processing import ImageConfig

    return ImageConfig(cfg.data.min_pixels, cfg.data.max_pixels, cfg.data.max_image_side)


def pad_multiple(cfg: RunConfig) -> int:
    """What every micro-batch's row length is rounded up to: the TP size under sequence
    parallelism; the full ``data.seq_length`` under pipeline parallelism (fixed activation
    shapes between stages)."""
    p = cfg.parallel
    if p.pipeline_model_parallel_size > 1:
        return cfg.data.seq_length
    return p.tensor_model_parallel_size if p.sequence_parallel else 1


def data_layout(cfg: RunConfig) -> dict[str, Any]:
    """What the saved loader state depends on (stored with every training checkpoint)."""
    return {
        "loader": cfg.data.loader,
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
        "num_workers": cfg.data.num_workers,
    }


def resumable_state(
    cfg: RunConfig, saved_layout: dict | None, state: Any, consumed_samples: int, where: str
) -> Any:
    """The loader state to restore, or None to restart the data order (opt-in only).

    Energon's loader state is per DP rank and per worker: it cannot be restored at another
    data-parallel size or worker count. Such a resume raises ``ConfigError`` naming both
    layouts, unless ``checkpoint.allow_data_restart`` accepts a restart of the data order.
    """
    if cfg.data.loader != "energon":
        return state
    now = data_layout(cfg)
    saved = saved_layout or {}
    # (Checkpoints written before the layout was recorded: restore whatever this rank has.)
    same = saved_layout is None or all(
        saved.get(k) == now[k] for k in ("data_parallel_size", "num_workers")
    )
    if same and state is not None:
        return state
    was = (
        f"data-parallel size {saved.get('data_parallel_size', '?')} with "
        f"{saved.get('num_workers', '?')} data workers per rank"
    )
    if not cfg.checkpoint.allow_data_restart:
        raise ConfigError(
            f"checkpoint {where}: saved at {was}, this run has data-parallel size "
            f"{now['data_parallel_size']} with {now['num_workers']}; the data-loader position "
            f"cannot be restored at another layout. Resume with the saved layout, or set "
            f"checkpoint.allow_data_restart=true to start the data order over"
        )
    from lov15_megatron.runtime.distributed import print_rank_0

    print_rank_0(
        f"warning: checkpoint {where} was saved at {was}; the data order restarts from "
        f"the beginning (checkpoint.allow_data_restart): up to {consumed_samples} samples "
        f"seen before may be seen again"
    )
    return None


def energon_loader(cfg: RunConfig, split: Literal["train", "valid"]) -> Any:
    """This DP rank's Energon loader of ``data.path`` (``"train"``: savable, repeating, shuffled,
    ``data.num_workers`` workers) or ``data.valid_path`` (``"valid"``: read once in stored order,
    in the main process, since validation sets are small)."""
    from lov15_megatron.data.loader import (
        build_train_loader,
        build_valid_loader,
        data_parallel_worker_config,
    )
    from lov15_megatron.data.tokenizer import load_tokenizer

    worker_config = data_parallel_worker_config(
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        cfg.data.num_workers if split == "train" else 0,
        cfg.data.seed,
    )
    build = build_train_loader if split == "train" else build_valid_loader
    return build(
        cfg.data.path if split == "train" else cfg.data.valid_path,
        tokenizer=load_tokenizer(cfg.data.tokenizer),
        micro_batch_size=cfg.train.micro_batch_size,
        worker_config=worker_config,
        image_config=image_config(cfg),
        seq_len=cfg.data.seq_length,
        pad_to_multiple_of=pad_multiple(cfg),
    )


def energon_batches(loader, consumed: list[str]) -> Iterator[dict]:
    """The model's batch dicts of ``loader``; each batch's sample keys are appended to
    ``consumed``, in order."""
    for batch in loader:
        consumed.extend(key for row in batch.sample_ids for key in row)
        yield {k: getattr(batch, k) for k in BATCH_KEYS}


def build_train_data(
    cfg: RunConfig, n_chunks: int, start_iteration: int = 0, state: Any = None
) -> TrainData:
    """The data stream for this rank, resumed from ``state`` when given."""
    if cfg.data.loader == "synthetic":
        first = state["iteration"] if state else start_iteration
        counter = CountingIterator(synthetic.synthetic_batches(cfg, first))
        data = TrainData([], counter, next_iteration=first)
        stream: Iterator = counter
    else:
        loader = energon_loader(cfg, "train")
        if state is not None:
            loader.restore_state_rank(state["energon"])
        consumed: list[str] = []
        counter = CountingIterator(energon_batches(loader, consumed))
        data = TrainData([], counter, loader=loader, consumed_sample_ids=consumed)
        stream = counter
    data.iterators = list(itertools.tee(stream, n_chunks)) if n_chunks > 1 else [stream]
    return data
