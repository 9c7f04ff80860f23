"""DP diffusion: a class-conditional DDPM trained with DP-SGD (DPDM; Dockhorn, Cao, Vahdat, Kreis, TMLR 2023).

Training objective (Ho, Jain, Abbeel, NeurIPS 2020). Pixels are scaled to [-1, 1]. For a private example
``(x_0, y)`` and each of its K noise draws ``k``, with a step ``t_k`` drawn from ``timesteps`` (below),
``eps_k ~ N(0, I)``, ``a = sqrt(abar_{t_k})`` and ``s = sqrt(1 - abar_{t_k})``,

    x_k = a x_0 + s eps_k,
    loss(x_0, y) = (1 / K) sum_k mean_pixels (f_theta(x_k, t_k, y) - target_k)^2,

with ``target_k = a eps_k - s x_0`` (v-prediction, the default) or ``eps_k`` (noise prediction).

Which steps train (``timesteps``). ``"uniform"``: ``t_k ~ U{0, ..., T-1}`` (DDPM). ``"lognormal"``: the noise
level ``sigma_t = s / a`` (noise-to-signal ratio) is drawn as ``log sigma ~ N(P_mean, P_std^2)`` and mapped to the
step of the nearest ``log sigma_t`` (EDM's training distribution, Karras et al., NeurIPS 2022, which DPDM trains
with: ``P_mean = -1.2``, ``P_std = 1.2``). On the linear schedule with T = 1000, uniform steps put half of the
draws at ``sigma_t > 3.4``, where the image is nearly pure noise; the log-normal puts 2% there and half below
``sigma = 0.3``.

The K draws are averaged *inside* the example's loss before its gradient is clipped (noise multiplicity, DPDM):
one example still moves the clipped sum by at most C, so the privacy cost is that of the DP-SGD steps alone,
independent of K, while the gradient's variance drops. fedgen's clipping engine does this without K per-draw
gradients (:meth:`fedgen.mechanisms.DPSGD.backward` with ``draws=K``).

Stratified draws (``stratified_draws``): instead of K independent steps, draw k of an example takes its step from
the k-th of K equal-probability strata of the ``timesteps`` distribution, ``u_k = (k + U_k) / K`` with
``U_k ~ U[0, 1)`` mapped through the distribution's inverse CDF. Every row is still distributed as before, so the
loss is unbiased, and the part of the K-draw loss's variance that comes from which steps were drawn shrinks to the
spread within a stratum (stratified sampling; the per-batch low-discrepancy steps of Kingma et al., NeurIPS 2021,
taken inside each example). The draws stay inside the example's clipped loss: no privacy cost.

- DP-SGD (:class:`~fedgen.mechanisms.DPSGD`): Poisson sampling with expected batch ``batch_size``. A logical
  batch may be processed in physical micro-batches of at most ``max_physical_examples`` examples; their
  clipped sums add up and the step adds its noise once, so the sampling and the accounting are unchanged.
- Augmentation multiplicity (``augment_shift``, ``augment_flip``): each of an example's K rows is its own shifted or
  mirrored view, inside the example's clipped loss (no privacy cost). With ``augment_conditioning`` the UNet is told
  each row's view and samples the unaugmented one (Karras et al., NeurIPS 2020 and 2022).
- Classifier-free guidance (Ho and Salimans, 2021): during training each row's label is replaced by a null class
  with probability ``label_dropout``; sampling uses ``eps = (1 + w) eps(x, y) - w eps(x, null)``.
- EMA of the weights (``ema_decay``, its warm-up's power ``ema_power``): post-processing of the privatized updates,
  no privacy cost. Samples come from the EMA weights.
- Sampling: DDIM (Song, Meng, Ermon, ICLR 2021) with ``sampling_steps`` steps and ``sampling_eta`` of DDPM's
  posterior noise at each (0: deterministic), or the DDPM ancestral sampler.
- Procedural pretraining (``procedural_pretraining``): before anything private, plain steps of the unconditional
  loss on images painted by code (:class:`~fedgen.generators.pretraining.ProceduralPretraining`): no data, no
  privacy cost.
- Label check (``label_check_steps``): the generator classifies its own samples by Bayes' rule,
  ``p(c | x) ∝ p(x | c)``, with the prediction error under label c, averaged over a few steps, standing in for
  ``-log p(x | c)`` (the diffusion classifier of Li et al., ICCV 2023, and Clark & Jaini, NeurIPS 2023); a sample
  whose class is not its label is drawn again. Post-processing of the trained generator: no privacy cost.

The network is diffusers' ``UNet2DModel`` with class embeddings; the schedulers are diffusers'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset

from fedgen.data.augment import check_shift, check_tilt, flip_randomly, move_randomly, shift_randomly
from fedgen.errors import ConfigError, check_at_least_one, check_fits_in_memory
from fedgen.generators.base import Generator
from fedgen.generators.central_images import CentralImages
from fedgen.generators.merf_images import MerfImages
from fedgen.generators.pretraining import ProceduralPretraining
from fedgen.generators.warm_up import WarmUpRelease
from fedgen.mechanisms import DPSGD, CapturedBackward
from fedgen.mechanisms.ledger import SubsampledGaussianEvent, compute_epsilon
from fedgen.mechanisms.per_example import unsupported_layers

log = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def repeat_2x(x: torch.Tensor) -> torch.Tensor:
    """Each pixel of ``x`` (N, C, H, W) repeated over a 2x2 square (nearest-neighbour upsampling by 2), as the copy
    of a broadcast view: its backward is a plain sum over each square."""
    n, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def upsample_nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="nearest")``, by :func:`repeat_2x` on CUDA. There the backward of
    ``upsample_nearest2d`` was the slow part: on one H200, at the epsilon-10 example's shapes (16,384 rows of 32
    channels at 14x14 and 7x7), it took 17.8 and 14.6 ms against 3.2 and 0.8 ms for the sum over the squares
    (docs/benchmarks.md). On the CPU, where interpolate's backward was the faster one, interpolate."""
    return repeat_2x(x) if x.is_cuda else F.interpolate(x, scale_factor=2.0, mode="nearest")


class NearestUpsample2D(nn.Module):
    """diffusers' ``Upsample2D`` with a convolution (nearest-neighbour upsampling by 2, then ``conv``), upsampling
    by :func:`upsample_nearest_2x`. The convolution keeps its attribute name, so the state dict and the
    checkpoints are those of ``Upsample2D``."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if output_size is None:
            hidden_states = upsample_nearest_2x(hidden_states)
        else:  # contiguous first, as Upsample2D does: CUDA's channels-last nearest kernel fails on large inputs
            hidden_states = F.interpolate(hidden_states.contiguous(), size=output_size, mode="nearest")
        return self.conv(hidden_states)


def build_unet(*, num_classes: int, image_shape: tuple[int, int, int], block_channels: tuple[int, ...],
               attention: tuple[bool, ...], layers_per_block: int, norm_groups: int,
               zero_init_residual: bool = False, attention_head_dim: int | None = 8, num_views: int = 1
               ) -> UNet2DModel:
    """diffusers' UNet2DModel with one class embedding per class plus a null class (index ``num_classes``), its
    upsamplers on :class:`NearestUpsample2D`. With ``num_views > 1`` the class embedding is a
    :class:`LabelAndViewEmbedding`: the UNet then takes each row's label and view index as ``class_labels`` (N, 2).

    Self-attention runs at the levels that ``attention`` names and always in the middle block (the last level's
    resolution), with heads of ``attention_head_dim`` channels each; ``None``: one head as wide as its block, the
    single-head attention of DDPM++ (Song et al., ICLR 2021).

    ``zero_init_residual``: the last layer of every residual branch (each ResNet block's second convolution, each
    attention block's output projection) and the output convolution start at zero, so that every block starts
    as the identity and the UNet's first output is 0: the initialization of the DDPM++ network (Song et al.,
    ICLR 2021) that DPDM trains (its ``init_scale`` of 0)."""
    c, h, w = image_shape
    levels = len(block_channels)
    if levels < 1 or any(not isinstance(ch, int) or ch < 1 for ch in block_channels):
        raise ConfigError("model.block_channels", f"must be one or more positive channel counts, got "
                          f"{list(block_channels)}", "use e.g. [16, 32, 32]")
    if len(attention) != levels:
        raise ConfigError("model.attention", f"has {len(attention)} entries for {levels} levels",
                          "give one true/false per entry of block_channels")
    if any(ch % norm_groups for ch in block_channels):
        raise ConfigError("model.norm_groups", f"{norm_groups} does not divide every channel count of "
                          f"{list(block_channels)}", "use e.g. 8 or 32 with channels that are multiples of it")
    if attention_head_dim is not None:
        check_at_least_one("model.attention_head_dim", attention_head_dim, "use e.g. 8, or null for one head")
        attending = [ch for ch, a in zip(block_channels, attention, strict=True) if a] + [block_channels[-1]]
        if any(ch % attention_head_dim for ch in attending):
            raise ConfigError("model.attention_head_dim", f"{attention_head_dim} channels per head do not divide "
                              f"the attention blocks' channels {sorted(set(attending))}",
                              "use a divisor of each, or null for one head per block")
    factor = 2 ** (levels - 1)
    if h % factor or w % factor:
        raise ConfigError("model.block_channels", f"{levels} levels halve the {h}x{w} images {levels - 1} times, "
                          "which needs sizes divisible by " + str(factor), "use fewer levels (28x28 takes 3)")
    unet = UNet2DModel(
        sample_size=(h, w), in_channels=c, out_channels=c, block_out_channels=tuple(block_channels),
        layers_per_block=layers_per_block, norm_num_groups=norm_groups, num_class_embeds=num_classes + 1,
        attention_head_dim=attention_head_dim,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
    )
    for block in unet.up_blocks:
        for i, up in enumerate(block.upsamplers or ()):
            if (type(up) is Upsample2D and up.use_conv and up.interpolate and not up.use_conv_transpose
                    and up.norm is None and up.name == "conv"):
                block.upsamplers[i] = NearestUpsample2D(up.conv)
    if num_views > 1:
        unet.class_embedding = LabelAndViewEmbedding(unet.class_embedding, num_views)
    if zero_init_residual:
        last_layers = [unet.conv_out]
        for module in unet.modules():
            if isinstance(module, ResnetBlock2D):
                last_layers.append(module.conv2)
            elif isinstance(module, Attention):
                last_layers.append(module.to_out[0])
        for layer in last_layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    return unet


def ema_with_warmup(decay: float, power: float = 8.0
                    ) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], None]:
    """The EMA update ``avg <- r avg + (1 - r) w`` with ``r = min(decay, (1 + n) / (power + 2 + n))`` after n
    updates. Until the cap ``decay`` is reached, the average after N updates weighs update t's weights in
    proportion to about t^power: the power-function EMA of Karras et al. (CVPR 2024, "Analyzing and Improving
    the Training Dynamics of Diffusion Models"), whose length scales with the run. power 0 is the mean of every
    update's weights (the first counted twice); with the default 8 the averaged weights' mean age is a tenth of
    the run. A plain EMA of decay 0.999 would instead still weigh the random initial weights by 0.999^500 = 0.6
    after 500 steps, and DP runs are short."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (power + 2.0 + n)))
    return update


def train_only(unet: nn.Module, parts: Sequence[str] | None) -> list[nn.Parameter]:
    """Let gradients reach only the parameters of ``unet`` whose names contain one of ``parts`` (None: every
    parameter), and return those: what DP-SGD trains under ``private_trainable``."""
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(parts is None or any(part in name for part in parts))
    return [parameter for parameter in unet.parameters() if parameter.requires_grad]


def check_started_with(field: str, here: Any, started: Any) -> None:
    """Refuse to resume a run whose checkpoint was started with another setting of ``field`` than ``here``."""
    if here != started:
        raise ConfigError(field, f"is {here} here, but the checkpoint's run was started with {started}",
                          f"resume with {field.rsplit('.', 1)[-1]}: {started}")


#: checkpoint key of the state of the clients that compute the steps (:class:`StepClients`)
CLIENTS_KEY = "fedgen_step_clients"
#: where a checkpoint keeps the settings of the procedural pretraining its run started with
PROCEDURAL_KEY = "fedgen_procedural_pretraining"
WARM_UPS_KEY = "fedgen_warm_ups"


class StepClients(Protocol):
    """The clients that compute a DP-SGD step together: how many, and the secure sum of their clipped sums
    (returning the total and its L2 sensitivity to one example); their state (e.g. cost counters) travels
    in the generator's checkpoints."""

    num_clients: int

    def secure_sum(self, parts: list[torch.Tensor]) -> tuple[torch.Tensor, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LabelAndViewEmbedding(nn.Module):
    """The UNet's class embedding conditioned on the augmented view as well: for ``class_labels`` of shape (N, 2)
    holding each row's label and view index, ``labels(label) + views(view)``. The view table starts at zero, so
    the UNet starts as the one conditioned on labels alone."""

    def __init__(self, labels: nn.Embedding, num_views: int) -> None:
        super().__init__()
        self.labels = labels
        self.views = nn.Embedding(num_views, labels.embedding_dim)
        nn.init.zeros_(self.views.weight)

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        return self.labels(class_labels[:, 0]) + self.views(class_labels[:, 1])


class DPDiffusion(Generator, name="dp_diffusion"):
    """Class-conditional DDPM trained with DP-SGD and noise multiplicity (DPDM, Dockhorn et al., TMLR 2023).

    Args:
        mechanism: a :class:`~fedgen.mechanisms.DPSGD`; noise multiplicity needs fedgen's clipping engine
            (``engine: auto`` or ``fedgen``).
        num_classes: number of classes.
        image_shape: (channels, height, width).
        block_channels: channels of the UNet's levels (each level but the last halves the resolution).
        attention: per level, whether its blocks have self-attention (the middle block always has it).
        attention_head_dim: channels per attention head; ``None``: one head per attention block, as wide as it.
        layers_per_block: residual blocks per level.
        zero_init_residual: start every residual branch and the output at zero, as DPDM's DDPM++ network does
            (see :func:`build_unet`).
        norm_groups: GroupNorm groups.
        num_train_timesteps: T, diffusion steps of the training schedule.
        beta_schedule: the variance schedule (diffusers' names).
        prediction: what the UNet predicts from ``x_t = a_t x_0 + s_t eps``: ``"epsilon"`` (the noise, as DDPM)
            or ``"v_prediction"`` (``v = a_t eps - s_t x_0``, Salimans & Ho 2022). With v the sampler's
            ``x_0 = a_t x_t - s_t v`` never divides by a small ``a_t``, so at high noise the UNet's errors are not
            amplified into the image; the same preconditioning role as DPDM's EDM denoiser. Under DP-SGD's
            noisy gradients this is what removes the residual noise from the samples.
        timesteps: how training steps are drawn: ``"uniform"`` or ``"lognormal"`` (see the module's docstring).
        lognormal_mean: P_mean, the mean of ``log sigma`` for ``timesteps: lognormal``.
        lognormal_std: P_std, its standard deviation.
        noise_draws: K, noise draws averaged inside each example's loss.
        stratified_draws: draw the K steps of an example from the K strata of ``timesteps``, one each (see the
            module's docstring); with K = 1 the one stratum is the whole distribution.
        augment_shift: s > 0 shifts the image of each of an example's K rows by its own random offset in
            ``[-s, s]^2`` pixels, zero-filled, before its noise (augmentation multiplicity, De et al., 2022): the
            example's loss then averages over K views as well as K noise draws. An example still changes only its
            own K rows, so the privacy cost is unchanged; the generator learns the shifted images' distribution.
            For images on a zero background (MNIST, Fashion-MNIST); 0 turns it off.
        augment_flip: mirror the image of each of an example's K rows left to right on its own coin (after the
            shift), augmentation multiplicity as ``augment_shift``, privacy unchanged. Only for data whose classes
            keep their meaning in a mirror (garments; not digits or letters): the generator learns both
            orientations.
        augment_conditioning: tell the UNet each row's view (its shift and mirroring, as an index into a view
            embedding added to the label's, :class:`LabelAndViewEmbedding`) and sample the unaugmented view, so the
            augmentations train the UNet without leaking into the samples (the augmentation conditioning of Karras
            et al., NeurIPS 2020 and 2022). Without it the generator draws shifted and mirrored images as it was
            trained on them. Needs ``augment_shift`` or ``augment_flip``; post-processing of the trained UNet's
            choice of view, so the privacy cost is unchanged.
        batch_size: expected logical batch size of the Poisson sampler.
        max_physical_examples: examples per forward pass (each with K rows); a larger logical batch is
            processed in micro-batches. Default: the whole logical batch at once.
        cuda_graphs: replay each micro-batch's forward pass and clipped backward pass from a CUDA graph
            (:class:`~fedgen.mechanisms.CapturedBackward`): micro-batches of exactly ``max_physical_examples``
            examples, the last one padded with rows of weight 0, so the clipped sums, the noise and the ledger are
            those of the eager step. It saves the host's kernel launches, which bound small steps (on one H200, 300
            steps of the MNIST example's UNet at batch 256 trained in 7.5 s against 21.5 to 35.1 s eagerly;
            docs/benchmarks.md); large micro-batches are bound by the GPU and gain little. Every micro-batch costs
            a full one, padding included: set ``max_physical_examples`` a little above the Poisson sample's usual
            size (``batch_size`` + 4 sqrt(batch_size)) for one micro-batch a step, or well below it. Needs a CUDA
            device and ``max_physical_examples``; the graph's memory pool holds one micro-batch's activations.
            Central steps only (a federated step keeps one clipped sum per client).
        lr: Adam learning rate.
        lr_schedule: ``"constant"``, or ``"cosine"``: ``lr (1 + cos(pi s / S)) / 2`` at DP-SGD step s of the S
            steps the mechanism planned (Loshchilov & Hutter, 2017), so the last steps, whose noise the EMA
            would otherwise average over, move the weights less.
        ema_decay: decay of the exponential moving average of the weights, reached after a warm-up (0 disables
            it); see :func:`ema_with_warmup`.
        ema_power: the warm-up's power gamma >= 0: before the decay is reached, the average weighs step t's
            weights by about t^gamma (0: the mean of all steps' weights; larger: the last steps'); see
            :func:`ema_with_warmup`.
        label_dropout: probability of replacing a label by the null class during training (for guidance).
        guidance_scale: w of classifier-free guidance at sampling (0: plain conditional sampling).
        sampler: ``"ddim"``, ``"ddpm"`` or ``"edm"`` (Karras et al.'s stochastic Heun sampler, :meth:`_draw_edm`;
            2 ``sampling_steps`` - 1 UNet evaluations).
        sampling_steps: denoising steps of the sampler.
        sampling_eta: DDIM's eta, how much fresh noise each sampling step draws: 0 none (deterministic DDIM), 1
            the variance of DDPM's posterior between the sampler's two steps (ancestral sampling on DDIM's
            stride), in between a share of it (Song, Meng and Ermon, 2021, eq. 16). For ``sampler: ddim``.
        sampling_churn: S_churn of the edm sampler: before each step whose noise level sigma lies in
            ``churn_range``, fresh noise raises it to sigma (1 + gamma), gamma = min(S_churn / steps, sqrt(2) - 1)
            (0: the deterministic Heun sampler).
        churn_range: [S_min, S_max], the noise levels sigma = sqrt((1 - abar_t) / abar_t) that churn.
        label_check_steps: the diffusion steps at which :meth:`classify` reads the generator's own class of each
            sample; a sample whose class is not its label is drawn again (see :meth:`sample`). ``None`` (the
            default): no check. E.g. ``[100, 200, ..., 900]`` for T = 1000.
        label_check_rounds: the most times a sample that fails the check is drawn again; one that still fails is
            kept as last drawn, so the labels' proportions never change.
        sample_shift: s > 0 releases each drawn image moved by its own random offset in ``[-s, s]^2`` pixels (zero
            fill; :func:`~fedgen.data.augment.shift_randomly`, the views of ``augment_shift``), after the label
            check: post-processing, at no privacy cost. A classifier trained on the released set then cannot key on
            where the generator draws. 0 (the default): the images as drawn. On two draws of the epsilon-1 MNIST
            example's generator, 2 raised the downstream ConvNet from 93.59% / 94.07% to 95.66% / 95.57%
            (docs/benchmarks.md, "The shifted release through the pipeline").
        sample_rotation: r > 0 turns each released image about its centre by its own random angle in [-r, r]
            degrees, and ``sample_scale`` f > 0 scales it by its own factor in [1 - f, 1 + f], both before the shift
            (bilinear, zero fill; :func:`~fedgen.data.augment.move_randomly`): post-processing, at no privacy cost,
            like the shift. 0 (the defaults): no turn, no scaling. What each does to accuracy: docs/benchmarks.md,
            "Turned and scaled releases" and "Run 92".
        central_images: a warm-up on DP central images before DP-SGD (:class:`~fedgen.generators.central_images.
            CentralImages`; part of the budget, on the same ledger): run by :meth:`warm_up`.
        merf_images: a warm-up on a DP-Merf generator's samples (:class:`~fedgen.generators.merf_images.
            MerfImages`; part of the budget, on the same ledger): run by :meth:`warm_up`, after the central images'
            when both are set (the spatial-then-frequency curriculum of FETA-Pro, Gong et al., 2026).
        procedural_pretraining: unconditional pretraining on images painted by code, before the warm-up and
            DP-SGD (:class:`~fedgen.generators.pretraining.ProceduralPretraining`; no data, no privacy cost): run by
            :meth:`pretrain_on_procedural_images`.
        private_trainable: parts of the UNet's parameter names (e.g. ``["attentions", "norm"]``): DP-SGD trains only
            the parameters whose names contain one of them and leaves the rest as the warm-up or pretraining left
            them (all are trained before DP-SGD). DP-SGD's noise then spreads over fewer coordinates, at the cost of
            what the frozen ones could still learn. ``None``: every parameter.
    """

    release_fields = ("sample_shift", "sample_rotation", "sample_scale")  # the moves applied to each drawn image
    sampling_fields = ("sampler", "sampling_steps", "sampling_eta", "sampling_churn", "churn_range",
                       "guidance_scale", "label_check_steps", "label_check_rounds", *release_fields)

    def __init__(self, *, mechanism: DPSGD, num_classes: int = 10, image_shape: tuple[int, int, int] = (1, 28, 28),
                 block_channels: tuple[int, ...] = (32, 64, 64), attention: tuple[bool, ...] = (False, True, False),
                 attention_head_dim: int | None = 8,
                 layers_per_block: int = 1, norm_groups: int = 8, zero_init_residual: bool = False,
                 num_train_timesteps: int = 1000,
                 beta_schedule: str = "linear", prediction: Literal["epsilon", "v_prediction"] = "v_prediction",
                 timesteps: Literal["uniform", "lognormal"] = "uniform", lognormal_mean: float = -1.2,
                 lognormal_std: float = 1.2, noise_draws: int = 4, stratified_draws: bool = False,
                 augment_shift: int = 0, augment_flip: bool = False, augment_conditioning: bool = False,
                 batch_size: int = 256,
                 max_physical_examples: int | None = None, cuda_graphs: bool = False, lr: float = 3e-4,
                 lr_schedule: Literal["constant", "cosine"] = "constant", ema_decay: float = 0.999,
                 ema_power: float = 8.0, label_dropout: float = 0.1, guidance_scale: float = 0.0,
                 sampler: Literal["ddim", "ddpm", "edm"] = "ddim", sampling_steps: int = 50, sampling_eta: float = 0.0,
                 sampling_churn: float = 0.0, churn_range: tuple[float, float] = (0.05, 50.0),
                 label_check_steps: list[int] | None = None, label_check_rounds: int = 3, sample_shift: int = 0,
                 sample_rotation: float = 0.0, sample_scale: float = 0.0,
                 central_images: CentralImages | None = None, merf_images: MerfImages | None = None,
                 procedural_pretraining: ProceduralPretraining | None = None,
                 private_trainable: list[str] | None = None) -> None:
        super().__init__(mechanism=mechanism, num_classes=num_classes, image_shape=image_shape)
        if not isinstance(mechanism, DPSGD):
            raise ConfigError("model.mechanism", f"DP diffusion trains with DP-SGD, got {type(mechanism).__name__}",
                              "use class_path: fedgen.mechanisms.DPSGD")
        if mechanism.engine == "opacus":
            raise ConfigError("model.mechanism.engine", "Opacus' engine clips each of the K noisy copies of an "
                              "example separately (no noise multiplicity)", "use engine: auto or fedgen")
        for field, value in (("noise_draws", noise_draws), ("batch_size", batch_size),
                             ("layers_per_block", layers_per_block), ("num_train_timesteps", num_train_timesteps),
                             ("sampling_steps", sampling_steps)):
            check_at_least_one(f"model.{field}", value, "use a positive integer")
        if max_physical_examples is not None:
            check_at_least_one("model.max_physical_examples", max_physical_examples, "use e.g. 256, or null")
        if cuda_graphs and max_physical_examples is None:
            raise ConfigError("model.cuda_graphs", "a captured pass takes micro-batches of one fixed size",
                              "set model.init_args.max_physical_examples (e.g. to batch_size), or cuda_graphs: false")
        if beta_schedule not in BETA_SCHEDULES:
            raise ConfigError("model.beta_schedule", f"unknown schedule {beta_schedule!r}",
                              f"use one of {list(BETA_SCHEDULES)}")
        if prediction not in ("epsilon", "v_prediction"):
            raise ConfigError("model.prediction", f"unknown target {prediction!r}", "use v_prediction or epsilon")
        if timesteps not in ("uniform", "lognormal"):
            raise ConfigError("model.timesteps", f"unknown distribution {timesteps!r}", "use uniform or lognormal")
        if not lognormal_std > 0:
            raise ConfigError("model.lognormal_std", f"must be > 0, got {lognormal_std}", "use e.g. 1.2")
        check_shift("model.augment_shift", augment_shift, image_shape)
        check_shift("model.sample_shift", sample_shift, image_shape)
        check_tilt("model.sample_rotation", sample_rotation, "model.sample_scale", sample_scale)
        if augment_conditioning and not (augment_shift or augment_flip):
            raise ConfigError("model.augment_conditioning", "conditions the UNet on the augmented view, but no "
                              "augmentation is set", "set augment_shift (e.g. 2) or augment_flip, or "
                              "augment_conditioning: false")
        if sampler not in ("ddim", "ddpm", "edm"):
            raise ConfigError("model.sampler", f"unknown sampler {sampler!r}", "use ddim, ddpm or edm")
        if sampler == "ddpm" and sampling_steps != num_train_timesteps:
            raise ConfigError("model.sampling_steps", f"the DDPM sampler runs all {num_train_timesteps} steps, "
                              f"got {sampling_steps}", "use sampler: ddim for fewer steps")
        if sampler == "ddim" and sampling_steps > num_train_timesteps:
            raise ConfigError("model.sampling_steps", f"{sampling_steps} DDIM steps for {num_train_timesteps} "
                              "training timesteps", f"use at most {num_train_timesteps}, e.g. 50")
        if not 0 <= sampling_eta <= 1:
            raise ConfigError("model.sampling_eta", f"must be in [0, 1], got {sampling_eta}",
                              "use 0 (deterministic DDIM) to 1 (ancestral)")
        if sampler != "ddim" and sampling_eta:
            raise ConfigError("model.sampling_eta", f"applies to the DDIM sampler, not {sampler}",
                              "use sampler: ddim, or sampling_eta: 0 (edm's fresh noise is sampling_churn)")
        if sampling_churn < 0 or (sampling_churn and sampler != "edm"):
            raise ConfigError("model.sampling_churn", f"{sampling_churn} with sampler {sampler}: churn is the "
                              "edm sampler's fresh noise, at least 0", "use sampler: edm with e.g. sampling_churn: "
                              "10, or sampling_churn: 0")
        if len(churn_range) != 2 or not 0 <= churn_range[0] < churn_range[1]:
            raise ConfigError("model.churn_range", f"{churn_range} is not [lowest, highest] noise level with "
                              "0 <= lowest < highest", "use e.g. [0.05, 50]")
        if label_check_steps is not None and (not label_check_steps or
                                              not all(0 <= step < num_train_timesteps for step in label_check_steps)):
            raise ConfigError("model.label_check_steps", f"{label_check_steps} is not a non-empty list of steps in "
                              f"[0, {num_train_timesteps})", "use e.g. [100, 200, 300, 400, 500, 600, 700, 800, 900], "
                              "or null for no check")
        check_at_least_one("model.label_check_rounds", label_check_rounds, "use e.g. 3")
        if not 0 <= ema_decay < 1:
            raise ConfigError("model.ema_decay", f"must be in [0, 1), got {ema_decay}", "use e.g. 0.999, or 0")
        if not 0 <= ema_power < float("inf"):
            raise ConfigError("model.ema_power", f"must be a finite number >= 0, got {ema_power}", "use e.g. 8, or 0")
        if not 0 <= label_dropout < 1:
            raise ConfigError("model.label_dropout", f"must be in [0, 1), got {label_dropout}", "use e.g. 0.1")
        if guidance_scale < 0 or (guidance_scale > 0 and label_dropout == 0):
            raise ConfigError("model.guidance_scale", f"{guidance_scale} needs a model trained with label_dropout "
                              "> 0 (the unconditional model) and must be >= 0", "set label_dropout: 0.1, or 0")
        if not lr > 0:
            raise ConfigError("model.lr", f"must be > 0, got {lr}", "use e.g. 3e-4")
        if lr_schedule not in ("constant", "cosine"):
            raise ConfigError("model.lr_schedule", f"unknown schedule {lr_schedule!r}", "use constant or cosine")
        #: the warm-up releases (:class:`~fedgen.generators.warm_up.WarmUpRelease`), in the order they run: coarse
        #: class means before DP-Merf's samples
        self.warm_up_releases: tuple[WarmUpRelease, ...] = tuple(
            release for release in (central_images, merf_images) if release is not None)
        for i, release in enumerate(self.warm_up_releases):
            release.check(mechanism, image_shape=self.image_shape, earlier=self.warm_up_releases[:i])
        if (central_images is not None and merf_images is not None and central_images.epsilon == merf_images.epsilon
                and (central_images.releases, central_images.sample_rate) == (1, 1.0)):
            raise ConfigError("model.central_images", "one round at sample rate 1 and DP-Merf's release at the same "
                              "epsilon are the same Gaussian mechanism, which the ledger would merge into one event",
                              "use more rounds or a lower sample_rate for the central images")
        if procedural_pretraining is not None:
            procedural_pretraining.check()
        #: the pretraining on images painted by code (:class:`~fedgen.generators.pretraining.ProceduralPretraining`)
        self.procedural_pretraining = procedural_pretraining
        self.save_hyperparameters(ignore=["mechanism", "central_images", "merf_images", "procedural_pretraining"])
        self.unet = build_unet(num_classes=num_classes, image_shape=self.image_shape,
                               block_channels=tuple(block_channels), attention=tuple(attention),
                               layers_per_block=layers_per_block, norm_groups=norm_groups,
                               zero_init_residual=zero_init_residual, attention_head_dim=attention_head_dim,
                               num_views=self.num_views if augment_conditioning else 1)
        if private_trainable is not None:
            names = [name for name, _ in self.unet.named_parameters()]
            unmatched = [part for part in private_trainable if not any(part in name for name in names)]
            if not private_trainable or unmatched:
                raise ConfigError("model.private_trainable", f"{unmatched or 'an empty list'} names no parameter of "
                                  f"the UNet", f"use parts of its parameter names, e.g. attentions, norm, up_blocks "
                                  f"(the first of {len(names)}: {', '.join(names[:4])}), or null for all")
            if cuda_graphs:
                raise ConfigError("model.private_trainable", "is not supported with cuda_graphs",
                                  "set cuda_graphs: false, or private_trainable: null")
        unsupported = unsupported_layers(self.unet)
        if unsupported:  # engine "auto" would fall back to Opacus, which has no noise multiplicity
            raise ConfigError("model", f"fedgen's clipping engine cannot clip {'; '.join(unsupported)}",
                              "use the UNet options of DPDiffusion (Conv2d, Linear, GroupNorm, Embedding layers)")
        # the EMA copy is made before any clipping hook is attached to the UNet, and is never trained
        self.ema = (AveragedModel(self.unet, multi_avg_fn=ema_with_warmup(ema_decay, ema_power)) if ema_decay
                    else None)
        if self.ema is not None:
            self.ema.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                             prediction_type=prediction)
        abar = self.noise_scheduler.alphas_cumprod.double()
        #: sigma_t = sqrt((1 - abar_t) / abar_t) of each training step, increasing in t (float64, on the host): the
        #: noise levels that the lognormal step draws and the edm sampler map to steps
        self._noise_levels = ((1 - abar) / abar).sqrt()
        log_sigma = self._noise_levels.log()
        # a draw of log sigma maps to the step whose log sigma_t is nearest: cut at the midpoints
        self.register_buffer("_log_sigma_midpoints", ((log_sigma[1:] + log_sigma[:-1]) / 2).float(),
                             persistent=False)
        self.automatic_optimization = False  # one DP step per logical batch, over its micro-batches
        self._captured: CapturedBackward | None = None  # built at the first central step with cuda_graphs
        self._loader: DataLoader | None = None
        #: set by a federation (e.g. :class:`~fedgen.federated.FederatedDPSGD`): the clients that compute each step
        self.clients: StepClients | None = None
        #: the label check's counts over every :meth:`sample` since the generator was built (see sampling_report)
        self.label_check_counts = {"images": 0, "failed_first_draw": 0, "redraws": 0, "kept_failing": 0}

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def num_views(self) -> int:
        """How many views ``augment_shift`` and ``augment_flip`` make of an image: ``(2 s + 1)^2`` offsets, times 2
        with mirroring, numbered by :meth:`view_index`."""
        shift, flip = self.hparams.augment_shift, self.hparams.augment_flip
        return (2 * shift + 1) ** 2 * (2 if flip else 1)

    def view_index(self, offsets: torch.Tensor | int, mirrored: torch.Tensor | int) -> torch.Tensor | int:
        """The view of an offset index (as :func:`shift_randomly` numbers them) and a mirror flag (0 or 1)."""
        return offsets * (2 if self.hparams.augment_flip else 1) + mirrored

    @property
    def unaugmented_view(self) -> int:
        """The index of the image itself among the views: no shift, not mirrored."""
        shift = self.hparams.augment_shift
        return self.view_index(shift * (2 * shift + 2), 0)

    def conditioning(self, labels: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's ``class_labels`` for these labels: the labels, or with ``augment_conditioning`` each row's
        label and view stacked (N, 2), the view :attr:`unaugmented_view` where ``views`` is None (sampling)."""
        if not self.hparams.augment_conditioning:
            return labels
        if views is None:
            views = torch.full_like(labels, self.unaugmented_view)
        return torch.stack([labels, views], dim=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.clients is not None:  # e.g. secure aggregation's counters, continued by a resumed run
            checkpoint[CLIENTS_KEY] = self.clients.state_dict()
        if self.procedural_pretraining is not None:  # it leaves no trace in the ledger
            checkpoint[PROCEDURAL_KEY] = dataclasses.asdict(self.procedural_pretraining)
        # the ledger holds each warm-up's release, not all its settings (e.g. the epsilon metrics.json reports)
        checkpoint[WARM_UPS_KEY] = {release.name: dataclasses.asdict(release) for release in self.warm_up_releases}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # restores the ledger, before any step
        if self.clients is not None and CLIENTS_KEY in checkpoint:
            self.clients.load_state_dict(checkpoint[CLIENTS_KEY])
        for position, release in enumerate(self.warm_up_releases):
            release.check_resumed(self.mechanism.ledger, position)
        if WARM_UPS_KEY in checkpoint:  # written since the settings were saved; older checkpoints: the ledger only
            for release in self.warm_up_releases:
                check_started_with(f"model.{release.name}", dataclasses.asdict(release),
                                   checkpoint[WARM_UPS_KEY].get(release.name))
        check_started_with("model.private_trainable", self.hparams.private_trainable,
                           checkpoint.get("hyper_parameters", {}).get("private_trainable"))
        settings = self.procedural_pretraining
        check_started_with("model.procedural_pretraining", None if settings is None else dataclasses.asdict(settings),
                           checkpoint.get(PROCEDURAL_KEY))

    # -------------------------------------------------------------------------------- training
    def attach_private_data(self, dataset: Dataset, *, users: list | None = None, user_rate: float = 1.0
                            ) -> DataLoader:
        """The Poisson loader of the private data; with ``users`` (each user's indices), the loader of
        user-level DP-SGD, which includes each user with probability ``user_rate`` (a mechanism with
        ``unit: user``; see :meth:`~fedgen.mechanisms.DPSGD.user_data_loader`)."""
        self.check_private_data(dataset)
        self._private_data = dataset
        if users is None:
            self._loader = self.mechanism.data_loader(dataset, batch_size=self.hparams.batch_size)
        else:
            self._loader = self.mechanism.user_data_loader(dataset, users=users, user_rate=user_rate,
                                                           batch_size=self.hparams.batch_size)
        return self._loader

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        if self._loader is None:
            raise RuntimeError("call attach_private_data(dataset) before fitting DPDiffusion")
        optimizer = torch.optim.Adam(train_only(self.unet, self.hparams.private_trainable), lr=self.hparams.lr)
        trainer = self.trainer
        if trainer.max_steps is not None and trainer.max_steps > 0:
            plan = {"steps": trainer.max_steps}
        elif trainer.max_epochs is not None and trainer.max_epochs > 0:
            plan = {"epochs": trainer.max_epochs}
        else:
            raise ConfigError("trainer.max_epochs", "DP-SGD plans its noise for a known number of steps",
                              "set trainer.max_epochs or trainer.max_steps")
        _, optimizer = self.mechanism.make_private(self.unet, optimizer, data_loader=self._loader, **plan)
        if self.hparams.lr_schedule == "constant":
            return optimizer
        steps = self.mechanism.planned_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps)
                                                                                               / steps)))
        return {"optimizer": optimizer, "lr_scheduler": schedule}  # stepped after each DP step, in training_step

    def diffusion_loss(self, images: torch.Tensor, labels: torch.Tensor, *,
                       reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
        """The prediction error (of the noise or of v; see ``prediction``) of the batch's B x K rows (rows
        ``i K .. i K + K - 1`` are example i's draws, each its own view when ``augment_shift`` or ``augment_flip``
        is set): their mean, which is the mean over examples of their K-draw losses, or each row's
        (``reduction="none"``, shape (B K,)). Labels are dropped (``label_dropout``) in training mode only, as
        ``nn.Dropout`` drops units: in eval mode every row keeps its example's label."""
        draws = self.hparams.noise_draws
        shifted, offsets = shift_randomly(images.repeat_interleave(draws, dim=0), self.hparams.augment_shift)
        views, mirrored = flip_randomly(shifted, self.hparams.augment_flip)
        x0 = views * 2 - 1
        labels = labels.repeat_interleave(draws, dim=0)
        if self.training and self.hparams.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.hparams.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        noise = torch.randn_like(x0)
        t = self.training_timesteps(x0.shape[0], device=x0.device,
                                    strata=draws if self.hparams.stratified_draws else 1)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        target = self.prediction_target(x0, noise, t)
        views = self.view_index(offsets, mirrored) if self.hparams.augment_conditioning else None
        out = self.unet(noisy, t, class_labels=self.conditioning(labels, views)).sample
        error = F.mse_loss(out, target, reduction="none")
        return error.mean() if reduction == "mean" else error.flatten(1).mean(1)

    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet predicts from ``x_t = a_t x0 + s_t noise``: the noise, or ``v = a_t noise - s_t x0``."""
        return noise if self.hparams.prediction == "epsilon" else self.noise_scheduler.get_velocity(x0, noise, t)

    def training_timesteps(self, n: int, *, device: torch.device, strata: int = 1) -> torch.Tensor:
        """``n`` training steps drawn from the ``timesteps`` distribution (see the module's docstring). With
        ``strata = K > 1`` row r is drawn from stratum ``r mod K`` of K equal-probability strata: the K rows of an
        example (consecutive, as ``repeat_interleave`` makes them) cover the distribution, one stratum each."""
        steps, uniform = self.hparams.num_train_timesteps, self.hparams.timesteps == "uniform"
        midpoints = self._log_sigma_midpoints
        if strata == 1:
            if uniform:
                return torch.randint(0, steps, (n,), device=device)
            z = torch.randn(n, device=device, dtype=midpoints.dtype)  # the standard normal of log sigma
        else:
            u = (torch.arange(n, device=device, dtype=torch.float64) % strata
                 + torch.rand(n, device=device, dtype=torch.float64)) / strata  # in [0, 1)
            if uniform:
                return (u * steps).long().clamp_(max=steps - 1)
            z = torch.special.ndtri(u)
        log_sigma = self.hparams.lognormal_mean + self.hparams.lognormal_std * z
        return torch.searchsorted(midpoints.to(device), log_sigma.to(midpoints.dtype))

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """One DP-SGD step on the Poisson sample. Central: the clipped sum of all micro-batches gets the noise.
        Federated (``self.clients`` set; the batch carries each example's client): every client sums the
        clipped gradients of its own sampled examples, the sums meet in ``clients.secure_sum`` and the noise is
        added once to the total, calibrated to its sensitivity: the same step, computed by the clients. (The
        clients' passes run as one pass over the sample ordered by client, which the engine splits into
        per-client sums: the same sums, at the cost of one pass.)"""
        images, labels, *tagged = batch
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        if self.clients is None:
            self._clipped_backward(images, labels)
        else:  # one pass over the whole sample, ordered by client; the engine keeps one clipped sum per client
            order = torch.argsort(tagged[0], stable=True)
            owner = tagged[0][order]
            if len(owner):
                self._clipped_backward(images[order], labels[order], clients=owner)
            parts = list(self.mechanism.take_clipped_sums(self.clients.num_clients))
            total, sensitivity = self.clients.secure_sum(parts)
            self.mechanism.put_clipped_sum(total, sensitivity=sensitivity)
        optimizer.step()
        if self.hparams.lr_schedule != "constant":
            self.lr_schedulers().step()
        if self.ema is not None:
            self.ema.update_parameters(self.unet)

    def _clipped_backward(self, images: torch.Tensor, labels: torch.Tensor, clients: torch.Tensor | None = None
                          ) -> None:
        """Add the clipped per-example gradients of these examples to the step's sum, in physical micro-batches;
        with ``clients`` (each example's, sorted), one sum per client."""
        if len(images) == 0:  # an empty Poisson sample still takes its noisy step
            self.mechanism.empty_batch()
            return
        size = self.hparams.max_physical_examples or len(images)
        if self.hparams.cuda_graphs:  # central steps only (check_training)
            loss = self._clipped_backward_captured(images, labels, size)
            self.log("train/loss", loss.detach(), prog_bar=True, on_step=False, on_epoch=True, batch_size=len(images))
            return
        chunks = list(zip(images.split(size), labels.split(size), strict=True))
        groups = clients.split(size) if clients is not None else [None] * len(chunks)
        num_groups = 1 if clients is None else self.clients.num_clients
        for (x, y), group in zip(chunks, groups, strict=True):
            try:
                loss = self.diffusion_loss(x, y)
                self.mechanism.backward(loss, draws=self.hparams.noise_draws, groups=group, num_groups=num_groups)
            except torch.OutOfMemoryError as err:  # nothing of this step was released or charged yet
                raise self._micro_batch_too_large(len(x)) from err
            # the epoch's mean over its micro-batches, weighted by their sizes (the progress line prints it)
            self.log("train/loss", loss.detach(), prog_bar=True, on_step=False, on_epoch=True, batch_size=len(x))

    def _clipped_backward_captured(self, images: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
        """:meth:`_clipped_backward` through one CUDA graph of a micro-batch of ``size`` examples, captured at the
        first step (``cuda_graphs``); returns the mean loss of the micro-batches."""
        if self._captured is None:
            self._captured = CapturedBackward(self.mechanism, self.diffusion_loss, size=size,
                                              draws=self.hparams.noise_draws)
        try:
            return self._captured(images, labels)
        except torch.OutOfMemoryError as err:  # nothing of this step was released or charged yet
            raise self._micro_batch_too_large(size) from err

    def _micro_batch_too_large(self, size: int) -> ConfigError:
        """The error for a micro-batch of ``size`` examples that ran out of device memory, naming the setting to
        lower (with graphs, also the option to drop: a graph keeps its activations in its own pool)."""
        graphs = " (or set cuda_graphs: false: a graph keeps its activations in its own pool)" \
            if self.hparams.cuda_graphs else ""
        return ConfigError("model.max_physical_examples", f"a micro-batch of {size} examples x "
                           f"{self.hparams.noise_draws} noise draws does not fit in the device's memory",
                           f"set model.init_args.max_physical_examples to {max(1, size // 2)} or lower{graphs}: "
                           "the logical batch, the noise and the privacy accounting stay the same")

    def check_training(self, device: torch.device) -> None:
        self.check_warm_ups_leave_a_step()
        if self.clients is not None and self.hparams.private_trainable is not None:
            raise ConfigError("model.private_trainable", "is not supported in a federation: its clients compute "
                              "steps over the whole UNet", "set private_trainable: null, or train centrally")
        if self.hparams.cuda_graphs and device.type != "cuda":
            raise ConfigError("model.cuda_graphs", f"CUDA graphs need a CUDA device; training runs on {device}",
                              "set cuda_graphs: false, or train on a GPU (trainer.accelerator: gpu)")
        if self.hparams.cuda_graphs and self.clients is not None:
            raise ConfigError("model.cuda_graphs", "a federated step keeps one clipped sum per client, which a "
                              "captured pass cannot split", "set cuda_graphs: false with a federation")
        self.check_micro_batch_fits(device)

    def check_micro_batch_fits(self, device: torch.device) -> None:
        """Refuse a micro-batch (the expected batch, or ``max_physical_examples`` if fewer) whose saved activations
        alone need more than ``device``'s memory, before any private work: on the CPU the operating system would
        end the run at its first step without a word, and on a GPU the step's out-of-memory error would come after
        the warm-ups. The activations are a lower bound on a step's peak (the per-example gradients and the
        allocator's slack come on top), so a setting that fits is never refused."""
        size = min(self.hparams.max_physical_examples or self.hparams.batch_size, self.hparams.batch_size)
        per_example = self.activation_bytes_per_example()

        def fix(memory: int) -> str:  # half the memory for the activations leaves room for the rest of the step
            return (f"set model.init_args.max_physical_examples to {max(1, memory // (2 * per_example))} or lower: "
                    "the logical batch, the noise and the privacy accounting stay the same")

        check_fits_in_memory("model.max_physical_examples", size * per_example,
                             f"a micro-batch of {size} examples x {self.hparams.noise_draws} noise draws (its saved "
                             "activations alone)", fix, device)

    def activation_bytes_per_example(self) -> int:
        """The bytes that autograd keeps for the backward pass per example of a training micro-batch (its
        ``noise_draws`` rows): the unique storages saved by a forward pass of two examples less those of one, so
        that the weights and other constants cancel. The forward runs on copies of the random state, so a run's
        draws are the same with or without this measurement."""
        weight = next(self.unet.parameters())
        device = weight.device

        def saved_bytes(n: int) -> int:
            storages: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
                return t

            images = torch.zeros(n, *self.image_shape, device=device, dtype=weight.dtype)
            labels = torch.zeros(n, dtype=torch.long, device=device)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
                self.diffusion_loss(images, labels)
            return sum(storages.values())

        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return max(1, saved_bytes(2) - saved_bytes(1))

    def check_warm_ups_leave_a_step(self) -> None:
        """Refuse, before anything is released, warm-ups after which DP-SGD at its configured ``noise_multiplier``
        could not take one step within ``target_epsilon``: the releases would be spent and the run would stop at
        its first step. (A noise calibrated at plan time always fits the rest of the budget.)"""
        mechanism = self.mechanism
        if (not self.warm_up_releases or self._loader is None or mechanism.noise_multiplier is None
                or mechanism.target_epsilon is None):
            return
        warm_ups = [release.planned_event(mechanism) for release in self.warm_up_releases]
        step = SubsampledGaussianEvent(mechanism.noise_multiplier, self._loader.sample_rate, 1)
        accountant, delta = mechanism.ledger.accountant, mechanism.delta
        with_step = compute_epsilon([*mechanism.ledger.events, *warm_ups, step], delta, accountant)
        if with_step > mechanism.target_epsilon:
            names = " and ".join(release.name for release in self.warm_up_releases)
            spent = compute_epsilon([*mechanism.ledger.events, *warm_ups], delta, accountant)
            raise ConfigError("mechanism.noise_multiplier", f"{mechanism.noise_multiplier:g} leaves DP-SGD no step "
                              f"after {names} (epsilon {spent:.4g}): one step would bring epsilon to "
                              f"{with_step:.4g}, over target_epsilon {mechanism.target_epsilon:g}",
                              "leave noise_multiplier unset (it is then calibrated to what the warm-ups leave), "
                              "raise it, or give the warm-ups a smaller epsilon")

    def check_public_data(self, dataset: Dataset) -> None:
        image, _ = dataset[0]
        if tuple(image.shape) != self.image_shape:
            raise ConfigError("public_data", f"has images of shape {list(image.shape)}, the private data "
                              f"{list(self.image_shape)}", "declare a public dataset of the same image shape")

    def pretrain_on_public(self, dataset: Dataset, *, steps: int) -> None:
        """Non-private, unconditional pretraining on a public dataset: ``steps`` Adam steps of the diffusion
        loss with every label set to the null class (the public classes need not match the private ones).
        It must run before private training; the EMA restarts from the pretrained weights."""
        check_at_least_one("public_steps", steps, "use e.g. 1000")
        self.check_public_data(dataset)
        self._train_without_noise(dataset, steps, labelled=False, what="public pretraining")
        log.info("DPDiffusion: %d non-private pretraining steps on %d public examples", steps, len(dataset))

    def pretrain_on_procedural_images(self) -> dict:
        """The configured ``procedural_pretraining``: its ``steps`` plain Adam steps of the diffusion loss, every
        label the null class, on images painted by code. It reads no data and records nothing in the ledger. It must
        run before private training (and before a warm-up); the EMA restarts from the pretrained weights. Returns
        the settings' report."""
        settings = self.procedural_pretraining
        if settings is None:
            raise ConfigError("model.procedural_pretraining", "is not set", "set it, e.g. {steps: 200}")
        painted = settings.dataset(self.image_shape, device=self.device)
        self._train_without_noise(painted, settings.steps, labelled=False, batch_size=settings.batch_size,
                                  what="procedural pretraining")
        log.info("DPDiffusion: %d pretraining steps on %d %s images painted by code (no data, no privacy cost)",
                 settings.steps, len(painted), settings.kind)
        return settings.report()

    def warm_up(self, dataset: Dataset) -> dict[str, dict]:
        """Make each configured warm-up release (central images, DP-Merf's samples, or both in that order) of the
        private ``dataset`` (charged to the mechanism's ledger, so DP-SGD then calibrates its noise for the rest of
        the budget) and train on its images, with their labels, for its ``steps`` Adam steps: post-processing of the
        release, no further privacy cost. It must run before private training; the EMA restarts from the
        warmed-up weights. Returns each release's report under its name (``central_images``, ``merf_images``)."""
        if not self.warm_up_releases:
            raise ConfigError("model.central_images", "is not set, nor merf_images",
                              "set central_images or merf_images to warm up on a release")
        if self.mechanism.owns_backward:
            raise RuntimeError("the warm-up must run before private training starts")
        reports = {}
        for i, release in enumerate(self.warm_up_releases):
            released, reports[release.name] = release.release(
                dataset, num_classes=self.num_classes, mechanism=self.mechanism, device=self.device,
                earlier=self.warm_up_releases[:i])
            started = time.perf_counter()
            self._train_without_noise(released, release.steps, labelled=True, batch_size=release.batch_size,
                                      augment=release.augment, what=f"warm-up on the {release.name}")
            log.info("DPDiffusion: %d warm-up steps on the %s in %.0f s", release.steps, release.name,
                     time.perf_counter() - started)
        return reports

    def _train_without_noise(self, dataset: Dataset, steps: int, *, labelled: bool, batch_size: int | None = None,
                             augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                             what: str = "training without noise", log_every_seconds: float = 30.0) -> None:
        """``steps`` plain Adam steps of the diffusion loss on ``dataset``: with its labels (under label dropout),
        or with every label set to the null class; ``batch_size`` examples a step (None: the generator's), each
        batch's images through ``augment`` first if given. Then the EMA restarts from these weights. A log line
        names ``what`` runs, with the step and the loss, at least ``log_every_seconds`` apart (these steps run
        before Lightning's loop, so no progress bar shows them)."""
        if self.mechanism.owns_backward:
            raise RuntimeError("training without noise must run before private training starts")
        batch_size = self.hparams.batch_size if batch_size is None else batch_size
        loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, drop_last=True)
        optimizer = torch.optim.Adam(self.unet.parameters(), lr=self.hparams.lr)
        self.train()  # label dropout applies
        done, started = 0, time.perf_counter()
        last_line = started
        while done < steps:
            for images, labels in loader:
                if augment is not None:
                    images = augment(images)
                images = images.to(self.device, self.dtype)
                labels = labels.to(self.device) if labelled else torch.full((len(images),), self.null_class,
                                                                             device=self.device)
                optimizer.zero_grad(set_to_none=True)
                loss = self.diffusion_loss(images, labels)
                loss.backward()
                optimizer.step()
                done += 1
                if time.perf_counter() - last_line >= log_every_seconds and done < steps:
                    last_line = time.perf_counter()
                    log.info("DPDiffusion: %s, step %d/%d, loss %.4g, %.0f s", what, done, steps, float(loss),
                             last_line - started)
                if done == steps:
                    break
        self.unet.zero_grad(set_to_none=True)
        if self.ema is not None:  # the EMA restarts at these weights: samples drawn now come from them
            self.ema.module.load_state_dict(self.unet.state_dict())
            self.ema.n_averaged.zero_()  # and the first private step's update copies its weights over them

    # -------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, *, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """``n`` images of the given ``labels`` (drawn from :meth:`label_distribution` if None). With
        ``label_check_steps``, each image whose own class (:meth:`classify`) is not its label is drawn again, up
        to ``label_check_rounds`` times; one that still fails is kept as last drawn. With ``sample_shift``,
        ``sample_rotation`` or ``sample_scale``, each image is then moved by its own random offset, angle and
        scale."""
        if labels is None:
            labels = torch.multinomial(self.label_distribution(), n, replacement=True)
        labels = labels.to(self.device)
        images = self._draw(labels, generator)
        if self.hparams.label_check_steps is not None:
            self._check_labels(images, labels, generator)
        return move_randomly(images, self.hparams.sample_shift, self.hparams.sample_rotation,
                             self.hparams.sample_scale, generator=generator)

    def _check_labels(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None) -> None:
        """Draw again, in place, each image of ``images`` whose own class is not its label (see :meth:`sample`)."""
        n = len(labels)
        pending = torch.arange(n, device=self.device)
        failed = self.classify(images, generator=generator) != labels
        counts = self.label_check_counts
        counts["images"] += n
        counts["failed_first_draw"] += int(failed.sum())
        for _ in range(self.hparams.label_check_rounds):
            pending = pending[failed]
            if len(pending) == 0:
                break
            images[pending] = self._draw(labels[pending], generator)
            counts["redraws"] += len(pending)
            failed = self.classify(images[pending], generator=generator) != labels[pending]
        counts["kept_failing"] += int(failed.sum())  # none if every sample passed before the last round

    @torch.no_grad()
    def classify(self, images: torch.Tensor, *, steps: list[int] | None = None,
                 generator: torch.Generator | None = None, batch_size: int = 1000) -> torch.Tensor:
        """The generator's own class of each image in [0, 1]: ``argmin_c sum_t e_t(x, c)``, where ``e_t(x, c)`` is
        the mean squared error of the sampling network's prediction (the training target) under label c, for
        ``x_t = a_t x + s_t eps_t`` with one noise draw per step ``t`` in ``steps`` (default:
        ``label_check_steps``), shared by all classes so that the classes are compared on the same noise. The
        error stands in for ``-log p(x | c)`` in Bayes' rule (Li et al., ICCV 2023; Clark & Jaini, NeurIPS 2023).
        Post-processing: no privacy cost."""
        steps = steps if steps is not None else self.hparams.label_check_steps
        if not steps:
            raise ValueError("classify needs the diffusion steps to compare the classes at: pass steps, or set "
                             "label_check_steps")
        classes = self.num_classes
        with self._sampling_network() as net:
            found = []
            for chunk in images.split(batch_size):
                x0 = chunk.to(self.device, self.dtype) * 2 - 1
                n = len(x0)
                labels = torch.arange(classes, device=self.device).repeat_interleave(n)  # row c n + i: image i, label c
                error = torch.zeros(classes, n, device=self.device, dtype=x0.dtype)
                for step in steps:
                    t = torch.full((n,), step, device=self.device, dtype=torch.long)
                    noise = torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
                    noisy = self.noise_scheduler.add_noise(x0, noise, t)
                    target = self.prediction_target(x0, noise, t)
                    out = net(noisy.repeat(classes, 1, 1, 1), t.repeat(classes),
                              class_labels=self.conditioning(labels)).sample
                    error += (out - target.repeat(classes, 1, 1, 1)).square().flatten(1).mean(1).view(classes, n)
                found.append(error.argmin(0))
        return torch.cat(found)

    def sampling_report(self) -> dict[str, Any] | None:
        """The label check's settings and counts, and the released images' random moves (None without either),
        so that ``metrics.json`` says what the synthetic set went through after drawing."""
        report: dict[str, Any] = {}
        if self.hparams.label_check_steps is not None:
            report |= {"label_check_steps": list(self.hparams.label_check_steps),
                       "label_check_rounds": self.hparams.label_check_rounds} | self.label_check_counts
        for field in self.release_fields:
            if self.hparams[field]:
                report[field] = self.hparams[field]
        return report or None

    @contextlib.contextmanager
    def _sampling_network(self) -> Iterator[nn.Module]:
        """The network samples come from (the EMA weights if kept), in eval mode for the block."""
        net = self.ema.module if self.ema is not None else self.unet
        was_training = net.training
        net.eval()
        try:
            yield net
        finally:
            net.train(was_training)

    def _draw(self, labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One image per label from the sampler, in [0, 1]."""
        if self.hparams.sampler == "edm":
            return self._draw_edm(labels, generator)
        n = len(labels)
        if self.hparams.sampler == "ddim":
            scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
            eta = {"eta": self.hparams.sampling_eta}
        else:
            scheduler, eta = DDPMScheduler.from_config(self.noise_scheduler.config), {}
        scheduler.set_timesteps(self.hparams.sampling_steps, device=self.device)
        x = torch.randn((n, *self.image_shape), generator=generator, device=self.device, dtype=self.dtype)
        with self._sampling_network() as net:
            for t in scheduler.timesteps:
                out = self._guided_output(net, x, t.expand(n), labels)
                x = scheduler.step(out, t, x, generator=generator, **eta).prev_sample
        return ((x + 1) / 2).clamp(0, 1)

    def _guided_output(self, net: nn.Module, x_t: torch.Tensor, steps: torch.Tensor, labels: torch.Tensor
                       ) -> torch.Tensor:
        """The UNet's output at ``x_t`` for ``labels``, with classifier-free guidance when ``guidance_scale`` w > 0:
        ``(1 + w) f(x, y) - w f(x, null)``."""
        w = self.hparams.guidance_scale
        if w == 0:
            return net(x_t, steps, class_labels=self.conditioning(labels)).sample
        null = torch.full_like(labels, self.null_class)
        both = net(torch.cat([x_t, x_t]), torch.cat([steps, steps]),
                   class_labels=self.conditioning(torch.cat([labels, null]))).sample
        conditional, unconditional = both.chunk(2)
        return (1 + w) * conditional - w * unconditional

    def _draw_edm(self, labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The stochastic sampler of Karras, Aittala, Aila and Laine (NeurIPS 2022, Algorithm 2), on the UNet's
        own steps, in [0, 1].

        In the variance-exploding view x = x_t / a_t = x_0 + sigma_t eps, sigma_t = sqrt((1 - abar_t) / abar_t),
        the UNet's output gives the denoiser D(x; sigma_t), its estimate of x_0 (clipped to [-1, 1] as DDIM's
        is). The N = ``sampling_steps`` noise levels follow Karras et al.'s rho = 7 spacing between the largest
        and smallest sigma_t, each moved to the step at or above it, then 0. At step i churn first adds fresh
        noise, x <- x + sqrt(sigma_hat^2 - sigma_i^2) z, with sigma_hat the step at or above sigma_i (1 + gamma)
        (``sampling_churn``; only inside ``churn_range``), then a Heun step goes from sigma_hat to sigma_{i+1}
        (Euler for the last, to 0). The UNet sees only the steps it was trained on."""
        n = len(labels)
        table = self._noise_levels

        def step_at_or_above(sigma: torch.Tensor) -> torch.Tensor:
            return torch.searchsorted(table, sigma * (1 - 1e-9)).clamp(max=len(table) - 1)

        rho, ramp = 7.0, torch.linspace(0, 1, self.hparams.sampling_steps, dtype=torch.float64)
        levels = (table[-1] ** (1 / rho) + ramp * (table[0] ** (1 / rho) - table[-1] ** (1 / rho))) ** rho
        steps = torch.unique(step_at_or_above(levels)).flip(0).tolist()  # decreasing, no step twice
        sigmas = table[steps].tolist() + [0.0]
        gamma = min(self.hparams.sampling_churn / len(steps), 2 ** 0.5 - 1)
        lowest, highest = self.hparams.churn_range

        def denoise(net: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
            a = (1 + float(table[step]) ** 2) ** -0.5  # sqrt(abar_t), and s_t = sigma_t a_t
            s = float(table[step]) * a
            x_t = a * x
            out = self._guided_output(net, x_t, torch.full((n,), step, device=self.device), labels)
            x0 = a * x_t - s * out if self.hparams.prediction == "v_prediction" else (x_t - s * out) / a
            return x0.clamp(-1, 1)

        x = sigmas[0] * torch.randn((n, *self.image_shape), generator=generator, device=self.device,
                                    dtype=self.dtype)
        with self._sampling_network() as net:
            for i, step in enumerate(steps):
                sigma, sigma_next = sigmas[i], sigmas[i + 1]
                if gamma > 0 and lowest <= sigma <= highest:
                    step = int(step_at_or_above(torch.tensor(sigma * (1 + gamma), dtype=torch.float64)))
                    noise = torch.randn(x.shape, generator=generator, device=self.device, dtype=self.dtype)
                    x = x + (float(table[step]) ** 2 - sigma ** 2) ** 0.5 * noise
                    sigma = float(table[step])
                slope = (x - denoise(net, x, step)) / sigma
                moved = x + (sigma_next - sigma) * slope
                if sigma_next > 0:  # Heun's correction with the slope at the step's end
                    slope_next = (moved - denoise(net, moved, steps[i + 1])) / sigma_next
                    moved = x + (sigma_next - sigma) * (slope + slope_next) / 2
                x = moved
        return ((x + 1) / 2).clamp(0, 1)
