"""What the model-independent conversion (``convert/core.py``, ``verify.py``) asks of a
model: the interface every registered converter implements (``models/registry.py``).

A converter names its Megatron provider (``build_model``), its mapping table (``table``), its
HF config ⇄ run config translation (``run_config`` / ``hf_config``) and its HF export
(``write_extra``: files beside the weights; ``hf_model_class``: the class that loads them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lov15_megatron.config import LanguageModelConfig, RunConfig
from lov15_megatron.convert.mapping import MappingTable


def parallel_layout(
    lm: LanguageModelConfig | dict, tp: int = 1, pp: int = 1, ep: int = 1
) -> dict[str, Any]:
    """``parallel`` config section for checking or running a converted model at TP×PP×EP.

    A mixture-of-experts model under TP also shards its sequence (Megatron-Core requires
    sequence parallelism for MoE under TP); under EP its experts use expert TP 1.
    """
    experts = lm.get("num_experts") if isinstance(lm, dict) else lm.num_experts
    out: dict[str, Any] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    if experts is not None and tp > 1:
        out["sequence_parallel"] = True
    if ep > 1:
        out.update(expert_model_parallel_size=ep, expert_tensor_parallel_size=1)
    return out


def conversion_run_config(
    model: dict[str, Any], tp: int = 1, pp: int = 1, ep: int = 1, source: str = "config.json"
) -> RunConfig:
    """The run config a conversion (or ``verify``) builds ``model`` with: one CPU process per
    rank at TP×PP(×EP), sequences of at most 32 tokens (only the model's shapes matter).

    ``model`` is the ``model`` section as a dict (``language`` and, for a VLM, ``vision``);
    ``source`` names where it came from in errors.
    """
    from lov15_megatron.config import config_from_dict

    lm = model["language"]
    return config_from_dict(
        {
            "model": model,
            "parallel": parallel_layout(lm, tp, pp, ep),
            "data": {"seq_length": min(32, lm["max_position_embeddings"])},
            "runtime": {"device": "cpu"},
        },
        source=source,
    )


class Converter:
    """Base class of a model's converter; subclasses override the abstract methods."""

    name: str
    hf_architecture: str

    def run_config(self, hf_config: dict[str, Any], tp: int = 1, pp: int = 1) -> RunConfig:
        """The run config of the model in an HF ``config.json`` (CPU, the given layout)."""
        raise NotImplementedError

    def table(self, cfg: RunConfig) -> MappingTable:
        raise NotImplementedError

    def build_model(self, cfg: RunConfig, vp_stage: int | None = None) -> torch.nn.Module:
        """The Megatron model provider (one pipeline chunk)."""
        raise NotImplementedError

    def hf_config(self, cfg: RunConfig, template: dict[str, Any]) -> dict[str, Any]:
        """The HF ``config.json`` of ``cfg``'s model (the template's other fields kept)."""
        raise NotImplementedError

    def hf_model_class(self) -> type:
        raise NotImplementedError

    def ignorable_hf_tensor(self, name: str, cfg: RunConfig) -> bool:
        """HF tensors that have no Megatron counterpart but carry no information."""
        return False

    def write_extra(self, directory: Path, image: Any = None) -> None:
        """Files the HF export needs beside the weights and ``config.json`` (none here)."""

    def default_inputs(self, cfg: RunConfig, seed: int = 0) -> dict[str, torch.Tensor]:
        """``verify``'s inputs when none are given: two rows of 16 random token ids."""
        gen = torch.Generator().manual_seed(seed)
        return {
            "input_ids": torch.randint(0, cfg.model.language.vocab_size, (2, 16), generator=gen)
        }
