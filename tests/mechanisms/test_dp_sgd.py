"""Tests of DP-SGD: per-example gradients, flat clipping, noise, Poisson sampling, the budget (also with a
shared or restored ledger), layer validation, and a Lightning run that stops cleanly when the budget is spent."""

from __future__ import annotations

import copy
import logging
import math

import lightning as L
import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedgen.errors import ConfigError, PrivacyBudgetExceeded
from fedgen.mechanisms import (DPSGD, GaussianMechanism, NoiseSource, PrivateModule, SubsampledGaussianEvent,
                               compute_epsilon)
from fedgen.mechanisms.per_example import unsupported_layers


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.AvgPool2d(2))
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens).mean(dim=1)))


def _conv_data(n: int, gen: torch.Generator, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 2, 6, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def _token_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # repeated tokens within an example exercise the embedding's gradient accumulation
    return torch.randint(0, 20, (n, 5), generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Ground truth: one backward pass per example, of that example's own loss. Returns [B, *p.shape] per param."""
    per_param: list[list[torch.Tensor]] = [[] for _ in model.parameters()]
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for slot, p in zip(per_param, model.parameters()):
            slot.append(p.grad.detach().clone())
    return [torch.stack(slot) for slot in per_param]


def _clipped_mean(grads: list[torch.Tensor], clip: float, expected_batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """sum_i g_i * min(1, C / ||g_i||) / expected_batch_size, with ||g_i|| over all parameters (flat clipping)."""
    norms = torch.cat([g.flatten(1) for g in grads], dim=1).norm(dim=1)
    factor = (clip / norms).clamp(max=1.0)
    return [torch.einsum("i,i...->...", factor, g) / expected_batch_size for g in grads], norms


def _backward(mechanism: DPSGD, loss: torch.Tensor) -> None:
    """What a training loop does: the mechanism's backward for fedgen's engine, ``loss.backward()`` for Opacus'."""
    if mechanism.owns_backward:
        mechanism.backward(loss)
    else:
        loss.backward()


def _make_private(model: nn.Module, mechanism: DPSGD, n: int, batch_size: int, lr: float = 0.0):
    dataset = TensorDataset(torch.zeros(n, 1))
    loader = mechanism.data_loader(dataset, batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return (*mechanism.make_private(model, optimizer, data_loader=loader, steps=10), loader)


# ------------------------------------------------------------------------------------ per-example grads
@pytest.mark.parametrize("kind", ["conv", "tokens"])
def test_per_sample_gradients_match_microbatches(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "conv":
        model = ConvNet().double()
        x, y = _conv_data(8, gen)
    else:
        model = TokenNet().double()
        x, y = _token_data(8, gen)
        x[0, :] = 3  # an example made of one repeated token
    reference = copy.deepcopy(model)
    mechanism = DPSGD(noise_multiplier=1.0, seed=0, engine="opacus")  # Opacus' per-sample gradients
    wrapped, _, _ = _make_private(model, mechanism, n=64, batch_size=8)

    F.cross_entropy(wrapped(x), y).backward()  # the mean loss of the batch, as loss_reduction="mean" expects
    expected = _per_example_grads(reference, x, y)
    params = list(wrapped.parameters())
    assert len(params) == len(expected) and len(params) >= 5
    for (name, p), truth in zip(wrapped.named_parameters(), expected):
        assert p.grad_sample.shape == truth.shape, name
        torch.testing.assert_close(p.grad_sample, truth, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
    assert max(float(t.abs().max()) for t in expected) > 1e-2  # non-trivial gradients


# ----------------------------------------------------------------------------------- clipping and noise
@pytest.mark.parametrize("engine", ["opacus", "fedgen"])
def test_clipped_and_summed_over_expected_batch_size(engine: str) -> None:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = ConvNet().double()
    x, y = _conv_data(12, gen)  # actual batch 12, expected batch 8: the sum is divided by 8
    expected_grads = _per_example_grads(copy.deepcopy(model), x, y)
    norms = torch.cat([g.flatten(1) for g in expected_grads], dim=1).norm(dim=1)
    clip = float(norms.median())
    before = [p.detach().clone() for p in model.parameters()]
    mechanism = DPSGD(noise_multiplier=1e-12, max_grad_norm=clip, seed=0, engine=engine)
    wrapped, optimizer, _ = _make_private(model, mechanism, n=40, batch_size=8, lr=0.5)
    assert mechanism.engine_in_use == engine

    optimizer.zero_grad()
    _backward(mechanism, F.cross_entropy(wrapped(x), y))
    optimizer.step()

    expected, norms = _clipped_mean(expected_grads, clip, expected_batch_size=8)
    assert 3 <= int((norms > clip).sum()) <= 9  # some examples are clipped, some are not
    # (Opacus divides by ||g|| + 1e-6, hence the tolerance)
    for p, old, truth in zip(wrapped.parameters(), before, expected):
        torch.testing.assert_close(p.grad, truth, atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(p.detach(), old - 0.5 * truth, atol=1e-7, rtol=1e-4)  # the step used it
    # not per-layer clipping, not the actual batch size:
    per_layer = [torch.einsum("i,i...->...", (clip / g.flatten(1).norm(dim=1)).clamp(max=1.0), g) / 8
                 for g in expected_grads]
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(per_layer, expected))
    assert mechanism.steps_taken == 1 and len(mechanism.ledger) == 1
    event = mechanism.ledger.events[0]
    assert (event.noise_multiplier, event.sample_rate) == (1e-12, 8 / 40)


@pytest.mark.parametrize("engine", ["opacus", "fedgen"])
def test_noise_is_added_with_the_right_std(engine: str) -> None:
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 3)).double()
    x, y = torch.randn(12, 100, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen)
    sigma, clip, expected_batch = 1.0, 0.5, 8
    noiseless, _ = _clipped_mean(_per_example_grads(copy.deepcopy(model), x, y), clip, expected_batch)
    mechanism = DPSGD(noise_multiplier=sigma, max_grad_norm=clip, seed=123, engine=engine)
    wrapped, optimizer, _ = _make_private(model, mechanism, n=80, batch_size=expected_batch)
    _backward(mechanism, F.cross_entropy(wrapped(x), y))
    optimizer.step()

    diff = torch.cat([(p.grad - g).flatten() for p, g in zip(wrapped.parameters(), noiseless)])
    std = sigma * clip / expected_batch
    assert diff.numel() > 10_000
    # loose statistical check: with 10^4 draws the sample std is within ~1% of the truth
    assert abs(float(diff.std()) / std - 1) < 0.05
    assert abs(float(diff.mean())) < 5 * std / math.sqrt(diff.numel())
    # and the noise is exactly the mechanism's seeded draw, N(0, (sigma C)^2 I) over all parameters in order,
    # scaled by 1/B
    params = list(wrapped.parameters())
    drawn = NoiseSource(seed=123).normal((sum(p.numel() for p in params),), std=sigma * clip, dtype=torch.float64)
    for p, g, d in zip(params, noiseless, drawn.split([p.numel() for p in params]), strict=True):
        torch.testing.assert_close(p.grad, g + d.view_as(p) / expected_batch, atol=1e-7, rtol=1e-5)


def test_a_parameter_no_example_reached_still_gets_its_noise() -> None:
    """A parameter the batch's forward never used has clipped sum 0, not None: the step still adds its share of the
    seeded draw N(0, (sigma C)^2), so what is released about it is noise alone, never a skipped coordinate."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    gen = torch.Generator().manual_seed(5)
    model = TwoHeads().double()
    x, y = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
    sigma, clip, expected_batch = 0.7, 1.5, 4
    mechanism = DPSGD(noise_multiplier=sigma, max_grad_norm=clip, seed=9, engine="fedgen")
    wrapped, optimizer, _ = _make_private(model, mechanism, n=40, batch_size=expected_batch)
    _backward(mechanism, F.cross_entropy(wrapped(x), y))
    optimizer.step()
    params = list(wrapped.parameters())
    drawn = NoiseSource(seed=9).normal((sum(p.numel() for p in params),), std=sigma * clip, dtype=torch.float64)
    noise = dict(zip([n for n, _ in wrapped.named_parameters()], drawn.split([p.numel() for p in params]), strict=True))
    unused = [(name, p) for name, p in wrapped.named_parameters() if name.startswith("unused.")]
    assert len(unused) == 2
    for name, p in unused:
        torch.testing.assert_close(p.grad, noise[name].view_as(p) / expected_batch)
        assert p.grad.abs().min() > 0
    assert mechanism.steps_taken == 1 and len(mechanism.ledger) == 1


def test_a_step_computed_by_parties_sums_their_clipped_sums_and_scales_the_noise_to_its_sensitivity() -> None:
    """take_clipped_sums / put_clipped_sum: parties that clip and sum their own examples (one after the other, or
    in one pass with a group per party) give exactly the clipped sum of the whole batch, and a sum installed
    with a larger sensitivity gets noise sigma * sensitivity."""
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 3)).double()
    x, y = torch.randn(12, 100, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen)
    sigma, clip, expected_batch = 1.0, 0.5, 8
    noiseless, _ = _clipped_mean(_per_example_grads(copy.deepcopy(model), x, y), clip, expected_batch)
    mechanism = DPSGD(noise_multiplier=sigma, max_grad_norm=clip, seed=7, engine="fedgen")
    wrapped, optimizer, _ = _make_private(model, mechanism, n=80, batch_size=expected_batch)
    parts = []
    for rows in (slice(0, 5), slice(5, 12)):  # two parties, each with its own examples (a mean loss each)
        mechanism.backward(F.cross_entropy(wrapped(x[rows]), y[rows]))
        parts.append(mechanism.take_clipped_sums()[0])
    total = parts[0] + parts[1]
    truth = torch.cat([g.flatten() for g in noiseless]) * expected_batch
    torch.testing.assert_close(total, truth, atol=1e-7, rtol=1e-4)
    assert all(p.summed_grad is None for p in wrapped.parameters())  # taken: nothing left for the step
    mechanism.backward(F.cross_entropy(wrapped(x), y), groups=torch.tensor([0] * 5 + [1] * 7), num_groups=2)
    with pytest.raises(RuntimeError, match="kept per group"):
        optimizer.step()  # per-group sums are never stepped on directly
    grouped = mechanism.take_clipped_sums(2)
    torch.testing.assert_close(grouped, torch.stack(parts), atol=1e-10, rtol=1e-8)

    mechanism.put_clipped_sum(total, sensitivity=2 * clip)
    optimizer.step()
    diff = torch.cat([(p.grad - g).flatten() for p, g in zip(wrapped.parameters(), noiseless)])
    assert abs(float(diff.std()) / (sigma * 2 * clip / expected_batch) - 1) < 0.05  # twice the usual noise
    assert mechanism.pop_step_sensitivity() == clip  # read once: the next step is back to C
    assert mechanism.ledger.events[0].noise_multiplier == sigma  # the recorded sigma is exact
    assert len(mechanism.ledger.events) == 1 and mechanism.ledger.events[0].count == 1  # the refused step: no charge
    with pytest.raises(ValueError, match="sensitivity"):
        mechanism.put_clipped_sum(total, sensitivity=clip / 2)


def test_a_float64_sum_of_parties_gets_its_noise_in_float64_before_the_float32_gradient(monkeypatch) -> None:
    """A total installed in float64 (secure aggregation's exact sum) is not rounded to the parameters' float32 before
    the noise: rounding it first could move two neighbours' sums apart by more than the sensitivity (by up to 2^-24
    of the sum's norm each). The noise is drawn in float64; the noisy gradient is float32."""
    torch.manual_seed(0)
    model = nn.Linear(50, 3)
    mechanism = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, seed=7, engine="fedgen")
    wrapped, optimizer, _ = _make_private(model, mechanism, n=80, batch_size=8)
    drawn = []
    normal = NoiseSource.normal
    monkeypatch.setattr(NoiseSource, "normal", lambda self, shape, **kw: drawn.append(kw["dtype"]) or
                        normal(self, shape, **kw))
    m = sum(p.numel() for p in wrapped.parameters())
    total = torch.full((m,), 1.0 + 2.0**-40, dtype=torch.float64)  # a value float32 cannot hold
    mechanism.put_clipped_sum(total, sensitivity=1.0)
    assert all(p.summed_grad.dtype == torch.float64 for p in wrapped.parameters())
    optimizer.step()
    assert drawn == [torch.float64]
    assert all(p.grad.dtype == torch.float32 and p.dtype == torch.float32 for p in wrapped.parameters())
    mechanism.put_clipped_sum(total.float(), sensitivity=1.0)  # a float32 sum stays in the parameters' dtype
    optimizer.step()
    assert drawn == [torch.float64, torch.float32]


# ------------------------------------------------------------------------------------- Poisson sampling
def test_poisson_loader() -> None:
    torch.manual_seed(3)
    mechanism = DPSGD(noise_multiplier=1.0, delta=1e-4)
    dataset = TensorDataset(torch.arange(200.0))
    loader = mechanism.data_loader(dataset, batch_size=64)  # 64 does not divide 200
    assert isinstance(loader, DPDataLoader)
    assert loader.sample_rate == pytest.approx(64 / 200, rel=1e-12)
    sizes = [len(batch[0]) for _ in range(40) for batch in loader]
    assert len(set(sizes)) > 5  # Poisson: the batch size varies
    # mean batch size 64 (sd of one batch ~6.6; 5 standard errors of the mean)
    assert abs(sum(sizes) / len(sizes) - 64) < 5 * math.sqrt(200 * 0.32 * 0.68 / len(sizes))
    with pytest.raises(ConfigError) as err:
        mechanism.data_loader(dataset, batch_size=201)
    assert err.value.field == "batch_size"
    with pytest.raises(ConfigError) as err:
        DPSGD(noise_multiplier=1.0, delta=1e-2).data_loader(dataset, batch_size=10)
    assert err.value.field == "delta"


class _RowByRow(torch.utils.data.Dataset):
    """The same rows as a TensorDataset, fetched one example at a time (DataLoader's default path)."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[i] for t in self.tensors)


@pytest.mark.parametrize("sampling", ["examples, batch 1", "examples, batch 16", "users"])
def test_an_in_memory_dataset_is_fetched_a_batch_at_a_time_with_the_same_rows(sampling: str) -> None:
    """(A batch of 1 of 30 examples leaves a third of the Poisson batches empty.)"""
    images = torch.randn(30, 1, 4, 4)
    labels = torch.arange(30) % 3
    batches = []
    for dataset in (TensorDataset(images, labels), _RowByRow(images, labels)):
        if sampling == "users":
            mechanism = DPSGD(noise_multiplier=1.0, seed=7, unit="user", delta=1e-2)
            loader = mechanism.user_data_loader(dataset, users=[list(range(u, 30, 6)) for u in range(6)],
                                                user_rate=0.5, batch_size=10)
        else:
            batch_size = int(sampling.rsplit(" ", 1)[1])
            loader = DPSGD(noise_multiplier=1.0, seed=7).data_loader(dataset, batch_size=batch_size)
        assert hasattr(loader.dataset, "__getitems__") == isinstance(dataset, TensorDataset)  # the path taken
        batches.append([batch for _ in range(20) for batch in loader])
    fetched, row_by_row = batches
    assert len(fetched) == len(row_by_row) == 20 * len(loader) >= 20
    for a, b in zip(fetched, row_by_row, strict=True):
        assert len(a) == len(b) == 2
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    sizes = [len(b[0]) for b in fetched]
    assert max(sizes) > 1 and (0 in sizes or sampling != "examples, batch 1")  # empty batches were compared


def test_user_loader_samples_users_at_their_rate_then_their_examples() -> None:
    """User-level sampling: each step includes each user with probability user_rate (the rate the ledger sees)
    and, from an included user, each example with the rate that makes the expected batch batch_size; an
    excluded user contributes nothing."""
    mechanism = DPSGD(noise_multiplier=1.0, delta=1e-3, unit="user", seed=0)
    users = [list(range(40 * k, 40 * k + 40)) for k in range(10)]
    dataset = TensorDataset(torch.arange(400.0), torch.arange(400))
    loader = mechanism.user_data_loader(dataset, users=users, user_rate=0.3, batch_size=24)  # 2 of 12 kept
    assert loader.sample_rate == 0.3 and loader.expected_batch_size == 24 and len(loader) == int(400 / 24)
    user_in, kept, steps = torch.zeros(10), [], 0
    for _ in range(60):
        for _, index in loader:
            steps += 1
            present = (index // 40).unique()
            user_in[present] += 1
            kept += [int((index // 40 == u).sum()) for u in present.tolist()]
    rate = user_in / steps  # each user's inclusion frequency: 0.3 (binomial sd 0.013 over ~1000 steps)
    assert float((rate - 0.3).abs().max()) < 0.06
    assert abs(sum(kept) / len(kept) - 40 * 0.2) < 0.5  # examples of an included user (given at least one)
    with pytest.raises(ConfigError) as err:
        mechanism.user_data_loader(dataset, users=users, user_rate=0.05, batch_size=24)  # 20 expected
    assert err.value.field == "batch_size"
    with pytest.raises(ConfigError) as err:
        DPSGD(noise_multiplier=1.0, delta=1e-3).user_data_loader(dataset, users=users, user_rate=0.3, batch_size=24)
    assert err.value.field == "mechanism.unit"
    with pytest.raises(ConfigError) as err:  # delta must be below 1 / (number of users)
        DPSGD(noise_multiplier=1.0, delta=0.2, unit="user").user_data_loader(dataset, users=users, user_rate=0.3,
                                                                              batch_size=24)
    assert err.value.field == "delta"


def test_a_user_level_step_is_charged_at_the_user_rate_and_needs_the_users_clipped_total() -> None:
    """The ledger records (sigma, user_rate) per step under add/remove-one-user; the sampling unit of the loader
    must be the ledger's; and a step on per-example clipped sums alone (whose sensitivity to a user is not C)
    is refused: the users' parts must be clipped as a whole and installed with put_clipped_sum."""
    users = [list(range(10 * k, 10 * k + 10)) for k in range(10)]
    dataset = TensorDataset(torch.randn(100, 3), torch.randint(0, 2, (100,)))
    model = nn.Linear(3, 2).double()
    mechanism = DPSGD(noise_multiplier=1.3, delta=1e-3, unit="user", seed=0)
    loader = mechanism.user_data_loader(dataset, users=users, user_rate=0.5, batch_size=20)
    with pytest.raises(ConfigError) as err:
        DPSGD(noise_multiplier=1.0, delta=1e-3, unit="user", engine="opacus").make_private(
            nn.Linear(3, 2), torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader, steps=3)
    assert err.value.field == "mechanism.engine"
    with pytest.raises(ConfigError) as err:  # an example-level ledger on a loader that samples users
        DPSGD(noise_multiplier=1.0, delta=1e-3).make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                             data_loader=loader, steps=3)
    assert err.value.field == "mechanism.unit"
    with pytest.raises(ConfigError) as err:  # a user-level ledger on a loader that samples examples
        mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               data_loader=DPSGD(noise_multiplier=1.0, delta=1e-3).data_loader(dataset, batch_size=20),
                               steps=3)
    assert err.value.field == "mechanism.unit"
    with pytest.raises(ConfigError) as err:  # nor can it build one
        mechanism.data_loader(dataset, batch_size=20)
    assert err.value.field == "mechanism.unit"
    wrapped, optimizer = mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                data_loader=loader, steps=3)
    assert optimizer.expected_batch_size == 20
    x, y = dataset.tensors
    mechanism.backward(F.cross_entropy(wrapped(x[:8].double()), y[:8]))
    with pytest.raises(RuntimeError, match="put_clipped_sum"):
        optimizer.step()
    mechanism.put_clipped_sum(mechanism.take_clipped_sums()[0].clamp(-0.1, 0.1), sensitivity=1.0)
    optimizer.step()
    assert mechanism.ledger.unit == "user"
    assert [(e.noise_multiplier, e.sample_rate, e.count) for e in mechanism.ledger.events] == [(1.3, 0.5, 1)]


def test_make_private_uses_loader_sample_rate() -> None:
    mechanism = DPSGD(noise_multiplier=1.0)
    _, optimizer, loader = _make_private(nn.Linear(3, 2), mechanism, n=90, batch_size=20)
    assert mechanism.sample_rate == pytest.approx(20 / 90)
    assert optimizer.expected_batch_size == 20


def test_a_plan_by_epochs_counts_the_steps_the_loader_yields(caplog) -> None:
    """q = 20/90: the loader yields int(1/q) = 4 batches an epoch, so 3 epochs are 12 steps (not ceil(3/q) = 14,
    which would calibrate more noise than the run needs)."""
    mechanism = DPSGD(target_epsilon=3.0, delta=1e-5)
    model = nn.Linear(3, 2)
    loader = mechanism.data_loader(TensorDataset(torch.randn(90, 3), torch.randint(0, 2, (90,))), batch_size=20)
    assert len(loader) == 4
    mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader, epochs=3)
    spent = compute_epsilon([SubsampledGaussianEvent(mechanism.noise_multiplier, 20 / 90, count=12)], delta=1e-5)
    assert 0.995 * 3.0 < spent <= 3.0


def test_a_plan_the_budget_cannot_cover_warns_before_any_step(caplog) -> None:
    """A given noise multiplier with a budget for fewer steps than planned: training would stop part-way, which
    the user hears at plan time; a calibrated noise covers the plan and warns nothing."""
    dataset = TensorDataset(torch.randn(90, 3), torch.randint(0, 2, (90,)))
    for kwargs, warned in [({"noise_multiplier": 0.5, "target_epsilon": 3.0}, True), ({"target_epsilon": 3.0}, False)]:
        caplog.clear()
        mechanism = DPSGD(delta=1e-5, **kwargs)
        model = nn.Linear(3, 2)
        with caplog.at_level(logging.WARNING, logger="fedgen.mechanisms.dp_sgd"):
            mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                   data_loader=mechanism.data_loader(dataset, batch_size=20), steps=100)
        messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert bool(messages) == warned
        if warned:
            assert mechanism.max_steps < 100
            assert f"allows {mechanism.max_steps} of the 100 planned steps" in messages[0]
            assert "raise noise_multiplier" in messages[0]


def test_make_private_refuses_bad_wiring() -> None:
    mechanism = DPSGD(noise_multiplier=1.0)
    model = nn.Linear(3, 2)
    dataset = TensorDataset(torch.zeros(50, 3))
    with pytest.raises(ConfigError) as err:
        mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                               data_loader=DataLoader(dataset, batch_size=5), epochs=1)
    assert err.value.field == "data_loader"
    loader = mechanism.data_loader(dataset, batch_size=5)
    with pytest.raises(ConfigError) as err:
        mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
                               epochs=1, steps=10)
    assert err.value.field == "epochs"
    other = nn.Linear(3, 2)
    with pytest.raises(ConfigError) as err:
        mechanism.make_private(model, torch.optim.SGD([*model.parameters(), *other.parameters()], lr=0.1),
                               data_loader=loader, epochs=1)
    assert err.value.field == "optimizer"


# ----------------------------------------------------------------------------------------------- budget
def _train_until_refused(mechanism: DPSGD, wrapped: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
                         x_all: torch.Tensor, y_all: torch.Tensor, limit: int) -> int:
    """Run DP-SGD steps on Poisson batches until the mechanism refuses one; return the steps that went through."""
    done = 0
    while done < limit:
        for (idx,) in loader:
            idx = idx.long()
            optimizer.zero_grad()
            _backward(mechanism, F.cross_entropy(wrapped(x_all[idx]), y_all[idx]))
            try:
                optimizer.step()
            except PrivacyBudgetExceeded:
                return done
            done += 1
    raise AssertionError(f"{limit} steps went through without the budget stopping them")


@pytest.mark.parametrize("accountant", ["rdp", "auto"])
def test_budget_calibrates_and_stops(accountant: str) -> None:
    torch.manual_seed(4)
    n, batch, planned, target = 100, 10, 20, 2.0
    x_all, y_all = torch.randn(n, 5), torch.randint(0, 2, (n,))
    mechanism = DPSGD(target_epsilon=target, delta=1e-3, max_grad_norm=1.0, accountant=accountant, seed=0)
    model = nn.Linear(5, 2)
    loader = mechanism.data_loader(TensorDataset(torch.arange(float(n))), batch_size=batch)
    wrapped, optimizer = mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                data_loader=loader, steps=planned)
    assert mechanism.noise_multiplier is not None and mechanism.noise_multiplier > 0.5
    assert planned <= mechanism.max_steps <= planned + 2  # the calibration is tight

    # exactly the planned steps: epsilon close to, but not above, the target
    while mechanism.steps_taken < planned:
        for (idx,) in loader:
            if mechanism.steps_taken == planned:
                break
            optimizer.zero_grad()
            _backward(mechanism, F.cross_entropy(wrapped(x_all[idx.long()]), y_all[idx.long()]))
            optimizer.step()
    eps = mechanism.epsilon()
    assert 0.9 * target < eps <= target

    # then on until refused: exactly max_steps go through, the refused step is not recorded
    more = _train_until_refused(mechanism, wrapped, optimizer, loader, x_all, y_all, limit=100)
    assert mechanism.steps_taken == planned + more == mechanism.max_steps
    assert len(mechanism.ledger) == mechanism.max_steps
    assert not mechanism.can_step()
    assert mechanism.epsilon() <= target
    with pytest.raises(PrivacyBudgetExceeded):
        mechanism.charge_step()
    assert len(mechanism.ledger) == mechanism.max_steps


def test_state_dict_round_trip() -> None:
    mechanism = DPSGD(noise_multiplier=1.3, accountant="rdp", seed=0)
    mechanism.plan(sample_rate=0.1, steps=10)
    for _ in range(4):
        mechanism.charge_step()
    other = DPSGD(target_epsilon=100.0, accountant="rdp", seed=1)  # noise calibrated: the checkpoint's is taken
    other.load_state_dict(mechanism.state_dict())
    assert other.steps_taken == 4 and other.noise_multiplier == 1.3
    assert other.epsilon() == mechanism.epsilon() > 0


def test_a_checkpoint_is_refused_by_a_config_that_names_other_noise_or_a_budget_it_has_spent() -> None:
    """Either would be replaced by the checkpoint's unseen, while the saved config said otherwise."""
    mechanism = DPSGD(noise_multiplier=1.3, accountant="rdp", seed=0)
    mechanism.plan(sample_rate=0.1, steps=100)
    for _ in range(100):
        mechanism.charge_step()
    spent = mechanism.epsilon()
    with pytest.raises(ConfigError, match="mechanism.noise_multiplier") as err:
        DPSGD(noise_multiplier=9.0, accountant="rdp").load_state_dict(mechanism.state_dict())
    assert "noise_multiplier: 1.3" in err.value.fix
    with pytest.raises(ConfigError, match="mechanism.target_epsilon"):
        DPSGD(target_epsilon=spent / 2, accountant="rdp").load_state_dict(mechanism.state_dict())
    within = DPSGD(noise_multiplier=1.3, target_epsilon=spent * 1.01, accountant="rdp")
    within.load_state_dict(mechanism.state_dict())
    assert within.steps_taken == 100


def test_bad_config() -> None:
    with pytest.raises(ConfigError) as err:
        DPSGD(noise_multiplier=1.0, unit="client")
    assert err.value.field == "mechanism.unit"
    with pytest.raises(ConfigError) as err:
        DPSGD()
    assert "noise_multiplier" in err.value.field
    with pytest.raises(ConfigError) as err:
        DPSGD(noise_multiplier=1.0, max_grad_norm=0.0)
    assert "max_grad_norm" in err.value.field
    with pytest.raises(ConfigError) as err:
        DPSGD(target_epsilon=float("inf"))
    assert err.value.field == "mechanism.target_epsilon"


# ------------------------------------------------------------------------------------------- validation
class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def test_batchnorm_is_refused_and_fixed() -> None:
    model = BatchNormNet()
    with pytest.raises(ConfigError) as err:
        DPSGD.validate(model)
    message = str(err.value)
    assert err.value.field == "model"
    assert "features.1" in message and "BatchNorm2d" in message and "GroupNorm" in message

    mechanism = DPSGD(noise_multiplier=1.0)
    loader = mechanism.data_loader(TensorDataset(torch.zeros(20, 1)), batch_size=5)
    with pytest.raises(ConfigError) as err:
        mechanism.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader, epochs=1)
    assert "features.1" in str(err.value)
    assert mechanism.sample_rate is None  # refused before planning

    fixed = DPSGD.fix(model)
    assert isinstance(fixed.features[1], nn.GroupNorm)
    DPSGD.validate(fixed)
    wrapped, optimizer = mechanism.make_private(fixed, torch.optim.SGD(fixed.parameters(), lr=0.1),
                                                data_loader=loader, epochs=1)
    gen = torch.Generator().manual_seed(0)
    x, y = _conv_data(5, gen, dtype=torch.float32)
    _backward(mechanism, F.cross_entropy(wrapped(x), y))
    optimizer.step()
    assert mechanism.steps_taken == 1


def _clipped_sums_of_conv_net(backend: str | None, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """One backward pass of fedgen's engine on a fresh ConvNet (the same weights each call), the model run
    as make_private returned it, or compiled afterwards with ``backend``."""
    mechanism = DPSGD(noise_multiplier=1.0, max_grad_norm=0.1, seed=0, engine="fedgen")
    torch.manual_seed(3)
    wrapped, _, _ = _make_private(ConvNet(), mechanism, n=60, batch_size=6)
    run = wrapped if backend is None else torch.compile(wrapped, backend=backend)
    mechanism.backward(F.cross_entropy(run(x), y))
    return [p.summed_grad.clone() for p in wrapped.parameters()]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_model_compiled_after_make_private_gets_the_same_clipped_sums(backend: str) -> None:
    """torch.compile traces the engine's recording hooks into its graph and replays what they record."""
    gen = torch.Generator().manual_seed(2)
    x, y = _conv_data(6, gen, dtype=torch.float32)
    torch.compiler.reset()
    try:
        eager = _clipped_sums_of_conv_net(None, x, y)
        compiled = _clipped_sums_of_conv_net(backend, x, y)
    finally:
        torch.compiler.reset()
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert max(float(s.norm()) for s in eager) > 1e-3


def test_code_compiled_before_the_hooks_existed_is_stopped_with_the_fix() -> None:
    """Dynamo reuses code compiled for a model without the engine's hooks (it does not guard on module hooks):
    nothing is recorded, and the step stops with an error that names torch.compiler.reset(); after it, the same
    compiled private model is clipped exactly."""
    gen = torch.Generator().manual_seed(2)
    x, y = _conv_data(6, gen, dtype=torch.float32)
    torch.compiler.reset()
    try:
        torch.compile(ConvNet(), backend="aot_eager")(x)  # compiled before any hook exists
        with pytest.raises(RuntimeError, match=r"torch\.compiler\.reset\(\)"):
            _clipped_sums_of_conv_net("aot_eager", x, y)
        torch.compiler.reset()
        compiled = _clipped_sums_of_conv_net("aot_eager", x, y)
    finally:
        torch.compiler.reset()
    for a, b in zip(_clipped_sums_of_conv_net(None, x, y), compiled, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------------------------- Lightning
class _TinyPrivateModule(PrivateModule):
    """PrivateModule's on_train_batch_start ends training once ``mechanism.exhausted()``."""

    def __init__(self, mechanism: DPSGD, loader: DataLoader, epochs: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
        self.mechanism = mechanism
        self.loader = loader
        self.epochs = epochs
        self.batches_trained = 0

    def train_dataloader(self) -> DataLoader:
        return self.loader

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.batches_trained += 1
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(self.net.parameters(), lr=0.05)
        self.net, optimizer = self.mechanism.make_private(self.net, optimizer, data_loader=self.loader,
                                                          epochs=self.epochs)
        return optimizer


@pytest.mark.parametrize("engine", ["opacus", "fedgen"])
def test_lightning_stops_cleanly_at_budget(engine: str) -> None:
    torch.manual_seed(5)
    n, batch, epochs, target = 200, 20, 10, 3.0
    dataset = TensorDataset(torch.randn(n, 6), torch.randint(0, 2, (n,)))
    mechanism = DPSGD(noise_multiplier=1.0, target_epsilon=target, delta=1e-3, accountant="rdp", seed=0,
                      engine=engine)
    loader = mechanism.data_loader(dataset, batch_size=batch)
    module = _TinyPrivateModule(mechanism, loader, epochs)
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)  # must not raise PrivacyBudgetExceeded

    assert trainer.state.finished
    assert mechanism.exhausted()

    assert mechanism.max_steps is not None
    assert 5 < mechanism.max_steps < epochs * n // batch  # the budget, not max_epochs, ends training
    assert mechanism.steps_taken == mechanism.max_steps == len(mechanism.ledger)
    assert module.batches_trained == mechanism.max_steps
    assert trainer.global_step == mechanism.max_steps
    assert trainer.current_epoch < epochs - 1
    assert mechanism.epsilon() <= target
    assert mechanism.ledger.epsilon_with(
        type(mechanism.ledger.events[0])(1.0, mechanism.sample_rate), mechanism.delta) > target
    assert all(not torch.equal(a, b) for a, b in zip(before, module.net.parameters()))  # the steps trained


# ------------------------------------------------------------------------------------------ shared ledger
def test_shared_ledger_spending_is_respected() -> None:
    """Another mechanism spending from a shared ledger after planning must shorten DP-SGD's remaining budget."""
    target, delta = 3.0, 1e-5
    dpsgd = DPSGD(noise_multiplier=1.0, target_epsilon=target, delta=delta, accountant="rdp", seed=0)
    dpsgd.plan(sample_rate=0.05, steps=1000)
    planned_max = dpsgd.max_steps
    assert 20 < planned_max < 1000
    gaussian = GaussianMechanism(noise_multiplier=3.0, target_epsilon=target, delta=delta, accountant="rdp", seed=0)
    gaussian.use_ledger(dpsgd.ledger)
    for _ in range(planned_max // 2):
        dpsgd.charge_step()
    gaussian.release(torch.zeros(3))  # spends from the same data's budget
    steps = planned_max // 2
    while True:
        try:
            dpsgd.charge_step()
        except PrivacyBudgetExceeded:
            break
        steps += 1
        assert steps <= planned_max
    assert steps < planned_max
    assert dpsgd.ledger.epsilon(delta) <= target
    assert not dpsgd.can_step()


def test_resumed_mechanism_respects_restored_ledger() -> None:
    """Planning before loading a checkpoint (as Lightning does) must not leave a stale step allowance."""
    target, delta = 3.0, 1e-5
    first = DPSGD(noise_multiplier=1.0, target_epsilon=target, delta=delta, accountant="rdp", seed=0)
    first.ledger.record(SubsampledGaussianEvent(2.0, 1.0, 1))  # an earlier release from the same data
    first.plan(sample_rate=0.05, steps=100)
    for _ in range(10):
        first.charge_step()
    resumed = DPSGD(noise_multiplier=1.0, target_epsilon=target, delta=delta, accountant="rdp", seed=0)
    resumed.plan(sample_rate=0.05, steps=100)  # plans against an empty ledger
    resumed.load_state_dict(first.state_dict())
    while resumed.can_step():
        resumed.charge_step()
    assert resumed.steps_taken == first.max_steps
    assert resumed.epsilon() <= target


@pytest.mark.parametrize("engine", ["fedgen", "opacus"])
def test_a_state_loaded_after_make_private_sets_the_noise_the_steps_add(engine: str, monkeypatch) -> None:
    """Opacus' own resume order (wrap, then load the checkpoint): the steps must add the sigma the ledger records,
    not the one calibrated for the remaining steps before the load."""
    data = TensorDataset(torch.randn(2000, 4), torch.randint(0, 2, (2000,)))

    def segment(planned: int, state: dict | None = None) -> tuple[DPSGD, list[float]]:
        mechanism = DPSGD(target_epsilon=2.0, delta=1e-4, seed=0, engine=engine)
        loader = mechanism.data_loader(data, batch_size=100)
        net = nn.Linear(4, 2)
        net, optimizer = mechanism.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), data_loader=loader,
                                                steps=planned)
        if state is not None:
            mechanism.load_state_dict(state)
        stds: list[float] = []
        draw = mechanism.noise.normal
        monkeypatch.setattr(mechanism.noise, "normal", lambda *a, **k: stds.append(k["std"]) or draw(*a, **k))
        for _ in range(5):
            x, y = next(iter(loader))
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            mechanism.backward(loss) if mechanism.owns_backward else loss.backward()
            optimizer.step()
        return mechanism, stds

    first, _ = segment(100)
    resumed, stds = segment(50, first.state_dict())  # calibrated for 50 steps first: a smaller sigma
    assert resumed.noise_multiplier == first.noise_multiplier
    assert stds == [pytest.approx(first.noise_multiplier * first.max_grad_norm)] * 5
    assert {e.noise_multiplier for e in resumed.ledger.events} == {first.noise_multiplier}


def _poisson_batches(mechanism: DPSGD, steps: int, loader=None) -> list[list[int]]:
    """The example indices of ``steps`` Poisson batches of 100 examples at rate 0.1, epoch after epoch."""
    if loader is None:
        loader = mechanism.data_loader(TensorDataset(torch.arange(100)), batch_size=10)
    batches: list[list[int]] = []
    while len(batches) < steps:
        for (x,) in loader:
            batches.append(sorted(x.tolist()))
            if len(batches) == steps:
                break
    return batches


@pytest.mark.parametrize("loader_first", [True, False], ids=["loader-then-checkpoint", "checkpoint-then-loader"])
def test_a_resumed_seeded_run_draws_the_batches_of_the_uninterrupted_run(loader_first: bool) -> None:
    """The accountant takes each step's Poisson sample to be independent of the others: a resumed run must not
    start its sampler again from the seed, which would repeat the first steps' batches."""
    uninterrupted = _poisson_batches(DPSGD(noise_multiplier=1.0, seed=0), 25)
    first = DPSGD(noise_multiplier=1.0, seed=0)
    assert _poisson_batches(first, 10) == uninterrupted[:10]  # one epoch of 10 steps, then the checkpoint
    resumed = DPSGD(noise_multiplier=1.0, seed=0)
    loader = resumed.data_loader(TensorDataset(torch.arange(100)), batch_size=10) if loader_first else None
    resumed.load_state_dict(first.state_dict())
    assert _poisson_batches(resumed, 15, loader) == uninterrupted[10:]


def test_a_checkpoint_without_the_sampler_state_resumes_on_a_fresh_stream() -> None:
    """Checkpoints written before the sampler's state was saved: the resumed sampler takes a stream of its own,
    not the seed's, so the first steps' batches are not drawn again."""
    first = DPSGD(noise_multiplier=1.0, seed=0)
    used = _poisson_batches(first, 10)
    state = first.state_dict() | {"sampler": None, "steps_taken": 10}  # as an older checkpoint after 10 steps
    resumed = DPSGD(noise_multiplier=1.0, seed=0)
    resumed.load_state_dict(state)
    again = _poisson_batches(resumed, 10)
    assert sum(a == b for a, b in zip(again, used, strict=True)) <= 1


def test_a_secure_run_keeps_no_sampler_state() -> None:
    """With secure noise the sampler is seeded from the OS in every segment, and a checkpoint does not tell which
    examples the past steps used."""
    first = DPSGD(noise_multiplier=1.0, secure_noise=True)
    _poisson_batches(first, 10)
    assert first.state_dict()["sampler"] is None


class _TiedEmbedding(nn.Module):
    """A language-model head tied to its embedding: one parameter, two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def test_tied_weights_are_clipped_by_opacus_as_one_parameter_and_refused_by_fedgens_engine() -> None:
    """fedgen's engine takes each layer's norm on its own, sqrt(|a|^2 + |b|^2) for a parameter whose per-example
    gradient is a + b, which lets one example add more than C."""
    torch.manual_seed(0)
    net = _TiedEmbedding()
    with torch.no_grad():
        net.embed.weight.mul_(30)  # gradients far above the clip norm
    assert any("embed and head" in problem for problem in unsupported_layers(net))
    data = TensorDataset(torch.tensor([3]), torch.tensor([7]))  # one example, sampled at rate 1 every step
    with pytest.raises(ConfigError, match="tied"):
        DPSGD(noise_multiplier=1.0, engine="fedgen").make_private(
            net, torch.optim.SGD(net.parameters(), lr=0.0), data_loader=DPSGD(noise_multiplier=1.0).data_loader(
                data, batch_size=1), epochs=1)
    mechanism = DPSGD(noise_multiplier=1e-9, max_grad_norm=1.0, seed=0)
    loader = mechanism.data_loader(data, batch_size=1)
    wrapped, optimizer = mechanism.make_private(net, torch.optim.SGD(net.parameters(), lr=0.0), data_loader=loader,
                                                epochs=1)
    assert mechanism.engine_in_use == "opacus"
    tokens, target = next(iter(loader))
    F.cross_entropy(wrapped(tokens), target).backward()
    optimizer.step()
    assert net.embed.weight.grad.norm() == pytest.approx(1.0, rel=1e-4)  # the example's whole gradient, clipped


@pytest.mark.parametrize("engine", ["fedgen", "opacus"])
def test_low_precision_private_parameters_are_refused_before_any_step(engine: str) -> None:
    """bfloat16 weights (Lightning's bf16-true) would round each step's clipped sum before the noise: removing one
    example then moved a sum of 512 by 1.5 C."""
    net = nn.Linear(4, 2).to(torch.bfloat16)
    mechanism = DPSGD(noise_multiplier=1.0, engine=engine)
    loader = mechanism.data_loader(TensorDataset(torch.zeros(20, 4)), batch_size=5)
    with pytest.raises(ConfigError, match="trainer.precision") as err:
        mechanism.make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), data_loader=loader, epochs=1)
    assert "bf16-mixed" in err.value.fix and mechanism.steps_taken == 0 and len(mechanism.ledger) == 0


def test_auto_engine_is_fedgen_where_it_supports_the_model_and_opacus_elsewhere() -> None:
    loader_data = TensorDataset(torch.zeros(20, 1))
    supported = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(), nn.LazyLinear(2))
    supported(torch.zeros(1, 1, 5, 5))  # materialize the lazy layer
    mechanism = DPSGD(noise_multiplier=1.0)
    assert mechanism.engine == "auto" and mechanism.engine_in_use is None
    mechanism.make_private(supported, torch.optim.SGD(supported.parameters(), lr=0.1),
                           data_loader=mechanism.data_loader(loader_data, batch_size=5), epochs=1)
    assert mechanism.engine_in_use == "fedgen" and mechanism.owns_backward

    other = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 2))  # Conv1d: Opacus only
    mechanism = DPSGD(noise_multiplier=1.0)
    wrapped, optimizer = mechanism.make_private(other, torch.optim.SGD(other.parameters(), lr=0.1),
                                                data_loader=mechanism.data_loader(loader_data, batch_size=5), epochs=1)
    assert mechanism.engine_in_use == "opacus" and not mechanism.owns_backward
    F.cross_entropy(wrapped(torch.randn(4, 1, 8)), torch.tensor([0, 1, 0, 1])).backward()
    optimizer.step()
    assert mechanism.steps_taken == 1
