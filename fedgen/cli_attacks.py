"""The ``fedgen audit``, ``fedgen attack`` and ``fedgen membership`` commands: measure privacy empirically and write a run folder.

    fedgen audit --config examples/audit_dp_sgd.yaml
    fedgen attack --config examples/attack_gradient_inversion.yaml
    fedgen membership --run runs/<a fedgen fit run>
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

from fedgen.attacks.audit import audit_dp_sgd, check_audit_delta, check_audit_plan
from fedgen.attacks.membership import diffusion_loss_scores, evaluate_membership, gan_leaks_scores
from fedgen.attacks.gradient_inversion import (
    GradientInversion,
    InversionResult,
    client_gradient,
    dp_sgd_update,
    lenet_for_inversion,
)
from fedgen.cli_sample import load_fit_run
from fedgen.data import VisionDataModule
from fedgen.errors import ConfigError, check_at_least_one
from fedgen.generators import DPMerf
from fedgen.mechanisms import DPSGD, GaussianMechanism, SecureAggregator, SubsampledGaussianEvent, compute_epsilon
from fedgen.runs import check_fit_run, check_seed, dataset_name, instantiate, parse_args, resolve_run_dir, write_config

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
    check_seed(config.seed_everything)
    L.seed_everything(config.seed_everything, verbose=False)
    check_audit_plan(num_canaries=config.num_canaries, guesses=config.guesses, sample_rate=config.sample_rate,
                     steps=config.steps, beta=config.beta)
    built = instantiate(parser, config)
    check_audit_delta(built.mechanism, num_canaries=config.num_canaries, seed=config.seed_everything)
    run_dir = resolve_run_dir(config.run_dir, None, "audit-dpsgd")
    config.run_dir = str(run_dir)
    write_config(parser, config, run_dir)
    log.info("Auditing %s with %d canaries, %d steps at q = %g", built.mechanism.describe(), config.num_canaries,
             config.steps, config.sample_rate)
    result = audit_dp_sgd(built.mechanism, num_canaries=config.num_canaries, guesses=config.guesses,
                          sample_rate=config.sample_rate, steps=config.steps, beta=config.beta,
                          seed=config.seed_everything)
    _plot_canary_scores(result, run_dir / "scores.png")
    metrics = {k: v for k, v in result.items() if k not in ("scores", "in_training")}
    metrics |= {"audit": "one run, white-box gradient canaries (Steinke et al. 2023, bound at the mechanism's delta)",
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
    parser.add_argument("--known_labels", type=bool, default=False,
                        help="Give the attack each batch's true labels (Geiping et al.'s setting for batches); "
                             "otherwise one image's label is recovered from what was sent and a batch's are "
                             "optimized (DLG). Inverting Gradients needs them for batches of several images.")
    parser.add_argument("--model_seed", type=int, default=1, help="Seed of the LeNet the client trains.")
    parser.add_argument("--defence", type=Literal["none", "dp_sgd", "dp_merf", "secure_aggregation"], default="none",
                        help="What the attacker sees: the plain gradient; a DP-SGD update; the pipeline's DP-Merf "
                             "release of the batch (its embedding plus Gaussian noise; noise_multiplier 0: the "
                             "embedding alone); or the client's embedding as the server receives it, masked by "
                             "secure aggregation.")
    parser.add_argument("--noise_multiplier", type=float, default=1.0,
                        help="Noise in units of the clip norm (defences dp_sgd and dp_merf).")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="DP-SGD clipping norm (defence: dp_sgd).")
    parser.add_argument("--delta", type=float, default=1e-5, help="Delta at which a noisy update's epsilon is given.")
    parser.add_argument("--num_features", type=int, default=10000,
                        help="DP-Merf's random features (defences dp_merf, secure_aggregation).")
    parser.add_argument("--length_scale", type=float, default=7.0,
                        help="DP-Merf's kernel length scale (defences dp_merf, secure_aggregation).")
    parser.add_argument("--secure_aggregation_clients", type=int, default=3,
                        help="Clients in the secure aggregation round (defence: secure_aggregation), >= 3.")
    parser.add_argument("--run_dir", type=str | None, default=None,
                        help="Run folder (default: runs/attack-<attack>-<dataset>-<time>).")
    return parser


def attack(args: list[str]) -> dict[str, Any]:
    """``fedgen attack``: gradient inversion against what a client sends, one batch of its private examples
    at a time. With ``defence: none`` or ``dp_sgd`` the client holds a DLG-style LeNet (the weights the
    server sent) and sends the batch's gradient or a DP-SGD update (clipped per example, Gaussian noise).
    With ``dp_merf`` or ``secure_aggregation`` it takes part in the generative-privacy pipeline and sends
    no gradient: the attack sees the batch's DP-Merf embedding as released (plus the release's Gaussian
    noise, the attacker knowing every other example's part) or as the server receives it (masked by secure
    aggregation). The attack reconstructs the batch from that alone; PSNR and SSIM score it against the truth.

    Writes ``config.yaml``, ``reconstructions.png`` (each update's originals above their reconstructions) and
    ``metrics.json`` into the run folder.
    """
    parser = attack_parser()
    config = parse_args(parser, args)
    check_seed(config.seed_everything)
    L.seed_everything(config.seed_everything, verbose=False)
    check_at_least_one("batch_size", config.batch_size, "use 1 for single-example updates")
    if not config.examples or len(config.examples) % config.batch_size:
        raise ConfigError("examples", f"{len(config.examples)} examples do not make whole batches of "
                          f"{config.batch_size}", "give a multiple of batch_size indices")
    if not config.noise_multiplier >= 0 or not config.max_grad_norm > 0:
        raise ConfigError("noise_multiplier", f"noise_multiplier={config.noise_multiplier}, "
                          f"max_grad_norm={config.max_grad_norm}", "use noise_multiplier >= 0 and max_grad_norm > 0")
    if config.secure_aggregation_clients < 3:
        raise ConfigError("secure_aggregation_clients", f"is {config.secure_aggregation_clients}",
                          "secure aggregation needs at least 3 clients")
    if not 0 < config.delta < 1:
        raise ConfigError("delta", f"must be in (0, 1), got {config.delta}", "use e.g. 1e-5")
    if config.defence in ("dp_merf", "secure_aggregation"):  # DP-Merf's own checks, named as the options
        if config.num_features < 2 or config.num_features % 2:
            raise ConfigError("num_features", f"must be an even number >= 2, got {config.num_features}",
                              "use e.g. 10000")
        if not config.length_scale > 0:
            raise ConfigError("length_scale", f"must be > 0, got {config.length_scale}", "use e.g. 7.0")
    attack_name = config.attack.class_path.rsplit(".", 1)[-1].lower()
    run_dir = resolve_run_dir(config.run_dir, None, f"attack-{attack_name}-{dataset_name(config.data)}")
    config.run_dir = str(run_dir)
    built = instantiate(parser, config)
    if built.attack.needs_labels and config.batch_size > 1 and not config.known_labels:
        raise ConfigError("known_labels", f"{type(built.attack).__name__} cannot optimize the labels of a batch of "
                          f"{config.batch_size} images", "set known_labels: true (the attacker is given them), "
                          "batch_size: 1 (the label is recovered), or use fedgen.attacks.DLG")
    data: VisionDataModule = built.data
    data.prepare_data()
    data.setup("fit")
    if max(config.examples) >= len(data.train_set) or min(config.examples) < 0:
        raise ConfigError("examples", f"indices must be in [0, {len(data.train_set)})", "pick training examples")
    client = _Client(config, data)
    write_config(parser, config, run_dir)
    originals, reconstructions, updates = [], [], []
    for start in range(0, len(config.examples), config.batch_size):
        batch = [data.train_set[i] for i in config.examples[start:start + config.batch_size]]
        images = torch.stack([x for x, _ in batch])
        labels = torch.tensor([int(y) for _, y in batch])
        result = client.attacked_by(built.attack, images, labels, labels if config.known_labels else None)
        score = result.score(images)
        updates.append(score | {"examples": config.examples[start:start + config.batch_size],
                                "labels": labels.tolist(), "recovered_labels": result.labels.tolist()})
        originals.append(images)
        reconstructions.append(result.images.cpu())
        log.info("update %d: PSNR %.2f dB, SSIM %.3f", len(updates), score["psnr"], score["ssim"])
    _save_pairs(originals, reconstructions, run_dir / "reconstructions.png")
    noisy = config.defence in ("dp_sgd", "dp_merf")
    metrics = {
        "attack": type(built.attack).__name__,
        "defence": config.defence,
        "sent": client.describe(),
        "noise_multiplier": config.noise_multiplier if noisy else None,
        "max_grad_norm": config.max_grad_norm if config.defence == "dp_sgd" else None,
        "epsilon_of_one_update": client.epsilon,
        "delta": config.delta if noisy else None,
        "mean_psnr": sum(u["psnr"] for u in updates) / len(updates),
        "mean_ssim": sum(u["ssim"] for u in updates) / len(updates),
        "label_accuracy": sum(a == b for u in updates for a, b in zip(u["labels"], u["recovered_labels"]))
        / len(config.examples),
        "batch_size": config.batch_size,
        "known_labels": config.known_labels,
        "updates": updates,
        "dataset": getattr(data, "dataset", type(data).__name__),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"fedgen: {metrics['attack']} against {config.defence} updates: mean PSNR {metrics['mean_psnr']:.2f} dB, "
          f"SSIM {metrics['mean_ssim']:.3f}, labels {metrics['label_accuracy']:.0%} right; run folder: {run_dir}")
    return metrics


class _Client:
    """The attacked client of ``fedgen attack``: what it computes from a batch, and what the attacker sees."""

    def __init__(self, config: Any, data: VisionDataModule) -> None:
        self.config, self.data = config, data
        self.epsilon: float | None = None
        shape = data.image_shape
        torch.manual_seed(config.model_seed)
        if config.defence in ("none", "dp_sgd"):
            self.model = lenet_for_inversion(channels=shape[0], image_size=shape[1], num_classes=data.num_classes)
            self.noise = torch.Generator().manual_seed(config.seed_everything)
            if config.defence == "dp_sgd":
                self.epsilon = _one_step_epsilon(config)
            return
        # The pipeline's generator: its random features are public (seeded), so the attacker knows them.
        # (Its own mechanism only sets the clip norm; each release below gets a fresh one.)
        self.merf = DPMerf(mechanism=GaussianMechanism(noise_multiplier=1.0, delta=config.delta), num_classes=data.num_classes, image_shape=tuple(shape),
                           num_features=config.num_features, length_scale=config.length_scale,
                           feature_seed=config.model_seed)
        if config.defence == "secure_aggregation":
            self.secure = SecureAggregator(clip_norm=config.batch_size * (1 + 1e-6))
            # The other clients of the round hold other training examples (the last ones of the split).
            n = len(data.train_set)
            self.others = [data.train_set[n - 1 - k] for k in range(config.secure_aggregation_clients - 1)]

    def describe(self) -> str:
        return {"none": "gradient of the batch",
                "dp_sgd": "DP-SGD update: per-example clipping, Gaussian noise, divided by the batch size",
                "dp_merf": "the batch's DP-Merf embedding sum" + (
                    " plus the release's Gaussian noise" if self.config.noise_multiplier > 0 else ", no noise"),
                "secure_aggregation": f"the batch's DP-Merf embedding sum as the server receives it, masked by "
                                      f"secure aggregation among {self.config.secure_aggregation_clients} clients",
                }[self.config.defence]

    def attacked_by(self, attack: GradientInversion, images: torch.Tensor, labels: torch.Tensor,
                    known: torch.Tensor | None = None) -> InversionResult:
        """What the client sends for this batch of ``images`` with their ``labels``, and the attack's
        reconstruction from it; ``known``: the labels the attacker is given (None: recovered or optimized)."""
        config, shape = self.config, self.data.image_shape
        if config.defence == "none":
            sent = client_gradient(self.model, images, labels)
        elif config.defence == "dp_sgd":
            sent = dp_sgd_update(self.model, images, labels, max_grad_norm=config.max_grad_norm,
                                 noise_multiplier=config.noise_multiplier, generator=self.noise)
        if config.defence in ("none", "dp_sgd"):
            return attack.attack(self.model, sent, input_shape=shape, num_images=len(images), labels=known)
        embedding = self.merf.clipped_contribution_sum(images, labels)
        if config.defence == "dp_merf" and config.noise_multiplier > 0:
            # Each batch stands for a different client's data, released once by its own mechanism and ledger.
            mechanism = GaussianMechanism(noise_multiplier=config.noise_multiplier, delta=config.delta)
            embedding = mechanism.release(embedding)
            self.epsilon = mechanism.epsilon()
        elif config.defence == "secure_aggregation":
            others = {k + 1: self.merf.clipped_contribution_sum(x.unsqueeze(0), torch.tensor([int(y)]))
                      for k, (x, y) in enumerate(self.others)}
            result = self.secure.aggregate({0: embedding} | others, keep_transcript=True)
            embedding = torch.from_numpy(self.secure.dequantize(result.transcript.masked_inputs[0])).float()
        if known is None and len(images) == 1:
            # One example's label is the largest entry of the embedding's class-count block (its last C entries).
            known = torch.tensor([int(embedding[-self.merf.num_classes:].argmax())])
        return attack.invert(lambda x, p: [self.merf.contributions(x, p).sum(0)], [embedding], input_shape=shape,
                             num_images=len(images), num_classes=self.merf.num_classes, labels=known)


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


def membership_parser() -> ArgumentParser:
    """The options of ``fedgen membership``."""
    parser = ArgumentParser(prog="fedgen membership", description=membership.__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with the options below.")
    parser.add_argument("--seed_everything", type=int, default=0, help="Seed of the choice of candidates.")
    parser.add_argument("--run", type=str, help="The `fedgen fit` run folder whose releases are attacked.")
    parser.add_argument("--members", type=int, default=2000,
                        help="Members attacked: examples drawn at random from the run's private training split.")
    parser.add_argument("--non_members", type=int, default=2000,
                        help="Non-members: examples drawn at random from the test split (same distribution).")
    parser.add_argument("--repeats", type=int, default=8,
                        help="(timestep, noise) draws per candidate of the diffusion loss attack.")
    parser.add_argument("--run_dir", type=str | None, default=None,
                        help="Run folder (default: runs/membership-<run>-<time>).")
    return parser


def membership(args: list[str]) -> dict[str, Any]:
    """``fedgen membership``: membership inference against what a ``fedgen fit`` run released, with known
    members (private training examples) and non-members (test examples). Every run is attacked through its
    synthetic dataset (GAN-Leaks, full black-box: ``-distance`` to the nearest synthetic image); a DP
    diffusion run also through its generator's weights (the diffusion loss attack). A model trained on the
    synthetic data only sees the private data through the generator, so these bound what it can leak.

    Writes ``config.yaml``, ``metrics.json`` (AUC, TPR at 0.1% and 1% FPR of each attack) and one
    ``roc_<attack>.png`` per attack into its own run folder; the attacked run is only read.
    """
    parser = membership_parser()
    config = parse_args(parser, args)
    check_seed(config.seed_everything)
    L.seed_everything(config.seed_everything, verbose=False)
    check_at_least_one("members", config.members, "use e.g. 2000")
    check_at_least_one("non_members", config.non_members, "use e.g. 2000")
    check_at_least_one("repeats", config.repeats, "use e.g. 8")
    attacked = check_fit_run(config.run, ("config.yaml", "generator.ckpt", "synthetic.pt"))
    # The default run folder lies in runs/: inside the attacked run only if runs/ is.
    own = Path(config.run_dir if config.run_dir is not None else "runs").resolve()
    if own == attacked.resolve() or attacked.resolve() in own.parents:
        raise ConfigError("run_dir", f"{own} is, or lies inside, the attacked run {attacked.resolve()}, which "
                          "fedgen membership only reads", "give a --run_dir outside the --run folder")
    generator, data = load_fit_run(attacked)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    for field, wanted, available in (("members", config.members, len(data.train_set)),
                                     ("non_members", config.non_members, len(data.test_set))):
        if wanted > available:
            raise ConfigError(field, f"{wanted} asked, the split holds {available}", f"use at most {available}")
    run_dir = resolve_run_dir(config.run_dir, None, f"membership-{attacked.name}")
    config.run_dir = str(run_dir)
    write_config(parser, config, run_dir)
    pick = torch.Generator().manual_seed(config.seed_everything)
    members = _stack(data.train_set, torch.randperm(len(data.train_set), generator=pick)[:config.members])
    non_members = _stack(data.test_set, torch.randperm(len(data.test_set), generator=pick)[:config.non_members])
    synthetic = torch.load(attacked / "synthetic.pt")
    released = synthetic["images"].float() / 255
    results = {"gan_leaks": evaluate_membership(gan_leaks_scores(members[0], released),
                                                gan_leaks_scores(non_members[0], released))}
    if hasattr(generator, "diffusion_loss"):
        results["diffusion_loss"] = evaluate_membership(
            diffusion_loss_scores(generator, *members, repeats=config.repeats),
            diffusion_loss_scores(generator, *non_members, repeats=config.repeats))
    for name, result in results.items():
        result.save_roc(run_dir / f"roc_{name}.png", title=f"{name} against {attacked.name}")
        log.info("%s: AUC %.3f, TPR %.2f%% at 0.1%% FPR, %.2f%% at 1%% FPR", name, result.auc,
                 100 * result.tpr_at_fpr[0.001], 100 * result.tpr_at_fpr[0.01])
    fit_metrics = json.loads((attacked / "metrics.json").read_text()) if (attacked / "metrics.json").exists() else {}
    metrics = {"run": str(attacked), "generator": type(generator).__name__,
               "epsilon": fit_metrics.get("epsilon"), "delta": fit_metrics.get("delta"),
               "synthetic_images": len(released), "attacks": {k: v.to_dict() for k, v in results.items()}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    summary = "; ".join(f"{k} AUC {v.auc:.3f}, TPR@0.1%FPR {v.tpr_at_fpr[0.001]:.2%}" for k, v in results.items())
    print(f"fedgen: membership inference against {attacked}: {summary}; run folder: {run_dir}")
    return metrics


def _stack(dataset: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in pairs]), torch.tensor([int(y) for _, y in pairs])
