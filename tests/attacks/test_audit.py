"""The one-run audit's bound: exact at its defining equation, monotone, zero for chance-level guessing, and
the guesses are counted as the protocol says."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binom

from fedgen.attacks.audit import audit_guesses, epsilon_lower_bound
from fedgen.errors import ConfigError


def test_the_bound_solves_its_defining_equation() -> None:
    eps = epsilon_lower_bound(95, 100, beta=0.05)

    def tail(e: float) -> float:
        return binom.sf(94, 100, 1 / (1 + math.exp(-e)))  # P[Bin(100, p_eps) >= 95]

    assert tail(eps) <= 0.05 < tail(eps + 1e-3)  # beta is crossed within the grid's step of 1e-3
    assert 2 < eps < 3.5
    # more correct guesses, or more guesses at the same rate, or less confidence: a larger bound
    assert epsilon_lower_bound(100, 100) > eps
    assert epsilon_lower_bound(950, 1000) > eps
    assert epsilon_lower_bound(95, 100, beta=0.2) > eps
    assert epsilon_lower_bound(50, 100) == 0.0 and epsilon_lower_bound(0, 10) == 0.0  # chance or worse


def test_with_delta_the_bound_solves_the_approximate_dp_equation_and_is_smaller() -> None:
    """The (eps, delta) p-value adds 2 m delta times the largest mean mass of Bin(r, q) just below W."""
    pure = epsilon_lower_bound(200, 200)
    eps = epsilon_lower_bound(200, 200, canaries=1000, delta=1e-3)
    q = 1 / (1 + math.exp(-eps))
    pmf = [binom.pmf(200 - i, 200, q) for i in range(1, 201)]
    alpha = max(sum(pmf[:i]) / i for i in range(1, 201))
    assert binom.sf(199, 200, q) + 2 * 1000 * 1e-3 * alpha <= 0.05  # rejected at the bound ...
    q = 1 / (1 + math.exp(-(eps + 2e-3)))
    alpha = max(sum(binom.pmf(200 - j, 200, q) for j in range(1, i + 1)) / i for i in range(1, 201))
    assert binom.sf(199, 200, q) + 2 * 1000 * 1e-3 * alpha > 0.05  # ... and not just past it
    assert 1.5 < eps < pure - 2  # 2 m delta = 2: far from negligible
    assert pure - 0.1 < epsilon_lower_bound(200, 200, canaries=1000, delta=1e-5) < pure
    with pytest.raises(ConfigError, match="canaries"):
        epsilon_lower_bound(200, 200, delta=1e-5)


def test_guesses_are_counted_from_the_top_and_bottom_scores() -> None:
    scores = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.5, 0.05])
    included = torch.tensor([True, False, False, True, True, False])
    # top 2: canaries 0 (in, right) and 1 (out, wrong); bottom 2: canaries 5 (out, right) and 2 (out, right)
    assert audit_guesses(scores, included, k_plus=2, k_minus=2) == (3, 4)
    assert audit_guesses(scores, included, k_plus=1, k_minus=0) == (1, 1)
    with pytest.raises(ConfigError):
        audit_guesses(scores, included, k_plus=4, k_minus=4)
    with pytest.raises(ConfigError):
        epsilon_lower_bound(5, 4)


def test_the_audit_catches_dp_sgd_without_noise_and_respects_the_claim_with_noise() -> None:
    """DP-SGD audited with 1000 white-box gradient canaries, 20 Poisson steps at q = 1/2, 200 guesses, one run
    per case (the method audits in one run), 95% confidence at the mechanism's delta; both clipping engines."""
    from fedgen.attacks.audit import audit_dp_sgd
    from fedgen.mechanisms import DPSGD

    for engine in ("fedgen", "opacus"):  # noise switched off in effect
        broken = audit_dp_sgd(DPSGD(noise_multiplier=1e-6, delta=1e-5, seed=1, engine=engine))
        assert broken["correct"] == broken["guesses"] == 200 and broken["epsilon_lower_bound"] > 2
        assert broken["steps"] == 20 and broken["num_canaries"] == 1000
    honest = audit_dp_sgd(DPSGD(target_epsilon=1.0, delta=1e-5, seed=1))
    assert honest["epsilon_claimed"] <= 1.0
    assert honest["epsilon_lower_bound"] <= honest["epsilon_claimed"]
    assert len(honest["scores"]) == len(honest["in_training"]) == 1000
