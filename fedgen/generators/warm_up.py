"""A DP warm-up: one private release, spent from the generator's own budget, that the generator trains on without
noise before DP-SGD starts.

The release is charged to the generator's ledger first; DP-SGD then calibrates its noise for what is left of its
``target_epsilon`` (the ledger composes both). Training on the released data is post-processing: no further cost.
Two releases implement :class:`WarmUpRelease`: :class:`~fedgen.generators.CentralImages` (noisy class means) and
:class:`~fedgen.generators.MerfImages` (a DP-Merf generator's samples). A generator may chain them, each release
after the ones before it on the ledger (``earlier``): coarse class means first, then DP-Merf's varied samples, the
curriculum from spatial to frequency features of FETA-Pro (Gong, Li, Lin and Wang, 2026).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms import v2

from fedgen.errors import ConfigError, check_at_least_one
from fedgen.mechanisms import GaussianMechanism, Mechanism, PrivacyLedger
from fedgen.mechanisms.ledger import PrivacyEvent, SubsampledGaussianEvent, calibrate_noise_multiplier, compute_epsilon


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

    def check(self, mechanism: Mechanism, *, image_shape: tuple[int, int, int] | None = None,
              earlier: Sequence[WarmUpRelease] = ()) -> None:
        """Refuse settings that cannot work with the generator's ``mechanism`` (and its images of ``image_shape``),
        before anything is released. ``earlier``: the warm-up releases that come before this one; the ledger may
        record theirs and nothing else."""
        self.check_settings(image_shape)
        check_at_least_one(f"{self.field}.steps", self.steps, "use e.g. 500")
        if mechanism.ledger.unit != "example":
            raise ConfigError(self.field, f"the warm-up release is example-level; the generator's ledger is "
                              f"{mechanism.ledger.unit}-level", f"remove {self.name} for user-level DP")
        target = mechanism.target_epsilon
        spent = sum(release.epsilon for release in earlier) + self.epsilon
        if not self.epsilon > 0 or (target is not None and not spent < target):
            together = f" (with {', '.join(r.name for r in earlier)}: {spent:g})" if earlier else ""
            raise ConfigError(f"{self.field}.epsilon", f"must be > 0 and leave DP-SGD part of the mechanism's "
                              f"target_epsilon ({target}), got {self.epsilon}{together}",
                              "spend a small part of the budget on warm-ups, e.g. 0.2 of it in all")
        events = mechanism.ledger.events
        if len(events) > len(earlier) or any(not r.opens(e) for r, e in zip(earlier, events, strict=False)):
            raise ConfigError(self.field, "the generator's ledger already records releases",
                              "run the warm-up's release before any other private work")

    def gaussian(self, mechanism: Mechanism, *, clip_norm: float, stream: int) -> GaussianMechanism:
        """The release's Gaussian mechanism, that of :meth:`planned_event`: its noise calibrated so that its releases
        alone spend ``epsilon`` at the generator's delta, whatever the ledger already holds (the ledger then composes
        them with the earlier warm-ups, which costs less than the sum of the shares); charging the generator's
        ledger; its noise from a stream of its own (``stream``), apart from DP-SGD's and the other releases'."""
        event = self.planned_event(mechanism)
        gaussian = GaussianMechanism(noise_multiplier=event.noise_multiplier, delta=mechanism.delta,
                                     clip_norm=clip_norm, num_releases=event.count, sample_rate=event.sample_rate,
                                     accountant=mechanism.ledger.accountant, seed=mechanism.noise.derived_seed(stream),
                                     secure_noise=mechanism.noise.secure)
        gaussian.use_ledger(mechanism.ledger)
        return gaussian

    def noise_multiplier(self, mechanism: Mechanism, *, releases: int = 1, sample_rate: float = 1.0) -> float:
        """The Gaussian noise multiplier at which ``releases`` at ``sample_rate`` alone spend ``epsilon`` at the
        generator's delta."""
        return calibrate_noise_multiplier(target_epsilon=self.epsilon, delta=mechanism.delta, sample_rate=sample_rate,
                                          steps=releases, accountant=mechanism.ledger.accountant)

    def planned_event(self, mechanism: Mechanism) -> SubsampledGaussianEvent:
        """The event the release will record in ``mechanism``'s ledger, known before anything is released: a
        generator checks with it that its DP-SGD keeps a step of the budget after the warm-ups."""
        raise NotImplementedError

    @staticmethod
    def epsilon_alone(gaussian: GaussianMechanism) -> float:
        """What ``gaussian``'s planned releases spend on their own (the ledger composes them with the rest)."""
        event = SubsampledGaussianEvent(gaussian.noise_multiplier, gaussian.sample_rate, gaussian.num_releases)
        return compute_epsilon([event], gaussian.delta, gaussian.ledger.accountant)

    def opens(self, event: PrivacyEvent) -> bool:
        """Whether ``event``, a ledger's first, is the release these settings describe."""
        raise NotImplementedError

    def describe(self) -> str:
        """The release in a few words, for error messages."""
        raise NotImplementedError

    def check_resumed(self, ledger: PrivacyLedger, position: int = 0) -> None:
        """A resumed run releases nothing again: the ledger restored from its checkpoint must hold the release these
        settings describe at ``position`` (0: it opens the ledger; 1: after one earlier warm-up), else the run was
        started otherwise."""
        if len(ledger.events) <= position or not self.opens(ledger.events[position]):
            where = "open with" if position == 0 else f"hold, after {position} earlier warm-up release(s),"
            raise ConfigError(self.field, f"the checkpoint's ledger does not {where} {self.describe()}: the run "
                              "was started without them, or with other settings",
                              f"resume with the {self.name} the run was started with, or none")

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """The view of a batch of released ``images`` (N, C, H, W, pixels in [0, 1], on the CPU) that one warm-up
        step trains on: the images themselves unless the release sets an augmentation (post-processing of the
        release, no privacy cost)."""
        return images

    def release(self, dataset: Dataset, *, num_classes: int, mechanism: Mechanism,
                device: torch.device | str = "cpu", earlier: Sequence[WarmUpRelease] = ()
                ) -> tuple[TensorDataset, dict]:
        """Release from ``dataset`` ((image, label) pairs) at ``epsilon``, charged to ``mechanism``'s ledger after
        the ``earlier`` warm-up releases; return the released images with their labels (pixels in [0, 1], on the
        CPU) and a report of the release."""
        raise NotImplementedError


def rand_augment(images: torch.Tensor, num_ops: int, max_magnitude: int) -> torch.Tensor:
    """RandAugment (Cubuk, Zoph, Shlens and Le, 2020) on each of ``images`` (N, C, H, W, pixels in [0, 1]) apart:
    ``num_ops`` operations drawn from torchvision's list (shears, shifts, rotation, contrast, ...) at a magnitude
    drawn uniformly from 1 to ``max_magnitude`` of torchvision's 30 steps, as DP-FETA trains on its central images
    (Li et al., 2025). The images are rounded to 8 bits first, as the operations expect; randomness from torch's
    global generator.

    The per-image operations run on one CPU thread: on images this small, torch's thread pool only adds
    synchronisation, and where another process shares the cores (two runs on one machine) its spinning threads made
    each step several times slower."""
    by_magnitude = [v2.RandAugment(num_ops=num_ops, magnitude=m) for m in range(1, max_magnitude + 1)]
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    picks = torch.randint(len(by_magnitude), (len(pixels),)).tolist()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        augmented = torch.stack([by_magnitude[m](image) for m, image in zip(picks, pixels, strict=True)])
    finally:
        torch.set_num_threads(threads)
    return augmented.to(images.dtype) / 255
