"""Write a checkpoint directory that loads with ``trust_remote_code=True``.

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` needs ``config.json`` to
carry an ``auto_map`` naming the classes, and the two modeling files next to the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from . import configuration_llavaonevision1_5, modeling_llavaonevision1_5

#: The ``auto_map`` written into ``config.json``.
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_llavaonevision1_5.LLaVAOneVision1_5_Config",
    "AutoModelForCausalLM": (
        "modeling_llavaonevision1_5.LLaVAOneVision1_5_ForConditionalGeneration"
    ),
    "AutoModelForImageTextToText": (
        "modeling_llavaonevision1_5.LLaVAOneVision1_5_ForConditionalGeneration"
    ),
}

#: The source files that make the model loadable as remote code.
CODE_FILES: tuple[Path, ...] = (
    Path(configuration_llavaonevision1_5.__file__),
    Path(modeling_llavaonevision1_5.__file__),
)


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
    model: PreTrainedModel, save_dir: str | Path, **save_kwargs: Any
) -> Path:
    """``model.save_pretrained(save_dir)`` plus ``auto_map`` and the two modeling files.

    Tensor names on disk are the release's (``visual.…``, ``model.…``, ``lm_head.weight``).
    Extra keyword arguments go to ``save_pretrained`` (e.g. ``max_shard_size``).
    """
    save_dir = Path(save_dir)
    model.save_pretrained(save_dir, **save_kwargs)
    add_auto_map(save_dir / "config.json")
    write_model_code(save_dir)
    return save_dir


__all__ = [
    "AUTO_MAP",
    "CODE_FILES",
    "add_auto_map",
    "save_pretrained_with_code",
    "write_model_code",
]
