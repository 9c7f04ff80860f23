"""Clients cover the data exactly once; client sampling is reproducible and has the stated rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fedgen.data import DirichletPartitioner, IIDPartitioner
from fedgen.errors import ConfigError
from fedgen.federated import ClientSampler, make_clients


def labelled(n: int = 500) -> TensorDataset:
    return TensorDataset(torch.rand(n, 1, 4, 4), torch.arange(n) % 10)


@pytest.mark.parametrize("partitioner", [IIDPartitioner(seed=1), DirichletPartitioner(alpha=0.5, seed=1)])
def test_clients_hold_every_example_exactly_once(partitioner):
    data = labelled()
    clients = make_clients(data, partitioner, 10)
    assert [c.id for c in clients] == list(range(10))
    held = np.concatenate([c.indices for c in clients])
    assert sorted(held.tolist()) == list(range(500))
    first = clients[3].dataset(data)
    assert torch.equal(first.tensors[1], data.tensors[1][torch.as_tensor(clients[3].indices)])


def test_poisson_sampling_is_reproducible_and_has_the_stated_rate():
    sampler = ClientSampler(rate=0.2, seed=3)
    assert sampler.sample(1000, 7) == sampler.sample(1000, 7)
    assert sampler.sample(1000, 7) != sampler.sample(1000, 8)
    sizes = np.array([len(sampler.sample(1000, r)) for r in range(200)])
    # Binomial(1000, 0.2): mean 200, std 12.6; the mean of 200 rounds has std 0.9.
    assert abs(sizes.mean() - 200) < 5 and sizes.std() > 5  # sizes vary: it is Poisson, not fixed
    assert sampler.sample(1000, 7, seed=4) != sampler.sample(1000, 7)  # a seed given for the draw replaces its own


def test_fixed_count_sampling():
    sampler = ClientSampler(count=4, seed=0)
    picked = sampler.sample(10, 0)
    assert len(picked) == len(set(picked)) == 4
    with pytest.raises(ConfigError, match="count"):
        sampler.sample(3, 0)


@pytest.mark.parametrize(("kwargs", "field"), [({}, "sampler"), ({"rate": 0.1, "count": 2}, "sampler"),
                                               ({"rate": 0.0}, "sampler.rate"), ({"count": 0}, "sampler.count")])
def test_bad_sampling_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        ClientSampler(**kwargs)
    assert err.value.field == f"federation.{field}"  # the config's key: --federation.sampler.init_args.*
