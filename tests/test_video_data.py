"""Videos in the data pipeline: the release's frame sampling rule, PyAV decoding, frame lists and
folders, and the packer packing videos from JSONL, the release's mix WebDataset and parquet with
images and text.

Fixtures are written here from the published facts with PyAV's encoder and PIL, not with our
writers: clips whose frame ``i`` is a flat grey of value ``8·i``, so a decoded frame says which
frame it is. Expected frame counts, indices and sizes are worked out by hand from the release's
rule (``_reisize_video`` over Qwen's ``smart_nframes`` / ``smart_resize``, defaults fps 2, 4…768
frames, 128·28² … min(768·28², 65536·28² / n · 2) pixels, ×1.05 on the floor).
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import image_bytes, pack, read_packs
from PIL import Image

from lov15_megatron.data.video import (
    VideoConfig,
    VideoError,
    decode_frames,
    frame_size,
    load_video,
    plan_frame_list,
    plan_video,
    probe_video,
    smart_nframes,
)

# A 64×48 frame with n ≤ 768 frames: 64·48 = 3072 px is below the floor int(1.05·128·28²) =
# 105369, so it is scaled up by sqrt(105369 / 3072): 48 → ceil(281.1/28)·28 = 308,
# 64 → ceil(374.8/28)·28 = 392; 11 · 14 = 154 merged tokens per frame.
SMALL_FRAME = (308, 392)
TOKENS_PER_SMALL_FRAME = 154


def mp4_bytes(frames: int, fps: int, width: int = 64, height: int = 48, step: int = 8) -> bytes:
    """An MPEG-4 clip (mp4 container, PyAV's encoder) whose frame i is flat grey step·i."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"}
        for index in range(frames):
            pixels = np.full((height, width, 3), step * index, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def grey_png(value: int, width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def which_frames(frames: np.ndarray, step: int = 8) -> list[int]:
    """The clip frame each decoded frame shows (its grey level / step)."""
    return [round(float(frame.mean()) / step) for frame in frames]


# ----------------------------------------------------------------------------- the rule


def hand_nframes(total: int, fps: Fraction, wanted_fps: Fraction = Fraction(2)) -> int:
    """smart_nframes in exact arithmetic: clamp total/fps·2 to [4, 768], then to total, floor
    to even."""
    n = min(min(max(Fraction(total) / fps * wanted_fps, Fraction(4)), Fraction(768)), total)
    return math.floor(n / 2) * 2


def hand_indices(total: int, n: int) -> list[int]:
    """linspace(0, total-1, n) rounded half to even, in exact arithmetic (n even: the points
    i·(total-1)/(n-1) have an odd denominator, so no point is a tie)."""
    return [round(Fraction(i * (total - 1), n - 1)) for i in range(n)]


@pytest.mark.parametrize(
    ("total", "fps", "indices"),
    [
        (30, 10, [0, 6, 12, 17, 23, 29]),  # 3 s at 10 fps: 6 frames
        (10, 10, [0, 3, 6, 9]),  # 1 s: 2 wanted, raised to the minimum 4
        (3, 30, [0, 2]),  # 4 wanted, only 3 decoded: floor(3) to even = 2
        (45, 15, [0, 9, 18, 26, 35, 44]),
        (25, 25, [0, 8, 16, 24]),
    ],
)
def test_frame_count_and_indices_follow_the_release(total, fps, indices):
    plan = plan_video(total, fps, 48, 64)
    assert list(plan.indices) == indices
    assert (plan.height, plan.width) == SMALL_FRAME
    assert plan.grid_thw == (len(indices), 22, 28)
    assert plan.num_tokens == len(indices) * TOKENS_PER_SMALL_FRAME


def test_sampling_rule_against_exact_arithmetic_and_its_limits():
    for total in range(2, 200, 3):
        for fps in (Fraction(1), Fraction(24000, 1001), Fraction(25), Fraction(60)):
            n = hand_nframes(total, fps)
            assert smart_nframes(total, float(fps)) == n, (total, fps)
            assert list(plan_video(total, float(fps), 48, 64).indices) == hand_indices(total, n)
    assert smart_nframes(3000, 1.0) == 768  # 6000 wanted: the maximum
    assert smart_nframes(3000, 1.0, VideoConfig(fps=0.5, max_frames=301)) == 300  # max floored
    with pytest.raises(VideoError, match="at least 2"):
        smart_nframes(1, 30.0)
    with pytest.raises(ValueError, match="fps-min-frames"):
        VideoConfig(min_frames=1)


def test_frame_size_budget_shrinks_with_the_frame_count():
    # 640×360 with 20 frames: 364×644 = 234416 px lies within [105369, 602112]: rounded only.
    assert frame_size(360, 640, 20) == (364, 644)
    # 1920×1080 with 768 frames: max = 65536·784/768·2 = 133802.7 px; beta = sqrt(2073600 /
    # 133802.7) = 3.937: 1080/3.937 = 274.3 → 252, 1920/3.937 = 487.7 → 476.
    assert frame_size(1080, 1920, 768) == (252, 476)
    # ... and with 4 frames the per-frame cap 768·28² = 602112 applies: beta = 1.8558,
    # 1080 → 581.9 → 560, 1920 → 1034.6 → 1008.
    assert frame_size(1080, 1920, 4) == (560, 1008)
    with pytest.raises(VideoError, match="aspect ratio"):
        frame_size(2, 500, 4)


def test_frame_lists_take_every_frame_and_repeat_the_last_to_an_even_count():
    plan = plan_frame_list(5, 48, 64)
    assert list(plan.indices) == [0, 1, 2, 3, 4, 4]
    assert (plan.height, plan.width) == SMALL_FRAME
    assert list(plan_frame_list(4, 48, 64).indices) == [0, 1, 2, 3]
    many = plan_frame_list(11, 48, 64, VideoConfig(max_frames=5))  # above max: linspace to 4
    assert list(many.indices) == hand_indices(11, 4) == [0, 3, 7, 10]


# ----------------------------------------------------------------------------- decoding


def test_decoding_counts_frames_and_returns_the_sampled_ones(tmp_path):
    clip = mp4_bytes(30, 10)
    info = probe_video(clip)
    assert (info.total_frames, info.fps, info.width, info.height) == (30, 10.0, 64, 48)
    assert info.extension == "mp4"
    (tmp_path / "clip.mp4").write_bytes(clip)
    plan, frames = load_video(tmp_path / "clip.mp4")
    assert list(plan.indices) == [0, 6, 12, 17, 23, 29]
    assert frames.shape == (6, *SMALL_FRAME, 3) and frames.dtype == np.uint8
    assert which_frames(frames) == [0, 6, 12, 17, 23, 29]
    assert which_frames(decode_frames(clip, [3, 3, 1])) == [3, 3, 1]


def test_undecodable_videos_are_errors_naming_the_file(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(VideoError, match="broken.mp4: not a decodable video"):
        probe_video(broken)
    truncated = mp4_bytes(30, 10)[:200]
    with pytest.raises(VideoError):
        probe_video(truncated)


# ----------------------------------------------------------------------------- the packer

TURNS = [
    {"from": "human", "value": "<video>\nWhat happens?"},
    {"from": "gpt", "value": "It fades."},
]
# The same question without the video block: the video's sub-sample is this one's length plus
# <|vision_start|> + pads + <|vision_end|> (tokenisation is per text piece).
TEXT_TURNS = [{"from": "human", "value": "\nWhat happens?"}, {"from": "gpt", "value": "It fades."}]


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def video_sources(tmp_path_factory) -> dict:
    """JSONL (a clip, a frame folder, a frame list, a corrupt clip, an image, text), the
    release's mix WebDataset (``video_1.0_clip.mp4`` + ``{"texts", "media": "video", "name"}``
    next to an image sample), and parquet with video bytes."""
    root = tmp_path_factory.mktemp("videos")
    clips = {"three_s": mp4_bytes(30, 10), "one_s": mp4_bytes(10, 10), "mix": mp4_bytes(30, 15)}
    (root / "clips").mkdir()
    (root / "clips" / "three_s.mp4").write_bytes(clips["three_s"])
    (root / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom garbage")
    (root / "frames").mkdir()
    for index in range(5):  # a frame folder, named so that natural order != text order
        (root / "frames" / f"f{index * 5}.png").write_bytes(grey_png(8 * index))
    (root / "img.png").write_bytes(image_bytes(56, 56, "PNG"))
    records = [
        {"id": "clip", "video": "clips/three_s.mp4", "conversations": TURNS},
        {"id": "folder", "video": "frames", "conversations": TURNS},
        {"id": "list", "video": ["frames/f10.png", "frames/f0.png"], "conversations": TURNS},
        {"id": "broken", "video": "clips/broken.mp4", "conversations": TURNS},
        {
            "id": "image",
            "image": "img.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A gradient."},
            ],
        },
        {"id": "text", "conversations": TEXT_TURNS},
    ]
    jsonl = root / "train.jsonl"
    jsonl.write_text("".join(json.dumps(record) + "\n" for record in records))

    mix = root / "mix" / "pretrain-0.tar"
    mix.parent.mkdir()
    chat = [{"role": "user", "content": "<video>\nWhat happens?"}]
    chat.append({"role": "assistant", "content": "It fades."})
    image_chat = [{"role": "user", "content": "<image>\nWhat is it?"}]
    image_chat.append({"role": "assistant", "content": "A gradient."})
    with tarfile.open(mix, "w") as archive:
        _add(archive, "image_0.0_img.png", image_bytes(56, 56, "PNG"))
        _add(
            archive,
            "image_0.json",
            json.dumps({"texts": image_chat, "media": "image", "name": ["0_img.png"]}).encode(),
        )
        _add(archive, "video_1.0_clip.mp4", clips["mix"])
        _add(
            archive,
            "video_1.json",
            json.dumps({"texts": chat, "media": "video", "name": ["0_clip.mp4"]}).encode(),
        )

    parquet = root / "pq" / "videos.parquet"
    parquet.parent.mkdir()
    table = pa.table(
        {
            "id": ["pq0"],
            "video": [clips["one_s"]],
            "conversations": [json.dumps(TURNS)],
        }
    )
    pq.write_table(table, parquet)
    return {"root": root, "jsonl": jsonl, "mix": mix, "parquet": parquet, "clips": clips}


def _text_length(tmp_path: Path) -> int:
    """Length of the question without its video (one-sample pack of the text record)."""
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"conversations": TEXT_TURNS}) + "\n")
    report = pack([str(text)], tmp_path / "text_out", seq_len=4096)
    ((record, _),) = read_packs(tmp_path / "text_out").values()
    assert report["samples_packed"] == 1
    return record["samples"][0]["length"]


def test_packer_packs_videos_with_images_and_text(video_sources, tmp_path, monkeypatch):
    import av

    opened: list[bytes] = []  # what FFmpeg was asked to open, during the whole packer run
    real_open = av.open

    def spy(source, *args, **kwargs):
        opened.append(source.getvalue() if isinstance(source, io.BytesIO) else Path(source))
        return real_open(source, *args, **kwargs)

    monkeypatch.setattr(av, "open", spy)
    inputs = [str(video_sources[name]) for name in ("jsonl", "mix", "parquet")]
    report = pack(inputs, tmp_path / "out", seq_len=4096, videos="pack", on_error="skip")
    monkeypatch.undo()
    # One decode per video per run: measuring decodes it, writing plans from what that found.
    names = {data: name for name, data in video_sources["clips"].items()}
    names[(video_sources["root"] / "clips" / "broken.mp4").read_bytes()] = "broken"
    assert sorted(names.get(source, str(source)) for source in opened) == sorted(names.values())
    # 6 + 2 + 1 records; the corrupt clip is the only skip, named in the examples.
    assert report["samples_in"] == 9 and report["samples_packed"] == 8
    assert report["samples_skipped"] == {"corrupt_video": 1}
    assert "broken.mp4" in report["skipped_examples"][0]
    # clip 6 frames, folder 5 + 1 repeated, list 2, mix (30 @ 15 fps) 4, parquet (10 @ 10) 4.
    assert report["videos"]["mode"] == "pack" and report["videos"]["fps"] == 2.0
    assert (report["videos"]["videos"], report["videos"]["frames"]) == (5, 6 + 6 + 2 + 4 + 4)

    samples, parts = {}, {}
    for record, members in read_packs(tmp_path / "out").values():
        for sample in record["samples"]:
            samples[sample["origin"].split("(id ")[-1].rstrip(")")] = sample
            parts[sample["origin"].split("(id ")[-1].rstrip(")")] = members
    text_length = _text_length(tmp_path)
    expected = {  # id: (sampled frames as indices, total frames, fps)
        "clip": ([0, 6, 12, 17, 23, 29], 30, 10.0),
        "folder": ([0, 1, 2, 3, 4, 4], 5, None),
        "list": ([0, 1], 2, None),
        "pq0": ([0, 3, 6, 9], 10, 10.0),
    }
    mix_id = next(key for key in samples if "video_1" in key)
    expected[mix_id] = ([0, 10, 19, 29], 30, 15.0)  # 2 s at 15 fps: 4 frames
    for key, (frames, total, fps) in expected.items():
        sample = samples[key]
        (video,) = sample["videos"]
        assert (video["total_frames"], video["fps"], video["size"]) == (total, fps, [64, 48])
        assert video["grid_thw"] == [len(frames), 22, 28]
        tokens = len(frames) * TOKENS_PER_SMALL_FRAME
        assert sample["length"] == text_length + 2 + tokens, key
        stored = [parts[key][name] for name in video["parts"]]
        if fps is None:  # frame images: the sampled ones, in order, indices into them
            assert video["frames"] == frames
            levels = [int(Image.open(io.BytesIO(data)).getpixel((0, 0))[0]) for data in stored]
            order = {"folder": [0, 8, 16, 24, 32], "list": [16, 0]}[key]
            assert levels == order
        else:  # the original file's bytes, and the indices of its decoded frames
            assert video["frames"] == frames and len(stored) == 1
            source = {"clip": "three_s", "pq0": "one_s"}.get(key, "mix")
            assert stored[0] == video_sources["clips"][source]
            assert which_frames(decode_frames(stored[0], video["frames"])) == frames
    assert "videos" not in samples["image"] and "videos" not in samples["text"]
    assert len(samples) == 8


def test_corrupt_video_fails_in_one_line_and_videos_are_skipped_by_default(
    video_sources, tmp_path, capsys
):
    from lov15_megatron.cli.pack_offline import main

    jsonl = str(video_sources["jsonl"])
    common = ["--input", jsonl, "--tokenizer", "qwen-offline", "--seq-len", "4096"]
    common += ["--workers", "1", "--no-progress"]
    status = main([*common, "--output", str(tmp_path / "fail"), "--videos", "pack"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "corrupt_video" in err and "broken.mp4" in err and "(id broken)" in err
    # Default --videos skip: every video sample counted as video_not_supported, even the
    # broken one, and nothing decoded; a video option then has no effect: an error.
    report = pack([jsonl], tmp_path / "skip", seq_len=4096)
    assert report["samples_skipped"] == {"video_not_supported": 4}
    assert report["videos"] == {"mode": "skip", "videos": 0, "frames": 0}
    assert main([*common, "--output", str(tmp_path / "x"), "--fps", "1"]) == 2
    assert "--fps: has no effect without --videos pack" in capsys.readouterr().err


def test_task_encoder_decodes_the_packed_frames(video_sources, tmp_path):
    """The packer's video pack through the task encoder: every stored frame index is decoded
    (frame i shows grey 8·i), one ``(1, h, w)`` row per frame, pads as the packer counted."""
    from lov15_megatron.data.energon_dataset import PackedVLMSample
    from lov15_megatron.data.image_processing import CLIP_MEAN, CLIP_STD
    from lov15_megatron.data.special_tokens import VIDEO_PAD_ID
    from lov15_megatron.data.task_encoder import VLMTaskEncoder
    from lov15_megatron.data.tokenizer import load_tokenizer

    pack([str(video_sources["parquet"])], tmp_path / "out", seq_len=4096, videos="pack")
    ((record, members),) = read_packs(tmp_path / "out").values()
    sample = PackedVLMSample(
        __key__="000000000",
        __restore_key__=(),
        __subflavors__={"kind": "instruct"},
        samples=record["samples"],
        images=members,
    )
    encoded = VLMTaskEncoder(load_tokenizer("qwen-offline")).encode_sample(sample)
    videos = [v for sub in record["samples"] for v in sub.get("videos", [])]
    frames = [i for video in videos for i in video["frames"]]
    h, w = SMALL_FRAME[0] // 14, SMALL_FRAME[1] // 14
    assert encoded.image_grid_thw.tolist() == [[1, h, w]] * len(frames)
    assert int((encoded.input_ids == VIDEO_PAD_ID).sum()) == TOKENS_PER_SMALL_FRAME * len(frames)
    red = encoded.pixel_values.reshape(len(frames), h * w, 3, 196)[:, :, 0]
    levels = (red.mean((1, 2)) * CLIP_STD[0] + CLIP_MEAN[0]) * 255
    assert [round(float(level) / 8) for level in levels] == frames
