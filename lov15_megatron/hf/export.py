"""Write a checkpoint directory that the ecosystem's tools load as it is.

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` needs ``config.json`` to
carry an ``auto_map`` naming the classes, and the modeling files next to the weights;
``AutoProcessor`` / ``AutoTokenizer`` (the model card's quick start, lmms-eval) need the
processor and tokenizer files. :func:`write_hf_assets` writes those (see
``docs/exports-and-evaluation.md``):

- ``tokenizer.json`` + ``tokenizer_config.json`` (+ whatever else the source has) copied from a
  tokenizer directory, or generated from the offline Qwen vocabulary;
- ``chat_template.jinja``: the training template (``lov15_megatron.data.chat``);
- ``preprocessor_config.json`` / ``processor_config.json``: our processor classes
  (``processing_llavaonevision1_5.py``, through ``auto_map``) with the run's image settings and,
  for a run that trained on packed videos, their sampling settings (:func:`write_video_settings`);
- ``generation_config.json``: eos ``<|im_end|>``, pad ``<|endoftext|>``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from lov15_megatron.data.chat import CHAT_TEMPLATE_JINJA
from lov15_megatron.data.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_IMAGE_CONFIG,
    MERGE_SIZE,
    PATCH_SIZE,
    ImageConfig,
)
from lov15_megatron.data.special_tokens import ENDOFTEXT_ID, IM_END_ID

from .remote_code import CODE_FILES

#: The ``auto_map`` written into ``config.json``.
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_llavaonevision1_5.LLaVAOneVision1_5_Config",
    "AutoModelForCausalLM": (
        "modeling_llavaonevision1_5.LLaVAOneVision1_5_ForConditionalGeneration"
    ),
    "AutoModelForImageTextToText": (
        "modeling_llavaonevision1_5.LLaVAOneVision1_5_ForConditionalGeneration"
    ),
    "AutoProcessor": "processing_llavaonevision1_5.LLaVAOneVision1_5_Processor",
}

#: ``auto_map`` of ``preprocessor_config.json`` / ``processor_config.json``.
PROCESSOR_AUTO_MAP: dict[str, str] = {
    "AutoImageProcessor": "processing_llavaonevision1_5.LLaVAOneVision1_5_ImageProcessor",
    "AutoProcessor": "processing_llavaonevision1_5.LLaVAOneVision1_5_Processor",
}

#: Tokenizer files copied from a tokenizer directory (those it has).
TOKENIZER_SOURCE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
GENERATION_FILE = "generation_config.json"
#: What :func:`write_hf_assets` guarantees in a directory (besides weights, config and code).
ASSET_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    CHAT_TEMPLATE_FILE,
    PREPROCESSOR_FILE,
    PROCESSOR_FILE,
    GENERATION_FILE,
)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def image_processor_config(image: ImageConfig = DEFAULT_IMAGE_CONFIG) -> dict[str, Any]:
    """``preprocessor_config.json`` of :class:`LLaVAOneVision1_5_ImageProcessor` for ``image``."""
    return {
        "auto_map": dict(PROCESSOR_AUTO_MAP),
        "image_processor_type": "LLaVAOneVision1_5_ImageProcessor",
        "processor_class": "LLaVAOneVision1_5_Processor",
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "resample": 3,  # bicubic
        "rescale_factor": 1 / 255,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "patch_size": PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "temporal_patch_size": 1,
        "min_pixels": image.min_pixels,
        "max_pixels": image.max_pixels,
        "size": {"shortest_edge": image.min_pixels, "longest_edge": image.max_pixels},
        "max_image_side": image.max_image_side,
    }


def image_config_of(directory: str | Path) -> ImageConfig | None:
    """The :class:`ImageConfig` recorded in ``directory``'s ``preprocessor_config.json``."""
    path = Path(directory) / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    size = data.get("size") or {}
    return ImageConfig(
        min_pixels=int(data.get("min_pixels") or size.get("shortest_edge")),
        max_pixels=int(data.get("max_pixels") or size.get("longest_edge")),
        max_image_side=data.get("max_image_side"),
    )


def write_hf_assets(
    directory: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    image: ImageConfig | None = None,
    keep_existing: bool = False,
) -> list[str]:
    """Write the tokenizer, chat template, processor and generation files into ``directory``.

    ``tokenizer_dir``: copy its tokenizer files (it must have ``tokenizer.json``); ``None``
    generates the offline Qwen tokenizer. ``image``: the run's image settings (default: the
    release's training budget). ``keep_existing``: files already in ``directory`` (copied from a
    template) stay as they are, byte for byte, and only missing ones are written; with
    ``image`` given, ``preprocessor_config.json`` is still rewritten. Returns the names written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def missing(name: str) -> bool:
        return not (keep_existing and (directory / name).is_file())

    if missing("tokenizer.json") or missing("tokenizer_config.json"):
        written += write_tokenizer(directory, tokenizer_dir)
    if missing(CHAT_TEMPLATE_FILE) and missing("chat_template.json"):  # legacy file: keep it alone
        (directory / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE_JINJA)
        written.append(CHAT_TEMPLATE_FILE)
    if missing(PREPROCESSOR_FILE) or image is not None:
        _write_json(
            directory / PREPROCESSOR_FILE, image_processor_config(image or DEFAULT_IMAGE_CONFIG)
        )
        written.append(PREPROCESSOR_FILE)
    if missing(PROCESSOR_FILE):
        processor = {
            "auto_map": dict(PROCESSOR_AUTO_MAP),
            "processor_class": "LLaVAOneVision1_5_Processor",
        }
        _write_json(directory / PROCESSOR_FILE, processor)
        written.append(PROCESSOR_FILE)
    if missing(GENERATION_FILE):
        generation = {
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": IM_END_ID,
            "pad_token_id": ENDOFTEXT_ID,
        }
        _write_json(directory / GENERATION_FILE, generation)
        written.append(GENERATION_FILE)
    return written


def write_video_settings(directory: str | Path, video: dict[str, Any]) -> None:
    """Put a run's video sampling settings (``fps``, ``min_frames``, ``max_frames``,
    ``frame_min_pixels``, ``frame_max_pixels``, ``video_max_pixels``: what
    ``checkpoint_dir.packed_video_settings`` read from its packed data) into ``directory``'s
    ``processor_config.json``, whose other keys stay; the processor reads them as its
    attributes, so that it samples each video as the packer did for training."""
    path = Path(directory) / PROCESSOR_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("auto_map", dict(PROCESSOR_AUTO_MAP))
    data.setdefault("processor_class", "LLaVAOneVision1_5_Processor")
    _write_json(path, {**data, **video})


def write_tokenizer(directory: Path, tokenizer_dir: str | Path | None) -> list[str]:
    """Tokenizer files into ``directory``: copied from ``tokenizer_dir`` or generated offline."""
    source = Path(tokenizer_dir) if tokenizer_dir is not None else None
    names = [n for n in TOKENIZER_SOURCE_FILES if source is not None and (source / n).is_file()]
    if source is not None and ("tokenizer.json" in names or "vocab.json" in names):
        for name in names:
            shutil.copyfile(source / name, directory / name)
        return names
    from lov15_megatron.data.tokenizer import OFFLINE_QWEN, load_tokenizer

    before = {p.name for p in directory.iterdir()}
    load_tokenizer(OFFLINE_QWEN).save_pretrained(directory)
    return sorted({p.name for p in directory.iterdir()} - before) or ["tokenizer.json"]


def write_model_code(save_dir: str | Path) -> list[Path]:
    """Copy the configuration and modeling files into ``save_dir``; return the written paths."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in CODE_FILES:
        target = save_dir / source.name
        shutil.copyfile(source, target)
        written.append(target)
    return written


def add_auto_map(config_path: str | Path) -> None:
    """Add :data:`AUTO_MAP` (and the architecture name) to an existing ``config.json``."""
    config_path = Path(config_path)
    data = json.loads(config_path.read_text())
    data["auto_map"] = dict(AUTO_MAP)
    data["architectures"] = ["LLaVAOneVision1_5_ForConditionalGeneration"]
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(config_path)


def save_pretrained_with_code(
    model: PreTrainedModel,
    save_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    image: ImageConfig | None = None,
    **save_kwargs: Any,
) -> Path:
    """``model.save_pretrained(save_dir)`` plus ``auto_map``, the code and the assets.

    Tensor names on disk are the release's (``visual.…``, ``model.…``, ``lm_head.weight``).
    ``tokenizer_dir`` / ``image`` go to :func:`write_hf_assets`; the other keyword arguments to
    ``save_pretrained`` (e.g. ``max_shard_size``).
    """
    save_dir = Path(save_dir)
    model.save_pretrained(save_dir, **save_kwargs)
    add_auto_map(save_dir / "config.json")
    write_model_code(save_dir)
    write_hf_assets(save_dir, tokenizer_dir=tokenizer_dir, image=image)
    return save_dir


__all__ = [
    "ASSET_FILES",
    "AUTO_MAP",
    "CODE_FILES",
    "PROCESSOR_AUTO_MAP",
    "add_auto_map",
    "image_config_of",
    "image_processor_config",
    "save_pretrained_with_code",
    "write_hf_assets",
    "write_model_code",
    "write_tokenizer",
]
