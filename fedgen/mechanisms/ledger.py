"""The privacy ledger: every privatized release as an immutable event, and epsilon computed from them.

A release of the Gaussian mechanism on a Poisson subsample (rate ``q``) of the data, with noise standard
deviation ``sigma * C`` for per-unit sensitivity ``C``, is one :class:`SubsampledGaussianEvent`
(``q = 1`` is the plain Gaussian mechanism). Composition is recorded, not computed, at release time;
:meth:`PrivacyLedger.epsilon` turns the whole history into an (epsilon, delta) guarantee with Opacus'
accountants:

- ``"rdp"``: Renyi DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019), converted to
  (epsilon, delta) with the conversion of Balle et al. (2020), over orders up to 1024.
- ``"prv"``: privacy random variables (Gopi, Lee, Wutschitz, NeurIPS 2021); the ledger reports the
  accountant's *upper* bound, which includes its numerical error.
- ``"auto"`` (default): both, and the smaller. Each is a valid upper bound, so their minimum is too.
  If PRV cannot handle the history (it fails for some extreme parameters), RDP alone is used.

The neighbouring relation is add/remove-one ``unit``: an example (example-level DP) or all the data of
one user (user-level DP, as in DP-FedAvg). Every epsilon the ledger reports refers to that unit.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from opacus.accountants import PRVAccountant, RDPAccountant

from fedgen.errors import ConfigError

AccountantName = Literal["auto", "rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("auto", "rdp", "prv")
UNITS: tuple[str, ...] = ("example", "user")

#: Renyi orders: Opacus' defaults plus large orders, which matter for small epsilon.
RDP_ORDERS: list[float] = RDPAccountant.DEFAULT_ALPHAS + [64, 80, 96, 128, 192, 256, 384, 512, 768, 1024]


@dataclass(frozen=True)
class SubsampledGaussianEvent:
    """``count`` compositions of the Poisson-subsampled Gaussian mechanism.

    Each release adds N(0, (noise_multiplier * C)^2 I) to a sum of contributions of L2 norm at most C,
    over a subsample that includes each unit independently with probability ``sample_rate``.
    """

    noise_multiplier: float
    sample_rate: float = 1.0
    count: int = 1

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ConfigError("noise_multiplier", f"must be > 0, got {self.noise_multiplier}",
                              "add noise: a positive noise multiplier (or a finite target_epsilon)")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError("sample_rate", f"must be in (0, 1], got {self.sample_rate}",
                              "use batch_size / dataset size with batch_size <= dataset size")
        if self.count < 0:
            raise ConfigError("count", f"must be >= 0, got {self.count}", "count releases from 0 up")

    def same_mechanism(self, other: SubsampledGaussianEvent) -> bool:
        return (self.noise_multiplier, self.sample_rate) == (other.noise_multiplier, other.sample_rate)


def check_delta(delta: float, field: str = "delta") -> None:
    """Reject a delta outside (0, 1)."""
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ConfigError(field, f"must be in (0, 1), got {delta!r}",
                          "use a delta well below 1/n for n records, e.g. 1e-5")


def check_accountant(accountant: str, field: str = "accountant") -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(field, f"unknown accountant {accountant!r}", f"use one of {list(ACCOUNTANTS)}")


def _history(events: list[SubsampledGaussianEvent]) -> list[tuple[float, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.count) for e in events if e.count > 0]


def _rdp_epsilon(events: list[SubsampledGaussianEvent], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = _history(events)
    return float(accountant.get_epsilon(delta, alphas=RDP_ORDERS))


def _prv_epsilon(events: list[SubsampledGaussianEvent], delta: float) -> float:
    accountant = PRVAccountant()
    accountant.history = _history(events)
    with warnings.catch_warnings(), _quiet_numpy():
        warnings.simplefilter("ignore", RuntimeWarning)
        eps = float(accountant.get_epsilon(delta))
    if not math.isfinite(eps) or eps < 0:
        raise ArithmeticError(f"PRV accountant returned {eps}")
    return eps


class _quiet_numpy:
    """Silence numpy's divide-by-zero warnings inside Opacus' PRV code (they are expected there)."""

    def __enter__(self) -> None:
        import numpy as np

        self._old = np.seterr(divide="ignore", invalid="ignore", over="ignore")

    def __exit__(self, *exc: object) -> None:
        import numpy as np

        np.seterr(**self._old)


def compute_epsilon(events: list[SubsampledGaussianEvent], delta: float,
                    accountant: AccountantName = "auto") -> float:
    """Epsilon at ``delta`` for the composition of ``events`` (0 for no events)."""
    check_delta(delta)
    check_accountant(accountant)
    if not _history(events):
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(events, delta)
    if accountant == "prv":
        return _prv_epsilon(events, delta)
    rdp = _rdp_epsilon(events, delta)
    try:
        return min(rdp, _prv_epsilon(events, delta))
    except (ArithmeticError, ValueError, RuntimeError):
        return rdp


class PrivacyLedger:
    """The record of every privatized release made from one private dataset.

    Args:
        accountant: how epsilon is computed: ``"auto"`` (the tighter of RDP and PRV), ``"rdp"`` or ``"prv"``.
        unit: the neighbouring relation every epsilon refers to: add/remove one ``"example"`` or one ``"user"``.
    """

    def __init__(self, *, accountant: AccountantName = "auto", unit: Literal["example", "user"] = "example") -> None:
        check_accountant(accountant)
        if unit not in UNITS:
            raise ConfigError("unit", f"unknown neighbouring unit {unit!r}", f"use one of {list(UNITS)}")
        self.accountant = accountant
        self.unit = unit
        self._events: list[SubsampledGaussianEvent] = []

    @property
    def events(self) -> tuple[SubsampledGaussianEvent, ...]:
        return tuple(self._events)

    def __len__(self) -> int:
        return sum(e.count for e in self._events)

    def record(self, event: SubsampledGaussianEvent) -> None:
        """Append a release; consecutive releases of the same mechanism are merged into one event."""
        if self._events and self._events[-1].same_mechanism(event):
            last = self._events[-1]
            self._events[-1] = dataclasses.replace(last, count=last.count + event.count)
        else:
            self._events.append(event)

    def epsilon(self, delta: float, *, accountant: AccountantName | None = None) -> float:
        """Epsilon spent so far at ``delta``."""
        return compute_epsilon(self._events, delta, accountant or self.accountant)

    def epsilon_with(self, event: SubsampledGaussianEvent, delta: float) -> float:
        """Epsilon that would be spent if ``event`` were released next."""
        return compute_epsilon([*self._events, event], delta, self.accountant)

    def max_count(self, event: SubsampledGaussianEvent, target_epsilon: float, delta: float) -> int:
        """The largest number of further releases of ``event``'s mechanism that stays within ``target_epsilon``."""

        def fits(n: int) -> bool:
            return self.epsilon_with(dataclasses.replace(event, count=n), delta) <= target_epsilon

        if not fits(1):
            return 0
        hi = 1
        while fits(2 * hi):
            hi *= 2
            if hi > 10**9:
                return hi
        lo, hi = hi, 2 * hi  # fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def summary(self, delta: float) -> str:
        eps = self.epsilon(delta)
        parts = ", ".join(f"{e.count} x (sigma={e.noise_multiplier:.4g}, q={e.sample_rate:.4g})" for e in self._events)
        return (f"epsilon={eps:.4g} at delta={delta:g} ({self.unit}-level, add/remove one {self.unit}; "
                f"accountant={self.accountant}; releases: {parts or 'none'})")

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant,
            "unit": self.unit,
            "events": [dataclasses.asdict(e) | {"type": "subsampled_gaussian"} for e in self._events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("unit", self.unit) != self.unit:
            raise ConfigError("unit", f"checkpoint's ledger is {state['unit']}-level, this one is {self.unit}-level",
                              "resume with the same neighbouring unit as the run that wrote the checkpoint")
        events = []
        for raw in state["events"]:
            raw = dict(raw)
            kind = raw.pop("type")
            if kind != "subsampled_gaussian":
                raise ValueError(f"unknown privacy event type {kind!r} in the ledger state")
            events.append(SubsampledGaussianEvent(**raw))
        self._events = events  # the accountant stays the configured one: any valid accountant may read the events


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float = 1.0, steps: int = 1,
                               accountant: AccountantName = "auto", prior: PrivacyLedger | None = None,
                               rtol: float = 1e-3) -> float:
    """The smallest noise multiplier (to relative tolerance ``rtol``) whose ``steps`` releases at ``sample_rate``,
    after the events already in ``prior``, spend at most ``target_epsilon`` at ``delta``.

    The returned value is on the safe side of the bisection: its epsilon is <= ``target_epsilon``.
    """
    check_target_epsilon(target_epsilon)
    check_delta(delta)
    base = list(prior.events) if prior is not None else []

    def eps(sigma: float) -> float:
        return compute_epsilon([*base, SubsampledGaussianEvent(sigma, sample_rate, steps)], delta, accountant)

    if base and compute_epsilon(base, delta, accountant) >= target_epsilon:
        raise ConfigError("target_epsilon", f"the ledger has already spent epsilon >= {target_epsilon}",
                          "raise the budget or start a new ledger for new data")
    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > 1e6:
            raise ConfigError("target_epsilon", f"{target_epsilon} cannot be reached with {steps} steps",
                              "raise target_epsilon or take fewer steps")
    lo = hi / 2
    while lo > 1e-3 and eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
    while (hi - lo) / hi > rtol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


def check_target_epsilon(target_epsilon: float | None, field: str = "target_epsilon") -> None:
    if target_epsilon is None:
        return
    if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(field, f"must be a finite number > 0, got {target_epsilon!r}",
                          "give the privacy budget as a positive epsilon, e.g. 1.0 or 10.0")
