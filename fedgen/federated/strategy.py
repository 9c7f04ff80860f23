"""Federated strategies: what a client computes and how the server combines it.

Models travel as flat parameter vectors. A round: the server sends the global vector ``w``; each sampled
client trains locally from ``w`` and sends ``contribution(delta_i, n_i)`` for its update
``delta_i = w_i - w`` and size ``n_i``; the contributions are *summed* (in one process, or across Fabric
processes with an all-reduce), and ``finalize`` turns the sum into one ``delta``; the server steps
``w <- w + server_lr * delta``. The sum is in the clear (a trusted server sees each contribution); secure
aggregation serves the generative pipeline (:mod:`fedgen.federated.release`, :mod:`fedgen.federated.dp_sgd`).

- :class:`FedAvg` (McMahan et al., AISTATS 2017): local SGD, size-weighted mean of the updates.
- :class:`FedProx` (Li et al., MLSys 2020): local objective plus ``mu / 2 ||w_i - w||^2``.
- :class:`ClientLevelDP` wraps any strategy (DP-FedAvg, McMahan et al., ICLR 2018): each update is clipped
  to L2 norm ``S``, the clipped updates are summed, Gaussian noise ``N(0, sigma^2 S^2 I)`` is added once,
  and the sum is divided by the expected number of clients ``q N`` (fixed, so one client's presence changes
  nothing else). With Poisson client sampling at rate ``q`` each round is one Poisson-subsampled Gaussian
  release under add/remove-one-*user* neighbouring; the mechanism's ledger composes the rounds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fedgen.errors import ConfigError, check_at_least_one
from fedgen.federated.clients import ClientSampler
from fedgen.mechanisms import GaussianMechanism, SubsampledGaussianEvent, clip_rows
from fedgen.registry import Registered, Registry


def shuffled_batches(data: Dataset, batch_size: int, generator: torch.Generator):
    """One epoch of ``data`` in random order: tensor datasets are sliced a batch at a time (one gather per
    batch, on whichever device holds them), other datasets go through a ``DataLoader``."""
    if isinstance(data, TensorDataset):
        order = torch.randperm(len(data), generator=generator)
        for index in order.split(batch_size):
            yield data[index.to(data.tensors[0].device)]
    else:
        yield from DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)


class Strategy(Registered):
    """Base class: local training on a client and aggregation on the server."""

    registry: Registry[Strategy] = Registry("strategy")
    #: the mechanism that privatizes the aggregate, if any (its ledger holds the federation's epsilon)
    mechanism: GaussianMechanism | None = None

    def __init__(self, *, local_epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
                 server_lr: float = 1.0) -> None:
        check_at_least_one("strategy.local_epochs", local_epochs, "use e.g. 1")
        check_at_least_one("strategy.batch_size", batch_size, "use e.g. 32")
        if not lr > 0 or not server_lr > 0:
            raise ConfigError("strategy.lr", f"learning rates must be > 0, got lr={lr}, server_lr={server_lr}",
                              "use e.g. lr: 0.05, server_lr: 1.0")
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.server_lr = server_lr

    def local_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                   global_params: torch.Tensor) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def client_update(self, model: nn.Module, global_params: torch.Tensor, data: Dataset,
                      generator: torch.Generator) -> torch.Tensor:
        """Train ``model`` (holding ``global_params``) on ``data``; return ``w_i - w``."""
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr)
        device = global_params.device
        model.train()
        for _ in range(self.local_epochs):
            for x, y in shuffled_batches(data, self.batch_size, generator):
                optimizer.zero_grad()
                self.local_loss(model, (x.to(device), y.to(device)), global_params).backward()
                optimizer.step()
        return nn.utils.parameters_to_vector(model.parameters()).detach() - global_params

    def contribution(self, update: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
        """What one client adds to the round's sum: a vector and a weight."""
        raise NotImplementedError

    def finalize(self, total: torch.Tensor, total_weight: float, *, num_clients: int) -> torch.Tensor:
        """The round's update from the summed contributions (``num_clients``: clients in the federation)."""
        raise NotImplementedError

    def aggregate(self, updates: torch.Tensor, sizes: torch.Tensor, *, num_clients: int) -> torch.Tensor:
        """Sum the contributions of the rows of ``updates`` and finalize (the single-process path)."""
        total = torch.zeros(updates.shape[1], dtype=updates.dtype, device=updates.device)
        total_weight = 0.0
        for update, size in zip(updates, sizes.tolist()):
            vector, weight = self.contribution(update, int(size))
            total += vector
            total_weight += weight
        return self.finalize(total, total_weight, num_clients=num_clients)

    def check_plan(self, sampler: ClientSampler, rounds: int) -> None:
        """Refuse, before any round, a client sampling or round count this strategy cannot account for."""

    def sampling_seed(self) -> int | None:
        """The seed of the client sampling when the privacy guarantee depends on it, from the mechanism's noise
        source; None: the sampler's own seed."""
        return None

    def exhausted(self) -> bool:
        """Whether the privacy budget allows no further round (never, without a mechanism)."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FedAvg(Strategy, name="fedavg"):
    """Federated averaging: the size-weighted mean of the clients' updates."""

    def contribution(self, update: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
        return update * size, float(size)

    def finalize(self, total: torch.Tensor, total_weight: float, *, num_clients: int) -> torch.Tensor:
        return total / total_weight if total_weight > 0 else torch.zeros_like(total)


class FedProx(FedAvg, name="fedprox"):
    """FedAvg with the proximal local objective ``loss + mu / 2 ||w_i - w||^2``."""

    def __init__(self, *, mu: float = 0.01, local_epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
                 server_lr: float = 1.0) -> None:
        super().__init__(local_epochs=local_epochs, batch_size=batch_size, lr=lr, server_lr=server_lr)
        if mu < 0:
            raise ConfigError("strategy.mu", f"must be >= 0, got {mu}", "use e.g. 0.01")
        self.mu = mu

    def local_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                   global_params: torch.Tensor) -> torch.Tensor:
        params = nn.utils.parameters_to_vector(model.parameters())
        return super().local_loss(model, batch, global_params) + self.mu / 2 * (params - global_params).pow(2).sum()


class ClientLevelDP(Strategy, name="client_level_dp"):
    """DP-FedAvg: clip each client's update to ``mechanism.clip_norm``, add noise once, fixed denominator.

    Args:
        strategy: the strategy whose local training the clients run (FedAvg, FedProx).
        mechanism: a user-level :class:`~fedgen.mechanisms.GaussianMechanism` whose ``sample_rate`` is the
            Poisson client sampling rate and ``num_releases`` the number of rounds.
    """

    def __init__(self, *, strategy: Strategy, mechanism: GaussianMechanism) -> None:
        super().__init__(local_epochs=strategy.local_epochs, batch_size=strategy.batch_size, lr=strategy.lr,
                         server_lr=strategy.server_lr)
        if mechanism.ledger.unit != "user":
            raise ConfigError("strategy.mechanism.unit", "client-level DP protects whole clients",
                              "set unit: user on the mechanism")
        self.strategy = strategy
        self.mechanism = mechanism

    def local_loss(self, model, batch, global_params):
        return self.strategy.local_loss(model, batch, global_params)

    def contribution(self, update: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
        return clip_rows(update.unsqueeze(0), self.mechanism.clip_norm)[0], 1.0  # unweighted: each user counts once

    def finalize(self, total: torch.Tensor, total_weight: float, *, num_clients: int) -> torch.Tensor:
        return self.mechanism.release(total) / (self.mechanism.sample_rate * num_clients)

    def check_plan(self, sampler: ClientSampler, rounds: int) -> None:
        """The ledger's sample rate must be the sampler's (a lower one would under-report epsilon), and a
        noise calibrated from the budget must be calibrated for the planned rounds."""
        mechanism = self.mechanism
        if sampler.rate is None:  # a user added to the data displaces another picked one: the sum moves by 2 C
            raise ConfigError("federation.sampler.count", f"a fixed count of {sampler.count} clients a round: adding "
                              "one user can displace another, which moves the clipped sum by twice the clip norm, "
                              "more than the ledger's Gaussian accounts for",
                              "sample clients by Poisson sampling: rate (rate: 1.0 takes every client every round)")
        if mechanism.sample_rate != sampler.rate:
            raise ConfigError("strategy.mechanism.sample_rate",
                              f"is {mechanism.sample_rate:g}, but the client sampler's Poisson rate is "
                              f"{sampler.rate:g}",
                              f"set sample_rate: {sampler.rate:g} on the mechanism")
        if mechanism.calibrates_noise and mechanism.num_releases != rounds:
            raise ConfigError("strategy.mechanism.num_releases",
                              f"the noise would be calibrated for {mechanism.num_releases} rounds, but the "
                              f"federation runs {rounds}", f"set num_releases: {rounds} on the mechanism")

    def sampling_seed(self) -> int:
        """The sampling is part of the guarantee (its amplification): drawn from the mechanism's noise source, so
        that in secure mode it comes from ``os.urandom`` and no saved config tells which clients took part."""
        return self.mechanism.noise.sampling_seed()

    def exhausted(self) -> bool:
        mechanism = self.mechanism
        if mechanism.target_epsilon is None:
            return False
        next_round = SubsampledGaussianEvent(mechanism.noise_multiplier, mechanism.sample_rate)
        return mechanism.ledger.epsilon_with(next_round, mechanism.delta) > mechanism.target_epsilon

    def state_dict(self) -> dict:
        return {"mechanism": self.mechanism.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.mechanism.load_state_dict(state["mechanism"])
