import pytest
import torch

from fedgen.data.procedural import ProceduralImages
from fedgen.errors import ConfigError


def test_painted_images_follow_from_their_seed_alone() -> None:
    a = ProceduralImages(600, image_shape=(1, 28, 28), seed=3)
    b = ProceduralImages(600, image_shape=(1, 28, 28), seed=3)
    c = ProceduralImages(600, image_shape=(1, 28, 28), seed=4)
    assert torch.equal(a.tensors[0], b.tensors[0])
    assert not torch.equal(a.tensors[0], c.tensors[0])
    assert len(a) == 600 and torch.equal(a.tensors[1], torch.zeros(600, dtype=torch.long))


def test_strokes_are_thin_white_curves_on_black() -> None:
    images = ProceduralImages(300, image_shape=(1, 28, 28), kind="strokes").tensors[0]
    assert images.shape == (300, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    inked = (images > 0.5).flatten(1).float().mean(1)
    assert inked.min() > 0.01 and inked.max() < 0.5  # every image has a stroke, none is filled
    border = torch.ones(28, 28, dtype=torch.bool)
    border[3:25, 3:25] = False  # control points keep 4 pixels from the edge; a stroke's ink fades past them
    assert images[:, 0, border].mean() < 0.2 * images[:, 0, ~border].mean()
    assert (images[1:] - images[:-1]).abs().flatten(1).mean(1).min() > 0.01  # the images differ


def test_leaves_are_flat_gray_discs_over_the_whole_frame() -> None:
    images = ProceduralImages(300, image_shape=(1, 28, 28), kind="leaves").tensors[0]
    levels = [torch.unique(image).numel() for image in images[:, 0]]
    assert max(levels) <= 13  # black and at most one gray level a disc: flat shapes, no gradients
    assert (images > 0).float().mean() > 0.2  # discs cover the frame, borders included
    assert (images[:, 0, 0, :] > 0).float().mean() > 0.05


def test_mixed_is_half_strokes_then_half_leaves() -> None:
    mixed = ProceduralImages(100, image_shape=(1, 28, 28), kind="mixed", seed=5).tensors[0]
    strokes = ProceduralImages(50, image_shape=(1, 28, 28), kind="strokes", seed=5).tensors[0]
    assert torch.equal(mixed[:50], strokes)
    assert max(torch.unique(image).numel() for image in mixed[50:, 0]) <= 13
    assert min(torch.unique(image).numel() for image in mixed[:50, 0]) > 13


def test_painted_images_fill_every_channel_and_scale_with_the_frame() -> None:
    rgb = ProceduralImages(50, image_shape=(3, 32, 32)).tensors[0]
    assert rgb.shape == (50, 3, 32, 32) and rgb.is_contiguous()
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_painted_images_refuse_what_they_cannot_paint() -> None:
    with pytest.raises(ConfigError, match="too small"):
        ProceduralImages(4, image_shape=(1, 4, 4))
    with pytest.raises(ConfigError, match="channels, height, width"):
        ProceduralImages(4, image_shape=(28, 28))
    with pytest.raises(ConfigError, match="kind"):
        ProceduralImages(4, image_shape=(1, 28, 28), kind="fractals")
    with pytest.raises(ConfigError):
        ProceduralImages(0, image_shape=(1, 28, 28))
