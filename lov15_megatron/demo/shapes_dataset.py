"""A procedurally generated vision-language data set that a tiny VLM can learn on CPU in minutes.

Every image is a plain background with 1–3 shapes (circle, square, triangle; at most
``max_shapes``) of distinct colours at distinct coarse positions (top, left, center, right,
bottom), drawn with PIL without anti-aliasing at small native sizes whose sides are multiples of
28. Two layouts (:data:`LAYOUTS`): ``free`` (the default) places shapes at fixed fractions of
one of four sizes (4–12 LM image tokens with patch 14 and a 2×2 merge), where a shape may
straddle the 28-pixel cells that become LM tokens; ``grid`` centres every shape, larger, in one
28-pixel cell of one of three sizes (9–15 tokens), so that each LM image token shows at most one
shape (what the quickstart uses: a tiny model learns to read it in minutes). The text is regular
and tiny-vocabulary:

- ``caption`` (stages 1 / 1.5): ``"two shapes: a red circle on the left and a blue square at the
  top, white background"``, in two raw layouts the packer reads: LLaVA JSON with an image folder
  and a mid-training-style parquet (``id``, ``image`` = ``{bytes, path}``, ``caption``);
- ``instruct`` (stage 2): "messages/images" JSON, multi-turn one-word question answering about
  one image (see :data:`QUESTION_TYPES`), and each image's scene (``scenes.jsonl``: labels for
  pretraining a vision tower, see ``demo/vision_pretrain.py``);
- ``eval``: a JSONL of held-out ``(image, question, answer)`` items whose scenes (and therefore
  images) never occur in ``caption`` or ``instruct``;
- ``video`` (opt-in, ``n_video > 0``): short mp4 clips of moving, colour-turning, appearing and
  vanishing shapes with one question each that needs more than one frame, as LLaVA JSON with a
  ``video`` key and a held-out eval JSONL (:mod:`.shapes_video`). Off, nothing else changes: the
  split draws from its own random stream.

Everything is a function of the seed: the same arguments give byte-identical files (paths in the
files are relative, so the output folder may be anywhere). See ``docs/shapes-dataset.md``.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .shapes_common import (
    BACKGROUNDS,
    COLOURS,
    GRID_CELL,
    GRID_RADIUS,
    SHAPES,
    draw_shape,
    dump_json,
    write_file,
)

FORMAT_VERSION = 1
METADATA_NAME = "metadata.json"

#: Native image sizes (width, height) of the ``free`` layout; multiples of 28, so the resize
#: keeps them unchanged.
IMAGE_SIZES: tuple[tuple[int, int], ...] = ((56, 56), (84, 56), (56, 112), (112, 84))
#: ``free``: shapes at fixed fractions of the image (:data:`POSITION_FRACTIONS`); ``grid``: each
#: shape centred in one :data:`GRID_CELL` cell (:func:`grid_cell`), so one LM token per shape.
LAYOUTS: tuple[str, ...] = ("free", "grid")
#: ``grid`` sizes: odd numbers of cells per side, so that there is a middle row and column.
GRID_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((84, 84), (140, 84), (84, 140))
#: Canonical position order (also the order in which captions list the shapes).
POSITIONS: tuple[str, ...] = ("top", "left", "center", "right", "bottom")
#: Shape centre as a fraction of (width, height).
POSITION_FRACTIONS: dict[str, tuple[float, float]] = {
    "top": (0.5, 0.18),
    "left": (0.18, 0.5),
    "center": (0.5, 0.5),
    "right": (0.82, 0.5),
    "bottom": (0.5, 0.82),
}
PREPOSITIONS: dict[str, str] = {
    "top": "at the top",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom": "at the bottom",
}
#: Shape "radius" / min(width, height): circle radius, square half-side, half the triangle's base
#: and height. Shapes at neighbouring positions stay a few pixels apart.
RADIUS_FRACTION = 0.13
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
MAX_SHAPES = 3
CAPTION_PROMPT = "Describe the image."


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape."""

    shape: str
    colour: str
    position: str


@dataclass(frozen=True)
class Scene:
    """Everything an image is drawn from; shapes are kept in canonical position order."""

    width: int
    height: int
    background: str
    shapes: tuple[ShapeSpec, ...]
    layout: str = "free"  # one of LAYOUTS: where a position is in the image

    def shape_at(self, position: str) -> ShapeSpec:
        return next(spec for spec in self.shapes if spec.position == position)

    def shape_named(self, shape: str) -> ShapeSpec:
        return next(spec for spec in self.shapes if spec.shape == shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "shapes": [
                {"shape": s.shape, "colour": s.colour, "position": s.position} for s in self.shapes
            ],
            "layout": self.layout,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scene:
        """The scene of :meth:`to_json`'s output (``layout`` defaults to ``free``)."""
        shapes = tuple(ShapeSpec(s["shape"], s["colour"], s["position"]) for s in data["shapes"])
        return cls(
            data["width"], data["height"], data["background"], shapes, data.get("layout", "free")
        )


@dataclass(frozen=True)
class QuestionType:
    """A family of one-word questions; ``chance`` = 1 / number of possible answers."""

    name: str
    template: str
    answers: tuple[str, ...]
    ask: Callable[[Scene, random.Random], tuple[str, str]]

    @property
    def chance(self) -> float:
        return 1.0 / len(self.answers)


def _ask_count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    return "How many shapes are there?", str(len(scene.shapes))


def _ask_shape(scene: Scene, rng: random.Random) -> tuple[str, str]:
    spec = rng.choice(scene.shapes)
    return f"What shape is {PREPOSITIONS[spec.position]}?", spec.shape


def _ask_colour(scene: Scene, rng: random.Random) -> tuple[str, str]:
    spec = rng.choice(scene.shapes)
    return f"What colour is the {spec.shape}?", spec.colour


def _ask_position(scene: Scene, rng: random.Random) -> tuple[str, str]:
    spec = rng.choice(scene.shapes)
    return f"Where is the {spec.shape}?", spec.position


def _ask_background(scene: Scene, rng: random.Random) -> tuple[str, str]:
    return "What colour is the background?", scene.background


def question_types(max_shapes: int = MAX_SHAPES) -> dict[str, QuestionType]:
    """The question types of ``instruct`` and ``eval`` for scenes of 1..``max_shapes`` shapes.

    Answers are one lower-case word. With one shape per image there is no count question (its
    answer would always be "1").
    """
    count = QuestionType(
        "count",
        "How many shapes are there?",
        tuple(str(n) for n in range(1, max_shapes + 1)),
        _ask_count,
    )
    return {
        q.name: q for q in (count, *_IMAGE_QUESTION_TYPES) if q.name != "count" or max_shapes > 1
    }


_IMAGE_QUESTION_TYPES: tuple[QuestionType, ...] = (
    QuestionType(
        "shape", "What shape is {on the left|at the top|in the center|…}?", SHAPES, _ask_shape
    ),
    QuestionType("colour", "What colour is the {shape}?", tuple(COLOURS), _ask_colour),
    QuestionType("position", "Where is the {shape}?", POSITIONS, _ask_position),
    QuestionType(
        "background", "What colour is the background?", tuple(BACKGROUNDS), _ask_background
    ),
)
#: The question types of the default scenes (1..MAX_SHAPES shapes).
QUESTION_TYPES: dict[str, QuestionType] = question_types()


# ----------------------------------------------------------------------------- drawing


def image_sizes(layout: str = "free") -> tuple[tuple[int, int], ...]:
    """The native sizes a layout draws from."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return GRID_IMAGE_SIZES if layout == "grid" else IMAGE_SIZES


def grid_cell(width: int, height: int, position: str) -> tuple[int, int]:
    """``(column, row)`` of a position's cell in the ``grid`` layout: the middle cell of an edge
    (top, left, right, bottom) or the centre cell."""
    columns, rows = width // GRID_CELL, height // GRID_CELL
    cells = {
        "top": (columns // 2, 0),
        "left": (0, rows // 2),
        "center": (columns // 2, rows // 2),
        "right": (columns - 1, rows // 2),
        "bottom": (columns // 2, rows - 1),
    }
    return cells[position]


def shape_geometry(scene: Scene, spec: ShapeSpec) -> tuple[int, int, int]:
    """``(cx, cy, r)`` in pixels of a shape in its scene (integer, so drawing is exact)."""
    if scene.layout == "grid":
        column, row = grid_cell(scene.width, scene.height, spec.position)
        half = GRID_CELL // 2
        return column * GRID_CELL + half, row * GRID_CELL + half, GRID_RADIUS
    fx, fy = POSITION_FRACTIONS[spec.position]
    radius = round(RADIUS_FRACTION * min(scene.width, scene.height))
    return round(fx * scene.width), round(fy * scene.height), radius


def draw_scene(scene: Scene) -> Image.Image:
    """The RGB image of a scene (no anti-aliasing: every pixel is a palette colour)."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for spec in scene.shapes:
        draw_shape(draw, spec.shape, spec.colour, *shape_geometry(scene, spec))
    return image


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of an image (deterministic for a given Pillow/zlib)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- text


def caption_of(scene: Scene) -> str:
    """The caption: shapes in canonical position order, a count when there are several."""
    parts = [f"a {s.colour} {s.shape} {PREPOSITIONS[s.position]}" for s in scene.shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if len(parts) > 1:
        listed = f"{COUNT_WORDS[len(parts)]} shapes: {listed}"
    return f"{listed}, {scene.background} background"


def random_scene(
    rng: random.Random,
    num_shapes: int | None = None,
    max_shapes: int = MAX_SHAPES,
    layout: str = "free",
) -> Scene:
    """A uniformly drawn scene of 1..``max_shapes`` distinct shape types, colours, positions."""
    count = num_shapes if num_shapes is not None else rng.randint(1, max_shapes)
    width, height = rng.choice(image_sizes(layout))
    background = rng.choice(tuple(BACKGROUNDS))
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(tuple(COLOURS), count)
    positions = rng.sample(POSITIONS, count)
    specs = sorted(
        (ShapeSpec(s, c, p) for s, c, p in zip(shapes, colours, positions, strict=True)),
        key=lambda spec: POSITIONS.index(spec.position),
    )
    return Scene(width, height, background, tuple(specs), layout)


def scene_space_size(max_shapes: int = MAX_SHAPES, layout: str = "free") -> int:
    """Number of distinct scenes of 1..``max_shapes`` shapes (sizes × backgrounds × shape sets)."""
    from math import comb, perm

    shape_sets = sum(
        comb(len(SHAPES), n) * perm(len(COLOURS), n) * perm(len(POSITIONS), n)
        for n in range(1, max_shapes + 1)
    )
    return len(image_sizes(layout)) * len(BACKGROUNDS) * shape_sets


def ask(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """``(question, answer)`` of the given question type about a scene."""
    return QUESTION_TYPES[kind].ask(scene, rng)


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Image:
    name: str  # relative to its split folder
    scene: Scene
    data: bytes


def _make_images(
    rng: random.Random,
    prefix: str,
    count: int,
    max_shapes: int,
    layout: str,
    avoid: set[Scene] | None = None,
) -> list[_Image]:
    images = []
    for index in range(count):
        scene = random_scene(rng, max_shapes=max_shapes, layout=layout)
        if avoid is not None:
            attempts = 0
            while scene in avoid:
                attempts += 1
                if attempts > 10_000:
                    raise ValueError(
                        "cannot draw held-out scenes: the training sets cover the scene space "
                        f"({scene_space_size(max_shapes, layout)} scenes); use fewer training "
                        "samples"
                    )
                scene = random_scene(rng, len(scene.shapes), layout=layout)
            avoid.add(scene)
        images.append(
            _Image(f"images/{prefix}{index:05d}.png", scene, encode_png(draw_scene(scene)))
        )
    return images


def _write_images(root: Path, images: Sequence[_Image]) -> None:
    for image in images:
        write_file(root / image.name, image.data)


def _caption_split(
    root: Path, rng: random.Random, count: int, max_shapes: int, layout: str
) -> dict[str, Any]:
    """Half LLaVA JSON (stage-1 style, with a prompt), half parquet (mid-training style)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = _make_images(rng, "c", count, max_shapes, layout)
    n_llava = (count + 1) // 2
    llava = [
        {
            "id": f"caption-{index:05d}",
            "image": image.name,
            "conversations": [
                {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                {"from": "gpt", "value": caption_of(image.scene)},
            ],
        }
        for index, image in enumerate(images[:n_llava])
    ]
    _write_images(root, images[:n_llava])
    write_file(root / "llava.json", dump_json(llava))
    rows = [
        {
            "id": f"caption-{n_llava + index:05d}",
            "image": {"bytes": image.data, "path": image.name.rsplit("/", 1)[-1]},
            "caption": caption_of(image.scene),
        }
        for index, image in enumerate(images[n_llava:])
    ]
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("caption", pa.string()),
        ]
    )
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema),
        root / "mid.parquet",
        row_group_size=256,
        compression="none",  # PNG bytes do not compress further
    )
    return {
        "kind": "caption",
        "sources": ["caption/llava.json", "caption/mid.parquet"],
        "samples": count,
        "samples_per_source": {"caption/llava.json": n_llava, "caption/mid.parquet": len(rows)},
        "scenes": [image.scene for image in images],
    }


def _instruct_split(
    root: Path, rng: random.Random, count: int, max_shapes: int, layout: str
) -> dict[str, Any]:
    """'messages/images' JSON; 2–4 one-word QA turns of distinct types per image; the scenes."""
    images = _make_images(rng, "i", count, max_shapes, layout)
    types = tuple(question_types(max_shapes))
    records = []
    turns = Counter[str]()
    for index, image in enumerate(images):
        kinds = rng.sample(types, rng.randint(2, min(4, len(types))))
        messages = []
        for turn, kind in enumerate(kinds):
            question, answer = ask(image.scene, kind, rng)
            messages.append(
                {"role": "user", "content": ("<image>\n" if turn == 0 else "") + question}
            )
            messages.append({"role": "assistant", "content": answer})
            turns[kind] += 1
        records.append(
            {"id": f"instruct-{index:05d}", "messages": messages, "images": [image.name]}
        )
    _write_images(root, images)
    write_file(root / "instruct.json", dump_json(records))
    scenes = [json.dumps({"image": i.name, "scene": i.scene.to_json()}) for i in images]
    write_file(root / "scenes.jsonl", "\n".join(scenes) + "\n")
    return {
        "kind": "instruct",
        "sources": ["instruct/instruct.json"],
        "scenes_file": "instruct/scenes.jsonl",
        "samples": count,
        "qa_turns": dict(sorted(turns.items())),
        "scenes": [image.scene for image in images],
    }


def _eval_split(
    root: Path, rng: random.Random, count: int, max_shapes: int, layout: str, seen: set[Scene]
) -> dict[str, Any]:
    """One question per held-out image, question types in rotation."""
    images = _make_images(rng, "e", count, max_shapes, layout, avoid=seen)
    types = question_types(max_shapes)
    kinds = tuple(types)
    lines = []
    per_type = Counter[str]()
    answers: dict[str, Counter[str]] = {kind: Counter() for kind in kinds}
    for index, image in enumerate(images):
        kind = kinds[index % len(kinds)]
        question, answer = ask(image.scene, kind, rng)
        per_type[kind] += 1
        answers[kind][answer] += 1
        record = {
            "id": f"eval-{index:05d}",
            "image": image.name,
            "question": question,
            "answer": answer,
            "type": kind,
            "chance": round(types[kind].chance, 6),
            "scene": image.scene.to_json(),
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    _write_images(root, images)
    write_file(root / "eval.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    chance = sum(types[kinds[i % len(kinds)]].chance for i in range(count))
    majority = sum(counter.most_common(1)[0][1] for counter in answers.values() if counter)
    return {
        "path": "eval/eval.jsonl",
        "questions": count,
        "questions_per_type": {kind: per_type[kind] for kind in kinds},
        "chance_accuracy": round(chance / count, 6) if count else None,
        "majority_answer_accuracy": round(majority / count, 6) if count else None,
        # Per type: always answering that type's most frequent held-out answer.
        "majority_answer_accuracy_per_type": {
            kind: counter.most_common(1)[0][1] / per_type[kind]
            for kind, counter in answers.items()
            if counter
        },
    }


def _metadata(
    seed: int, max_shapes: int, layout: str, splits: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    sizes = image_sizes(layout)
    return {
        "name": "lov15-shapes",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "max_shapes": max_shapes,
        "layout": layout,
        "image_sizes": [f"{w}x{h}" for w, h in sizes],
        "image_tokens": {f"{w}x{h}": (w // 28) * (h // 28) for w, h in sizes},
        "scene_space": scene_space_size(max_shapes, layout),
        "caption_prompt": CAPTION_PROMPT,
        "question_types": {
            q.name: {
                "template": q.template,
                "answers": list(q.answers),
                "chance": round(q.chance, 6),
            }
            for q in question_types(max_shapes).values()
        },
        "splits": splits,
    }


def _total_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def _eval_summary(root: Path, split: dict[str, Any]) -> dict[str, Any]:
    """An eval split's entry of the summary (its metadata with the path made absolute)."""
    keys = ("chance_accuracy", "majority_answer_accuracy", "majority_answer_accuracy_per_type")
    return {
        "path": str(root / split["path"]),
        "count": split["questions"],
        **{key: split[key] for key in keys},
    }


def _absolute(root: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The summary returned by :func:`generate_shapes_dataset` (absolute paths)."""
    splits = meta["splits"]
    summary = {
        "root": str(root),
        "metadata": str(root / METADATA_NAME),
        "seed": meta["seed"],
        "max_shapes": meta["max_shapes"],
        "layout": meta["layout"],
        "caption": {
            "sources": [str(root / p) for p in splits["caption"]["sources"]],
            "count": splits["caption"]["samples"],
            "kind": "caption",
        },
        "instruct": {
            "sources": [str(root / p) for p in splits["instruct"]["sources"]],
            "count": splits["instruct"]["samples"],
            "kind": "instruct",
            "scenes": str(root / splits["instruct"]["scenes_file"]),
        },
        "eval": _eval_summary(root, splits["eval"]),
        "chance": {name: q["chance"] for name, q in meta["question_types"].items()},
        "bytes": _total_bytes(root),
    }
    if "video" in splits:
        video = splits["video"]
        summary["video"] = {
            "sources": [str(root / p) for p in video["sources"]],
            "count": video["samples"],
            "kind": video["kind"],
            "pack_flags": video["pack_flags"],
            "clip": video["clip"],
            "chance": {name: q["chance"] for name, q in video["question_types"].items()},
            "eval": _eval_summary(root, video["eval"]),
        }
    return summary


def generate_shapes_dataset(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_caption: int = 600,
    n_instruct: int = 600,
    n_eval: int = 60,
    overwrite: bool = False,
    max_shapes: int = MAX_SHAPES,
    layout: str = "free",
    n_video: int = 0,
    n_video_eval: int | None = None,
) -> dict[str, Any]:
    """Generate the data set into ``out_dir`` (atomically: a temp folder renamed at the end).

    Layout::

        out_dir/metadata.json          seed, sizes, question types with chance levels, splits
        out_dir/caption/llava.json     LLaVA records, images under caption/images/
        out_dir/caption/mid.parquet    id, image {bytes, path}, caption
        out_dir/instruct/instruct.json "messages/images" records, images under instruct/images/
        out_dir/instruct/scenes.jsonl  {image, scene} per instruct image
        out_dir/eval/eval.jsonl        {id, image, question, answer, type, chance, scene}
        out_dir/video/llava.json       only with n_video > 0: LLaVA records with a ``video``
        out_dir/video/eval.jsonl       {id, video, question, answer, type, chance, clip}
        out_dir/video/clips/           t*.mp4 (training) and e*.mp4 (held out)

    Returns a summary: ``root``, ``metadata``, ``seed``, ``caption``/``instruct`` (``sources``:
    absolute paths for ``tools/pack_offline.py --input``, ``count``, ``kind``; ``instruct`` also
    ``scenes``, the path of ``scenes.jsonl``), ``eval``
    (``path``, ``count``, ``chance_accuracy``, ``majority_answer_accuracy`` and its
    ``…_per_type``), ``chance`` (per
    question type) and ``bytes``. Every image has 1..``max_shapes`` shapes (at most
    :data:`MAX_SHAPES`), drawn in ``layout`` (one of :data:`LAYOUTS`). Raises
    :class:`FileExistsError` if ``out_dir`` exists and ``overwrite`` is false.

    ``n_video`` training clips and ``n_video_eval`` held-out ones (default 40 when ``n_video`` is
    set; an error without it) add the ``video`` split and a ``video`` entry to the summary
    (``sources``, ``count``, ``kind``, ``pack_flags`` for the packer, ``clip``, ``chance``,
    ``eval``); clips use the 28-px grid cells whatever ``layout`` is.
    """
    if n_caption < 2 or n_instruct < 1 or n_eval < 0:
        # Two caption samples at least: one per layout (LLaVA JSON and parquet).
        raise ValueError("need n_caption >= 2, n_instruct >= 1 and n_eval >= 0")
    if not 1 <= max_shapes <= MAX_SHAPES:
        raise ValueError(f"need 1 <= max_shapes <= {MAX_SHAPES}, got {max_shapes}")
    image_sizes(layout)  # an unknown layout raises here, before anything is written
    if n_video < 0 or (n_video_eval is not None and n_video_eval < 0):
        raise ValueError("need n_video >= 0 and n_video_eval >= 0")
    if n_video == 0 and n_video_eval is not None:
        raise ValueError("n_video_eval (--n-video-eval) has no effect without n_video (--n-video)")
    if n_video_eval is None:
        n_video_eval = 40
    root = Path(out_dir).expanduser().resolve()
    if root.exists() and not overwrite:
        raise FileExistsError(f"{root} exists (pass overwrite=True / --overwrite to replace it)")
    root.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    try:
        caption = _caption_split(
            temp / "caption",
            random.Random(f"shapes-{seed}-caption"),
            n_caption,
            max_shapes,
            layout,
        )
        instruct = _instruct_split(
            temp / "instruct",
            random.Random(f"shapes-{seed}-instruct"),
            n_instruct,
            max_shapes,
            layout,
        )
        seen = set(caption.pop("scenes")) | set(instruct.pop("scenes"))
        evaluation = _eval_split(
            temp / "eval", random.Random(f"shapes-{seed}-eval"), n_eval, max_shapes, layout, seen
        )
        splits = {"caption": caption, "instruct": instruct, "eval": evaluation}
        if n_video:
            from .shapes_video import video_split

            splits["video"] = video_split(
                temp / "video", random.Random(f"shapes-{seed}-video"), n_video, n_video_eval
            )
        meta = _metadata(seed, max_shapes, layout, splits)
        write_file(temp / METADATA_NAME, dump_json(meta))
        os.chmod(temp, 0o755)  # mkdtemp makes it 0700
        if root.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
            os.replace(root, trash / root.name)
            os.replace(temp, root)
            shutil.rmtree(trash)
        else:
            os.replace(temp, root)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return _absolute(root, meta)


def load_eval(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The eval items with ``image`` (or a video eval's ``video``) made absolute (relative to
    the JSONL's folder)."""
    path = Path(path)
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            for key in ("image", "video"):
                if key in item:
                    item[key] = str(path.parent / item[key])
            items.append(item)
    return items


def format_summary(summary: dict[str, Any]) -> str:
    """A human-readable summary of :func:`generate_shapes_dataset`'s result."""
    chance = ", ".join(f"{name} {value:.3f}" for name, value in summary["chance"].items())
    ev = summary["eval"]
    lines = [
        f"shapes data set (seed {summary['seed']}, {summary['layout']} layout) in "
        f"{summary['root']}: {summary['bytes'] / 1024:.0f} KiB",
        f"  caption : {summary['caption']['count']} samples in "
        + ", ".join(summary["caption"]["sources"]),
        f"  instruct: {summary['instruct']['count']} samples in "
        + ", ".join(summary["instruct"]["sources"]),
        f"  eval    : {ev['count']} questions in {ev['path']}",
        f"  chance per question type: {chance}",
    ]
    if ev["count"]:
        lines.append(
            f"  eval chance accuracy {ev['chance_accuracy']:.3f}, "
            f"always-most-frequent-answer accuracy {ev['majority_answer_accuracy']:.3f}"
        )
    if "video" in summary:
        video = summary["video"]
        clip = video["clip"]
        chance = ", ".join(f"{name} {value:.3f}" for name, value in video["chance"].items())
        lines += [
            f"  video   : {video['count']} clips ({clip['frames']} frames of {clip['size']} at "
            f"{clip['fps']} fps, {len(clip['sampled_frames'])} sampled, {clip['tokens']} tokens) "
            f"in {', '.join(video['sources'])}; pack with {' '.join(video['pack_flags'])}",
            f"  video eval: {video['eval']['count']} questions in {video['eval']['path']}; "
            f"chance per type: {chance}",
        ]
        if video["eval"]["count"]:
            lines.append(
                f"  video eval chance accuracy {video['eval']['chance_accuracy']:.3f}, "
                "always-most-frequent-answer accuracy "
                f"{video['eval']['majority_answer_accuracy']:.3f}"
            )
    return "\n".join(lines)
