"""The model registry: every model family, by name, registered by its own folder.

A family is one folder ``models/<family>/`` holding its Megatron model and specs, its HF mapping
table and config translation, how a training micro-batch becomes its model's inputs and, where
it has one, its stage-0 rules. Its ``family.py`` defines one :class:`ModelFamily` subclass and
registers it with :func:`register_family`. The registry finds the folders itself (every
subpackage of ``lov15_megatron.models`` with a ``family.py``: ``models/catalog.py``), so adding a
family is adding a folder (``CONTRIBUTING.md``, "Adding a model family"). The names, summaries and
order are also known without importing any family (``models/catalog.py`` reads them from the
classes' source): the converter's ``--help`` and its unknown-``--model`` error start in a fraction
of a second instead of importing torch and Megatron-Core.

The registered family is the one place the trainer (:func:`family_for_config`), the converter,
``verify`` and the HF export (:func:`get_family`) ask. Language-model families
(``is_language_model``) are also what the vision-language model is built over: ``llava-ov-1.5``
takes whichever of them its ``text_config`` (HF) or its ``model.language`` (run config)
describes (:func:`language_family`, :func:`language_family_of_hf`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, TypeVar

from lov15_megatron.config import LanguageModelConfig, RunConfig
from lov15_megatron.convert.converter import Converter
from lov15_megatron.convert.mapping import ConversionError, MappingTable, ParamMapping
from lov15_megatron.models.catalog import catalog, check_model_name, family_modules


class ModelFamily(Converter):
    """A registered model: the conversion interface (:class:`Converter`) plus what training asks.

    Subclasses set ``name`` (the ``--model`` name), ``summary`` (one line for ``--help``) and
    ``hf_architecture``, and implement :meth:`accepts` and :meth:`forward_inputs` besides the
    converter's methods. ``name``, ``summary`` and ``is_language_model`` are literals in the class
    body (or inherited from another family): ``models/catalog.py`` reads them without importing.
    """

    summary: str = ""
    #: A language model that the vision-language model can be built over.
    is_language_model: bool = False
    #: The HF ``model_type`` of a language family (its ``config.json``/``text_config``).
    hf_model_type: str = ""

    def accepts(self, cfg: RunConfig) -> bool:
        """Whether a run config describes this model (exactly one family accepts each)."""
        raise NotImplementedError

    def forward_inputs(
        self, cfg: RunConfig, batch: dict[str, Any], layout: dict[str, int]
    ) -> dict[str, Any]:
        """The model's keyword arguments for one training micro-batch already on its device.

        ``layout`` is this rank's ``cp``, ``cp_rank`` and ``total_multiple_of`` (the THD stream's
        required multiple); the generic forward step (``training/step.py``) calls the model with
        what this returns and computes the loss from ``batch["loss_mask"]``.
        """
        raise NotImplementedError

    def tower_prefixes(self) -> dict[str, str]:
        """Each tower of the model (``language``, ``vision``, ``merger``: the names of
        ``peft.towers``) by the module-name prefix of its layers. A language model is one tower
        (the default); the VLM names its three."""
        if self.is_language_model:
            return {"language": ""}
        raise NotImplementedError(f"{self.name} does not say which modules are which tower")

    def step_losses(self, cfg: RunConfig, num_microbatches: int) -> dict[str, float]:
        """Auxiliary losses of the last step for the training log (every rank calls it)."""
        return {}

    def discard_step_losses(self) -> None:
        """Forget auxiliary losses recorded outside training steps (validation)."""

    # Language families (is_language_model) also provide these for the VLM's LM.
    def matches(self, lm: LanguageModelConfig) -> bool:
        """Whether ``model.language`` is this language family's."""
        raise NotImplementedError

    def language_config(self, hf: dict[str, Any]) -> LanguageModelConfig:
        raise NotImplementedError

    def hf_text_config(self, lm: LanguageModelConfig, template: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def rows(
        self, cfg: RunConfig, mcore: str = "", hf: str = "model.", head: str = "lm_head."
    ) -> list[ParamMapping]:
        """The LM's mapping rows under the given Megatron and HF prefixes."""
        raise NotImplementedError

    def table(self, cfg: RunConfig) -> MappingTable:
        return MappingTable(self.rows(cfg))


_FAMILIES: dict[str, ModelFamily] = {}
_discovered = False
F = TypeVar("F", bound=type[ModelFamily])


def register_family(cls: F) -> F:
    """Class decorator: register one instance of a :class:`ModelFamily` under ``cls.name``."""
    if cls.name in _FAMILIES and type(_FAMILIES[cls.name]) is not cls:
        raise ValueError(f"model family {cls.name!r} is registered twice")
    _FAMILIES[cls.name] = cls()
    return cls


def _discover() -> None:
    """Import ``models/<family>/family.py`` of every family folder (each registers itself) and
    check that they registered the families the catalog read from their source."""
    global _discovered
    if _discovered:
        return
    for module in family_modules():
        importlib.import_module(module)
    if set(_FAMILIES) != set(catalog()):
        raise RuntimeError(
            f"the family folders registered {sorted(_FAMILIES)} but their source declares "
            f"{sorted(catalog())} (models/catalog.py)"
        )
    _discovered = True


def families() -> dict[str, ModelFamily]:
    """Every registered family by name, in the catalog's order: the language models first (those
    the others are built over), each group by name."""
    _discover()
    return {name: _FAMILIES[name] for name in catalog()}


def model_names() -> tuple[str, ...]:
    """The registered names (no family is imported)."""
    return tuple(catalog())


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name`` (ConversionError listing the known names; an unknown
    name imports no family)."""
    check_model_name(name)
    return families()[name]


def family_for_config(cfg: RunConfig) -> ModelFamily:
    """The family of the model a run config describes (the trainer's model provider)."""
    matches = [f for f in families().values() if f.accepts(cfg)]
    if len(matches) != 1:
        names = [f.name for f in matches]
        raise ConversionError(f"no single registered model fits this config: {names}")
    return matches[0]


def _language_families() -> Iterator[ModelFamily]:
    return (f for f in families().values() if f.is_language_model)


def language_family(lm: LanguageModelConfig) -> ModelFamily:
    """The LM family of a run config's ``model.language`` (exactly one matches)."""
    (family,) = [f for f in _language_families() if f.matches(lm)]
    return family


def language_family_of_hf(text_config: dict[str, Any]) -> ModelFamily:
    """The LM family of an HF (text) ``config.json`` by its ``model_type`` (the release's
    ``LLaVAOneVision1_5_text`` is qwen3, or qwen3-moe when it has experts)."""
    from lov15_megatron.hf.remote_code.configuration_llavaonevision1_5 import (
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
