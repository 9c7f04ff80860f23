"""DP-SGD computed by the clients that hold the data: example-level DP with secure aggregation.

Each step of DP-SGD (Abadi et al., CCS 2016) needs the sum of clipped per-example gradients over a Poisson
sample. Here every client samples its own examples (each with probability q, independently: together
exactly the Poisson sample of the whole training set), clips and sums their gradients, and sends the sum
through secure aggregation (Bonawitz et al., CCS 2017), so the server learns only the total. The server
adds Gaussian noise once and steps. The ledger records what central DP-SGD records, step for step; the one
difference is the sensitivity: fixed-point rounding in secure aggregation can move a client's vector by up
to ``sqrt(m) / scale`` more than its examples did (m parameters), so the noise is ``sigma (C +
sqrt(m) / scale)`` (see :meth:`~fedgen.federated.FederatedRelease.skellam_sensitivities` for the
argument). This is FedSGD with all clients in every round: the data never leaves its client, and no
client's gradient is ever seen alone.

Trust: the noise is central. The server sees the exact total before adding the noise; DP protects
everything released from then on (the model and the synthetic data). Client-level DP (add/remove a whole
client) is the other reading of federated privacy; with 10 clients its noise must cover a whole client's
update, far above any signal, so this generator's federation is example-level.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from fedgen.data import IIDPartitioner, Partitioner
from fedgen.errors import ConfigError, check_at_least_one
from fedgen.federated.clients import make_clients
from fedgen.mechanisms import SecureAggregator

log = logging.getLogger(__name__)


class ClientTagged(Dataset):
    """``dataset`` whose items also name the client holding them: ``(image, label, client)``."""

    def __init__(self, dataset: Dataset, owner: torch.Tensor) -> None:
        self.dataset, self.owner = dataset, owner

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, torch.Tensor]:
        image, label = self.dataset[index]
        return image, label, self.owner[index]


class FederatedDPSGD:
    """Train a DP-SGD generator (e.g. :class:`~fedgen.generators.DPDiffusion`) on data split across clients.

    Args:
        num_clients: number of clients the private training set is split into.
        partitioner: how the examples are split (IID, Dirichlet over labels, shards).
        secure_aggregation: sum the clients' clipped sums with secure aggregation (else a plain sum).
        graph: secure aggregation's neighbour graph: ``"full"`` or ``"k_regular"`` (SecAgg+).
        bits: bits of the modular arithmetic of secure aggregation.
        scale: fixed-point scale of secure aggregation.
    """

    def __init__(self, *, num_clients: int = 10, partitioner: Partitioner | None = None,
                 secure_aggregation: bool = True, graph: Literal["full", "k_regular"] = "full", bits: int = 64,
                 scale: float = 2.0**20) -> None:
        check_at_least_one("federation.num_clients", num_clients, "use e.g. 10")
        if secure_aggregation and num_clients < 3:
            raise ConfigError("federation.num_clients", f"secure aggregation needs >= 3 clients, got {num_clients}",
                              "use at least 3 clients or set secure_aggregation: false")
        self.num_clients = num_clients
        self.partitioner = partitioner or IIDPartitioner(seed=0)
        self.secure_aggregation = secure_aggregation
        self.graph, self.bits, self.scale = graph, bits, scale
        self._aggregator: SecureAggregator | None = None
        self._clip_norm = 0.0
        self._stats = {"steps": 0, "server_seconds": 0.0, "client_seconds": 0.0, "max_quantization_error": 0.0,
                       "bytes_sent_per_client": 0}
        self.report: dict[str, Any] = {}

    def attach(self, generator: Any, dataset: Dataset) -> DataLoader:
        """Split ``dataset`` among the clients and let them compute ``generator``'s steps; returns the loader
        (the Poisson sample of every client's data, each example tagged with its client)."""
        if not hasattr(generator, "clients") or not hasattr(generator.mechanism, "put_clipped_sum"):
            raise ConfigError("federation", f"{type(generator).__name__} is not trained by DP-SGD steps that "
                              "clients can compute", "use fedgen.generators.DPDiffusion, or "
                              "fedgen.federated.FederatedRelease for a one-release generator")
        clients = make_clients(dataset, self.partitioner, self.num_clients)
        owner = torch.empty(len(dataset), dtype=torch.long)
        for client in clients:
            owner[torch.as_tensor(client.indices, dtype=torch.long)] = client.id
        loader = generator.attach_private_data(ClientTagged(dataset, owner))
        self._clip_norm = generator.mechanism.max_grad_norm
        sizes = [len(c) for c in clients]
        if self.secure_aggregation:
            # A client's sum moves by at most C per sampled example: the public bound of its vector's L2 norm.
            self._aggregator = SecureAggregator(clip_norm=max(sizes) * self._clip_norm, scale=self.scale,
                                                bits=self.bits, graph=self.graph)
            self._aggregator.check_range(self.num_clients)
        generator.clients = self
        self.report = {"num_clients": self.num_clients, "partitioner": repr(self.partitioner),
                       "client_sizes": sizes, "unit": "example", "noise": "central",
                       "protocol": "every step: each client's clipped sum of its own Poisson sample, "
                                   + ("secure aggregation" if self.secure_aggregation else "plain sum")
                                   + ", Gaussian noise on the total"}
        log.info("Federated DP-SGD over %d clients (%s), secure aggregation %s", self.num_clients,
                 self.report["partitioner"], "on" if self.secure_aggregation else "off")
        return loader

    def secure_sum(self, parts: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """The total of the clients' clipped sums (one per client, in client order) and its L2 sensitivity to
        one example: ``C + sqrt(m) / scale`` through secure aggregation, ``C`` for a plain sum."""
        if len(parts) != self.num_clients:
            raise ValueError(f"{len(parts)} sums for {self.num_clients} clients")
        device, dtype = parts[0].device, parts[0].dtype
        if self._aggregator is None:
            return torch.stack(parts).sum(0), self._clip_norm
        start = time.perf_counter()
        result = self._aggregator.aggregate({k: part.double().cpu().numpy() for k, part in enumerate(parts)})
        stats = self._stats
        stats["steps"] += 1
        stats["server_seconds"] += result.server_seconds
        stats["client_seconds"] += result.client_seconds
        stats["wall_seconds"] = stats.get("wall_seconds", 0.0) + time.perf_counter() - start
        stats["max_quantization_error"] = max(stats["max_quantization_error"], result.max_quantization_error)
        stats["bytes_sent_per_client"] = max(result.bytes_sent_per_client.values())
        total = torch.as_tensor(result.total).to(device=device, dtype=dtype)
        return total, self._clip_norm + math.sqrt(total.numel()) / self.scale

    def state_dict(self) -> dict[str, Any]:
        """The secure-aggregation counters so far (kept in the generator's checkpoints across a resume)."""
        return dict(self._stats)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stats.update(state)

    def summary(self) -> dict[str, Any]:
        """The report: partition, protocol and, with secure aggregation, its cost over the steps so far."""
        if self._aggregator is None:
            return self.report
        return self.report | {"secure_aggregation": {"graph": self.graph, "bits": self.bits, "scale": self.scale,
                                                     **self._stats}}
