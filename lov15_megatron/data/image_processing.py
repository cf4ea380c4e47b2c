"""Qwen2-VL style image preprocessing (docs/model-reference.md §6), header-only size reading.

The one image-size rule shared by the packer, the task encoder and the exported HF processor
(``lov15_megatron/hf/remote_code/processing_llavaonevision1_5.py`` reads its settings from
:class:`ImageConfig`):

- :func:`cap_longest_side`: optional first step, the longest side scaled down to
  ``max_image_side`` (aspect ratio kept), as the release's stage 2 does before the resize;
- :func:`smart_resize`: target size with height and width multiples of 28 (patch 14 × merge 2),
  aspect ratio kept, pixel count within ``[min_pixels, max_pixels]``. The formula is
  transformers' ``qwen2_vl`` ``smart_resize`` (a test compares the two on every size up to
  1000 × 1000 and on extreme ones); it is written out here because importing transformers'
  image processor costs about 5 s per packer worker (this module imports in 0.1 s);
- :func:`image_token_count`: LM tokens of an image = H·W / 28².
- :func:`preprocess_image`: bicubic resize, rescale 1/255, CLIP normalisation, patchify into
  ``[h·w, 588]`` rows (channel-major 3×14×14) in 2×2-merge order, plus ``grid_thw = (1, h, w)``.
  Equal to transformers' ``Qwen2VLImageProcessorPil`` (``temporal_patch_size=1``) to float32
  rounding (``tests/test_processor_parity.py``).
- :func:`read_image_size`: (width, height) from the file header (PIL's lazy open, no decoding).

No EXIF orientation is applied anywhere (as in the Qwen2-VL processor): sizes read from headers
and decoded pixels therefore always agree.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PATCH_SIZE = 14
MERGE_SIZE = 2
#: Height/width granularity of resized images: 28 px.
FACTOR = PATCH_SIZE * MERGE_SIZE
#: Values per patch row: 3 channels × 14 × 14.
PATCH_DIM = 3 * PATCH_SIZE * PATCH_SIZE
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Release training defaults: 4·28² … 1600·1600 pixels.
DEFAULT_MIN_PIXELS = 4 * FACTOR * FACTOR
DEFAULT_MAX_PIXELS = 1600 * 1600
#: Qwen2-VL rejects extreme aspect ratios.
MAX_ASPECT_RATIO = 200


class ImageError(ValueError):
    """An image that cannot be used (unreadable, corrupt, degenerate size)."""


@dataclass(frozen=True)
class ImageConfig:
    """Pixel budget of the resize, and the optional longest-side cap applied before it."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Longest side in pixels before the min/max-pixels resize (``None``: no cap).
    max_image_side: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(
                f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}"
            )
        if self.max_pixels < FACTOR * FACTOR:
            raise ValueError(f"max_pixels must be at least {FACTOR * FACTOR}")
        if self.max_image_side is not None and self.max_image_side < FACTOR:
            raise ValueError(f"max_image_side must be at least {FACTOR}, got {self.max_image_side}")


#: The release's training pixel budget.
DEFAULT_IMAGE_CONFIG = ImageConfig()


def cap_longest_side(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(height, width) with the longest side scaled down to ``max_side`` (no-op if shorter).

    The longest side becomes exactly ``max_side``; the other is rounded, at least 1.
    """
    longest = max(height, width)
    if max_side is None or longest <= max_side:
        return height, width
    scale = max_side / longest
    if height >= width:
        return max_side, max(1, round(width * scale))
    return max(1, round(height * scale)), max_side


def smart_resize(
    height: int, width: int, config: ImageConfig = DEFAULT_IMAGE_CONFIG
) -> tuple[int, int]:
    """Resized (height, width): multiples of 28 with H·W in [min_pixels, max_pixels].

    ``height``/``width`` are the original size; ``config.max_image_side`` is applied first.
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"degenerate image size {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"aspect ratio of {width}x{height} exceeds {MAX_ASPECT_RATIO}:1 (Qwen2-VL limit)"
        )
    height, width = cap_longest_side(height, width, config.max_image_side)
    # transformers' qwen2_vl smart_resize from here on (h_bar may round to 0: the pixel count
    # is then below min_pixels and the branch below scales it up).
    h_bar = round(height / FACTOR) * FACTOR
    w_bar = round(width / FACTOR) * FACTOR
    if h_bar * w_bar > config.max_pixels:
        beta = math.sqrt(height * width / config.max_pixels)
        h_bar = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
        w_bar = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    elif h_bar * w_bar < config.min_pixels:
        beta = math.sqrt(config.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / FACTOR) * FACTOR
        w_bar = math.ceil(width * beta / FACTOR) * FACTOR
    return h_bar, w_bar


def image_grid(
    height: int, width: int, config: ImageConfig = DEFAULT_IMAGE_CONFIG
) -> tuple[int, int, int]:
    """``(t, h, w)`` patch grid of an image of the given original size (t = 1)."""
    h_bar, w_bar = smart_resize(height, width, config)
    return 1, h_bar // PATCH_SIZE, w_bar // PATCH_SIZE


def image_token_count(height: int, width: int, config: ImageConfig = DEFAULT_IMAGE_CONFIG) -> int:
    """LM tokens (``<|image_pad|>`` count) of an image: H·W / 28² of the resized size."""
    h_bar, w_bar = smart_resize(height, width, config)
    return (h_bar // FACTOR) * (w_bar // FACTOR)


def read_image_size(source: bytes | str | Path) -> tuple[int, int]:
    """(width, height) of an encoded image from its header, without decoding the pixels.

    Raises :class:`ImageError` (naming the file when given a path) if it is not an image.
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as error:
        raise ImageError(f"{name}: cannot open image: {error}") from error
    try:
        with stream, Image.open(stream) as image:
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"{name}: not a readable image: {error}") from error
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: degenerate image size {width}x{height}")
    return width, height


def image_format_extension(data: bytes) -> str:
    """File extension for encoded image bytes from their header (``jpg``, ``png``, ``webp``…)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = (image.format or "").lower()
    except (OSError, ValueError) as error:
        raise ImageError(f"not a readable image: {error}") from error
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt or "bin")


def decode_image(data: bytes) -> Image.Image:
    """Fully decode encoded image bytes into an RGB PIL image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"corrupt image: {error}") from error


def patchify(pixels: np.ndarray) -> np.ndarray:
    """``[3, H, W]`` → ``[(H/14)·(W/14), 588]`` rows in 2×2-merge order.

    The order is the one of docs/model-reference.md §2.

    Row order nests (block_row, block_col, in_row, in_col); each row is (3, 14, 14) flattened.
    """
    channels, height, width = pixels.shape
    gh, gw = height // PATCH_SIZE, width // PATCH_SIZE
    if height % FACTOR or width % FACTOR:
        raise ValueError(f"image size {width}x{height} is not a multiple of {FACTOR}")
    x = pixels.reshape(
        channels, gh // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE, gw // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE
    )
    # (c, br, ir, pr, bc, ic, pc) -> (br, bc, ir, ic, c, pr, pc)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)
    return np.ascontiguousarray(x.reshape(gh * gw, channels * PATCH_SIZE * PATCH_SIZE))


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision tower."""

    pixel_values: np.ndarray  # [h·w, 588] float32
    grid_thw: tuple[int, int, int]  # (1, h, w) in patches of 14 px

    @property
    def num_tokens(self) -> int:
        """LM tokens after the 2×2 merge."""
        return self.grid_thw[1] * self.grid_thw[2] // (MERGE_SIZE * MERGE_SIZE)


def preprocess_image(
    image: Image.Image | bytes, config: ImageConfig = DEFAULT_IMAGE_CONFIG
) -> ProcessedImage:
    """Resize (bicubic), rescale, CLIP-normalise and patchify one image."""
    if isinstance(image, bytes):
        image = decode_image(image)
    elif image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    h_bar, w_bar = smart_resize(height, width, config)
    capped_h, capped_w = cap_longest_side(height, width, config.max_image_side)
    if (capped_w, capped_h) != (width, height):  # the cap is its own resize, as in the release
        image = image.resize((capped_w, capped_h), resample=Image.Resampling.BICUBIC)
        width, height = capped_w, capped_h
    if (w_bar, h_bar) != (width, height):
        image = image.resize((w_bar, h_bar), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32) * (1.0 / 255.0)  # [H, W, 3]
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    pixels = ((pixels - mean) / std).transpose(2, 0, 1)  # [3, H, W]
    return ProcessedImage(
        pixel_values=patchify(pixels), grid_thw=(1, h_bar // PATCH_SIZE, w_bar // PATCH_SIZE)
    )
