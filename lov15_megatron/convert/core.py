"""The model-independent conversion: HF directory ⇄ Megatron distributed checkpoint.

A model plugs in as its registered family (``models/<family>/family.py``, a
:class:`~lov15_megatron.convert.converter.Converter`): its run config from the HF ``config.json``,
its mapping table, its Megatron model builder and its HF config writer. The steps here are the
same for every model:

* ``hf_to_mcore``: build the model on ``meta`` at TP=1/PP=1 (the checkpoint layout), check every
  HF tensor against it *before* writing (missing, unexpected, wrong shape → one clear error),
  then stream tensor by tensor into a ``torch_dist`` checkpoint.
* ``mcore_to_hf``: read the checkpoint one parameter at a time, invert the transforms, write
  bounded safetensors shards, ``config.json``, the template's tokenizer files and (LLaVA-OV-1.5)
  the code, processor, chat template and generation config.

Both write to a temporary name and rename when complete. Both must run after
``runtime.distributed.initialize`` (a world of one on CPU is enough).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lov15_megatron import checkpoint_dir
from lov15_megatron.checkpoint_dir import MODEL_FILE, model_file_text, resolve
from lov15_megatron.config import RunConfig, config_from_dict, config_to_dict
from lov15_megatron.convert.converter import conversion_run_config
from lov15_megatron.convert.hf_experts import FusedExpertWriter, has_fused_experts
from lov15_megatron.convert.hf_io import (
    HFCheckpointReader,
    HFCheckpointWriter,
    check_tied_lm_head,
    copy_tokenizer_files,
    weight_files,
)
from lov15_megatron.convert.mapping import ConversionError
from lov15_megatron.convert.mcore_io import build_on_meta, load_streaming, save_streaming
from lov15_megatron.runtime.dtypes import TORCH_DTYPES, dtype_name

"""Written inside every converted Megatron checkpoint: which model, its config, the HF config."""


@dataclass
class ConversionSummary:
    direction: str
    output: str
    tensors: int
    bytes: int
    seconds: float

    def line(self) -> str:
        return (
            f"{self.direction}: wrote {self.tensors} tensors, {self.bytes / 2**20:.1f} MiB "
            f"in {self.seconds:.1f}s -> {self.output}"
        )


def converter_runtime_config() -> RunConfig:
    """The converter's own process: one CPU rank at TP=1/PP=1 (the checkpoint layout)."""
    return config_from_dict({"runtime": {"device": "cpu"}})


def _layout_model(converter, cfg: RunConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The TP=1/PP=1 model on ``meta`` in the checkpoint's dtype: the checkpoint layout."""
    return build_on_meta(lambda: converter.build_model(cfg)).to(dtype)


def _shape_context(cfg: RunConfig) -> str:
    lm = cfg.model.language
    return (
        f"hidden_size={lm.hidden_size}, intermediate_size={lm.ffn_hidden_size}, "
        f"num_attention_heads={lm.num_attention_heads}, num_key_value_heads={lm.num_query_groups}, "
        f"head_dim={lm.kv_channels}, vocab_size={lm.vocab_size}, num_hidden_layers={lm.num_layers}"
    )


def plan_hf_to_mcore(converter, cfg: RunConfig, reader: HFCheckpointReader, model) -> dict:
    """Map every Megatron parameter to its HF tensors; validate names and shapes up front."""
    table = converter.table(cfg)
    plan, used = {}, set()
    params = model.state_dict(keep_vars=True)
    for name, param in params.items():
        if name.endswith("_extra_state"):
            continue
        row, hf_names = table.resolve(name)
        expected = row.transform.to_hf(torch.empty(param.shape, device="meta"))
        for hf_name, want in zip(hf_names, expected, strict=True):
            if hf_name not in reader.names():
                raise ConversionError(
                    f"tensor {hf_name!r} (for Megatron {name}) is missing from {reader.dir}"
                )
            got = reader.shape(hf_name)
            if got != tuple(want.shape):
                raise ConversionError(
                    f"{hf_name}: shape {got} in the checkpoint, but config.json "
                    f"({_shape_context(cfg)}) implies {tuple(want.shape)}"
                )
        plan[name] = (row, hf_names)
        used.update(hf_names)
    unexpected = sorted(
        n for n in reader.names() - used if not converter.ignorable_hf_tensor(n, cfg)
    )
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ConversionError(
            f"unexpected tensor(s) in {reader.dir} that the {converter.name} mapping does not use: "
            f"{unexpected[:5]}{more}; does config.json match the weights?"
        )
    return plan


def hf_to_mcore(
    converter,
    hf_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    dtype: str = "auto",
    cfg: RunConfig | None = None,
) -> ConversionSummary:
    """Convert an HF checkpoint directory into a Megatron-Core torch_dist checkpoint."""
    start = time.perf_counter()
    reader = HFCheckpointReader(hf_dir)
    cfg = cfg or converter.run_config(reader.config)
    torch_dtype = reader.dtype() if dtype == "auto" else TORCH_DTYPES[dtype]
    model = _layout_model(converter, cfg, torch_dtype)
    plan = plan_hf_to_mcore(converter, cfg, reader, model)
    for name in reader.names():
        if converter.ignorable_hf_tensor(name, cfg) and name == "lm_head.weight":
            embed = next(n for n in reader.names() if n.endswith("embed_tokens.weight"))
            check_tied_lm_head(reader, name, embed)
    progress = tqdm(total=len(plan), desc="hf-to-mcore", unit="tensor", mininterval=1.0)
    total = 0

    def source(name: str) -> torch.Tensor:
        nonlocal total
        row, hf_names = plan[name]
        tensor = row.transform.to_megatron([reader.get(n) for n in hf_names])
        total += tensor.numel() * torch_dtype.itemsize
        return tensor

    meta = {
        "model": converter.name,
        "model_config": config_to_dict(cfg)["model"],
        "hf_config": reader.config,
        "dtype": dtype_name(torch_dtype),
    }
    try:
        out = save_streaming(
            model,
            source,
            save_dir,
            on_param=lambda _name: progress.update(1),
            extra_files={MODEL_FILE: model_file_text(meta)},
        )
    except PermissionError as e:
        raise ConversionError(str(e)) from e
    finally:
        progress.close()
    return ConversionSummary("hf-to-mcore", str(out), len(plan), total, time.perf_counter() - start)


def _image_config(meta: dict[str, Any], template: Path | None, overrides: Any) -> Any:
    """The exported processor's ``ImageConfig``, or ``None`` to keep the template's file.

    Base: the settings a training run recorded in ``lov15_model.json``, else the template's
    ``preprocessor_config.json``, else the release default; ``overrides`` (a dict of the
    ``--min-pixels``/``--max-pixels``/``--max-image-side`` given) replace fields of it.
    """
    from dataclasses import replace

    from lov15_megatron.data.image_processing import DEFAULT_IMAGE_CONFIG, ImageConfig
    from lov15_megatron.hf.export import image_config_of

    recorded = meta.get("image") if isinstance(meta.get("image"), dict) else None
    if not recorded and not overrides:
        return None
    try:
        if recorded:
            base = ImageConfig(**recorded)
        else:
            base = (image_config_of(template) if template else None) or DEFAULT_IMAGE_CONFIG
        return replace(base, **(overrides or {}))
    except (TypeError, ValueError) as e:
        raise ConversionError(
            f"image settings (--min-pixels/--max-pixels/--max-image-side): {e}"
        ) from e


def _write_video_settings(directory: Path, meta: dict[str, Any]) -> None:
    """The video sampling settings a training run recorded in ``lov15_model.json`` (those of
    its packed data) into the exported processor's config, beside the image settings; nothing
    when it recorded none or the export has no processor (a model without vision)."""
    from lov15_megatron.hf.export import PROCESSOR_FILE, write_video_settings

    video = meta.get("video")
    if isinstance(video, dict) and video and (directory / PROCESSOR_FILE).is_file():
        write_video_settings(directory, video)


def read_model_file(load_dir: str | os.PathLike) -> dict[str, Any]:
    meta = checkpoint_dir.read_model_file(load_dir)
    if meta is None:
        path = resolve(load_dir) / MODEL_FILE
        raise ConversionError(f"{path} is missing: not a checkpoint written by this converter")
    return meta


def run_config_of_checkpoint(
    load_dir: str | os.PathLike, tp: int = 1, pp: int = 1, ep: int = 1
) -> RunConfig:
    """The checkpoint's model at TP×PP (and, for an MoE model, EP with expert TP 1)."""
    meta = read_model_file(load_dir)
    source = str(Path(load_dir) / MODEL_FILE)
    return conversion_run_config(meta["model_config"], tp, pp, ep, source=source)


WeightSource = Callable[[torch.nn.Module], Iterator[tuple[str, torch.Tensor]]]
"""``weights(layout_model) -> (megatron name, full tensor)`` for every parameter of the model."""


def mcore_to_hf(
    converter,
    load_dir: str | os.PathLike,
    save_dir: str | os.PathLike,
    hf_template: str | os.PathLike | None = None,
    max_shard_bytes: int = 2 * 2**30,
    image: Any = None,
    weights: WeightSource | None = None,
) -> ConversionSummary:
    """Convert a converter/training torch_dist checkpoint back into an HF directory.

    ``weights`` replaces reading the tensors from ``load_dir`` (whose ``lov15_model.json`` still
    describes the model): the LoRA export streams the base checkpoint's weights with the
    adapters merged in (``models/lora_export.py``).

    The export stores experts the way the template's weights do (one by one, or fused as
    transformers ≥ 5 holds them; one by one without a template or weights). The template's
    tokenizer/processor/generation files are copied unchanged; a converter with
    ``write_extra`` (LLaVA-OV-1.5) then adds its code and any missing file, and rewrites the
    processor's image settings when a training run recorded them in ``lov15_model.json`` or
    ``image`` (a dict of ``min_pixels``/``max_pixels``/``max_image_side``) overrides some; the
    video sampling settings a run recorded go into ``processor_config.json``.
    """
    start = time.perf_counter()
    load_dir = resolve(load_dir)  # a training root exports its latest iteration
    meta = read_model_file(load_dir)
    if meta.get("peft") and weights is None:  # adapters only: no base weights in it
        raise ConversionError(
            f"{load_dir} is a LoRA checkpoint (adapters only, base "
            f"{meta['peft'].get('base', {}).get('path', '?')}): export it with "
            f"models.lora_export.export_lora (what mcore-to-hf does with it)"
        )
    cfg = run_config_of_checkpoint(load_dir)
    torch_dtype = TORCH_DTYPES[meta.get("dtype", "float32")]
    model = _layout_model(converter, cfg, torch_dtype)
    table = converter.table(cfg)
    template_dir = Path(hf_template) if hf_template else None
    template_config = meta["hf_config"]
    if template_dir is not None:
        if not (template_dir / "config.json").exists():
            raise ConversionError(f"--hf-template {template_dir} has no config.json")
        template_config = json.loads((template_dir / "config.json").read_text())
    writer = HFCheckpointWriter(save_dir, max_shard_bytes)
    add, experts = writer.add, None
    if template_dir is not None and _template_has_fused_experts(template_dir):
        experts = FusedExpertWriter(writer.add, cfg.model.language.num_experts or 0)
        add = experts.add
    try:
        progress = tqdm(desc="mcore-to-hf", unit="tensor", mininterval=1.0)
        stream = weights(model) if weights is not None else load_streaming(model, load_dir)
        for name, tensor in stream:
            row, hf_names = table.resolve(name)
            for hf_name, hf_tensor in zip(hf_names, row.transform.to_hf(tensor), strict=True):
                add(hf_name, hf_tensor)
            progress.update(1)
        progress.close()
        if experts is not None:
            experts.finish()
        hf_config = converter.hf_config(cfg, template_config)
        dtype_key = "torch_dtype" if "torch_dtype" in hf_config else "dtype"
        hf_config[dtype_key] = dtype_name(torch_dtype)
        writer.write_json("config.json", hf_config)
        if template_dir is not None:  # byte for byte; write_extra fills in what is missing
            copy_tokenizer_files(template_dir, writer)
        converter.write_extra(writer.tmp, image=_image_config(meta, template_dir, image))
        _write_video_settings(writer.tmp, meta)
        out = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return ConversionSummary(
        "mcore-to-hf", str(out), writer.count, writer.total_bytes, time.perf_counter() - start
    )


def _template_has_fused_experts(template: Path) -> bool:
    """Whether the template's weights (if it has any) store experts fused: the export then
    writes them so too (``convert/hf_experts.py``)."""
    return has_fused_experts(weight_files(template) or ())
