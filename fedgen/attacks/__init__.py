"""Attacks on what fedgen's runs release or send: gradient inversion (DLG, iDLG, Inverting Gradients) and
membership inference (LOSS, LiRA, GAN-Leaks), and the one-run privacy audit's bound."""

from fedgen.attacks.audit import OneRunAudit, audit_guesses, epsilon_lower_bound
from fedgen.attacks.gradient_inversion import (
    DLG,
    GradientInversion,
    InversionResult,
    InvertingGradients,
    client_gradient,
    dp_sgd_update,
    lenet_for_inversion,
    recover_label,
)
from fedgen.attacks.membership import (
    LOW_FPRS,
    LiRA,
    MembershipResult,
    diffusion_loss_scores,
    evaluate_membership,
    gan_leaks_scores,
    logit_confidence,
    loss_scores,
    nearest_distance,
)

__all__ = ["DLG", "OneRunAudit", "audit_guesses", "epsilon_lower_bound", "LOW_FPRS", "GradientInversion", "InversionResult", "InvertingGradients", "LiRA", "MembershipResult",
           "client_gradient", "diffusion_loss_scores", "dp_sgd_update", "evaluate_membership", "gan_leaks_scores", "lenet_for_inversion", "logit_confidence", "loss_scores", "nearest_distance",
           "recover_label"]
