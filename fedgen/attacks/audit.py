"""Empirical privacy auditing in one training run (Steinke, Nasr, Jagielski, NeurIPS 2023).

m canaries are each included in the training data independently with probability 1/2. After training, an
attack scores every canary; the auditor guesses "in" for the ``k_plus`` highest scores, "out" for the
``k_minus`` lowest, and abstains on the rest. If the training run is epsilon-DP (pure, delta = 0), each of
the r = k_plus + k_minus guesses is correct with probability at most p = e^eps / (1 + e^eps), independently
enough that the number of correct guesses W is stochastically dominated by Binomial(r, p). So eps is rejected
at confidence 1 - beta when ``P[Binomial(r, p_eps) >= W] <= beta``, and the largest rejected eps is a lower
bound on the run's true epsilon. (The paper's bound with delta > 0 is slightly smaller; this is its delta = 0
form, the one given in fedgen's references.)
"""

from __future__ import annotations

import math

import torch
from scipy.stats import binom

from fedgen.errors import ConfigError


def epsilon_lower_bound(correct: int, guesses: int, *, beta: float = 0.05) -> float:
    """The largest eps with ``P[Binomial(guesses, e^eps / (1 + e^eps)) >= correct] <= beta`` (0 if none),
    found by bisection: the tail probability grows with eps."""
    if not 0 <= correct <= guesses or guesses < 1:
        raise ConfigError("guesses", f"{correct} correct of {guesses} guesses is impossible",
                          "give 0 <= correct <= guesses and at least one guess")
    if not 0 < beta < 1:
        raise ConfigError("beta", f"must be in (0, 1), got {beta}", "use e.g. 0.05 (95% confidence)")

    def tail(eps: float) -> float:
        return float(binom.sf(correct - 1, guesses, 1 / (1 + math.exp(-eps))))

    if tail(0.0) > beta:
        return 0.0
    low, high = 0.0, 1.0
    while tail(high) <= beta:
        low, high = high, 2 * high
        if high > 1e3:  # every guess right and beta tiny: the bound is as large as the guesses allow
            return low
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if tail(mid) <= beta else (low, mid)
    return low


def audit_guesses(scores: torch.Tensor, included: torch.Tensor, *, k_plus: int, k_minus: int) -> tuple[int, int]:
    """Guess "in" for the ``k_plus`` highest canary scores and "out" for the ``k_minus`` lowest; returns
    (correct guesses, guesses)."""
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus < 1 or k_plus + k_minus > len(scores):
        raise ConfigError("k_plus", f"k_plus={k_plus}, k_minus={k_minus} for {len(scores)} canaries",
                          "guess at least once and at most once per canary")
    order = scores.argsort(descending=True)
    top, bottom = order[:k_plus], order[len(order) - k_minus:] if k_minus else order[:0]
    correct = int(included[top].sum()) + int((~included[bottom]).sum())
    return correct, k_plus + k_minus


class OneRunAudit:
    """The protocol of Steinke et al. (2023): draw which of ``num_canaries`` canaries enter training (each with
    probability 1/2, seeded), then turn the attack's scores into a lower bound on the run's epsilon.

    Args:
        num_canaries: m.
        k_plus: "in" guesses on the highest scores; ``k_minus``: "out" guesses on the lowest.
        beta: 1 - confidence of the bound.
        seed: seed of the inclusion coins.
    """

    def __init__(self, *, num_canaries: int, k_plus: int, k_minus: int, beta: float = 0.05, seed: int = 0) -> None:
        if num_canaries < 1 or k_plus < 0 or k_minus < 0 or not 1 <= k_plus + k_minus <= num_canaries:
            raise ConfigError("audit", f"num_canaries={num_canaries}, k_plus={k_plus}, k_minus={k_minus}",
                              "use at least one guess and at most one per canary")
        self.num_canaries, self.k_plus, self.k_minus, self.beta = num_canaries, k_plus, k_minus, beta
        self.included = torch.rand(num_canaries, generator=torch.Generator().manual_seed(seed)) < 0.5

    def epsilon_lower_bound(self, scores: torch.Tensor) -> dict[str, float]:
        """The guesses' outcome and the bound: ``{"correct", "guesses", "epsilon_lower_bound"}``."""
        if len(scores) != self.num_canaries:
            raise ConfigError("scores", f"{len(scores)} scores for {self.num_canaries} canaries", "score every canary")
        correct, guesses = audit_guesses(scores, self.included, k_plus=self.k_plus, k_minus=self.k_minus)
        return {"correct": correct, "guesses": guesses,
                "epsilon_lower_bound": epsilon_lower_bound(correct, guesses, beta=self.beta)}
