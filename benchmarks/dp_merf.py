"""DP-Merf benchmark: train-on-synthetic, test-on-real accuracy and wall time.

For each dataset and epsilon, runs the whole ``fedgen fit`` pipeline (DP-Merf generator, 60,000 synthetic
examples, ConvNet selected on synthetic validation data, tested once on the real test set) and prints a
markdown table. Usage (data root from FEDGEN_DATA_ROOT):

    python benchmarks/dp_merf.py --datasets MNIST FashionMNIST --epsilons 1 10 --out runs/bench
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import time
from pathlib import Path

import torch

from fedgen.cli import fit

# Per-dataset DP-Merf settings (kernel length scale on pixels in [0, 1], number of random features).
# They were chosen by developers from earlier runs on these benchmarks (docs/benchmarks.md lists every
# configuration tried); no run selects anything on its own test set.
SETTINGS = {
    "MNIST": {"length_scale": 7.0, "num_features": 10000},
    "FashionMNIST": {"length_scale": 10.0, "num_features": 40000},
}
DEFAULT_SETTINGS = {"length_scale": 10.0, "num_features": 10000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["MNIST", "FashionMNIST"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 10.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--num_synthetic", type=int, default=60000)
    parser.add_argument("--classifier_epochs", type=int, default=20)
    parser.add_argument("--out", default="runs/bench-dp-merf")
    parser.add_argument("--extra", default="", help="extra fedgen fit arguments in one string, e.g. '--trainer.max_epochs=5'")
    args = parser.parse_args()
    rows = []
    for dataset, eps, seed in itertools.product(args.datasets, args.epsilons, args.seeds):
        run_dir = Path(args.out) / f"{dataset.lower()}-eps{eps:g}-seed{seed}-{int(time.time())}"
        start = time.perf_counter()
        metrics = fit([
            "--config", "examples/mnist_dp_merf.yaml",
            "--data.class_path=fedgen.data.VisionDataModule", f"--data.init_args.dataset={dataset}",
            f"--model.init_args.mechanism.init_args.target_epsilon={eps}",
            *(f"--model.init_args.{key}={value}" for key, value in SETTINGS.get(dataset, DEFAULT_SETTINGS).items()),
            f"--num_synthetic={args.num_synthetic}", f"--evaluation.epochs={args.classifier_epochs}",
            "--evaluation.classifier=convnet", "--evaluation.progress_bar=false",
            "--trainer.enable_progress_bar=false", f"--seed_everything={seed}", f"--run_dir={run_dir}",
            *shlex.split(args.extra),
        ])
        wall = time.perf_counter() - start
        rows.append((dataset, eps, seed, metrics["epsilon"], metrics["test_accuracy"], metrics["generator_seconds"],
                     wall))
        print(json.dumps({"dataset": dataset, "target_epsilon": eps, "seed": seed, "wall_seconds": wall,
                          **{k: v for k, v in metrics.items() if k != "privacy_ledger"}}), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\ndevice: {device}; torch {torch.__version__}\n")
    print("| dataset | target eps | seed | eps spent | ConvNet test acc | generator s | total wall s |")
    print("|---|---|---|---|---|---|---|")
    for dataset, eps, seed, spent, acc, gen_s, wall in rows:
        print(f"| {dataset} | {eps:g} | {seed} | {spent:.3f} | {100 * acc:.1f}% | {gen_s:.1f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
