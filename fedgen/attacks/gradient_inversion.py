"""Gradient inversion: reconstruct a client's training images from what it sent (a gradient or an update).

The attacker knows the model's weights ``w`` (the server sent them), the input shape and what the client
sent, ``g = grad_w L(f_w(x), y)`` for its private batch ``(x, y)``. It optimizes dummy images ``x'`` (and,
where the label is not known, dummy labels) so that their gradient matches ``g``:

- DLG (Zhu, Liu, Han, NeurIPS 2019): ``min_{x', y'} sum_l ||grad_l(x', y') - g_l||^2`` with L-BFGS, soft
  dummy labels ``softmax(y')``.
- iDLG (Zhao, Mopuri, Bilen, 2020): for one example and cross-entropy, the gradient of the last layer's
  bias is ``softmax(z) - onehot(y)``, negative only at the true class; so the label is read off exactly
  and DLG then optimizes the image alone (:func:`recover_label`).
- Inverting Gradients (Geiping, Bauermeister, Droege, Moeller, NeurIPS 2020): ``1 - cos(grad(x'), g)`` over
  all parameters plus ``tv_weight * TV(x')``, minimized with Adam on the signed gradient, step decay, and
  the images kept in their valid range.

The same matching works for any differentiable statistic a client sends, not only gradients. The
attacks' core, :meth:`GradientInversion.invert`, takes an *observation* ``observe(x', p') -> tensors``
and the observed tensors; ``p'`` holds label probabilities, one row per image (one-hot when the labels
are known, DLG's ``softmax(y')`` when not). A gradient is one observation (:func:`gradient_observation`);
DP-Merf's random-feature embedding of a client's data, what the generative-privacy pipeline sends
instead of gradients, is another.

Reconstructions are scored against the true images with PSNR and SSIM (torchmetrics, data range 1). A
defence is measured by the PSNR the attack still reaches: clipping and noising the update (DP-SGD), or
sending no gradient at all (the generative-privacy pipeline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from fedgen.errors import ConfigError, check_at_least_one
from fedgen.mechanisms import clip_rows
from fedgen.registry import Registered, Registry


def lenet_for_inversion(*, channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Module:
    """The LeNet-style network of DLG's experiments: three 5x5 convolutions of 12 channels with sigmoid
    activations (strides 2, 2, 1), then one linear layer. Smooth activations make gradients invertible."""
    size = (image_size + 1) // 2
    size = (size + 1) // 2
    return nn.Sequential(
        nn.Conv2d(channels, 12, 5, stride=2, padding=2), nn.Sigmoid(),
        nn.Conv2d(12, 12, 5, stride=2, padding=2), nn.Sigmoid(),
        nn.Conv2d(12, 12, 5, stride=1, padding=2), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(12 * size * size, num_classes),
    )


def client_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """What a client running one plain SGD step sends: the gradient of the mean cross-entropy of its batch."""
    loss = F.cross_entropy(model(images), labels)
    return [g.detach() for g in torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])]


def dp_sgd_update(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, max_grad_norm: float,
                  noise_multiplier: float, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """What a client running one DP-SGD step on its batch sends, in gradient units:
    ``(sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / B`` with ``clip_C(g) = g min(1, C / ||g||)`` over all
    parameters (Abadi et al., CCS 2016). The per-example gradients ``g_i`` are computed one example at a time
    (an attack needs only small batches)."""
    if not max_grad_norm > 0 or noise_multiplier < 0:
        raise ConfigError("max_grad_norm", f"max_grad_norm={max_grad_norm}, noise_multiplier={noise_multiplier}",
                          "use max_grad_norm > 0 and noise_multiplier >= 0")
    per_example = torch.stack([torch.cat([g.flatten() for g in client_gradient(model, x, y)])
                               for x, y in zip(images.split(1), labels.split(1), strict=True)])
    total = clip_rows(per_example, max_grad_norm).sum(0)
    noise = torch.randn(total.shape, generator=generator).to(total) * (noise_multiplier * max_grad_norm)
    update = (total + noise) / len(images)
    params = [p for p in model.parameters() if p.requires_grad]
    return [chunk.view_as(p) for chunk, p in zip(update.split([p.numel() for p in params]), params, strict=True)]


def recover_label(gradient: Sequence[torch.Tensor]) -> int:
    """iDLG: the label of a single example from its gradient. The last parameter must be the bias of the final
    linear layer under cross-entropy: its gradient ``softmax(z) - onehot(y)`` is negative only at ``y``."""
    bias_grad = gradient[-1]
    if bias_grad.dim() != 1:
        raise ConfigError("gradient", "the last gradient is not a bias vector",
                          "give the gradient of a model that ends with a Linear layer with bias, or the labels")
    return int(bias_grad.argmin())


@dataclass
class InversionResult:
    """Reconstructed images in [0, 1] (N, C, H, W), the labels used or recovered, and the final matching loss."""

    images: torch.Tensor
    labels: torch.Tensor
    loss: float

    def score(self, truth: torch.Tensor) -> dict[str, float]:
        """PSNR (dB) and SSIM of the reconstruction against the true images (both in [0, 1]), each the mean over the
        images of its per-image value, as Inverting Gradients reports them (a PSNR of the batch's pooled error
        would read one failed image in a batch as a failure of all)."""
        recon = self.images.clamp(0, 1).to(truth)
        return {"psnr": float(peak_signal_noise_ratio(recon, truth, data_range=1.0, dim=tuple(range(1, truth.dim())))),
                "ssim": float(structural_similarity_index_measure(recon, truth, data_range=1.0))}


#: ``observe(images, label_probabilities) -> tensors``: what a client would send for these images and labels
Observation = Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]]


def gradient_observation(model: nn.Module) -> Observation:
    """The observation of :func:`client_gradient`: the gradient of the mean cross-entropy against label
    probabilities ``p`` (the usual cross-entropy for one-hot ``p``), differentiable in the images."""
    params = [p for p in model.parameters() if p.requires_grad]

    def observe(images: torch.Tensor, probabilities: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss = -(probabilities * F.log_softmax(model(images), dim=-1)).sum(-1).mean()
        return torch.autograd.grad(loss, params, create_graph=True)

    return observe


class GradientInversion(Registered):
    """Base class of gradient-inversion attacks; ``class Mine(GradientInversion, name="mine")`` registers one.

    Args:
        iterations: optimizer iterations.
        seed: seed of the dummy images' initialization (and of DLG's dummy labels).
    """

    registry: Registry[GradientInversion] = Registry("gradient inversion attack")
    #: whether the attack must be given the labels of a batch of several images (it cannot optimize them)
    needs_labels: ClassVar[bool] = False

    def __init__(self, *, iterations: int, seed: int = 0) -> None:
        check_at_least_one("attack.iterations", iterations, "use e.g. 300")
        self.iterations = iterations
        self.seed = seed

    def attack(self, model: nn.Module, gradient: Sequence[torch.Tensor], *, input_shape: Sequence[int],
               num_images: int = 1, labels: torch.Tensor | None = None) -> InversionResult:
        """Reconstruct ``num_images`` images of ``input_shape`` (C, H, W) whose gradient matches ``gradient``.
        Labels: given, else recovered by iDLG for one image, else optimized (DLG)."""
        params = [p for p in model.parameters() if p.requires_grad]
        if len(params) != len(gradient) or any(p.shape != g.shape for p, g in zip(params, gradient, strict=False)):
            raise ConfigError("gradient", "does not match the model's trainable parameters in number or shape",
                              "give the gradient of this model, one tensor per trainable parameter, in order")
        check_at_least_one("num_images", num_images, "use 1 for a single example")
        if labels is None and num_images == 1:
            labels = torch.tensor([recover_label(gradient)])
        with torch.no_grad():
            num_classes = model(torch.zeros((1, *input_shape), device=params[0].device)).shape[-1]
        return self.invert(gradient_observation(model), gradient, input_shape=input_shape, num_images=num_images,
                           num_classes=num_classes, labels=labels)

    def invert(self, observe: Observation, observed: Sequence[torch.Tensor], *, input_shape: Sequence[int],
               num_images: int, num_classes: int, labels: torch.Tensor | None = None) -> InversionResult:
        """Reconstruct ``num_images`` images of ``input_shape`` (C, H, W) whose observation ``observe(x, p)``
        matches ``observed`` (on the observed tensors' device). ``labels``: class indices if known; else the
        attack optimizes soft labels over ``num_classes`` classes (DLG) or refuses (attacks that need them)."""
        check_at_least_one("num_images", num_images, "use 1 for a single example")
        device = observed[0].device
        onehot = None if labels is None else F.one_hot(labels.to(device), num_classes).float()
        generator = torch.Generator().manual_seed(self.seed)
        dummy = torch.rand((num_images, *input_shape), generator=generator).to(device).requires_grad_(True)
        return self.run(observe, list(observed), dummy, onehot, num_classes)

    def run(self, observe: Observation, observed: list[torch.Tensor], dummy: torch.Tensor,
            onehot: torch.Tensor | None, num_classes: int) -> InversionResult:
        """Optimize ``dummy`` (and soft labels where ``onehot`` is None); return the reconstruction."""
        raise NotImplementedError


class DLG(GradientInversion, name="dlg"):
    """Deep Leakage from Gradients (Zhu et al., NeurIPS 2019): L2 matching of the observation with L-BFGS;
    with one image the label comes from iDLG (Zhao et al., 2020), so only the image is optimized."""

    def __init__(self, *, iterations: int = 300, lr: float = 1.0, seed: int = 0) -> None:
        super().__init__(iterations=iterations, seed=seed)
        self.lr = lr

    def run(self, observe, observed, dummy, onehot, num_classes):
        variables, label_logits = [dummy], None
        if onehot is None:
            label_logits = torch.randn((dummy.shape[0], num_classes), device=dummy.device,
                                       generator=torch.Generator(device=dummy.device).manual_seed(self.seed))
            label_logits.requires_grad_(True)
            variables.append(label_logits)
        optimizer = torch.optim.LBFGS(variables, lr=self.lr, max_iter=self.iterations, history_size=100,
                                      line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-14)
        state = {"loss": float("inf")}

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            probabilities = onehot if onehot is not None else F.softmax(label_logits, dim=-1)
            matched = observe(dummy, probabilities)
            loss = sum(((d - o) ** 2).sum() for d, o in zip(matched, observed, strict=True))
            loss.backward()
            state["loss"] = float(loss.detach())
            return loss

        optimizer.step(closure)
        recovered = onehot.argmax(-1) if onehot is not None else label_logits.argmax(-1)
        return InversionResult(dummy.detach().clamp(0, 1), recovered.detach().cpu(), state["loss"])


class InvertingGradients(GradientInversion, name="inverting_gradients"):
    """Inverting Gradients (Geiping et al., NeurIPS 2020): cosine distance of the whole observation plus total
    variation, Adam on the signed gradient, learning rate divided by 10 at 3/8, 5/8 and 7/8 of the run, images
    kept in [0, 1]. Labels must be known or recoverable (one image)."""

    needs_labels = True

    def __init__(self, *, iterations: int = 2000, lr: float = 0.1, tv_weight: float = 1e-4, seed: int = 0) -> None:
        super().__init__(iterations=iterations, seed=seed)
        if tv_weight < 0:
            raise ConfigError("attack.tv_weight", f"must be >= 0, got {tv_weight}", "use e.g. 1e-4")
        self.lr, self.tv_weight = lr, tv_weight

    def run(self, observe, observed, dummy, onehot, num_classes):
        if onehot is None:
            raise ConfigError("labels", "Inverting Gradients needs the labels of a batch of several images",
                              "give labels, or attack one image (its label is recovered)")
        optimizer = torch.optim.Adam([dummy], lr=self.lr)
        milestones = [int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        target_norm = torch.sqrt(sum((o ** 2).sum() for o in observed))
        loss = torch.tensor(float("inf"))
        for _ in range(self.iterations):
            optimizer.zero_grad()
            matched = observe(dummy, onehot)
            dot = sum((d * o).sum() for d, o in zip(matched, observed, strict=True))
            norm = torch.sqrt(sum((d ** 2).sum() for d in matched))
            tv = (dummy[..., 1:, :] - dummy[..., :-1, :]).abs().mean() + (dummy[..., 1:] - dummy[..., :-1]).abs().mean()
            loss = 1 - dot / (norm * target_norm + 1e-12) + self.tv_weight * tv
            loss.backward()
            dummy.grad.sign_()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                dummy.clamp_(0, 1)
        return InversionResult(dummy.detach(), onehot.argmax(-1).cpu(), float(loss.detach()))
