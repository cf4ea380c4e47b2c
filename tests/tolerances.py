"""fp32 tolerances for comparisons that differ only in rounding: one parallel layout against the
single-rank run, our forward against a reference implementation. The derivation (and why a bug
would exceed every bound here) is in docs/tolerances.md; tests import these instead of writing
their own constants.

    fp32_rel_tol(K)            one forward (or backward) whose longest reduction has K terms
    training_rel_tol(step, K)  a loss or grad norm after ``step`` optimizer steps (step 0: the
                               first forward, before any update)
    assert_close_training(reference, got, K, what)   every step of two such series

Comparisons that must be bit-exact (resume, conversion round trips) use ``==`` or
``torch.equal``, never these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

UNIT_ROUNDOFF = 2.0**-24  # fp32: round-to-nearest relative error of one operation
# The typical change of a K-term sum under a different summation order is sqrt(K)·u relative
# (a random walk of K roundings). SAFETY covers: two orders each carrying that error (×√2), the
# dozen-odd reductions in series through forward and backward adding in quadrature (×4), and a
# tail margin so that the largest of several hundred compared values stays inside (×3):
# √2·4·3 ≈ 17 → 16. For K = 256, 16·√K·u = K·u: the worst-case coefficient of one reduction.
SAFETY = 16.0
# Adam turns a relative gradient difference into the same relative update difference, and a
# component whose gradient is at rounding level can flip sign (an update difference of 2·lr):
# each optimizer step adds at most the per-step error again and carries the earlier ones forward
# amplified by at most GROWTH (see docs/tolerances.md, "Across training steps").
GROWTH = 1.5


def fp32_rel_tol(reduction_len: int) -> float:
    """Relative tolerance of one fp32 forward/backward whose longest reduction (hidden or FFN
    width, attention's sequence, the vocabulary, the tokens a weight gradient sums over) has
    ``reduction_len`` terms, when only the summation order or kernel differs."""
    if reduction_len < 1:
        raise ValueError(f"reduction_len must be >= 1, got {reduction_len}")
    return SAFETY * math.sqrt(reduction_len) * UNIT_ROUNDOFF


def fp32_abs_tol(reduction_len: int, scale: float) -> float:
    """Absolute tolerance for values of magnitude up to ``scale`` (e.g. max |logit|)."""
    return fp32_rel_tol(reduction_len) * max(abs(scale), 1.0)


def training_rel_tol(step: int, reduction_len: int) -> float:
    """Relative tolerance of a loss or grad norm at ``step`` (0 = before any optimizer update):
    the per-step bound, summed over the steps so far with each earlier step's error grown by
    ``GROWTH`` per step: base·(GROWTH^(step+1) − 1)/(GROWTH − 1)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return fp32_rel_tol(reduction_len) * (GROWTH ** (step + 1) - 1.0) / (GROWTH - 1.0)


def assert_close_training(
    reference: Sequence[float],
    got: Sequence[float],
    reduction_len: int,
    what: str = "",
    first_step: int = 0,
) -> None:
    """Each value of ``got`` (one per training step, the first at ``first_step``) within
    ``training_rel_tol`` of ``reference`` at the same step; both series the same length."""
    assert len(reference) == len(got), f"{what}: {len(reference)} reference steps, {len(got)}"
    for step, (a, b) in enumerate(zip(reference, got, strict=True), start=first_step):
        tol = training_rel_tol(step, reduction_len)
        rel = abs(a - b) / max(abs(a), abs(b), 1e-30)
        assert math.isfinite(b) and rel <= tol, (
            f"{what} step {step}: reference {a!r}, got {b!r}, relative difference {rel:.3g} > "
            f"tolerance {tol:.3g}"
        )
