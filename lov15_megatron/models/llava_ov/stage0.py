"""Stage-0 checkpoint: a Rice ViT (MLCD layout) + a Qwen3 LM + a fresh merger, in HF layout.

A "stage-0" LLaVA-OneVision-1.5 checkpoint is where training starts
(docs/model-reference.md §1): the vision tower from an MLCD-layout Rice ViT checkpoint
(``transformers``' ``MLCDVisionModel``), the language model from a ``Qwen3ForCausalLM``
checkpoint, and a freshly initialised patch merger. The result is a complete Hugging Face
directory in the release's on-disk names (docs/model-reference.md §7) that loads with
``LLaVAOneVision1_5_ForConditionalGeneration.from_pretrained`` and, through ``auto_map``, with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``; its tokenizer, chat
template and processor load with ``AutoProcessor`` / ``AutoTokenizer`` (``hf/export.py``).

Two steps:

- :func:`plan_stage0` reads both ``config.json`` files, builds the output config and, from it,
  the list of output tensors (names and shapes taken from the HF-side model built on the
  ``meta`` device), each with its source: one or more source tensors or a merger initialiser.
  A vision tensor's sources and transform are its row of the MLCD table
  (``models/llava_ov/mlcd_mapping.py``; the ViT ``q/k/v_proj`` are concatenated into ``qkv``).
  Every source tensor name and shape is checked here, and every source tensor must be used
  (or be one that is deliberately dropped), so bad input fails before anything is written.
- :func:`make_stage0` streams the plan tensor by tensor through
  :class:`~lov15_megatron.convert.hf_io.HFCheckpointWriter` (bounded shards, written under
  ``<save_dir>.tmp`` and renamed when complete; removed on any error).

Merger initialisation (deterministic for a seed): ``ln_q`` weight 1, bias 0; ``mlp.0.weight``
then ``mlp.2.weight`` drawn in that order from ``N(0, init_std²)`` (default 0.02, Megatron's
``init_method_std``) with one CPU ``torch.Generator`` seeded by ``seed``, in fp32, then cast;
``mlp.0.bias`` and ``mlp.2.bias`` zero.

A tied Qwen3 (``tie_word_embeddings: true``, e.g. Qwen3-4B-Instruct-2507) is untied by copying
``model.embed_tokens.weight`` into ``lm_head.weight``; the output is always untied.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lov15_megatron.convert.hf_io import (
    HFCheckpointReader,
    HFCheckpointWriter,
    check_save_dir,
    check_tied_lm_head,
)
from lov15_megatron.convert.mapping import (
    ConversionError,
    Direct,
    MappingTable,
    ParamMapping,
    Transform,
)
from lov15_megatron.hf.export import TOKENIZER_SOURCE_FILES
from lov15_megatron.models.llava_ov.mlcd_mapping import MLCD_DROPPED, MLCD_PREFIX, mlcd_table
from lov15_megatron.runtime.dtypes import TORCH_DTYPES, dtype_name

#: ``model_type`` values accepted for the vision checkpoint's ``config.json``.
MLCD_MODEL_TYPES = ("mlcd_vision_model", "mlcd_vision", "mlcd")

#: Special tokens whose ids go into the output config, looked up in the tokenizer files.
SPECIAL_TOKENS: dict[str, str] = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}

_VIT_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "patch_size",
    "num_channels",
)
_QWEN3_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
_QWEN3_SHAPE_FIELDS = (*_QWEN3_REQUIRED, "head_dim")
# Fields of the source Qwen3 config.json that describe the file, not the language model.
_QWEN3_DROPPED_FIELDS = (
    "architectures",
    "auto_map",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
)


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its release name and shape, and where it comes from.

    ``origin`` is ``"vision"`` (``sources`` in the ViT checkpoint, combined by ``transform``,
    both from the MLCD table's row), ``"language"`` (``sources`` in the Qwen3 checkpoint) or
    ``"merger"`` (fresh, ``init`` one of ``"normal"``, ``"zeros"``, ``"ones"``). ``must_equal``
    names a source tensor that has to equal the result (the stored ``lm_head.weight`` of a tied
    Qwen3).
    """

    name: str
    shape: tuple[int, ...]
    origin: str
    sources: tuple[str, ...] = ()
    init: str = ""
    must_equal: str = ""
    transform: Transform = Direct()


@dataclass
class Stage0Plan:
    """Everything :func:`make_stage0` needs, validated: config, tensors, dtype, tokenizer."""

    vit_dir: Path
    llm_dir: Path
    tokenizer_dir: Path
    config: Any  # LLaVAOneVision1_5_Config
    tensors: list[TensorPlan]
    dtype: torch.dtype
    tied_source: bool
    token_id_origin: dict[str, str] = field(default_factory=dict)

    def count(self, origin: str) -> int:
        """Number of output tensors of ``origin`` (``vision``, ``merger``, ``language``)."""
        return sum(t.origin == origin for t in self.tensors)


@dataclass
class Stage0Summary:
    """What :func:`make_stage0` wrote."""

    output: Path
    tensors: int
    vision: int
    merger: int
    language: int
    bytes: int
    seconds: float
    tokenizer_files: list[str]

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        return (
            f"make-stage0: wrote {self.tensors} tensors (vision {self.vision}, merger "
            f"{self.merger} new, language {self.language}), {self.bytes / 2**20:.1f} MiB, "
            f"{len(self.tokenizer_files)} tokenizer files in {self.seconds:.1f}s -> {self.output}"
        )


# ------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------


def _read_config(directory: Path, role: str) -> dict[str, Any]:
    if not directory.is_dir():
        raise ConversionError(f"{role} directory {directory} does not exist")
    path = directory / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path} is missing ({role} config)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return data


def vision_config_from_mlcd(mlcd: dict[str, Any], where: Path) -> dict[str, Any]:
    """The ``rice_vit`` ``vision_config`` fields for an MLCD ``config.json`` (dict).

    ``where`` is the config file, named in errors. ``text_hidden_size`` is left to the
    composite config (the LM hidden size).
    """
    model_type = mlcd.get("model_type")
    if model_type not in MLCD_MODEL_TYPES:
        raise ConversionError(
            f"{where}: model_type {model_type!r} is not an MLCD vision model "
            f"(expected one of {list(MLCD_MODEL_TYPES)})"
        )
    missing = [k for k in _VIT_CONFIG_FIELDS[:4] if k not in mlcd]
    if missing:
        raise ConversionError(f"{where}: missing field(s) {missing}")
    patch = mlcd.get("patch_size", 14)
    if isinstance(patch, list | tuple):
        if len(patch) != 2 or patch[0] != patch[1]:
            raise ConversionError(f"{where}: patch_size {patch} is not square")
        patch = patch[0]
    if mlcd.get("num_key_value_groups", 1) != 1:
        raise ConversionError(
            f"{where}: num_key_value_groups {mlcd['num_key_value_groups']} is not supported "
            "(the Rice ViT has one key/value head per query head)"
        )
    act = mlcd.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"{where}: hidden_act {act!r}, the Rice ViT uses 'gelu' (exact)")
    rope = mlcd.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ConversionError(
            f"{where}: rope_parameters.rope_type {rope['rope_type']!r}, expected 'axial'"
        )
    theta = rope.get("rope_theta", mlcd.get("rope_theta", 10000.0))
    hidden = mlcd["hidden_size"]
    return {
        "depth": mlcd["num_hidden_layers"],
        "embed_dim": hidden,
        "hidden_size": hidden,
        "hidden_act": "gelu",
        "intermediate_size": mlcd["intermediate_size"],
        "num_heads": mlcd["num_attention_heads"],
        "in_channels": mlcd.get("num_channels", 3),
        "patch_size": patch,
        "spatial_merge_size": 2,
        "temporal_patch_size": 1,
        "layer_norm_eps": mlcd.get("layer_norm_eps", 1e-5),
        "rope_theta": float(theta),
    }


def text_config_from_qwen3(qwen: dict[str, Any], where: Path) -> dict[str, Any]:
    """The ``text_config`` for a Qwen3 ``config.json`` (dict): its fields, untied."""
    if qwen.get("model_type") == "qwen3_moe":
        raise ConversionError(
            f"{where}: a Qwen3-MoE language model (model_type 'qwen3_moe') is not supported by "
            "make_stage0 yet; build the LLaVA-OV-1.5 HF directory another way and convert it "
            "with convert_checkpoint.py hf-to-mcore --model llava-ov-1.5"
        )
    if qwen.get("model_type") != "qwen3":
        raise ConversionError(
            f"{where}: model_type {qwen.get('model_type')!r} is not 'qwen3' "
            "(the language model must be a Qwen3ForCausalLM checkpoint)"
        )
    missing = [k for k in _QWEN3_REQUIRED if k not in qwen]
    if missing:
        raise ConversionError(f"{where}: missing field(s) {missing}")
    text = {k: v for k, v in qwen.items() if k not in _QWEN3_DROPPED_FIELDS}
    text["tie_word_embeddings"] = False
    return text


def _added_tokens(directory: Path) -> dict[str, int]:
    """Content -> id of the added/special tokens listed in a tokenizer directory's files."""
    found: dict[str, int] = {}
    tok_json = directory / "tokenizer.json"
    if tok_json.is_file():
        for entry in json.loads(tok_json.read_text()).get("added_tokens", []):
            found.setdefault(entry["content"], int(entry["id"]))
    tok_config = directory / "tokenizer_config.json"
    if tok_config.is_file():
        decoder = json.loads(tok_config.read_text()).get("added_tokens_decoder", {})
        for token_id, entry in decoder.items():
            found.setdefault(entry["content"], int(token_id))
    added = directory / "added_tokens.json"
    if added.is_file():
        for content, token_id in json.loads(added.read_text()).items():
            found.setdefault(content, int(token_id))
    return found


def special_token_ids(tokenizer_dir: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Config token-id fields from the tokenizer files, else the release defaults.

    The defaults are the ids of docs/model-reference.md §4.

    Returns ``(ids, origin)``: ``origin[field]`` says where each id came from (for messages).
    """
    from lov15_megatron.hf import LLaVAOneVision1_5_Config

    tokens = _added_tokens(tokenizer_dir)
    ids, origin = {}, {}
    for name, content in SPECIAL_TOKENS.items():
        if content in tokens:
            ids[name], origin[name] = tokens[content], f"{content} in {tokenizer_dir}"
        else:
            ids[name] = getattr(LLaVAOneVision1_5_Config, name)
            origin[name] = (
                f"release default; no {content} in the tokenizer files of {tokenizer_dir}"
            )
    return ids, origin


def build_config(
    mlcd: dict[str, Any],
    qwen: dict[str, Any],
    token_ids: dict[str, int],
    vit_config_path: Path,
    llm_config_path: Path,
) -> Any:
    """The output ``LLaVAOneVision1_5_Config`` from the two source configs and the token ids."""
    from lov15_megatron.hf import LLaVAOneVision1_5_Config, RiceViTConfig

    vision = vision_config_from_mlcd(mlcd, vit_config_path)
    text = text_config_from_qwen3(qwen, llm_config_path)
    try:
        RiceViTConfig(**vision)
    except ValueError as e:
        raise ConversionError(f"{vit_config_path}: {e}") from e
    try:
        return LLaVAOneVision1_5_Config(vision_config=vision, text_config=text, **token_ids)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{llm_config_path}: {e}") from e


# ------------------------------------------------------------------------------------------
# plan
# ------------------------------------------------------------------------------------------


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Release tensor names -> shapes for ``config`` (the HF-side model built on ``meta``)."""
    from lov15_megatron.hf import LLaVAOneVision1_5_ForConditionalGeneration

    with torch.device("meta"):
        model = LLaVAOneVision1_5_ForConditionalGeneration(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _vit_row(table: MappingTable, name: str) -> tuple[ParamMapping, list[str]]:
    """The MLCD table's row of the release vision tensor ``name`` and its unprefixed sources."""
    try:
        return table.resolve(name)
    except ConversionError:
        raise ConversionError(f"no MLCD source known for vision tensor {name}") from None


def _fields(config: dict[str, Any], names: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={config[k]}" for k in names if k in config)


def _check_shape(
    reader: HFCheckpointReader, name: str, expected: tuple[int, ...], implied_by: str
) -> None:
    actual = reader.shape(name)
    if actual != expected:
        raise ConversionError(
            f"tensor {name!r} in {reader.dir} has shape {list(actual)}, expected "
            f"{list(expected)} from {implied_by}"
        )


def _vit_names(reader: HFCheckpointReader) -> tuple[dict[str, str], str]:
    """Unprefixed MLCD name -> stored name, and the prefix used (for messages)."""
    stored = sorted(reader.names())
    prefix = MLCD_PREFIX if any(n.startswith(MLCD_PREFIX) for n in stored) else ""
    names: dict[str, str] = {}
    for name in stored:
        short = name.removeprefix(MLCD_PREFIX)
        if short in names:
            raise ConversionError(
                f"tensor {short!r} is stored twice in {reader.dir} ({names[short]!r} and {name!r})"
            )
        names[short] = name
    return names, prefix


def plan_stage0(
    vit_dir: str | Path,
    llm_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: str = "auto",
) -> Stage0Plan:
    """Read and check both checkpoints (configs, tensor names, shapes); write nothing.

    Raises :class:`ConversionError` naming the file, tensor or field on bad input.
    """
    vit_dir, llm_dir = Path(vit_dir), Path(llm_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else llm_dir
    mlcd = _read_config(vit_dir, "--vit-dir")
    qwen = _read_config(llm_dir, "--llm-dir")
    if tokenizer_dir is not None:
        if not tok_dir.is_dir():
            raise ConversionError(f"--tokenizer-dir {tok_dir} does not exist")
        if not any((tok_dir / f).is_file() for f in TOKENIZER_SOURCE_FILES):
            raise ConversionError(f"--tokenizer-dir {tok_dir} holds no tokenizer files")
    if dtype != "auto" and dtype not in TORCH_DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of auto, {', '.join(TORCH_DTYPES)}")

    token_ids, token_origin = special_token_ids(tok_dir)
    vocab = qwen.get("vocab_size")
    if isinstance(vocab, int):
        for name, token_id in token_ids.items():
            if not 0 <= token_id < vocab:
                raise ConversionError(
                    f"{name} {token_id} ({token_origin[name]}) is outside the text vocabulary "
                    f"[0, {vocab}) of {llm_dir / 'config.json'}"
                )
    config = build_config(mlcd, qwen, token_ids, vit_dir / "config.json", llm_dir / "config.json")
    shapes = expected_shapes(config)

    vit_reader, llm_reader = HFCheckpointReader(vit_dir), HFCheckpointReader(llm_dir)
    vit_names, prefix = _vit_names(vit_reader)
    vit_implied = f"{vit_dir / 'config.json'} ({_fields(mlcd, _VIT_CONFIG_FIELDS)})"
    llm_implied = f"{llm_dir / 'config.json'} ({_fields(qwen, _QWEN3_SHAPE_FIELDS)})"
    tied = bool(qwen.get("tie_word_embeddings", False))
    llm_available = llm_reader.names()
    vit_table = mlcd_table(config.vision_config.embed_dim)

    tensors: list[TensorPlan] = []
    used_vit: set[str] = set()
    used_llm: set[str] = set()
    for name, shape in shapes.items():
        if name.startswith("visual.merger."):
            if name.endswith("ln_q.weight"):
                init = "ones"
            elif name.endswith(".weight"):
                init = "normal"
            else:
                init = "zeros"
            tensors.append(TensorPlan(name, shape, "merger", init=init))
        elif name.startswith("visual."):
            row, shorts = _vit_row(vit_table, name)
            sources = []
            for short in shorts:
                if short not in vit_names:
                    raise ConversionError(f"tensor {prefix + short!r} is missing from {vit_dir}")
                sources.append(vit_names[short])
            parts = row.transform.to_hf(torch.empty(shape, device="meta"))
            for source, part in zip(sources, parts, strict=True):
                _check_shape(vit_reader, source, tuple(part.shape), vit_implied)
            used_vit.update(sources)
            tensors.append(
                TensorPlan(name, shape, "vision", tuple(sources), transform=row.transform)
            )
        elif name == "lm_head.weight" and tied:
            embed = "model.embed_tokens.weight"
            stored = name if name in llm_available else ""
            if stored:
                _check_shape(llm_reader, stored, shape, llm_implied)
                used_llm.add(stored)
            tensors.append(TensorPlan(name, shape, "language", (embed,), must_equal=stored))
        else:
            if name not in llm_available:
                hint = (
                    " (config.json has tie_word_embeddings false)"
                    if name == "lm_head.weight"
                    else ""
                )
                raise ConversionError(f"tensor {name!r} is missing from {llm_dir}{hint}")
            _check_shape(llm_reader, name, shape, llm_implied)
            used_llm.add(name)
            tensors.append(TensorPlan(name, shape, "language", (name,)))

    dropped = {vit_names[d] for d in MLCD_DROPPED if d in vit_names}
    unexpected_vit = sorted(set(vit_names.values()) - used_vit - dropped)
    if unexpected_vit:
        raise ConversionError(
            f"unexpected tensor {unexpected_vit[0]!r} in {vit_dir} (not part of an MLCD vision "
            f"tower with {_fields(mlcd, _VIT_CONFIG_FIELDS)}; {len(unexpected_vit)} in all)"
        )
    unexpected_llm = sorted(llm_available - used_llm)
    if unexpected_llm:
        raise ConversionError(
            f"unexpected tensor {unexpected_llm[0]!r} in {llm_dir} (not part of a "
            f"Qwen3ForCausalLM with {_fields(qwen, _QWEN3_SHAPE_FIELDS)}; "
            f"{len(unexpected_llm)} in all)"
        )

    if dtype == "auto":
        declared = qwen.get("dtype") or qwen.get("torch_dtype")
        torch_dtype = TORCH_DTYPES.get(declared) if isinstance(declared, str) else None
        if torch_dtype is None:
            torch_dtype = llm_reader.get("model.norm.weight").dtype
    else:
        torch_dtype = TORCH_DTYPES[dtype]
    return Stage0Plan(vit_dir, llm_dir, tok_dir, config, tensors, torch_dtype, tied, token_origin)


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------


def init_merger(
    tensors: list[TensorPlan], seed: int, init_std: float = 0.02
) -> dict[str, torch.Tensor]:
    """The fresh merger tensors (fp32) of ``tensors``' ``"merger"`` entries, deterministic.

    Weights drawn ``N(0, init_std²)`` in plan order (``mlp.0`` then ``mlp.2``) from one CPU
    generator seeded with ``seed``; ``ln_q`` weight ones; biases zeros.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for t in tensors:
        if t.origin != "merger":
            continue
        if t.init == "normal":
            out[t.name] = torch.randn(t.shape, generator=generator, dtype=torch.float32) * init_std
        elif t.init == "ones":
            out[t.name] = torch.ones(t.shape, dtype=torch.float32)
        else:
            out[t.name] = torch.zeros(t.shape, dtype=torch.float32)
    return out


def _stream(
    plan: Stage0Plan, merger: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Output tensors in plan order, one at a time (a ViT qkv reads its three parts)."""
    vit, llm = HFCheckpointReader(plan.vit_dir), HFCheckpointReader(plan.llm_dir)
    for t in plan.tensors:
        if t.origin == "merger":
            tensor = merger[t.name]
        elif t.origin == "vision":
            tensor = t.transform.to_megatron([vit.get(s) for s in t.sources])
        else:
            tensor = llm.get(t.sources[0])
            if t.must_equal:
                check_tied_lm_head(llm, t.must_equal, t.sources[0], embed_tensor=tensor)
        if tuple(tensor.shape) != t.shape:  # checked in the plan; guards a changing file
            raise ConversionError(f"{t.name}: got shape {list(tensor.shape)}, expected {t.shape}")
        yield t.name, tensor.to(plan.dtype)


def _write_assets(plan: Stage0Plan, writer: HFCheckpointWriter, image: Any) -> list[str]:
    """Tokenizer files from the tokenizer dir (or the offline Qwen tokenizer when it has none),
    and our chat template, processor and generation config (``hf.export.write_hf_assets``)."""
    from lov15_megatron.hf.export import write_hf_assets

    return write_hf_assets(writer.tmp, tokenizer_dir=plan.tokenizer_dir, image=image)


def make_stage0(
    vit_dir: str | Path,
    llm_dir: str | Path,
    save_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    dtype: str = "auto",
    init_std: float = 0.02,
    max_shard_bytes: int = 2 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
    image: Any = None,
) -> Stage0Summary:
    """Build the stage-0 HF directory ``save_dir``; see the module docstring.

    Everything is checked by :func:`plan_stage0` before writing starts; output goes to
    ``<save_dir>.tmp`` and is renamed into place when complete, and removed on any error.
    ``progress`` shows a progress bar and a few lines describing the inputs on stderr.
    ``image`` (a ``data.image_processing.ImageConfig``; default: the release's training
    budget) goes into the processor files.
    """
    start = time.perf_counter()
    save_dir = Path(save_dir)
    plan = plan_stage0(vit_dir, llm_dir, tokenizer_dir, dtype)
    check_save_dir(save_dir, [plan.vit_dir, plan.llm_dir, plan.tokenizer_dir], overwrite)
    if progress:
        _describe(plan, seed, init_std)
    merger = init_merger(plan.tensors, seed, init_std)
    writer = HFCheckpointWriter(save_dir, max_shard_bytes)
    try:
        bar = tqdm(
            total=len(plan.tensors), desc="make-stage0", unit="tensor", disable=not progress,
            mininterval=1.0, file=sys.stderr,
        )  # fmt: skip
        for name, tensor in _stream(plan, merger):
            writer.add(name, tensor)
            bar.update(1)
        bar.close()
        _write_config(plan, writer.tmp)
        copied = _write_assets(plan, writer, image)
        out = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return Stage0Summary(
        out,
        len(plan.tensors),
        plan.count("vision"),
        plan.count("merger"),
        plan.count("language"),
        writer.total_bytes,
        time.perf_counter() - start,
        copied,
    )


def _write_config(plan: Stage0Plan, directory: Path) -> None:
    """``config.json`` (with ``auto_map``) and the two modeling files into ``directory``."""
    from lov15_megatron.hf.export import add_auto_map, write_model_code

    config = plan.config
    config.dtype = plan.dtype
    config.architectures = ["LLaVAOneVision1_5_ForConditionalGeneration"]
    config.save_pretrained(directory)
    add_auto_map(directory / "config.json")
    write_model_code(directory)


def _describe(plan: Stage0Plan, seed: int, init_std: float) -> None:
    v, t = plan.config.vision_config, plan.config.text_config
    merged = v.embed_dim * v.spatial_merge_size**2
    untie = "tied -> lm_head copied from embed_tokens" if plan.tied_source else "untied"
    lines = [
        f"vision:   {plan.vit_dir} (MLCD, {v.depth} layers, width {v.embed_dim}, "
        f"{v.num_heads} heads, patch {v.patch_size}; post_layernorm dropped)",
        f"language: {plan.llm_dir} (Qwen3, {t.num_hidden_layers} layers, width "
        f"{t.hidden_size}, vocab {t.vocab_size}; {untie})",
        f"merger:   {merged} -> {merged} -> {t.hidden_size}, weights N(0, {init_std}^2) "
        f"seed {seed}, biases 0, ln_q 1/0",
        f"dtype:    {dtype_name(plan.dtype)}; tokenizer from {plan.tokenizer_dir}",
    ]
    for name, origin in plan.token_id_origin.items():
        lines.append(f"{name}: {getattr(plan.config, name)} ({origin})")
    print("\n".join(lines), file=sys.stderr)


__all__ = [
    "SPECIAL_TOKENS",
    "Stage0Plan",
    "Stage0Summary",
    "TensorPlan",
    "build_config",
    "expected_shapes",
    "init_merger",
    "make_stage0",
    "plan_stage0",
    "special_token_ids",
    "text_config_from_qwen3",
    "vision_config_from_mlcd",
]
