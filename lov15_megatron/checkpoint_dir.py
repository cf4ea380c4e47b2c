"""The on-disk layout of checkpoint directories, shared by training and conversion.

A **weights directory** (what ``tools/convert_checkpoint.py hf-to-mcore`` writes and what a stage
starts from) is one Megatron-Core ``torch_dist`` checkpoint plus :data:`MODEL_FILE`. A
**training root** holds one such directory per saved iteration, ``iter_0000100/`` …, and
:data:`LATEST`, the number of the newest complete one. Wherever a checkpoint is read (resume,
``checkpoint.pretrained``, ``mcore-to-hf``), a training root stands for its latest iteration
(:func:`resolve`).

:data:`MODEL_FILE` (``lov15_model.json``) records what the tensors are: the registered model
name, the run config's ``model`` section, the Hugging Face config the weights came from (the
template of an export), the dtype and, for a training run, its image settings and, when it
trained on packed videos, their sampling settings (:func:`packed_video_settings`: of one packed
directory, or agreed by every packed directory of a metadataset).

This module knows only paths and JSON; it imports neither torch nor Megatron.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lov15_megatron.data.pack_format import REPORT_NAME

LATEST = "latest_checkpointed_iteration.txt"
MODEL_FILE = "lov15_model.json"


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def saved_iterations(root: str | os.PathLike) -> list[int]:
    """The iterations with a (complete, renamed) directory under ``root``, ascending."""
    names = (p.name.removeprefix("iter_") for p in Path(root).glob("iter_*"))
    return sorted(int(n) for n in names if n.isdigit())


def read_latest(root: str | os.PathLike) -> int:
    text = (Path(root) / LATEST).read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{Path(root) / LATEST} holds {text!r}, not an iteration number")
    return int(text)


def write_latest(root: str | os.PathLike, iteration: int) -> None:
    """Point :data:`LATEST` at ``iteration`` atomically (write a temporary file, then rename)."""
    tracker = Path(root) / (LATEST + ".tmp")
    tracker.write_text(f"{iteration}\n")
    os.replace(tracker, Path(root) / LATEST)


def has_checkpoint(root: str | os.PathLike | None) -> bool:
    """Whether ``root`` is a training root with at least one complete iteration."""
    return root is not None and (Path(root) / LATEST).exists()


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory: a training root resolves to its latest iteration."""
    path = Path(path)
    return iteration_dir(path, read_latest(path)) if has_checkpoint(path) else path


def model_file_text(meta: dict[str, Any]) -> str:
    return json.dumps(meta, indent=2, sort_keys=True) + "\n"


def read_model_file(path: str | os.PathLike) -> dict[str, Any] | None:
    """:data:`MODEL_FILE` of a checkpoint directory or training root; ``None`` when absent."""
    file = resolve(path) / MODEL_FILE
    return json.loads(file.read_text()) if file.exists() else None


#: The packer's report beside the shards (named where the pack format is).
PACK_REPORT = REPORT_NAME
#: Video sampling settings: their names in the exported processor (and ``data/video.py``'s
#: ``VideoConfig``) and in the pack report's ``videos`` entry (the packer's flags).
PACK_VIDEO_FIELDS = {
    "fps": "fps",
    "min_frames": "fps_min_frames",
    "max_frames": "fps_max_frames",
    "frame_min_pixels": "frame_min_pixels",
    "frame_max_pixels": "frame_max_pixels",
    "video_max_pixels": "video_max_pixels",
}


def packed_video_settings(data_path: str | os.PathLike | None) -> dict[str, Any] | None:
    """How the videos of the packed data at ``data_path`` were sampled (fps, frame counts, pixel
    budgets), read from its pack report; ``None`` when it packed no videos.

    ``data_path`` is one packed directory or a metadataset YAML: then the packed directories of
    its train split (:func:`metadataset_dirs`) that packed videos must all agree, and theirs are
    the settings; directories without videos (or without a pack report) are ignored. Two that
    disagree are a :class:`~lov15_megatron.config.ConfigError` naming both and the first setting
    that differs: the export carries one sampling, so one of them would be sampled unlike its
    training.

    The packer is the settings' one home: it samples each video's frames and fixes their grid,
    and the task encoder decodes exactly those frames (nothing re-sampled, so the run's config
    has no video fields). A processor that is to show a model what training showed it must
    sample with these settings."""
    if data_path is None:
        return None
    path = Path(data_path)
    if not (path.is_file() and path.suffix in METADATASET_SUFFIXES):
        return _dir_video_settings(path)
    found: tuple[Path, dict[str, Any]] | None = None
    for directory in metadataset_dirs(path):
        settings = _dir_video_settings(directory)
        if settings is None:
            continue
        if found is None:
            found = directory, settings
            continue
        differs = [name for name in PACK_VIDEO_FIELDS if settings[name] != found[1][name]]
        if differs:
            from lov15_megatron.config import ConfigError

            name = differs[0]
            flag = "--" + PACK_VIDEO_FIELDS[name].replace("_", "-")
            raise ConfigError(
                f"data.path={data_path}: {found[0]} and {directory} packed videos with different "
                f"{flag} ({found[1][name]} vs {settings[name]}); an export samples videos one "
                f"way: pack them with the same video settings"
            )
    return found[1] if found else None


def _dir_video_settings(directory: Path) -> dict[str, Any] | None:
    """The video settings of one packed directory's pack report; ``None`` without videos."""
    report = directory / PACK_REPORT
    if not report.is_file():
        return None
    videos = json.loads(report.read_text()).get("videos") or {}
    if videos.get("mode") != "pack":
        return None
    return {name: videos[key] for name, key in PACK_VIDEO_FIELDS.items()}


#: A ``data.path`` file with one of these suffixes is an Energon metadataset.
METADATASET_SUFFIXES = (".yaml", ".yml")


def metadataset_dirs(path: str | os.PathLike, _seen: frozenset[Path] = frozenset()) -> list[Path]:
    """The dataset directories an Energon metadataset YAML names for its train split (the whole
    file when it has no ``splits``), in order: every ``path`` of its entries (``blend``,
    ``blend_epochized``, ``join``, a single dataset), relative ones from the YAML's folder as
    Energon resolves them, a nested metadataset followed (once)."""
    import yaml

    path = Path(path).resolve()
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        from lov15_megatron.config import ConfigError

        problem = str(error).splitlines()[0]
        raise ConfigError(f"{path}: not a readable metadataset YAML ({problem})") from None
    splits = document.get("splits") if isinstance(document, dict) else None
    root = splits.get("train", splits) if isinstance(splits, dict) else document
    dirs: list[Path] = []
    for value in _entry_paths(root):
        target = Path(os.path.normpath(path.parent / value))  # an absolute value stays
        if target.suffix in METADATASET_SUFFIXES and target.is_file():
            if target.resolve() not in _seen | {path}:
                dirs += metadataset_dirs(target, _seen | {path})
        else:
            dirs.append(target)
    return dirs


def _entry_paths(node: Any) -> list[str]:
    """The ``path`` strings of a metadataset's dataset entries, depth first."""
    if isinstance(node, dict):
        if isinstance(node.get("path"), str):
            return [node["path"]]
        return [p for value in node.values() for p in _entry_paths(value)]
    if isinstance(node, list):
        return [p for value in node for p in _entry_paths(value)]
    return []


def describe_model(cfg, source: str | os.PathLike | None, model: str) -> dict[str, Any]:
    """:data:`MODEL_FILE` of a training run: the registered ``model`` name and the run's model
    config, the HF config template (inherited from ``source``, the checkpoint the run started
    from, when it has one), the dtype, the run's image settings and the video sampling settings
    of its packed data (:func:`packed_video_settings`; else those ``source`` recorded, if any):
    ``mcore-to-hf`` writes both into the exported processor."""
    from lov15_megatron.config import config_to_dict

    inherited = read_model_file(source) if source is not None else None
    video = packed_video_settings(cfg.data.path) if cfg.data.loader == "energon" else None
    video = video or (inherited or {}).get("video")
    return {
        "model": model,
        "model_config": config_to_dict(cfg)["model"],
        "hf_config": (inherited or {}).get("hf_config", {}),
        "dtype": cfg.model.params_dtype,
        "image": {
            "min_pixels": cfg.data.min_pixels,
            "max_pixels": cfg.data.max_pixels,
            "max_image_side": cfg.data.max_image_side,
        },
        **({"video": video} if video else {}),
    }


__all__ = [
    "LATEST",
    "MODEL_FILE",
    "describe_model",
    "metadataset_dirs",
    "packed_video_settings",
    "has_checkpoint",
    "iteration_dir",
    "model_file_text",
    "read_latest",
    "read_model_file",
    "resolve",
    "saved_iterations",
    "write_latest",
]
