"""The ``fedgen audit`` and ``fedgen attack`` commands: measure privacy empirically and write a run folder.

    fedgen audit --config examples/audit_dp_sgd.yaml
    fedgen attack --config examples/attack_gradient_inversion.yaml
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchvision
from jsonargparse import ActionConfigFile, ArgumentParser

from fedgen.attacks.audit import audit_dp_sgd, check_audit_plan
from fedgen.attacks.gradient_inversion import GradientInversion, client_gradient, dp_sgd_update, lenet_for_inversion
from fedgen.data import VisionDataModule
from fedgen.errors import ConfigError, check_at_least_one
from fedgen.mechanisms import DPSGD, SubsampledGaussianEvent, compute_epsilon
from fedgen.runs import dataset_name, instantiate, parse_args, resolve_run_dir, write_config

log = logging.getLogger("fedgen")


def audit_parser() -> ArgumentParser:
    """The options of ``fedgen audit``."""
    parser = ArgumentParser(prog="fedgen audit", description=audit.__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with the options below.")
    parser.add_argument("--seed_everything", type=int, default=0, help="Seed set before anything is built.")
    parser.add_argument("--mechanism", type=DPSGD, help="The DP-SGD mechanism audited (its noise and clipping).")
    parser.add_argument("--num_canaries", type=int, default=1000, help="Canaries, each included with probability 1/2.")
    parser.add_argument("--guesses", type=int, default=200, help="Guesses: half on the highest, half on the lowest scores.")
    parser.add_argument("--sample_rate", type=float, default=0.5, help="Poisson sampling rate of each step.")
    parser.add_argument("--steps", type=int, default=20, help="DP-SGD steps of the audited run.")
    parser.add_argument("--beta", type=float, default=0.05, help="1 - confidence of the lower bound.")
    parser.add_argument("--run_dir", type=str | None, default=None,
                        help="Run folder (default: runs/audit-dpsgd-<time>).")
    return parser


def audit(args: list[str]) -> dict[str, Any]:
    """``fedgen audit``: audit DP-SGD in one run (Steinke, Nasr, Jagielski, NeurIPS 2023) with white-box
    gradient canaries, and report the empirical lower bound on epsilon beside the ledger's claim.

    Writes ``config.yaml``, ``metrics.json`` (the bound, the guesses, the claim, every canary's score) and
    ``scores.png`` (the scores of the canaries in and out of training) into the run folder.
    """
    parser = audit_parser()
    config = parse_args(parser, args)
    L.seed_everything(config.seed_everything, verbose=False)
    check_audit_plan(num_canaries=config.num_canaries, guesses=config.guesses, sample_rate=config.sample_rate)
    run_dir = resolve_run_dir(config.run_dir, None, "audit-dpsgd")
    config.run_dir = str(run_dir)
    built = instantiate(parser, config)
    write_config(parser, config, run_dir)
    log.info("Auditing %s with %d canaries, %d steps at q = %g", built.mechanism.describe(), config.num_canaries,
             config.steps, config.sample_rate)
    result = audit_dp_sgd(built.mechanism, num_canaries=config.num_canaries, guesses=config.guesses,
                          sample_rate=config.sample_rate, steps=config.steps, beta=config.beta,
                          seed=config.seed_everything)
    _plot_canary_scores(result, run_dir / "scores.png")
    metrics = {k: v for k, v in result.items() if k not in ("scores", "in_training")}
    metrics |= {"audit": "one run, white-box gradient canaries (Steinke et al. 2023, delta = 0 bound)",
                "canaries": {"scores": result["scores"], "in_training": result["in_training"]}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"fedgen: epsilon lower bound {result['epsilon_lower_bound']:.3f} at {1 - config.beta:.0%} confidence "
          f"({result['correct']}/{result['guesses']} guesses correct) against a claimed epsilon "
          f"{result['epsilon_claimed']:.4g} (delta={result['delta']:g}); run folder: {run_dir}")
    return metrics


def _plot_canary_scores(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    scores = torch.tensor(result["scores"])
    included = torch.tensor(result["in_training"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bins = torch.linspace(float(scores.min()), float(scores.max()) + 1e-12, 41).tolist()
    ax.hist(scores[included].tolist(), bins=bins, alpha=0.6, label="in training")
    ax.hist(scores[~included].tolist(), bins=bins, alpha=0.6, label="not in training")
    ax.set_xlabel("canary score")
    ax.set_ylabel("canaries")
    ax.set_title(f"bound {result['epsilon_lower_bound']:.2f}, claimed {result['epsilon_claimed']:.3g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def attack_parser() -> ArgumentParser:
    """The options of ``fedgen attack``."""
    parser = ArgumentParser(prog="fedgen attack", description=attack.__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with the options below.")
    parser.add_argument("--seed_everything", type=int, default=0, help="Seed set before anything is built.")
    parser.add_argument("--attack", type=GradientInversion, help="The attack, e.g. fedgen.attacks.DLG.")
    parser.add_subclass_arguments(VisionDataModule, "data", help="The clients' private data (its training split).")
    parser.add_argument("--examples", type=list[int], default=list(range(8)),
                        help="Indices (training split) of the attacked examples, batch_size per client update.")
    parser.add_argument("--batch_size", type=int, default=1, help="Examples in each attacked update.")
    parser.add_argument("--model_seed", type=int, default=1, help="Seed of the LeNet the client trains.")
    parser.add_argument("--defence", type=Literal["none", "dp_sgd"], default="none",
                        help="What the client sends: its plain gradient, or a DP-SGD update.")
    parser.add_argument("--noise_multiplier", type=float, default=1.0, help="DP-SGD noise (defence: dp_sgd).")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="DP-SGD clipping norm (defence: dp_sgd).")
    parser.add_argument("--delta", type=float, default=1e-5, help="Delta at which a DP-SGD update's epsilon is given.")
    parser.add_argument("--run_dir", type=str | None, default=None,
                        help="Run folder (default: runs/attack-<attack>-<dataset>-<time>).")
    return parser


def attack(args: list[str]) -> dict[str, Any]:
    """``fedgen attack``: gradient inversion against what a client sends. The client holds a DLG-style
    LeNet (the weights the server sent) and a batch of its private examples; it sends the gradient of the
    batch (``defence: none``) or a DP-SGD update (clipped per example, Gaussian noise, ``defence: dp_sgd``).
    The attack reconstructs the batch from that alone; PSNR and SSIM score it against the truth.

    Writes ``config.yaml``, ``reconstructions.png`` (each update's originals above their reconstructions) and
    ``metrics.json`` into the run folder.
    """
    parser = attack_parser()
    config = parse_args(parser, args)
    L.seed_everything(config.seed_everything, verbose=False)
    check_at_least_one("batch_size", config.batch_size, "use 1 for single-example updates")
    if not config.examples or len(config.examples) % config.batch_size:
        raise ConfigError("examples", f"{len(config.examples)} examples do not make whole batches of "
                          f"{config.batch_size}", "give a multiple of batch_size indices")
    if config.defence == "dp_sgd" and (config.noise_multiplier < 0 or not config.max_grad_norm > 0):
        raise ConfigError("noise_multiplier", f"noise_multiplier={config.noise_multiplier}, "
                          f"max_grad_norm={config.max_grad_norm}", "use noise_multiplier >= 0 and max_grad_norm > 0")
    attack_name = config.attack.class_path.rsplit(".", 1)[-1].lower()
    run_dir = resolve_run_dir(config.run_dir, None, f"attack-{attack_name}-{dataset_name(config.data)}")
    config.run_dir = str(run_dir)
    built = instantiate(parser, config)
    data: VisionDataModule = built.data
    data.prepare_data()
    data.setup("fit")
    if max(config.examples) >= len(data.train_set) or min(config.examples) < 0:
        raise ConfigError("examples", f"indices must be in [0, {len(data.train_set)})", "pick training examples")
    write_config(parser, config, run_dir)
    torch.manual_seed(config.model_seed)
    model = lenet_for_inversion(channels=data.image_shape[0], image_size=data.image_shape[1],
                                num_classes=data.num_classes)
    noise = torch.Generator().manual_seed(config.seed_everything)
    originals, reconstructions, updates = [], [], []
    for start in range(0, len(config.examples), config.batch_size):
        batch = [data.train_set[i] for i in config.examples[start:start + config.batch_size]]
        images = torch.stack([x for x, _ in batch])
        labels = torch.tensor([int(y) for _, y in batch])
        if config.defence == "none":
            sent = client_gradient(model, images, labels)
        else:
            sent = dp_sgd_update(model, images, labels, max_grad_norm=config.max_grad_norm,
                                 noise_multiplier=config.noise_multiplier, generator=noise)
        result = built.attack.attack(model, sent, input_shape=data.image_shape, num_images=len(images))
        score = result.score(images)
        updates.append(score | {"examples": config.examples[start:start + config.batch_size],
                                "labels": labels.tolist(), "recovered_labels": result.labels.tolist()})
        originals.append(images)
        reconstructions.append(result.images.cpu())
        log.info("update %d: PSNR %.2f dB, SSIM %.3f", len(updates), score["psnr"], score["ssim"])
    _save_pairs(originals, reconstructions, run_dir / "reconstructions.png")
    metrics = {
        "attack": type(built.attack).__name__,
        "defence": config.defence,
        "sent": "gradient of the batch" if config.defence == "none" else
                "DP-SGD update: per-example clipping, Gaussian noise, divided by the batch size",
        "noise_multiplier": config.noise_multiplier if config.defence == "dp_sgd" else None,
        "max_grad_norm": config.max_grad_norm if config.defence == "dp_sgd" else None,
        "epsilon_of_one_update": _one_step_epsilon(config) if config.defence == "dp_sgd" else None,
        "delta": config.delta if config.defence == "dp_sgd" else None,
        "mean_psnr": sum(u["psnr"] for u in updates) / len(updates),
        "mean_ssim": sum(u["ssim"] for u in updates) / len(updates),
        "label_accuracy": sum(a == b for u in updates for a, b in zip(u["labels"], u["recovered_labels"]))
        / len(config.examples),
        "batch_size": config.batch_size,
        "updates": updates,
        "dataset": getattr(data, "dataset", type(data).__name__),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"fedgen: {metrics['attack']} against {config.defence} updates: mean PSNR {metrics['mean_psnr']:.2f} dB, "
          f"SSIM {metrics['mean_ssim']:.3f}, labels {metrics['label_accuracy']:.0%} right; run folder: {run_dir}")
    return metrics


def _one_step_epsilon(config: Any) -> float | None:
    """Epsilon of one DP-SGD update of a known batch (no subsampling): the Gaussian mechanism of
    sensitivity C and noise sigma C, at ``delta``; None without noise (no guarantee at all)."""
    if config.noise_multiplier == 0:
        return None
    return compute_epsilon([SubsampledGaussianEvent(config.noise_multiplier, 1.0)], config.delta)


def _save_pairs(originals: list[torch.Tensor], reconstructions: list[torch.Tensor], path: Path) -> None:
    """One column per example: the original above its reconstruction."""
    top, bottom = torch.cat(originals), torch.cat(reconstructions).clamp(0, 1)
    torchvision.utils.save_image(torch.cat([top, bottom]), path, nrow=len(top), padding=2, pad_value=1.0)
