"""Declarative Hugging Face ⇄ Megatron parameter mappings.

A model's conversion is one table of :class:`ParamMapping` rows: a Megatron parameter name
pattern, the Hugging Face tensor name pattern(s) it is made of, and a transform that turns the HF
tensors into the Megatron tensor and back. ``*`` in a pattern stands for a layer index and is
the same number on both sides. Megatron names are the unsharded (TP=1, PP=1) parameter names;
tensor-parallel sharding and resharding are left to Megatron-Core's distributed checkpointing.

Transforms are small classes with two methods, ``to_megatron(hf_tensors) -> tensor`` and
``to_hf(tensor) -> hf_tensors``, each the exact inverse of the other (round trips are
bit-exact: they only reorder, concatenate, split, pad and cut).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from lov15_megatron.convert.errors import ConversionError  # most modules import it from here


class Transform:
    """HF tensors ⇄ one Megatron tensor. Subclasses override both directions."""

    def to_megatron(self, hf: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, megatron: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError


class Direct(Transform):
    """One HF tensor is the Megatron tensor."""

    def to_megatron(self, hf: Sequence[torch.Tensor]) -> torch.Tensor:
        return hf[0]

    def to_hf(self, megatron: torch.Tensor) -> list[torch.Tensor]:
        return [megatron]


@dataclass(frozen=True)
class Concat(Transform):
    """HF tensors concatenated along dim 0 (SwiGLU ``[gate; up]``), split back by sizes."""

    sizes: tuple[int, ...]

    def to_megatron(self, hf: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(hf), dim=0)

    def to_hf(self, megatron: torch.Tensor) -> list[torch.Tensor]:
        return [t.clone() for t in torch.split(megatron, list(self.sizes), dim=0)]


@dataclass(frozen=True)
class GroupedQKV(Transform):
    """Separate (or stacked) Q, K, V rows ⇄ Megatron's fused QKV, grouped by query group.

    Megatron orders the rows of ``linear_qkv`` per query group ``g`` as
    ``[q heads of g (heads/groups × head_dim rows), k_g (head_dim), v_g (head_dim)]`` so that
    tensor parallelism can take contiguous chunks of whole groups. Works for weights
    ``[rows, in]`` and biases ``[rows]``. With ``stacked=True`` the HF side is one tensor with
    rows ``[all Q; all K; all V]`` (a fused ``qkv`` Linear) instead of three tensors.
    """

    num_heads: int
    num_groups: int
    head_dim: int
    stacked: bool = False

    def _sizes(self) -> tuple[int, int, int]:
        return (
            self.num_heads * self.head_dim,
            self.num_groups * self.head_dim,
            self.num_groups * self.head_dim,
        )

    def to_megatron(self, hf: Sequence[torch.Tensor]) -> torch.Tensor:
        q, k, v = torch.split(hf[0], self._sizes(), dim=0) if self.stacked else hf
        g, d = self.num_groups, self.head_dim
        tail = q.shape[1:]
        q = q.reshape(g, (self.num_heads // g) * d, *tail)
        k = k.reshape(g, d, *tail)
        v = v.reshape(g, d, *tail)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tail)

    def to_hf(self, megatron: torch.Tensor) -> list[torch.Tensor]:
        g, d = self.num_groups, self.head_dim
        per_group = (self.num_heads // g) * d
        tail = megatron.shape[1:]
        grouped = megatron.reshape(g, per_group + 2 * d, *tail)
        q, k, v = torch.split(grouped, [per_group, d, d], dim=1)
        parts = [t.reshape(-1, *tail) for t in (q, k, v)]
        if self.stacked:
            return [torch.cat(parts, dim=0)]
        return [t.clone() for t in parts]


@dataclass(frozen=True)
class PaddedRows(Transform):
    """Vocabulary rows: zero-padded to Megatron's padded size, cut back for HF."""

    rows: int
    padded_rows: int

    def to_megatron(self, hf: Sequence[torch.Tensor]) -> torch.Tensor:
        t = hf[0]
        if self.padded_rows == t.shape[0]:
            return t
        pad = t.new_zeros((self.padded_rows - t.shape[0], *t.shape[1:]))
        return torch.cat([t, pad], dim=0)

    def to_hf(self, megatron: torch.Tensor) -> list[torch.Tensor]:
        return [megatron[: self.rows].clone()]


@dataclass(frozen=True)
class ParamMapping:
    """One row of a model's table: Megatron pattern ⇐ HF pattern(s) via a transform."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform = Direct()

    def __post_init__(self) -> None:
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))

    def match(self, megatron_name: str) -> list[str] | None:
        """HF names for ``megatron_name`` if this row covers it, else None."""
        regex = "^" + re.escape(self.megatron).replace(r"\*", r"(\d+)") + "$"
        m = re.match(regex, megatron_name)
        if m is None:
            return None
        names = []
        for pattern in self.hf:
            name = pattern
            for index in m.groups():
                name = name.replace("*", index, 1)
            names.append(name)
        return names


class MappingTable:
    """A model's rows, resolved per parameter name."""

    def __init__(self, rows: Iterable[ParamMapping]) -> None:
        self.rows = list(rows)

    def resolve(self, megatron_name: str) -> tuple[ParamMapping, list[str]]:
        for row in self.rows:
            names = row.match(megatron_name)
            if names is not None:
                return row, names
        raise ConversionError(f"no mapping for Megatron parameter {megatron_name!r}")
