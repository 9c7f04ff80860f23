"""What label-free pretraining teaches a DP diffusion UNet about the private images, before it sees any of them.

The epsilon-1 example's UNet ((8, 16, 16), attention at 14x14) takes ``--steps`` plain Adam steps of the
unconditional v-prediction loss (batch 256, one noise draw, lr 1e-3) on one source. Then its loss is measured on
1,000 test images of the ``--target`` dataset (MNIST or Fashion-MNIST) at fixed steps t and fixed noise. A lower
loss means that more of what those images need was learned without them. Sources: ``none`` (the initialization);
``strokes``, ``leaves`` and ``mixed``, the kinds of :class:`fedgen.data.procedural.ProceduralImages` (no data);
``fashionmnist`` and ``mnist``, datasets (the target's own training split is the reference that a prior can at best
approach; the other one stands for public data). Runs on the CPU in a few minutes a source:

    python benchmarks/pretraining_prior.py --sources none strokes leaves mixed fashionmnist mnist --steps 400

What it does not measure: how much of the prior survives the private training that follows. On MNIST it ranked
``mixed`` first, and a whole run at epsilon 1 after 200 ``mixed`` steps lost 6.7 points (docs/benchmarks.md, run 85):
a low loss here is not a gain downstream.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedgen.data import dataset_to_tensors, load_vision_dataset, resolve_data_root
from fedgen.data.procedural import KINDS, ProceduralImages
from fedgen.generators import DPDiffusion
from fedgen.mechanisms import DPSGD

STEPS_MEASURED = (20, 100, 250, 400, 550, 700, 850, 980)


def source_images(name: str, n: int, generator: torch.Generator, root) -> torch.Tensor:
    if name in KINDS:
        seed = int(torch.randint(0, 2**31, (1,), generator=generator))
        return ProceduralImages(n, image_shape=(1, 28, 28), kind=name, seed=seed).tensors[0]
    if name in ("fashionmnist", "mnist"):
        images, _ = dataset_to_tensors(load_vision_dataset("FashionMNIST" if name == "fashionmnist" else "MNIST", root,
                                                           train=True, download=False))
        return images[torch.randperm(len(images), generator=generator)[:n]]
    raise ValueError(f"unknown source {name!r}")


def untrained_unet() -> DPDiffusion:
    torch.manual_seed(0)
    return DPDiffusion(mechanism=DPSGD(target_epsilon=1.0, delta=1e-5), block_channels=(8, 16, 16),
                       attention=(False, True, False), zero_init_residual=True, noise_draws=1, batch_size=256,
                       lr=1e-3)


@torch.no_grad()
def loss_on(model: DPDiffusion, images: torch.Tensor) -> list[float]:
    """The unconditional v-prediction loss on ``images`` at each of STEPS_MEASURED, with fixed noise."""
    model.eval()
    generator = torch.Generator().manual_seed(1)
    x0 = images * 2 - 1
    null = torch.full((len(x0),), model.null_class)
    losses = []
    for step in STEPS_MEASURED:
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.full((len(x0),), step, dtype=torch.long)
        out = model.unet(model.noise_scheduler.add_noise(x0, noise, t), t, class_labels=null).sample
        losses.append(float(((out - model.prediction_target(x0, noise, t)) ** 2).mean()))
    model.train()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", default=["none", *KINDS, "fashionmnist", "mnist"])
    parser.add_argument("--target", choices=["mnist", "fashionmnist"], default="mnist",
                        help="the dataset whose test images the loss is measured on")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--images", type=int, default=20000, help="images of each source the steps cycle through")
    parser.add_argument("--root", default=None, help="data root (default: $FEDGEN_DATA_ROOT)")
    args = parser.parse_args()
    root, _ = resolve_data_root(args.root)
    target = {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}[args.target]
    digits, _ = dataset_to_tensors(load_vision_dataset(target, root, train=False, download=False))
    digits = digits[:1000]
    steps = " | ".join(f"t = {t}" for t in STEPS_MEASURED)
    print(f"| source | steps | mean loss on {target} | {steps} | seconds |")
    print("|---" * (len(STEPS_MEASURED) + 4) + "|")
    for name in args.sources:
        start = time.perf_counter()
        model = untrained_unet()
        if name != "none":
            generator = torch.Generator().manual_seed(0)
            images = source_images(name, args.images, generator, root)
            optimizer = torch.optim.Adam(model.unet.parameters(), lr=1e-3)
            null = torch.full((256,), model.null_class)
            for _ in range(args.steps):
                batch = images[torch.randint(0, len(images), (256,), generator=generator)]
                optimizer.zero_grad()
                model.diffusion_loss(batch, null).backward()
                optimizer.step()
        losses = loss_on(model, digits)
        print(f"| {name} | {0 if name == 'none' else args.steps} | {sum(losses) / len(losses):.4f} | "
              + " | ".join(f"{v:.4f}" for v in losses) + f" | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
