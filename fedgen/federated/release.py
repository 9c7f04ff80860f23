"""Federated one-shot release of a clipped sum (DP-Merf's mean embedding across clients).

Each client computes the sum ``s_i`` of its own examples' clipped contributions (each example moves it
by at most C in L2). The server learns ``sum_i s_i`` through secure aggregation (Bonawitz et al., CCS
2017; :class:`~fedgen.mechanisms.SecureAggregator`), so no single client's sum is ever seen, and adds
Gaussian noise once (central noise) before anything leaves the server. There is one release, recorded
once in the generator's ledger. By default the neighbouring relation is add/remove one *example* anywhere
in the federation; with ``client_clip_norm`` set, each client's sum is clipped to that L2 norm and the
relation is add/remove one *user* (all of a client's data, as in DP-FedAvg), so the release and a
client-level DP baseline can be compared under the same relation.

Trust: with central noise the server sees the exact aggregate before adding noise; DP protects the
released statistic (and everything trained from it) against everyone else, and secure aggregation
protects each client's sum against the server.

Quantization: secure aggregation sums fixed-point vectors (``round(x * scale)``). Rounding can move a
client's vector by up to ``sqrt(m) / scale`` more than its input moved, so the sum's L2 sensitivity to one
example is ``C + sqrt(m) / scale``; the noise is calibrated to that, so the recorded noise multiplier
is exact.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal, Protocol

import torch
from torch.utils.data import Dataset

from fedgen.data import IIDPartitioner, Partitioner
from fedgen.errors import ConfigError, check_at_least_one
from fedgen.federated.clients import make_clients
from fedgen.mechanisms import GaussianMechanism, SecureAggregator, clip_rows

log = logging.getLogger(__name__)


class ReleasesOneSum(Protocol):
    """A generator whose only contact with private data is one released sum (e.g. DP-Merf)."""

    mechanism: GaussianMechanism

    def embedding_sum(self, dataset: Dataset) -> torch.Tensor: ...

    def store_release(self, noisy_sum: torch.Tensor, num_private: int) -> None: ...


class FederatedRelease:
    """Release a generator's clipped sum from data split across simulated clients.

    Args:
        num_clients: number of clients the private training set is split into.
        partitioner: how the examples are split (IID, Dirichlet over labels, shards).
        secure_aggregation: sum the clients' vectors with secure aggregation (else a plain sum).
        graph: secure aggregation's neighbour graph: ``"full"`` or ``"k_regular"`` (SecAgg+).
        bits: bits of the modular arithmetic of secure aggregation.
        scale: fixed-point scale of secure aggregation (rounding error 0.5 / scale per coordinate).
        dropout: fraction of the clients that drop out after sending their masked vector (their input
            counts; the protocol recovers their self-masks from the survivors' shares).
        client_clip_norm: if set, clip each client's sum to this L2 norm for user-level DP (the generator's
            mechanism must then have ``unit: user``); if None, example-level DP (``unit: example``).
    """

    def __init__(self, *, num_clients: int = 10, partitioner: Partitioner | None = None,
                 secure_aggregation: bool = True, graph: Literal["full", "k_regular"] = "full", bits: int = 64,
                 scale: float = 2.0**20, dropout: float = 0.0, client_clip_norm: float | None = None) -> None:
        check_at_least_one("federation.num_clients", num_clients, "use e.g. 10")
        if secure_aggregation and num_clients < 3:
            raise ConfigError("federation.num_clients", f"secure aggregation needs >= 3 clients, got {num_clients}",
                              "use at least 3 clients or set secure_aggregation: false")
        if not 0 <= dropout < 1 / 3:
            raise ConfigError("federation.dropout", f"must be in [0, 1/3), got {dropout}",
                              "secure aggregation tolerates fewer than a third of the clients dropping")
        if client_clip_norm is not None and not client_clip_norm > 0:
            raise ConfigError("federation.client_clip_norm", f"must be > 0, got {client_clip_norm}",
                              "set the bound on one client's sum, or null for example-level DP")
        self.client_clip_norm = client_clip_norm
        self.num_clients = num_clients
        self.partitioner = partitioner or IIDPartitioner(seed=0)
        self.secure_aggregation = secure_aggregation
        self.graph = graph
        self.bits = bits
        self.scale = scale
        self.dropout = dropout

    def run(self, generator: ReleasesOneSum, dataset: Dataset) -> dict[str, Any]:
        """Split ``dataset`` among the clients, aggregate their sums, release once; returns a report."""
        mechanism = generator.mechanism
        unit = "example" if self.client_clip_norm is None else "user"
        if mechanism.ledger.unit != unit:
            raise ConfigError("model.mechanism.unit", f"is {mechanism.ledger.unit!r}, but this federation gives "
                              f"{unit}-level DP", f"set unit: {unit} on the mechanism (client_clip_norm "
                              f"{'unset' if unit == 'example' else 'set'} means {unit}-level)")
        if self.client_clip_norm is not None and self.client_clip_norm < mechanism.clip_norm:
            raise ConfigError("federation.client_clip_norm", f"{self.client_clip_norm} is below the mechanism's "
                              f"clip_norm {mechanism.clip_norm}", "use a bound >= the mechanism's clip_norm")
        clients = make_clients(dataset, self.partitioner, self.num_clients)
        start = time.perf_counter()
        local = {c.id: generator.embedding_sum(c.dataset(dataset)).double().cpu() for c in clients}
        if self.client_clip_norm is not None:
            local = {cid: clip_rows(vector.unsqueeze(0), self.client_clip_norm)[0] for cid, vector in local.items()}
        bound = mechanism.clip_norm if self.client_clip_norm is None else self.client_clip_norm
        client_compute = time.perf_counter() - start
        dim = next(iter(local.values())).numel()
        sizes = [len(c) for c in clients]
        report: dict[str, Any] = {"num_clients": self.num_clients, "partitioner": repr(self.partitioner),
                                  "client_sizes": sizes, "noise": "central", "unit": unit,
                                  "client_compute_seconds": client_compute}
        if self.secure_aggregation:
            # The L2 bound on one client's vector, which secure aggregation checks its range with.
            client_bound = max(sizes) * mechanism.clip_norm if self.client_clip_norm is None else bound
            aggregator = SecureAggregator(clip_norm=client_bound, scale=self.scale,
                                          bits=self.bits, graph=self.graph)
            num_dropped = int(self.dropout * self.num_clients)
            dropped = set(range(self.num_clients - num_dropped, self.num_clients))
            result = aggregator.aggregate(local, dropped_after_masking=dropped)
            total = torch.as_tensor(result.total, dtype=torch.float64)
            sensitivity = bound + math.sqrt(dim) / self.scale
            report |= {"secure_aggregation": {
                "graph": self.graph, "degree": result.degree, "threshold": result.threshold,
                "bits": self.bits, "scale": self.scale, "dropped_after_masking": sorted(dropped),
                "max_quantization_error": result.max_quantization_error,
                "server_seconds": result.server_seconds, "client_seconds": result.client_seconds,
                "bytes_sent_per_client": max(result.bytes_sent_per_client.values()),
                "expansion": max(result.bytes_sent_per_client.values()) / (4 * dim)}}
        else:
            total = torch.stack(list(local.values())).sum(0)
            sensitivity = bound
        report["sensitivity"] = sensitivity
        noisy = mechanism.release(total.to(torch.float32), sensitivity=sensitivity)
        generator.store_release(noisy, len(dataset))
        log.info("Federated release from %d clients (%s, secure aggregation %s, central noise, sensitivity %.6g)",
                 self.num_clients, report["partitioner"], "on" if self.secure_aggregation else "off", sensitivity)
        return report
