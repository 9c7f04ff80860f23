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

Reconstructions are scored against the true images with PSNR and SSIM (torchmetrics, data range 1). A
defence is measured by the PSNR the attack still reaches: clipping and noising the update (DP-SGD), or
sending no gradient at all (the generative-privacy pipeline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
        """PSNR (dB) and SSIM of the reconstruction against the true images (both in [0, 1])."""
        recon = self.images.clamp(0, 1).to(truth)
        return {"psnr": float(peak_signal_noise_ratio(recon, truth, data_range=1.0)),
                "ssim": float(structural_similarity_index_measure(recon, truth, data_range=1.0))}


class GradientInversion(Registered):
    """Base class of gradient-inversion attacks; ``class Mine(GradientInversion, name="mine")`` registers one.

    Args:
        iterations: optimizer iterations.
        seed: seed of the dummy images' initialization.
    """

    registry: Registry[GradientInversion] = Registry("gradient inversion attack")

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
        device = params[0].device
        gradient = [g.to(device) for g in gradient]
        if labels is None and num_images == 1:
            labels = torch.tensor([recover_label(gradient)])
        generator = torch.Generator().manual_seed(self.seed)
        dummy = torch.rand((num_images, *input_shape), generator=generator).to(device).requires_grad_(True)
        return self.run(model, params, gradient, dummy, None if labels is None else labels.to(device))

    def run(self, model: nn.Module, params: list[nn.Parameter], gradient: list[torch.Tensor], dummy: torch.Tensor,
            labels: torch.Tensor | None) -> InversionResult:
        raise NotImplementedError


def _dummy_gradient(model: nn.Module, params: list[nn.Parameter], images: torch.Tensor,
                    labels: torch.Tensor | None, label_logits: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    logits = model(images)
    if labels is not None:
        loss = F.cross_entropy(logits, labels)
    else:  # DLG's soft labels
        loss = torch.sum(-F.softmax(label_logits, dim=-1) * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return torch.autograd.grad(loss, params, create_graph=True)


class DLG(GradientInversion, name="dlg"):
    """Deep Leakage from Gradients (Zhu et al., NeurIPS 2019): L2 gradient matching with L-BFGS; with one
    image the label comes from iDLG (Zhao et al., 2020), so only the image is optimized."""

    def __init__(self, *, iterations: int = 300, lr: float = 1.0, seed: int = 0) -> None:
        super().__init__(iterations=iterations, seed=seed)
        self.lr = lr

    def run(self, model, params, gradient, dummy, labels):
        label_logits = None
        variables = [dummy]
        if labels is None:
            label_logits = torch.randn((dummy.shape[0], model(dummy[:1]).shape[-1]), device=dummy.device,
                                       generator=torch.Generator(device=dummy.device).manual_seed(self.seed))
            label_logits.requires_grad_(True)
            variables.append(label_logits)
        optimizer = torch.optim.LBFGS(variables, lr=self.lr, max_iter=self.iterations, history_size=100,
                                      line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-14)
        state = {"loss": float("inf")}

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            matched = _dummy_gradient(model, params, dummy, labels, label_logits)
            loss = sum(((d - g) ** 2).sum() for d, g in zip(matched, gradient, strict=True))
            loss.backward()
            state["loss"] = float(loss.detach())
            return loss

        optimizer.step(closure)
        recovered = labels if labels is not None else label_logits.argmax(-1)
        return InversionResult(dummy.detach().clamp(0, 1), recovered.detach().cpu(), state["loss"])


class InvertingGradients(GradientInversion, name="inverting_gradients"):
    """Inverting Gradients (Geiping et al., NeurIPS 2020): cosine distance of the whole gradient plus total
    variation, Adam on the signed gradient, learning rate divided by 10 at 3/8, 5/8 and 7/8 of the run, images
    kept in [0, 1]. Labels must be known or recoverable (one image)."""

    def __init__(self, *, iterations: int = 2000, lr: float = 0.1, tv_weight: float = 1e-4, seed: int = 0) -> None:
        super().__init__(iterations=iterations, seed=seed)
        if tv_weight < 0:
            raise ConfigError("attack.tv_weight", f"must be >= 0, got {tv_weight}", "use e.g. 1e-4")
        self.lr, self.tv_weight = lr, tv_weight

    def run(self, model, params, gradient, dummy, labels):
        if labels is None:
            raise ConfigError("labels", "Inverting Gradients needs the labels of a batch of several images",
                              "give labels, or attack one image (its label is recovered)")
        optimizer = torch.optim.Adam([dummy], lr=self.lr)
        milestones = [int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        target_norm = torch.sqrt(sum((g ** 2).sum() for g in gradient))
        loss = torch.tensor(float("inf"))
        for _ in range(self.iterations):
            optimizer.zero_grad()
            matched = _dummy_gradient(model, params, dummy, labels, None)
            dot = sum((d * g).sum() for d, g in zip(matched, gradient, strict=True))
            norm = torch.sqrt(sum((d ** 2).sum() for d in matched))
            tv = (dummy[..., 1:, :] - dummy[..., :-1, :]).abs().mean() + (dummy[..., 1:] - dummy[..., :-1]).abs().mean()
            loss = 1 - dot / (norm * target_norm + 1e-12) + self.tv_weight * tv
            loss.backward()
            dummy.grad.sign_()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                dummy.clamp_(0, 1)
        return InversionResult(dummy.detach(), labels.detach().cpu(), float(loss.detach()))
