"""The quickstart: end to end at its smallest size, and the labels of its vision pretraining.

``test_quickstart_small_pipeline`` runs ``python -m lov15_megatron.demo.quickstart --size
small --lora --video`` (the same code as ``bash scripts/quickstart.sh``, plus its LoRA variant
and its clips in stage 2's packs) and checks that every stage's loss falls, every artefact
exists and loads (the exported model is loaded to answer), and that the exported model *sees*:
it answers the 150 held-out questions better than any model blind to the image could, by more
than chance allows, and the 200 held-out clips better than any model blind to the clip could.
The clips' questions need more than one frame (how many shapes appear or vanish, which way one
moves, what colour one turns). The LoRA variant's merged export is stage 1.5's with exactly the
adapted matrices changed, and ``peft`` on stage 1.5's export with its adapter directory gives
the merged export's logits (its accuracy is reported, not asserted: ``docs/lora.md``). The
export's processor samples a clip as the packer did for training (4 frames of 3×3 tokens, 36
``<|video_pad|>`` tokens), from the settings the trainer recorded.

Why the margin. Under the null hypothesis "the answers do not depend on the image", an answer is
right with probability 1/k (k = the answers of its question type): the generator draws shape,
colour, position, count and background uniformly and independently of the question's text (up
to the held-out draw's rejection of training scenes, which the model cannot know). So the
accuracy over n questions has mean ``chance_accuracy``, and Hoeffding's inequality bounds
P(accuracy >= chance + t) <= exp(-2 n t^2). With t = sqrt(ln(1000) / (2 n)) (0.152 at n = 150)
a blind model passes with probability below 1e-3. The same bound is applied to what the
pretrained ViT reads from the held-out images: their count (k = 3, one per image) and each
shape's colour (k = 4; the 1–3 shapes of an image are not independent draws, so the bound is
taken with n = half the images, below the n_eff = (sum m_i)^2 / sum m_i^2 of Hoeffding's
inequality for images of m_i = 1, 2, 3 shapes).
The always-majority baseline (each type's most frequent held-out answer) is printed beside the
accuracy and must be beaten too. The clips' bound is the same, with k per video question type
(4, 4, 2, 2: chance 0.375 and t = 0.131 at n = 200). Measured 2026-12-07 (2-core CPU, seed 0,
800 training clips, stage 2 400 steps): images 0.59 against the bound 0.45 and the
always-majority 0.45 (count 30/30, background 30/30; colour binding has not appeared at this
size, see ``docs/quickstart.md``); clips 0.59 against the bound 0.51 and the always-majority
0.42 (appear 50/50 and vanish 50/50: the change in the number of shapes; move and turn, which
need a shape's place or colour binding, at chance); the ViT's colour 0.66 against 0.47, count
0.99 against 0.49.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_fixtures import read_packs

from lov15_megatron.demo.shapes_dataset import Scene, ShapeSpec
from lov15_megatron.demo.vision_pretrain import LABELS, attribute_hits, scene_labels, target


def hoeffding_margin(n: int, false_pass: float = 1e-3) -> float:
    """t with exp(-2 n t^2) = false_pass: how far above its mean n bounded draws stray with
    probability at most ``false_pass`` (module docstring)."""
    return math.sqrt(math.log(1 / false_pass) / (2 * n))


# The whole pipeline end to end, on the pinned environment that scripts/quickstart.sh installs
# (the second environment's subset covers the parts it is made of: conversion, training and
# resume at each layout, LoRA, MoE).
@pytest.mark.e2e
def test_quickstart_small_pipeline(tmp_path, isolated_hf_modules):
    out = tmp_path / "qs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run(
        [sys.executable, "-m", "lov15_megatron.demo.quickstart", "--size", "small", "--out", out,
         "--video", "--lora"],
        cwd=tmp_path, env=env, capture_output=True, text=True,  # any directory works
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[7/7] summary" in run.stdout and "accuracy" in run.stdout
    # A finished-looking run: nothing on stderr (no library warnings, no progress bars) and the
    # console shows each stage's progress (its last step at least), not only the log files.
    assert run.stderr == "", run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    lasts = [stage["last_iteration"] for stage in summary["stages"]]
    for last in set(lasts):  # each stage's last step on the console (stage 2 and LoRA: 200)
        progress = [
            line
            for line in run.stdout.splitlines()
            if line.strip().startswith(f"iter {last}/{last} loss=")
        ]
        assert len(progress) == lasts.count(last), progress
        assert all("grad_norm=" in line and "tokens/s=" in line for line in progress), progress

    assert [s["stage"] for s in summary["stages"]] == [
        "stage1",
        "stage1_5",
        "stage2",
        "stage2_lora",
    ]
    for stage in summary["stages"]:
        assert stage["last_loss"] < stage["first_loss"], stage
        assert math.isfinite(stage["last_valid_loss"]), stage  # held-out loss at the stage's end
        assert Path(stage["checkpoint"]).is_dir()
        assert (Path(stage["checkpoint"]) / "lov15_model.json").exists()
    assert summary["stages"][2]["last_loss"] < 0.5 * summary["stages"][2]["first_loss"]

    for split in ("caption", "instruct"):
        report = json.loads((out / f"packed_{split}" / "pack_report.json").read_text())
        assert report["samples_packed"] == report["samples_in"] and not report["samples_skipped"]
    assert (out / "stage0_hf" / "config.json").exists()
    assert (out / "final_hf" / "modeling_llavaonevision1_5.py").exists()

    answers = summary["answers"]
    assert len(answers) == 150 and all(a["predicted"] for a in answers)
    # It sees: better than a blind model by more than chance allows (module docstring), and
    # better than always answering each type's most frequent held-out answer.
    margin = hoeffding_margin(len(answers))
    assert summary["accuracy"] >= summary["chance_accuracy"] + margin, summary["accuracy_per_type"]
    assert summary["accuracy"] > summary["majority_answer_accuracy"], summary["accuracy_per_type"]
    assert f"against always-majority {summary['majority_answer_accuracy']:.2f}" in run.stdout
    for name, entry in summary["accuracy_per_type"].items():  # each type beside its baseline
        line = f"{name:10s} {entry['correct']:3d}/{entry['questions']:<3d} = "
        assert f"{line}{entry['accuracy']:.2f} (majority {entry['majority']:.2f}, " in run.stdout
    vision = summary["vision_pretraining"]
    assert vision["held_out_images"] == len(answers)  # one eval question per held-out image
    read = vision["held_out_accuracy"]
    assert read["colour"] >= 1 / 4 + hoeffding_margin(vision["held_out_images"] // 2), read
    assert read["count"] >= 1 / 3 + hoeffding_margin(vision["held_out_images"]), read
    for name, entry in summary["accuracy_per_type"].items():  # the blind baseline, per type
        asked = [a["answer"] for a in answers if a["type"] == name]
        assert entry["majority"] == max(map(asked.count, asked)) / len(asked)
    background = [a for a in answers if a["type"] == "background"]
    assert len({a["answer"] for a in background}) == 3  # white, gray and black all asked
    assert sum(a["correct"] for a in background) >= 0.8 * len(background), background

    _video_reached_the_model(out, summary, run.stdout)

    # --lora: stage 2 again as LoRA from stage 1.5, exported merged and as a PEFT adapter, and
    # scored on the same questions (its accuracy is reported, not asserted: see docs/lora.md).
    lora = summary["lora"]
    assert len(lora["answers"]) == len(answers) and all(a["predicted"] for a in lora["answers"])
    assert "LoRA stage 2 (rank 16, frozen weights): accuracy" in run.stdout
    assert lora["checkpoint_mib"] < lora["full_checkpoint_mib"] / 10  # adapters, no base
    _lora_exports_are_the_adapted_base(out)


def _video_reached_the_model(out: Path, summary: dict, stdout: str) -> None:
    """--video: the clips went into stage 2's packs with the split's sampling, the trainer
    recorded that sampling, the export's processor reproduces the packed frame grid (4 frames of
    3×3 tokens: 36 video tokens, not the release floor's 4 × 144), and every held-out clip was
    answered and reported beside its baselines."""
    from transformers import AutoProcessor

    from lov15_megatron.checkpoint_dir import read_model_file
    from lov15_megatron.data.special_tokens import VIDEO_PAD_ID
    from lov15_megatron.demo.shapes_video import FRAME_MIN_PIXELS, VIDEO_QUESTION_TYPES

    video = summary["video"]
    report = json.loads((out / "packed_instruct" / "pack_report.json").read_text())
    assert report["samples_in"] == report["samples_packed"] == 1000 + 800
    assert (report["videos"]["videos"], report["videos"]["frames"]) == (800, 800 * 4)
    assert video["packed"] == {"clips": 800, "frames": 3200}
    recorded = read_model_file(out / "stage2")["video"]  # its latest iteration's
    assert recorded["frame_min_pixels"] == FRAME_MIN_PIXELS == video["frame_min_pixels"]
    packed = next(
        v
        for record, _ in read_packs(out / "packed_instruct").values()
        for sample in record["samples"]
        for v in sample.get("videos", ())
    )
    assert packed["frames"] == [0, 2, 5, 7] and packed["grid_thw"] == [4, 6, 6]

    items = [json.loads(line) for line in (out / "data" / "video" / "eval.jsonl").open()]
    processor = AutoProcessor.from_pretrained(out / "final_hf", trust_remote_code=True)
    clip = str(out / "data" / "video" / items[0]["video"])
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video", "video": clip},
                                      {"type": "text", "text": "\n" + items[0]["question"]}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )  # fmt: skip
    assert inputs["video_grid_thw"].tolist() == [packed["grid_thw"]]
    assert int((inputs["input_ids"] == VIDEO_PAD_ID).sum()) == 4 * 9

    answers = video["answers"]
    assert len(answers) == len(items) == 200 and all(a["predicted"] for a in answers)
    assert [[Path(v).name for v in a["videos"]] for a in answers] == [
        [Path(i["video"]).name] for i in items
    ]
    assert f"video accuracy {video['accuracy']:.2f} against always-majority" in stdout
    for name, entry in video["accuracy_per_type"].items():  # each type beside its baseline
        asked = [a["answer"] for a in answers if a["type"] == name]
        assert entry["majority"] == max(map(asked.count, asked)) / len(asked)
        line = f"{name:10s} {entry['correct']:3d}/{entry['questions']:<3d} = "
        assert f"{line}{entry['accuracy']:.2f} (majority {entry['majority']:.2f}, " in stdout
    # It learns from the clips: better than a model blind to them by more than chance allows
    # (each clip's answer is drawn uniformly from its type's answers, independently of the
    # question's text: the module docstring's bound), and better than always-majority.
    chance = sum(1 / len(VIDEO_QUESTION_TYPES[a["type"]].answers) for a in answers) / len(answers)
    assert video["chance_accuracy"] == pytest.approx(chance, abs=1e-6)
    bound = chance + hoeffding_margin(len(answers))
    assert video["accuracy"] >= bound, video["accuracy_per_type"]
    assert video["accuracy"] > video["majority_answer_accuracy"], video["accuracy_per_type"]


#: The HF modules LoRA adapts in the quickstart's VLM (2 language layers, 2 ViT blocks, the
#: merger's MLP), written out by hand from the remote code's module names.
QUICKSTART_ADAPTED = sorted(
    [f"model.layers.{i}.{m}.weight" for i in range(2)
     for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    + [f"visual.blocks.{i}.{m}.weight" for i in range(2)
       for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    + ["visual.merger.mlp.0.weight", "visual.merger.mlp.2.weight"]
)  # fmt: skip


def _lora_exports_are_the_adapted_base(out: Path) -> None:
    """The merged export is stage 1.5's export with exactly the adapted matrices changed, and
    ``peft.PeftModel`` of stage 1.5's export with the adapter directory computes its logits."""
    import peft
    from helpers import ok, read_safetensors
    from tolerances import assert_close_fp32
    from transformers import AutoModelForCausalLM, AutoProcessor

    base_hf = out / "stage1_5_hf"
    ok("mcore-to-hf", "--model", "llava-ov-1.5", "--load-dir", str(out / "stage1_5"),
       "--save-dir", str(base_hf), "--hf-template", str(out / "stage0_hf"))  # fmt: skip
    base, merged = read_safetensors(base_hf), read_safetensors(out / "final_lora_hf")
    assert base.keys() == merged.keys()
    assert sorted(k for k in base if not torch.equal(base[k], merged[k])) == QUICKSTART_ADAPTED

    item = json.loads((out / "data" / "eval" / "eval.jsonl").read_text().splitlines()[0])
    processor = AutoProcessor.from_pretrained(out / "final_lora_hf", trust_remote_code=True)
    from PIL import Image

    image = Image.open(out / "data" / "eval" / item["image"]).convert("RGB")
    inputs = processor(text=f"<|image_pad|>{item['question']}", images=[image],
                       return_tensors="pt")  # fmt: skip
    logits = {}
    for name in ("peft", "merged", "base"):
        path = out / "final_lora_hf" if name == "merged" else base_hf
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                     dtype=torch.float32)  # fmt: skip
        if name == "peft":
            model = peft.PeftModel.from_pretrained(model, out / "final_lora_adapter")
        model.eval()
        with torch.no_grad():
            logits[name] = model(**inputs).logits.float()
    # The longest reduction: the patch embedding's 588 inputs (as tests/test_lora.py).
    assert_close_fp32(logits["peft"], logits["merged"], 588)
    assert not torch.allclose(logits["merged"], logits["base"])


# ----------------------------------------------------------------------------- vision pretraining


def test_vision_labels_of_a_scene_by_hand():
    scene = Scene(
        84, 84, "gray", (ShapeSpec("square", "blue", "top"), ShapeSpec("circle", "red", "left"))
    )
    assert sorted(scene_labels(scene)) == sorted([
        "background:gray", "count:2",
        "blue:square", "top:square", "top:blue",
        "red:circle", "left:circle", "left:red",
    ])  # fmt: skip
    # 3 backgrounds, 3 counts, 4 x 3 colour:shape, 5 x 3 position:shape, 5 x 4 position:colour
    assert len(set(LABELS)) == len(LABELS) == 3 + 3 + 12 + 15 + 20
    y = target(scene)
    assert y.sum() == 8 and {LABELS[i] for i in y.nonzero().flatten()} == set(scene_labels(scene))


def test_attribute_hits_read_each_answer_from_its_own_labels():
    scene = Scene(
        140,
        84,
        "black",
        (ShapeSpec("triangle", "green", "left"), ShapeSpec("circle", "red", "right")),
    )
    scores = torch.zeros(len(LABELS))
    for name in ("background:black", "count:2", "green:triangle", "yellow:circle"):
        scores[LABELS.index(name)] = 1.0  # the circle's colour is read wrong
    for name in ("left:triangle", "right:circle", "right:square"):
        scores[LABELS.index(name)] = 1.0 if name != "right:square" else 2.0
    hits = attribute_hits(scores, scene)
    assert hits == {
        "background": [True],
        "count": [True],
        "colour": [True, False],  # triangle green (right), circle not yellow
        "shape": [True, False],  # left: triangle; right: the square scores higher than the circle
        "position": [True, True],  # left:triangle and right:circle are the highest of their shape
    }
