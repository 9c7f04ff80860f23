"""Private generators: LightningModules composed with a privacy mechanism."""

from fedgen.generators.base import Generator, stratified_labels
from fedgen.generators.central_images import CentralImages
from fedgen.generators.ddpm import DPDiffusion
from fedgen.generators.dp_merf import ConditionalConvGenerator, DPMerf

__all__ = ["CentralImages", "ConditionalConvGenerator", "DPDiffusion", "DPMerf", "Generator", "stratified_labels"]
