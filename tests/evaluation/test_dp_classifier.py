"""A classifier trained under DP-SGD through Lightning: noise is really added; the budget stops training."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from fedgen.errors import ConfigError
from fedgen.evaluation import MLP, Classifier
from fedgen.mechanisms import DPSGD
from tests.evaluation.test_downstream import separable


def train_dp(noise_multiplier: float, *, epochs: int = 3, target_epsilon: float | None = None, root=None,
             **trainer_args):
    train, test = separable(1200, seed=0), separable(400, seed=1)
    mechanism = DPSGD(noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, max_grad_norm=1.0,
                      delta=1e-4, seed=0)
    loader = mechanism.data_loader(train, batch_size=100)
    model = Classifier(net=MLP(image_shape=(1, 28, 28), num_classes=10, width=64, depth=1), num_classes=10,
                       lr=3e-3, mechanism=mechanism, private_loader=loader, epochs=epochs)
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)] if root else []
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(root), callbacks=callbacks,
                        **trainer_args)
    trainer.fit(model, loader)
    accuracy = trainer.test(model, DataLoader(test, batch_size=400), verbose=False)[0]["test/accuracy"]
    return accuracy, mechanism


def test_huge_noise_drives_dp_sgd_accuracy_to_chance_and_modest_noise_does_not():
    noisy, _ = train_dp(1e4)
    useful, mechanism = train_dp(0.5)
    assert noisy < 0.25, noisy
    assert useful > 0.8, useful
    assert mechanism.steps_taken == 3 * 12  # Poisson loader: len = 1 / sample_rate batches per epoch


def test_training_stops_cleanly_at_the_budget_and_the_checkpoint_keeps_the_ledger(tmp_path):
    _, mechanism = train_dp(0.8, epochs=20, target_epsilon=2.0, root=tmp_path)
    assert mechanism.max_steps is not None and 0 < mechanism.max_steps < 20 * 12
    assert mechanism.steps_taken == mechanism.max_steps
    assert mechanism.epsilon() <= 2.0
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["fedgen_privacy"]
    assert saved["steps_taken"] == mechanism.steps_taken
    assert sum(e["count"] for e in saved["ledger"]["events"]) == mechanism.steps_taken


def test_accumulating_several_poisson_batches_into_one_step_is_refused_before_any_step(monkeypatch):
    """An example drawn in two of the accumulated batches would add twice the clip norm to a step counted once."""
    taken = []
    monkeypatch.setattr(DPSGD, "charge_step", lambda self: taken.append(1))
    with pytest.raises(ConfigError, match="accumulate_grad_batches") as err:
        train_dp(1.0, accumulate_grad_batches=2)
    assert "accumulate_grad_batches: 1" in err.value.fix and not taken
