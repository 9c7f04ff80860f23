"""Membership inference on MNIST against what fedgen's pipeline releases, beside the classical baselines.

Rows (members: a random half of a pool of MNIST training examples; non-members: the other half):

  (a) a ConvNet trained on the members, without privacy (trained long enough to overfit);
  (b) the same ConvNet trained with DP-SGD (fedgen's ``DPSGD``; epsilon from its ledger);
  (c) the pipeline's downstream classifier: a DP-Merf generator released from the members, then the ConvNet
      trained on its synthetic data only;
  (d) the pipeline's generators: GAN-Leaks against the DP-Merf synthetic set of (c), and, given
      ``--diffusion_checkpoint`` (a ``fedgen fit`` DP diffusion ``generator.ckpt`` trained on the whole MNIST
      training split), the diffusion loss attack, with training examples as members and test examples as
      non-members.

Classifiers are attacked with the LOSS attack and with LiRA (offline, one global variance), whose shadow
models are trained exactly as the target, on random halves of the pool. Every attack reports the AUC and
the true-positive rate at 0.1% and 1% false-positive rate. Usage (data from FEDGEN_DATA_ROOT):

    python benchmarks/membership_mnist.py --out runs/membership-mnist [--diffusion_checkpoint PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from fedgen.attacks import LiRA, diffusion_loss_scores, evaluate_membership, gan_leaks_scores, loss_scores
from fedgen.data import MNISTDataModule
from fedgen.data.datamodules import dataset_to_tensors
from fedgen.evaluation import Classifier, ConvNet, TrainOnSynthetic
from fedgen.generators import DPDiffusion, DPMerf
from fedgen.mechanisms import DPSGD, GaussianMechanism, PrivacyLedger

SHAPE = (1, 28, 28)


def trainer(epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False)


def train_real(data: Dataset, args: argparse.Namespace) -> nn.Module:
    """(a) ConvNet(width 32, depth 2), Adam, no privacy."""
    model = Classifier(net=ConvNet(image_shape=SHAPE, num_classes=10, width=32, depth=2), num_classes=10, lr=1e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
    trainer(args.real_epochs).fit(model, loader)
    return model.net.eval()


def train_dp(data: Dataset, args: argparse.Namespace, epsilons: list[float]) -> nn.Module:
    """(b) the same ConvNet under DP-SGD at ``--dp_epsilon`` (clip 1, expected batch 256)."""
    mechanism = DPSGD(target_epsilon=args.dp_epsilon, delta=1e-5, max_grad_norm=1.0)
    loader = mechanism.data_loader(data, batch_size=min(256, len(data) // 4))
    model = Classifier(net=ConvNet(image_shape=SHAPE, num_classes=10, width=32, depth=2), num_classes=10, lr=2e-3,
                       mechanism=mechanism, private_loader=loader, epochs=args.dp_epochs)
    trainer(args.dp_epochs).fit(model, loader)
    epsilons.append(mechanism.epsilon())
    return model.net.eval()


def train_pipeline(data: Dataset, args: argparse.Namespace, epsilons: list[float]) -> tuple[nn.Module, torch.Tensor]:
    """(c) DP-Merf released once at ``--pipeline_epsilon``, its synthetic set, a classifier on that set only."""
    merf = DPMerf(mechanism=GaussianMechanism(target_epsilon=args.pipeline_epsilon, delta=1e-5), num_features=10000,
                  length_scale=7.0, batch_size=100, steps_per_epoch=args.merf_steps, lr=0.01)
    trainer(1).fit(merf, merf.attach_private_data(data))
    epsilons.append(merf.mechanism.epsilon())
    synthetic = merf.synthesize(args.num_synthetic)
    images = (synthetic.tensors[0] * 255).round() / 255  # released as 8-bit images
    net, _ = TrainOnSynthetic(classifier="convnet", epochs=args.synthetic_epochs, accelerator="cpu",
                              progress_bar=False).fit_classifier(TensorDataset(images, synthetic.tensors[1]),
                                                                 num_classes=10, image_shape=SHAPE)
    return net.cpu().eval(), images


def attack_classifier(name: str, train, pool: TensorDataset, members: torch.Tensor, args: argparse.Namespace,
                      rows: list[dict], epsilons: list[float] | None = None) -> nn.Module:
    """Train the target on the members, attack it with LOSS and LiRA (shadows trained by ``train`` too)."""
    start = time.perf_counter()
    target = train(Subset(pool, members.nonzero().squeeze(1).tolist()))
    target = target[0] if isinstance(target, tuple) else target
    epsilon = epsilons[-1] if epsilons else None
    loss = loss_scores(target, pool)
    rows.append(row(name, "LOSS", loss[members], loss[~members], epsilon))
    if args.shadows:
        def factory(subset: Dataset) -> nn.Module:
            out = train(subset)
            return out[0] if isinstance(out, tuple) else out

        lira = LiRA(train=factory, num_shadows=args.shadows, online=False, global_variance=True, seed=1).fit(pool)
        scores = lira.scores(target, pool)
        rows.append(row(name, f"LiRA offline, {args.shadows} shadows", scores[members], scores[~members], epsilon))
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return target


def row(target: str, attack: str, member_scores: torch.Tensor, non_member_scores: torch.Tensor,
        epsilon: float | None) -> dict:
    result = evaluate_membership(member_scores, non_member_scores)
    out = {"target": target, "attack": attack, "epsilon": epsilon, **result.to_dict()}
    print(json.dumps(out), flush=True)
    return out


def print_chance(per_side: int, draws: int) -> None:
    """TPR at 0.1% FPR of scores that carry no information (uniform noise for members and non-members alike):
    the reading a perfectly private artifact gives, with its spread, at ``per_side`` candidates a side."""
    gen = torch.Generator().manual_seed(0)
    tpr = torch.tensor([evaluate_membership(torch.rand(per_side, generator=gen), torch.rand(per_side, generator=gen))
                        .tpr_at_fpr[0.001] for _ in range(draws)])
    print(f"uninformative scores, {per_side} / {per_side}, {draws} draws: TPR at 0.1% FPR mean {tpr.mean():.3%}, "
          f"standard deviation {tpr.std():.3%}; above 0.2% in {(tpr > 0.002).float().mean():.1%} of draws")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=int, default=4000, help="examples; a random half are the members")
    parser.add_argument("--shadows", type=int, default=8, help="LiRA shadow models per classifier row (0: none)")
    parser.add_argument("--real_epochs", type=int, default=30)
    parser.add_argument("--dp_epsilon", type=float, default=1.0)
    parser.add_argument("--dp_epochs", type=int, default=15)
    parser.add_argument("--pipeline_epsilon", type=float, default=1.0)
    parser.add_argument("--merf_steps", type=int, default=1000)
    parser.add_argument("--pipeline_shadows", type=int, default=4,
                        help="LiRA shadows of row (c) (each one a whole pipeline run)")
    parser.add_argument("--num_synthetic", type=int, default=10000)
    parser.add_argument("--synthetic_epochs", type=int, default=5)
    parser.add_argument("--rows", nargs="+", default=["a", "b", "c", "d"])
    parser.add_argument("--diffusion_checkpoint", default=None)
    parser.add_argument("--diffusion_candidates", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/membership-mnist")
    parser.add_argument("--chance", type=int, default=0, metavar="DRAWS",
                        help="only print how TPR at 0.1%% FPR reads for uninformative scores (DRAWS draws at "
                             "pool / 2 members and non-members): the estimate's spread at this size")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.chance:
        print_chance(args.pool // 2, args.chance)
        return
    L.seed_everything(args.seed, verbose=False)
    data = MNISTDataModule()
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    pick = torch.Generator().manual_seed(args.seed)
    indices = torch.randperm(len(data.train_set), generator=pick)[:args.pool]
    x, y = dataset_to_tensors(Subset(data.train_set, indices.tolist()))
    pool = TensorDataset(x, y)
    members = torch.zeros(args.pool, dtype=torch.bool)
    members[torch.randperm(args.pool, generator=pick)[:args.pool // 2]] = True
    rows: list[dict] = []
    start = time.perf_counter()
    if "a" in args.rows:
        attack_classifier("(a) ConvNet on the real members", lambda d: train_real(d, args), pool, members, args, rows)
    if "b" in args.rows:
        eps: list[float] = []
        attack_classifier(f"(b) DP-SGD ConvNet, epsilon {args.dp_epsilon:g}", lambda d: train_dp(d, args, eps), pool,
                          members, args, rows, eps)
    if "c" in args.rows or "d" in args.rows:
        eps = []
        released: list[torch.Tensor] = []

        def pipeline(d: Dataset) -> nn.Module:
            net, images = train_pipeline(d, args, eps)
            released.append(images)
            return net

        shadows, args.shadows = args.shadows, args.pipeline_shadows if "c" in args.rows else 0
        attack_classifier(f"(c) classifier on DP-Merf synthetic data, epsilon {args.pipeline_epsilon:g}", pipeline,
                          pool, members, args, rows, eps)
        args.shadows = shadows
        if "d" in args.rows:
            synthetic = released[0]  # the target's release (shadows' releases come after it)
            scores = gan_leaks_scores(pool.tensors[0], synthetic)
            rows.append(row(f"(d) DP-Merf synthetic set ({len(synthetic)} images), epsilon {args.pipeline_epsilon:g}",
                            "GAN-Leaks (nearest synthetic image)", scores[members], scores[~members], eps[0]))
    if "d" in args.rows and args.diffusion_checkpoint:
        checkpoint = torch.load(args.diffusion_checkpoint, map_location="cpu", weights_only=False)
        hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
        generator = DPDiffusion(mechanism=DPSGD(noise_multiplier=1.0), **hparams)  # weights only; never trained here
        generator.load_state_dict(checkpoint["state_dict"])
        ledger = PrivacyLedger()
        ledger.load_state_dict(checkpoint["fedgen_privacy"]["ledger"])
        n = args.diffusion_candidates
        train_x, train_y = dataset_to_tensors(Subset(data.train_set, torch.randperm(len(data.train_set),
                                                                                      generator=pick)[:n].tolist()))
        test_x, test_y = dataset_to_tensors(Subset(data.test_set, torch.randperm(len(data.test_set),
                                                                                   generator=pick)[:n].tolist()))
        member_scores = diffusion_loss_scores(generator, train_x, train_y)
        non_member_scores = diffusion_loss_scores(generator, test_x, test_y)
        rows.append(row("(d) DP diffusion generator (weights), trained on all 60,000", "diffusion loss, 8 draws",
                        member_scores, non_member_scores, ledger.epsilon(1e-5)))
    elif "d" in args.rows:
        print("(d) diffusion loss attack skipped: no --diffusion_checkpoint given", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "membership.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                     "seconds": time.perf_counter() - start}, indent=2))
    print("\n| target | attack | members / non-members | AUC | TPR at 0.1% FPR | TPR at 1% FPR | epsilon |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        eps_text = f"{r['epsilon']:.3g}" if r["epsilon"] is not None else "no DP"
        print(f"| {r['target']} | {r['attack']} | {r['members']} / {r['non_members']} | {r['auc']:.3f} | "
              f"{100 * r['tpr_at_fpr']['0.001']:.2f}% | {100 * r['tpr_at_fpr']['0.01']:.2f}% | {eps_text} |")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
