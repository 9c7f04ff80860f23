"""Random views: shifts and mirrors, each image on its own draw."""

import pytest
import torch

from fedgen.data.augment import check_shift, flip_randomly, shift_randomly
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
