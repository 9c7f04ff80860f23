"""PrivateModule's trainer checks: settings a mechanism cannot account for are refused before any step."""

from __future__ import annotations

import lightning as L
import pytest

from fedgen.errors import ConfigError
from fedgen.mechanisms import DPSGD, GaussianMechanism
from fedgen.mechanisms.lightning import PrivateModule

MECHANISMS = {
    "dp_sgd": lambda: DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-4, seed=0),
    "gaussian": lambda: GaussianMechanism(noise_multiplier=1.0, delta=1e-4, clip_norm=1.0, seed=0),
}


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_training_in_several_processes_is_refused_from_the_trainer_s_settings(name: str) -> None:
    """Each DDP process would draw its own Poisson batch and noise, or make its own release, which the ledger counts
    once; the trainer is refused from its settings alone, before any process is launched."""
    module = PrivateModule()
    module.mechanism = MECHANISMS[name]()
    with pytest.raises(ConfigError, match="trains in 2 processes") as err:
        module.check_trainer(_trainer(devices=2, strategy="ddp"))
    assert err.value.field == "trainer.devices" and "devices: 1" in err.value.fix
    module.check_trainer(_trainer(devices=1))
    module.mechanism = None
    module.check_trainer(_trainer(devices=2, strategy="ddp"))  # no mechanism, nothing to account for
