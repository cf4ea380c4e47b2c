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
  processor object (transformers' Qwen2/2.5-VL processors insist on loading one, and every video
  processor needs torchvision): videos are read here (:func:`process_video`). ``<|image_pad|>``
  in the text is expanded to ``h·w/4`` copies per image and ``<|video_pad|>`` to ``t·h·w/4``
  per video; the output has ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (1 at image,
  2 at video tokens, as the Qwen2-VL processors return), ``pixel_values`` ``[Σ h·w, 588]`` and
  ``image_grid_thw``, and with videos ``pixel_values_videos`` ``[Σ t·h·w, 588]`` and
  ``video_grid_thw`` rows ``[t, h, w]``.

Videos follow the release's training rule (its ``_reisize_video`` over Qwen's ``smart_nframes``
and ``smart_resize``; ``docs/data-reference.md`` §5), the same rule as the training pipeline's
``lov15_megatron.data.video``: ``t = total_frames / video_fps · fps`` clamped to ``[min_frames,
max_frames]`` and to the frame count, floored to even; frames ``linspace(0, total - 1, t)``
rounded; every frame resized (bicubic) by ``smart_resize`` (factor 28) within
``[int(1.05 · frame_min_pixels), min(frame_max_pixels, video_max_pixels / t · 2)]``. A video is a
file path or its bytes (decoded with PyAV, imported only then: ``pip install av``), a folder of
frame images, or a list of frames (PIL images or ``[H, W, 3]`` arrays; all taken, the last
repeated to an even count). The sampling settings are the processor's attributes: the
release's defaults, or what ``processor_config.json`` holds (an export of a run that trained on
packed videos carries the packer's settings there, so that the processor samples as training
did), or ``from_pretrained(…, frame_min_pixels=…)``; they may also be passed per call (``fps=…``,
``max_frames=…``, ``frame_min_pixels=…``, ``frame_max_pixels=…``, ``video_max_pixels=…``,
``min_frames=…``).

The pixels equal ``lov15_megatron.data.image_processing.preprocess_image`` (the training
pipeline) to float32 rounding; ``tests/test_processor_parity.py`` holds both to that, and
``tests/test_video_model.py`` the video pixels to the training pipeline's.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from transformers.feature_extraction_utils import BatchFeature
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
VIDEO_TOKEN = "<|video_pad|>"
#: The release's video sampling defaults (``--fps``, ``--fps-min-frames``, ``--fps-max-frames``,
#: ``--frame-min-pixels``, ``--frame-max-pixels``, ``--video-max-pixels``).
VIDEO_DEFAULTS: dict[str, float | int] = {
    "fps": 2.0,
    "min_frames": 4,
    "max_frames": 768,
    "frame_min_pixels": 128 * 28 * 28,
    "frame_max_pixels": 768 * 28 * 28,
    "video_max_pixels": 65536 * 28 * 28,
}
FRAME_FACTOR = 2  # frame counts are multiples of 2
FACTOR = 28  # patch 14 × merge 2
FRAME_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ImageTokenMismatchError(ValueError):
    """The text holds another number of image placeholders than there are images."""


class VideoError(ValueError):
    """A video that cannot be read (undecodable, too few frames, a placeholder count mismatch)."""


# ------------------------------------------------------------------------------ video rule


def smart_nframes(total_frames: int, video_fps: float, settings: dict[str, Any]) -> int:
    """Frames sampled from ``total_frames`` decoded frames at ``video_fps`` (module docstring)."""
    if total_frames <= 0 or not video_fps > 0:
        raise VideoError(f"no frames to sample ({total_frames} frames at {video_fps} fps)")
    min_frames = math.ceil(settings["min_frames"] / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(settings["max_frames"] / FRAME_FACTOR) * FRAME_FACTOR
    wanted = total_frames / video_fps * settings["fps"]
    nframes = min(min(max(wanted, min_frames), max_frames), total_frames)
    nframes = math.floor(nframes / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise VideoError(f"{total_frames} decoded frame(s): need at least {FRAME_FACTOR}")
    return nframes


def frame_indices(total_frames: int, nframes: int) -> list[int]:
    """``torch.linspace(0, total_frames - 1, nframes).round()`` (float32, ties to even)."""
    import torch

    return torch.linspace(0, total_frames - 1, nframes).round().long().tolist()


def frame_size(height: int, width: int, nframes: int, settings: dict[str, Any]) -> tuple[int, int]:
    """Qwen's ``smart_resize`` (factor 28) within the per-frame budget for ``nframes`` frames."""
    if height <= 0 or width <= 0 or max(height, width) / min(height, width) > 200:
        raise VideoError(f"frame size {width}x{height}: degenerate or aspect ratio over 200:1")
    min_pixels = int(settings["frame_min_pixels"] * 1.05)
    max_pixels = min(
        settings["frame_max_pixels"], settings["video_max_pixels"] / nframes * FRAME_FACTOR
    )
    h_bar = max(FACTOR, round(height / FACTOR) * FACTOR)
    w_bar = max(FACTOR, round(width / FACTOR) * FACTOR)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
        w_bar = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / FACTOR) * FACTOR
        w_bar = math.ceil(width * beta / FACTOR) * FACTOR
    return h_bar, w_bar


def _decode(source: bytes | str | Path, keep: set[int] | None) -> tuple[int, float, dict]:
    """Decode the first video stream: its decoded frame count (the release counts the frames
    the decoder returns), average frame rate, and the frames at ``keep`` as RGB arrays."""
    try:
        import av
    except ImportError as error:  # pragma: no cover - the training environment has it
        raise VideoError("reading video files needs PyAV: pip install av") from error
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    stream_source = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    total, kept = 0, {}
    try:
        with av.open(stream_source, mode="r") as container:
            if not container.streams.video:
                raise VideoError(f"{name}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            for frame in container.decode(stream):
                if keep is not None and total in keep:
                    kept[total] = frame.to_ndarray(format="rgb24")
                total += 1
    except (av.FFmpegError, OSError, EOFError) as error:
        raise VideoError(f"{name}: not a decodable video: {error}") from error
    if not total:
        raise VideoError(f"{name}: no decodable frames")
    if not rate:
        raise VideoError(f"{name}: no frame rate in the video stream")
    return total, float(rate), kept


def _resize(frames: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """``[n, height, width, 3]`` uint8: every frame resized bicubic (PIL, antialiased)."""
    from PIL import Image

    out = []
    for frame in frames:
        if frame.shape[:2] != (height, width):
            image = Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC)
            frame = np.asarray(image)
        out.append(frame)
    return np.stack(out)


def _frame_list(video: Any) -> list[np.ndarray]:
    """Frames given as images: a folder of frame images (natural order of names) or a list of
    PIL images / ``[H, W, 3]`` arrays, as uint8 RGB arrays."""
    from PIL import Image

    if isinstance(video, str | Path):
        folder = Path(video)

        def natural(path: Path) -> list[Any]:
            return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]

        files = [
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_IMAGE_SUFFIXES
        ]
        if not files:
            raise VideoError(f"{folder}: no frame images ({', '.join(FRAME_IMAGE_SUFFIXES)})")
        video = [Image.open(p) for p in sorted(files, key=natural)]
    frames = []
    for frame in video:
        if isinstance(frame, Image.Image):
            frame = np.asarray(frame.convert("RGB"))
        frames.append(np.asarray(frame, dtype=np.uint8))
    return frames


def sample_video(video: Any, settings: dict[str, Any]) -> np.ndarray:
    """The sampled, resized frames ``[t, H, W, 3]`` uint8 of one video (module docstring)."""
    if isinstance(video, bytes) or (isinstance(video, str | Path) and not Path(video).is_dir()):
        total, fps, _ = _decode(video, None)
        indices = frame_indices(total, smart_nframes(total, fps, settings))
        _, _, kept = _decode(video, set(indices))
        if len(kept) != len(set(indices)):
            raise VideoError("the video gave fewer frames on its second decoding")
        chosen = [kept[i] for i in indices]
    else:
        frames = _frame_list(video)
        if not frames:
            raise VideoError("a video given as frames has none")
        count = len(frames)
        if count > settings["max_frames"]:
            max_frames = math.floor(settings["max_frames"] / FRAME_FACTOR) * FRAME_FACTOR
            indices = frame_indices(count, max_frames)
        else:
            indices = list(range(count)) + [count - 1] * (count % FRAME_FACTOR)
        chosen = [frames[i] for i in indices]
    height, width = chosen[0].shape[:2]
    return _resize(chosen, *frame_size(height, width, len(chosen), settings))


def patchify_frames(frames: np.ndarray, mean: Any, std: Any, patch: int = 14, merge: int = 2):
    """``[t, H, W, 3]`` uint8 → ``[t·(H/14)·(W/14), 588]`` float32: each frame rescaled by 1/255,
    normalised and cut into channel-major patches in 2x2-merge order, frame after frame."""
    mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    rows = []
    for frame in frames:
        pixels = (np.asarray(frame, dtype=np.float32) * (1.0 / 255.0) - mean) / std
        x = pixels.transpose(2, 0, 1)
        c, height, width = x.shape
        gh, gw = height // patch, width // patch
        x = x.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6).reshape(gh * gw, c * patch * patch)
        rows.append(np.ascontiguousarray(x))
    return np.concatenate(rows)


def _flat_videos(videos: Any) -> list[Any]:
    """The videos of a (possibly per-sample nested) ``videos`` argument, in order. A list whose
    items are all frames (PIL images, ``[H, W, 3]`` arrays) is one video."""
    from PIL import Image

    def is_frame(item: Any) -> bool:
        return isinstance(item, Image.Image) or (isinstance(item, np.ndarray) and item.ndim == 3)

    if isinstance(videos, str | Path | bytes) or (
        isinstance(videos, np.ndarray) and videos.ndim == 4
    ):
        return [videos]
    if isinstance(videos, list | tuple):
        if videos and all(is_frame(item) for item in videos):
            return [list(videos)]
        return [video for item in videos for video in _flat_videos(item)]
    raise VideoError(f"a video must be a path, bytes or a list of frames, got {type(videos)}")


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
    """Image processor + tokenizer of LLaVA-OneVision-1.5; videos are read by the processor
    itself (module docstring), with the release's sampling defaults below."""

    return_mm_token_type_ids = True
    fps: float = float(VIDEO_DEFAULTS["fps"])
    min_frames: int = int(VIDEO_DEFAULTS["min_frames"])
    max_frames: int = int(VIDEO_DEFAULTS["max_frames"])
    frame_min_pixels: int = int(VIDEO_DEFAULTS["frame_min_pixels"])
    frame_max_pixels: int = int(VIDEO_DEFAULTS["frame_max_pixels"])
    video_max_pixels: int = int(VIDEO_DEFAULTS["video_max_pixels"])

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        fps: float | None = None,
        min_frames: int | None = None,
        max_frames: int | None = None,
        frame_min_pixels: int | None = None,
        frame_max_pixels: int | None = None,
        video_max_pixels: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Named arguments (not **kwargs): ProcessorMixin passes a processor_config.json key to
        # __init__ only when it is one, and saves the attributes named here.
        settings = {
            "fps": fps,
            "min_frames": min_frames,
            "max_frames": max_frames,
            "frame_min_pixels": frame_min_pixels,
            "frame_max_pixels": frame_max_pixels,
            "video_max_pixels": video_max_pixels,
        }
        for name, value in settings.items():
            default = VIDEO_DEFAULTS[name]
            setattr(self, name, type(default)(default if value is None else value))
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        # No ``video_token`` attribute: ProcessorMixin would look for a video processor object.
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def process_video(self, video: Any, **settings: Any) -> tuple[np.ndarray, list[int]]:
        """One video's ``pixel_values_videos`` rows and its ``[t, h, w]`` (module docstring);
        ``settings`` override the processor's sampling attributes."""
        rule = {name: settings.get(name, getattr(self, name)) for name in VIDEO_DEFAULTS}
        frames = sample_video(video, rule)
        patch = self.image_processor.patch_size
        pixels = patchify_frames(
            frames,
            self.image_processor.image_mean,
            self.image_processor.image_std,
            patch,
            self.image_processor.merge_size,
        )
        t, height, width = frames.shape[:3]
        return pixels, [t, height // patch, width // patch]

    def __call__(
        self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any
    ) -> BatchFeature:
        """Images and text as ``ProcessorMixin`` does; videos read here: each ``<|video_pad|>``
        of the text (in order, over the batch) expanded to its video's ``t·h·w/4`` tokens."""
        settings = {name: kwargs.pop(name) for name in VIDEO_DEFAULTS if name in kwargs}
        kwargs.pop("do_sample_frames", None)  # frames are always sampled by the release's rule
        if videos is None:
            return super().__call__(images=images, text=text, **kwargs)
        flat = _flat_videos(videos)
        texts = [text] if isinstance(text, str) else list(text or [])
        counts = [sample.count(VIDEO_TOKEN) for sample in texts]
        if sum(counts) != len(flat):
            raise VideoError(
                f"the text holds {sum(counts)} video placeholders ({VIDEO_TOKEN}; per sample "
                f"{counts}) but {len(flat)} videos were given"
            )
        processed = [self.process_video(video, **settings) for video in flat]
        merge = self.image_processor.merge_size**2
        expanded, next_video = [], 0
        for sample in texts:
            pieces = sample.split(VIDEO_TOKEN)
            out = pieces[0]
            for piece in pieces[1:]:
                t, h, w = processed[next_video][1]
                out += VIDEO_TOKEN * (t * h * w // merge) + piece
                next_video += 1
            expanded.append(out)
        return_tensors = kwargs.get("return_tensors")
        result = super().__call__(images=images, text=expanded, **kwargs)
        data = dict(result)
        data["pixel_values_videos"] = np.concatenate([pixels for pixels, _ in processed])
        data["video_grid_thw"] = np.asarray([grid for _, grid in processed], dtype=np.int64)
        return BatchFeature(data, tensor_type=return_tensors)

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
    "VIDEO_DEFAULTS",
    "ImageTokenMismatchError",
    "VideoError",
    "LLaVAOneVision1_5_ImageProcessor",
    "LLaVAOneVision1_5_Processor",
    "cap_longest_side",
]
