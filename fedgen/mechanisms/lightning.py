"""Lightning glue shared by every module trained under a mechanism (generators, DP classifiers)."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from fedgen.errors import ConfigError
from fedgen.mechanisms.base import Mechanism

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "fedgen_privacy"


class PrivateModule(L.LightningModule):
    """A LightningModule trained under ``self.mechanism`` (or none).

    - Checkpoints carry the mechanism's state (privacy ledger, noise generator, steps taken), and loading
      one restores it: a resumed run continues the same budget, never a fresh one.
    - Training stops cleanly before the first step the budget does not allow: ``trainer.should_stop`` is
      set and the epoch ends, so checkpoint callbacks save the final state with its ledger.
    - Training in several processes (DDP) is refused: the mechanism's draws are not shared between processes.
    - Under a mechanism whose steps are one sampled batch each (DP-SGD), ``accumulate_grad_batches`` other than 1
      is refused before the first step: several Poisson batches summed into one noisy step would let an example
      drawn in more than one of them add more than the clip norm, in a step the ledger counts once.
    """

    mechanism: Mechanism | None = None

    def on_fit_start(self) -> None:
        """Subclasses that override this call it first."""
        self.check_trainer(self.trainer)

    def check_trainer(self, trainer: L.Trainer) -> None:
        """Refuse trainer settings the mechanism cannot account for (also callable before ``fit``, e.g. before a
        generator's warm-up releases): under any mechanism, training in several processes (each would draw its own
        samples, noise and releases, which the ledger would count once); under DP-SGD, accumulated batches (each
        step must be one Poisson batch) and weights in 16 bits (the clipped sum would be rounded before the
        noise)."""
        if self.mechanism is None:
            return
        processes = getattr(trainer, "world_size", 1)
        if processes > 1:
            raise ConfigError("trainer.devices", f"trains in {processes} processes (devices x num_nodes), but "
                              f"{type(self.mechanism).__name__} draws its samples, noise and releases in one "
                              "process: each process would draw its own, and the ledger would count one",
                              "set trainer.devices: 1 and trainer.num_nodes: 1 (a larger batch fills one GPU; "
                              "the federated loop, `fedgen federate`, runs its clients on several)")
        if not self.mechanism.one_sample_per_step:
            return
        name = type(self.mechanism).__name__
        accumulate = getattr(trainer, "accumulate_grad_batches", 1)
        if accumulate != 1:
            raise ConfigError("trainer.accumulate_grad_batches", f"is {accumulate}, but each {name} step must be one "
                              "Poisson batch (the ledger counts one sample per step)",
                              "set accumulate_grad_batches: 1, and a larger batch_size for larger steps")
        precision = str(getattr(trainer, "precision", "32-true"))
        if precision in ("16-true", "bf16-true"):
            raise ConfigError("trainer.precision", f"is {precision}: {name} would clip, sum and noise in 16 bits",
                              "use precision 32, or bf16-mixed (autocast; fedgen computes the private sums in float32)")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.mechanism is not None:
            checkpoint[CHECKPOINT_KEY] = self.mechanism.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.mechanism is None:
            return
        if CHECKPOINT_KEY not in checkpoint:
            raise ConfigError("ckpt_path", "the checkpoint carries no privacy ledger",
                              "resume only from checkpoints written by fedgen under a mechanism")
        self.mechanism.load_state_dict(checkpoint[CHECKPOINT_KEY])

    def backward(self, loss: Any, *args: Any, **kwargs: Any) -> None:
        """Mechanisms that clip per example themselves (``DPSGD(engine="fedgen")``) take the backward pass."""
        if self.mechanism is not None and self.mechanism.owns_backward:
            self.mechanism.backward(loss)
        else:
            super().backward(loss, *args, **kwargs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.mechanism is None or not self.mechanism.exhausted():
            return None
        log.warning("Privacy budget reached: %s. Training stops here; the checkpoint keeps the ledger.",
                    self.mechanism.ledger.summary(self.mechanism.delta))
        self.trainer.should_stop = True
        return -1
