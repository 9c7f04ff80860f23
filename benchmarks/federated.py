"""Federated benchmark: the generative pipeline vs the DP-FedAvg baseline at the same user-level epsilon.

For each dataset, Dirichlet label skew ``alpha`` and epsilon, two runs on the same clients (the training
set split among ``--num_clients`` clients by ``DirichletPartitioner(alpha)``):

- **pipeline** (``fedgen fit``, examples/federated_mnist_dp_merf.yaml): each client's DP-Merf embedding
  sum is clipped to ``--client_clip_norm``, the sums are added with secure aggregation (SecAgg+ k-regular
  graph), Gaussian noise is added once; the server trains the generator, synthesizes 60,000 examples and
  trains a ConvNet on them alone (selected on synthetic validation data).
- **baseline** (``fedgen federate``, examples/federated_mnist_dp_fedavg.yaml): DP-FedAvg trains a ConvNet
  directly on the clients, with Poisson client sampling, per-client update clipping and noise every round.

Both spend the same (epsilon, delta) under add/remove-one-*user* neighbouring, and both are tested once on
the real test set. Runs go to ``--jobs`` worker processes (they share one GPU). Usage:

    python benchmarks/federated.py --datasets MNIST FashionMNIST --alphas 0.1 0.5 100 --epsilons 1 10 --jobs 6
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_merf import DEFAULT_SETTINGS, SETTINGS  # noqa: E402  (the central DP-Merf settings, unchanged)


def pipeline_args(dataset: str, alpha: float, eps: float, args: argparse.Namespace, run_dir: Path) -> list[str]:
    settings = SETTINGS.get(dataset, DEFAULT_SETTINGS)
    return [
        "--config", "examples/federated_mnist_dp_merf.yaml",
        "--data.class_path=fedgen.data.VisionDataModule", f"--data.init_args.dataset={dataset}",
        f"--model.init_args.mechanism.init_args.target_epsilon={eps}",
        "--model.init_args.mechanism.init_args.unit=user",
        *(f"--model.init_args.{key}={value}" for key, value in settings.items()),
        f"--federation.init_args.num_clients={args.num_clients}",
        f"--federation.init_args.partitioner.init_args.alpha={alpha}",
        "--federation.init_args.partitioner.init_args.min_size=0",
        f"--federation.init_args.client_clip_norm={args.client_clip_norm}",
        "--federation.init_args.graph=k_regular",
        f"--num_synthetic={args.num_synthetic}", f"--evaluation.epochs={args.classifier_epochs}",
        "--evaluation.classifier=convnet", "--evaluation.progress_bar=false",
        "--trainer.enable_progress_bar=false", f"--seed_everything={args.seed}", f"--run_dir={run_dir}",
        *shlex.split(args.pipeline_extra),
    ]


def baseline_args(dataset: str, alpha: float, eps: float, args: argparse.Namespace, run_dir: Path) -> list[str]:
    return [
        "--config", "examples/federated_mnist_dp_fedavg.yaml",
        "--data.class_path=fedgen.data.VisionDataModule", f"--data.init_args.dataset={dataset}",
        f"--num_clients={args.num_clients}", f"--partitioner.init_args.alpha={alpha}",
        "--partitioner.init_args.min_size=0",
        f"--federation.strategy.init_args.mechanism.init_args.target_epsilon={eps}",
        f"--seed_everything={args.seed}", f"--run_dir={run_dir}", *shlex.split(args.baseline_extra),
    ]


def run_one(method: str, argv: list[str]) -> dict:
    """One run in a worker process: ``fedgen fit`` (pipeline) or ``fedgen federate`` (baseline)."""
    from fedgen.cli import _configure_logging, federate, fit

    _configure_logging()
    start = time.perf_counter()
    metrics = (fit if method == "pipeline" else federate)(argv)
    metrics.pop("privacy_ledger", None)
    metrics.pop("client_sizes", None)
    if isinstance(metrics.get("federation"), dict):
        metrics["federation"].pop("client_sizes", None)
    return {"method": method, "wall_seconds": time.perf_counter() - start, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["MNIST", "FashionMNIST"])
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.5, 100.0])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 10.0])
    parser.add_argument("--methods", nargs="+", default=["pipeline", "baseline"], choices=["pipeline", "baseline"])
    parser.add_argument("--num_clients", type=int, default=1000)
    parser.add_argument("--client_clip_norm", type=float, default=20.0,
                        help="bound on one client's embedding sum (the pipeline's user-level sensitivity)")
    parser.add_argument("--num_synthetic", type=int, default=60000)
    parser.add_argument("--classifier_epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--out", default="runs/bench-federated")
    parser.add_argument("--pipeline_extra", default="", help="extra fedgen fit arguments in one string")
    parser.add_argument("--baseline_extra", default="", help="extra fedgen federate arguments in one string")
    args = parser.parse_args()
    stamp = int(time.time())
    jobs = []
    for dataset, alpha, eps, method in itertools.product(args.datasets, args.alphas, args.epsilons, args.methods):
        run_dir = Path(args.out) / f"{method}-{dataset.lower()}-a{alpha:g}-eps{eps:g}-seed{args.seed}-{stamp}"
        build = pipeline_args if method == "pipeline" else baseline_args
        jobs.append(((dataset, alpha, eps, method), build(dataset, alpha, eps, args, run_dir)))
    results = {}
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        futures = {pool.submit(run_one, key[3], argv): key for key, argv in jobs}
        for future in as_completed(futures):
            key = futures[future]
            results[key] = future.result()
            print(json.dumps({"dataset": key[0], "alpha": key[1], "target_epsilon": key[2], **results[key]}),
                  flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\ndevice: {device}; torch {torch.__version__}; {args.num_clients} clients; user-level epsilon, "
          f"delta from the example configs\n")
    print("| dataset | alpha | epsilon | pipeline (DP-Merf, synthetic) | DP-FedAvg ConvNet | pipeline s | baseline s |")
    print("|---|---|---|---|---|---|---|")
    for dataset, alpha, eps in itertools.product(args.datasets, args.alphas, args.epsilons):
        cells, secs = [], []
        for method in ("pipeline", "baseline"):
            r = results.get((dataset, alpha, eps, method))
            cells.append(f"{100 * r['test_accuracy']:.1f}% (eps {r['epsilon']:.3f})" if r else "-")
            secs.append(f"{r['wall_seconds']:.0f}" if r else "-")
        print(f"| {dataset} | {alpha:g} | {eps:g} | {cells[0]} | {cells[1]} | {secs[0]} | {secs[1]} |")


if __name__ == "__main__":
    main()
