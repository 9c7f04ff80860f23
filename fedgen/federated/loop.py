"""The federated round loop on Lightning Fabric.

Each round the sampler picks clients; each picked client starts from the global parameter vector, trains
locally with the strategy, and adds its contribution to the round's sum; the strategy turns the sum into
an update (through its mechanism, for client-level DP) and the server steps the global model. Clients are
simulated with one model per device, reused across clients. With ``devices=N`` the picked clients are
spread over N Fabric processes (client ``k`` of the round on process ``k mod N``) and the sums meet in an
all-reduce; the server step runs on process 0 and is broadcast, so every process holds the same model.
The loop knows nothing of the model beyond its parameters.

Checkpoints (``checkpoint_dir``) hold the round, the global parameters, the strategy's state (with its
privacy ledger) and the random state, so a resumed federation continues at the same round and ends where
an uninterrupted run with the same seed ends.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedgen.errors import ConfigError, check_accelerator, check_at_least_one, load_checkpoint
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
        devices: number of Fabric processes the clients are spread over (``ddp_spawn`` when > 1).
        seed: seed of the clients' local data order.
        checkpoint_dir: where to save a checkpoint after every ``checkpoint_every`` rounds (None: never).
        checkpoint_every: rounds between checkpoints.
        capture: ``[round, client]`` pairs (rounds counted from 0) whose traffic is kept in ``captured``, for
            attacks: what that client received (``global_params``) and sent (``update`` = w_i - w, and
            ``contribution``, the vector added to the round's sum). One process only.
    """

    def __init__(self, *, rounds: int, sampler: ClientSampler, strategy: Strategy, accelerator: str = "cpu",
                 devices: int = 1, seed: int = 0, checkpoint_dir: str | None = None,
                 checkpoint_every: int = 1, capture: list[tuple[int, int]] | None = None) -> None:
        check_at_least_one("federation.rounds", rounds, "run at least one round")
        check_at_least_one("federation.devices", devices, "use e.g. 1")
        check_at_least_one("federation.checkpoint_every", checkpoint_every, "use e.g. 1")
        check_accelerator("federation.accelerator", accelerator)
        strategy.check_plan(sampler, rounds)
        if capture and devices > 1:
            raise ConfigError("federation.capture", "capturing a client's traffic needs devices=1",
                              "set devices: 1 for an attack run")
        self.rounds = rounds
        self.sampler = sampler
        self.strategy = strategy
        self.accelerator = accelerator
        self.devices = devices
        self.seed = seed
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_every = checkpoint_every
        self.round = 0
        self.history: list[dict] = []
        self.capture = {(int(r), int(c)) for r, c in (capture or [])}
        self.captured: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def fit(self, model: nn.Module, clients: list[Client], dataset: Dataset, *,
            ckpt_path: str | None = None) -> nn.Module:
        """Train ``model`` across ``clients`` (each holding part of ``dataset``); resume from ``ckpt_path``."""
        resume_params = None
        if ckpt_path is not None:
            state = self.read_checkpoint(ckpt_path, model)
            self._restore(state)
            resume_params = state["global_params"]
            log.info("Resuming the federation at round %d from %s", self.round, ckpt_path)
        if self.devices == 1:
            fabric = L.Fabric(accelerator=self.accelerator, devices=1)
            model, state = _federate(fabric, self, model, clients, dataset, resume_params)
        else:
            fabric = L.Fabric(accelerator=self.accelerator, devices=self.devices, strategy="ddp_spawn")
            # Process 0 writes its result to a file: Fabric returns values through a pipe that is only read
            # after the workers exit, so a large return value would block them.
            with tempfile.TemporaryDirectory() as tmp:
                result = Path(tmp) / "result.pt"
                fabric.launch(_federate, self, model, clients, dataset, resume_params, result)
                weights, state = torch.load(result, weights_only=False)
            model.load_state_dict(weights)
        self._restore(state)
        return model

    @staticmethod
    def read_checkpoint(ckpt_path: str, model: nn.Module) -> dict:
        """The federation checkpoint at ``ckpt_path``, after checking that it is one (round, strategy, global
        parameters) for ``model``'s parameter count; a ``ConfigError`` on ``ckpt_path`` otherwise."""
        fix = "give a federation checkpoint of this run (<run>/checkpoints/last.ckpt), or start without --ckpt_path"
        path = Path(ckpt_path)
        state = load_checkpoint("ckpt_path", path, fix)
        if not isinstance(state, dict) or not {"round", "history", "strategy", "global_params"} <= set(state):
            raise ConfigError("ckpt_path", f"{path} is not a federation checkpoint (a fedgen fit checkpoint?)", fix)
        size = sum(p.numel() for p in model.parameters())
        if state["global_params"].numel() != size:
            raise ConfigError("ckpt_path", f"{path} holds {state['global_params'].numel()} parameters, the model "
                              f"{size}", "resume with the classifier settings the run was started with")
        return state

    def state_dict(self, global_params: torch.Tensor | None = None) -> dict:
        state = {"round": self.round, "history": self.history, "strategy": self.strategy.state_dict()}
        if global_params is not None:
            state["global_params"] = global_params.detach().cpu()
        return state

    def _restore(self, state: dict) -> None:
        self.round = state["round"]
        self.history = state["history"]
        self.strategy.load_state_dict(state["strategy"])

    def save(self, path: Path, global_params: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(global_params), tmp)
        tmp.replace(path)  # never leave a half-written checkpoint in place of a good one


def _load_params(model: nn.Module, params: torch.Tensor) -> None:
    """Copy a flat vector into the model (``vector_to_parameters`` alone would alias the vector's memory, and
    local training would then overwrite the global parameters in place)."""
    nn.utils.vector_to_parameters(params.detach().clone(), model.parameters())


def _federate(fabric: L.Fabric, trainer: FederatedTrainer, model: nn.Module, clients: list[Client],
              dataset: Dataset, resume_params: torch.Tensor | None,
              result_path: Path | None = None) -> tuple[nn.Module, dict] | None:
    """The round loop as run by every Fabric process. Returns the model and the trainer's final state, or,
    with several processes, has process 0 save them to ``result_path``."""
    rank, world = fabric.global_rank, fabric.world_size
    strategy = trainer.strategy
    model = fabric.to_device(model)
    device = fabric.device
    global_params = resume_params if resume_params is not None else nn.utils.parameters_to_vector(model.parameters())
    global_params = global_params.detach().clone().to(device)
    if isinstance(dataset, TensorDataset):  # in-memory data moves to the device once, not batch by batch
        dataset = TensorDataset(*(t.to(device) for t in dataset.tensors))
    client_data = [c.dataset(dataset) for c in clients]
    sampling_seed = strategy.sampling_seed()
    if sampling_seed is not None and world > 1:  # every process samples the same clients: process 0's draw
        sampling_seed = fabric.broadcast(sampling_seed, src=0)
    while trainer.round < trainer.rounds:
        if strategy.exhausted():  # the ledgers of all processes hold the same events
            log.warning("Privacy budget reached after %d rounds; the federation stops here.", trainer.round)
            break
        picked = trainer.sampler.sample(len(clients), trainer.round, seed=sampling_seed)
        total = torch.zeros_like(global_params)
        total_weight = torch.zeros((), dtype=torch.float64, device=device)
        for cid in picked[rank::world]:
            _load_params(model, global_params)
            seed = np.random.SeedSequence([trainer.seed, trainer.round, cid]).generate_state(1)[0]
            update = strategy.client_update(model, global_params, client_data[cid],
                                            torch.Generator().manual_seed(int(seed)))
            vector, weight = strategy.contribution(update, len(clients[cid]))
            if (trainer.round, cid) in trainer.capture:
                trainer.captured[(trainer.round, cid)] = {
                    "global_params": global_params.detach().cpu().clone(), "update": update.detach().cpu().clone(),
                    "contribution": vector.detach().cpu().clone()}
            total += vector
            total_weight += weight
        if world > 1:
            total = fabric.all_reduce(total, reduce_op="sum")
            total_weight = fabric.all_reduce(total_weight, reduce_op="sum")
        delta = strategy.finalize(total, float(total_weight), num_clients=len(clients))
        global_params = global_params + strategy.server_lr * delta.to(global_params.dtype)
        if world > 1:
            global_params = fabric.broadcast(global_params, src=0)  # process 0's noise is the one applied
        trainer.round += 1
        trainer.history.append({"round": trainer.round, "clients": len(picked)})
        log.info("round %d/%d: %d clients", trainer.round, trainer.rounds, len(picked))
        if trainer.checkpoint_dir is not None and trainer.round % trainer.checkpoint_every == 0 and rank == 0:
            trainer.save(trainer.checkpoint_dir / "last.ckpt", global_params)
    if trainer.checkpoint_dir is not None and rank == 0:
        trainer.save(trainer.checkpoint_dir / "last.ckpt", global_params)
    _load_params(model, global_params)
    if world == 1:
        return model, trainer.state_dict(global_params)
    if rank == 0:
        torch.save(({k: v.cpu() for k, v in model.state_dict().items()}, trainer.state_dict(global_params)),
                   result_path)
    # Leave together and close the process group: a worker that exits while gloo's threads still run
    # aborts ("terminate called without an active exception").
    fabric.barrier()
    torch.distributed.destroy_process_group()
    return None
