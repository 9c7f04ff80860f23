"""Gradient inversion on real MNIST (CPU): DLG recovers one image from a non-private LeNet gradient with the
right label, noise on the gradient defeats it, and bad inputs are refused."""

from __future__ import annotations

import pytest
import torch
from torchvision.datasets import MNIST

from fedgen.attacks import DLG, GradientInversion, InvertingGradients, client_gradient, lenet_for_inversion, recover_label
from fedgen.attacks.gradient_inversion import InversionResult
from fedgen.errors import ConfigError
from fedgen.generators import DPMerf
from fedgen.mechanisms import GaussianMechanism


@pytest.fixture(scope="module")
def digit(real_data_root) -> tuple[torch.Tensor, torch.Tensor]:
    data = MNIST(root=str(real_data_root), train=False, download=False)
    return data.data[:1].float().unsqueeze(1) / 255, data.targets[:1]


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return lenet_for_inversion()


def test_dlg_recovers_a_single_mnist_image_and_its_label(digit) -> None:
    x, y = digit
    model = _model()
    gradient = client_gradient(model, x, y)
    assert recover_label(gradient) == int(y)
    result = DLG(iterations=100).attack(model, gradient, input_shape=(1, 28, 28))
    assert result.labels.tolist() == y.tolist()
    score = result.score(x)
    assert score["psnr"] >= 30 and score["ssim"] > 0.9


def test_noise_on_the_gradient_defeats_dlg(digit) -> None:
    x, y = digit
    model = _model()
    gen = torch.Generator().manual_seed(0)
    noisy = [g + 0.1 * torch.randn(g.shape, generator=gen) for g in client_gradient(model, x, y)]
    result = DLG(iterations=100).attack(model, noisy, input_shape=(1, 28, 28), labels=y)
    assert result.score(x)["psnr"] < 15


def test_inverting_gradients_moves_towards_the_image(digit) -> None:
    x, y = digit
    model = _model()
    gradient = client_gradient(model, x, y)
    start = torch.rand((1, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    baseline = float(((start - x) ** 2).mean())
    result = InvertingGradients(iterations=200).attack(model, gradient, input_shape=(1, 28, 28))
    assert float(((result.images - x) ** 2).mean()) < baseline / 3


def test_dlg_inverts_a_dp_merf_embedding_only_without_its_noise(digit) -> None:
    """The generative pipeline sends no gradient, but a random-feature embedding is invertible by the same
    matching: the release's noise, not the change of statistic, is what protects the example."""
    x, y = digit
    merf = DPMerf(mechanism=GaussianMechanism(noise_multiplier=1.0, delta=1e-5), num_features=10000, length_scale=7.0)
    embedding = merf.clipped_contribution_sum(x, y)

    def observe(images, probabilities):
        return [merf.contributions(images, probabilities).sum(0)]

    exact = DLG(iterations=100).invert(observe, [embedding], input_shape=(1, 28, 28), num_images=1, num_classes=10,
                                       labels=y)
    assert exact.score(x)["psnr"] >= 30
    released = GaussianMechanism(target_epsilon=1.0, delta=1e-5, seed=0).release(embedding)
    assert not torch.equal(released, embedding)
    noisy = DLG(iterations=100).invert(observe, [released], input_shape=(1, 28, 28), num_images=1, num_classes=10,
                                       labels=y)
    assert noisy.score(x)["psnr"] < 12


def test_bad_inputs_are_refused(digit) -> None:
    x, y = digit
    model = _model()
    gradient = client_gradient(model, x, y)
    with pytest.raises(ConfigError, match="gradient"):
        DLG().attack(model, gradient[:-1], input_shape=(1, 28, 28))
    with pytest.raises(ConfigError, match="labels"):
        InvertingGradients().attack(model, gradient, input_shape=(1, 28, 28), num_images=2)
    with pytest.raises(ConfigError):
        DLG(iterations=0)
    assert GradientInversion.registry.get("dlg") is DLG


def test_the_score_is_the_mean_of_per_image_psnr() -> None:
    """One failed image among three exact-to-1e-3 ones: the mean of the per-image PSNRs (Inverting Gradients'
    convention), not the PSNR of the pooled error, which the failed image alone would drag to its level."""
    truth = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    recon = truth.clone()
    recon[:3] += 1e-3
    recon[3] = 1 - truth[3]
    per_image = [float(-10 * torch.log10((recon[i].clamp(0, 1) - truth[i]).square().mean())) for i in range(4)]
    score = InversionResult(recon, torch.zeros(4, dtype=torch.long), 0.0).score(truth)
    assert score["psnr"] == pytest.approx(sum(per_image) / 4, rel=1e-5)
    assert score["psnr"] > 40  # three images at 60 dB
