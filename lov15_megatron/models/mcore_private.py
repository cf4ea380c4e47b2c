"""The Megatron-Core internals this package relies on, in one place, with their assumptions checked.

Megatron-Core keeps no compatibility promise for these, so each use goes through this module
and :func:`check_assumptions` (run when the language model is built, and by
``tests/test_mcore_compat.py`` on both test environments) fails loudly, naming the installed
megatron-core, if a release changes them. Verified with 0.16.1 and 0.19.2.

1. **``GPTModel._postprocess``** (the loss hook). ``GPTModel.forward`` runs the embedding and
   the decoder, then hands the final hidden states to
   ``self._postprocess(hidden_states=…, input_ids=…, position_ids=…, labels=…, loss_mask=…,
   mtp_in_postprocess=…, …)`` by keyword. :class:`~lov15_megatron.models.lm_loss.
   LossPositionsGPTModel` overrides it to compute logits only at the loss positions;
   :func:`postprocess_arguments` reads the call's arguments by name through the installed
   signature, so added parameters (0.19 added ``padding_mask``, ``output_processor``,
   ``output_processor_context``) pass through untouched. 0.19's ``output_processor`` argument
   would do the same job publicly, but 0.16.1 lacks it.
2. **``ColumnParallelLinear.sequence_parallel``** (the output layer's input layout). The layer
   reads the attribute on every forward to decide whether to all-gather its input along the
   sequence. The loss path has already gathered the loss positions on every TP rank, so
   :func:`without_sequence_parallel` switches it off for that one call and restores it (as
   Megatron-Core's own dynamic-inference path does inside ``_postprocess``).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear

from lov15_megatron.runtime.cpu_backend import megatron_core_version

# What the loss override reads from the ``_postprocess`` call, by name.
POSTPROCESS_ARGUMENTS = (
    "hidden_states",
    "input_ids",
    "position_ids",
    "labels",
    "loss_mask",
    "mtp_in_postprocess",
)


class MegatronCoreAssumptionError(RuntimeError):
    """The installed Megatron-Core no longer behaves as this module assumes."""


def _fail(what: str) -> NoReturn:
    raise MegatronCoreAssumptionError(
        f"megatron-core {megatron_core_version()}: {what}; lov15_megatron/models/mcore_private.py "
        "was written for megatron-core 0.16.1 and 0.19.2 and must be adapted to this release"
    )


def _source(func: Any) -> str:
    try:
        return inspect.getsource(func)
    except (OSError, TypeError) as e:  # no source shipped: cannot check, so say so
        _fail(f"cannot read the source of {func.__qualname__} ({e})")


@functools.cache
def check_assumptions() -> None:
    """Raise :class:`MegatronCoreAssumptionError` (naming the release) if a touch point moved."""
    postprocess = getattr(GPTModel, "_postprocess", None)
    if postprocess is None:
        _fail("GPTModel has no _postprocess method (the loss hook of LossPositionsGPTModel)")
    params = inspect.signature(postprocess).parameters
    missing = [name for name in POSTPROCESS_ARGUMENTS if name not in params]
    if missing:
        _fail(f"GPTModel._postprocess no longer takes {missing} (has {list(params)})")
    forward = re.sub(r"\s+", "", _source(GPTModel.forward))
    if "self._postprocess(" not in forward:
        _fail("GPTModel.forward no longer calls self._postprocess")
    call = forward[forward.index("self._postprocess(") :]
    for name in ("hidden_states", "labels", "loss_mask"):
        if f"{name}={name}" not in call:
            _fail(f"GPTModel.forward no longer passes {name}= to self._postprocess")
    if not re.search(r"\bself\.sequence_parallel\b", _source(ColumnParallelLinear.forward)):
        _fail("ColumnParallelLinear.forward no longer reads self.sequence_parallel per call")


@functools.cache
def _postprocess_signature() -> inspect.Signature:
    return inspect.signature(GPTModel._postprocess)


def postprocess_arguments(model: GPTModel, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a ``GPTModel._postprocess`` call, by name (defaults filled in)."""
    bound = _postprocess_signature().bind(model, *args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@contextmanager
def without_sequence_parallel(layer: torch.nn.Module) -> Iterator[None]:
    """Run a ``ColumnParallelLinear`` on an input that is already whole along the sequence."""
    saved = layer.sequence_parallel
    layer.sequence_parallel = False
    try:
        yield
    finally:
        layer.sequence_parallel = saved
