"""Train on synthetic, test on real: the utility measure of a private generator.

A classifier is trained on the synthetic dataset only; the model is selected (best epoch) on a held-out
split *of the synthetic data*, never on the real test set, which is used exactly once, at the end
(the selection protocol recommended by DPImageBench, 2025). Accuracy is computed with torchmetrics.
"""

from __future__ import annotations

import copy
import logging
import statistics
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split
from torchmetrics.classification import MulticlassAccuracy

from fedgen.data.augment import check_shift, flip_randomly, shift_randomly
from fedgen.errors import ConfigError, check_accelerator, check_at_least_one, check_integer, check_positive
from fedgen.evaluation.classifiers import classifiers
from fedgen.mechanisms import DPSGD, PrivateModule

log = logging.getLogger(__name__)


class Classifier(PrivateModule):
    """A classifier trained with cross-entropy and Adam, optionally under DP-SGD.

    Args:
        net: the network (images -> logits).
        num_classes: number of classes.
        lr: Adam learning rate.
        mechanism: a :class:`~fedgen.mechanisms.DPSGD` to train privately (then ``private_loader`` is required).
        private_loader: the Poisson loader from ``mechanism.data_loader(...)`` that drives private training.
        epochs: planned epochs, for DP-SGD's noise calibration.
        augment_shift: each training image moved by its own random offset of up to this many pixels, drawn anew in
            every batch (zero fill; :func:`~fedgen.data.augment.shift_randomly`); 0 trains on the images as given.
        augment_flip: each training image mirrored left to right with probability 1/2, drawn anew in every batch.
    """

    def __init__(self, *, net: nn.Module, num_classes: int, lr: float = 1e-3, mechanism: DPSGD | None = None,
                 private_loader: DataLoader | None = None, epochs: int | None = None, augment_shift: int = 0,
                 augment_flip: bool = False) -> None:
        super().__init__()
        if mechanism is not None:
            mechanism.validate(net, field="evaluation.classifier")
            if private_loader is None or epochs is None:
                raise ConfigError("private_loader", "DP-SGD training needs its Poisson loader and planned epochs",
                                  "pass private_loader=mechanism.data_loader(...) and epochs")
        self.net = net
        self.lr = lr
        self.mechanism = mechanism
        self._private_loader = private_loader
        self._epochs = epochs
        self.augment_shift = augment_shift
        self.augment_flip = augment_flip
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = flip_randomly(shift_randomly(x, self.augment_shift)[0], self.augment_flip)[0]
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc.update(self.net(x), y)
        self.log("val/accuracy", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc.update(self.net(x), y)
        self.log("test/accuracy", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        if self.mechanism is not None:
            _, optimizer = self.mechanism.make_private(self.net, optimizer, data_loader=self._private_loader,
                                                       epochs=self._epochs)
        return optimizer


@torch.no_grad()
def evaluate_accuracy(net: nn.Module, dataset: Dataset, *, num_classes: int, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``net`` on ``dataset`` (torchmetrics), on the device that holds ``net``."""
    device = next(net.parameters()).device
    metric = MulticlassAccuracy(num_classes=num_classes, average="micro").to(device)
    was_training = net.training
    net.eval()
    for x, y in DataLoader(dataset, batch_size=batch_size):
        metric.update(net(x.to(device)), y.to(device))
    net.train(was_training)
    return float(metric.compute())


class _KeepBest(L.Callback):
    """Keeps, in memory, the weights of the epoch with the best validation accuracy."""

    def __init__(self) -> None:
        self.best: float = -1.0
        self.best_epoch: int = -1
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        acc = float(trainer.callback_metrics["val/accuracy"])
        if acc > self.best:
            self.best, self.best_epoch = acc, trainer.current_epoch
            self.state = copy.deepcopy(pl_module.net.state_dict())


class TrainOnSynthetic:
    """Train a downstream classifier on synthetic data and report its accuracy on real test data.

    Args:
        classifier: ``"convnet"`` (3 x [conv 128, GroupNorm, ReLU, avg-pool]) or ``"mlp"``.
        epochs: training epochs.
        batch_size: training batch size.
        lr: Adam learning rate.
        val_fraction: share of the synthetic data held out for model selection.
        accelerator: Lightning accelerator (``"auto"``, ``"cpu"``, ``"gpu"``).
        progress_bar: show progress bars.
        augment_shift: random shifts of the training images of up to this many pixels, drawn anew in every batch
            (validation and test images are never moved); 0, the default, trains on the synthetic images as given.
        augment_flip: random left-right mirrors of the training images (for data without a handedness, such as
            clothing; not digits).
        repeats: classifiers trained one after another on the same synthetic set, each with its own validation
            split, initialization and batch order; the reported accuracies are their means, which move less
            with the seed than one classifier's.
    """

    def __init__(self, *, classifier: Literal["convnet", "mlp"] = "convnet", epochs: int = 10,
                 batch_size: int = 256, lr: float = 1e-3, val_fraction: float = 0.1,
                 accelerator: str = "auto", progress_bar: bool = True, repeats: int = 1, augment_shift: int = 0,
                 augment_flip: bool = False) -> None:
        classifiers.get(classifier)
        check_at_least_one("evaluation.epochs", epochs, "train for at least one epoch")
        check_at_least_one("evaluation.repeats", repeats, "use 1, or e.g. 3 for a mean over three classifiers")
        check_at_least_one("evaluation.batch_size", batch_size, "use e.g. 256")
        if not 0 < val_fraction < 1:
            raise ConfigError("evaluation.val_fraction", f"must be in (0, 1), got {val_fraction}", "use e.g. 0.1")
        check_positive("evaluation.lr", lr, "use e.g. 1e-3")
        check_accelerator("evaluation.accelerator", accelerator)
        check_integer("evaluation.augment_shift", augment_shift, 0)
        self.classifier = classifier
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.val_fraction = val_fraction
        self.accelerator = accelerator
        self.progress_bar = progress_bar
        self.repeats = repeats
        self.augment_shift = augment_shift
        self.augment_flip = augment_flip

    def build_net(self, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
        return classifiers.get(self.classifier)(image_shape=tuple(image_shape), num_classes=num_classes)

    def check_image_shape(self, image_shape: tuple[int, int, int]) -> None:
        """Refuse settings that cannot train on images of ``image_shape`` (C, H, W): call before any work."""
        check_shift("evaluation.augment_shift", self.augment_shift, image_shape)

    def run(self, synthetic: TensorDataset, real_test: Dataset, *, num_classes: int,
            image_shape: tuple[int, int, int]) -> dict[str, Any]:
        """Train on ``synthetic``, select on its validation split, test once on ``real_test``; ``repeats`` times.

        Returns ``test_accuracy`` and ``synthetic_val_accuracy``, the means over the classifiers;
        ``selected_epoch``, the first classifier's; ``per_classifier``, each classifier's three numbers."""
        per_classifier = []
        for _ in range(self.repeats):
            net, report = self.fit_classifier(synthetic, num_classes=num_classes, image_shape=image_shape)
            per_classifier.append({"test_accuracy": evaluate_accuracy(net, real_test, num_classes=num_classes),
                                   **report})
        def mean(key: str) -> float:
            return statistics.fmean(r[key] for r in per_classifier)

        return {"test_accuracy": mean("test_accuracy"), "synthetic_val_accuracy": mean("synthetic_val_accuracy"),
                "selected_epoch": per_classifier[0]["selected_epoch"], "classifier": self.classifier,
                "per_classifier": per_classifier}

    def summary(self, test_accuracy: float, num_synthetic: int) -> str:
        """A score as the commands print it, e.g. ``test_accuracy=0.9635 (convnet trained on 60000 synthetic
        examples, the mean of 3 classifiers)``."""
        mean_of = f", the mean of {self.repeats} classifiers" if self.repeats > 1 else ""
        return (f"test_accuracy={test_accuracy:.4f} ({self.classifier} trained on {num_synthetic} synthetic "
                f"examples{mean_of})")

    def fit_classifier(self, synthetic: TensorDataset, *, num_classes: int, image_shape: tuple[int, int, int]
                       ) -> tuple[nn.Module, dict[str, float]]:
        """Train on ``synthetic`` and select the best epoch on its validation split; return the selected
        network (what a user of the pipeline would release) and the selection's numbers."""
        n_val = max(1, int(len(synthetic) * self.val_fraction))
        if len(synthetic) - n_val < 1:
            raise ConfigError("num_synthetic", f"{len(synthetic)} synthetic examples leave none for training",
                              "synthesize more examples")
        train, val = random_split(synthetic, [len(synthetic) - n_val, n_val],
                                  generator=torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)))))
        self.check_image_shape(image_shape)
        model = Classifier(net=self.build_net(image_shape, num_classes), num_classes=num_classes, lr=self.lr,
                           augment_shift=self.augment_shift, augment_flip=self.augment_flip)
        keep_best = _KeepBest()
        trainer = L.Trainer(max_epochs=self.epochs, accelerator=self.accelerator, devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=self.progress_bar,
                            enable_model_summary=False, callbacks=[keep_best], num_sanity_val_steps=0)
        trainer.fit(model, DataLoader(train, batch_size=self.batch_size, shuffle=True),
                    DataLoader(val, batch_size=1000))
        model.net.load_state_dict(keep_best.state)
        return model.net.to(trainer.strategy.root_device).eval(), {"synthetic_val_accuracy": keep_best.best,
                                                                   "selected_epoch": keep_best.best_epoch}
