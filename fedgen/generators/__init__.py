"""Private generators: LightningModules composed with a privacy mechanism."""

from fedgen.generators.base import Generator, stratified_labels
from fedgen.generators.ddpm import DPDiffusion
from fedgen.generators.dp_merf import ConditionalConvGenerator, DPMerf

__all__ = ["ConditionalConvGenerator", "DPDiffusion", "DPMerf", "Generator", "stratified_labels"]
