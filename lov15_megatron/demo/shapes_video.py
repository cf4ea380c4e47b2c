"""Short generated clips for the shapes data set: questions that need more than one frame.

A clip is :data:`VIDEO_FRAMES` frames of :data:`VIDEO_WIDTH` × :data:`VIDEO_HEIGHT` pixels at
:data:`VIDEO_FPS` frames per second, drawn on the ``grid`` layout's 28-pixel cells (a 3 × 3 grid:
one shape per cell, one LM token per cell after the 2×2 merge). Each clip shows one *event* of
one or two shapes (:data:`EVENTS`):

- ``move``: a shape slides one or two cells left, right, up or down (one cell per step);
- ``turn``: a shape changes colour half-way through;
- ``appear``: one or two shapes appear half-way through (beside zero or one that is always there);
- ``vanish``: one or two shapes disappear half-way through (beside zero or one that stays).

``appear`` and ``vanish`` ask *how many* shapes appear or disappear: the answer is a change in the
number of shapes between frames, which no single frame shows and which the tiny quickstart's
vision tower reads (it counts shapes; it does not tell shapes apart or place them, see
``docs/quickstart.md``). ``turn`` needs a shape's colour after the change and ``move`` its cell
in the first and last frames.

Every event is a function of the clip's phase ``t = frame / (frames - 1)`` (changes at
``t = 0.5``; a move reaches its next cell at rounded ``t · distance``), so that the release's
frame sampling (2 fps, at least 4 frames: frames 0, 2, 5 and 7 of the 8) keeps two frames before
the change and two after, and the first and last cells of a move (:func:`sampled_frames`).

Clips are written as H.264 (PyAV's ``libx264``) in an mp4 container, lossless (``qp 0``) in
4:4:4 chroma: the decoded RGB differs from the drawn one only by the RGB↔YUV rounding (at most 1
per channel), so colours and edges survive exactly enough to be read back from the pixels.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections import Counter
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

#: Frame size: 3 × 3 cells of 28 px, 9 LM tokens per frame.
VIDEO_WIDTH = VIDEO_HEIGHT = 84
VIDEO_FRAMES = 8
VIDEO_FPS = 4
#: The phase at which colours turn and shapes appear or vanish.
CHANGE_AT = 0.5
EVENTS: tuple[str, ...] = ("move", "turn", "appear", "vanish")
#: Unit step (columns, rows) of each direction; rows grow downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
#: Encoder settings (see the module docstring).
CODEC = "libx264"
PIX_FMT = "yuv444p"
CODEC_OPTIONS = {"qp": "0"}
#: ``--frame-min-pixels`` for the packer (and the processor): the release's floor
#: (1.05 · 128·28² pixels) would enlarge an 84×84 frame to 336×336 (144 tokens instead of 9);
#: any floor up to 6,720 keeps it native.
FRAME_MIN_PIXELS = GRID_CELL * GRID_CELL
#: The packer flags the video split needs (``tools/pack_offline.py … --kind instruct``).
PACK_FLAGS: tuple[str, ...] = ("--videos", "pack", "--frame-min-pixels", str(FRAME_MIN_PIXELS))

Cell = tuple[int, int]  # (column, row)


@dataclass(frozen=True)
class VideoQuestionType:
    """One question per event; ``chance`` = 1 / number of possible answers."""

    name: str
    template: str
    answers: tuple[str, ...]

    @property
    def chance(self) -> float:
        return 1.0 / len(self.answers)


VIDEO_QUESTION_TYPES: dict[str, VideoQuestionType] = {
    q.name: q
    for q in (
        VideoQuestionType("move", "Which way does the {shape} move?", tuple(DIRECTIONS)),
        VideoQuestionType("turn", "What colour does the {shape} turn?", tuple(COLOURS)),
        VideoQuestionType("appear", "How many shapes appear?", ("1", "2")),
        VideoQuestionType("vanish", "How many shapes disappear?", ("1", "2")),
    )
}


def _step(phase: float, distance: int) -> int:
    """Cells moved by ``phase`` of a ``distance``-cell move (half-way rounds onwards)."""
    return int(math.copysign(math.floor(phase * abs(distance) + 0.5), distance))


@dataclass(frozen=True)
class Track:
    """One shape of a clip: where it starts and ends, its colour before and after the change,
    and whether it is there ``always``, ``appears`` or ``vanishes``."""

    shape: str
    colour: str
    start: Cell
    end: Cell
    colour_after: str
    visible: str = "always"

    def at(self, phase: float) -> tuple[Cell, str] | None:
        """``(cell, colour)`` at a phase in [0, 1], or None while the shape is absent."""
        after = phase >= CHANGE_AT
        if (self.visible == "appears" and not after) or (self.visible == "vanishes" and after):
            return None
        column = self.start[0] + _step(phase, self.end[0] - self.start[0])
        row = self.start[1] + _step(phase, self.end[1] - self.start[1])
        return (column, row), self.colour_after if after else self.colour

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "start": list(self.start),
            "end": list(self.end),
            "colour_after": self.colour_after,
            "visible": self.visible,
        }


@dataclass(frozen=True)
class Clip:
    """Everything a clip is drawn from; tracks in order of their start cell (row, column)."""

    event: str
    background: str
    tracks: tuple[Track, ...]

    def frame(self, index: int) -> list[tuple[Cell, str, str]]:
        """``(cell, shape, colour)`` of every shape present in frame ``index``."""
        present = []
        for track in self.tracks:
            state = track.at(index / (VIDEO_FRAMES - 1))
            if state is not None:
                present.append((state[0], track.shape, state[1]))
        return present

    def question(self) -> tuple[str, str]:
        """``(question, one-word answer)`` about the clip's event."""
        template = VIDEO_QUESTION_TYPES[self.event].template
        if self.event == "move":
            track = next(t for t in self.tracks if t.start != t.end)
            step = tuple(_sign(b - a) for a, b in zip(track.start, track.end, strict=True))
            direction = next(name for name, unit in DIRECTIONS.items() if unit == step)
            return template.format(shape=track.shape), direction
        if self.event == "turn":
            track = next(t for t in self.tracks if t.colour_after != t.colour)
            return template.format(shape=track.shape), track.colour_after
        if self.event == "appear":
            return template, str(sum(t.visible == "appears" for t in self.tracks))
        return template, str(sum(t.visible == "vanishes" for t in self.tracks))

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.event,
            "background": self.background,
            "tracks": [t.to_json() for t in self.tracks],
        }


def _sign(value: int) -> int:
    return (value > 0) - (value < 0)


def sampled_frames() -> tuple[int, ...]:
    """The frames the release's rule (2 fps, 4 … 768 frames) takes from a clip, and checks
    that it keeps the native size (with :data:`FRAME_MIN_PIXELS`)."""
    from lov15_megatron.data.video import VideoConfig, plan_video

    config = VideoConfig(frame_min_pixels=FRAME_MIN_PIXELS)
    plan = plan_video(VIDEO_FRAMES, VIDEO_FPS, VIDEO_HEIGHT, VIDEO_WIDTH, config)
    assert (plan.height, plan.width) == (VIDEO_HEIGHT, VIDEO_WIDTH)
    return plan.indices


def tokens_per_clip() -> int:
    """``<|video_pad|>`` tokens of one packed clip: sampled frames × cells."""
    return len(sampled_frames()) * (VIDEO_WIDTH // GRID_CELL) * (VIDEO_HEIGHT // GRID_CELL)


# ----------------------------------------------------------------------------- drawing


def draw_frame(clip: Clip, index: int) -> Image.Image:
    """The RGB frame ``index`` of a clip (no anti-aliasing, as the images)."""
    image = Image.new("RGB", (VIDEO_WIDTH, VIDEO_HEIGHT), BACKGROUNDS[clip.background])
    draw = ImageDraw.Draw(image)
    half = GRID_CELL // 2
    for (column, row), shape, colour in clip.frame(index):
        x, y = column * GRID_CELL + half, row * GRID_CELL + half
        draw_shape(draw, shape, colour, x, y, GRID_RADIUS)
    return image


def encode_clip(clip: Clip) -> bytes:
    """The clip as an mp4 (H.264, lossless, 4:4:4; one encoder thread, so the bytes are a
    function of the clip for a given PyAV)."""
    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(CODEC, rate=VIDEO_FPS)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = VIDEO_WIDTH, VIDEO_HEIGHT, PIX_FMT
        stream.options = dict(CODEC_OPTIONS)
        stream.codec_context.thread_count = 1
        for index in range(VIDEO_FRAMES):
            pixels = np.asarray(draw_frame(clip, index))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


# ----------------------------------------------------------------------------- drawing clips

_CELLS: tuple[Cell, ...] = tuple((c, r) for r in range(3) for c in range(3))


def _line(start: Cell, end: Cell) -> set[Cell]:
    """The cells a move passes through."""
    dc, dr = _sign(end[0] - start[0]), _sign(end[1] - start[1])
    cells, cell = {start}, start
    while cell != end:
        cell = (cell[0] + dc, cell[1] + dr)
        cells.add(cell)
    return cells


def random_clip(rng: random.Random, event: str) -> Clip:
    """A uniformly drawn clip of an event: distinct shapes, colours (the turned colour too)
    and cells; a moving shape's path is free of other shapes."""
    background = rng.choice(tuple(BACKGROUNDS))
    shapes = rng.sample(SHAPES, 2)
    colours = rng.sample(tuple(COLOURS), 3)
    tracks: list[Track] = []
    if event == "move":
        direction = rng.choice(tuple(DIRECTIONS))
        unit = DIRECTIONS[direction]
        axis = 0 if unit[0] else 1
        sign = unit[axis]
        a, b = rng.choice([(a, b) for a in range(3) for b in range(3) if (b - a) * sign > 0])
        line = rng.randrange(3)
        start, end = ((a, line), (b, line)) if axis == 0 else ((line, a), (line, b))
        tracks.append(Track(shapes[0], colours[0], start, end, colours[0]))
        if rng.random() < 0.5:
            free = [c for c in _CELLS if c not in _line(start, end)]
            cell = rng.choice(free)
            tracks.append(Track(shapes[1], colours[1], cell, cell, colours[1]))
    elif event == "turn":
        first, second = rng.sample(_CELLS, 2)
        tracks.append(Track(shapes[0], colours[0], first, first, colours[1]))
        if rng.random() < 0.5:
            tracks.append(Track(shapes[1], colours[2], second, second, colours[2]))
    elif event in ("appear", "vanish"):  # 1 or 2 change, beside 0 or 1 that stays (2 at most)
        changing = rng.choice((1, 2))
        static = 0 if changing == 2 else rng.choice((0, 1))
        cells = rng.sample(_CELLS, changing + static)
        how = "appears" if event == "appear" else "vanishes"
        for k, cell in enumerate(cells):
            visible = how if k < changing else "always"
            tracks.append(Track(shapes[k], colours[k], cell, cell, colours[k], visible))
    else:
        raise ValueError(f"unknown event {event!r}; expected one of {', '.join(EVENTS)}")
    tracks.sort(key=lambda t: (t.start[1], t.start[0]))
    return Clip(event, background, tuple(tracks))


# ----------------------------------------------------------------------------- the split


def _majority(answers: dict[str, Counter[str]], per_type: Counter[str]) -> dict[str, float]:
    return {
        kind: counter.most_common(1)[0][1] / per_type[kind]
        for kind, counter in answers.items()
        if counter
    }


def video_split(root: Path, rng: random.Random, n_train: int, n_eval: int) -> dict[str, Any]:
    """Write ``root/llava.json`` (LLaVA records with a ``video`` key, one question each, events
    drawn uniformly), ``root/eval.jsonl`` (held-out clips, events in rotation) and the clips
    under ``root/clips/``; returns the split's metadata (paths relative to the data set)."""
    seen: set[Clip] = set()
    records = []
    train_types = Counter[str]()
    for index in range(n_train):
        clip = random_clip(rng, rng.choice(EVENTS))
        seen.add(clip)
        name = f"clips/t{index:05d}.mp4"
        write_file(root / name, encode_clip(clip))
        question, answer = clip.question()
        train_types[clip.event] += 1
        records.append(
            {
                "id": f"video-{index:05d}",
                "video": name,
                "conversations": [
                    {"from": "human", "value": f"<video>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    write_file(root / "llava.json", dump_json(records))
    lines = []
    per_type = Counter[str]()
    answers: dict[str, Counter[str]] = {event: Counter() for event in EVENTS}
    for index in range(n_eval):
        event = EVENTS[index % len(EVENTS)]
        clip = random_clip(rng, event)
        attempts = 0
        while clip in seen:
            attempts += 1
            if attempts > 10_000:
                raise ValueError("cannot draw held-out clips: use fewer training clips")
            clip = random_clip(rng, event)
        seen.add(clip)
        name = f"clips/e{index:05d}.mp4"
        write_file(root / name, encode_clip(clip))
        question, answer = clip.question()
        per_type[event] += 1
        answers[event][answer] += 1
        record = {
            "id": f"video-eval-{index:05d}",
            "video": name,
            "question": question,
            "answer": answer,
            "type": event,
            "chance": round(VIDEO_QUESTION_TYPES[event].chance, 6),
            "clip": clip.to_json(),
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    write_file(root / "eval.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    chance = sum(VIDEO_QUESTION_TYPES[EVENTS[i % len(EVENTS)]].chance for i in range(n_eval))
    majority = sum(c.most_common(1)[0][1] for c in answers.values() if c)
    return {
        "kind": "instruct",
        "sources": ["video/llava.json"],
        "samples": n_train,
        "samples_per_type": {event: train_types[event] for event in EVENTS},
        "clip": {
            "size": f"{VIDEO_WIDTH}x{VIDEO_HEIGHT}",
            "frames": VIDEO_FRAMES,
            "fps": VIDEO_FPS,
            "codec": f"{CODEC} {PIX_FMT} qp 0 (lossless), mp4",
            "sampled_frames": list(sampled_frames()),
            "tokens": tokens_per_clip(),
        },
        "pack_flags": list(PACK_FLAGS),
        "question_types": {
            q.name: {
                "template": q.template,
                "answers": list(q.answers),
                "chance": round(q.chance, 6),
            }
            for q in VIDEO_QUESTION_TYPES.values()
        },
        "eval": {
            "path": "video/eval.jsonl",
            "questions": n_eval,
            "questions_per_type": {event: per_type[event] for event in EVENTS},
            "chance_accuracy": round(chance / n_eval, 6) if n_eval else None,
            "majority_answer_accuracy": round(majority / n_eval, 6) if n_eval else None,
            "majority_answer_accuracy_per_type": _majority(answers, per_type),
        },
    }
