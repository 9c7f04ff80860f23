"""Split a dataset's examples among federated clients.

Each partitioner maps the labels of a dataset to one sorted index array per client; every example
goes to exactly one client. Partitioners are reachable by name through ``Partitioner.registry``
(``"iid"``, ``"dirichlet"``, ``"shards"``) and are reproducible from their ``seed``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from fedgen.errors import ConfigError, check_integer
from fedgen.registry import Registered, Registry


class Partitioner(Registered):
    """Base class: ``partition(labels, num_clients)`` gives one sorted index array per client.

    Subclasses register under a short name with ``class Mine(Partitioner, name="mine")`` and
    implement :meth:`_partition`.
    """

    registry: ClassVar[Registry[Partitioner]] = Registry("partitioner")

    @classmethod
    def create(cls, name: str, **kwargs: Any) -> Partitioner:
        """Build the partitioner registered as ``name`` with keyword arguments ``kwargs``."""
        return cls.registry.get(name)(**kwargs)

    def partition(self, labels: np.ndarray | torch.Tensor | list[int], num_clients: int) -> list[np.ndarray]:
        """Split ``range(len(labels))`` into ``num_clients`` disjoint, sorted int64 index arrays."""
        labels_np = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if labels_np.ndim != 1:
            raise ConfigError(
                "labels", f"must be one label per example (1-D), got shape {labels_np.shape}", "pass a 1-D label array"
            )
        check_integer("num_clients", num_clients, 1)
        if num_clients > len(labels_np):
            raise ConfigError(
                "num_clients",
                f"{num_clients} clients but only {len(labels_np)} examples",
                f"set num_clients <= {len(labels_np)}",
            )
        parts = self._partition(labels_np, int(num_clients))
        return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]

    def _partition(self, labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({args})"


class IIDPartitioner(Partitioner, name="iid"):
    """Shuffle the examples and cut them into equal-sized parts (sizes differ by at most one)."""

    def __init__(self, *, seed: int = 0) -> None:
        check_integer("partitioner.seed", seed, 0)
        self.seed = seed

    def _partition(self, labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return np.array_split(rng.permutation(len(labels)), num_clients)


class DirichletPartitioner(Partitioner, name="dirichlet"):
    """Label skew: for each class, client shares are drawn from Dir(alpha, ..., alpha).

    Small ``alpha`` gives each client few classes; large ``alpha`` approaches IID. Draws are
    repeated until every client holds at least ``min_size`` examples, at most ``max_tries`` times.
    """

    def __init__(self, *, alpha: float, seed: int = 0, min_size: int = 1, max_tries: int = 1000) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha <= 0:
            raise ConfigError(
                "partitioner.alpha",
                f"must be a finite number > 0, got {alpha!r}",
                "set alpha > 0 (e.g. 0.1 for strong skew, 100 for near-IID)",
            )
        check_integer("partitioner.seed", seed, 0)
        check_integer("partitioner.min_size", min_size, 0)
        check_integer("partitioner.max_tries", max_tries, 1)
        self.alpha = float(alpha)
        self.seed = seed
        self.min_size = min_size
        self.max_tries = max_tries

    def _partition(self, labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
        if self.min_size * num_clients > len(labels):
            raise ConfigError(
                "partitioner.min_size",
                f"{num_clients} clients x min_size {self.min_size} exceeds the {len(labels)} examples",
                "lower min_size or num_clients",
            )
        rng = np.random.default_rng(self.seed)
        classes = np.unique(labels)
        smallest = 0
        for _ in range(self.max_tries):
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for label in classes:
                members = rng.permutation(np.flatnonzero(labels == label))
                shares = rng.dirichlet(np.full(num_clients, self.alpha))
                cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
                for client, chunk in enumerate(np.split(members, cuts)):
                    parts[client].append(chunk)
            result = [np.concatenate(chunks) for chunks in parts]
            smallest = min(len(part) for part in result)
            if smallest >= self.min_size:
                return result
        raise ConfigError(
            "partitioner.min_size",
            f"no Dirichlet(alpha={self.alpha}) draw in {self.max_tries} tries gave all {num_clients} clients "
            f"at least {self.min_size} examples (last smallest client: {smallest})",
            "raise alpha, lower min_size or num_clients, or raise max_tries",
        )


class ShardPartitioner(Partitioner, name="shards"):
    """Pathological label skew: sort by label, cut into ``num_clients * shards_per_client`` shards, deal them out.

    On balanced data whose class sizes are multiples of the shard size, each client sees at most
    ``shards_per_client`` distinct labels.
    """

    def __init__(self, *, shards_per_client: int = 2, seed: int = 0) -> None:
        check_integer("partitioner.shards_per_client", shards_per_client, 1)
        check_integer("partitioner.seed", seed, 0)
        self.shards_per_client = shards_per_client
        self.seed = seed

    def _partition(self, labels: np.ndarray, num_clients: int) -> list[np.ndarray]:
        num_shards = num_clients * self.shards_per_client
        if num_shards > len(labels):
            raise ConfigError(
                "partitioner.shards_per_client",
                f"{num_clients} clients x {self.shards_per_client} shards exceeds the {len(labels)} examples",
                "lower shards_per_client or num_clients",
            )
        rng = np.random.default_rng(self.seed)
        shuffled = rng.permutation(len(labels))  # random order within each label
        by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
        shards = np.array_split(by_label, num_shards)
        order = rng.permutation(num_shards)
        spc = self.shards_per_client
        return [np.concatenate([shards[s] for s in order[c * spc : (c + 1) * spc]]) for c in range(num_clients)]
