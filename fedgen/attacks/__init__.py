"""Attacks on what fedgen's runs release or send: gradient inversion (DLG, iDLG, Inverting Gradients) and
membership inference (LOSS)."""

from fedgen.attacks.gradient_inversion import (
    DLG,
    GradientInversion,
    InversionResult,
    InvertingGradients,
    client_gradient,
    lenet_for_inversion,
    recover_label,
)
from fedgen.attacks.membership import LOW_FPRS, MembershipResult, evaluate_membership, loss_scores

__all__ = ["DLG", "LOW_FPRS", "GradientInversion", "InversionResult", "InvertingGradients", "MembershipResult",
           "client_gradient", "evaluate_membership", "lenet_for_inversion", "loss_scores", "recover_label"]
