"""Data primitives: special tokens, tokenizer, image processing, chat template/labels, packing."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from data_fixtures import image_bytes
from helpers import benchmark_module
from PIL import Image

from lov15_megatron.data import special_tokens as st
from lov15_megatron.data.chat import Message, encode_conversation
from lov15_megatron.data.errors import BadSample
from lov15_megatron.data.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    ImageConfig,
    ImageError,
    image_token_count,
    patchify,
    preprocess_image,
    read_image_size,
    smart_resize,
)
from lov15_megatron.data.packing import (
    best_fit_decreasing,
    lower_bound_packs,
    pack_statistics,
)
from lov15_megatron.data.tokenizer import load_tokenizer

# The baselines are measurement code (benchmarks/packing_baselines.py), not the package's.
_baselines = benchmark_module("packing_baselines")
first_fit, release_style = _baselines.first_fit, _baselines.release_style


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("qwen-offline")


# ----------------------------------------------------------------------------- tokenizer


def test_special_token_ids_match_model_spec():
    assert st.VISION_START_ID == 151652 and st.VISION_END_ID == 151653
    assert st.IMAGE_PAD_ID == 151655 and st.VIDEO_PAD_ID == 151656
    assert (st.IM_START_ID, st.IM_END_ID, st.ENDOFTEXT_ID) == (151644, 151645, 151643)
    assert st.SPECIAL_TOKEN_IDS["<|video_pad|>"] == 151656 and len(st.QWEN_SPECIAL_TOKENS) == 14


def test_offline_tokenizer_ids(tokenizer):
    assert tokenizer.encode("Hello world!") == [9707, 1879, 0]
    for token, expected in st.SPECIAL_TOKEN_IDS.items():
        assert tokenizer.token_to_id(token) == expected
    assert tokenizer.encode("<|im_start|>user\n12") == [st.IM_START_ID, 872, 198, 16, 17]


def test_saved_tokenizer_directory_round_trips(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    text = "Hello world! <|vision_start|><|image_pad|><|vision_end|> café 2026"
    assert loaded.encode(text) == tokenizer.encode(text)


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (56, 56, (56, 56)),
        (10, 10, (56, 56)),  # below min_pixels 3136 -> scaled up
        (100, 60, (112, 56)),
        (28, 2000, (28, 1988)),
    ],
)
def test_smart_resize_hand_cases(height, width, expected):
    assert smart_resize(height, width) == expected


def test_smart_resize_respects_budget_and_aspect():
    config = ImageConfig(min_pixels=3136, max_pixels=200_000)
    for height, width in [(4000, 3000), (3001, 17), (999, 1001), (50, 9000)]:
        h, w = smart_resize(height, width, config)
        assert h % 28 == 0 and w % 28 == 0 and h * w <= 200_000
        assert abs(h / w - height / width) / (height / width) < 0.6
    with pytest.raises(ImageError):
        smart_resize(10, 2500)


def test_patchify_is_two_by_two_merge_order():
    height, width = 56, 84  # 4 x 6 patches
    pixels = np.zeros((3, height, width), dtype=np.float32)
    for r in range(height):
        for c in range(width):
            pixels[:, r, c] = (r // 14) * 100 + (c // 14)  # patch id as value
            pixels[1, r, c] += 0.5
    rows = patchify(pixels)
    assert rows.shape == (24, 588)
    expected = []
    for block_row in range(2):
        for block_col in range(3):
            for in_row in range(2):
                for in_col in range(2):
                    expected.append((2 * block_row + in_row) * 100 + 2 * block_col + in_col)
    assert rows[:, 0].tolist() == expected  # channel 0 first (channel-major)
    assert np.allclose(rows[:, 196], np.asarray(expected) + 0.5)  # channel 1 starts at 196


def test_preprocess_image_normalises_and_counts_tokens():
    image = Image.new("RGB", (100, 60), (255, 0, 128))
    processed = preprocess_image(image)
    assert processed.grid_thw == (1, 4, 8)  # resized to 56 x 112
    assert processed.pixel_values.shape == (32, 588)
    assert processed.num_tokens == image_token_count(60, 100) == 8
    expected_red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert np.allclose(processed.pixel_values[:, :196], expected_red, atol=1e-5)


def test_read_image_size_reads_headers_only():
    data = image_bytes(123, 45, "JPEG")
    assert read_image_size(data) == (123, 45)
    truncated = data[: len(data) // 2]  # header intact, pixel data cut
    assert read_image_size(truncated) == (123, 45)
    with pytest.raises(ImageError):
        read_image_size(b"not an image at all")
    with pytest.raises(ImageError, match="missing.png"):
        read_image_size("/nonexistent/missing.png")
    buffer = io.BytesIO()
    Image.new("RGB", (30, 30)).save(buffer, format="PNG")
    assert read_image_size(buffer.getvalue()) == (30, 30)


# ----------------------------------------------------------------------------- chat template


def _targets(encoded):
    return [label for label in encoded.labels if label != st.IGNORE_INDEX]


def test_instruct_labels_hand_checked(tokenizer):
    messages = [Message("user", "<image>\nWhat?"), Message("assistant", "A cat.")]
    encoded = encode_conversation(tokenizer, messages, [3], "instruct")
    enc = tokenizer.encode
    expected_ids = (
        [st.IM_START_ID, *enc("system\n"), *enc("You are a helpful assistant."), st.IM_END_ID]
        + enc("\n")
        + [st.IM_START_ID, *enc("user\n"), st.VISION_START_ID, *[st.IMAGE_PAD_ID] * 3]
        + [st.VISION_END_ID, *enc("\nWhat?"), st.IM_END_ID, *enc("\n")]
        + [st.IM_START_ID, *enc("assistant\n"), *enc("A cat."), st.IM_END_ID]
    )
    assert encoded.input_ids == expected_ids
    assert _targets(encoded) == [*enc("A cat."), st.IM_END_ID]
    # shifted: the label at position i is the token at i + 1
    answer_start = len(expected_ids) - len(enc("A cat.")) - 1
    assert encoded.labels[answer_start - 1] == expected_ids[answer_start]
    assert encoded.labels[-1] == st.IGNORE_INDEX and len(encoded.labels) == len(expected_ids)


def test_multi_turn_instruct_trains_every_answer(tokenizer):
    messages = [
        Message("user", "Hi"),
        Message("assistant", "Hello."),
        Message("user", "Bye"),
        Message("assistant", "Goodbye."),
    ]
    encoded = encode_conversation(tokenizer, messages, [], "instruct")
    assert tokenizer.decode(_targets(encoded)) == "Hello.<|im_end|>Goodbye.<|im_end|>"


def test_caption_labels_exclude_only_vision_tokens(tokenizer):
    messages = [Message("user", "<image>"), Message("assistant", "Two dogs.")]
    encoded = encode_conversation(tokenizer, messages, [4], "caption")
    ids = encoded.input_ids
    trained = [ids[i + 1] for i, label in enumerate(encoded.labels) if label != st.IGNORE_INDEX]
    expected = [token for token in ids[1:] if token not in st.VISION_TOKEN_IDS]
    assert trained == expected == _targets(encoded)
    assert st.IM_END_ID in trained and st.IMAGE_PAD_ID not in trained


def test_images_without_placeholders_go_first_and_mismatch_is_an_error(tokenizer):
    plain = [Message("user", "Look."), Message("assistant", "Ok.")]
    encoded = encode_conversation(tokenizer, plain, [1, 2], "instruct")
    user_start = encoded.input_ids.index(st.IM_START_ID, 1)
    after_header = user_start + 1 + len(tokenizer.encode("user\n"))
    assert encoded.input_ids[after_header] == st.VISION_START_ID
    assert encoded.input_ids.count(st.IMAGE_PAD_ID) == 3
    two = [Message("user", "<image><image>"), Message("assistant", "Ok.")]
    with pytest.raises(BadSample) as error:
        encode_conversation(tokenizer, two, [1], "instruct")
    assert error.value.reason == "image_count_mismatch"
    sneaky = [Message("user", "<|image_pad|>"), Message("assistant", "Ok.")]
    with pytest.raises(BadSample) as error:
        encode_conversation(tokenizer, sneaky, [], "instruct")
    assert error.value.reason == "special_token_in_text"
    with pytest.raises(BadSample) as error:
        encode_conversation(tokenizer, [Message("user", "x")], [], "instruct")
    assert error.value.reason == "malformed_record"


# ----------------------------------------------------------------------------- packing


def _check_packing(lengths, packs, capacity):
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in pack) <= capacity for pack in packs)


def test_best_fit_decreasing_is_valid_deterministic_and_tight():
    rng = random.Random(1)
    lengths = [rng.randint(1, 300) for _ in range(3000)]
    packs = best_fit_decreasing(lengths, 1024)
    _check_packing(lengths, packs, 1024)
    assert packs == best_fit_decreasing(list(lengths), 1024)
    assert len(packs) <= lower_bound_packs(lengths, 1024) * 1.01 + 1
    for algorithm in (first_fit, release_style):
        _check_packing(lengths, algorithm(lengths, 1024), 1024)


def test_best_fit_beats_first_fit_on_adversarial_order():
    lengths = [2] * 5 + [8] * 5  # first-fit fills one pack with the 2s, then 8s alone
    assert len(first_fit(lengths, 10)) == 6
    assert len(best_fit_decreasing(lengths, 10)) == 5 == lower_bound_packs(lengths, 10)
    assert best_fit_decreasing([5, 5, 6, 4], 10) == [[2, 3], [0, 1]]  # packs in creation order
    stats = pack_statistics([5, 5, 6, 4], [[0, 1], [2, 3]], 10)
    assert stats["fill_efficiency"] == 1.0 and stats["samples_per_pack"] == 2.0
    with pytest.raises(ValueError, match="item 1"):
        best_fit_decreasing([3, 11], 10)
