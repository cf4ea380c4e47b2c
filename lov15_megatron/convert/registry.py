"""The model registry: every model the converter, the trainer and ``verify`` know, by name.

One :class:`ModelEntry` per model family names its converter (``convert/converter.py``: the
Megatron provider, the mapping table, the HF config ⇄ run-config translation and the HF
export). Language-model families (:data:`LANGUAGE_FAMILIES`) are also what the vision-language
model is built over: ``llava-ov-1.5`` takes whichever family its ``text_config`` (HF) or its
``model.language`` (run config) describes. Adding a model is adding an entry and its table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lov15_megatron.config import LanguageModelConfig, RunConfig
from lov15_megatron.convert.mapping import ConversionError

if TYPE_CHECKING:  # imported on first use at run time (see ModelEntry.converter)
    from lov15_megatron.convert.converter import Converter
    from lov15_megatron.convert.qwen3 import Qwen3Family


@dataclass(frozen=True)
class ModelEntry:
    name: str  # the --model name
    summary: str  # one line for --help
    converter: str  # "module:Class" (imported on first use: the CLI's --help stays fast)
    accepts: Callable[[RunConfig], bool]  # whether a run config describes this model

    def load(self) -> Converter:
        return _instantiate(self.converter)


def _instantiate(path: str) -> Any:
    """A new instance of the class that ``path`` ("module:Class") names."""
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)()


def _language_only(experts: bool) -> Callable[[RunConfig], bool]:
    def accepts(cfg: RunConfig) -> bool:
        lm = cfg.model.language
        return cfg.model.vision is None and (lm.num_experts is not None) == experts

    return accepts


_ENTRIES = (
    ModelEntry(
        "qwen3",
        "Qwen3ForCausalLM (dense Qwen3 LM: 4B, 8B, 14B, ...)",
        "lov15_megatron.convert.qwen3:Qwen3Converter",
        _language_only(experts=False),
    ),
    ModelEntry(
        "qwen3-moe",
        "Qwen3MoeForCausalLM (mixture of experts: 30B-A3B, ...)",
        "lov15_megatron.convert.qwen3_moe:Qwen3MoeConverter",
        _language_only(experts=True),
    ),
    ModelEntry(
        "llava-ov-1.5",
        "LLaVA-OneVision-1.5: Rice ViT + merger over a qwen3 or qwen3-moe LM",
        "lov15_megatron.convert.llava_ov:LLaVAOneVisionConverter",
        lambda cfg: cfg.model.vision is not None,
    ),
)
REGISTRY: dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}
MODELS = tuple(REGISTRY)


def get_converter(name: str) -> Converter:
    """The converter registered as ``name`` (ConversionError listing the known names)."""
    if name not in REGISTRY:
        raise ConversionError(f"unknown --model {name!r}; registered models: {', '.join(MODELS)}")
    return REGISTRY[name].load()


def converter_for_config(cfg: RunConfig) -> Converter:
    """The converter of the model a run config describes (the trainer's model provider)."""
    matches = [e for e in _ENTRIES if e.accepts(cfg)]
    if len(matches) != 1:
        raise ConversionError(f"no single registered model fits this config: {matches}")
    return matches[0].load()


LANGUAGE_FAMILIES = (
    "lov15_megatron.convert.qwen3:Qwen3Family",
    "lov15_megatron.convert.qwen3_moe:Qwen3MoeFamily",
)


def _language_families() -> list[Qwen3Family]:
    """One instance of each language-model family (Qwen3Family is the base class of them all)."""
    return [_instantiate(path) for path in LANGUAGE_FAMILIES]


def language_family(lm: LanguageModelConfig) -> Qwen3Family:
    """The LM family of a run config's ``model.language`` (exactly one matches)."""
    (family,) = [f for f in _language_families() if f.matches(lm)]
    return family


def language_family_of_hf(text_config: dict[str, Any]) -> Qwen3Family:
    """The LM family of an HF (text) ``config.json`` by its ``model_type`` (the release's
    ``LLaVAOneVision1_5_text`` is qwen3, or qwen3-moe when it has experts)."""
    from lov15_megatron.hf.configuration_llavaonevision1_5 import (
        RELEASE_TEXT_MODEL_TYPE,
        text_model_type,
    )

    model_type = text_model_type(text_config)
    for family in _language_families():
        if family.hf_model_type == model_type:
            return family
    known = ", ".join([*(f.hf_model_type for f in _language_families()), RELEASE_TEXT_MODEL_TYPE])
    raise ConversionError(
        f"config.json: language model_type {model_type!r} is not registered (known: {known})"
    )
