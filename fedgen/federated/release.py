"""Federated one-shot release of a clipped sum (DP-Merf's mean embedding across clients).

Each client computes the sum ``s_i`` of its own examples' clipped contributions (each example moves it
by at most C in L2). The server learns ``sum_i s_i`` through secure aggregation (Bonawitz et al., CCS
2017; :class:`~fedgen.mechanisms.SecureAggregator`), so no single client's sum is ever seen, and adds
Gaussian noise once (central noise) before anything leaves the server. There is one release, recorded
once in the generator's ledger. By default the neighbouring relation is add/remove one *example* anywhere
in the federation; with ``client_clip_norm`` set, each client's sum is clipped to that L2 norm and the
relation is add/remove one *user* (all of a client's data, as in DP-FedAvg), so the release and a
client-level DP baseline can be compared under the same relation.

Trust: with central noise (``noise: central``) the server sees the exact aggregate before adding noise; DP
protects the released statistic (and everything trained from it) against everyone else, and secure aggregation
protects each client's sum against the server. With distributed noise (``noise: distributed``, the Skellam
mechanism of Agarwal, Kairouz, Liu, NeurIPS 2021) each client adds its share of integer Skellam noise to its
quantized vector before masking, so no one, the server included, ever sees a noiseless sum, provided the
clients are honest and add their share (see :meth:`FederatedRelease.skellam_sensitivities`), and the shares are
drawn in secure mode (``secure_noise: true``): in the default seeded mode every share follows from the seed, which
whoever holds the config (the server, in this simulation) can use to subtract them, so seeded distributed noise
protects the release from others but not from the server.

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

import numpy as np
import torch
from torch.utils.data import Dataset

from fedgen.data import IIDPartitioner, Partitioner
from fedgen.errors import ConfigError, check_at_least_one, fields_under
from fedgen.federated.clients import Client, make_clients
from fedgen.mechanisms import (
    GaussianMechanism,
    SecureAggregator,
    SkellamEvent,
    calibrate_skellam_mu,
    clip_rows,
)

log = logging.getLogger(__name__)


class ReleasesOneSum(Protocol):
    """A generator whose only contact with private data is one released sum (e.g. DP-Merf)."""

    mechanism: GaussianMechanism

    def embedding_sum(self, dataset: Dataset) -> torch.Tensor: ...

    def store_release(self, noisy_sum: torch.Tensor, num_private: int) -> None: ...

    #: the buffer the release is stored in (its size is the released sum's)
    noisy_sum: torch.Tensor


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
        noise: ``"central"``: the server adds Gaussian noise once to the securely aggregated sum;
            ``"distributed"``: each client adds integer Skellam noise to its quantized vector before masking, so
            the server only ever sees the noisy sum (needs ``secure_aggregation``; the mechanism's accountant
            must be ``auto`` or ``rdp``). The generator's mechanism gives the budget (``target_epsilon``,
            ``delta``, its ledger) or, without a budget, the noise multiplier to match.
    """

    def __init__(self, *, num_clients: int = 10, partitioner: Partitioner | None = None,
                 secure_aggregation: bool = True, graph: Literal["full", "k_regular"] = "full", bits: int = 64,
                 scale: float = 2.0**20, dropout: float = 0.0, client_clip_norm: float | None = None,
                 noise: Literal["central", "distributed"] = "central") -> None:
        check_at_least_one("federation.num_clients", num_clients, "use e.g. 10")
        if noise not in ("central", "distributed"):
            raise ConfigError("federation.noise", f"unknown noise placement {noise!r}", "use central or distributed")
        if noise == "distributed" and not secure_aggregation:
            raise ConfigError("federation.noise", "distributed noise needs secure aggregation: without masking the "
                              "server would see each client's vector with only its share of the noise",
                              "set secure_aggregation: true, or noise: central")
        if secure_aggregation and num_clients < 3:
            raise ConfigError("federation.num_clients", f"secure aggregation needs >= 3 clients, got {num_clients}",
                              "use at least 3 clients or set secure_aggregation: false")
        if not 0 <= dropout < 1 / 3:
            raise ConfigError("federation.dropout", f"must be in [0, 1/3), got {dropout}",
                              "secure aggregation tolerates fewer than a third of the clients dropping")
        if secure_aggregation:  # its settings checked now, under the names this config gives them
            with fields_under({"secure_aggregation": "federation"}):
                aggregator = SecureAggregator(clip_norm=1.0, scale=scale, bits=bits, graph=graph)
                tolerated = aggregator.max_dropouts(num_clients)
            if int(dropout * num_clients) > tolerated:
                raise ConfigError("federation.dropout", f"{dropout:g} drops {int(dropout * num_clients)} of "
                                  f"{num_clients} clients, but the {graph} graph (neighbourhoods of "
                                  f"{aggregator.degree_for(num_clients) + 1}, {aggregator.threshold_for(num_clients)} "
                                  f"shares needed) recovers from at most {tolerated} in every pattern",
                                  f"use dropout <= {tolerated / num_clients:.3g}" + (
                                      ", or graph: full" if graph != "full" else ""))
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
        self.noise = noise

    def skellam_sensitivities(self, bound: float, dim: int) -> tuple[float, float]:
        """(Delta_2, Delta_1): the L2 and L1 sensitivities of the integer sum that secure aggregation computes.

        Neighbouring data change one client's float vector x into x' with ||x - x'||_2 <= ``bound`` (example-level:
        an example added or removed inside one client's sum, ``bound`` = the mechanism's clip_norm C; user-level:
        a whole client's clipped sum added or removed, x' = 0, ``bound`` = client_clip_norm S). That client
        quantizes to round(x scale); rounding moves each coordinate by at most 1/2, so
        ||round(x scale) - round(x' scale)||_2 <= bound scale + sqrt(m) / 2 + sqrt(m) / 2 (one rounding error for
        each of the two vectors; for x' = 0 there is only one), and every other client's integer vector is
        unchanged. Hence Delta_2 = bound * scale + sqrt(m). The difference is an integer vector v, whose
        |v_i| <= v_i^2 gives ||v||_1 <= ||v||_2^2, and ||v||_1 <= sqrt(m) ||v||_2 always, so
        Delta_1 = min(sqrt(m) Delta_2, Delta_2^2).
        """
        l2 = bound * self.scale + math.sqrt(dim)
        return l2, min(math.sqrt(dim) * l2, l2 * l2)

    @property
    def unit(self) -> str:
        """The neighbouring unit this release protects: one example, or one client's whole data (user)."""
        return "example" if self.client_clip_norm is None else "user"

    def check(self, generator: ReleasesOneSum, dataset: Dataset, clients: list[Client] | None = None
              ) -> list[Client]:
        """Refuse settings this release cannot run or account for with ``generator`` on ``dataset``, before any
        client computes (``run`` checks again); return the clients' split of ``dataset``: ``clients`` if given
        (a split an earlier check returned), else a new one."""
        mechanism, unit = generator.mechanism, self.unit
        if mechanism.ledger.unit != unit:
            raise ConfigError("model.mechanism.unit", f"is {mechanism.ledger.unit!r}, but this federation gives "
                              f"{unit}-level DP", f"set unit: {unit} on the mechanism (client_clip_norm "
                              f"{'unset' if unit == 'example' else 'set'} means {unit}-level)")
        if self.client_clip_norm is not None and self.client_clip_norm < mechanism.clip_norm:
            raise ConfigError("federation.client_clip_norm", f"{self.client_clip_norm} is below the mechanism's "
                              f"clip_norm {mechanism.clip_norm}", "use a bound >= the mechanism's clip_norm")
        if mechanism.sample_rate != 1.0:
            raise ConfigError("model.mechanism.sample_rate", f"is {mechanism.sample_rate:g}, but the federated release "
                              "sums every client's data (no subsampling)", "use sample_rate: 1")
        if self.noise == "distributed":
            self._check_distributed(mechanism)
        if self.num_clients > len(dataset):
            raise ConfigError("federation.num_clients", f"{self.num_clients} clients but only {len(dataset)} "
                              "private examples", f"use num_clients <= {len(dataset)}")
        if clients is None:
            clients = make_clients(dataset, self.partitioner, self.num_clients)
        elif len(clients) != self.num_clients or not np.array_equal(
                np.sort(np.concatenate([c.indices for c in clients])), np.arange(len(dataset))):
            # each example in exactly one client: one in two would move the total by 2 C, not the C accounted
            raise ValueError(f"clients: {len(clients)} clients holding {sum(len(c) for c in clients)} examples are "
                             f"not a split of these {len(dataset)} examples among {self.num_clients}; pass the "
                             "split that check returned for this dataset")
        if self.secure_aggregation:  # the modular sum's range, from the split's sizes alone
            largest = max(len(client) for client in clients)
            aggregator, mu = self._aggregator(mechanism, largest, generator.noisy_sum.numel())
            with fields_under({"secure_aggregation": "federation"}):
                aggregator.check_range(self.num_clients, math.sqrt(2 * mu))
        return clients

    def run(self, generator: ReleasesOneSum, dataset: Dataset, *, clients: list[Client] | None = None,
            device: torch.device | str | None = None) -> dict[str, Any]:
        """Split ``dataset`` among the clients (or take ``clients``, the split ``check`` returned), aggregate
        their sums, release once; returns a report."""
        clients = self.check(generator, dataset, clients)
        mechanism, unit = generator.mechanism, self.unit
        start = time.perf_counter()
        if device is not None:  # the clients' embedding runs where the generator will train (e.g. the GPU)
            generator.to(device)
        local = {c.id: generator.embedding_sum(c.dataset(dataset)).double().cpu() for c in clients}
        if self.client_clip_norm is not None:
            local = {cid: clip_rows(vector.unsqueeze(0), self.client_clip_norm)[0] for cid, vector in local.items()}
        bound = self._bound(mechanism)
        client_compute = time.perf_counter() - start
        dim = next(iter(local.values())).numel()
        sizes = [len(c) for c in clients]
        report: dict[str, Any] = {"num_clients": self.num_clients, "partitioner": repr(self.partitioner),
                                  "client_sizes": sizes, "noise": self.noise, "unit": unit,
                                  "client_compute_seconds": client_compute}
        if self.noise == "distributed":
            return report | self._release_distributed(generator, dataset, local, bound, max(sizes))
        if self.secure_aggregation:
            aggregator, _ = self._aggregator(mechanism, max(sizes), dim)
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
        # noise on the float64 total: rounding it to float32 first could move neighbours' sums apart by more than
        # the sensitivity (by up to 2^-24 of the total's norm each); rounding the noisy sum is post-processing
        noisy = mechanism.release(total, sensitivity=sensitivity)
        generator.store_release(noisy.to(torch.float32), len(dataset))
        log.info("Federated release from %d clients (%s, secure aggregation %s, central noise, sensitivity %.6g)",
                 self.num_clients, report["partitioner"], "on" if self.secure_aggregation else "off", sensitivity)
        return report

    def _client_bound(self, mechanism: GaussianMechanism, largest_client: int) -> float:
        """The L2 bound on one client's vector, which secure aggregation checks its range with: the clipped sum of
        its examples, or its own clipped sum (user-level)."""
        return self._bound(mechanism) * (largest_client if self.client_clip_norm is None else 1)

    def _aggregator(self, mechanism: GaussianMechanism, largest_client: int, dim: int
                    ) -> tuple[SecureAggregator, float]:
        """Secure aggregation of the clients' vectors of ``dim`` coordinates, and the Skellam parameter mu of the
        noise the clients add in all (Sk(mu, mu) per coordinate, variance 2 mu; 0 for central noise)."""
        aggregator = SecureAggregator(clip_norm=self._client_bound(mechanism, largest_client), scale=self.scale,
                                      bits=self.bits, graph=self.graph)
        if self.noise != "distributed":
            return aggregator, 0.0
        return aggregator, self._skellam_mu(mechanism, *self.skellam_sensitivities(self._bound(mechanism), dim))

    def _bound(self, mechanism: GaussianMechanism) -> float:
        """How far one unit moves one client's vector in L2: an example's clip_norm, or a client's bound."""
        return mechanism.clip_norm if self.client_clip_norm is None else self.client_clip_norm

    @staticmethod
    def _check_distributed(mechanism: GaussianMechanism) -> None:
        """What distributed noise needs from the mechanism, checked before any client computes."""
        if mechanism.ledger.accountant == "prv":
            raise ConfigError("model.mechanism.accountant", "the PRV accountant cannot account for the Skellam "
                              "release of distributed noise", "use accountant: auto or rdp")

    def _skellam_mu(self, mechanism: GaussianMechanism, l2: float, l1: float) -> float:
        """The total Skellam parameter mu of the release (noise Sk(mu, mu) per coordinate, variance 2 mu).

        With a budget and no given noise multiplier: the smallest mu for which ``num_releases`` such releases,
        after what the ledger holds, fit ``target_epsilon`` at ``delta`` (:func:`calibrate_skellam_mu`). With a
        given noise multiplier sigma: the Skellam noise has the variance of the Gaussian noise it replaces,
        2 mu = (sigma Delta_2)^2 (its epsilon is then slightly above that Gaussian's; a budget, if set, is still
        enforced when the ledger is charged).
        """
        if mechanism.calibrates_noise:
            return calibrate_skellam_mu(target_epsilon=mechanism.target_epsilon, delta=mechanism.delta,
                                        l2_sensitivity=l2, l1_sensitivity=l1, count=mechanism.num_releases,
                                        accountant=mechanism.ledger.accountant, prior=mechanism.ledger)
        return (mechanism.noise_multiplier * l2) ** 2 / 2

    def _release_distributed(self, generator: ReleasesOneSum, dataset: Dataset, local: dict[int, torch.Tensor],
                             bound: float, largest_client: int) -> dict[str, Any]:
        """Distributed Skellam noise: every client adds Sk(mu / n, mu / n) to its quantized vector before masking.

        The n clients' shares sum to exactly Sk(mu, mu) (Skellam is closed under summation) when all n inputs are
        included. Clients that drop out *after* sending their masked vector are included (their self-masks are
        recovered), so here every client is guaranteed to count: n_min = n. Were clients allowed to drop before
        masking, their share would be lost; each share would then have to be Sk(mu / n_min, mu / n_min) for the
        n_min guaranteed survivors, so that the total never falls below mu. The ledger is charged with one
        :class:`SkellamEvent` before any masked vector is sent.
        """
        mechanism = generator.mechanism
        if not mechanism.noise.secure:
            log.warning("Distributed noise in seeded mode: every client's Skellam share follows from the seed, so "
                        "whoever holds it can subtract the shares and see the noiseless sum; the epsilon holds "
                        "against others, not against the server. Set secure_noise: true on the mechanism for "
                        "shares no one can reproduce.")
        dim = next(iter(local.values())).numel()
        l2, l1 = self.skellam_sensitivities(bound, dim)
        aggregator, mu = self._aggregator(mechanism, largest_client, dim)
        noise_std = math.sqrt(2 * mu)  # the included clients' total noise
        guaranteed = self.num_clients  # no client drops before masking
        mu_client = mu / guaranteed
        aggregator.check_range(self.num_clients, noise_std)  # checked by check() too; again before the charge
        mechanism.charge(SkellamEvent(mu, l2, l1))
        shares = {cid: mechanism.noise.skellam(tuple(vector.shape), mu_client) for cid, vector in local.items()}
        num_dropped = int(self.dropout * self.num_clients)
        dropped = set(range(self.num_clients - num_dropped, self.num_clients))
        result = aggregator.aggregate(local, dropped_after_masking=dropped, client_noise=shares, noise_std=noise_std)
        noisy = torch.as_tensor(result.total, dtype=torch.float64)
        generator.store_release(noisy.to(torch.float32), len(dataset))
        log.info("Federated release from %d clients (%s, secure aggregation on, distributed Skellam noise mu=%.6g, "
                 "Gaussian-equivalent noise multiplier %.4g)", self.num_clients, repr(self.partitioner), mu,
                 math.sqrt(2 * mu) / l2)
        return {
            "sensitivity": l2 / self.scale,
            "skellam": {"mu": mu, "mu_per_client": mu_client, "guaranteed_clients": guaranteed,
                        "l2_sensitivity": l2, "l1_sensitivity": l1, "noise_multiplier": math.sqrt(2 * mu) / l2,
                        "noise_std": math.sqrt(2 * mu) / self.scale},
            "secure_aggregation": {
                "graph": self.graph, "degree": result.degree, "threshold": result.threshold,
                "bits": self.bits, "scale": self.scale, "dropped_after_masking": sorted(dropped),
                "max_quantization_error": result.max_quantization_error,
                "server_seconds": result.server_seconds, "client_seconds": result.client_seconds,
                "bytes_sent_per_client": max(result.bytes_sent_per_client.values()),
                "expansion": max(result.bytes_sent_per_client.values()) / (4 * dim)},
        }
