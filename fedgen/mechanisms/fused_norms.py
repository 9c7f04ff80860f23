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

More kernels serve the engine's other memory-bound steps on a GPU, each behind a switch for A/B measurements:

- :func:`gram_window_sq_norms` (on by default), for the convolution norms the engine takes from the input's Gram
  matrix ``M_i`` (``per_example._conv2d_gram_sq_norms``): for each pair of output rows it adds the k_h k_w
  shifted windows of ``M_i`` as tiles of output columns, skipping the padding's pixels, and contracts them with the
  output gradient's Gram matrix ``Gamma_i``, so the windows' sum is never written to memory, where the engine's
  PyTorch path pads the input, writes the column sums and the windows' sum and reads both back. (An earlier kernel
  that formed ``Gamma_i`` tile by tile and gathered the windows of square tiles of positions took 1.30 ms for the
  ConvNet's 14x14 layer at batch 1024, against 0.63 ms for the separable sums in PyTorch);
- :func:`row_sums` (on by default), ``sum_p g_p x_hat_p`` (from group statistics) and ``sum_p g_p`` over each row
  of two tensors in one read of each, for the per-example affine gradients of ``GroupNorm``
  (``per_example._group_norm``);
- :func:`group_norm_input_grad` (on by default), GroupNorm's input gradient from those row sums, in one read of the
  input and output gradient, so that the row sums are GroupNorm's own backward reduction and cost no pass of their
  own;
- :func:`cleared_low_bits` (on by default), the bit operations of ``precision.round_to_tf32`` in one read and one
  write of the tensor where PyTorch takes two of each.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

#: whether the engine may use the kernel (set False for A/B measurements against the unfold path)
ENABLED = True
#: whether the engine contracts the Gram path's windows with :func:`gram_window_sq_norms` (else it sums them
#: separably in PyTorch). On by measurement (one H200, 2026-12-03, docs/benchmarks.md): the ConvNet's step at batch 1024
#: took 11.38 and 11.43 ms eager with it against 12.23 and 12.28 ms, 11.22 and 11.47 ms graphed against 12.45 and
#: 12.51 ms, and graphed at batch 256 3.44 and 3.55 ms against 3.98 ms; the UNet's at batch 1024 179.41 against
#: 180.64 ms, graphed at 256 50.85 against 50.92 ms. (In those runs it read the padded input's Gram matrix; it now
#: reads the unpadded input's, and with :func:`cleared_low_bits` the step at batch 1024 took 10.84 to 11.01 ms eager.)
GRAM_WINDOWS = True
#: whether ``precision.round_to_tf32`` and ``truncate_to_tf32`` clear the low bits with :func:`cleared_low_bits` on a
#: GPU (one read and one write) rather than by two PyTorch operators (an add and a bitwise and, each a read and a
#: write). On by measurement (one H200, 2026-12-03): the ConvNet's step at batch 1024 10.86 and 10.84 ms eager with it
#: against 11.01 and 11.09 ms; the kernel took 0.128 ms a step where the two operators took 0.246 ms
LOW_BITS = True
#: whether the engine takes GroupNorm's per-example sums from :func:`row_sums` (else PyTorch's GroupNorm backward).
#: On by measurement (one H200, 2026-12-03, the afternoon's runs): the ConvNet's step at batch 1024 0.13 to 0.30 ms
#: faster, eager and graphed; per layer 0.35 against 0.61 ms at 128 channels, 28x28, batch 1024
ROW_SUMS = True
#: whether the engine gives GroupNorm the backward pass of :func:`group_norm_input_grad` on a GPU, which takes the
#: input gradient from the row sums that the per-example gradients need anyway, where PyTorch's GroupNorm backward
#: reads the input and output gradient once more for the same sums (``per_example.GroupNormFromRowSums``). On by
#: measurement (one H200, 2026-12-04, docs/benchmarks.md; two rounds each, on against off): the ConvNet's step at batch
#: 1024 took 9.82 and 9.77 ms eager against 10.77 and 10.81 ms (non-private about 9.45 ms), 9.89 and 9.76 ms graphed
#: against 10.58 and 10.71 ms, and graphed at batch 256 2.95 and 2.89 ms against 3.11 and 3.32 ms; the UNet's at batch
#: 1024 171.15 against 176.29 ms (K = 1) and 622.92 against 643.75 ms (K = 4)
GROUP_NORM_BACKWARD = True
#: the smallest layer (window entries C_in k_h k_w, output positions) where the kernel beat the unfold path. 144 (was
#: 288) takes the diffusion examples' 16-channel convolutions at 28x28 off the unfold path, whose windows' copy and
#: product took about 8 ms a layer at 4,096 examples x 4 draws: on one H200 (2026-12-03, docs/benchmarks.md) the
#: epsilon-10 example's step took 441.93 and 442.53 ms against 450.44 and 449.34 ms, the epsilon-1 example's (2,048 x
#: 8) 410.29 against 419.23 ms; the benchmark's ConvNet and UNet have no window between 144 and 288
MIN_WINDOW, MIN_POSITIONS = 144, 64
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


def conv2d_weight_sq_norms(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int, *,
                           tile: tuple[int, int, int] | None = None, precision: str = "ieee") -> torch.Tensor:
    """``||G_i||_F^2`` for each of ``batch`` examples, from the layer input ``a`` (batch K rows) and output
    gradient ``g``; the K rows of an example count as more positions. Only where :func:`applies` holds (or on
    the CPU under Triton's interpreter, for tests). ``tile`` (output channels, window entries, rows; powers of
    two, at least 16; default :func:`tile_for`'s) is for measurements. ``precision`` is Triton's ``input_precision``:
    ``"ieee"``; ``"tf32"`` where ``a`` and ``g`` are TF32 values already, whose products are then exact
    (``per_example.BOOK_PRECISION``); or ``"tf32x3"``, float32 accuracy from three TF32 tensor-core products, for
    measurements."""
    return _launch(layer, a, g, batch, tile, precision, form=False).sum(1)


def conv2d_weight_per_example(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int, *,
                              tile: tuple[int, int, int] | None = None, precision: str = "ieee") -> torch.Tensor:
    """``G_i`` itself for each of ``batch`` examples, (batch, *weight.shape): the same tiles as
    :func:`conv2d_weight_sq_norms`, each written out instead of reduced (the engine forms a layer's
    per-example gradients where they are small, see ``per_example.forms_weight``). ``precision``: Triton's
    ``input_precision``, "ieee" or "tf32" (``per_example.FORM_PRECISION``)."""
    return _launch(layer, a, g, batch, tile, precision, form=True).view(batch, *layer.weight.shape)


@functools.cache
def _gram_kernel():  # built on first use, as _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def gram_window_kernel(m_ptr, gamma_ptr, out_ptr, side_m, side_g, height, width, out_h, out_w, stride_h,
                           stride_w, pad_h, pad_w, dil_h, dil_w, KH: tl.constexpr, KW: tl.constexpr,
                           BJ: tl.constexpr):
        r = tl.program_id(0)  # one of the example's K out_h output rows: (draw, output row)
        example = tl.program_id(1).to(tl.int64)
        rows = tl.num_programs(0)
        m = m_ptr + example * side_m * side_m
        gamma = gamma_ptr + example * side_g * side_g
        j = tl.arange(0, BJ)  # output columns
        inside = (j[:, None] < out_w) & (j[None, :] < out_w)
        # the windows' corners in input pixels (the padding's rows and columns lie outside the input: zeros)
        image, top, left = (r // out_h) * height * width, (r % out_h) * stride_h - pad_h, j * stride_w - pad_w
        acc = tl.zeros((BJ, BJ), dtype=tl.float32)
        for r2 in range(r, rows):  # both matrices are symmetric: a pair of rows r2 > r stands for (r2, r) too
            image2, top2 = (r2 // out_h) * height * width, (r2 % out_h) * stride_h - pad_h
            windows = tl.zeros((BJ, BJ), dtype=tl.float32)  # a_t . a_s = sum_d M_i[q(t) + d, q(s) + d]
            for u in tl.static_range(KH):
                y, y2 = top + u * dil_h, top2 + u * dil_h
                rows_in = (y >= 0) & (y < height) & (y2 >= 0) & (y2 < height)
                for v in tl.static_range(KW):
                    x = left + v * dil_w
                    cols_in = (x >= 0) & (x < width)
                    pixel, pixel2 = image + y * width + x, image2 + y2 * width + x
                    windows += tl.load(m + pixel[:, None] * side_m + pixel2[None, :],
                                       mask=inside & rows_in & cols_in[:, None] & cols_in[None, :], other=0.0)
            g = tl.load(gamma + (r * out_w + j[:, None]) * side_g + r2 * out_w + j[None, :], mask=inside, other=0.0)
            acc += tl.where(r2 == r, 1.0, 2.0) * windows * g
        tl.store(out_ptr + example * rows + r, tl.sum(tl.sum(acc, axis=1), axis=0))

    return gram_window_kernel


def _cuda_float32(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can take these tensors: float32 on a CUDA device, with Triton installed."""
    return all(t.is_cuda and t.dtype == torch.float32 for t in tensors) and triton_available()


def gram_applies(a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the engine contracts a Gram matrix's windows with :func:`gram_window_sq_norms`: where
    ``GRAM_WINDOWS`` is set, on float32 CUDA tensors (the layer input and output gradient), with Triton installed."""
    return GRAM_WINDOWS and _cuda_float32(a, g)


def gram_window_sq_norms(layer: nn.Conv2d, gram: torch.Tensor, gamma: torch.Tensor, input_size: tuple[int, int],
                         out_size: tuple[int, int], *, warps: int | None = None) -> torch.Tensor:
    """``||G_i||_F^2 = sum_{t,s} (sum_d M_i[q(t) + d, q(s) + d]) Gamma_i[t, s]`` for each example: ``gram``
    (b, K P, K P) holds ``M_i``, the Gram matrix of its K inputs of ``input_size`` pixels (without the padding), and
    ``gamma`` (b, K T, K T) ``Gamma_i``, its output gradients' Gram matrix over the K T positions of ``out_size``;
    ``q(t)`` is the corner of position t's window and d runs over the kernel's offsets
    (``per_example._conv2d_gram_sq_norms``); pixels of the zero padding are skipped, their entries being zero.
    One program per example and output row visits the rows at or after its own; for each pair of rows it sums the
    k_h k_w windows of ``M_i`` as tiles of output columns (their entries side by side in memory) and contracts them
    with the pair's tile of ``Gamma_i``, so the windows' sum is never written. IEEE float32. Only where
    :func:`gram_applies` holds (or on the CPU under Triton's interpreter, for tests). ``warps``: Triton's
    ``num_warps`` (default: one per 64 entries of a tile, at most 4)."""
    import triton

    gram, gamma = gram.contiguous(), gamma.contiguous()
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    (height, width), (out_h, out_w) = input_size, out_size
    batch, side_m, side_g = gram.shape[0], gram.shape[1], gamma.shape[1]
    if side_m * side_m > _MAX_INDEX or side_g * side_g > _MAX_INDEX:
        raise ValueError(f"Gram matrices of {side_m} or {side_g} rows exceed the kernel's 32-bit offsets")
    rows, block = side_g // out_w, max(4, triton.next_power_of_2(out_w))
    out = torch.empty(batch, rows, device=gram.device, dtype=torch.float32)
    _gram_kernel()[(rows, batch)](gram, gamma, out, side_m, side_g, height, width, out_h, out_w, sh, sw, ph, pw, dh,
                                  dw, KH=kh, KW=kw, BJ=block, num_warps=warps or max(1, min(4, block * block // 64)))
    return out.sum(1)


@functools.cache
def _row_sums_kernel():  # built on first use, as _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def row_sums_kernel(a_ptr, g_ptr, mean_ptr, rstd_ptr, gx_ptr, g_sum_ptr, rows, length, per_group,
                        BR: tl.constexpr, BL: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        ga = tl.zeros((BR, BL), dtype=tl.float32)
        gs = tl.zeros((BR, BL), dtype=tl.float32)
        for start in range(0, length, BL):
            p = start + tl.arange(0, BL)
            mask = (r[:, None] < rows) & (p[None, :] < length)
            g = tl.load(g_ptr + r[:, None] * length + p[None, :], mask=mask, other=0.0)
            a = tl.load(a_ptr + r[:, None] * length + p[None, :], mask=mask, other=0.0)
            ga += g * a
            gs += g
        g_rows = tl.sum(gs, axis=1)
        # sum g (a - mu) r_std = (sum g a - mu sum g) r_std, with the statistics of the row's group
        mean = tl.load(mean_ptr + r // per_group, mask=r < rows, other=0.0)
        rstd = tl.load(rstd_ptr + r // per_group, mask=r < rows, other=0.0)
        tl.store(gx_ptr + r, (tl.sum(ga, axis=1) - g_rows * mean) * rstd, mask=r < rows)
        tl.store(g_sum_ptr + r, g_rows, mask=r < rows)

    return row_sums_kernel


def row_sums_apply(a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the engine takes row sums from :func:`row_sums`: where ``ROW_SUMS`` is set, on float32 CUDA
    tensors, with Triton installed."""
    return ROW_SUMS and _cuda_float32(a, g)


def row_sums(a: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
             per_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_p g[r, p] x_hat[r, p], sum_p g[r, p])`` for each row r of two float32 tensors of one shape (rows,
    length), ``x_hat = (a - mean) rstd`` with the statistics of the row's group (``rows / per_group`` of each, for
    groups of ``per_group`` consecutive rows): GroupNorm's per-example affine gradients, the first taken as
    ``(sum g a - mean sum g) rstd``, in one read of each tensor (float32 sums). Only where :func:`row_sums_apply`
    holds (or on the CPU under Triton's interpreter, for tests)."""
    a, g, mean, rstd, grid, block_rows, block = _by_rows(a, g, mean, rstd, per_group)
    rows, length = a.shape
    gx = torch.empty(rows, device=a.device, dtype=torch.float32)
    g_sum = torch.empty_like(gx)
    _row_sums_kernel()[grid](a, g, mean, rstd, gx, g_sum, rows, length, per_group, BR=block_rows, BL=block)
    return gx, g_sum


def _by_rows(a: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, per_group: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int], int, int]:
    """The row kernels' operands and launch: ``a``, ``g``, ``mean`` and ``rstd`` contiguous, the grid, rows per
    block and positions per block, after checking the group statistics (one per group of ``per_group`` rows)."""
    import triton

    rows, length = a.shape
    if mean.shape != (rows // per_group,) or rstd.shape != mean.shape:
        raise ValueError(f"mean and rstd must both have shape ({rows // per_group},), one per group of {per_group} "
                         "rows")
    block = min(512, triton.next_power_of_2(length))
    block_rows = max(1, 2048 // block)
    return (a.contiguous(), g.contiguous(), mean.contiguous(), rstd.contiguous(), (-(-rows // block_rows),),
            block_rows, block)


@functools.cache
def _group_norm_input_grad_kernel():  # built on first use, as _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def group_norm_input_grad_kernel(a_ptr, g_ptr, mean_ptr, rstd_ptr, w_ptr, gx_ptr, g_sum_ptr, out_ptr, rows,
                                     length, per_group, channels, scale, BR: tl.constexpr, BL: tl.constexpr,
                                     BG: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        live = r < rows
        group = r // per_group
        # the sums over the row's group of w_c sum g x_hat and w_c sum g, from the row sums of its channels
        j = tl.arange(0, BG)
        peers = group[:, None] * per_group + j[None, :]
        take = live[:, None] & (j[None, :] < per_group)
        w_peers = tl.load(w_ptr + peers % channels, mask=take, other=0.0)
        w_gx = tl.sum(w_peers * tl.load(gx_ptr + peers, mask=take, other=0.0), axis=1)
        w_g = tl.sum(w_peers * tl.load(g_sum_ptr + peers, mask=take, other=0.0), axis=1)
        mean = tl.load(mean_ptr + group, mask=live, other=0.0)
        rstd = tl.load(rstd_ptr + group, mask=live, other=0.0)
        k_g = rstd * tl.load(w_ptr + r % channels, mask=live, other=0.0)
        k_a = -w_gx * rstd * rstd * scale
        k_1 = -k_a * mean - w_g * rstd * scale
        for start in range(0, length, BL):
            p = start + tl.arange(0, BL)
            mask = live[:, None] & (p[None, :] < length)
            g = tl.load(g_ptr + r[:, None] * length + p[None, :], mask=mask, other=0.0)
            a = tl.load(a_ptr + r[:, None] * length + p[None, :], mask=mask, other=0.0)
            tl.store(out_ptr + r[:, None] * length + p[None, :], k_g[:, None] * g + k_a[:, None] * a + k_1[:, None],
                     mask=mask)

    return group_norm_input_grad_kernel


def group_norm_input_grad(a: torch.Tensor, g: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                          weight: torch.Tensor, gx: torch.Tensor, g_sum: torch.Tensor, per_group: int) -> torch.Tensor:
    """GroupNorm's input gradient from the row sums of :func:`row_sums`, for float32 tensors ``a`` (the layer input)
    and ``g`` (the output gradient) of shape (rows, length), rows ordered example by example and channel by channel,
    in groups of ``per_group`` consecutive rows with statistics ``mean`` and ``rstd``; ``weight`` (C,) the scale
    (channel ``r % C`` of row r), ``gx = sum_p g x_hat`` and ``g_sum = sum_p g`` per row. With M = per_group * length
    values in a group and ``x_hat = (a - mu) r``,

        dL/da = r (w g - (1/M) sum_group w g - x_hat (1/M) sum_group w g x_hat)
              = k_g g + k_a a + k_1,  k_g = r w, k_a = -r^2 S_x / M, k_1 = -k_a mu - r S_g / M,

    with ``S_x = sum_c w_c gx_c`` and ``S_g = sum_c w_c g_sum_c`` over the group's channels: the formula of PyTorch's
    GroupNorm backward, whose own sums these are. One read of ``a`` and ``g`` and one write. Only where
    :func:`row_sums_apply` holds (or on the CPU under Triton's interpreter, for tests)."""
    import triton

    rows, length = a.shape
    if g.shape != a.shape or gx.shape != (rows,) or g_sum.shape != (rows,) or rows % per_group:
        raise ValueError(f"a and g must have one shape (rows, length) and gx, g_sum one value a row; got "
                         f"{tuple(a.shape)}, {tuple(g.shape)}, {tuple(gx.shape)}, {tuple(g_sum.shape)} for groups of "
                         f"{per_group} rows")
    a, g, mean, rstd, grid, block_rows, block = _by_rows(a, g, mean, rstd, per_group)
    out = torch.empty_like(a)
    _group_norm_input_grad_kernel()[grid](
        a, g, mean, rstd, weight.contiguous(), gx.contiguous(), g_sum.contiguous(), out,
        rows, length, per_group, weight.numel(), 1.0 / (per_group * length), BR=block_rows, BL=block,
        BG=triton.next_power_of_2(per_group))
    return out


@functools.cache
def _low_bits_kernel():  # built on first use, as _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def low_bits_kernel(bits_ptr, out_ptr, n, offset, keep, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + i, (tl.load(bits_ptr + i, mask=i < n) + offset) & keep, mask=i < n)

    return low_bits_kernel


def low_bits_apply(bits: torch.Tensor) -> bool:
    """Whether :func:`cleared_low_bits` takes this tensor: where ``LOW_BITS`` is set, an int32 CUDA tensor, with
    Triton installed."""
    return LOW_BITS and bits.is_cuda and bits.dtype == torch.int32 and triton_available()


def cleared_low_bits(bits: torch.Tensor, offset: int, low: int) -> torch.Tensor:
    """``(bits + offset) & ~low`` for a contiguous int32 tensor, in one read and one write (32-bit wrap-around, as
    PyTorch's operators): the bit patterns of float32 values rounded to fewer mantissa bits
    (``precision.round_to_tf32``). Only where :func:`low_bits_apply` holds (or on the CPU under Triton's interpreter,
    for tests)."""
    if not bits.is_contiguous():
        raise ValueError("cleared_low_bits takes a contiguous tensor (call .contiguous() first)")
    out = torch.empty_like(bits)
    block = 2048
    _low_bits_kernel()[(max(1, -(-bits.numel() // block)),)](bits, out, bits.numel(), offset, ~low, BLOCK=block)
    return out
