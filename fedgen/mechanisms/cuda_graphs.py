"""fedgen's clipped backward pass replayed from a CUDA graph, in micro-batches of one fixed size.

At a small batch a DP-SGD step spends much of its time launching kernels: the clipping engine adds about 600
operators to a UNet step (docs/benchmarks.md, "Kernel launches per step"). A CUDA graph records the kernels of
one forward and backward pass, the engine's norms, clip factors and clipped sums included, and replays them
with one launch. A graph needs fixed shapes, while a Poisson sample's size changes from step to step, so the
sample is cut into micro-batches of ``size`` examples and the last one is padded with copies of its first
example at weight 0 (the ``weights`` of :meth:`PerExampleClipping.backward
<fedgen.mechanisms.per_example.PerExampleClipping.backward>`): a padding row's norm is computed and its clip
factor multiplied by 0, so the clipped sum is exactly that of the real examples. The noise, the ledger and
the update stay outside the graph, in the optimizer's step, as without one: the privacy accounting is the
same.

``loss_fn`` is captured once: it must read no values back to the host (no ``.item()``, no shapes that depend
on values), and its randomness (diffusion noise and steps, label dropout) must come from torch's default CUDA
generator, which a replay advances. With ``graph=False`` the same padded micro-batches run eagerly, on any
device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedgen.mechanisms.dp_sgd import DPSGD


def capture_graph(run: Callable[[], None], *, warmup: int, after_warmup: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """``run`` captured as a CUDA graph, after ``warmup`` eager runs on a side stream, each followed by
    ``after_warmup`` (e.g. dropping the gradients it left): PyTorch's recipe for capturing a backward pass."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
            after_warmup()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


class CapturedBackward:
    """``DPSGD.backward`` for the examples of ``inputs``, in padded micro-batches of ``size``, replayed from a
    CUDA graph captured at the first call.

    Args:
        mechanism: a ``DPSGD`` whose fedgen engine runs (after ``make_private``).
        loss_fn: ``loss_fn(*micro_batch)``, the mean loss over the micro-batch's rows, as given to
            ``DPSGD.backward`` (with ``draws = K``, example i fills rows ``i K .. i K + K - 1``).
        size: examples per micro-batch (the physical batch size).
        draws: noise draws K per example.
        graph: False runs the same padded micro-batches eagerly (any device).
        warmup: eager passes on a side stream before the capture, whose sums are discarded (PyTorch asks for
            warm-up before capturing a backward pass).
    """

    def __init__(self, mechanism: DPSGD, loss_fn: Callable[..., torch.Tensor], *, size: int, draws: int = 1,
                 graph: bool = True, warmup: int = 2) -> None:
        if not mechanism.owns_backward:
            raise RuntimeError("CapturedBackward needs DPSGD's fedgen engine (engine='fedgen', or 'auto' on a model "
                               "it supports) and make_private first")
        if size < 1 or draws < 1:
            raise ValueError(f"size and draws must be at least 1, got size={size}, draws={draws}")
        if graph and not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; use graph=False to run the same micro-batches "
                               "eagerly")
        self.mechanism, self.loss_fn, self.size, self.draws = mechanism, loss_fn, size, draws
        self.graph, self.warmup = graph, warmup
        self._params = mechanism.private_parameters  # those whose summed_grad the engine fills
        self._static: list[torch.Tensor] | None = None  # the micro-batch buffers the graph reads
        self._weights: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._filled = -1  # the real rows the weights were last set for: a full micro-batch keeps its all-ones weights
        self._captured: torch.cuda.CUDAGraph | None = None
        self._loss: torch.Tensor | None = None
        self._sums: list[torch.Tensor | None] = []  # the clipped sums the graph writes, one per parameter

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | None:
        """Add the clipped per-example gradients of the examples of ``inputs`` (tensors whose first dimension
        indexes the same examples) to each parameter's ``summed_grad``. Returns the mean of the micro-batches'
        losses (padding rows included in the last one's), or None for an empty sample, which still leaves a
        zero sum for the step's noise."""
        if not inputs or any(len(t) != len(inputs[0]) for t in inputs):
            raise ValueError("give one or more tensors whose first dimension indexes the same examples")
        n = len(inputs[0])
        if n == 0:
            self.mechanism.empty_batch()
            return None
        losses = [self._micro_batch([t[start:start + self.size] for t in inputs]) for start in range(0, n, self.size)]
        return torch.stack(losses).mean()

    def _micro_batch(self, chunk: list[torch.Tensor]) -> torch.Tensor:
        m = len(chunk[0])
        if self._static is None:
            self._static = [torch.empty((self.size, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in chunk]
            device = chunk[0].device
            self._positions = torch.arange(self.size, device=device)
            self._weights = torch.empty(self.size, device=device)
        if len(chunk) != len(self._static):
            raise ValueError(f"the first call gave {len(self._static)} input tensors, this one {len(chunk)}: a captured "
                             "pass takes the same inputs every time")
        for static, t in zip(self._static, chunk, strict=True):
            if t.shape[1:] != static.shape[1:] or t.dtype != static.dtype or t.device != static.device:
                raise ValueError(f"the inputs changed from {tuple(static.shape[1:])} {static.dtype} on {static.device} "
                                 f"to {tuple(t.shape[1:])} {t.dtype} on {t.device} per example: a captured pass "
                                 "takes one shape; make a new CapturedBackward for another")
            static[:m].copy_(t)
            if m < self.size:
                static[m:].copy_(t[:1].expand(self.size - m, *t.shape[1:]))  # padding: copies of a real example
        if m != self._filled:  # launches before the replay delay it, so a run of full micro-batches sets them once
            self._weights.copy_(self._positions < m)
            self._filled = m
        if self.graph:
            if self._captured is None:
                self._capture()
            self._captured.replay()
        else:  # the same pass eagerly, its sums kept apart and added as a replay's are
            self._sums = self._apart(self._forward_backward)
        self._add_sums()
        return self._loss.clone()

    def _apart(self, run: Callable[[], None]) -> list[torch.Tensor | None]:
        """Run ``run`` (a pass, or its capture) with the parameters' sums set aside; returns the sums it wrote,
        one per parameter, and puts the earlier ones back."""
        kept = [getattr(p, "summed_grad", None) for p in self._params]
        self._drop_sums()
        try:
            run()
            return [getattr(p, "summed_grad", None) for p in self._params]
        finally:
            for p, summed in zip(self._params, kept, strict=True):
                p.summed_grad = summed

    def _drop_sums(self) -> None:
        for p in self._params:
            p.summed_grad = None

    def _add_sums(self) -> None:
        """Add the sums of the last pass (a replay's live in the graph's memory, which the next replay
        overwrites) to the parameters' ``summed_grad``: a copy at the first micro-batch of a step, else a sum,
        each one batched operation over all parameters (a loop would launch a kernel per parameter)."""
        pairs = [(p, total) for p, total in zip(self._params, self._sums, strict=True) if total is not None]
        fresh = [(p, t) for p, t in pairs if getattr(p, "summed_grad", None) is None]
        held = [(p, t) for p, t in pairs if getattr(p, "summed_grad", None) is not None]
        if fresh:
            for (p, _), copy in zip(fresh, torch._foreach_mul([t for _, t in fresh], 1.0), strict=True):
                p.summed_grad = copy
        if held:
            sums = torch._foreach_add([p.summed_grad for p, _ in held], [t for _, t in held])
            for (p, _), total in zip(held, sums, strict=True):
                p.summed_grad = total

    def _forward_backward(self) -> None:
        loss = self.loss_fn(*self._static)
        self.mechanism.backward(loss, draws=self.draws, weights=self._weights)
        self._loss = loss.detach()

    def _capture(self) -> None:
        def capture() -> None:
            self._captured = capture_graph(self._forward_backward, warmup=self.warmup, after_warmup=self._drop_sums)

        self._sums = self._apart(capture)
