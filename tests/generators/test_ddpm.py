"""DP diffusion: noise multiplicity clips each example's K-draw loss, micro-batches sum into one step, the ledger
is charged per step independently of K, sampling works, and bad configurations fail before any work."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch
from torch.utils.data import TensorDataset
from torch import nn

from fedgen.data.augment import move_randomly
from fedgen.errors import ConfigError
from fedgen.generators import DPDiffusion, ProceduralPretraining
from fedgen.mechanisms import DPSGD, SubsampledGaussianEvent, compute_epsilon


def _tiny(**overrides) -> DPDiffusion:
    torch.manual_seed(0)
    mechanism = overrides.pop("mechanism", None) or DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    settings = dict(num_classes=3, image_shape=(1, 8, 8), block_channels=(8, 16), attention=(False, True),
                    norm_groups=4, noise_draws=3, batch_size=10, sampling_steps=4, ema_decay=0.9)
    return DPDiffusion(mechanism=mechanism, **(settings | overrides)).double()


def _data(n: int = 40) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=gen, dtype=torch.float64),
                         torch.randint(0, 3, (n,), generator=gen))


def _fit(model: DPDiffusion, data: TensorDataset, **trainer) -> L.Trainer:
    loader = model.attach_private_data(data)
    fit = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, **({"max_epochs": 1} | trainer))
    fit.fit(model, loader)
    return fit


CONDITIONED_VIEWS = {"augment_shift": 1, "augment_flip": True, "augment_conditioning": True}


@pytest.mark.parametrize(("attention_head_dim", "views"), [(8, {}), (None, {}), (8, CONDITIONED_VIEWS)])
def test_each_example_is_clipped_on_the_mean_of_its_k_draws(attention_head_dim: int | None, views: dict) -> None:
    data = _data()
    x, y = data.tensors[0][:5], data.tensors[1][:5]
    reference = _tiny(label_dropout=0.3, attention_head_dim=attention_head_dim, **views)
    draws = reference.hparams.noise_draws

    # the truth: each example's loss is the mean of its K rows, differentiated alone
    torch.manual_seed(3)
    rows = reference.diffusion_loss(x, y, reduction="none")
    assert rows.shape == (5 * draws,)
    # rows i K .. i K + K - 1 are example i's: changing example 0 changes its K rows and no other
    torch.manual_seed(3)
    changed = reference.diffusion_loss(torch.cat([1 - x[:1], x[1:]]), y, reduction="none").detach()
    assert not torch.isclose(changed[:draws], rows[:draws].detach()).any()
    torch.testing.assert_close(changed[draws:], rows[draws:].detach())
    params = list(reference.unet.parameters())
    per_example = [torch.autograd.grad(rows[i * draws:(i + 1) * draws].mean(), params, retain_graph=True)
                   for i in range(5)]
    norms = torch.stack([torch.cat([g.flatten() for g in grads]).norm() for grads in per_example])
    clip = float(norms.median())
    assert int((norms > clip).sum()) == 2  # some examples are clipped, some are not
    want = [sum(min(1.0, clip / (float(n) + 1e-6)) * grads[j] for n, grads in zip(norms, per_example, strict=True))
            for j in range(len(params))]

    # the engine, with the same weights and the same random draws in the same order
    model = _tiny(label_dropout=0.3, attention_head_dim=attention_head_dim, **views,
                  mechanism=DPSGD(noise_multiplier=1.0, max_grad_norm=clip, seed=0))
    optimizer = torch.optim.SGD(model.unet.parameters(), lr=0.0)
    model.mechanism.make_private(model.unet, optimizer, data_loader=model.attach_private_data(data), steps=5)
    torch.manual_seed(3)
    model.mechanism.backward(model.diffusion_loss(x, y), draws=draws)
    for p, w in zip(model.unet.parameters(), want, strict=True):
        torch.testing.assert_close(p.summed_grad, w, atol=1e-9, rtol=1e-6)


def test_micro_batches_make_one_noisy_step_per_logical_batch() -> None:
    whole, split = _tiny(), _tiny(max_physical_examples=3)
    data = _data()
    for model in (whole, split):
        _fit(model, data, max_steps=3)
    assert whole.mechanism.steps_taken == split.mechanism.steps_taken == 3
    assert len(whole.mechanism.ledger.events) == 1 and whole.mechanism.ledger.events[0].count == 3
    assert any(not torch.equal(p, q) for p, q in zip(whole.unet.parameters(), whole.ema.module.parameters(),
                                                      strict=True))  # the EMA moved, but lags the weights


def test_the_logged_training_loss_is_the_epochs_mean_over_its_micro_batches(monkeypatch) -> None:
    """What the progress line prints as train/loss: every micro-batch's loss, weighted by its size."""
    model, seen = _tiny(max_physical_examples=3), []
    loss_of = model.diffusion_loss
    monkeypatch.setattr(model, "diffusion_loss", lambda x, y: seen.append((float(loss := loss_of(x, y)), len(x)))
                        or loss)
    trainer = _fit(model, _data(), max_steps=3)
    assert len(seen) > 3  # several micro-batches a step
    mean = sum(loss * n for loss, n in seen) / sum(n for _, n in seen)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(mean, rel=1e-6)


def test_the_ledger_is_charged_per_step_whatever_the_number_of_draws() -> None:
    data = _data(200)
    ledgers = []
    for draws in (1, 4):
        model = _tiny(mechanism=DPSGD(target_epsilon=3.0, delta=1e-3, seed=0), noise_draws=draws, batch_size=20)
        _fit(model, data, max_epochs=2)
        mechanism = model.mechanism
        q = 20 / 200
        assert mechanism.sample_rate == q and mechanism.steps_taken == 20  # 2 epochs of 1/q Poisson batches
        events = [SubsampledGaussianEvent(mechanism.noise_multiplier, q, count=mechanism.steps_taken)]
        epsilon = compute_epsilon(events, delta=1e-3, accountant=mechanism.ledger.accountant)
        assert mechanism.epsilon() == pytest.approx(epsilon) and 2.7 < mechanism.epsilon() <= 3.0
        ledgers.append(mechanism.ledger.state_dict())
    assert ledgers[0] == ledgers[1]  # K draws cost nothing extra


@pytest.mark.parametrize("power", [None, 8.0, 2.0])
def test_the_ema_starts_at_the_trained_weights_and_warms_up_to_its_decay(power: float | None) -> None:
    from torch import nn
    from torch.optim.swa_utils import AveragedModel

    from fedgen.generators.ddpm import ema_with_warmup

    weight = nn.Parameter(torch.zeros(3))
    update = ema_with_warmup(0.99) if power is None else ema_with_warmup(0.99, power)
    ema = AveragedModel(nn.ParameterList([weight]), multi_avg_fn=update)
    gamma = 8.0 if power is None else power  # the default is the warm-up (1 + n) / (10 + n)
    expected = None
    for n in range(200):
        with torch.no_grad():
            weight.fill_(float(n + 1))
        ema.update_parameters(nn.ParameterList([weight]))
        rate = min(0.99, (1 + n) / (gamma + 2 + n))  # n updates averaged so far (the first one copies the weights)
        expected = float(n + 1) if n == 0 else rate * expected + (1 - rate) * (n + 1)
        torch.testing.assert_close(ema.module[0].detach(), torch.full((3,), expected))
    if gamma == 8.0:
        assert 170 < expected < 190  # it lags the weights by about r / (1 - r) updates (r = 201/210), nothing more


@pytest.mark.parametrize("power", [0.0, 1.0, 8.0])
def test_the_ema_power_weighs_step_t_by_about_t_to_the_power(power: float) -> None:
    """Before the cap, the average of the weights w_t = t (t = 1..N) is about the power-function average
    sum t^(g+1) / sum t^g (Karras et al., 2024); for g = 0 it is exactly the mean with the first update counted
    twice, (2 + 2 + 3 + ... + N) / (N + 1)."""
    from torch import nn
    from torch.optim.swa_utils import AveragedModel

    from fedgen.generators.ddpm import ema_with_warmup

    weight = nn.Parameter(torch.zeros((), dtype=torch.float64))
    ema = AveragedModel(nn.ParameterList([weight]), multi_avg_fn=ema_with_warmup(0.99999, power))
    steps = 400
    for t in range(1, steps + 1):
        with torch.no_grad():
            weight.fill_(float(t))
        ema.update_parameters(nn.ParameterList([weight]))
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    power_average = float((t ** (power + 1)).sum() / (t ** power).sum())
    got = float(ema.module[0])
    if power == 0.0:
        assert got == pytest.approx(steps / 2 + 1 / (steps + 1), rel=1e-12)
    assert got == pytest.approx(power_average, rel=0.01)
    assert got == pytest.approx(steps * (power + 1) / (power + 2), rel=0.01)  # mean age: a (g + 2)-th of the run


def test_the_generator_averages_with_its_configured_ema_power() -> None:
    model = _tiny(ema_power=0.0, ema_decay=0.9999)
    weight = next(model.unet.parameters())
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            weight.fill_(value)
        model.ema.update_parameters(model.unet)
    # gamma 0: the mean with the first update counted twice, (1 + 1 + 2 + 3) / 4 (the default 8 gives 2.67)
    torch.testing.assert_close(next(model.ema.module.parameters()), torch.full_like(weight, 1.75))


def test_sampling_gives_images_of_the_requested_classes_shape() -> None:
    model = _tiny(guidance_scale=2.0)
    images = model.sample(4, torch.tensor([0, 1, 2, 0]), generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 8, 8) and 0 <= float(images.min()) and float(images.max()) <= 1
    ddpm = _tiny(sampler="ddpm", num_train_timesteps=6, sampling_steps=6)
    assert ddpm.sample(2).shape == (2, 1, 8, 8)


def test_sample_shift_releases_each_drawn_image_moved_by_its_own_offset_after_the_label_check(monkeypatch) -> None:
    """With sample_shift = s every released image is its drawn image moved by its own offset in [-s, s]^2 (zero
    fill), the offsets drawn from the generator given (the same seed repeats); the check reads the unmoved draws,
    and metrics.json's sampling report names the shift."""
    drawn = torch.zeros(300, 1, 8, 8, dtype=torch.float64)
    drawn[:, :, 3:5, 3:5] = torch.rand(300, 1, 2, 2, generator=torch.Generator().manual_seed(7)) + 0.1
    monkeypatch.setattr(DPDiffusion, "_draw", lambda self, labels, generator: drawn[:len(labels)].clone())
    checked = []
    monkeypatch.setattr(DPDiffusion, "classify", lambda self, images, **kwargs: checked.append(images.clone())
                        or torch.zeros(len(images), dtype=torch.long))
    model = _tiny(sample_shift=2, label_check_steps=[1])
    labels = torch.zeros(300, dtype=torch.long)
    released = model.sample(300, labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(checked[0], drawn)  # the check saw the images as drawn
    moves = set()
    for image, shifted in zip(drawn, released, strict=True):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(torch.roll(image, (dy, dx), dims=(1, 2)), shifted)]  # the patch never wraps
        assert len(found) == 1
        moves.add(found[0])
    assert len(moves) == 25  # 300 images cover every offset
    assert torch.equal(model.sample(300, labels, generator=torch.Generator().manual_seed(3)), released)
    assert model.sampling_report()["sample_shift"] == 2
    assert torch.equal(_tiny().sample(3, labels[:3]), drawn[:3])  # 0: as drawn
    assert _tiny().sampling_report() is None


def test_sample_rotation_and_scale_turn_and_scale_each_released_image_on_its_own_draws(monkeypatch) -> None:
    """sample_rotation and sample_scale release each drawn image through move_randomly with the sampler's generator
    (so the same seed repeats), and metrics.json's sampling report names them."""
    drawn = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    monkeypatch.setattr(DPDiffusion, "_draw", lambda self, labels, generator: drawn[:len(labels)].clone())
    model = _tiny(sample_shift=1, sample_rotation=15.0, sample_scale=0.1)
    labels = torch.zeros(20, dtype=torch.long)
    released = model.sample(20, labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(released, move_randomly(drawn, 1, 15.0, 0.1, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(released, drawn)
    assert model.sampling_report() == {"sample_shift": 1, "sample_rotation": 15.0, "sample_scale": 0.1}
    assert _tiny(sample_rotation=5.0).sampling_report() == {"sample_rotation": 5.0}


def test_sampling_eta_draws_fresh_noise_at_each_ddim_step() -> None:
    """eta 0 is deterministic DDIM: the same start gives the same images. eta 1 draws DDPM's posterior noise at each
    step, from the generator given, so the same seed repeats and the images differ from eta 0's."""
    labels = torch.tensor([0, 1, 2])

    def draw(eta: float, seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = _tiny(sampling_eta=eta, ema_decay=0.0)
        return model.sample(3, labels, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1.0, 5), draw(1.0, 5))
    assert not torch.allclose(draw(1.0, 5), draw(0.0, 5), atol=1e-3)
    assert not torch.allclose(draw(1.0, 5), draw(1.0, 6), atol=1e-3)


class _Oracle(torch.nn.Module):
    """The exact denoiser of a one-image dataset: from ``x_t = a x_0 + s eps`` it knows x_0, hence eps and
    ``v = a eps - s x_0 = (a x_t - x_0) / s``; it returns the model's target for the model's ``prediction``."""

    def __init__(self, model: DPDiffusion, image: torch.Tensor) -> None:
        super().__init__()
        self.x0, self.model = image * 2 - 1, [model]

    def forward(self, x_t, t, class_labels=None):
        from types import SimpleNamespace

        abar = self.model[0].noise_scheduler.alphas_cumprod.to(x_t)[t.long()].view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        eps = (x_t - a * self.x0) / s
        out = eps if self.model[0].hparams.prediction == "epsilon" else a * eps - s * self.x0
        return SimpleNamespace(sample=out)


@pytest.mark.parametrize("prediction, beta_schedule, sampling", [
    ("v_prediction", "linear", {}), ("epsilon", "linear", {}), ("v_prediction", "squaredcos_cap_v2", {}),
    ("v_prediction", "linear", {"sampling_eta": 1.0}),
    ("v_prediction", "linear", {"sampler": "edm"}), ("epsilon", "linear", {"sampler": "edm"}),
    ("v_prediction", "squaredcos_cap_v2", {"sampler": "edm", "sampling_churn": 40.0, "churn_range": (0.0, 1e3)}),
])
def test_training_target_and_sampler_agree_on_what_the_unet_predicts(prediction: str, beta_schedule: str,
                                                                     sampling: dict) -> None:
    """With the exact denoiser of a one-image dataset the loss is 0 (the target is the one configured) and the
    sampler lands on that image (it reads the UNet's output as that same quantity), on either schedule, with or
    without fresh noise at each DDIM step (the last step draws none), and with the edm sampler, with or without
    churn (its last step goes to sigma 0, where the exact denoiser's estimate is the image)."""
    model = _tiny(prediction=prediction, beta_schedule=beta_schedule, ema_decay=0.0, guidance_scale=0.0,
                  **sampling)
    image = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model.unet = _Oracle(model, image)
    loss = model.diffusion_loss(image.expand(5, -1, -1, -1), torch.zeros(5, dtype=torch.long))
    assert float(loss) < 1e-12
    samples = model.sample(3, torch.zeros(3, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples, image.expand(3, -1, -1, -1), atol=1e-6, rtol=0)


class _GaussianOracle(torch.nn.Module):
    """The exact denoiser of Gaussian data, x_0 ~ N(mu, tau^2 I) on the [-1, 1] scale: from ``x_t = a x_0 + s eps``
    its estimate of x_0 is the posterior mean ``mu + a tau^2 (x_t - a mu) / (a^2 tau^2 + s^2)``, which depends on
    x_t (a one-image oracle returns its image whatever the input, so it cannot tell how a sampler scales it)."""

    def __init__(self, model: DPDiffusion, mu: float, tau: float) -> None:
        super().__init__()
        self.mu, self.tau, self.model = mu, tau, [model]

    def forward(self, x_t, t, class_labels=None):
        from types import SimpleNamespace

        abar = self.model[0].noise_scheduler.alphas_cumprod.to(x_t)[t.long()].view(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x0 = self.mu + a * self.tau ** 2 * (x_t - a * self.mu) / (a ** 2 * self.tau ** 2 + s ** 2)
        eps = (x_t - a * x0) / s
        out = eps if self.model[0].hparams.prediction == "epsilon" else a * eps - s * x0
        return SimpleNamespace(sample=out)


@pytest.mark.parametrize("sampling", [{"sampling_steps": 250}, {"sampler": "edm", "sampling_steps": 40},
                                      {"sampler": "edm", "sampling_steps": 40, "sampling_churn": 20.0},
                                      {"sampler": "edm", "sampling_steps": 40, "prediction": "epsilon"}])
def test_samplers_draw_the_data_distribution_with_the_exact_denoiser(sampling: dict) -> None:
    """With the exact denoiser of Gaussian data, N(0.2, 0.3^2) on the [-1, 1] scale, the samples' mean and spread
    are the data's (on [0, 1]: 0.6 and 0.15): the sampler feeds the UNet the input it was trained on at each
    step and reads its output as the target, with or without churn."""
    model = _tiny(ema_decay=0.0, **sampling)
    model.unet = _GaussianOracle(model, mu=0.2, tau=0.3)
    samples = model.sample(400, torch.zeros(400, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert float(samples.mean()) == pytest.approx(0.6, abs=0.01)
    assert float(samples.std()) == pytest.approx(0.15, rel=0.04)


def test_edm_sampler_evaluates_the_unet_twice_a_step_but_the_last_and_churns_from_the_generator() -> None:
    """N Heun steps make 2 N - 1 UNet evaluations, each at a step the UNet was trained on, from the largest step
    down; churn draws its noise from the generator given (the same seed repeats, another differs, and no churn
    differs from churn)."""
    seen = []

    def record(module, args, kwargs) -> None:
        seen.append(args[1])

    torch.manual_seed(0)
    model = _tiny(sampler="edm", sampling_steps=5, ema_decay=0.0)
    hook = model.unet.register_forward_pre_hook(record, with_kwargs=True)
    model.sample(2, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert len(seen) == 2 * 5 - 1
    assert all(t.dtype == torch.long and int(t.min()) == int(t.max()) for t in seen)
    steps = [int(t[0]) for t in seen]  # s_0, then s_1 twice (Heun's end of step 0, start of step 1), ...
    assert steps[0] == 999 and steps[1::2] == steps[2::2] and steps[-1] == 0
    assert all(a > b for a, b in zip(steps[::2], steps[2::2], strict=False))

    def draw(churn: float, seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        churned = _tiny(sampler="edm", sampling_steps=5, sampling_churn=churn, ema_decay=0.0)
        return churned.sample(2, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(5.0, 1), draw(5.0, 1))
    assert not torch.allclose(draw(5.0, 1), draw(5.0, 2), atol=1e-3)
    assert not torch.allclose(draw(5.0, 1), draw(0.0, 1), atol=1e-3)


class _ClassOracle(torch.nn.Module):
    """The exact denoiser of a dataset with one image per class: under label c it takes ``x_0`` to be class c's
    image and returns the target that ``x_t`` then implies."""

    def __init__(self, model: DPDiffusion, images: torch.Tensor) -> None:
        super().__init__()
        self.x0, self.model = images * 2 - 1, [model]

    def forward(self, x_t, t, class_labels=None):
        from types import SimpleNamespace

        abar = self.model[0].noise_scheduler.alphas_cumprod.to(x_t)[t.long()].view(-1, 1, 1, 1)
        a, s, x0 = abar.sqrt(), (1 - abar).sqrt(), self.x0[class_labels]
        eps = (x_t - a * x0) / s
        return SimpleNamespace(sample=eps if self.model[0].hparams.prediction == "epsilon" else a * eps - s * x0)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_classify_gives_each_image_the_label_whose_prediction_error_is_lowest(prediction: str) -> None:
    """With the exact denoiser of one image per class, an image of class k has zero error under label k and a
    positive one under any other: classify must give every image its own class, in any order and chunking."""
    model = _tiny(prediction=prediction, ema_decay=0.0)
    prototypes = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model.unet = _ClassOracle(model, prototypes)
    truth = torch.tensor([2, 0, 1, 1, 2, 0, 0])
    found = model.classify(prototypes[truth], steps=[100, 500, 900], batch_size=3,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(found, truth)
    with pytest.raises(ValueError, match="label_check_steps"):
        model.classify(prototypes)  # no steps given or configured


def test_a_sample_that_fails_the_label_check_is_drawn_again_and_the_labels_never_change(monkeypatch) -> None:
    """Images whose own class is not their label are drawn again (up to label_check_rounds times); one that still
    fails is kept. Here the check fails image 1 once and image 3 always: image 1 comes from its second draw,
    image 3 from its third (the last of two rounds), the others from the first, and the counts say so."""
    model = _tiny(label_check_steps=[1, 2], label_check_rounds=2)
    draws = iter(range(100))
    monkeypatch.setattr(DPDiffusion, "_draw", lambda self, labels, generator: torch.tensor(
        [float(next(draws)) for _ in labels], dtype=torch.float64).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone())
    fails = {1: 1, 3: 99}  # image i (its first draw's number) fails this many checks

    def classify(self, images, **kwargs):
        first_draw = {0: 0, 1: 1, 2: 2, 3: 3, 4: 1, 5: 3, 6: 3}  # draw number -> image index
        out = []
        for image in images:
            i = first_draw[int(image[0, 0, 0])]
            out.append(-1 if fails.get(i, 0) > 0 else labels[i])
            fails[i] = fails.get(i, 0) - 1
        return torch.tensor(out)

    monkeypatch.setattr(DPDiffusion, "classify", classify)
    labels = torch.tensor([0, 1, 2, 0])
    images = model.sample(4, labels.clone())
    assert [int(v) for v in images[:, 0, 0, 0]] == [0, 4, 2, 6]  # draws 4 (image 1), 5 then 6 (image 3)
    assert model.sampling_report() == {"label_check_steps": [1, 2], "label_check_rounds": 2, "images": 4,
                                       "failed_first_draw": 2, "redraws": 3, "kept_failing": 1}
    assert _tiny().sampling_report() is None


def test_lognormal_timesteps_draw_log_sigma_from_the_normal_and_take_the_nearest_step() -> None:
    """EDM's training distribution on the DDPM schedule: log sigma ~ N(P_mean, P_std^2), mapped to the step whose
    log sigma_t = log sqrt((1 - abar_t) / abar_t) is nearest."""
    model = _tiny(timesteps="lognormal", lognormal_mean=-1.2, lognormal_std=1.2, num_train_timesteps=1000)
    abar = model.noise_scheduler.alphas_cumprod.double()
    log_sigma_t = 0.5 * torch.log((1 - abar) / abar)
    torch.manual_seed(3)
    steps = model.training_timesteps(200_000, device=torch.device("cpu"))
    torch.manual_seed(3)
    drawn = -1.2 + 1.2 * torch.randn(200_000, dtype=torch.float64)
    nearest = (log_sigma_t[None, :2000] - drawn[:2000, None]).abs().argmin(1)
    assert torch.equal(steps[:2000], nearest)
    # the discretized distribution keeps the normal's moments (the schedule's log sigma ranges over [-4.6, 5.0])
    taken = log_sigma_t[steps]
    assert abs(float(taken.mean()) + 1.2) < 0.02 and abs(float(taken.std()) - 1.2) < 0.02
    uniform = _tiny(num_train_timesteps=1000).training_timesteps(200_000, device=torch.device("cpu"))
    assert float((log_sigma_t[uniform] > 1.2).double().mean()) > 0.45  # uniform steps: half nearly pure noise
    assert float((taken > 1.2).double().mean()) < 0.03


@pytest.mark.parametrize("timesteps", ["uniform", "lognormal"])
def test_stratified_draws_give_each_of_an_examples_k_rows_its_own_stratum(timesteps: str) -> None:
    """stratified_draws: row r of an example falls in stratum r mod K of the timesteps distribution (quarters of
    the steps for uniform, quarters of the normal for log sigma), each row still distributed as before, and the
    mean step of an example's K rows varies far less than with independent draws."""
    model = _tiny(timesteps=timesteps, num_train_timesteps=1000, noise_draws=4, stratified_draws=True)
    torch.manual_seed(0)
    steps = model.training_timesteps(40_000, device=torch.device("cpu"), strata=4).reshape(-1, 4)
    torch.manual_seed(0)
    independent = model.training_timesteps(40_000, device=torch.device("cpu")).reshape(-1, 4)
    abar = model.noise_scheduler.alphas_cumprod.double()
    log_sigma_t = 0.5 * torch.log((1 - abar) / abar)
    if timesteps == "uniform":
        for k in range(4):
            assert int(steps[:, k].min()) >= 250 * k and int(steps[:, k].max()) < 250 * (k + 1)
        assert abs(float(steps.double().mean()) - 499.5) < 3 and abs(float(steps.double().std()) - 288.7) < 3
    else:
        cuts = -1.2 + 1.2 * torch.special.ndtri(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        edges = torch.cat([torch.tensor([-torch.inf]), cuts, torch.tensor([torch.inf])]).double()
        taken = log_sigma_t[steps]
        step_width = float((log_sigma_t[1:] - log_sigma_t[:-1]).abs().max())  # nearest step: within half of it
        for k in range(4):
            assert float(taken[:, k].min()) >= float(edges[k]) - step_width
            assert float(taken[:, k].max()) <= float(edges[k + 1]) + step_width
        assert abs(float(taken.mean()) + 1.2) < 0.03 and abs(float(taken.std()) - 1.2) < 0.03
    assert float(steps.double().mean(1).std()) < 0.5 * float(independent.double().mean(1).std())


def test_stratified_draws_train_through_the_loss() -> None:
    """The option reaches the loss: the steps the UNet sees are the stratified ones."""
    model = _tiny(noise_draws=2, stratified_draws=True, num_train_timesteps=100, ema_decay=0.0)
    seen = []
    forward = model.unet.forward
    model.unet.forward = lambda x, t, **kw: (seen.append(t.clone()), forward(x, t, **kw))[1]
    x, y = _data(6).tensors
    model.diffusion_loss(x, y)
    t = seen[0].reshape(-1, 2)
    assert bool((t[:, 0] < 50).all()) and bool((t[:, 1] >= 50).all())


def test_an_empty_poisson_batch_still_takes_a_noisy_step() -> None:
    model = _tiny()
    data = _data()
    loader = model.attach_private_data(data)
    _, optimizer = model.mechanism.make_private(model.unet, torch.optim.SGD(model.unet.parameters(), lr=1.0),
                                                data_loader=loader, steps=5)
    before = [p.detach().clone() for p in model.unet.parameters()]
    model.mechanism.empty_batch()
    optimizer.step()
    assert model.mechanism.steps_taken == 1
    assert all(not torch.equal(p, b) for p, b in zip(model.unet.parameters(), before, strict=True))


def test_zero_init_residual_starts_every_block_as_the_identity_and_the_output_at_zero() -> None:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    x, t, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 3])
    zero = _tiny(zero_init_residual=True).unet
    assert torch.count_nonzero(zero(x, t, class_labels=y).sample) == 0
    blocks = [m for m in zero.modules() if isinstance(m, ResnetBlock2D | Attention)]
    assert any(isinstance(m, Attention) for m in blocks) and any(isinstance(m, ResnetBlock2D) for m in blocks)
    for block in blocks:
        last = block.conv2 if isinstance(block, ResnetBlock2D) else block.to_out[0]
        assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(last.bias) == 0
        assert any(torch.count_nonzero(p) for p in block.parameters())  # the rest keeps its initialization
    assert torch.count_nonzero(_tiny().unet(x, t, class_labels=y).sample) > 0  # the default does not


def test_repeat_2x_is_nearest_upsampling_forward_and_backward() -> None:
    from torch.nn import functional as F

    from fedgen.generators.ddpm import repeat_2x

    x = torch.randn(3, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    go = torch.randn(3, 5, 8, 12, dtype=torch.float64)
    (grad,) = torch.autograd.grad(repeat_2x(x), x, go)
    (expected,) = torch.autograd.grad(F.interpolate(x, scale_factor=2.0, mode="nearest"), x, go)
    assert torch.equal(repeat_2x(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(grad, expected)
    assert torch.equal(grad[0, 0, 1, 2], go[0, 0, 2:4, 4:6].sum())  # each pixel's gradient sums its 2x2 square


def test_the_unet_upsamples_by_repeat_2x_with_diffusers_weights_and_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """build_unet's upsamplers hold diffusers' parameter names (checkpoints load either way) and compute what
    diffusers' Upsample2D computes, on the CUDA path (repeat_2x) too."""
    from diffusers import UNet2DModel

    from fedgen.generators import ddpm

    ours = _tiny().unet.double()
    upsamplers = [up for block in ours.up_blocks for up in block.upsamplers or ()]
    assert upsamplers and all(isinstance(up, ddpm.NearestUpsample2D) for up in upsamplers)
    plain = UNet2DModel.from_config(ours.config).double()
    assert list(plain.state_dict()) == list(ours.state_dict())
    plain.load_state_dict(ours.state_dict())
    x, t, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 3])
    monkeypatch.setattr(ddpm, "upsample_nearest_2x", ddpm.repeat_2x)
    outputs = []
    for unet in (ours, plain):
        out = unet(x, t, class_labels=y).sample
        outputs.append((out, torch.autograd.grad(out.square().sum(), list(unet.parameters()))))
    torch.testing.assert_close(outputs[0], outputs[1])


def test_attention_heads_are_attention_head_dim_channels_wide_or_one_per_block() -> None:
    from diffusers.models.attention_processor import Attention

    # the tiny UNet attends at its second level (16 channels) and in its middle block (16 channels)
    for head_dim, heads in ((8, 2), (4, 4), (None, 1)):
        attentions = [m for m in _tiny(attention_head_dim=head_dim).unet.modules() if isinstance(m, Attention)]
        assert len(attentions) == 4 and {m.heads for m in attentions} == {heads}, head_dim


@pytest.mark.parametrize(("overrides", "field"), [
    ({"attention_head_dim": 3}, "model.attention_head_dim"),  # 3 does not divide 16
    ({"attention_head_dim": 0}, "model.attention_head_dim"),
    ({"mechanism": DPSGD(noise_multiplier=1.0, engine="opacus")}, "model.mechanism.engine"),
    ({"attention": (False,)}, "model.attention"),
    ({"norm_groups": 3}, "model.norm_groups"),
    ({"block_channels": (8,) * 5, "attention": (False,) * 5}, "model.block_channels"),  # 8x8 halved 4 times
    ({"noise_draws": 0}, "model.noise_draws"),
    ({"label_dropout": 0.0, "guidance_scale": 1.0}, "model.guidance_scale"),
    ({"sampler": "ddpm"}, "model.sampling_steps"),
    ({"beta_schedule": "cosine"}, "model.beta_schedule"),
    ({"ema_decay": 1.0}, "model.ema_decay"),
    ({"ema_power": -0.5}, "model.ema_power"),
    ({"ema_power": float("inf")}, "model.ema_power"),
    ({"prediction": "sample"}, "model.prediction"),
    ({"timesteps": "edm"}, "model.timesteps"),
    ({"timesteps": "lognormal", "lognormal_std": 0.0}, "model.lognormal_std"),
    ({"lr_schedule": "step"}, "model.lr_schedule"),
    ({"sampling_eta": 1.5}, "model.sampling_eta"),
    ({"augment_shift": -1}, "model.augment_shift"),
    ({"augment_shift": 8}, "model.augment_shift"),  # the tiny model's images are 8x8
    ({"sample_shift": 8}, "model.sample_shift"),
    ({"sample_shift": -1}, "model.sample_shift"),
    ({"sample_rotation": -5.0}, "model.sample_rotation"),
    ({"sample_scale": 1.0}, "model.sample_scale"),
    ({"augment_conditioning": True}, "model.augment_conditioning"),  # no augmentation to condition on
    ({"sampler": "ddpm", "num_train_timesteps": 6, "sampling_steps": 6, "sampling_eta": 1.0}, "model.sampling_eta"),
    ({"sampler": "edm", "sampling_eta": 0.5}, "model.sampling_eta"),  # edm's fresh noise is its churn
    ({"sampling_churn": 10.0}, "model.sampling_churn"),  # churn is edm's; the default sampler is ddim
    ({"sampler": "edm", "sampling_churn": -1.0}, "model.sampling_churn"),
    ({"sampler": "edm", "churn_range": (50.0, 0.05)}, "model.churn_range"),
    ({"label_check_steps": []}, "model.label_check_steps"),
    ({"label_check_steps": [100, 1000]}, "model.label_check_steps"),  # T = 1000: steps 0 to 999
    ({"label_check_rounds": 0}, "model.label_check_rounds"),
    ({"cuda_graphs": True}, "model.cuda_graphs"),  # no max_physical_examples: no fixed micro-batch to capture
    ({"num_train_timesteps": 100, "sampling_steps": 200}, "model.sampling_steps"),  # failed after training
    ({"block_channels": (0, 16)}, "model.block_channels"),  # failed at the first step
    ({"block_channels": (), "attention": ()}, "model.block_channels"),
])
def test_bad_configurations_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        _tiny(**overrides)
    assert err.value.field == field


def test_fedgen_fit_trains_a_tiny_ddpm_end_to_end(real_data_root, tmp_path) -> None:
    import json

    from fedgen.cli import fit

    run = tmp_path / "run"
    metrics = fit(_tiny_cli(real_data_root, 4, "--model.init_args.max_physical_examples=20", f"--run_dir={run}",
                            "--fid_samples=4", "--model.init_args.label_check_steps=[100, 600]", fixed_noise=False))
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["generator"] == "DPDiffusion" and 0 <= saved["test_accuracy"] <= 1
    # the label check ran on the 20 saved samples (the grid's samples are not counted)
    check = saved["sampling"]
    assert check["label_check_steps"] == [100, 600] and check["images"] == 20
    assert check["redraws"] >= check["failed_first_draw"] >= check["kept_failing"] >= 0
    assert saved["public_data"] is None
    assert saved["fid"]["value"] > 0 and saved["fid"]["synthetic_images"] == saved["fid"]["real_images"] == 4
    # four planned steps at q = 30 / 300, calibrated to the target epsilon = 10
    events = saved["privacy_ledger"]["events"]
    assert [(e["count"], e["sample_rate"]) for e in events] == [(4, 0.1)]
    assert 9.0 < metrics["epsilon"] <= 10.0
    assert (run / "samples.png").exists() and (run / "generator.ckpt").exists()


def _tiny_cli(root, steps: int, *extra: str, fixed_noise: bool = True) -> list[str]:
    """A tiny DDPM run through ``fedgen fit`` at the example's target epsilon, 10: with the noise multiplier 1.5
    given (the budget then only stops training), or calibrated to the target."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "mnist_dp_diffusion.yaml"
    return ["--config", str(example), f"--data.init_args.root={root}",
            "--data.init_args.train_subset=300", "--data.init_args.test_subset=50",
            "--model.init_args.block_channels=[8, 16]", "--model.init_args.attention=[false, false]",
            "--model.init_args.norm_groups=4", "--model.init_args.batch_size=30",
            "--model.init_args.noise_draws=2", "--model.init_args.sampling_steps=2",
            *(["--model.init_args.mechanism.init_args.noise_multiplier=1.5"] if fixed_noise else []),
            "--model.init_args.mechanism.init_args.delta=1e-3", f"--trainer.max_steps={steps}",
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--num_synthetic=20",
            "--evaluation.classifier=mlp", "--evaluation.epochs=1", "--evaluation.progress_bar=false",
            "--model.init_args.central_images=null", *extra]  # the example's warm-up: its own tests set it


def _tiny_federated_cli(root, run_dir, *extra: str) -> list[str]:
    """:func:`_tiny_cli` for one step of the federated DP diffusion example, with three clients."""
    from pathlib import Path

    args = _tiny_cli(root, 1, f"--run_dir={run_dir}", "--federation.init_args.num_clients=3", *extra)
    args[1] = str(Path(__file__).resolve().parents[2] / "examples" / "federated_mnist_dp_diffusion.yaml")
    return args


def test_a_cosine_learning_rate_falls_to_zero_over_the_planned_steps(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit

    for schedule, final in (("constant", 1e-3), ("cosine", 0.0)):
        run = tmp_path / schedule
        fit(_tiny_cli(real_data_root, 3, f"--run_dir={run}", f"--model.init_args.lr_schedule={schedule}"))
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert state["global_step"] == 3
        assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(final, abs=1e-12)


def test_a_micro_batch_too_large_for_memory_names_the_setting_to_lower(real_data_root, tmp_path,
                                                                     monkeypatch) -> None:
    from fedgen.cli import fit

    def out_of_memory(self, images, labels, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(DPDiffusion, "diffusion_loss", out_of_memory)  # at the first step: the estimate passed
    monkeypatch.setattr(DPDiffusion, "activation_bytes_per_example", lambda self: 1)
    with pytest.raises(ConfigError, match="max_physical_examples to [0-9]+ or lower") as err:
        fit(_tiny_cli(real_data_root, 2, f"--run_dir={tmp_path / 'run'}"))
    assert err.value.field == "model.max_physical_examples"
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)


def test_a_micro_batch_whose_activations_exceed_the_memory_is_refused_before_any_release(
        real_data_root, tmp_path, monkeypatch) -> None:
    """On the CPU the operating system would end the run at its first step without a word; the check names the
    setting and a value that fits, before the run folder exists."""
    from fedgen.cli import fit
    from fedgen.errors import machine_memory

    memory = machine_memory()
    monkeypatch.setattr(DPDiffusion, "activation_bytes_per_example", lambda self: memory // 3)
    with pytest.raises(ConfigError, match=r"micro-batch of 30 examples x 2 noise draws .* more than this "
                                          r"machine's .*max_physical_examples to 1 or lower") as err:
        fit(_tiny_cli(real_data_root, 1, f"--run_dir={tmp_path / 'run'}"))
    assert err.value.field == "model.max_physical_examples"
    assert not (tmp_path / "run").exists()
    fit(_tiny_cli(real_data_root, 1, f"--run_dir={tmp_path / 'run'}", "--model.init_args.max_physical_examples=1"))


_MEASURE_MICRO_BATCH = """
import resource, sys, torch, yaml
from fedgen.generators import DPDiffusion
from fedgen.mechanisms import DPSGD
settings = yaml.safe_load(open(sys.argv[1]))["model"]["init_args"]
for name in ("mechanism", "central_images", "merf_images"):
    settings.pop(name)
model = DPDiffusion(mechanism=DPSGD(noise_multiplier=1.0), **settings).train()
n = int(sys.argv[2])
images, labels = torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))
resident = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
model.diffusion_loss(images, labels).backward()
measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - resident
print(n * model.activation_bytes_per_example(), measured)  # the estimate after the measurement, which it cannot move
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident memory from /proc")
def test_the_activation_estimate_is_a_lower_bound_of_a_micro_batchs_memory() -> None:
    """A fresh process grows by at least the estimate over a forward and backward pass of 64 examples of the
    epsilon-1 example's UNet (8 noise draws each), and by less than twice it, so the estimate refuses no setting
    that fits and misses little (on a 2-core CPU: 809 MB estimated, 1,127 MB measured)."""
    import subprocess
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "mnist_dp_diffusion_eps1.yaml"
    estimate, measured = map(int, subprocess.run([sys.executable, "-c", _MEASURE_MICRO_BATCH, str(example), "64"],
                                                 check=True, capture_output=True, text=True).stdout.split()[-2:])
    assert estimate <= measured < 2 * estimate


def test_measuring_the_activations_leaves_the_random_state_alone() -> None:
    model = _tiny()
    torch.manual_seed(0)
    model.activation_bytes_per_example()
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_a_resumed_run_continues_the_same_ledger(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit

    run = tmp_path / "run"
    fit(_tiny_cli(real_data_root, 2, f"--run_dir={run}"))
    (run / "metrics.json").unlink()  # as if the run had stopped after its second step
    resumed = fit(_tiny_cli(real_data_root, 5, f"--run_dir={run}", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    events = resumed["privacy_ledger"]["events"]
    assert [(e["count"], e["noise_multiplier"], e["sample_rate"]) for e in events] == [(5, 1.5, 0.1)]
    expected = compute_epsilon([SubsampledGaussianEvent(1.5, 0.1, count=5)], delta=1e-3, accountant="auto")
    assert resumed["epsilon"] == pytest.approx(expected)


def test_a_run_resumed_from_an_epoch_s_checkpoint_trains_the_weights_of_the_uninterrupted_run(
        real_data_root, tmp_path) -> None:
    """The checkpoint carries the global random state too (the diffusion steps and noise, label dropout), beside
    the sampler's and the privacy noise's: a run stopped after its first epoch and resumed ends where the run
    that never stopped ends, bit for bit on the CPU."""
    from fedgen.cli import fit

    def epochs(n: int) -> list[str]:
        return ["--trainer.max_steps=-1", f"--trainer.max_epochs={n}"]

    fit(_tiny_cli(real_data_root, 1, f"--run_dir={tmp_path / 'whole'}", *epochs(2)))
    run = tmp_path / "stopped"
    fit(_tiny_cli(real_data_root, 1, f"--run_dir={run}", *epochs(1)))
    (run / "metrics.json").unlink()  # as if the run had stopped after its first epoch
    fit(_tiny_cli(real_data_root, 1, f"--run_dir={run}", *epochs(2),
                  f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    whole, resumed = (torch.load(path / "generator.ckpt", map_location="cpu", weights_only=False)["state_dict"]
                      for path in (tmp_path / "whole", run))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_a_run_resumed_with_a_raised_budget_can_still_be_sampled(real_data_root, tmp_path) -> None:
    """Sampling reads what a run spent; only a resume checks the config's budget against it. The run folder's
    first config.yaml keeps the first budget, below what the resumed run spent."""
    from fedgen.cli import fit
    from fedgen.cli_sample import sample

    run, mechanism = tmp_path / "run", "--model.init_args.mechanism.init_args"
    sigma = f"{mechanism}.noise_multiplier=1.0"  # 2 steps at q = 0.1 spend 0.86, 12 steps 1.71 (delta 1e-3)
    first = fit(_tiny_cli(real_data_root, 2, f"--run_dir={run}", sigma, f"{mechanism}.target_epsilon=1.0"))
    (run / "metrics.json").unlink()
    resumed = fit(_tiny_cli(real_data_root, 12, f"--run_dir={run}", sigma, f"{mechanism}.target_epsilon=3.0",
                            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    assert first["epsilon"] <= 1.0 < resumed["epsilon"] <= 3.0
    drawn = sample([f"--run={run}", "--num=10", f"--out={tmp_path / 'more.pt'}", "--accelerator=cpu"])
    assert drawn["epsilon"] == pytest.approx(resumed["epsilon"])


def test_a_run_stopped_part_way_resumes_from_its_last_epoch(real_data_root, tmp_path, monkeypatch) -> None:
    """300 examples at batch 30: 10 steps an epoch. A run of 2 epochs dies at step 15; its checkpoint holds the
    first epoch (10 steps in the ledger), and the resumed run ends with the 20 planned steps charged once. The
    resumed run's Poisson batches are those the first run drew after its checkpoint, not its first ones again."""
    from fedgen.cli import fit

    run = tmp_path / "run"
    train = DPDiffusion.training_step
    seen: dict[str, dict[int, tuple]] = {"first": {}, "resumed": {}}

    def recording(segment):
        def step(self, batch, batch_idx):
            seen[segment][self.global_step] = (len(batch[0]), float(batch[0].double().sum()))
            if segment == "first" and self.global_step == 15:
                raise RuntimeError("the machine went away")
            return train(self, batch, batch_idx)
        return step

    dies_at_step_15 = recording("first")

    monkeypatch.setattr(DPDiffusion, "training_step", dies_at_step_15)
    args = [a for a in _tiny_cli(real_data_root, 1, f"--run_dir={run}") if not a.startswith("--trainer.max_steps")]
    with pytest.raises(RuntimeError, match="went away"):
        fit([*args, "--trainer.max_epochs=2"])
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 10
    monkeypatch.setattr(DPDiffusion, "training_step", recording("resumed"))
    resumed = fit([*args, "--trainer.max_epochs=2", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    events = resumed["privacy_ledger"]["events"]
    assert [(e["count"], e["noise_multiplier"], e["sample_rate"]) for e in events] == [(20, 1.5, 0.1)]
    assert sorted(seen["resumed"]) == list(range(10, 20))
    assert [seen["resumed"][t] for t in range(10, 16)] == [seen["first"][t] for t in range(10, 16)]
    assert [seen["resumed"][t] for t in range(10, 15)] != [seen["first"][t] for t in range(0, 5)]


def test_public_pretraining_changes_the_weights_and_spends_no_privacy() -> None:
    model = _tiny()
    before = [p.detach().clone() for p in model.unet.parameters()]
    model.pretrain_on_public(_data(30), steps=3)
    assert any(not torch.equal(p, b) for p, b in zip(model.unet.parameters(), before, strict=True))
    assert model.mechanism.steps_taken == 0 and len(model.mechanism.ledger.events) == 0
    assert all(p.grad is None for p in model.unet.parameters())
    with pytest.raises(ConfigError, match="shape"):
        model.pretrain_on_public(TensorDataset(torch.rand(4, 1, 6, 6), torch.zeros(4, dtype=torch.long)), steps=1)
    model.mechanism.make_private(model.unet, torch.optim.SGD(model.unet.parameters(), lr=0.1),
                                 data_loader=model.attach_private_data(_data()), steps=3)
    with pytest.raises(RuntimeError, match="before private training"):
        model.pretrain_on_public(_data(30), steps=1)


def test_procedural_pretraining_changes_the_weights_and_spends_no_privacy() -> None:
    model = _tiny(procedural_pretraining=ProceduralPretraining(steps=3, images=40, batch_size=8))
    before = [p.detach().clone() for p in model.unet.parameters()]
    report = model.pretrain_on_procedural_images()
    assert any(not torch.equal(p, b) for p, b in zip(model.unet.parameters(), before, strict=True))
    assert model.mechanism.steps_taken == 0 and len(model.mechanism.ledger.events) == 0
    assert all(p.grad is None for p in model.unet.parameters())
    assert (report["steps"], report["images"], report["batch_size"]) == (3, 40, 8) and "no privacy" in report["data"]
    assert int(model.ema.n_averaged) == 0  # the EMA restarts from the pretrained weights
    with pytest.raises(ConfigError, match="procedural_pretraining"):
        _tiny().pretrain_on_procedural_images()
    with pytest.raises(ConfigError, match="procedural_pretraining.steps"):
        _tiny(procedural_pretraining=ProceduralPretraining(steps=0))
    with pytest.raises(ConfigError, match="procedural_pretraining.kind"):
        _tiny(procedural_pretraining=ProceduralPretraining(kind="fractals"))
    with pytest.raises(ConfigError, match="procedural_pretraining.seed"):  # a traceback when painting, before
        _tiny(procedural_pretraining=ProceduralPretraining(seed=2**70))
    model.mechanism.make_private(model.unet, torch.optim.SGD(model.unet.parameters(), lr=0.1),
                                 data_loader=model.attach_private_data(_data()), steps=3)
    with pytest.raises(RuntimeError, match="before private training"):
        model.pretrain_on_procedural_images()


def test_fit_pretrains_on_procedural_images_once_and_records_it(real_data_root, tmp_path, monkeypatch) -> None:
    """The pretraining runs before DP-SGD, is named in metrics.json, leaves the ledger to DP-SGD alone, and a resumed
    run does not pretrain again."""
    from fedgen.cli import fit

    run = tmp_path / "run"
    painted = '--model.init_args.procedural_pretraining={"steps": 2, "images": 40, "batch_size": 8}'
    calls = []
    pretrain = DPDiffusion.pretrain_on_procedural_images

    def counted(self):
        calls.append(self.mechanism.steps_taken)
        return pretrain(self)

    monkeypatch.setattr(DPDiffusion, "pretrain_on_procedural_images", counted)
    metrics = fit(_tiny_cli(real_data_root, 2, f"--run_dir={run}", painted))
    assert calls == [0]
    assert (metrics["procedural_pretraining"]["steps"], metrics["procedural_pretraining"]["images"]) == (2, 40)
    events = metrics["privacy_ledger"]["events"]
    assert [(e["count"], e["noise_multiplier"], e["sample_rate"]) for e in events] == [(2, 1.5, 0.1)]
    (run / "metrics.json").unlink()  # as if the run had stopped after its second step
    resumed = fit(_tiny_cli(real_data_root, 3, f"--run_dir={run}", painted,
                            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    assert calls == [0] and resumed["procedural_pretraining"]["trained"] == "by the run's first segment"
    assert [e["count"] for e in resumed["privacy_ledger"]["events"]] == [3]
    # resuming with other settings, or none, is refused: the report would not describe the weights
    (run / "metrics.json").unlink()
    last = run / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()
    for other in (painted.replace('"steps": 2', '"steps": 5'), "--model.init_args.procedural_pretraining=null"):
        with pytest.raises(ConfigError, match="procedural_pretraining"):
            fit(_tiny_cli(real_data_root, 4, f"--run_dir={run}", other, f"--ckpt_path={last}"))
        assert last.read_bytes() == saved  # nothing saved is lost


def test_fit_names_the_public_dataset_in_the_run_folder_and_metrics(real_data_root, tmp_path, monkeypatch) -> None:
    import json

    from fedgen.cli import fit

    monkeypatch.chdir(tmp_path)
    public = ["--public_data=fedgen.data.FashionMNISTDataModule", f"--public_data.root={real_data_root}",
              "--public_data.train_subset=100", "--public_steps=2"]
    metrics = fit(_tiny_cli(real_data_root, 1, *public))
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("dpdiffusion-mnist-pretrained_on_public_fashionmnist-")
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["public_data"] == metrics["public_data"]
    assert (saved["public_data"]["dataset"], saved["public_data"]["examples"], saved["public_data"]["steps"]) == (
        "fashionmnist", 100, 2)
    assert "outside the privacy guarantee" in saved["public_data"]["privacy"]
    (run / "metrics.json").unlink()  # resumed without the public data, the run would no longer record it
    with pytest.raises(ConfigError, match="public_data"):
        fit(_tiny_cli(real_data_root, 2, f"--run_dir={run}", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    assert not list(run.glob("config-resumed-*.yaml"))


def test_the_private_dataset_cannot_be_declared_public(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit

    run = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        fit(_tiny_cli(real_data_root, 1, f"--run_dir={run}", "--public_data=fedgen.data.MNISTDataModule",
                      f"--public_data.root={real_data_root}"))
    assert err.value.field == "public_data" and not run.exists()


def test_public_data_that_cannot_be_used_is_refused_before_the_run_folder(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit
    from fedgen.errors import DataNotFoundError

    run = tmp_path / "run"
    with pytest.raises(DataNotFoundError, match="public_data.root"):  # no CIFAR-10 here
        fit(_tiny_cli(real_data_root, 1, f"--run_dir={run}", "--public_data=fedgen.data.CIFAR10DataModule",
                      f"--public_data.root={real_data_root}"))
    assert not run.exists()


def test_warm_ups_that_leave_a_fixed_noise_no_step_are_refused_by_their_path_in_fit(real_data_root, tmp_path) -> None:
    """In fedgen fit the refusal names the field as its config does (model.mechanism...), before any release."""
    from fedgen.cli import fit

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="leaves DP-SGD no step after central_images") as err:
        fit(_tiny_cli(real_data_root, 1, f"--run_dir={run}",
                      "--model.init_args.mechanism.init_args.noise_multiplier=0.3",
                      "--model.init_args.central_images={epsilon: 9.9, releases: 2, sample_rate: 0.5, steps: 1}"))
    assert err.value.field == "model.mechanism.noise_multiplier" and not run.exists()


@pytest.mark.parametrize("public", ["QMNIST", "EMNIST"])
def test_a_dataset_cut_from_the_private_images_cannot_be_declared_public(real_data_root, tmp_path, public) -> None:
    """QMNIST rebuilds MNIST's digits; EMNIST comes from the NIST forms MNIST was drawn from."""
    from fedgen.cli import fit

    run = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        fit(_tiny_cli(real_data_root, 1, f"--run_dir={run}", "--public_data=fedgen.data.VisionDataModule",
                      f"--public_data.dataset={public}", f"--public_data.root={real_data_root}"))
    assert err.value.field == "public_data" and "same images as the private mnist" in err.value.problem
    assert not run.exists()


def test_bf16_mixed_precision_trains_with_the_engine_in_float32(real_data_root, tmp_path, monkeypatch) -> None:
    """trainer.precision=bf16-mixed (autocast around each step): the UNet runs in bfloat16 while the clipping
    engine's norms and sums see exact float32 copies with autocast off; the ledger is unchanged."""
    from fedgen.cli import fit
    from fedgen.mechanisms import per_example

    seen = []
    real_norms, real_sum = per_example.BOOK_KEEPING[nn.Conv2d]

    real_formed = per_example.PER_EXAMPLE_WEIGHT[nn.Conv2d]

    def spy_sum(layer, a, g):
        seen.append((a.dtype, g.dtype, torch.is_autocast_enabled("cpu")))
        return real_sum(layer, a, g)

    def spy_formed(layer, a, g, batch):  # the convolutions whose per-example gradients are formed
        seen.append((a.dtype, g.dtype, torch.is_autocast_enabled("cpu")))
        return real_formed(layer, a, g, batch)

    recorded = set()

    def spy_convert(t):
        recorded.add(t.dtype)
        return per_example_convert(t)

    per_example_convert = per_example.exact_float32
    monkeypatch.setitem(per_example.BOOK_KEEPING, nn.Conv2d, (real_norms, spy_sum))
    monkeypatch.setitem(per_example.PER_EXAMPLE_WEIGHT, nn.Conv2d, spy_formed)
    monkeypatch.setattr(per_example, "exact_float32", spy_convert)
    metrics = fit(_tiny_cli(real_data_root, 2, f"--run_dir={tmp_path / 'run'}", "--trainer.precision=bf16-mixed"))
    assert torch.bfloat16 in recorded  # the layers really ran in bfloat16
    assert seen and set(seen) == {(torch.float32, torch.float32, False)}
    events = metrics["privacy_ledger"]["events"]
    assert [(e["count"], e["sample_rate"], e["noise_multiplier"]) for e in events] == [(2, 0.1, 1.5)]


def test_fedgen_fit_trains_a_tiny_ddpm_whose_steps_the_clients_compute(real_data_root, tmp_path) -> None:
    """FederatedDPSGD: three clients (Dirichlet split) compute each step's clipped sum of their own examples and
    meet in secure aggregation; the ledger records exactly the central run's steps."""
    import json

    from fedgen.cli import fit

    from pathlib import Path

    run = tmp_path / "run"
    args = _tiny_cli(real_data_root, 3, f"--run_dir={run}", "--federation.init_args.num_clients=3")
    args[1] = str(Path(__file__).resolve().parents[2] / "examples" / "federated_mnist_dp_diffusion.yaml")
    fit(args)
    saved = json.loads((run / "metrics.json").read_text())
    report = saved["federation"]
    assert sum(report["client_sizes"]) == 300 and len(report["client_sizes"]) == 3 and report["unit"] == "example"
    assert "DirichletPartitioner" in report["partitioner"]
    assert report["secure_aggregation"]["steps"] == 3  # every step went through secure aggregation
    assert 0 < report["secure_aggregation"]["max_quantization_error"] < 1e-5
    events = saved["privacy_ledger"]["events"]
    assert [(e["count"], e["sample_rate"], e["noise_multiplier"]) for e in events] == [(3, 0.1, 1.5)]


def test_a_resumed_federated_run_keeps_counting_its_steps_and_time(real_data_root, tmp_path) -> None:
    """Resuming a FederatedDPSGD run: the secure-aggregation counters and the training time continue from the
    checkpoint (they count both segments), as the ledger does."""
    import json
    from pathlib import Path

    from fedgen.cli import fit

    example = str(Path(__file__).resolve().parents[2] / "examples" / "federated_mnist_dp_diffusion.yaml")
    first, second = tmp_path / "first", tmp_path / "second"
    args = _tiny_cli(real_data_root, 3, f"--run_dir={first}", "--federation.init_args.num_clients=3")
    args[1] = example
    fit(args)
    args = _tiny_cli(real_data_root, 6, f"--run_dir={second}", "--federation.init_args.num_clients=3",
                     f"--ckpt_path={first / 'checkpoints' / 'last.ckpt'}")
    args[1] = example
    fit(args)
    before, after = (json.loads((run / "metrics.json").read_text()) for run in (first, second))
    assert before["federation"]["secure_aggregation"]["steps"] == 3
    assert after["federation"]["secure_aggregation"]["steps"] == 6
    assert [e["count"] for e in after["privacy_ledger"]["events"]] == [6]
    assert after["federation"]["secure_aggregation"]["server_seconds"] > \
        before["federation"]["secure_aggregation"]["server_seconds"]
    assert after["generator_seconds"] > before["generator_seconds"] > 0


def test_cuda_graphs_are_refused_before_any_work_off_a_gpu_or_with_a_federation(real_data_root, tmp_path) -> None:
    """``cuda_graphs`` needs a CUDA device and a central step: ``fedgen fit`` refuses it on the CPU, and with a
    federation (one clipped sum per client), before it writes anything."""
    from pathlib import Path

    from fedgen.cli import fit

    graphs = "--model.init_args.cuda_graphs=true"
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device") as err:
        fit(_tiny_cli(real_data_root, 2, f"--run_dir={tmp_path / 'central'}", graphs))
    assert err.value.field == "model.cuda_graphs" and not (tmp_path / "central").exists()
    model = _tiny(cuda_graphs=True, max_physical_examples=5)
    model.clients = object()  # as a federation sets it
    with pytest.raises(ConfigError, match="one clipped sum per client") as err:
        model.check_training(torch.device("cuda"))
    assert err.value.field == "model.cuda_graphs"
    example = Path(__file__).resolve().parents[2] / "examples" / "federated_mnist_dp_diffusion.yaml"
    args = _tiny_cli(real_data_root, 2, f"--run_dir={tmp_path / 'federated'}", "--federation.init_args.num_clients=3",
                     graphs, "--trainer.accelerator=gpu" if torch.cuda.is_available() else "--trainer.accelerator=cpu")
    args[1] = str(example)
    with pytest.raises(ConfigError) as err:
        fit(args)
    assert err.value.field == "model.cuda_graphs" and not (tmp_path / "federated").exists()


def test_cuda_graphs_route_each_step_through_one_captured_pass_of_fixed_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring of ``cuda_graphs``, on the CPU: every step's Poisson sample goes through one ``CapturedBackward``
    of ``max_physical_examples`` examples and K draws (run eagerly here, ``graph=False``), built once; the
    steps are charged as without it."""
    from fedgen.generators import ddpm
    from fedgen.mechanisms import CapturedBackward

    built, calls = [], []

    class Eager(CapturedBackward):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, graph=False)
            built.append((self.size, self.draws))

        def __call__(self, *inputs):
            calls.append(len(inputs[0]))
            return super().__call__(*inputs)

    monkeypatch.setattr(ddpm, "CapturedBackward", Eager)
    model = _tiny(cuda_graphs=True, max_physical_examples=6)
    before = [p.detach().clone() for p in model.unet.parameters()]
    _fit(model, _data(), max_steps=3)
    assert built == [(6, 3)] and len(calls) == 3 and sum(calls) > 0
    assert model.mechanism.steps_taken == 3
    assert any(not torch.equal(p, q) for p, q in zip(model.unet.parameters(), before, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="replays CUDA graphs: needs a CUDA device")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fedgen_fit_trains_through_cuda_graphs_with_the_eager_runs_ledger(real_data_root, tmp_path,
                                                                          precision: str) -> None:
    """``cuda_graphs``: the steps' forward and clipped backward passes replayed from one captured micro-batch (the
    Poisson samples of about 30 examples padded to 40) train the generator, with the ledger of the eager run, in
    float32 and under bfloat16 autocast."""
    import json

    from fedgen.cli import fit

    saved = {}
    for graphs in ("false", "true"):
        run = tmp_path / graphs
        fit(_tiny_cli(real_data_root, 4, f"--run_dir={run}", "--trainer.accelerator=gpu",
                      f"--trainer.precision={precision}", "--model.init_args.max_physical_examples=40",
                      f"--model.init_args.cuda_graphs={graphs}"))
        saved[graphs] = json.loads((run / "metrics.json").read_text())
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert state["global_step"] == 4
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert saved["true"]["privacy_ledger"] == saved["false"]["privacy_ledger"]
    assert saved["true"]["epsilon"] == saved["false"]["epsilon"]


def test_federated_dp_sgd_refuses_a_one_release_generator_before_any_work(real_data_root, tmp_path) -> None:
    from pathlib import Path

    from fedgen.cli import fit

    example = Path(__file__).resolve().parents[2] / "examples" / "mnist_dp_merf.yaml"
    with pytest.raises(ConfigError) as err:
        fit(["--config", str(example), f"--data.init_args.root={real_data_root}", "--data.init_args.train_subset=300",
             "--model.init_args.mechanism.init_args.delta=1e-3", "--trainer.accelerator=cpu",
             "--federation=fedgen.federated.FederatedDPSGD", f"--run_dir={tmp_path / 'run'}"])
    assert err.value.field == "federation" and not (tmp_path / "run").exists()


def test_augment_flip_reaches_the_loss_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss mirrors the shifted K rows when asked, and leaves them alone otherwise."""
    import fedgen.generators.ddpm as ddpm

    seen = []
    real = ddpm.flip_randomly
    monkeypatch.setattr(ddpm, "flip_randomly", lambda x, f: (seen.append((x.clone(), f)), real(x, f))[-1])
    x, y = _data(5).tensors
    _tiny(noise_draws=3, augment_flip=True).diffusion_loss(x, y)
    _tiny(noise_draws=3).diffusion_loss(x, y)
    assert [f for _, f in seen] == [True, False]
    torch.testing.assert_close(seen[0][0], x.repeat_interleave(3, dim=0), atol=0, rtol=0)  # no shift asked


def test_augment_shift_reaches_the_loss_with_each_example_s_own_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """The K rows of example i are shifted copies of image i (one example changes only its own rows, so the
    privacy accounting is that of the K noise draws); without the option nothing is shifted."""
    import fedgen.generators.ddpm as ddpm

    seen = []
    real = ddpm.shift_randomly
    monkeypatch.setattr(ddpm, "shift_randomly", lambda x, s, **kw: (seen.append((x.clone(), s)), real(x, s, **kw))[-1])
    x, y = _data(5).tensors
    _tiny(noise_draws=3, augment_shift=2).diffusion_loss(x, y)
    _tiny(noise_draws=3).diffusion_loss(x, y)
    assert [s for _, s in seen] == [2, 0]
    torch.testing.assert_close(seen[0][0], x.repeat_interleave(3, dim=0), atol=0, rtol=0)


def test_augment_conditioning_tells_the_unet_each_row_s_view_and_samples_the_unaugmented_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Training: the UNet's class input is each row's label and the index of the view its image was made into
    (offset and mirror, as shift_randomly and flip_randomly drew them). Sampling and the label check: the
    unaugmented view. The view table starts at zero, so the UNet starts as the label-only one."""
    import fedgen.generators.ddpm as ddpm

    model = _tiny(noise_draws=3, label_dropout=0.0, **CONDITIONED_VIEWS)
    assert isinstance(model.unet.class_embedding, ddpm.LabelAndViewEmbedding)
    assert model.num_views == 9 * 2 and model.unaugmented_view == 4 * 2  # offset (0, 0) of 3 x 3, not mirrored
    plain = _tiny(noise_draws=3, label_dropout=0.0)
    x, y = _data(5).tensors
    t = torch.tensor([3, 500, 999, 10, 7])
    torch.testing.assert_close(model.unet(x, t, class_labels=model.conditioning(y)).sample,
                               plain.unet(x, t, class_labels=y).sample)  # same weights, zero view table

    drawn, inputs = [], []
    real_shift, real_flip = ddpm.shift_randomly, ddpm.flip_randomly
    monkeypatch.setattr(ddpm, "shift_randomly", lambda x, s, **kw: drawn.append(real_shift(x, s, **kw)) or drawn[-1])
    monkeypatch.setattr(ddpm, "flip_randomly", lambda x, f: drawn.append(real_flip(x, f)) or drawn[-1])
    forward = model.unet.forward
    monkeypatch.setattr(model.unet, "forward", lambda *a, class_labels: inputs.append(class_labels) or
                        forward(*a, class_labels=class_labels))
    model.diffusion_loss(x, y)
    (shifted, offsets), (views, mirrored) = drawn
    assert torch.equal(inputs[0], torch.stack([y.repeat_interleave(3), offsets * 2 + mirrored], dim=1))
    for image, offset, flipped, view in zip(x.repeat_interleave(3, dim=0), offsets.tolist(), mirrored.tolist(),
                                            views, strict=True):
        dy, dx = divmod(offset, 3)
        moved = torch.roll(image, (dy - 1, dx - 1), dims=(1, 2))  # the tiny images' border is not zero: compare
        want = moved.flip(-1) if flipped else moved               # the pixels away from it
        torch.testing.assert_close(view[:, 2:-2, 2:-2], want[:, 2:-2, 2:-2])
    assert len(set(inputs[0][:, 1].tolist())) > 3  # many views among 15 rows

    seen = []  # the EMA copy samples and checks labels: spy on its class embedding
    ema_embedding = model.ema.module.class_embedding
    embed = ema_embedding.forward
    monkeypatch.setattr(ema_embedding, "forward", lambda c: seen.append(c) or embed(c))
    model.sample(4, labels=torch.tensor([0, 1, 2, 0]))
    model.classify(torch.rand(2, 1, 8, 8, dtype=torch.float64), steps=[100])
    assert seen and all(bool((c[:, 1] == model.unaugmented_view).all()) for c in seen)


def test_fedgen_fit_trains_the_view_table_of_an_augment_conditioned_ddpm(real_data_root, tmp_path) -> None:
    """Through ``fedgen fit``: the view embedding moves from zero, and the run's generator draws images."""
    import json

    from fedgen.cli import fit
    from fedgen.cli_sample import load_fit_run

    run = tmp_path / "run"
    fit(_tiny_cli(real_data_root, 3, "--model.init_args.augment_conditioning=true", f"--run_dir={run}"))
    generator, _ = load_fit_run(run)
    assert generator.unet.class_embedding.views.weight.abs().sum() > 0
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] >= 0


def test_private_trainable_limits_dp_sgd_to_the_named_parameters() -> None:
    """DP-SGD moves only the parameters whose names contain a listed part; the others keep their values, and the
    noise is spread over the trained ones only (the ledger is the same as for the whole UNet)."""
    model = _tiny(private_trainable=["attentions", "norm"])
    before = {name: p.detach().clone() for name, p in model.unet.named_parameters()}
    _fit(model, _data(), max_steps=2)
    trained = {name for name in before if "attentions" in name or "norm" in name}
    assert trained and len(trained) < len(before)
    for name, parameter in model.unet.named_parameters():
        assert torch.equal(parameter, before[name]) != (name in trained), name
    whole = _tiny()
    _fit(whole, _data(), max_steps=2)
    assert model.mechanism.ledger.events == whole.mechanism.ledger.events


def test_private_trainable_is_checked_when_the_generator_is_built() -> None:
    with pytest.raises(ConfigError) as err:
        _tiny(private_trainable=["attentions", "no_such_layer"])
    assert err.value.field == "model.private_trainable" and "no_such_layer" in str(err.value)
    assert "conv_in" in err.value.fix  # it shows what the names look like
    with pytest.raises(ConfigError, match="an empty list"):
        _tiny(private_trainable=[])
    with pytest.raises(ConfigError, match="cuda_graphs"):
        _tiny(private_trainable=["norm"], cuda_graphs=True, max_physical_examples=10)


def test_a_run_resumes_only_with_the_private_trainable_it_started_with(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit

    run = tmp_path / "run"
    fit(_tiny_cli(real_data_root, 1, f"--run_dir={run}", "--model.init_args.private_trainable=[norm]"))
    (run / "metrics.json").unlink()  # as if the run had stopped after its first step
    resume = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    with pytest.raises(ConfigError) as err:
        fit(_tiny_cli(real_data_root, 2, f"--run_dir={run}", resume))
    assert err.value.field == "model.private_trainable" and "['norm']" in err.value.fix
    resumed = fit(_tiny_cli(real_data_root, 2, f"--run_dir={run}", resume, "--model.init_args.private_trainable=[norm]"))
    assert resumed["privacy_ledger"]["events"][0]["count"] == 2


def test_a_federation_refuses_private_trainable(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit

    with pytest.raises(ConfigError) as err:
        fit(_tiny_federated_cli(real_data_root, tmp_path / "run", "--model.init_args.private_trainable=[norm]"))
    assert err.value.field == "model.private_trainable" and "federation" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training
