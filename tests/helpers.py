"""Helpers shared by test modules (``tests/`` is on ``sys.path`` under pytest)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONVERT = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py")]


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``tools/convert_checkpoint.py`` with these arguments (one thread, repo root)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CONVERT, *args], capture_output=True, text=True, env=env, cwd=ROOT)


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory's ``*.safetensors`` files (one or several shards)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    return tensors


def ok(*args: str) -> str:
    """``cli`` that must succeed; returns its stdout."""
    out = cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def verify_layouts(
    model: str, hf: Path, mc: Path, layouts: list[tuple[int, ...]]
) -> dict[tuple[int, ...], dict]:
    """``verify --layouts`` through the CLI (one launch of ranks for all): each layout's JSON
    line, keyed by the layout as given ((tp, pp) or (tp, pp, ep))."""
    import json

    spelled = ["x".join(map(str, layout)) for layout in layouts]
    out = ok("verify", "--model", model, "--hf-dir", str(hf), "--load-dir", str(mc),
             "--layouts", *spelled)  # fmt: skip
    lines = [json.loads(line) for line in out.strip().splitlines() if line.startswith("{")]
    assert len(lines) == len(layouts), out
    return dict(zip(layouts, lines, strict=True))


# --------------------------------------------------------------------------------------------
# Packed vision-language micro-batches in the task encoder's layout
# --------------------------------------------------------------------------------------------

IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
TEXT_VOCAB = 5000  # random text ids come from here (below every special token)


def vlm_sample(seed: int, grids: list[tuple[int, int]], text_len: int = 5) -> dict:
    """One sub-sample: text, then an image block per grid, then text; labels already shifted."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = torch.randint(0, TEXT_VOCAB, (text_len,), generator=gen).tolist()
    pixels, thw = [], []
    for h, w in grids:
        ids += [VISION_START, *([IMAGE_PAD] * (h * w // 4)), VISION_END]
        ids += torch.randint(0, TEXT_VOCAB, (3,), generator=gen).tolist()
        pixels.append(torch.randn(h * w, 588, generator=gen))
        thw.append([1, h, w])
    labels = ids[1:] + [-100]
    labels = [-100 if t in (IMAGE_PAD, VISION_START, VISION_END) else t for t in labels]
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.cat(pixels) if pixels else torch.zeros(0, 588),
        "image_grid_thw": torch.tensor(thw, dtype=torch.long).reshape(-1, 3),
    }


def pack_rows(rows: list[list[dict]], seq_len: int) -> dict:
    """Task-encoder layout: rows of sub-samples, padded to ``seq_len``, flat ``cu_seqlens``."""
    ids, labels, pixels, grids, bounds = [], [], [], [], [0]
    for r, row in enumerate(rows):
        row_ids = [t for s in row for t in s["input_ids"]]
        row_labels = [t for s in row for t in s["labels"]]
        for s in row:
            bounds.append(bounds[-1] + len(s["input_ids"]))
            pixels.append(s["pixel_values"])
            grids.append(s["image_grid_thw"])
        pad = seq_len - len(row_ids)
        assert pad >= 0
        if pad:
            bounds.append((r + 1) * seq_len)
        ids.append(row_ids + [151643] * pad)
        labels.append(row_labels + [-100] * pad)
    from lov15_megatron.models.packed_seq import (
        position_ids_from_cu_seqlens,
        row_cu_seqlens_from_flat,
    )

    cu = torch.tensor(bounds, dtype=torch.int32)
    labels_t = torch.tensor(labels)
    return {
        "input_ids": torch.tensor(ids),
        "labels": labels_t,
        "loss_mask": (labels_t != -100).float(),
        "position_ids": position_ids_from_cu_seqlens(
            row_cu_seqlens_from_flat(cu, len(rows), seq_len), seq_len
        ),
        "pixel_values": torch.cat(pixels),
        "image_grid_thw": torch.cat(grids),
        "cu_seqlens": cu,
    }


def packed_attention_mask(
    cu_seqlens: list[torch.Tensor | list[int]], seq_length: int, *, causal: bool
) -> torch.Tensor:
    """The reference attention of packed rows as a dense ``[b, 1, s, s]`` bool mask, **True =
    masked out**, written from the rule of ``docs/packed-sequences.md`` apart from the model's
    THD path: query ``q`` may attend to key ``k`` iff both lie in the same segment of their row
    (a sub-sample of the row's ``cu_seqlens``, or the padding tail after the last one) and, if
    ``causal``, ``k ≤ q``.

    Megatron's local ``DotProductAttention`` takes this convention (``attention_mask_func`` fills
    the masked scores with -10000) when built with ``AttnMaskType.padding``; with ``causal`` its
    fused GPU softmax ignores the mask. ``scaled_dot_product_attention`` wants ``~mask``.
    """
    masks = []
    for cu in cu_seqlens:
        bounds = [int(b) for b in cu]
        if bounds[-1] < seq_length:  # the padding tail is one more segment
            bounds.append(seq_length)
        segment = torch.empty(seq_length, dtype=torch.long)
        for index, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
            segment[start:end] = index
        allowed = segment[:, None] == segment[None, :]
        if causal:
            allowed &= torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
        masks.append(~allowed)
    return torch.stack(masks).unsqueeze(1)


def packed_images_attention_mask(packed) -> torch.Tensor:
    """``[1, 1, s, s]`` bool, True where query and key belong to different images of a
    ``PackedImages`` layout: each image is its class token and its ``h·w`` patches, attending
    bidirectionally within itself (read from ``packed.grids`` only, not from its ``cu_seqlens``).
    """
    bounds = [0]
    for h, w in packed.grids:
        bounds.append(bounds[-1] + h * w + 1)
    return packed_attention_mask([bounds], bounds[-1], causal=False)


# --------------------------------------------------------------------------------------------
# Tiny random Hugging Face checkpoints and the exports built from them
# --------------------------------------------------------------------------------------------

MAX_NEW = 8  # new tokens generated by our_generation


def make_hf_vlm(path: Path, seed: int = 0, text: dict | None = None, **fields):
    """A tiny random HF LLaVA-OV-1.5 saved with its code; ``text`` overrides text_config fields
    (e.g. ``model_type="qwen3_moe"`` and the expert fields for the MoE VLM, or a small
    ``vocab_size``), ``fields`` top-level ones (e.g. token ids inside that vocabulary)."""
    from lov15_megatron.hf import (
        LLaVAOneVision1_5_Config,
        LLaVAOneVision1_5_ForConditionalGeneration,
        save_pretrained_with_code,
    )

    config = LLaVAOneVision1_5_Config(
        vision_config=dict(depth=2, embed_dim=64, hidden_size=64, intermediate_size=128,
                           num_heads=4, patch_size=14, spatial_merge_size=2),
        text_config={**dict(vocab_size=151936, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, max_position_embeddings=256, rope_theta=10000.0,
                            rms_norm_eps=1e-6, tie_word_embeddings=False), **(text or {})},
        **fields,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LLaVAOneVision1_5_ForConditionalGeneration(config)
    with torch.no_grad():  # perturb everything, norms and biases included
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.05 if p.dim() > 1 else 0.1)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    save_pretrained_with_code(model, path)
    return model


def build_tiny_export(root: Path) -> Path:
    """A tiny stage-0 export (random MLCD ViT + Qwen3 with the Qwen vocabulary) via make_stage0."""
    from transformers import MLCDVisionConfig, MLCDVisionModel, Qwen3Config, Qwen3ForCausalLM

    from lov15_megatron.models.llava_ov.stage0 import make_stage0

    torch.manual_seed(0)
    MLCDVisionModel(MLCDVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        patch_size=14, image_size=56, num_channels=3,
    )).save_pretrained(root / "vit")  # fmt: skip
    Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=151936,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    ).save_pretrained(root / "llm")  # fmt: skip — no tokenizer there: the offline one is written
    out = make_stage0(root / "vit", root / "llm", root / "stage0", seed=1, progress=False)
    return out.output


def save_image(path: Path, height: int, width: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_clip(path: Path, frames: int = 20, fps: int = 10, width: int = 64, height: int = 48):
    """An MPEG-4 clip in an mp4 container (PyAV's encoder) whose frame i is flat grey 8·i, so a
    decoded frame says which one it is; returns ``path``."""
    import av
    import numpy as np

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"}
        for index in range(frames):
            pixels = np.full((height, width, 3), 8 * index, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


@torch.no_grad()
def our_generation(model, messages: list, images: list, videos: tuple = ()) -> list[int]:
    """Our path: the training template, image pipeline and video rule (``videos``: files), then
    ``generate`` (greedy)."""
    import numpy as np

    from lov15_megatron.data.chat import Message, encode_conversation
    from lov15_megatron.data.image_processing import preprocess_image
    from lov15_megatron.data.special_tokens import ENDOFTEXT_ID, IM_END_ID
    from lov15_megatron.data.task_encoder import frame_pixel_values
    from lov15_megatron.data.tokenizer import load_tokenizer
    from lov15_megatron.data.video import load_video

    processed = [preprocess_image(image) for image in images]
    loaded = [load_video(video) for video in videos]
    prompt = [*messages, Message("assistant", "")]
    counts = [p.num_tokens for p in processed]
    tokenizer = load_tokenizer("qwen-offline")
    video_counts = [plan.num_tokens for plan, _ in loaded]
    ids = encode_conversation(tokenizer, prompt, counts, "instruct", video_counts).input_ids
    ids = ids[:-1]  # "<|im_start|>assistant\n" ends the prompt
    kwargs = {}
    if processed:
        kwargs["pixel_values"] = torch.from_numpy(
            np.concatenate([p.pixel_values for p in processed])
        )
        kwargs["image_grid_thw"] = torch.tensor([p.grid_thw for p in processed])
    if loaded:
        pixels = np.concatenate([frame_pixel_values(frames) for _, frames in loaded])
        kwargs["pixel_values_videos"] = torch.from_numpy(pixels)
        kwargs["video_grid_thw"] = torch.tensor([plan.grid_thw for plan, _ in loaded])
    out = model.generate(
        input_ids=torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
        eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID, **kwargs,
    )  # fmt: skip
    return out[0, len(ids) :].tolist()


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` as a module, loaded from its file once and registered in
    ``sys.modules`` (a module's dataclasses need that): ``benchmarks/`` is a folder of scripts,
    not a package, and is not on ``sys.path`` under pytest."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None, f"benchmarks/{name}.py"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def raster_to_merge_order(height: int, width: int, merge_size: int = 2) -> torch.Tensor:
    """Index ``idx`` with ``merge_ordered = raster_ordered[idx]`` for a ``height x width`` grid.

    The reference order of MLCD's raster patches vs the Rice ViT's 2x2-merge order
    (docs/model-reference.md §2), written here apart from the model's ``merge_order_positions``.
    """
    rows = torch.arange(height * width).view(height, width)
    rows = rows.view(height // merge_size, merge_size, width // merge_size, merge_size)
    return rows.permute(0, 2, 1, 3).flatten()


def rice_vit_from_mlcd(
    mlcd: Mapping[str, torch.Tensor], rice: str = "visual."
) -> dict[str, torch.Tensor]:
    """An MLCD vision state dict (``vision_model.`` prefix or not) in Rice ViT names under
    ``rice``, through the stage-0 builder's table (``models/llava_ov/mlcd_mapping.py``).

    Every row is applied for every layer the state dict holds (width and depth are read from
    it); every MLCD tensor except ``MLCD_DROPPED`` must be used. The merger is not produced.
    """
    from lov15_megatron.models.llava_ov.mlcd_mapping import MLCD_DROPPED, MLCD_PREFIX, mlcd_rows

    state = {k.removeprefix(MLCD_PREFIX): v for k, v in mlcd.items()}
    hidden = state["embeddings.class_embedding"].shape[0]
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for row in mlcd_rows(hidden, rice):
        for layer in range(depth) if "*" in row.megatron else range(1):
            name = row.megatron.replace("*", str(layer))
            sources = row.match(name)
            assert sources is not None, name
            out[name] = row.transform.to_megatron([state[s] for s in sources])
            used.update(sources)
    unused = sorted(set(state) - used - set(MLCD_DROPPED))
    assert not unused, f"MLCD tensors the table does not use: {unused}"
    return out


#: The tiny Qwen3 shape of the conversion tests (vocab 250, so Megatron pads it).
TINY_QWEN3 = dict(
    vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    rope_theta=10000.0, rms_norm_eps=1e-6,
)  # fmt: skip


def make_hf_tiny_lm(path: Path, config_class, model_class, seed: int = 0, **fields):
    """A tiny random transformers LM of ``TINY_QWEN3``'s shape (``fields`` added or replaced),
    every parameter drawn N(0, 0.2) (non-trivial norms, routers and experts; larger weights than
    the default init), saved to ``path``; returns the model."""
    torch.manual_seed(seed)
    model = model_class(config_class(**{**TINY_QWEN3, **fields}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return model


def make_hf_qwen3(path: Path, tied: bool = False, seed: int = 0, **overrides):
    """A tiny random ``Qwen3ForCausalLM`` (transformers' own class; vocab 250 so Megatron pads),
    saved to ``path`` with a tokenizer config; returns the model."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = make_hf_tiny_lm(path, Qwen3Config, Qwen3ForCausalLM, seed,
                            tie_word_embeddings=tied, **overrides)  # fmt: skip
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    return model


@contextlib.contextmanager
def watchdog(proc: subprocess.Popen, seconds: float = 900.0):
    """Kill ``proc`` if it is still running after ``seconds`` (a hang must not block CI)."""
    timer = threading.Timer(seconds, proc.kill)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
