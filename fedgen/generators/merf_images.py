"""Merf images: a DP-Merf generator's samples, a DP warm-up for a generator that learns slowly under DP-SGD's noise.

DP-Merf (Harder et al., AISTATS 2021; :class:`~fedgen.generators.DPMerf`) releases the private data's
class-conditional mean embedding once, through the Gaussian mechanism, and trains a small generator on that release
alone. Its samples are varied, class-conditional images of the private domain at a small part of the budget (on
MNIST at epsilon 0.2, a ConvNet trained on 10,000 of them reaches about 93%, docs/benchmarks.md): a better starting
point than noise for a diffusion model. The warm-up spends ``epsilon`` of the generator's budget on DP-Merf's one
release (one Gaussian event on the generator's own ledger), draws ``images`` samples with labels in the released
class proportions, and trains the generator on them for ``steps`` non-private steps (post-processing). DP-SGD then
calibrates its noise for what is left of the budget.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import lightning
import torch
from torch.utils.data import Dataset, TensorDataset

from fedgen.errors import ConfigError, check_at_least_one
from fedgen.generators.base import stratified_labels
from fedgen.generators.dp_merf import PAPER_BATCH_SIZE, DPMerf, check_frequencies_fit
from fedgen.generators.warm_up import WarmUpRelease
from fedgen.mechanisms import Mechanism
from fedgen.mechanisms.ledger import PrivacyEvent, SubsampledGaussianEvent

log = logging.getLogger(__name__)


@dataclass
class MerfImages(WarmUpRelease):
    """The warm-up's settings.

    Args:
        epsilon: the part of the generator's privacy budget spent on DP-Merf's release (at its delta).
        images: DP-Merf samples to train on.
        steps: non-private Adam steps of the generator on them.
        batch_size: examples in each of those steps.
        num_features: DP-Merf's random Fourier features ``D``.
        length_scale: DP-Merf's kernel length scale on pixels in [0, 1]. 4 and 5 gave the best samples on MNIST at
            epsilon 0.2 and on Fashion-MNIST at epsilon 0.5, well above 10 (docs/benchmarks.md, run 74's section).
        epochs: DP-Merf's training epochs (of private-dataset-size / 100 steps each, as in DP-Merf's paper).
        merf_batch_size: DP-Merf's generated images in each of its steps (its paper's 100). More draws a step average
            its MMD gradient over more images at the same number of steps: on Fashion-MNIST at epsilon 0.5, 500
            gave samples a ConvNet learns about 3 points better from (three seeds), at 5 times DP-Merf's training
            compute (docs/benchmarks.md, the Fashion-MNIST length-scale sweep). Not yet measured through a warm-up.
    """

    epsilon: float = 0.5
    images: int = 60000
    steps: int = 1000
    batch_size: int = 512
    num_features: int = 10000
    length_scale: float = 5.0
    epochs: int = 5
    merf_batch_size: int = PAPER_BATCH_SIZE

    name: ClassVar[str] = "merf_images"

    def check_settings(self, image_shape: tuple[int, int, int] | None) -> None:
        if image_shape is not None and (image_shape[1] % 4 or image_shape[2] % 4):
            raise ConfigError(self.field, f"DP-Merf's generator draws images whose height and width are multiples of "
                              f"4, not {image_shape[1]}x{image_shape[2]}",
                              "use central_images for this image size, or pad the images to a multiple of 4")
        if image_shape is not None:
            check_frequencies_fit(f"{self.field}.num_features", image_shape, self.num_features)
        check_at_least_one(f"{self.field}.images", self.images, "use e.g. 60000")
        check_at_least_one(f"{self.field}.batch_size", self.batch_size, "use e.g. 512")
        check_at_least_one(f"{self.field}.epochs", self.epochs, "use e.g. 5")
        check_at_least_one(f"{self.field}.merf_batch_size", self.merf_batch_size, "use e.g. 100")
        if self.num_features < 2 or self.num_features % 2:
            raise ConfigError(f"{self.field}.num_features", f"must be an even number >= 2, got {self.num_features}",
                              "use e.g. 10000")
        if not self.length_scale > 0:
            raise ConfigError(f"{self.field}.length_scale", f"must be > 0, got {self.length_scale}", "use e.g. 5.0")

    def opens(self, event: PrivacyEvent) -> bool:
        return (getattr(event, "sample_rate", None), event.count) == (1.0, 1)

    def planned_event(self, mechanism: Mechanism) -> SubsampledGaussianEvent:
        return SubsampledGaussianEvent(self.noise_multiplier(mechanism), 1.0, 1)

    def describe(self) -> str:
        return "DP-Merf's single release of the whole data"

    def release(self, dataset: Dataset, *, num_classes: int, mechanism: Mechanism,
                device: torch.device | str = "cpu", earlier: Sequence[WarmUpRelease] = ()
                ) -> tuple[TensorDataset, dict]:
        """Release DP-Merf's embedding of ``dataset`` ((image, label) pairs), charged to ``mechanism``'s ledger,
        train DP-Merf's generator on ``device`` and return ``images`` of its samples with their labels, and a
        report of the release."""
        image_shape = tuple(dataset[0][0].shape)
        self.check(mechanism, image_shape=image_shape, earlier=earlier)
        gaussian = self.gaussian(mechanism, clip_norm=1.0, stream=4)
        merf = DPMerf(mechanism=gaussian, num_classes=num_classes, image_shape=image_shape,
                      num_features=self.num_features, length_scale=self.length_scale,
                      batch_size=self.merf_batch_size, steps_per_epoch=max(1, len(dataset) // PAPER_BATCH_SIZE))
        loader = merf.attach_private_data(dataset)  # checks the data's shape, labels and size against delta
        device = torch.device(device)
        trainer = lightning.Trainer(max_epochs=self.epochs, accelerator="gpu" if device.type == "cuda" else "cpu",
                                    devices=[device.index or 0] if device.type == "cuda" else 1, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False)
        trainer.fit(merf, loader)  # releases the embedding once at its start; the training reads only the release
        merf.to(device)
        labels = stratified_labels(merf.label_distribution(), self.images)
        images = torch.cat([merf.sample(len(part), part).clamp(0, 1).cpu() for part in labels.split(10_000)])
        report = {"noise_multiplier": gaussian.noise_multiplier, "epsilon": self.epsilon_alone(gaussian),
                  "images": len(images), "warm_up_steps": self.steps}
        log.info("Merf images: %d drawn from DP-Merf released at epsilon %.4g (sigma %.4g)", len(images),
                 report["epsilon"], report["noise_multiplier"])
        return TensorDataset(images, labels), report
