"""Downstream classifiers for train-on-synthetic, test-on-real evaluation.

``ConvNet`` is the network of the private-set-generation and dataset-condensation papers (Chen et al.,
NeurIPS 2022; Zhao et al., ICLR 2021): ``depth`` x [conv 3x3 (width channels), GroupNorm with one group per
channel (instance norm), ReLU, 2x2 average pooling], then a linear layer. GroupNorm rather than BatchNorm
keeps it usable under DP-SGD.
"""

from __future__ import annotations

import math

from torch import nn

from fedgen.errors import ConfigError
from fedgen.registry import Registry

classifiers: Registry[nn.Module] = Registry("classifier")


class ConvNet(nn.Module):
    """``depth`` x [conv 3x3, GroupNorm(width, width), ReLU, avg-pool 2] + linear."""

    def __init__(self, *, image_shape: tuple[int, int, int], num_classes: int, width: int = 128, depth: int = 3) -> None:
        super().__init__()
        c, h, w = image_shape
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width), nn.ReLU(), nn.AvgPool2d(2)]
            c, h, w = width, h // 2, w // 2
        if h < 1 or w < 1:
            raise ConfigError("evaluation.depth", f"{depth} poolings shrink {image_shape[1:]} to nothing",
                              "use fewer layers for small images")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c * h * w, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """Flatten, ``depth`` hidden layers of ``width`` units with ReLU, linear output."""

    def __init__(self, *, image_shape: tuple[int, int, int], num_classes: int, width: int = 512, depth: int = 2) -> None:
        super().__init__()
        dims = [math.prod(image_shape)] + [width] * depth
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


classifiers.register("convnet", ConvNet)
classifiers.register("mlp", MLP)
