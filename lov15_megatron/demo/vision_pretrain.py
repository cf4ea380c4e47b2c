"""Pretrain the quickstart's tiny vision tower on the shapes training images (MLCD-style labels).

The release starts from a pretrained vision encoder (the Rice ViT, an MLCD model: trained to
predict each image's multiple labels). A random 2-layer, 64-wide ViT gives the language model
features in which the background colour dominates and a shape's colour or kind is a small,
hard-to-read part (the quickstart learned only the background colour from them; see
``docs/quickstart.md``). So the quickstart first gives its tiny MLCD ViT a few hundred steps of
the same kind of pretraining, on the shapes *training* images only (the instruct split's
``scenes.jsonl``; the held-out eval images are never seen):

- labels of an image (multi-hot, :data:`LABELS`): its background, its number of shapes, the
  colour of each shape (``red:circle``), and the shape and the colour at each occupied position
  (``left:circle``, ``left:red``);
- a small head (LayerNorm, MLP) scores every label at every patch token; the image's score is
  the mean over its patches, trained with binary cross-entropy, so that what the labels name is
  written into the patch tokens (the tokens the merger turns into the LM's image tokens; the
  class token is not used there). The head is thrown away.

Given held-out images (the eval split's), the report also says how well the head reads each
attribute from them (:data:`ATTRIBUTES`): what the vision tower can tell the language model. The
pretrained weights are saved as an ordinary MLCD checkpoint and go through ``make_stage0`` like
any other source ViT.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from lov15_megatron.data.image_processing import CLIP_MEAN, CLIP_STD
from lov15_megatron.demo.shapes_dataset import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, Scene

if TYPE_CHECKING:
    from transformers import MLCDVisionModel

#: The label names, in the order of the multi-hot target.
LABELS: tuple[str, ...] = (
    *(f"background:{name}" for name in BACKGROUNDS),
    *(f"count:{n}" for n in (1, 2, 3)),
    *(f"{colour}:{shape}" for colour in COLOURS for shape in SHAPES),
    *(f"{position}:{shape}" for position in POSITIONS for shape in SHAPES),
    *(f"{position}:{colour}" for position in POSITIONS for colour in COLOURS),
)
_INDEX = {name: index for index, name in enumerate(LABELS)}
WARMUP_STEPS = 20
#: Attributes scored on held-out images, each as the question it answers: the background; the
#: number of shapes; ``colour``: each shape's colour (among the colour:shape labels of that
#: shape); ``shape``: the shape at each occupied position; ``position``: each shape's position.
ATTRIBUTES = ("background", "count", "colour", "shape", "position")


@dataclass(frozen=True)
class PretrainReport:
    """What a pretraining run did (printed by the quickstart, kept in its summary)."""

    images: int
    steps: int
    first_loss: float
    last_loss: float
    seconds: float
    held_out_images: int = 0
    #: Per attribute of :data:`ATTRIBUTES`: the fraction of held-out answers the head gets right.
    held_out_accuracy: dict[str, float] = field(default_factory=dict)


def scene_labels(scene: Scene) -> list[str]:
    """The names of a scene's positive labels."""
    labels = [f"background:{scene.background}", f"count:{len(scene.shapes)}"]
    for spec in scene.shapes:
        labels += [
            f"{spec.colour}:{spec.shape}",
            f"{spec.position}:{spec.shape}",
            f"{spec.position}:{spec.colour}",
        ]
    return labels


def target(scene: Scene) -> torch.Tensor:
    """The multi-hot target of a scene over :data:`LABELS`."""
    y = torch.zeros(len(LABELS))
    y[[_INDEX[name] for name in scene_labels(scene)]] = 1.0
    return y


def pixels(image: Image.Image) -> torch.Tensor:
    """``[3, H, W]`` CLIP-normalised pixels (the shapes sizes need no resize)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())


def load_scenes(path: str | Path) -> list[tuple[Path, Scene]]:
    """``(image path, scene)`` per distinct image of a shapes ``scenes.jsonl`` or ``eval.jsonl``
    (paths relative to the file's folder)."""
    path = Path(path)
    items: dict[Path, Scene] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            items[path.parent / record["image"]] = Scene.from_json(record["scene"])
    return list(items.items())


def _argmax_answer(scores: torch.Tensor, options: dict[str, str]) -> str:
    """The option whose label scores highest (``options``: answer -> label name)."""
    names = list(options)
    return names[int(torch.stack([scores[_INDEX[options[n]]] for n in names]).argmax())]


def attribute_hits(scores: torch.Tensor, scene: Scene) -> dict[str, list[bool]]:
    """Per attribute of :data:`ATTRIBUTES`, whether ``scores`` (one image's label scores) give the
    scene's answers."""
    hits: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
    background = _argmax_answer(scores, {b: f"background:{b}" for b in BACKGROUNDS})
    hits["background"].append(background == scene.background)
    count = _argmax_answer(scores, {str(n): f"count:{n}" for n in (1, 2, 3)})
    hits["count"].append(count == str(len(scene.shapes)))
    for spec in scene.shapes:
        colour = _argmax_answer(scores, {c: f"{c}:{spec.shape}" for c in COLOURS})
        shape = _argmax_answer(scores, {s: f"{spec.position}:{s}" for s in SHAPES})
        position = _argmax_answer(scores, {p: f"{p}:{spec.shape}" for p in POSITIONS})
        hits["colour"].append(colour == spec.colour)
        hits["shape"].append(shape == spec.shape)
        hits["position"].append(position == spec.position)
    return hits


def _by_size(items: Sequence[tuple[Path, Scene]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images stacked per size (a batch holds one size): ``(pixels [N,3,H,W], targets [N,L])``."""
    groups: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for image_path, scene in items:
        with Image.open(image_path) as image:
            groups.setdefault(image.size, []).append((pixels(image), target(scene)))
    return [
        (torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs]))
        for _, pairs in sorted(groups.items())
    ]


def pretrain_vision(
    model: MLCDVisionModel,
    scenes_file: str | Path,
    *,
    held_out: str | Path | None = None,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> PretrainReport:
    """Train ``model`` in place on the labels of ``scenes_file``'s images, then score the
    ``held_out`` file's images (a ``scenes.jsonl`` or ``eval.jsonl``); see the module doc."""
    start = time.perf_counter()
    items = load_scenes(scenes_file)
    if not items:
        raise ValueError(f"{scenes_file}: no scenes")
    groups = _by_size(items)
    torch.manual_seed(seed)
    width = model.config.hidden_size
    head = torch.nn.Sequential(
        torch.nn.LayerNorm(width),
        torch.nn.Linear(width, 2 * width),
        torch.nn.GELU(),
        torch.nn.Linear(2 * width, len(LABELS)),
    )
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def schedule(step: int) -> float:  # linear warmup, cosine decay to zero
        warm = min(1.0, (step + 1) / WARMUP_STEPS)
        return warm * 0.5 * (1.0 + math.cos(math.pi * step / steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(seed)
    weights = [len(x) for x, _ in groups]
    model.train()
    losses = []
    for _ in range(steps):
        x, y = rng.choices(groups, weights)[0]
        pick = torch.tensor(rng.sample(range(len(x)), min(batch_size, len(x))))
        patches = model(pixel_values=x[pick]).last_hidden_state[:, 1:]  # class token dropped
        logits = head(patches).mean(dim=1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    accuracy, held_out_images = {}, 0
    if held_out is not None:
        tests = load_scenes(held_out)
        held_out_images = len(tests)
        hits: dict[str, list[bool]] = {name: [] for name in ATTRIBUTES}
        with torch.no_grad():
            for image_path, scene in tests:
                with Image.open(image_path) as image:
                    x = pixels(image).unsqueeze(0)
                scores = head(model(pixel_values=x).last_hidden_state[0, 1:]).mean(dim=0)
                for name, found in attribute_hits(scores, scene).items():
                    hits[name] += found
        accuracy = {name: sum(found) / len(found) for name, found in hits.items() if found}
    tail = losses[-20:]  # the last steps' mean: one batch's loss is noisy
    return PretrainReport(
        images=len(items),
        steps=steps,
        first_loss=losses[0],
        last_loss=sum(tail) / len(tail),
        seconds=time.perf_counter() - start,
        held_out_images=held_out_images,
        held_out_accuracy=accuracy,
    )
