"""What the shapes images and the shapes video clips share: the palette, the 28-px grid cell,
drawing one shape, and writing files (``shapes_dataset`` and ``shapes_video`` both import it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import ImageDraw

#: The ``grid`` layout's cell: one LM image token (patch 14 × the 2×2 merge).
GRID_CELL = 28
#: ``grid`` shape "radius" in pixels: the shape is 23 px wide in its 28-px cell.
GRID_RADIUS = 11
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: int, cy: int, r: int
) -> None:
    """One shape centred at ``(cx, cy)`` with "radius" ``r`` (images and video frames alike)."""
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":  # isosceles, pointing up, filling the square's box
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def write_file(path: Path, data: bytes | str) -> None:
    """Write text (UTF-8) or bytes, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)


def dump_json(value: Any) -> str:
    """JSON text; a list of records is written one record per line."""
    if isinstance(value, list):
        body = ",\n".join(json.dumps(item, ensure_ascii=False) for item in value)
        return f"[\n{body}\n]\n"
    return json.dumps(value, indent=1, ensure_ascii=False) + "\n"
