"""LLaVA-OneVision-1.5 on Megatron-Core, checked against the independent HF-side model.

* A tiny VLM with a 512-token vocabulary and its image token ids inside it (``image_token_id``
  500; nothing here needs the Qwen tokenizer) through the real CLI: ``hf-to-mcore`` takes the ids
  from ``config.json``; logits equal the HF model (three images of different sizes plus text;
  fp32, within the bound of docs/tolerances.md) at TP=1, TP=2 and PP=2 (one ``verify --layouts``
  launch); Megatron → HF is bit-exact and keeps the ids; the export loads with
  ``trust_remote_code`` and ``generate()`` runs.
* Inside ranks, on the session's tiny VLM with the Qwen vocabulary (conftest ``tiny_vlm``,
  converted once; the text-only checks use the real tokenizer): packed rows (several
  sub-samples, micro-batch 2) give the same per-token logits and losses as each sub-sample
  alone; frozen groups stay bit-identical; bad inputs raise clear errors; image packs train at
  DP=2 as on one rank (TP=2 / PP=2 / CP=2: test_training.py); at CP=2 the ViT split over CP
  ranks (one image: a rank runs no tower; three uneven images; a video's frames with an image,
  the frames dealt out as images) gives the single-rank loss and every tower gradient.
* Videos: verify's inputs hold a two-frame video beside the images (``pixel_values_videos``,
  ``video_grid_thw``), so the TP=1/TP=2/PP=2 parity above covers them; a pack written by hand
  (an mp4 written with PyAV, then an image, and a second sub-sample) goes through the real task
  encoder and the Megatron forward gives the HF model's logits sub-sample by sub-sample.
* Text-only packs (a whole step without images, DP ranks / micro-batches / CP ranks without
  images) train at DP=2 (both optimizers), PP=2 and CP=2 as on one rank, and give every tower
  parameter a zero gradient, also straight from the real task encoder.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    make_hf_vlm,
    ok,
    pack_rows,
    read_safetensors,
    verify_layouts,
    vlm_sample,
)
from tolerances import (
    assert_close_fp32,
    assert_close_training,
    fp32_abs_tol,
    grad_norm_rel_tol,
    log_sum_exp_len,
    training_rel_tol,
    within_fp32,
)

# The longest reduction of a forward: the ViT patch embedding, 3·14·14 = 588 inputs
# (docs/tolerances.md).
REDUCTION_LEN = 588


@pytest.fixture(scope="module")
def converted(tiny_vlm):
    return tiny_vlm


# The small-vocabulary VLM: its image block's ids at the end of its 512 tokens (video_token_id
# too, which the HF configuration checks against the vocabulary; our model does not read it).
SMALL_VOCAB = 512
TOKEN_IDS = {"image_token_id": 500, "vision_start_token_id": 498, "vision_end_token_id": 499}


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """``(hf_dir, mcore_dir)``: the small-vocabulary VLM and its ``hf-to-mcore`` (the CLI)."""
    root = tmp_path_factory.mktemp("small_vocab_vlm")
    make_hf_vlm(root / "hf", text={"vocab_size": SMALL_VOCAB}, video_token_id=501, **TOKEN_IDS)
    line = ok("hf-to-mcore", "--model", "llava-ov-1.5", "--hf-dir", str(root / "hf"),
              "--save-dir", str(root / "mcore"))  # fmt: skip
    assert "hf-to-mcore: wrote" in line
    return root / "hf", root / "mcore"


VERIFY_LAYOUTS = [(1, 1), (2, 1), (1, 2)]


@pytest.fixture(scope="module")
def verified(small_vocab):
    """``verify`` at every layout in one launch of ranks."""
    return verify_layouts("llava-ov-1.5", *small_vocab, VERIFY_LAYOUTS)


def test_hf_to_mcore_reads_the_token_ids(small_vocab):
    _, mc_dir = small_vocab
    model = json.loads((mc_dir / "lov15_model.json").read_text())["model_config"]
    assert model["language"]["vocab_size"] == SMALL_VOCAB
    assert {k: model["vision"][k] for k in TOKEN_IDS} == TOKEN_IDS


def test_verify_inputs_mix_a_video_with_images(small_vocab):
    """The parity below covers videos: verify's default inputs hold one beside the images, with
    the small vocabulary's video token id read from config.json."""
    from lov15_megatron.convert.core import run_config_of_checkpoint
    from lov15_megatron.models.registry import get_family

    cfg = run_config_of_checkpoint(small_vocab[1])
    assert cfg.model.vision.video_token_id == 501
    inputs = get_family("llava-ov-1.5").default_inputs(cfg)
    assert inputs["video_grid_thw"].tolist() == [[2, 2, 4]]
    assert int((inputs["input_ids"] == 501).sum()) == 4  # 2 frames × 2·4/4 merged tokens
    assert int((inputs["input_ids"] == TOKEN_IDS["image_token_id"]).sum()) == 6 + 1 + 6


@pytest.mark.parametrize("tp,pp", VERIFY_LAYOUTS)
def test_logit_parity_with_hf_model(verified, tp, pp):
    # verify's inputs hold image blocks (default_inputs): a Megatron model looking for another
    # image token id than the HF model's would find no slots for the features and fail.
    result = verified[tp, pp]
    assert (result["tp"], result["pp"]) == (tp, pp)
    assert result["shape"][-1] == SMALL_VOCAB
    assert within_fp32(result["max_abs_diff"], result["max_rel_diff"], REDUCTION_LEN), result
    assert result["top1_agreement"] == 1.0, result


def test_round_trip_and_remote_code_generate(small_vocab, tmp_path, isolated_hf_modules):
    hf_dir, mc_dir = small_vocab
    back = tmp_path / "export"
    ok("mcore-to-hf", "--model", "llava-ov-1.5", "--load-dir", str(mc_dir), "--save-dir",
       str(back), "--hf-template", str(hf_dir))  # fmt: skip

    original, exported = read_safetensors(hf_dir), read_safetensors(back)
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    assert (back / "modeling_llavaonevision1_5.py").exists()
    config = json.loads((back / "config.json").read_text())
    assert {k: config[k] for k in TOKEN_IDS} == TOKEN_IDS

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(back, trust_remote_code=True, dtype=torch.float32)
    start, image, end = (
        TOKEN_IDS[f"{k}_token_id"] for k in ("vision_start", "image", "vision_end")
    )
    ids = torch.tensor([[11, 12, start, image, end, 13]])
    pixels = torch.randn(4, 588)
    grid = torch.tensor([[1, 2, 2]])
    out = model.generate(
        input_ids=ids, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=3, do_sample=False
    )
    assert out.shape == (1, 9)


# ---------------------------------------------------------------- in-rank checks


def _cfg(load_dir: str, overrides: list[str]):
    from lov15_megatron.config import apply_override, validate
    from lov15_megatron.convert.core import run_config_of_checkpoint

    cfg = run_config_of_checkpoint(load_dir)
    for override in ["data.seq_length=64", *overrides]:
        apply_override(cfg, override)
    validate(cfg)
    return cfg


def _build(cfg, load_dir: str, ddp: bool = False):
    from lov15_megatron.models.llava_ov.model import build_llava_ov_model
    from lov15_megatron.runtime import distributed
    from lov15_megatron.training import checkpointing, setup

    distributed.initialize(cfg)
    chunks = setup.build_model_chunks(cfg, build_llava_ov_model)
    if ddp:
        chunks = setup.wrap_ddp(cfg, chunks)
    checkpointing.load_model_weights(chunks, load_dir)
    return chunks


def packed_checks(load_dir: str) -> dict:
    """One rank: packing equivalence, micro-batch 2, bad inputs, stage-1 freezing."""
    from lov15_megatron.models.lm_loss import token_losses
    from lov15_megatron.models.packed_seq import thd_model_inputs
    from lov15_megatron.training import setup
    from lov15_megatron.training.step import train_step

    (model,) = _build(_cfg(load_dir, []), load_dir)
    model.eval()
    vocab = model.language_model.true_vocab_size
    subs = [
        vlm_sample(1, [(4, 4)]),
        vlm_sample(2, []),
        vlm_sample(3, [(2, 6), (2, 2)]),
        vlm_sample(4, [(2, 2)]),
    ]

    def inputs(batch: dict) -> dict:
        # The training path's layout: rows flattened into one THD stream [1, b·s].
        thd = thd_model_inputs(batch)
        keys = ("input_ids", "position_ids", "pixel_values", "image_grid_thw", "packed_seq_params")
        return {k: thd[k] for k in keys}

    def run(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = batch["input_ids"].shape
        with torch.no_grad():
            logits = model(**inputs(batch)).reshape(b, s, -1)
        losses = token_losses(logits.clone(), batch["labels"], vocab)
        return logits, losses * batch["loss_mask"]

    out: dict = {"logit_diff": 0.0, "loss_diff": 0.0, "logit_scale": 0.0}
    k = 0
    alone = [run(pack_rows([[s]], len(s["input_ids"]))) for s in subs]
    for layout in ([[subs[0], subs[1], subs[2]]], [[subs[0], subs[1]], [subs[2], subs[3]]]):
        packed_logits, packed_losses = run(pack_rows(layout, 64))
        for r, row in enumerate(layout):
            offset = 0
            for s in row:
                n = len(s["input_ids"])
                ref_logits, ref_losses = alone[subs.index(s)]
                got = packed_logits[r, offset : offset + n]
                out["logit_diff"] = max(out["logit_diff"], float((got - ref_logits[0]).abs().max()))
                out["logit_scale"] = max(out["logit_scale"], float(ref_logits.abs().max()))
                diff = (packed_losses[r, offset : offset + n] - ref_losses[0]).abs().max()
                out["loss_diff"] = max(out["loss_diff"], float(diff))
                offset += n
                k += 1
    out["subsamples_checked"] = k

    # The training loss path (logits only at loss positions) = full logits + token_losses,
    # in value and in gradient; an all-zero mask gives zero losses.
    batch = pack_rows([[subs[0], subs[2]], [subs[1], subs[3]]], 64)
    kwargs = inputs(batch)
    labels, mask = batch["labels"].reshape(1, -1), batch["loss_mask"].float().reshape(1, -1)
    params = [p for p in model.parameters() if p.requires_grad]
    full = token_losses(model(**kwargs).clone(), labels, vocab) * mask
    full_grads = torch.autograd.grad(full.sum(), params)
    picked = model(**kwargs, labels=labels, loss_mask=mask)
    picked_grads = torch.autograd.grad((picked * mask).sum(), params)
    out["picked_loss_diff"] = float((picked - full).abs().max())
    out["picked_outside_mask"] = float(picked[mask == 0].abs().max())
    out["picked_grad_rel"] = max(
        float((a - g).norm() / g.norm().clamp_min(1e-12))
        for a, g in zip(picked_grads, full_grads, strict=True)
    )
    out["mask_tokens"], out["tokens"] = int(mask.sum()), mask.numel()
    with torch.no_grad():
        none = model(**kwargs, labels=labels, loss_mask=torch.zeros_like(mask))
    out["zero_mask_losses"] = float(none.abs().max())

    broken = pack_rows([[subs[0]]], 32)
    broken["input_ids"][0, 7] = 17  # one <|image_pad|> fewer than the image's features
    for name, batch in (("count", broken),):
        try:
            run(batch)
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    bad_grid = pack_rows([[subs[3]]], 32)
    bad_grid["image_grid_thw"] = torch.tensor([[1, 1, 4]])
    try:
        run(bad_grid)
        out["grid"] = "no error"
    except ValueError as e:
        out["grid"] = str(e)

    # stage-1 style freezing: only the merger trains
    cfg = _cfg(load_dir, ["train.trainable=[merger]", "train.global_batch_size=2",
                          "train.micro_batch_size=1", "optimizer.lr=0.01"])  # fmt: skip
    model = _build(cfg, load_dir, ddp=True)
    before = {
        k: v.clone() for k, v in model[0].module.state_dict().items() if "extra_state" not in k
    }
    optimizer, n_micro = setup.build_optimizer(cfg, model), setup.num_microbatches(cfg)
    scheduler = setup.build_scheduler(cfg, optimizer)
    data = iter([pack_rows([[subs[i % 4], subs[(i + 1) % 4]]], 64) for i in range(8)])
    for _ in range(2):
        train_step(cfg, data, model, optimizer, scheduler, n_micro)
    after = model[0].module.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    out["changed_groups"] = sorted({k.split(".")[0] for k in changed})
    out["merger_params"] = sum(1 for k in before if k.startswith("vision_projection."))
    out["merger_changed"] = sum(1 for k in changed if k.startswith("vision_projection."))
    return out


# The ViT split over CP ranks (models/llava_ov/vision_cp.py), gradient by gradient: micro-batches
# with fewer images than CP ranks (one image: CP rank 1 runs no tower) and with three images of
# uneven sizes over two rows (4×4 alone on rank 0; 2×6 and 2×2 on rank 1).
VIDEO_PAD = 151656  # <|video_pad|>: the Qwen vocabulary's, the default video_token_id


def video_sample(seed: int, frames: int, grid: tuple[int, int], image: tuple[int, int]) -> dict:
    """One sub-sample in the task encoder's layout: text, a video block of ``frames`` frames of
    ``grid`` patches, text, an image block, text; the frames are ``pixel_values`` rows
    ``(1, h, w)`` before the image's (stream order)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    ids = torch.randint(0, 5000, (4,), generator=gen).tolist()
    ids += [VISION_START, *([VIDEO_PAD] * (frames * h * w // 4)), VISION_END]
    ids += torch.randint(0, 5000, (3,), generator=gen).tolist()
    ids += [VISION_START, *([IMAGE_PAD] * (image[0] * image[1] // 4)), VISION_END]
    ids += torch.randint(0, 5000, (3,), generator=gen).tolist()
    labels = ids[1:] + [-100]
    vision = (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)
    return {
        "input_ids": ids,
        "labels": [-100 if t in vision else t for t in labels],
        "pixel_values": torch.randn(frames * h * w + image[0] * image[1], 588, generator=gen),
        "image_grid_thw": torch.tensor([[1, h, w]] * frames + [[1, *image]]),
    }


CP_SPLIT_CASES = {
    "one_image": [[vlm_sample(400, [(4, 4)]), vlm_sample(401, [])]],
    "three_images_mb2": [[vlm_sample(402, [(2, 6), (2, 2)])], [vlm_sample(403, [(4, 4)])]],
    # two 4×4 frames and a 2×2 image: frame 0 on rank 0, frame 1 on rank 1, the image on rank 0
    "video_and_image": [[video_sample(404, 2, (4, 4), (2, 2)), vlm_sample(405, [])]],
}
CP_SPLIT_TOWER_IMAGES = {"one_image": [1, 0], "three_images_mb2": [1, 2], "video_and_image": [2, 1]}


def cp_split_checks(load_dir: str, cp: int) -> dict:
    """Forward + backward of the summed token losses at context parallelism ``cp`` (the whole
    world): the loss, every tower parameter's gradient (summed over the CP ranks) and how many
    images each rank ran the tower on."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from lov15_megatron.models.llava_ov.step import vlm_model_inputs

    (model,) = _build(_cfg(load_dir, [f"parallel.context_parallel_size={cp}"]), load_dir)
    model.train()
    rank = parallel_state.get_context_parallel_rank()
    group = parallel_state.get_context_parallel_group()
    towers = {n: p for n, p in model.named_parameters() if n.startswith("vision_")}
    out = {}
    for name, rows in CP_SPLIT_CASES.items():
        batch = pack_rows(rows, 64)
        # The training path's inputs (family.forward_inputs): video pads count as vision slots.
        inputs = vlm_model_inputs(batch, {"cp": cp, "cp_rank": rank}, IMAGE_PAD, VIDEO_PAD)
        keys = ("input_ids", "position_ids", "pixel_values", "image_grid_thw",
                "packed_seq_params", "labels", "loss_mask", "image_feature_index")  # fmt: skip
        losses = model(**{k: inputs.get(k) for k in keys})
        loss = (losses * inputs["loss_mask"]).sum()
        grads = torch.autograd.grad(loss, list(towers.values()))
        total = loss.detach().reshape(1)
        flat = torch.cat([g.reshape(-1) for g in grads])
        if cp > 1:
            dist.all_reduce(total, group=group)
            dist.all_reduce(flat, group=group)
        images = [0] * cp
        images[rank] = model.tower_images
        images_t = torch.tensor(images)
        if cp > 1:
            dist.all_reduce(images_t, group=group)
        sizes = [g.numel() for g in grads]
        grads_by_name = dict(zip(towers, flat.split(sizes), strict=True))
        out[name] = {
            "loss": float(total[0]),
            "grads": grads_by_name,
            "tower_images": images_t.tolist(),
        }
    return out


def video_pack(root) -> tuple[list[dict], dict[str, bytes]]:
    """A pack written by hand in the packer's format (docs/data-reference.md §5): sub-sample 0
    asks about a video (an mp4 of 20 frames, frame i grey 8·i, written with PyAV) and then an
    image; sub-sample 1 about an image. The stored frames (0, 6, 13, 19) and grid (4 frames of
    2×4 patches: 28×56 px) are what a packer with a small frame budget would record."""
    from pathlib import Path

    from helpers import save_image, write_clip

    root = Path(root)
    clip = write_clip(root / "clip.mp4").read_bytes()
    images = {
        f"img{i}.png": save_image(root / f"{i}.png", 56, 56 + 28 * i, i).read_bytes()
        for i in range(2)
    }
    video = {"parts": ["vid0.mp4"], "frames": [0, 6, 13, 19], "size": [64, 48],
             "grid_thw": [4, 2, 4], "total_frames": 20, "fps": 10.0}  # fmt: skip
    records = [
        {"id": "v0", "images": ["img0.png"], "videos": [video], "messages": [
            {"role": "user", "content": "<video>\nWhich way does it move? <image>"},
            {"role": "assistant", "content": "It gets brighter."}]},
        {"id": "i1", "images": ["img1.png"], "messages": [
            {"role": "user", "content": "<image>\nWhat is it?"},
            {"role": "assistant", "content": "Noise."}]},
    ]  # fmt: skip
    return records, {**images, "vid0.mp4": clip}


def video_pack_checks(load_dir: str, hf_dir: str) -> dict:
    """One rank: :func:`video_pack` through the real task encoder and the Megatron forward
    (training path, one THD stream), against the HF model on each sub-sample alone with the
    video as ``pixel_values_videos``."""
    import tempfile

    from lov15_megatron.data.energon_dataset import PackedVLMSample
    from lov15_megatron.data.task_encoder import VLMTaskEncoder
    from lov15_megatron.data.tokenizer import load_tokenizer
    from lov15_megatron.hf import LLaVAOneVision1_5_ForConditionalGeneration
    from lov15_megatron.models.llava_ov.step import vlm_model_inputs
    from lov15_megatron.training.data import BATCH_KEYS

    with tempfile.TemporaryDirectory() as tmp:
        records, parts = video_pack(tmp)
    encoder = VLMTaskEncoder(load_tokenizer("qwen-offline"))
    pack = PackedVLMSample(
        __key__="000000000",
        __restore_key__=(),
        __subflavors__={"kind": "instruct"},
        samples=records,
        images=parts,
    )
    vlm_batch = encoder.batch([encoder.encode_sample(pack)])
    batch = {k: getattr(vlm_batch, k) for k in BATCH_KEYS}
    (model,) = _build(_cfg(load_dir, []), load_dir)
    model.eval()
    inputs = vlm_model_inputs(batch, {"cp": 1, "cp_rank": 0}, IMAGE_PAD, VIDEO_PAD)
    keys = ("input_ids", "position_ids", "pixel_values", "image_grid_thw", "packed_seq_params")
    vocab = model.language_model.true_vocab_size
    with torch.no_grad():
        mcore = model(**{k: inputs[k] for k in keys})[0, :, :vocab].float()
    hf_model = LLaVAOneVision1_5_ForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.float32
    ).eval()
    ids, pixels = batch["input_ids"][0], batch["pixel_values"]
    video_rows, image_rows = 4 * 2 * 4, 4 * 4
    first, second = vlm_batch.seqlens[0]
    with torch.no_grad():
        hf0 = hf_model(
            input_ids=ids[None, :first],
            pixel_values_videos=pixels[:video_rows],
            video_grid_thw=torch.tensor([[4, 2, 4]]),
            pixel_values=pixels[video_rows : video_rows + image_rows],
            image_grid_thw=torch.tensor([[1, 4, 4]]),
        ).logits[0]
        hf1 = hf_model(
            input_ids=ids[None, first : first + second],
            pixel_values=pixels[video_rows + image_rows :],
            image_grid_thw=batch["image_grid_thw"][-1:],
        ).logits[0]
    hf = torch.cat([hf0, hf1])
    return {
        "grids": batch["image_grid_thw"].tolist(),
        "video_tokens": int((ids == VIDEO_PAD).sum()),
        "max_abs_diff": float((mcore[: first + second] - hf).abs().max()),
        "scale": float(hf.abs().max()),
    }


def single_rank_checks(load_dir: str, hf_dir: str) -> dict:
    """The module's one single-rank launch: the packing checks, then the references of the
    parallel runs (image packs; the text-only checks and runs)."""
    return {
        "video_pack": video_pack_checks(load_dir, hf_dir),
        "packed": packed_checks(load_dir),
        "images": train_runs(load_dir, {"single": []})["single"],
        "cp_split": cp_split_checks(load_dir, 1),
        **text_only_reference(load_dir, TEXT_ONLY_REFERENCES),
    }


def two_rank_runs(load_dir: str) -> dict:
    """The module's one two-rank launch: image packs, then text-only and mixed packs."""
    return {
        "images": train_runs(load_dir, IMAGE_LAYOUTS),
        "cp_split": cp_split_checks(load_dir, 2),
        "mixed": train_runs(load_dir, TEXT_ONLY_LAYOUTS, "mixed"),
    }


@pytest.fixture(scope="module")
def single_rank(converted) -> dict:
    from lov15_megatron.runtime.launch import run_ranks

    hf_dir, mc_dir = converted
    (out,) = run_ranks(1, single_rank_checks, str(mc_dir), str(hf_dir))
    return out


@pytest.fixture(scope="module")
def two_ranks(converted) -> list[dict]:
    from lov15_megatron.runtime.launch import run_ranks

    _, mc_dir = converted
    return run_ranks(2, two_rank_runs, str(mc_dir))


def test_video_pack_through_the_task_encoder_matches_hf(single_rank):
    """A video (4 frames as 4 ViT segments, before the image in the stream) and two images in
    one pack: the Megatron forward on the task encoder's batch equals the HF model's logits."""
    out = single_rank["video_pack"]
    assert out["grids"] == [[1, 2, 4]] * 4 + [[1, 4, 4], [1, 4, 6]], out["grids"]
    assert out["video_tokens"] == 4 * 2, out
    assert out["max_abs_diff"] < fp32_abs_tol(REDUCTION_LEN, out["scale"]), out


def test_packing_micro_batch_errors_and_freezing(single_rank):
    out = single_rank["packed"]
    assert out["subsamples_checked"] == 7
    assert out["logit_diff"] < fp32_abs_tol(REDUCTION_LEN, out["logit_scale"]), out
    assert out["loss_diff"] < 1e-4, out
    assert out["picked_loss_diff"] < 1e-5 and out["picked_grad_rel"] < 1e-5, out
    assert out["picked_outside_mask"] == 0.0 and out["zero_mask_losses"] == 0.0, out
    assert 0 < out["mask_tokens"] < out["tokens"], out
    assert "<|image_pad|> tokens" in out["count"] and "merged features" in out["count"]
    assert "image 0" in out["grid"], out["grid"]
    assert out["changed_groups"] == ["vision_projection"], out["changed_groups"]
    assert out["merger_changed"] == out["merger_params"] > 0


STEPS = 4
# Longest reduction of a training step (docs/tolerances.md): the Qwen vocabulary's cross entropy,
# which counts as log_sum_exp_len(151936) = 1068 terms (more than the 256 tokens of a step).
TRAIN_LEN = log_sum_exp_len(151936)
# Image packs at DP 2; at TP 2, PP 2 and CP 2 they are test_training.py's question (real shards,
# whose data order depends on the DP size: that is why DP is asked here, on fixed batches).
IMAGE_LAYOUTS: dict[str, list[str]] = {"dp2": []}


def _train_batches(dp_rank: int, per_rank: int):
    """Global batch of 4 packed rows per step; DP rank r takes rows [r·per_rank, …)."""
    for step in range(STEPS):
        for j in range(per_rank):
            i = step * 4 + dp_rank * per_rank + j
            grids = [[(4, 4)], [], [(2, 6), (2, 2)], [(2, 2)]][i % 4]
            yield pack_rows([[vlm_sample(100 + i, grids), vlm_sample(200 + i, [(2, 2)])]], 64)


# Which of the 4 rows of each step's global batch hold an image (the others are text-only
# packs): a step with no image anywhere; at DP=2 one rank with images and one without; a single
# image on one rank; one image per rank. At DP=1 and under PP (micro-batch 1) the same split
# falls between micro-batches.
IMAGE_ROWS = [(), (0, 1), (2,), (0, 3)]


def _mixed_batches(dp_rank: int, per_rank: int):
    """Text-only packs, alone and mixed with packs that hold an image, DP rank r taking rows
    [r·per_rank, …) of each step."""
    for step in range(STEPS):
        for j in range(per_rank):
            i = dp_rank * per_rank + j
            seed = 300 + 4 * step + i
            row = [vlm_sample(seed, [], text_len=20), vlm_sample(seed + 50, [], text_len=13)]
            if i in IMAGE_ROWS[step]:
                row[1] = vlm_sample(seed + 50, [(4, 4)] if i % 2 else [(2, 6)])
            yield pack_rows([row], 64)


BATCHES = {"images": _train_batches, "mixed": _mixed_batches}


def train_runs(
    load_dir: str, layouts: dict[str, list[str]], data: str = "images"
) -> dict[str, list[tuple[float, float]]]:
    """Train each layout from the converted checkpoint on the same packed batches
    (``data`` names the generator in ``BATCHES``)."""
    from megatron.core import parallel_state

    from lov15_megatron.training import setup
    from lov15_megatron.training.step import train_step

    results = {}
    for name, overrides in layouts.items():
        common = ["train.global_batch_size=4", "train.micro_batch_size=1", "optimizer.lr=3e-3"]
        cfg = _cfg(load_dir, [*common, "scheduler.warmup_iters=0", *overrides])
        model = _build(cfg, load_dir, ddp=True)
        optimizer = setup.build_optimizer(cfg, model)
        scheduler = setup.build_scheduler(cfg, optimizer)
        dp = parallel_state.get_data_parallel_world_size()
        batches = BATCHES[data](parallel_state.get_data_parallel_rank(), 4 // dp)
        n_micro = setup.num_microbatches(cfg)
        steps = [
            train_step(cfg, batches, model, optimizer, scheduler, n_micro) for _ in range(STEPS)
        ]
        results[name] = [(r.loss, r.grad_norm) for r in steps]
    return results


def test_parallel_training_matches_single_rank(single_rank, two_ranks):
    reference = single_rank["images"]
    per_rank = [ranks["images"] for ranks in two_ranks]
    assert per_rank[0] == per_rank[1]
    assert all(math.isfinite(loss) for loss, _ in reference)
    for name, got in per_rank[0].items():
        for step, ((loss_a, norm_a), (loss_b, norm_b)) in enumerate(
            zip(reference, got, strict=True)
        ):
            assert math.isclose(loss_a, loss_b, rel_tol=training_rel_tol(step, TRAIN_LEN)), name
            assert math.isclose(norm_a, norm_b, rel_tol=grad_norm_rel_tol(step, TRAIN_LEN)), name


def test_vit_split_over_cp_ranks_matches_single_rank(single_rank, two_ranks):
    """CP 2 runs each image's tower on one rank only (a rank may run none), yet the summed loss
    and every tower parameter's gradient equal the single-rank ones."""
    for name, expected_images in CP_SPLIT_TOWER_IMAGES.items():
        ref = single_rank["cp_split"][name]
        got = [ranks["cp_split"][name] for ranks in two_ranks]
        assert ref["tower_images"] == [sum(expected_images)], ref["tower_images"]
        assert got[0]["tower_images"] == got[1]["tower_images"] == expected_images, name
        assert math.isclose(got[0]["loss"], ref["loss"], rel_tol=training_rel_tol(0, TRAIN_LEN))
        assert all(float(g.abs().max()) > 0 for g in ref["grads"].values()), name
        for rank in got:
            assert rank["grads"].keys() == ref["grads"].keys()
            for param, grad in ref["grads"].items():  # each at its own scale
                assert_close_fp32(rank["grads"][param], grad, TRAIN_LEN)


def text_only_pack_checks(load_dir: str) -> dict:
    """One rank: a micro-batch of two text-only packs (written by hand in the packer's format)
    through the real task encoder, then the model's forward and backward."""
    from lov15_megatron.data.energon_dataset import PackedVLMSample
    from lov15_megatron.data.task_encoder import VLMTaskEncoder
    from lov15_megatron.data.tokenizer import load_tokenizer
    from lov15_megatron.models.packed_seq import thd_model_inputs
    from lov15_megatron.training.data import BATCH_KEYS

    def record(n: int, question: str, answer: str) -> dict:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return {"id": f"code_feedback_{n}", "messages": messages, "images": []}

    packs = [
        [record(0, "Fix: print 'hi'", "print('hi')"), record(1, "What is 2+2?", "4")],
        [record(2, "Reverse a list in Python.", "Use xs[::-1] or xs.reverse().")],
    ]
    encoder = VLMTaskEncoder(load_tokenizer("qwen-offline"))
    encoded = [
        encoder.encode_sample(
            PackedVLMSample(
                __key__=f"{i:09d}",
                __restore_key__=(),
                __subflavors__={"kind": "instruct"},
                samples=p,
                images={},
            )
        )
        for i, p in enumerate(packs)
    ]
    vlm_batch = encoder.batch(encoded)
    batch = {k: getattr(vlm_batch, k) for k in BATCH_KEYS}
    out = {k: tuple(batch[k].shape) for k in ("input_ids", "pixel_values", "image_grid_thw")}
    out["segments"] = batch["cu_seqlens"].numel() - 1

    (model,) = _build(_cfg(load_dir, []), load_dir)
    model.train()
    inputs = thd_model_inputs(batch, image_token_id=IMAGE_PAD)
    keys = ("input_ids", "position_ids", "pixel_values", "image_grid_thw", "packed_seq_params",
            "labels", "loss_mask")  # fmt: skip
    losses = model(**{k: inputs[k] for k in keys})
    loss = (losses * inputs["loss_mask"]).sum() / inputs["loss_mask"].sum()
    params = dict(model.named_parameters())
    # allow_unused=False: every parameter must get a gradient (zeros for the towers), not None.
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    towers = [g for name, g in grads.items() if name.startswith("vision_")]
    out["loss"] = float(loss)
    out["tower_grads"] = len(towers)
    out["tower_grad_max"] = max(float(g.abs().max()) for g in towers)
    out["language_grad_norm"] = float(
        torch.stack([g.norm() for n, g in grads.items() if n.startswith("language_")]).norm()
    )
    return out


def text_only_reference(load_dir: str, references: dict[str, list[str]]) -> dict:
    """The single-rank launch of the text-only test: the task-encoder check, then the runs."""
    return {
        "pack": text_only_pack_checks(load_dir),
        "runs": train_runs(load_dir, references, "mixed"),
    }


# With only the vision tower and merger trainable the grad norm is theirs alone: in the full
# model they change it by ~3e-5 relative, far below its tolerance (~1e-2 after an update).
TOWERS = "train.trainable=[vision,merger]"
TEXT_ONLY_REFERENCES = {"all": [], "towers": [TOWERS]}
TEXT_ONLY_LAYOUTS = {
    "dp2_distopt": ["parallel.use_distributed_optimizer=true"],
    "dp2_distopt_towers": ["parallel.use_distributed_optimizer=true", TOWERS],
    "dp2_towers": ["parallel.use_distributed_optimizer=false", TOWERS],
    "pp2_towers": ["parallel.pipeline_model_parallel_size=2", TOWERS],
    "cp2_towers": ["parallel.context_parallel_size=2", TOWERS],
}


def test_text_only_and_mixed_packs_match_single_rank(single_rank, two_ranks):
    """Packs without any image, alone (a whole step) and mixed with image packs so that some DP
    ranks, micro-batches and CP ranks see no image, train at every layout as on one rank."""
    single = single_rank
    pack = single["pack"]
    assert pack["pixel_values"] == (0, 588) and pack["image_grid_thw"] == (0, 3), pack
    assert pack["input_ids"][0] == 2 and pack["segments"] == 4, pack  # 3 samples + 1 tail
    assert math.isfinite(pack["loss"]) and pack["language_grad_norm"] > 0, pack
    assert pack["tower_grads"] > 0 and pack["tower_grad_max"] == 0.0, pack

    runs = single["runs"]
    assert all(
        math.isfinite(loss) and math.isfinite(norm) for r in runs.values() for loss, norm in r
    )
    # Step 0 holds no image anywhere: the towers' gradient is exactly zero; the others have one.
    assert runs["towers"][0][1] == 0.0 and all(norm > 0 for _, norm in runs["towers"][1:]), runs

    per_rank = [ranks["mixed"] for ranks in two_ranks]
    assert per_rank[0] == per_rank[1]
    for name, got in per_rank[0].items():
        ref = runs["towers" if name.endswith("_towers") else "all"]
        losses, norms = [r[0] for r in ref], [r[1] for r in ref]
        assert_close_training(losses, [g[0] for g in got], TRAIN_LEN, f"{name} loss")
        assert_close_training(norms, [g[1] for g in got], TRAIN_LEN, f"{name} norm", grad_norm=True)
