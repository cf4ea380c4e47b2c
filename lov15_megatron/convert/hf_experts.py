"""The two on-disk layouts of a ``transformers`` mixture-of-experts layer (Qwen3-MoE).

* **Per expert**: what the release's 30B-A3B code and ``transformers``' ``save_pretrained``
  (by default, also in transformers ≥ 5) write: ``P.mlp.experts.E.gate_proj.weight`` and
  ``up_proj`` ``[F, H]``, ``down_proj`` ``[H, F]``, one set per expert ``E``.
* **Fused**: transformers ≥ 5 holds the experts in memory as ``P.mlp.experts.gate_up_proj``
  ``[E, 2F, H]`` (expert ``e``'s gate rows, then its up rows) and ``P.mlp.experts.down_proj``
  ``[E, H, F]``, and writes them so with ``save_pretrained(..., save_original_format=False)``.

The mapping tables speak per expert. :func:`fused_expert_views` lets the checkpoint reader hand
out each expert's piece of a fused tensor under its per-expert name (safetensors reads only that
slice); :class:`FusedExpertWriter` gathers an export's per-expert tensors back into fused ones
when the ``--hf-template`` is fused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

from lov15_megatron.convert.mapping import ConversionError

FUSED = re.compile(r"^(?P<prefix>.+\.mlp\.experts\.)(?P<kind>gate_up_proj|down_proj)$")
PER_EXPERT = re.compile(
    r"^(?P<prefix>.+\.mlp\.experts\.)(?P<expert>\d+)\.(?P<kind>gate_proj|up_proj|down_proj)\.weight$"
)

#: A per-expert name's source: the stored fused tensor and the index of its piece.
View = tuple[str, tuple[int | slice, ...]]


def has_fused_experts(names: Iterable[str]) -> bool:
    return any(FUSED.match(name) for name in names)


def fused_expert_views(
    names: Iterable[str], shape: Callable[[str], tuple[int, ...]]
) -> dict[str, View]:
    """Per-expert name → (fused tensor, index) for every fused expert tensor in ``names``."""
    views: dict[str, View] = {}
    for name in names:
        m = FUSED.match(name)
        if m is None:
            continue
        dims = shape(name)
        if len(dims) != 3 or (m["kind"] == "gate_up_proj" and dims[1] % 2):
            raise ConversionError(
                f"{name}: shape {dims}, but a fused expert tensor is [experts, rows, columns] "
                "(gate_up_proj: gate rows then up rows, an even count)"
            )
        prefix = m["prefix"]
        for e in range(dims[0]):
            if m["kind"] == "down_proj":
                views[f"{prefix}{e}.down_proj.weight"] = (name, (e,))
            else:
                half = dims[1] // 2
                views[f"{prefix}{e}.gate_proj.weight"] = (name, (e, slice(0, half)))
                views[f"{prefix}{e}.up_proj.weight"] = (name, (e, slice(half, None)))
    return views


def view_shape(stored: tuple[int, ...], index: tuple[int | slice, ...]) -> tuple[int, ...]:
    """The shape of ``stored[index]`` (an expert index, then at most a row range)."""
    rows = stored[1]
    if len(index) > 1:
        rows = len(range(rows)[index[1]])
    return (rows, *stored[2:])


class FusedExpertWriter:
    """Passes tensors on to ``add``, except per-expert ones: those of one layer are collected
    and passed on as ``gate_up_proj``/``down_proj`` once all ``num_experts`` are there."""

    def __init__(self, add: Callable[[str, torch.Tensor], None], num_experts: int) -> None:
        self._add = add
        self.num_experts = num_experts
        self._pending: dict[str, dict[tuple[int, str], torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        m = PER_EXPERT.match(name)
        if m is None:
            self._add(name, tensor)
            return
        prefix = m["prefix"]
        layer = self._pending.setdefault(prefix, {})
        layer[(int(m["expert"]), m["kind"])] = tensor
        if len(layer) < 3 * self.num_experts:
            return
        del self._pending[prefix]
        experts = range(self.num_experts)
        gate_up = [torch.cat([layer[(e, "gate_proj")], layer[(e, "up_proj")]]) for e in experts]
        self._add(f"{prefix}gate_up_proj", torch.stack(gate_up))
        self._add(f"{prefix}down_proj", torch.stack([layer[(e, "down_proj")] for e in experts]))

    def finish(self) -> None:
        if self._pending:
            raise ConversionError(
                f"experts of {sorted(self._pending)[0]}… are incomplete: "
                f"expected {self.num_experts} per layer"
            )
