"""Qwen2/Qwen3 special tokens: the one place their strings and ids are defined.

The ids follow the regular BPE vocabulary (151,643 tokens, ids 0..151642), in this order
(docs/model-reference.md §4 and §10). The data side (tokenizer, chat template, packing) imports
them from here. The model does not: its image-block ids are config fields
(``model.vision.image_token_id``, ``vision_start_token_id``, ``vision_end_token_id``, read from
the HF ``config.json`` on conversion), whose defaults are the ids below; a training run checks
that they equal these (``training/preflight.py``), since the data is tokenized with them.
"""

from __future__ import annotations

#: First special-token id: the size of the regular Qwen BPE vocabulary.
FIRST_SPECIAL_ID = 151643

#: All Qwen special tokens, in id order starting at ``FIRST_SPECIAL_ID``.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Special token string -> id.
SPECIAL_TOKEN_IDS: dict[str, int] = {
    token: FIRST_SPECIAL_ID + offset for offset, token in enumerate(QWEN_SPECIAL_TOKENS)
}

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

ENDOFTEXT_ID = SPECIAL_TOKEN_IDS[ENDOFTEXT]  # 151643, also the padding id
IM_START_ID = SPECIAL_TOKEN_IDS[IM_START]  # 151644
IM_END_ID = SPECIAL_TOKEN_IDS[IM_END]  # 151645
VISION_START_ID = SPECIAL_TOKEN_IDS[VISION_START]  # 151652
VISION_END_ID = SPECIAL_TOKEN_IDS[VISION_END]  # 151653
IMAGE_PAD_ID = SPECIAL_TOKEN_IDS[IMAGE_PAD]  # 151655
VIDEO_PAD_ID = SPECIAL_TOKEN_IDS[VIDEO_PAD]  # 151656

#: Padding id used when batching packs of different lengths (never a loss target).
PAD_ID = ENDOFTEXT_ID

#: Label value ignored by the loss.
IGNORE_INDEX = -100

#: The LM vocabulary size of the released checkpoints (logits width), docs/model-reference.md §1.
VOCAB_SIZE = 151936

#: Ids that mark images in the text; never loss targets, never allowed inside raw text.
VISION_TOKEN_IDS: frozenset[int] = frozenset(
    {
        VISION_START_ID,
        VISION_END_ID,
        IMAGE_PAD_ID,
        VIDEO_PAD_ID,
        SPECIAL_TOKEN_IDS["<|vision_pad|>"],
    }
)
