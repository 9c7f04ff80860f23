"""Empirical privacy auditing in one training run (Steinke, Nasr, Jagielski, NeurIPS 2023).

m canaries are each included in the training data independently with probability 1/2. After training, an
attack scores every canary; the auditor guesses "in" for the ``k_plus`` highest scores, "out" for the
``k_minus`` lowest, and abstains on the rest. With W correct of the r = k_plus + k_minus guesses, the hypothesis
"the run is (eps, delta)-DP" is rejected at confidence 1 - beta when its p-value is at most beta:

    p(eps, delta) = P[Bin(r, q) >= W] + 2 m delta * max_{1 <= i <= W} P[W - i <= Bin(r, q) < W] / i,
    q = e^eps / (1 + e^eps)

(their Theorem for approximate DP; with delta = 0 only the binomial tail remains: each guess is then right with
probability at most q). The bound reported is the largest eps below which every eps is rejected, a lower bound on
the run's epsilon at the delta its claim is made at.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import binom

from fedgen.errors import ConfigError
from fedgen.mechanisms import DPSGD


def audit_p_value(correct: int, guesses: int, eps: float | np.ndarray, *, canaries: int = 0,
                  delta: float = 0.0) -> float | np.ndarray:
    """``p(eps, delta)`` above: how likely ``correct`` or more right guesses of ``guesses`` are if the run is
    (eps, delta)-DP with ``canaries`` canaries (at most 1); ``eps`` may be an array."""
    eps = np.asarray(eps, dtype=np.float64)
    q = 1 / (1 + np.exp(-eps))
    p = binom.sf(correct - 1, guesses, q)
    if delta > 0 and correct > 0:
        below = binom.pmf(np.arange(correct - 1, -1, -1), guesses, q[..., None])  # P[Bin = W - i], i = 1 .. W
        p = p + 2 * canaries * delta * np.max(np.cumsum(below, axis=-1) / np.arange(1, correct + 1), axis=-1)
    p = np.minimum(p, 1.0)
    return float(p) if p.ndim == 0 else p


def epsilon_lower_bound(correct: int, guesses: int, *, canaries: int | None = None, delta: float = 0.0,
                        beta: float = 0.05, resolution: float = 1e-3) -> float:
    """The largest eps, on a grid of step ``resolution``, such that every grid eps up to it has
    ``audit_p_value <= beta`` (0 if eps = 0 is not rejected). Stopping at the first eps not rejected keeps the
    bound valid even where the p-value is not monotone in eps. ``delta`` > 0 needs ``canaries`` (m)."""
    if not 0 <= correct <= guesses or guesses < 1:
        raise ConfigError("guesses", f"{correct} correct of {guesses} guesses is impossible",
                          "give 0 <= correct <= guesses and at least one guess")
    if not 0 < beta < 1:
        raise ConfigError("beta", f"must be in (0, 1), got {beta}", "use e.g. 0.05 (95% confidence)")
    if not 0 <= delta < 1:
        raise ConfigError("delta", f"must be in [0, 1), got {delta}", "give the delta the claim is made at")
    if delta > 0 and (canaries is None or canaries < guesses):
        raise ConfigError("canaries", f"{canaries} canaries for {guesses} guesses",
                          "give the number of canaries m (at least the number of guesses) with delta > 0")
    m = canaries or 0
    if audit_p_value(correct, guesses, 0.0, canaries=m, delta=delta) > beta:
        return 0.0
    chunk = 1000
    for first in range(1, round(1e3 / resolution), chunk):  # grid points first .. first + chunk - 1
        grid = np.arange(first, first + chunk) * resolution
        refused = np.flatnonzero(audit_p_value(correct, guesses, grid, canaries=m, delta=delta) > beta)
        if len(refused):
            return round((first + refused[0] - 1) * resolution, 12)
    return 1e3  # every guess right and beta tiny: the bound is as large as the guesses allow


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
        delta: the delta of the claim audited (0: pure DP).
        beta: 1 - confidence of the bound.
        seed: seed of the inclusion coins.
    """

    def __init__(self, *, num_canaries: int, k_plus: int, k_minus: int, delta: float = 0.0, beta: float = 0.05,
                 seed: int = 0) -> None:
        if num_canaries < 1 or k_plus < 0 or k_minus < 0 or not 1 <= k_plus + k_minus <= num_canaries:
            raise ConfigError("audit", f"num_canaries={num_canaries}, k_plus={k_plus}, k_minus={k_minus}",
                              "use at least one guess and at most one per canary")
        self.num_canaries, self.k_plus, self.k_minus, self.delta, self.beta = num_canaries, k_plus, k_minus, delta, beta
        self.included = included_canaries(num_canaries, seed)

    def epsilon_lower_bound(self, scores: torch.Tensor) -> dict[str, float]:
        """The guesses' outcome and the bound: ``{"correct", "guesses", "epsilon_lower_bound"}``."""
        if len(scores) != self.num_canaries:
            raise ConfigError("scores", f"{len(scores)} scores for {self.num_canaries} canaries", "score every canary")
        correct, guesses = audit_guesses(scores, self.included, k_plus=self.k_plus, k_minus=self.k_minus)
        return {"correct": correct, "guesses": guesses,
                "epsilon_lower_bound": epsilon_lower_bound(correct, guesses, canaries=self.num_canaries,
                                                           delta=self.delta, beta=self.beta)}


def included_canaries(num_canaries: int, seed: int) -> torch.Tensor:
    """The seeded coins of the audit: which of ``num_canaries`` canaries enter training (each with probability 1/2)."""
    return torch.rand(num_canaries, generator=torch.Generator().manual_seed(seed)) < 0.5


def check_audit_plan(*, num_canaries: int, guesses: int, sample_rate: float, steps: int = 1,
                     beta: float = 0.05) -> None:
    """Refuse an audit that cannot run: an odd number of guesses or more guesses than canaries, a sampling
    rate outside (0, 1], fewer than one step, or a ``beta`` outside (0, 1)."""
    if guesses % 2 or not 2 <= guesses <= num_canaries:
        raise ConfigError("guesses", f"{guesses} for {num_canaries} canaries",
                          "use an even number of guesses, at most the number of canaries (e.g. 200 of 1000)")
    if not 0 < sample_rate <= 1:
        raise ConfigError("sample_rate", f"{sample_rate} is outside (0, 1]", "use e.g. 0.5")
    if steps < 1:
        raise ConfigError("steps", f"must be >= 1, got {steps}", "use e.g. 20")
    if not 0 < beta < 1:
        raise ConfigError("beta", f"must be in (0, 1), got {beta}", "use e.g. 0.05 (95% confidence)")


def check_audit_delta(mechanism: DPSGD, *, num_canaries: int, seed: int) -> None:
    """Refuse a mechanism whose delta is not below 1/n for the n canaries the seeded coins put in training (the
    training set of the audited run), before it trains; the fields are those of ``fedgen audit``."""
    included = int(included_canaries(num_canaries, seed).sum())
    if included == 0:
        raise ConfigError("num_canaries", f"none of the {num_canaries} canaries enters training with seed {seed}",
                          "use more canaries, e.g. 1000")
    try:
        mechanism.check_dataset_size(included)
    except ConfigError as err:
        raise ConfigError("mechanism.delta", f"{err.problem} canaries in training (of {num_canaries})",
                          err.fix) from err


def audit_dp_sgd(mechanism: DPSGD, *, num_canaries: int = 1000, guesses: int = 200, sample_rate: float = 0.5,
                 steps: int = 20, beta: float = 0.05, seed: int = 0) -> dict:
    """Audit a DP-SGD mechanism in one run with white-box gradient canaries (Dirac canaries).

    Canary j's example has the gradient exactly ``C e_j`` (C = ``max_grad_norm``): the model is a linear map
    ``w`` of R^m with loss ``-<w, x_j>`` and ``x_j = C e_j``, so clipping leaves it whole and coordinate j of
    the final weights moves only when canary j is sampled. The mechanism trains ``steps`` Poisson steps of
    rate ``sample_rate`` over the included canaries with SGD (lr 1); the score of canary j is ``-w_j``; the
    auditor guesses on the ``guesses / 2`` highest and lowest scores. This is the strongest attacker
    DP-SGD's proof allows (it sees the final weights and each canary's gradient is worst-case), so the bound
    tests the mechanism's implementation: clipping, sampling and noise.

    Returns the guesses' outcome, the bound at confidence ``1 - beta`` and the mechanism's delta, the epsilon
    the mechanism's ledger claims for the run at that delta, and each canary's score and inclusion.
    """
    from torch import nn
    from torch.utils.data import TensorDataset

    check_audit_plan(num_canaries=num_canaries, guesses=guesses, sample_rate=sample_rate, steps=steps, beta=beta)
    audit = OneRunAudit(num_canaries=num_canaries, k_plus=guesses // 2, k_minus=guesses // 2,
                        delta=mechanism.delta, beta=beta, seed=seed)
    clip = mechanism.max_grad_norm
    inputs = -clip * torch.eye(num_canaries)[audit.included]  # loss -<w, x>: the per-example gradient is C e_j
    linear = nn.Linear(num_canaries, 1, bias=False)
    nn.init.zeros_(linear.weight)
    loader = mechanism.data_loader(TensorDataset(inputs), batch_size=max(1, round(sample_rate * len(inputs))))
    model, optimizer = mechanism.make_private(linear, torch.optim.SGD(linear.parameters(), lr=1.0),
                                              data_loader=loader, steps=steps)
    taken = 0
    while taken < steps:
        for (x,) in loader:
            optimizer.zero_grad()
            if not mechanism.owns_backward:
                (-model(x).mean()).backward()
            elif len(x):
                mechanism.backward(-model(x).mean())
            else:
                mechanism.empty_batch()
            optimizer.step()
            taken += 1
            if taken == steps:
                break
    scores = -linear.weight.detach().squeeze(0).cpu()
    claimed = mechanism.epsilon()
    return audit.epsilon_lower_bound(scores) | {
        "num_canaries": num_canaries, "included": int(audit.included.sum()), "steps": mechanism.steps_taken,
        "sample_rate": mechanism.sample_rate, "noise_multiplier": mechanism.noise_multiplier,
        "max_grad_norm": clip, "beta": beta, "epsilon_claimed": claimed, "delta": mechanism.delta,
        "scores": scores.tolist(), "in_training": audit.included.tolist()}
