"""Private generators: LightningModules composed with a privacy mechanism."""

from fedgen.generators.base import Generator, stratified_labels
from fedgen.generators.central_images import CentralImages
from fedgen.generators.ddpm import DPDiffusion
from fedgen.generators.dp_merf import ConditionalConvGenerator, DPMerf
from fedgen.generators.merf_images import MerfImages
from fedgen.generators.pretraining import ProceduralPretraining
from fedgen.generators.warm_up import WarmUpRelease

__all__ = ["CentralImages", "ConditionalConvGenerator", "DPDiffusion", "DPMerf", "Generator", "MerfImages",
           "ProceduralPretraining", "WarmUpRelease", "stratified_labels"]
