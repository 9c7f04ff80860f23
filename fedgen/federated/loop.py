"""The federated round loop on Lightning Fabric.

Each round the sampler picks clients; each picked client starts from the global parameter vector, trains
locally with the strategy, and sends its update; the strategy combines the updates (through its mechanism,
for client-level DP) and the server steps the global model. Clients are simulated with one model per
device, reused across clients. The loop knows nothing of the model beyond its parameters.

Checkpoints (``checkpoint_dir``) hold the round, the global parameters, the strategy's state (with its
privacy ledger) and the random state, so a resumed federation continues at the same round and ends where
an uninterrupted run with the same seed ends.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fedgen.errors import ConfigError
from fedgen.federated.clients import Client, ClientSampler
from fedgen.federated.strategy import Strategy

log = logging.getLogger(__name__)


class FederatedTrainer:
    """Runs ``rounds`` rounds of federated training.

    Args:
        rounds: number of rounds.
        sampler: which clients take part in each round.
        strategy: local training and aggregation (e.g. FedAvg, or ClientLevelDP around it).
        accelerator: Fabric accelerator (``"cpu"``, ``"gpu"``, ``"auto"``).
        seed: seed of the clients' local data order.
        checkpoint_dir: where to save a checkpoint after every ``checkpoint_every`` rounds (None: never).
        checkpoint_every: rounds between checkpoints.
    """

    def __init__(self, *, rounds: int, sampler: ClientSampler, strategy: Strategy, accelerator: str = "cpu",
                 seed: int = 0, checkpoint_dir: str | None = None, checkpoint_every: int = 1) -> None:
        if rounds < 1:
            raise ConfigError("federation.rounds", f"must be >= 1, got {rounds}", "run at least one round")
        if checkpoint_every < 1:
            raise ConfigError("federation.checkpoint_every", f"must be >= 1, got {checkpoint_every}", "use e.g. 1")
        self.rounds = rounds
        self.sampler = sampler
        self.strategy = strategy
        self.seed = seed
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_every = checkpoint_every
        self.fabric = L.Fabric(accelerator=accelerator, devices=1)
        self.round = 0
        self.history: list[dict] = []

    def fit(self, model: nn.Module, clients: list[Client], dataset: Dataset, *, ckpt_path: str | None = None,
            on_round_end: Callable[[int, nn.Module], dict] | None = None) -> nn.Module:
        """Train ``model`` across ``clients`` (each holding part of ``dataset``); resume from ``ckpt_path``."""
        model = self.fabric.to_device(model)
        device = self.fabric.device
        global_params = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        if ckpt_path is not None:
            global_params = self._load(ckpt_path, device)
        client_data = [c.dataset(dataset) for c in clients]
        sizes = torch.tensor([len(c) for c in clients], dtype=torch.float64)
        while self.round < self.rounds:
            if self.strategy.exhausted():
                log.warning("Privacy budget reached after %d rounds; the federation stops here.", self.round)
                if self.checkpoint_dir is not None:
                    self.save(self.checkpoint_dir / "last.ckpt", global_params)
                break
            picked = self.sampler.sample(len(clients), self.round)
            updates = torch.zeros(len(picked), global_params.numel(), device=device)
            for row, cid in enumerate(picked):
                nn.utils.vector_to_parameters(global_params, model.parameters())
                seed = np.random.SeedSequence([self.seed, self.round, cid]).generate_state(1)[0]
                generator = torch.Generator().manual_seed(int(seed))
                updates[row] = self.strategy.client_update(model, global_params, client_data[cid], generator)
            delta = self.strategy.aggregate(updates, sizes[picked].to(device), num_clients=len(clients))
            global_params = global_params + self.strategy.server_lr * delta.to(global_params.dtype)
            self.round += 1
            nn.utils.vector_to_parameters(global_params, model.parameters())
            record = {"round": self.round, "clients": len(picked)}
            if on_round_end is not None:
                record |= on_round_end(self.round, model)
            self.history.append(record)
            log.info("round %d/%d: %d clients%s", self.round, self.rounds, len(picked),
                     "".join(f", {k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
            if self.checkpoint_dir is not None and self.round % self.checkpoint_every == 0:
                self.save(self.checkpoint_dir / "last.ckpt", global_params)
        nn.utils.vector_to_parameters(global_params, model.parameters())
        return model

    def save(self, path: Path, global_params: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"round": self.round, "global_params": global_params.cpu(), "history": self.history,
                 "strategy": self.strategy.state_dict()}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # never leave a half-written checkpoint in place of a good one

    def _load(self, path: str, device: torch.device) -> torch.Tensor:
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.round = state["round"]
        self.history = state["history"]
        self.strategy.load_state_dict(state["strategy"])
        log.info("Resumed the federation at round %d from %s", self.round, path)
        return state["global_params"].to(device)
