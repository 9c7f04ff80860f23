"""Central images: the release's privacy accounting, its noise, and the warm-up through ``fedgen fit``."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset
from torchvision.transforms import v2

from fedgen.errors import ConfigError
from fedgen.generators import CentralImages, warm_up
from fedgen.generators.central_images import median_filter
from fedgen.generators.warm_up import rand_augment
from fedgen.mechanisms import DPSGD, SubsampledGaussianEvent


def _two_classes(n: int = 4000) -> TensorDataset:
    """Class 0: the left half of a 4 x 4 image lit at 0.5, class 1 the right half; n / 2 of each."""
    images = torch.zeros(n, 1, 4, 4)
    labels = torch.arange(n) % 2
    images[labels == 0, :, :, :2] = 0.5
    images[labels == 1, :, :, 2:] = 0.5
    return TensorDataset(images, labels)


def test_the_release_is_one_subsampled_gaussian_event_per_round_at_the_configured_epsilon() -> None:
    mechanism = DPSGD(target_epsilon=10.0, delta=1e-5, seed=0, accountant="rdp")
    central = CentralImages(epsilon=1.0, releases=5, sample_rate=0.2, clip_norm=2.0, steps=1)
    images, report = central.release(_two_classes(), num_classes=2, mechanism=mechanism)
    sigma = report["noise_multiplier"]
    assert mechanism.ledger.events == (SubsampledGaussianEvent(sigma, 0.2, 5),)
    assert 0.97 < mechanism.epsilon() <= 1.0 and report["epsilon"] == mechanism.epsilon()
    assert images.tensors[0].shape == (10, 1, 4, 4) and images.tensors[1].tolist() == [0, 1] * 5
    # each class's mean shape comes through the noise: sum of 400 images of norm 1.41, noise std sigma * C
    x = images.tensors[0].flatten(1)
    left, right = x.reshape(10, 4, 4)[:, :, :2].mean((1, 2)), x.reshape(10, 4, 4)[:, :, 2:].mean((1, 2))
    assert (left[0::2] > right[0::2]).all() and (right[1::2] > left[1::2]).all()


def test_the_noise_is_added_at_the_calibrated_scale() -> None:
    """Without clamping at the pixel range (dark images), the error of each central pixel around the class mean
    is the noise: std sigma C / (q N / K), plus the Poisson sampling's own spread."""
    n, q, clip = 20000, 0.5, 4.0
    data = TensorDataset(torch.full((n, 1, 8, 8), 0.5), torch.arange(n) % 2)
    mechanism = DPSGD(target_epsilon=10.0, delta=1e-5, seed=1, accountant="rdp")
    central = CentralImages(epsilon=0.5, releases=20, sample_rate=q, clip_norm=clip, steps=1)
    images, report = central.release(data, num_classes=2, mechanism=mechanism)
    expected = report["noise_multiplier"] * clip / (q * n / 2)
    spread = 0.5 * math.sqrt((1 - q) / (q * n / 2))  # the sampled count's relative spread, times the pixel
    error = images.tensors[0] - 0.5
    assert expected > 2 * spread  # the noise dominates, so the measured std tests it
    assert 0.85 < float(error.std()) / math.hypot(expected, spread) < 1.15


def test_two_mechanisms_with_the_same_seed_release_the_same_images_and_other_seeds_differ() -> None:
    central = CentralImages(epsilon=1.0, releases=2, sample_rate=0.2, clip_norm=2.0, steps=1)
    a, _ = central.release(_two_classes(), num_classes=2, mechanism=DPSGD(target_epsilon=10.0, seed=3, accountant="rdp"))
    b, _ = central.release(_two_classes(), num_classes=2, mechanism=DPSGD(target_epsilon=10.0, seed=3, accountant="rdp"))
    c, _ = central.release(_two_classes(), num_classes=2, mechanism=DPSGD(target_epsilon=10.0, seed=4, accountant="rdp"))
    assert torch.equal(a.tensors[0], b.tensors[0]) and not torch.equal(a.tensors[0], c.tensors[0])


def test_the_median_filter_removes_isolated_specks_and_keeps_wide_strokes() -> None:
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, :, 3:6] = 1.0  # a stroke three pixels wide
    image[0, 0, 1, 7] = 1.0  # a speck beside it
    filtered = median_filter(image, 3)
    assert filtered.shape == image.shape
    assert filtered[0, 0, 1, 7] == 0 and (filtered[0, 0, :, 4] == 1).all()
    assert torch.equal(filtered[0, 0, :, :7], image[0, 0, :, :7])
    assert torch.equal(median_filter(image, 1), image)


def test_filtered_central_images_are_post_processing_of_the_same_release() -> None:
    """The same seed releases the same noisy sums whether or not they are filtered: the ledger is the same, and
    the filtered images are the filter applied to the unfiltered ones."""
    settings = dict(epsilon=1.0, releases=2, sample_rate=0.2, clip_norm=2.0, steps=1)
    plain_mechanism = DPSGD(target_epsilon=10.0, seed=3, accountant="rdp")
    filtered_mechanism = DPSGD(target_epsilon=10.0, seed=3, accountant="rdp")
    plain, _ = CentralImages(**settings).release(_two_classes(), num_classes=2, mechanism=plain_mechanism)
    filtered, report = CentralImages(**settings, median_filter=3).release(_two_classes(), num_classes=2,
                                                                          mechanism=filtered_mechanism)
    assert filtered_mechanism.ledger.events == plain_mechanism.ledger.events
    assert torch.equal(filtered.tensors[0], median_filter(plain.tensors[0], 3))
    assert not torch.equal(filtered.tensors[0], plain.tensors[0])


def test_a_downsampled_release_is_the_release_of_the_pooled_images_upsampled() -> None:
    """``downsample`` f releases the f x f average-pooled images (one event, as at full size) and upsamples them
    bilinearly: post-processing of that release. Pooling a 8 x 8 image by 2 halves its L2 norm."""
    n = 4000
    images = torch.zeros(n, 1, 8, 8)
    labels = torch.arange(n) % 2
    images[labels == 0, :, :, :4] = 0.5
    images[labels == 1, :, :, 4:] = 0.5
    pooled = TensorDataset(torch.nn.functional.avg_pool2d(images, 2), labels)
    assert torch.allclose(pooled.tensors[0].flatten(1).norm(dim=1), images.flatten(1).norm(dim=1) / 2)
    settings = dict(epsilon=1.0, releases=3, sample_rate=0.2, clip_norm=1.0, steps=1)
    small_mechanism, mechanism = (DPSGD(target_epsilon=10.0, seed=3, accountant="rdp") for _ in range(2))
    small, _ = CentralImages(**settings).release(pooled, num_classes=2, mechanism=small_mechanism)
    released, report = CentralImages(**settings, downsample=2).release(TensorDataset(images, labels), num_classes=2,
                                                                       mechanism=mechanism)
    assert mechanism.ledger.events == small_mechanism.ledger.events and report["downsample"] == 2
    upsampled = torch.nn.functional.interpolate(small.tensors[0], size=(8, 8), mode="bilinear", align_corners=False)
    assert released.tensors[0].shape == (6, 1, 8, 8)
    assert torch.allclose(released.tensors[0], upsampled.clamp(0, 1))
    with pytest.raises(ConfigError) as err:
        CentralImages(downsample=3).check(DPSGD(target_epsilon=10.0), image_shape=(1, 8, 8))
    assert err.value.field == "model.central_images.downsample" and "8x8" in str(err.value)


def test_rand_augment_gives_each_image_its_own_view_in_the_pixel_range() -> None:
    """64 copies of one grey blob (8-bit values, so rounding alone changes nothing) come back as many views."""
    torch.manual_seed(0)
    y, x = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    blob = (0.8 * torch.exp(-(x - 14) ** 2 / 8 - (y - 14) ** 2 / 40) * 255).round() / 255
    images = blob.expand(64, 1, 28, 28).clone()
    views = rand_augment(images, num_ops=2, max_magnitude=3)
    assert views.shape == images.shape and views.dtype == images.dtype
    assert 0 <= float(views.min()) and float(views.max()) <= 1
    changed = (views != images).flatten(1).any(dim=1)
    assert 0.5 < float(changed.float().mean()) < 1  # most change; some draw identity or no-ops at a low magnitude
    assert len({tuple(v.flatten().tolist()) for v in views[changed]}) > 20
    assert CentralImages().augment(images) is images  # no augmentation unless asked
    torch.manual_seed(0)
    assert torch.equal(CentralImages(augment_ops=2, augment_magnitude=3).augment(images), views)


def test_rand_augment_runs_its_operations_on_one_thread_and_restores_the_pool(monkeypatch) -> None:
    """Tiny images gain nothing from the thread pool; the caller's thread count comes back, also after an error."""
    seen, fail = [], []

    class Recording(v2.RandAugment):
        def forward(self, *inputs):
            seen.append(torch.get_num_threads())
            if fail:
                raise RuntimeError("an operation failed")
            return super().forward(*inputs)

    monkeypatch.setattr(warm_up.v2, "RandAugment", Recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rand_augment(torch.rand(4, 1, 8, 8), num_ops=1, max_magnitude=2)
        assert seen == [1, 1, 1, 1] and torch.get_num_threads() == 2
        fail.append(True)
        with pytest.raises(RuntimeError, match="an operation failed"):
            rand_augment(torch.rand(4, 1, 8, 8), num_ops=1, max_magnitude=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("change,field", [
    ({"epsilon": 10.0}, "model.central_images.epsilon"),
    ({"epsilon": 0.0}, "model.central_images.epsilon"),
    ({"sample_rate": 0.0}, "model.central_images.sample_rate"),
    ({"clip_norm": -1.0}, "model.central_images.clip_norm"),
    ({"releases": 0}, "model.central_images.releases"),
    ({"steps": 0}, "model.central_images.steps"),
    ({"median_filter": 2}, "model.central_images.median_filter"),
    ({"median_filter": -3}, "model.central_images.median_filter"),
    ({"downsample": 0}, "model.central_images.downsample"),
    ({"batch_size": 0}, "model.central_images.batch_size"),
    ({"augment_ops": -1}, "model.central_images.augment_ops"),
    ({"augment_magnitude": 0}, "model.central_images.augment_magnitude"),
    ({"augment_magnitude": 31}, "model.central_images.augment_magnitude"),
])
def test_bad_settings_are_refused_before_anything_is_released(change: dict, field: str) -> None:
    mechanism = DPSGD(target_epsilon=10.0, seed=0, accountant="rdp")
    with pytest.raises(ConfigError) as err:
        CentralImages(**change).release(_two_classes(), num_classes=2, mechanism=mechanism)
    assert err.value.field == field and mechanism.ledger.events == ()


def test_refused_on_a_user_level_ledger_and_after_other_releases() -> None:
    with pytest.raises(ConfigError, match="user-level"):
        CentralImages().check(DPSGD(target_epsilon=10.0, unit="user"))
    mechanism = DPSGD(target_epsilon=10.0, seed=0, accountant="rdp")
    mechanism.ledger.record(SubsampledGaussianEvent(1.0, 0.01, 10))
    with pytest.raises(ConfigError, match="already records"):
        CentralImages().check(mechanism)


def test_a_federation_has_no_pooled_data_to_release_central_images_from(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit
    from tests.generators.test_ddpm import _tiny_federated_cli

    with pytest.raises(ConfigError) as err:
        fit(_tiny_federated_cli(real_data_root, tmp_path / "run", '--model.init_args.central_images={"epsilon": 1.0}'))
    assert err.value.field == "model.central_images"


def test_a_resumed_run_releases_nothing_again(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit
    from tests.generators.test_ddpm import _tiny_cli

    run = tmp_path / "run"
    central = '--model.init_args.central_images={"epsilon": 1.0, "releases": 3, "sample_rate": 0.5, "steps": 1}'
    rdp = "--model.init_args.mechanism.init_args.accountant=rdp"
    first = fit(_tiny_cli(real_data_root, 2, f"--run_dir={run}", central, rdp))
    (run / "metrics.json").unlink()  # as if the run had stopped after its second step
    resumed = fit(_tiny_cli(real_data_root, 4, f"--run_dir={run}", central, rdp,
                            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    released, steps = resumed["privacy_ledger"]["events"]
    assert released == first["privacy_ledger"]["events"][0] and released["count"] == 3
    assert (steps["count"], steps["noise_multiplier"]) == (4, 1.5)
    assert "first segment" in resumed["central_images"]["released"]


def test_a_run_started_without_central_images_cannot_resume_with_them(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit
    from tests.generators.test_ddpm import _tiny_cli

    run = tmp_path / "run"
    rdp = "--model.init_args.mechanism.init_args.accountant=rdp"
    fit(_tiny_cli(real_data_root, 1, f"--run_dir={run}", rdp))
    (run / "metrics.json").unlink()
    with pytest.raises(ConfigError) as err:
        fit(_tiny_cli(real_data_root, 2, f"--run_dir={run}", rdp, '--model.init_args.central_images={"epsilon": 1.0}',
                      f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    assert err.value.field == "model.central_images" and "started without them" in str(err.value)


def test_the_examples_warm_up_runs_as_configured(real_data_root, tmp_path) -> None:
    """The DP diffusion example warms up on central images; its settings pass the checks and run through
    ``fedgen fit`` (with fewer warm-up steps here), both releases on the ledger at the example's target."""
    import json
    from pathlib import Path

    import yaml

    from fedgen.cli import fit
    from tests.generators.test_ddpm import _tiny_cli

    example = Path(__file__).resolve().parents[2] / "examples" / "mnist_dp_diffusion.yaml"
    config = yaml.safe_load(example.read_text())["model"]["init_args"]
    central = dict(config["central_images"], steps=3)
    assert central["epsilon"] < config["mechanism"]["init_args"]["target_epsilon"]
    run = tmp_path / "run"
    metrics = fit(_tiny_cli(real_data_root, 2, f"--run_dir={run}", "--model.init_args.mechanism.init_args.accountant=rdp",
                            f"--model.init_args.central_images={json.dumps(central)}", fixed_noise=False))
    released, steps = metrics["privacy_ledger"]["events"]
    assert (released["count"], released["sample_rate"]) == (central["releases"], central["sample_rate"])
    assert steps["count"] == 2
    assert 9.0 < metrics["epsilon"] <= config["mechanism"]["init_args"]["target_epsilon"]
