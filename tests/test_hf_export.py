"""Exports that the ecosystem's tools take as they are.

A tiny stage-0 checkpoint is built with the real writer (``make_stage0``, offline Qwen
vocabulary), converted ``hf-to-mcore`` and back ``mcore-to-hf`` (with and without
``--hf-template``) through the real CLI. Every one of the three directories must hold the
weights, ``config.json`` with ``auto_map``, the code, the tokenizer, the chat template, the
processor and the generation config, and load with ``AutoProcessor`` / ``AutoTokenizer``
(``trust_remote_code``, offline); the round trips keep those files byte for byte.

Then the model card's quick start runs unchanged on the export and gives the same tokens as our
own generation path (``encode_conversation`` + ``preprocess_image`` + ``generate``), also for a
left-padded batch of two conversations with several images; bad input gives named errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MAX_NEW, build_tiny_export, ok, our_generation, save_image, write_clip
from PIL import Image

from lov15_megatron.data.chat import Message, encode_conversation
from lov15_megatron.data.errors import BadSample
from lov15_megatron.data.image_processing import ImageConfig, image_grid
from lov15_megatron.data.special_tokens import ENDOFTEXT_ID, IM_END_ID
from lov15_megatron.data.tokenizer import load_tokenizer
from lov15_megatron.hf import LLaVAOneVision1_5_ForConditionalGeneration
from lov15_megatron.hf.export import ASSET_FILES, AUTO_MAP, CODE_FILES


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    stage0 = build_tiny_export(root)
    ok("hf-to-mcore", "--model", "llava-ov-1.5", "--hf-dir", str(stage0),
       "--save-dir", str(root / "mcore"))  # fmt: skip
    ok("mcore-to-hf", "--model", "llava-ov-1.5", "--load-dir", str(root / "mcore"),
       "--save-dir", str(root / "back_template"), "--hf-template", str(stage0))  # fmt: skip
    ok("mcore-to-hf", "--model", "llava-ov-1.5", "--load-dir", str(root / "mcore"),
       "--save-dir", str(root / "back_plain"))  # fmt: skip
    return {"stage0": stage0, "template": root / "back_template", "plain": root / "back_plain"}


@pytest.fixture
def offline(monkeypatch, isolated_hf_modules):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return isolated_hf_modules


def test_every_export_is_complete_and_loads(exports, offline) -> None:
    from transformers import AutoProcessor, AutoTokenizer

    for directory in exports.values():
        for name in (*ASSET_FILES, *(p.name for p in CODE_FILES), "config.json"):
            assert (directory / name).is_file(), (directory, name)
        assert (directory / "model.safetensors").is_file()
        assert json.loads((directory / "config.json").read_text())["auto_map"] == AUTO_MAP
        pre = json.loads((directory / "preprocessor_config.json").read_text())
        assert (pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (14, 2, 1)
        assert (pre["min_pixels"], pre["max_pixels"]) == (4 * 28 * 28, 1600 * 1600)
        assert pre["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
        assert pre["image_std"] == pytest.approx([0.26862954, 0.26130258, 0.27577711])
        generation = json.loads((directory / "generation_config.json").read_text())
        assert (generation["eos_token_id"], generation["pad_token_id"]) == (IM_END_ID, ENDOFTEXT_ID)

    # the three hold the same processor files (next test): loading one loads them all
    directory = exports["plain"]
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    assert type(processor).__name__ == "LLaVAOneVision1_5_Processor"
    assert type(processor.image_processor).__name__ == "LLaVAOneVision1_5_ImageProcessor"
    assert type(processor.image_processor).__module__.startswith("transformers_modules.")
    assert not hasattr(processor, "video_processor")
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.chat_template == processor.chat_template
    assert "<|vision_start|><|image_pad|><|vision_end|>" in processor.chat_template


@pytest.mark.parametrize("which", ["template", "plain"])
def test_round_trip_keeps_processor_and_tokenizer_files(exports, which) -> None:
    for name in ASSET_FILES:
        original = (exports["stage0"] / name).read_bytes()
        assert (exports[which] / name).read_bytes() == original, name


def test_pixel_budget_passed_to_from_pretrained(exports, tmp_path, offline) -> None:
    """lmms-eval passes min_pixels/max_pixels (default min 200,704) to from_pretrained."""
    from transformers import AutoProcessor

    image = Image.open(save_image(tmp_path / "a.png", 224, 224, 0))
    default = AutoProcessor.from_pretrained(exports["stage0"], trust_remote_code=True)
    lmms = AutoProcessor.from_pretrained(
        exports["stage0"], trust_remote_code=True, min_pixels=200_704, max_pixels=1_605_632
    )
    grid_default = default.image_processor(image, return_tensors="np")["image_grid_thw"][0]
    grid_lmms = lmms.image_processor(image, return_tensors="np")["image_grid_thw"][0]
    assert tuple(grid_default) == image_grid(224, 224) == (1, 16, 16)
    assert tuple(grid_lmms) == image_grid(224, 224, ImageConfig(200_704, 1_605_632)) == (1, 32, 32)


@pytest.fixture(scope="module")
def our_model(exports):
    model = LLaVAOneVision1_5_ForConditionalGeneration.from_pretrained(
        exports["stage0"], dtype=torch.float32
    )
    return model.eval()


def test_model_card_quick_start(exports, our_model, tmp_path, offline) -> None:
    """The model card's code, unchanged but for the path and a local image."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    model_path = str(exports["template"])
    image_path = str(save_image(tmp_path / "demo.png", 300, 420, 1))
    # ---- the model card's quick start ----
    model = AutoModelForCausalLM.from_pretrained(
        model_path, torch_dtype="auto", trust_remote_code=True
    )  # the card adds device_map="auto" (needs accelerate; on CPU there is nothing to map)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image_path},
                {"type": "text", "text": "Describe this image."},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    inputs = inputs.to(model.device)
    generated_ids = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    generated_ids_trimmed = [
        out_ids[len(in_ids) :]
        for in_ids, out_ids in zip(inputs.input_ids, generated_ids, strict=True)
    ]
    output_text = processor.batch_decode(
        generated_ids_trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    # ---- end ----
    assert type(model).__module__.startswith("transformers_modules.")
    assert set(inputs) >= {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values"}
    ours = our_generation(
        our_model, [Message("user", "<image>Describe this image.")], [Image.open(image_path)]
    )
    trimmed = generated_ids_trimmed[0].tolist()
    assert trimmed == ours[: len(trimmed)] and len(trimmed) == len(ours)
    assert isinstance(output_text[0], str)
    assert output_text[0] == load_tokenizer("qwen-offline").decode(
        [t for t in ours if t < ENDOFTEXT_ID]
    )


def test_model_card_with_a_video(exports, our_model, tmp_path, offline) -> None:
    """The quick start with a ``{"type": "video"}`` message: the processor samples the release's
    frames and sizes (worked out by hand below), gives our training pipeline's pixels, and
    ``generate`` answers as our own path does."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    from lov15_megatron.data.special_tokens import VIDEO_PAD_ID
    from lov15_megatron.data.task_encoder import load_packed_video

    model_path = str(exports["template"])
    clip = write_clip(tmp_path / "clip.mp4", frames=20, fps=10)  # 2 s, 64×48, frame i grey 8·i
    model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(clip)},
                {"type": "text", "text": "Describe this video."},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    # The release's rule by hand: 20 frames / 10 fps · 2 fps = 4 frames (within [4, 768], even);
    # linspace(0, 19, 4) = 0, 6.33, 12.67, 19 → 0, 6, 13, 19; 64×48 = 3072 px is below
    # int(1.05·128·28²) = 105369: scale sqrt(105369/3072) = 5.857, 48 → ceil(281.1/28)·28 = 308,
    # 64 → ceil(374.8/28)·28 = 392; grid 22×28 patches, 11·14 = 154 tokens a frame, 616 in all.
    assert inputs["video_grid_thw"].tolist() == [[4, 22, 28]]
    ids = inputs["input_ids"][0]
    assert int((ids == VIDEO_PAD_ID).sum()) == 4 * 154
    assert torch.equal(inputs["mm_token_type_ids"][0] == 2, ids == VIDEO_PAD_ID)
    assert "pixel_values" not in inputs
    video = {"parts": ["v"], "frames": [0, 6, 13, 19], "grid_thw": [4, 22, 28], "fps": 10.0}
    frames = load_packed_video(video, {"v": clip.read_bytes()})  # the task encoder's frames
    ours_pixels = torch.from_numpy(np.concatenate([f.pixel_values for f in frames]))
    assert torch.equal(inputs["pixel_values_videos"], ours_pixels)

    generated = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    trimmed = generated[0, ids.shape[0] :].tolist()
    ours = our_generation(our_model, [Message("user", "<video>Describe this video.")], [], (clip,))
    assert trimmed == ours[: len(trimmed)] and len(trimmed) == len(ours)


@torch.no_grad()
def test_processor_batch_of_two_with_several_images(exports, our_model, tmp_path, offline) -> None:
    """``processor(text=[…], images=[…])``, left padding (lmms-eval), 3 images in 2 rows."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    directory = exports["template"]
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    images = [
        Image.open(save_image(tmp_path / f"{i}.png", h, w, i))
        for i, (h, w) in enumerate([(60, 100), (200, 150), (90, 400)])
    ]
    conversations = [
        [Message("user", "<image>\nWhat colour is the circle?")],
        [Message("user", "Compare <image> and <image>, which has more shapes?")],
    ]
    texts = [
        processor.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in conversation],
            tokenize=False,
            add_generation_prompt=True,
        )
        for conversation in conversations
    ]
    inputs = processor(text=texts, images=images, videos=None, padding=True, return_tensors="pt")
    assert inputs["image_grid_thw"].shape == (3, 3)
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"][1].sum()  # row 0 padded
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :].tolist()
    expected = [
        our_generation(our_model, conversations[0], images[:1]),
        our_generation(our_model, conversations[1], images[1:]),
    ]
    for row, want in zip(new, expected, strict=True):
        assert row[: len(want)] == want


def test_bad_inputs_are_named_errors(exports, tmp_path, our_model, offline) -> None:
    from transformers import AutoProcessor

    from lov15_megatron.evaluation import EvaluationError, check_checkpoint

    # a directory without a processor
    bare = tmp_path / "bare"
    shutil.copytree(exports["stage0"], bare)
    for name in ("preprocessor_config.json", "processor_config.json"):
        (bare / name).unlink()
    with pytest.raises(EvaluationError, match=r"bare: no processor"):
        check_checkpoint(bare)
    with pytest.raises((ValueError, OSError)):
        AutoProcessor.from_pretrained(bare, trust_remote_code=True)

    processor = AutoProcessor.from_pretrained(exports["stage0"], trust_remote_code=True)
    # an image the processor cannot open
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(broken)}]}]
    with pytest.raises(Exception, match=r"(?i)cannot identify image|image"):
        processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    # more image placeholders than images: the processor and the training template both refuse
    image = Image.open(save_image(tmp_path / "one.png", 56, 56, 0))
    text = processor.apply_chat_template(
        [{"role": "user", "content": "<image> and <image>?"}], tokenize=False
    )
    with pytest.raises(ValueError, match=r"2 image placeholders .* but 1 images") as caught:
        processor(text=[text], images=[image])
    assert type(caught.value).__name__ == "ImageTokenMismatchError"
    with pytest.raises(BadSample, match=r"2 <image> placeholders, 1 images"):
        encode_conversation(
            load_tokenizer("qwen-offline"),
            [Message("user", "<image> and <image>?"), Message("assistant", "x")],
            [1],
            "instruct",
        )
    # mm_token_type_ids that do not mark the image tokens
    inputs = processor(
        text=[text.replace("<|image_pad|>", "", 1)], images=[image], return_tensors="pt"
    )
    inputs["mm_token_type_ids"] = torch.zeros_like(inputs["mm_token_type_ids"])
    with pytest.raises(ValueError, match=r"mm_token_type_ids do not mark the image tokens"):
        our_model(**inputs)


def test_export_takes_the_runs_image_and_video_settings(exports, tmp_path, offline) -> None:
    """A training checkpoint records data.min/max_pixels and its packed data's video sampling
    settings in lov15_model.json; mcore-to-hf puts them into the processor (the other files stay
    the template's), and the CLI flags win. The export's processor then samples a clip onto the
    frame grid the packer gave it for training (the release's floor would not)."""
    from data_fixtures import pack, read_packs
    from transformers import AutoProcessor

    from lov15_megatron.checkpoint_dir import PACK_REPORT, describe_model
    from lov15_megatron.config import config_from_dict
    from lov15_megatron.data.offline_packing import REPORT_NAME

    assert PACK_REPORT == REPORT_NAME
    clip = write_clip(tmp_path / "clip.mp4", frames=20, fps=10)  # 2 s of 64×48 at 10 fps
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "v0", "video": "clip.mp4",
        "conversations": [{"from": "human", "value": "<video>\nWhat?"},
                          {"from": "gpt", "value": "grey"}]}]))  # fmt: skip
    report = pack([str(tmp_path / "llava.json")], tmp_path / "packed", kind="instruct",
                  videos="pack", frame_min_pixels=784, fps=4.0)  # fmt: skip
    assert report["samples_packed"] == 1
    ((record, _),) = read_packs(tmp_path / "packed").values()
    (packed,) = record["samples"][0]["videos"]
    # By hand: 20 frames / 10 fps · 4 fps = 8 frames; 64×48 is above int(1.05·784) = 823 px,
    # so smart_resize rounds it to 56×56: 4×4 patches a frame (144 tokens at the release's floor)
    assert packed["grid_thw"] == [8, 4, 4]

    packed_data = {"loader": "energon", "path": str(tmp_path / "packed")}
    cfg = config_from_dict({"data": {"min_pixels": 6272, "max_pixels": 401408, **packed_data}})
    described = describe_model(cfg, None, "llava-ov-1.5")
    assert described["image"] == {
        "min_pixels": 6272, "max_pixels": 401408, "max_image_side": None,
    }  # fmt: skip
    assert described["video"] == {
        "fps": 4.0, "min_frames": 4, "max_frames": 768, "frame_min_pixels": 784,
        "frame_max_pixels": 768 * 28 * 28, "video_max_pixels": 65536 * 28 * 28,
    }  # fmt: skip
    images_only = config_from_dict({"data": {"loader": "energon", "path": str(tmp_path)}})
    assert "video" not in describe_model(images_only, None, "llava-ov-1.5")
    run = tmp_path / "run"
    shutil.copytree(exports["stage0"].parent / "mcore", run)
    meta = json.loads((run / "lov15_model.json").read_text())
    (run / "lov15_model.json").write_text(
        json.dumps({**meta, "image": described["image"], "video": described["video"]})
    )
    # a later stage without videos, started from this run, keeps its video settings
    assert describe_model(images_only, run, "llava-ov-1.5")["video"] == described["video"]
    ok("mcore-to-hf", "--model", "llava-ov-1.5", "--load-dir", str(run), "--save-dir",
       str(tmp_path / "hf"), "--hf-template", str(exports["stage0"]),
       "--max-image-side", "1000")  # fmt: skip
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"], pre["max_image_side"]) == (6272, 401408, 1000)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "hf" / name).read_bytes() == (exports["stage0"] / name).read_bytes()
    processor_config = json.loads((tmp_path / "hf" / "processor_config.json").read_text())
    assert {k: processor_config[k] for k in described["video"]} == described["video"]

    def grid(directory: Path) -> list[list[int]]:
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
        return processor(text="<|video_pad|>", videos=[str(clip)])["video_grid_thw"].tolist()

    assert grid(tmp_path / "hf") == [packed["grid_thw"]]
    assert grid(exports["template"]) == [[4, 22, 28]]  # the release's defaults, as above


def test_bad_image_settings_are_one_line_errors(exports, tmp_path, capsys) -> None:
    from lov15_megatron.cli import make_stage0 as tool

    root = exports["stage0"].parent
    out = tmp_path / "out"
    args = ["--vit-dir", str(root / "vit"), "--llm-dir", str(root / "llm"), "--save-dir", str(out)]
    assert tool.main([*args, "--max-image-side", "5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --min-pixels/--max-pixels/--max-image-side: max_image_side must be "
                   "at least 28, got 5"]  # fmt: skip
    assert not out.exists() and not out.with_name("out.tmp").exists()
