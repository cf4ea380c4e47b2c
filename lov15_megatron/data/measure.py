"""Token length of a raw sample: the exact code path training uses (chat template, label rules,
image token counts from the resized size), with image sizes read from file headers."""

from __future__ import annotations

from dataclasses import dataclass

from .chat import EncodedText, Message, encode_conversation
from .errors import TOO_LONG, BadSample
from .image_processing import (
    ImageConfig,
    ImageError,
    decode_image,
    image_grid,
    image_token_count,
    read_image_size,
)
from .sources import ImageRef, RawSample, corrupt_image_error
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class MeasuredSample:
    """What the packer keeps about one usable sample (one row of the sample table,
    :mod:`.sample_store`): where it is, its length and its vision cost. Texts and images are
    read again from the source when its shard is written."""

    source: int
    record: int
    loc: int  # see :attr:`.sources.RawSample.loc`
    length: int  # tokens, = len(input_ids) the task encoder produces
    num_patches: int  # vision patches Σ h·w over its images (ViT cost, linear part)
    patches_sq: int  # Σ (h·w)² over its images (ViT attention cost)
    image_bytes: int  # encoded bytes of its images


def encode_sample_text(
    tokenizer: Tokenizer,
    messages: list[Message] | tuple[Message, ...],
    image_sizes: list[tuple[int, int]] | tuple[tuple[int, int], ...],
    kind: str,
    image_config: ImageConfig,
) -> EncodedText:
    """Token ids and labels of a sample given its images' original (width, height)."""
    counts = [image_token_count(height, width, image_config) for width, height in image_sizes]
    return encode_conversation(tokenizer, messages, counts, kind)


def _image_size(ref: ImageRef, data: bytes | None, verify: bool) -> tuple[tuple[int, int], int]:
    if data is None:
        try:
            size = read_image_size(ref.path) if not verify else None
        except ImageError as error:
            raise corrupt_image_error(ref, str(error)) from error
        if size is not None:
            return size, _file_size(ref.path)
        data = ref.read_bytes()
    try:
        if verify:
            return decode_image(data).size, len(data)
        return read_image_size(data), len(data)
    except ImageError as error:
        raise corrupt_image_error(ref, str(error)) from error


def _file_size(path: str) -> int:
    import os

    return os.path.getsize(path)


def measure_sample(
    raw: RawSample,
    tokenizer: Tokenizer,
    kind: str,
    image_config: ImageConfig,
    seq_len: int,
    verify_images: bool = False,
) -> MeasuredSample:
    """Measure one sample; raises :class:`BadSample` located at ``raw.origin``."""
    try:
        sizes, total_bytes = [], 0
        for index, ref in enumerate(raw.images):
            data = raw.image_data[index] if raw.image_data is not None else None
            size, num_bytes = _image_size(ref, data, verify_images)
            sizes.append(size)
            total_bytes += num_bytes
        encoded = encode_sample_text(tokenizer, raw.messages, sizes, kind, image_config)
        patches = patches_sq = 0
        for width, height in sizes:
            _, grid_h, grid_w = image_grid(height, width, image_config)
            patches += grid_h * grid_w
            patches_sq += (grid_h * grid_w) ** 2
        if len(encoded) > seq_len:
            raise BadSample(TOO_LONG, f"{len(encoded)} tokens > --seq-len {seq_len}")
    except ImageError as error:  # degenerate sizes from smart_resize
        raise corrupt_image_error(raw.images[0], str(error)).at(raw.origin) from error
    except BadSample as error:
        raise error.at(raw.origin) from None
    return MeasuredSample(
        source=raw.source,
        record=raw.record,
        loc=raw.loc,
        length=len(encoded),
        num_patches=patches,
        patches_sq=patches_sq,
        image_bytes=total_bytes,
    )
