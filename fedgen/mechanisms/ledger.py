"""The privacy ledger: every privatized release as an immutable event, and epsilon computed from them.

A release of the Gaussian mechanism on a Poisson subsample (rate ``q``) of the data, with noise standard
deviation ``sigma * C`` for per-unit sensitivity ``C``, is one :class:`SubsampledGaussianEvent`
(``q = 1`` is the plain Gaussian mechanism). A release of integer Skellam noise on an integer vector (the
distributed noise of :class:`~fedgen.federated.FederatedRelease`) is one :class:`SkellamEvent`. Composition is
recorded, not computed, at release time; :meth:`PrivacyLedger.epsilon` turns the whole history into an
(epsilon, delta) guarantee with Opacus' accountants:

- ``"rdp"``: Renyi DP of the sampled Gaussian mechanism (Mironov, Talwar, Zhang 2019), converted to
  (epsilon, delta) with the conversion of Balle et al. (2020), over orders up to 1024.
- ``"prv"``: privacy random variables (Gopi, Lee, Wutschitz, NeurIPS 2021); the ledger reports the
  accountant's *upper* bound, which includes its numerical error.
- ``"auto"`` (default): both, and the smaller. Each is a valid upper bound, so their minimum is too.
  If PRV cannot handle the history (it fails for some extreme parameters), RDP alone is used.

A history with a Skellam event is accounted with RDP only, over the integer orders of ``RDP_ORDERS`` (the
Skellam bound holds for integer orders): the Gaussian events through Opacus' ``compute_rdp``, the Skellam
events through the bound of Agarwal, Kairouz and Liu (2021), summed per order and converted with the same
conversion as Opacus' RDP accountant. ``"auto"`` then means RDP; ``"prv"`` is refused.

The neighbouring relation is add/remove-one ``unit``: an example (example-level DP) or all the data of
one user (user-level DP, as in DP-FedAvg). Every epsilon the ledger reports refers to that unit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis.prv.domain import Domain
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedgen.errors import ConfigError

AccountantName = Literal["auto", "rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("auto", "rdp", "prv")
UNITS: tuple[str, ...] = ("example", "user")

#: Renyi orders: Opacus' defaults plus large orders, which matter for small epsilon.
RDP_ORDERS: list[float] = RDPAccountant.DEFAULT_ALPHAS + [64, 80, 96, 128, 192, 256, 384, 512, 768, 1024]
#: Integer Renyi orders (2 to 63, then the large orders of ``RDP_ORDERS``), for histories with a Skellam event.
INTEGER_RDP_ORDERS: list[int] = list(range(2, 64)) + [int(a) for a in RDP_ORDERS if a >= 64]


@dataclass(frozen=True)
class SubsampledGaussianEvent:
    """``count`` compositions of the Poisson-subsampled Gaussian mechanism.

    Each release adds N(0, (noise_multiplier * C)^2 I) to a sum of contributions of L2 norm at most C,
    over a subsample that includes each unit independently with probability ``sample_rate``.
    """

    kind: ClassVar[str] = "subsampled_gaussian"

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

    def same_mechanism(self, other: PrivacyEvent) -> bool:
        return isinstance(other, SubsampledGaussianEvent) and \
            (self.noise_multiplier, self.sample_rate) == (other.noise_multiplier, other.sample_rate)


def skellam_rdp(alpha: int, *, mu: float, l2_sensitivity: float, l1_sensitivity: float) -> float:
    """Renyi DP at integer order ``alpha >= 2`` of one release of Sk(mu, mu) noise on each coordinate of an
    integer vector whose change between neighbours has L2 norm <= ``l2_sensitivity`` (Delta_2) and L1 norm
    <= ``l1_sensitivity`` (Delta_1).

    Sk(mu, mu) = Poisson(mu) - Poisson(mu), variance 2 mu. Agarwal, Kairouz and Liu (NeurIPS 2021, "The Skellam
    Mechanism for Differentially Private Federated Learning", arXiv 2110.04995, the RDP bound of the
    multi-dimensional Skellam mechanism) state it for noise of variance ``v`` (Poisson(v/2) - Poisson(v/2)):

        eps(alpha) <= alpha D2^2 / (2 v) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 v^2), 3 D1 / (2 v)),

    so with v = 2 mu:

        eps(alpha) <= alpha D2^2 / (4 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2), 3 D1 / (4 mu)).

    The first term is the Gaussian mechanism's RDP at the same variance (alpha D2^2 / (2 sigma^2), sigma^2 = 2 mu);
    the second is the price of discreteness and vanishes relative to it as mu grows.
    """
    if isinstance(alpha, bool) or not float(alpha).is_integer() or alpha < 2:
        raise ValueError(f"the Skellam RDP bound holds for integer orders >= 2, got {alpha!r}")
    d2sq, d1 = l2_sensitivity**2, l1_sensitivity
    return alpha * d2sq / (4 * mu) + min(((2 * alpha - 1) * d2sq + 6 * d1) / (16 * mu**2), 3 * d1 / (4 * mu))


@dataclass(frozen=True)
class SkellamEvent:
    """``count`` releases of the multi-dimensional Skellam mechanism (no subsampling: every unit takes part).

    Each release adds i.i.d. Sk(mu, mu) = Poisson(mu) - Poisson(mu) noise (variance 2 mu) to every coordinate of
    an integer vector (e.g. a fixed-point sum in secure aggregation) that moves by at most ``l2_sensitivity`` in
    L2 norm and ``l1_sensitivity`` in L1 norm between neighbouring datasets; both are in integer units. Its RDP
    is :func:`skellam_rdp` (Agarwal, Kairouz, Liu, NeurIPS 2021); sums of independent Skellam draws are Skellam,
    so n clients each adding Sk(mu / n, mu / n) make one such release.
    """

    kind: ClassVar[str] = "skellam"

    mu: float
    l2_sensitivity: float
    l1_sensitivity: float
    count: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and self.mu > 0):
            raise ConfigError("mu", f"must be a finite number > 0, got {self.mu}",
                              "add noise: a positive Skellam parameter (or a finite target_epsilon)")
        for name in ("l2_sensitivity", "l1_sensitivity"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(name, f"must be a finite number > 0, got {value}",
                                  "give the bound on how far one unit moves the integer vector")
        if self.count < 0:
            raise ConfigError("count", f"must be >= 0, got {self.count}", "count releases from 0 up")

    def same_mechanism(self, other: PrivacyEvent) -> bool:
        return isinstance(other, SkellamEvent) and \
            (self.mu, self.l2_sensitivity, self.l1_sensitivity) == (other.mu, other.l2_sensitivity,
                                                                   other.l1_sensitivity)

    @property
    def noise_multiplier(self) -> float:
        """The Gaussian noise multiplier of the same variance: sqrt(2 mu) / Delta_2."""
        return math.sqrt(2 * self.mu) / self.l2_sensitivity

    def rdp(self, orders: Sequence[int]) -> np.ndarray:
        """RDP of the ``count`` releases at each (integer) order."""
        return self.count * np.array([skellam_rdp(a, mu=self.mu, l2_sensitivity=self.l2_sensitivity,
                                                  l1_sensitivity=self.l1_sensitivity) for a in orders])


PrivacyEvent = SubsampledGaussianEvent | SkellamEvent
EVENT_TYPES: dict[str, type] = {SubsampledGaussianEvent.kind: SubsampledGaussianEvent, SkellamEvent.kind: SkellamEvent}


def check_delta(delta: float, field: str = "delta") -> None:
    """Reject a delta outside (0, 1)."""
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ConfigError(field, f"must be in (0, 1), got {delta!r}",
                          "use a delta well below 1/n for n records, e.g. 1e-5")


def check_accountant(accountant: str, field: str = "accountant") -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(field, f"unknown accountant {accountant!r}", f"use one of {list(ACCOUNTANTS)}")


def check_accountant_supports(events: Sequence[PrivacyEvent], accountant: str) -> None:
    """Refuse PRV accounting of a Skellam release (PRV here knows only the subsampled Gaussian)."""
    if accountant == "prv" and any(isinstance(e, SkellamEvent) for e in events):
        raise ConfigError("accountant", "the PRV accountant cannot account for a Skellam (distributed noise) release",
                          "use accountant 'auto' or 'rdp': Skellam releases are accounted with RDP")


def _history(events: Sequence[PrivacyEvent]) -> list[tuple[float, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.count) for e in events
            if isinstance(e, SubsampledGaussianEvent) and e.count > 0]


def _mixed_rdp_epsilon(events: Sequence[PrivacyEvent], delta: float) -> float:
    """RDP over the integer orders: Gaussian events via Opacus' ``compute_rdp``, Skellam events via
    :func:`skellam_rdp`; summed per order (composition) and converted with Opacus' ``get_privacy_spent``."""
    orders = INTEGER_RDP_ORDERS
    rdp = np.zeros(len(orders))
    for e in events:
        if e.count == 0:
            continue
        if isinstance(e, SkellamEvent):
            rdp += e.rdp(orders)
        else:
            rdp += _step_rdp(e.sample_rate, e.noise_multiplier, tuple(orders)) * e.count
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def _step_rdp(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    """Opacus' RDP of one subsampled Gaussian step at each order, computed once per mechanism and orders.

    Opacus' ``compute_rdp`` returns the one-step RDP times the step count, so ``_step_rdp(...) * count`` is its
    value to the bit; a search over counts (:meth:`PrivacyLedger.max_count`) then costs one RDP evaluation instead
    of one per count tried (each is a sum of series at every order, about 0.2 s on a CPU)."""
    rdp = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)),
                     dtype=float)
    rdp.setflags(write=False)
    return rdp


def _rdp_of_history(history: list[tuple[float, float, int]], delta: float, orders: list[float]) -> float:
    """Opacus' ``RDPAccountant(history).get_epsilon(delta, alphas=orders)`` from the cached one-step RDP."""
    key = tuple(orders)
    rdp = sum([_step_rdp(q, sigma, key) * steps for sigma, q, steps in history])
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def _rdp_epsilon(events: list[SubsampledGaussianEvent], delta: float) -> float:
    """Opacus' RDP accountant (``RDPAccountant.get_epsilon`` over ``RDP_ORDERS``), with each event's one-step RDP
    cached: the same sum of per-event RDP and the same conversion, so the same epsilon."""
    return _rdp_of_history(_history(events), delta, RDP_ORDERS)


# The largest PRV grid fedgen builds. Its size grows with the RDP bound on epsilon: about 3.7e5 points at
# epsilon 10 and 1e7 (9 s on a 2-core CPU) at epsilon 380; sigma 0.1 at q 0.07 over 1,120 steps would need 6e8 and
# hours. Past it, "auto" answers with RDP's bound, which is never below the true epsilon.
PRV_MAX_POINTS = 2**24


class _PRVAccountant(PRVAccountant):
    """Opacus' PRV accountant, whose grid is sized with the cached one-step RDP.

    Opacus sizes the discretization domain with RDP bounds over its default orders (``compute_safe_domain_size``,
    after remark 5.6 of Gopi, Lee and Wutschitz, NeurIPS 2021), computing each event's RDP afresh at every call:
    most of a PRV epsilon's time on a CPU. This computes the same bounds from :func:`_step_rdp` (the same numbers,
    so the same domain and the same epsilon; a test compares with Opacus' own accountant)."""

    def _get_domain(self, prvs: list, num_self_compositions: list[int], eps_error: float,
                    delta_error: float) -> Any:
        orders = RDPAccountant.DEFAULT_ALPHAS
        total = sum(num_self_compositions)
        bound = _rdp_of_history([(prv.noise_multiplier, prv.sample_rate, n)
                                 for prv, n in zip(prvs, num_self_compositions, strict=True)], delta_error / 4, orders)
        for prv in prvs:
            bound = max(bound, _rdp_of_history([(prv.noise_multiplier, prv.sample_rate, 1)],
                                               delta_error / (8 * total), orders))
        half_width = max(bound, eps_error) + 3
        mesh = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        points = 2 * half_width / mesh
        if points > PRV_MAX_POINTS:
            raise ArithmeticError(f"the PRV accountant would need a grid of {points:.3g} points (at most "
                                  f"{PRV_MAX_POINTS:.3g}): the noise is too small for it; use accountant='rdp'")
        return Domain.create_aligned(-half_width, half_width, mesh)


def _prv_epsilon(events: list[SubsampledGaussianEvent], delta: float) -> float:
    accountant = _PRVAccountant()
    accountant.history = _history(events)
    with warnings.catch_warnings(), _quiet_numpy():
        warnings.simplefilter("ignore", RuntimeWarning)
        # Opacus sizes the PRV grid with an RDP bound over its own orders and warns when the best is the last
        # one; that only sizes the grid (PRV's answer comes with its own error bound), so it is not the user's
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
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


def compute_epsilon(events: Sequence[PrivacyEvent], delta: float, accountant: AccountantName = "auto") -> float:
    """Epsilon at ``delta`` for the composition of ``events`` (0 for no events).

    With a Skellam event in ``events``, RDP over integer orders (``"auto"`` and ``"rdp"``; ``"prv"`` raises).
    """
    check_delta(delta)
    check_accountant(accountant)
    if any(isinstance(e, SkellamEvent) and e.count > 0 for e in events):
        check_accountant_supports(events, accountant)
        return _mixed_rdp_epsilon(events, delta)
    if not _history(events):
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(events, delta)
    if accountant == "prv":
        return _prv_epsilon(events, delta)
    rdp = _rdp_epsilon(events, delta)
    try:
        return min(rdp, _prv_epsilon(events, delta))
    except (ArithmeticError, ValueError, RuntimeError, MemoryError):  # e.g. a near-zero noise: PRV's grid explodes
        return rdp


def _largest_fitting(fits: Callable[[int], bool], lo: int) -> int:
    """The largest ``n >= lo`` with ``fits(n)``, for ``fits`` true up to some count and false beyond, given that
    ``fits(lo)`` holds (or ``lo = 0``): steps up from ``lo`` by doubling strides, then bisects the last stride."""
    stride = max(1, lo // 8)
    hi = lo + stride
    while fits(hi):
        lo, stride = hi, 2 * stride
        hi = lo + stride
        if lo > 10**9:
            return lo
    while hi - lo > 1:  # fits(lo) (or lo = 0), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class PrivacyLedger:
    """The record of every privatized release made from one private dataset.

    Epsilon values are memoized per ledger, keyed on (events, delta, accountant): ``epsilon_with(event, delta)``
    followed by ``record(event)`` and ``epsilon(delta)`` computes once when the event is appended as it is
    (not merged into the previous one).

    Args:
        accountant: how epsilon is computed: ``"auto"`` (the tighter of RDP and PRV), ``"rdp"`` or ``"prv"``.
            Histories with a Skellam release use RDP (``"prv"`` refuses them).
        unit: the neighbouring relation every epsilon refers to: add/remove one ``"example"`` or one ``"user"``.
    """

    _MEMO_SIZE = 256

    def __init__(self, *, accountant: AccountantName = "auto", unit: Literal["example", "user"] = "example") -> None:
        check_accountant(accountant)
        if unit not in UNITS:
            raise ConfigError("unit", f"unknown neighbouring unit {unit!r}", f"use one of {list(UNITS)}")
        self.accountant = accountant
        self.unit = unit
        self._events: list[PrivacyEvent] = []
        self._memo: dict[tuple, float] = {}

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        return tuple(self._events)

    def __len__(self) -> int:
        return sum(e.count for e in self._events)

    def record(self, event: PrivacyEvent) -> None:
        """Append a release; consecutive releases of the same mechanism are merged into one event."""
        check_accountant_supports([event], self.accountant)
        if self._events and self._events[-1].same_mechanism(event):
            last = self._events[-1]
            self._events[-1] = dataclasses.replace(last, count=last.count + event.count)
        else:
            self._events.append(event)

    def _epsilon(self, events: tuple[PrivacyEvent, ...], delta: float, accountant: AccountantName) -> float:
        key = (events, delta, accountant)
        if key not in self._memo:
            if len(self._memo) >= self._MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = compute_epsilon(events, delta, accountant)
        return self._memo[key]

    def epsilon(self, delta: float, *, accountant: AccountantName | None = None) -> float:
        """Epsilon spent so far at ``delta``."""
        return self._epsilon(tuple(self._events), delta, accountant or self.accountant)

    def epsilon_with(self, event: PrivacyEvent, delta: float) -> float:
        """Epsilon that would be spent if ``event`` were released next."""
        return self._epsilon((*self._events, event), delta, self.accountant)

    def max_count(self, event: PrivacyEvent, target_epsilon: float, delta: float) -> int:
        """The largest number of further releases of ``event``'s mechanism that stays within ``target_epsilon``.

        Under ``"auto"`` (the smaller of RDP and PRV, so never above RDP) the count RDP alone allows is found first,
        which is cheap (:func:`_step_rdp`), and fits under ``"auto"`` too; the search for the count PRV may add
        starts there, so it evaluates PRV, the slow accountant, about half as often as a search from 1."""

        def fits_under(accountant: AccountantName) -> Callable[[int], bool]:
            events = tuple(self._events)
            return lambda n: self._epsilon((*events, dataclasses.replace(event, count=n)), delta,
                                           accountant) <= target_epsilon

        start = _largest_fitting(fits_under("rdp"), 0) if self.accountant == "auto" else 0
        return _largest_fitting(fits_under(self.accountant), start)

    def summary(self, delta: float) -> str:
        eps = self.epsilon(delta)
        parts = ", ".join(_describe(e) for e in self._events)
        return (f"epsilon={eps:.4g} at delta={delta:g} ({self.unit}-level, add/remove one {self.unit}; "
                f"accountant={self.accountant}; releases: {parts or 'none'})")

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant,
            "unit": self.unit,
            "events": [dataclasses.asdict(e) | {"type": e.kind} for e in self._events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("unit", self.unit) != self.unit:
            raise ConfigError("unit", f"checkpoint's ledger is {state['unit']}-level, this one is {self.unit}-level",
                              "resume with the same neighbouring unit as the run that wrote the checkpoint")
        events = []
        for raw in state["events"]:
            raw = dict(raw)
            kind = raw.pop("type")
            if kind not in EVENT_TYPES:
                raise ConfigError("privacy_ledger", f"the checkpoint's ledger holds a release of unknown type {kind!r} "
                                  f"(known: {sorted(EVENT_TYPES)})", "resume with the fedgen version that wrote the "
                                  "checkpoint, or a later one")
            events.append(EVENT_TYPES[kind](**raw))
        check_accountant_supports(events, self.accountant)
        self._events = events  # the accountant stays the configured one: any valid accountant may read the events


def _describe(event: PrivacyEvent) -> str:
    if isinstance(event, SkellamEvent):
        return (f"{event.count} x Skellam(mu={event.mu:.4g}, l2_sensitivity={event.l2_sensitivity:.4g}, "
                f"l1_sensitivity={event.l1_sensitivity:.4g}; Gaussian-equivalent sigma={event.noise_multiplier:.4g})")
    return f"{event.count} x (sigma={event.noise_multiplier:.4g}, q={event.sample_rate:.4g})"


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


def calibrate_skellam_mu(*, target_epsilon: float, delta: float, l2_sensitivity: float, l1_sensitivity: float,
                         count: int = 1, accountant: AccountantName = "auto", prior: PrivacyLedger | None = None,
                         rtol: float = 1e-3) -> float:
    """The smallest Skellam parameter ``mu`` (to relative tolerance ``rtol``) whose ``count`` releases of
    Sk(mu, mu) noise, at integer sensitivities ``l2_sensitivity`` / ``l1_sensitivity``, after the events already
    in ``prior``, spend at most ``target_epsilon`` at ``delta`` (RDP accounting, see :func:`skellam_rdp`).

    The returned value is on the safe side of the bisection: its epsilon is <= ``target_epsilon``. Epsilon
    decreases in mu (every term of the bound does), so bisection finds the boundary.
    """
    check_target_epsilon(target_epsilon)
    check_delta(delta)
    check_accountant(accountant)
    check_accountant_supports([SkellamEvent(1.0, l2_sensitivity, l1_sensitivity, count)], accountant)
    base = list(prior.events) if prior is not None else []

    def eps(mu: float) -> float:
        return compute_epsilon([*base, SkellamEvent(mu, l2_sensitivity, l1_sensitivity, count)], delta, accountant)

    if base and compute_epsilon(base, delta, accountant) >= target_epsilon:
        raise ConfigError("target_epsilon", f"the ledger has already spent epsilon >= {target_epsilon}",
                          "raise the budget or start a new ledger for new data")
    # Search in units of the Gaussian-equivalent noise multiplier sigma = sqrt(2 mu) / Delta_2, over the same
    # range as calibrate_noise_multiplier (sigma in [1e-3, 1e6]).
    unit = l2_sensitivity**2 / 2  # mu at sigma = 1
    hi = unit
    while eps(hi) > target_epsilon:
        hi *= 4
        if hi > 1e12 * unit:
            raise ConfigError("target_epsilon", f"{target_epsilon} cannot be reached with {count} release(s)",
                              "raise target_epsilon or release less")
    lo = hi / 4
    while lo > 1e-6 * unit and eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 4
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
