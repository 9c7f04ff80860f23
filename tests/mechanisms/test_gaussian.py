"""Tests of the Gaussian mechanism: the noise's distribution, clipping, seeding, the budget and config errors.

The statistical tests (chi-square test of the variance, z-test of the mean, plus a Kolmogorov-Smirnov test
of normality and a test that the two Box-Muller halves are uncorrelated) are two-sided at significance
ALPHA = 1e-6: a correct implementation fails each of them with probability 1e-6 per run (the secure path
draws fresh OS randomness every run, so that is its false-failure rate, below 2e-5 for the whole file by a
union bound; the seeded paths use fixed seeds and so either always pass or always fail). Each test is shown able to fail by a power check: the same helpers
reject synthetic data whose standard deviation is off by 2%, whose mean is shifted by 0.02 standard
deviations, that is uniform or Laplace with the right variance, or whose halves have correlation 0.05;
and they reject the released noise itself when it is tested against a 2% wrong standard deviation.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from fedgen.errors import ConfigError, PrivacyBudgetExceeded
from fedgen.mechanisms import DPSGD, GaussianMechanism, clip_rows

ALPHA = 1e-6
DIM = 200_000


def variance_test_rejects(sample: torch.Tensor, std: float, alpha: float = ALPHA) -> bool:
    """Two-sided chi-square test of H0: the entries are i.i.d. N(0, std^2) with the given variance.

    Under H0, sum(x^2) / std^2 ~ chi2(d) (mean known to be 0). Rejects with probability ``alpha`` under H0.
    """
    x = sample.detach().double().flatten()
    statistic = float((x / std).square().sum())
    d = x.numel()
    return statistic < stats.chi2.ppf(alpha / 2, d) or statistic > stats.chi2.isf(alpha / 2, d)


def mean_test_rejects(sample: torch.Tensor, std: float, alpha: float = ALPHA) -> bool:
    """Two-sided z-test of H0: mean 0, for i.i.d. entries of known standard deviation ``std``."""
    x = sample.detach().double().flatten()
    z = float(x.mean()) / (std / math.sqrt(x.numel()))
    return abs(z) > stats.norm.isf(alpha / 2)


def normality_test_rejects(sample: torch.Tensor, std: float, alpha: float = ALPHA) -> bool:
    """Kolmogorov-Smirnov test of H0: the entries are distributed as N(0, std^2) (the shape, not only the moments).

    The entries are standardised and compared with Phi computed by ``torch.special.ndtr``: SciPy's own normal CDF
    with loc/scale arguments raises a TypeError in some SciPy/NumPy builds, and the test should not rest on it.
    """
    z = (sample.detach().double().flatten() / std).numpy()
    return stats.kstest(z, standard_normal_cdf).pvalue < alpha


def standard_normal_cdf(z):
    """Phi(z) for a NumPy array, through torch."""
    return torch.special.ndtr(torch.from_numpy(z)).numpy()


def halves_correlated(sample: torch.Tensor, alpha: float = ALPHA) -> bool:
    """Two-sided test of H0: the first and second halves are uncorrelated (sqrt(n) * r ~ N(0, 1) under H0).

    Box-Muller produces the two halves from the same uniforms: reusing them wrongly shows up here.
    """
    x = sample.detach().double().flatten()
    n = x.numel() // 2
    r = float(torch.corrcoef(torch.stack([x[:n], x[n:2 * n]]))[0, 1])
    return abs(r) * math.sqrt(n) > stats.norm.isf(alpha / 2)


def test_tests_have_power() -> None:
    """The helpers reject a 2% wrong standard deviation or a mean shifted by 0.02 std, and accept the truth."""
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)  # for the Laplace sample
    std = 0.85
    x = torch.randn(DIM, generator=gen, dtype=torch.float64) * std
    assert not variance_test_rejects(x, std)
    assert not mean_test_rejects(x, std)
    assert variance_test_rejects(x * 1.02, std)
    assert variance_test_rejects(x * 0.98, std)
    assert mean_test_rejects(x + 0.02 * std, std)
    assert mean_test_rejects(x - 0.02 * std, std)
    assert not normality_test_rejects(x, std)
    assert not halves_correlated(x)
    uniform = (torch.rand(DIM, generator=gen, dtype=torch.float64) - 0.5) * math.sqrt(12) * std  # same variance
    assert not variance_test_rejects(uniform, std) and normality_test_rejects(uniform, std)
    laplace = torch.distributions.Laplace(0.0, std / math.sqrt(2)).sample((DIM,)).double()  # same variance
    assert normality_test_rejects(laplace, std)
    half = DIM // 2
    mixed = torch.cat([x[:half], 0.05 * x[:half] + math.sqrt(1 - 0.05**2) * x[half:]])  # correlation 0.05
    assert not variance_test_rejects(mixed, std) and halves_correlated(mixed)


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_has_calibrated_std_and_zero_mean(secure: bool, dtype: torch.dtype) -> None:
    mech = GaussianMechanism(noise_multiplier=1.7, clip_norm=0.5, seed=None if secure else 11, secure_noise=secure)
    released = mech.release(torch.zeros(DIM, dtype=dtype))
    assert released.dtype == dtype and released.shape == (DIM,)
    std = 1.7 * 0.5
    assert mech.noise_std == pytest.approx(std)
    assert not variance_test_rejects(released, std)
    assert not mean_test_rejects(released, std)
    assert not normality_test_rejects(released, std)
    assert not halves_correlated(released)
    # ... and the same data would be rejected had the mechanism claimed a 2% different std:
    assert variance_test_rejects(released, std * 1.02)
    assert variance_test_rejects(released, std / 1.02)


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
def test_calibrated_noise_has_its_std(secure: bool) -> None:
    mech = GaussianMechanism(target_epsilon=2.0, delta=1e-6, clip_norm=3.0, num_releases=2, accountant="rdp",
                             seed=None if secure else 5, secure_noise=secure)
    sigma = mech.noise_multiplier
    assert sigma > 1.0
    released = mech.release(torch.zeros(DIM))
    assert not variance_test_rejects(released, sigma * 3.0)
    assert not mean_test_rejects(released, sigma * 3.0)
    assert variance_test_rejects(released, sigma * 3.0 * 1.02)


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
def test_an_integer_sum_is_refused_before_the_ledger_is_charged(secure: bool) -> None:
    """Noise cast to an integer dtype would be rounded toward zero (most coordinates released exactly)."""
    mech = GaussianMechanism(noise_multiplier=2.0, seed=None if secure else 1, secure_noise=secure)
    with pytest.raises(TypeError, match="floating-point"):
        mech.release(torch.tensor([10, 20, 30]))
    assert len(mech.ledger) == 0
    with pytest.raises(TypeError, match="floating point"):
        mech.noise.normal((3,), std=2.0, dtype=torch.int64)
    counts = mech.release(torch.tensor([10, 20, 30]).double())
    assert counts.dtype == torch.float64 and len(mech.ledger) == 1


def test_secure_noise_is_not_reproducible() -> None:
    a = GaussianMechanism(noise_multiplier=1.0, secure_noise=True, seed=3).release(torch.zeros(1000))
    b = GaussianMechanism(noise_multiplier=1.0, secure_noise=True, seed=3).release(torch.zeros(1000))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("saved_secure", [False, True])
def test_a_checkpoint_loads_only_into_a_mechanism_with_the_same_noise_source(saved_secure: bool) -> None:
    """Seeded and secure noise never mix within one run, so what a run reports of its noise holds for all of it."""
    first = GaussianMechanism(noise_multiplier=1.0, secure_noise=saved_secure, seed=3)
    first.release(torch.zeros(4))
    assert f"noise={first.noise.mode}" in first.describe()
    with pytest.raises(ConfigError, match="mechanism.secure_noise") as err:
        GaussianMechanism(noise_multiplier=1.0, secure_noise=not saved_secure, seed=3).load_state_dict(
            first.state_dict())
    assert f"secure_noise: {str(saved_secure).lower()}" in str(err.value)
    same = GaussianMechanism(noise_multiplier=1.0, secure_noise=saved_secure, seed=3)
    same.load_state_dict(first.state_dict())
    assert same.ledger.state_dict() == first.ledger.state_dict()


def test_a_checkpoint_with_other_noise_is_refused_unless_the_noise_is_calibrated() -> None:
    first = GaussianMechanism(noise_multiplier=2.0, seed=0)
    first.release(torch.zeros(4))
    with pytest.raises(ConfigError, match="mechanism.noise_multiplier"):
        GaussianMechanism(noise_multiplier=1.0).load_state_dict(first.state_dict())
    calibrated = GaussianMechanism(target_epsilon=100.0)
    calibrated.load_state_dict(first.state_dict())
    assert calibrated.noise_multiplier == 2.0


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_infinite_or_nan_noise_and_clip_norms_are_refused(bad: float) -> None:
    """A YAML `.inf` passes a `> 0` check: infinite noise, or an infinite clip norm that bounds nothing."""
    with pytest.raises(ConfigError, match="noise_multiplier"):
        GaussianMechanism(noise_multiplier=bad)
    with pytest.raises(ConfigError, match="clip_norm"):
        GaussianMechanism(noise_multiplier=1.0, clip_norm=bad)
    with pytest.raises(ConfigError, match="max_grad_norm"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=bad)


def test_secure_noise_odd_sizes_and_shapes() -> None:
    mech = GaussianMechanism(noise_multiplier=1.0, secure_noise=True)
    for shape in [(1,), (3,), (7, 5), (2, 3, 3)]:
        out = mech.release(torch.zeros(shape))
        assert out.shape == shape and torch.isfinite(out).all()
        assert (out != 0).all()


# ---------------------------------------------------------------------------------------------- clipping
def _reference_clip(rows: torch.Tensor, clip: float) -> torch.Tensor:
    out = []
    for row in rows:
        norm = float(row.double().norm())
        out.append(row * min(1.0, clip / norm) if norm > 0 else row)
    return torch.stack(out)


def test_clip_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 3, 4, generator=gen, dtype=torch.float64) * torch.logspace(-2, 1, 64, dtype=torch.float64).view(-1, 1, 1)
    rows[5] = 0.0
    clip = 1.5
    clipped = clip_rows(rows, clip)
    norms_before = rows.flatten(1).norm(dim=1)
    norms_after = clipped.flatten(1).norm(dim=1)
    inside = norms_before <= clip
    assert 10 < int(inside.sum()) < 54  # both kinds of rows occur
    assert torch.equal(clipped[inside], rows[inside])  # rows within the bound are untouched, bit for bit
    assert torch.allclose(norms_after[~inside], torch.full_like(norms_after[~inside], clip), rtol=1e-10)
    assert (norms_after <= clip * (1 + 1e-12)).all()
    torch.testing.assert_close(clipped, _reference_clip(rows, clip), rtol=1e-10, atol=0)
    # direction is kept
    cos = torch.nn.functional.cosine_similarity(clipped.flatten(1)[~inside], rows.flatten(1)[~inside])
    torch.testing.assert_close(cos, torch.ones_like(cos))


@pytest.mark.parametrize(("dtype", "clip", "width"), [(torch.float16, 1.0, 257), (torch.bfloat16, 1.0, 257),
                                                      (torch.float16, 1e-3, 10000), (torch.float16, 1e-4, 10000)])
def test_clipped_low_precision_rows_stay_within_the_bound_after_rounding(dtype: torch.dtype, clip: float,
                                                                         width: int) -> None:
    """Scaled in their own dtype, bfloat16 rows came out up to 0.6% above the clip norm; float16 rows whose entries
    fall below its smallest normal number round by an absolute step, up to 1.3% above it."""
    rows = (torch.randn(200, width, generator=torch.Generator().manual_seed(0)) * 5 * clip).to(dtype)
    clipped = clip_rows(rows, clip)
    norms = clipped.double().norm(dim=1)
    assert clipped.dtype == dtype and (norms <= clip).all() and (norms > 0.95 * clip).all()
    inside = (rows[:3].float() * (0.5 * clip / rows[:3].float().norm(dim=1, keepdim=True))).to(dtype)
    assert torch.equal(clip_rows(inside, clip), inside)  # rows within the bound are left as they are
    with pytest.raises(ValueError, match="too small"):
        clip_rows(rows.to(torch.float16), 1e-7)


def test_release_sum_is_clipped_sum_plus_seeded_noise() -> None:
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(40, 50, generator=gen, dtype=torch.float64) * 2
    clip = 3.0
    a = GaussianMechanism(noise_multiplier=0.7, clip_norm=clip, seed=99)
    b = GaussianMechanism(noise_multiplier=0.7, clip_norm=clip, seed=99)
    c = GaussianMechanism(noise_multiplier=0.7, clip_norm=clip, seed=100)
    released = a.release_sum(rows)
    noise_b = b.release(torch.zeros(50, dtype=torch.float64))
    noise_c = c.release(torch.zeros(50, dtype=torch.float64))
    expected_sum = _reference_clip(rows, clip).sum(dim=0)
    assert not torch.allclose(expected_sum, rows.sum(dim=0))  # clipping mattered
    torch.testing.assert_close(released, expected_sum + noise_b, rtol=0, atol=1e-12)
    assert not torch.allclose(noise_b, noise_c)  # a different seed gives different noise
    assert noise_b.abs().max() > 0
    assert torch.equal(a.clip(rows), clip_rows(rows, clip))
    # successive releases of one mechanism draw fresh noise
    assert not torch.equal(b.release(torch.zeros(50, dtype=torch.float64)), noise_b)


def test_noise_state_round_trip_reproduces_noise() -> None:
    a = GaussianMechanism(noise_multiplier=1.0, seed=7)
    a.release(torch.zeros(10))
    state = a.state_dict()
    expected = a.release(torch.zeros(10))
    b = GaussianMechanism(noise_multiplier=1.0, seed=8)
    b.load_state_dict(state)
    assert torch.equal(b.release(torch.zeros(10)), expected)
    assert len(b.ledger) == 2  # the ledger came with the state: 1 restored + 1 new release


# ------------------------------------------------------------------------------------------------ budget
@pytest.mark.parametrize("accountant", ["auto", "rdp", "prv"])
def test_budget_allows_exactly_the_planned_releases(accountant: str) -> None:
    mech = GaussianMechanism(target_epsilon=1.0, delta=1e-5, num_releases=3, accountant=accountant, seed=0)
    for _ in range(3):
        mech.release_sum(torch.ones(4, 8))
    with pytest.raises(PrivacyBudgetExceeded):
        mech.release_sum(torch.ones(4, 8))
    assert len(mech.ledger) == 3  # the refused release was not recorded
    assert mech.ledger.events[0].count == 3 and len(mech.ledger.events) == 1
    eps = mech.epsilon()
    assert 0.95 < eps <= 1.0


def test_explicit_noise_with_small_budget_refuses_first_release() -> None:
    mech = GaussianMechanism(noise_multiplier=1.0, target_epsilon=0.1, seed=0)
    with pytest.raises(PrivacyBudgetExceeded):
        mech.release(torch.zeros(3))
    assert len(mech.ledger) == 0 and mech.epsilon() == 0.0


def test_explicit_noise_with_enough_budget_releases_and_records() -> None:
    mech = GaussianMechanism(noise_multiplier=5.0, target_epsilon=10.0, accountant="rdp", seed=0)
    mech.release(torch.zeros(3))
    assert len(mech.ledger) == 1
    assert mech.ledger.events[0].noise_multiplier == 5.0 and mech.ledger.events[0].sample_rate == 1.0


# ---------------------------------------------------------------------------------------- configuration
def _field(exc_info: pytest.ExceptionInfo[ConfigError]) -> str:
    assert str(exc_info.value).startswith(exc_info.value.field + ":")
    return exc_info.value.field


def test_needs_noise_or_budget() -> None:
    with pytest.raises(ConfigError) as err:
        GaussianMechanism()
    assert "noise_multiplier" in _field(err) and "target_epsilon" in str(err.value)


@pytest.mark.parametrize("value", [0, -1, 0.0, float("nan"), float("inf")])
def test_bad_target_epsilon(value: float) -> None:
    with pytest.raises(ConfigError) as err:
        GaussianMechanism(target_epsilon=value)
    assert _field(err) == "mechanism.target_epsilon"


@pytest.mark.parametrize("value", [1.0, 2.0, 0.0, -1e-5, float("nan")])
def test_bad_delta(value: float) -> None:
    with pytest.raises(ConfigError) as err:
        GaussianMechanism(noise_multiplier=1.0, delta=value)
    assert _field(err) == "mechanism.delta"


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_bad_clip_norm(value: float) -> None:
    with pytest.raises(ConfigError) as err:
        GaussianMechanism(noise_multiplier=1.0, clip_norm=value)
    assert "clip_norm" in _field(err)


@pytest.mark.parametrize("value", [0.0, -2.0])
def test_bad_noise_multiplier(value: float) -> None:
    with pytest.raises(ConfigError) as err:
        GaussianMechanism(noise_multiplier=value)
    assert "noise_multiplier" in _field(err)


def test_unknown_unit_is_named_as_the_config_names_it() -> None:
    with pytest.raises(ConfigError) as err:
        GaussianMechanism(noise_multiplier=1.0, unit="client")
    assert _field(err) == "mechanism.unit"


def test_unknown_accountant() -> None:
    with pytest.raises(ConfigError) as err:
        GaussianMechanism(noise_multiplier=1.0, accountant="moments")
    assert _field(err) == "mechanism.accountant"


def test_dataset_size_check() -> None:
    mech = GaussianMechanism(noise_multiplier=1.0, delta=1e-3)
    mech.check_dataset_size(999)  # 1e-3 < 1/999
    with pytest.raises(ConfigError) as err:
        mech.check_dataset_size(1000)  # delta == 1/n
    assert _field(err) == "delta"
    with pytest.raises(ConfigError) as err:
        mech.check_dataset_size(50_000)
    assert _field(err) == "delta"
    with pytest.raises(ConfigError) as err:
        mech.check_dataset_size(0)
    assert _field(err) == "data"
