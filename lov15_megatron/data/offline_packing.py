"""Offline packing of raw VLM samples into Energon WebDataset shards (``tools/pack_offline.py``).

Four phases; each runs in one process or as independent tasks (a Slurm job array), and the
result depends only on the inputs and the arguments, never on ``workers`` or the task split:

1. **measure** (tasks over work units: 512 JSON(L) records, one tar, one parquet row group):
   every sample's length with the training code path (:func:`.measure.measure_sample`), stored
   as one small columnar table per unit (:mod:`.sample_store`); bad samples stop the run
   (``on_error="fail"``, naming file and record) or are counted by reason (``"skip"``);
2. **plan** (one task): the unit tables concatenated, best-fit-decreasing packing, optional ViT
   cost balancing, a seeded pack order and the shard boundaries, saved as files
   (:mod:`.pack_plan`);
3. **write** (tasks over shards): each shard's samples are read again from their sources and
   written as a tar (temp name, then renamed); a video's frames are planned again from what the
   measure phase decoded (the video table, :mod:`.sample_store`), so each video is decoded once
   per run;
4. **finalise** (one task): energon's ``prepare_dataset`` index, ``dataset.yaml`` naming our
   sample type, ``pack_report.json``; the folder is renamed to ``OUT``, so the output appears
   only when complete.

Everything lives in ``.OUT.partial/`` until then: ``dataset/`` (becomes ``OUT``) and ``work/``
(``config.json``, ``measure/``, ``samples.npy``, ``plan/``, ``tasks/``). Every file appears
under its final name only when complete, so a killed task is re-run as it was and skips what is
finished; ``config.json`` makes every task check it belongs to the same run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .chat import check_kind
from .errors import ALWAYS_SKIPPED, BadSample
from .image_processing import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    ImageConfig,
    ImageError,
    read_image_size,
)
from .image_processing import image_format_extension as _extension
from .measure import MeasuredSample, MeasuredVideo, measure_sample
from .pack_format import JSON_PART, REPORT_NAME, add_member, dumps, image_part, pack_key, video_part
from .pack_plan import PLAN_DIR, load_plan, make_plan, save_plan
from .sample_store import (
    MEASURE_DIR,
    TABLE_NAME,
    atomic_write,
    load_table,
    load_video_table,
    merge_units,
    missing_units,
    replan_videos,
    skip_summary,
    write_unit,
)
from .source_counts import (
    PACKED,
    SourceCounts,
    merge_media_counts,
    merge_source_counts,
    save_media_counts,
)
from .sources import (
    RawSample,
    Source,
    WorkUnit,
    corrupt_image_error,
    discover_sources,
    plan_units,
    read_sample,
    read_unit,
)
from .tokenizer import load_tokenizer
from .video import (
    DEFAULT_FPS,
    DEFAULT_FRAME_MAX_PIXELS,
    DEFAULT_FRAME_MIN_PIXELS,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MIN_FRAMES,
    DEFAULT_VIDEO_MAX_PIXELS,
    VideoConfig,
)

SHARD_DIR = "shards"
PHASES = ("measure", "plan", "write", "finalise")
#: ``--videos``: ``skip`` counts video samples as ``video_not_supported`` (training cannot
#: use them yet); ``pack`` decodes, measures and packs them.
VIDEO_MODES = ("skip", "pack")
#: The video sampling fields of :class:`PackConfig` and their defaults (the release's).
VIDEO_FIELDS = {
    "fps": DEFAULT_FPS,
    "fps_min_frames": DEFAULT_MIN_FRAMES,
    "fps_max_frames": DEFAULT_MAX_FRAMES,
    "frame_min_pixels": DEFAULT_FRAME_MIN_PIXELS,
    "frame_max_pixels": DEFAULT_FRAME_MAX_PIXELS,
    "video_max_pixels": DEFAULT_VIDEO_MAX_PIXELS,
}


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
    max_image_side: int | None = None
    one_sample_per_pack: bool = False
    on_error: str = "fail"
    image_root: str | None = None
    verify_images: bool = False
    max_packs_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30
    seed: int = 0
    balance_vision: bool = False
    records_per_unit: int = 512
    workers: int = 1
    videos: str = "skip"
    fps: float = DEFAULT_FPS
    fps_min_frames: int = DEFAULT_MIN_FRAMES
    fps_max_frames: int = DEFAULT_MAX_FRAMES
    frame_min_pixels: int = DEFAULT_FRAME_MIN_PIXELS
    frame_max_pixels: int = DEFAULT_FRAME_MAX_PIXELS
    video_max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS

    def __post_init__(self) -> None:
        check_kind(self.kind)
        self.image_config  # noqa: B018 - validates the image settings
        if self.videos not in VIDEO_MODES:
            raise ValueError(f"--videos: must be one of {VIDEO_MODES}, got {self.videos!r}")
        self.video_config  # noqa: B018 - validates the video settings
        if self.videos == "skip":
            for name, default in VIDEO_FIELDS.items():
                if getattr(self, name) != default:
                    flag = "--" + name.replace("_", "-")
                    raise ValueError(f"{flag}: has no effect without --videos pack")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
        for name in ("seq_len", "workers", "max_packs_per_shard", "records_per_unit"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be positive")
        if not self.inputs:
            raise ValueError("--input: no inputs")

    @property
    def image_config(self) -> ImageConfig:
        return ImageConfig(self.min_pixels, self.max_pixels, self.max_image_side)

    @property
    def video_config(self) -> VideoConfig:
        return VideoConfig(
            self.fps,
            self.fps_min_frames,
            self.fps_max_frames,
            self.frame_min_pixels,
            self.frame_max_pixels,
            self.video_max_pixels,
        )

    def fingerprint_fields(self) -> dict[str, Any]:
        """The arguments the output depends on (not ``output`` location, not ``workers``)."""
        fields = asdict(self)
        for name in ("output", "workers"):
            fields.pop(name)
        fields["inputs"] = list(fields["inputs"])
        return fields


@dataclass(frozen=True)
class Task:
    """Task ``index`` of ``count`` (a Slurm array element); takes a contiguous block."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"--task-index: {self.index} is not in 0..{self.count - 1}")

    def select(self, total: int) -> range:
        return range(self.index * total // self.count, (self.index + 1) * total // self.count)

    @property
    def name(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"


@dataclass(frozen=True)
class Run:
    """The folders of one packing run."""

    output: Path

    @property
    def partial(self) -> Path:
        return partial_path(self.output)

    @property
    def dataset(self) -> Path:
        return self.partial / "dataset"

    @property
    def work(self) -> Path:
        return self.partial / "work"

    @property
    def measure_dir(self) -> Path:
        return self.work / MEASURE_DIR

    @property
    def plan_dir(self) -> Path:
        return self.work / PLAN_DIR

    @property
    def table(self) -> Path:
        return self.work / TABLE_NAME


def partial_path(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/pack-{index:06d}.tar"


# ----------------------------------------------------------------------------- run setup


def open_run(config: PackConfig) -> tuple[Run, list[Source]]:
    """Resolve the run's folders, check or record its ``config.json``."""
    run = Run(Path(config.output).expanduser().resolve())
    if run.output.exists():
        raise PackingError(f"{run.output}: already exists; remove it or choose another --output")
    sources = discover_sources(config.inputs, config.image_root, config.videos == "pack")
    identity = {
        "config": config.fingerprint_fields(),
        "sources": [
            [source.path, source.fmt, source.image_root, *_file_stamp(source.path)]
            for source in sources
        ],
    }
    path = run.work / "config.json"
    if path.is_file():
        if json.loads(path.read_text()) != identity:
            raise PackingError(
                f"{run.partial}: holds an interrupted run with other inputs/arguments; remove it"
            )
    else:
        for folder in (run.dataset / SHARD_DIR, run.measure_dir, run.work / "tasks"):
            folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(identity, indent=2).encode()
        atomic_write(path, lambda s: s.write(text), shared=True)  # array tasks start together
    return run, sources


def _file_stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _record_task(run: Run, phase: str, task: Task, started: float, **counts: Any) -> None:
    usage = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF,)]
    usage.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    record = {
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": max(usage) * 1024,  # Linux reports KiB
        **counts,
    }
    path = run.work / "tasks" / f"{phase}-{task.name}.json"
    atomic_write(path, lambda s: s.write(json.dumps(record).encode()))


def _task_records(run: Run, phase: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((run.work / "tasks").glob(f"{phase}-*"))]


# ----------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _pool_map(
    function: Callable[[Any], Any],
    tasks: Sequence[Any],
    workers: int,
    initializer: Callable[..., None],
    initargs: tuple[Any, ...],
    ordered: bool = False,
) -> Iterator[Any]:
    if workers == 1 or len(tasks) <= 1:
        initializer(*initargs)
        yield from map(function, tasks)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(min(workers, len(tasks)), initializer, initargs) as pool:
        mapper = pool.imap if ordered else pool.imap_unordered
        yield from mapper(function, tasks, chunksize=1)


def _progress(total: int | None, desc: str, enabled: bool, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit=unit, file=sys.stderr)


def _init_measure(config: PackConfig, measure_dir: str) -> None:
    _WORKER["config"] = config
    _WORKER["measure_dir"] = Path(measure_dir)
    _WORKER["tokenizer"] = load_tokenizer(config.tokenizer)


def _measure_unit(job: tuple[int, WorkUnit]) -> tuple[int, int, str | None]:
    """Measure one unit and store its table; ``(samples, skips, first failure or None)``."""
    index, unit = job
    config: PackConfig = _WORKER["config"]
    samples: list[MeasuredSample] = []
    skips: list[tuple[int, int, str, str]] = []
    counts = SourceCounts()
    media = {"videos": 0, "frames": 0}
    for item in read_unit(unit):
        if isinstance(item, BadSample):
            skip = (item.source, item.record, item.reason, item.describe())  # type: ignore[attr-defined]
            name: str = item.source_name  # type: ignore[attr-defined]
        else:
            name = item.source_name
            try:
                measured = measure_sample(
                    item,
                    _WORKER["tokenizer"],
                    config.kind,
                    config.image_config,
                    config.seq_len,
                    config.verify_images,
                    config.video_config,
                )
                samples.append(measured)
                media["videos"] += measured.videos
                media["frames"] += measured.frames
                counts.add(name, PACKED)
                continue
            except BadSample as error:
                skip = (item.source, item.record, error.reason, error.describe())
        if config.on_error == "fail" and skip[2] not in ALWAYS_SKIPPED:
            return len(samples), 1, skip[3]
        skips.append(skip)
        counts.add(name, skip[2])
    counts.save(_WORKER["measure_dir"], index)  # before the table, which marks the unit done
    save_media_counts(_WORKER["measure_dir"], index, media)
    write_unit(_WORKER["measure_dir"], index, samples, skips)
    return len(samples), len(skips), None


# ----------------------------------------------------------------------------- phases


def measure(config: PackConfig, task: Task | None = None, progress: bool = True) -> dict[str, Any]:
    """Phase 1 for ``task``'s block of work units; skips units already measured."""
    started, task = time.perf_counter(), task or Task()
    run, sources = open_run(config)
    load_tokenizer(config.tokenizer)  # load (and fail) once before forking workers
    units = plan_units(sources, config.records_per_unit)
    mine = task.select(len(units))
    todo = missing_units(run.measure_dir, mine)
    bar = _progress(None, f"measure {task.name}", progress, "sample")
    samples = skipped = 0
    try:
        jobs = [(index, units[index]) for index in todo]
        initargs = (config, str(run.measure_dir))
        for count, skips, failure in _pool_map(
            _measure_unit, jobs, config.workers, _init_measure, initargs, ordered=True
        ):  # ordered: the first bad sample reported is the first in (source, record) order
            if failure is not None:
                raise PackingError(f"bad input: {failure}")
            samples, skipped = samples + count, skipped + skips
            bar.update(count + skips)
    finally:
        bar.close()
    summary = {
        "units": len(mine),
        "units_done_before": len(mine) - len(todo),
        "samples": samples,
        "skipped": skipped,
    }
    _record_task(run, "measure", task, started, **summary)
    return summary


def plan(config: PackConfig, progress: bool = True) -> dict[str, Any]:
    """Phase 2: merge the unit tables and save the plan (skipped if it exists)."""
    started = time.perf_counter()
    run, sources = open_run(config)
    if (run.plan_dir / "plan.json").is_file():
        return load_plan(run.plan_dir).info
    num_units = len(plan_units(sources, config.records_per_unit))
    missing = missing_units(run.measure_dir, range(num_units))
    if missing:
        raise PackingError(
            f"{run.measure_dir}: {len(missing)} of {num_units} work units not measured yet "
            f"(first: {missing[0]}); run --phase measure for every task first"
        )
    table = merge_units(run.measure_dir, num_units, run.table)
    reasons, examples, skipped = skip_summary(run.measure_dir, num_units)
    if len(table) == 0:
        raise PackingError("no usable samples: nothing to write (see the skip counts)")
    result = make_plan(
        table,
        config.seq_len,
        config.seed,
        config.max_packs_per_shard,
        config.max_shard_bytes,
        config.balance_vision,
        config.one_sample_per_pack,
    )
    result.info.update(
        samples_in=len(table) + skipped,
        samples_skipped=reasons,
        skipped_examples=examples,
        samples_per_source=merge_source_counts(run.measure_dir, num_units),
        videos=merge_media_counts(run.measure_dir, num_units),
    )
    save_plan(result, run.plan_dir)
    _record_task(run, "plan", Task(), started, samples=len(table))
    return result.info


def _init_write(config: PackConfig, run: Run, sources: list[Source]) -> None:
    _WORKER["config"] = config
    _WORKER["run"] = run
    _WORKER["sources"] = sources
    _WORKER["table"] = load_table(run.table)
    _WORKER["videos"] = load_video_table(run.table)
    _WORKER["plan"] = load_plan(run.plan_dir)


def _video_records(
    raw: RawSample, first: int, measured_videos: list[MeasuredVideo]
) -> tuple[list[dict[str, Any]], list[tuple[str, bytes]]]:
    """The ``videos`` entries of one sub-sample (:mod:`.pack_format`) and their parts, videos
    numbered from ``first`` in the pack, from what the measure phase found (no decoding)."""
    records, parts = [], []
    if len(measured_videos) != len(raw.videos):
        raise _changed(raw, f"{len(raw.videos)} videos, {len(measured_videos)} when measured")
    for index, (ref, measured) in enumerate(zip(raw.videos, measured_videos, strict=True)):
        data = raw.video_data[index] if raw.video_data else None
        if ref.file is not None and data is None:
            data = ref.read_bytes()
        if data is not None and len(data) != measured.num_bytes:
            raise _changed(raw, f"a video of {len(data)} bytes, {measured.num_bytes} when measured")
        if ref.file is None and len(ref.frames) != measured.total_frames:
            raise _changed(raw, f"{len(ref.frames)} frames, {measured.total_frames} when measured")
        number = first + index
        if ref.file is not None and data is not None:
            names = [video_part(number, measured.extension)]
            parts.append((names[0], data))
            frames = list(measured.plan.indices)
        else:  # frame images: only those sampled, renumbered in order
            used = sorted(set(measured.plan.indices))
            names = []
            for position, frame in enumerate(used):
                path = ref.frames[frame].path
                names.append(video_part(number, path.rsplit(".", 1)[-1].lower(), position))
                parts.append((names[-1], ref.frames[frame].read_bytes()))
            frames = [used.index(frame) for frame in measured.plan.indices]
        records.append(
            {
                "parts": names,
                "frames": frames,
                "size": [measured.width, measured.height],
                "grid_thw": list(measured.plan.grid_thw),
                "total_frames": measured.total_frames,
                "fps": measured.fps,
            }
        )
    return records, parts


def _changed(raw: RawSample, what: str) -> ValueError:
    return ValueError(
        f"{raw.origin}: changed since the measure phase ({what}); remove the partial output and "
        "pack again"
    )


def _pack_record(members: np.ndarray) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """One pack's JSON record and parts, from its members' rows of the sample table."""
    sources: list[Source] = _WORKER["sources"]
    samples, images = [], []
    num_videos = 0
    for member, row in zip(members, _WORKER["table"][members], strict=True):
        raw = read_sample(sources[int(row["source"])], int(row["record"]), int(row["loc"]))
        names, sizes = [], []
        for index, ref in enumerate(raw.images):
            data = raw.image_data[index] if raw.image_data is not None else ref.read_bytes()
            try:
                extension = _extension(data)
                sizes.append(list(read_image_size(data)))
            except (ValueError, ImageError) as error:
                raise corrupt_image_error(ref, str(error)).at(raw.origin) from error
            name = image_part(len(images), extension)
            images.append((name, data))
            names.append(name)
        sample: dict[str, Any] = {
            "id": raw.uid,
            "origin": raw.origin,
            "length": int(row["length"]),
            "num_patches": int(row["patches"]),
            "image_sizes": sizes,
            "messages": [message.to_json() for message in raw.messages],
            "images": names,
        }
        if raw.videos:
            config: PackConfig = _WORKER["config"]
            measured = replan_videos(_WORKER["videos"], int(member), config.video_config)
            sample["videos"], parts = _video_records(raw, num_videos, measured)
            num_videos += len(raw.videos)
            images.extend(parts)
        samples.append(sample)
    return {"samples": samples}, images


def _write_shard(shard: int) -> str:
    run: Run = _WORKER["run"]
    the_plan = _WORKER["plan"]
    name = shard_name(shard)
    final = run.dataset / name
    temp = final.with_name(final.name + ".tmp")
    first, end = int(the_plan.shard_offsets[shard]), int(the_plan.shard_offsets[shard + 1])
    with open(temp, "wb") as stream:
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for pack in range(first, end):
                start, stop = the_plan.pack_offsets[pack], the_plan.pack_offsets[pack + 1]
                members = the_plan.members[start:stop]
                try:
                    record, images = _pack_record(members)
                except (BadSample, ValueError, OSError) as error:
                    raise PackingError(f"while writing {name}: {error}") from error
                key = pack_key(pack)
                add_member(archive, f"{key}.{JSON_PART}", dumps(record))
                for part, data in images:
                    add_member(archive, f"{key}.{part}", data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temp, final)
    return name


def write(config: PackConfig, task: Task | None = None, progress: bool = True) -> dict[str, Any]:
    """Phase 3 for ``task``'s block of shards; skips shards already written."""
    started, task = time.perf_counter(), task or Task()
    run, sources = open_run(config)
    if not (run.plan_dir / "plan.json").is_file():
        raise PackingError(f"{run.plan_dir}: no plan yet; run --phase plan first")
    shards = load_plan(run.plan_dir).num_shards
    mine = task.select(shards)
    todo = [s for s in mine if not (run.dataset / shard_name(s)).is_file()]
    bar = _progress(len(mine), f"write {task.name}", progress, "shard")
    bar.update(len(mine) - len(todo))
    try:
        for _ in _pool_map(_write_shard, todo, config.workers, _init_write, (config, run, sources)):
            bar.update(1)
    finally:
        bar.close()
    summary = {"shards": len(mine), "written": len(todo)}
    _record_task(run, "write", task, started, **summary)
    return summary


def finalise(config: PackConfig, progress: bool = True) -> dict[str, Any]:
    """Phase 4: index, report, rename to ``OUT``; returns the report."""
    started = time.perf_counter()
    run, _ = open_run(config)
    if not (run.plan_dir / "plan.json").is_file():
        raise PackingError(f"{run.plan_dir}: no plan yet; run --phase plan first")
    info = load_plan(run.plan_dir).info
    names = [shard_name(index) for index in range(info["shards"])]
    missing = [name for name in names if not (run.dataset / name).is_file()]
    if missing:
        raise PackingError(
            f"{run.dataset}: {len(missing)} of {len(names)} shards not written yet "
            f"(first: {missing[0]}); run --phase write for every task first"
        )
    from .energon_dataset import index_webdataset  # imports energon: only this phase needs it

    index_webdataset(run.dataset, names, "PackedVLMWebdataset", config.kind, config.workers)
    _record_task(run, "finalise", Task(), started)
    report = build_report(config, info, {phase: _task_records(run, phase) for phase in PHASES})
    atomic_write(
        run.dataset / REPORT_NAME,
        lambda s: s.write((json.dumps(report, indent=2, sort_keys=True) + "\n").encode()),
    )
    os.rename(run.dataset, run.output)
    shutil.rmtree(run.partial)
    return report


# ----------------------------------------------------------------------------- report


def build_report(
    config: PackConfig, info: dict[str, Any], tasks: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """``pack_report.json``: the plan's statistics plus run-dependent timing and memory."""
    wall = {phase: round(sum(r["wall_s"] for r in tasks[phase]), 3) for phase in PHASES}
    wall["total"] = round(sum(wall.values()), 3)
    peak = {phase: max((r["peak_rss_bytes"] for r in tasks[phase]), default=0) for phase in PHASES}
    peak["max"] = max(peak.values())
    return {
        "samples_in": info["samples_in"],
        "samples_packed": info["samples"],
        "samples_skipped": info["samples_skipped"],
        "skipped_examples": info["skipped_examples"],
        "samples_per_source": info["samples_per_source"],
        "packs": info["packs"],
        "packs_lower_bound": info["packs_lower_bound"],
        "shards": info["shards"],
        "seq_len": config.seq_len,
        "kind": config.kind,
        "min_pixels": config.min_pixels,
        "max_pixels": config.max_pixels,
        "max_image_side": config.max_image_side,
        "videos": {
            "mode": config.videos,
            **info.get("videos", {"videos": 0, "frames": 0}),
            **_video_settings(config),
        },
        "algorithm": "one_sample_per_pack" if config.one_sample_per_pack else "best_fit_decreasing",
        "tokens": info["tokens"],
        "samples_per_pack": info["samples_per_pack"],
        "fill_efficiency": info["fill_efficiency"],
        "padding_compression": info["padding_compression"],
        "length_histogram": info["length_histogram"],
        "vision_patches_per_pack": info["vision_patches_per_pack"],
        "vision_balance": info["vision_balance"],
        "measure_tasks": len(tasks["measure"]),
        "write_tasks": len(tasks["write"]),
        "shards_written_this_run": sum(r["written"] for r in tasks["write"]),
        "wall_time_s": wall,
        "peak_rss_bytes": {
            **peak,
            "per_sample": round(peak["max"] / max(1, info["samples_in"]), 1),
        },
    }


def _video_settings(config: PackConfig) -> dict[str, Any]:
    """The video sampling settings, in the report when videos are packed."""
    if config.videos != "pack":
        return {}
    return {name: getattr(config, name) for name in VIDEO_FIELDS}


#: Report keys that depend on the run (timing, memory, how it was split), not on the data.
RUN_DEPENDENT_KEYS = (
    "wall_time_s",
    "peak_rss_bytes",
    "shards_written_this_run",
    "measure_tasks",
    "write_tasks",
)


# ----------------------------------------------------------------------------- entry point


def run(config: PackConfig, progress: bool = True) -> dict[str, Any]:
    """All four phases in this process (``workers`` processes each); returns the report.

    A re-run after an interruption resumes: finished units, the plan and finished shards are
    kept. Bad input (``on_error="fail"``) in a fresh run leaves nothing behind."""
    fresh = not partial_path(Path(config.output).expanduser().resolve()).exists()
    try:
        measure(config, Task(), progress)
    except (PackingError, ValueError, OSError):  # bad input: a bad sample, an unreadable file
        if fresh:
            remove_partial(config.output)
        raise
    plan(config, progress)
    write(config, Task(), progress)
    return finalise(config, progress)


def run_phase(config: PackConfig, phase: str, task: Task, progress: bool = True) -> dict[str, Any]:
    if phase == "all":
        if task.count != 1:
            raise ValueError("--num-tasks: only --phase measure and write run as several tasks")
        return run(config, progress)
    if phase in ("plan", "finalise") and task.count != 1:
        raise ValueError(f"--num-tasks: --phase {phase} is a single task")
    phases: dict[str, Callable[..., dict[str, Any]]] = {
        "measure": lambda: measure(config, task, progress),
        "plan": lambda: plan(config, progress),
        "write": lambda: write(config, task, progress),
        "finalise": lambda: finalise(config, progress),
    }
    return phases[phase]()


def format_summary(report: dict[str, Any], output: str) -> str:
    skipped = sum(report["samples_skipped"].values())
    per_source = report["samples_per_source"]
    balance = report["vision_balance"]
    spread = f"ViT cost max/mean {balance['without']['vit_cost_max_over_mean']:.3f}"
    if balance["with"]:
        spread += f" -> {balance['with']['vit_cost_max_over_mean']:.3f} balanced"
    peak = report["peak_rss_bytes"]
    lines = [
        f"packed {report['samples_packed']}/{report['samples_in']} samples into "
        f"{report['packs']} packs of <= {report['seq_len']} tokens "
        f"({report['shards']} shards) -> {output}",
        f"  samples/pack {report['samples_per_pack']:.2f}  fill efficiency "
        f"{report['fill_efficiency']:.4f}  padding compression "
        f"{report['padding_compression'] or float('inf'):.2f}x  "
        f"(lower bound {report['packs_lower_bound']} packs)  {spread}",
        f"  skipped {skipped}: {report['samples_skipped'] or '{}'}",
        f"  videos ({report['videos']['mode']}): {report['videos']['videos']} packed, "
        f"{report['videos']['frames']} frames",
        f"  sources {len(per_source)} (packed/in): "
        + ", ".join(f"{name} {c['packed']}/{c['in']}" for name, c in list(per_source.items())[:8])
        + (" …" if len(per_source) > 8 else ""),
        "  wall time (task-seconds) "
        + "  ".join(f"{k} {v:.1f}" for k, v in report["wall_time_s"].items())
        + f"  peak RSS {peak['max'] / 2**20:.0f} MiB ({peak['per_sample']:.0f} B/sample)",
    ]
    return "\n".join(lines)


def format_task_summary(phase: str, task: Task, result: dict[str, Any]) -> str:
    if phase == "plan":
        return f"plan: {result['packs']} packs in {result['shards']} shards"
    details = "  ".join(f"{key} {value}" for key, value in result.items())
    return f"{phase} task {task.index}/{task.count}: {details}"


def remove_partial(output: str) -> None:
    """Delete an interrupted run's partial folder."""
    shutil.rmtree(partial_path(Path(output).expanduser().resolve()), ignore_errors=True)
