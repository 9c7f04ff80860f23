"""Simulated clients and client sampling.

A client is the part of a private dataset held by one party; the partition comes from a
:class:`~fedgen.data.Partitioner` (IID, Dirichlet over labels, shards). Each round the server samples
clients, either by Poisson sampling (each client independently with probability ``rate``: the sampling
that user-level DP accounting with sample rate ``q = rate`` assumes, McMahan et al., ICLR 2018) or a
fixed number of clients drawn uniformly without replacement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from fedgen.data import Partitioner
from fedgen.errors import ConfigError


@dataclass(eq=False)
class Client:
    """One simulated client: an id and the indices of the examples it holds."""

    id: int
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def dataset(self, full: Dataset) -> Dataset:
        """This client's examples as a dataset (a view for tensors, a ``Subset`` otherwise)."""
        if isinstance(full, TensorDataset):
            index = torch.as_tensor(self.indices, dtype=torch.long, device=full.tensors[0].device)
            return TensorDataset(*(t[index] for t in full.tensors))
        return Subset(full, self.indices.tolist())


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The labels of an image-classification dataset, as a 1-D array."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])


def make_clients(dataset: Dataset, partitioner: Partitioner, num_clients: int) -> list[Client]:
    """Split ``dataset`` among ``num_clients`` clients with ``partitioner`` (every example to exactly one)."""
    parts = partitioner.partition(dataset_labels(dataset), num_clients)
    return [Client(i, part) for i, part in enumerate(parts)]


class ClientSampler:
    """Which clients take part in a round: Poisson with ``rate``, or exactly ``count`` of them.

    Args:
        rate: each client joins independently with this probability (Poisson sampling).
        count: this many clients, uniformly without replacement (no privacy mechanism only: a user added to the
            data may displace another, so client-level DP refuses it).
        seed: seed of the sampling without a privacy mechanism; under client-level DP the sampling is seeded from
            the mechanism's noise source instead (from ``os.urandom`` in secure mode).
    """

    def __init__(self, *, rate: float | None = None, count: int | None = None, seed: int = 0) -> None:
        if (rate is None) == (count is None):
            raise ConfigError("federation.sampler", "give exactly one of rate or count",
                              "set rate (Poisson sampling) or count (a fixed number of clients per round)")
        if rate is not None and not 0 < rate <= 1:
            raise ConfigError("federation.sampler.rate", f"must be in (0, 1], got {rate}", "use e.g. 0.1")
        if count is not None and count < 1:
            raise ConfigError("federation.sampler.count", f"must be >= 1, got {count}", "use e.g. 10")
        self.rate = rate
        self.count = count
        self.seed = seed

    def sample(self, num_clients: int, round_index: int, *, seed: int | None = None) -> list[int]:
        """The ids of the clients of round ``round_index``, a function of the seed (``seed``, else the sampler's)
        and the round alone, so a resumed federation draws what the uninterrupted one would have."""
        rng = np.random.default_rng([self.seed if seed is None else seed, round_index])
        if self.rate is not None:
            return np.flatnonzero(rng.random(num_clients) < self.rate).tolist()
        if self.count > num_clients:
            raise ConfigError("federation.sampler.count", f"{self.count} clients per round but only "
                              f"{num_clients} clients", f"use count <= {num_clients}")
        return sorted(rng.choice(num_clients, size=self.count, replace=False).tolist())
