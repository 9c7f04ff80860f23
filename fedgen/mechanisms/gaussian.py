"""The Gaussian mechanism on a sum of clipped contributions.

Each unit (example or user) contributes a vector ``x_i``; the mechanism clips it to L2 norm at most ``C``
and releases ``sum_i clip(x_i) + N(0, (sigma C)^2 I)``. Under add/remove-one neighbouring the sum's L2
sensitivity is ``C``, so one release is the Gaussian mechanism with noise multiplier ``sigma``
(Dwork and Roth 2014, Thm. A.1; accounted tightly by the ledger's PRV / RDP accountants).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch

from fedgen.errors import ConfigError, check_at_least_one
from fedgen.mechanisms.base import Mechanism
from fedgen.mechanisms.ledger import AccountantName, SubsampledGaussianEvent, calibrate_noise_multiplier

log = logging.getLogger(__name__)


def clip_rows(contributions: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Scale each row (first dimension indexes units) to L2 norm at most ``clip_norm``.

    Rows in float16 or bfloat16 that need scaling are scaled in float32 to a bound lowered by what rounding back can
    add: each entry moves by at most eps / 2 relatively, or by half the smallest subnormal absolutely, so a row of d
    entries by at most eps / 2 of its norm plus sqrt(d) times that half (triangle inequality)."""
    flat = contributions.flatten(1)
    low = flat.dtype in (torch.float16, torch.bfloat16)
    work = flat.float() if low else flat
    target = clip_norm
    if low:
        info = torch.finfo(flat.dtype)
        target = (clip_norm - math.sqrt(flat.shape[1]) * info.smallest_normal * info.eps / 2) * (1 - info.eps)
        if not target > clip_norm / 2:
            raise ValueError(f"clip_norm {clip_norm} is too small for {flat.dtype} rows of {flat.shape[1]} entries: "
                             "rounding could move them past it; clip in float32")
    norms = work.norm(dim=1, keepdim=True)
    scale = (target / (norms + 1e-12)).clamp(max=1.0)
    if low:  # rows within the bound are left as they are (scale 1 and the cast back are exact)
        scale = torch.where(norms <= clip_norm, torch.ones_like(scale), scale)
    return (work * scale).to(flat.dtype).reshape(contributions.shape)


class GaussianMechanism(Mechanism, name="gaussian"):
    """Sum of per-unit contributions clipped to ``clip_norm``, plus N(0, (noise_multiplier * clip_norm)^2).

    Give either ``noise_multiplier`` or ``target_epsilon`` (then the noise is calibrated so that
    ``num_releases`` releases spend exactly the budget), or both (the given noise, with the budget enforced).

    Args:
        noise_multiplier: noise standard deviation in units of ``clip_norm``.
        target_epsilon: privacy budget at ``delta``.
        delta: the delta of the guarantee.
        clip_norm: the L2 bound ``C`` on each unit's contribution (the sum's sensitivity).
        num_releases: planned number of releases, used to calibrate the noise from ``target_epsilon``.
        sample_rate: each release sums a Poisson sample of the units, each included with this probability
            (1: every unit; e.g. the client sampling rate of DP-FedAvg). The ledger accounts for it.
        accountant: ``"auto"``, ``"rdp"`` or ``"prv"``.
        seed: seed of the noise generator.
        secure_noise: draw noise from the OS's cryptographically secure generator.
        unit: the neighbouring relation: add/remove one ``"example"`` or one ``"user"`` (client-level DP).
    """

    def __init__(self, *, noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 delta: float = 1e-5, clip_norm: float = 1.0, num_releases: int = 1, sample_rate: float = 1.0,
                 accountant: AccountantName = "auto", seed: int | None = None, secure_noise: bool = False,
                 unit: Literal["example", "user"] = "example") -> None:
        super().__init__(target_epsilon=target_epsilon, delta=delta, accountant=accountant, seed=seed,
                         secure_noise=secure_noise, unit=unit)
        if not 0 < sample_rate <= 1:
            raise ConfigError("mechanism.sample_rate", f"must be in (0, 1], got {sample_rate}",
                              "use the probability with which each unit joins a release (1 = all)")
        self.sample_rate = float(sample_rate)
        self.check_noise(noise_multiplier, target_epsilon)
        if not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise ConfigError("mechanism.clip_norm", f"must be a finite number > 0, got {clip_norm}",
                              "use a positive clip norm")
        check_at_least_one("mechanism.num_releases", num_releases, "plan at least one release")
        self.clip_norm = float(clip_norm)
        self.num_releases = num_releases
        self._noise_multiplier = noise_multiplier
        #: whether the noise is calibrated from ``target_epsilon`` for ``num_releases`` releases
        self.calibrates_noise = noise_multiplier is None

    @property
    def noise_multiplier(self) -> float:
        """The noise multiplier, calibrated from ``target_epsilon`` on first use if it was not given."""
        if self._noise_multiplier is None:
            self._noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=self.target_epsilon, delta=self.delta, sample_rate=self.sample_rate,
                steps=self.num_releases, accountant=self.ledger.accountant, prior=self.ledger)
            log.info("Calibrated noise_multiplier=%.4f for target_epsilon=%g at delta=%g over %d release(s)",
                     self._noise_multiplier, self.target_epsilon, self.delta, self.num_releases)
        return self._noise_multiplier

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def clip(self, contributions: torch.Tensor) -> torch.Tensor:
        """Clip each row of ``contributions`` (one row per unit) to L2 norm ``clip_norm``."""
        return clip_rows(contributions, self.clip_norm)

    def release(self, clipped_sum: torch.Tensor, *, sensitivity: float | None = None) -> torch.Tensor:
        """Charge the ledger, then return ``clipped_sum`` plus calibrated Gaussian noise.

        ``clipped_sum`` must be a sum of contributions each clipped with :meth:`clip` (or known to have
        norm <= ``clip_norm``); use :meth:`release_sum` to clip and sum in one call. If the sum went through
        a step that can move it further per unit (e.g. fixed-point rounding in secure aggregation), pass its
        true L2 ``sensitivity`` (>= ``clip_norm``): the noise std becomes ``noise_multiplier * sensitivity``,
        so the recorded noise multiplier stays exact.
        """
        sensitivity = self.clip_norm if sensitivity is None else float(sensitivity)
        if sensitivity < self.clip_norm:
            raise ValueError(f"sensitivity {sensitivity} is below clip_norm {self.clip_norm}: a sum of clipped "
                             "contributions cannot have a smaller sensitivity than the clip norm")
        if not clipped_sum.is_floating_point():
            raise TypeError(f"the sum to release is {clipped_sum.dtype}; Gaussian noise needs a floating-point sum "
                            "(e.g. counts.double()), else it would be rounded away")
        self.charge(SubsampledGaussianEvent(self.noise_multiplier, self.sample_rate, 1))
        noise = self.noise.normal(clipped_sum.shape, std=self.noise_multiplier * sensitivity,
                                  device=clipped_sum.device, dtype=clipped_sum.dtype)
        return clipped_sum + noise

    def release_sum(self, contributions: torch.Tensor) -> torch.Tensor:
        """Clip each row of ``contributions``, sum over rows, and release the sum with noise."""
        return self.release(self.clip(contributions).sum(dim=0))

    def state_dict(self) -> dict:
        return super().state_dict() | {"noise_multiplier": self._noise_multiplier}

    def load_state_dict(self, state: dict, *, resume: bool = True) -> None:
        if resume:
            self.check_resumed_noise(None if self.calibrates_noise else self._noise_multiplier,
                                     state["noise_multiplier"])
        super().load_state_dict(state, resume=resume)
        self._noise_multiplier = state["noise_multiplier"]

    def describe(self) -> str:
        sigma = "calibrated at the first release" if self._noise_multiplier is None else f"{self._noise_multiplier:.4g}"
        return (f"{super().describe()[:-1]}, noise_multiplier={sigma}, clip_norm={self.clip_norm:g}, "
                f"releases={self.num_releases})")
