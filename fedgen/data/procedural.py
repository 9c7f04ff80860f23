"""Images drawn by code: a dataset that holds no one's data.

:class:`ProceduralImages` paints one of two kinds of image, or both in equal shares (``"mixed"``):

- ``"strokes"``: random smooth strokes, white on black. Each image gets one cubic Bezier curve with its four
  control points uniform in the central part of the frame, and a second one with probability 0.7, each of its own
  width ``w``. A pixel's ink is ``exp(-d^2 / (2 w^2))`` for its distance ``d`` to the nearest of 48 points along
  the curve (the two curves combine by their maximum).
- ``"leaves"``: a dead-leaves model on black. Twelve discs, each kept with probability 1/2, of radius 1 to 9
  pixels (at 28x28) and a uniform gray level, are painted over one another.

Everything follows from the seed, so a generator pretrained on these images has seen no data at all: the
pretraining is part of its initialization and costs no privacy. (Pretraining on procedurally generated images in
place of data, dead leaves among them: Baradad et al., "Learning to see by looking at noise", NeurIPS 2021.)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import TensorDataset

from fedgen.errors import ConfigError, check_at_least_one

KINDS = ("strokes", "leaves", "mixed")
#: points along each curve, against which a pixel's distance is measured
_CURVE_POINTS = 48
#: images painted at a time (their distances to the curves take images x points x pixels floats)
_CHUNK = 512


def _pixel_grid(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                          torch.arange(width, dtype=torch.float32, device=device), indexing="ij")


def _paint_strokes(n: int, height: int, width: int, generator: torch.Generator, device: torch.device
                   ) -> torch.Tensor:
    """``n`` stroke images (n, height, width) in [0, 1], painted on ``device`` from draws of the CPU ``generator``;
    widths and margins scale with the 28-pixel frame."""
    scale = min(height, width) / 28
    pixels = torch.stack(_pixel_grid(height, width, device), -1).view(1, 1, -1, 2)
    margin = 4 * scale
    frame = torch.tensor([height - 2 * margin, width - 2 * margin])
    s = torch.linspace(0, 1, _CURVE_POINTS, device=device).view(1, -1, 1)
    bernstein = [(1 - s) ** 3, 3 * (1 - s) ** 2 * s, 3 * (1 - s) * s ** 2, s ** 3]
    ink = torch.zeros(n, height * width, device=device)
    for stroke in range(2):
        control = (torch.rand(n, 4, 2, generator=generator) * frame + margin).to(device)
        curve = sum(b * control[:, i:i + 1] for i, b in enumerate(bernstein))  # (n, points, 2)
        w = ((torch.rand(n, 1, generator=generator) * 1.4 + 0.8) * scale).to(device)
        kept = (torch.ones(n, 1) if stroke == 0 else (torch.rand(n, 1, generator=generator) < 0.7).float()).to(device)
        distance2 = ((curve[:, :, None, :] - pixels) ** 2).sum(-1).min(1).values  # (n, pixels)
        ink = torch.maximum(ink, torch.exp(-distance2 / (2 * w ** 2)) * kept)
    return ink.view(n, height, width)


def _paint_leaves(n: int, height: int, width: int, generator: torch.Generator, device: torch.device,
                  discs: int = 12) -> torch.Tensor:
    """``n`` dead-leaves images (n, height, width) in [0, 1], as :func:`_paint_strokes` draws and scales."""
    scale = min(height, width) / 28
    yy, xx = _pixel_grid(height, width, device)
    images = torch.zeros(n, height, width, device=device)
    for _ in range(discs):
        centre = (torch.rand(n, 2, generator=generator) * torch.tensor([height, width])).to(device)
        radius = ((torch.rand(n, generator=generator) ** 2 * 8 + 1) * scale).to(device)
        gray = torch.rand(n, generator=generator).to(device)
        kept = (torch.rand(n, 1, 1, generator=generator) < 0.5).to(device)
        distance2 = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
        images = torch.where((distance2 < radius[:, None, None] ** 2) & kept, gray[:, None, None], images)
    return images


class ProceduralImages(TensorDataset):
    """``images`` images of ``kind`` (see the module's docstring) and ``image_shape`` (C, H, W; every channel the
    same), pixels in [0, 1], each with label 0 (there are no classes), painted from ``seed``. ``"mixed"``: the first
    half strokes, the second leaves. ``device`` only paints (the draws come from a CPU generator, so a seed gives the
    same images on every device); the images are returned on the CPU."""

    def __init__(self, images: int, *, image_shape: tuple[int, int, int],
                 kind: Literal["strokes", "leaves", "mixed"] = "mixed", seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        check_at_least_one("images", images, "use e.g. 60000")
        if kind not in KINDS:
            raise ConfigError("kind", f"unknown kind of image {kind!r}", f"use one of {list(KINDS)}")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ConfigError("image_shape", f"must be (channels, height, width), got {list(image_shape)}",
                              "use e.g. [1, 28, 28]")
        channels, height, width = image_shape
        if min(height, width) < 8:
            raise ConfigError("image_shape", f"{height}x{width} is too small to paint", "use images of 8x8 or more")
        generator, device = torch.Generator().manual_seed(seed), torch.device(device)
        strokes = {"strokes": images, "leaves": 0, "mixed": images // 2}[kind]
        chunks = []
        for painter, count in ((_paint_strokes, strokes), (_paint_leaves, images - strokes)):
            chunks += [painter(min(_CHUNK, count - start), height, width, generator, device).cpu()
                       for start in range(0, count, _CHUNK)]
        pixels = torch.cat(chunks)[:, None].expand(-1, channels, -1, -1).contiguous()
        super().__init__(pixels, torch.zeros(images, dtype=torch.long))
