"""Privacy mechanisms and the privacy ledger."""

from fedgen.mechanisms.base import Mechanism
from fedgen.mechanisms.cuda_graphs import CapturedBackward
from fedgen.mechanisms.dp_sgd import DPSGD
from fedgen.mechanisms.gaussian import GaussianMechanism, clip_rows
from fedgen.mechanisms.ledger import (
    PrivacyLedger,
    SkellamEvent,
    SubsampledGaussianEvent,
    calibrate_noise_multiplier,
    calibrate_skellam_mu,
    compute_epsilon,
    skellam_rdp,
)
from fedgen.mechanisms.lightning import PrivateModule
from fedgen.mechanisms.noise import NoiseSource
from fedgen.mechanisms.secure_aggregation import (
    AggregationResult,
    SecureAggregationError,
    SecureAggregator,
    shamir_reconstruct,
    shamir_split,
)

__all__ = [
    "AggregationResult",
    "CapturedBackward",
    "SecureAggregationError",
    "SecureAggregator",
    "shamir_reconstruct",
    "shamir_split",
    "DPSGD",
    "GaussianMechanism",
    "Mechanism",
    "NoiseSource",
    "PrivacyLedger",
    "PrivateModule",
    "SkellamEvent",
    "SubsampledGaussianEvent",
    "calibrate_noise_multiplier",
    "calibrate_skellam_mu",
    "clip_rows",
    "compute_epsilon",
    "skellam_rdp",
]
