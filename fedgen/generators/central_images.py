"""Central images: noisy class means of Poisson subsamples, a cheap DP warm-up for a generator.

A curriculum from easy to hard (after DP-FETA; Li, Gong, Li, Zhao, Hou, Wang, 2025): before DP-SGD sees single
examples, the generator learns the coarse shape of each class from a few *central images*, means of many
private images released with the Gaussian mechanism. Each of ``releases`` rounds draws a Poisson sample of the
private data (each example with probability ``sample_rate``), clips every sampled image to L2 norm
``clip_norm`` and releases the per-class sums with Gaussian noise:

    S_c = sum_{i in sample, y_i = c} clip(x_i) + N(0, (sigma clip_norm)^2 I)   for every class c.

Adding or removing one example changes one class's sum by at most ``clip_norm``, so a round is one
Poisson-subsampled Gaussian release with noise multiplier sigma (one ledger event; the classes share it by
parallel composition), and ``releases`` rounds are calibrated so that they spend ``epsilon`` on the
generator's own ledger. The generator's DP-SGD then calibrates its noise for what is left of its
``target_epsilon`` (the ledger composes both). The central image of class c is ``S_c / (sample_rate * N /
num_classes)``, clamped to the pixel range: N, the dataset size, is public in DP-SGD's accounting as well,
and dividing by the expected class size instead of the sampled count spends nothing on counts (with
unbalanced classes the images are lighter or darker; the warm-up only needs their shape). With ``median_filter``
k, each released image is then replaced by its k x k median (post-processing, no privacy cost), which removes most
of the noise's isolated specks while keeping strokes, as DP-FETA's and FETA-Pro's central images are denoised.

With ``downsample`` f the release is of the images average-pooled to (H / f) x (W / f) pixels, upsampled
bilinearly to H x W afterwards (post-processing), as DP-FETA releases its central images at half resolution. A
pooled pixel keeps the value of the f x f pixels it averages, while the pooled image's L2 norm is about 1 / f of
the image's: at ``clip_norm`` / f the same examples are clipped, and each released pixel carries f times less
noise for its value (the fine detail lost is what the noise would have drowned). With ``augment_ops``, each
warm-up step trains on its own RandAugment view of each central image (:func:`~fedgen.generators.warm_up.
rand_augment`), as DP-FETA does to stretch a few dozen images over thousands of steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from fedgen.data import dataset_to_tensors
from fedgen.errors import ConfigError, check_at_least_one
from fedgen.generators.warm_up import WarmUpRelease, rand_augment
from fedgen.mechanisms import Mechanism
from fedgen.mechanisms.ledger import PrivacyEvent, SubsampledGaussianEvent

log = logging.getLogger(__name__)


@dataclass
class CentralImages(WarmUpRelease):
    """The warm-up's settings.

    Args:
        epsilon: the part of the generator's privacy budget spent on the central images (at its delta).
        releases: rounds; each gives one central image per class.
        sample_rate: probability with which each private example joins a round.
        clip_norm: L2 bound on one image (pixels in [0, 1]; an MNIST digit has norm 7 to 13).
        steps: non-private Adam steps of the generator on the released central images.
        median_filter: the window k of a k x k median filter applied to each released image (odd; 0: none), see
            :func:`median_filter`.
        downsample: release the images average-pooled by this factor f (it divides height and width; 1: full
            size), then upsample them bilinearly; scale ``clip_norm`` by 1 / f with it (the pooled norms are about
            1 / f of the images').
        batch_size: central images in each warm-up step; None: the generator's batch size, or all of them if fewer.
        augment_ops: RandAugment operations on each central image in each warm-up step (0: none), see
            :func:`~fedgen.generators.warm_up.rand_augment`.
        augment_magnitude: the largest of RandAugment's magnitudes, each image's drawn from 1 to it (of 30).
    """

    epsilon: float = 0.5
    releases: int = 100
    sample_rate: float = 0.05
    clip_norm: float = 10.0
    steps: int = 500
    median_filter: int = 0
    downsample: int = 1
    batch_size: int | None = None
    augment_ops: int = 0
    augment_magnitude: int = 3

    name: ClassVar[str] = "central_images"

    def check_settings(self, image_shape: tuple[int, int, int] | None) -> None:
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"{self.field}.sample_rate", f"must be in (0, 1], got {self.sample_rate}",
                              "use e.g. 0.05")
        if not self.clip_norm > 0:
            raise ConfigError(f"{self.field}.clip_norm", f"must be > 0, got {self.clip_norm}", "use e.g. 10")
        check_at_least_one(f"{self.field}.releases", self.releases, "use e.g. 100")
        if self.median_filter < 0 or (self.median_filter and self.median_filter % 2 == 0):
            raise ConfigError(f"{self.field}.median_filter", f"must be 0 (none) or an odd window, got "
                              f"{self.median_filter}", "use 3, or 0")
        check_at_least_one(f"{self.field}.downsample", self.downsample, "use 1 (full size) or 2")
        if image_shape is not None and (image_shape[1] % self.downsample or image_shape[2] % self.downsample):
            raise ConfigError(f"{self.field}.downsample", f"{self.downsample} does not divide the images' "
                              f"{image_shape[1]}x{image_shape[2]} pixels", "use a factor of both, e.g. 1 or 2")
        if self.batch_size is not None:
            check_at_least_one(f"{self.field}.batch_size", self.batch_size, "use e.g. 64, or null")
        if self.augment_ops < 0:
            raise ConfigError(f"{self.field}.augment_ops", f"must be >= 0, got {self.augment_ops}",
                              "use 2 (DP-FETA's), or 0 for none")
        if not 1 <= self.augment_magnitude <= 30:
            raise ConfigError(f"{self.field}.augment_magnitude", f"must be in [1, 30], got {self.augment_magnitude}",
                              "use e.g. 3")

    def opens(self, event: PrivacyEvent) -> bool:
        return (getattr(event, "sample_rate", None), event.count) == (self.sample_rate, self.releases)

    def planned_event(self, mechanism: Mechanism) -> SubsampledGaussianEvent:
        sigma = self.noise_multiplier(mechanism, releases=self.releases, sample_rate=self.sample_rate)
        return SubsampledGaussianEvent(sigma, self.sample_rate, self.releases)

    def describe(self) -> str:
        return f"{self.releases} central-image rounds at rate {self.sample_rate:g}"

    def release(self, dataset: Dataset, *, num_classes: int, mechanism: Mechanism,
                device: torch.device | str = "cpu", earlier: Sequence[WarmUpRelease] = ()
                ) -> tuple[TensorDataset, dict]:
        """Release ``releases`` central images per class from ``dataset`` ((image, label) pairs), charged to
        ``mechanism``'s ledger; return them as a labelled dataset (``releases * num_classes`` images) and a
        report of the release. The sums are cheap: they run on the CPU whatever ``device``."""
        self.check(mechanism, image_shape=tuple(dataset[0][0].shape), earlier=earlier)
        images, labels = dataset_to_tensors(dataset)
        full_size = images.shape[2:]
        if self.downsample > 1:
            images = F.avg_pool2d(images, self.downsample)
        mechanism.check_dataset_size(len(images))
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ConfigError("data", f"labels outside [0, {num_classes})", "check num_classes")
        # the noise and the sampling get streams of their own, apart from DP-SGD's (stream 1 samples its batches):
        # subsampled releases compose as accounted only if their samples are drawn independently
        gaussian = self.gaussian(mechanism, clip_norm=self.clip_norm, stream=2)
        sampler = torch.Generator().manual_seed(mechanism.noise.derived_seed(3))
        flat = gaussian.clip(images.flatten(1))
        expected_class_size = self.sample_rate * len(flat) / num_classes
        central = []
        for _ in range(self.releases):
            picked = torch.rand(len(flat), generator=sampler) < self.sample_rate
            sums = torch.zeros(num_classes, flat.shape[1], dtype=flat.dtype).index_add_(0, labels[picked],
                                                                                        flat[picked])
            central.append(gaussian.release(sums) / expected_class_size)
        out = torch.cat(central).clamp(0, 1).reshape(-1, *images.shape[1:])
        if self.downsample > 1:
            out = F.interpolate(out, size=full_size, mode="bilinear", align_corners=False).clamp(0, 1)
        if self.median_filter:
            out = median_filter(out, self.median_filter)
        report = {"releases": self.releases, "sample_rate": self.sample_rate, "clip_norm": self.clip_norm,
                  "noise_multiplier": gaussian.noise_multiplier, "epsilon": self.epsilon_alone(gaussian),
                  "images": len(out), "warm_up_steps": self.steps, "downsample": self.downsample,
                  "augment_ops": self.augment_ops}
        log.info("Central images: %d released at epsilon %.4g (sigma %.4g, rate %g, %d rounds)", len(out),
                 report["epsilon"], report["noise_multiplier"], self.sample_rate, self.releases)
        return TensorDataset(out, torch.arange(num_classes).repeat(self.releases)), report

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        if not self.augment_ops:
            return images
        return rand_augment(images, self.augment_ops, self.augment_magnitude)


def median_filter(images: torch.Tensor, window: int) -> torch.Tensor:
    """Each pixel of ``images`` (N, C, H, W) replaced by the median of its ``window`` x ``window`` neighbourhood
    (odd ``window``; the borders repeat the edge pixels), channel by channel."""
    half = window // 2
    padded = F.pad(images, (half, half, half, half), mode="replicate")
    patches = padded.unfold(2, window, 1).unfold(3, window, 1)  # (N, C, H, W, window, window)
    return patches.flatten(-2).median(dim=-1).values
