"""DP-SGD (Abadi et al., CCS 2016): per-example clipping, Gaussian noise, Poisson sampling.

Each step draws a Poisson sample of the data (each example included with probability ``q``), clips each
example's gradient to L2 norm ``C`` (fedgen's clipping engine, or Opacus' ``GradSampleModule``), sums them, adds
N(0, (sigma C)^2 I) and divides by the expected batch size ``q N``. Under add/remove-one-example
neighbouring every step is one Poisson-subsampled Gaussian release; the ledger composes them.

User-level DP-SGD (``unit="user"``, e.g. client-level DP in a federation; McMahan et al., ICLR 2018): each step
includes each user with probability ``q`` (and each example of an included user with a second, free rate),
every user's contribution to the step is clipped to ``C`` as a whole by whoever sums the users' parts
(:meth:`DPSGD.put_clipped_sum`), and the step is one Poisson-subsampled Gaussian release at rate ``q`` under
add/remove-one-user neighbouring (:meth:`DPSGD.user_data_loader`).

Usage from a LightningModule (see :class:`fedgen.evaluation.Classifier`)::

    loader = mechanism.data_loader(dataset, batch_size=256)        # Poisson sampling
    net, optimizer = mechanism.make_private(net, optimizer, data_loader=loader, epochs=10)

with the LightningModule deriving from :class:`~fedgen.mechanisms.lightning.PrivateModule`, which stops
training cleanly when the budget is spent and keeps the ledger in checkpoints.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
from opacus.data_loader import DPDataLoader, dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from fedgen.errors import ConfigError, PrivacyBudgetExceeded
from fedgen.mechanisms.base import Mechanism
from fedgen.mechanisms.ledger import AccountantName, SubsampledGaussianEvent, calibrate_noise_multiplier
from fedgen.mechanisms.noise import NoiseSource
from fedgen.mechanisms.per_example import PerExampleClipping, unsupported_layers

log = logging.getLogger(__name__)


class _LedgerDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer whose noise comes from fedgen's noise source and is charged to the ledger first."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, mechanism: DPSGD, **kwargs: object) -> None:
        super().__init__(optimizer, **kwargs)
        self._mechanism = mechanism

    def add_noise(self) -> None:
        """``grad = summed_grad + N(0, (sigma C)^2 I)``: one draw per device and dtype for all parameters (a draw
        per parameter launched hundreds of small kernels for a UNet), split into their shapes."""
        self._mechanism.charge_step()
        noise_source: NoiseSource = self._mechanism.noise
        # the mechanism's sigma, the one charge_step recorded (a state loaded after make_private may change it)
        std = self._mechanism.noise_multiplier * self._mechanism.pop_step_sensitivity()
        groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            groups.setdefault((p.summed_grad.device, p.summed_grad.dtype), []).append(p)
        for (device, dtype), params in groups.items():
            summed = [p.summed_grad for p in params]
            sizes = [s.numel() for s in summed]
            noise = noise_source.normal((sum(sizes),), std=std, device=device, dtype=dtype).split(sizes)
            noisy = torch._foreach_add(summed, [n.view_as(s) for n, s in zip(noise, summed, strict=True)])
            for p, grad in zip(params, noisy, strict=True):
                p.grad = grad.view_as(p).to(p.dtype)  # a float64 sum (put_clipped_sum) rounded after its noise
                _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        """Divide by the expected batch size, as Opacus does, in one batched operation."""
        if self.loss_reduction == "mean":
            torch._foreach_div_([p.grad for p in self.params], self.expected_batch_size * self.accumulated_iterations)


class _EngineDPOptimizer(_LedgerDPOptimizer):
    """The optimizer of ``engine="fedgen"``: the clipped per-example sums arrive in ``p.summed_grad`` from
    :meth:`DPSGD.backward` (summed over the physical micro-batches of one logical batch); the step adds noise
    once, divides by the expected logical batch size and updates."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, clipping: PerExampleClipping, **kwargs: object) -> None:
        super().__init__(optimizer, **kwargs)
        self._clipping = clipping

    @property
    def accumulated_iterations(self) -> int:
        return 1  # micro-batches are already summed into one logical batch

    def pre_step(self, closure=None) -> bool:
        if self._clipping.pending:
            self._clipping.discard()
            raise RuntimeError("a forward pass was not turned into clipped gradients: with DPSGD(engine='fedgen') "
                               "call mechanism.backward(loss) (PrivateModule does it for Lightning), not "
                               "loss.backward()")
        if all(getattr(p, "summed_grad", None) is None for p in self.params):
            raise RuntimeError("no clipped gradients to step with: call mechanism.backward(loss) first")
        if self._mechanism.ledger.unit == "user" and self._mechanism._step_sensitivity is None:
            raise RuntimeError("a user-level step adds the users' parts, each clipped to max_grad_norm as a whole: "
                               "install their total with mechanism.put_clipped_sum before the step")
        for p in self.params:
            if getattr(p, "summed_grad", None) is None:  # not reached by this batch: its per-example gradients are 0
                p.summed_grad = torch.zeros_like(p)
            elif p.summed_grad.shape != p.shape:
                raise RuntimeError("the clipped sums are kept per group: take them (mechanism.take_clipped_sums) and "
                                   "put their total (mechanism.put_clipped_sum) before the step")
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True


class _BatchedTensorDataset(TensorDataset):
    """A ``TensorDataset`` whose batches are fetched whole: DataLoader hands ``__getitems__`` a batch's indices and
    each tensor is indexed once (the batch is then already formed: its collation is ``list``), instead of
    ``dataset[i]`` per example and a stack. The same rows in the same order; on a 2-core CPU a Poisson batch of
    about 4,096 MNIST images takes 11 ms this way against 84 ms."""

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[index] for t in self.tensors)


def _fetch_whole_batches(dataset: Dataset, collate_fn: Callable) -> tuple[Dataset, Callable]:
    """``(dataset, collate_fn)`` of a Poisson loader: a plain in-memory ``TensorDataset`` with the default collation
    is fetched a batch at a time (:class:`_BatchedTensorDataset`); anything else as given."""
    if type(dataset) is TensorDataset and collate_fn is default_collate:
        return _BatchedTensorDataset(*dataset.tensors), list
    return dataset, collate_fn


class _UserPoissonBatches:
    """The batch sampler of :class:`UserPoissonLoader`: ``steps`` batches of fresh draws on every pass."""

    def __init__(self, users: list[torch.Tensor], user_rate: float, example_rate: float, steps: int,
                 generator: torch.Generator) -> None:
        self.users, self.user_rate, self.example_rate = users, user_rate, example_rate
        self.steps, self.generator = steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            picked = torch.rand(len(self.users), generator=self.generator) < self.user_rate
            kept = [self.users[u][torch.rand(len(self.users[u]), generator=self.generator) < self.example_rate]
                    for u in picked.nonzero().flatten().tolist()]
            yield torch.cat(kept).tolist() if kept else []


class UserPoissonLoader(DPDataLoader):
    """Two-level Poisson sampling for user-level DP-SGD: each step includes each user independently with
    probability ``user_rate``, and each example of an included user independently with probability
    ``example_rate``. Under add/remove-one-user neighbouring only the first level counts: the step is a
    Poisson-subsampled release at rate ``user_rate`` (``sample_rate``), whatever the second level keeps of an
    included user's data. ``users``: the dataset indices of each user (disjoint). An epoch is
    ``1 / (user_rate * example_rate)`` steps, the whole dataset in expectation."""

    privacy_unit = "user"

    def __init__(self, dataset: Dataset, *, users: list, user_rate: float, example_rate: float,
                 generator: torch.Generator) -> None:
        users = [torch.as_tensor(u, dtype=torch.long).reshape(-1) for u in users]
        steps = max(1, int(1 / (user_rate * example_rate)))
        first = dataset[0]
        dataset, collate_fn = _fetch_whole_batches(dataset, default_collate)
        DataLoader.__init__(self, dataset, generator=generator,
                            batch_sampler=_UserPoissonBatches(users, user_rate, example_rate, steps, generator),
                            collate_fn=wrap_collate_with_empty(collate_fn=collate_fn,
                                                               sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                                                               dtypes=[dtype_safe(x) for x in first]))
        self.sample_rate = float(user_rate)
        self.distributed = False
        self.expected_batch_size = max(1, round(user_rate * example_rate * len(dataset)))


class DPSGD(Mechanism, name="dp_sgd"):
    """Differentially private SGD with per-example clipping and Poisson sampling, on Opacus.

    Give ``noise_multiplier``, or ``target_epsilon`` (the noise is then calibrated for the planned
    number of steps), or both (the given noise, training stops when the budget is spent).

    Args:
        noise_multiplier: noise standard deviation in units of ``max_grad_norm``.
        target_epsilon: privacy budget at ``delta``.
        delta: the delta of the guarantee; must be < 1/N for N training examples.
        max_grad_norm: per-example gradient clipping norm ``C``.
        accountant: ``"auto"``, ``"rdp"`` or ``"prv"``.
        seed: seed of the noise generator and of the Poisson sampler.
        secure_noise: draw noise from the OS's cryptographically secure generator.
        engine: how per-example gradients are clipped: ``"fedgen"`` (:class:`~fedgen.mechanisms.per_example.
            PerExampleClipping`: one backward pass for the layer outputs only, faster than Opacus' hooks in every
            row of ``docs/benchmarks.md``; the loop calls ``mechanism.backward(loss)``, which
            :class:`~fedgen.mechanisms.PrivateModule` does under Lightning), ``"opacus"`` (Opacus'
            ``GradSampleModule`` hooks; the loop calls ``loss.backward()``; more layer types, slower), or
            ``"auto"``: fedgen's engine when it supports every trainable layer of the model given to
            :meth:`make_private`, else Opacus. ``engine_in_use`` says which one runs.
        unit: the neighbouring relation: add/remove one ``"example"`` (each example's gradient is clipped to
            ``max_grad_norm``), or one ``"user"``: each user's whole contribution to a step is clipped to
            ``max_grad_norm`` by the party that sums the users' parts and installs the total with
            :meth:`put_clipped_sum` (e.g. :class:`~fedgen.federated.FederatedDPSGD` with ``unit: client``); the
            loader must sample users (:meth:`user_data_loader`) and the engine must be fedgen's.
    """

    def __init__(self, *, noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 delta: float = 1e-5, max_grad_norm: float = 1.0, accountant: AccountantName = "auto",
                 seed: int | None = None, secure_noise: bool = False,
                 engine: Literal["auto", "opacus", "fedgen"] = "auto",
                 unit: Literal["example", "user"] = "example") -> None:
        super().__init__(target_epsilon=target_epsilon, delta=delta, accountant=accountant, seed=seed,
                         secure_noise=secure_noise, unit=unit)
        self.check_noise(noise_multiplier, target_epsilon)
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ConfigError("mechanism.max_grad_norm", f"must be a finite number > 0, got {max_grad_norm}",
                              "use a positive clipping norm, e.g. 1.0")
        if engine not in ("auto", "opacus", "fedgen"):
            raise ConfigError("mechanism.engine", f"unknown clipping engine {engine!r}", "use auto, opacus or fedgen")
        self.engine = engine
        self.engine_in_use: Literal["opacus", "fedgen"] | None = None  # set by make_private
        self._clipping: PerExampleClipping | None = None
        self._private_params: list[nn.Parameter] = []
        self._step_sensitivity: float | None = None  # set by put_clipped_sum for the next step only
        self.noise_multiplier = noise_multiplier
        self._given_noise_multiplier = noise_multiplier  # the config's, against which a checkpoint is checked
        self.max_grad_norm = float(max_grad_norm)
        self.sample_rate: float | None = None
        self.max_steps: int | None = None
        #: the steps the run was planned for (set by :meth:`plan`), e.g. the length of a learning-rate schedule
        self.planned_steps: int | None = None
        self.steps_taken = 0
        self._budget_key_seen: tuple | None = None
        self._sampler: torch.Generator | None = None  # the Poisson loader's, see _sampler_generator

    # ----------------------------------------------------------------------------------------- checks
    @staticmethod
    def validate(module: nn.Module, field: str = "model") -> None:
        """Refuse layers that mix examples or that Opacus cannot compute per-example gradients for."""
        problems = []
        for name, sub in module.named_modules():
            validator = ModuleValidator.VALIDATORS.get(type(sub))
            if validator is None:
                continue
            for err in validator(sub):
                problems.append(f"{name or '<root>'} ({type(sub).__name__}): {err}")
        if problems:
            raise ConfigError(field, "layers unsupported under DP-SGD: " + "; ".join(problems),
                              "replace BatchNorm with GroupNorm (DPSGD.fix(model) does it) and use layers "
                              "Opacus supports")

    @staticmethod
    def fix(module: nn.Module) -> nn.Module:
        """Replace unsupported layers by DP-compatible ones (BatchNorm -> GroupNorm), via Opacus."""
        return ModuleValidator.fix(module)

    # --------------------------------------------------------------------------------------- planning
    def plan(self, *, sample_rate: float, steps: int) -> None:
        """Fix the sampling rate, calibrate the noise if needed, and compute how many steps the budget allows."""
        if not 0 < sample_rate <= 1:
            raise ConfigError("batch_size", f"sample rate {sample_rate} is outside (0, 1]",
                              "use a batch size between 1 and the dataset size")
        if steps < 1:
            raise ConfigError("epochs", f"planned {steps} steps", "train for at least one step")
        self.sample_rate = float(sample_rate)
        self.planned_steps = int(steps)
        if self.noise_multiplier is None:
            self.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=self.target_epsilon, delta=self.delta, sample_rate=sample_rate, steps=steps,
                accountant=self.ledger.accountant, prior=self.ledger)
        if self.target_epsilon is not None:
            self._count_max_steps()
        log.info("DP-SGD plan: %s; %d steps at sample rate %.4g%s", self.describe(), steps, sample_rate,
                 f"; the budget allows {self.max_steps - self.steps_taken} more" if self.max_steps is not None else "")
        if self.max_steps is not None and self.max_steps < steps:
            log.warning("DP-SGD: target_epsilon=%g allows %d of the %d planned steps at noise_multiplier=%.4g; "
                        "steps after step %d are refused (a Lightning run stops there). To train every planned "
                        "step, raise noise_multiplier (or leave it unset, so that it is calibrated to the budget) "
                        "or take fewer steps.",
                        self.target_epsilon, self.max_steps, steps, self.noise_multiplier, self.max_steps)

    def _budget_key(self) -> tuple:
        return (id(self.ledger), self.ledger.accountant, self.ledger.events, self.noise_multiplier, self.sample_rate,
                self.steps_taken)

    def _count_max_steps(self) -> None:
        event = SubsampledGaussianEvent(self.noise_multiplier, self.sample_rate)
        self.max_steps = self.steps_taken + self.ledger.max_count(event, self.target_epsilon, self.delta)
        self._budget_key_seen = self._budget_key()

    def can_step(self) -> bool:
        """Whether one more step fits in the budget."""
        if self.max_steps is not None and self._budget_key() != self._budget_key_seen:
            # The ledger changed other than by this mechanism's own steps since max_steps was counted: another
            # mechanism sharing it spent budget, or a state was loaded. Count again from what it holds now.
            self._count_max_steps()
        return self.max_steps is None or self.steps_taken < self.max_steps

    def exhausted(self) -> bool:
        return not self.can_step()

    def charge_step(self) -> None:
        """Record one noisy step in the ledger (refused past the budget). Called by the optimizer."""
        if self.sample_rate is None:
            raise RuntimeError("DPSGD.plan (or make_private) must run before the first step")
        if not self.can_step():
            raise PrivacyBudgetExceeded(
                f"DPSGD: step {self.steps_taken + 1} would exceed target_epsilon={self.target_epsilon:g} at "
                f"delta={self.delta:g} (the budget allows {self.max_steps} steps); it was refused.")
        # max_steps came from the ledger's own accountant (and is recounted whenever the ledger changed
        # otherwise), so recording without recomputing epsilon is exact.
        self.ledger.record(SubsampledGaussianEvent(self.noise_multiplier, self.sample_rate))
        self.steps_taken += 1
        self._budget_key_seen = self._budget_key()

    # ------------------------------------------------------------------------------------------ wiring
    def data_loader(self, dataset: Dataset, *, batch_size: int, **kwargs: object) -> DataLoader:
        """A Poisson-sampling loader over ``dataset`` with expected batch size ``batch_size``.

        Each batch includes each example independently with probability ``batch_size / len(dataset)``.
        (Opacus' ``DPDataLoader.from_data_loader`` would use ``1 / ceil(len(dataset) / batch_size)``
        instead, a smaller rate and expected batch size whenever ``batch_size`` does not divide the dataset.)
        """
        if self.ledger.unit != "example":
            raise ConfigError("mechanism.unit", f"a loader that samples examples cannot account for add/remove one "
                              f"{self.ledger.unit}", "use unit: example, or sample users (user_data_loader; "
                              "FederatedDPSGD with unit: client)")
        if not 1 <= batch_size <= len(dataset):
            raise ConfigError("batch_size", f"{batch_size} for a dataset of {len(dataset)} examples",
                              "use a batch size between 1 and the dataset size")
        self.check_dataset_size(len(dataset))
        generator = self._sampler_generator()
        base = DataLoader(dataset, batch_size=batch_size, **kwargs)  # validates the DataLoader options
        dataset, collate_fn = _fetch_whole_batches(dataset, base.collate_fn)
        return DPDataLoader(dataset, sample_rate=batch_size / len(dataset), generator=generator,
                            num_workers=base.num_workers, collate_fn=collate_fn, pin_memory=base.pin_memory,
                            drop_last=base.drop_last, timeout=base.timeout, worker_init_fn=base.worker_init_fn,
                            multiprocessing_context=base.multiprocessing_context,
                            prefetch_factor=base.prefetch_factor, persistent_workers=base.persistent_workers)

    def user_data_loader(self, dataset: Dataset, *, users: list, user_rate: float, batch_size: int
                         ) -> UserPoissonLoader:
        """For ``unit="user"``: a loader that includes each user (``users``: each one's dataset indices) with
        probability ``user_rate`` and each of an included user's examples with the probability that makes the
        expected batch ``batch_size`` examples (:class:`UserPoissonLoader`)."""
        if self.ledger.unit != "user":
            raise ConfigError("mechanism.unit", "a loader that samples users is for user-level DP-SGD",
                              "set unit: user on the mechanism")
        if not 0 < user_rate <= 1:
            raise ConfigError("user_rate", f"must be in (0, 1], got {user_rate}", "use e.g. 0.1")
        self.check_dataset_size(len(users))
        example_rate = batch_size / (user_rate * len(dataset))
        if not batch_size >= 1 or example_rate > 1:
            raise ConfigError("batch_size", f"{batch_size} examples a step from users sampled at rate {user_rate:g} "
                              f"({user_rate * len(dataset):.0f} examples expected)",
                              "lower the batch size or raise the user sampling rate")
        generator = self._sampler_generator()
        return UserPoissonLoader(dataset, users=users, user_rate=user_rate, example_rate=example_rate,
                                 generator=generator)

    def _sampler_generator(self) -> torch.Generator:
        """The Poisson sampler's generator, seeded from the noise source when first needed, one for the mechanism.

        The accountant takes every step's sample to be drawn independently of the others. A resumed run whose
        sampler started again from its seed would draw the first steps' batches again, and its epsilon would be
        too low. So a seeded run's checkpoint carries the sampler's state (:meth:`state_dict`), and a run resumed
        from an epoch's end draws the batches the uninterrupted run would have drawn (from inside an epoch, where
        the loader had drawn ahead, it goes on with fresh draws, none repeated). A secure run's sampler is seeded
        from the OS afresh, in every segment; its state is not saved, so a checkpoint does not tell which examples
        the past steps used."""
        if self._sampler is None:
            self._sampler = torch.Generator().manual_seed(self.noise.sampling_seed())
        return self._sampler

    def make_private(self, module: nn.Module, optimizer: torch.optim.Optimizer, *, data_loader: DataLoader,
                     epochs: int | None = None, steps: int | None = None) -> tuple[nn.Module, DPOptimizer]:
        """Wrap ``module`` for per-example gradients and ``optimizer`` for clipping + noise + ledger.

        ``data_loader`` must come from :meth:`data_loader` (Poisson sampling; its rate is the sample rate).
        Plan the run by ``epochs`` or ``steps``. Every optimizer parameter must belong to ``module``.
        """
        if not isinstance(data_loader, DPDataLoader):
            raise ConfigError("data_loader", "DP-SGD needs Poisson sampling for its accounting",
                              "build the loader with DPSGD.data_loader(dataset, batch_size=...)")
        unit = getattr(data_loader, "privacy_unit", "example")
        if unit != self.ledger.unit:
            raise ConfigError("mechanism.unit", f"the loader samples {unit}s but the ledger counts add/remove one "
                              f"{self.ledger.unit}", f"use unit: {unit} on the mechanism, or a loader that samples "
                              f"{self.ledger.unit}s")
        if unit == "user" and self.engine == "opacus":
            raise ConfigError("mechanism.engine", "user-level DP-SGD installs each step's per-user clipped sum, "
                              "which Opacus' optimizer cannot take", "use engine: auto or fedgen")
        self.validate(module)
        low = sorted({str(p.dtype) for p in module.parameters() if p.requires_grad and p.dtype not in
                      (torch.float32, torch.float64)})
        if low:  # the clipped sum would be rounded in that dtype, and one example could then move it by more than C
            raise ConfigError("trainer.precision", f"the private parameters are {', '.join(low)}; DP-SGD clips, sums "
                              "and noises in their dtype", "keep float32 weights: precision 32, or bf16-mixed "
                              "(autocast; fedgen computes the private sums in float32)")
        sample_rate = data_loader.sample_rate
        if (epochs is None) == (steps is None):
            raise ConfigError("epochs", "give exactly one of epochs or steps", "plan the run by epochs or by steps")
        if steps is None:
            steps = max(1, epochs * len(data_loader))  # the steps the loader will really yield
        self.plan(sample_rate=sample_rate, steps=steps)
        module_params = {id(p) for p in module.parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in module_params:
                    raise ConfigError("optimizer", "the optimizer holds parameters outside the private module",
                                      "build the optimizer from the private module's parameters only")
        expected_batch_size = getattr(data_loader, "expected_batch_size", None) or \
            max(1, round(sample_rate * len(data_loader.dataset)))
        self.engine_in_use = self.engine
        if self.engine == "auto":
            unsupported = unsupported_layers(module)
            if unsupported and unit == "user":
                raise ConfigError("model", f"user-level DP-SGD needs fedgen's engine, which cannot clip "
                                  f"{'; '.join(unsupported)}", "use layers the engine supports")
            self.engine_in_use = "opacus" if unsupported else "fedgen"
            if unsupported:
                log.info("DPSGD(engine='auto'): Opacus clips this model (fedgen's engine cannot: %s)",
                         "; ".join(unsupported))
        if self._clipping is not None:
            self._clipping.remove()
            self._clipping = None
        if self.engine_in_use == "fedgen":
            self._clipping = PerExampleClipping(module, self.max_grad_norm)
            self._private_params = [p for p in module.parameters() if p.requires_grad]
            return module, _EngineDPOptimizer(optimizer, clipping=self._clipping, mechanism=self,
                                              noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                                              expected_batch_size=expected_batch_size, loss_reduction="mean")
        grad_sample_module = GradSampleModule(module, batch_first=True, loss_reduction="mean")
        dp_optimizer = _LedgerDPOptimizer(optimizer, mechanism=self, noise_multiplier=self.noise_multiplier,
                                          max_grad_norm=self.max_grad_norm, expected_batch_size=expected_batch_size,
                                          loss_reduction="mean")
        return grad_sample_module, dp_optimizer

    @property
    def private_parameters(self) -> list[nn.Parameter]:
        """fedgen's engine: the trainable parameters of the private module, in order (set by :meth:`make_private`);
        the parameters whose ``summed_grad`` :meth:`backward` fills."""
        return self._private_params

    @property
    def owns_backward(self) -> bool:
        return self.engine_in_use == "fedgen"

    @property
    def one_sample_per_step(self) -> bool:
        return True

    def backward(self, loss: torch.Tensor, *, draws: int = 1, groups: torch.Tensor | None = None,
                 num_groups: int = 1, weights: torch.Tensor | None = None) -> None:
        """``engine="fedgen"``: turn the mean ``loss`` of the last forward pass into clipped per-example gradient
        sums (``p.summed_grad``); call once per physical micro-batch, then ``optimizer.step()``. With
        ``draws = K`` each example fills K consecutive rows and its loss is the mean over them (noise
        multiplicity). With ``groups`` (each example's group, sorted) one sum is kept per group, for
        :meth:`take_clipped_sums`. With ``weights`` (one per example, in [0, 1]) example i adds ``w_i`` times
        its clipped gradient (0 for rows that only pad a micro-batch); see :meth:`PerExampleClipping.backward`."""
        if self._clipping is None:
            raise RuntimeError("DPSGD.backward needs fedgen's clipping engine (engine='fedgen', or 'auto' on a "
                               "model it supports) and make_private first")
        self._clipping.backward(loss, draws=draws, groups=groups, num_groups=num_groups, weights=weights)

    def empty_batch(self) -> None:
        """fedgen's engine: the Poisson sample of this step is empty (a model need not accept zero rows); the
        clipped sum is 0, and the next ``optimizer.step()`` still adds its noise and is charged to the ledger."""
        if self._clipping is None:
            raise RuntimeError("DPSGD.empty_batch needs fedgen's clipping engine and make_private first")
        self._clipping.add_empty_batch()

    def take_clipped_sums(self, num_groups: int = 1) -> torch.Tensor:
        """fedgen's engine: the clipped per-example gradient sums accumulated by :meth:`backward` since the last
        take or step, one row per group (``num_groups`` as given to :meth:`backward`; one row when it was called
        without groups), each a flat vector over the private parameters in order; and clear them. A row is
        what one party of a step computed over several parties holds (e.g. one client's share of a Poisson
        sample)."""
        if self._clipping is None:
            raise RuntimeError("DPSGD.take_clipped_sums needs fedgen's clipping engine and make_private first")
        if self._clipping.pending:
            raise RuntimeError("a forward pass was not turned into clipped gradients: call mechanism.backward(loss)")
        parts = []
        for p in self._private_params:
            summed = getattr(p, "summed_grad", None)
            if summed is None:
                parts.append(p.new_zeros(num_groups, p.numel()))
            elif summed.shape == (num_groups, *p.shape) or (num_groups == 1 and summed.shape == p.shape):
                parts.append(summed.reshape(num_groups, -1))
            else:
                raise ValueError(f"the clipped sums have shape {tuple(summed.shape)}, not {num_groups} groups of "
                                 f"{tuple(p.shape)}: give take_clipped_sums the num_groups given to backward")
        for p in self._private_params:
            p.summed_grad = None
        return torch.cat(parts, dim=1)

    def put_clipped_sum(self, total: torch.Tensor, *, sensitivity: float) -> None:
        """fedgen's engine: install a clipped sum computed elsewhere (e.g. the secure-aggregation total of the
        parties' :meth:`take_clipped_sums`) for the next ``optimizer.step()``. ``sensitivity`` is that sum's L2
        sensitivity to one unit of the ledger, an example or a user (at least ``max_grad_norm``; larger where
        quantization can move it further):
        the step's noise is ``N(0, (sigma * sensitivity)^2)``, so the recorded noise multiplier stays exact. A
        float64 ``total`` stays float64 until the noise is added; the noisy gradient is then rounded to the
        parameters' dtype (post-processing)."""
        if sensitivity < self.max_grad_norm:
            raise ValueError(f"sensitivity {sensitivity} is below max_grad_norm {self.max_grad_norm}")
        sizes = [p.numel() for p in self._private_params]
        if total.numel() != sum(sizes):
            raise ValueError(f"the sum has {total.numel()} entries, the private parameters {sum(sizes)}")
        for p, chunk in zip(self._private_params, total.split(sizes), strict=True):
            dtype = torch.float64 if total.dtype == torch.float64 else p.dtype
            p.summed_grad = chunk.view_as(p).to(device=p.device, dtype=dtype)
        self._step_sensitivity = float(sensitivity)

    def pop_step_sensitivity(self) -> float:
        """The L2 sensitivity of this step's clipped sum (``max_grad_norm`` unless :meth:`put_clipped_sum` said
        otherwise); read once by the step that adds the noise."""
        sensitivity, self._step_sensitivity = self._step_sensitivity, None
        return self.max_grad_norm if sensitivity is None else sensitivity

    def state_dict(self) -> dict:
        sampler = None if self.noise.secure or self._sampler is None else self._sampler.get_state()
        return super().state_dict() | {"steps_taken": self.steps_taken, "noise_multiplier": self.noise_multiplier,
                                       "sampler": sampler}

    def load_state_dict(self, state: dict, *, resume: bool = True) -> None:
        if resume:
            self.check_resumed_noise(self._given_noise_multiplier, state["noise_multiplier"])
        super().load_state_dict(state, resume=resume)
        self.steps_taken = state["steps_taken"]
        self.noise_multiplier = state["noise_multiplier"]
        sampler = state.get("sampler")
        if sampler is None and self.steps_taken and not self.noise.secure:
            # a checkpoint from before the sampler's state was saved: continue on a stream of its own, never used
            # before, rather than the seed's, whose first batches the run has already used
            stream = torch.Generator().manual_seed(self.noise.derived_seed(2**32 + self.steps_taken))
            sampler = stream.get_state()
        if sampler is not None:
            self._sampler_generator().set_state(sampler)

    def describe(self) -> str:
        sigma = "calibrated at plan time" if self.noise_multiplier is None else f"{self.noise_multiplier:.4g}"
        return f"{super().describe()[:-1]}, noise_multiplier={sigma}, max_grad_norm={self.max_grad_norm:g})"
