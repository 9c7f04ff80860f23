"""Pretraining on images drawn by code, before any private data is seen: part of the generator's initialization.

A generator that learns under DP-SGD's noise spends part of its scarce signal on what every image of the domain
shares (a black background, edges, strokes and filled shapes). :class:`ProceduralPretraining` teaches that first,
without any data: the UNet takes ``steps`` plain Adam steps of its diffusion loss, unconditionally (every label the
null class), on :class:`~fedgen.data.procedural.ProceduralImages` painted from ``seed``. No dataset, public or
private, is read, so the pretraining costs no privacy and the ledger records nothing for it. (Compare public-data
pretraining, ``fedgen fit --public_data``, whose images lie outside the guarantee and are named as such.)

Measured, it does not pay on MNIST: 200 ``mixed`` steps before the epsilon-1 example lowered its accuracy from
93.6% to 87.0% (docs/benchmarks.md, run 85); the samples keep the painted images' texture. No example sets it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

import torch

from fedgen.data.procedural import KINDS, ProceduralImages
from fedgen.errors import ConfigError, check_at_least_one


@dataclass
class ProceduralPretraining:
    """The pretraining's settings.

    Args:
        kind: the images painted: ``"strokes"``, ``"leaves"`` or ``"mixed"`` (half each; see
            :mod:`fedgen.data.procedural`).
        steps: plain Adam steps of the generator's diffusion loss on them.
        images: images painted (the steps cycle through them).
        batch_size: images a step; None: the generator's own batch size.
        seed: the seed the images are painted from.
    """

    kind: Literal["strokes", "leaves", "mixed"] = "mixed"
    steps: int = 200
    images: int = 60000
    batch_size: int | None = None
    seed: int = 0

    field: ClassVar[str] = "model.procedural_pretraining"

    def check(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"{self.field}.kind", f"unknown kind of image {self.kind!r}", f"use one of {list(KINDS)}")
        check_at_least_one(f"{self.field}.steps", self.steps, "use e.g. 200")
        check_at_least_one(f"{self.field}.images", self.images, "use e.g. 60000")
        if self.batch_size is not None:
            check_at_least_one(f"{self.field}.batch_size", self.batch_size, "use e.g. 512, or null")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"{self.field}.seed", f"{self.seed} is outside [0, 2^63)", "use e.g. 0")

    def dataset(self, image_shape: tuple[int, int, int], device: torch.device | str = "cpu") -> ProceduralImages:
        return ProceduralImages(self.images, image_shape=image_shape, kind=self.kind, seed=self.seed, device=device)

    def report(self) -> dict:
        return asdict(self) | {"data": "none: images painted by code from the seed; no privacy cost"}
