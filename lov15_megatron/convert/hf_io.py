"""Reading and writing Hugging Face checkpoint directories tensor by tensor.

The reader opens ``model.safetensors`` or the shards listed in
``model.safetensors.index.json`` and hands out one tensor at a time (safetensors reads only that
tensor's bytes). Files are opened per tensor and closed again: safetensors maps files into
memory, and a handle kept open would keep every page it ever touched in the process's resident
set — the whole checkpoint by the end of a conversion. The writer
collects tensors into shards of bounded size, writes the index when there is more than one
shard, and works in a temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lov15_megatron.convert.hf_experts import fused_expert_views, view_shape
from lov15_megatron.convert.mapping import ConversionError
from lov15_megatron.hf.export import (
    CHAT_TEMPLATE_FILE,
    GENERATION_FILE,
    PREPROCESSOR_FILE,
    PROCESSOR_FILE,
    TOKENIZER_SOURCE_FILES,
)


def check_save_dir(save_dir: Path, sources: list[Path], overwrite: bool) -> None:
    """Refuse an output directory that overlaps an input, is a file, or is non-empty
    (unless ``overwrite``): the atomic writer would otherwise replace it."""
    resolved = save_dir.resolve()
    for source in sources:
        src = source.resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise ConversionError(f"--save-dir {save_dir} overlaps the input directory {source}")
    if save_dir.exists() and not save_dir.is_dir():
        raise ConversionError(f"cannot write to {save_dir}: it exists and is not a directory")
    if save_dir.is_dir() and any(save_dir.iterdir()) and not overwrite:
        raise ConversionError(
            f"--save-dir {save_dir} exists and is not empty (pass --overwrite to replace it)"
        )


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: Files copied unchanged from an HF template directory when exporting: the tokenizer proper
#: (:data:`~lov15_megatron.hf.export.TOKENIZER_SOURCE_FILES`), chat template, processor and
#: generation settings.
TEMPLATE_FILES = (
    *TOKENIZER_SOURCE_FILES,
    "chat_template.json",
    CHAT_TEMPLATE_FILE,
    GENERATION_FILE,
    PREPROCESSOR_FILE,
    PROCESSOR_FILE,
    "video_preprocessor_config.json",
)


def _open(path: Path):
    """``safe_open`` whose failures (truncated or corrupt file) name the file."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def weight_files(directory: Path) -> dict[str, Path] | None:
    """Stored tensor name → its safetensors file, or ``None`` when there are no weights."""
    if (directory / INDEX).exists():
        weight_map = _read_json(directory / INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{directory / INDEX}: no 'weight_map' mapping")
        return {name: directory / f for name, f in weight_map.items()}
    if (directory / SINGLE).exists():
        with _open(directory / SINGLE) as f:
            return {name: directory / SINGLE for name in f.keys()}
    return None


class HFCheckpointReader:
    """Lazy access to the tensors of a Hugging Face safetensors checkpoint directory.

    Fused expert tensors (``…mlp.experts.gate_up_proj``/``down_proj``, ``convert/hf_experts.py``)
    are handed out as their per-expert pieces, under the per-expert names.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConversionError(f"Hugging Face checkpoint directory {self.dir} does not exist")
        config_path = self.dir / "config.json"
        if not config_path.exists():
            raise ConversionError(f"{config_path} is missing")
        self.config: dict = _read_json(config_path)
        files = weight_files(self.dir)
        if files is None:
            raise ConversionError(f"no {SINGLE} or {INDEX} in {self.dir}")
        self._file_of = files
        self._views = fused_expert_views(files, self._stored_shape)
        fused = {stored for stored, _ in self._views.values()}
        self._names = (set(files) - fused) | set(self._views)

    def names(self) -> set[str]:
        return self._names

    def _path(self, name: str) -> Path:
        if name not in self._file_of:
            raise ConversionError(f"tensor {name!r} is missing from {self.dir}")
        path = self._file_of[name]
        if not path.exists():
            raise ConversionError(f"{path} (listed in {INDEX}) does not exist")
        return path

    def get(self, name: str) -> torch.Tensor:
        stored, index = self._views.get(name, (name, None))
        path = self._path(stored)
        with _open(path) as f:
            try:
                if index is None:
                    return f.get_tensor(stored).clone()
                return f.get_slice(stored)[index].contiguous()
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"{path}: cannot read tensor {stored!r} ({e})") from None

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        with _open(self._path(name)) as f:
            return tuple(f.get_slice(name).get_shape())

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._views:
            stored, index = self._views[name]
            return view_shape(self._stored_shape(stored), index)
        return self._stored_shape(name)

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's tensors (from the first one)."""
        name = min(self._file_of)
        return self.get(name).dtype


class HFCheckpointWriter:
    """Write tensors into bounded safetensors shards in ``<dir>.tmp``, renamed on ``finish``."""

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = 2 * 2**30) -> None:
        self.final = Path(directory)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        try:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)
        except OSError as e:
            raise ConversionError(f"cannot write to {self.final}: {e}") from e
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0
        self.count = 0  # tensors written

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        self.count += 1

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, self.tmp / f"shard-{index:05d}.tmp", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def write_json(self, name: str, data: dict) -> None:
        (self.tmp / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def copy_file(self, source: Path) -> None:
        shutil.copy2(source, self.tmp / source.name)

    def finish(self) -> Path:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final_name = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.tmp / f"shard-{i:05d}.tmp").rename(self.tmp / final_name)
            weight_map.update({name: final_name for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            self.write_json(INDEX, index)
        if self.final.exists():
            shutil.rmtree(self.final)
        self.tmp.rename(self.final)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def check_tied_lm_head(
    reader: HFCheckpointReader, lm_head: str, embed: str, embed_tensor: torch.Tensor | None = None
) -> None:
    """A checkpoint whose ``config.json`` says ``tie_word_embeddings: true`` may still store its
    output layer; it must then equal the input embeddings (``embed_tensor``, if already read)."""
    embed_tensor = reader.get(embed) if embed_tensor is None else embed_tensor
    if not torch.equal(reader.get(lm_head), embed_tensor):
        raise ConversionError(
            f"{reader.dir / 'config.json'} has tie_word_embeddings true but tensor "
            f"{lm_head!r} differs from {embed!r}"
        )


def copy_tokenizer_files(template: Path, writer: HFCheckpointWriter) -> list[str]:
    """Copy tokenizer / processor / generation files from ``template``; returns their names."""
    copied = []
    for name in TEMPLATE_FILES:
        if (template / name).exists():
            writer.copy_file(template / name)
            copied.append(name)
    return copied
