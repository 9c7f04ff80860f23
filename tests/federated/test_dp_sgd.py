"""FederatedDPSGD at client level: each client's part of a step is clipped to C as a whole before secure
aggregation, the step is charged at the client sampling rate under add/remove-one-user neighbouring, and
mismatched units are refused before any work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fedgen.errors import ConfigError
from fedgen.federated import FederatedDPSGD
from fedgen.mechanisms import DPSGD
from tests.generators.test_ddpm import _tiny, _tiny_cli

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "federated_mnist_dp_diffusion.yaml")


def _data(n: int = 60) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=gen, dtype=torch.float64),
                         torch.randint(0, 3, (n,), generator=gen))


@pytest.mark.parametrize("secure_aggregation", [True, False])
def test_each_client_is_clipped_as_a_whole_before_the_sum(secure_aggregation: bool) -> None:
    clip = 0.5
    model = _tiny(mechanism=DPSGD(noise_multiplier=1.0, max_grad_norm=clip, delta=1e-3, unit="user", seed=0),
                  batch_size=6)
    federation = FederatedDPSGD(num_clients=3, unit="client", client_rate=0.5,
                                secure_aggregation=secure_aggregation)
    federation.attach(model, _data())
    m = sum(p.numel() for p in model.unet.parameters())
    big, small = torch.full((m,), 1.0, dtype=torch.float64), torch.full((m,), 1e-4, dtype=torch.float64)
    total, sensitivity = federation.secure_sum([big, small, torch.zeros(m, dtype=torch.float64)])
    expected = big * clip / big.norm() + small  # the large client shrinks to norm C, the small one is kept
    torch.testing.assert_close(total.double(), expected, atol=1e-5, rtol=0)
    assert total.dtype == torch.float64  # the step adds its noise to the float64 total
    assert federation.secure_sum([big.float(), small.float(), torch.zeros(m)])[0].dtype == torch.float64
    assert sensitivity == (clip + math.sqrt(m) / federation.scale if secure_aggregation else clip)
    assert federation.summary()["unit"] == "client" and federation.summary()["client_rate"] == 0.5


def test_units_of_the_federation_and_the_mechanism_must_agree() -> None:
    example_level = _tiny(mechanism=DPSGD(noise_multiplier=1.0, delta=1e-3, seed=0))
    with pytest.raises(ConfigError) as err:
        FederatedDPSGD(num_clients=3, unit="client").attach(example_level, _data())
    assert err.value.field == "model.init_args.mechanism.init_args.unit"
    user_level = _tiny(mechanism=DPSGD(noise_multiplier=1.0, delta=1e-3, unit="user", seed=0))
    with pytest.raises(ConfigError) as err:
        FederatedDPSGD(num_clients=3).attach(user_level, _data())
    assert err.value.field == "model.init_args.mechanism.init_args.unit"
    for bad in ({"client_rate": 0.5}, {"unit": "client", "client_rate": 0.0}, {"unit": "user"}):
        with pytest.raises(ConfigError) as err:
            FederatedDPSGD(num_clients=3, **bad)
        assert err.value.field in ("federation.client_rate", "federation.unit")


def test_fedgen_fit_trains_a_tiny_ddpm_with_client_level_dp(real_data_root, tmp_path) -> None:
    """Client-level DP through fedgen fit: the ledger reports add/remove-one-user epsilon, charged at the client
    sampling rate for every step, and every step went through secure aggregation."""
    from fedgen.cli import fit

    run = tmp_path / "run"
    args = _tiny_cli(real_data_root, 3, f"--run_dir={run}", "--federation.init_args.num_clients=3",
                     "--federation.init_args.unit=client", "--federation.init_args.client_rate=0.5",
                     "--model.init_args.mechanism.init_args.unit=user")
    args[1] = EXAMPLE
    fit(args)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["neighbouring"] == "add/remove one user"
    assert saved["federation"]["unit"] == "client" and saved["federation"]["secure_aggregation"]["steps"] == 3
    events = saved["privacy_ledger"]["events"]
    assert [(e["count"], e["sample_rate"]) for e in events] == [(3, 0.5)]
    assert saved["privacy_ledger"]["unit"] == "user"
