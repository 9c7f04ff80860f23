"""A DP warm-up: one private release, spent from the generator's own budget, that the generator trains on without
noise before DP-SGD starts.

The release is charged to the generator's ledger first; DP-SGD then calibrates its noise for what is left of its
``target_epsilon`` (the ledger composes both). Training on the released data is post-processing: no further cost.
Two releases implement :class:`WarmUpRelease`: :class:`~fedgen.generators.CentralImages` (noisy class means) and
:class:`~fedgen.generators.MerfImages` (a DP-Merf generator's samples).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch.utils.data import Dataset, TensorDataset

from fedgen.errors import ConfigError, check_at_least_one
from fedgen.mechanisms import Mechanism, PrivacyLedger
from fedgen.mechanisms.ledger import PrivacyEvent


class WarmUpRelease:
    """What every warm-up release shares. Subclasses are dataclasses with the fields ``epsilon`` (the part of the
    generator's budget at its delta that the release spends) and ``steps`` (non-private Adam steps of the generator
    on the released images), and name their argument of the generator in ``name``."""

    name: ClassVar[str]
    epsilon: float
    steps: int
    #: examples in each warm-up step; None: the generator's own batch size (or all the released images if fewer)
    batch_size: int | None = None

    @property
    def field(self) -> str:
        return f"model.{self.name}"

    def check_settings(self, image_shape: tuple[int, int, int] | None) -> None:
        """Refuse the subclass's own settings, for images of ``image_shape`` where known (``ConfigError`` naming
        the field)."""

    def check(self, mechanism: Mechanism, *, image_shape: tuple[int, int, int] | None = None) -> None:
        """Refuse settings that cannot work with the generator's ``mechanism`` (and its images of ``image_shape``),
        before anything is released."""
        self.check_settings(image_shape)
        check_at_least_one(f"{self.field}.steps", self.steps, "use e.g. 500")
        if mechanism.ledger.unit != "example":
            raise ConfigError(self.field, f"the warm-up release is example-level; the generator's ledger is "
                              f"{mechanism.ledger.unit}-level", f"remove {self.name} for user-level DP")
        target = mechanism.target_epsilon
        if not self.epsilon > 0 or (target is not None and not self.epsilon < target):
            raise ConfigError(f"{self.field}.epsilon", f"must be > 0 and below the mechanism's target_epsilon "
                              f"({target}), got {self.epsilon}", "spend a small part of the budget, e.g. 0.1 of it")
        if mechanism.ledger.events:
            raise ConfigError(self.field, "the generator's ledger already records releases",
                              "run the warm-up's release before any other private work")

    def opens(self, event: PrivacyEvent) -> bool:
        """Whether ``event``, a ledger's first, is the release these settings describe."""
        raise NotImplementedError

    def describe(self) -> str:
        """The release in a few words, for error messages."""
        raise NotImplementedError

    def check_resumed(self, ledger: PrivacyLedger) -> None:
        """A resumed run releases nothing again: the ledger restored from its checkpoint must open with the release
        these settings describe, else the run was started otherwise."""
        if not ledger.events or not self.opens(ledger.events[0]):
            raise ConfigError(self.field, f"the checkpoint's ledger does not open with {self.describe()}: the run "
                              "was started without them, or with other settings",
                              f"resume with the {self.name} the run was started with, or none")

    def release(self, dataset: Dataset, *, num_classes: int, mechanism: Mechanism,
                device: torch.device | str = "cpu") -> tuple[TensorDataset, dict]:
        """Release from ``dataset`` ((image, label) pairs) at ``epsilon``, charged to ``mechanism``'s ledger; return
        the released images with their labels (pixels in [0, 1], on the CPU) and a report of the release."""
        raise NotImplementedError
