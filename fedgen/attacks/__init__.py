"""Attacks on what fedgen's runs release or send: gradient inversion (DLG, iDLG, Inverting Gradients)."""

from fedgen.attacks.gradient_inversion import (
    DLG,
    GradientInversion,
    InversionResult,
    InvertingGradients,
    client_gradient,
    lenet_for_inversion,
    recover_label,
)

__all__ = ["DLG", "GradientInversion", "InversionResult", "InvertingGradients", "client_gradient",
           "lenet_for_inversion", "recover_label"]
