"""Tiny generated VLM datasets for the data tests (images made with PIL in a temp dir)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

# (width, height, format) of the generated images; small so that token counts stay small.
IMAGE_SPECS = [
    (56, 56, "PNG"),
    (120, 64, "JPEG"),
    (64, 200, "PNG"),
    (300, 90, "JPEG"),
    (33, 47, "PNG"),
    (80, 80, "JPEG"),
]


def image_bytes(width: int, height: int, fmt: str, seed: int = 0) -> bytes:
    """A deterministic gradient image encoded as ``fmt``."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [
            ((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x * y + seed) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_images(root: Path) -> list[str]:
    """Write the generated images under ``root/images``; returns their relative paths."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for index, (width, height, fmt) in enumerate(IMAGE_SPECS):
        name = f"images/im{index}.{'png' if fmt == 'PNG' else 'jpg'}"
        (root / name).write_bytes(image_bytes(width, height, fmt, seed=index))
        names.append(name)
    return names


def llava_records(names: list[str]) -> list[dict]:
    return [
        {
            "id": "a",
            "image": names[0],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": "A colourful gradient."},
            ],
        },
        {
            "id": "b",
            "image": [names[1], names[2]],
            "conversations": [
                {"from": "human", "value": "Compare <image> and <image>."},
                {"from": "gpt", "value": "The first is wider."},
                {"from": "human", "value": "And the colours?"},
                {"from": "gpt", "value": "Both are gradients of red and green."},
            ],
        },
        {
            "id": "c",
            "conversations": [
                {"from": "human", "value": "Say hello."},
                {"from": "gpt", "value": "Hello!"},
            ],
        },
        {
            "id": "d",
            "image": names[3],
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe it in detail please."},
                {"from": "gpt", "value": "A wide image with stripes " * 6},
            ],
        },
    ]


def messages_records(names: list[str]) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
                {"role": "assistant", "content": "Hi."},
            ],
            "images": [names[4]],
        },
        {
            "messages": [
                {"role": "user", "content": "Two pictures."},
                {"role": "assistant", "content": "I see two gradients."},
            ],
            "images": [names[5], names[0]],
        },
        {
            "messages": [
                {"role": "user", "content": "Count to three."},
                {"role": "assistant", "content": "1 2 3"},
            ]
        },
    ]


def write_tar(path: Path, count: int = 4) -> list[bytes]:
    """A WebDataset shard of ``count`` LLaVA-style samples (json + jpg/png); returns images."""
    images = []
    with tarfile.open(path, "w") as archive:
        for index in range(count):
            width, height, fmt = IMAGE_SPECS[(index + 2) % len(IMAGE_SPECS)]
            data = image_bytes(width, height, fmt, seed=100 + index)
            images.append(data)
            record = {
                "conversations": [
                    {"from": "human", "value": f"<image>\nSample {index}?"},
                    {"from": "gpt", "value": f"Answer number {index}."},
                ]
            }
            for name, payload in (
                (f"sample{index:03d}.json", json.dumps(record).encode()),
                (f"sample{index:03d}.{'png' if fmt == 'PNG' else 'jpg'}", data),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return images


def write_parquet(path: Path, count: int = 4) -> list[bytes]:
    """A mid-training style parquet: ``id``, ``image`` ({bytes, path}), ``caption``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, images = [], []
    for index in range(count):
        width, height, fmt = IMAGE_SPECS[index % len(IMAGE_SPECS)]
        data = image_bytes(width, height, fmt, seed=200 + index)
        images.append(data)
        rows.append(
            {
                "id": f"p{index}",
                "image": {"bytes": data, "path": f"x/{index}.img"},
                "caption": f"Caption of picture {index}, a gradient.",
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return images


def build_mixed_sources(root: Path) -> list[str]:
    """All four layouts under ``root``; returns the ``--input`` values."""
    names = write_images(root)
    (root / "llava.json").write_text(json.dumps(llava_records(names)))
    (root / "messages.jsonl").write_text(
        "\n".join(json.dumps(record) for record in messages_records(names)) + "\n"
    )
    write_tar(root / "wds.tar")
    write_parquet(root / "mid.parquet")
    return [
        str(root / "llava.json"),
        str(root / "messages.jsonl"),
        str(root / "wds.tar"),
        str(root / "mid.parquet"),
    ]


def pack(inputs: list[str], output: Path, **overrides):
    """Run the packer in-process with small defaults; returns the report."""
    from lov15_megatron.data.offline_packing import PackConfig, run

    settings = {"tokenizer": "qwen-offline", "seq_len": 256, "max_packs_per_shard": 1}
    settings.update(overrides)
    config = PackConfig(inputs=tuple(inputs), output=str(output), **settings)
    return run(config, progress=False)


def read_packs(output: Path) -> dict[str, tuple[dict, dict[str, bytes]]]:
    """Pack key -> (json record, {image part: bytes}) read straight from the tar shards."""
    packs: dict[str, tuple[dict, dict[str, bytes]]] = {}
    for shard in sorted((output / "shards").glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive:
                key, _, part = member.name.partition(".")
                data = archive.extractfile(member).read()
                record, images = packs.setdefault(key, ({}, {}))
                if part == "json":
                    record.update(json.loads(data))
                else:
                    images[part] = data
    return packs


def packed_tree(output: Path) -> dict[str, bytes]:
    """What must be byte-identical between two packings of the same data: shard tars,
    energon's ``split.yaml`` / ``dataset.yaml`` / ``.info.json`` and the report's data keys."""
    from lov15_megatron.data.offline_packing import RUN_DEPENDENT_KEYS

    files = {str(p.relative_to(output)): p.read_bytes() for p in (output / "shards").glob("*.tar")}
    report = json.loads((output / "pack_report.json").read_text())
    kept = {k: v for k, v in report.items() if k not in RUN_DEPENDENT_KEYS}
    files["report"] = json.dumps(kept, sort_keys=True).encode()
    for name in ("split.yaml", "dataset.yaml", ".info.json"):
        files[name] = (output / ".nv-meta" / name).read_bytes()
    return files


PACK_TOOL = Path(__file__).resolve().parents[1] / "tools" / "pack_offline.py"


def pack_command(inputs: list[str], output: Path, *extra: str) -> list[str]:
    """``tools/pack_offline.py`` with the small defaults of :func:`pack`."""
    import sys

    command = [sys.executable, str(PACK_TOOL), "--input", *inputs, "--output", str(output)]
    command += ["--tokenizer", "qwen-offline", "--seq-len", "256", "--max-packs-per-shard", "1"]
    return command + ["--workers", "1", "--no-progress", *extra]


def run_tool(command: list[str], env: dict[str, str] | None = None):
    import os
    import subprocess

    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result


def _blocked_opening_fifo(pid: int) -> bool:
    """Whether process ``pid`` sleeps in open() of a FIFO without a reader: the kernel's wait
    channel, or, where that is hidden ("0"), the same openat syscall seen twice 50 ms apart."""
    import time

    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip()
        if wchan != "0":
            return wchan in ("wait_for_partner", "fifo_open")
        first = Path(f"/proc/{pid}/syscall").read_text().split()
        time.sleep(0.05)
        second = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return first[:1] in (["257"], ["56"]) and first == second  # openat: x86_64, aarch64


def kill_when_blocked_on(command: list[str], fifo: Path) -> None:
    """Run ``command`` with a named pipe at ``fifo`` (a temp file name the tool will write),
    wait until the tool blocks opening it (``/proc/PID/wchan``), then SIGKILL it: a real kill
    at a known point, with everything before that point finished and the rest not started."""
    import os
    import signal
    import subprocess
    import time

    os.mkfifo(fifo)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _blocked_opening_fifo(process.pid):
        if process.poll() is not None:
            raise AssertionError(f"the tool ended before reaching {fifo}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the tool never opened {fifo}")
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    process.stderr.close()
    fifo.unlink()
