"""Random views of image batches, drawn on the batch's device: training-time augmentation shared by the
generators (augmentation multiplicity inside a DP-SGD example's loss) and the downstream classifier, and the random
moves a generator may apply to the images it releases (post-processing)."""

from __future__ import annotations

import math

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


def check_tilt(rotation_field: str, rotation: float, scale_field: str, scale: float) -> None:
    """Refuse a ``rotation`` (degrees) outside [0, 180] or a ``scale`` outside [0, 1) for :func:`move_randomly`, with
    a ConfigError naming the field."""
    if not 0 <= rotation <= 180:
        raise ConfigError(rotation_field, f"must be an angle in degrees in [0, 180], got {rotation}",
                          "use e.g. 10, or 0 for no rotation")
    if not 0 <= scale < 1:
        raise ConfigError(scale_field, f"must be a fraction in [0, 1), got {scale}",
                          "use e.g. 0.1, or 0 for no scaling")


def move_randomly(images: torch.Tensor, shift: int, rotation: float = 0.0, scale: float = 0.0, *,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of ``images`` (N, C, H, W) turned about its centre by an angle uniform in [-rotation, rotation]
    degrees, scaled by a factor uniform in [1 - scale, 1 + scale], then moved by a whole-pixel offset uniform in
    ``[-shift, shift]^2``, each image on its own draws (from ``generator``, else torch's global one): content at
    ``x`` lands at ``s R(a) x + t``, read back by bilinear interpolation with zero fill (``grid_sample``). Values
    stay in the inputs' range (convex combinations of pixels and zeros). Without rotation and scale, exactly
    :func:`shift_randomly` (no interpolation) with the same draws."""
    if not rotation and not scale:
        return shift_randomly(images, shift, generator=generator)[0]
    n, _, height, width = images.shape
    device, dtype = images.device, images.dtype
    angle = (torch.rand(n, device=device, generator=generator) * 2 - 1) * math.radians(rotation)
    factor = 1 + (torch.rand(n, device=device, generator=generator) * 2 - 1) * scale
    pixels = torch.randint(-shift, shift + 1, (n, 2), device=device, generator=generator)
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    inverse = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], 1)  # R(-a) / s, (N, 2, 2)
    # the output point x (pixels, x right, y down) reads the input at R(-a) (x - t) / s; grid_sample's units are
    # pixels times u = (2 / W, 2 / H), so its matrix is diag(u) R(-a) diag(u)^-1 / s and its offset -that diag(u) t
    units = torch.tensor([2 / width, 2 / height], device=device)
    inverse = inverse * (units[:, None] / units[None, :])
    theta = torch.cat([inverse, -(inverse @ (pixels * units)[:, :, None])], 2).to(dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def flip_randomly(images: torch.Tensor, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image of ``images`` (N, C, H, W) mirrored left to right with probability 1/2, on its own coin. Returns
    the images and whether each was mirrored (1) or not (0); when ``flip`` is false, ``images`` itself and zeros."""
    if not flip:
        return images, torch.zeros(len(images), dtype=torch.long, device=images.device)
    mirrored = torch.rand(len(images), device=images.device) < 0.5
    return torch.where(mirrored[:, None, None, None], images.flip(-1), images), mirrored.long()
