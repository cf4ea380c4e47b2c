"""Token length of a raw sample: the exact code path training uses (chat template, label rules,
image token counts from the resized size), with image sizes read from file headers; a video's
frames and frame size from the release's rule (:mod:`.video`), its frames counted by decoding
it (:func:`video_plan`). What was measured of a video (:class:`MeasuredVideo`) is kept, so that
the write phase takes the same frames without decoding it again (:func:`replan_video`)."""

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
from .sources import ImageRef, RawSample, VideoRef, corrupt_image_error, corrupt_video_error
from .tokenizer import Tokenizer
from .video import (
    DEFAULT_VIDEO_CONFIG,
    VideoConfig,
    VideoError,
    VideoPlan,
    plan_frame_list,
    plan_video,
    probe_video,
)


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
    image_bytes: int  # encoded bytes of its images (and videos)
    videos: int = 0  # its videos
    frames: int = 0  # Σ sampled frames over its videos
    #: What was measured of each video, in order (the write phase plans from it).
    measured_videos: tuple[MeasuredVideo, ...] = ()


def encode_sample_text(
    tokenizer: Tokenizer,
    messages: list[Message] | tuple[Message, ...],
    image_sizes: list[tuple[int, int]] | tuple[tuple[int, int], ...],
    kind: str,
    image_config: ImageConfig,
    video_token_counts: list[int] | tuple[int, ...] = (),
) -> EncodedText:
    """Token ids and labels of a sample given its images' original (width, height) and its
    videos' token counts."""
    counts = [image_token_count(height, width, image_config) for width, height in image_sizes]
    return encode_conversation(tokenizer, messages, counts, kind, video_token_counts)


@dataclass(frozen=True)
class MeasuredVideo:
    """One video as measured: what is taken from it, and what it is."""

    plan: VideoPlan
    num_bytes: int  # encoded bytes (the file, or the frame images)
    width: int  # original frame size
    height: int
    total_frames: int  # decoded frames, or frame images
    fps: float | None  # the stream's average frame rate (None for frame images)
    extension: str  # of the video file ("" for frame images)


def replan_video(
    total_frames: int,
    fps: float | None,
    width: int,
    height: int,
    extension: str,
    num_bytes: int,
    config: VideoConfig = DEFAULT_VIDEO_CONFIG,
) -> MeasuredVideo:
    """A :class:`MeasuredVideo` from what was measured of a video (frame count, frame rate or
    ``None`` for frame images, original size): the one rule :func:`video_plan` applies after
    decoding and the write phase applies again without decoding."""
    if fps is None:
        plan = plan_frame_list(total_frames, height, width, config)
    else:
        plan = plan_video(total_frames, fps, height, width, config)
    return MeasuredVideo(plan, num_bytes, width, height, total_frames, fps, extension)


def video_plan(
    ref: VideoRef, data: bytes | None, config: VideoConfig = DEFAULT_VIDEO_CONFIG
) -> MeasuredVideo:
    """Measure one video: a file is decoded to count its frames; frame images are read from
    their headers (every frame's, so a broken one is found here).

    Raises :class:`BadSample` (``corrupt_video`` naming the file, ``missing_video``)."""
    try:
        if ref.file is not None:
            if data is None:
                data = ref.read_bytes()
            info = probe_video(data)
            return replan_video(info.total_frames, info.fps, info.width, info.height,
                                info.extension, len(data), config)  # fmt: skip
        sizes, total = [], 0
        for frame in ref.frames:
            try:
                sizes.append(read_image_size(frame.path))
            except ImageError as error:
                raise VideoError(f"frame image {error}") from error
            total += _file_size(frame.path)
        width, height = sizes[0]
        return replan_video(len(sizes), None, width, height, "", total, config)
    except VideoError as error:
        raise corrupt_video_error(ref, str(error)) from error


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
    video_config: VideoConfig = DEFAULT_VIDEO_CONFIG,
) -> MeasuredSample:
    """Measure one sample; raises :class:`BadSample` located at ``raw.origin``."""
    try:
        videos, total_bytes = [], 0
        for index, video in enumerate(raw.videos):
            data = raw.video_data[index] if raw.video_data is not None else None
            videos.append(video_plan(video, data, video_config))
            total_bytes += videos[-1].num_bytes
        plans = [video.plan for video in videos]
        sizes = []
        for index, ref in enumerate(raw.images):
            data = raw.image_data[index] if raw.image_data is not None else None
            size, num_bytes = _image_size(ref, data, verify_images)
            sizes.append(size)
            total_bytes += num_bytes
        encoded = encode_sample_text(
            tokenizer, raw.messages, sizes, kind, image_config, [p.num_tokens for p in plans]
        )
        patches = patches_sq = 0
        for width, height in sizes:
            _, grid_h, grid_w = image_grid(height, width, image_config)
            patches += grid_h * grid_w
            patches_sq += (grid_h * grid_w) ** 2
        for plan in plans:  # every frame is its own ViT segment
            frames, grid_h, grid_w = plan.grid_thw
            patches += frames * grid_h * grid_w
            patches_sq += frames * (grid_h * grid_w) ** 2
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
        videos=len(plans),
        frames=sum(len(plan.indices) for plan in plans),
        measured_videos=tuple(videos),
    )
