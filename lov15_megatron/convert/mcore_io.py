"""Megatron-Core distributed checkpoints (``torch_dist``) written and read one tensor at a time.

A converter must not hold the model in memory. ``megatron.core.dist_checkpointing.save`` wants
every tensor up front, so the writer here takes the checkpoint's *layout* from the model itself —
the model is built on the ``meta`` device at TP=1/PP=1 (no memory) and its
``sharded_state_dict()`` says every key, global shape, chunk offset, ``_extra_state`` object and
the SwiGLU split — and then drives PyTorch Distributed Checkpoint's ``FileSystemWriter`` with a
planner that produces each chunk's data only when the writer asks for it. The files are exactly
what ``dist_checkpointing.save`` writes (``.metadata``, ``__0_0.distcp``, ``common.pt``,
``metadata.json``) and load with ``dist_checkpointing.load`` at any TP×PP.

The reader goes the other way, one parameter at a time, with a load planner that asks DCP for
exactly that parameter's region of each stored tensor — whatever TP/PP layout wrote the
checkpoint (the converter's TP=1 chunks or a training run's TP shards).
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

TensorSource = Callable[[str], torch.Tensor]
"""``source(param_name) -> full (TP=1) Megatron tensor`` for one parameter."""


def build_on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model on the meta device (shapes only, no memory, no initialisation)."""
    with torch.device("meta"):
        return build()


def _expand(sh, data: torch.Tensor) -> list[ShardedTensor]:
    """The checkpoint chunks of one parameter, holding ``data``."""
    if isinstance(sh, ShardedTensorFactory):
        return list(sh.build_fn(sh.key, data, sh.replica_id, sh.flattened_range))
    return [dataclasses.replace(sh, data=data)]


def _chunk_index(sh: ShardedTensor) -> tuple[MetadataIndex, tuple[int, ...]]:
    sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return MetadataIndex(sh.key, torch.Size(sh.global_offset)), sizes


class _StreamingPlanner(DefaultSavePlanner):
    """A save planner with a fixed list of items whose data is produced on demand."""

    def __init__(self, items: list[WriteItem], resolve: Callable[[WriteItem], object]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items = items
        self._resolve = resolve

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        return self._resolve(write_item)


def save_streaming(
    model: torch.nn.Module,
    source: TensorSource,
    out_dir: str | os.PathLike,
    on_param: Callable[[str], None] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``model``'s layout with data from ``source`` as a torch_dist checkpoint.

    ``model`` is a TP=1/PP=1 model (on ``meta``); ``source(name)`` returns the full tensor of
    parameter ``name`` (cast to the model's dtype here). ``extra_files`` (name → text) are
    written beside the checkpoint. Written to ``<out_dir>.tmp`` and renamed when complete.
    """
    final = Path(out_dir)
    tmp = final.with_name(final.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise PermissionError(f"cannot write the checkpoint to {final}: {e}") from e

    sharded = model.sharded_state_dict()
    shapes = {name: p for name, p in model.state_dict(keep_vars=True).items()}
    items: list[WriteItem] = []
    where: dict[MetadataIndex, tuple[str, int]] = {}
    objects: dict[MetadataIndex, object] = {}
    for name, sh in sharded.items():
        if isinstance(sh, ShardedObject):
            index = MetadataIndex(sh.unique_key)
            items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
            objects[index] = sh.data
            continue
        meta = shapes[name]
        for part, piece in enumerate(_expand(sh, meta)):
            index, sizes = _chunk_index(piece)
            chunk = ChunkStorageMetadata(offsets=index.offset, sizes=torch.Size(sizes))
            items.append(
                WriteItem(
                    index=index,
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=chunk,
                        properties=TensorProperties(dtype=meta.dtype),
                        size=torch.Size(piece.global_shape),
                    ),
                )
            )
            where[index] = (name, part)

    cache: OrderedDict[str, list[ShardedTensor]] = OrderedDict()

    def resolve(item: WriteItem):
        if item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save([objects[item.index]], buffer)
            return buffer
        name, part = where[item.index]
        if name not in cache:
            meta = shapes[name]
            data = source(name).to(meta.dtype)
            if tuple(data.shape) != tuple(meta.shape):
                raise ValueError(
                    f"{name}: got shape {tuple(data.shape)}, expected {tuple(meta.shape)}"
                )
            cache[name] = _expand(sharded[name], data)
            if on_param is not None:
                on_param(name)
            while len(cache) > 2:  # a SwiGLU weight yields two chunks: keep the last two params
                cache.popitem(last=False)
        piece = cache[name][part]
        return piece.data.reshape(item.tensor_data.chunk.sizes)

    writer = FileSystemWriter(tmp, single_file_per_rank=True, thread_count=1, sync_files=True)
    try:
        planner = _StreamingPlanner(items, resolve)
        dcp_save(state_dict={}, storage_writer=writer, planner=planner, no_dist=True)
        torch.save({}, tmp / "common.pt")
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
        save_config(CheckpointingConfig(sharded_backend="torch_dist"), str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


class _RegionPlanner(DefaultLoadPlanner):
    """A load planner that reads one region of one stored tensor into ``out``."""

    def __init__(self, key: str, offsets: tuple[int, ...], out: torch.Tensor) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.key, self.offsets, self.out = key, offsets, out

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata.get(self.key)
        if stored is None:
            raise KeyError(f"tensor {self.key!r} is not in the checkpoint")
        chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.out.shape)
        return LoadPlan(create_read_items_for_chunk_list(self.key, stored, [chunk]))

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        region = self.out
        for dim, (start, length) in enumerate(
            zip(read_item.dest_offsets, read_item.lengths, strict=True)
        ):
            region = region.narrow(dim, start, length)
        return region

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class _MetadataOnceReader(FileSystemReader):
    """A ``FileSystemReader`` that parses ``.metadata`` once for many region reads.

    Every ``dcp.load`` asks its reader for the metadata; a fresh reader per parameter re-parses
    the whole file each time, which made reading grow with (parameters × metadata size): an
    MoE checkpoint has thousands of expert parameters.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._metadata = None

    def read_metadata(self):
        if self._metadata is None:
            self._metadata = super().read_metadata()
        return self._metadata


def read_region(
    path: Path,
    key: str,
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    dtype,
    reader: FileSystemReader | None = None,
) -> torch.Tensor:
    """The region ``offsets``/``sizes`` of stored tensor ``key``, assembled from its chunks."""
    out = torch.empty(sizes, dtype=dtype)
    with warnings.catch_warnings():  # "assuming … a single process": what no_dist asks for
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp_load(
            {},
            storage_reader=reader or FileSystemReader(path),
            planner=_RegionPlanner(key, offsets, out),
            no_dist=True,
        )
    return out


def load_streaming(
    model: torch.nn.Module,
    ckpt_dir: str | os.PathLike,
    keep: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(param_name, full tensor)`` of a torch_dist checkpoint, one parameter at a time.

    ``model`` is a TP=1/PP=1 model on ``meta`` that defines which parameters to read (those
    ``keep`` accepts, when given); the checkpoint may have been written at any layout.
    """
    path = Path(ckpt_dir)
    if not (path / "metadata.json").exists():
        raise FileNotFoundError(f"{path} is not a Megatron-Core distributed checkpoint")
    sharded = model.sharded_state_dict()
    params = model.state_dict(keep_vars=True)
    reader = _MetadataOnceReader(path)
    for name, sh in sharded.items():
        if isinstance(sh, ShardedObject) or (keep is not None and not keep(name)):
            continue
        meta = params[name]
        parts = []
        for piece in _expand(sh, meta):
            index, sizes = _chunk_index(piece)
            region = read_region(path, piece.key, tuple(index.offset), sizes, meta.dtype, reader)
            parts.append(region.reshape(piece.local_shape))
        tensor = sh.merge_fn(parts) if isinstance(sh, ShardedTensorFactory) else parts[0]
        yield name, tensor.reshape(meta.shape)
