"""The fused per-example conv norm kernel (Triton) against the engine's unfold path: the same squared norms, and
the same per-example gradients where it forms them, for strides, padding, dilation, rectangular kernels, several
tiles, and K rows per example. The kernel runs under Triton's CPU interpreter, in a process of its own (Triton
reads that switch when it is imported); on a GPU the same code compiles. Triton comes with PyTorch on Linux."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fedgen.mechanisms import fused_norms

CASES = [  # in, out channels, kernel, stride, padding, dilation, input size, examples, rows per example
    (3, 5, 3, 1, 1, 1, (6, 7), 3, 1),
    (4, 40, 3, 2, 1, 1, (7, 8), 2, 2),  # two tiles of output channels, K = 2
    (2, 3, 2, 1, 0, 2, (5, 6), 2, 3),  # dilation, no padding, K = 3
    (70, 6, 1, 1, 0, 1, (4, 5), 2, 1),  # two tiles of window entries
    (3, 4, (3, 2), (2, 1), (1, 0), 1, (5, 6), 2, 1),  # rectangular kernel, stride and padding
]


def interpreter_gap() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels here, or None. They loop with ``range`` over scalar
    arguments, which the interpreter of Triton < 3.7 converts with ``int()`` of a one-element array; NumPy 2.4 and
    later refuse that (PyTorch 2.11 pins Triton 3.6). The kernels compiled for a GPU are not affected."""
    if not fused_norms.triton_available():
        return "needs Triton (it comes with PyTorch on Linux)"
    import numpy as np
    import triton

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 7):
        return None
    try:
        int(np.zeros(1))
    except TypeError:
        return (f"Triton {triton.__version__}'s CPU interpreter cannot index with a scalar argument under NumPy "
                f"{np.__version__}: install triton>=3.7, or numpy<2.4")
    return None


INTERPRETER_GAP = interpreter_gap()
needs_interpreter = pytest.mark.skipif(INTERPRETER_GAP is not None, reason=str(INTERPRETER_GAP))


def interpret(script: str, *args: str) -> dict | list:
    """Run ``script`` in a process of its own under Triton's CPU interpreter (Triton reads the switch when it is
    imported) and return the JSON of its last output line."""
    done = subprocess.run([sys.executable, "-c", script, *args], env=dict(os.environ, TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


COMPARE = """
import json, sys, torch
from torch import nn
from fedgen.mechanisms import fused_norms, per_example
out = []
for c_in, c_out, kernel, stride, padding, dilation, size, batch, draws in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    layer = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation).double()
    a = torch.randn(batch * draws, c_in, *size, dtype=torch.float64)
    g = torch.randn_like(layer(a))
    expected = per_example._conv2d_weight_sq_norms(layer, [(a, g)], batch)  # float64, the engine's own path
    expected_formed = per_example._conv2d_weight_per_example(layer, a, g, batch)
    layer = layer.float()
    got = fused_norms.conv2d_weight_sq_norms(layer, a.float(), g.float(), batch)
    small = fused_norms.conv2d_weight_sq_norms(layer, a.float(), g.float(), batch, tile=(16, 16, 16))
    formed = fused_norms.conv2d_weight_per_example(layer, a.float(), g.float(), batch)
    formed_small = fused_norms.conv2d_weight_per_example(layer, a.float(), g.float(), batch, tile=(16, 16, 16))
    out.append({"expected": expected.tolist(), "got": got.tolist(), "small tiles": small.tolist(),
                "dtype": str(got.dtype), "expected formed": expected_formed.tolist(), "formed": formed.tolist(),
                "formed, small tiles": formed_small.tolist(), "formed dtype": str(formed.dtype)})
print(json.dumps(out))
"""


@needs_interpreter
def test_fused_norms_equal_the_unfold_path() -> None:
    results = interpret(COMPARE, json.dumps(CASES))
    assert len(results) == len(CASES)
    for case, result in zip(CASES, results, strict=True):
        assert result["dtype"] == "torch.float32"
        assert len(result["got"]) == case[7]
        for key in ("got", "small tiles"):
            torch.testing.assert_close(torch.tensor(result[key], dtype=torch.float64),
                                       torch.tensor(result["expected"], dtype=torch.float64), rtol=1e-5, atol=0,
                                       msg=lambda m, c=case, k=key: f"{c}, {k}: {m}")
        # the per-example gradients themselves, (examples, *weight shape), where the engine forms them
        assert result["formed dtype"] == "torch.float32"
        want = torch.tensor(result["expected formed"], dtype=torch.float64)
        assert want.shape[0] == case[7] and want.abs().max() > 0
        for key in ("formed", "formed, small tiles"):
            torch.testing.assert_close(torch.tensor(result[key], dtype=torch.float64), want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, c=case, k=key: f"{c}, {k}: {m}")


GRAM = """
import json, sys, torch
from torch import nn
from fedgen.mechanisms import fused_norms, per_example
kernel, used = fused_norms.gram_window_sq_norms, []
out = []
for c_in, c_out, kernel_size, stride, padding, dilation, size, batch, draws in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    layer = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, dilation=dilation)
    a = torch.randn(batch * draws, c_in, *size)
    g = torch.randn_like(layer(a))
    fused_norms.gram_applies = lambda gram, g: gram.dtype == torch.float32  # forced on the CPU
    got = {}
    for name, warps in (("got", None), ("one warp", 1)):
        fused_norms.gram_window_sq_norms = lambda *args, warps=warps: used.append(1) or kernel(*args, warps=warps)
        got[name] = per_example._conv2d_gram_sq_norms(layer, a, g, batch).tolist()
    _, kernel_bound = per_example._conv2d_gram_sq_norms(layer, a, g, batch, bound=True)  # from the unpadded M_i
    fused_norms.gram_applies = lambda gram, g: False
    torch_path = per_example._conv2d_gram_sq_norms(layer, a, g, batch)
    expected = per_example._conv2d_weight_sq_norms(layer.double(), [(a.double(), g.double())], batch)
    bound = per_example._conv2d_rounding_bound(layer, a, g, batch)
    out.append({**got, "torch": torch_path.tolist(), "expected": expected.tolist(),
                "bounds": [kernel_bound.tolist(), bound.tolist()]})
print(json.dumps({"used": len(used), "results": out}))
"""


@needs_interpreter
def test_the_gram_window_kernel_gives_the_norms_of_the_gram_path() -> None:
    """Norms from the padded input's Gram matrix, with the windows summed and contracted with the output
    gradient's Gram matrix by the kernel (forced on the CPU, under the interpreter), by its default warps and by
    one: the same as the separable sums in PyTorch and the float64 norms, for strides, padding, dilation,
    rectangular kernels, K rows per example (pairs of rows across draws), rows wider than a power of two (masked
    columns) and many pairs of output rows (those above the diagonal counted twice)."""
    cases = CASES + [(3, 20, 3, 1, 1, 1, (9, 8), 2, 1),  # 9 output rows: 45 pairs
                     (3, 4, 3, 1, 1, 1, (4, 18), 2, 2)]  # 18 output columns in a block of 32, K = 2
    report = interpret(GRAM, json.dumps(cases))
    assert report["used"] == 3 * len(cases)  # the engine's Gram path went through the kernel, thrice per case
    for case, result in zip(cases, report["results"], strict=True):
        want = torch.tensor(result["expected"], dtype=torch.float64)
        assert want.shape == (case[7],) and bool((want > 0).all())
        for key in ("got", "one warp", "torch"):
            torch.testing.assert_close(torch.tensor(result[key], dtype=torch.float64), want, rtol=1e-5, atol=0,
                                       msg=lambda m, c=case, k=key: f"{c}, {k}: {m}")
        # the rounding bound from the unpadded Gram matrix's diagonal, as from the unfolded windows
        torch.testing.assert_close(*map(torch.tensor, result["bounds"]), rtol=1e-5, atol=0)


ROW_SUMS = """
import json, sys, torch
from torch import nn
from fedgen.mechanisms import fused_norms, per_example
out = []
for channels, groups, size, batch, draws, affine in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    layer = nn.GroupNorm(groups, channels, affine=affine)
    a = torch.randn(batch * draws, channels, *size) * 3 + 1
    g = torch.randn_like(a)
    fused_norms.row_sums_apply = lambda a, g: True  # forced on the CPU
    got = per_example._group_norm(layer, a, g, batch)
    fused_norms.row_sums_apply = lambda a, g: False
    want = per_example._group_norm(layer, a, g, batch)
    out.append({"got": {k: v.tolist() for k, v in got.items()}, "want": {k: v.tolist() for k, v in want.items()}})
a, g = torch.randn(36, 300) + 2, torch.randn(36, 300)  # rows and lengths no block divides
ga, g_sum = fused_norms.row_sums(a, g, torch.zeros(36), torch.ones(36), 1)  # mean 0, rstd 1: sum g a
mean, rstd = torch.randn(12), torch.rand(12) + 0.5  # groups of 3 rows
x_hat = (a - mean.repeat_interleave(3)[:, None]) * rstd.repeat_interleave(3)[:, None]
gx, _ = fused_norms.row_sums(a, g, mean, rstd, 3)
try:
    fused_norms.row_sums(a, g, mean, rstd, 2)
    refused = ""
except ValueError as err:
    refused = str(err)
print(json.dumps({"layers": out, "ga": [ga.tolist(), (g * a).sum(1).tolist()],
                  "g_sum": [g_sum.tolist(), g.sum(1).tolist()], "gx": [gx.tolist(), (g * x_hat).sum(1).tolist()],
                  "refused": refused}))
"""


@needs_interpreter
def test_row_sums_give_the_group_norm_per_example_gradients() -> None:
    """GroupNorm's per-example affine gradients from the row-sums kernel (forced on the CPU, under the interpreter)
    equal those of PyTorch's GroupNorm backward, for one and several channels a group, positions that no block
    divides, K rows per example and a layer without affine parameters; the kernel's sums equal PyTorch's, with
    group statistics and with mean 0 and rstd 1 (plain sums), and statistics of the wrong length are refused."""
    cases = [(6, 3, (5, 7), 3, 1, True), (8, 8, (4, 4), 2, 2, True), (4, 1, (33,), 2, 1, True),
             (4, 2, (3, 3), 2, 1, False)]
    report = interpret(ROW_SUMS, json.dumps(cases))
    for case, result in zip(cases, report["layers"], strict=True):
        assert sorted(result["got"]) == sorted(result["want"]) == (["bias", "weight"] if case[-1] else [])
        for name, want in result["want"].items():
            want = torch.tensor(want)
            assert want.shape == (case[3], case[0]) and want.abs().max() > 0
            torch.testing.assert_close(torch.tensor(result["got"][name]), want, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, c=case, n=name: f"{c}, {n}: {m}")
    for key in ("ga", "g_sum", "gx"):  # plain sums, and sum g x_hat from group statistics
        got, want = map(torch.tensor, report[key])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert "one per group of 2 rows" in report["refused"]  # statistics that do not match the groups


GROUP_NORM_BACKWARD = """
import copy, json, sys, torch
from torch import nn
from torch.nn import functional as F
from fedgen.mechanisms import fused_norms, per_example
from fedgen.mechanisms.per_example import GroupNormFromRowSums, PerExampleClipping
fused_norms.row_sums_apply = lambda a, g: True  # forced on the CPU
torch.manual_seed(0)
layers = []
for n, channels, groups, size in json.loads(sys.argv[1]):
    a = torch.randn(n, channels, *size, dtype=torch.float64) * 3 + 1
    w, b = torch.randn(channels, dtype=torch.float64), torch.randn(channels, dtype=torch.float64)
    g = torch.randn_like(a)
    a64, w64, b64 = (t.clone().requires_grad_() for t in (a, w, b))
    want = torch.autograd.grad(F.group_norm(a64, groups, w64, b64, 1e-5), [a64, w64, b64], g)
    got = {}
    for stash in (False, True):  # the backward takes its own row sums, or those a hook left on its node
        a32, w32, b32 = (t.float().requires_grad_() for t in (a, w, b))
        out = F.group_norm(a32, groups, w32, b32, 1e-5)
        stats = per_example._saved_group_stats(out.grad_fn, n, groups, torch.float32)
        y = GroupNormFromRowSums.apply(a32, w32, b32, out.detach(), *stats, groups)
        same = torch.equal(y, out)
        if stash:
            flat = a32.detach().reshape(n * channels, -1)
            y.grad_fn.row_sums = fused_norms.row_sums(flat, g.float().reshape(n * channels, -1), *stats,
                                                      channels // groups)
        got[str(stash)] = [t.tolist() for t in torch.autograd.grad(y, [a32, w32, b32], g.float())] + [same]
    layers.append({"want": [t.tolist() for t in want], "got": got})


class Net(nn.Module):  # the input gradient of each GroupNorm reaches a convolution, strided inputs included
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.norm1 = nn.GroupNorm(3, 6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.norm2 = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.conv2(h).contiguous(memory_format=torch.channels_last)
        return self.head(F.silu(self.norm2(h)).mean((2, 3)))


model = Net()
x, labels = torch.randn(5, 2, 7, 7), torch.randint(0, 3, (5,))
truth = []
for i in range(5):  # one backward pass per example, in float64 with PyTorch's GroupNorm
    m = copy.deepcopy(model).double()
    grads = torch.autograd.grad(F.cross_entropy(m(x[i:i + 1].double()), labels[i:i + 1]), list(m.parameters()))
    truth.append(torch.cat([t.flatten() for t in grads]))
truth = torch.stack(truth)
clip = float(truth.norm(dim=1).median())
factor = (clip / (truth.norm(dim=1) + 1e-6)).clamp(max=1.0)
engine_sums, nodes = {}, {}
for on in (True, False):
    fused_norms.GROUP_NORM_BACKWARD = on
    m = copy.deepcopy(model)
    engine = PerExampleClipping(m, clip)
    nodes[str(on)] = type(m.norm1(m.conv1(x)).grad_fn).__name__
    engine.discard()
    engine.backward(F.cross_entropy(m(x), labels))
    engine_sums[str(on)] = torch.cat([p.summed_grad.flatten() for p in m.parameters()]).tolist()
print(json.dumps({"layers": layers, "engine": engine_sums, "truth": (factor @ truth).tolist(), "nodes": nodes}))
"""


@needs_interpreter
def test_group_norm_backward_from_row_sums_equals_pytorchs() -> None:
    """``GroupNormFromRowSums`` (its kernels forced on the CPU, under the interpreter) gives GroupNorm's output
    unchanged and PyTorch's input, weight and bias gradients (float64 truth), for one and several channels a group
    and positions that no block divides, from its own row sums or from those a hook left on its node; through the
    engine, a model whose GroupNorm input gradients reach convolutions (a channels-last input among them) gets the
    clipped sums of per-example micro-batch truth, and the same as with PyTorch's GroupNorm backward."""
    cases = [(3, 6, 3, (5, 7)), (2, 8, 8, (4, 4)), (4, 4, 1, (33,)), (2, 12, 4, (3, 3))]
    report = interpret(GROUP_NORM_BACKWARD, json.dumps(cases))
    for case, layer in zip(cases, report["layers"], strict=True):
        for stash, got in layer["got"].items():
            assert got[3], f"{case}: the output changed"
            for name, value, want in zip(("input", "weight", "bias"), got[:3], layer["want"], strict=True):
                want = torch.tensor(want, dtype=torch.float64)
                assert want.abs().max() > 0
                torch.testing.assert_close(torch.tensor(value, dtype=torch.float64), want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m, c=case, n=name, s=stash: f"{c}, {n}, stash {s}: {m}")
    assert report["nodes"] == {"True": "GroupNormFromRowSumsBackward", "False": "NativeGroupNormBackward0"}
    truth = torch.tensor(report["truth"], dtype=torch.float64)
    for on, sums in report["engine"].items():
        torch.testing.assert_close(torch.tensor(sums, dtype=torch.float64), truth, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, o=on: f"GROUP_NORM_BACKWARD={o}: {m}")
    torch.testing.assert_close(*(torch.tensor(report["engine"][k]) for k in ("True", "False")), rtol=1e-5, atol=1e-6)


LOW_BITS = """
import json, torch
from fedgen.mechanisms import fused_norms, precision
gen = torch.Generator().manual_seed(0)
t = torch.cat([torch.randn(5000, generator=gen) * 10.0 ** torch.randint(-30, 30, (5000,), generator=gen),
               torch.tensor([0.0, -0.0, 1e-45, -3e-42, 3.4e38, -3.4e38, float("inf"), -float("inf"), float("nan"),
                             1.0 + 2.0 ** -11, -(1.0 + 3 * 2.0 ** -11), 1.0 + 2.0 ** -12])])  # ties, past them
bits = t.view(torch.int32)
out = {}
for offset in (0, 0x1000):
    torch_bits = (bits + offset) & ~0x1FFF
    out[str(offset)] = torch.equal(fused_norms.cleared_low_bits(bits, offset, 0x1FFF), torch_bits)
fused_norms.low_bits_apply = lambda bits: True  # forced on the CPU: precision's functions through the kernel
rounded, truncated = precision.round_to_tf32(t), precision.truncate_to_tf32(t)
fused_norms.low_bits_apply = lambda bits: False
out["round"] = torch.equal(rounded.view(torch.int32), precision.round_to_tf32(t).view(torch.int32))
out["truncate"] = torch.equal(truncated.view(torch.int32), precision.truncate_to_tf32(t).view(torch.int32))
out["moved"] = int((rounded != t).sum())
try:
    fused_norms.cleared_low_bits(bits.view(-1, 2)[:, 0], 0, 0x1FFF)
    out["refused"] = ""
except ValueError as err:
    out["refused"] = str(err)
print(json.dumps(out))
"""


def test_the_low_bits_kernel_rounds_to_tf32_as_pytorch_does() -> None:
    """The one-kernel rounding of float32 bit patterns (forced on the CPU, under the interpreter) gives the same
    bits as PyTorch's add and bitwise and, for both offsets (truncation, rounding to nearest), over values of every
    magnitude, zeros, subnormals, the largest floats, infinities, NaN and ties, in a length no block divides; and
    ``round_to_tf32`` / ``truncate_to_tf32`` through it equal their PyTorch path. A strided tensor is refused."""
    report = interpret(LOW_BITS)
    assert report["0"] and report["4096"] and report["round"] and report["truncate"]
    assert report["moved"] > 4000  # the rounding changed most values: the comparison is not of untouched inputs
    assert "contiguous" in report["refused"]


def test_the_kernel_is_used_only_where_it_supports_the_layer() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    a, g = torch.randn(2, 2, 5, 5), torch.randn(2, 3, 5, 5)
    assert fused_norms.supports(conv, a, g)
    assert not fused_norms.supports(nn.Conv2d(2, 4, 3, groups=2), a, torch.randn(2, 4, 3, 3))
    assert not fused_norms.supports(nn.Conv2d(2, 3, 3, padding="same"), a, g)
    assert not fused_norms.supports(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), a, g)
    assert not fused_norms.supports(conv, a.double(), g.double())  # float64: the engine's own path
    assert not fused_norms.supports(nn.Linear(5, 5), a, g)
    assert not fused_norms.applies(conv, a, g)  # CPU tensors: the engine's own path


def test_the_tile_follows_the_measured_shapes() -> None:
    """The kernel takes the layers it was measured faster on (32+ input channels of a 3x3 kernel, 64+ output
    positions), with the tile measured fastest for their output channels; the others keep the unfold path."""
    def tile(c_in, c_out, kernel, size):
        return fused_norms.tile_for(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2),
                                    torch.empty(1, c_out, size, size))
    assert tile(32, 32, 3, 32) == (32, 32, 64)
    assert tile(64, 64, 3, 8) == (64, 64, 32)
    assert tile(128, 128, 3, 14) == (64, 64, 32)
    assert tile(128, 128, 3, 7) is None  # 49 positions
    assert tile(1, 128, 3, 28) is None  # 9 window entries
    assert tile(128, 64, 1, 16) is None  # a 1x1 convolution: 128 window entries


ENGINE = """
import json, torch
from torch import nn
from fedgen.mechanisms import fused_norms, per_example
fused_norms.applies = lambda layer, a, g: fused_norms.supports(layer, a, g) and fused_norms.tile_for(layer, g) is not None
torch.manual_seed(0)
layer = nn.Conv2d(32, 8, 3, padding=1)
a, g = torch.randn(4, 32, 8, 8), torch.randn(4, 8, 8, 8)  # two examples, K = 2
used = []
kernel = fused_norms.conv2d_weight_sq_norms
fused_norms.conv2d_weight_sq_norms = lambda *args, **kw: used.append(1) or kernel(*args, **kw)
fused = per_example._conv2d_weight_sq_norms(layer, [(a, g)], 2)
former = fused_norms.conv2d_weight_per_example
fused_norms.conv2d_weight_per_example = lambda *args, **kw: used.append(2) or former(*args, **kw)
fused_formed = per_example._conv2d_weight_per_example(layer, a, g, 2)
fused_norms.ENABLED = False
fused_norms.applies = lambda layer, a, g: False
unfold = per_example._conv2d_weight_sq_norms(layer, [(a, g)], 2)
unfold_formed = per_example._conv2d_weight_per_example(layer, a, g, 2)
print(json.dumps({"used": used, "fused": fused.tolist(), "unfold": unfold.tolist(),
                  "fused formed": fused_formed.tolist(), "unfold formed": unfold_formed.tolist()}))
"""


@needs_interpreter
def test_the_engine_takes_the_kernel_where_it_applies() -> None:
    """The engine's conv norms and formed per-example gradients go through the kernel where it applies (here
    forced on the CPU, under the interpreter) and give the unfold path's values."""
    result = interpret(ENGINE)
    assert result["used"] == [1, 2]  # the norms, then the formed gradients, each by the kernel once
    torch.testing.assert_close(torch.tensor(result["fused"]), torch.tensor(result["unfold"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(result["fused formed"]), torch.tensor(result["unfold formed"]),
                               rtol=1e-5, atol=1e-5)


def test_the_kernel_forms_gradients_only_where_their_offsets_fit(monkeypatch) -> None:
    """The kernel writes formed gradients at 32-bit offsets: past 2^31 - 1 values the engine forms them on its
    own path instead (and the kernel's launcher refuses)."""
    monkeypatch.setattr(fused_norms, "applies", lambda layer, a, g: True)
    conv = nn.Conv2d(64, 64, 3, padding=1)  # 36,864 weights
    a = g = torch.empty(1, 64, 16, 16, device="meta")
    assert fused_norms.forms(conv, a, g, 58_000)  # 2.14e9 values
    assert not fused_norms.forms(conv, a, g, 59_000)  # 2.17e9 > 2^31 - 1
    monkeypatch.setattr(fused_norms, "_kernel", lambda: pytest.fail("the kernel was launched"))
    with pytest.raises(ValueError, match="32-bit"):
        fused_norms.conv2d_weight_per_example(conv, torch.empty(59_000, 64, 16, 16, device="meta"),
                                              torch.empty(59_000, 64, 16, 16, device="meta"), 59_000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels compiled for a GPU: needs CUDA")
def test_on_cuda_group_norm_backward_from_row_sums_gives_pytorchs_sums(monkeypatch) -> None:
    """On the GPU, fedgen's ConvNet (three GroupNorm layers, each input gradient reaching a convolution) gets its
    GroupNorm outputs from ``GroupNormFromRowSums``, and its clipped sums in IEEE float32 lie as close to the float64
    sums (PyTorch's GroupNorm in float64) as those of PyTorch's float32 GroupNorm backward do: the two float32 paths
    differ only in the order of their additions."""
    import copy

    from fedgen.evaluation import ConvNet
    from fedgen.mechanisms import per_example
    from fedgen.mechanisms.per_example import PerExampleClipping

    monkeypatch.setattr(per_example, "BOOK_PRECISION", "ieee")
    torch.manual_seed(0)
    model = ConvNet(image_shape=(1, 28, 28), num_classes=10).cuda()
    x, y = torch.rand(48, 1, 28, 28, device="cuda"), torch.randint(0, 10, (48,), device="cuda")
    sums, nodes = {}, {}
    for key in ("row sums", "pytorch", "float64"):
        monkeypatch.setattr(fused_norms, "GROUP_NORM_BACKWARD", key == "row sums")
        net = copy.deepcopy(model).double() if key == "float64" else copy.deepcopy(model)
        engine = PerExampleClipping(net, max_grad_norm=0.05)
        norm = next(m for m in net.modules() if isinstance(m, nn.GroupNorm))
        seen = []
        handle = norm.register_forward_hook(lambda m, i, o: seen.append(type(o.grad_fn).__name__))  # after the engine
        engine.backward(torch.nn.functional.cross_entropy(net(x.to(next(net.parameters()).dtype)), y))
        handle.remove()
        nodes[key] = seen[0]
        sums[key] = torch.cat([p.summed_grad.double().flatten() for p in net.parameters()])
    assert nodes == {"row sums": "GroupNormFromRowSumsBackward", "pytorch": "NativeGroupNormBackward0",
                     "float64": "NativeGroupNormBackward0"}
    reference = sums["float64"]
    assert reference.abs().max() > 0
    error = {key: float((sums[key] - reference).abs().max()) for key in ("row sums", "pytorch")}
    assert error["row sums"] <= max(2 * error["pytorch"], 1e-6 * float(reference.abs().max())), error
    # and the two float32 paths agree far more closely than either with float64 (whose gap is the convolutions' TF32)
    torch.testing.assert_close(sums["row sums"], sums["pytorch"], rtol=0, atol=1e-4 * float(reference.abs().max()))
