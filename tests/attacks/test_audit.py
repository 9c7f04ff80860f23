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
    p = 1 / (1 + math.exp(-eps))
    assert binom.sf(94, 100, p) == pytest.approx(0.05, rel=1e-6)  # P[Bin(100, p_eps) >= 95] = beta at the bound
    assert 2 < eps < 3.5
    # more correct guesses, or more guesses at the same rate, or less confidence: a larger bound
    assert epsilon_lower_bound(100, 100) > eps
    assert epsilon_lower_bound(950, 1000) > eps
    assert epsilon_lower_bound(95, 100, beta=0.2) > eps
    assert epsilon_lower_bound(50, 100) == 0.0 and epsilon_lower_bound(0, 10) == 0.0  # chance or worse


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


def _audited_dp_sgd_run(noise_multiplier: float | None, target_epsilon: float | None) -> dict:
    """One DP-SGD run (fedgen's engine) with 1000 white-box gradient canaries: canary j's example has gradient
    exactly C e_j (a Dirac canary), so the final weights' coordinate j shows whether it was trained on.
    Each canary is in the training set with probability 1/2."""
    from torch import nn
    from torch.utils.data import TensorDataset

    from fedgen.attacks import OneRunAudit
    from fedgen.mechanisms import DPSGD

    m, clip = 1000, 1.0
    audit = OneRunAudit(num_canaries=m, k_plus=100, k_minus=100, seed=0)
    inputs = -clip * torch.eye(m)[audit.included]  # loss -<w, x>: the per-example gradient is -x = C e_j
    data = TensorDataset(inputs)
    model = nn.Linear(m, 1, bias=False)
    nn.init.zeros_(model.weight)
    mechanism = DPSGD(noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=1e-3,
                      max_grad_norm=clip, seed=1, engine="fedgen")
    loader = mechanism.data_loader(data, batch_size=len(data) // 2)  # q = 1/2
    model, optimizer = mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                              data_loader=loader, steps=20)
    for _ in range(10):  # 10 epochs of 1/q = 2 Poisson batches: the 20 planned steps
        for (x,) in loader:
            optimizer.zero_grad()
            if len(x):
                mechanism.backward(-model(x).mean())
            else:
                mechanism.empty_batch()
            optimizer.step()
    scores = -model.weight.detach().squeeze(0)  # SGD moved coordinate j by -lr * C / B per inclusion
    result = audit.epsilon_lower_bound(scores) | {"steps": mechanism.steps_taken}
    if target_epsilon is not None:  # (the accountant is not asked about the near-zero noise)
        result["epsilon"] = mechanism.epsilon()
    return result


def test_the_audit_catches_dp_sgd_without_noise_and_respects_the_claim_with_noise() -> None:
    """1000 canaries, 200 guesses, one run each (the method audits in one run), 95% confidence."""
    broken = _audited_dp_sgd_run(noise_multiplier=1e-6, target_epsilon=None)  # noise switched off in effect
    assert broken["correct"] == broken["guesses"] == 200 and broken["epsilon_lower_bound"] > 2
    assert broken["steps"] == 20
    honest = _audited_dp_sgd_run(noise_multiplier=None, target_epsilon=1.0)
    assert honest["epsilon"] <= 1.0
    assert honest["epsilon_lower_bound"] <= honest["epsilon"]
