"""Float32 arithmetic for the sums that a privacy guarantee bounds.

A clipped sum has sensitivity C only if each example's contribution is computed the way its norm was.
TF32 (cuDNN's default for convolutions; cuBLAS after ``torch.set_float32_matmul_precision("high")``) and
autocast (``torch.autocast``, Lightning's ``precision="bf16-mixed"``) round the inputs of products to 10 or
7 mantissa bits, which can move a contribution past the bound its norm set. Private sums run inside
:func:`ieee_fp32`, or on operands that are TF32 values already (:func:`round_to_tf32`): a tensor core's
rounding of those is the identity, and the product of two of them (11 significant bits each) is exact in its
float32 accumulator, so TF32 products of them are as exact as IEEE float32 ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedgen.mechanisms import fused_norms


@contextmanager
def float32_products(precision: str) -> Iterator[None]:
    """Run float32 matrix products and convolutions at ``precision`` ("ieee", or "tf32": tensor-core products of
    inputs rounded to a 10-bit mantissa), whatever the global settings, and none in a lower precision chosen by
    autocast."""
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', not {precision!r}")
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = precision
    try:
        # entering two autocast contexts takes about half of this function's 28 us (2-core CPU), and the
        # engine's hooks enter it once a layer: only where autocast is on
        if torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"):
            with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
                yield
        else:
            yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def matmul_precision() -> str:
    """The precision float32 matrix products run at now: "ieee" unless TF32 was switched on (by
    ``torch.backends.cuda.matmul.fp32_precision`` or ``torch.set_float32_matmul_precision``)."""
    setting = torch.backends.cuda.matmul.fp32_precision
    return "ieee" if setting in ("none", "ieee") else setting


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """Run float32 matrix products and convolutions in IEEE float32: not TF32 (10-bit mantissa inputs), and
    not in a lower precision chosen by autocast (``torch.autocast``, Lightning's ``precision="bf16-mixed"``).

    The clipping bound holds only if the norms and the clipped sum are computed from the same per-example
    gradients. The sum of an example's T outer products ``sum_t g_t a_t^T`` can cancel; rounding its inputs to
    TF32 (as cuDNN does by default for convolutions, and cuBLAS after ``torch.set_float32_matmul_precision
    ("high")``) or bfloat16 perturbs each product by up to 2^-10 (2^-7) of its size, which the cancellation can
    turn into a much larger relative change of the sum: an example clipped to C by one computation of its norm
    could add more than C through a weight-gradient kernel that rounds differently. Inside this context both
    run in IEEE float32, whose rounding every DP-SGD implementation takes as exact."""
    with float32_products("ieee"):
        yield


def exact_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it holds a lower-precision float (autocast's layer outputs): an exact conversion, so
    the norms and sums are those of the values the layer used."""
    return t.float() if t.is_floating_point() and torch.finfo(t.dtype).bits < 32 else t


#: float32 keeps 23 explicit mantissa bits, TF32 10: the low 13 bits of a TF32 value are zero
_TF32_LOW_BITS = 0x1FFF


def _tf32_bits(t: torch.Tensor, offset: int) -> torch.Tensor:
    """``t`` (float32) with ``offset`` added to its bit pattern and the low 13 mantissa bits then cleared: rounding
    to a TF32 value toward zero (offset 0) or to the nearest, ties away from zero (half the last TF32 place).
    Other dtypes come back unchanged."""
    if t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    if fused_norms.low_bits_apply(bits):  # one kernel on a GPU
        return fused_norms.cleared_low_bits(bits, offset, _TF32_LOW_BITS).view(torch.float32)
    return ((bits + offset if offset else bits) & ~_TF32_LOW_BITS).view(torch.float32)


def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) rounded to the nearest TF32 value (10 explicit mantissa bits, float32's exponent; ties away
    from zero), as a float32 tensor whose low 13 mantissa bits are zero. Other dtypes come back unchanged."""
    return _tf32_bits(t, 0x1000)


def truncate_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) rounded toward zero to a TF32 value: never larger in magnitude. Other dtypes unchanged."""
    return _tf32_bits(t, 0)


def split_tf32(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(high, low)`` with ``high + low == t`` exactly: ``high`` = ``t`` truncated to TF32 and ``low`` the rest.
    ``low`` is a TF32 value too wherever ``t`` has at most 22 significant bits, e.g. the product of two TF32
    values (11 each), so two TF32 products with ``high`` and ``low`` give the exact product with ``t``."""
    high = truncate_to_tf32(t)
    return high, t - high
