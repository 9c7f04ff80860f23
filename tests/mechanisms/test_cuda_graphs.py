"""Per-example weights in the clipping engine and ``CapturedBackward``'s padded micro-batches: a weight scales
its example's clipped gradient (0 leaves a padding row out exactly), padded micro-batches give the clipped sum
of the real examples only, and bad inputs are refused. The CUDA graph itself is compared with the eager
passes on a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from fedgen.mechanisms import DPSGD, CapturedBackward
from fedgen.mechanisms.per_example import PerExampleClipping
from tests.mechanisms.test_per_example import _clipped_sum, _data, _loss, _model, _truth


def _private(model: torch.nn.Module, clip: float) -> DPSGD:
    mechanism = DPSGD(noise_multiplier=1.0, max_grad_norm=clip, seed=0, engine="fedgen")
    loader = mechanism.data_loader(TensorDataset(torch.zeros(100, 1)), batch_size=10)
    mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader, steps=5)
    return mechanism


def test_each_weight_scales_its_examples_clipped_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    model = _model("image")
    x, y = _data("image", 8, gen)
    truth = _truth(copy.deepcopy(model), x, y)
    weights = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.25, 1.0, 0.75], dtype=torch.float64)
    engine = PerExampleClipping(model, 0.05)
    engine.backward(_loss(model, x, y), weights=weights)
    norms = torch.cat([g.flatten(1) for g in truth], dim=1).norm(dim=1)
    factor = (0.05 / (norms + 1e-6)).clamp(max=1.0)
    for p, g in zip(model.parameters(), truth, strict=True):
        want = torch.einsum("i,i...->...", factor * weights, g)
        torch.testing.assert_close(p.summed_grad, want, atol=1e-10, rtol=1e-8)
    unweighted = _clipped_sum(truth, 0.05)
    assert any(not torch.allclose(p.summed_grad, u) for p, u in zip(model.parameters(), unweighted, strict=True))


def test_weights_out_of_range_or_of_the_wrong_shape_are_refused() -> None:
    gen = torch.Generator().manual_seed(0)
    model = _model("image")
    x, y = _data("image", 4, gen)
    engine = PerExampleClipping(model, 1.0)
    for weights, message in [(torch.tensor([1.0, 1.5, 0.0, 1.0]), r"in \[0, 1\]"),
                             (torch.tensor([1.0, -0.1, 0.0, 1.0]), r"in \[0, 1\]"),
                             (torch.ones(3), "shape"), (torch.ones(4, dtype=torch.long), "float")]:
        with pytest.raises(ValueError, match=message):
            engine.backward(_loss(model, x, y), weights=weights)
        assert not engine.pending


@pytest.mark.parametrize("draws", [1, 2])
def test_padded_micro_batches_give_the_clipped_sum_of_the_real_examples(draws: int) -> None:
    gen = torch.Generator().manual_seed(1)
    model = _model("image")
    x, y = _data("image", 10, gen)
    truth = _truth(copy.deepcopy(model), x, y)  # K identical rows per example: the same per-example gradient
    mechanism = _private(model, 0.05)

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _loss(model, x.repeat_interleave(draws, 0), y.repeat_interleave(draws, 0))

    captured = CapturedBackward(mechanism, loss_fn, size=4, draws=draws, graph=False)
    loss = captured(x, y)  # micro-batches of 4, 4 and 2 real examples + 2 padding copies
    assert loss is not None and torch.isfinite(loss)
    for p, want in zip(model.parameters(), _clipped_sum(truth, 0.05), strict=True):
        torch.testing.assert_close(p.summed_grad, want, atol=1e-10, rtol=1e-8)


def test_a_full_micro_batch_after_a_padded_one_counts_every_example() -> None:
    """The weights are set again only where a micro-batch's count of real examples changes: after a padded one (2
    real of 4), the next full one must weigh all four again."""
    gen = torch.Generator().manual_seed(4)
    model = _model("image")
    x, y = _data("image", 10, gen)
    truth = _truth(copy.deepcopy(model), x, y)
    mechanism = _private(model, 0.05)
    captured = CapturedBackward(mechanism, lambda a, b: _loss(model, a, b), size=4, graph=False)
    captured(x[:6], y[:6])  # 4 real, then 2 real + 2 padding
    captured(x[6:], y[6:])  # 4 real
    for p, want in zip(model.parameters(), _clipped_sum(truth, 0.05), strict=True):
        torch.testing.assert_close(p.summed_grad, want, atol=1e-10, rtol=1e-8)


def test_a_step_through_padded_micro_batches_equals_the_plain_step_noise_and_ledger_included() -> None:
    gen = torch.Generator().manual_seed(5)
    x, y = _data("image", 7, gen)
    results = []
    for padded in (False, True):
        model = _model("image")
        mechanism = DPSGD(noise_multiplier=1.0, max_grad_norm=0.05, seed=3, engine="fedgen")
        loader = mechanism.data_loader(TensorDataset(torch.zeros(100, 1)), batch_size=10)
        _, optimizer = mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                              data_loader=loader, steps=5)
        optimizer.zero_grad(set_to_none=True)
        if padded:
            CapturedBackward(mechanism, lambda a, b, m=model: _loss(m, a, b), size=3, graph=False)(x, y)
        else:
            mechanism.backward(_loss(model, x, y))
        optimizer.step()
        results.append(([p.grad.clone() for p in model.parameters()], mechanism.ledger.summary(mechanism.delta)))
    (plain, plain_ledger), (padded, padded_ledger) = results
    for a, b in zip(plain, padded, strict=True):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-8)
    assert padded_ledger == plain_ledger and "releases: none" not in plain_ledger  # one step charged to each


def test_an_empty_sample_leaves_a_zero_sum_and_other_shapes_are_refused() -> None:
    gen = torch.Generator().manual_seed(2)
    model = _model("image")
    x, y = _data("image", 3, gen)
    mechanism = _private(model, 1.0)
    captured = CapturedBackward(mechanism, lambda x, y: _loss(model, x, y), size=4, graph=False)
    assert captured(x[:0], y[:0]) is None
    assert all(torch.count_nonzero(p.summed_grad) == 0 for p in model.parameters())
    captured(x, y)
    with pytest.raises(ValueError, match="per example"):
        captured(x[:, :, :4], y)
    with pytest.raises(ValueError, match="same examples"):
        captured(x, y[:2])
    with pytest.raises(ValueError, match="same inputs"):
        captured(x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_graphs_are_refused_without_cuda() -> None:
    model = _model("image")
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        CapturedBackward(_private(model, 1.0), lambda x, y: _loss(model, x, y), size=4)


def _eager_and_replayed_sums(n: int, seed: int, clip: float, steps) -> tuple[list, list]:
    """The clipped sums the test model leaves on the GPU after ``steps(captured, model, x, y)`` drives a
    ``CapturedBackward`` of micro-batches of 4 over ``n`` examples: eagerly, then replayed from a CUDA graph."""
    x, y = _data("image", n, torch.Generator().manual_seed(seed))
    x, y = x.float().cuda(), y.cuda()
    sums = {}
    for graph in (False, True):
        model = _model("image").float().cuda()
        captured = CapturedBackward(_private(model, clip), lambda a, b, m=model: _loss(m, a, b), size=4, graph=graph)
        steps(captured, model, x, y)
        sums[graph] = [p.summed_grad.clone() for p in model.parameters()]
    return sums[False], sums[True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays a CUDA graph: needs a CUDA device")
def test_replayed_sums_equal_the_eager_padded_sums_on_cuda() -> None:
    def steps(captured, model, x, y):
        captured(x, y)
        captured(x[:5], y[:5])  # a second sample of another size: the same graph, more padding

    eager, replayed = _eager_and_replayed_sums(11, 3, 0.05, steps)
    for e, r in zip(eager, replayed, strict=True):
        torch.testing.assert_close(r, e, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays a CUDA graph: needs a CUDA device")
def test_a_replay_under_bf16_autocast_uses_the_current_weights_on_cuda() -> None:
    """Captured under bfloat16 autocast (Lightning's ``precision="bf16-mixed"``), then the weights change: the
    replay's sums are the eager pass's with the new weights, not those of casts made before the change (a graph
    that read autocast's cached casts of its first step would keep them). No example is clipped (C = 1e3), so the
    sums follow the weights."""
    def steps(captured, model, x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):  # one autocast region a step, as Lightning's
            captured(x, y)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-2.0)
        for p in model.parameters():
            p.summed_grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            captured(x, y)

    eager, replayed = _eager_and_replayed_sums(4, 7, 1e3, steps)
    for e, r in zip(eager, replayed, strict=True):
        torch.testing.assert_close(r, e, atol=1e-3, rtol=1e-2)
