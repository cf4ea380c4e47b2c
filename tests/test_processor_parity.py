"""One image rule and one chat template, held against independent implementations.

- ``smart_resize`` (ours) = transformers' ``qwen2_vl`` ``smart_resize`` on every size up to
  400 × 400 and on extreme ones, for three pixel budgets;
- ``preprocess_image`` (ours, the training pipeline) = transformers' ``Qwen2VLImageProcessorPil``
  (``temporal_patch_size=1``) on many sizes and aspect ratios, the min/max-pixels edges
  included: same grid, pixels within ``PIXEL_TOL``;
- the exported image processor (``hf/remote_code/processing_llavaonevision1_5.py``) =
  ``preprocess_image`` with the longest-side cap, and its token counts = ``image_token_count``;
- ``encode_conversation`` (ours) = ``tokenizer.apply_chat_template`` / the processor on single-
  and multi-turn, single- and multi-image conversations, with the intended differences listed.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image
from tolerances import fp32_abs_tol
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    smart_resize as hf_smart_resize,
)

from lov15_megatron.data.chat import Message, encode_conversation
from lov15_megatron.data.image_processing import (
    FACTOR,
    ImageConfig,
    cap_longest_side,
    image_grid,
    preprocess_image,
    smart_resize,
)
from lov15_megatron.data.tokenizer import load_tokenizer
from lov15_megatron.hf.export import write_hf_assets
from lov15_megatron.hf.remote_code import processing_llavaonevision1_5 as hf_processing

#: Largest |ours - transformers| allowed on normalised pixels (both float32; measured 4.8e-7):
#: elementwise rescale and normalise, no reduction, values up to (1 - 0.408) / 0.276 = 2.15.
PIXEL_TOL = fp32_abs_tol(1, 2.15)

CONFIGS = {
    "release": ImageConfig(),  # 3136 … 2,560,000
    "lmms-eval": ImageConfig(min_pixels=200_704, max_pixels=1_605_632),
    "small": ImageConfig(min_pixels=28 * 28, max_pixels=6 * 28 * 28),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_smart_resize_equals_transformers(name) -> None:
    config = CONFIGS[name]
    sizes = itertools.chain(
        itertools.product(range(1, 401), range(1, 401, 3)),
        [(1, 200), (200, 1), (3000, 100), (100, 3000), (20000, 100), (5000, 5000)],
        [(h, w) for h in (1599, 1600, 1601, 1615, 1624) for w in (1599, 1600, 1601, 1624)],
    )
    checked = 0
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        expected = hf_smart_resize(
            h, w, factor=FACTOR, min_pixels=config.min_pixels, max_pixels=config.max_pixels
        )
        assert smart_resize(h, w, config) == expected, (h, w)
        checked += 1
    assert checked > 50_000


def random_image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


#: (height, width, budget): tiny (scaled up to min_pixels), odd, exact multiples (no resize),
#: extreme aspect ratios, just below/above max_pixels, large (scaled down).
IMAGE_CASES = [
    (29, 29, "release"),
    (10, 10, "release"),
    (1, 150, "release"),
    (56, 84, "release"),
    (60, 100, "release"),
    (333, 517, "release"),
    (100, 3000, "release"),
    (3000, 100, "release"),
    (1600, 1600, "release"),
    (1610, 1600, "release"),
    (2000, 1500, "release"),
    (224, 224, "lmms-eval"),  # below lmms-eval's min_pixels 200,704: scaled up
    (448, 448, "lmms-eval"),
    (1500, 1300, "lmms-eval"),  # above its max_pixels: scaled down
    (84, 84, "small"),
    (90, 60, "small"),
]


@pytest.mark.parametrize("height,width,budget", IMAGE_CASES)
def test_preprocess_equals_qwen2vl_pil(height, width, budget) -> None:
    config = CONFIGS[budget]
    image = random_image(height, width, seed=height * 7 + width)
    ours = preprocess_image(image, config)
    reference = Qwen2VLImageProcessorPil(
        temporal_patch_size=1, min_pixels=config.min_pixels, max_pixels=config.max_pixels
    )(image, return_tensors="np")
    assert tuple(reference["image_grid_thw"][0]) == ours.grid_thw
    assert reference["pixel_values"].shape == ours.pixel_values.shape
    assert np.abs(reference["pixel_values"] - ours.pixel_values).max() <= PIXEL_TOL


def exported_image_processor(config: ImageConfig):
    from lov15_megatron.hf.export import image_processor_config

    settings = image_processor_config(config)
    for key in ("auto_map", "image_processor_type", "processor_class"):
        settings.pop(key)
    return hf_processing.LLaVAOneVision1_5_ImageProcessor(**settings)


#: (height, width, max_image_side): the cap at, just above and far above the longest side.
CAP_CASES = [
    (600, 400, 600),
    (601, 400, 600),
    (400, 601, 600),
    (2000, 700, 1000),
    (700, 2000, 1000),
    (1999, 3001, 1000),
    (90, 60, 56),
]


@pytest.mark.parametrize("height,width,cap", CAP_CASES)
def test_exported_processor_equals_ours_with_side_cap(height, width, cap) -> None:
    config = ImageConfig(max_image_side=cap)
    image = random_image(height, width, seed=height + width)
    ours = preprocess_image(image, config)
    exported = exported_image_processor(config)(image, return_tensors="np")
    assert (
        tuple(exported["image_grid_thw"][0]) == ours.grid_thw == image_grid(height, width, config)
    )
    assert np.abs(exported["pixel_values"] - ours.pixel_values).max() <= PIXEL_TOL
    patches = exported_image_processor(config).get_number_of_image_patches(height, width)
    assert patches == ours.grid_thw[1] * ours.grid_thw[2]
    capped = cap_longest_side(height, width, cap)
    assert max(capped) == min(cap, max(height, width))
    # the cap is a first resize: transformers' processor on the capped image gives the same
    reference = Qwen2VLImageProcessorPil(temporal_patch_size=1, max_pixels=config.max_pixels)(
        image.resize(capped[::-1], Image.Resampling.BICUBIC), return_tensors="np"
    )
    assert np.abs(reference["pixel_values"] - ours.pixel_values).max() <= PIXEL_TOL


def test_cap_rule_is_the_same_in_both_homes() -> None:
    for h, w, cap in itertools.product(range(1, 300, 7), range(1, 300, 11), (28, 100, 299)):
        assert cap_longest_side(h, w, cap) == hf_processing.cap_longest_side(h, w, cap)


def test_exported_processor_defaults_without_cap_equal_ours() -> None:
    image = random_image(333, 517, seed=3)
    exported = exported_image_processor(ImageConfig())(image, return_tensors="np")
    ours = preprocess_image(image)
    assert tuple(exported["image_grid_thw"][0]) == ours.grid_thw
    assert np.abs(exported["pixel_values"] - ours.pixel_values).max() <= PIXEL_TOL


# ------------------------------------------------------------------------------ template


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The tokenizer / chat template / processor files an export gets (offline Qwen vocab)."""
    directory = tmp_path_factory.mktemp("assets")
    write_hf_assets(directory)
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer(hf_dir):
    return AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)


def as_hf(messages: list[Message]) -> list[dict]:
    """Our messages as HF content lists: each ``<image>`` an image item."""
    out = []
    for m in messages:
        pieces = m.content.split("<image>")
        content = []
        for index, piece in enumerate(pieces):
            if index:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
        out.append({"role": m.role, "content": content})
    return out


CONVERSATIONS = {
    "single-turn, no image": [Message("user", "Hello there!"), Message("assistant", "Hi.")],
    "single-turn, one image": [
        Message("user", "<image>\nWhat colour is the circle?"),
        Message("assistant", "red"),
    ],
    "multi-turn, one image, system prompt": [
        Message("system", "Answer in one word."),
        Message("user", "<image>\nHow many squares?"),
        Message("assistant", "3"),
        Message("user", "And circles?"),
        Message("assistant", "two"),
    ],
    "multi-image, images mid-text and in a later turn": [
        Message("user", "Compare <image> with <image>: which is larger?"),
        Message("assistant", "The first one, by far.\nIt covers more."),
        Message("user", "Now this one: <image>"),
        Message("assistant", "Smaller  again."),
    ],
    "unicode and digits": [
        Message("user", "<image>Größe 12345? 日本語"),
        Message("assistant", "ja, 42"),
    ],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_template_equals_apply_chat_template(name, hf_tokenizer) -> None:
    """Full conversations (one pad per image) and generation prompts, token for token."""
    messages = CONVERSATIONS[name]
    n_images = sum(m.content.count("<image>") for m in messages)
    ours = encode_conversation(load_tokenizer("qwen-offline"), messages, [1] * n_images, "instruct")
    theirs = hf_tokenizer.apply_chat_template(as_hf(messages), tokenize=True, return_dict=False)
    assert ours.input_ids == list(theirs)
    # string content with <image> placeholders renders the same as content lists
    as_strings = [{"role": m.role, "content": m.content} for m in messages]
    assert hf_tokenizer.apply_chat_template(as_strings, tokenize=True, return_dict=False) == theirs
    # generation prompt: everything before the last answer, then "<|im_start|>assistant\n"
    prompt = [*messages[:-1], Message("assistant", "")]
    ours_prompt = encode_conversation(
        load_tokenizer("qwen-offline"), prompt, [1] * n_images, "instruct"
    ).input_ids[:-1]  # drop the empty answer's <|im_end|>
    theirs_prompt = hf_tokenizer.apply_chat_template(
        as_hf(messages[:-1]), tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert ours_prompt == list(theirs_prompt)


def test_processor_expands_images_like_training(hf_dir) -> None:
    """With real images, the processor's ids = ours with h·w/4 pads per image."""
    # the class itself (test_hf_export.py loads it as remote code through AutoProcessor)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    image_processor = exported_image_processor(ImageConfig())
    processor = hf_processing.LLaVAOneVision1_5_Processor(
        image_processor, tokenizer, chat_template=tokenizer.chat_template
    )
    messages = CONVERSATIONS["multi-image, images mid-text and in a later turn"]
    images = [random_image(60, 100, 1), random_image(300, 200, 2), random_image(29, 29, 3)]
    counts = [preprocess_image(i).num_tokens for i in images]
    ours = encode_conversation(load_tokenizer("qwen-offline"), messages, counts, "instruct")
    text = processor.apply_chat_template(as_hf(messages), tokenize=False)
    out = processor(text=[text], images=images, return_tensors="np")
    assert out["input_ids"][0].tolist() == ours.input_ids
    assert (out["mm_token_type_ids"][0] == 1).sum() == sum(counts)
    pixels = np.concatenate([preprocess_image(i).pixel_values for i in images])
    assert np.abs(out["pixel_values"] - pixels).max() <= PIXEL_TOL


def test_intended_difference_leading_whitespace(hf_tokenizer) -> None:
    """Ours tokenises the role header and each text piece apart (the packer's lengths come from
    this); BPE over the whole string merges whitespace across that boundary. Text that starts
    with a newline is the one place they differ (docs/exports-and-evaluation.md)."""
    messages = [Message("user", "\n\nWhat is it?"), Message("assistant", "a cat")]
    ours = encode_conversation(load_tokenizer("qwen-offline"), messages, [], "instruct").input_ids
    theirs = list(
        hf_tokenizer.apply_chat_template(as_hf(messages), tokenize=True, return_dict=False)
    )
    assert ours != theirs
    assert load_tokenizer("qwen-offline").decode(ours) == hf_tokenizer.decode(theirs)
