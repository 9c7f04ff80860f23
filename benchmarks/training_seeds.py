"""Spread over training seeds: one ``fedgen fit`` configuration trained once per seed, the runs side by side.

A run's test accuracy mixes three draws of randomness: the training's (initial weights, Poisson batches, the noise
of DP-SGD and of any warm-up release), the synthetic draw's, and the classifiers' (``evaluation.repeats`` averages
the last). Settings tuned on one training seed can look better on it than on the next, so a number meant to stand
for a configuration needs several trainings. This script runs the whole pipeline of ``fedgen fit`` once per
``--seed_everything``, or reads finished run folders, checks that their resolved configurations differ in the seed
and the run folder alone and that no two share a seed, and prints a markdown table: each run's epsilon and test
accuracy (the mean of its classifiers, then each classifier's), and over the runs the mean, the standard
deviation (and the mean's standard error), the smallest and the largest.
Usage (data root from FEDGEN_DATA_ROOT):

    python benchmarks/training_seeds.py --config examples/mnist_dp_diffusion_eps1.yaml --seeds 0 1 2 --out runs/seeds
    python benchmarks/training_seeds.py --runs runs/e1s runs/e1s1      # finished runs, side by side: no training
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from fedgen.errors import ConfigError
from fedgen.runs import check_fit_run, resolve_run_dir

#: resolved-config keys that may differ between runs of one configuration: the seed, where the run was written
#: (``trainer.default_root_dir`` follows the run folder), and progress bars
PER_RUN_KEYS = ("seed_everything", "run_dir", "trainer.default_root_dir", "trainer.enable_progress_bar",
                "evaluation.progress_bar")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; lists and other values are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return flat


def load_run(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A finished run's resolved configuration (flattened) and its ``metrics.json``."""
    check_fit_run(str(folder), ("config.yaml", "metrics.json"), field="runs")
    config = flatten(yaml.safe_load((folder / "config.yaml").read_text()))
    if not isinstance(config.get("seed_everything"), int) or isinstance(config["seed_everything"], bool):
        raise ConfigError("runs", f"{folder} ran without a fixed integer seed (seed_everything: "
                          f"{config.get('seed_everything')!r})", "train with --seed_everything=N")
    if config.get("ckpt_path") is not None:
        raise ConfigError("runs", f"{folder} started from the checkpoint {config['ckpt_path']}: its generator was "
                          "trained by that checkpoint's run, not under this run's seed",
                          "give runs that trained their generator from the start")
    return config, json.loads((folder / "metrics.json").read_text())


def check_one_configuration(runs: dict[Path, tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Refuse runs that are not trainings of one configuration under different seeds."""
    (first, (reference, _)), *others = runs.items()
    folder_of_seed = {reference["seed_everything"]: first}
    for folder, (config, _) in others:
        differing = sorted(key for key in reference.keys() | config.keys()
                           if key not in PER_RUN_KEYS and reference.get(key) != config.get(key))
        if differing:
            raise ConfigError("runs", f"{first} and {folder} differ in {', '.join(differing)}, not in the seed alone",
                              "compare runs of one configuration")
        seed = config["seed_everything"]
        if seed in folder_of_seed:
            raise ConfigError("runs", f"{folder_of_seed[seed]} and {folder} both trained with seed {seed}: they are "
                              "not independent trainings", "train again with another --seed_everything")
        folder_of_seed[seed] = folder


def table(folders: list[Path]) -> str:
    """The markdown table of the runs in ``folders`` and their mean, standard deviation, smallest and largest test
    accuracy."""
    if not folders:
        raise ConfigError("runs", "no run folders given", "give at least one")
    times_given = Counter(f.resolve() for f in folders)
    repeated = {str(f) for f in folders if times_given[f.resolve()] > 1}
    if repeated:
        raise ConfigError("runs", f"{', '.join(sorted(repeated))} given more than once", "give each run once")
    runs = {folder: load_run(folder) for folder in folders}
    check_one_configuration(runs)
    lines = ["| run | seed | epsilon | test accuracy | each classifier |", "|---|---|---|---|---|"]
    accuracies = []
    for folder, (config, metrics) in runs.items():
        each = ", ".join(f"{100 * c['test_accuracy']:.2f}" for c in metrics.get("per_classifier", []))
        accuracies.append(metrics["test_accuracy"])
        lines.append(f"| {folder} | {config['seed_everything']} | {metrics['epsilon']:.4f} | "
                     f"{100 * metrics['test_accuracy']:.2f}% | {each} |")
    seeds = f"{len(accuracies)} training seed{'s' if len(accuracies) > 1 else ''}"
    summary = f"\nover {seeds}: mean {100 * statistics.fmean(accuracies):.2f}%"
    if len(accuracies) > 1:  # the sample standard deviation, and the mean's standard error sd / sqrt(n)
        sd = 100 * statistics.stdev(accuracies)
        summary += f", standard deviation {sd:.2f} points (standard error {sd / len(accuracies) ** 0.5:.2f})"
    lines.append(f"{summary}, smallest {100 * min(accuracies):.2f}%, largest {100 * max(accuracies):.2f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a fedgen fit config to train once per seed")
    source.add_argument("--runs", nargs="+", type=Path, help="finished fedgen fit run folders")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/training-seeds"))
    parser.add_argument("--extra", default="", help="further fedgen fit arguments in one string")
    args = parser.parse_args(argv)
    folders = args.runs
    if args.config is not None:
        if len(set(args.seeds)) != len(args.seeds):
            raise ConfigError("seeds", f"{args.seeds} repeats a seed", "give each training seed once")
        folders = [args.out / f"seed{seed}" for seed in args.seeds]
        finished = [str(f) for f in folders if (f / "metrics.json").exists()]
        if finished:  # refused before the first training, not after it
            raise ConfigError("out", f"{', '.join(finished)} already hold finished runs",
                              "give a new --out, or summarize them with --runs")
        for folder in folders:  # every folder fit would refuse (an unfinished run's, a file's), also before any work
            try:
                resolve_run_dir(str(folder), None, "fit")
            except ConfigError as err:
                raise ConfigError("out", err.problem, "give a new --out") from err
        from fedgen.cli import fit  # torch and Lightning load only once the folders pass

        for seed, folder in zip(args.seeds, folders, strict=True):
            fit(["--config", args.config, *shlex.split(args.extra), f"--seed_everything={seed}",
                 f"--run_dir={folder}"])
    report = table(folders)
    print(report)
    return report


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        raise SystemExit(f"training_seeds.py: error: {err}") from None
