"""DP-SGD computed by the clients that hold the data, with secure aggregation: example-level or client-level DP.

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

Client-level DP (``unit="client"``, add/remove a whole client; DP-FedSGD after McMahan et al., ICLR 2018):
each step includes each client with probability ``client_rate`` (and, from an included client, a Poisson
sample of its examples); every client clips the sum of its examples' clipped gradients to ``C`` as a whole
before secure aggregation, and the step is a Poisson-subsampled Gaussian release at rate ``client_rate``
under add/remove-one-client neighbouring. The generator's mechanism must be a ``DPSGD(unit="user")``, whose
ledger then reports client-level epsilon. Its noise covers a whole client's contribution, so it pays with
many clients and small sampling rates; with 10 clients it is far above any signal.

Trust: the noise is central. The server sees the exact total before adding the noise; DP protects
everything released from then on (the model and the synthetic data).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedgen.data import IIDPartitioner, Partitioner
from fedgen.errors import ConfigError, check_at_least_one
from fedgen.federated.clients import make_clients
from fedgen.mechanisms import SecureAggregator, clip_rows

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
        unit: ``"example"`` (example-level DP: every client takes part in every step) or ``"client"``
            (client-level DP; the mechanism must have ``unit: user``).
        client_rate: for ``unit: client``, the probability that a client takes part in a step.
    """

    def __init__(self, *, num_clients: int = 10, partitioner: Partitioner | None = None,
                 secure_aggregation: bool = True, graph: Literal["full", "k_regular"] = "full", bits: int = 64,
                 scale: float = 2.0**20, unit: Literal["example", "client"] = "example",
                 client_rate: float = 1.0) -> None:
        check_at_least_one("federation.num_clients", num_clients, "use e.g. 10")
        if unit not in ("example", "client"):
            raise ConfigError("federation.unit", f"unknown unit {unit!r}", "use example or client")
        if not 0 < client_rate <= 1:
            raise ConfigError("federation.client_rate", f"must be in (0, 1], got {client_rate}", "use e.g. 0.1")
        if unit == "example" and client_rate != 1:
            raise ConfigError("federation.client_rate", "client sampling belongs to client-level DP (example-level "
                              "steps include every client)", "set unit: client, or client_rate: 1")
        self.unit, self.client_rate = unit, float(client_rate)
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
        unit = generator.mechanism.ledger.unit
        if (self.unit == "client") != (unit == "user"):
            raise ConfigError("model.init_args.mechanism.init_args.unit",
                              f"the federation is {self.unit}-level but the mechanism counts add/remove one {unit}",
                              "use unit: user on the mechanism with unit: client on the federation, else unit: "
                              "example on both")
        # in memory, the owners join the tensors, so that the Poisson loader fetches whole batches
        tagged = TensorDataset(*dataset.tensors, owner) if type(dataset) is TensorDataset else \
            ClientTagged(dataset, owner)
        if self.unit == "client":
            loader = generator.attach_private_data(tagged, users=[c.indices for c in clients],
                                                   user_rate=self.client_rate)
        else:
            loader = generator.attach_private_data(tagged)
        self._clip_norm = generator.mechanism.max_grad_norm
        sizes = [len(c) for c in clients]
        if self.secure_aggregation:
            # The public bound of a client's vector's L2 norm: C for a client clipped as a whole, else C per
            # sampled example.
            bound = self._clip_norm if self.unit == "client" else max(sizes) * self._clip_norm
            self._aggregator = SecureAggregator(clip_norm=bound, scale=self.scale, bits=self.bits, graph=self.graph)
            self._aggregator.check_range(self.num_clients)
        generator.clients = self
        self.report = {"num_clients": self.num_clients, "partitioner": repr(self.partitioner),
                       "client_sizes": sizes, "unit": self.unit, "noise": "central",
                       "protocol": ("every step: each client's clipped sum of its own Poisson sample"
                                    if self.unit == "example" else
                                    f"every step: each client with probability {self.client_rate:g}, its clipped "
                                    "sum of its own Poisson sample clipped to C as a whole")
                                   + ", " + ("secure aggregation" if self.secure_aggregation else "plain sum")
                                   + ", Gaussian noise on the total"}
        if self.unit == "client":
            self.report["client_rate"] = self.client_rate
        log.info("Federated DP-SGD over %d clients (%s), secure aggregation %s", self.num_clients,
                 self.report["partitioner"], "on" if self.secure_aggregation else "off")
        return loader

    def secure_sum(self, parts: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """The total of the clients' clipped sums (one per client, in client order) in float64 and its L2
        sensitivity to one unit: ``C + sqrt(m) / scale`` through secure aggregation, ``C`` for a plain sum.
        Client-level: each client first clips its sum to ``C`` as a whole (in float64, which secure aggregation
        encodes). The step adds its noise to this float64 total and rounds only the noisy gradient to the
        parameters' dtype (rounding the total first could move neighbours' sums past the sensitivity)."""
        if len(parts) != self.num_clients:
            raise ValueError(f"{len(parts)} sums for {self.num_clients} clients")
        device = parts[0].device
        parts = [part.double() for part in parts]
        if self.unit == "client":
            parts = list(clip_rows(torch.stack(parts), self._clip_norm))
        if self._aggregator is None:
            return torch.stack(parts).sum(0), self._clip_norm
        start = time.perf_counter()
        result = self._aggregator.aggregate({k: part.cpu().numpy() for k, part in enumerate(parts)})
        stats = self._stats
        stats["steps"] += 1
        stats["server_seconds"] += result.server_seconds
        stats["client_seconds"] += result.client_seconds
        stats["wall_seconds"] = stats.get("wall_seconds", 0.0) + time.perf_counter() - start
        stats["max_quantization_error"] = max(stats["max_quantization_error"], result.max_quantization_error)
        stats["bytes_sent_per_client"] = max(result.bytes_sent_per_client.values())
        total = torch.as_tensor(result.total, dtype=torch.float64).to(device)
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
