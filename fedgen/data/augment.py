"""Random views of image batches, drawn on the batch's device: training-time augmentation shared by the
generators (augmentation multiplicity inside a DP-SGD example's loss) and the downstream classifier."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fedgen.errors import ConfigError, check_integer


def check_shift(field: str, shift: int, image_shape: tuple[int, ...]) -> None:
    """Refuse a ``shift`` for :func:`shift_randomly` that is not a whole number >= 0 or that would move an image of
    ``image_shape`` (C, H, W) out of its frame, with a ConfigError naming ``field``."""
    check_integer(field, shift, 0)
    height, width = image_shape[-2:]
    if shift >= min(height, width):
        raise ConfigError(field, f"{shift} pixels would move a {height}x{width} image out of its frame",
                          "use a shift smaller than the image, e.g. 2, or 0 for no shifts")


def shift_randomly(images: torch.Tensor, shift: int, *, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image of ``images`` (N, C, H, W) moved by its own random offset (dy, dx) in ``[-shift, shift]^2`` pixels,
    uniform over the (2 shift + 1)^2 offsets (drawn from ``generator``, else torch's global one), the uncovered
    border filled with zeros. Returns the moved images and each one's offset as an index,
    ``(dy + shift) (2 shift + 1) + (dx + shift)`` (the unmoved image's is ``shift (2 shift + 2)``); for 0,
    ``images`` itself and zeros."""
    n, _, height, width = images.shape
    if shift == 0:
        return images, torch.zeros(n, dtype=torch.long, device=images.device)
    padded = F.pad(images, (shift,) * 4)
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n, 1), device=images.device, generator=generator).unbind(0)
    rows = dy + torch.arange(height, device=images.device)  # (N, H): the padded rows each image keeps
    cols = dx + torch.arange(width, device=images.device)
    picked = padded[torch.arange(n, device=images.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    # padded row p + r lands on row r: the image moved down by shift - p, whose index (shift - p) + shift is 2 shift - p
    offsets = ((2 * shift - dy) * (2 * shift + 1) + (2 * shift - dx)).view(n)
    return picked.permute(0, 3, 1, 2), offsets  # advanced indexing put the channels last


def flip_randomly(images: torch.Tensor, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image of ``images`` (N, C, H, W) mirrored left to right with probability 1/2, on its own coin. Returns
    the images and whether each was mirrored (1) or not (0); when ``flip`` is false, ``images`` itself and zeros."""
    if not flip:
        return images, torch.zeros(len(images), dtype=torch.long, device=images.device)
    mirrored = torch.rand(len(images), device=images.device) < 0.5
    return torch.where(mirrored[:, None, None, None], images.flip(-1), images), mirrored.long()
