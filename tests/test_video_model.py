"""Videos in the model, cheap checks without ranks (the parity checks of Megatron against the HF
model are in test_llava_ov.py's launches, the model card's video flow in test_hf_export.py).

* The HF model: a video is its frames as images (each frame one ViT segment with its own class
  token, removed after the tower; the same 2-D RoPE positions in every frame), not the release's
  HF code, which drops every later frame's class token at the wrong offset.
* ``frames_as_images``: the HF form (images and ``[t, h, w]`` videos apart) as one tower input,
  each vision slot taking its own kind's feature in order.
* The task encoder on packs written by hand in the packer's format (docs/data-reference.md §5):
  a video given as frame images (``fps`` null, indices into the stored frames) after an image in
  the text but before it in the stream; frame i of the fixture is flat grey 8·i.
* ``model.vision.video_token_id``: checked like ``image_token_id``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lov15_megatron.config import ConfigError, load_config, validate
from lov15_megatron.data.image_processing import CLIP_MEAN, CLIP_STD
from lov15_megatron.data.special_tokens import IMAGE_PAD_ID, VIDEO_PAD_ID
from lov15_megatron.hf import LLaVAOneVision1_5_Config, LLaVAOneVision1_5_ForConditionalGeneration
from lov15_megatron.models.llava_ov.model import frames_as_images


@pytest.fixture(scope="module")
def hf_model() -> LLaVAOneVision1_5_ForConditionalGeneration:
    config = LLaVAOneVision1_5_Config(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, intermediate_size=64,
                           num_heads=2, patch_size=14, spatial_merge_size=2),
        text_config=dict(vocab_size=1024, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, tie_word_embeddings=False),
        image_token_id=1000, video_token_id=1001, vision_start_token_id=1002,
        vision_end_token_id=1003,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LLaVAOneVision1_5_ForConditionalGeneration(config).eval()
    with torch.no_grad():  # class tokens and their angles far from zero: they matter
        model.visual.class_embedding.normal_(0.0, 1.0)
        model.visual.class_pos_emb.normal_(0.0, 1.0)
    return model


@torch.no_grad()
def test_hf_video_is_its_frames_as_images(hf_model) -> None:
    pixels = torch.randn(3 * 2 * 4, 588)
    video = hf_model.get_video_features(pixels, torch.tensor([[3, 2, 4]]))
    frames = hf_model.visual(pixels, torch.tensor([[1, 2, 4]] * 3))
    alone = torch.cat([hf_model.visual(p, torch.tensor([[1, 2, 4]])) for p in pixels.split(8)])
    assert video.shape == (3 * 2, 32)
    assert torch.equal(video, frames)
    torch.testing.assert_close(video, alone)  # frames do not see each other
    # The release's HF offset bug would give frame 1 frame 0's last patch and its own class
    # token: the features would differ from frame 1 encoded alone.
    assert not torch.allclose(alone[2:4], alone[:2])


@torch.no_grad()
def test_hf_forward_places_video_and_image_features(hf_model) -> None:
    start, end, image, video = 1002, 1003, 1000, 1001
    ids = torch.tensor([[5, start, video, video, video, video, end, 6, start, image, end, 7]])
    pixels_video, pixels_image = torch.randn(2 * 2 * 4, 588), torch.randn(4, 588)
    logits = hf_model(
        input_ids=ids,
        pixel_values=pixels_image,
        image_grid_thw=torch.tensor([[1, 2, 2]]),
        pixel_values_videos=pixels_video,
        video_grid_thw=torch.tensor([[2, 2, 4]]),
    ).logits
    # The same through embeddings placed by hand.
    embeds = hf_model.model.embed_tokens(ids).clone()
    embeds[0, 2:6] = hf_model.visual(pixels_video, torch.tensor([[1, 2, 4]] * 2))
    embeds[0, 9] = hf_model.visual(pixels_image, torch.tensor([[1, 2, 2]]))
    by_hand = hf_model.lm_head(hf_model.model(inputs_embeds=embeds).last_hidden_state)
    torch.testing.assert_close(logits, by_hand)
    mismatch = r"the text has 4 video tokens \(id 1001\) but the videos give 2 features"
    with pytest.raises(ValueError, match=mismatch):
        hf_model(
            input_ids=ids,
            pixel_values=pixels_image,
            image_grid_thw=torch.tensor([[1, 2, 2]]),
            pixel_values_videos=pixels_video[:8],
            video_grid_thw=torch.tensor([[1, 2, 4]]),
        )
    with pytest.raises(ValueError, match="no pixel_values_videos were given"):
        hf_model(input_ids=ids[:, :7])


def test_frames_as_images_orders_the_slots() -> None:
    image, video = 10, 11
    # stream: image A (1 feature), video V (2 frames × 1 feature), image B (2 features)
    ids = torch.tensor([[image, 0, video, video, 0], [image, image, 0, 0, 0]])
    images = torch.arange(3 * 4, dtype=torch.float32)[:, None].expand(-1, 588)
    grids = torch.tensor([[1, 2, 2], [1, 2, 4]])
    frames = 100 + torch.arange(2 * 4, dtype=torch.float32)[:, None].expand(-1, 588)
    pixels, tower_grids, order = frames_as_images(
        ids, (image, video), images, grids, frames, torch.tensor([[2, 2, 2]]), 2
    )
    assert tower_grids.tolist() == [[1, 2, 2], [1, 2, 4], [1, 2, 2], [1, 2, 2]]
    assert torch.equal(pixels, torch.cat([images, frames]))
    # features: A=0, B=1,2 (images first), V frame 0 = 3, frame 1 = 4; slots in stream order
    assert order.tolist() == [0, 3, 4, 1, 2]
    with pytest.raises(ValueError, match=r"2 <\|video_pad\|> tokens but .* the videos 4 merged"):
        frames_as_images(ids, (image, video), images, grids, frames, torch.tensor([[4, 2, 2]]), 2)


def _png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), level, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_task_encoder_frame_images_and_stream_order() -> None:
    """An image placeholder after the video in the text: the frames' rows come first (stream
    order); frames given as images are taken at the stored indices (3 → the repeated last)."""
    from lov15_megatron.data.energon_dataset import PackedVLMSample
    from lov15_megatron.data.task_encoder import VLMTaskEncoder
    from lov15_megatron.data.tokenizer import load_tokenizer

    parts = {f"vid0.f{j}.png": _png(8 * j) for j in range(3)}
    parts["img0.png"] = _png(200)
    video = {"parts": [f"vid0.f{j}.png" for j in range(3)], "frames": [0, 1, 2, 2],
             "size": [64, 48], "grid_thw": [4, 2, 4], "total_frames": 3, "fps": None}  # fmt: skip
    record = {"id": "s0", "images": ["img0.png"], "videos": [video], "messages": [
        {"role": "user", "content": "<video> then <image>: same colour?"},
        {"role": "assistant", "content": "No."}]}  # fmt: skip
    sample = PackedVLMSample(
        __key__="000000007",
        __restore_key__=(),
        __subflavors__={"kind": "instruct"},
        samples=[record],
        images=parts,
    )
    encoder = VLMTaskEncoder(load_tokenizer("qwen-offline"))
    encoded = encoder.encode_sample(sample)
    grids = encoded.image_grid_thw.tolist()
    assert grids[:4] == [[1, 2, 4]] * 4 and grids[4][0] == 1
    ids = encoded.input_ids
    assert int((ids == VIDEO_PAD_ID).sum()) == 4 * 2 and int((ids == IMAGE_PAD_ID).sum()) > 0
    first_video = int((ids == VIDEO_PAD_ID).nonzero()[0])
    assert first_video < int((ids == IMAGE_PAD_ID).nonzero()[0])
    red = encoded.pixel_values[:, :196].mean(1) * CLIP_STD[0] + CLIP_MEAN[0]
    levels = (red * 255).round()
    per_frame = levels[: 4 * 8].reshape(4, 8)
    assert per_frame.eq(per_frame[:, :1]).all()
    assert per_frame[:, 0].tolist() == [0.0, 8.0, 16.0, 16.0]
    assert levels[4 * 8 :].eq(200.0).all()

    broken = dict(record, videos=[dict(video, frames=[0, 1, 2])])  # 3 indices, grid t = 4
    with pytest.raises(ValueError, match=r"000000007/s0: packed video unusable: 3 frame indices"):
        encoder.encode_sample(
            PackedVLMSample(
                __key__="000000007",
                __restore_key__=(),
                __subflavors__={"kind": "instruct"},
                samples=[broken],
                images=parts,
            )  # fmt: skip
        )


TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_gpt.yaml"


def _vlm_config(*overrides: str):
    vision = (
        "model.vision={num_layers: 1, hidden_size: 32, ffn_hidden_size: 64, "
        "num_attention_heads: 2, image_token_id: 255, vision_start_token_id: 253, "
        "vision_end_token_id: 254}"
    )
    return load_config(TINY, [vision, *overrides])


def test_video_token_id_is_checked_like_the_image_token_id() -> None:
    from lov15_megatron.config.schema import video_token_id_of

    cfg = _vlm_config()
    validate(cfg)  # a 256-token vocabulary has no default video token: none
    assert video_token_id_of(cfg.model.vision, 256) is None
    assert video_token_id_of(cfg.model.vision, 151936) == 151656
    validate(_vlm_config("model.vision.video_token_id=252"))
    outside = r"video_token_id=300 is outside the vocabulary: it must be in \[0, .*=256\)"
    with pytest.raises(ConfigError, match=outside):
        validate(_vlm_config("model.vision.video_token_id=300"))
    with pytest.raises(ConfigError, match=r"video_token_id=255 equals model.vision.image_token_id"):
        validate(_vlm_config("model.vision.video_token_id=255"))
