"""On-disk layout of a packed sample (one WebDataset tar sample per pack).

Members of pack ``KEY`` (``KEY`` = 9-digit global pack index, unique across shards):

- ``KEY.json``: ``{"samples": [{"id", "origin", "length", "num_patches", "image_sizes",
  "messages": [{"role", "content"}], "images": [part names]}, ...]}`` in sub-sample order;
- ``KEY.img{j}.{ext}``: the original encoded bytes of the pack's j-th image (``ext`` from the
  image header), referenced by name from the sub-samples' ``images`` lists;
- videos (packed with ``--videos pack``): ``KEY.vid{k}.{ext}``, the original bytes of the pack's
  k-th video file (``ext`` from its container format), or ``KEY.vid{k}.f{j}.{ext}``, the
  original bytes of the sampled frame images of a video given as images. A sub-sample with
  videos has ``"videos": [{"parts", "frames", "size", "grid_thw", "total_frames", "fps"}]`` in
  the order of its ``<video>`` blocks: ``frames`` are the sampled frames as indices into the
  decoded frames of ``parts[0]`` (a video file) or into ``parts`` (frame images), already chosen
  by the release's rule (:mod:`.video`), so a reader decodes and takes them without deciding
  anything; ``grid_thw`` = ``[frames, H/14, W/14]`` of the resized frames; ``size`` the original
  ``[width, height]``; ``fps`` null for frame images. A sub-sample without videos has no
  ``videos`` key, so image-only packs are as they were before videos were packed.

Tar headers are normalised (mtime 0, uid/gid 0, mode 0644) so that shards are byte-identical
across runs.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

#: The packer's report (counts, fill, skips, video sampling settings) beside the shards; read by
#: the trainer (``checkpoint_dir.packed_video_settings``) as well as written by the packer.
REPORT_NAME = "pack_report.json"

JSON_PART = "json"


def pack_key(pack_index: int) -> str:
    return f"{pack_index:09d}"


def image_part(image_index: int, extension: str) -> str:
    return f"img{image_index}.{extension}"


def video_part(video_index: int, extension: str, frame: int | None = None) -> str:
    """``vid{k}.{ext}`` (a video file) or ``vid{k}.f{j}.{ext}`` (frame image j of video k)."""
    return (
        f"vid{video_index}.{extension}"
        if frame is None
        else f"vid{video_index}.f{frame}.{extension}"
    )


def dumps(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, compact, UTF-8)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(data))
