"""The ``fedgen federate`` command: a classifier trained directly across simulated clients (FedAvg, FedProx,
DP-FedAvg), the baseline the generative pipeline is compared with.

    fedgen federate --config examples/federated_mnist_dp_fedavg.yaml
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from fedgen.data import IIDPartitioner, Partitioner, VisionDataModule
from fedgen.errors import ConfigError, check_at_least_one
from fedgen.evaluation import classifiers, evaluate_accuracy
from fedgen.federated import FederatedTrainer, make_clients
from fedgen.runs import check_seed, dataset_name, instantiate, parse_args, resolve_run_dir, write_config

log = logging.getLogger("fedgen")


def federate_parser() -> ArgumentParser:
    """The options of ``fedgen federate``."""
    parser = ArgumentParser(prog="fedgen federate", description=federate.__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with the options below.")
    parser.add_argument("--seed_everything", type=int, default=0, help="Seed set before anything is built.")
    parser.add_subclass_arguments(VisionDataModule, "data", help="The private dataset (split among the clients).")
    parser.add_argument("--classifier", type=Literal["convnet", "mlp"], default="convnet",
                        help="The network the clients train together.")
    parser.add_argument("--classifier_args", type=dict[str, int] | None, default=None,
                        help="Extra arguments of the network, e.g. {width: 32, depth: 3} for the ConvNet.")
    parser.add_argument("--num_clients", type=int, default=10, help="Number of clients.")
    parser.add_argument("--partitioner", type=Partitioner | None, default=None,
                        help="How the training set is split among the clients (default: IID).")
    parser.add_class_arguments(FederatedTrainer, "federation")
    parser.add_argument("--run_dir", type=str | None, default=None,
                        help="Run folder (default: runs/federated-<classifier>-<dataset>-<time>).")
    parser.add_argument("--ckpt_path", type=str | None, default=None,
                        help="Resume the federation from this checkpoint (its round, model, ledger).")
    return parser


def federate(args: list[str]) -> dict[str, Any]:
    """``fedgen federate``: train a classifier directly across the clients (FedAvg, FedProx, or DP-FedAvg with
    ``ClientLevelDP``), then test the global model once on the real test set.

    This is the baseline the generative pipeline is compared with: clients send model updates every round
    instead of one private release. Writes ``config.yaml``, ``checkpoints/last.ckpt`` (round, model,
    strategy state with the ledger), ``model.pt`` and ``metrics.json`` into the run folder.
    """
    parser = federate_parser()
    config = parse_args(parser, args)
    check_seed(config.seed_everything)
    L.seed_everything(config.seed_everything, verbose=False)
    name = f"federated-{config.classifier}-{dataset_name(config.data)}"
    run_dir = resolve_run_dir(config.run_dir, config.ckpt_path, name)
    config.run_dir = str(run_dir)
    if config.federation.checkpoint_dir is None:
        config.federation.checkpoint_dir = str(run_dir / "checkpoints")
    built = instantiate(parser, config)
    data: VisionDataModule = built.data
    trainer: FederatedTrainer = built.federation
    check_at_least_one("num_clients", config.num_clients, "use e.g. 10")

    data.prepare_data()
    data.setup("fit")
    partitioner = built.partitioner or IIDPartitioner(seed=0)
    clients = make_clients(data.train_set, partitioner, config.num_clients)
    mechanism = trainer.strategy.mechanism
    if mechanism is not None:
        mechanism.check_dataset_size(len(clients) if mechanism.ledger.unit == "user" else len(data.train_set))
    try:
        net = classifiers.get(config.classifier)(image_shape=data.image_shape, num_classes=data.num_classes,
                                                 **(config.classifier_args or {}))
    except (TypeError, ValueError, RuntimeError) as err:  # unknown arguments, or values no layer can take
        raise ConfigError("classifier_args", str(err), "give only arguments the classifier takes, as positive "
                          "integers (e.g. {width: 32, depth: 2})") from err
    if config.ckpt_path is not None:  # its checks, and the strategy's own (noise, budget), before anything is written
        trainer.strategy.load_state_dict(trainer.read_checkpoint(config.ckpt_path, net)["strategy"])
    write_config(parser, config, run_dir)
    if mechanism is not None:
        log.info("Privacy: %s (add/remove-one-%s neighbouring) over %d clients",
                 mechanism.describe(), mechanism.ledger.unit, len(clients))
    else:
        log.info("No differential privacy: %s sends raw model updates", type(trainer.strategy).__name__)

    start = time.perf_counter()
    net = trainer.fit(net, clients, data.train_set, ckpt_path=config.ckpt_path)
    seconds = time.perf_counter() - start
    accuracy = evaluate_accuracy(net, data.test_set, num_classes=data.num_classes)
    epsilon = mechanism.epsilon() if mechanism is not None else None
    torch.save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()},
                "classifier": config.classifier, "strategy": trainer.strategy.state_dict()}, run_dir / "model.pt")
    metrics = {
        "epsilon": epsilon,
        "delta": mechanism.delta if mechanism is not None else None,
        "neighbouring": f"add/remove one {mechanism.ledger.unit}" if mechanism is not None else None,
        "privacy_ledger": mechanism.ledger.state_dict() if mechanism is not None else None,
        "noise": mechanism.noise.mode if mechanism is not None else None,
        "test_accuracy": accuracy,
        "classifier": config.classifier,
        "strategy": type(trainer.strategy).__name__,
        "rounds": trainer.round,
        "rounds_planned": trainer.rounds,
        "num_clients": len(clients),
        "client_sizes": [len(c) for c in clients],
        "partitioner": repr(partitioner),
        "dataset": getattr(data, "dataset", type(data).__name__),
        "num_private": len(data.train_set),
        "seconds": seconds,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    privacy = (f"epsilon={epsilon:.4f} delta={mechanism.delta:g} ({metrics['neighbouring']})"
               if mechanism is not None else "no differential privacy")
    print(f"fedgen: {privacy}, test_accuracy={accuracy:.4f} ({config.classifier} after {trainer.round} rounds "
          f"over {len(clients)} clients); run folder: {run_dir}")
    return metrics
