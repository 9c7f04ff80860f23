"""Random views: shifts, mirrors and turns, each image on its own draw."""

import math

import pytest
import torch

from fedgen.data.augment import check_shift, check_tilt, flip_randomly, move_randomly, shift_randomly
from fedgen.errors import ConfigError


def test_random_shifts_move_each_image_by_its_own_offset_with_zero_fill() -> None:
    """Each output is its input moved by an offset in [-s, s]^2 (the pixels moved out are dropped, the uncovered
    border is 0), and the offsets of many images cover all (2 s + 1)^2 values about evenly."""
    gen = torch.Generator().manual_seed(4)
    images = torch.zeros(2000, 2, 9, 9)
    images[:, :, 3:6, 3:6] = torch.rand(2000, 2, 3, 3, generator=gen) + 0.1  # a patch well inside the border
    same, zeros = shift_randomly(images, 0)
    assert same is images and not zeros.any()
    torch.manual_seed(0)
    moved, indices = shift_randomly(images, 2)
    offsets = []
    for original, shifted, index in zip(images, moved, indices.tolist(), strict=True):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(shifted, torch.roll(original, (dy, dx), dims=(1, 2)))]
        assert len(found) == 1
        dy, dx = found[0]
        assert index == (dy + 2) * 5 + (dx + 2)  # the offset's index: (0, 0) is 2 (2 2 + 2) = 12
        offsets.append(found[0])
    counts = torch.tensor([offsets.count((dy, dx)) for dy in range(-2, 3) for dx in range(-2, 3)])
    assert int(counts.min()) > 40 and int(counts.max()) < 120  # 80 expected for each of the 25 offsets


def test_random_flips_mirror_about_half_of_the_images_each_on_its_own_coin() -> None:
    """Each output is its input or its left-right mirror; about half are mirrored; no flag, no change."""
    images = torch.rand(2000, 2, 5, 7, generator=torch.Generator().manual_seed(5))
    same, zeros = flip_randomly(images, False)
    assert same is images and not zeros.any()
    torch.manual_seed(0)
    out, flags = flip_randomly(images, True)
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same ^ mirrored).all())  # one or the other, never a mix (random images have no symmetric one)
    assert torch.equal(flags.bool(), mirrored)
    assert 900 < int(mirrored.sum()) < 1100  # 1000 expected


def test_check_shift_refuses_a_shift_that_leaves_the_frame_naming_the_field() -> None:
    """A shift must be a whole number smaller than the image's shorter side (H or W of C, H, W)."""
    check_shift("model.augment_shift", 0, (1, 28, 28))
    check_shift("model.augment_shift", 19, (3, 28, 20))
    for bad in (20, -1, 1.5, True):
        with pytest.raises(ConfigError) as err:
            check_shift("model.augment_shift", bad, (3, 28, 20))
        assert err.value.field == "model.augment_shift"
    with pytest.raises(ConfigError, match="28x20 image out of its frame"):
        check_shift("evaluation.augment_shift", 20, (3, 28, 20))


def _centroid(images: torch.Tensor) -> torch.Tensor:
    """Each image's centre of mass (x, y) in pixels from the frame's centre, x right, y down."""
    height, width = images.shape[-2:]
    ys = torch.arange(height, dtype=images.dtype) - (height - 1) / 2
    xs = torch.arange(width, dtype=images.dtype) - (width - 1) / 2
    mass = images.sum((1, 2, 3))
    return torch.stack([(images.sum((1, 2)) * xs).sum(-1) / mass, (images.sum((1, 3)) * ys).sum(-1) / mass], -1)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="moves images on a GPU: needs a CUDA device"))])
def test_random_moves_take_content_at_x_to_s_r_x_plus_t_on_each_images_own_draws(device) -> None:
    """move_randomly's documented map, pinned on a smooth blob off centre in a non-square frame: its centre of mass
    lands at s R(a) x + t for the image's own angle a, factor s and whole-pixel offset t (re-drawn here from the
    same seed in the documented order), within interpolation's error; the angles, factors and offsets fill their
    ranges; values stay in [0, 1]; the same seed repeats. On the images' device with a generator there, as a
    generator's release draws them."""
    height, width, n = 41, 45, 400
    ys = torch.arange(height, dtype=torch.float64)[:, None] - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float64)[None, :] - (width - 1) / 2
    blob = torch.exp(-((xs - 7) ** 2 + (ys + 5) ** 2) / (2 * 1.5 ** 2))  # at x = 7, y = -5
    images = blob.expand(n, 2, height, width).clone().to(device)

    def seeded() -> torch.Generator:
        return torch.Generator(device).manual_seed(9)

    moved = move_randomly(images, 2, 20.0, 0.2, generator=seeded())
    assert moved.device == images.device
    assert torch.equal(moved, move_randomly(images, 2, 20.0, 0.2, generator=seeded()))
    assert float(moved.min()) >= 0 and float(moved.max()) <= 1
    gen = seeded()
    angle = ((torch.rand(n, device=device, generator=gen) * 2 - 1) * math.radians(20.0)).cpu()
    factor = (1 + (torch.rand(n, device=device, generator=gen) * 2 - 1) * 0.2).cpu()
    offset = torch.randint(-2, 3, (n, 2), device=device, generator=gen).double().cpu()
    moved = moved.cpu()
    x, y = 7.0, -5.0
    cos, sin = torch.cos(angle).double(), torch.sin(angle).double()
    expected = factor.double()[:, None] * torch.stack([cos * x - sin * y, sin * x + cos * y], -1) + offset
    assert torch.allclose(_centroid(moved), expected, atol=0.05)
    assert float(angle.abs().max()) > math.radians(18) and float((factor - 1).abs().max()) > 0.18
    assert len({tuple(t) for t in offset.tolist()}) == 25


def test_random_moves_without_turn_or_scale_are_exactly_the_shifts() -> None:
    """rotation = scale = 0 takes shift_randomly's path, bit for bit and on the same draws; shift 0 as well leaves
    the images as they are."""
    images = torch.rand(50, 1, 9, 9, generator=torch.Generator().manual_seed(2))
    shifted = shift_randomly(images, 2, generator=torch.Generator().manual_seed(5))[0]
    assert torch.equal(move_randomly(images, 2, generator=torch.Generator().manual_seed(5)), shifted)
    assert move_randomly(images, 0) is images


def test_check_tilt_refuses_an_angle_or_scale_out_of_range_naming_the_field() -> None:
    check_tilt("model.sample_rotation", 0.0, "model.sample_scale", 0.0)
    check_tilt("model.sample_rotation", 180.0, "model.sample_scale", 0.5)
    for rotation, scale, field in ((-1.0, 0.0, "model.sample_rotation"), (181.0, 0.0, "model.sample_rotation"),
                                   (float("nan"), 0.0, "model.sample_rotation"), (0.0, 1.0, "model.sample_scale"),
                                   (0.0, -0.1, "model.sample_scale")):
        with pytest.raises(ConfigError) as err:
            check_tilt("model.sample_rotation", rotation, "model.sample_scale", scale)
        assert err.value.field == field
