"""Membership inference: was this example in the training set?

An attack gives each candidate example a score, higher meaning "member". It is judged on known members
and non-members by the ROC curve. The numbers that matter for privacy are the true-positive rates at very
low false-positive rates (Carlini et al., S&P 2022), not the AUC alone.

- LOSS attack (Yeom, Giacomelli, Fredrikson, Jha, CSF 2018): score = -loss(f(x), y). Members of an
  overfit model have a lower loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import binary_auroc, binary_roc

from fedgen.errors import ConfigError

#: false-positive rates at which the true-positive rate is reported
LOW_FPRS = (0.001, 0.01)


@torch.no_grad()
def loss_scores(model: nn.Module, dataset: Dataset, *, batch_size: int = 1000) -> torch.Tensor:
    """LOSS attack scores (Yeom et al., 2018): the negative cross-entropy of each example, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = [-F.cross_entropy(model(x.to(device)), y.to(device), reduction="none").cpu()
              for x, y in DataLoader(dataset, batch_size=batch_size)]
    model.train(was_training)
    return torch.cat(scores)


@dataclass
class MembershipResult:
    """ROC summary of an attack: AUC, TPR at the low FPRs of :data:`LOW_FPRS`, and the curve itself."""

    auc: float
    tpr_at_fpr: dict[float, float]
    fpr: torch.Tensor
    tpr: torch.Tensor
    members: int
    non_members: int

    def to_dict(self) -> dict:
        return {"auc": self.auc, "tpr_at_fpr": {str(k): v for k, v in self.tpr_at_fpr.items()},
                "members": self.members, "non_members": self.non_members}


def evaluate_membership(member_scores: torch.Tensor, non_member_scores: torch.Tensor) -> MembershipResult:
    """AUC and the TPR at each FPR of :data:`LOW_FPRS` (the largest TPR whose FPR does not exceed it)."""
    if min(len(member_scores), len(non_member_scores)) < 1:
        raise ConfigError("scores", "needs at least one member and one non-member", "give both sets of examples")
    scores = torch.cat([member_scores, non_member_scores]).double()
    truth = torch.cat([torch.ones(len(member_scores)), torch.zeros(len(non_member_scores))]).long()
    fpr, tpr, _ = binary_roc(scores, truth)
    tpr_at = {target: float(tpr[fpr <= target].max()) for target in LOW_FPRS}
    return MembershipResult(float(binary_auroc(scores, truth)), tpr_at, fpr, tpr, len(member_scores),
                            len(non_member_scores))
