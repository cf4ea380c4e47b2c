"""The embedded default: the whole LLaVA-OV-1.5 pipeline on one CPU machine in minutes.

``lov15-quickstart [--out runs/quickstart] [--size default|small] [--stop-after STEP] [--lora]
[--video]`` (or
``python -m lov15_megatron.demo.quickstart``, or ``bash scripts/quickstart.sh``) runs, from any
working directory, with the real tools and the real training entry point (each as its own
process, each found through the installed package):

1. generate the procedural shapes data set (captions, multi-turn QA, held-out eval) in its
   ``grid`` layout (each shape in one 28-pixel cell, i.e. one LM image token); with ``--video``
   also its ``video`` split (8-frame clips of shapes that move, turn colour, appear or vanish,
   one question each that needs more than one frame, and held-out clips);
2. make the source checkpoints: a tiny Rice ViT (MLCD layout) pretrained for a few hundred
   steps on the shapes *training* images (multi-label, as MLCD is; ``demo/vision_pretrain.py``)
   and a random Qwen3 with the offline Qwen vocabulary; build the stage-0 checkpoint with
   ``lov15-make-stage0``;
3. pack the caption and instruct sets with ``lov15-pack-offline`` (with ``--video`` the clips
   go into the instruct packs beside the images, 4 sampled frames of 9 tokens each: the split's
   ``pack_flags``, which keep the 84×84 frames at their size);
4. convert stage-0 to Megatron with ``lov15-convert-checkpoint hf-to-mcore``;
5. stage 1 (merger only, TP=2), stage 1.5 (everything, PP=2) and stage 2 (instruct, DP=2), each
   ``torchrun`` with 2 gloo ranks, each starting from the previous stage's checkpoint (with
   ``--lora`` also ``stage2_lora``: stage 2 from stage 1.5 with frozen weights and rank-16 LoRA
   adapters on all three towers, exported merged and as a PEFT adapter, scored beside it); the
   trainer's progress lines (loss, lr, grad norm, tokens/s per log interval) show on the console,
   its whole output is in ``OUT/<stage>.log``;
6. export the result with ``mcore-to-hf`` and score it on the held-out questions with
   ``lov15-evaluate`` (``AutoProcessor`` + ``AutoModelForCausalLM``, greedy ``generate``); with
   ``--video`` also on the held-out clips (one prompt, ``"{media}\n{question}"``: the training
   text of an image and of a clip; the export's processor samples the clips with the packer's
   settings, which the trainer recorded);
7. print a summary: the vision pretraining (loss, and what its head reads from the held-out
   images); per stage steps, first/last loss, tokens/s and checkpoint; packing fill; the answers
   next to the expected ones, and the accuracy per question type and overall beside the
   always-majority baseline (always the most frequent held-out answer) and chance (with
   ``--video`` the clips' too).

``--seed`` (default 0) seeds the data set and the sources' initialisation. ``docs/quickstart.md``
has the measured accuracy and time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lov15_megatron.config.bundled import configs_dir
from lov15_megatron.demo.vision_pretrain import PretrainReport, pretrain_vision

if TYPE_CHECKING:
    from transformers import MLCDVisionModel

#: Per size: data counts, vision pretraining steps, steps of stages 1, 1.5 and 2 (and of the LoRA
#: run); with ``--video`` the clips (training, held out) and the steps of the full stage 2: the
#: clips' answers appear between 300 and 400 steps at the small size (docs/quickstart.md).
SIZES = {
    "default": {"caption": 400, "instruct": 3000, "eval": 100, "valid": 60, "vision": 600,
                "steps": (10, 20, 400), "video": 1200, "video_eval": 200, "video_steps": 600},
    "small": {"caption": 120, "instruct": 1000, "eval": 150, "valid": 48, "vision": 400,
              "steps": (6, 8, 200), "video": 800, "video_eval": 200, "video_steps": 400},
}  # fmt: skip
#: The eval prompt: the training text, ``"<image>\n{question}"`` for a held-out image and
#: ``"<video>\n{question}"`` for a held-out clip (``lov15-evaluate`` fills ``{media}`` per item).
EVAL_PROMPT = "{media}\n{question}"
LAYOUT = "grid"  # shapes data layout (demo/shapes_dataset.py): one shape per LM image token


#: ``--stop-after`` choices, in order (the numbered steps above).
STEPS = ("data", "stage0", "pack", "convert", "train", "evaluate")
ANSWERS_SHOWN = 15  # held-out answers printed (all are in summary.json)


#: Lines of the trainer's output echoed to the console while a stage runs (rank 0 prints them
#: once per ``logging.log_interval``: loss, lr, grad norm, tokens/s; the validation loss).
PROGRESS_PREFIXES = ("iter ", "validation iter ")


def run(*cmd: str, log: Path | None = None, progress: bool = False) -> str:
    """Run a step; its whole output goes to ``log``, its progress lines also to the console."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if progress and line.startswith(PROGRESS_PREFIXES):
            print(f"      {line.rstrip()}", flush=True)
    output = "".join(lines)
    if log is not None:
        log.write_text(output)
    if proc.wait():
        raise SystemExit(f"step failed: {' '.join(cmd)}\n{output[-4000:]}")
    return output


def tool(module: str, *args: str) -> str:
    """Run ``python -m lov15_megatron.<module> args…`` (a tool of the installed package)."""
    return run(sys.executable, "-m", f"lov15_megatron.{module}", *args)


def tiny_vit(seed: int = 0) -> MLCDVisionModel:
    """The quickstart's random tiny MLCD ViT (2 layers, hidden 64, patch 14) before pretraining."""
    from transformers import MLCDVisionConfig, MLCDVisionModel

    torch.manual_seed(seed)
    return MLCDVisionModel(MLCDVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        patch_size=14, image_size=56, num_channels=3,
    ))  # fmt: skip


def make_sources(
    out: Path, scenes: Path, held_out: Path, vision_steps: int, seed: int = 0
) -> tuple[Path, Path, PretrainReport]:
    """A tiny MLCD-layout ViT pretrained on the training images' ``scenes`` (labels; scored on
    the ``held_out`` eval images) and a random Qwen3 (tied, offline Qwen vocabulary); their
    checkpoints and the pretraining's report."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.utils.logging import disable_progress_bar

    from lov15_megatron.data.tokenizer import load_tokenizer

    disable_progress_bar()  # no "Writing model shards" bars between the quickstart's lines
    vit = tiny_vit(seed)
    pretrained = pretrain_vision(vit, scenes, held_out=held_out, steps=vision_steps, seed=seed)
    vit.save_pretrained(out / "rice_vit")
    llm = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=True,
    ))  # fmt: skip
    llm.save_pretrained(out / "qwen3")
    load_tokenizer("qwen-offline").save_pretrained(out / "qwen3")
    return out / "rice_vit", out / "qwen3", pretrained


def stage(out: Path, name: str, config: str, overrides: list[str]) -> dict:
    log = out / f"{name}.log"
    run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "lov15_megatron.train", "--config", config, *overrides, log=log,
        progress=True)  # fmt: skip
    summary = json.loads(
        (Path(overrides_value(overrides, "checkpoint.save")) / "train_summary.json").read_text()
    )
    return {"stage": name, **summary, "log": str(log)}


def overrides_value(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(key + "="))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart")
    parser.add_argument("--size", choices=list(SIZES), default="default")
    parser.add_argument(
        "--seed", type=int, default=0, help="data and initialisation seed (default 0)"
    )
    parser.add_argument(
        "--stop-after", choices=STEPS, default=STEPS[-1], help="stop after this step (default: all)"
    )
    parser.add_argument(
        "--lora", action="store_true",
        help="also run stage 2 as LoRA from stage 1.5 (frozen weights, rank-16 adapters), export "
        "it merged and as a PEFT adapter, and score it beside the full stage 2",
    )  # fmt: skip
    parser.add_argument(
        "--video", action="store_true",
        help="also generate short clips with questions that need several frames, train stage 2 "
        "on them beside the images (same packs), and score the export on held-out clips",
    )  # fmt: skip
    args = parser.parse_args(argv)
    configs = configs_dir()
    if configs is None:
        parser.exit(2, "error: the package's configs are missing (a broken install?)\n")
    last = STEPS.index(args.stop_after)
    size, out = SIZES[args.size], Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()

    from lov15_megatron.demo.shapes_dataset import generate_shapes_dataset

    def done(step: str) -> bool:
        if STEPS.index(step) < last:
            return False
        print(f"stopped after step {step!r}; outputs in {out}", flush=True)
        return True

    print(f"[1/7] generating the shapes data set ({LAYOUT} layout)", flush=True)
    clips = {"n_video": size["video"], "n_video_eval": size["video_eval"]} if args.video else {}
    data = generate_shapes_dataset(out / "data", seed=args.seed, n_caption=size["caption"],
                                   n_instruct=size["instruct"], n_eval=size["eval"],
                                   layout=LAYOUT, **clips)  # fmt: skip
    if args.video:
        print(f"      {data['video']['count']} training clips, {data['video']['eval']['count']} "
              "held out", flush=True)  # fmt: skip
    # Held-out sets for the validation loss: drawn with another seed (other images and texts).
    held_out = generate_shapes_dataset(out / "data_valid", seed=args.seed + 1,
                                       n_caption=size["valid"],
                                       n_instruct=size["valid"], n_eval=4,
                                       layout=LAYOUT)  # fmt: skip
    if done("data"):
        return 0
    print(f"[2/7] tiny Rice ViT pretrained on the {data['instruct']['count']} training images "
          f"({size['vision']} steps, multi-label) + random Qwen3 -> stage-0 (make_stage0)",
          flush=True)  # fmt: skip
    vit, llm, pretrained = make_sources(
        out / "sources", Path(data["instruct"]["scenes"]), Path(data["eval"]["path"]),
        size["vision"], args.seed,
    )  # fmt: skip
    print(f"      {vision_line(pretrained)}", flush=True)
    tool("cli.make_stage0", "--vit-dir", str(vit), "--llm-dir", str(llm),
        "--save-dir", str(out / "stage0_hf"), "--quiet")  # fmt: skip
    if done("stage0"):
        return 0
    print("[3/7] packing (pack_offline)", flush=True)
    fill, packed_videos = {}, {}
    for split in ("caption", "instruct"):
        # --video: the clips join the instruct packs (stage 2 trains on both in the same packs)
        video = args.video and split == "instruct"
        clips_in = [*data["video"]["sources"], *data["video"]["pack_flags"]] if video else []
        tool("cli.pack_offline", "--input", *data[split]["sources"], *clips_in,
            "--output", str(out / f"packed_{split}"), "--tokenizer", "qwen-offline",
            "--seq-len", "512", "--workers", "2", "--kind", data[split]["kind"],
            "--no-progress")  # fmt: skip
        report = json.loads((out / f"packed_{split}" / "pack_report.json").read_text())
        fill[split] = (report["samples_in"], report["packs"], report["fill_efficiency"])
        if video:
            packed_videos = {"clips": report["videos"]["videos"],
                             "frames": report["videos"]["frames"]}  # fmt: skip
        tool("cli.pack_offline", "--input", *held_out[split]["sources"],
            "--output", str(out / f"valid_{split}"), "--tokenizer", "qwen-offline",
            "--seq-len", "512", "--workers", "2", "--kind", held_out[split]["kind"],
            "--no-progress")  # fmt: skip
    if done("pack"):
        return 0
    print("[4/7] stage-0 HF -> Megatron (convert_checkpoint hf-to-mcore)", flush=True)
    tool("cli.convert_checkpoint", "hf-to-mcore", "--model", "llava-ov-1.5",
        "--hf-dir", str(out / "stage0_hf"), "--save-dir", str(out / "stage0_mcore"))  # fmt: skip
    if done("convert"):
        return 0

    steps = (*size["steps"][:2], size["video_steps"] if args.video else size["steps"][2])
    plan = [
        (
            "stage1",
            str(configs / "quickstart/stage1.yaml"),
            "caption",
            out / "stage0_mcore",
            steps[0],
        ),
        (
            "stage1_5",
            str(configs / "quickstart/stage1_5.yaml"),
            "caption",
            out / "stage1",
            steps[1],
        ),
        ("stage2", str(configs / "quickstart/stage2.yaml"), "instruct", out / "stage1_5", steps[2]),
    ]
    if args.lora:  # stage 2 again from stage 1.5: frozen weights, rank-16 adapters on all towers
        plan.append(("stage2_lora", str(configs / "quickstart/stage2_lora.yaml"), "instruct",
                     out / "stage1_5", size["steps"][2]))  # fmt: skip
    stages = []
    for name, config, split, previous, n in plan:
        print(f"[5/7] {name}: {n} steps on 2 CPU ranks ({config})", flush=True)
        stages.append(stage(out, name, config, [
            f"data.path={out / f'packed_{split}'}", f"checkpoint.pretrained={previous}",
            f"checkpoint.save={out / name}", f"train.train_iters={n}",
            f"data.valid_path={out / f'valid_{split}'}", "train.eval_iters=1",
        ]))  # fmt: skip
    if done("train"):
        return 0
    print("[6/7] export to Hugging Face (mcore-to-hf) and answer held-out questions", flush=True)
    report = export_and_score(out, "stage2", "final_hf", data["eval"]["path"], "eval_report.json")
    lora = None
    if args.lora:  # merged weights, the PEFT adapter beside them, and the same questions
        lora_report = export_and_score(
            out, "stage2_lora", "final_lora_hf", data["eval"]["path"], "eval_report_lora.json",
            out / "final_lora_adapter",
        )  # fmt: skip
        lora = lora_summary(out, lora_report)
    video = None
    if args.video:  # the same export on the held-out clips
        report_video = score(out, "final_hf", data["video"]["eval"]["path"],
                             "eval_report_video.json")  # fmt: skip
        video = {**video_summary(data["video"], report_video), "packed": packed_videos}
    results = report["answers"]
    summary = {
        "vision_pretraining": asdict(pretrained),
        "stages": stages, "packing": fill, "accuracy": report["accuracy"],
        "accuracy_per_type": with_majority(report, data["eval"]),
        "chance_accuracy": data["eval"]["chance_accuracy"],
        "majority_answer_accuracy": data["eval"]["majority_answer_accuracy"],
        "answers": results, "lora": lora, "video": video,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary, out)
    return 0


def export_and_score(
    out: Path, checkpoint: str, hf: str, eval_data: str, report: str, adapter: Path | None = None
) -> dict:
    """``mcore-to-hf`` of a stage's checkpoint (a LoRA run's: merged, plus the PEFT adapter in
    ``adapter``), then ``lov15-evaluate`` of the export on the held-out questions."""
    extra = ["--adapter-dir", str(adapter)] if adapter is not None else []
    tool("cli.convert_checkpoint", "mcore-to-hf", "--model", "llava-ov-1.5",
        "--load-dir", str(out / checkpoint), "--save-dir", str(out / hf),
        "--hf-template", str(out / "stage0_hf"), *extra)  # fmt: skip
    return score(out, hf, eval_data, report)


def score(out: Path, hf: str, eval_data: str, report: str) -> dict:
    """``lov15-evaluate`` of the export ``out/hf`` on ``eval_data`` with the training text
    (:data:`EVAL_PROMPT`); the report."""
    tool("cli.evaluate", "--checkpoint", str(out / hf),
        "--data", eval_data, "--report", str(out / report),
        "--prompt", EVAL_PROMPT, "--max-new-tokens", "4", "--quiet")  # fmt: skip
    return json.loads((out / report).read_text())


def with_majority(report: dict, held_out: dict) -> dict:
    """An evaluation report's accuracy per question type, each type's always-majority baseline
    (from the data set's held-out summary ``held_out``) beside it."""
    majority = held_out["majority_answer_accuracy_per_type"]
    return {
        name: {**entry, "majority": majority[name]}
        for name, entry in report["accuracy_per_type"].items()
    }


def video_summary(split: dict, report: dict) -> dict:
    """The held-out clips' accuracy, overall and per question type, beside each type's
    always-majority baseline and chance, and how each clip was sampled for the model (the
    export's processor settings)."""
    return {
        "accuracy": report["accuracy"],
        "accuracy_per_type": with_majority(report, split["eval"]),
        "chance_accuracy": split["eval"]["chance_accuracy"],
        "majority_answer_accuracy": split["eval"]["majority_answer_accuracy"],
        "clip": split["clip"],
        "frame_min_pixels": report["video_processor"]["frame_min_pixels"],
        "answers": report["answers"],
    }


def _mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def lora_summary(out: Path, report: dict) -> dict:
    """The LoRA variant's accuracy and what it saved: training checkpoint sizes (adapters and
    their Adam state against the full stage 2's) and the PEFT adapter's size."""
    return {
        "accuracy": report["accuracy"],
        "accuracy_per_type": report["accuracy_per_type"],
        "answers": report["answers"],
        "checkpoint_mib": _mib(out / "stage2_lora"),
        "full_checkpoint_mib": _mib(out / "stage2"),
        "adapter_mib": _mib(out / "final_lora_adapter"),
        "merged_hf": str(out / "final_lora_hf"),
        "adapter_dir": str(out / "final_lora_adapter"),
    }


def vision_line(report: PretrainReport) -> str:
    """One line on the vision pretraining: loss, and what its head reads from held-out images."""
    read = ", ".join(f"{name} {value:.2f}" for name, value in report.held_out_accuracy.items())
    return (f"vision pretraining {report.steps} steps on {report.images} training images: loss "
            f"{report.first_loss:.3f} -> {report.last_loss:.3f} in {report.seconds:.0f}s; read "
            f"from {report.held_out_images} held-out images: {read}")  # fmt: skip


def print_per_type(per_type: dict) -> None:
    """One line per question type: correct/asked = accuracy, the always-majority baseline and
    the difference, chance."""
    for name, t in per_type.items():
        print(f"    {name:10s} {t['correct']:3d}/{t['questions']:<3d} = {t['accuracy']:.2f} "
              f"(majority {t['majority']:.2f}, {t['accuracy'] - t['majority']:+.2f}; "
              f"chance {t['chance']:.2f})")  # fmt: skip


def print_summary(s: dict, out: Path) -> None:
    print("\n[7/7] summary")
    print(f"  {vision_line(PretrainReport(**s['vision_pretraining']))}")
    for st in s["stages"]:
        steps = f"{st['first_iteration'] + 1}-{st['last_iteration']}"
        loss = f"{st['first_loss']:.3f} -> {st['last_loss']:.3f}"
        if st.get("last_valid_loss") is not None:
            loss += f", validation {st['last_valid_loss']:.3f}"
        print(f"  {st['stage']:9s} steps {steps}  loss {loss}  {st['tokens_per_s']:,.0f} tokens/s  "
              f"checkpoint {st['checkpoint']}")  # fmt: skip
    for split, (n, packs, fill) in s["packing"].items():
        print(f"  packing {split}: {n} samples -> {packs} packs, fill efficiency {fill:.3f}")
    shown = s["answers"][:ANSWERS_SHOWN]
    print(f"  held-out answers, first {len(shown)} of {len(s['answers'])} "
          "(question -> predicted / expected):")  # fmt: skip
    for r in shown:
        mark = "ok " if r["correct"] else "   "
        print(f"    {mark}{r['question']!r:45s} -> {r['predicted']!r} / {r['answer']!r}")
    print("  accuracy per question type, against always answering its most frequent held-out "
          "answer (majority: the best an image-blind model can do) and chance:")  # fmt: skip
    print_per_type(s["accuracy_per_type"])
    if s.get("video"):
        v = s["video"]
        print(f"  packing: {v['packed']['clips']} clips ({v['packed']['frames']} frames) in the "
              "instruct packs, beside its images")  # fmt: skip
        print(
            f"  held-out clips: accuracy per question type, against always-majority and "
            f"chance ({len(v['answers'])} clips; frames {v['clip']['sampled_frames']} of "
            f"{v['clip']['frames']} sampled, {v['clip']['tokens']} tokens each):"
        )
        print_per_type(v["accuracy_per_type"])
        print(
            f"  video accuracy {v['accuracy']:.2f} against always-majority "
            f"{v['majority_answer_accuracy']:.2f} (chance {v['chance_accuracy']:.2f})"
        )
    if s.get("lora"):
        lo = s["lora"]
        print(f"  LoRA stage 2 (rank 16, frozen weights): accuracy {lo['accuracy']:.2f} against "
              f"the full stage 2's {s['accuracy']:.2f}; training checkpoint "
              f"{lo['checkpoint_mib']:.1f} MiB against {lo['full_checkpoint_mib']:.1f} MiB; "
              f"exported merged ({lo['merged_hf']}) and as a PEFT adapter of "
              f"{lo['adapter_mib']:.2f} MiB ({lo['adapter_dir']})")  # fmt: skip
    print(
        f"  accuracy {s['accuracy']:.2f} against always-majority "
        f"{s['majority_answer_accuracy']:.2f} (chance {s['chance_accuracy']:.2f}); "
        f"total {s['seconds']:.0f}s; outputs in {out}"
    )


if __name__ == "__main__":
    sys.exit(main())
