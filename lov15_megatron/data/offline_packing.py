"""Offline packing of raw VLM samples into Energon WebDataset shards (``tools/pack_offline.py``).

Pipeline (deterministic: the result depends only on the inputs and arguments, never on
``workers``):

1. **measure** every sample with the training code path (:func:`.measure.measure_sample`), in
   parallel over work units, results kept in (source, record) order; bad samples stop the run
   (``on_error="fail"``, naming file and record) or are counted by reason (``"skip"``);
2. **pack** lengths with :func:`.packing.best_fit_decreasing`; pack order is then shuffled with
   ``seed`` so that shards mix long and short samples;
3. **plan shards** of at most ``max_packs_per_shard`` packs / ``max_shard_bytes`` bytes;
4. **write** shards in parallel into ``.OUT.partial/`` (each to a temp name, then renamed), so a
   restarted run with the same arguments skips finished shards (the plan's fingerprint must
   match);
5. **index** with energon's own ``prepare_dataset`` and write ``dataset.yaml`` naming our sample
   type, write ``pack_report.json``, then rename the folder to ``OUT``: the output appears only
   when complete.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .chat import check_kind
from .errors import BadSample
from .image_processing import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, ImageConfig
from .image_processing import image_format_extension as _extension
from .measure import MeasuredSample, measure_sample
from .pack_format import JSON_PART, add_member, dumps, image_part, pack_key
from .packing import best_fit_decreasing, lower_bound_packs, pack_statistics
from .sources import Source, WorkUnit, corrupt_image_error, discover_sources, plan_units, read_unit
from .tokenizer import load_tokenizer

REPORT_NAME = "pack_report.json"
PLAN_NAME = "plan.json"
SHARD_DIR = "shards"
#: Bytes added per sample to a shard's size estimate (tar headers + JSON).
SAMPLE_OVERHEAD_BYTES = 4096


class PackingError(RuntimeError):
    """The run cannot complete (bad input with ``on_error="fail"``, stale partial output…)."""


@dataclass(frozen=True)
class PackConfig:
    """Everything that determines the output (and ``workers``, which does not)."""

    inputs: tuple[str, ...]
    output: str
    tokenizer: str
    seq_len: int = 8192
    kind: str = "instruct"
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    on_error: str = "fail"
    image_root: str | None = None
    verify_images: bool = False
    max_packs_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30
    seed: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        check_kind(self.kind)
        ImageConfig(self.min_pixels, self.max_pixels)
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
        if self.seq_len <= 0 or self.workers <= 0 or self.max_packs_per_shard <= 0:
            raise ValueError("seq_len, workers and max_packs_per_shard must be positive")
        if not self.inputs:
            raise ValueError("no inputs")

    @property
    def image_config(self) -> ImageConfig:
        return ImageConfig(self.min_pixels, self.max_pixels)

    def fingerprint_fields(self) -> dict[str, Any]:
        """The arguments the output depends on (not ``output`` location, not ``workers``)."""
        fields = asdict(self)
        for name in ("output", "workers"):
            fields.pop(name)
        return fields


@dataclass
class Skip:
    """A counted bad sample."""

    source: int
    record: int
    reason: str
    message: str


@dataclass
class MeasureResult:
    samples: list[MeasuredSample] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)


# ----------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(config: PackConfig) -> None:
    _WORKER["config"] = config
    _WORKER["tokenizer"] = load_tokenizer(config.tokenizer)


def _measure_unit(unit: WorkUnit) -> tuple[list[MeasuredSample | Skip], int]:
    config: PackConfig = _WORKER["config"]
    out: list[MeasuredSample | Skip] = []
    for item in read_unit(unit):
        if isinstance(item, BadSample):
            out.append(Skip(item.source, item.record, item.reason, item.describe()))  # type: ignore[attr-defined]
            continue
        try:
            out.append(
                measure_sample(
                    item,
                    _WORKER["tokenizer"],
                    config.kind,
                    config.image_config,
                    config.seq_len,
                    config.verify_images,
                )
            )
        except BadSample as error:
            out.append(Skip(item.source, item.record, error.reason, error.describe()))
    return out, len(out)


def _run_parallel(
    function: Callable[[Any], Any], tasks: Sequence[Any], config: PackConfig, ordered: bool
) -> Iterator[Any]:
    if config.workers == 1 or len(tasks) <= 1:
        _init_worker(config)
        yield from map(function, tasks)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    processes = min(config.workers, len(tasks))
    with context.Pool(processes, initializer=_init_worker, initargs=(config,)) as pool:
        mapper = pool.imap if ordered else pool.imap_unordered
        yield from mapper(function, tasks, chunksize=1)


def _progress(iterable: Iterable[Any], total: int, desc: str, enabled: bool, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, unit=unit, file=sys.stderr)


# ----------------------------------------------------------------------------- phases


def measure_all(units: Sequence[WorkUnit], config: PackConfig, progress: bool) -> MeasureResult:
    """Phase 1: measure every sample; in (source, record) order whatever ``workers`` is."""
    result = MeasureResult()
    bar = _progress(None, None, "measure", progress, "sample")
    try:
        for items, count in _run_parallel(_measure_unit, units, config, ordered=True):
            bar.update(count)
            for item in items:
                if isinstance(item, Skip):
                    if config.on_error == "fail":
                        raise PackingError(f"bad input: {item.message}")
                    result.skips.append(item)
                else:
                    result.samples.append(item)
    finally:
        bar.close()
    return result


@dataclass(frozen=True)
class ShardTask:
    index: int
    first_pack: int
    packs: tuple[tuple[MeasuredSample, ...], ...]

    @property
    def name(self) -> str:
        return f"{SHARD_DIR}/pack-{self.index:06d}.tar"


def plan_shards(packs: Sequence[Sequence[MeasuredSample]], config: PackConfig) -> list[ShardTask]:
    """Phase 3: contiguous runs of packs bounded by count and estimated bytes."""
    shards: list[ShardTask] = []
    current: list[tuple[MeasuredSample, ...]] = []
    current_bytes, first = 0, 0
    for pack_index, pack in enumerate(packs):
        size = sum(sample.image_bytes + SAMPLE_OVERHEAD_BYTES for sample in pack)
        if current and (
            len(current) >= config.max_packs_per_shard
            or current_bytes + size > config.max_shard_bytes
        ):
            shards.append(ShardTask(len(shards), first, tuple(current)))
            current, current_bytes, first = [], 0, pack_index
        current.append(tuple(pack))
        current_bytes += size
    if current:
        shards.append(ShardTask(len(shards), first, tuple(current)))
    return shards


def _pack_record(pack: Sequence[MeasuredSample]) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    samples, images = [], []
    for sample in pack:
        names = []
        for ref in sample.images:
            data = ref.read_bytes()
            try:
                extension = _extension(data)
            except ValueError as error:
                raise corrupt_image_error(ref, str(error)).at(sample.origin) from error
            name = image_part(len(images), extension)
            images.append((name, data))
            names.append(name)
        samples.append(
            {
                "id": sample.uid,
                "origin": sample.origin,
                "length": sample.length,
                "num_patches": sample.num_patches,
                "image_sizes": [list(size) for size in sample.image_sizes],
                "messages": [message.to_json() for message in sample.messages],
                "images": names,
            }
        )
    return {"samples": samples}, images


def _write_shard(task: ShardTask) -> str:
    root = Path(_WORKER["partial_root"])
    final = root / task.name
    temp = final.with_name(final.name + ".tmp")
    with tarfile.open(temp, "w", format=tarfile.USTAR_FORMAT) as archive:
        for offset, pack in enumerate(task.packs):
            key = pack_key(task.first_pack + offset)
            try:
                record, images = _pack_record(pack)
            except BadSample as error:
                raise PackingError(f"while writing {task.name}: {error.describe()}") from error
            add_member(archive, f"{key}.{JSON_PART}", dumps(record))
            for name, data in images:
                add_member(archive, f"{key}.{name}", data)
    with open(temp, "rb") as stream:
        os.fsync(stream.fileno())
    os.replace(temp, final)
    return task.name


def _init_writer(config: PackConfig, partial_root: str) -> None:
    _init_worker(config)
    _WORKER["partial_root"] = partial_root


def write_shards(
    shards: Sequence[ShardTask],
    partial: Path,
    config: PackConfig,
    progress: bool,
    stop_after_shards: int | None = None,
) -> int:
    """Phase 4: write the shards that are not finished yet; returns how many were written."""
    todo = [task for task in shards if not (partial / task.name).is_file()]
    bar = _progress(None, len(shards), "write", progress, "shard")
    bar.update(len(shards) - len(todo))
    written = 0
    try:
        if config.workers == 1 or len(todo) <= 1:
            _init_writer(config, str(partial))
            results: Iterable[str] = map(_write_shard, todo)
            for _ in results:
                written += 1
                bar.update(1)
                if stop_after_shards is not None and written >= stop_after_shards:
                    raise KeyboardInterrupt("stopped after shards (test hook)")
        else:
            context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
            with context.Pool(
                min(config.workers, len(todo)),
                initializer=_init_writer,
                initargs=(config, str(partial)),
            ) as pool:
                for _ in pool.imap_unordered(_write_shard, todo, chunksize=1):
                    written += 1
                    bar.update(1)
                    if stop_after_shards is not None and written >= stop_after_shards:
                        raise KeyboardInterrupt("stopped after shards (test hook)")
    finally:
        bar.close()
    return written


# ----------------------------------------------------------------------------- metadata


def write_energon_metadata(
    partial: Path, shard_names: Sequence[str], kind: str, workers: int
) -> None:
    """Index the shards with energon's own API (``.info.json``, ``split.yaml``, sqlite index)."""
    import contextlib
    import io

    import yaml
    from megatron.energon.flavors.webdataset import BaseWebdatasetFactory
    from megatron.energon.flavors.webdataset.config import MAIN_FOLDER_NAME

    from .energon_dataset import dataset_yaml

    with contextlib.redirect_stdout(io.StringIO()):  # energon prints progress lines
        BaseWebdatasetFactory.prepare_dataset(
            partial,
            list(shard_names),
            split_parts_ratio=[("train", 1.0), ("val", 0.0), ("test", 0.0)],
            shuffle_seed=None,
            workers=max(1, min(workers, len(shard_names))),
        )
    with open(partial / MAIN_FOLDER_NAME / "dataset.yaml", "w") as stream:
        yaml.safe_dump(dataset_yaml("PackedVLMWebdataset", kind), stream, sort_keys=False)


# ----------------------------------------------------------------------------- report


def length_histogram(lengths: Sequence[int], seq_len: int, bins: int = 16) -> dict[str, list[int]]:
    width = max(1, -(-seq_len // bins))
    edges = list(range(0, seq_len + width, width))[: bins + 1]
    edges[-1] = max(edges[-1], seq_len)
    counts = [0] * (len(edges) - 1)
    for length in lengths:
        counts[min((length - 1) // width, len(counts) - 1)] += 1
    return {"bin_edges": edges, "counts": counts}


def build_report(
    config: PackConfig,
    measured: MeasureResult,
    packs: Sequence[Sequence[MeasuredSample]],
    shards: Sequence[ShardTask],
) -> dict[str, Any]:
    lengths = [sample.length for sample in measured.samples]
    pack_lengths = [[sample.length for sample in pack] for pack in packs]
    flat = [length for pack in pack_lengths for length in pack]
    stats = pack_statistics(flat, _ranges(pack_lengths), config.seq_len)
    patches = [sum(sample.num_patches for sample in pack) for pack in packs]
    skipped = Counter(skip.reason for skip in measured.skips)
    return {
        "samples_in": len(measured.samples) + len(measured.skips),
        "samples_packed": sum(len(pack) for pack in packs),
        "samples_skipped": dict(sorted(skipped.items())),
        "skipped_examples": [skip.message for skip in measured.skips[:50]],
        "packs": len(packs),
        "packs_lower_bound": lower_bound_packs(lengths, config.seq_len) if lengths else 0,
        "shards": len(shards),
        "seq_len": config.seq_len,
        "kind": config.kind,
        "min_pixels": config.min_pixels,
        "max_pixels": config.max_pixels,
        "algorithm": "best_fit_decreasing",
        "tokens": sum(lengths),
        "samples_per_pack": stats["samples_per_pack"],
        "fill_efficiency": stats["fill_efficiency"],
        "padding_compression": (
            stats["padding_compression"] if stats["padding_compression"] != float("inf") else None
        ),
        "length_histogram": length_histogram(lengths, config.seq_len),
        "vision_patches_per_pack": {
            "min": min(patches, default=0),
            "max": max(patches, default=0),
            "mean": sum(patches) / len(patches) if patches else 0.0,
        },
    }


def _ranges(groups: Sequence[Sequence[int]]) -> list[list[int]]:
    out, start = [], 0
    for group in groups:
        out.append(list(range(start, start + len(group))))
        start += len(group)
    return out


def _plan_fingerprint(config: PackConfig, shards: Sequence[ShardTask]) -> str:
    digest = hashlib.sha256(dumps(config.fingerprint_fields()))
    for task in shards:
        for pack in task.packs:
            digest.update(dumps([task.index, [sample.uid for sample in pack]]))
    return digest.hexdigest()


def partial_path(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


# ----------------------------------------------------------------------------- entry point


def run(
    config: PackConfig, progress: bool = True, stop_after_shards: int | None = None
) -> dict[str, Any]:
    """Pack ``config.inputs`` into ``config.output``; returns the report.

    ``stop_after_shards`` is a test hook simulating a killed run after that many shards.
    """
    started = time.perf_counter()
    output = Path(config.output).expanduser().resolve()
    if output.exists():
        raise PackingError(f"{output} already exists; remove it or choose another --output")
    partial = partial_path(output)
    load_tokenizer(config.tokenizer)  # load once before forking workers
    sources: list[Source] = discover_sources(config.inputs, config.image_root)
    units = plan_units(sources)
    measured = measure_all(units, config, progress)
    time_measure = time.perf_counter() - started

    samples = measured.samples
    order = best_fit_decreasing([sample.length for sample in samples], config.seq_len)
    import random

    random.Random(config.seed).shuffle(order)
    packs = [[samples[index] for index in pack] for pack in order]
    shards = plan_shards(packs, config)
    if not shards:
        raise PackingError("no usable samples: nothing to write (see the skip counts)")
    fingerprint = _plan_fingerprint(config, shards)
    plan_file = partial / PLAN_NAME
    if partial.exists():
        previous = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
        if previous.get("fingerprint") != fingerprint:
            raise PackingError(
                f"{partial} holds an interrupted run with other inputs/arguments; remove it"
            )
    else:
        (partial / SHARD_DIR).mkdir(parents=True)
        plan_file.write_text(json.dumps({"fingerprint": fingerprint}, indent=2))
    written = write_shards(shards, partial, config, progress, stop_after_shards)
    time_write = time.perf_counter() - started - time_measure

    write_energon_metadata(partial, [task.name for task in shards], config.kind, config.workers)
    report = build_report(config, measured, packs, shards)
    report["shards_written_this_run"] = written
    report["wall_time_s"] = {
        "measure": round(time_measure, 3),
        "write": round(time_write, 3),
        "total": round(time.perf_counter() - started, 3),
    }
    (partial / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    plan_file.unlink()
    os.rename(partial, output)
    return report


def format_summary(report: dict[str, Any], output: str) -> str:
    skipped = sum(report["samples_skipped"].values())
    lines = [
        f"packed {report['samples_packed']}/{report['samples_in']} samples into "
        f"{report['packs']} packs of <= {report['seq_len']} tokens "
        f"({report['shards']} shards) -> {output}",
        f"  samples/pack {report['samples_per_pack']:.2f}  fill efficiency "
        f"{report['fill_efficiency']:.4f}  padding compression "
        f"{report['padding_compression'] or float('inf'):.2f}x  "
        f"(lower bound {report['packs_lower_bound']} packs)",
        f"  skipped {skipped}: {report['samples_skipped'] or '{}'}",
        f"  wall time {report['wall_time_s']['total']:.1f} s",
    ]
    return "\n".join(lines)


def remove_partial(output: str) -> None:
    """Delete an interrupted run's partial folder."""
    shutil.rmtree(partial_path(Path(output).expanduser().resolve()), ignore_errors=True)
