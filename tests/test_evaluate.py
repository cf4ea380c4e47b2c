"""``tools/evaluate.py`` on a tiny export and a local QA set (JSONL and JSON, one and two images,
videos, a file mixing image and video items under one ``{media}`` prompt).

The expected answers of some questions are set to what our own generation path answers (so they
must be scored correct) and the rest to something else (so they must be wrong): the accuracy
table is known in advance. Bad input: one ``error:`` line, exit 2, no report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import build_tiny_export, our_generation, save_image, write_clip
from PIL import Image

from lov15_megatron.data.chat import Message
from lov15_megatron.data.special_tokens import (
    ENDOFTEXT_ID,
    IM_END_ID,
    IMAGE_PAD_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
)
from lov15_megatron.data.tokenizer import load_tokenizer
from lov15_megatron.evaluation import EvaluationError, load_qa, score_qa
from lov15_megatron.hf import LLaVAOneVision1_5_ForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "<image>\n{question}"


def evaluate_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "evaluate.py"), *args],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    export = build_tiny_export(root)
    model = LLaVAOneVision1_5_ForConditionalGeneration.from_pretrained(export).eval()
    images = root / "images"
    images.mkdir()
    questions = [
        ("a.png", (60, 100), "What colour is it?", "colour", True),
        ("b.png", (120, 90), "How many shapes?", "count", True),
        ("c.png", (84, 84), "What shape is it?", "shape", False),
        ("d.png", (200, 56), "What colour is the background?", "colour", False),
    ]
    items = []
    for index, (name, (h, w), question, kind, right) in enumerate(questions):
        save_image(images / name, h, w, index)
        ids = our_generation(
            model, [Message("user", PROMPT.replace("{question}", question))],
            [Image.open(images / name)],
        )  # fmt: skip
        ids = ids[: ids.index(IM_END_ID)] if IM_END_ID in ids else ids
        said = load_tokenizer("qwen-offline").decode([t for t in ids if t < ENDOFTEXT_ID]).strip()
        answer = said if right else said + " not this"
        items.append({"id": f"q{index}", "image": f"images/{name}", "question": question,
                      "answer": answer, "type": kind, "chance": 0.25, "said": said})  # fmt: skip
    # one two-image question, placeholders in the question itself
    save_image(images / "e.png", 56, 112, 9)
    two = "Compare <image> with <image>."
    ids = our_generation(
        model, [Message("user", two)], [Image.open(images / "b.png"), Image.open(images / "e.png")]
    )
    ids = ids[: ids.index(IM_END_ID)] if IM_END_ID in ids else ids
    said = load_tokenizer("qwen-offline").decode([t for t in ids if t < ENDOFTEXT_ID]).strip()
    pair = {"id": "pair", "images": ["images/b.png", "images/e.png"], "question": two,
            "answer": said, "type": "pair", "said": said}  # fmt: skip
    jsonl = root / "qa.jsonl"
    jsonl.write_text("".join(json.dumps(i) + "\n" for i in items))

    return {"root": root, "export": export, "jsonl": jsonl, "items": items, "pair": pair}


def test_report_matches_known_answers(setup, tmp_path) -> None:
    report_path = tmp_path / "out" / "report.json"
    out = evaluate_cli("--checkpoint", str(setup["export"]), "--data", str(setup["jsonl"]),
                       "--report", str(report_path), "--prompt", PROMPT, "--max-new-tokens", "8",
                       cache=tmp_path / "modules")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["questions"] == 4 and report["correct"] == 2 and report["accuracy"] == 0.5
    per = report["accuracy_per_type"]
    assert per["colour"] == {"questions": 2, "correct": 1, "accuracy": 0.5, "chance": 0.25}
    assert (per["count"]["correct"], per["shape"]["correct"]) == (1, 0)
    for answer, item in zip(report["answers"], setup["items"], strict=True):
        assert answer["predicted"] == item["said"]  # the HF flow answers as our own path does
        assert answer["correct"] == (item["answer"] == item["said"])
    assert "colour       1/2   = 0.50 (0.25)" in out.stdout and "accuracy 2/4 = 0.50" in out.stdout
    assert "video_processor" not in report  # no item has a video


def test_json_list_two_images_and_relaxed_match(setup, tmp_path) -> None:
    pair = dict(setup["pair"], answer=setup["pair"]["said"].upper() + " .")
    data = setup["root"] / "pair_upper.json"
    data.write_text(json.dumps([pair]))
    report_path = tmp_path / "report.json"
    out = evaluate_cli("--checkpoint", str(setup["export"]), "--data", str(data), "--report",
                       str(report_path), "--max-new-tokens", "8", "--match", "relaxed",
                       "--min-pixels", "3136", "--max-pixels", "2560000", "--quiet",
                       cache=tmp_path / "modules")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["image_processor"]["max_pixels"] == 2560000 and report["match"] == "relaxed"
    (answer,) = report["answers"]
    assert answer["images"][1].endswith("e.png")
    assert answer["predicted"] == setup["pair"]["said"]  # two images at their placeholders
    assert answer["correct"] is True  # upper case and " ." ignored by the relaxed match


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing image", r"q1: image .*nothere.png: cannot open"),
        ("not an image", r"q1: image .*broken.png: cannot open"),
        ("too many placeholders", r"line 2: the question has 2 <image> placeholders but 1 images"),
        ("no processor", r"no processor \(preprocessor_config.json / processor_config.json"),
        ("bad json", r"qa.jsonl: not valid JSON/JSONL"),
    ],
)
def test_bad_input(setup, tmp_path, case, expected) -> None:
    items = [dict(i) for i in setup["items"]]
    checkpoint = setup["export"]
    if case == "missing image":
        items[1]["image"] = "images/nothere.png"
    elif case == "not an image":
        (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
        items[1]["image"] = str(tmp_path / "broken.png")
    elif case == "too many placeholders":
        items[1]["question"] = "<image> and <image>?"
    elif case == "no processor":
        checkpoint = tmp_path / "bare"
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text((setup["export"] / "config.json").read_text())
    data = setup["root"] / f"{case.replace(' ', '_')}" / "qa.jsonl"
    data.parent.mkdir(exist_ok=True)
    if not (data.parent / "images").exists():
        (data.parent / "images").symlink_to(setup["root"] / "images")
    text = "".join(json.dumps(i) + "\n" for i in items)
    data.write_text(text if case != "bad json" else text + "{oops\n")
    report = tmp_path / "report.json"
    out = evaluate_cli("--checkpoint", str(checkpoint), "--data", str(data), "--report",
                       str(report), cache=tmp_path / "modules")  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    assert re.search(expected, lines[0]), lines[0]
    assert not report.exists()


def test_video_questions(setup, tmp_path, isolated_hf_modules, monkeypatch) -> None:
    """``video`` items: the checkpoint's processor samples the clip by the release's rule and
    the answer is our own path's (one item right, one wrong); a missing video is named."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = write_clip(setup["root"] / "clip.mp4")
    model = LLaVAOneVision1_5_ForConditionalGeneration.from_pretrained(setup["export"]).eval()
    question = "Does it get brighter?"
    ids = our_generation(model, [Message("user", "<video>" + question)], [], (clip,))
    ids = ids[: ids.index(IM_END_ID)] if IM_END_ID in ids else ids
    said = load_tokenizer("qwen-offline").decode([t for t in ids if t < ENDOFTEXT_ID]).strip()
    items = [
        {"id": "right", "video": "clip.mp4", "question": question, "answer": said, "type": "video"},
        {"id": "wrong", "videos": ["clip.mp4"], "question": "<video>" + question,
         "answer": said + " not this", "type": "video"},
    ]  # fmt: skip
    data = setup["root"] / "video.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in items))
    report = score_qa(setup["export"], data, max_new_tokens=8, progress=False)
    assert (report["questions"], report["correct"]) == (2, 1)
    assert [a["predicted"] for a in report["answers"]] == [said, said]
    assert report["answers"][0]["videos"] == [str(clip)]
    missing = setup["root"] / "missing_video.jsonl"
    missing.write_text(json.dumps(dict(items[0], video="nothere.mp4")) + "\n")
    with pytest.raises(EvaluationError, match=r"right: video .*nothere.mp4: no such file"):
        score_qa(setup["export"], missing)


def test_media_field_places_each_medium_as_training(
    setup, tmp_path, isolated_hf_modules, monkeypatch
) -> None:
    """``{media}\\n{question}`` on a file mixing an image item and a video item: the ids the
    model gets are training's for ``<image>\\n{question}`` and ``<video>\\n{question}`` (the
    pads right after ``user\\n``, then ``\\n`` and the question), and the report's
    ``video_processor`` is what the export's ``processor_config.json`` holds (settings other
    than the defaults, written here by hand), which the clip's grid follows."""
    from transformers.generation.utils import GenerationMixin

    from lov15_megatron.data.chat import encode_conversation
    from lov15_megatron.data.image_processing import preprocess_image
    from lov15_megatron.data.video import VideoConfig, load_video

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export = tmp_path / "export"  # the fixture's export with other video settings
    export.mkdir()
    for file in setup["export"].iterdir():
        if file.name != "processor_config.json":
            (export / file.name).symlink_to(file)
    settings = {"fps": 1.0, "min_frames": 2, "max_frames": 6, "frame_min_pixels": 3136,
                "frame_max_pixels": 12544, "video_max_pixels": 50176}  # fmt: skip
    (export / "processor_config.json").write_text(json.dumps({
        "auto_map": {"AutoProcessor": "processing_llavaonevision1_5.LLaVAOneVision1_5_Processor"},
        "processor_class": "LLaVAOneVision1_5_Processor", **settings,
    }))  # fmt: skip
    clip = write_clip(tmp_path / "clip.mp4")
    image_q, video_q = "What colour is it?", "Does it get brighter?"
    data = tmp_path / "mixed.jsonl"
    data.write_text(
        json.dumps({"id": "img", "image": str(setup["root"] / "images" / "a.png"),
                    "question": image_q, "answer": "x"}) + "\n"
        + json.dumps({"id": "vid", "video": "clip.mp4", "question": video_q, "answer": "x"}) + "\n"
    )  # fmt: skip
    seen: list[dict] = []
    generate = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    report = score_qa(export, data, prompt="{media}\n{question}", max_new_tokens=2, progress=False)

    assert report["video_processor"] == settings
    plan, _ = load_video(clip, VideoConfig(**settings))  # training's rule, the report's settings
    assert seen[1]["video_grid_thw"].tolist() == [list(plan.grid_thw)] and plan.grid_thw[0] == 2
    image_tokens = preprocess_image(Image.open(setup["root"] / "images" / "a.png")).num_tokens
    tokenizer = load_tokenizer("qwen-offline")
    for kwargs, text, images, videos, pad, other in [
        (seen[0], "<image>\n" + image_q, [image_tokens], [], IMAGE_PAD_ID, VIDEO_PAD_ID),
        (seen[1], "<video>\n" + video_q, [], [plan.num_tokens], VIDEO_PAD_ID, IMAGE_PAD_ID),
    ]:
        ids = kwargs["input_ids"][0].tolist()
        turns = [Message("user", text), Message("assistant", "")]
        assert (
            ids == encode_conversation(tokenizer, turns, images, "instruct", videos).input_ids[:-1]
        )  # the training text's ids
        start = ids.index(VISION_START_ID)
        count = (images or videos)[0]
        assert tokenizer.decode(ids[start - 2 : start]) == "user\n" and other not in ids
        assert ids[start + 1 : start + 1 + count] == [pad] * count
        end = ids.index(IM_END_ID, start)
        assert ids[start + 1 + count] == VISION_END_ID
        assert tokenizer.decode(ids[start + 2 + count : end]) == "\n" + text.split("\n", 1)[1]


def test_media_field_anywhere_in_the_template() -> None:
    """``{media}`` away from the start puts the media there (images, then videos), in the one
    pass that leaves a question's own ``{media}``/``{question}`` text alone."""
    from lov15_megatron.evaluation import QAItem, messages_for, render_prompt

    item = QAItem("q", "Is {media} odd?", "no", [Path("a.png"), Path("b.png")], videos=[Path("v")])
    text = render_prompt("Look: {media}\n{question}", item)
    assert text == "Look: <image><image><video>\nIs {media} odd?"
    text = render_prompt("Q: {question}\n{media}", item)
    (turn,) = messages_for(text, ["A", "B"], ["V"])
    assert [c.get("text") or c.get("image") or c.get("video") for c in turn["content"]] == [
        "Q: Is {media} odd?\n", "A", "B", "V"
    ]  # fmt: skip


@pytest.mark.parametrize("literal", ["<image>", "<video>"])
def test_media_field_with_a_literal_placeholder(setup, tmp_path, monkeypatch, capsys, literal):
    """``{media}`` beside a literal placeholder: one line naming the prompt, exit 2, no report
    (checked before anything loads)."""
    from lov15_megatron.cli.evaluate import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = tmp_path / "report.json"
    prompt = f"{{media}}\n{literal}{{question}}"
    code = main(["--checkpoint", str(setup["export"]), "--data", str(setup["jsonl"]),
                 "--report", str(report), "--prompt", prompt])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and not report.exists()
    assert lines[0].startswith(f"error: prompt {prompt!r}: holds both {{media}} and a literal ")
    assert f"a literal {literal};" in lines[0]


def test_quickstart_eval_file_loads(tmp_path) -> None:
    """The shapes data set's held-out file is a QA file as it is (relative image paths)."""
    from lov15_megatron.demo.shapes_dataset import generate_shapes_dataset

    data = generate_shapes_dataset(tmp_path / "shapes", seed=0, n_caption=2, n_instruct=1, n_eval=5)
    items = load_qa(data["eval"]["path"])
    assert len(items) == 5 and all(i.images[0].is_file() for i in items)
    assert {i.type for i in items} <= {"count", "shape", "colour", "position", "background"}
    assert all(i.chance is not None for i in items)
