"""Two memory-bound operators of the DP diffusion UNet, forward and backward, at the epsilon-10 example's shapes
(16,384 rows: batch 4096 with K = 4 noise draws), on a GPU: nearest-neighbour upsampling by 2 as
``F.interpolate`` against fedgen's ``repeat_2x`` (``fedgen.generators.ddpm``), and GroupNorm (8 groups) as
``F.group_norm`` against a batch norm over a view of the groups and against ``F.group_norm`` compiled by
``torch.compile`` (dynamic shapes, as Poisson batches vary; the compilation is left out of the timings). Prints
each one's median milliseconds (10 timings after 3 warm-up calls, CUDA events) and the largest difference from the
first.

    python benchmarks/unet_ops.py [--rows 16384]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.nn import functional as F

from dp_step import measure  # the step benchmark's timing (this folder is on the path)
from fedgen.generators.ddpm import repeat_2x

GROUPS = 8


def forward_backward(op: Callable[..., torch.Tensor], inputs: list[torch.Tensor], out_grad: torch.Tensor
                     ) -> Callable[[], list[torch.Tensor]]:
    """One forward and backward of ``op``; returns the output and the inputs' gradients."""
    def run() -> list[torch.Tensor]:
        out = op(*inputs)
        return [out.detach(), *torch.autograd.grad(out, inputs, out_grad)]
    return run


def interpolate_2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def group_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, GROUPS, weight, bias, 1e-5)


def group_norm_as_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GroupNorm as a batch norm over (1, rows x groups, the group's values): the same statistics."""
    normalized = F.batch_norm(x.reshape(1, x.shape[0] * GROUPS, -1), None, None, training=True, eps=1e-5)
    return normalized.view_as(x) * weight[:, None, None] + bias[:, None, None]


def compiled_group_norm() -> Callable[..., torch.Tensor]:
    compiled = torch.compile(F.group_norm, dynamic=True)
    return lambda x, weight, bias: compiled(x, GROUPS, weight, bias, 1e-5)


def compare(name: str, ops: dict[str, Callable[..., torch.Tensor]], inputs: list[torch.Tensor],
            out_grad: torch.Tensor) -> None:
    runs = {label: forward_backward(op, inputs, out_grad) for label, op in ops.items()}
    reference = next(iter(runs.values()))()
    cells = []
    for label, run in runs.items():
        diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(run(), reference, strict=True))
        cells.append(f"{label} {measure(run, warmup=3, steps=10)[0]:.2f} ms (rel. diff {diff:.1e})")
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384, help="rows a step: the batch times the noise draws")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("unet_ops.py times GPU kernels: no CUDA device found")
    device, n = torch.device("cuda"), args.rows
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; {n} rows; forward and backward\n")
    for channels, size in ((32, 14), (32, 7)):
        x = torch.randn(n, channels, size, size, device=device, requires_grad=True)
        out_grad = torch.randn(n, channels, 2 * size, 2 * size, device=device)
        compare(f"upsample {channels}x{size}x{size}", {"F.interpolate": interpolate_2x, "repeat_2x": repeat_2x},
                [x], out_grad)
    for channels, size in ((16, 28), (32, 14), (32, 7)):
        x = torch.randn(n, channels, size, size, device=device, requires_grad=True)
        weight, bias = (torch.randn(channels, device=device, requires_grad=True) for _ in range(2))
        compare(f"GroupNorm {channels}x{size}x{size}", {"F.group_norm": group_norm,
                                                          "batch norm view": group_norm_as_batch_norm,
                                                          "compiled": compiled_group_norm()},
                [x, weight, bias], torch.randn_like(x))


if __name__ == "__main__":
    main()
