"""Per-example squared norms of a convolution's weight gradient in one GPU kernel, with nothing formed in memory,
or the per-example gradients themselves.

The weight gradient of example i is ``G_i = sum_r g_r x_r^T`` over its R = K T rows and positions, with ``g_r``
the output gradient at a position and ``x_r`` the unfolded input window there. The engine's default path
writes the unfolded input (k_h k_w times the layer input) and ``G_i`` to memory and reads both back; on a GPU
that traffic, not the arithmetic, is most of the cost (docs/benchmarks.md, "Where the extra time goes").
This kernel (Triton) computes each tile of ``G_i`` in registers, reading the input windows by address
arithmetic (an implicit GEMM), and keeps only the tile's sum of squares:

    ||G_i||_F^2 = sum over tiles (m, n) of sum_{(o, j) in tile} (sum_r g_r[o] x_r[j])^2.

Where the engine forms a layer's per-example gradients (few weights, many positions: ``per_example.forms_weight``)
the same kernel writes each tile of ``G_i`` out instead (:func:`conv2d_weight_per_example`).

Its products are IEEE float32 multiply-adds (``input_precision="ieee"``, never TF32), as the engine's other
norm products, so the clipping bound is argued as before. It runs where :func:`applies` says (float32 CUDA
tensors, ungrouped convolutions with zero padding); elsewhere the engine keeps its own path.

The engine uses it where it was measured faster than the unfold path (:func:`tile_for`). Per layer on an H200
(2026-11-30, batch 1024, ms, unfold path / this kernel with its tile): 32 to 32 channels at 32x32 2.10 / 1.36;
64 to 64 at 16x16 1.66 / 1.00; 64 to 64 at 8x8 0.53 / 0.38; 128 to 128 at 14x14 4.26 / 3.85; 32 to 32 at 32x32,
batch 256, K = 4: 3.64 / 1.34. Slower, and left to the unfold path: 128 to 128 at 7x7 (0.66 / 1.65) and one input
channel (0.24 / 0.52). Three TF32 tensor-core products per float32 product (``precision="tf32x3"``) were never
faster than the IEEE multiply-adds.

A second kernel serves the norms that the engine takes from the padded input's Gram matrix
(``per_example._conv2d_gram_sq_norms``): it sums the k_h k_w shifted windows of the Gram matrix and contracts
them with the output gradient's Gram matrix in one pass (:func:`gram_window_sq_norms`), where PyTorch reduces a
strided view of the windows into memory and reads it back. It is off (``GRAM_WINDOWS``) until a GPU measurement
says it pays.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

#: whether the engine may use the kernel (set False for A/B measurements against the unfold path)
ENABLED = True
#: whether the engine sums the Gram matrix's windows with :func:`gram_window_sq_norms` (off until it is measured
#: faster on a GPU than PyTorch's reduction: ``benchmarks/dp_step.py --gram_windows``)
GRAM_WINDOWS = False
#: the smallest layer (window entries C_in k_h k_w, output positions) where the kernel beat the unfold path
MIN_WINDOW, MIN_POSITIONS = 288, 64
_MAX_INDEX = 2**31 - 1  # the kernel's offsets are 32-bit


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def supports(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the kernel computes this convolution's norms: float32 tensors, one group, numeric zero padding,
    and offsets that fit in 32 bits."""
    return (isinstance(layer, nn.Conv2d) and a.dtype == torch.float32 and g.dtype == torch.float32
            and layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            and max(a.numel(), g.numel()) <= _MAX_INDEX)


def tile_for(layer: nn.Conv2d, g: torch.Tensor) -> tuple[int, int, int] | None:
    """The tile (output channels, window entries, rows per product) measured fastest for this layer's shape, or
    None where the unfold path was faster: fewer than ``MIN_WINDOW`` window entries or ``MIN_POSITIONS`` output
    positions (see the module docstring)."""
    kh, kw = layer.kernel_size
    if layer.in_channels * kh * kw < MIN_WINDOW or g.shape[-2] * g.shape[-1] < MIN_POSITIONS:
        return None
    return (64, 64, 32) if layer.out_channels >= 64 else (32, 32, 64)


def applies(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the engine uses the kernel: on CUDA tensors it :func:`supports`, of a shape where it is faster
    (:func:`tile_for`), with Triton installed."""
    return (ENABLED and a.is_cuda and supports(layer, a, g) and tile_for(layer, g) is not None
            and triton_available())


def forms(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, batch: int) -> bool:
    """Whether the engine forms this layer's ``batch`` per-example gradients with the kernel: where it
    :func:`applies` and their offsets fit in 32 bits."""
    return applies(layer, a, g) and batch * layer.weight.numel() <= _MAX_INDEX


@functools.cache
def _kernel():  # built on first use, so that importing fedgen never needs Triton
    import triton
    import triton.language as tl

    @triton.jit
    def conv2d_weight_per_example_kernel(a_ptr, g_ptr, out_ptr, c_in, height, width, c_out, out_w, positions,
                                         stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, draws, d_in, rows,
                                         tiles_in, KH: tl.constexpr, KW: tl.constexpr, BM: tl.constexpr,
                                         BN: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
                                         FORM: tl.constexpr):
        tile = tl.program_id(0)  # the tiles of one example run side by side and share its data in cache
        example = tl.program_id(1)
        o = (tile // tiles_in) * BM + tl.arange(0, BM)  # output channels
        j = (tile % tiles_in) * BN + tl.arange(0, BN)  # window entries (input channel, kernel row, column)
        channel, kernel_row, kernel_col = j // (KH * KW), (j % (KH * KW)) // KW, j % KW
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for start in range(0, rows, BR):
            r = start + tl.arange(0, BR)  # (draw, output row, output column) of the example
            row = example * draws + r // positions
            position = r % positions
            out_row, out_col = position // out_w, position % out_w
            # both tiles are loaded with the positions as their last (fastest) dimension, along which neighbouring
            # output columns sit next to each other in memory
            g = tl.load(g_ptr + (row[None, :] * c_out + o[:, None]) * positions + position[None, :],
                        mask=(o[:, None] < c_out) & (r[None, :] < rows), other=0.0)  # (BM, BR)
            in_row = kernel_row[:, None] * dil_h + out_row[None, :] * stride_h - pad_h  # (BN, BR)
            in_col = kernel_col[:, None] * dil_w + out_col[None, :] * stride_w - pad_w
            inside = ((j[:, None] < d_in) & (r[None, :] < rows) & (in_row >= 0) & (in_row < height)
                      & (in_col >= 0) & (in_col < width))
            x = tl.load(a_ptr + ((row[None, :] * c_in + channel[:, None]) * height + in_row) * width + in_col,
                        mask=inside, other=0.0)  # (BN, BR)
            acc += tl.dot(g, tl.trans(x), input_precision=PRECISION)
        if FORM:  # the tile of G_i itself, at (example, output channel, window entry)
            tl.store(out_ptr + (example * c_out + o[:, None]) * d_in + j[None, :], acc,
                     mask=(o[:, None] < c_out) & (j[None, :] < d_in))
        else:  # the tile's sum of squares
            tl.store(out_ptr + example * tl.num_programs(0) + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))

    return conv2d_weight_per_example_kernel


def _launch(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int, tile: tuple[int, int, int] | None,
            precision: str, form: bool) -> torch.Tensor:
    """Run the kernel: per example, each tile's sum of squares (batch, tiles), or ``G_i`` (batch, c_out, d_in)."""
    a, g = a.contiguous(), g.contiguous()
    rows, c_in, height, width = a.shape
    _, c_out, out_h, out_w = g.shape
    draws = rows // batch
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    block_out, block_in, block_rows = tile or tile_for(layer, g) or (32, 32, 64)
    d_in = c_in * kh * kw
    tiles_in = -(-d_in // block_in)
    tiles = -(-c_out // block_out) * tiles_in
    if form and batch * c_out * d_in > _MAX_INDEX:
        raise ValueError(f"{batch} per-example gradients of {c_out * d_in} values exceed the kernel's 32-bit offsets")
    out = torch.empty((batch, c_out, d_in) if form else (batch, tiles), device=a.device, dtype=torch.float32)
    _kernel()[(tiles, batch)](a, g, out, c_in, height, width, c_out, out_w, out_h * out_w, sh, sw, ph, pw, dh,
                              dw, draws, d_in, draws * out_h * out_w, tiles_in, KH=kh, KW=kw, BM=block_out,
                              BN=block_in, BR=block_rows, PRECISION=precision, FORM=form)
    return out


@functools.cache
def _gram_kernel():  # built on first use, as _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def gram_window_kernel(m_ptr, gamma_ptr, out_ptr, side_m, side_g, image, positions, out_w, width, stride_h,
                           stride_w, dil_h, dil_w, KH: tl.constexpr, KW: tl.constexpr, BT: tl.constexpr,
                           BS: tl.constexpr):
        tile = tl.program_id(0)  # a block of rows t of Gamma_i
        example = tl.program_id(1).to(tl.int64)
        m = m_ptr + example * side_m * side_m
        gamma = gamma_ptr + example * side_g * side_g
        t = tile * BT + tl.arange(0, BT)  # (draw, output row, output column)
        # the window corner of position t among the example's padded pixels (draw, row, column)
        corner_t = ((t // positions) * image + ((t % positions) // out_w) * stride_h * width
                    + (t % positions % out_w) * stride_w)
        acc = tl.zeros((BT, BS), dtype=tl.float32)
        for start in range(0, side_g, BS):
            s = start + tl.arange(0, BS)
            corner_s = ((s // positions) * image + ((s % positions) // out_w) * stride_h * width
                        + (s % positions % out_w) * stride_w)
            inside = (t[:, None] < side_g) & (s[None, :] < side_g)
            windows = tl.zeros((BT, BS), dtype=tl.float32)  # a_t . a_s = sum_d M_i[p(t) + d, p(s) + d]
            for u in tl.static_range(KH):
                for v in tl.static_range(KW):
                    d = u * dil_h * width + v * dil_w
                    windows += tl.load(m + (corner_t[:, None] + d) * side_m + corner_s[None, :] + d, mask=inside,
                                       other=0.0)
            acc += windows * tl.load(gamma + t[:, None] * side_g + s[None, :], mask=inside, other=0.0)
        tl.store(out_ptr + example * tl.num_programs(0) + tile, tl.sum(tl.sum(acc, axis=1), axis=0))

    return gram_window_kernel


def gram_applies(gram: torch.Tensor) -> bool:
    """Whether the engine sums a Gram matrix's windows with :func:`gram_window_sq_norms`: where
    ``GRAM_WINDOWS`` is set, on float32 CUDA tensors, with Triton installed."""
    return GRAM_WINDOWS and ENABLED and gram.is_cuda and gram.dtype == torch.float32 and triton_available()


def gram_window_sq_norms(layer: nn.Conv2d, gram: torch.Tensor, gamma: torch.Tensor, padded_size: tuple[int, int],
                         out_size: tuple[int, int], *, tile: tuple[int, int] = (32, 64)) -> torch.Tensor:
    """``||G_i||_F^2 = sum_{t,s} (sum_d M_i[p(t) + d, p(s) + d]) Gamma_i[t, s]`` for each example: ``gram``
    (b, K P, K P) holds ``M_i``, the Gram matrix of its K padded inputs of ``padded_size`` pixels, and ``gamma``
    (b, K T, K T) the Gram matrix ``Gamma_i`` of its output gradients at ``out_size`` positions; ``p(t)`` is the
    window corner of position t and d runs over the kernel's offsets (``per_example._conv2d_gram_sq_norms``).
    IEEE float32 multiply-adds, as the engine's other norm products. Only where :func:`gram_applies` holds (or
    on the CPU under Triton's interpreter, for tests). ``tile``: rows of ``Gamma_i`` a program takes, and columns
    a step (powers of two)."""
    gram, gamma = gram.contiguous(), gamma.contiguous()
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    (height, width), (out_h, out_w) = padded_size, out_size
    batch, side_m, side_g = gram.shape[0], gram.shape[1], gamma.shape[1]
    if side_m * side_m > _MAX_INDEX or side_g * side_g > _MAX_INDEX:
        raise ValueError(f"Gram matrices of {side_m} and {side_g} rows exceed the kernel's 32-bit offsets")
    tiles = -(-side_g // tile[0])
    out = torch.empty(batch, tiles, device=gram.device, dtype=torch.float32)
    _gram_kernel()[(tiles, batch)](gram, gamma, out, side_m, side_g, height * width, out_h * out_w, out_w, width,
                                   sh, sw, dh, dw, KH=kh, KW=kw, BT=tile[0], BS=tile[1])
    return out.sum(1)


def conv2d_weight_sq_norms(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int, *,
                           tile: tuple[int, int, int] | None = None, precision: str = "ieee") -> torch.Tensor:
    """``||G_i||_F^2`` for each of ``batch`` examples, from the layer input ``a`` (batch K rows) and output
    gradient ``g``; the K rows of an example count as more positions. Only where :func:`applies` holds (or on
    the CPU under Triton's interpreter, for tests). ``tile`` (output channels, window entries, rows; powers of
    two, at least 16; default :func:`tile_for`'s) and ``precision`` (Triton's ``input_precision``: ``"ieee"``, or
    ``"tf32x3"``, float32 accuracy from three TF32 tensor-core products) are for measurements."""
    return _launch(layer, a, g, batch, tile, precision, form=False).sum(1)


def conv2d_weight_per_example(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int, *,
                              tile: tuple[int, int, int] | None = None, precision: str = "ieee") -> torch.Tensor:
    """``G_i`` itself for each of ``batch`` examples, (batch, *weight.shape): the same tiles as
    :func:`conv2d_weight_sq_norms`, each written out instead of reduced (the engine forms a layer's
    per-example gradients where they are small, see ``per_example.forms_weight``). ``precision``: Triton's
    ``input_precision``, "ieee" or "tf32" (``per_example.FORM_PRECISION``)."""
    return _launch(layer, a, g, batch, tile, precision, form=True).view(batch, *layer.weight.shape)
