"""Private generators: LightningModules composed with a privacy mechanism."""

from fedgen.generators.base import Generator, stratified_labels
from fedgen.generators.dp_merf import ConditionalConvGenerator, DPMerf

__all__ = ["ConditionalConvGenerator", "DPMerf", "Generator", "stratified_labels"]
