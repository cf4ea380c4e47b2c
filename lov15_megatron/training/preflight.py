"""Checks of a run's inputs that need no torch: they run before anything heavy is imported,
so a user's mistake ends in one line within a second (``python -m lov15_megatron.train``).
"""

from __future__ import annotations

from pathlib import Path

from lov15_megatron.checkpoint_dir import METADATASET_SUFFIXES, packed_video_settings
from lov15_megatron.config import ConfigError, RunConfig
from lov15_megatron.config.schema import IMAGE_TOKEN_FIELDS
from lov15_megatron.data.special_tokens import (
    IMAGE_PAD,
    SPECIAL_TOKEN_IDS,
    VIDEO_PAD,
    VIDEO_PAD_ID,
    VISION_END,
    VISION_START,
)


def check_data_inputs(cfg: RunConfig) -> None:
    """``data.path`` / ``data.valid_path`` must be Energon datasets (or metadataset YAMLs)
    before any rank starts reading, and a VLM's image token ids must be the ones the data is
    tokenized with (:func:`check_image_token_ids`), and the packed directories of a metadataset
    must have sampled their videos alike (``checkpoint_dir.packed_video_settings``); a
    ``ConfigError`` names the field and what is wrong."""
    if cfg.data.loader != "energon":
        return
    check_image_token_ids(cfg)
    for field, value in (("data.path", cfg.data.path), ("data.valid_path", cfg.data.valid_path)):
        if value is None:
            continue
        path = Path(value)
        if not path.exists():
            raise ConfigError(f"{field}={value}: no such file or directory")
        if path.is_file():
            if path.suffix not in METADATASET_SUFFIXES:
                raise ConfigError(
                    f"{field}={value}: a file, but not a metadataset YAML; give the directory "
                    f"that tools/pack_offline.py wrote"
                )
        elif not (path / ".nv-meta" / "dataset.yaml").exists():
            raise ConfigError(
                f"{field}={value}: not an Energon dataset (no .nv-meta/dataset.yaml); make one "
                f"with tools/pack_offline.py"
            )
    packed_video_settings(cfg.data.path)  # a metadataset's packed dirs must sample videos alike


def check_image_token_ids(cfg: RunConfig) -> None:
    """A VLM trained on Energon data must look for its images where the data puts them.

    The data pipeline writes each image block with the tokenizer's ``<|vision_start|>``,
    ``<|image_pad|>`` and ``<|vision_end|>`` ids; ``load_tokenizer`` refuses any tokenizer whose
    special-token ids differ from :mod:`lov15_megatron.data.special_tokens`, so those are the
    data's ids. A ``model.vision`` id that differs would place no image (or the wrong tokens):
    a ``ConfigError`` naming the field, before anything is read.
    """
    vision = cfg.model.vision
    if vision is None or cfg.data.loader != "energon":
        return
    tokens = dict(zip(IMAGE_TOKEN_FIELDS, (IMAGE_PAD, VISION_START, VISION_END), strict=True))
    for name, token in tokens.items():
        value, data_id = getattr(vision, name), SPECIAL_TOKEN_IDS[token]
        if value != data_id:
            raise ConfigError(
                f"model.vision.{name}={value} differs from the {token} id {data_id} of the "
                f"tokenizer data.tokenizer={cfg.data.tokenizer} that the training data is "
                f"tokenized with; set it to {data_id}"
            )
    # Videos: the data writes the tokenizer's <|video_pad|>; a set id must be that one (null
    # resolves to it whenever the vocabulary holds it).
    if vision.video_token_id is not None and vision.video_token_id != VIDEO_PAD_ID:
        raise ConfigError(
            f"model.vision.video_token_id={vision.video_token_id} differs from the {VIDEO_PAD} "
            f"id {VIDEO_PAD_ID} of the tokenizer data.tokenizer={cfg.data.tokenizer} that the "
            f"training data is tokenized with; set it to {VIDEO_PAD_ID} (or null)"
        )
