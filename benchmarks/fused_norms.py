"""Per-example conv weight-gradient squared norms on a GPU: the engine's unfold path against the fused Triton kernel
(fedgen.mechanisms.fused_norms) over tile sizes and float32 product precisions, and the padded input's Gram
matrix (per_example._conv2d_gram_sq_norms, with the way the engine picks by multiplications; its windows also by
fused_norms.gram_window_sq_norms over num_warps; and in TF32, on operands rounded to TF32 as the engine's), for the
UNet's and the ConvNet's layer shapes, then the per-example GroupNorm sums by PyTorch's GroupNorm backward and by
fused_norms.row_sums. Prints, per shape, each variant's time and its largest relative difference from the unfold
path (IEEE float32; the TF32 variant against float64 norms of its rounded operands).

    python benchmarks/fused_norms.py [--no_tiles]
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools

import torch
from torch import nn

from fedgen.mechanisms import fused_norms, per_example
from fedgen.mechanisms.precision import ieee_fp32, round_to_tf32

SHAPES = [  # in, out channels, size, batch, K
    (32, 32, 32, 1024, 1), (64, 64, 16, 1024, 1), (64, 64, 8, 1024, 1), (128, 128, 14, 1024, 1),
    (128, 128, 7, 1024, 1), (1, 128, 28, 1024, 1), (32, 32, 32, 256, 4),
]
GRAM_WARPS = [None, 1, 2, 8]  # gram_window_sq_norms: Triton's num_warps (None: its default)
GROUP_NORMS = [(128, 32, 28, 1024), (128, 32, 14, 1024), (128, 32, 7, 1024), (128, 32, 28, 256), (32, 32, 32, 1024),
               (64, 32, 16, 1024)]  # channels, groups, size, batch: the ConvNet's and the UNet's
TILES = [(32, 64, 32), (64, 64, 32), (32, 32, 64), (64, 128, 32), (32, 128, 64), (16, 64, 64)]


def cuda_ms(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", default=["ieee", "tf32x3"])
    parser.add_argument("--no_tiles", action="store_true",
                        help="leave out the fused conv kernel's tiles and precisions")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    for c_in, c_out, size, batch, draws in SHAPES:
        layer = nn.Conv2d(c_in, c_out, 3, padding=1).cuda()
        a = torch.randn(batch * draws, c_in, size, size, device="cuda")
        g = torch.randn(batch * draws, c_out, size, size, device="cuda")
        with ieee_fp32():
            saved = fused_norms.ENABLED, per_example.GRAM_NORMS
            fused_norms.ENABLED, per_example.GRAM_NORMS = False, False  # the unfold path
            ref = per_example._conv2d_weight_sq_norms(layer, [(a, g)], batch)
            line = [f"unfold {cuda_ms(lambda: per_example._conv2d_weight_sq_norms(layer, [(a, g)], batch)):.2f}"]
            fused_norms.ENABLED, per_example.GRAM_NORMS = saved
            saved = fused_norms.GRAM_WINDOWS, fused_norms.gram_window_sq_norms
            fused_norms.GRAM_WINDOWS = False  # the Gram path with its windows summed separably in PyTorch
            gram = per_example._conv2d_gram_sq_norms(layer, a, g, batch)
            count = per_example._conv_multiplications(layer, a, g, batch)
            line.append(f"gram {cuda_ms(lambda: per_example._conv2d_gram_sq_norms(layer, a, g, batch)):.2f} "
                        f"({((gram - ref).abs() / ref).max().item():.0e}; engine: {min(count, key=count.get)})")
            fused_norms.GRAM_WINDOWS = True  # the same Gram path, its windows by the kernel with each num_warps
            for warps in GRAM_WARPS:
                fused_norms.gram_window_sq_norms = functools.partial(saved[1], warps=warps)
                gram = per_example._conv2d_gram_sq_norms(layer, a, g, batch)
                line.append(f"gram, kernel windows, {warps or 'default'} warps "
                            f"{cuda_ms(lambda: per_example._conv2d_gram_sq_norms(layer, a, g, batch)):.2f} "
                            f"({((gram - ref).abs() / ref).max().item():.0e})")
            fused_norms.GRAM_WINDOWS, fused_norms.gram_window_sq_norms = saved
            a32, g32 = round_to_tf32(a), round_to_tf32(g)  # the Gram path of a layer book-kept in TF32
            ref32 = per_example._conv2d_gram_sq_norms(copy.deepcopy(layer).double(), a32.double(), g32.double(), batch)
            tf32 = functools.partial(per_example._conv2d_gram_sq_norms, layer, a32, g32, batch, "tf32")
            line.append(f"gram tf32 {cuda_ms(tf32):.2f} ({((tf32() - ref32).abs() / ref32).max().item():.0e})")
        for tile, precision in itertools.product([] if args.no_tiles else TILES, args.precisions):
            def run(tile=tile, precision=precision):
                return fused_norms.conv2d_weight_sq_norms(layer, a, g, batch, tile=tile, precision=precision)
            try:
                diff = ((run() - ref).abs() / ref).max().item()
                line.append(f"{tile}/{precision} {cuda_ms(run):.2f} ({diff:.0e})")
            except Exception as err:  # a tile the compiler refuses for this shape
                line.append(f"{tile}/{precision} fails: {type(err).__name__}")
        print(f"conv {c_in}->{c_out} {size}x{size} batch {batch} K {draws}: " + "; ".join(line), flush=True)
    for channels, groups, size, batch in GROUP_NORMS:  # the per-example GroupNorm sums
        layer = nn.GroupNorm(groups, channels).cuda()
        a = torch.randn(batch, channels, size, size, device="cuda")
        g = torch.randn_like(a)
        line = []
        for kernel in (False, True):
            fused_norms.ROW_SUMS = kernel
            got = per_example._group_norm(layer, a, g, batch)["weight"]
            line.append(f"{'row sums kernel' if kernel else 'GroupNorm backward'} "
                        f"{cuda_ms(lambda: per_example._group_norm(layer, a, g, batch)):.3f}")
        fused_norms.ROW_SUMS = False
        want = per_example._group_norm(layer, a.double(), g.double(), batch)["weight"]
        line.append(f"largest difference {((got - want).abs().max() / want.abs().max()).item():.0e}")
        print(f"group norm {channels} channels in {groups} groups, {size}x{size}, batch {batch}: " + "; ".join(line),
              flush=True)


if __name__ == "__main__":
    main()
