"""Merf images: DP-Merf's release on the generator's ledger, what its samples learn, and the warm-up through
``fedgen fit``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from fedgen.errors import ConfigError
from fedgen.generators import CentralImages, MerfImages
from fedgen.mechanisms import DPSGD, SubsampledGaussianEvent


def _halves(n: int = 2000) -> TensorDataset:
    """Class 0: the left half of an 8 x 8 image lit at 0.8, class 1 the right half; 3 of 4 examples are class 0."""
    images = torch.zeros(n, 1, 8, 8)
    labels = (torch.arange(n) % 4 == 3).long()
    images[labels == 0, :, :, :4] = 0.8
    images[labels == 1, :, :, 4:] = 0.8
    return TensorDataset(images, labels)


def _merf(**overrides) -> MerfImages:
    return MerfImages(**({"epsilon": 1.0, "images": 400, "steps": 1, "num_features": 500, "length_scale": 4.0,
                          "epochs": 2} | overrides))


def test_the_release_is_one_gaussian_event_of_the_whole_data_at_the_configured_epsilon() -> None:
    mechanism = DPSGD(target_epsilon=10.0, delta=1e-5, seed=0, accountant="rdp")
    torch.manual_seed(0)
    images, report = _merf().release(_halves(), num_classes=2, mechanism=mechanism)
    sigma = report["noise_multiplier"]
    assert mechanism.ledger.events == (SubsampledGaussianEvent(sigma, 1.0, 1),)
    assert 0.97 < mechanism.epsilon() <= 1.0 and report["epsilon"] == mechanism.epsilon()
    x, y = images.tensors
    assert x.shape == (400, 1, 8, 8) and x.min() >= 0 and x.max() <= 1 and report["images"] == 400
    # labels in the released class proportions (3 : 1 in the data, noisy counts at sigma ~4 over 2000 examples)
    assert 0.2 < y.float().mean() < 0.3


def test_the_samples_learn_each_class_from_the_release() -> None:
    """At a large epsilon, DP-Merf's samples of class 0 are brighter on the left than on the right, and those of
    class 1 the other way round: what the warm-up trains on carries the private classes' shapes."""
    mechanism = DPSGD(target_epsilon=1e4, delta=1e-5, seed=0, accountant="rdp")
    torch.manual_seed(0)
    images, _ = _merf(epsilon=1e3, epochs=4).release(_halves(), num_classes=2, mechanism=mechanism)
    x, y = images.tensors
    left, right = x[..., :4].mean((1, 2, 3)), x[..., 4:].mean((1, 2, 3))
    assert (left[y == 0] > right[y == 0]).float().mean() > 0.9
    assert (right[y == 1] > left[y == 1]).float().mean() > 0.9


def test_the_noise_is_drawn_from_the_mechanisms_seed() -> None:
    def draw(seed: int) -> torch.Tensor:
        torch.manual_seed(0)  # DP-Merf's generator and its samples use the global stream
        mechanism = DPSGD(target_epsilon=10.0, delta=1e-5, seed=seed, accountant="rdp")
        return _merf(epsilon=0.1, epochs=1).release(_halves(), num_classes=2, mechanism=mechanism)[0].tensors[0]

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


@pytest.mark.parametrize("merf_batch_size", [100, 37])
def test_dp_merf_draws_its_batch_for_the_papers_number_of_steps(merf_batch_size: int, monkeypatch) -> None:
    """``merf_batch_size`` sets how many images DP-Merf's generator draws a step; its epochs keep the private
    examples / 100 steps of DP-Merf's paper whatever the batch."""
    from fedgen.generators import merf_images

    drawn = []

    class Recording(merf_images.DPMerf):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.generator.register_forward_hook(
                lambda module, args, out: drawn.append(len(out)) if module.training else None)

    monkeypatch.setattr(merf_images, "DPMerf", Recording)
    mechanism = DPSGD(target_epsilon=10.0, delta=1e-5, seed=0, accountant="rdp")
    _merf(merf_batch_size=merf_batch_size).release(_halves(), num_classes=2, mechanism=mechanism)
    assert drawn == [merf_batch_size] * (2 * 2000 // 100)  # 2 epochs of 20 steps


@pytest.mark.parametrize(("change", "field"), [
    ({"images": 0}, "model.merf_images.images"),
    ({"batch_size": 0}, "model.merf_images.batch_size"),
    ({"epochs": 0}, "model.merf_images.epochs"),
    ({"merf_batch_size": 0}, "model.merf_images.merf_batch_size"),
    ({"num_features": 501}, "model.merf_images.num_features"),
    ({"num_features": 20_000_000_000}, "model.merf_images.num_features"),  # 31 TB of frequencies: past memory
    ({"length_scale": 0.0}, "model.merf_images.length_scale"),
    ({"steps": 0}, "model.merf_images.steps"),
    ({"epsilon": 10.0}, "model.merf_images.epsilon"),
])
def test_bad_settings_are_refused_before_anything_is_released(change: dict, field: str) -> None:
    mechanism = DPSGD(target_epsilon=10.0, delta=1e-5, seed=0)
    with pytest.raises(ConfigError) as err:
        _merf(**change).release(_halves(), num_classes=2, mechanism=mechanism)
    assert err.value.field == field and not mechanism.ledger.events


def test_an_image_size_dp_merfs_generator_cannot_draw_is_refused_when_the_generator_is_built() -> None:
    from tests.generators.test_ddpm import _tiny

    mechanism = DPSGD(target_epsilon=10.0, delta=1e-3, seed=0)
    with pytest.raises(ConfigError) as err:
        _tiny(mechanism=mechanism, image_shape=(1, 6, 6), block_channels=(8,), attention=(False,),
              merf_images=_merf())
    assert err.value.field == "model.merf_images" and "6x6" in str(err.value)
    assert not mechanism.ledger.events


def test_a_resumed_run_must_open_with_dp_merfs_release() -> None:
    merf = _merf()
    mechanism = DPSGD(target_epsilon=10.0, delta=1e-5, seed=0, accountant="rdp")
    with pytest.raises(ConfigError, match="started without them"):
        merf.check_resumed(mechanism.ledger)
    CentralImages(epsilon=1.0, releases=2, sample_rate=0.5).release(_halves(), num_classes=2, mechanism=mechanism)
    with pytest.raises(ConfigError, match="DP-Merf's single release"):
        merf.check_resumed(mechanism.ledger)  # a run that warmed up on central images
    other = DPSGD(target_epsilon=10.0, delta=1e-5, seed=0, accountant="rdp")
    merf.release(_halves(), num_classes=2, mechanism=other)
    merf.check_resumed(other.ledger)
