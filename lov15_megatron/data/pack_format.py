"""On-disk layout of a packed sample (one WebDataset tar sample per pack).

Members of pack ``KEY`` (``KEY`` = 9-digit global pack index, unique across shards):

- ``KEY.json``: ``{"samples": [{"id", "origin", "length", "num_patches", "image_sizes",
  "messages": [{"role", "content"}], "images": [part names]}, ...]}`` in sub-sample order;
- ``KEY.img{j}.{ext}``: the original encoded bytes of the pack's j-th image (``ext`` from the
  image header), referenced by name from the sub-samples' ``images`` lists.

Tar headers are normalised (mtime 0, uid/gid 0, mode 0644) so that shards are byte-identical
across runs.
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

JSON_PART = "json"


def pack_key(pack_index: int) -> str:
    return f"{pack_index:09d}"


def image_part(image_index: int, extension: str) -> str:
    return f"img{image_index}.{extension}"


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
