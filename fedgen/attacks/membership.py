"""Membership inference: was this example in the training set?

An attack gives each candidate example a score, higher meaning "member". It is judged on known members
and non-members by the ROC curve. The numbers that matter for privacy are the true-positive rates at very
low false-positive rates (Carlini et al., S&P 2022), not the AUC alone.

- LOSS attack (Yeom, Giacomelli, Fredrikson, Jha, CSF 2018): score = -loss(f(x), y). Members of an
  overfit model have a lower loss.
- LiRA (Carlini et al., S&P 2022): a per-example likelihood ratio calibrated by shadow models (:class:`LiRA`).
- A loss attack on diffusion models (:func:`diffusion_loss_scores`).
- GAN-Leaks (Chen et al., CCS 2020) against a released synthetic dataset: the distance of a query to its nearest
  synthetic sample, optionally calibrated by a reference generator (:func:`gan_leaks_scores`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import binary_auroc, binary_roc

from fedgen.errors import ConfigError

#: false-positive rates at which the true-positive rate is reported
LOW_FPRS = (0.001, 0.01)


@torch.no_grad()
def _per_example(model: nn.Module, dataset: Dataset, statistic, batch_size: int) -> torch.Tensor:
    """``statistic(logits, labels)`` of every example of ``dataset``, the model in eval mode on its own device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [statistic(model(x.to(device)), y.to(device)).cpu() for x, y in DataLoader(dataset, batch_size=batch_size)]
    model.train(was_training)
    return torch.cat(out)


def loss_scores(model: nn.Module, dataset: Dataset, *, batch_size: int = 1000) -> torch.Tensor:
    """LOSS attack scores (Yeom et al., 2018): the negative cross-entropy of each example, in float64 (in float32
    every loss below about 1e-7 rounds to 0, and the most confident examples, where low FPRs are read, tie)."""
    return _per_example(model, dataset, lambda z, y: -F.cross_entropy(z.double(), y, reduction="none"), batch_size)


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

    def save_roc(self, path: str | Path, title: str = "membership inference") -> None:
        """The ROC curve as a PNG, on log-log axes: the low-FPR corner is where privacy is judged."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        floor = 1 / (10 * max(self.members, self.non_members))
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.loglog(self.fpr.clamp(min=floor), self.tpr.clamp(min=floor), label=f"attack (AUC {self.auc:.3f})")
        ax.loglog([floor, 1], [floor, 1], "k--", linewidth=0.8, label="chance")
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title, xlim=(floor, 1),
               ylim=(floor, 1))
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def evaluate_membership(member_scores: torch.Tensor, non_member_scores: torch.Tensor) -> MembershipResult:
    """AUC and the TPR at each FPR of :data:`LOW_FPRS` (the largest TPR whose FPR does not exceed it).

    Only the scores' order matters. They are replaced by their ranks scaled into [0, 1], ties kept: torchmetrics
    passes scores outside [0, 1] through a sigmoid, which in float64 merges every score above about 37."""
    if min(len(member_scores), len(non_member_scores)) < 1:
        raise ConfigError("scores", "needs at least one member and one non-member", "give both sets of examples")
    nan_members, nan_others = int(member_scores.isnan().sum()), int(non_member_scores.isnan().sum())
    if nan_members or nan_others:  # NaNs would take arbitrary ranks: an all-NaN attack could read AUC 1.0
        raise ConfigError("scores", f"{nan_members} member and {nan_others} non-member scores are NaN",
                          "check that the attacked model (and any shadow model) has finite weights and outputs; "
                          "a diverged model gives no membership signal to measure")
    distinct, rank = torch.unique(torch.cat([member_scores, non_member_scores]).double(), return_inverse=True)
    scores = rank.double() / max(1, len(distinct) - 1)
    truth = torch.cat([torch.ones(len(member_scores)), torch.zeros(len(non_member_scores))]).long()
    fpr, tpr, _ = binary_roc(scores, truth)
    tpr_at = {target: float(tpr[fpr <= target].max()) for target in LOW_FPRS}
    return MembershipResult(float(binary_auroc(scores, truth)), tpr_at, fpr, tpr, len(member_scores),
                            len(non_member_scores))


def _logit_scaled(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.double()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    return true - logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)


def logit_confidence(model: nn.Module, dataset: Dataset, *, batch_size: int = 1000) -> torch.Tensor:
    """LiRA's statistic: ``log(p_y / (1 - p_y))`` of the true class, computed stably from the logits as
    ``z_y - logsumexp_{k != y} z_k``."""
    return _per_example(model, dataset, _logit_scaled, batch_size)


class LiRA:
    """The likelihood-ratio attack (Carlini, Chien, Nasr, Song, Terzis, Tramer, S&P 2022).

    Shadow models are trained on random halves of a population (each example is IN about half of them). For
    each example the logit-scaled confidences of IN and OUT shadows are fitted by Gaussians; the target
    model's confidence ``phi`` is scored by ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)`` (online) or
    by ``(phi - mu_out) / s_out`` (offline, OUT shadows only; the paper's ``Phi`` of it ranks the same, but rounds
    to 1 past z = 8.3, tying the most confident examples). With few shadows, one variance over all examples
    (``global_variance``: the mean of the per-example variances) is more stable, as the paper recommends. With
    every example IN the same number of shadows that mean is the pooled within-example variance, the spread the
    per-example Gaussian models; the variance of all scores taken together would add how the examples' means
    differ, widening both Gaussians.

    Args:
        train: the user's factory: trains and returns a fresh model on the dataset it is given.
        num_shadows: shadow models (even, at least 4 so that each side has two values to take a variance of;
            the paper uses 64 to 256).
        online: use IN shadows too (more accurate, needs the candidates in the shadows' data).
        global_variance: one variance per side for all examples.
        seed: seed of the random halves.
    """

    def __init__(self, *, train: Callable[[Dataset], nn.Module], num_shadows: int = 16, online: bool = True,
                 global_variance: bool = False, seed: int = 0) -> None:
        if num_shadows < 4 or num_shadows % 2:
            raise ConfigError("attack.num_shadows", f"must be an even number >= 4 (two IN and two OUT per example "
                              f"for a variance), got {num_shadows}", "use e.g. 16 (the paper uses 64 or more)")
        self.train, self.num_shadows, self.online = train, num_shadows, online
        self.global_variance, self.seed = global_variance, seed
        self._confidences: torch.Tensor | None = None  # (shadows, population)
        self._membership: torch.Tensor | None = None  # (shadows, population) bool

    def fit(self, population: Dataset) -> LiRA:
        """Train the shadow models; every example is IN exactly half of them (balanced random halves)."""
        n = len(population)
        gen = torch.Generator().manual_seed(self.seed)
        ranks = torch.rand(n, self.num_shadows, generator=gen).argsort(1)  # per example, a random order of shadows
        membership = (ranks < self.num_shadows // 2).T  # (shadows, n): each example IN half of the shadows
        confidences = []
        for s in range(self.num_shadows):
            model = self.train(torch.utils.data.Subset(population, membership[s].nonzero().squeeze(1).tolist()))
            confidences.append(logit_confidence(model, population))
        self._confidences, self._membership = torch.stack(confidences), membership
        return self

    def scores(self, target: nn.Module, population: Dataset) -> torch.Tensor:
        """Membership scores of every example of the population (the one given to :meth:`fit`) for ``target``."""
        if self._confidences is None:
            raise RuntimeError("call LiRA.fit(population) first")
        phi = logit_confidence(target, population)
        conf, member = self._confidences, self._membership

        def gaussian(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            count = mask.sum(0).clamp(min=1)
            mean = (conf * mask).sum(0) / count
            var = (((conf - mean) ** 2) * mask).sum(0) / (count - 1).clamp(min=1)
            if self.global_variance:
                var = var.mean().expand_as(var)
            return mean, var.clamp(min=1e-6).sqrt()

        mu_out, s_out = gaussian(~member)
        out_dist = torch.distributions.Normal(mu_out, s_out)
        if not self.online:
            return (phi - mu_out) / s_out
        mu_in, s_in = gaussian(member)
        return torch.distributions.Normal(mu_in, s_in).log_prob(phi) - out_dist.log_prob(phi)


@torch.no_grad()
def nearest_distance(queries: torch.Tensor, samples: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """The L2 distance of each query to its nearest sample (images flattened), in query chunks."""
    flat = samples.flatten(1).double()
    out = [torch.cdist(q.flatten(1).double(), flat).min(1).values for q in queries.split(batch_size)]
    return torch.cat(out)


def gan_leaks_scores(queries: torch.Tensor, synthetic: torch.Tensor,
                     reference: torch.Tensor | None = None) -> torch.Tensor:
    """GAN-Leaks, full black-box (Chen, Yu, Zhang, Fritz, CCS 2020): a query close to the released synthetic
    samples is likely a member, so the score is ``-d(x, S)``, the distance to the nearest synthetic sample.
    With ``reference`` samples from a generator trained on other data of the same distribution, the score is
    calibrated: ``d(x, S_ref) - d(x, S)``, which removes how typical the query is."""
    scores = -nearest_distance(queries, synthetic)
    if reference is not None:
        scores = scores + nearest_distance(queries, reference)
    return scores


@torch.no_grad()
def diffusion_loss_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, repeats: int = 8,
                          seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """A loss attack on a diffusion model (after Carlini et al., USENIX Security 2023, and Matsumoto et al.,
    2023): members are denoised better, so the score is minus each example's noise-prediction error, averaged
    over ``repeats`` (timestep, noise) draws fixed by ``seed`` and shared by all candidates. ``model`` is any
    object with ``device`` and ``diffusion_loss(images, labels, reduction="none")`` giving each example's rows
    consecutively (e.g. :class:`~fedgen.generators.DPDiffusion`). The model is scored in eval mode: every row
    under its example's own label (no label dropout)."""
    device = torch.device(model.device)
    was_training = model.training
    model.eval()
    scores = []
    try:  # the global generators (CPU and the model's GPU) are left as they were
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
                total = torch.zeros(len(x), dtype=torch.float64)
                for r in range(repeats):
                    torch.manual_seed(seed + r)  # the same draws for every candidate
                    rows = model.diffusion_loss(x.to(device), y.to(device), reduction="none")
                    total += rows.reshape(len(x), -1).mean(1).double().cpu()  # an example's rows are consecutive
                scores.append(-total / repeats)
    finally:
        model.train(was_training)
    return torch.cat(scores)
