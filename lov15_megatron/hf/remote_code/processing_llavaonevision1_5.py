"""Processor of the Hugging Face-side LLaVA-OneVision-1.5 model: image processor + tokenizer.

Self-contained on purpose: this file is copied next to exported weights and loaded by
``AutoProcessor.from_pretrained(dir, trust_remote_code=True)`` (``auto_map`` in
``processor_config.json`` and ``preprocessor_config.json``), so it imports only
``transformers`` and ``numpy`` (PIL is used through transformers).

- :class:`LLaVAOneVision1_5_ImageProcessor`: transformers' ``Qwen2VLImageProcessorPil`` (PIL
  and NumPy only: no torchvision) with the settings of LLaVA-OneVision-1.5 (patch 14, merge 2,
  ``temporal_patch_size`` 1, CLIP mean/std, the run's ``min_pixels``/``max_pixels``) and one
  addition: ``max_image_side``, the longest side scaled down to that many pixels before the
  min/max-pixels resize (the release's stage 2 uses 1000). ``min_pixels``/``max_pixels``
  passed to ``from_pretrained`` replace the saved ones, as with Qwen2-VL.
- :class:`LLaVAOneVision1_5_Processor`: the image processor and the tokenizer, no video
  processor (transformers' Qwen2/2.5-VL processors insist on loading one, and every video
  processor needs torchvision). ``<|image_pad|>`` in the text is expanded to ``h·w/4`` copies
  per image; the output has ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (as the
  Qwen2-VL processors return), ``pixel_values`` ``[Σ h·w, 588]`` and ``image_grid_thw``.

The pixels equal ``lov15_megatron.data.image_processing.preprocess_image`` (the training
pipeline) to float32 rounding; ``tests/test_processor_parity.py`` holds both to that.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorKwargs,
    Qwen2VLImageProcessorPil,
)
from transformers.processing_utils import ProcessorMixin

#: The release's training pixel budget (docs/model-reference.md §6): 4·28² … 1600·1600.
DEFAULT_MIN_PIXELS = 4 * 28 * 28
DEFAULT_MAX_PIXELS = 1600 * 1600
IMAGE_TOKEN = "<|image_pad|>"


class ImageTokenMismatchError(ValueError):
    """The text holds another number of image placeholders than there are images."""


class LLaVAOneVision1_5_ImageProcessorKwargs(Qwen2VLImageProcessorKwargs, total=False):
    r"""
    max_image_side (`int`, *optional*):
        Longest side (pixels) an image is scaled down to before the min/max-pixels resize.
    """

    max_image_side: int | None


def cap_longest_side(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(height, width) with the longest side scaled down to ``max_side`` (no-op if shorter).

    The same rule as ``lov15_megatron.data.image_processing.cap_longest_side``.
    """
    longest = max(height, width)
    if max_side is None or longest <= max_side:
        return height, width
    scale = max_side / longest
    if height >= width:
        return max_side, max(1, round(width * scale))
    return max(1, round(height * scale)), max_side


class LLaVAOneVision1_5_ImageProcessor(Qwen2VLImageProcessorPil):
    """``Qwen2VLImageProcessorPil`` with LLaVA-OneVision-1.5's settings and a longest-side cap."""

    size = {"shortest_edge": DEFAULT_MIN_PIXELS, "longest_edge": DEFAULT_MAX_PIXELS}
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    patch_size = 14
    temporal_patch_size = 1
    merge_size = 2
    max_image_side: int | None = None
    valid_kwargs = LLaVAOneVision1_5_ImageProcessorKwargs
    model_input_names = ["pixel_values", "image_grid_thw"]

    def _preprocess(self, images: list[np.ndarray], **kwargs: Any):
        max_side = kwargs.pop("max_image_side", None)
        if max_side is not None and kwargs.get("do_resize", True):
            images = [self._cap(image, max_side, kwargs.get("resample")) for image in images]
        return super()._preprocess(images, **kwargs)

    def _cap(self, image: np.ndarray, max_side: int, resample: Any) -> np.ndarray:
        """Scale a channel-first image so that its longest side is at most ``max_side``."""
        height, width = image.shape[-2:]
        new_height, new_width = cap_longest_side(height, width, max_side)
        if (new_height, new_width) == (height, width):
            return image
        return super(Qwen2VLImageProcessorPil, self).resize(
            image, SizeDict(height=new_height, width=new_width), resample=resample
        )

    def get_number_of_image_patches(
        self, height: int, width: int, images_kwargs: dict | None = None
    ) -> int:
        """Patches (h·w) of an image of this original size, the cap included."""
        images_kwargs = images_kwargs or {}
        max_side = images_kwargs.get("max_image_side", self.max_image_side)
        height, width = cap_longest_side(height, width, max_side)
        return super().get_number_of_image_patches(height, width, images_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Serialise under this class's name (the PIL base class would drop a ``Pil`` suffix)."""
        output = super().to_dict()
        output["image_processor_type"] = type(self).__name__
        output["max_image_side"] = self.max_image_side
        return output


class LLaVAOneVision1_5_Processor(ProcessorMixin):
    """Image processor + tokenizer of LLaVA-OneVision-1.5 (images only, no video processor)."""

    return_mm_token_type_ids = True

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def validate_inputs(self, images: Any = None, text: Any = None, **kwargs: Any) -> None:
        """Count ``<|image_pad|>`` placeholders against images; raise a named error."""
        if text is not None and isinstance(text, list) and all(isinstance(t, str) for t in text):
            counts = [sample.count(self.image_token) for sample in text]
            if images is None:
                n_images = 0
            elif isinstance(images, list | tuple):
                n_images = sum(len(i) if isinstance(i, list | tuple) else 1 for i in images)
            else:
                n_images = 1
            if sum(counts) != n_images:
                raise ImageTokenMismatchError(
                    f"the text holds {sum(counts)} image placeholders ({self.image_token}; per "
                    f"sample {counts}) but {n_images} images were given"
                )
        super().validate_inputs(images=images, text=text, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        merge_length = self.image_processor.merge_size**2
        grid = image_inputs["image_grid_thw"][image_idx]
        return self.image_token * (int(grid.prod()) // merge_length)

    def post_process_image_text_to_text(
        self,
        generated_outputs: Any,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> list[str]:
        """Decode generated token ids (as Qwen2-VL's processor does)."""
        return self.tokenizer.batch_decode(
            generated_outputs,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    @property
    def model_input_names(self) -> list[str]:
        return [*super().model_input_names, "mm_token_type_ids"]


__all__ = [
    "ImageTokenMismatchError",
    "LLaVAOneVision1_5_ImageProcessor",
    "LLaVAOneVision1_5_Processor",
    "cap_longest_side",
]
