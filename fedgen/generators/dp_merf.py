"""DP-Merf: differentially private mean embeddings with random features (Harder et al., AISTATS 2021).

Random Fourier features ``phi(x) = sqrt(2/D) [cos(W^T x), sin(W^T x)]`` with ``W ~ N(0, I / l^2)``
(``D/2`` frequencies) approximate the Gaussian kernel of length scale ``l``, and ``||phi(x)|| = 1``
exactly. Each private example ``(x, y)`` contributes

    e(x, y) = [ a phi(x) (x) onehot(y) ,  b onehot(y) ],   a^2 + b^2 = 1,

a vector of norm 1 up to float32 rounding (measured at most 1 + 7e-7; each is clipped to ``clip_norm`` too, which
rounds alike), where ``b = count_weight`` carries the class counts in the same release. The
sum over the data is released *once* through the :class:`~fedgen.mechanisms.GaussianMechanism`
(sensitivity 1 under add/remove-one-example). The generator is then trained, with no further access to
the private data, to minimise the squared distance between its own class-conditional mean embedding and
the released one (an MMD with the random-feature kernel). Everything after the release is
post-processing. The dataset size ``n`` used for normalisation is treated as public, as in Opacus.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fedgen.errors import ConfigError, check_at_least_one, check_fits_in_memory, check_positive
from fedgen.generators.base import Generator
from fedgen.mechanisms import GaussianMechanism
from fedgen.mechanisms.precision import exact_float32, ieee_fp32

log = logging.getLogger(__name__)

#: generated images in each of DP-Merf's training steps in its paper; an epoch is private examples / this many steps
PAPER_BATCH_SIZE = 100


class ConditionalConvGenerator(nn.Module):
    """A small conditional generator: [z, onehot(y)] -> 2 dense layers -> 2 x (upsample, conv) -> sigmoid.

    The shape follows DP-Merf's conditional conv generator (hidden 200, channels 16, 8, kernel 5); fedgen's
    default code size is 20 (the paper used 5). It never sees private data, so BatchNorm is allowed here.
    """

    def __init__(self, *, latent_dim: int, num_classes: int, image_shape: tuple[int, int, int],
                 hidden: int = 200, channels: tuple[int, int] = (16, 8), kernel_size: int = 5) -> None:
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ConfigError("model.image_shape", f"height and width must be multiples of 4, got {h}x{w}",
                              "pad or resize the images to a multiple of 4 (28 and 32 work)")
        self.base = (channels[0], h // 4, w // 4)
        self.dense = nn.Sequential(
            nn.Linear(latent_dim + num_classes, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, math.prod(self.base)), nn.BatchNorm1d(math.prod(self.base)), nn.ReLU(),
        )
        pad = kernel_size // 2
        self.conv = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(channels[0], channels[1], kernel_size, padding=pad), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(channels[1], c, kernel_size, padding=pad),
        )
        self.num_classes = num_classes

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.dense(torch.cat([z, F.one_hot(labels, self.num_classes).to(z.dtype)], dim=1))
        return torch.sigmoid(self.conv(h.view(-1, *self.base)))


class _StepIndices(Dataset):
    """Indices 0..n-1: drives generator-only training steps (DP-Merf touches no private data while training)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def check_frequencies_fit(field: str, image_shape: tuple[int, ...], num_features: int) -> None:
    """Refuse random features whose frequencies (pixels x num_features / 2 in float32) would not fit in memory."""
    check_fits_in_memory(field, math.prod(image_shape) * num_features // 2 * 4,
                         f"{num_features} random features of {list(image_shape)} images", "use e.g. 10000")


class DPMerf(Generator, name="dp_merf"):
    """Class-conditional DP-Merf generator (Harder et al., AISTATS 2021).

    Args:
        mechanism: the Gaussian mechanism for the single release of the mean embedding.
        num_classes: number of classes.
        image_shape: (channels, height, width).
        num_features: number of random Fourier features ``D`` (``D/2`` frequencies).
        length_scale: Gaussian kernel length scale ``l`` on pixels in [0, 1].
        count_weight: weight ``b`` of the class-count part of each contribution (0 < b < 1).
        latent_dim: generator code size.
        batch_size: generated images per training step.
        steps_per_epoch: generator steps per epoch (default: private dataset size / batch_size, as in the paper).
        lr: Adam learning rate.
        lr_decay: multiplicative learning-rate decay per epoch.
        embedding_batch_size: private examples embedded at a time when computing the release.
        feature_seed: seed of the random frequencies (data-independent; stored in checkpoints).
    """

    def __init__(self, *, mechanism: GaussianMechanism, num_classes: int = 10,
                 image_shape: tuple[int, int, int] = (1, 28, 28), num_features: int = 10000,
                 length_scale: float = 10.0, count_weight: float = 0.1, latent_dim: int = 20,
                 batch_size: int = PAPER_BATCH_SIZE, steps_per_epoch: int | None = None, lr: float = 0.01,
                 lr_decay: float = 0.9, embedding_batch_size: int = 2000, feature_seed: int = 0) -> None:
        super().__init__(mechanism=mechanism, num_classes=num_classes, image_shape=image_shape)
        if not isinstance(mechanism, GaussianMechanism):
            raise ConfigError("model.mechanism", f"DP-Merf releases a sum once and needs a GaussianMechanism, "
                              f"got {type(mechanism).__name__}",
                              "use class_path: fedgen.mechanisms.GaussianMechanism")
        if mechanism.sample_rate != 1.0:
            raise ConfigError("model.mechanism.sample_rate", f"is {mechanism.sample_rate:g}, but DP-Merf releases the "
                              "sum over the whole private dataset, not over a subsample (a rate below 1 would "
                              "under-report epsilon)", "set sample_rate: 1.0 (the default)")
        if mechanism.clip_norm != 1.0:
            raise ConfigError("model.mechanism.clip_norm", f"is {mechanism.clip_norm}, but DP-Merf's contributions "
                              "have norm exactly 1 (its sensitivity is fixed)", "set clip_norm: 1.0")
        if num_features < 2 or num_features % 2:
            raise ConfigError("model.num_features", f"must be an even number >= 2, got {num_features}",
                              "use e.g. 10000")
        if not length_scale > 0:
            raise ConfigError("model.length_scale", f"must be > 0, got {length_scale}", "use e.g. 10.0")
        if not 0 < count_weight < 1:
            raise ConfigError("model.count_weight", f"must be in (0, 1), got {count_weight}", "use e.g. 0.1")
        check_at_least_one("model.batch_size", batch_size, "use e.g. 100")
        check_frequencies_fit("model.num_features", image_shape, num_features)
        check_at_least_one("model.latent_dim", latent_dim, "use e.g. 20")
        check_at_least_one("model.embedding_batch_size", embedding_batch_size, "use e.g. 2000")
        if steps_per_epoch is not None:
            check_at_least_one("model.steps_per_epoch", steps_per_epoch, "use e.g. 600, or null (data size / batch)")
        check_positive("model.lr", lr, "use e.g. 0.01")
        if not 0 < lr_decay <= 1:
            raise ConfigError("model.lr_decay", f"must be in (0, 1], got {lr_decay}", "use e.g. 0.9, or 1 for none")
        self.save_hyperparameters(ignore=["mechanism"])
        self.generator = ConditionalConvGenerator(latent_dim=latent_dim, num_classes=num_classes,
                                                  image_shape=self.image_shape)
        dim = math.prod(self.image_shape)
        freq_gen = torch.Generator().manual_seed(feature_seed)
        self.register_buffer("frequencies", torch.randn(dim, num_features // 2, generator=freq_gen) / length_scale)
        # The single private release and whether it happened (restored from checkpoints on resume).
        self.register_buffer("noisy_sum", torch.zeros(num_classes * num_features + num_classes))
        self.register_buffer("num_private", torch.zeros((), dtype=torch.long))
        self.register_buffer("released", torch.zeros((), dtype=torch.bool))

    # ------------------------------------------------------------------------------ embedding
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Random Fourier features of unit norm, shape (batch, D), in the precision of the frequencies."""
        proj = images.flatten(1).to(self.frequencies.dtype) @ self.frequencies
        return torch.cat([proj.cos(), proj.sin()], dim=1) * math.sqrt(2.0 / self.hparams.num_features)

    def contributions(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each example's unit-norm contribution ``[a phi(x) (x) e_y, b e_y]``, shape (batch, C*D + C).
        ``labels``: class indices (batch,), or rows of label probabilities (batch, C) that replace ``e_y``
        (an attack's soft labels; the norm is then at most 1)."""
        b = self.hparams.count_weight
        a = math.sqrt(1.0 - b * b)
        onehot = labels.to(images.dtype) if labels.dim() == 2 else F.one_hot(labels, self.num_classes).to(images.dtype)
        kron = (a * onehot.unsqueeze(2) * self.features(images).unsqueeze(1)).flatten(1)
        return torch.cat([kron, b * onehot], dim=1)

    def clipped_contribution_sum(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``sum_i clip(e(x_i, y_i))`` to the mechanism's ``clip_norm``, without materialising the (batch, C*D)
        contributions: ``||e(x, y)||^2 = a^2 ||phi(x)||^2 + b^2``, so each row's clip factor is known from phi."""
        b = self.hparams.count_weight
        a = math.sqrt(1.0 - b * b)
        with ieee_fp32():  # the sum rounds as the norms did (no TF32 or autocast products)
            phi = self.features(exact_float32(images))
            norms = torch.sqrt(a * a * phi.pow(2).sum(1) + b * b)
            scale = (self.mechanism.clip_norm / norms).clamp(max=1.0)
            onehot = F.one_hot(labels, self.num_classes).to(phi.dtype) * scale.unsqueeze(1)
            return torch.cat([(a * onehot.T @ phi).flatten(), b * onehot.sum(0)])

    @torch.no_grad()
    def embedding_sum(self, dataset: Dataset) -> torch.Tensor:
        """The sum of the clipped contributions of every example of ``dataset`` (what one party computes;
        each unit moves it by at most ``clip_norm`` = 1 in L2)."""
        loader = DataLoader(dataset, batch_size=self.hparams.embedding_batch_size, shuffle=False)
        total = torch.zeros_like(self.noisy_sum)
        show = self._trainer is not None and self.trainer.progress_bar_callback is not None
        for images, labels in tqdm(loader, desc="DP-Merf: embedding the private data", disable=not show):
            total += self.clipped_contribution_sum(images.to(self.device), labels.to(self.device))
        return total

    @torch.no_grad()
    def store_release(self, noisy_sum: torch.Tensor, num_private: int) -> None:
        """Keep the (already privatized) released sum; training reads only this from now on."""
        self.noisy_sum.copy_(noisy_sum.to(self.noisy_sum))
        self.num_private.fill_(num_private)
        self.released.fill_(True)
        log.info("DP-Merf released its mean embedding once: %s", self.mechanism.ledger.summary(self.mechanism.delta))

    def release_embedding(self, dataset: Dataset) -> None:
        """Sum every private example's contribution and release the sum once through the mechanism.

        Each example is clipped on its own, so this central release is example-level DP; user-level DP comes from
        a federation that clips each client's sum (``FederatedRelease(client_clip_norm=...)``)."""
        if self.mechanism.ledger.unit != "example":
            raise ConfigError("model.mechanism.unit", f"is {self.mechanism.ledger.unit!r}, but the central release "
                              "clips each example, not each user's examples together",
                              "set unit: example, or release through a federation with client_clip_norm")
        self.store_release(self.mechanism.release(self.embedding_sum(dataset)), len(dataset))

    def released_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The released class-conditional mean embedding (C, D), weighted by class proportion, and the
        noisy class proportions (C,), both post-processed from the single release."""
        b = self.hparams.count_weight
        a = math.sqrt(1.0 - b * b)
        c, d = self.num_classes, self.hparams.num_features
        n = self.num_private.clamp(min=1).to(self.noisy_sum.dtype)
        mean = self.noisy_sum[: c * d].view(c, d) / (a * n)
        counts = (self.noisy_sum[c * d:] / b).clamp(min=0)
        proportions = counts / counts.sum() if counts.sum() > 0 else torch.full_like(counts, 1.0 / c)
        return mean, proportions

    # -------------------------------------------------------------------------------- training
    def attach_private_data(self, dataset: Dataset) -> DataLoader:
        self.check_private_data(dataset)
        self._private_data = dataset
        steps = self.hparams.steps_per_epoch or max(1, len(dataset) // self.hparams.batch_size)
        # Training batches are only step counters: the generator never reads private data after the release.
        return DataLoader(_StepIndices(steps), batch_size=1)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if bool(self.released):
            log.info("DP-Merf: the embedding was already released (federated or resumed run); no new release.")
            return
        if self._private_data is None:
            raise RuntimeError("call attach_private_data(dataset) before fitting DP-Merf")
        self.release_embedding(self._private_data)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        target, proportions = self.released_embedding()
        n = self.hparams.batch_size
        labels = torch.multinomial(proportions, n, replacement=True)
        images = self.generator(torch.randn(n, self.hparams.latent_dim, device=self.device), labels)
        onehot = F.one_hot(labels, self.num_classes).to(images.dtype)
        generated = onehot.T @ self.features(images) / n  # (C, D): class-weighted mean embedding
        loss = (target - generated).pow(2).sum()
        self.log("train/mmd2", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.hparams.lr_decay)
        return [optimizer], [{"scheduler": scheduler, "interval": "epoch"}]

    # -------------------------------------------------------------------------------- sampling
    def label_distribution(self) -> torch.Tensor:
        if not bool(self.released):
            return super().label_distribution()
        return self.released_embedding()[1].cpu()

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            labels = torch.multinomial(self.label_distribution(), n, replacement=True)
        labels = labels.to(self.device)
        was_training = self.generator.training
        self.generator.eval()
        images = self.generator(torch.randn(n, self.hparams.latent_dim, device=self.device), labels)
        self.generator.train(was_training)
        return images
