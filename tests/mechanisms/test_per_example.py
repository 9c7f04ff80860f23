"""fedgen's clipping engine: clipped per-example gradient sums equal the micro-batch ground truth and Opacus'
for every supported layer (Conv2d with groups, stride and dilation; Linear on sequences; GroupNorm; LayerNorm;
Embedding with repeated tokens; attention built of Linear layers; a layer called twice), and bad models are
refused before any step."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from torch.nn import functional as F

from fedgen.errors import ConfigError
from fedgen.mechanisms.per_example import PerExampleClipping


class Attention(nn.Module):
    """Self-attention made of Linear layers (as in diffusers' Attention) around scaled dot-product attention."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class ImageNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.norm1 = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, dilation=1, padding=1, groups=2)
        self.conv3 = nn.Conv2d(6, 6, 2, dilation=2, bias=False)
        self.attention = Attention(6)
        self.norm2 = nn.LayerNorm(6)
        self.label = nn.Embedding(3, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = F.silu(self.conv3(self.conv2(h)))  # (B, 6, 2, 2)
        tokens = h.flatten(2).transpose(1, 2) + self.label(y).unsqueeze(1)
        tokens = self.norm2(tokens + self.attention(tokens))
        return self.head(self.mix(F.silu(self.mix(tokens))).mean(1))  # mix is called twice


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens)).mean(1))


def _data(kind: str, n: int, gen: torch.Generator):
    y = torch.randint(0, 3, (n,), generator=gen)
    if kind == "image":
        return torch.randn(n, 2, 8, 8, generator=gen, dtype=torch.float64), y
    tokens = torch.randint(0, 20, (n, 5), generator=gen)
    tokens[0] = 3  # one example made of a repeated token
    return tokens, y


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return (ImageNet() if kind == "image" else TokenNet()).double()


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x, y), y)  # the mean over the batch


def _truth(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """One backward pass per example: [B, *p.shape] per parameter."""
    per_param: list[list[torch.Tensor]] = [[] for _ in model.parameters()]
    for i in range(len(x)):
        model.zero_grad()
        _loss(model, x[i:i + 1], y[i:i + 1]).backward()
        for slot, p in zip(per_param, model.parameters(), strict=True):
            slot.append(p.grad.detach().clone())
    return [torch.stack(slot) for slot in per_param]


@pytest.fixture(params=[(2.0, True), (0.0, True), (0.0, False)],
                ids=["weights formed where small", "every weight book-kept", "book-kept, no Gram norms"])
def form_weights(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[float, bool]:
    """Every way of the Linear and Conv2d weights: formed per example where :func:`forms_weight` holds (several
    of these test models' layers), or book-kept everywhere, with convolution norms from the padded input's Gram
    matrix where it is cheapest or never."""
    from fedgen.mechanisms import per_example

    monkeypatch.setattr(per_example, "FORM_RATIO", request.param[0])
    monkeypatch.setattr(per_example, "GRAM_NORMS", request.param[1])
    return request.param


def is_tf32(t: torch.Tensor) -> bool:
    """Whether every value of the float32 tensor ``t`` is a TF32 value (its low 13 mantissa bits zero)."""
    return t.dtype == torch.float32 and not bool((t.contiguous().view(torch.int32) & 0x1FFF).any())


def _isolated_contributions(model: nn.Module, examples: int, batch: int,
                            backward: Callable[[torch.Tensor], None]) -> list[float]:
    """``||clipped contribution of example i||`` for the first ``examples`` examples of a batch, each isolated by a
    one-hot weight (``backward(weights)`` runs the engine's backward pass for the full batch); ``summed_grad`` is
    cleared after each."""
    device = next(model.parameters()).device
    norms = []
    for i in range(examples):
        weights = torch.zeros(batch, device=device)
        weights[i] = 1.0
        backward(weights)
        norms.append(float(torch.linalg.vector_norm(torch.cat([p.summed_grad.flatten().double()
                                                                for p in model.parameters()]))))
        for p in model.parameters():
            p.summed_grad = None
    return norms


def _isolated_image_contributions(clip: float) -> list[float]:
    """:func:`_isolated_contributions` of each of 6 examples of the float32 image model, clipped at ``clip``."""
    model = _model("image").float()
    x, y = _data("image", 6, torch.Generator().manual_seed(5))
    x = x.float()
    engine = PerExampleClipping(model, max_grad_norm=clip)
    return _isolated_contributions(model, len(x), len(x),
                                   lambda weights: engine.backward(_loss(model, x, y), weights=weights))


def _clipped_sum(grads: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
    norms = torch.cat([g.flatten(1) for g in grads], dim=1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factor, g) for g in grads]



class StridedNormNet(nn.Module):
    """GroupNorm on inputs that are not contiguous, as diffusers' attention block (a transposed token sequence) and
    cuDNN's channels-last convolutions hand it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm_image = nn.GroupNorm(2, 4)
        self.norm_tokens = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.norm_image(self.conv(x).contiguous(memory_format=torch.channels_last))
        tokens = h.flatten(2).transpose(1, 2)  # (B, L, C)
        tokens = self.norm_tokens(tokens.transpose(1, 2)).transpose(1, 2)  # a (B, C, L) view, not contiguous
        return self.head(tokens.mean(1))


@pytest.mark.parametrize("n", [1, 3])
def test_group_norm_on_non_contiguous_inputs_equals_ground_truth(n: int) -> None:
    """A micro-batch of one row is where a strided GroupNorm input stays a view (a Poisson batch one example above
    the physical size leaves such a chunk); its per-example gradients must still be the micro-batch truth."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = StridedNormNet().double()
    x, y = _data("image", n, gen)
    truth = _truth(copy.deepcopy(model), x, y)
    engine = PerExampleClipping(model, 1e6)  # no clipping: the sum of the per-example gradients
    engine.backward(_loss(model, x, y))
    for (name, p), want in zip(model.named_parameters(), truth, strict=True):
        torch.testing.assert_close(p.summed_grad, want.sum(0), atol=1e-10, rtol=1e-8,
                                   msg=lambda m, k=name: f"{k}: {m}")


def test_group_norm_hands_pytorch_a_contiguous_output_gradient(monkeypatch) -> None:
    """PyTorch's ``native_group_norm_backward`` can read a strided output gradient as if it were contiguous (seen
    with 2.11, where the test above then fails) and return wrong sums; the rule must hand it a contiguous one, also
    for the one-row transposed input, where the reshape of the gradient stays a strided view."""
    op, contiguous = torch.ops.aten.native_group_norm_backward, []

    def spy(g: torch.Tensor, *args: object) -> object:
        contiguous.append(g.is_contiguous())
        return op(g, *args)

    monkeypatch.setattr(torch.ops.aten, "native_group_norm_backward", spy)
    gen = torch.Generator().manual_seed(1)
    model = StridedNormNet().double()
    x, y = _data("image", 1, gen)
    PerExampleClipping(model, 1e6).backward(_loss(model, x, y))
    assert contiguous == [True, True]  # the rule's two calls (norm_tokens, norm_image); autograd's are not seen


def test_group_norm_reads_the_statistics_the_forward_pass_saved(monkeypatch) -> None:
    """The GroupNorm rule takes the group means and inverse deviations from the layer output's autograd node
    (what PyTorch saved for its own backward) instead of computing them again, and gets the same per-example
    gradients as the rule that computes them (no node)."""
    from fedgen.mechanisms import per_example

    torch.manual_seed(0)
    model = StridedNormNet().double()
    x, y = _data("image", 4, torch.Generator().manual_seed(2))
    engine = PerExampleClipping(model, 1e6)
    loss = _loss(model, x, y)

    def no_statistics(*args, **kwargs):
        raise AssertionError("GroupNorm's statistics were computed again")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "var_mean", no_statistics)
        engine.backward(loss)
    layer = model.norm_image
    a = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    out = layer(a)
    g = torch.randn_like(out)
    saved = per_example._group_norm(layer, a.detach(), g, 3, out.grad_fn)
    computed = per_example._group_norm(layer, a.detach(), g, 3, None)
    assert saved.keys() == computed.keys() == {"weight", "bias"}
    for name in saved:
        torch.testing.assert_close(saved[name], computed[name], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", ["image", "tokens"])
@pytest.mark.usefixtures("form_weights")
def test_clipped_sums_equal_microbatch_ground_truth(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    model = _model(kind)
    x, y = _data(kind, 10, gen)
    truth = _truth(copy.deepcopy(model), x, y)
    norms = torch.cat([g.flatten(1) for g in truth], dim=1).norm(dim=1)
    clip = float(norms.median())  # about half the examples are clipped
    assert 3 <= int((norms > clip).sum()) <= 7
    engine = PerExampleClipping(model, clip)
    engine.backward(_loss(model, x, y))
    expected = _clipped_sum(truth, clip)
    assert len(expected) >= 5
    for (name, p), want in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(p.summed_grad, want, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
        assert p.grad is None  # autograd computed no weight gradient
    assert not engine.pending


@pytest.mark.parametrize("kind", ["image", "tokens"])
@pytest.mark.usefixtures("form_weights")
def test_group_sums_equal_each_groups_microbatch_ground_truth(kind: str) -> None:
    """One pass, one clipped sum per group (the clients of a federated step): group k's row is the clipped sum
    of its own examples (an empty group gets zeros), also with K rows per example; bad groups are refused."""
    gen = torch.Generator().manual_seed(3)
    model = _model(kind)
    x, y = _data(kind, 7, gen)
    truth = _truth(copy.deepcopy(model), x, y)
    clip = float(torch.cat([g.flatten(1) for g in truth], dim=1).norm(dim=1).median())
    groups = torch.tensor([0, 0, 0, 2, 2, 3, 3])  # group 1 has no example this step
    engine = PerExampleClipping(model, clip)
    for draws in (1, 2):  # with K = 2 identical rows per example, each example's loss and gradient are unchanged
        rows = torch.arange(len(x)).repeat_interleave(draws)
        engine.backward(_loss(model, x[rows], y[rows]), draws=draws, groups=groups, num_groups=4)
        for index, (name, p) in enumerate(model.named_parameters()):
            assert p.summed_grad.shape == (4, *p.shape)
            for k in range(4):
                mine = groups == k
                want = _clipped_sum([g[mine] for g in truth], clip)[index] if mine.any() else torch.zeros_like(p)
                torch.testing.assert_close(p.summed_grad[k], want, atol=1e-10, rtol=1e-8,
                                           msg=lambda m, n=name, k=k: f"{n}, group {k}: {m}")
            p.summed_grad = None

    for bad, match in ((torch.tensor([0, 2, 1, 1, 1, 1, 1]), "sorted"),
                       (torch.tensor([0, 0, 0, 0, 0, 0, 4]), r"\[0, 4\)"), (torch.tensor([0, 0, 1]), "shape")):
        with pytest.raises(ValueError, match=match):
            engine.backward(_loss(model, x, y), groups=bad, num_groups=4)
        engine.discard()
    engine.backward(_loss(model, x, y))  # without groups: one sum per parameter
    with pytest.raises(RuntimeError, match="with and without groups"):
        engine.backward(_loss(model, x, y), groups=groups, num_groups=4)


@pytest.mark.usefixtures("form_weights")
def test_frozen_parameters_are_neither_clipped_nor_counted_in_the_norms() -> None:
    gen = torch.Generator().manual_seed(10)
    model = _model("image")
    for frozen in (model.conv1.bias, model.mix.weight, model.norm1.weight, model.conv3.weight):
        frozen.requires_grad_(False)
    x, y = _data("image", 8, gen)
    reference = copy.deepcopy(model)
    trainable = [p for p in reference.parameters() if p.requires_grad]
    truth: list[list[torch.Tensor]] = [[] for _ in trainable]
    for i in range(len(x)):
        reference.zero_grad()
        _loss(reference, x[i:i + 1], y[i:i + 1]).backward()
        for slot, p in zip(truth, trainable, strict=True):
            slot.append(p.grad.detach().clone())
    truth_stacked = [torch.stack(slot) for slot in truth]
    clip = float(torch.cat([g.flatten(1) for g in truth_stacked], dim=1).norm(dim=1).median())
    PerExampleClipping(model, clip).backward(_loss(model, x, y))
    mine = [p for p in model.parameters() if p.requires_grad]
    for p, want in zip(mine, _clipped_sum(truth_stacked, clip), strict=True):
        torch.testing.assert_close(p.summed_grad, want, atol=1e-10, rtol=1e-8)
    assert all(getattr(p, "summed_grad", None) is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("kind", ["image", "tokens"])
@pytest.mark.usefixtures("form_weights")
def test_clipped_sums_equal_opacus(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    model = _model(kind)
    x, y = _data(kind, 6, gen)
    reference = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
    _loss(reference, x, y).backward()
    opacus_grads = [p.grad_sample for p in reference.parameters()]
    engine = PerExampleClipping(model, 0.05)
    engine.backward(_loss(model, x, y))
    for p, want in zip(model.parameters(), _clipped_sum(opacus_grads, 0.05), strict=True):
        torch.testing.assert_close(p.summed_grad, want, atol=1e-10, rtol=1e-8)


def test_micro_batches_accumulate_and_a_wrong_rule_would_be_caught() -> None:
    gen = torch.Generator().manual_seed(2)
    model = _model("image")
    x, y = _data("image", 8, gen)
    truth = _clipped_sum(_truth(copy.deepcopy(model), x, y), 0.1)
    engine = PerExampleClipping(model, 0.1)
    for part in (slice(0, 3), slice(3, 8)):  # two physical micro-batches of one logical batch
        engine.backward(_loss(model, x[part], y[part]))
    for p, want in zip(model.parameters(), truth, strict=True):
        torch.testing.assert_close(p.summed_grad, want, atol=1e-10, rtol=1e-8)
    # the comparison has power: per-layer instead of flat clipping differs
    per_layer = [torch.einsum("i,i...->...", (0.1 / (g.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1.0), g)
                 for g in _truth(_model("image"), x, y)]
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(per_layer, truth, strict=True))


def test_unsupported_or_unsafe_models_are_refused() -> None:
    with pytest.raises(ConfigError, match="BatchNorm2d"):
        PerExampleClipping(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), 1.0)
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        PerExampleClipping(nn.MultiheadAttention(4, 2), 1.0)
    with pytest.raises(ConfigError, match="padding"):
        PerExampleClipping(nn.Conv2d(1, 2, 3, padding="same"), 1.0)
    frozen = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    frozen[1].requires_grad_(False)  # frozen layers need no rule
    PerExampleClipping(frozen, 1.0)


def test_in_place_changes_of_a_recorded_output_are_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 2))
    engine = PerExampleClipping(model, 1.0)
    with pytest.raises(RuntimeError, match="in place"):
        engine.backward(model(torch.randn(4, 3)).sum())
    x = torch.randn(4, 3)
    layer = nn.Linear(3, 3)
    engine_2 = PerExampleClipping(layer, 1.0)
    out = layer(x)
    x.mul_(2)  # the recorded input changed after the layer ran
    with pytest.raises(RuntimeError, match="in place"):
        engine_2.backward(out.sum())
    with pytest.raises(RuntimeError, match="no forward pass"):
        engine.backward(torch.zeros((), requires_grad=True))
    with torch.no_grad():  # evaluation is not recorded
        model(torch.randn(4, 3))
    assert not engine.pending


def _dpsgd_step(engine: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.5):
    from torch.utils.data import TensorDataset

    from fedgen.mechanisms import DPSGD

    mechanism = DPSGD(noise_multiplier=0.3, max_grad_norm=0.05, seed=7, engine=engine)
    loader = mechanism.data_loader(TensorDataset(torch.zeros(40, 1)), batch_size=8)
    wrapped, optimizer = mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=lr),
                                                data_loader=loader, steps=5)
    optimizer.zero_grad()
    loss = _loss(wrapped, x, y)
    mechanism.backward(loss) if engine == "fedgen" else loss.backward()
    optimizer.step()
    return mechanism, [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["image", "tokens"])
def test_a_dpsgd_step_with_the_fedgen_engine_equals_the_opacus_step(kind: str) -> None:
    gen = torch.Generator().manual_seed(3)
    x, y = _data(kind, 12, gen)
    mech_o, grads_o = _dpsgd_step("opacus", _model(kind), x, y)
    mech_f, grads_f = _dpsgd_step("fedgen", _model(kind), x, y)
    for a, b in zip(grads_o, grads_f, strict=True):  # same clipped sum, same seeded noise, same scaling
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert mech_f.ledger.events == mech_o.ledger.events and mech_f.steps_taken == 1
    assert any(g.abs().max() > 1e-3 for g in grads_f)


def test_the_fedgen_engine_refuses_a_plain_backward() -> None:
    from torch.utils.data import TensorDataset

    from fedgen.mechanisms import DPSGD

    model = _model("tokens")
    mechanism = DPSGD(noise_multiplier=1.0, seed=0, engine="fedgen")
    loader = mechanism.data_loader(TensorDataset(torch.zeros(40, 1)), batch_size=8)
    model, optimizer = mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                              data_loader=loader, steps=5)
    x, y = _data("tokens", 4, torch.Generator().manual_seed(0))
    _loss(model, x, y).backward()  # bypasses clipping
    with pytest.raises(RuntimeError, match="mechanism.backward"):
        optimizer.step()
    assert len(mechanism.ledger) == 0  # nothing was released


@pytest.mark.parametrize("kind", ["image", "tokens"])
@pytest.mark.usefixtures("form_weights")
def test_noise_multiplicity_clips_the_mean_over_k_draws_of_each_example(kind: str) -> None:
    gen = torch.Generator().manual_seed(4)
    draws = 3
    model = _model(kind)
    x, y = _data(kind, 6, gen)
    rows_x, rows_y = x.repeat_interleave(draws, 0), y.repeat_interleave(draws, 0)
    if kind == "image":
        rows_x = rows_x + 0.5 * torch.randn(rows_x.shape, generator=gen, dtype=rows_x.dtype)  # K noisy copies
    else:
        rows_x[::2, 0] = 7  # copies differ
    reference = copy.deepcopy(model)
    truth: list[list[torch.Tensor]] = [[] for _ in model.parameters()]
    for i in range(len(x)):  # example i's loss: the mean over its K rows
        reference.zero_grad()
        part = slice(i * draws, (i + 1) * draws)
        _loss(reference, rows_x[part], rows_y[part]).backward()
        for slot, p in zip(truth, reference.parameters(), strict=True):
            slot.append(p.grad.detach().clone())
    truth = [torch.stack(slot) for slot in truth]
    engine = PerExampleClipping(model, 0.1)
    engine.backward(_loss(model, rows_x, rows_y), draws=draws)
    for p, want in zip(model.parameters(), _clipped_sum(truth, 0.1), strict=True):
        torch.testing.assert_close(p.summed_grad, want, atol=1e-10, rtol=1e-8)
    with pytest.raises(ValueError, match="multiple"):
        engine.backward(_loss(model, rows_x[:5], rows_y[:5]), draws=draws)


@pytest.mark.usefixtures("form_weights")
def test_a_diffusers_unet_with_attention_and_class_embeddings_matches_microbatches() -> None:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1,
                       num_class_embeds=3).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 1000, (4,), generator=gen)
    labels = torch.randint(0, 3, (4,), generator=gen)

    def loss(model: nn.Module, part: slice = slice(None)) -> torch.Tensor:
        return model(x[part], t[part], class_labels=labels[part]).sample.pow(2).mean()

    reference = copy.deepcopy(unet)
    truth: list[list[torch.Tensor]] = [[] for _ in unet.parameters()]
    for i in range(len(x)):
        reference.zero_grad()
        loss(reference, slice(i, i + 1)).backward()
        for slot, p in zip(truth, reference.parameters(), strict=True):
            slot.append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    truth = [torch.stack(slot) for slot in truth]
    norms = torch.cat([g.flatten(1) for g in truth], dim=1).norm(dim=1)
    clip = float(norms.median())
    engine = PerExampleClipping(unet, clip)
    engine.backward(loss(unet))
    for (name, p), want in zip(unet.named_parameters(), _clipped_sum(truth, clip), strict=True):
        torch.testing.assert_close(p.summed_grad, want, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


def test_both_norm_methods_are_exact_and_work_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedgen.mechanisms import per_example

    gen = torch.Generator().manual_seed(6)
    for t, d_in, d_out in [(2, 5, 4), (9, 2, 3)]:  # ghost norm (T (d_in + d_out) <= d_in d_out), then formed
        x = torch.randn(7, t, d_in, generator=gen, dtype=torch.float64)
        g = torch.randn(7, t, d_out, generator=gen, dtype=torch.float64)
        want = torch.einsum("nto,nti->noi", g, x).pow(2).sum((1, 2))
        torch.testing.assert_close(per_example._positions_sq_norms(x, g), want)
        monkeypatch.setattr(per_example, "CHUNK_ELEMENTS", 8)  # one example at a time
        torch.testing.assert_close(per_example._positions_sq_norms(x, g), want)
        monkeypatch.undo()


@pytest.mark.parametrize("kernel,stride,dilation,padding,draws", [
    (3, 1, 1, 1, 1), (3, 2, 1, 0, 1), (2, 1, 2, 2, 3), ((3, 2), (2, 1), (1, 2), (1, 0), 2), (1, 1, 1, 0, 1)])
def test_the_padded_input_gram_gives_the_exact_norms(monkeypatch: pytest.MonkeyPatch, kernel, stride, dilation,
                                                     padding, draws) -> None:
    """The Gram-matrix ghost norm of a convolution equals the squared norms of the per-example weight gradients
    formed by autograd, one example at a time, over strides, dilation, padding, rectangular kernels and K rows per
    example; also a few examples at a time."""
    from fedgen.mechanisms import per_example

    gen = torch.Generator().manual_seed(10)
    layer = nn.Conv2d(3, 4, kernel, stride=stride, dilation=dilation, padding=padding, bias=False).double()
    a = torch.randn(5 * draws, 3, 7, 6, generator=gen, dtype=torch.float64)
    out = layer(a)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    want = torch.stack([torch.autograd.grad(out[i * draws:(i + 1) * draws], layer.weight, g[i * draws:(i + 1) * draws],
                                            retain_graph=True)[0].pow(2).sum() for i in range(5)])
    torch.testing.assert_close(per_example._conv2d_gram_sq_norms(layer, a, g, 5), want)
    monkeypatch.setattr(per_example, "CHUNK_ELEMENTS", 1)  # one example at a time (a chunk is at least |a|)
    torch.testing.assert_close(per_example._conv2d_gram_sq_norms(layer, a[:draws * 2], g[:draws * 2], 2), want[:2])


def test_convolution_norms_take_the_way_of_fewest_multiplications(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Gram matrix of the padded input serves the ConvNet's 128-channel convolutions at 14x14 and 7x7 and a
    UNet's at 8x8, not a UNet's 32-channel ones at 32x32 (forming is cheaper) nor a stride-2 convolution (the
    unfolded input's Gram is smaller there)."""
    from fedgen.mechanisms import per_example

    def way(c_in: int, c_out: int, size: int, stride: int = 1, rows: int = 8) -> str:
        layer = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        a = torch.empty(rows, c_in, size, size, device="meta")
        count = per_example._conv_multiplications(layer, a, layer(a), 8)
        return min(count, key=count.get)

    assert way(128, 128, 14) == way(128, 128, 7) == way(64, 64, 8) == way(128, 64, 8) == "gram"
    assert way(32, 32, 32) == way(64, 64, 16) == "form"
    assert way(64, 64, 8, rows=32) == "form"  # K = 4: the Gram grows as K^2, forming as K
    assert way(128, 128, 8, stride=2) == "ghost"
    calls = []
    monkeypatch.setattr(per_example, "_conv2d_gram_sq_norms", lambda *args: calls.append(args) or torch.zeros(2))
    layer = nn.Conv2d(64, 64, 3, padding=1)  # at 4x4 the Gram is cheapest
    a = torch.randn(2, 64, 4, 4)
    per_example._conv2d_weight_sq_norms(layer, [(a, layer(a).detach())], 2)
    assert len(calls) == 1
    monkeypatch.setattr(per_example, "GRAM_NORMS", False)
    per_example._conv2d_weight_sq_norms(layer, [(a, layer(a).detach())], 2)
    assert len(calls) == 1


@pytest.mark.parametrize("kernel,stride,dilation,padding", [(3, 1, 1, 1), (3, 2, 1, 0), (2, 1, 2, 2), ((3, 2), (2, 1), (1, 2), (1, 0))])
def test_the_strided_unfold_equals_torch_unfold(kernel, stride, dilation, padding) -> None:
    from fedgen.mechanisms import per_example

    layer = nn.Conv2d(3, 4, kernel, stride=stride, dilation=dilation, padding=padding)
    a = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(9))
    want = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    torch.testing.assert_close(per_example._unfold(layer, a), want, atol=0, rtol=0)


class TwiceConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(F.silu(self.conv(x)))[:, :, ::2, ::2].mean((2, 3)))  # conv called twice


@pytest.mark.usefixtures("form_weights")
def test_a_convolution_called_twice_and_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedgen.mechanisms import per_example

    monkeypatch.setattr(per_example, "CHUNK_ELEMENTS", 100)  # unfold a few examples at a time
    torch.manual_seed(0)
    model = TwiceConv().double()
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(6, 3, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
    truth = _truth(copy.deepcopy(model), x, y)
    clip = float(torch.cat([g.flatten(1) for g in truth], dim=1).norm(dim=1).median())
    PerExampleClipping(model, clip).backward(_loss(model, x, y))
    for p, want in zip(model.parameters(), _clipped_sum(truth, clip), strict=True):
        torch.testing.assert_close(p.summed_grad, want, atol=1e-10, rtol=1e-8)


def test_an_empty_poisson_batch_still_releases_noise() -> None:
    gen = torch.Generator().manual_seed(8)
    x, y = _data("image", 4, gen)
    mechanism, grads = _dpsgd_step("fedgen", _model("image"), x[:0], y[:0])
    assert mechanism.steps_taken == 1 and len(mechanism.ledger) == 1
    noise = torch.cat([g.flatten() for g in grads])  # noise only: N(0, (0.3 * 0.05)^2) / 8 per coordinate
    assert abs(float(noise.std()) / (0.3 * 0.05 / 8) - 1) < 0.2 and noise.numel() > 400


def test_norms_and_clipped_sums_run_in_ieee_float32_even_when_tf32_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """With TF32 on (cuDNN's default for convolutions), a weight-gradient kernel would round its inputs to 10
    bits while the norm was taken in float32: an example could then add more than C. The engine switches both
    to IEEE float32 for its own products, and gives the user's settings back, also after an error."""
    from fedgen.mechanisms import per_example

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    seen: list[tuple[str, str]] = []
    real_norms, real_sum = per_example.BOOK_KEEPING[nn.Conv2d]

    def spy_norms(*args):
        seen.append((matmul.fp32_precision, conv.fp32_precision))
        return real_norms(*args)

    def spy_sum(*args):
        seen.append((matmul.fp32_precision, conv.fp32_precision))
        return real_sum(*args)

    monkeypatch.setitem(per_example.BOOK_KEEPING, nn.Conv2d, (spy_norms, spy_sum))
    monkeypatch.setattr(per_example, "FORM_RATIO", 0.0)  # book-keep the convolution, whose products are watched
    try:
        matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
        model = _model("image")
        x, y = _data("image", 4, torch.Generator().manual_seed(0))
        clipping = PerExampleClipping(model, max_grad_norm=0.5)
        clipping.backward(_loss(model, x, y))
        assert seen and set(seen) == {("ieee", "ieee")}
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")

        def fail(*args):
            raise RuntimeError("boom")

        monkeypatch.setitem(per_example.BOOK_KEEPING, nn.Conv2d, (fail, real_sum))
        with pytest.raises(RuntimeError, match="boom"):
            clipping.backward(_loss(model, x, y))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


@pytest.mark.parametrize(("form_precision", "global_matmul"), [("ieee", "tf32"), ("tf32", "ieee"), ("ieee", "none"),
                                                           ("tf32", "tf32")])
def test_formed_gradients_take_form_precision_whatever_the_global_setting(monkeypatch: pytest.MonkeyPatch,
                                                                         form_precision: str,
                                                                         global_matmul: str) -> None:
    """Per-example gradients formed in the backward pass (each its example's norm and summand, so either precision
    keeps the bound) are computed with matrix products at ``FORM_PRECISION``, against the global setting ("none",
    PyTorch's default, is IEEE), while the book-kept norms and sums stay in IEEE float32; the user's settings come
    back afterwards."""
    from fedgen.mechanisms import per_example

    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    formed: list[str] = []
    kept: list[str] = []
    real_form = per_example.PER_EXAMPLE_WEIGHT[nn.Conv2d]
    real_norms, real_sum = per_example.BOOK_KEEPING[nn.Linear]

    def spy_form(*args):
        formed.append(per_example.matmul_precision())
        return real_form(*args)

    def spy_norms(*args):
        kept.append(per_example.matmul_precision())
        return real_norms(*args)

    monkeypatch.setitem(per_example.PER_EXAMPLE_WEIGHT, nn.Conv2d, spy_form)
    monkeypatch.setitem(per_example.BOOK_KEEPING, nn.Linear, (spy_norms, real_sum))
    monkeypatch.setattr(per_example, "FORM_PRECISION", form_precision)
    # form every convolution's gradients, book-keep every Linear layer's
    monkeypatch.setattr(per_example, "forms_weight", lambda layer, *args: isinstance(layer, nn.Conv2d))
    switches = []
    real_switch = per_example.float32_products

    def spy_switch(precision):
        switches.append(precision)
        return real_switch(precision)

    monkeypatch.setattr(per_example, "float32_products", spy_switch)
    try:
        matmul.fp32_precision = global_matmul
        model = _model("image")
        x, y = _data("image", 4, torch.Generator().manual_seed(0))
        clipping = PerExampleClipping(model, max_grad_norm=0.5)
        clipping.backward(_loss(model, x, y))
        assert formed and set(formed) == {form_precision}
        assert kept and set(kept) == {"ieee"}
        assert matmul.fp32_precision == global_matmul
        # the hooks switch (microseconds a layer) only where the global setting differs
        assert bool(switches) == (per_example.matmul_precision() != form_precision)
    finally:
        matmul.fp32_precision = saved


def test_float32_products_refuses_other_precisions() -> None:
    from fedgen.mechanisms.precision import float32_products

    with pytest.raises(ValueError, match="'ieee' or 'tf32'"), float32_products("bf16"):
        pass


def test_under_autocast_each_example_still_adds_at_most_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """With autocast on (e.g. Lightning's precision="bf16-mixed"), the layers give bfloat16 outputs and output
    gradients, and autocast would run the engine's own products in bfloat16: the norm and the clipped sum would
    round differently and an example could add more than C (this test measured 1.005 C before). The engine converts
    them exactly to float32 and computes with autocast off."""
    from fedgen.mechanisms import per_example

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.randn(8, 16), torch.randint(0, 3, (8,))
    seen = []
    real_norms, real_sum = per_example.BOOK_KEEPING[nn.Linear]

    def spy_sum(layer, a, g):
        seen.append((a.dtype, g.dtype, torch.is_autocast_enabled("cpu")))
        return real_sum(layer, a, g)

    monkeypatch.setitem(per_example.BOOK_KEEPING, nn.Linear, (real_norms, spy_sum))
    clip = 1e-4  # every example clipped: each contribution has norm exactly C
    engine = PerExampleClipping(model, max_grad_norm=clip)

    def backward(weights: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert logits.dtype == torch.bfloat16  # autocast is really on
            losses = F.cross_entropy(logits.float(), y, reduction="none")
            engine.backward((weights * losses).mean())

    assert max(_isolated_contributions(model, len(x), len(x), backward)) <= clip * (1 + 1e-5)
    assert seen and set(seen) == {(torch.float32, torch.float32, False)}


def test_no_layer_output_is_pinned_and_only_weights_keep_their_output_gradients(monkeypatch: pytest.MonkeyPatch
                                                                                   ) -> None:
    """Memory: the engine catches each output gradient in a hook during the backward pass. When the clip factors
    are computed, no layer output is alive any more (autograd freed each once used), and only the layers with a
    book-keeping weight (Linear, Conv2d) still hold their (input, output gradient); GroupNorm, LayerNorm and
    Embedding kept only their per-example gradients. (Every weight book-kept here; the next test forms one.)"""
    import weakref

    from fedgen.mechanisms import per_example

    monkeypatch.setattr(per_example, "FORM_RATIO", 0.0)
    model, gen = _model("image"), torch.Generator().manual_seed(5)
    x, y = _data("image", 6, gen)
    engine = PerExampleClipping(model, max_grad_norm=1.0)
    outputs = []
    for layer in engine.layers:
        layer.register_forward_hook(lambda m, i, o: outputs.append(weakref.ref(o)))
    seen = {}
    clip_and_sum = engine._clip_and_sum

    def spy(by_layer, materialized, *args):
        seen["alive"] = sum(ref() is not None for ref in outputs)
        seen["holding"] = {type(layer).__name__ for layer in by_layer}
        seen["formed"] = {type(layer).__name__ for layer in engine.layers
                          for p in layer.parameters(recurse=False) if p in materialized}
        return clip_and_sum(by_layer, materialized, *args)

    monkeypatch.setattr(engine, "_clip_and_sum", spy)
    engine.backward(_loss(model, x, y))
    assert len(outputs) == 13 and seen["alive"] == 0  # 12 layers, one of them called twice
    assert seen["holding"] == {"Conv2d", "Linear"}
    assert seen["formed"] == {"Conv2d", "Linear", "GroupNorm", "LayerNorm", "Embedding"}  # biases, small layers
    expected = _clipped_sum(_truth(copy.deepcopy(model), x, y), 1.0)
    for p, truth in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.summed_grad, truth, atol=1e-10, rtol=1e-8)


def test_weights_are_formed_where_they_take_at_most_twice_the_memory_of_book_keeping(monkeypatch: pytest.MonkeyPatch
                                                                                    ) -> None:
    """The rule ``B |W| <= rho (|a| + |g|)`` on a UNet's shapes at batch 1024, rho = 2 by default: its convolutions
    at 32x32 and 16x16 are formed (the 64-channel ones at 16x16 hold 1.125 times their pair), those at 8x8 only with
    K = 4 rows per example, and a plain MLP layer never (one position)."""
    from fedgen.mechanisms import per_example

    def forms(layer: nn.Module, a_shape: tuple[int, ...], g_shape: tuple[int, ...], batch: int = 1024) -> bool:
        return per_example.forms_weight(layer, torch.empty(a_shape, device="meta"),
                                        torch.empty(g_shape, device="meta"), batch)

    assert per_example.FORM_RATIO == 2.0
    conv32, conv64 = nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
    assert forms(conv32, (1024, 32, 32, 32), (1024, 32, 32, 32))
    assert forms(conv64, (1024, 64, 16, 16), (1024, 64, 16, 16))
    assert not forms(conv64, (1024, 64, 8, 8), (1024, 64, 8, 8))  # 4.5 times the pair
    assert forms(conv64, (4096, 64, 8, 8), (4096, 64, 8, 8))  # K = 4
    assert forms(nn.Linear(64, 64), (1024, 64, 64), (1024, 64, 64))  # attention over 64 positions
    assert not forms(nn.Linear(256, 256), (1024, 256), (1024, 256))
    monkeypatch.setattr(per_example, "FORM_RATIO", 1.0)  # no more values than the pair
    assert not forms(conv64, (1024, 64, 16, 16), (1024, 64, 16, 16))
    assert forms(conv32, (1024, 32, 32, 32), (1024, 32, 32, 32))
    monkeypatch.setattr(per_example, "FORM_RATIO", 0.0)
    assert not forms(conv32, (1024, 32, 32, 32), (1024, 32, 32, 32))


def test_a_formed_weight_keeps_neither_input_nor_output_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a weight is formed, the layer's (input, output gradient) pair is not kept for the clipped sum: the
    formed gradients are both the norms' input and the sums' (no second weight-gradient product)."""
    from fedgen.mechanisms import per_example

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(3 * 64, 3)).double()
    x, y = torch.randn(5, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    seen = {}
    engine = PerExampleClipping(model, 1e-3)
    clip_and_sum = engine._clip_and_sum

    def spy(by_layer, materialized, *args):
        seen["holding"] = [type(layer).__name__ for layer in by_layer]
        seen["formed"] = [tuple(p.shape) for p in materialized if p.dim() > 1]
        return clip_and_sum(by_layer, materialized, *args)

    monkeypatch.setattr(engine, "_clip_and_sum", spy)
    monkeypatch.setattr(per_example, "BOOK_KEEPING", {nn.Linear: per_example.BOOK_KEEPING[nn.Linear]})
    engine.backward(F.cross_entropy(model(x), y))  # a Conv2d book-kept would fail: it has no entry now
    assert seen == {"holding": ["Linear"], "formed": [(3, 2, 3, 3)]}
    summed = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
    reference = copy.deepcopy(model)
    want = []
    for i in range(len(x)):
        reference.zero_grad()
        F.cross_entropy(reference(x[i:i + 1]), y[i:i + 1]).backward()
        want.append(torch.cat([p.grad.flatten() for p in reference.parameters()]))
    grads = torch.stack(want)
    expected = (grads * (1e-3 / (grads.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)).sum(0)
    torch.testing.assert_close(summed, expected, atol=1e-12, rtol=1e-8)


@pytest.mark.parametrize("gram_norms", [True, False], ids=["Gram norms", "unfold norms"])
def test_in_tf32_the_book_kept_products_see_only_tf32_values(monkeypatch: pytest.MonkeyPatch,
                                                            gram_norms: bool) -> None:
    """``BOOK_PRECISION = "tf32"`` with ``TF32_SUMS = "split"``: every operand of the book-kept norms and sums is a
    TF32 value (so a tensor core's rounding of it is the identity and its products are exact), the sums run in TF32
    on the two halves of each scaled output gradient, and each example still adds at most C."""
    from fedgen.mechanisms import per_example

    monkeypatch.setattr(per_example, "BOOK_PRECISION", "tf32")
    monkeypatch.setattr(per_example, "TF32_SUMS", "split")
    monkeypatch.setattr(per_example, "FORM_RATIO", 0.0)  # book-keep every weight
    monkeypatch.setattr(per_example, "GRAM_NORMS", gram_norms)
    norms_seen: list[bool] = []
    sums_seen: list[tuple[bool, bool, str, str]] = []
    for kind in (nn.Conv2d, nn.Linear):
        real_norms, real_sum = per_example.BOOK_KEEPING[kind]

        def spy_norms(layer, calls, batch, precision, real_norms=real_norms):
            norms_seen.extend(is_tf32(a) and is_tf32(g) and precision == "tf32" for a, g in calls)
            return real_norms(layer, calls, batch, precision)

        def spy_sum(layer, a, g, real_sum=real_sum):
            sums_seen.append((is_tf32(a), is_tf32(g), torch.backends.cuda.matmul.fp32_precision,
                              torch.backends.cudnn.conv.fp32_precision))
            return real_sum(layer, a, g)

        monkeypatch.setitem(per_example.BOOK_KEEPING, kind, (spy_norms, spy_sum))
    clip = 1e-3  # every example clipped: each contribution has norm C
    norms = _isolated_image_contributions(clip)
    assert clip * (1 - 2**-9) <= min(norms) and max(norms) <= clip * (1 + 1e-6)  # factors truncated by <= 2^-10
    layer_calls = len(norms_seen) // len(norms)
    assert norms_seen and all(norms_seen)
    assert len(sums_seen) == 2 * layer_calls * len(norms)  # two halves per layer call
    assert all(a and g and matmul == conv == "tf32" for a, g, matmul, conv in sums_seen)


def test_book_precision_auto_takes_tf32_only_for_layers_with_many_multiply_adds(monkeypatch: pytest.MonkeyPatch
                                                                               ) -> None:
    """``BOOK_PRECISION = "auto"``: TF32 where a layer's clipped sum takes at least ``TF32_MIN_MULTIPLY_ADDS``
    (``|g| d_in``) on a CUDA device, IEEE elsewhere, off CUDA devices and for anything not float32; "ieee" and
    "tf32" apply to every layer. "auto" is the default."""
    from fedgen.mechanisms import per_example
    from fedgen.mechanisms.per_example import book_precision

    def decide(layer: nn.Module, a_shape: tuple[int, ...], g_shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> str:
        return book_precision(layer, torch.empty(a_shape, device="meta", dtype=dtype),
                              torch.empty(g_shape, device="meta", dtype=dtype))

    conv, linear = nn.Conv2d(128, 128, 3, padding=1), nn.Linear(1152, 10)
    assert per_example.BOOK_PRECISION == "auto"  # the default
    assert decide(conv, (1024, 128, 14, 14), (1024, 128, 14, 14)) == "ieee"  # off CUDA: no tensor cores
    monkeypatch.setattr(per_example, "_tensor_cores", lambda t: True)  # as on a GPU
    assert per_example.TF32_MIN_MULTIPLY_ADDS == 2**32
    assert decide(conv, (1024, 128, 14, 14), (1024, 128, 14, 14)) == "tf32"  # 29.6e9 multiply-adds
    assert decide(conv, (256, 128, 7, 7), (256, 128, 7, 7)) == "ieee"  # 1.8e9
    assert decide(linear, (1024, 1152), (1024, 10)) == "ieee"
    assert decide(conv, (1024, 128, 14, 14), (1024, 128, 14, 14), torch.float64) == "ieee"
    monkeypatch.setattr(per_example, "BOOK_PRECISION", "tf32")
    assert decide(linear, (1024, 1152), (1024, 10)) == "tf32"
    assert decide(linear, (1024, 1152), (1024, 10), torch.float64) == "ieee"
    monkeypatch.setattr(per_example, "BOOK_PRECISION", "ieee")
    assert decide(conv, (1024, 128, 14, 14), (1024, 128, 14, 14)) == "ieee"


def test_book_precision_auto_mixes_tf32_and_ieee_layers_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``"auto"`` and a threshold between this model's layers, the large layers' norms and sums see TF32
    operands and run in TF32, the small ones' stay IEEE on unrounded operands, and each isolated example still adds
    between C (1 - 2^-9) and C (1 + 1e-6)."""
    from fedgen.mechanisms import per_example

    threshold = 3000
    monkeypatch.setattr(per_example, "BOOK_PRECISION", "auto")
    monkeypatch.setattr(per_example, "_tensor_cores", lambda t: True)  # as on a GPU
    monkeypatch.setattr(per_example, "TF32_MIN_MULTIPLY_ADDS", threshold)
    monkeypatch.setattr(per_example, "FORM_RATIO", 0.0)  # book-keep every weight
    # the spies wrap BOOK_KEEPING's norm rules, which a Gram-path convolution's joint rule with its bound bypasses
    # (that rule has its own test)
    monkeypatch.setattr(per_example, "GRAM_BOUNDS", False)
    seen: list[tuple[str, bool]] = []
    for kind in (nn.Conv2d, nn.Linear):
        real_norms, real_sum = per_example.BOOK_KEEPING[kind]

        def spy_norms(layer, calls, batch, precision, real_norms=real_norms):
            large = calls[0][1].numel() * layer.weight[0].numel() >= threshold
            assert precision == ("tf32" if large else "ieee")
            seen.extend((precision, is_tf32(a) and is_tf32(g)) for a, g in calls)
            return real_norms(layer, calls, batch, precision)

        monkeypatch.setitem(per_example.BOOK_KEEPING, kind, (spy_norms, real_sum))
    clip = 1e-3
    norms = _isolated_image_contributions(clip)
    assert clip * (1 - 2**-9) <= min(norms) and max(norms) <= clip * (1 + 1e-6)
    assert {precision for precision, _ in seen} == {"ieee", "tf32"}
    assert all(rounded == (precision == "tf32") for precision, rounded in seen)


def test_tf32_book_keeping_sums_are_those_of_the_rounded_operands(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clipped sums in TF32 mode lie within TF32's rounding of the IEEE ones (nothing else changes), and a
    float64 model is left alone (TF32 rounds float32 values only)."""
    from fedgen.mechanisms import per_example

    monkeypatch.setattr(per_example, "FORM_RATIO", 0.0)
    sums = {}
    for precision in ("ieee", "tf32"):
        monkeypatch.setattr(per_example, "BOOK_PRECISION", precision)
        for dtype in (torch.float32, torch.float64):
            model = _model("image").to(dtype)
            x, y = _data("image", 8, torch.Generator().manual_seed(1))
            PerExampleClipping(model, max_grad_norm=0.05).backward(_loss(model, x.to(dtype), y))
            sums[precision, dtype] = torch.cat([p.summed_grad.flatten().double() for p in model.parameters()])
    difference = torch.linalg.vector_norm(sums["tf32", torch.float32] - sums["ieee", torch.float32])
    assert 0 < float(difference) <= 2e-3 * float(torch.linalg.vector_norm(sums["ieee", torch.float32]))
    assert torch.equal(sums["tf32", torch.float64], sums["ieee", torch.float64])


def test_tf32_rounding_truncation_and_exact_halves() -> None:
    """``round_to_tf32`` moves a float32 value by at most 2^-11 of it onto a TF32 value, ``truncate_to_tf32`` never
    away from zero (at most 2^-10), and the product of two TF32 values splits into two TF32 halves that sum to it
    exactly (checked in float64)."""
    from fedgen.mechanisms.precision import round_to_tf32, split_tf32, truncate_to_tf32

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(4096, generator=gen) * torch.logspace(-30, 30, 4096)
    rounded, truncated = round_to_tf32(t), truncate_to_tf32(t)
    assert is_tf32(rounded) and is_tf32(truncated) and not is_tf32(t)
    assert float(((rounded - t).abs() / t.abs()).max()) <= 2**-11
    assert bool((truncated.abs() <= t.abs()).all()) and float(((truncated - t).abs() / t.abs()).max()) < 2**-10
    assert torch.equal(round_to_tf32(rounded), rounded)
    a, b = round_to_tf32(torch.randn(4096, generator=gen)), truncate_to_tf32(torch.rand(4096, generator=gen))
    product = a * b
    assert torch.equal(product.double(), a.double() * b.double())  # 22 significant bits: exact in float32
    high, low = split_tf32(product)
    assert is_tf32(high) and is_tf32(low) and torch.equal(high.double() + low.double(), product.double())
    assert torch.equal(round_to_tf32(t.double()), t.double())  # other dtypes are left alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 tensor cores: needs a CUDA device")
@pytest.mark.parametrize(("precision", "sums", "least"), [("ieee", "margin", 1 - 2**-9), ("tf32", "split", 1 - 2**-9),
                                                          ("tf32", "margin", 0.97)])
def test_on_cuda_each_isolated_example_adds_at_most_c_in_either_book_precision(monkeypatch: pytest.MonkeyPatch,
                                                                              precision: str, sums: str,
                                                                              least: float) -> None:
    """On the GPU's own kernels (cuDNN's weight gradients, cuBLAS, the Triton kernels), with TF32 switched on
    globally: each example, isolated in a batch of 64 of fedgen's ConvNet with every example clipped, adds at most
    C (1 + 1e-6), and at least C (1 - 2^-9) where no margin shrinks the clip factors; with TF32 sums by ``"margin"``
    at least 0.97 C (the margin ``(2^-10 + 2^-16) B_i``, with ``B_i`` up to about 12 ``||G_i||`` here; 0.983 C on
    an H200)."""
    from fedgen.evaluation import ConvNet
    from fedgen.mechanisms import per_example
    from fedgen.mechanisms.precision import float32_products

    monkeypatch.setattr(per_example, "BOOK_PRECISION", precision)
    monkeypatch.setattr(per_example, "TF32_SUMS", sums)
    torch.manual_seed(0)
    model = ConvNet(image_shape=(1, 28, 28), num_classes=10).cuda()
    x, y = torch.rand(64, 1, 28, 28, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    clip = 1e-4
    engine = PerExampleClipping(model, max_grad_norm=clip)
    # TF32 switched on for the whole step, restored afterwards (monkeypatch cannot restore these settings: on some
    # torch releases they are not plain attributes)
    with float32_products("tf32"):
        norms = _isolated_contributions(model, 16, 64, lambda weights: engine.backward(
            F.cross_entropy(model(x), y, reduction="none").mean(), weights=weights))
    ratios = [norm / clip for norm in norms]
    assert min(ratios) >= least and max(ratios) <= 1 + 1e-6, ratios


def test_tf32_book_keeping_group_sums_add_up_to_the_whole_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """In TF32 mode the per-group clipped sums (a federated step's clients) take the same two TF32 halves per group
    and add up to the sum without groups."""
    from fedgen.mechanisms import per_example

    monkeypatch.setattr(per_example, "BOOK_PRECISION", "tf32")
    monkeypatch.setattr(per_example, "FORM_RATIO", 0.0)
    model = _model("image").float()
    x, y = _data("image", 7, torch.Generator().manual_seed(2))
    x = x.float()
    engine = PerExampleClipping(model, max_grad_norm=0.05)
    engine.backward(_loss(model, x, y), groups=torch.tensor([0, 0, 0, 2, 2, 3, 3]), num_groups=4)
    grouped = {name: p.summed_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.summed_grad = None
    engine.backward(_loss(model, x, y))
    for name, p in model.named_parameters():
        assert grouped[name].shape == (4, *p.shape) and not grouped[name][1].any()
        torch.testing.assert_close(grouped[name].sum(0), p.summed_grad, atol=1e-7, rtol=1e-5, msg=name)


@pytest.mark.parametrize(("name", "allowed"), [("BOOK_PRECISION", "'ieee', 'tf32'"),
                                               ("FORM_PRECISION", "'ieee', 'tf32'"),
                                               ("TF32_SUMS", "'split', 'margin'")])
def test_an_unknown_engine_precision_is_refused_when_the_engine_is_built(monkeypatch: pytest.MonkeyPatch,
                                                                        name: str, allowed: str) -> None:
    from fedgen.mechanisms import per_example

    monkeypatch.setattr(per_example, name, "bf16")
    with pytest.raises(ValueError, match=f"per_example.{name} is 'bf16'.*one of {allowed}"):
        PerExampleClipping(_model("image"), max_grad_norm=1.0)


@pytest.mark.parametrize("kernel,stride,dilation,padding,draws", [(3, 1, 1, 1, 1), (3, 2, 1, 0, 2), (2, 1, 2, 2, 1),
                                                                  ((3, 2), (2, 1), (1, 2), (1, 0), 3)])
def test_the_rounding_bounds_are_the_sums_of_position_norm_products(kernel, stride, dilation, padding,
                                                                    draws: int) -> None:
    """``sum_t ||g_t|| ||a_t||`` per example over its positions and K rows: for a convolution with ``a_t`` its input
    window (the unfolded input), for a Linear layer over a sequence its input at t."""
    from fedgen.mechanisms import per_example

    gen = torch.Generator().manual_seed(3)
    layer = nn.Conv2d(3, 4, kernel, stride=stride, dilation=dilation, padding=padding).double()
    a = torch.randn(2 * draws, 3, 7, 6, generator=gen, dtype=torch.float64)
    g = torch.randn_like(layer(a))
    windows = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    want = (g.flatten(2).norm(dim=1) * windows.norm(dim=1)).reshape(2, -1).sum(1)
    torch.testing.assert_close(per_example._conv2d_rounding_bound(layer, a, g, 2), want)
    linear = nn.Linear(5, 3).double()
    a, g = torch.randn(2 * draws, 4, 5, generator=gen, dtype=torch.float64), torch.randn(2 * draws, 4, 3, generator=gen,
                                                                                         dtype=torch.float64)
    want = (g.norm(dim=-1) * a.norm(dim=-1)).reshape(2, -1).sum(1)
    torch.testing.assert_close(per_example._linear_rounding_bound(linear, a, g, 2), want)


@pytest.mark.parametrize("kernel,stride,dilation,padding,draws", [(3, 1, 1, 1, 1), (3, 2, 1, 0, 2), (2, 1, 2, 2, 1),
                                                                  ((3, 2), (2, 1), (1, 2), (1, 0), 3)])
def test_the_gram_path_gives_the_rounding_bound_from_its_diagonals(kernel, stride, dilation, padding,
                                                                   draws: int) -> None:
    """With ``bound``, the Gram path's rounding bound, from the diagonals of the input's and the output gradient's
    Gram matrices, is the direct one (unfolded windows), and its norms are those it gives without it; several
    chunks of examples too."""
    from fedgen.mechanisms import per_example

    gen = torch.Generator().manual_seed(4)
    layer = nn.Conv2d(3, 4, kernel, stride=stride, dilation=dilation, padding=padding).double()
    a = torch.randn(5 * draws, 3, 7, 6, generator=gen, dtype=torch.float64)
    g = torch.randn_like(layer(a))
    want = per_example._conv2d_rounding_bound(layer, a, g, 5)
    plain = per_example._conv2d_gram_sq_norms(layer, a, g, 5)
    for chunk in (per_example.CHUNK_ELEMENTS, 1):  # one chunk, then one example a chunk
        saved, per_example.CHUNK_ELEMENTS = per_example.CHUNK_ELEMENTS, chunk
        try:
            sq_norms, bound = per_example._conv2d_gram_sq_norms(layer, a, g, 5, bound=True)
        finally:
            per_example.CHUNK_ELEMENTS = saved
        torch.testing.assert_close(bound, want)
        torch.testing.assert_close(sq_norms, plain)


@pytest.mark.parametrize("rounds", [True, False])
def test_rounding_bounds_from_the_gram_matrices_give_the_same_clipped_sums(monkeypatch: pytest.MonkeyPatch,
                                                                         rounds: bool) -> None:
    """``GRAM_BOUNDS``: a convolution on the Gram path takes its TF32 rounding bound from its Gram matrices' diagonals
    (the joint rule is called, and the direct bound is not) and the clipped sums are those of the direct bound; with
    ``"split"`` sums, which take no bound, neither is called."""
    from fedgen.mechanisms import per_example

    monkeypatch.setattr(per_example, "BOOK_PRECISION", "tf32")
    monkeypatch.setattr(per_example, "FORM_RATIO", 0.0)
    monkeypatch.setattr(per_example, "TF32_SUMS", "margin" if rounds else "split")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 3))
    x, y = torch.randn(6, 32, 8, 8), torch.randint(0, 3, (6,))
    assert per_example._takes_gram(model[0], [(x, torch.randn(6, 32, 8, 8))], 6)  # the Gram path's layer
    engine = PerExampleClipping(model, max_grad_norm=1e-4)  # every example clipped: the bound moves each factor
    sums, calls = {}, []
    direct = per_example.ROUNDING_BOUND[nn.Conv2d]
    monkeypatch.setitem(per_example.ROUNDING_BOUND, nn.Conv2d,
                        lambda *args: calls.append("direct") or direct(*args))
    joint = per_example.NORMS_AND_BOUND[nn.Conv2d]
    monkeypatch.setitem(per_example.NORMS_AND_BOUND, nn.Conv2d, lambda *args: calls.append("joint") or joint(*args))
    for gram_bounds in (False, True):
        monkeypatch.setattr(per_example, "GRAM_BOUNDS", gram_bounds)
        for p in model.parameters():
            p.summed_grad = None
        engine.backward(F.cross_entropy(model(x), y))
        sums[gram_bounds] = [p.summed_grad.clone() for p in model.parameters()]
    assert calls == (["direct", "joint"] if rounds else [])
    for off, on in zip(sums[False], sums[True], strict=True):
        torch.testing.assert_close(on, off, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rounding", ["truncate", "nearest", "away from zero", "by channel"])
def test_tf32_margin_sums_keep_each_example_within_c_under_any_rounding_of_the_scaled_gradient(
        monkeypatch: pytest.MonkeyPatch, rounding: str) -> None:
    """``TF32_SUMS = "margin"``: each TF32 clipped sum is one product of the scaled output gradient, which a tensor
    core rounds. Simulated here by rounding it before the product (the CPU's products are exact): by TF32
    truncation, to nearest, and by two adversaries that move each value by 2^-10 of itself, away from zero or in a
    fixed sign per channel. Each isolated example still adds at most C, at most a few percent below it, with one
    product a layer call; without the margin, rounding away from zero takes an example past C."""
    from fedgen.mechanisms import per_example
    from fedgen.mechanisms.precision import round_to_tf32, truncate_to_tf32

    def rounded(g: torch.Tensor) -> torch.Tensor:
        if rounding == "truncate":
            return truncate_to_tf32(g)
        if rounding == "nearest":
            return round_to_tf32(g)
        if rounding == "away from zero":
            return g * (1 + 2**-10)
        signs = torch.where(torch.arange(g.shape[1]) % 3 == 0, -1.0, 1.0)  # channels of a conv, features of a Linear
        return g * (1 + 2**-10 * signs.reshape(-1, *([1] * (g.dim() - 2))))

    monkeypatch.setattr(per_example, "BOOK_PRECISION", "tf32")
    monkeypatch.setattr(per_example, "TF32_SUMS", "margin")
    monkeypatch.setattr(per_example, "FORM_RATIO", 0.0)  # book-keep every weight
    monkeypatch.setattr(per_example, "GRAM_BOUNDS", False)  # the spy below counts BOOK_KEEPING's norm calls
    products, layer_calls = [], []
    for kind in (nn.Conv2d, nn.Linear):
        real_norms, real_sum = per_example.BOOK_KEEPING[kind]

        def norms(layer, calls, batch, precision, real_norms=real_norms):
            layer_calls.extend(calls)
            return real_norms(layer, calls, batch, precision)

        def tensor_core_sum(layer, a, g, real_sum=real_sum):
            products.append(is_tf32(a))
            return real_sum(layer, a, rounded(g))

        monkeypatch.setitem(per_example.BOOK_KEEPING, kind, (norms, tensor_core_sum))
    clip = 1e-3  # every example clipped
    contributions = _isolated_image_contributions(clip)
    assert max(contributions) <= clip * (1 + 1e-6)
    assert min(contributions) >= clip * 0.95
    assert products and all(products) and len(products) == len(layer_calls)  # one product a layer call, no halves
    if rounding == "away from zero":
        monkeypatch.setattr(per_example, "TF32_MARGIN", 0.0)
        assert max(_isolated_image_contributions(clip)) > clip * (1 + 1e-4)  # the weights: 2^-10 of their share
