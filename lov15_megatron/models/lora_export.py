"""The HF export of a LoRA run: merged weights, and optionally a ``peft`` adapter directory.

A LoRA training checkpoint holds the adapters only; its ``lov15_model.json`` names the base
checkpoint they were trained on (``peft.base``: path and fingerprint). :func:`export_lora`
writes

* **merged** HF weights: the base's tensors streamed one at a time from the base checkpoint,
  each adapted weight replaced by ``W + (alpha/r)·B·A`` (computed in fp32 in Megatron's layout,
  then cast to the run's dtype) before the family's mapping table turns it into HF tensors — a
  complete export like any other (``convert.core.mcore_to_hf`` does the rest);
* with ``adapter_dir``, a **PEFT adapter** (``adapter_config.json``,
  ``adapter_model.safetensors``) for the HF model of the base, which
  ``peft.PeftModel.from_pretrained(base_hf_model, adapter_dir)`` loads.

Megatron fuses q/k/v (``linear_qkv``) and gate/up (``linear_fc1``); HF keeps them apart. One
adapter ``(A, B)`` of a fused layer is written as one HF LoRA module per part, each with that
same ``A`` and the part's rows of ``B``, taken by the very transform that splits the fused
weight's rows (``GroupedQKV``, ``Concat``). This is exact: the fused layer's output rows are
``B·A·x`` and each part's rows are ``B_part·A·x``, so the PEFT model and the merged export
compute the same function. (The alternative, a separate rank-r adapter per part trained from the
start, is another model: it has three times the adapter parameters of q/k/v.)

The base is checked before anything is written: its fingerprint
(:func:`~lov15_megatron.models.lora.fingerprint_digest`, computed here from the first values of
each stored tensor exactly as training computes it from its shards) must equal the one the
adapters were trained on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader

from lov15_megatron.checkpoint_dir import MODEL_FILE, read_model_file, resolve
from lov15_megatron.config.loader import build
from lov15_megatron.config.schema import PeftConfig, RunConfig
from lov15_megatron.convert import core
from lov15_megatron.convert.mapping import ConversionError, MappingTable
from lov15_megatron.convert.mcore_io import build_on_meta, load_streaming, read_region
from lov15_megatron.models.lora import (
    FINGERPRINT_ELEMENTS,
    apply_lora,
    fingerprint_digest,
    fingerprint_sample,
    fingerprint_tensors,
    is_adapter_key,
    merged_delta,
)
from lov15_megatron.models.registry import ModelFamily
from lov15_megatron.runtime.dtypes import TORCH_DTYPES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_meta(load_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``peft`` record of a LoRA training checkpoint (``None`` for any other checkpoint)."""
    return (read_model_file(resolve(load_dir)) or {}).get("peft")


def read_adapters(
    family: ModelFamily, load_dir: Path, cfg: RunConfig, model: torch.nn.Module
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer name: (A [r, in], B [out, r])}``, global tensors in Megatron's TP=1 layout, of
    every adapted layer of a LoRA checkpoint (written at any layout); ``model`` is the
    checkpoint's TP=1/PP=1 model on ``meta``, which gains the adapters' shapes here."""
    assert cfg.peft is not None
    apply_lora(model, cfg.peft, family.tower_prefixes(), seed=0)  # shapes only (meta)
    tensors: dict[str, torch.Tensor] = {}
    try:
        for name, tensor in load_streaming(model, load_dir, keep=is_adapter_key):
            tensors[name] = tensor
    except KeyError as e:
        raise ConversionError(
            f"{load_dir} lacks the adapter {e} that its peft section "
            f"(rank {cfg.peft.rank}, {cfg.peft.target_modules} of {cfg.peft.towers}) implies"
        ) from None
    layers = sorted({name.rsplit(".", 1)[0] for name in tensors})
    return {layer: (tensors[f"{layer}.lora_A"], tensors[f"{layer}.lora_B"]) for layer in layers}


def checkpoint_fingerprint(model: torch.nn.Module, ckpt_dir: Path) -> str:
    """The fingerprint of the weights in ``ckpt_dir`` as a run in ``model``'s dtype computes it
    (:func:`~lov15_megatron.training.checkpointing.base_fingerprint`), from a few values of
    each tensor's first row: read before anything is written."""
    reader = FileSystemReader(str(ckpt_dir))
    samples: dict[str, bytes] = {}
    for sh in fingerprint_tensors(model.sharded_state_dict().values()):
        width = sh.global_shape[-1]
        sizes = (1,) * (len(sh.global_shape) - 1) + (min(FINGERPRINT_ELEMENTS, width),)
        zero = (0,) * len(sh.global_shape)
        try:
            row = read_region(ckpt_dir, sh.key, zero, sizes, sh.data.dtype, reader)
        except KeyError:
            message = f"{ckpt_dir} has no tensor {sh.key}: not this model's base"
            raise ConversionError(message) from None
        samples[sh.key] = fingerprint_sample(row, width)
    return fingerprint_digest(samples)


class MergedWeights:
    """The base checkpoint's tensors with every adapter merged in (a
    :data:`convert.core.WeightSource`)."""

    def __init__(
        self, base_dir: Path, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float
    ) -> None:
        self.base_dir, self.adapters, self.scaling = base_dir, adapters, scaling

    def __call__(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        merged = set()
        for name, tensor in load_streaming(model, self.base_dir):
            layer = name.removesuffix(".weight")
            if name.endswith(".weight") and layer in self.adapters:
                a, b = self.adapters[layer]
                tensor = (tensor.float() + merged_delta(a, b, self.scaling)).to(tensor.dtype)
                merged.add(layer)
            yield name, tensor
        unused = sorted(set(self.adapters) - merged)
        if unused:
            raise ConversionError(f"adapters {unused[:3]} have no weight in {self.base_dir}")


def peft_adapter(
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], table: MappingTable
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The PEFT state dict (``base_model.model.<HF module>.lora_{A,B}.weight``) of Megatron
    adapters, and the HF name patterns of the adapted modules (``*`` for a layer index)."""
    state: dict[str, torch.Tensor] = {}
    patterns: set[str] = set()
    for layer, (a, b) in adapters.items():
        row, hf_names = table.resolve(f"{layer}.weight")
        for hf_name, b_part in zip(hf_names, row.transform.to_hf(b), strict=True):
            module = hf_name.removesuffix(".weight")
            state[f"base_model.model.{module}.lora_A.weight"] = a.clone().contiguous()
            state[f"base_model.model.{module}.lora_B.weight"] = b_part.clone().contiguous()
        patterns.update(p.removesuffix(".weight") for p in row.hf)
    return state, sorted(patterns)


def target_regex(patterns: list[str]) -> str:
    """A regular expression that matches (``re.fullmatch``, as peft does for a string
    ``target_modules``) exactly the modules of ``patterns`` (``*``: a layer index)."""
    parts = [re.escape(p).replace(r"\*", r"\d+") for p in patterns]
    return "(" + "|".join(parts) + ")"


def write_adapter_dir(
    adapter_dir: Path,
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
    table: MappingTable,
    peft: PeftConfig,
    base_model: str | None,
) -> int:
    """Write the PEFT adapter directory (temporary name, then renamed); returns its module
    count."""
    state, patterns = peft_adapter(adapters, table)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": peft.rank,
        "lora_alpha": peft.alpha,
        "lora_dropout": peft.dropout,
        "target_modules": target_regex(patterns),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        tmp.rename(adapter_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(state) // 2


def export_lora(
    family: ModelFamily,
    load_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    hf_template: str | os.PathLike | None = None,
    max_shard_bytes: int = 2 * 2**30,
    image: Any = None,
    adapter_dir: str | os.PathLike | None = None,
    base_dir: str | os.PathLike | None = None,
) -> list[core.ConversionSummary]:
    """Export a LoRA checkpoint: merged HF weights in ``save_dir`` and, with ``adapter_dir``, a
    PEFT adapter there. ``base_dir`` replaces the base path the checkpoint names (a moved base;
    its fingerprint must still match). Runs after ``runtime.distributed.initialize``."""
    import time

    load_dir = resolve(load_dir)
    record = lora_meta(load_dir)
    if not record:
        raise ConversionError(f"{load_dir} is not a LoRA checkpoint (no peft in lov15_model.json)")
    base = Path(base_dir) if base_dir else Path(record["base"]["path"])
    base_meta = read_model_file(resolve(base)) if base.is_dir() else None
    if base_meta is None:
        raise ConversionError(
            f"the base {base} that {load_dir} applies to is not a converted checkpoint "
            f"(pass its new place with --base-dir)"
        )
    if base_meta.get("peft"):
        raise ConversionError(f"the base {base} is itself a LoRA checkpoint")
    start = time.perf_counter()
    cfg = core.run_config_of_checkpoint(load_dir)
    source = str(load_dir / MODEL_FILE)
    cfg.peft = build(PeftConfig, {k: v for k, v in record.items() if k != "base"}, "peft", source)
    dtype = TORCH_DTYPES[read_model_file(load_dir)["dtype"]]  # type: ignore[index]
    layout = build_on_meta(lambda: family.build_model(cfg)).to(dtype)  # the checkpoint's layout
    got = checkpoint_fingerprint(layout, resolve(base))
    if got != record["base"]["fingerprint"]:
        raise ConversionError(
            f"the base {base} holds other weights than the adapters in {load_dir} were trained "
            f"on (fingerprint {got[:12]} != {record['base']['fingerprint'][:12]})"
        )
    adapters = read_adapters(family, load_dir, cfg, layout)  # after the base's fingerprint
    merged = MergedWeights(resolve(base), adapters, cfg.peft.alpha / cfg.peft.rank)
    out = [core.mcore_to_hf(family, load_dir, save_dir, hf_template, max_shard_bytes, image,
                            weights=merged)]  # fmt: skip
    if adapter_dir is not None:
        count = write_adapter_dir(Path(adapter_dir), adapters, family.table(cfg), cfg.peft,
                                  str(hf_template) if hf_template else None)  # fmt: skip
        size = (Path(adapter_dir) / ADAPTER_WEIGHTS).stat().st_size
        out.append(core.ConversionSummary("peft-adapter", str(adapter_dir), 2 * count, size,
                                          time.perf_counter() - start))  # fmt: skip
    return out
