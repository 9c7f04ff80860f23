"""Tests of the Skellam mechanism: its RDP bound against the exact Renyi divergence of shifted Skellam
distributions, its closeness to the Gaussian mechanism of the same variance, composition with Gaussian events in
the ledger (state round trip, PRV refusal, memoized epsilon), calibration of mu, and the integer noise itself.

The exact divergence D_alpha(Sk + c || Sk) is a sum over the integers of p(k - c)^alpha p(k)^(1 - alpha), with the
Skellam log-pmf computed exactly in log space as a convolution of two Poisson log-pmfs (checked against scipy).

The statistical tests of the noise (z-tests of the mean and of the sample variance, using the Skellam's known
fourth moment, and a chi-square goodness-of-fit test against scipy's Skellam pmf) are two-sided at significance
ALPHA = 1e-6. The seeded draws use fixed seeds, so they pass or fail deterministically; the secure draw (fresh OS
randomness) fails a correct implementation with probability below 3e-6 per run (three tests, union bound). Each
helper is shown able to fail: it rejects a 2% wrong variance, a shift of the mean by 0.02 standard deviations,
the noise of a single client (variance 2 mu / n instead of 2 mu), and a Skellam of a 10% wrong parameter.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy import stats
from scipy.special import gammaln, logsumexp

from fedgen.errors import ConfigError
from fedgen.mechanisms import NoiseSource
from fedgen.mechanisms import ledger as ledger_module
from fedgen.mechanisms.ledger import (
    INTEGER_RDP_ORDERS,
    PrivacyLedger,
    SkellamEvent,
    SubsampledGaussianEvent,
    calibrate_skellam_mu,
    compute_epsilon,
    skellam_rdp,
)

ALPHA = 1e-6
DELTA = 1e-5


# --- the exact Renyi divergence --------------------------------------------------------------------------


def skellam_logpmf(k: np.ndarray, mu: float) -> np.ndarray:
    """log P(Sk(mu, mu) = k) = log sum_n Pois(|k| + n; mu) Pois(n; mu) (the pmf is symmetric), exactly in log
    space (no underflow)."""
    k = np.abs(k)
    n = np.arange(0, int(mu + 40 * math.sqrt(mu) + 40))  # the Poisson(mu) mass beyond is below e^-400
    log_pois_n = n * math.log(mu) - mu - gammaln(n + 1)
    out = np.empty(len(k))
    for start in range(0, len(k), 256):
        j = k[start:start + 256, None] + n[None, :]
        log_pois_j = np.where(j >= 0, j * math.log(mu) - mu - gammaln(np.maximum(j, 0) + 1), -np.inf)
        out[start:start + 256] = logsumexp(log_pois_j + log_pois_n[None, :], axis=1)
    return out


def exact_divergence(mu: float, shift: int, alpha: float) -> float:
    """D_alpha(Sk(mu, mu) + shift || Sk(mu, mu)), summed over every k where a term is above e^-200 of the peak."""
    if shift == 0:
        return 0.0
    width = int(15 * math.sqrt(2 * mu) + 40)
    k = np.arange(min(0, alpha * shift) - width, max(0, alpha * shift) + width + 1).astype(np.int64)
    log_p, log_q = skellam_logpmf(k, mu), skellam_logpmf(k - shift, mu)
    return float(logsumexp(alpha * log_q + (1 - alpha) * log_p) / (alpha - 1))


def bound(mu: float, l2: float, l1: float, alpha: int) -> float:
    return skellam_rdp(alpha, mu=mu, l2_sensitivity=l2, l1_sensitivity=l1)


def test_logpmf_matches_scipy() -> None:
    k = np.arange(-30, 31)
    for mu in (0.5, 3.0, 40.0):
        np.testing.assert_allclose(skellam_logpmf(k, mu), stats.skellam.logpmf(k, mu, mu), rtol=1e-9)


MUS = (0.5, 2.0, 10.0, 100.0)
SHIFTS = (1, 2, 5)
ORDERS = (2, 3, 8, 32)


@pytest.mark.parametrize("mu", MUS)
def test_bound_is_above_the_exact_divergence(mu: float) -> None:
    for shift in SHIFTS:
        for alpha in ORDERS:
            exact = exact_divergence(mu, shift, alpha)
            assert bound(mu, shift, shift, alpha) >= exact > 0, (mu, shift, alpha)
            assert bound(mu, shift, shift, alpha) >= exact_divergence(mu, -shift, alpha)  # symmetric


def test_bound_is_tight_for_large_mu() -> None:
    """Within 2% of the exact divergence at mu = 100 (so the variance convention, 2 mu, is not off by 2)."""
    for shift in SHIFTS:
        for alpha in (2, 3, 8):
            assert bound(100.0, shift, shift, alpha) <= 1.02 * exact_divergence(100.0, shift, alpha)


def test_the_exact_comparison_can_fail() -> None:
    """A bound with half the leading term (the paper's formula misread with variance mu instead of 2 mu, the
    other way round) falls below the exact divergence: the comparison above has power."""
    mu, shift, alpha = 10.0, 2, 3
    halved = alpha * shift**2 / (8 * mu) + min(((2 * alpha - 1) * shift**2 + 6 * shift) / (64 * mu**2),
                                               3 * shift / (8 * mu))
    assert halved < exact_divergence(mu, shift, alpha)


@pytest.mark.parametrize("mu", [1.0, 5.0, 50.0])
def test_bound_with_l1_and_l2_norms_covers_a_shift_vector(mu: float) -> None:
    """For independent coordinates the divergence adds up; the bound with the vector's norms is above the sum."""
    for vector in ([1, -2, 0, 3, 1], [4, 4, -4], [1] * 9):
        v = np.array(vector)
        l2, l1 = float(np.linalg.norm(v)), float(np.abs(v).sum())
        for alpha in (2, 4, 16):
            exact = sum(exact_divergence(mu, int(c), alpha) for c in v)
            assert bound(mu, l2, l1, alpha) >= exact, (mu, vector, alpha)


@pytest.mark.parametrize("order", [1.5, 2.5, 1, 0])
def test_bound_refuses_non_integer_orders(order: float) -> None:
    with pytest.raises(ValueError, match="integer orders"):
        skellam_rdp(order, mu=1.0, l2_sensitivity=1.0, l1_sensitivity=1.0)


# --- closeness to the Gaussian mechanism -----------------------------------------------------------------


@pytest.mark.parametrize("mu", [1e4, 1e6, 1e12])
def test_bound_approaches_gaussian_rdp(mu: float) -> None:
    """alpha D^2 / (2 sigma^2) with sigma^2 = 2 mu, never below it and within 1% for large mu."""
    for l2 in (1.0, 30.0, 1e3):
        if l2**2 > mu / 100:
            continue
        l1 = min(l2**2, 100 * l2)  # an integer vector in 10^4 dimensions
        for alpha in (2, 8, 64, 1024):
            gaussian = alpha * l2**2 / (2 * 2 * mu)
            assert gaussian <= bound(mu, l2, l1, alpha) <= 1.01 * gaussian


def _gaussian_integer_order_epsilon(sigma: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rdp = opacus_rdp.compute_rdp(q=1.0, noise_multiplier=sigma, steps=1, orders=INTEGER_RDP_ORDERS)
        return float(opacus_rdp.get_privacy_spent(orders=INTEGER_RDP_ORDERS, rdp=rdp, delta=DELTA)[0])


@pytest.mark.parametrize("sigma", [0.7, 1.0, 3.5, 20.0])
def test_skellam_epsilon_is_close_to_and_never_below_the_gaussian(sigma: float) -> None:
    """The federated release's setting: Delta_2 = 2^20 + sqrt(m), Delta_1 = sqrt(m) Delta_2, m = 2010."""
    m = 2010
    l2 = 2.0**20 + math.sqrt(m)
    event = SkellamEvent((sigma * l2) ** 2 / 2, l2, math.sqrt(m) * l2)
    assert event.noise_multiplier == pytest.approx(sigma)
    skellam = compute_epsilon([event], DELTA, "rdp")
    gaussian = _gaussian_integer_order_epsilon(sigma)
    assert gaussian <= skellam <= 1.001 * gaussian
    # ... and within 1% of the ledger's Gaussian epsilon over all orders.
    assert skellam <= 1.01 * compute_epsilon([SubsampledGaussianEvent(sigma)], DELTA, "rdp")


# --- the ledger ------------------------------------------------------------------------------------------


def _manual_epsilon(events: list) -> float:
    rdp = np.zeros(len(INTEGER_RDP_ORDERS))
    for e in events:
        if isinstance(e, SkellamEvent):
            rdp += [e.count * bound(e.mu, e.l2_sensitivity, e.l1_sensitivity, a) for a in INTEGER_RDP_ORDERS]
        else:
            rdp += opacus_rdp.compute_rdp(q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=e.count,
                                          orders=INTEGER_RDP_ORDERS)
    return float(opacus_rdp.get_privacy_spent(orders=INTEGER_RDP_ORDERS, rdp=rdp, delta=DELTA)[0])


def test_ledger_composes_gaussian_and_skellam_releases() -> None:
    gaussian = SubsampledGaussianEvent(1.1, 0.01, 300)
    skellam = SkellamEvent(2e4, 100.0, 1000.0)
    expected = _manual_epsilon([gaussian, skellam])
    for accountant in ("auto", "rdp"):
        ledger = PrivacyLedger(accountant=accountant)
        ledger.record(gaussian)
        ledger.record(skellam)
        assert ledger.epsilon(DELTA) == pytest.approx(expected, rel=1e-12)
    assert compute_epsilon([skellam, gaussian], DELTA) == pytest.approx(expected, rel=1e-12)  # order-free
    alone = max(compute_epsilon([gaussian], DELTA, "rdp"), compute_epsilon([skellam], DELTA))
    assert expected > alone
    # Two releases of the same Skellam mechanism are one event with count 2, and cost twice the RDP.
    ledger = PrivacyLedger()
    ledger.record(skellam)
    ledger.record(skellam)
    assert ledger.events == (SkellamEvent(2e4, 100.0, 1000.0, 2),) and len(ledger) == 2
    assert ledger.epsilon(DELTA) == pytest.approx(_manual_epsilon([skellam, skellam]), rel=1e-12)
    assert not gaussian.same_mechanism(skellam) and not skellam.same_mechanism(gaussian)


def test_gaussian_only_histories_keep_their_accountant() -> None:
    """A Gaussian-only ledger still uses every order (and PRV under auto), not the Skellam path."""
    gaussian = SubsampledGaussianEvent(1.0, 0.05, 100)
    assert compute_epsilon([gaussian], DELTA, "rdp") < _manual_epsilon([gaussian])
    zero = SkellamEvent(10.0, 1.0, 1.0, count=0)
    assert compute_epsilon([gaussian, zero], DELTA, "prv") == compute_epsilon([gaussian], DELTA, "prv")


def test_state_dict_round_trip_with_skellam_events() -> None:
    ledger = PrivacyLedger(accountant="rdp", unit="user")
    ledger.record(SubsampledGaussianEvent(2.0, 0.1, 10))
    ledger.record(SkellamEvent(1e6, 1e3, 3e4, 3))
    state = json.loads(json.dumps(ledger.state_dict()))
    assert [e["type"] for e in state["events"]] == ["subsampled_gaussian", "skellam"]
    restored = PrivacyLedger(accountant="auto", unit="user")
    restored.load_state_dict(state)
    assert restored.events == ledger.events
    assert restored.epsilon(DELTA) == ledger.epsilon(DELTA)
    summary = restored.summary(DELTA)
    assert "3 x Skellam(mu=1e+06, l2_sensitivity=1000, l1_sensitivity=3e+04" in summary
    assert "1 x" not in summary and "10 x (sigma=2, q=0.1)" in summary


def test_prv_refuses_skellam_releases() -> None:
    event = SkellamEvent(1e4, 10.0, 100.0)
    prv = PrivacyLedger(accountant="prv")
    with pytest.raises(ConfigError) as caught:
        prv.record(event)
    assert caught.value.field == "accountant" and "auto" in caught.value.fix and "rdp" in caught.value.fix
    assert prv.events == ()
    with pytest.raises(ConfigError, match="accountant"):
        compute_epsilon([event], DELTA, "prv")
    ledger = PrivacyLedger()
    ledger.record(event)
    with pytest.raises(ConfigError, match="accountant"):
        ledger.epsilon(DELTA, accountant="prv")
    with pytest.raises(ConfigError, match="accountant"):
        prv.load_state_dict(ledger.state_dict())
    with pytest.raises(ConfigError, match="accountant"):
        calibrate_skellam_mu(target_epsilon=1.0, delta=DELTA, l2_sensitivity=1.0, l1_sensitivity=1.0,
                             accountant="prv")


def test_epsilon_with_then_record_computes_once(monkeypatch) -> None:
    calls = []
    original = ledger_module.compute_epsilon

    def counting(events, delta, accountant="auto"):
        calls.append(tuple(events))
        return original(events, delta, accountant)

    monkeypatch.setattr(ledger_module, "compute_epsilon", counting)
    ledger = PrivacyLedger()
    event = SkellamEvent(1e4, 10.0, 100.0)
    before = ledger.epsilon_with(event, DELTA)
    ledger.record(event)
    assert ledger.epsilon(DELTA) == before and len(calls) == 1
    gaussian = SubsampledGaussianEvent(3.0)
    with_gaussian = ledger.epsilon_with(gaussian, DELTA)
    ledger.record(gaussian)
    assert ledger.epsilon(DELTA) == with_gaussian and len(calls) == 2
    assert ledger.epsilon(DELTA, accountant="rdp") == with_gaussian and len(calls) == 3  # another key
    # A merged event changes the history: computed afresh, and correctly.
    ledger.epsilon_with(gaussian, DELTA)
    ledger.record(gaussian)
    assert ledger.epsilon(DELTA) == original(list(ledger.events), DELTA) and len(calls) == 5


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"mu": 0.0}, "mu"), ({"mu": float("inf")}, "mu"), ({"l2_sensitivity": -1.0}, "l2_sensitivity"),
    ({"l1_sensitivity": 0.0}, "l1_sensitivity"), ({"count": -1}, "count"),
])
def test_bad_skellam_events_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SkellamEvent(**({"mu": 1.0, "l2_sensitivity": 1.0, "l1_sensitivity": 1.0} | kwargs))
    assert caught.value.field == field


# --- calibration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "l2", "l1", "count"), [
    (1.0, 2.0**20 + 45.0, 45.0 * (2.0**20 + 45.0), 1),
    (0.1, 5.0, 25.0, 1),
    (8.0, 3.0, 9.0, 4),
])
def test_calibration_is_safe_and_tight(target: float, l2: float, l1: float, count: int) -> None:
    mu = calibrate_skellam_mu(target_epsilon=target, delta=DELTA, l2_sensitivity=l2, l1_sensitivity=l1, count=count)

    def eps(m: float) -> float:
        return compute_epsilon([SkellamEvent(m, l2, l1, count)], DELTA)

    assert eps(mu) <= target < eps(mu * 0.998)


def test_calibration_accounts_for_prior_spending() -> None:
    prior = PrivacyLedger()
    prior.record(SubsampledGaussianEvent(1.0, 0.02, 500))
    spent = prior.epsilon(DELTA)
    target = spent + 1.0
    mu = calibrate_skellam_mu(target_epsilon=target, delta=DELTA, l2_sensitivity=10.0, l1_sensitivity=100.0,
                              prior=prior)
    fresh = calibrate_skellam_mu(target_epsilon=target, delta=DELTA, l2_sensitivity=10.0, l1_sensitivity=100.0)
    assert mu > fresh  # the prior spending leaves less room: more noise
    assert prior.epsilon_with(SkellamEvent(mu, 10.0, 100.0), DELTA) <= target
    assert prior.epsilon_with(SkellamEvent(mu * 0.998, 10.0, 100.0), DELTA) > target
    with pytest.raises(ConfigError, match="already spent"):
        calibrate_skellam_mu(target_epsilon=spent / 2, delta=DELTA, l2_sensitivity=10.0, l1_sensitivity=100.0,
                             prior=prior)


# --- the noise -------------------------------------------------------------------------------------------


def mean_rejects(x: np.ndarray, variance: float, alpha: float = ALPHA) -> bool:
    """Two-sided z-test of H0: mean 0, for i.i.d. draws of known ``variance``."""
    z = float(x.mean()) / math.sqrt(variance / x.size)
    return abs(z) > stats.norm.isf(alpha / 2)


def variance_rejects(x: np.ndarray, mu: float, alpha: float = ALPHA) -> bool:
    """Two-sided z-test of H0: i.i.d. Sk(mu, mu), on the mean of x^2 (mean known to be 0).

    For Sk(mu, mu), v = E x^2 = 2 mu and E x^4 = 3 v^2 + v (its fourth cumulant is 2 mu), so the mean of x^2
    over d draws has standard deviation sqrt((2 v^2 + v) / d), and it is normal by the central limit theorem.
    """
    v = 2 * mu
    x = x.astype(np.float64)
    z = (float(np.mean(x**2)) - v) / math.sqrt((2 * v**2 + v) / x.size)
    return abs(z) > stats.norm.isf(alpha / 2)


def pmf_rejects(x: np.ndarray, mu: float, alpha: float = ALPHA) -> bool:
    """Chi-square goodness-of-fit test of H0: x ~ Sk(mu, mu), over the values with expected count >= 20."""
    values = np.arange(x.min(), x.max() + 1)
    expected = stats.skellam.pmf(values, mu, mu) * x.size
    observed = np.bincount(x - x.min(), minlength=values.size)
    keep = expected >= 20
    rest_observed, rest_expected = observed[~keep].sum(), x.size - expected[keep].sum()
    statistic = float((((observed[keep] - expected[keep]) ** 2) / expected[keep]).sum()
                      + (rest_observed - rest_expected) ** 2 / rest_expected)
    return stats.chi2.sf(statistic, int(keep.sum())) < alpha


def client_sum(source: NoiseSource, mu: float, clients: int, size: int) -> np.ndarray:
    return np.sum([source.skellam(size, mu / clients) for _ in range(clients)], axis=0)


SIZE = 200_000


@pytest.mark.parametrize(("mu", "clients"), [(3.0, 7), (250.0, 10), (1.2e13, 10)])
def test_sum_of_client_shares_has_variance_2mu_and_mean_0(mu: float, clients: int) -> None:
    total = client_sum(NoiseSource(seed=11), mu, clients, SIZE)
    assert total.dtype == np.int64
    assert not mean_rejects(total, 2 * mu)
    assert not variance_rejects(total, mu)
    # Power: a 2% wrong variance, a mean shifted by 0.02 std, one client's share alone are all rejected.
    assert variance_rejects(total, mu * 1.02) and variance_rejects(total, mu * 0.98)
    assert mean_rejects(total + 0.02 * math.sqrt(2 * mu), 2 * mu)
    assert variance_rejects(NoiseSource(seed=12).skellam(SIZE, mu / clients), mu)


@pytest.mark.parametrize("secure", [False, True])
def test_sum_of_client_shares_is_skellam(secure: bool) -> None:
    """For small mu the whole distribution is checked: n shares of Sk(mu / n) sum to exactly Sk(mu, mu)."""
    source = NoiseSource(seed=None if secure else 5, secure=secure)
    total = client_sum(source, 4.0, 8, SIZE)
    assert not pmf_rejects(total, 4.0)
    assert not mean_rejects(total, 8.0) and not variance_rejects(total, 4.0)
    assert pmf_rejects(total, 4.4) and pmf_rejects(total, 3.6)  # power: a 10% wrong parameter


def test_noise_source_skellam_is_seeded_and_resumable() -> None:
    a, b = NoiseSource(seed=3), NoiseSource(seed=3)
    np.testing.assert_array_equal(a.skellam(100, 1e9), b.skellam(100, 1e9))
    state = a.state_dict()
    after = a.skellam(100, 5.0)
    resumed = NoiseSource(seed=99)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.skellam(100, 5.0), after)
    assert not np.array_equal(NoiseSource(seed=4).skellam(100, 1e9), NoiseSource(seed=3).skellam(100, 1e9))
    secure = NoiseSource(secure=True)
    assert not np.array_equal(secure.skellam(100, 1e9), secure.skellam(100, 1e9))
    for bad in (0.0, -1.0, float("nan"), 1e18):
        with pytest.raises(ValueError, match="mu"):
            a.skellam(3, bad)
