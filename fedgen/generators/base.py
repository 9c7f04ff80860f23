"""The generator base class: a LightningModule composed with a privacy mechanism.

A generator knows where the private data touches its parameters and hands exactly that to its mechanism;
it never adds noise itself. The training run attaches the private dataset with
:meth:`Generator.attach_private_data`, which returns the loader that drives training steps (a Poisson
sampler for DP-SGD generators, or a loader of generator-only steps once a statistic has been released).

Checkpoints carry the mechanism's state (the privacy ledger and the noise generator), so a resumed run
continues the same budget; it never starts from zero. They also carry the training time so far, so that
:attr:`Generator.training_seconds` of a resumed run counts every segment.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset, TensorDataset

from fedgen.errors import ConfigError, check_at_least_one
from fedgen.mechanisms import Mechanism, PrivateModule
from fedgen.registry import Registered, Registry

log = logging.getLogger(__name__)

#: checkpoint key of the training time so far
TIME_KEY = "fedgen_training_seconds"


class Generator(PrivateModule, Registered):
    """Base class of private class-conditional image generators.

    Subclasses implement :meth:`attach_private_data`, :meth:`training_step` and :meth:`sample`, and may
    override :meth:`label_distribution`. ``class Mine(Generator, name="mine")`` registers a subclass.

    Args:
        mechanism: the privacy mechanism every private release goes through.
        num_classes: number of classes of the private data.
        image_shape: (channels, height, width) of the images, pixel values in [0, 1].
    """

    registry: Registry[Generator] = Registry("generator")
    #: init arguments that only change how a trained generator draws (post-processing, no privacy cost), which
    #: ``fedgen sample --sampling`` may set anew for a finished run; none unless a subclass names them
    sampling_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, mechanism: Mechanism, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        if not isinstance(mechanism, Mechanism):
            raise ConfigError("model.mechanism", f"expected a fedgen Mechanism, got {type(mechanism).__name__}",
                              "give a mechanism by class_path, e.g. fedgen.mechanisms.GaussianMechanism")
        check_at_least_one("model.num_classes", num_classes, "set the number of classes")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ConfigError("model.image_shape", f"must be (channels, height, width), got {image_shape}",
                              "e.g. [1, 28, 28] for MNIST")
        self.mechanism = mechanism
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(s) for s in image_shape)
        self._private_data: Dataset | None = None
        self._seconds_before = 0.0  # training time of earlier segments (a resumed run's checkpoint)
        self._started: float | None = None

    # ------------------------------------------------------------------------------- training time
    @property
    def training_seconds(self) -> float:
        """Wall seconds of ``trainer.fit``, summed over a resumed run's segments. A segment counts up to its
        last checkpoint; work lost when a run stops between checkpoints is not counted."""
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return self._seconds_before + running

    def on_fit_start(self) -> None:
        """Subclasses that override this call it first: the clock starts with ``trainer.fit`` (a one-release
        generator's release included)."""
        super().on_fit_start()
        self._started = time.perf_counter()

    def on_train_end(self) -> None:
        self._seconds_before, self._started = self.training_seconds, None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[TIME_KEY] = self.training_seconds

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._seconds_before = float(checkpoint.get(TIME_KEY, 0.0))

    # ------------------------------------------------------------------------------- private data
    def check_private_data(self, dataset: Dataset) -> None:
        """Check that ``dataset`` matches the generator's shape and class count, and its size fits delta."""
        image = dataset[0][0]  # (image, label) or (image, label, client)
        if tuple(image.shape) != self.image_shape:
            raise ConfigError("model.image_shape", f"is {list(self.image_shape)} but the data's images are "
                              f"{list(image.shape)}", f"set model.init_args.image_shape: {list(image.shape)}")
        if isinstance(dataset, TensorDataset):
            top = int(dataset.tensors[1].max())
            if top >= self.num_classes:
                raise ConfigError("model.num_classes", f"is {self.num_classes} but the data has label {top}",
                                  f"set model.init_args.num_classes: {top + 1}")
        self.mechanism.check_dataset_size(len(dataset))

    def check_training(self, device: torch.device) -> None:
        """Refuse settings that cannot train on ``device`` (where the trainer runs) with the private data as
        attached (central, or a federation's clients), before any private work; nothing to refuse by default."""

    def attach_private_data(self, dataset: Dataset) -> torch.utils.data.DataLoader:
        """Give the generator the private training set; returns the loader that drives training steps."""
        raise NotImplementedError

    def check_public_data(self, dataset: Dataset) -> None:
        """Refuse ``dataset`` for :meth:`pretrain_on_public` before any work (a generator without public
        pretraining refuses any)."""
        raise ConfigError("public_data", f"{type(self).__name__} has no public pretraining",
                          "remove public_data, or use a generator that supports it (DPDiffusion)")

    def pretrain_on_public(self, dataset: Dataset, *, steps: int) -> None:
        """Train without privacy on ``dataset``, declared public, before any private step. The public data is
        outside the privacy guarantee; the run records its name. Generators without this step refuse it."""
        self.check_public_data(dataset)

    # ---------------------------------------------------------------------------------- sampling
    def label_distribution(self) -> torch.Tensor:
        """Class proportions to synthesize (uniform unless the generator released them privately)."""
        return torch.full((self.num_classes,), 1.0 / self.num_classes)

    def sample(self, n: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` images in [0, 1] of shape ``(n, *image_shape)``, of the given ``labels`` (drawn if None)."""
        raise NotImplementedError

    def sampling_settings(self) -> dict[str, Any]:
        """The values of :attr:`sampling_fields` this generator draws with."""
        return {field: self.hparams[field] for field in self.sampling_fields}

    def sampling_report(self) -> dict[str, Any] | None:
        """What sampling did beyond drawing, for ``metrics.json`` (e.g. samples rejected and drawn again); None if
        nothing."""
        return None

    @torch.no_grad()
    def synthesize(self, n: int, *, batch_size: int = 1000) -> TensorDataset:
        """A labelled synthetic dataset of ``n`` images, labels in the proportions of :meth:`label_distribution`.

        Pure post-processing of the trained generator: it costs no privacy.
        """
        if n < self.num_classes:
            raise ConfigError("num_synthetic", f"{n} is fewer than one image per class", "raise num_synthetic")
        labels = stratified_labels(self.label_distribution(), n)
        labels = labels[torch.randperm(n)]
        was_training = self.training
        self.eval()
        images = torch.cat([self.sample(len(chunk), chunk.to(self.device)).cpu()
                            for chunk in labels.split(batch_size)])
        self.train(was_training)
        return TensorDataset(images.clamp(0, 1), labels)


def stratified_labels(proportions: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` labels, class ``c`` appearing round(n * p_c) times (largest remainders), sorted by class."""
    p = proportions.clamp(min=0).double()
    p = p / p.sum()
    raw = p * n
    counts = raw.floor().long()
    short = n - int(counts.sum())
    if short > 0:
        counts[torch.argsort(raw - counts, descending=True)[:short]] += 1
    return torch.repeat_interleave(torch.arange(len(p)), counts)
