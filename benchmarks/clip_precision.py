"""Does each example add at most C? The norm of one example's clipped contribution, on the GPU.

fedgen's engine takes each example's gradient norm from one computation and its clipped sum from another
(the weight-gradient kernel of the scaled output gradients). DP-SGD's sensitivity is C only if the two
agree. This script isolates example i inside a full batch (every other example's loss weighted by 0, so its
output gradients are exact zeros and the kernels run at the batch's shapes), clips with a small C so that
every example is clipped, and reports ``||contribution_i|| / C`` over the examples:

- ``ieee``: every product of the engine in IEEE float32: its two-computation norms and sums (see
  ``fedgen.mechanisms.precision.ieee_fp32``) and the per-example gradients it forms (``FORM_PRECISION = "ieee"``);
- ``tf32``: the engine's products left to the global TF32 settings, as cuDNN's default (TF32 convolutions) and
  ``torch.set_float32_matmul_precision("high")`` make them, and its formed gradients in TF32;
- ``tf32-formed``: the per-example gradients the engine forms in TF32 (``per_example.FORM_PRECISION = "tf32"``,
  the default; each is its example's norm and summand), its two-computation norms and sums in IEEE float32;
- ``tf32-book``: as ``tf32-formed``, with the two-computation norms and sums in TF32 on operands rounded to TF32
  values first (``per_example.BOOK_PRECISION = "tf32"``), whose products are exact (each clipped sum two products
  of exact halves, ``per_example.TF32_SUMS = "split"``);
- ``auto-book``: as ``tf32-book`` for the layers with many multiply-adds only, IEEE for the others
  (``per_example.BOOK_PRECISION = "auto"``);
- ``tf32-margin``: as ``tf32-book``, each clipped sum one TF32 product of the scaled output gradient (which the
  tensor cores round) with the clip factors taken from the norms plus the rounding margin
  (``per_example.TF32_SUMS = "margin"``);
- ``auto-margin``: the engine as it ships: as ``auto-book``, with the TF32 layers' clipped sums as in ``tf32-margin``.

A ratio above 1 + 1e-5 means an example added more than C. Usage:

    python benchmarks/clip_precision.py --models convnet unet --batch 256 --examples 32
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from dp_step import benchmark_unet  # the same UNet as the step benchmark (this folder is on the path)
from fedgen.evaluation import ConvNet
from fedgen.mechanisms import per_example
from fedgen.mechanisms.per_example import PerExampleClipping

CLIP = 1e-4  # far below every per-example gradient norm: every example is clipped


def convnet(batch: int, device: torch.device):
    model = ConvNet(image_shape=(1, 28, 28), num_classes=10).to(device)
    x, y = torch.rand(batch, 1, 28, 28, device=device), torch.randint(0, 10, (batch,), device=device)
    return model, lambda: F.cross_entropy(model(x), y, reduction="none")


def unet(batch: int, device: torch.device):
    from diffusers import DDPMScheduler

    model = benchmark_unet(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x = torch.rand(batch, 1, 32, 32, device=device) * 2 - 1
    noise = torch.randn_like(x)
    t = torch.randint(0, 1000, (batch,), device=device)
    noisy = scheduler.add_noise(x, noise, t)
    return model, lambda: (model(noisy, t).sample - noise).square().flatten(1).mean(1)


MODELS = {"convnet": convnet, "unet": unet}


def contribution_ratios(model: nn.Module, per_row_loss, batch: int, examples: int, precision: str) -> torch.Tensor:
    """``||clipped contribution of example i|| / C`` for the first ``examples`` examples of the batch."""
    clipping = PerExampleClipping(model, max_grad_norm=CLIP)
    context = contextlib.nullcontext if precision == "tf32" else per_example.ieee_fp32
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    if precision == "tf32":
        matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
    original, form_precision, book_precision, tf32_sums = per_example.ieee_fp32, per_example.FORM_PRECISION, \
        per_example.BOOK_PRECISION, per_example.TF32_SUMS
    per_example.ieee_fp32 = context
    per_example.FORM_PRECISION = "ieee" if precision == "ieee" else "tf32"
    per_example.BOOK_PRECISION = {"tf32-book": "tf32", "auto-book": "auto",
                                  "tf32-margin": "tf32", "auto-margin": "auto"}.get(precision, "ieee")
    per_example.TF32_SUMS = "margin" if precision.endswith("-margin") else "split"
    ratios = []
    try:
        for i in range(examples):
            weights = torch.zeros(batch, device=next(model.parameters()).device)
            weights[i] = 1.0
            clipping.backward((weights * per_row_loss()).mean())
            params = [p for p in model.parameters() if p.requires_grad]
            norm = torch.linalg.vector_norm(torch.cat([p.summed_grad.flatten().double() for p in params]))
            ratios.append(norm.item() / CLIP)
            for p in params:
                p.summed_grad = None
    finally:
        per_example.ieee_fp32, per_example.FORM_PRECISION = original, form_precision
        per_example.BOOK_PRECISION, per_example.TF32_SUMS = book_precision, tf32_sums
        matmul.fp32_precision, conv.fp32_precision = saved
        clipping.remove()
    return torch.tensor(ratios, dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--examples", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("clip_precision.py checks GPU kernels: no CUDA device found")
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; C = {CLIP}; batch {args.batch}, "
          f"examples 0..{args.examples - 1} each isolated\n")
    print("| model | engine products | max ||contribution|| / C | median | examples above 1 + 1e-5 |")
    print("|---|---|---|---|---|")
    for name in args.models:
        for precision in ("ieee", "tf32", "tf32-formed", "tf32-book", "auto-book", "tf32-margin",
                          "auto-margin"):
            torch.manual_seed(0)
            model, per_row_loss = MODELS[name](args.batch, device)
            r = contribution_ratios(model, per_row_loss, args.batch, args.examples, precision)
            print(f"| {name} | {precision} | {r.max():.6f} | {r.median():.6f} | {(r > 1 + 1e-5).sum().item()} "
                  f"of {len(r)} |", flush=True)


if __name__ == "__main__":
    main()
