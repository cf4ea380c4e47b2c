"""Energon sample type and dataset factories for VLM data (named by ``.nv-meta/dataset.yaml``).

- :class:`PackedVLMWebdataset`: shards written by ``tools/pack_offline.py``; one
  :class:`PackedVLMSample` per pack.
- :class:`RawVLMWebdataset`: an *unpacked* WebDataset (``json`` + image members per key, any
  record layout :func:`.sources.parse_record` reads); each sample becomes a one-sub-sample pack so
  that the same task encoder handles both.

Images stay encoded bytes here (no energon decoder); the task encoder decodes them. The sample
kind (``caption``/``instruct``) travels as the ``kind`` subflavor, set in ``dataset.yaml`` by the
packer and overridable per dataset in a metadataset YAML.
"""

# No ``from __future__ import annotations``: energon reads constructor annotations at runtime.
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron.energon import Sample, edataclass
from megatron.energon.epathlib import EPath
from megatron.energon.flavors.webdataset import DefaultDecoderWebdatasetFactory

from .pack_format import JSON_PART
from .sources import IMAGE_EXTENSIONS, parse_record


@edataclass
class PackedVLMSample(Sample):
    """One pack: its sub-sample records (see :mod:`.pack_format`) and image bytes by part name."""

    #: Sub-sample records: ``id``, ``messages``, ``images`` (part names), ``length``, …
    samples: list[dict[str, Any]]
    #: Encoded image bytes by tar part name (``img0.jpg`` …).
    images: dict[str, bytes]


def _is_metadata(name: str) -> bool:
    return name.startswith("__")


def load_packed_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Energon sample loader: tar parts of one pack → :class:`PackedVLMSample` fields."""
    record = json.loads(raw[JSON_PART])
    images = {
        name: value for name, value in raw.items() if not _is_metadata(name) and name != JSON_PART
    }
    return {"samples": record["samples"], "images": images}


def load_raw_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Energon sample loader for unpacked data: one raw record → a one-sub-sample pack."""
    key = raw["__key__"]
    messages, _ = parse_record(json.loads(raw[JSON_PART]), key)
    names = sorted(
        (n for n in raw if not _is_metadata(n) and n.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS),
        key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)],
    )
    record = {
        "id": key,
        "origin": key,
        "messages": [message.to_json() for message in messages],
        "images": names,
    }
    return {"samples": [record], "images": {name: raw[name] for name in names}}


def accept_all_parts(part: str) -> bool:
    return True


class _VLMWebdatasetBase(DefaultDecoderWebdatasetFactory[PackedVLMSample]):
    __sample_type__ = PackedVLMSample
    _loader: Any = None

    def __init__(
        self, path: EPath, *, sample_type: type[PackedVLMSample] = PackedVLMSample, **kwargs: Any
    ) -> None:
        # ``sample_type`` is only in dataset.yaml for ``energon info``; it must be ours.
        if sample_type is not PackedVLMSample:
            raise ValueError(f"{path}: sample_type must be PackedVLMSample, got {sample_type}")
        kwargs.pop("decoder", None)  # keep encoded bytes: the task encoder decodes images
        kwargs.pop("sample_loader", None)
        kwargs.pop("part_filter", None)
        super().__init__(
            path,
            decoder=None,
            sample_loader=type(self)._loader,
            part_filter=accept_all_parts,
            **kwargs,
        )


class PackedVLMWebdataset(_VLMWebdatasetBase):
    """Packed shards from ``tools/pack_offline.py``."""

    _loader = staticmethod(load_packed_sample)


class RawVLMWebdataset(_VLMWebdatasetBase):
    """Unpacked WebDataset shards (json + images per key)."""

    _loader = staticmethod(load_raw_sample)


def index_webdataset(
    path: str | Path, shards: Sequence[str], factory: str, kind: str, workers: int = 1
) -> None:
    """Make ``path`` an Energon dataset: index its WebDataset ``shards`` with energon's own API
    (``.info.json``, ``split.yaml``, sqlite index; everything in the train split) and write a
    ``dataset.yaml`` naming ``factory`` (:class:`PackedVLMWebdataset` or
    :class:`RawVLMWebdataset`) and the sample ``kind``."""
    import contextlib
    import io

    import yaml
    from megatron.energon.flavors.webdataset import BaseWebdatasetFactory
    from megatron.energon.flavors.webdataset.config import MAIN_FOLDER_NAME

    path = Path(path)
    with contextlib.redirect_stdout(io.StringIO()):  # energon prints progress lines
        BaseWebdatasetFactory.prepare_dataset(
            path,
            list(shards),
            split_parts_ratio=[("train", 1.0), ("val", 0.0), ("test", 0.0)],
            shuffle_seed=None,
            workers=max(1, min(workers, len(shards))),
        )
    with open(path / MAIN_FOLDER_NAME / "dataset.yaml", "w") as stream:
        yaml.safe_dump(dataset_yaml(factory, kind), stream, sort_keys=False)


def prepare_raw_webdataset(path: str | Path, shards: list[str], kind: str) -> None:
    """Index existing raw WebDataset shards (``json`` + images per key) as a
    :class:`RawVLMWebdataset` (the unpacked path)."""
    index_webdataset(path, shards, "RawVLMWebdataset", kind)


def dataset_yaml(factory: str, kind: str) -> dict[str, Any]:
    """``.nv-meta/dataset.yaml`` content: our factory class and sample type (both in this
    package, no ``sample_loader.py``), the sample kind as the ``kind`` subflavor."""
    module = __name__
    return {
        "__module__": module,
        "__class__": factory,
        "sample_type": {"__module__": module, "__class__": "PackedVLMSample"},
        "subflavors": {"kind": kind},
    }
