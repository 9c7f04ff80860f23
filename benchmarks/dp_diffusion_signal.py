"""How much signal a DP diffusion step carries, per UNet size and number of noise draws K.

For a logical batch of B real MNIST (or Fashion-MNIST) examples, fedgen's clipping engine forms the clipped per-example
gradients (each the gradient of the example's K-draw loss, clipped to C = 1) and their sum S. With
unit-norm clipped gradients, E ||S||^2 = B + B (B - 1) rho^2, where rho is the norm of their mean: the
part of the sum that does not cancel. DP-SGD adds noise of norm about sigma sqrt(P) (P parameters), so one
step's signal to noise ratio at sigma = 1 is about B rho / sqrt(P). The script prints rho, that ratio and
the time of the clipping pass, at initialisation and after ``--train_steps`` non-private steps (clipped,
no noise; lr 1e-3, batch 512, K = 2), for each UNet in ``--channels`` and each K in ``--draws``, with the
generator's shifted or mirrored views, stratified draws and zero initialization where asked.

    python benchmarks/dp_diffusion_signal.py --channels 16,32,32 32,64,64 --draws 1 4 16
    python benchmarks/dp_diffusion_signal.py --channels 16,32,32 --draws 1 2 4 --augment_shift 2 --stratified_draws \
        --zero_init_residual   # the epsilon-10 example's UNet and draws
    python benchmarks/dp_diffusion_signal.py --dataset fashion_mnist --channels 32,64,64 --draws 1 2 \
        --zero_init_residual --stratified_draws --augment_flip   # mirrored views of garments
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import TensorDataset

from fedgen.data import FashionMNISTDataModule, MNISTDataModule
from fedgen.data.datamodules import dataset_to_tensors
from fedgen.generators import DPDiffusion
from fedgen.mechanisms import DPSGD


def clipped_sum_signal(model: DPDiffusion, images: torch.Tensor, labels: torch.Tensor, draws: int,
                       micro_batch: int) -> dict[str, float]:
    """rho, B rho / sqrt(P) and the milliseconds of one clipping pass over ``images``."""
    model.hparams.noise_draws = draws
    params = [p for p in model.unet.parameters() if p.requires_grad]
    for p in params:
        p.summed_grad = None
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for x, y in zip(images.split(micro_batch), labels.split(micro_batch), strict=True):
        model.mechanism.backward(model.diffusion_loss(x, y), draws=draws)
    sync()
    seconds = time.perf_counter() - start
    squared = sum(float((p.summed_grad.double() ** 2).sum()) for p in params)
    for p in params:
        p.summed_grad = None
    b = len(images)
    rho = (max(squared - b, 0.0) / (b * (b - 1))) ** 0.5
    size = sum(p.numel() for p in params)
    return {"rho": rho, "signal_to_noise_at_sigma_1": b * rho / size ** 0.5, "ms": seconds * 1e3, "params": size}


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
    args = parser.parse_args()
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
            batch = torch.randperm(n, device=device)[:args.batch]
            for draws in args.draws:
                r = clipped_sum_signal(model, images[batch], labels[batch], draws, max(1, 4096 // draws))
                print(f"{channels} | {stage} | {draws} | {r['params']} | {r['rho']:.3f} | "
                      f"{r['signal_to_noise_at_sigma_1']:.3f} | {r['ms']:.0f}", flush=True)


if __name__ == "__main__":
    main()
