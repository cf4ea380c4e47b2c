"""Video frame sampling and decoding: the one video rule of the packer, the task encoder and the
HF processor (as :mod:`.image_processing` is the one image rule).

The rule is the release's training rule (its ``qwen2vl_task_encoder._reisize_video`` with the
defaults of its ``train/arguments.py``, over Qwen's ``smart_nframes`` and ``smart_resize``):

- :func:`smart_nframes`: ``n = total_frames / video_fps · fps``, clamped to
  ``[min_frames, max_frames]`` (min rounded up, max down to a multiple of 2), then to
  ``total_frames``, then rounded *down* to a multiple of 2; fewer than 2 frames is an error;
- :func:`frame_indices`: ``torch.linspace(0, total_frames - 1, n).round()`` (float32, ties to
  even, as the release computes them) over the decoded frames;
- :func:`frame_size`: every frame resized (bicubic, antialiased) to the same multiple-of-28 size
  with Qwen's ``smart_resize`` within ``[int(1.05 · frame_min_pixels),
  min(frame_max_pixels, video_max_pixels / n · 2)]`` pixels;
- tokens: ``n · (H/28) · (W/28)`` ``<|video_pad|>`` tokens, ``grid_thw = (n, H/14, W/14)``
  (temporal patch size 1: every frame is its own ViT segment).

Frames given as images (a list or a folder, :func:`plan_frame_list`) have no frame rate: all are
taken, the last repeated once if their count is odd (Qwen's rule for frame lists), sampled down
by the same ``linspace`` to ``max_frames`` if there are more; they get the same pixel budget as a
video's frames, and the first frame's size sets everyone's.

Decoding is PyAV (FFmpeg's decoders, wheels with FFmpeg inside, no tie to a torch version): the
frame count is the number of frames the decoder returns, the frame rate the stream's average
rate, as the release's Energon/torchvision reader sees them.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .image_processing import FACTOR, MAX_ASPECT_RATIO, PATCH_SIZE

#: The release's defaults (``--fps``, ``--fps-min-frames``, ``--fps-max-frames``,
#: ``--frame-min-pixels``, ``--frame-max-pixels``, ``--video-max-pixels``).
DEFAULT_FPS = 2.0
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768
DEFAULT_FRAME_MIN_PIXELS = 128 * FACTOR * FACTOR
DEFAULT_FRAME_MAX_PIXELS = 768 * FACTOR * FACTOR
DEFAULT_VIDEO_MAX_PIXELS = 65536 * FACTOR * FACTOR
#: Frame counts are multiples of this (Qwen's ``FRAME_FACTOR``).
FRAME_FACTOR = 2
#: The release raises the frame pixel floor by 5 % before the resize.
MIN_PIXELS_MARGIN = 1.05
#: File suffixes read as frame images inside a frame folder.
FRAME_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class VideoError(ValueError):
    """A video that cannot be used (undecodable, no video stream, too few frames…)."""


@dataclass(frozen=True)
class VideoConfig:
    """Frame sampling and pixel budget of videos (the release's flags and defaults)."""

    fps: float = DEFAULT_FPS
    min_frames: int = DEFAULT_MIN_FRAMES
    max_frames: int = DEFAULT_MAX_FRAMES
    frame_min_pixels: int = DEFAULT_FRAME_MIN_PIXELS
    frame_max_pixels: int = DEFAULT_FRAME_MAX_PIXELS
    video_max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError(f"--fps: must be positive, got {self.fps}")
        if not FRAME_FACTOR <= self.min_frames <= self.max_frames:
            raise ValueError(
                f"--fps-min-frames/--fps-max-frames: need {FRAME_FACTOR} <= min <= max, got "
                f"{self.min_frames}, {self.max_frames}"
            )
        if not 0 < self.frame_min_pixels <= self.frame_max_pixels:
            raise ValueError(
                "--frame-min-pixels/--frame-max-pixels: need 0 < min <= max, got "
                f"{self.frame_min_pixels}, {self.frame_max_pixels}"
            )
        if self.video_max_pixels < FACTOR * FACTOR:
            raise ValueError(f"--video-max-pixels: must be at least {FACTOR * FACTOR}")


DEFAULT_VIDEO_CONFIG = VideoConfig()


@dataclass(frozen=True)
class VideoPlan:
    """What is taken from one video: which decoded frames, at what size."""

    indices: tuple[int, ...]  # into the decoded frames (or the frame images), may repeat
    height: int  # resized, multiple of 28
    width: int

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """``(frames, h, w)`` in 14-px patches."""
        return len(self.indices), self.height // PATCH_SIZE, self.width // PATCH_SIZE

    @property
    def num_tokens(self) -> int:
        """``<|video_pad|>`` tokens: frames × merged patches per frame."""
        return len(self.indices) * (self.height // FACTOR) * (self.width // FACTOR)

    @property
    def num_patches(self) -> int:
        """ViT patches Σ over frames of h·w."""
        _, h, w = self.grid_thw
        return len(self.indices) * h * w


def _floor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def _ceil(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def smart_nframes(
    total_frames: int, video_fps: float, config: VideoConfig = DEFAULT_VIDEO_CONFIG
) -> int:
    """Number of frames sampled from a video of ``total_frames`` decoded frames at
    ``video_fps`` (Qwen's ``smart_nframes`` with the release's explicit min/max frames)."""
    if total_frames <= 0 or not video_fps > 0:
        raise VideoError(f"no frames to sample ({total_frames} frames at {video_fps} fps)")
    min_frames = _ceil(config.min_frames, FRAME_FACTOR)
    max_frames = _floor(config.max_frames, FRAME_FACTOR)
    wanted = total_frames / video_fps * config.fps
    nframes = _floor(min(min(max(wanted, min_frames), max_frames), total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= nframes <= total_frames:
        raise VideoError(f"{total_frames} decoded frame(s): need at least {FRAME_FACTOR}")
    return nframes


def frame_indices(total_frames: int, nframes: int) -> tuple[int, ...]:
    """``torch.linspace(0, total_frames - 1, nframes).round()``: the release's sampled frames.

    Computed with torch itself: its float32 linspace and round-half-to-even decide ties."""
    import torch

    values = torch.linspace(0, total_frames - 1, nframes).round().long()
    return tuple(int(value) for value in values.tolist())


def frame_size(
    height: int, width: int, nframes: int, config: VideoConfig = DEFAULT_VIDEO_CONFIG
) -> tuple[int, int]:
    """Resized (height, width) of every frame (Qwen's ``smart_resize``, factor 28, within the
    release's per-frame budget for ``nframes`` frames)."""
    if height <= 0 or width <= 0:
        raise VideoError(f"degenerate frame size {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise VideoError(f"aspect ratio of {width}x{height} exceeds {MAX_ASPECT_RATIO}:1")
    min_pixels = int(config.frame_min_pixels * MIN_PIXELS_MARGIN)
    max_pixels = min(config.frame_max_pixels, config.video_max_pixels / nframes * FRAME_FACTOR)
    h_bar = max(FACTOR, round(height / FACTOR) * FACTOR)
    w_bar = max(FACTOR, round(width / FACTOR) * FACTOR)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(FACTOR, _floor(height / beta, FACTOR))
        w_bar = max(FACTOR, _floor(width / beta, FACTOR))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil(height * beta, FACTOR)
        w_bar = _ceil(width * beta, FACTOR)
    return h_bar, w_bar


def plan_video(
    total_frames: int,
    video_fps: float,
    height: int,
    width: int,
    config: VideoConfig = DEFAULT_VIDEO_CONFIG,
) -> VideoPlan:
    """The frames and size taken from a decoded video (the release's rule)."""
    nframes = smart_nframes(total_frames, video_fps, config)
    return VideoPlan(
        frame_indices(total_frames, nframes), *frame_size(height, width, nframes, config)
    )


def plan_frame_list(
    count: int, height: int, width: int, config: VideoConfig = DEFAULT_VIDEO_CONFIG
) -> VideoPlan:
    """The frames and size taken from ``count`` frame images (see the module docstring)."""
    if count <= 0:
        raise VideoError("no frame images")
    if count > config.max_frames:
        indices = frame_indices(count, _floor(config.max_frames, FRAME_FACTOR))
    else:
        indices = tuple(range(count)) + (count - 1,) * (_ceil(count, FRAME_FACTOR) - count)
    return VideoPlan(indices, *frame_size(height, width, len(indices), config))


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class VideoInfo:
    """What sampling needs from a video file: decoded frame count, frame rate, frame size."""

    total_frames: int
    fps: float
    width: int
    height: int
    #: File extension of its container format (``mp4``, ``mkv``, ``avi``…).
    extension: str = "mp4"


def container_extension(format_name: str) -> str:
    """A file extension for an FFmpeg demuxer name (``mov,mp4,m4a,3gp,3g2,mj2`` → ``mp4``)."""
    names = format_name.split(",")
    for preferred in ("mp4", "webm", "avi", "flv"):
        if preferred in names:
            return preferred
    return {"matroska": "mkv"}.get(names[0], names[0] or "bin")


def _open(source: bytes | str | Path) -> object:
    import av

    stream = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    return av.open(stream, mode="r")


def _name(source: bytes | str | Path) -> str:
    return "<bytes>" if isinstance(source, bytes) else str(source)


def _decoded(source: bytes | str | Path) -> Iterator[tuple[float, str, object]]:
    """``(average frame rate, container format, frame)`` for every decoded frame of the first
    video stream; every decoder error is a :class:`VideoError` naming the source."""
    import av

    name = _name(source)
    try:
        with _open(source) as container:  # type: ignore[attr-defined]
            if not container.streams.video:
                raise VideoError(f"{name}: no video stream")
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # one thread: the packer runs a worker per core
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            fmt = container.format.name
            for frame in container.decode(stream):
                yield fps, fmt, frame
    except (av.FFmpegError, OSError, EOFError) as error:
        raise VideoError(f"{name}: not a decodable video: {error}") from error


def probe_video(source: bytes | str | Path) -> VideoInfo:
    """Decode every frame (without converting it) to count them: the release counts the
    decoded frames. Raises :class:`VideoError` if the file is not a decodable video."""
    total, fps, width, height, fmt = 0, 0.0, 0, 0, ""
    for rate, name, frame in _decoded(source):
        if total == 0:
            width, height = frame.width, frame.height  # type: ignore[attr-defined]
            fps, fmt = rate, name
        total += 1
    if total == 0:
        raise VideoError(f"{_name(source)}: no decodable frames")
    if not fps > 0:
        raise VideoError(f"{_name(source)}: no frame rate in the video stream")
    return VideoInfo(total, fps, width, height, container_extension(fmt))


def decode_frames(source: bytes | str | Path, indices: Sequence[int]) -> np.ndarray:
    """The decoded frames at ``indices`` (may repeat) as ``[n, H, W, 3]`` uint8 RGB."""
    wanted = set(indices)
    last = max(indices)
    kept: dict[int, np.ndarray] = {}
    for position, (_, _, frame) in enumerate(_decoded(source)):
        if position in wanted:
            kept[position] = frame.to_ndarray(format="rgb24")  # type: ignore[attr-defined]
        if position >= last:
            break
    missing = sorted(wanted - kept.keys())
    if missing:
        raise VideoError(f"{_name(source)}: frame {missing[0]} not decoded (file changed?)")
    return np.stack([kept[index] for index in indices])


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames ``[n, H, W, 3]`` uint8 resized to ``height`` × ``width`` (bicubic; PIL's
    downscaling filter covers the source pixels, i.e. antialiased)."""
    from PIL import Image

    if frames.shape[1:3] == (height, width):
        return frames
    return np.stack(
        [
            np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BICUBIC))
            for f in frames
        ]
    )


def load_video(
    source: bytes | str | Path, config: VideoConfig = DEFAULT_VIDEO_CONFIG
) -> tuple[VideoPlan, np.ndarray]:
    """Probe, plan, decode and resize one video file: its plan and ``[n, h, w, 3]`` frames."""
    info = probe_video(source)
    plan = plan_video(info.total_frames, info.fps, info.height, info.width, config)
    frames = decode_frames(source, plan.indices)
    return plan, resize_frames(frames, plan.height, plan.width)


def list_frame_files(folder: str | Path) -> list[Path]:
    """The frame images of a frame folder, in natural order of their names."""

    def natural(path: Path) -> list[object]:
        return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]

    files = [
        p
        for p in Path(folder).iterdir()
        if p.is_file() and p.suffix.lower() in FRAME_IMAGE_SUFFIXES
    ]
    if not files:
        raise VideoError(f"{folder}: no frame images ({', '.join(FRAME_IMAGE_SUFFIXES)})")
    return sorted(files, key=natural)
