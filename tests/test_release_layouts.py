"""The release's published data layouts, written here by hand as published, through the readers
and the packer: Instruct-Data and Mid-Training-85M parquet, the release's ``--media image`` and
``--media mix`` WebDatasets, and its packed caption shards (``PackedCaptioningSample``).

Every fixture is built from the facts of the release's code and data cards (column types, member
names, JSON shapes), never with our own writers; the expected messages are the fixture's own
(role, text) lists, not a reader's output.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import image_bytes, pack, packed_tree, read_packs

from lov15_megatron.data.errors import BadSample
from lov15_megatron.data.sources import (
    RawSample,
    Source,
    discover_sources,
    plan_units,
    read_sample,
    read_unit,
)

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TURN_FROM_VALUE = pa.struct([("from", pa.string()), ("value", pa.string())])
#: A parquet list<struct> unifies the fields of all rows: every turn carries both pairs.
TURN_BOTH = pa.struct(
    [
        ("content", pa.string()),
        ("from", pa.string()),
        ("role", pa.string()),
        ("value", pa.string()),
    ]
)
TURN_MARKDOWN = pa.struct(
    [("content", pa.string()), ("markdown", pa.string()), ("role", pa.string())]
)
Expected = dict[str, Any]  # origin -> {"messages": [(role, text)], "images": [bytes], "source"}


def _png(seed: int, size: int = 28) -> bytes:
    return image_bytes(size, size, "PNG", seed=seed)


def _jpeg(seed: int, size: int = 56) -> bytes:
    return image_bytes(size, size, "JPEG", seed=seed)


# ----------------------------------------------------------------------------- Instruct-Data


def _instruct_rows(source: str, count: int) -> list[dict[str, Any]]:
    """Rows of one Instruct-Data source: id, image (or None), turns as (role, text), the
    turn style the source uses, data_source."""
    rows = []
    for i in range(count):
        data_source = {"ai2d": "ai2d(cauldron,llava_format)"}.get(source, source)
        if source == "code_feedback_66k":  # text only, role/content (+ markdown)
            turns = [("user", f"Fix this code: print({i}"), ("assistant", f"print({i})")]
            rows.append(dict(id=f"code_feedback/{i}", image=None, turns=turns, style="markdown"))
        elif source == "ai2d":  # from/value, some two rounds
            turns = [("user", f"<image>\nWhich label is part {i}?"), ("assistant", f"Label {i}.")]
            if i % 3 == 0:
                turns += [("user", "Why?"), ("assistant", "It points at it.")]
            rows.append(dict(id=f"ai2d/{i:05d}.png", image=_png(i), turns=turns, style="from"))
        else:  # llava_cot_100k: half from/value, half role/content with a system prompt
            turns = [("user", f"<image>\nSolve {i}."), ("assistant", f"Step by step: {i}.")]
            if i % 2:
                turns.insert(0, ("system", "Reason before answering."))
            style = "role" if i % 2 else "from"
            rows.append(dict(id=f"cot/{i}", image=_jpeg(i), turns=turns, style=style))
        rows[-1]["data_source"] = data_source
    return rows


_SPEAKER = {"user": "human", "assistant": "gpt", "system": "system"}


def _turn_struct(role: str, text: str, style: str, source: str) -> dict[str, Any]:
    if source == "code_feedback_66k":
        markdown = f"```python\n{text}\n```" if role == "assistant" else None
        return {"content": text, "markdown": markdown, "role": role}
    if source == "ai2d":
        return {"from": _SPEAKER[role], "value": text}
    if style == "from":
        return {"content": None, "from": _SPEAKER[role], "role": None, "value": text}
    return {"content": text, "from": None, "role": role, "value": None}


def write_instruct(root: Path, counts: dict[str, int]) -> Expected:
    """``root/<source>/train-00000-of-00001.parquet`` as published."""
    expected: Expected = {}
    turn_type = {"ai2d": TURN_FROM_VALUE, "code_feedback_66k": TURN_MARKDOWN}
    for source, count in counts.items():
        rows = _instruct_rows(source, count)
        table = pa.table(
            {
                "id": pa.array([r["id"] for r in rows], pa.string()),
                "image": pa.array(
                    [
                        None if r["image"] is None else {"bytes": r["image"], "path": f"{n}.img"}
                        for n, r in enumerate(rows)
                    ],
                    IMAGE,
                ),
                "conversations": pa.array(
                    [[_turn_struct(*t, r["style"], source) for t in r["turns"]] for r in rows],
                    pa.list_(turn_type.get(source, TURN_BOTH)),
                ),
                "data_source": pa.array([r["data_source"] for r in rows], pa.string()),
            }
        )
        path = root / source / "train-00000-of-00001.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(table, path, row_group_size=16)
        for n, r in enumerate(rows):
            expected[f"{path}:row {n} (id {r['id']})"] = {
                "messages": r["turns"],
                "images": [] if r["image"] is None else [r["image"]],
                "source": r["data_source"],
            }
    return expected


# ----------------------------------------------------------------------------- Mid-Training-85M

_CAPTIONS_85M = [
    ("coyo", "EN", "A red bus parked beside a brick station on a rainy day."),
    ("coyo", "EN", "Two children fly a yellow kite over a green hill."),
    ("coyo", "CN", "一只橘色的猫趴在窗台上晒太阳。"),
    ("coyo", "EN", "A plate of pasta with basil leaves on a wooden table."),
    ("laion", "EN", "An old map of a harbour town drawn in brown ink."),
    ("laion", "CN", "夜晚的城市街道，霓虹灯倒映在湿漉漉的路面上。"),
    ("laion", "EN", "A hiker stands on a rocky summit above the clouds."),
    ("laion", "EN", "A close-up of a bee collecting pollen from a flower."),
]


def write_mid_training(root: Path) -> Expected:
    """``root/<source>/<EN|CN>/partNN/*.parquet``: id (with ``/``), image struct, caption."""
    expected: Expected = {}
    groups: dict[Path, list[dict[str, Any]]] = {}
    for n, (source, language, caption) in enumerate(_CAPTIONS_85M):
        path = root / source / language / f"part{n % 2:02d}" / "000000.parquet"
        image = _jpeg(300 + n) if n % 2 else _png(300 + n, 56)
        row = {"id": f"{source}/{language}/{n:08d}.jpg", "image": image, "caption": caption}
        groups.setdefault(path, []).append(row)
    for path, rows in groups.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table(
            {
                "id": pa.array([r["id"] for r in rows], pa.string()),
                "image": pa.array(
                    [{"bytes": r["image"], "path": r["id"]} for r in rows], type=IMAGE
                ),
                "caption": pa.array([r["caption"] for r in rows], pa.string()),
            }
        )
        pq.write_table(table, path)
        for n, r in enumerate(rows):
            expected[f"{path}:row {n} (id {r['id']})"] = {
                "messages": [("user", ""), ("assistant", r["caption"])],
                "images": [r["image"]],
                "source": path.relative_to(root).parts[0],
            }
    return expected


# ----------------------------------------------------------------------------- WebDataset tars


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


def write_image_wds(path: Path) -> Expected:
    """``--media image``: ``KEY.jpg`` + ``KEY.json`` = the message list itself (role/content by
    default, from/value with ``--columns_messages conversations``); KEY = id with ``.`` -> ``_``."""
    samples = [
        (
            "GCC_train_002582585",
            [("user", "<image>\nRender a clear caption."), ("assistant", "A dog on a beach.")],
            "role",
        ),
        (
            "000000033471_jpg",
            [("user", "What are the colors of the bus?\n<image>"), ("assistant", "White and red.")],
            "from",
        ),
        (
            "GCC_train_000000001",
            [("user", "<image>"), ("assistant", "Sunset over the sea.")],
            "role",
        ),
    ]
    members, expected = [], {}
    for index, (key, turns, style) in enumerate(samples):
        image = _jpeg(400 + index)
        if style == "role":
            record = [{"role": role, "content": text} for role, text in turns]
        else:
            record = [{"from": _SPEAKER[role], "value": text} for role, text in turns]
        pair = [(f"{key}.jpg", image), (f"{key}.json", _json(record))]
        members += pair if index % 2 else pair[::-1]  # either member order occurs
        expected[f"{path}:{key} (tar sample {index})"] = {
            "messages": turns,
            "images": [image],
            "source": path.parent.name,
        }
    _write_tar(path, members)
    return expected


def write_mix_wds(path: Path) -> tuple[Expected, list[str]]:
    """``--media mix``: ``KEY.json`` = ``{"texts", "media", "name"}``, members
    ``KEY.{i}_{basename}``; text-only samples have no ``name``. Returns the video origins."""
    system = ("system", "You are a careful visual assistant.")
    images = [_jpeg(500), _png(501, 56), _jpeg(502, 84), _png(503)]
    samples: list[tuple[str, str, list[tuple[str, str]], list[tuple[str, bytes]]]] = [
        (
            "image_0",
            "image",
            [system, ("user", "<image>\nWhat colour is the bus?"), ("assistant", "Red.")],
            [("0_000000033471.jpg", images[0])],
        ),
        (
            "image_1",
            "image",
            [
                ("user", "Compare <image> with <image>."),
                ("assistant", "The second is smaller."),
                ("user", "Which is brighter?"),
                ("assistant", "The first."),
            ],
            [("0_chart.v2.final.png", images[1]), ("1_a.b.jpg", images[2])],
        ),
        (
            "text_2",
            "text",
            [("user", "Write a haiku about rain."), ("assistant", "Soft rain on the roof.")],
            [],
        ),
        (
            "video_3",
            "video",
            [("user", "<video>\nWhat happens?"), ("assistant", "A ball rolls.")],
            [("0_clip.mp4", b"\x00\x00\x00\x18ftypmp42 not really a video")],
        ),
        (
            "image_4",
            "image",
            [("user", "<image>\nRead the sign."), ("assistant", "STOP")],
            [("0_IMG_0001.JPG", images[3])],
        ),
    ]
    members, expected, videos = [], {}, []
    for index, (key, media, turns, named) in enumerate(samples):
        content: dict[str, Any] = {
            "texts": [{"role": role, "content": text} for role, text in turns],
            "media": media,
        }
        if named:
            content["name"] = [name for name, _ in named]
        members += [(f"{key}.{name}", data) for name, data in reversed(named)]
        members.append((f"{key}.json", _json(content)))
        origin = f"{path}:{key} (tar sample {index})"
        if media == "video":
            videos.append(origin)
        else:
            expected[origin] = {
                "messages": turns,
                "images": [data for _, data in named],
                "source": path.parent.name,
            }
    _write_tar(path, members)
    return expected, videos


_PACKED_CAPTIONS = [
    (
        "ps_00000000",
        ["<image>", "What about this picture?", "Please provide a vivid description of the image."],
        [
            "A lighthouse on a cliff at dawn.",
            "一碗热气腾腾的拉面。",
            "A cyclist on a mountain road.",
        ],
    ),
    ("ps_00000001", ["<image>", "<image>"], ["A green door.", "Three apples on a plate."]),
]


def write_packed_captions(path: Path) -> Expected:
    """The release's packed caption shards: ``KEY.img{i}.jpg`` + ``KEY.json`` = ``{"prompts",
    "captions", "images": [original paths]}``; each pair is one sample."""
    members, expected, record = [], {}, 0
    for key, prompts, captions in _PACKED_CAPTIONS:
        paths = [f"/data/85M/{key}_{i}.jpg" for i in range(len(captions))]
        images = [_jpeg(600 + record + i) for i in range(len(captions))]
        members += [(f"{key}.img{i}.jpg", data) for i, data in enumerate(images)]
        payload = {"prompts": prompts, "captions": captions, "images": paths}
        members.append((f"{key}.json", _json(payload)))
        for i, (prompt, caption) in enumerate(zip(prompts, captions, strict=True)):
            origin = f"{path}:{key}.img{i}.jpg (tar sample {record}, image {paths[i]})"
            expected[origin] = {
                "messages": [("user", prompt), ("assistant", caption)],
                "images": [images[i]],
                "source": path.parent.name,
            }
            record += 1
    _write_tar(path, members)
    return expected


# ----------------------------------------------------------------------------- reading


def read_all(inputs: list[str]) -> tuple[list[Source], list[RawSample], list[BadSample]]:
    """Every item of every work unit (small units: several per file)."""
    sources = discover_sources(inputs)
    samples, bad = [], []
    for unit in plan_units(sources, records_per_unit=7):
        for item in read_unit(unit):
            (bad if isinstance(item, BadSample) else samples).append(item)
    return sources, samples, bad


def _as_expected(sample: RawSample) -> dict[str, Any]:
    data = sample.image_data or [ref.read_bytes() for ref in sample.images]
    return {
        "messages": [(m.role, m.content) for m in sample.messages],
        "images": data,
        "source": sample.source_name,
    }


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("release")
    counts = {"ai2d": 40, "llava_cot_100k": 30, "code_feedback_66k": 30}
    mix, videos = write_mix_wds(root / "LLaVA-NeXT-780k" / "pretrain-0.tar")
    return {
        "root": root,
        "instruct": write_instruct(root / "Instruct", counts),
        "mid": write_mid_training(root / "Mid-Training-85M"),
        "image_wds": write_image_wds(root / "LLaVA-558K-Webdataset" / "pretrain-0.tar"),
        "mix": mix,
        "videos": videos,
        "captions": write_packed_captions(root / "Quick-Start-3M" / "pretrain-000000.tar"),
    }


@pytest.mark.parametrize(
    ("layout", "folder"),
    [
        ("instruct", "Instruct"),
        ("mid", "Mid-Training-85M"),
        ("image_wds", "LLaVA-558K-Webdataset"),
        ("mix", "LLaVA-NeXT-780k"),
        ("captions", "Quick-Start-3M"),
    ],
)
def test_every_published_sample_is_read_as_published(layouts, layout, folder):
    sources, samples, bad = read_all([str(layouts["root"] / folder)])
    expected = layouts[layout]
    assert {s.origin: _as_expected(s) for s in samples} == expected
    videos = layouts["videos"] if layout == "mix" else []
    assert [(b.where, b.reason) for b in bad] == [(v, "video_not_supported") for v in videos]
    uids = [s.uid for s in samples]
    assert len(set(uids)) == len(uids) == len(expected)
    for sample in samples:  # the write phase reads every sample again by its position
        again = read_sample(sources[sample.source], sample.record, sample.loc)
        assert (again.origin, _as_expected(again)) == (sample.origin, _as_expected(sample))


def test_bad_rows_and_videos_are_named_and_counted(tmp_path):
    """Each bad record is one skip naming its file, record and id; videos have their own
    reason; a packed caption record's good pairs survive a missing image member."""
    turns = [
        [{"content": "<image>\nOk?", "from": "human", "role": "user", "value": "<image>\nOk?"}],
        [{"content": None, "from": None, "role": None, "value": "no speaker"}],
        [{"content": "Hi", "from": "gpt", "role": "user", "value": "Hi"}],  # pairs disagree
    ]
    for turn in turns:
        turn.append({"content": "Fine.", "from": None, "role": "assistant", "value": None})
    table = pa.table(
        {
            "id": pa.array(["good/0", "bad/1", "bad/2"], pa.string()),
            "image": pa.array([{"bytes": _png(1), "path": "0.png"}, None, None], IMAGE),
            "conversations": pa.array(turns, pa.list_(TURN_BOTH)),
            "data_source": pa.array(["geoqa"] * 3, pa.string()),
        }
    )
    parquet = tmp_path / "geoqa" / "train-00000-of-00001.parquet"
    parquet.parent.mkdir()
    pq.write_table(table, parquet)
    jsonl = tmp_path / "videos.jsonl"
    video_turns = [{"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A."}]
    jsonl.write_text(json.dumps({"id": "v/1", "video": "v/1.mp4", "conversations": video_turns}))
    chat_video = [{"role": "user", "content": "<video>"}, {"role": "assistant", "content": "A."}]
    _write_tar(tmp_path / "vid.tar", [("clip_7.mp4", b"\x00"), ("clip_7.json", _json(chat_video))])
    mix = {"texts": chat_video, "media": "image", "name": ["0_gone.jpg"]}
    _write_tar(tmp_path / "mix.tar", [("image_9.json", _json(mix))])
    captions = {
        "prompts": ["<image>", "<image>"],
        "captions": ["One.", "Two."],
        "images": ["a", "b"],
    }
    uneven = {"prompts": ["<image>"], "captions": ["One.", "Two."], "images": ["c", "d"]}
    after = {"captions": ["Three."], "images": ["e"]}  # no prompts: empty prompts
    _write_tar(
        tmp_path / "caps.tar",
        [
            ("ps_0.img0.jpg", _jpeg(1)),
            ("ps_0.json", _json(captions)),  # img1.jpg missing
            ("ps_1.img0.jpg", _jpeg(2)),
            ("ps_1.img1.jpg", _jpeg(3)),
            ("ps_1.json", _json(uneven)),
            ("ps_2.img0.jpg", _jpeg(4)),
            ("ps_2.json", _json(after)),
        ],
    )
    inputs = [str(p) for p in (parquet, jsonl, tmp_path / "vid.tar", tmp_path / "mix.tar")]
    _, samples, bad = read_all([*inputs, str(tmp_path / "caps.tar")])
    assert [s.origin for s in samples] == [
        f"{parquet}:row 0 (id good/0)",
        f"{tmp_path / 'caps.tar'}:ps_0.img0.jpg (tar sample 0, image a)",
        f"{tmp_path / 'caps.tar'}:ps_2.img0.jpg (tar sample 3, image e)",
    ]
    assert [(m.role, m.content) for m in samples[0].messages] == [  # both pairs, agreeing
        ("user", "<image>\nOk?"),
        ("assistant", "Fine."),
    ]
    assert [(m.role, m.content) for m in samples[2].messages] == [
        ("user", ""),
        ("assistant", "Three."),
    ]
    found = [(b.reason, b.source_name, b.describe()) for b in bad]
    assert [(reason, name) for reason, name, _ in found] == [
        ("malformed_record", "geoqa"),
        ("malformed_record", "geoqa"),
        ("video_not_supported", "videos.jsonl"),
        ("video_not_supported", "vid.tar"),
        ("missing_image", "mix.tar"),
        ("missing_image", "caps.tar"),
        ("malformed_record", "caps.tar"),
    ]
    messages = [text for _, _, text in found]
    assert messages[0].startswith(f"{parquet}:row 1 (id bad/1): malformed_record: turn 0 has no")
    assert messages[1].startswith(f"{parquet}:row 2 (id bad/2): malformed_record: turn 0:")
    assert messages[2].startswith(f"{jsonl}:record 0 (id v/1): video_not_supported")
    assert "image_9.0_gone.jpg" in messages[4]
    assert messages[5].startswith(f"{tmp_path / 'caps.tar'}:ps_0.img1.jpg (tar sample 1, image b)")
    assert messages[6].startswith(f"{tmp_path / 'caps.tar'}:ps_1 (tar sample 2): malformed")


def test_packer_end_to_end_on_every_published_layout(layouts, tmp_path):
    """All layouts in one run of the packer (``--on-error fail``: the video is still only
    counted): the report's counts per source and reason, every sample once with its messages,
    images and origin, the shards through Energon's loader, the same bytes with 2 workers."""
    from lov15_megatron.data.loader import build_train_loader, data_parallel_worker_config
    from lov15_megatron.data.tokenizer import load_tokenizer

    root = layouts["root"]
    folders = ["Instruct", "Mid-Training-85M", "LLaVA-558K-Webdataset", "LLaVA-NeXT-780k"]
    inputs = [str(root / folder) for folder in [*folders, "Quick-Start-3M"]]
    report = pack(inputs, tmp_path / "out", seq_len=512, max_packs_per_shard=4, workers=1)
    expected: Expected = {}
    for layout in ("instruct", "mid", "image_wds", "mix", "captions"):
        expected.update(layouts[layout])
    assert report["samples_in"] == len(expected) + 1 == 121
    assert report["samples_packed"] == len(expected)
    assert report["samples_skipped"] == {"video_not_supported": 1}
    assert layouts["videos"][0] in report["skipped_examples"][0]

    def counts(n: int, **skipped: int) -> dict[str, Any]:
        return {"in": n + sum(skipped.values()), "packed": n, "skipped": skipped}

    assert report["samples_per_source"] == {
        "LLaVA-558K-Webdataset": counts(3),
        "LLaVA-NeXT-780k": counts(4, video_not_supported=1),
        "Quick-Start-3M": counts(5),
        "ai2d(cauldron,llava_format)": counts(40),
        "code_feedback_66k": counts(30),
        "coyo": counts(4),
        "laion": counts(4),
        "llava_cot_100k": counts(30),
    }
    assert list(report["samples_per_source"]) == sorted(report["samples_per_source"])
    packs = read_packs(tmp_path / "out")
    seen = {}
    for record, images in packs.values():
        for sample in record["samples"]:
            seen[sample["origin"]] = {
                "messages": [(m["role"], m["content"]) for m in sample["messages"]],
                "images": [images[name] for name in sample["images"]],
            }
    assert seen == {
        origin: {k: v for k, v in e.items() if k != "source"} for origin, e in expected.items()
    }
    loader = build_train_loader(
        tmp_path / "out",
        tokenizer=load_tokenizer("qwen-offline"),
        micro_batch_size=1,
        worker_config=data_parallel_worker_config(0, 1, 0),
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
    )
    loaded = []
    for batch in loader:  # the task encoder checks every length against the packer's
        loaded += batch.sample_ids[0]
        if len(loaded) >= len(expected):
            break
    assert sorted(loaded) == sorted(expected)
    pack(inputs, tmp_path / "w2", seq_len=512, max_packs_per_shard=4, workers=2)
    assert packed_tree(tmp_path / "w2") == packed_tree(tmp_path / "out")
