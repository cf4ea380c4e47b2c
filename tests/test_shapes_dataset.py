"""The generated shapes data set: determinism, image sizes, answers vs pixels, held-out eval,
and that ``tools/pack_offline.py`` accepts every training split without skipping anything.

Answers are checked against what is *in the pixels*: each image is "perceived" independently of
the generator's text code by sampling the pixel at every coarse position's centre (colour) and at
a few offsets that tell a circle, a square and a triangle apart.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from lov15_megatron.data.image_processing import image_token_count, smart_resize
from lov15_megatron.demo import shapes_dataset as sd

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"n_caption": 40, "n_instruct": 30, "n_eval": 25}
PREPOSITION_TO_POSITION = {
    "at the top": "top",
    "on the left": "left",
    "in the center": "center",
    "on the right": "right",
    "at the bottom": "bottom",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "data"
    summary = sd.generate_shapes_dataset(out, seed=3, **SMALL)
    return out, summary


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# ----------------------------------------------------------------------------- perception


def _perceive(image: Image.Image) -> dict:
    """Background, and shape/colour per occupied position, read from the pixels only."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    by_rgb = {value: name for name, value in sd.BACKGROUNDS.items()}
    background = by_rgb[rgb.getpixel((0, 0))]
    colour_of = {value: name for name, value in sd.COLOURS.items()}
    shapes = {}
    for position in sd.POSITIONS:
        probe = sd.Scene(width, height, background, (sd.ShapeSpec("circle", "red", position),))
        cx, cy, r = sd.shape_geometry(probe, probe.shapes[0])
        centre = rgb.getpixel((cx, cy))
        if centre == sd.BACKGROUNDS[background]:
            continue

        def filled(dx: float, dy: float, cx=cx, cy=cy, r=r, centre=centre) -> bool:
            return rgb.getpixel((cx + round(dx * r), cy + round(dy * r))) == centre

        if filled(0.85, -0.85):  # upper-right corner: only the square reaches it
            shape = "square"
        elif filled(-0.6, -0.6) and not filled(-0.75, 0.9):
            shape = "circle"
        elif filled(-0.75, 0.9) and not filled(-0.6, -0.6):  # wide base, narrow top
            shape = "triangle"
        else:
            raise AssertionError(f"unrecognisable shape at {position}")
        shapes[position] = (shape, colour_of[centre])
    # Every non-background pixel belongs to one of the perceived shapes' colours.
    colours = {colour for _, colour in rgb.getcolors(maxcolors=16)} - {sd.BACKGROUNDS[background]}
    assert colours == {sd.COLOURS[c] for _, c in shapes.values()}
    return {"background": background, "shapes": shapes}


def test_positions_mean_what_they_say_and_shapes_never_touch():
    for width, height in sd.IMAGE_SIZES:
        boxes = {}
        for position in sd.POSITIONS:
            scene = sd.Scene(width, height, "white", (sd.ShapeSpec("square", "red", position),))
            cx, cy, r = sd.shape_geometry(scene, scene.shapes[0])
            column = "left" if cx < width / 3 else "right" if cx > 2 * width / 3 else "middle"
            row = "top" if cy < height / 3 else "bottom" if cy > 2 * height / 3 else "middle"
            expected = {"left": ("left", "middle"), "right": ("right", "middle")}
            expected |= {"top": ("middle", "top"), "bottom": ("middle", "bottom")}
            assert (column, row) == expected.get(position, ("middle", "middle")), position
            assert r >= 7 and 0 <= cx - r and cx + r < width and 0 <= cy - r and cy + r < height
            boxes[position] = (cx - r, cy - r, cx + r, cy + r)
        for a in sd.POSITIONS:
            for b in sd.POSITIONS:
                if a < b:
                    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
                    gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
                    assert gap >= 2, (width, height, a, b)


def _caption_from_pixels(seen: dict) -> set[tuple[str, str, str]]:
    return {(colour, shape, pos) for pos, (shape, colour) in seen["shapes"].items()}


def _check_caption(caption: str, seen: dict) -> None:
    match = re.fullmatch(r"(?:(two|three) shapes: )?(.+), (\w+) background", caption)
    assert match, caption
    count_word, listed, background = match.groups()
    assert background == seen["background"]
    items = re.split(r", | and ", listed)
    parsed = set()
    for item in items:
        item_match = re.fullmatch(r"a (\w+) (\w+) (.+)", item)
        assert item_match, item
        colour, shape, prep = item_match.groups()
        parsed.add((colour, shape, PREPOSITION_TO_POSITION[prep]))
    assert parsed == _caption_from_pixels(seen), caption
    expected_count = {None: 1, "two": 2, "three": 3}[count_word]
    assert len(items) == expected_count == len(seen["shapes"])


def _answer_from_pixels(question: str, seen: dict) -> str:
    by_shape = {shape: (pos, colour) for pos, (shape, colour) in seen["shapes"].items()}
    if question == "How many shapes are there?":
        return str(len(seen["shapes"]))
    if question == "What colour is the background?":
        return seen["background"]
    if match := re.fullmatch(r"What shape is (.+)\?", question):
        return seen["shapes"][PREPOSITION_TO_POSITION[match.group(1)]][0]
    if match := re.fullmatch(r"What colour is the (\w+)\?", question):
        return by_shape[match.group(1)][1]
    if match := re.fullmatch(r"Where is the (\w+)\?", question):
        return by_shape[match.group(1)][0]
    raise AssertionError(f"unknown question {question!r}")


def _training_images(root: Path) -> list[bytes]:
    images = [path.read_bytes() for path in sorted((root / "caption" / "images").glob("*.png"))]
    images += [
        row["image"]["bytes"] for row in pq.read_table(root / "caption" / "mid.parquet").to_pylist()
    ]
    images += [path.read_bytes() for path in sorted((root / "instruct" / "images").glob("*.png"))]
    return images


# ----------------------------------------------------------------------------- tests


def test_same_seed_gives_identical_bytes_other_seed_differs(dataset, tmp_path):
    out, summary = dataset
    again = sd.generate_shapes_dataset(tmp_path / "again", seed=3, **SMALL)
    assert _files(out) == _files(tmp_path / "again")
    assert again["bytes"] == summary["bytes"]
    other = sd.generate_shapes_dataset(tmp_path / "other", seed=4, **SMALL)
    assert _files(Path(other["root"]))["caption/llava.json"] != _files(out)["caption/llava.json"]
    # Atomic write: nothing but the finished folders is left next to them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


def test_summary_metadata_and_layout(dataset):
    out, summary = dataset
    meta = json.loads((out / sd.METADATA_NAME).read_text())
    assert summary["caption"]["count"] == SMALL["n_caption"]
    assert summary["instruct"]["count"] == SMALL["n_instruct"]
    assert summary["eval"]["count"] == SMALL["n_eval"]
    assert [Path(p).name for p in summary["caption"]["sources"]] == ["llava.json", "mid.parquet"]
    assert all(Path(p).is_file() for p in summary["caption"]["sources"])
    assert summary["chance"] == {
        "count": pytest.approx(1 / 3, abs=1e-6),
        "shape": pytest.approx(1 / 3, abs=1e-6),
        "colour": pytest.approx(1 / 4, abs=1e-6),
        "position": pytest.approx(1 / 5, abs=1e-6),
        "background": pytest.approx(1 / 3, abs=1e-6),
    }
    for question_type in meta["question_types"].values():
        assert question_type["chance"] == pytest.approx(1 / len(question_type["answers"]), 1e-5)
    llava = json.loads((out / "caption" / "llava.json").read_text())
    rows = pq.read_table(out / "caption" / "mid.parquet").to_pylist()
    assert len(llava) + len(rows) == SMALL["n_caption"]
    assert set(rows[0]) == {"id", "image", "caption"}
    instruct = json.loads((out / "instruct" / "instruct.json").read_text())
    assert len(instruct) == SMALL["n_instruct"]
    for record in instruct:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and 4 <= len(roles) <= 8
        assert record["messages"][0]["content"].startswith("<image>\n")
    # Whole set: a few hundred bytes per image.
    assert summary["bytes"] < 400 * sum(SMALL.values()) + 60_000
    assert summary["layout"] == meta["layout"] == "free"


def test_images_are_small_multiples_of_28_and_decode(dataset):
    out, _ = dataset
    sizes = set()
    all_images = _training_images(out) + [
        p.read_bytes() for p in sorted((out / "eval" / "images").glob("*.png"))
    ]
    assert len(all_images) == sum(SMALL.values())
    for data in all_images:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
            assert image.format == "PNG"
        assert width % 28 == 0 and height % 28 == 0
        assert smart_resize(height, width) == (height, width)  # training keeps native size
        assert 4 <= image_token_count(height, width) <= 12
        assert len(data) < 1500
        sizes.add((width, height))
    assert len(sizes) >= 3  # several resolutions and aspect ratios actually occur


def test_captions_match_the_pixels(dataset):
    out, _ = dataset
    llava = json.loads((out / "caption" / "llava.json").read_text())
    for record in llava:
        assert record["conversations"][0]["value"].startswith("<image>")
        with Image.open(out / "caption" / record["image"]) as image:
            _check_caption(record["conversations"][1]["value"], _perceive(image))
    for row in pq.read_table(out / "caption" / "mid.parquet").to_pylist():
        with Image.open(io.BytesIO(row["image"]["bytes"])) as image:
            _check_caption(row["caption"], _perceive(image))


def _scenes_file(root: Path) -> dict[str, dict]:
    """``scenes.jsonl`` of the instruct split: the scene of each image, by image name."""
    lines = (root / "instruct" / "scenes.jsonl").read_text().splitlines()
    return {record["image"]: record["scene"] for record in map(json.loads, lines)}


def _as_seen(scene: dict) -> dict:
    """A scene of ``scenes.jsonl`` in the form :func:`_perceive` returns."""
    shapes = {s["position"]: (s["shape"], s["colour"]) for s in scene["shapes"]}
    return {"background": scene["background"], "shapes": shapes}


def test_instruct_answers_match_the_pixels(dataset):
    out, _ = dataset
    checked = 0
    scenes = _scenes_file(out)
    assert len(scenes) == SMALL["n_instruct"]
    for record in json.loads((out / "instruct" / "instruct.json").read_text()):
        with Image.open(out / "instruct" / record["images"][0]) as image:
            seen = _perceive(image)
            size = image.size
        scene = scenes[record["images"][0]]  # the labels a vision tower is pretrained on
        assert _as_seen(scene) == seen and (scene["width"], scene["height"]) == size
        assert scene["layout"] == "free"
        messages = record["messages"]
        for question, answer in zip(messages[::2], messages[1::2], strict=True):
            text = question["content"].removeprefix("<image>\n")
            assert answer["content"] == _answer_from_pixels(text, seen), text
            checked += 1
    assert checked >= 2 * SMALL["n_instruct"]


def test_eval_answers_match_pixels_and_images_are_held_out(dataset):
    out, summary = dataset
    items = sd.load_eval(summary["eval"]["path"])
    assert len(items) == SMALL["n_eval"]
    meta = json.loads((out / sd.METADATA_NAME).read_text())
    types = meta["question_types"]
    assert {item["type"] for item in items} == set(types)  # every question type is asked
    train_pixels = set()
    for data in _training_images(out):
        with Image.open(io.BytesIO(data)) as image:
            train_pixels.add((image.size, image.convert("RGB").tobytes()))
    eval_pixels = set()
    for item in items:
        with Image.open(item["image"]) as image:
            seen = _perceive(image)
            key = (image.size, image.convert("RGB").tobytes())
        assert item["answer"] == _answer_from_pixels(item["question"], seen)
        assert item["answer"] in types[item["type"]]["answers"]
        assert item["chance"] == pytest.approx(types[item["type"]]["chance"])
        assert key not in train_pixels, f"{item['id']} shows a training image"
        eval_pixels.add(key)
    assert len(eval_pixels) == len(items)  # and no eval image is repeated
    chance = sum(item["chance"] for item in items) / len(items)
    assert summary["eval"]["chance_accuracy"] == pytest.approx(chance, abs=1e-5)
    for kind, majority in summary["eval"]["majority_answer_accuracy_per_type"].items():
        asked = [item["answer"] for item in items if item["type"] == kind]
        assert majority == max(map(asked.count, asked)) / len(asked)
    assert set(summary["eval"]["majority_answer_accuracy_per_type"]) == {i["type"] for i in items}


def _pack(inputs: list[str], output: Path, kind: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "tools" / "pack_offline.py"), "--input", *inputs]
    command += ["--output", str(output), "--tokenizer", "qwen-offline", "--seq-len", "512"]
    command += ["--workers", "1", "--kind", kind, "--no-progress"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_packer_accepts_mixed_caption_layouts_and_instruct(dataset, tmp_path):
    _, summary = dataset
    runs = {
        "caption": _pack(summary["caption"]["sources"], tmp_path / "caption", "caption"),
        "instruct": _pack(summary["instruct"]["sources"], tmp_path / "instruct", "instruct"),
    }
    for kind, process in runs.items():
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output
        report = json.loads((tmp_path / kind / "pack_report.json").read_text())
        assert report["kind"] == kind
        assert report["samples_skipped"] == {}
        assert report["samples_packed"] == report["samples_in"] == summary[kind]["count"]
        assert report["seq_len"] == 512


def test_cli_prints_summary_and_refuses_to_clobber(tmp_path, capsys):
    from lov15_megatron.demo import make_shapes_dataset as tool

    argv = ["--out", str(tmp_path / "d"), "--n-caption", "4", "--n-instruct", "3", "--n-eval", "5"]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "caption : 4 samples" in printed and "eval    : 5 questions" in printed
    before = hashlib.sha256(json.dumps(_files(tmp_path / "d"), default=str).encode()).hexdigest()
    assert tool.main(argv) == 2  # exists
    assert "exists" in capsys.readouterr().err
    assert tool.main([*argv, "--seed", "1", "--overwrite"]) == 0
    after = hashlib.sha256(json.dumps(_files(tmp_path / "d"), default=str).encode()).hexdigest()
    assert before != after
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_one_shape_per_image_in_a_crowded_scene_space(tmp_path, monkeypatch):
    # max_shapes=1 (the quickstart's images), 1 size x 1 background: 3 shapes x 4 colours x
    # 5 positions = 60 scenes, most of them drawn for training; the held-out ones stay unseen.
    monkeypatch.setattr(sd, "IMAGE_SIZES", ((56, 56),))
    monkeypatch.setattr(sd, "BACKGROUNDS", {"white": (255, 255, 255)})
    summary = sd.generate_shapes_dataset(
        tmp_path / "d", n_caption=30, n_instruct=30, n_eval=12, max_shapes=1
    )
    meta = json.loads((tmp_path / "d" / sd.METADATA_NAME).read_text())
    assert meta["max_shapes"] == 1 and meta["scene_space"] == 60
    # No count question: with one shape its answer would always be "1".
    assert list(meta["question_types"]) == ["shape", "colour", "position", "background"]
    assert summary["max_shapes"] == 1 and "count" not in summary["chance"]
    train = {hashlib.sha256(data).digest() for data in _training_images(tmp_path / "d")}
    items = sd.load_eval(summary["eval"]["path"])
    held_out = [Path(item["image"]).read_bytes() for item in items]
    assert len(train) < 60 - 12
    assert not train & {hashlib.sha256(data).digest() for data in held_out}
    assert [item["type"] for item in items[:4]] == list(meta["question_types"])
    for item in items:
        with Image.open(item["image"]) as image:
            seen = _perceive(image)
        assert len(seen["shapes"]) == 1
        assert item["answer"] == _answer_from_pixels(item["question"], seen)
    for record in json.loads((tmp_path / "d" / "instruct" / "instruct.json").read_text()):
        with Image.open(tmp_path / "d" / "instruct" / record["images"][0]) as image:
            assert len(_perceive(image)["shapes"]) == 1
        questions = [m["content"] for m in record["messages"][::2]]
        assert "How many shapes are there?" not in "".join(questions)
    with pytest.raises(ValueError, match="scene space"):
        sd.generate_shapes_dataset(
            tmp_path / "full", n_caption=30, n_instruct=30, n_eval=61, max_shapes=1
        )
    with pytest.raises(ValueError, match="max_shapes"):
        sd.generate_shapes_dataset(tmp_path / "none", max_shapes=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_failed_generation_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sd, "_eval_split", broken)
    with pytest.raises(RuntimeError, match="boom"):
        sd.generate_shapes_dataset(tmp_path / "d", n_caption=2, n_instruct=2, n_eval=2)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- grid layout

GRID_SIZES = {(84, 84), (140, 84), (84, 140)}  # 3×3, 5×3 and 3×5 cells of 28 px


def _grid_cell_of(position: str, columns: int, rows: int) -> tuple[int, int]:
    """Where a position name says a shape is: the middle of an edge, or the centre cell."""
    middle_column, middle_row = (columns - 1) // 2, (rows - 1) // 2
    return {
        "top": (middle_column, 0),
        "bottom": (middle_column, rows - 1),
        "left": (0, middle_row),
        "right": (columns - 1, middle_row),
        "center": (middle_column, middle_row),
    }[position]


def _perceive_grid(image: Image.Image) -> dict:
    """Background, and shape/colour per position, read from the pixels of a ``grid`` image.

    Independent of the generator's geometry: each non-background colour's pixels must lie in one
    28-px cell (one LM image token), the cell names the position, and the filled corners of the
    colour's bounding box tell the shape (square: all four; triangle: the two lower ones only;
    circle: none).
    """
    rgb = image.convert("RGB")
    width, height = rgb.size
    assert (width, height) in GRID_SIZES
    columns, rows = width // 28, height // 28
    background = {v: k for k, v in sd.BACKGROUNDS.items()}[rgb.getpixel((0, 0))]
    colour_of = {v: k for k, v in sd.COLOURS.items()}
    pixels: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for y in range(height):
        for x in range(width):
            value = rgb.getpixel((x, y))
            if value != sd.BACKGROUNDS[background]:
                pixels.setdefault(value, []).append((x, y))
    cell_names = {_grid_cell_of(p, columns, rows): p for p in sd.POSITIONS}
    shapes = {}
    for value, points in pixels.items():
        xs, ys = [x for x, _ in points], [y for _, y in points]
        cells = {(x // 28, y // 28) for x, y in points}
        assert len(cells) == 1, f"colour {value} spans cells {cells}"  # one LM token per shape
        (cell,) = cells
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        assert x1 - x0 >= 20 and y1 - y0 >= 20  # large in its cell: 23 px of 28

        def filled(x: int, y: int, value=value) -> bool:
            return rgb.getpixel((x, y)) == value

        corners = [filled(x0, y0), filled(x1, y0), filled(x0, y1), filled(x1, y1)]
        shape = {
            (True, True, True, True): "square",
            (False, False, True, True): "triangle",
            (False, False, False, False): "circle",
        }[tuple(corners)]
        shapes[cell_names[cell]] = (shape, colour_of[value])
    return {"background": background, "shapes": shapes}


@pytest.fixture(scope="module")
def grid_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_grid") / "data"
    summary = sd.generate_shapes_dataset(out, seed=5, layout="grid", **SMALL)
    return out, summary


def test_grid_layout_one_shape_per_lm_token_and_answers_match_the_pixels(grid_dataset):
    out, summary = grid_dataset
    meta = json.loads((out / sd.METADATA_NAME).read_text())
    assert summary["layout"] == meta["layout"] == "grid"
    assert meta["image_tokens"] == {"84x84": 9, "140x84": 15, "84x140": 15}
    assert meta["scene_space"] == 3 * 3 * (3 * 4 * 5 + 3 * 12 * 20 + 1 * 24 * 60)
    sizes = set()
    for record in json.loads((out / "caption" / "llava.json").read_text()):
        with Image.open(out / "caption" / record["image"]) as image:
            _check_caption(record["conversations"][1]["value"], _perceive_grid(image))
    for row in pq.read_table(out / "caption" / "mid.parquet").to_pylist():
        with Image.open(io.BytesIO(row["image"]["bytes"])) as image:
            _check_caption(row["caption"], _perceive_grid(image))
    scenes = _scenes_file(out)
    for record in json.loads((out / "instruct" / "instruct.json").read_text()):
        with Image.open(out / "instruct" / record["images"][0]) as image:
            seen = _perceive_grid(image)
            sizes.add(image.size)
        scene = scenes[record["images"][0]]
        assert _as_seen(scene) == seen and scene["layout"] == "grid"
        messages = record["messages"]
        for question, answer in zip(messages[::2], messages[1::2], strict=True):
            text = question["content"].removeprefix("<image>\n")
            assert answer["content"] == _answer_from_pixels(text, seen), text
    train_pixels = set()
    for data in _training_images(out):
        with Image.open(io.BytesIO(data)) as image:
            train_pixels.add((image.size, image.convert("RGB").tobytes()))
    for item in sd.load_eval(summary["eval"]["path"]):
        with Image.open(item["image"]) as image:
            seen = _perceive_grid(image)
            assert (image.size, image.convert("RGB").tobytes()) not in train_pixels
        assert item["answer"] == _answer_from_pixels(item["question"], seen)
        assert item["scene"]["layout"] == "grid"
    assert sizes == GRID_SIZES  # every size occurs


def test_unknown_layout_is_refused(tmp_path, capsys):
    from lov15_megatron.demo import make_shapes_dataset as tool

    with pytest.raises(ValueError, match="unknown layout 'diagonal'"):
        sd.generate_shapes_dataset(tmp_path / "d", layout="diagonal")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--out", str(tmp_path / "d"), "--layout", "diagonal"])
    assert exit_info.value.code == 2 and "--layout" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- video split

#: Digest (file names, text files, PNG/parquet pixels and texts: independent of zlib) of
#: ``generate_shapes_dataset(seed=5, n_caption=6, n_instruct=4, n_eval=5)`` for each layout,
#: recorded before the video split existed: the opt-in split must leave the default unchanged.
DEFAULT_DIGESTS = {
    "free": "da6b3a5db9ddc80f991ef56afcf46dd195b9c0f3d2c7d579cad89d57ed8a4e2e",
    "grid": "c4ad06f1752260ab1295c4aa5f3bf2003c01ed32dfe6ea40aaf740ee560aeafe",
}
TINY = {"seed": 5, "n_caption": 6, "n_instruct": 4, "n_eval": 5}
VIDEO = {"n_caption": 2, "n_instruct": 1, "n_eval": 0, "n_video": 16, "n_video_eval": 8}
#: What the release's rule (2 fps, at least 4 frames) takes from 8 frames at 4 fps, by hand:
#: n = 8 / 4 · 2 = 4, linspace(0, 7, 4) = 0, 2.33, 4.67, 7.
SAMPLED = [0, 2, 5, 7]


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        if path.suffix == ".png":
            image = Image.open(path)
            digest.update(f"{image.mode}{image.size}".encode() + image.tobytes())
        elif path.suffix == ".parquet":
            for row in pq.read_table(path).to_pylist():
                pixels = Image.open(io.BytesIO(row["image"]["bytes"]))
                digest.update(
                    json.dumps([row["id"], row["image"]["path"], row["caption"]]).encode()
                )
                digest.update(pixels.tobytes())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_default_outputs_unchanged_and_video_split_is_opt_in(tmp_path):
    for layout, expected in DEFAULT_DIGESTS.items():
        summary = sd.generate_shapes_dataset(tmp_path / layout, layout=layout, **TINY)
        assert _digest(tmp_path / layout) == expected, layout
        assert "video" not in summary and not (tmp_path / layout / "video").exists()
    # With the split: the image splits are byte-identical, the metadata only gains the split,
    # and the video files too are a function of the seed.
    for name in ("v1", "v2"):
        sd.generate_shapes_dataset(tmp_path / name, **TINY, n_video=2, n_video_eval=1)
    plain, v1, v2 = (_files(tmp_path / name) for name in ("free", "v1", "v2"))
    assert v1 == v2
    assert {k: v for k, v in v1.items() if not k.startswith("video/")}.keys() == plain.keys()
    for key, data in plain.items():
        if key != sd.METADATA_NAME:
            assert v1[key] == data, key
    meta = json.loads(v1[sd.METADATA_NAME])
    meta["splits"].pop("video")
    assert meta == json.loads(plain[sd.METADATA_NAME])
    with pytest.raises(ValueError, match="n_video_eval .* no effect without n_video"):
        sd.generate_shapes_dataset(tmp_path / "x", n_video_eval=3)


def _near(pixel, rgb, tolerance: int = 3) -> bool:
    """Lossless H.264 in 4:4:4 changes a colour only by the RGB<->YUV rounding (<= 1)."""
    return max(abs(int(a) - b) for a, b in zip(pixel, rgb, strict=True)) <= tolerance


def _perceive_frame(frame) -> dict[tuple[int, int], tuple[str, str]]:
    """``{(column, row): (shape, colour)}`` of a decoded frame, from its pixels only: every
    non-background pixel is one palette colour, each shape lies in one 28-px cell, and the
    filled corners of its bounding box tell the shape (as :func:`_perceive_grid`)."""
    import numpy as np

    height, width, _ = frame.shape
    background = next(n for n, v in sd.BACKGROUNDS.items() if _near(frame[0, 0], v))
    rgb = np.asarray(sd.BACKGROUNDS[background])
    mask = np.abs(frame.astype(int) - rgb).max(axis=2) > 3
    shapes = {}
    ys, xs = np.nonzero(mask)
    for cell in sorted({(int(x) // 28, int(y) // 28) for x, y in zip(xs, ys, strict=True)}):
        column, row = cell
        inside = (xs // 28 == column) & (ys // 28 == row)
        cx, cy = xs[inside], ys[inside]
        x0, x1, y0, y1 = cx.min(), cx.max(), cy.min(), cy.max()
        # well inside its cell: one LM token per shape, never touching a neighbour's cell
        assert 28 * column < x0 and x1 < 28 * column + 27 and 28 * row < y0 and y1 < 28 * row + 27
        assert x1 - x0 >= 20 and y1 - y0 >= 20
        colours = {
            next(n for n, v in sd.COLOURS.items() if _near(frame[y, x], v))
            for x, y in zip(cx, cy, strict=True)
        }
        assert len(colours) == 1, colours  # no blended edge pixels
        corners = tuple(bool(mask[y, x]) for y, x in ((y0, x0), (y0, x1), (y1, x0), (y1, x1)))
        shape = {
            (True, True, True, True): "square",
            (False, False, True, True): "triangle",
            (False, False, False, False): "circle",
        }[corners]
        shapes[cell] = (shape, colours.pop())
    return shapes


def _video_answer(question: str, frames: list[dict]) -> str:
    """The answer that the perceived frames (in time order) give, without the generator."""
    first, last = frames[0], frames[-1]
    where = [{shape: (cell, colour) for cell, (shape, colour) in f.items()} for f in frames]
    if match := re.fullmatch(r"Which way does the (\w+) move\?", question):
        path = [w[match[1]][0] for w in where]  # present in every frame
        (dx, dy) = (path[-1][0] - path[0][0], path[-1][1] - path[0][1])
        assert (dx == 0) != (dy == 0)  # along a row or a column
        steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(path, path[1:], strict=False)]
        assert all(abs(sx) + abs(sy) <= 1 for sx, sy in steps)  # one cell at a time, onwards
        assert all(sx * dx >= 0 and sy * dy >= 0 for sx, sy in steps)
        return {(1, 0): "right", (-1, 0): "left", (0, 1): "down", (0, -1): "up"}[
            (int(dx > 0) - int(dx < 0), int(dy > 0) - int(dy < 0))
        ]
    # A change (colour, appearing, vanishing) is seen by two sampled frames on each side.
    assert frames[0] == frames[1] and frames[-2] == frames[-1] and frames[1] != frames[-2]
    if match := re.fullmatch(r"What colour does the (\w+) turn\?", question):
        before, after = where[0][match[1]][1], where[-1][match[1]][1]
        assert before != after
        return after
    before, after = set(where[0]), set(where[-1])
    if question == "How many shapes appear?":
        assert before < after and first.items() <= last.items()
        return str(len(after - before))
    assert question == "How many shapes disappear?"
    assert after < before and last.items() <= first.items()
    return str(len(before - after))


@pytest.fixture(scope="module")
def video_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_video") / "data"
    return out, sd.generate_shapes_dataset(out, seed=7, **VIDEO)


def _video_config():
    from lov15_megatron.data.video import VideoConfig
    from lov15_megatron.demo.shapes_video import FRAME_MIN_PIXELS

    return VideoConfig(frame_min_pixels=FRAME_MIN_PIXELS)


def test_video_answers_follow_from_the_sampled_frames_pixels(video_dataset):
    from lov15_megatron.data.video import decode_frames, load_video

    out, summary = video_dataset
    video = summary["video"]
    assert video["count"] == 16 and video["kind"] == "instruct"
    assert video["clip"]["sampled_frames"] == SAMPLED and video["clip"]["tokens"] == 4 * 9
    assert video["chance"] == {"move": 0.25, "turn": 0.25, "appear": 0.5, "vanish": 0.5}
    assert video["eval"]["chance_accuracy"] == pytest.approx((0.25 + 0.25 + 0.5 + 0.5) / 4)
    records = json.loads((out / "video" / "llava.json").read_text())
    items = sd.load_eval(video["eval"]["path"])
    # the evaluator's reader takes the file as it is (a video item, its type and chance)
    from lov15_megatron.evaluation import load_qa

    qa = load_qa(video["eval"]["path"])
    assert [(q.videos, q.type, q.answer) for q in qa] == [
        ([Path(i["video"])], i["type"], i["answer"]) for i in items
    ]
    assert [item["type"] for item in items] == ["move", "turn", "appear", "vanish"] * 2
    train_frames = set()
    clips = [(out / "video" / r["video"], r["conversations"]) for r in records]
    clips += [(Path(i["video"]), i) for i in items]
    for path, qa in clips:
        if isinstance(qa, list):  # LLaVA record: one question with its <video>, one answer
            assert [t["from"] for t in qa] == ["human", "gpt"]
            question, answer = qa[0]["value"].removeprefix("<video>\n"), qa[1]["value"]
            assert qa[0]["value"].startswith("<video>\n")
        else:
            question, answer = qa["question"], qa["answer"]
            assert qa["chance"] == video["chance"][qa["type"]]
        plan, frames = load_video(path, _video_config())  # the release's rule, as the packer
        assert list(plan.indices) == SAMPLED and plan.grid_thw == (4, 6, 6)
        seen = [_perceive_frame(frame) for frame in frames]
        assert answer == _video_answer(question, seen), (path, question)
        # the first sampled frame alone does not hold the answer's change
        assert seen[0] != seen[-1]
        every = decode_frames(path, range(8)).tobytes()
        if path.name.startswith("t"):
            train_frames.add(every)
        else:
            assert every not in train_frames  # held out, pixel for pixel


def test_packed_video_samples_keep_the_motion(video_dataset, tmp_path):
    from data_fixtures import pack, read_packs

    from lov15_megatron.data.video import decode_frames
    from lov15_megatron.demo.shapes_video import FRAME_MIN_PIXELS, PACK_FLAGS

    out, summary = video_dataset
    assert PACK_FLAGS == ("--videos", "pack", "--frame-min-pixels", str(FRAME_MIN_PIXELS))
    report = pack(
        summary["video"]["sources"],
        tmp_path / "packed",
        seq_len=512,
        kind="instruct",
        videos="pack",
        frame_min_pixels=FRAME_MIN_PIXELS,
    )
    assert report["samples_in"] == report["samples_packed"] == 16
    assert report["samples_skipped"] == {}
    assert (report["videos"]["videos"], report["videos"]["frames"]) == (16, 16 * 4)
    answers = {
        r["id"]: (r["conversations"][0]["value"], r["conversations"][1]["value"], r["video"])
        for r in json.loads((out / "video" / "llava.json").read_text())
    }
    checked = 0
    for record, members in read_packs(tmp_path / "packed").values():
        for sample in record["samples"]:
            key = sample["origin"].split("(id ")[-1].rstrip(")")
            question, answer, name = answers[key]
            (packed,) = sample["videos"]
            assert packed["frames"] == SAMPLED and packed["grid_thw"] == [4, 6, 6]
            assert (packed["total_frames"], packed["fps"], packed["size"]) == (8, 4.0, [84, 84])
            (stored,) = (members[part] for part in packed["parts"])
            assert stored == (out / "video" / name).read_bytes()
            frames = decode_frames(stored, packed["frames"])
            seen = [_perceive_frame(frame) for frame in frames]
            assert _video_answer(question.removeprefix("<video>\n"), seen) == answer
            checked += 1
    assert checked == 16


def test_cli_video_flags(tmp_path, capsys):
    from lov15_megatron.demo import make_shapes_dataset as tool

    assert tool.main(["--out", str(tmp_path / "d"), "--n-video-eval", "2"]) == 2
    assert "no effect without n_video" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    args = ["--out", str(tmp_path / "d"), "--n-caption", "2", "--n-instruct", "1"]
    assert tool.main([*args, "--n-eval", "0", "--n-video", "3", "--n-video-eval", "2"]) == 0
    printed = capsys.readouterr().out
    assert "video   : 3 clips (8 frames of 84x84 at 4 fps, 4 sampled, 36 tokens)" in printed
    assert "--videos pack --frame-min-pixels 784" in printed
    assert len(list((tmp_path / "d" / "video" / "clips").glob("*.mp4"))) == 5
