"""Chat template, sample tokenisation and label rules: one implementation for packer and trainer.

Template (docs/model-reference.md §4), turns joined by ``\\n``, no newline after the last
``<|im_end|>``::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n{image block}{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>

Each ``<image>`` placeholder in user text becomes
``<|vision_start|>`` + ``<|image_pad|>`` × n + ``<|vision_end|>`` with n = H·W/28² of the
resized image. A conversation without placeholders gets all its image blocks at the start of the
first user turn; any other placeholder/image count mismatch is an error.

Videos (only in a sample that has videos; elsewhere ``<video>`` is plain text, as before videos
were read): each ``<video>`` placeholder becomes ``<|vision_start|>`` + ``<|video_pad|>`` × n +
``<|vision_end|>`` with n = frames · H·W/28² (:mod:`.video`); the same placement and count rules
as images, video blocks placed after the image blocks when neither has placeholders.

Tokenisation is per piece: the role header, each text piece between image blocks and the
``\\n`` separators are encoded separately and special tokens are inserted as ids. This equals
tokenising the whole rendered string except when a text piece begins with whitespace that BPE
would have merged across a boundary; it is the canonical tokenisation of this project and the
packer's lengths are computed by exactly this code.

Labels (``kind``):

- ``instruct``: only assistant answers and their closing ``<|im_end|>`` are targets;
- ``caption``: every token except ``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``.

Shift convention: ``labels`` has the same length as ``input_ids`` and is *already shifted*:
``labels[i]`` is the token the model must predict at position ``i`` (that is ``input_ids[i+1]``)
when that next token is a target, else ``-100``; ``labels[-1] == -100``. So no position of one
sub-sample ever predicts a token of the next one, and ``loss_mask = labels != -100``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import (
    IMAGE_COUNT_MISMATCH,
    MALFORMED_RECORD,
    NO_LOSS_TOKENS,
    SPECIAL_TOKEN_IN_TEXT,
    BadSample,
)
from .special_tokens import (
    IGNORE_INDEX,
    IM_END_ID,
    IM_START_ID,
    IMAGE_PAD_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    VISION_TOKEN_IDS,
)
from .tokenizer import Tokenizer

Kind = Literal["caption", "instruct"]
KINDS: tuple[str, ...] = ("caption", "instruct")
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")

#: The same template in Jinja, written as ``chat_template.jinja`` into every HF export (what
#: ``tokenizer.apply_chat_template`` / ``processor.apply_chat_template`` render). Content is a
#: string (``<image>`` placeholders become image blocks) or a list of ``{"type": "image", …}`` /
#: ``{"type": "text", "text": …}`` items. ``add_generation_prompt`` appends
#: ``\n<|im_start|>assistant\n``. A ``{"type": "video", …}`` item becomes a video block
#: (``<|vision_start|><|video_pad|><|vision_end|>``, expanded by the processor).
#: ``tests/test_processor_parity.py`` checks that it tokenises like :func:`encode_conversation`.
CHAT_TEMPLATE_JINJA = (
    "{%- set image_block = '<|vision_start|><|image_pad|><|vision_end|>' -%}\n"
    "{%- if messages[0]['role'] != 'system' -%}\n"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>' -}}\n"
    "{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if not loop.first or message['role'] != 'system' -%}{{- '\\n' -}}{%- endif -%}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
    "{%- if message['content'] is string -%}\n"
    "{{- message['content'] | replace('" + IMAGE_PLACEHOLDER + "', image_block) -}}\n"
    "{%- else -%}\n"
    "{%- for item in message['content'] -%}\n"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}\n"
    "{{- image_block -}}\n"
    "{%- elif item['type'] == 'video' or 'video' in item -%}\n"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\n"
    "{%- elif 'text' in item -%}\n"
    "{{- item['text'] -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{{- '<|im_end|>' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}\n"
)


@dataclass(frozen=True)
class Message:
    """One chat turn; ``content`` may hold ``<image>`` placeholders (user turns only)."""

    role: str
    content: str

    def to_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class EncodedText:
    """Token ids and shifted labels of one sample (see the module docstring)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def check_kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise ValueError(f"unknown sample kind {kind!r}; expected one of {KINDS}")
    return kind  # type: ignore[return-value]


def normalize_messages(
    messages: Sequence[Message], num_images: int, num_videos: int = 0
) -> list[Message]:
    """Validate turn structure and place image (and video) placeholders; returns the messages
    to render.

    Adds the default system prompt when there is none; puts ``<image>`` × n at the start of the
    first user turn when no placeholder is present (``<video>`` × m after them, for a sample
    with videos). Raises :class:`BadSample`.
    """
    if not messages:
        raise BadSample(MALFORMED_RECORD, "no messages")
    turns = list(messages)
    for index, message in enumerate(turns):
        if message.role not in ROLES or not isinstance(message.content, str):
            raise BadSample(MALFORMED_RECORD, f"message {index}: bad role/content {message!r}")
        if message.role == "system" and index != 0:
            raise BadSample(MALFORMED_RECORD, f"message {index}: system turn not first")
        for placeholder in _placeholders(num_videos):
            if message.role != "user" and placeholder in message.content:
                raise BadSample(
                    IMAGE_COUNT_MISMATCH, f"message {index}: {placeholder} in a {message.role} turn"
                )
    if turns[0].role != "system":
        turns.insert(0, Message("system", DEFAULT_SYSTEM_PROMPT))
    dialogue = turns[1:]
    for index, message in enumerate(dialogue):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.role != expected:
            raise BadSample(
                MALFORMED_RECORD, f"turn {index} is {message.role!r}, expected {expected!r}"
            )
    if len(dialogue) < 2 or dialogue[-1].role != "assistant":
        raise BadSample(MALFORMED_RECORD, "needs user/assistant turns ending with the assistant")
    counts = [(VIDEO_PLACEHOLDER, num_videos, "videos")] if num_videos else []
    for placeholder, count, what in [*counts, (IMAGE_PLACEHOLDER, num_images, "images")]:
        placeholders = sum(message.content.count(placeholder) for message in dialogue)
        if placeholders == 0 and count > 0:
            first = dialogue[0]
            dialogue[0] = Message("user", placeholder * count + first.content)
        elif placeholders != count:
            raise BadSample(
                IMAGE_COUNT_MISMATCH, f"{placeholders} {placeholder} placeholders, {count} {what}"
            )
    return [turns[0], *dialogue]


def _placeholders(num_videos: int) -> tuple[str, ...]:
    """The placeholders of a sample: ``<video>`` only counts in a sample with videos."""
    return (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER) if num_videos else (IMAGE_PLACEHOLDER,)


def _encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    if not text:
        return []
    ids = tokenizer.encode(text)
    if any(token in VISION_TOKEN_IDS for token in ids):
        raise BadSample(SPECIAL_TOKEN_IN_TEXT, f"vision special token inside text {text[:80]!r}")
    return ids


def encode_conversation(
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    image_token_counts: Sequence[int],
    kind: str,
    video_token_counts: Sequence[int] = (),
) -> EncodedText:
    """Render, tokenise and label one sample. ``image_token_counts[k]`` = pads of image k,
    ``video_token_counts[k]`` = pads of video k."""
    check_kind(kind)
    turns = normalize_messages(messages, len(image_token_counts), len(video_token_counts))
    split = re.compile("(" + "|".join(map(re.escape, _placeholders(len(video_token_counts)))) + ")")
    ids: list[int] = []
    train: list[bool] = []  # per token: is it a loss target?
    caption = kind == "caption"

    def emit(tokens: list[int], is_target: bool) -> None:
        ids.extend(tokens)
        train.extend([is_target] * len(tokens))

    newline = _encode_text(tokenizer, "\n")
    next_image = next_video = 0
    for index, message in enumerate(turns):
        if index:
            emit(newline, caption)
        emit([IM_START_ID], caption)
        emit(_encode_text(tokenizer, f"{message.role}\n"), caption)
        answer = message.role == "assistant"
        pieces = split.split(message.content)  # text, placeholder, text, …
        for piece_index, piece in enumerate(pieces):
            if piece_index % 2:
                if piece == IMAGE_PLACEHOLDER:
                    pad, count = IMAGE_PAD_ID, image_token_counts[next_image]
                    next_image += 1
                else:
                    pad, count = VIDEO_PAD_ID, video_token_counts[next_video]
                    next_video += 1
                emit([VISION_START_ID], False)
                emit([pad] * count, False)
                emit([VISION_END_ID], False)
                continue
            emit(_encode_text(tokenizer, piece), caption or answer)
        emit([IM_END_ID], caption or answer)
    labels = [
        ids[position + 1] if train[position + 1] else IGNORE_INDEX
        for position in range(len(ids) - 1)
    ]
    labels.append(IGNORE_INDEX)
    encoded = EncodedText(input_ids=ids, labels=labels)
    if encoded.num_loss_tokens == 0:
        raise BadSample(NO_LOSS_TOKENS, "sample has no loss tokens")
    return encoded
