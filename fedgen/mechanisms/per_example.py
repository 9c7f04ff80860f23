"""fedgen's per-example clipping engine: one backward pass for the layer outputs, clipping by book-keeping.

Opacus' hooks let autograd compute every weight gradient and then compute every per-example gradient
again. Here (after the book-keeping method of Bu et al., ICML 2023) the forward pass records each layer's
input ``a_l`` and puts a hook on its output ``z_l``; one backward pass computes the output gradients
``g_l = dL/dz_l`` and hands each to its hook as soon as it exists (autograd is asked only for one small
parameter per layer, a bias or a normalization weight, so it skips the large weight gradients and pins no
layer output). A layer whose parameters are all small (GroupNorm, LayerNorm, Embedding) turns ``g_l`` into
its per-example gradients at once and keeps only those (on a GPU GroupNorm's backward then takes its input gradient
from the same sums, :class:`GroupNormFromRowSums`); a ``Linear`` or ``Conv2d`` layer keeps ``(a_l, g_l)``
until the clip factors are known, unless its per-example weight gradients hold at most ``FORM_RATIO`` times the
values of that pair (:func:`forms_weight`: few weights, many positions, e.g. a UNet's high-resolution
convolutions): then it forms them at once too, and they are both the norms' input and the sums' (no second
weight-gradient product). Then:

1. per-example squared gradient norms over all trainable parameters, summed over layers (flat clipping).
   The weights of ``Linear`` and ``Conv2d`` (a Linear layer over its unfolded positions) are a sum of T outer
   products per example, whose norm is taken by the ghost norm ``sum_{t,s} (a_t . a_s)(g_t . g_s)`` when
   ``T (d_in + d_out) <= d_in d_out`` (fewer multiplications; Li et al., ICLR 2022) and otherwise by forming
   the example's gradient, a few examples at a time (nothing is kept). A convolution takes the cheapest of
   these and a third: the ghost norm from the Gram matrix of its padded input, whose shifted windows give
   the unfolded input's (:func:`_conv2d_gram_sq_norms`). Parameters with few values per
   example have their per-example gradients formed, all in one (B, P) matrix: the biases (``sum g_i``), the
   affine parameters of ``GroupNorm`` and ``LayerNorm`` (``sum g_i * x_hat_i`` with ``x_hat`` the normalized
   input) and ``Embedding`` (``g_i`` scattered into the rows example i used);
2. the clip factors ``c_i = min(1, C / (||grad_i|| + 1e-6))`` (Opacus' rule; with TF32 clipped sums the norm
   carries a rounding margin, :data:`TF32_SUMS`);
3. the clipped sums: for the book-kept weights of ``Linear`` and ``Conv2d`` one weight-gradient product of the
   output gradients scaled row by row by ``c_i`` (the kernel non-private training runs, e.g. cuDNN's for
   convolutions); for the formed gradients one product ``c^T G``. They are added to ``p.summed_grad``.

Steps 1 to 3 run in IEEE float32 (TF32 and autocast off, lower-precision inputs and output gradients
converted exactly; see :func:`~fedgen.mechanisms.precision.ieee_fp32`), so that each example adds at most C; or,
with ``BOOK_PRECISION = "tf32"`` (every book-kept layer) or ``"auto"`` (the default: the layers with many
multiply-adds, on a CUDA device), the book-kept products on TF32 tensor cores from operands rounded to TF32 values,
which makes them exact as well.
The formed per-example gradients are made in the hooks with autocast off but TF32 allowed: a formed gradient
is both the norm's input and the sum's, so how its products were rounded cannot move it past its bound.

Every trainable parameter of the module must sit in one of these layers (checked when the engine is
built), so none escapes clipping. Parameters must be used only through their layer's forward: a direct use
(``x @ layer.weight``) is not recorded, so its gradient is missing from the update (never unclipped in it).
A layer called several times in one forward pass adds its per-example
gradients over the calls. The loss is the *mean* over the batch (as in Opacus with
``loss_reduction="mean"``): per-example gradients are ``B`` times the gradients of the mean.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedgen.errors import ConfigError
from fedgen.mechanisms import fused_norms
from fedgen.mechanisms.precision import (
    exact_float32,
    float32_products,
    ieee_fp32,
    matmul_precision,
    round_to_tf32,
    split_tf32,
    truncate_to_tf32,
)

PerExampleRule = Callable[[nn.Module, torch.Tensor, torch.Tensor, int, Any], dict[str, torch.Tensor]]
"""``rule(layer, a, g, batch, node)``: per-example gradients (first dimension ``batch``) from the layer input ``a``
and output gradient ``g``, whose first dimension holds ``batch * K`` rows, the K rows of an example together
(K noise draws per example); the K rows of an example are treated as more positions of one sequence. ``node``
is the autograd node of the layer's output (its ``grad_fn``, or None), from which a rule may read what the
forward pass saved instead of computing it again."""


#: elements of a temporary (unfolded inputs, per-example gradients) above which work is split over examples. 2^28
#: (1 GiB in float32): on an H200 the peak memory of every measured step was the same as with 2^24 (docs/benchmarks.md,
#: "The norms' chunk size"), and the UNet's step at batch 256 launches 300 kernels fewer (one chunk a layer).
CHUNK_ELEMENTS = 2**28


def _operand_products(precision: str) -> contextlib.AbstractContextManager:
    """Products of a layer's book-kept operands themselves (its input and output gradient, or copies, windows and
    paddings of them): at the layer's book-keeping ``precision`` (:func:`book_precision`), exact in either.
    Products of derived values (a Gram matrix with another) stay IEEE."""
    return float32_products("tf32") if precision == "tf32" else contextlib.nullcontext()


def _sum_dim1(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(1)``, without a kernel launch when dimension 1 has one entry (one draw, one group, one position)."""
    return t.squeeze(1) if t.shape[1] == 1 else t.sum(1)


def _sum_over_parts(weighted_sum: Callable, layer: nn.Module, a: torch.Tensor,
                    parts: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """``weighted_sum(layer, a, part)`` added over the parts of a scaled output gradient: the gradient itself, or its
    two TF32 halves (:func:`book_precision`)."""
    return functools.reduce(operator.add, (weighted_sum(layer, a, part) for part in parts))


def _rows_sq_norms(t: torch.Tensor) -> torch.Tensor:
    """``||t_n||^2`` for each row n of ``t`` (contiguous), as one batched dot product."""
    flat = t.reshape(t.shape[0], 1, -1)
    return torch.bmm(flat, flat.transpose(1, 2)).reshape(-1)


def _positions_sq_norms(x: torch.Tensor, g: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """``||g_n^T x_n||_F^2`` for each row n of ``x`` (N, T, d_in) and ``g`` (N, T, d_out), the squared norm of a
    sum of T outer products, by whichever of two exact methods takes fewer multiplications: the ghost norm
    (Li et al., ICLR 2022) ``sum_{t,s} (x_t . x_s) (g_t . g_s)``, ``T^2 (d_in + d_out)`` of them, or forming
    ``g_n^T x_n``, ``T d_in d_out``. ``precision``: of the products of ``x`` and ``g`` (:func:`_operand_products`)."""
    n, t, d_in = x.shape
    d_out = g.shape[-1]
    if t * (d_in + d_out) <= d_in * d_out:
        with _operand_products(precision):
            xx, gg = torch.bmm(x, x.transpose(1, 2)), torch.bmm(g, g.transpose(1, 2))
        return torch.bmm(xx.reshape(n, 1, -1), gg.reshape(n, -1, 1)).reshape(n)  # <xx_n, gg_n>, no temporary
    step = max(1, CHUNK_ELEMENTS // (d_in * d_out))
    parts = []
    for i in range(0, n, step):
        with _operand_products(precision):
            formed = torch.bmm(g[i:i + step].transpose(1, 2), x[i:i + step])
        parts.append(_rows_sq_norms(formed))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _linear_weight_sq_norms(layer: nn.Linear, calls: list[tuple[torch.Tensor, torch.Tensor]],
                            batch: int, precision: str = "ieee") -> torch.Tensor:
    """Per-example squared norms of the weight gradient ``sum_t g_t a_t^T`` over the positions of all calls."""
    x = torch.cat([a.reshape(batch, -1, a.shape[-1]) for a, _ in calls], 1) if len(calls) > 1 else \
        calls[0][0].reshape(batch, -1, calls[0][0].shape[-1])
    g = torch.cat([g.reshape(batch, -1, g.shape[-1]) for _, g in calls], 1) if len(calls) > 1 else \
        calls[0][1].reshape(batch, -1, calls[0][1].shape[-1])
    return _positions_sq_norms(x, g, precision)


def _linear_weight_per_example(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, batch: int) -> torch.Tensor:
    """Example i's weight gradient ``sum_t g_t a_t^T`` over its positions (and K rows), (batch, d_out, d_in)."""
    return torch.bmm(g.reshape(batch, -1, g.shape[-1]).transpose(1, 2), a.reshape(batch, -1, a.shape[-1]))


def _linear_weight_sum(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_rows g_r^T a_r`` with ``g`` already scaled per row by the clip factors."""
    return g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])


def _linear_rounding_bound(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, batch: int) -> torch.Tensor:
    """``sum_t ||g_t|| ||a_t||`` over each example's positions (and K rows): a bound on how far a TF32 rounding of
    each value of ``g`` by a relative ``u`` moves the example's weight gradient ``sum_t g_t a_t^T``, in units of
    ``u`` (:data:`TF32_SUMS`)."""
    return (torch.linalg.vector_norm(g.reshape(batch, -1, g.shape[-1]), dim=-1)
            * torch.linalg.vector_norm(a.reshape(batch, -1, a.shape[-1]), dim=-1)).sum(1)


def _linear_bias(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, batch: int,
                 node: Any = None) -> dict[str, torch.Tensor]:
    return {} if layer.bias is None else {"bias": _sum_dim1(g.reshape(batch, -1, g.shape[-1]))}


def _padded(layer: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """The layer input with the convolution's zero padding, as the kernel sees it."""
    ph, pw = layer.padding
    return F.pad(a, (pw, pw, ph, ph)) if ph or pw else a


def _by_example(t: torch.Tensor, batch: int, groups: int = 1) -> torch.Tensor:
    """(B K, G c, *positions) -> (B G, c, K T): the K rows of each example side by side as more positions, one
    example and group per matrix (a copy only for K > 1)."""
    draws = t.shape[0] // batch
    t = t.reshape(batch, draws, groups, t.shape[1] // groups, -1).permute(0, 2, 3, 1, 4)
    return t.reshape(batch * groups, t.shape[2], -1)


def _unfold(layer: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """``F.unfold(a)`` for the layer's kernel, stride, dilation and padding: (N, C k_h k_w, T), made by one
    strided copy of the padded input (``F.unfold`` on CUDA launches one kernel per example)."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    a = _padded(layer, a)
    n, c, h, w = a.shape
    out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s = a.stride()
    windows = a.as_strided((n, c, kh, kw, out_h, out_w), (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw))
    return windows.reshape(n, c * kh * kw, out_h * out_w)


def _conv_positions(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfolded input (B G, K T, C_in/G k k) and output gradient (B G, K T, C_out/G) of ``batch``
    examples (K rows each): a convolution is a Linear layer over its K T positions, one per group. Both are
    transposed views of (B G, channels, K T) tensors, which need no copy for K = 1."""
    return (_by_example(_unfold(layer, a), batch, layer.groups).transpose(1, 2),
            _by_example(g, batch, layer.groups).transpose(1, 2))


def _example_chunks(a: torch.Tensor, batch: int, values_per_example: int) -> Iterator[tuple[int, int, slice]]:
    """``(first example, examples, their rows of a)`` over ``batch`` examples (K rows each) a few at a time, so that
    a chunk's working values (``values_per_example`` each) number at most ``max(CHUNK_ELEMENTS, a.numel())``: no
    more than the layer's input, which the step already holds, or CHUNK_ELEMENTS."""
    draws = a.shape[0] // batch
    step = max(1, max(CHUNK_ELEMENTS, a.numel()) // values_per_example)
    for i in range(0, batch, step):
        b = min(step, batch - i)
        yield i, b, slice(i * draws, (i + b) * draws)


def _conv_chunks(layer: nn.Conv2d, calls: list[tuple[torch.Tensor, torch.Tensor]], batch: int
                 ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(first example, examples, x, g)`` over the examples a few at a time, with ``x`` and ``g`` as
    :func:`_conv_positions` gives them (the calls of a layer used several times concatenated as more
    positions). A chunk's unfolded input holds at most ``max(CHUNK_ELEMENTS, a.numel())`` elements, no more
    than the layer's input, which the step already holds, or CHUNK_ELEMENTS."""
    a0 = calls[0][0]
    unfolded = a0[0].numel() * layer.kernel_size[0] * layer.kernel_size[1] * (a0.shape[0] // batch) * len(calls)
    for i, b, rows in _example_chunks(a0, batch, unfolded):
        xs, gs = zip(*(_conv_positions(layer, a[rows], g[rows], b) for a, g in calls), strict=True)
        yield (i, b, xs[0], gs[0]) if len(calls) == 1 else (i, b, torch.cat(xs, 1), torch.cat(gs, 1))


def _conv_multiplications(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int) -> dict[str, int]:
    """Multiplications per example of the three exact ways to the squared norm of a convolution's weight gradient
    (one group; R = K T rows and positions of an example, P the pixels of its padded input, d_in = C_in k_h k_w):
    forming it (``R d_in C_out``), the ghost norm of the unfolded input (``R^2 (d_in + C_out)``) and the ghost
    norm from the padded input's own Gram matrix (:func:`_conv2d_gram_sq_norms`, ``(K P)^2 C_in + R^2 (C_out +
    k_h k_w)``)."""
    draws = a.shape[0] // batch
    (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
    c_in, height, width = a.shape[1:]
    rows = draws * g.shape[-2] * g.shape[-1]
    pixels = draws * (height + 2 * ph) * (width + 2 * pw)
    d_in, c_out = c_in * kh * kw, layer.out_channels
    return {"form": rows * d_in * c_out, "ghost": rows * rows * (d_in + c_out),
            "gram": pixels * pixels * c_in + rows * rows * (c_out + kh * kw)}


def _conv2d_gram_sq_norms(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int,
                          precision: str = "ieee", bound: bool = False
                          ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The ghost norm of a convolution (one group) from the Gram matrix of its zero-padded input rather than of
    the unfolded one. The unfolded windows at output positions t and s overlap the padded input ``x`` at pixels
    shifted by each kernel offset ``d``, so ``a_t . a_s = sum_d x_{p(t) + d} . x_{p(s) + d}`` (``p(t)`` the
    window's corner) and

        ||G_i||_F^2 = sum_{t,s} (a_t . a_s)(g_t . g_s) = < sum_d M_i[p(T) + d, p(T) + d], Gamma_i >,

    with ``M_i = X_i^T X_i`` over the example's K P padded pixels (its K rows as more pixels, the kernel offsets
    taken within a row) and ``Gamma_i = g_i^T g_i`` over its K T positions: ``(K P)^2 C_in + (K T)^2 C_out``
    multiplications where the unfolded input's Gram takes ``(K T)^2 k_h k_w C_in``. The offsets' sum is
    separable, d = (u, v): the strided views of ``M_i`` shifted by each column offset v are summed for every padded
    row, then those sums' views shifted by each row offset u, two reductions that read each entry k_w and k_h times
    (where ``GRAM_WINDOWS`` holds on a GPU, one kernel sums the k_h k_w windows pair of output rows by pair and
    contracts them with ``Gamma_i``, ``fused_norms.gram_window_sq_norms``; its ``M_i`` is the unpadded input's, the
    padding's pixels skipped by the kernel, which spares the padded copy and two fifths of ``M_i`` at 14x14). A few
    examples at a time, so that a chunk's Gram matrix and its column sums (or ``Gamma_i``) hold at most
    ``max(CHUNK_ELEMENTS, a.numel())`` values. With ``bound``, also the rounding bound ``sum_t ||g_t|| ||a_t||``
    (:func:`_conv2d_rounding_bound`) from the two Gram matrices' diagonals (:func:`_window_rounding_bound`)."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    draws = a.shape[0] // batch
    kernel = fused_norms.gram_applies(a, g)  # the windows' sum and its contraction with Gamma_i in one kernel
    x = a if kernel else _padded(layer, a)  # the kernel skips the padding's pixels, whose entries of M_i are zero
    height, width = x.shape[2:]
    out_h, out_w = g.shape[2:]
    pixels, positions = draws * height * width, draws * out_h * out_w
    columns = draws * height * out_w  # (K, padded row, output column) on each side, after the first sum
    parts, bounds = [], []
    # M_i is held beside the column sums, or beside Gamma_i where the kernel sums the windows
    for _, b, rows in _example_chunks(a, batch, pixels * pixels + max(columns, positions) ** 2):
        xs, gs = _by_example(x[rows], b), _by_example(g[rows], b)  # (b, C_in, K P), (b, C_out, K T)
        with _operand_products(precision):
            gram = torch.bmm(xs.transpose(1, 2), xs)  # (b, K P, K P)
        pixel_sq = gram.diagonal(dim1=1, dim2=2) if bound else None  # the pixels' squared norms
        if kernel:
            with _operand_products(precision):
                gamma = torch.bmm(gs.transpose(1, 2), gs)  # (b, K T, K T)
            parts.append(fused_norms.gram_window_sq_norms(layer, gram, gamma, (height, width), (out_h, out_w)))
            if bound:
                bounds.append(_window_rounding_bound(layer, pixel_sq, gamma.diagonal(dim1=1, dim2=2), (height, width),
                                                     padded=False))
            continue
        # a_t . a_s = sum_{u,v} M_i[p(t) + (u, v), p(s) + (u, v)], summed first over the column offsets v for
        # every padded row, then over the row offsets u: k_h + k_w reads of each entry where both at once take k_h k_w
        s0, row, col = pixels * pixels, height * width, width
        by_rows = gram.as_strided((b, kw, draws, height, out_w, draws, height, out_w),
                                  (s0, dw * (pixels + 1), row * pixels, col * pixels, sw * pixels, row, col, sw)).sum(1)
        if bound:
            pixel_sq = pixel_sq.clone()  # b K P values, so that the view does not keep the Gram matrix
        del gram
        shifted = by_rows.as_strided((b, kh, draws, out_h, out_w, draws, out_h, out_w),
                                     (columns * columns, dh * out_w * (columns + 1), height * out_w * columns,
                                      sh * out_w * columns, columns, height * out_w, sh * out_w, 1)).sum(1)
        shifted = shifted.reshape(b, 1, positions * positions)
        del by_rows
        with _operand_products(precision):  # after the Gram matrix is freed, so the two are never held together
            gamma = torch.bmm(gs.transpose(1, 2), gs).reshape(b, positions * positions, 1)
        parts.append(torch.bmm(shifted, gamma).reshape(b))
        if bound:
            grad_sq = gamma.reshape(b, positions, positions).diagonal(dim1=1, dim2=2)
            bounds.append(_window_rounding_bound(layer, pixel_sq, grad_sq, (height, width), padded=True))
    sq_norms = parts[0] if len(parts) == 1 else torch.cat(parts)
    return (sq_norms, bounds[0] if len(bounds) == 1 else torch.cat(bounds)) if bound else sq_norms


def _window_rounding_bound(layer: nn.Conv2d, pixel_sq: torch.Tensor, grad_sq: torch.Tensor, size: tuple[int, int],
                           padded: bool) -> torch.Tensor:
    """``sum_t ||g_t|| ||x_t||`` (:func:`_conv2d_rounding_bound`) from ``pixel_sq`` (b, K P), the squared norms of
    the input's pixels over the channels (of ``size``, padded already where ``padded``), and ``grad_sq`` (b, K T),
    those of the output gradient's positions: on the Gram path the diagonals of ``M_i`` and ``Gamma_i``, so the
    input and output gradient are not read again. ``||x_t||^2`` is the window sum of ``pixel_sq``, one convolution
    with a kernel of ones."""
    b = pixel_sq.shape[0]
    window_sq = F.conv2d(pixel_sq.reshape(-1, 1, *size), pixel_sq.new_ones(1, 1, *layer.kernel_size),
                         stride=layer.stride, padding=0 if padded else layer.padding, dilation=layer.dilation)
    return (grad_sq.clamp(min=0).sqrt() * window_sq.reshape(b, -1).clamp(min=0).sqrt()).sum(1)


def _conv2d_weight_sq_norms(layer: nn.Conv2d, calls: list[tuple[torch.Tensor, torch.Tensor]],
                            batch: int, precision: str = "ieee") -> torch.Tensor:
    """Per-example squared norms of the weight gradient of a layer called once, by whichever exact way takes the
    fewest multiplications (:func:`_conv_multiplications`): the padded input's Gram matrix
    (:func:`_conv2d_gram_sq_norms`), or else, on a GPU where it was measured faster, one fused kernel that
    forms nothing in memory (:mod:`fedgen.mechanisms.fused_norms`), or else the unfold path, a few examples at
    a time (:func:`_conv_chunks`), which also serves layers called several times."""
    if _takes_gram(layer, calls, batch):
        return _conv2d_gram_sq_norms(layer, *calls[0], batch, precision)
    if len(calls) == 1 and fused_norms.applies(layer, *calls[0]):
        return fused_norms.conv2d_weight_sq_norms(layer, *calls[0], batch, precision=precision)
    parts = [_sum_dim1(_positions_sq_norms(x, g, precision).reshape(b, layer.groups))
             for _, b, x, g in _conv_chunks(layer, calls, batch)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _takes_gram(layer: nn.Conv2d, calls: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> bool:
    """Whether a convolution's norms come from its input's Gram matrix (:func:`_conv2d_weight_sq_norms`): one call,
    one group, ``GRAM_NORMS`` set, and the fewest multiplications."""
    if len(calls) != 1 or layer.groups != 1 or not GRAM_NORMS:
        return False
    count = _conv_multiplications(layer, *calls[0], batch)
    return count["gram"] < min(count["form"], count["ghost"])


def _conv2d_sq_norms_and_bound(layer: nn.Conv2d, calls: list[tuple[torch.Tensor, torch.Tensor]], batch: int,
                               precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight gradient's per-example squared norms and, where they come from the Gram path, its rounding bound
    from the Gram matrices' diagonals; elsewhere :func:`_conv2d_weight_sq_norms` and no bound (the engine takes
    :data:`ROUNDING_BOUND`'s)."""
    if _takes_gram(layer, calls, batch):
        return _conv2d_gram_sq_norms(layer, *calls[0], batch, precision, bound=True)
    return _conv2d_weight_sq_norms(layer, calls, batch, precision), None


def _conv2d_weight_per_example(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int) -> torch.Tensor:
    """Example i's weight gradient, (batch, *weight.shape): by the fused kernel where it applies, else a few
    examples at a time from the unfolded input: ``g_r x_r^T`` for each of the example's K rows r and each
    group, summed over the K rows. Row by row, the unfolded input and the output gradient are used in the layout
    the layer made them, where setting an example's K rows side by side as more positions (:func:`_by_example`)
    would copy both; the K per-row gradients it adds instead hold ``C_out / T`` of the unfolded input's values."""
    if fused_norms.forms(layer, a, g, batch):
        return fused_norms.conv2d_weight_per_example(layer, a, g, batch, precision=FORM_PRECISION)
    out = torch.empty(batch, *layer.weight.shape, device=g.device, dtype=g.dtype)  # a and g share a dtype
    draws, groups = a.shape[0] // batch, layer.groups
    c_out, d_in = layer.out_channels // groups, layer.weight[0].numel()  # per group: C_out / G by C_in / G k_h k_w
    unfolded = a[0].numel() * layer.kernel_size[0] * layer.kernel_size[1] * draws
    for i, b, rows in _example_chunks(a, batch, unfolded):
        x = _unfold(layer, a[rows])  # (b K, C_in k_h k_w, T), the groups' blocks of channels in turn
        x = x.view(b * draws * groups, d_in, x.shape[-1])
        gg = g[rows].reshape(b * draws * groups, c_out, -1)  # a view of the layer's own output gradient
        if draws == 1:
            torch.bmm(gg, x.transpose(1, 2), out=out[i:i + b].view(b * groups, c_out, d_in))
        else:
            torch.sum(torch.bmm(gg, x.transpose(1, 2)).view(b, draws, -1), 1, out=out[i:i + b].view(b, -1))
    return out


def _conv2d_weight_sum(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The weight gradient of the scaled output gradient ``g``: the same kernel non-private training runs."""
    return torch.nn.grad.conv2d_weight(a, layer.weight.shape, g, stride=layer.stride, padding=layer.padding,
                                       dilation=layer.dilation, groups=layer.groups)


def _conv2d_rounding_bound(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int) -> torch.Tensor:
    """``sum_t ||g_t|| ||x_t||`` over each example's output positions t (and K rows), ``x_t`` the input window at t
    (all channels; with groups the bound holds by Cauchy-Schwarz over the groups): as
    :func:`_linear_rounding_bound`. ``||x_t||^2`` is the window sum of the pixels' squared norms over the channels
    (one reduction that reads the input once), one convolution with a kernel of ones
    (:func:`_window_rounding_bound`)."""
    pixel_sq = torch.linalg.vector_norm(a, dim=1).square().reshape(batch, -1)
    grad_sq = torch.linalg.vector_norm(g, dim=1).square().reshape(batch, -1)
    return _window_rounding_bound(layer, pixel_sq, grad_sq, a.shape[2:], padded=False)


def _conv2d_bias(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int,
                 node: Any = None) -> dict[str, torch.Tensor]:
    return {} if layer.bias is None else {"bias": g.reshape(batch, -1, layer.out_channels, g[0, 0].numel()).sum((1, 3))}


_ONES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _ones(n: int, like: torch.Tensor) -> torch.Tensor:
    """n ones on ``like``'s device and dtype, a slice of one cached tensor (no kernel launch once it is large
    enough). Older PyTorch versions refuse an absent GroupNorm scale in the backward call below."""
    key = (like.device, like.dtype)
    ones = _ONES.get(key)
    if ones is None or ones.numel() < n:
        ones = _ONES[key] = torch.ones(n, device=like.device, dtype=like.dtype)
    return ones[:n]


def _saved_group_stats(node: Any, rows: int, groups: int, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The group means and inverse deviations that the forward pass computed and autograd saved for GroupNorm's
    backward, (rows * groups,) each, or None where ``node`` is not PyTorch's GroupNorm backward of such rows."""
    if type(node).__name__ != "NativeGroupNormBackward0":
        return None
    mean, rstd = getattr(node, "_saved_result1", None), getattr(node, "_saved_result2", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(rstd, torch.Tensor):
        return None
    if mean.shape != (rows, groups) or rstd.shape != (rows, groups) or mean.dtype != dtype or rstd.dtype != dtype:
        return None
    return mean.detach().reshape(-1), rstd.detach().reshape(-1)


class GroupNormFromRowSums(torch.autograd.Function):
    """GroupNorm's backward pass from the row sums of its per-example gradients.

    ``apply(a, weight, bias, output, mean, rstd, groups)`` returns ``output`` (a view of it, GroupNorm's result that
    PyTorch's forward pass computed, with that pass's group statistics) with this backward in place of PyTorch's.
    The engine's hook on the output gradient computes ``sum_p g x_hat`` and ``sum_p g`` per row (example and
    channel) for the per-example gradients (:func:`_group_norm`) and leaves them on the node (``row_sums``); the
    input gradient then takes one more pass (:func:`fused_norms.group_norm_input_grad`), where PyTorch's backward
    reads the input and output gradient once more for the same sums. The weight and bias gradients are those sums
    over the rows. Without the engine's sums (no hook ran) the backward takes them itself. GPU only (Triton)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, output: torch.Tensor,
                mean: torch.Tensor, rstd: torch.Tensor, groups: int) -> torch.Tensor:
        ctx.save_for_backward(a, weight)
        ctx.group_stats, ctx.groups, ctx.row_sums = (mean, rstd), groups, None
        return output

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, weight = ctx.saved_tensors
        (mean, rstd), rows, channels = ctx.group_stats, a.shape[0], a.shape[1]
        per_group = channels // ctx.groups
        flat_a = a.reshape(rows * channels, -1)
        flat_g = g.to(a.dtype).reshape(rows * channels, -1)
        gx, g_sum = ctx.row_sums if ctx.row_sums is not None else \
            fused_norms.row_sums(flat_a, flat_g, mean, rstd, per_group)
        ctx.row_sums = ctx.group_stats = None
        grad_a = fused_norms.group_norm_input_grad(flat_a, flat_g, mean, rstd, weight, gx, g_sum,
                                                   per_group).reshape(a.shape) if ctx.needs_input_grad[0] else None
        grad_weight = gx.reshape(rows, channels).sum(0) if ctx.needs_input_grad[1] else None
        grad_bias = g_sum.reshape(rows, channels).sum(0) if ctx.needs_input_grad[2] else None
        return grad_a, grad_weight, grad_bias, None, None, None, None


def _from_row_sums(layer: nn.Module, a: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
    """``output`` with :class:`GroupNormFromRowSums` as its backward where that applies: a ``GroupNorm`` with a scale,
    float32 CUDA tensors with Triton (``fused_norms.GROUP_NORM_BACKWARD``, ``row_sums_apply``), the group statistics
    saved by PyTorch's forward pass, and no torch.compile tracing; else None (the output keeps PyTorch's backward)."""
    if not (isinstance(layer, nn.GroupNorm) and layer.weight is not None and fused_norms.GROUP_NORM_BACKWARD
            and not torch.compiler.is_compiling() and fused_norms.row_sums_apply(a, output)):
        return None
    stats = _saved_group_stats(output.grad_fn, a.shape[0], layer.num_groups, a.dtype)
    if stats is None:
        return None
    return GroupNormFromRowSums.apply(a, layer.weight, layer.bias, output.detach(), *stats, layer.num_groups)


def _group_norm(layer: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, batch: int,
                node: Any = None) -> dict[str, torch.Tensor]:
    """With ``x_hat = (a - mu) r`` (mean ``mu`` and inverse deviation ``r`` of the row's group), the weight's
    per-example gradient on channel c is ``sum g x_hat`` and the bias's ``sum g``, summed over positions and
    the example's rows. PyTorch's own GroupNorm backward computes exactly these sums, reduced over the batch;
    seen as one sample whose channels are all rows' channels (``rows * C`` channels in ``rows * G`` groups) it
    keeps them per row: one kernel, from the group statistics (those the forward pass saved, else computed
    again), with no full-size temporary. On a GPU, one kernel that reads each tensor once
    (``fused_norms.row_sums``, ``sum g x_hat`` as ``r (sum g a - mu sum g)``)."""
    rows, channels, groups = a.shape[0], a.shape[1], layer.num_groups
    positions = a.numel() // (rows * channels)
    # one copy if the input is not contiguous (a one-row transposed or channels-last input reshapes to a strided
    # view, which the group view below could not take), then views
    a = a.reshape(1, rows * channels, positions).contiguous()
    ours = getattr(node, "group_stats", None) is not None  # GroupNormFromRowSums's node: it takes the row sums
    stats = node.group_stats if ours else _saved_group_stats(node, rows, groups, a.dtype)
    if stats is None:
        var, mean = torch.var_mean(a.view(rows * groups, -1), dim=1, unbiased=False)
        stats = mean, (var + layer.eps).rsqrt()
    mean, rstd = stats
    g = g.reshape(1, rows * channels, positions)
    if fused_norms.row_sums_apply(a, g):  # sum g x_hat and sum g per row and channel in one read of each
        weight, bias = fused_norms.row_sums(a[0], g[0], mean, rstd, channels // groups)
        if ours:
            node.row_sums = weight, bias
    else:
        mask = [False, layer.weight is not None, layer.bias is not None]
        # g contiguous: PyTorch's native_group_norm_backward (seen with 2.11; pytorch/pytorch#186414) can read a
        # strided output gradient, which a one-row transposed input hands it, as if it were contiguous
        _, weight, bias = torch.ops.aten.native_group_norm_backward(
            g.contiguous(), a, mean.unsqueeze(0), rstd.unsqueeze(0), _ones(rows * channels, a), 1, rows * channels,
            positions, rows * groups, mask)  # its scale only enters dX
    grads = {}
    if layer.weight is not None:
        grads["weight"] = _sum_dim1(weight.reshape(batch, -1, channels))
    if layer.bias is not None:
        grads["bias"] = _sum_dim1(bias.reshape(batch, -1, channels))
    return grads


def _layer_norm(layer: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor, batch: int,
                node: Any = None) -> dict[str, torch.Tensor]:
    """Per-example affine gradients ``sum g x_hat`` and ``sum g`` over every dimension but the normalized ones."""
    x_hat = F.layer_norm(a, layer.normalized_shape, eps=layer.eps)

    def per_example(t: torch.Tensor) -> torch.Tensor:
        return _sum_dim1(t.reshape(batch, -1, *layer.normalized_shape))

    grads = {}
    if layer.weight is not None:
        grads["weight"] = per_example(g * x_hat)
    if layer.bias is not None:
        grads["bias"] = per_example(g)
    return grads


def _embedding(layer: nn.Embedding, ids: torch.Tensor, g: torch.Tensor, batch: int,
               node: Any = None) -> dict[str, torch.Tensor]:
    rows = ids.reshape(batch, -1) + torch.arange(batch, device=ids.device).unsqueeze(1) * layer.num_embeddings
    weight = torch.zeros(batch * layer.num_embeddings, layer.embedding_dim, device=g.device, dtype=g.dtype)
    weight.index_add_(0, rows.flatten(), g.reshape(-1, layer.embedding_dim))
    return {"weight": weight.reshape(batch, layer.num_embeddings, layer.embedding_dim)}


#: per layer type, the per-example gradients that are formed (few parameters per example): every parameter of
#: the small layers, the biases of the book-keeping layers
MATERIALIZED: dict[type[nn.Module], PerExampleRule] = {
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
    nn.Linear: _linear_bias,
    nn.Conv2d: _conv2d_bias,
}
#: weights handled by book-keeping: ``(sq_norms(layer, calls, batch), weighted_sum(layer, a, scaled_g))``, the
#: per-example squared norms, then one product of the output gradients scaled by the clip factors
BOOK_KEEPING: dict[type[nn.Module], tuple[Callable, Callable]] = {
    nn.Linear: (_linear_weight_sq_norms, _linear_weight_sum),
    nn.Conv2d: (_conv2d_weight_sq_norms, _conv2d_weight_sum),
}
#: the same weights' bound on how far a relative rounding of the scaled output gradient moves an example's clipped
#: weight gradient, ``rounding_bound(layer, a, g, batch)`` (:data:`TF32_SUMS` = "margin")
ROUNDING_BOUND: dict[type[nn.Module], Callable] = {
    nn.Linear: _linear_rounding_bound,
    nn.Conv2d: _conv2d_rounding_bound,
}
#: weights whose norm rule can give the rounding bound with the norms, from what it computes for them:
#: ``norms_and_bound(layer, calls, batch, precision) -> (squared norms, bound summed over the calls, or None where
#: the rule computed nothing to take it from)``, used where ``GRAM_BOUNDS`` is set
NORMS_AND_BOUND: dict[type[nn.Module], Callable] = {
    nn.Conv2d: _conv2d_sq_norms_and_bound,
}
#: the same weights' per-example gradients, formed: ``per_example(layer, a, g, batch)``, (batch, *weight.shape)
PER_EXAMPLE_WEIGHT: dict[type[nn.Module], Callable] = {
    nn.Linear: _linear_weight_per_example,
    nn.Conv2d: _conv2d_weight_per_example,
}
#: a Linear or Conv2d weight's per-example gradients are formed where they hold at most this many times the values
#: of the (input, output gradient) pair that book-keeping would keep (:func:`forms_weight`); 0 book-keeps every
#: weight (A/B measurements)
FORM_RATIO = 2.0
#: the precision of the products that form per-example gradients on a GPU (the weights of :func:`forms_weight`, biases,
#: normalization layers): "ieee", or "tf32" (tensor cores, inputs rounded to a 10-bit mantissa, as cuDNN's
#: convolutions are by default). Either keeps the bound, since a formed gradient is both its example's norm and
#: its summand; norms and sums that come from two computations (book-keeping) are IEEE float32 in any case.
#: TF32 by default: the weight gradients of a non-private step are TF32 already where cuDNN computes them, and the
#: epsilon-10 example's DP step took 488 ms in TF32 against 513 ms in IEEE (one H200, docs/benchmarks.md)
FORM_PRECISION = "tf32"
#: the precision of the book-kept weights' products, whose norms and clipped sums come from two computations:
#: "ieee" (IEEE float32), or "tf32": the layer input and output gradient are rounded to TF32 values once, when the
#: hook catches them, and every product whose operands they are runs on tensor cores, whose rounding of TF32 values
#: is the identity and whose products of them are exact in float32 (``precision.round_to_tf32``); how the clipped
#: sum's rounding of the scaled output gradient stays within the bound is :data:`TF32_SUMS`'s choice. The norms and
#: the sums are then those of one per-example gradient (of the rounded operands), as in IEEE float32; products of
#: anything else (a Gram matrix with another) stay IEEE. Measured on an H200 (docs/benchmarks.md): 10% off the
#: ConvNet's step at batch 1024, no change where the UNet's step is bound by the GPU, a third more where the host
#: bounds it (more launches).
#: "auto" (the default): TF32 for the layers whose clipped sum takes at least ``TF32_MIN_MULTIPLY_ADDS``, IEEE for the
#: others (:func:`book_precision`). On one H200 (2026-12-03) it kept TF32's gain on the ConvNet (13.19 against 14.63 ms
#: at batch 1024, graphed 3.86 against 4.03 at 256) and IEEE's time on the UNet (graphed at batch 256, K = 1: 50.55
#: against 50.26 ms; the diffusion examples' steps within 0.5 ms), and no isolated example added more than C.
BOOK_PRECISION = "auto"
#: how the clipped sum of a weight book-kept in TF32 keeps each example within C. "margin" (the default): one TF32
#: product of the scaled output gradient ``c_i g_t``, which the tensor cores round to TF32 by less than 2^-10 of each
#: value (truncating, or 2^-11 to nearest). That moves the example's contribution ``sum_t round(c_i g_t) a_t^T``
#: (``a_t`` a TF32 value) from ``c_i G_i`` by less than ``2^-10 c_i sum_t ||g_t|| ||a_t||`` (:data:`ROUNDING_BOUND`);
#: the clip factor is taken from the norm plus ``TF32_MARGIN`` times that sum over the TF32 layers,
#: ``c_i = min(1, C / (||G_i|| + TF32_MARGIN B_i))``, so that ``||contribution_i|| <= c_i (||G_i|| + 2^-10 B_i) <= C``.
#: "split": the clip factors are truncated to TF32 and the scaled output gradient, exact in float32, is summed as two
#: TF32 halves, each product exact: no margin, one more product a layer. On one H200 (2026-12-03, docs/benchmarks.md)
#: "margin" took the ConvNet's step at batch 1024 from 12.87 to 13.11 ms to 12.36 to 12.49 ms eager and from 12.86 to
#: 13.21 ms to 12.33 to 12.57 ms graphed (four runs each). Its cost is the margin: ``B_i`` is 6 to 12 times
#: ``||G_i||`` for the ConvNet's 7x7 and 14x14 convolutions, and with each example isolated on the GPU
#: (``benchmarks/clip_precision.py``, every example clipped) the largest contribution was 0.990 C against 1.000 C with
#: "split", 0.985 C with every layer in TF32; on the UNet, 0.998 C with every layer in TF32.
TF32_SUMS = "margin"
#: the relative rounding "margin" allows each scaled output-gradient value: TF32's largest (2^-10), and 2^-16 more
#: for float32's roundings of the scaling (2^-24) and of the bound's own sums (a sum of n terms is off by at most
#: n 2^-24 of itself, which the 2^-16 covers up to n = 2^18 positions an example)
TF32_MARGIN = 2**-10 + 2**-16
#: with ``BOOK_PRECISION = "auto"``, the multiply-adds of a layer's clipped sum (output-gradient values times the
#: weight's fan-in) from which TF32 book-keeping is chosen: below it, TF32's saving on the tensor cores (about 0.2 ms
#: at 2^32 on an H200, where IEEE float32 runs at about an eighth of the TF32 rate) is smaller than what its own
#: work adds, four memory passes over the input and output gradient and about eight more launches a layer
TF32_MIN_MULTIPLY_ADDS = 2**32
#: whether the rounding bound of a TF32 layer's clipped sum (``TF32_SUMS = "margin"``) comes with its norms from the
#: rule's own products where it has them (:data:`NORMS_AND_BOUND`: a convolution on the Gram path takes the bound from
#: the Gram matrices' diagonals instead of reading its input and output gradient again). On by measurement (one H200,
#: 2026-12-03, docs/benchmarks.md; two rounds each, on against off): the ConvNet's step at batch 1024 took 10.77 and
#: 10.79 ms eager against 10.91 and 10.91 ms, 10.64 and 10.78 ms graphed against 11.03 and 10.98 ms, and graphed at
#: batch 256 3.14 and 3.27 ms against 3.23 and 3.39 ms; the clipping bound held (0 of 32 isolated examples above C)
GRAM_BOUNDS = True
#: whether a convolution's norms may come from its padded input's Gram matrix (:func:`_conv2d_gram_sq_norms`)
#: where that takes the fewest multiplications; False for A/B measurements
GRAM_NORMS = True
SUPPORTED: tuple[type[nn.Module], ...] = tuple(MATERIALIZED)


def book_precision(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> str:
    """The precision of a book-kept layer's norms and clipped sum, decided when its output gradient is caught:
    ``BOOK_PRECISION``, or with ``"auto"`` TF32 where the clipped sum's multiply-adds, ``|g| d_in`` (``d_in`` the
    weight's fan-in: C_in / groups k_h k_w, or in_features), reach ``TF32_MIN_MULTIPLY_ADDS``. Always IEEE for
    tensors that are not float32 (TF32 rounds float32 values only); with ``"auto"`` IEEE too off CUDA devices, where
    no tensor core would run the products and the rounding would only cost time."""
    if a.dtype != torch.float32 or g.dtype != torch.float32 or BOOK_PRECISION == "ieee":
        return "ieee"
    if BOOK_PRECISION == "tf32" or (_tensor_cores(g) and
                                    g.numel() * layer.weight[0].numel() >= TF32_MIN_MULTIPLY_ADDS):
        return "tf32"
    return "ieee"


def _tensor_cores(t: torch.Tensor) -> bool:
    """Whether TF32 products of ``t`` would run on tensor cores: on a CUDA device."""
    return t.is_cuda


def forms_weight(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, batch: int) -> bool:
    """Whether the engine forms this layer's per-example weight gradients ``G_i`` during the backward pass rather
    than book-keep them: where the ``batch`` gradients hold at most ``FORM_RATIO`` (rho) times the values of the
    input and output gradient that book-keeping would keep until the clip factors are known
    (``B |W| <= rho (|a| + |g|)``: many positions, few weights, e.g. a UNet's convolutions at 32x32 and 16x16).
    The formed gradients are then both the norms' input and the clipped sums' (``c^T G``), which saves the
    second weight-gradient product and the output gradient scaled by the clip factors, and the input and output
    gradient are freed as soon as autograd is done with them. What the engine holds for a layer until the clip
    factors are known is thus at most rho times what book-keeping holds. Forming never takes more
    multiplications: ``K T d_in d_out`` once, where book-keeping takes its norms' and then the same
    ``K T d_in d_out`` again for its weighted sum."""
    return batch * layer.weight.numel() <= FORM_RATIO * (a.numel() + g.numel())


def _why_unsupported(layer: nn.Module) -> str | None:
    """Why the engine cannot clip this layer's trainable parameters, or None when it can."""
    if type(layer) not in SUPPORTED:
        return f"no per-example rule for {type(layer).__name__}"
    if isinstance(layer, nn.Conv2d) and (isinstance(layer.padding, str) or layer.padding_mode != "zeros"):
        return f"Conv2d with padding={layer.padding!r}, padding_mode={layer.padding_mode!r} (use numeric zero padding)"
    if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.sparse):
        return "Embedding with max_norm or sparse gradients"
    return None


def unsupported_layers(module: nn.Module) -> list[str]:
    """The layers of ``module`` with trainable parameters that :class:`PerExampleClipping` cannot clip, each as
    ``"name: reason"``; empty when the engine supports the whole model."""
    problems = []
    owners: dict[int, list[str]] = {}
    for name, layer in module.named_modules():
        if any(p.requires_grad for p in layer.parameters(recurse=False)):
            reason = _why_unsupported(layer)
            if reason is not None:
                problems.append(f"{name or '<root>'}: {reason}")
        for p in layer.parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(name or "<root>")
    for names in owners.values():
        if len(names) > 1:  # each layer's norm would be taken apart: sqrt(|a|^2 + |b|^2), not |a + b|
            problems.append(f"{' and '.join(names)}: share a parameter (tied weights), whose per-example gradient "
                            "is the sum of their parts")
    return problems


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``t``'s device (no host reads then)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _group_bounds(groups: torch.Tensor, batch: int, num_groups: int) -> list[int]:
    """``bounds`` with group k's examples at ``bounds[k]:bounds[k + 1]``, after checking ``groups`` (read from
    the device once)."""
    if groups.shape != (batch,):
        raise ValueError(f"groups has shape {tuple(groups.shape)}, not ({batch},): one group per example")
    ids = groups.tolist()
    if num_groups < 1 or any(not 0 <= k < num_groups for k in ids):
        raise ValueError(f"groups must lie in [0, {num_groups})")
    if any(later < earlier for earlier, later in zip(ids, ids[1:])):
        raise ValueError("groups must be sorted: order the batch by group (e.g. torch.argsort(groups, stable=True))")
    counts = [0] * num_groups
    for k in ids:
        counts[k] += 1
    return [0, *itertools.accumulate(counts)]


@dataclass
class _Record:
    layer: nn.Module
    inputs: torch.Tensor | None  # released once the layer's output gradient is caught
    output: torch.Tensor | None  # released once its hook is set
    node: Any  # the output's autograd node (what the forward pass saved), released with the inputs
    input_version: int
    output_version: int


def _anchor(record: _Record) -> torch.Tensor:
    """What autograd is asked the gradient of so that it computes this layer's output gradient: a bias (its
    gradient is one reduction of the output gradient), a normalization layer's weight (a few values), or,
    for a layer with neither (an Embedding, a Linear or Conv2d without bias), the output itself."""
    layer = record.layer
    bias = getattr(layer, "bias", None)
    if isinstance(bias, nn.Parameter) and bias.requires_grad:
        return bias
    if isinstance(layer, (nn.GroupNorm, nn.LayerNorm)) and layer.weight is not None and layer.weight.requires_grad:
        return layer.weight
    return record.output


class PerExampleClipping:
    """Records layer inputs and outputs of ``module`` and turns a loss into clipped per-example gradient sums.

    Args:
        module: the model; every trainable parameter must belong to a supported layer.
        max_grad_norm: C, the per-example clipping norm.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        self.max_grad_norm = float(max_grad_norm)
        for name, value, allowed in (("BOOK_PRECISION", BOOK_PRECISION, ("ieee", "tf32", "auto")),
                                     ("FORM_PRECISION", FORM_PRECISION, ("ieee", "tf32")),
                                     ("TF32_SUMS", TF32_SUMS, ("split", "margin"))):
            if value not in allowed:
                raise ValueError(f"fedgen.mechanisms.per_example.{name} is {value!r}: set it to one of "
                                 f"{', '.join(map(repr, allowed))}")
        unsupported = unsupported_layers(module)
        if unsupported:
            raise ConfigError("model", "fedgen's clipping engine cannot clip the trainable parameters of "
                              f"{'; '.join(unsupported)}",
                              f"use layers of {sorted(t.__name__ for t in SUPPORTED)}, or DPSGD(engine='opacus')")
        self.layers: dict[nn.Module, str] = {layer: name for name, layer in module.named_modules()
                                             if any(p.requires_grad for p in layer.parameters(recurse=False))}
        # per layer, once: how its small per-example gradients are formed, its parameters by name, and whether
        # its weight goes through book-keeping (the hooks of the backward pass only look these up)
        self._plan = {layer: (MATERIALIZED[type(layer)], dict(layer.named_parameters(recurse=False)),
                              type(layer) in BOOK_KEEPING) for layer in self.layers}
        self._records: list[_Record] = []
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]

    def _record(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if torch.is_grad_enabled() and output.requires_grad:
            replaced = _from_row_sums(layer, inputs[0], output)  # GroupNorm's backward from its row sums, on a GPU
            output = output if replaced is None else replaced
            self._records.append(_Record(layer, inputs[0].detach(), output, output.grad_fn, inputs[0]._version,
                                         output._version))
            return replaced
        return None

    @property
    def pending(self) -> bool:
        """Whether a forward pass was recorded and not yet turned into clipped gradients."""
        return bool(self._records)

    def discard(self) -> None:
        """Forget the recorded forward pass (e.g. after an exception)."""
        self._records = []

    def remove(self) -> None:
        """Detach the hooks from the module."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def add_empty_batch(self) -> None:
        """An empty Poisson sample: its clipped sum is 0 (the step that follows still adds its noise)."""
        self._records = []
        for layer in self.layers:
            for param in layer.parameters(recurse=False):
                if param.requires_grad and getattr(param, "summed_grad", None) is None:
                    param.summed_grad = torch.zeros_like(param)

    def backward(self, loss: torch.Tensor, *, draws: int = 1, groups: torch.Tensor | None = None,
                 num_groups: int = 1, weights: torch.Tensor | None = None) -> None:
        """Add ``sum_i clip_C(grad_i)`` of the recorded forward pass to each parameter's ``summed_grad``.

        ``loss`` is the mean over the rows of the batch. With ``draws = K`` the rows are ``B`` examples times
        K noise draws (rows ``i K .. i K + K - 1`` belong to example i, as ``repeat_interleave`` makes them),
        and example i's loss is the mean over its K rows (noise multiplicity, Dockhorn et al. 2023): its
        gradient is ``B * sum_k g_ik``, formed without materializing the K rows' gradients separately.

        ``groups`` (B,), sorted, in ``[0, num_groups)``: keep one clipped sum per group (e.g. per client of a
        federated step): ``summed_grad`` then has shape ``(num_groups, *p.shape)``, its row k the sum over
        group k's examples. The forward pass, the backward pass and the norms are shared; only the clipped
        sums are taken group by group.

        ``weights`` (B,), each in [0, 1]: add ``sum_i w_i clip_C(grad_i)`` instead, so that no example adds
        more than C. A weight of 0 leaves a row out exactly (its norm is computed, its factor is 0): rows that
        only pad a micro-batch to a fixed shape (:class:`~fedgen.mechanisms.cuda_graphs.CapturedBackward`).
        The range is checked unless a CUDA graph is being captured, where the caller builds the weights.
        """
        records, self._records = self._records, []
        if not records:
            raise RuntimeError("no forward pass was recorded: run the model with gradients enabled before backward. "
                               "Under torch.compile, the forward may run code compiled before make_private added "
                               "the engine's recording hooks (Dynamo does not guard on module hooks): call "
                               "torch.compiler.reset() before the first compiled forward of the private model")
        for r in records:
            if r.output._version != r.output_version or r.inputs._version != r.input_version:
                raise RuntimeError(f"the input or output of layer {self.layers[r.layer]!r} was modified in place after "
                                   "the layer ran (e.g. ReLU(inplace=True)); use out-of-place operations")
        rows = records[0].inputs.shape[0]
        if draws < 1 or rows % draws:
            raise ValueError(f"the batch has {rows} rows, not a multiple of draws={draws}")
        if rows == 0:
            self.add_empty_batch()
            return
        batch = rows // draws
        if weights is not None:
            if weights.shape != (batch,) or not weights.is_floating_point():
                raise ValueError(f"weights must be a float tensor of shape ({batch},), one per example; got "
                                 f"{weights.dtype} of shape {tuple(weights.shape)}")
            if not _capturing(weights) and not bool(((weights >= 0) & (weights <= 1)).all()):
                raise ValueError("every example's weight must be in [0, 1], or it could add more than "
                                 "max_grad_norm to the sum")
        bounds = None if groups is None else _group_bounds(groups, batch, num_groups)
        for r in records:
            if r.inputs.shape[0] != rows:
                raise RuntimeError(f"layer {self.layers[r.layer]!r} saw a batch of {r.inputs.shape[0]}, not {rows}: "
                                   "the first dimension of every layer input must index the examples")
        # g holds gradients of the batch mean; example i's own gradient is batch * (its part). The factor
        # batch is applied to the norms and the clip factors below, so no scaled copy of g is made.
        materialized: dict[nn.Parameter, torch.Tensor] = {}
        by_layer: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        formed_weight: dict[nn.Module, bool] = {}  # per layer, decided at its first call and kept for the others
        precisions: dict[nn.Module, str] = {}  # per book-kept layer, the same
        switch = matmul_precision() != FORM_PRECISION  # the hooks' products are matrix products (and Triton's)

        def catch(record: _Record) -> Callable[[torch.Tensor], None]:
            layer = record.layer
            form, params, book_keeping = self._plan[layer]

            def hook(g: torch.Tensor) -> None:  # runs inside the backward pass, as soon as g exists
                a, g, node = exact_float32(record.inputs), exact_float32(g), record.node
                record.inputs = record.node = None  # kept below only where the layer's weight needs them
                weight = book_keeping and layer.weight.requires_grad
                formed = weight and formed_weight.setdefault(layer, forms_weight(layer, a, g, batch))
                # A formed per-example gradient is its own norm and its own summand, so the precision of the
                # products that form it (matrix products and the fused kernel) does not touch the bound
                # (FORM_PRECISION); autocast's bfloat16 is kept out. The switch costs microseconds a layer, so it is
                # made only where the settings differ.
                with (float32_products(FORM_PRECISION) if switch or torch.is_autocast_enabled(g.device.type)
                      else contextlib.nullcontext()):
                    grads = form(layer, a, g, batch, node)
                    if formed:
                        grads["weight"] = PER_EXAMPLE_WEIGHT[type(layer)](layer, a, g, batch)
                for pname, grad in grads.items():
                    param = params[pname]
                    if param.requires_grad:
                        materialized[param] = materialized[param] + grad if param in materialized else grad
                if weight and not formed:
                    if precisions.setdefault(layer, book_precision(layer, a, g)) == "tf32":
                        a, g = round_to_tf32(a), round_to_tf32(g)  # the operands of both the norms and the sums
                    by_layer.setdefault(layer, []).append((a, g))
            return hook

        handles = [r.output.register_hook(catch(r)) for r in records]
        anchors = list({id(t): t for t in map(_anchor, records)}.values())
        for r in records:
            r.output = None  # the hooks live on in the graph; the outputs are freed as autograd goes
        del records
        try:
            torch.autograd.grad(loss, anchors, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        del anchors
        if not by_layer and not materialized:
            return
        with ieee_fp32():  # norms and sums from the same per-example gradients (see ieee_fp32)
            self._clip_and_sum(by_layer, materialized, batch, draws, bounds, weights, precisions)

    def _clip_and_sum(self, by_layer: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]],
                      materialized: dict[nn.Parameter, torch.Tensor], batch: int, draws: int,
                      bounds: list[int] | None, weights: torch.Tensor | None,
                      precisions: dict[nn.Module, str]) -> None:
        """Steps 1 to 3 of the module docstring for the ``(input, output gradient)`` pairs of each book-keeping
        layer and the formed per-example gradients (``materialized``, (batch, *shape) per parameter):
        per-example norms, clip factors, clipped sums added to ``summed_grad`` (one per group of examples
        ``bounds[k]:bounds[k + 1]`` where ``bounds`` is given). ``precisions``: each book-kept layer's, set by the hook
        that kept its pair (:func:`book_precision`)."""
        # 1. per-example squared norms over all parameters (flat clipping): book-keeping weights by layer; of the
        # formed per-example gradients, the vectors (biases, normalization parameters) in one (batch, parameters)
        # matrix, each formed weight (an Embedding's, and a Linear's or Conv2d's where forms_weight held) on its
        # own, so that no large one is copied
        split = TF32_SUMS == "split"
        weight_sq_norms, margins = [], []
        for layer, calls in by_layer.items():
            if split or precisions[layer] != "tf32":
                weight_sq_norms.append(BOOK_KEEPING[type(layer)][0](layer, calls, batch, precisions[layer]))
                continue
            # each TF32 clipped sum is one product, which rounds the scaled output gradient (TF32_SUMS): its bound,
            # with the norms where their rule gives it
            joint = NORMS_AND_BOUND.get(type(layer)) if GRAM_BOUNDS else None
            layer_sq_norms, bound = (joint(layer, calls, batch, precisions[layer]) if joint is not None else
                                     (BOOK_KEEPING[type(layer)][0](layer, calls, batch, precisions[layer]), None))
            weight_sq_norms.append(layer_sq_norms)
            margins += [bound] if bound is not None else [ROUNDING_BOUND[type(layer)](layer, a, g, batch)
                                                          for a, g in calls]
        vectors = [p for p in materialized if p.dim() == 1]
        blocks = [(vectors, torch.cat([materialized.pop(p).reshape(batch, -1) for p in vectors], 1))] if vectors \
            else []
        blocks += [([p], materialized.pop(p).reshape(batch, -1)) for p in list(materialized)]
        # one stack and one sum over all layers' and blocks' norms (a running sum would launch a kernel per term)
        sq_norms = torch.stack(weight_sq_norms + [_rows_sq_norms(grads) for _, grads in blocks]).sum(0)
        norms = sq_norms.sqrt()
        if margins:
            norms = norms + TF32_MARGIN * torch.stack(margins).sum(0)
        # per-example gradients are batch * (what was formed): norms scale by batch, sums by batch too
        factor = (self.max_grad_norm / (batch * norms + 1e-6)).clamp(max=1.0) * batch
        if weights is not None:
            factor = factor * weights.to(factor.dtype)
        if split and "tf32" in precisions.values():
            factor = truncate_to_tf32(factor)  # never larger; times a TF32 value, exact in float32
        # 2. sum_i factor_i grad_i per parameter
        clipped: dict[nn.Parameter, torch.Tensor] = {}
        if blocks:
            coefficients = factor.to(blocks[0][1].dtype)
            if bounds is not None:  # (groups, batch): row k holds the factors of group k's examples
                coefficients = torch.block_diag(*coefficients.split([end - start for start, end in
                                                                     zip(bounds[:-1], bounds[1:], strict=True)]))
            shape = () if bounds is None else (len(bounds) - 1,)
            while blocks:  # each block is freed once summed
                params, grads = blocks.pop(0)
                sums = coefficients @ grads
                del grads
                clipped.update(zip(params, (t.reshape(*shape, *p.shape) for t, p in
                                            zip(sums.split([p.numel() for p in params], dim=-1), params,
                                                strict=True))))
        row_factor = factor.repeat_interleave(draws)
        # the rows of group k are contiguous: K rows for each of its examples
        group_rows = None if bounds is None else [slice(start * draws, end * draws)
                                                  for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
        for layer in list(by_layer):
            calls = by_layer.pop(layer)  # each layer's output gradients are freed once used
            weighted_sum = BOOK_KEEPING[type(layer)][1]
            for a, g in calls:
                scaled = g * row_factor.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))
                # in TF32, two exact products: with the high and the low TF32 half of the scaled output gradient
                halves = split_tf32(scaled) if split and precisions[layer] == "tf32" else (scaled,)
                del scaled
                with _operand_products(precisions[layer]):
                    if group_rows is None:
                        grad = _sum_over_parts(weighted_sum, layer, a, halves)
                    else:
                        grad = torch.stack([_sum_over_parts(weighted_sum, layer, a[r], [half[r] for half in halves])
                                            if r.stop > r.start else torch.zeros_like(layer.weight)
                                            for r in group_rows])
                clipped[layer.weight] = clipped[layer.weight] + grad if layer.weight in clipped else grad
        for param, grad in clipped.items():
            summed = getattr(param, "summed_grad", None)
            grad = grad.to(param.dtype)
            if summed is not None and summed.shape != grad.shape:
                raise RuntimeError("clipped sums with and without groups in one step: take the group sums "
                                   "(DPSGD.take_clipped_sums) before a backward pass of the other kind")
            param.summed_grad = grad if summed is None else summed + grad
