"""How much signal a DP diffusion step carries, per UNet size and number of noise draws K.

For a logical batch of B real MNIST (or Fashion-MNIST) examples, fedgen's clipping engine forms the clipped per-example
gradients (each the gradient of the example's K-draw loss, clipped to C = 1) and sums them. rho, the norm of their
mean (the part of the sum that does not cancel), is estimated from the clipped sums of 32 parts of the batch, whose
cross terms ``<S_g, S_h> = |g| |h| rho^2`` in expectation assume nothing about the examples' norms. DP-SGD adds noise
of norm about sigma sqrt(P) (P parameters), so one step's signal to noise ratio at sigma = 1 is about
B rho / sqrt(P). The script prints rho, that ratio and the time of the clipping pass, at initialisation and after
``--train_steps`` non-private steps (clipped, no noise; lr 1e-3, batch 512, K = 2), for each UNet in ``--channels``
and each K in ``--draws``, with the generator's shifted or mirrored views, stratified draws and zero initialization
where asked.

    python benchmarks/dp_diffusion_signal.py --channels 16,32,32 32,64,64 --draws 1 4 16
    python benchmarks/dp_diffusion_signal.py --channels 16,32,32 --draws 1 2 4 --augment_shift 2 --stratified_draws \\
        --zero_init_residual   # the epsilon-10 example's UNet and draws
    python benchmarks/dp_diffusion_signal.py --dataset fashion_mnist --channels 32,64,64 --draws 1 2 \\
        --zero_init_residual --stratified_draws --augment_flip   # mirrored views of garments

With ``--run`` the script measures at the trained weights of a ``fedgen fit`` run folder instead (its UNet and
loss settings, its data set), for each K in ``--draws`` and each clipping norm C in ``--clip_norms`` (rho in units
of C)::

    python benchmarks/dp_diffusion_signal.py --run runs/mnist_eps1 --batch 1024 --draws 4 12 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fedgen.cli_sample import load_fit_run
from fedgen.data import FashionMNISTDataModule, MNISTDataModule
from fedgen.data.datamodules import dataset_to_tensors
from fedgen.generators import DPDiffusion
from fedgen.generators.ddpm import train_only
from fedgen.mechanisms import DPSGD
from fedgen.runs import check_fit_run


def signal_by_groups(model: DPDiffusion, images: torch.Tensor, labels: torch.Tensor, draws: int,
                     micro_batch: int, clip_norm: float, num_groups: int = 32) -> dict[str, float]:
    """rho (the norm of the mean gradient clipped at ``clip_norm``, in units of it), B rho / sqrt(P) and the
    milliseconds of the clipping pass, from the clipped sums S_g of ``num_groups`` parts of the batch (one pass, the
    engine's groups): each cross term ``<S_g, S_h>``, g != h, is ``|g| |h| ||mu||^2`` in expectation whatever the
    examples' norms, so ``||mu||^2`` is their sum, ``||sum_g S_g||^2 - sum_g ||S_g||^2``, over
    ``sum_{g != h} |g| |h|``."""
    model.hparams.noise_draws = draws
    b = len(images)
    groups = torch.arange(b, device=images.device) * num_groups // b  # sorted, sizes differ by at most one
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for rows in torch.arange(b, device=images.device).split(micro_batch):
        model.mechanism.backward(model.diffusion_loss(images[rows], labels[rows]), draws=draws, groups=groups[rows],
                                 num_groups=num_groups)
    sums = model.mechanism.take_clipped_sums(num_groups).double()
    sync()
    seconds = time.perf_counter() - start
    sizes = torch.bincount(groups, minlength=num_groups).double()
    cross = float(sums.sum(0).square().sum() - sums.square().sum())
    pairs = float(sizes.sum() ** 2 - sizes.square().sum())
    rho = (max(cross, 0.0) / pairs) ** 0.5 / clip_norm
    return {"rho": rho, "signal_to_noise_at_sigma_1": b * rho / sums.shape[1] ** 0.5, "params": sums.shape[1],
            "ms": seconds * 1e3}


def measure_run(run: str, batch: int, draws: list[int], clip_norms: list[float], repeats: int,
                trainable: list[str] | None = None) -> None:
    """rho and the signal to noise of the K-draw clipped sum at a ``fedgen fit`` run's trained (not averaged)
    weights, on ``batch`` of its private training images, for each K and C: the mean and the spread over
    ``repeats`` batches (each its own images and random seed, which every K and C start from). With ``trainable``
    (parts of parameter names), only the UNet's parameters whose names contain one of them are clipped and summed,
    as in DP-SGD that trains only those: rho and the noise then count only them."""
    trained, data = load_fit_run(check_fit_run(run, ("config.yaml", "generator.ckpt")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data.prepare_data()
    data.setup("fit")
    all_images, all_labels = dataset_to_tensors(data.train_set)
    placeholder = TensorDataset(torch.zeros(len(all_images), 1, 1, 1))  # only its size matters
    print(f"run {Path(run).name}, batch {batch}, {repeats} batches\n"
          "K | C | params | rho: mean (min to max) | signal/noise at sigma 1: mean")
    for clip_norm in clip_norms:
        model = copy.deepcopy(trained).to(device).train()
        model.mechanism = DPSGD(noise_multiplier=1e-6, max_grad_norm=clip_norm, seed=0)
        if not train_only(model.unet, trainable):
            raise SystemExit(f"--trainable {trainable}: no parameter of the UNet has such a name")
        loader = model.mechanism.data_loader(placeholder, batch_size=batch)
        model.mechanism.make_private(model.unet, torch.optim.SGD(model.unet.parameters(), 0.0), data_loader=loader,
                                     steps=10**6)
        for k in draws:
            results = []
            for r in range(repeats):
                chosen = torch.randperm(len(all_images), generator=torch.Generator().manual_seed(r))[:batch]
                torch.manual_seed(1 + r)
                results.append(signal_by_groups(model, all_images[chosen].to(device), all_labels[chosen].to(device),
                                                k, max(1, 4096 // k), clip_norm))
            rhos = [x["rho"] for x in results]
            snr = sum(x["signal_to_noise_at_sigma_1"] for x in results) / repeats
            print(f"{k} | {clip_norm:g} | {results[0]['params']} | {sum(rhos) / repeats:.4f} ({min(rhos):.4f} to "
                  f"{max(rhos):.4f}) | {snr:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", nargs="+", default=["16,32,32", "32,64,64", "64,64,64"])
    parser.add_argument("--draws", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--train_steps", type=int, default=300)
    parser.add_argument("--dataset", choices=["mnist", "fashion_mnist"], default="mnist")
    parser.add_argument("--augment_shift", type=int, default=0, help="DPDiffusion's augment_shift (pixels)")
    parser.add_argument("--augment_flip", action="store_true", help="DPDiffusion's augment_flip")
    parser.add_argument("--stratified_draws", action="store_true", help="DPDiffusion's stratified_draws")
    parser.add_argument("--zero_init_residual", action="store_true", help="DPDiffusion's zero_init_residual")
    parser.add_argument("--run", help="a `fedgen fit` run folder: measure at its trained weights (see above)")
    parser.add_argument("--clip_norms", nargs="+", type=float, default=[1.0], help="with --run: the norms C")
    parser.add_argument("--repeats", type=int, default=3, help="with --run: batches measured, each its own")
    parser.add_argument("--trainable", nargs="+", help="with --run: only the parameters whose names contain one of "
                        "these, e.g. attentions norm (see measure_run)")
    args = parser.parse_args()
    if args.repeats < 1 or min(args.clip_norms) <= 0:
        parser.error(f"--repeats must be at least 1 (got {args.repeats}) and every --clip_norms value positive (got "
                     f"{args.clip_norms}): e.g. --repeats 3 --clip_norms 1")
    if args.run:
        measure_run(args.run, args.batch, args.draws, args.clip_norms, args.repeats, args.trainable)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = MNISTDataModule() if args.dataset == "mnist" else FashionMNISTDataModule()
    data.prepare_data()
    data.setup("fit")
    images, labels = (t.to(device) for t in dataset_to_tensors(data.train_set))
    n = len(images)
    placeholder = TensorDataset(torch.zeros(n, 1, 28, 28), torch.zeros(n, dtype=torch.long))  # only its size matters
    print("channels | stage | K | params | rho | signal/noise at sigma 1 | ms per batch")
    for channels in args.channels:
        torch.manual_seed(0)
        model = DPDiffusion(mechanism=DPSGD(noise_multiplier=1e-6, seed=0),
                            block_channels=tuple(int(c) for c in channels.split(",")), noise_draws=2,
                            batch_size=512, lr=1e-3, augment_shift=args.augment_shift,
                            augment_flip=args.augment_flip,
                            stratified_draws=args.stratified_draws,
                            zero_init_residual=args.zero_init_residual).to(device)
        loader = model.attach_private_data(placeholder)
        _, optimizer = model.mechanism.make_private(model.unet, torch.optim.Adam(model.unet.parameters(), 1e-3),
                                                    data_loader=loader, steps=10**6)
        for stage in ("init", f"after {args.train_steps} steps"):
            if stage != "init":
                model.hparams.noise_draws = 2
                for _ in range(args.train_steps):
                    take = torch.rand(n, device=device) < 512 / n
                    optimizer.zero_grad(set_to_none=True)
                    model.mechanism.backward(model.diffusion_loss(images[take], labels[take]), draws=2)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # the last step's sums stay until then (Opacus' convention)
            batch = torch.randperm(n, device=device)[:args.batch]
            for draws in args.draws:
                r = signal_by_groups(model, images[batch], labels[batch], draws, max(1, 4096 // draws), 1.0)
                print(f"{channels} | {stage} | {draws} | {r['params']} | {r['rho']:.3f} | "
                      f"{r['signal_to_noise_at_sigma_1']:.3f} | {r['ms']:.0f}", flush=True)


if __name__ == "__main__":
    main()
