"""The mechanism base class: a budget, a ledger and a noise source; subclasses say how to privatize.

A mechanism releases privatized statistics and records every release in its
:class:`~fedgen.mechanisms.ledger.PrivacyLedger` *before* the release leaves the mechanism. Given a
``target_epsilon``, it refuses (``PrivacyBudgetExceeded``) any release that would push the ledger's
epsilon at ``delta`` past it.

Subclass it to add a mechanism; ``class Mine(Mechanism, name="mine")`` registers the class so that
``Mechanism.registry.get("mine")`` finds it (YAML files name it by ``class_path``).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

from fedgen.errors import ConfigError, PrivacyBudgetExceeded
from fedgen.mechanisms.ledger import (
    UNITS,
    AccountantName,
    PrivacyEvent,
    PrivacyLedger,
    check_accountant,
    check_delta,
    check_target_epsilon,
)
from fedgen.mechanisms.noise import NoiseSource
from fedgen.registry import Registered, Registry

log = logging.getLogger(__name__)


class Mechanism(Registered):
    """Base class of privacy mechanisms.

    Args:
        target_epsilon: the privacy budget; no release may push epsilon at ``delta`` past it.
            ``None`` means no budget (the noise must then be given explicitly).
        delta: the delta at which epsilon is computed and the budget enforced.
        accountant: ``"auto"`` (tighter of RDP and PRV), ``"rdp"`` or ``"prv"``.
        seed: seed of the noise generator (drawn from torch's global generator when ``None``).
        secure_noise: draw noise from the OS's cryptographically secure generator instead.
        unit: the neighbouring relation the mechanism protects: add/remove one ``"example"`` or one
            ``"user"`` (all of a client's data: client-level DP).
    """

    registry: Registry[Mechanism] = Registry("mechanism")

    def __init__(self, *, target_epsilon: float | None = None, delta: float = 1e-5,
                 accountant: AccountantName = "auto", seed: int | None = None, secure_noise: bool = False,
                 unit: Literal["example", "user"] = "example") -> None:
        check_target_epsilon(target_epsilon, "mechanism.target_epsilon")
        check_delta(delta, "mechanism.delta")
        check_accountant(accountant, "mechanism.accountant")
        if seed is not None and not 0 <= seed < 2**63:
            raise ConfigError("mechanism.seed", f"{seed} is outside [0, 2^63)",
                              "use e.g. 0, or null (drawn from the run's seed)")
        if unit not in UNITS:  # named as the config names it (the ledger, built directly, says "unit")
            raise ConfigError("mechanism.unit", f"unknown neighbouring unit {unit!r}", f"use one of {list(UNITS)}")
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.ledger = PrivacyLedger(accountant=accountant, unit=unit)
        self.noise = NoiseSource(seed=seed, secure=secure_noise)

    @staticmethod
    def check_noise(noise_multiplier: float | None, target_epsilon: float | None) -> None:
        """Noise must be given or calibrated from a budget, and positive if given."""
        if noise_multiplier is None and target_epsilon is None:
            raise ConfigError("mechanism.noise_multiplier", "neither noise_multiplier nor target_epsilon is set",
                              "set target_epsilon (the noise is then calibrated) or noise_multiplier")
        if noise_multiplier is not None and not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise ConfigError("mechanism.noise_multiplier", f"must be a finite number > 0, got {noise_multiplier}",
                              "use a positive noise multiplier; without noise there is no privacy")

    @staticmethod
    def check_resumed_noise(given: float | None, saved: float | None) -> None:
        """A noise multiplier set in the config must be the one the checkpoint's run used: the restored one would
        replace it unseen, while the saved config still named the other."""
        if given is not None and saved is not None and given != saved:
            raise ConfigError("mechanism.noise_multiplier", f"is {given:g}, but the checkpoint's run adds noise "
                              f"{saved:g}", f"resume with noise_multiplier: {saved:g} (or null with target_epsilon), "
                              "or start a new run")

    def use_ledger(self, ledger: PrivacyLedger) -> None:
        """Share ``ledger`` with other mechanisms spending the same data's budget."""
        self.ledger = ledger

    def check_dataset_size(self, num_units: int) -> None:
        """Refuse a delta that allows releasing a record outright: delta must be < 1 / n."""
        if num_units <= 0:
            raise ConfigError("data", "the private dataset is empty", "check the dataset and its subset options")
        if self.delta >= 1.0 / num_units:
            raise ConfigError("delta", f"delta={self.delta:g} >= 1/n = {1.0 / num_units:.3g} for n={num_units}",
                              f"use delta < 1/n, e.g. {10 ** -(len(str(num_units)) + 1):g}")

    def epsilon(self) -> float:
        """Epsilon spent so far (at this mechanism's delta), from the ledger."""
        return self.ledger.epsilon(self.delta)

    def exhausted(self) -> bool:
        """Whether the budget allows no further release of this mechanism's planned kind."""
        return False

    @property
    def owns_backward(self) -> bool:
        """Whether the training loop must call the mechanism's ``backward(loss)`` instead of ``loss.backward()``
        (a mechanism that clips per example itself, such as ``DPSGD(engine="fedgen")``)."""
        return False

    @property
    def one_sample_per_step(self) -> bool:
        """Whether each optimizer step must come from exactly one batch of the mechanism's sampler (DP-SGD: the
        ledger records one subsampled step per optimizer step, so a training loop may not accumulate several
        sampled batches into one step)."""
        return False

    def charge(self, event: PrivacyEvent) -> None:
        """Record ``event`` (a Gaussian or a Skellam release) in the ledger, or raise if it would exceed the budget
        (nothing is recorded then)."""
        if self.target_epsilon is not None:
            eps = self.ledger.epsilon_with(event, self.delta)
            if eps > self.target_epsilon:
                raise PrivacyBudgetExceeded(
                    f"{type(self).__name__}: this release would spend epsilon={eps:.4g} > "
                    f"target_epsilon={self.target_epsilon:g} at delta={self.delta:g}; it was refused. "
                    "Raise target_epsilon, add noise, or release less.")
        self.ledger.record(event)

    def state_dict(self) -> dict:
        return {"ledger": self.ledger.state_dict(), "noise": self.noise.state_dict()}

    def load_state_dict(self, state: dict, *, resume: bool = True) -> None:
        """Restore a checkpoint's state. ``resume``: the run goes on under this mechanism's settings, which must
        then agree with the checkpoint's (refused otherwise); ``resume=False`` only reads what the run spent (e.g.
        to sample from a finished run, whose first config may predate a resume's)."""
        if resume:
            self._check_resumable(state)
        self.ledger.load_state_dict(state["ledger"])
        self.noise.load_state_dict(state["noise"])

    def _check_resumable(self, state: dict) -> None:
        saved = bool(state["noise"]["secure"])
        if saved != self.noise.secure:  # a run's noise is one or the other from its first release to its last
            raise ConfigError("mechanism.secure_noise", f"the checkpoint's noise is {NoiseSource.mode_of(saved)}, the "
                              f"config's {self.noise.mode}", f"resume with secure_noise: {str(saved).lower()}, "
                              "as the run began; or start a new run")
        ledger = PrivacyLedger(accountant=self.ledger.accountant, unit=self.ledger.unit)
        ledger.load_state_dict(state["ledger"])
        spent = ledger.epsilon(self.delta)
        if self.target_epsilon is not None and spent > self.target_epsilon:
            raise ConfigError("mechanism.target_epsilon", f"is {self.target_epsilon:g}, but the checkpoint's run has "
                              f"spent epsilon {spent:.4g} at delta {self.delta:g} already",
                              f"resume with target_epsilon >= {spent:.4g} (the run's), or start a new run")

    def describe(self) -> str:
        """One line with the privacy parameters, for logs."""
        budget = f"target_epsilon={self.target_epsilon:g}" if self.target_epsilon is not None else "no budget"
        return (f"{type(self).__name__}({budget}, delta={self.delta:g}, accountant={self.ledger.accountant}, "
                f"noise={self.noise.mode})")
