"""Video decode and packing throughput per worker (one process, one thread). Results go to
``docs/data-packing.md`` (*Videos*).

    OMP_NUM_THREADS=1 python benchmarks/video_decode.py            # 640x360, 30 fps, 10 s
    python benchmarks/video_decode.py --width 1280 --height 720 --videos 4

A clip is generated with PyAV (H.264 through libx264, ``--codec``; moving gradients so that the
encoder has real work), then timed:

- ``probe``: decode every frame without converting it (what the packer's measure phase does to
  count frames, :func:`lov15_megatron.data.video.probe_video`);
- ``load``: probe, then decode again keeping the sampled frames as RGB and resize them
  (:func:`~lov15_megatron.data.video.load_video`: what a reader of a packed video does);
- ``pack``: ``--videos`` JSONL samples of that clip through the whole packer
  (``tools/pack_offline.py --videos pack --workers 1``): every video is decoded once, in the
  measure phase (the write phase plans its frames from what that found); the time includes the
  packer's fixed costs (tokenizer, Energon index).

Every time is the best of ``--repeats`` runs (the machine is shared).

Rates are frames per second of wall time: decoded frames for ``probe`` and ``load`` (a load
decodes the clip twice), the clip's frames per packed video for ``pack`` (video packed per
second, however many times the packer decodes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np


def make_clip(path: Path, width: int, height: int, fps: int, seconds: int, codec: str) -> int:
    """Write a clip of moving colour gradients; returns its frame count."""
    import av

    frames = fps * seconds
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            pixels = np.stack(
                [(x + 4 * index) % 256, (y + 2 * index) % 256, ((x + y) // 2 + index) % 256], -1
            ).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return frames


def timed(function, repeats: int) -> float:
    """Best wall time of ``repeats`` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--codec", default="libx264")
    parser.add_argument("--videos", type=int, default=8, help="samples packed in the pack run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from lov15_megatron.data.offline_packing import PackConfig, run
    from lov15_megatron.data.video import load_video, probe_video

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        clip = root / "clip.mp4"
        frames = make_clip(clip, args.width, args.height, args.fps, args.seconds, args.codec)
        data = clip.read_bytes()
        info = probe_video(data)
        plan, sampled = load_video(data)
        probe_s = timed(lambda: probe_video(data), args.repeats)
        load_s = timed(lambda: load_video(data), args.repeats)

        turns = [{"from": "human", "value": "<video>\nWhat moves?"}]
        turns.append({"from": "gpt", "value": "Colour gradients."})
        jsonl = root / "videos.jsonl"
        line = json.dumps({"video": "clip.mp4", "conversations": turns})
        jsonl.write_text((line + "\n") * args.videos)
        reports = []

        def pack() -> None:
            config = PackConfig(
                inputs=(str(jsonl),),
                output=str(root / f"packed{len(reports)}"),
                tokenizer="qwen-offline",
                seq_len=32768,
                videos="pack",
                workers=1,
            )
            reports.append(run(config, progress=False))

        pack_s = timed(pack, args.repeats)
        report = reports[-1]

    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs",
        "clip": f"{args.width}x{args.height} {args.fps} fps {args.seconds} s {args.codec}",
        "clip_bytes": len(data),
        "frames": info.total_frames,
        "sampled": f"{len(plan.indices)} frames at {plan.width}x{plan.height} "
        f"({plan.num_tokens} tokens)",
        "probe_frames_per_s": round(frames / probe_s, 1),
        "load_s": round(load_s, 3),
        "load_frames_per_s": round(2 * frames / load_s, 1),
        "pack_videos": report["videos"]["videos"],
        "pack_s": round(pack_s, 2),
        "pack_video_frames_per_s": round(frames * args.videos / pack_s, 1),
        "pack_videos_per_s": round(args.videos / pack_s, 2),
    }
    assert sampled.shape[0] == len(plan.indices)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
