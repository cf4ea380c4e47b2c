"""fp32 tolerances for comparisons that differ only in rounding: one parallel layout against the
single-rank run, our forward against a reference implementation. The derivation (and why a bug
would exceed every bound here) is in docs/tolerances.md; tests import these instead of writing
their own constants.

    fp32_rel_tol(K)              one forward (or backward) whose longest reduction has K terms
    fp32_abs_tol(K, scale)       the same for values up to ``scale`` in magnitude
    assert_close_fp32(got, reference, K)   two tensors, ``fp32_abs_tol`` at the reference's scale
    within_fp32(max_abs, max_rel, K)       the same from a max abs and a max relative difference
    log_sum_exp_len(V)           what a V-word vocabulary's cross entropy counts as K
    training_rel_tol(step, K)    a loss (or aux loss) after ``step`` optimizer updates
    grad_norm_rel_tol(step, K)   a grad norm after ``step`` optimizer updates
    assert_close_training(reference, got, K, what, grad_norm=...)   every step of two series

Step 0 is the first forward/backward, before any update. Comparisons that must be bit-exact
(resume, conversion round trips) use ``==`` or ``torch.equal``, never these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

UNIT_ROUNDOFF = 2.0**-24  # fp32: round-to-nearest relative error of one operation
# A K-term sum taken in another order changes by sqrt(K)·u relative, typically (a random walk of
# K roundings; the worst case is K·u). SAFETY covers two orders each carrying that error (×√2),
# the dozen-odd reductions in series through forward and backward adding in quadrature (×4),
# and a tail margin for the largest of a few hundred compared values (×3): √2·4·3 ≈ 17 → 16.
# For K = 256, 16·√K·u equals K·u, the worst case of one reduction.
SAFETY = 16.0
# Adam's first update is sign(g) per component: a component whose gradient is smaller than its
# rounding error (a fraction ≤ ε of them, ε the relative error) can flip and move 2·lr instead
# of 0. That moves the parameters by 2·√ε of a full step (rms), and a full step changes the
# gradient by at most its own size: grad norms after an update differ by up to ADAM_SIGN·√ε.
ADAM_SIGN = 2.0


def fp32_rel_tol(reduction_len: int) -> float:
    """Relative tolerance of one fp32 forward/backward whose longest reduction (hidden or FFN
    width, attention's sequence, the tokens a weight gradient sums over, ``log_sum_exp_len`` of
    the vocabulary) has ``reduction_len`` terms, when only summation order or kernels differ."""
    if reduction_len < 1:
        raise ValueError(f"reduction_len must be >= 1, got {reduction_len}")
    return SAFETY * math.sqrt(reduction_len) * UNIT_ROUNDOFF


def fp32_abs_tol(reduction_len: int, scale: float) -> float:
    """Absolute tolerance for values of magnitude up to ``scale`` (e.g. max |logit|)."""
    return fp32_rel_tol(reduction_len) * max(abs(scale), 1.0)


def assert_close_fp32(got: torch.Tensor, reference: torch.Tensor, reduction_len: int) -> None:
    """``got`` equals ``reference`` (same shape) within ``fp32_abs_tol`` at the reference's
    largest magnitude: one fp32 forward against another implementation of it."""
    atol = fp32_abs_tol(reduction_len, float(reference.abs().max()) if reference.numel() else 0.0)
    torch.testing.assert_close(got, reference, rtol=0.0, atol=atol)


def within_fp32(max_abs_diff: float, max_rel_diff: float, reduction_len: int) -> bool:
    """Whether a comparison reported as max |a − b| and max |a − b| / max |b| (``verify``'s
    metrics) is within ``fp32_abs_tol(reduction_len, max |b|)``: with the floor of 1 on the
    scale, that is the absolute or the relative difference below ``fp32_rel_tol``."""
    tol = fp32_rel_tol(reduction_len)
    return max_abs_diff < tol or max_rel_diff < tol


def log_sum_exp_len(vocab: int) -> int:
    """The reduction length with the same effect on a cross-entropy loss as a log-sum-exp over
    ``vocab`` positive terms: their sum's relative error sqrt(V)·u becomes an absolute error of
    log(sum), on a loss of about ln V, i.e. sqrt(V)/ln(V)·u relative, the error of a
    V/ln(V)²-term reduction."""
    return max(1, math.ceil(vocab / math.log(vocab) ** 2)) if vocab > 1 else 1


def training_rel_tol(step: int, reduction_len: int) -> float:
    """Relative tolerance of a loss (or an aux loss) at ``step``: each update carries the per-step
    error into the parameters once more, so it grows linearly, base·(1 + step). Components that
    Adam amplifies (gradient at rounding level) barely move a loss: its gradient there is ~0."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return fp32_rel_tol(reduction_len) * (1 + step)


def grad_norm_rel_tol(step: int, reduction_len: int) -> float:
    """Relative tolerance of a gradient norm at ``step``: the loss bound at step 0 (no update
    yet); after that, plus Adam's sign-flip term ``ADAM_SIGN·sqrt(base)``."""
    tol = training_rel_tol(step, reduction_len)
    return tol if step == 0 else tol + ADAM_SIGN * math.sqrt(fp32_rel_tol(reduction_len))


def assert_close_training(
    reference: Sequence[float],
    got: Sequence[float],
    reduction_len: int,
    what: str = "",
    first_step: int = 0,
    grad_norm: bool = False,
) -> None:
    """Each value of ``got`` (one per training step, the first at ``first_step``) within
    ``training_rel_tol`` (``grad_norm_rel_tol`` with ``grad_norm=True``) of ``reference`` at the
    same step; both series the same length."""
    assert len(reference) == len(got), f"{what}: {len(reference)} reference steps, {len(got)}"
    rule = grad_norm_rel_tol if grad_norm else training_rel_tol
    for step, (a, b) in enumerate(zip(reference, got, strict=True), start=first_step):
        tol = rule(step, reduction_len)
        rel = abs(a - b) / max(abs(a), abs(b), 1e-30)
        assert math.isfinite(b) and rel <= tol, (
            f"{what} step {step}: reference {a!r}, got {b!r}, relative difference {rel:.3g} > "
            f"tolerance {tol:.3g}"
        )
