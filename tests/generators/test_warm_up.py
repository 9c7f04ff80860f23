"""What every warm-up release does inside DPDiffusion: it trains the UNet on the released images before DP-SGD, on
the same ledger; with both set, central images come first and DP-Merf's samples second."""

from __future__ import annotations

import pytest
import torch

from fedgen.errors import ConfigError
from fedgen.generators import CentralImages, MerfImages
from fedgen.mechanisms import DPSGD
from tests.generators.test_ddpm import _data, _fit, _tiny

RELEASES = {
    "central_images": (CentralImages(epsilon=1.0, releases=2, sample_rate=0.5, clip_norm=8.0, steps=3), 6),
    "merf_images": (MerfImages(epsilon=1.0, images=30, steps=3, batch_size=8, num_features=500, length_scale=4.0,
                               epochs=1), 30),
}


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_the_warm_up_trains_on_the_released_images_then_dp_sgd_shares_the_ledger(name: str) -> None:
    release, images = RELEASES[name]
    mechanism = DPSGD(target_epsilon=10.0, delta=1e-3, seed=0, accountant="rdp")
    model = _tiny(mechanism=mechanism, **{name: release})
    before = [p.detach().clone() for p in model.unet.parameters()]
    report = model.warm_up(_data(200))[name]
    assert report["images"] == images and report["warm_up_steps"] == 3 and len(mechanism.ledger.events) == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, model.unet.parameters(), strict=True))
    assert int(model.ema.n_averaged) == 0  # the EMA restarts from the warmed-up weights
    assert all(torch.equal(e, p) for e, p in zip(model.ema.module.parameters(), model.unet.parameters(), strict=True))
    _fit(model, _data(200), max_steps=2)
    assert len(mechanism.ledger.events) == 2 and mechanism.epsilon() <= 10.0
    with pytest.raises(RuntimeError, match="before private training"):
        model.warm_up(_data(200))


def test_each_warm_up_step_trains_on_the_release_s_augmented_views(monkeypatch) -> None:
    """With ``augment_ops`` every step's batch of central images goes through RandAugment before the UNet sees it,
    ``batch_size`` images a step; without it the UNet trains on the released images themselves."""
    seen = []

    def spy(self, images):
        seen.append(images.clone())
        return images.flip(-1)

    for augment_ops in (0, 2):
        seen.clear()
        monkeypatch.setattr(CentralImages, "augment", spy if augment_ops else CentralImages.augment)
        release = CentralImages(epsilon=1.0, releases=4, sample_rate=0.5, clip_norm=8.0, steps=5, batch_size=4,
                                augment_ops=augment_ops)
        model = _tiny(mechanism=DPSGD(target_epsilon=10.0, delta=1e-3, seed=0, accountant="rdp"),
                      central_images=release)
        losses = []
        loss = model.diffusion_loss
        model.diffusion_loss = lambda images, labels: losses.append(images.clone()) or loss(images, labels)
        model.warm_up(_data(200))
        assert len(losses) == 5 and all(len(images) == 4 for images in losses)
        if augment_ops:
            assert len(seen) == 5 and all(torch.equal(x.flip(-1), y) for x, y in zip(seen, losses, strict=True))
        else:
            assert seen == []


def test_both_warm_ups_release_and_train_in_order_on_one_ledger() -> None:
    """Central images are released and trained on first, then DP-Merf's samples; DP-SGD follows on the same
    ledger, and a resumed run finds each release where it was made."""
    central, merf = RELEASES["central_images"][0], RELEASES["merf_images"][0]
    mechanism = DPSGD(target_epsilon=10.0, delta=1e-3, seed=0, accountant="rdp")
    model = _tiny(mechanism=mechanism, central_images=central, merf_images=merf)
    assert [release.name for release in model.warm_up_releases] == ["central_images", "merf_images"]
    trained = []
    train = model._train_without_noise

    def spy(dataset, steps, **kwargs):
        trained.append((len(dataset), steps, len(mechanism.ledger.events)))
        train(dataset, steps, **kwargs)

    model._train_without_noise = spy
    reports = model.warm_up(_data(200))
    assert trained == [(6, 3, 1), (30, 3, 2)]  # each release trained on right after it was made
    first, second = mechanism.ledger.events
    assert central.opens(first) and merf.opens(second) and not merf.opens(first)
    assert (first.noise_multiplier, second.noise_multiplier) == (reports["central_images"]["noise_multiplier"],
                                                                 reports["merf_images"]["noise_multiplier"])
    assert int(model.ema.n_averaged) == 0
    # each release spends its own share, as it would alone; the ledger composes the two for less than their sum
    alone = DPSGD(target_epsilon=10.0, delta=1e-3, seed=0, accountant="rdp")
    assert second.noise_multiplier == merf.release(_data(200), num_classes=3, mechanism=alone)[1]["noise_multiplier"]
    for release in (central, merf):
        assert 0.98 * release.epsilon < reports[release.name]["epsilon"] <= release.epsilon
    assert max(central.epsilon, merf.epsilon) < mechanism.epsilon() < central.epsilon + merf.epsilon
    _fit(model, _data(200), max_steps=2)
    assert len(mechanism.ledger.events) == 3 and mechanism.epsilon() <= 10.0
    for position, release in enumerate(model.warm_up_releases):
        release.check_resumed(mechanism.ledger, position)
    with pytest.raises(ConfigError, match="DP-Merf's single release"):
        merf.check_resumed(mechanism.ledger)  # it does not open the ledger


def test_warm_ups_that_leave_dp_sgd_nothing_are_refused_before_any_release() -> None:
    mechanism = DPSGD(target_epsilon=2.0, delta=1e-3, seed=0)
    for name in RELEASES:  # each alone leaves DP-SGD half of the budget
        _tiny(mechanism=mechanism, **{name: RELEASES[name][0]})
    with pytest.raises(ConfigError) as err:
        _tiny(mechanism=mechanism, central_images=RELEASES["central_images"][0],
              merf_images=RELEASES["merf_images"][0])
    assert err.value.field == "model.merf_images.epsilon" and "with central_images: 2" in str(err.value)
    assert not mechanism.ledger.events


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_the_planned_event_is_the_one_the_release_records(name: str) -> None:
    release = RELEASES[name][0]
    mechanism = DPSGD(target_epsilon=10.0, delta=1e-3, seed=0, accountant="rdp")
    planned = release.planned_event(mechanism)
    release.release(_data(200), num_classes=3, mechanism=mechanism)
    assert list(mechanism.ledger.events) == [planned]


def test_a_fixed_noise_the_warm_ups_leave_no_step_is_refused_before_any_release() -> None:
    """At a configured noise_multiplier, DP-SGD's budget after the warm-ups can hold no step: refused by the
    pre-release check (where a calibrated noise always fits what is left)."""
    central = RELEASES["central_images"][0]  # epsilon 1 of the 2
    for sigma, refused in ((0.3, True), (20.0, False)):
        mechanism = DPSGD(target_epsilon=2.0, noise_multiplier=sigma, delta=1e-3, seed=0, accountant="rdp")
        model = _tiny(mechanism=mechanism, central_images=central)
        model.attach_private_data(_data(200))
        if refused:
            with pytest.raises(ConfigError, match="leaves DP-SGD no step after central_images") as err:
                model.check_training(torch.device("cpu"))
            assert err.value.field == "mechanism.noise_multiplier"
        else:
            model.check_training(torch.device("cpu"))
        assert not mechanism.ledger.events  # nothing released either way
    calibrated = DPSGD(target_epsilon=2.0, delta=1e-3, seed=0, accountant="rdp")
    model = _tiny(mechanism=calibrated, central_images=central)
    model.attach_private_data(_data(200))
    model.check_training(torch.device("cpu"))


def test_a_chain_the_ledger_would_merge_into_one_event_is_refused() -> None:
    """One central-image round of the whole data and DP-Merf's release at the same epsilon have the same noise
    multiplier and rate; the ledger would record them as one event that neither release opens."""
    with pytest.raises(ConfigError) as err:
        _tiny(mechanism=DPSGD(target_epsilon=10.0, delta=1e-3, seed=0),
              central_images=CentralImages(epsilon=1.0, releases=1, sample_rate=1.0, steps=3),
              merf_images=RELEASES["merf_images"][0])
    assert err.value.field == "model.central_images" and "merge" in str(err.value)


def test_a_later_warm_up_refuses_a_ledger_that_holds_more_than_the_earlier_ones() -> None:
    central, merf = RELEASES["central_images"][0], RELEASES["merf_images"][0]
    mechanism = DPSGD(target_epsilon=10.0, delta=1e-3, seed=0, accountant="rdp")
    merf.release(_data(200), num_classes=3, mechanism=mechanism)  # not the central images it should follow
    with pytest.raises(ConfigError, match="already records"):
        merf.check(mechanism, earlier=(central,))
    with pytest.raises(ConfigError, match="already records"):
        central.check(mechanism)


@pytest.mark.parametrize(("name", "settings", "first"), [
    ("central_images", {"epsilon": 2.0, "releases": 3, "sample_rate": 0.5, "clip_norm": 10.0, "steps": 2}, (3, 0.5)),
    ("merf_images", {"epsilon": 2.0, "images": 60, "steps": 2, "num_features": 200, "epochs": 1}, (1, 1.0)),
])
def test_fedgen_fit_warms_up_and_calibrates_dp_sgd_for_the_rest(real_data_root, tmp_path, name: str, settings: dict,
                                                                first: tuple[int, float]) -> None:
    """The warm-up's release and the DP-SGD steps sit in one ledger: DP-SGD's noise is calibrated so that both
    together spend the target epsilon; the metrics report the release under the warm-up's name."""
    import json

    from fedgen.cli import fit
    from tests.generators.test_ddpm import _tiny_cli

    run = tmp_path / "run"
    metrics = fit(_tiny_cli(real_data_root, 4, f"--run_dir={run}", f"--model.init_args.{name}={json.dumps(settings)}",
                            "--model.init_args.mechanism.init_args.accountant=rdp", fixed_noise=False))
    saved = json.loads((run / "metrics.json").read_text())
    report = saved[name]
    assert [key for key in RELEASES if saved[key] is not None] == [name]
    assert report["warm_up_steps"] == 2 and 1.9 < report["epsilon"] <= 2.0
    assert report["images"] == (30 if name == "central_images" else 60)
    released, steps = saved["privacy_ledger"]["events"]
    assert (released["count"], released["sample_rate"], released["noise_multiplier"]) == (*first,
                                                                                         report["noise_multiplier"])
    assert (steps["count"], steps["sample_rate"]) == (4, 0.1)
    assert 9.0 < metrics["epsilon"] <= 10.0  # both together, at the target


def test_fedgen_fit_runs_both_warm_ups_and_a_resume_releases_neither_again(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit
    from tests.generators.test_ddpm import _tiny_cli

    run = tmp_path / "run"
    warm_ups = ('--model.init_args.central_images={"epsilon": 1.0, "releases": 3, "sample_rate": 0.5, "steps": 2, '
                '"downsample": 2, "clip_norm": 5.0, "batch_size": 8, "augment_ops": 2}',
                '--model.init_args.merf_images={"epsilon": 1.0, "images": 60, "steps": 1, "num_features": 200, '
                '"epochs": 1}', "--model.init_args.mechanism.init_args.accountant=rdp")
    first = fit(_tiny_cli(real_data_root, 2, f"--run_dir={run}", *warm_ups, fixed_noise=False))
    central, merf, steps = first["privacy_ledger"]["events"]
    assert (central["count"], central["sample_rate"], merf["count"], merf["sample_rate"]) == (3, 0.5, 1, 1.0)
    assert first["central_images"]["images"] == 30 and first["merf_images"]["images"] == 60
    assert (first["central_images"]["downsample"], first["central_images"]["augment_ops"]) == (2, 2)
    assert 9.0 < first["epsilon"] <= 10.0  # DP-SGD calibrated for what both warm-ups left
    (run / "metrics.json").unlink()  # as if the run had stopped after its second step
    resume = f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    resumed = fit(_tiny_cli(real_data_root, 4, f"--run_dir={run}", *warm_ups, resume, fixed_noise=False))
    assert resumed["privacy_ledger"]["events"][:2] == [central, merf]
    assert all("first segment" in resumed[name]["released"] for name in ("central_images", "merf_images"))
    (run / "metrics.json").unlink()
    with pytest.raises(ConfigError) as err:  # the run warmed up on both: resuming with one of them is refused
        fit(_tiny_cli(real_data_root, 5, f"--run_dir={run}", warm_ups[1], warm_ups[2], resume, fixed_noise=False))
    assert err.value.field == "model.merf_images"
    other_epsilon = warm_ups[0].replace('"epsilon": 1.0', '"epsilon": 3.0')  # same releases: only the settings differ
    with pytest.raises(ConfigError) as err:
        fit(_tiny_cli(real_data_root, 5, f"--run_dir={run}", other_epsilon, *warm_ups[1:], resume, fixed_noise=False))
    assert err.value.field == "model.central_images"


@pytest.mark.parametrize(("extra", "field"), [("--trainer.precision=bf16-true", "trainer.precision"),
                                              ("--trainer.max_steps=0", "trainer.max_steps")])
def test_trainer_settings_dp_sgd_cannot_take_are_refused_before_the_warm_up_releases(real_data_root, tmp_path,
                                                                                      monkeypatch, extra, field):
    """The warm-ups release before trainer.fit: a refusal that waited for DP-SGD would come after their spending."""
    from fedgen.cli import fit
    from fedgen.mechanisms import GaussianMechanism
    from tests.generators.test_ddpm import _tiny_cli

    monkeypatch.setattr(GaussianMechanism, "charge", lambda *a: pytest.fail("a warm-up released before the check"))
    warm_up = '--model.init_args.central_images={"epsilon": 1.0, "releases": 1, "sample_rate": 0.5, "steps": 2}'
    with pytest.raises(ConfigError) as err:
        fit(_tiny_cli(real_data_root, 2, f"--run_dir={tmp_path / 'run'}", warm_up, extra, fixed_noise=False))
    assert err.value.field == field and not (tmp_path / "run").exists()


def test_steps_before_dp_sgd_log_their_progress(caplog) -> None:
    """The warm-up's steps run before Lightning's loop, which shows no progress for them: a log line names what runs,
    with the step and the loss, at most every ``log_every_seconds`` (every step at 0), and none after the last."""
    model = _tiny(mechanism=DPSGD(target_epsilon=10.0, delta=1e-3, seed=0, accountant="rdp"))
    with caplog.at_level("INFO", logger="fedgen"):
        model._train_without_noise(_data(20), 4, labelled=True, batch_size=5, what="warm-up on the test images",
                                   log_every_seconds=0.0)
    lines = [r.getMessage() for r in caplog.records if "warm-up on the test images" in r.getMessage()]
    assert [line.split(", ")[1] for line in lines] == ["step 1/4", "step 2/4", "step 3/4"]
    assert all(float(line.split("loss ")[1].split(",")[0]) > 0 for line in lines)
    caplog.clear()
    with caplog.at_level("INFO", logger="fedgen"):
        model._train_without_noise(_data(20), 4, labelled=True, batch_size=5, what="quiet")
    assert not any("quiet" in r.getMessage() for r in caplog.records)  # 4 steps take well under 30 s
