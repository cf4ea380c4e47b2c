"""The bounds of ``tests/tolerances.py`` against real fp32 sums taken in different orders."""

from __future__ import annotations

import numpy as np
import pytest
from tolerances import (
    UNIT_ROUNDOFF,
    fp32_rel_tol,
    grad_norm_rel_tol,
    log_sum_exp_len,
    training_rel_tol,
    within_fp32,
)


@pytest.mark.parametrize("n", [256, 4096, 65536])
def test_reordered_fp32_sums_stay_within_the_bound(n: int) -> None:
    """Positive terms, the hard case (partial sums grow like k): one left-to-right running sum,
    its reverse and numpy's pairwise sum, against the exact (float64) sum."""
    x = np.random.default_rng(n).uniform(0.0, 1.0, n).astype(np.float32)
    exact = float(x.astype(np.float64).sum())
    orders = {
        "sequential": float(np.add.accumulate(x)[-1]),
        "reversed": float(np.add.accumulate(x[::-1])[-1]),
        "pairwise": float(x.sum()),
    }
    errors = {name: abs(value - exact) / exact for name, value in orders.items()}
    spread = max(abs(a - b) for a in orders.values() for b in orders.values()) / exact
    assert spread <= fp32_rel_tol(n), (errors, spread, fp32_rel_tol(n))
    # The bound is not vacuous: a running sum of n positive terms does drift by ~√n·u.
    assert errors["sequential"] > np.sqrt(n) * UNIT_ROUNDOFF / 16, errors


def test_vocabulary_cross_entropy_counts_as_v_over_ln2_v() -> None:
    """A cross-entropy loss over the Qwen vocabulary with its log-sum-exp taken in two orders."""
    vocab = 151936
    logits = np.random.default_rng(0).normal(0.0, 1.0, vocab).astype(np.float32)
    target = 123
    shifted = np.exp(logits - logits.max())

    def loss(total: np.float32) -> float:
        return float(np.log(total) - (logits[target] - logits.max()))

    exact = float(np.log(shifted.astype(np.float64).sum()) - (logits[target] - logits.max()))
    forward, backward = np.add.accumulate(shifted)[-1], np.add.accumulate(shifted[::-1])[-1]
    rel = abs(loss(forward) - loss(backward)) / exact
    assert log_sum_exp_len(vocab) == 1068
    assert rel <= fp32_rel_tol(log_sum_exp_len(vocab)), rel
    assert max(abs(loss(forward) - exact), abs(loss(backward) - exact)) / exact > 1e-8


def test_training_rules() -> None:
    base = fp32_rel_tol(256)
    assert base == pytest.approx(256 * UNIT_ROUNDOFF)  # 16·√256·u: the worst case K·u
    assert [training_rel_tol(s, 256) / base for s in range(3)] == pytest.approx([1, 2, 3])
    assert grad_norm_rel_tol(0, 256) == base  # before any update: one forward/backward
    assert grad_norm_rel_tol(1, 256) == pytest.approx(2 * base + 2 * np.sqrt(base))
    # a max abs diff passes below the tolerance, or, on logits larger than 1, in relative terms
    assert within_fp32(1e-6, 1e-7, 96) and within_fp32(5e-5, 5e-6, 96)
    assert not within_fp32(5e-5, 2e-5, 96)
    with pytest.raises(ValueError):
        training_rel_tol(-1, 256)
