"""fedgen's per-example clipping engine: one backward pass for the layer outputs, clipping by book-keeping.

Opacus' hooks let autograd compute every weight gradient and then compute every per-example gradient
again. Here (after the book-keeping idea of Bu et al., ICML 2023) the forward pass records each layer's
input ``a_l`` and output ``z_l``; one ``torch.autograd.grad(loss, [z_l])`` computes only the output
gradients ``g_l = dL/dz_l`` (autograd skips the weight gradients nobody asked for); then, per layer, the
per-example gradients are formed from ``(a_l, g_l)`` with one batched product, their squared norms are
summed over layers, each example is scaled by ``min(1, C / (||grad_i|| + 1e-6))`` (Opacus' rule) and the
scaled sum is added to ``p.summed_grad``. Layers:

- ``Linear``: ``grad_i W = g_i^T a_i`` (summed over any sequence dimensions), ``grad_i b = sum g_i``;
- ``Conv2d``: the same on the unfolded input (``F.unfold``: positions as the sequence dimension);
- ``GroupNorm`` / ``LayerNorm``: ``grad_i weight = sum g_i * x_hat_i`` with ``x_hat`` the normalized input,
  ``grad_i bias = sum g_i``;
- ``Embedding``: ``g_i`` scattered into the rows of the indices example ``i`` used.

Every trainable parameter of the module must sit in one of these layers (checked when the engine is
built), so none escapes clipping. Parameters must be used only through their layer's forward: a direct use
(``x @ layer.weight``) is not recorded, so its gradient is missing from the update (never unclipped in it).
A layer called several times in one forward pass adds its per-example
gradients over the calls. The loss is the *mean* over the batch (as in Opacus with
``loss_reduction="mean"``): per-example gradients are ``B`` times the gradients of the mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from fedgen.errors import ConfigError

PerExampleRule = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]
"""``rule(layer, a, g, batch)``: per-example gradients (first dimension ``batch``) from the layer input ``a``
and output gradient ``g``, whose first dimension holds ``batch * K`` rows, the K rows of an example together
(K noise draws per example); the K rows of an example are treated as more positions of one sequence."""


def _linear(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    a3, g3 = a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1])
    grads = {"weight": torch.bmm(g3.transpose(1, 2), a3)}
    if layer.bias is not None:
        grads["bias"] = g3.sum(1)
    return grads


def _conv2d(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    groups, draws = layer.groups, a.shape[0] // batch
    cols = F.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    positions = cols.shape[-1]

    def by_example(t: torch.Tensor) -> torch.Tensor:  # (B K, G, c, T) -> (B G, c, K T)
        t = t.reshape(batch, draws, groups, -1, positions).permute(0, 2, 3, 1, 4)
        return t.reshape(batch * groups, t.shape[2], draws * positions)

    cols = by_example(cols.reshape(batch * draws, groups, -1, positions))  # (B G, C_in/G k k, K T)
    g3 = by_example(g.reshape(batch * draws, groups, -1, positions))  # (B G, C_out/G, K T)
    grads = {"weight": torch.bmm(g3, cols.transpose(1, 2)).reshape(batch, *layer.weight.shape)}
    if layer.bias is not None:
        grads["bias"] = g.reshape(batch, draws, layer.out_channels, -1).sum((1, 3))
    return grads


def _affine_grads(layer: nn.GroupNorm | nn.LayerNorm, g: torch.Tensor, x_hat: torch.Tensor, batch: int,
                  affine_dims: int) -> dict[str, torch.Tensor]:
    """Per-example affine gradients: sums over every dimension but the examples and the last ``affine_dims``."""
    def reduce(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, -1, *t.shape[t.dim() - affine_dims:]).sum(1)

    grads = {}
    if layer.weight is not None:
        grads["weight"] = reduce(g * x_hat)
    if layer.bias is not None:
        grads["bias"] = reduce(g)
    return grads


def _group_norm(layer: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    x_hat = F.group_norm(a, layer.num_groups, eps=layer.eps)
    # the affine parameters act on dim 1 (channels): move it last
    return _affine_grads(layer, g.movedim(1, -1), x_hat.movedim(1, -1), batch, 1)


def _layer_norm(layer: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    x_hat = F.layer_norm(a, layer.normalized_shape, eps=layer.eps)
    return _affine_grads(layer, g, x_hat, batch, len(layer.normalized_shape))


def _embedding(layer: nn.Embedding, ids: torch.Tensor, g: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    rows = ids.reshape(batch, -1) + torch.arange(batch, device=ids.device).unsqueeze(1) * layer.num_embeddings
    weight = torch.zeros(batch * layer.num_embeddings, layer.embedding_dim, device=g.device, dtype=g.dtype)
    weight.index_add_(0, rows.flatten(), g.reshape(-1, layer.embedding_dim))
    return {"weight": weight.reshape(batch, layer.num_embeddings, layer.embedding_dim)}


RULES: dict[type[nn.Module], PerExampleRule] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
}


def _check_layer(name: str, layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d) and (isinstance(layer.padding, str) or layer.padding_mode != "zeros"):
        raise ConfigError(name or "model", f"Conv2d with padding={layer.padding!r}, padding_mode="
                          f"{layer.padding_mode!r} is not supported by fedgen's clipping engine",
                          "use numeric zero padding, or DPSGD(engine='opacus')")
    if isinstance(layer, nn.Embedding) and (layer.max_norm is not None or layer.sparse):
        raise ConfigError(name or "model", "Embedding with max_norm or sparse gradients is not supported",
                          "use a plain Embedding, or DPSGD(engine='opacus')")


@dataclass
class _Record:
    layer: nn.Module
    inputs: torch.Tensor
    output: torch.Tensor
    input_version: int
    output_version: int


class PerExampleClipping:
    """Records layer inputs and outputs of ``module`` and turns a loss into clipped per-example gradient sums.

    Args:
        module: the model; every trainable parameter must belong to a supported layer.
        max_grad_norm: C, the per-example clipping norm.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        self.max_grad_norm = float(max_grad_norm)
        self.layers: dict[nn.Module, str] = {}
        unsupported = []
        for name, layer in module.named_modules():
            if not any(p.requires_grad for p in layer.parameters(recurse=False)):
                continue
            if type(layer) not in RULES:
                unsupported.append(f"{name or '<root>'} ({type(layer).__name__})")
                continue
            _check_layer(name, layer)
            self.layers[layer] = name
        if unsupported:
            raise ConfigError("model", "fedgen's clipping engine has no per-example rule for the trainable "
                              f"parameters of {', '.join(unsupported)}",
                              f"use layers of {sorted(t.__name__ for t in RULES)} or DPSGD(engine='opacus')")
        self._records: list[_Record] = []
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]

    def _record(self, layer: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            self._records.append(_Record(layer, inputs[0].detach(), output, inputs[0]._version, output._version))

    @property
    def pending(self) -> bool:
        """Whether a forward pass was recorded and not yet turned into clipped gradients."""
        return bool(self._records)

    def discard(self) -> None:
        """Forget the recorded forward pass (e.g. after an exception)."""
        self._records = []

    def remove(self) -> None:
        """Detach the hooks from the module."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def backward(self, loss: torch.Tensor, *, draws: int = 1) -> None:
        """Add ``sum_i clip_C(grad_i)`` of the recorded forward pass to each parameter's ``summed_grad``.

        ``loss`` is the mean over the rows of the batch. With ``draws = K`` the rows are ``B`` examples times
        K noise draws (rows ``i K .. i K + K - 1`` belong to example i, as ``repeat_interleave`` makes them),
        and example i's loss is the mean over its K rows (noise multiplicity, Dockhorn et al. 2023): its
        gradient is ``B * sum_k g_ik``, formed without materializing the K rows' gradients separately.
        """
        records, self._records = self._records, []
        if not records:
            raise RuntimeError("no forward pass was recorded: run the model with gradients enabled before backward")
        for r in records:
            if r.output._version != r.output_version or r.inputs._version != r.input_version:
                raise RuntimeError(f"the input or output of layer {self.layers[r.layer]!r} was modified in place after "
                                   "the layer ran (e.g. ReLU(inplace=True)); use out-of-place operations")
        rows = records[0].inputs.shape[0]
        if draws < 1 or rows % draws:
            raise ValueError(f"the batch has {rows} rows, not a multiple of draws={draws}")
        batch = rows // draws
        output_grads = torch.autograd.grad(loss, [r.output for r in records], allow_unused=True)
        per_example: dict[nn.Parameter, torch.Tensor] = {}
        for r, g in zip(records, output_grads, strict=True):
            if g is None:
                continue
            if r.inputs.shape[0] != rows:
                raise RuntimeError(f"layer {self.layers[r.layer]!r} saw a batch of {r.inputs.shape[0]}, not {rows}: "
                                   "the first dimension of every layer input must index the examples")
            for pname, grad in RULES[type(r.layer)](r.layer, r.inputs, g * batch, batch).items():
                param = getattr(r.layer, pname)
                if param.requires_grad:
                    per_example[param] = per_example[param] + grad if param in per_example else grad
        if not per_example:
            return
        sq_norms = torch.stack([grad.reshape(batch, -1).pow(2).sum(1) for grad in per_example.values()]).sum(0)
        factor = (self.max_grad_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)
        for param, grad in per_example.items():
            clipped = torch.einsum("b,b...->...", factor.to(grad.dtype), grad).to(param.dtype)
            summed = getattr(param, "summed_grad", None)
            param.summed_grad = clipped if summed is None else summed + clipped
