"""DP-SGD step cost: fedgen's ``DPSGD`` beside Opacus' hooks and a non-private step, in one run.

One training step (forward, backward, per-example clipping and noise where private, SGD update) on a
fixed batch already on the device, timed with CUDA events: the median of ``--steps`` steps after
``--warmup`` steps, and the peak memory allocated during the timed steps. Models:

- ``convnet``: fedgen's ConvNet 3 x [conv 128, GroupNorm, ReLU, avg-pool] on 28 x 28 x 1, cross-entropy;
- ``unet``: diffusers ``UNet2DModel`` (channels 32, 64, 64; attention at the middle level) on 32 x 32 x 1,
  the DDPM noise-prediction loss with ``K`` noise draws per example;
- ``unet_eps1`` and ``unet_eps10``: the class-conditional UNets that ``examples/mnist_dp_diffusion_eps1.yaml`` and
  ``examples/mnist_dp_diffusion.yaml`` train (built by ``fedgen.generators.ddpm.build_unet`` from the example's own
  settings) on 28 x 28 x 1, the same loss with labels.

Methods: ``nonprivate`` (plain SGD; with K draws the batch holds B x K noisy copies), ``opacus_hooks``
(Opacus' ``GradSampleModule`` + ``DPOptimizer``; no noise multiplicity), ``fedgen`` (``DPSGD(engine="fedgen")``:
fedgen's clipping engine, K draws averaged inside each example's loss). A method that cannot run a row prints
why instead of a number. Usage:

    python benchmarks/dp_step.py --models convnet unet --batches 256 1024 --draws 1 4
    python benchmarks/dp_step.py --autocast bf16  # every method under bfloat16 autocast
    python benchmarks/dp_step.py --methods nonprivate fedgen --cuda_graph   # forward and backward from a graph
    python benchmarks/dp_step.py --compile inductor   # every method's model through torch.compile
    python benchmarks/dp_step.py --count_ops      # kernel launches per step, on the CPU
    python benchmarks/dp_step.py --count_ops --models unet --count_batch 256 --chunk_elements 1073741824  # unchunked
    python benchmarks/dp_step.py --methods nonprivate fedgen --book_keep_all   # no per-example weights formed
    python benchmarks/dp_step.py --models unet --batches 256 --profile fedgen   # where the time goes
    python benchmarks/dp_step.py --models convnet --batches 1024 --profile fedgen --profile_shapes  # by input shape
    python benchmarks/dp_step.py --models convnet --batches 1024 --profile_diff fedgen  # what fedgen adds, by kernel
    python benchmarks/dp_step.py --models unet_eps10 --unet_settings '{"attention_head_dim": null}'  # an A/B row
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from fedgen.evaluation import ConvNet
from fedgen.mechanisms import DPSGD, CapturedBackward, fused_norms, per_example
from fedgen.mechanisms.cuda_graphs import capture_graph

DATASET_SIZE = 60000


class Task:
    """A model, a batch on the device, and the loss of one step."""

    def __init__(self, model: nn.Module, batch: tuple[torch.Tensor, ...], loss: Callable, draws: int = 1) -> None:
        self.model, self.batch, self.loss, self.draws = model, batch, loss, draws


def convnet_task(batch_size: int, draws: int, device: torch.device) -> Task:
    if draws != 1:
        raise ValueError("noise draws apply to diffusion only")
    model = ConvNet(image_shape=(1, 28, 28), num_classes=10).to(device)
    x = torch.rand(batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    return Task(model, (x, y), lambda m, x, y: F.cross_entropy(m(x), y))


def benchmark_unet(device: torch.device) -> nn.Module:
    """The benchmark's UNet: diffusers ``UNet2DModel`` (32, 64, 64), attention at the middle level, 32 x 32 x 1."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32).to(device)


def unet_task(batch_size: int, draws: int, device: torch.device) -> Task:
    from diffusers import DDPMScheduler

    model = benchmark_unet(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x = torch.rand(batch_size, 1, 32, 32, device=device) * 2 - 1

    def loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # K draws of (timestep, noise) per example; the batch holds B x K noisy copies.
        x = x.repeat_interleave(draws, dim=0)
        noise = torch.randn_like(x)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x.shape[0],), device=x.device)
        noisy = scheduler.add_noise(x, noise, t)
        return F.mse_loss(m(noisy, t).sample, noise)

    return Task(model, (x,), loss, draws)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: settings of the example UNets that replace the examples' own (``--unet_settings``), for A/B rows
UNET_SETTINGS: dict = {}


def example_unet(example: str, device: torch.device) -> nn.Module:
    """The UNet of ``examples/<example>``, read from the example, so the row follows it: every setting of the
    example that ``build_unet`` takes."""
    import inspect

    import yaml

    from fedgen.generators.ddpm import build_unet

    settings = yaml.safe_load((EXAMPLES / example).read_text())["model"]["init_args"]
    kwargs = {key: settings[key] for key in inspect.signature(build_unet).parameters if key in settings}
    return build_unet(**{**kwargs, **UNET_SETTINGS}).to(device)


def example_unet_task(example: str) -> Callable[[int, int, torch.device], Task]:
    """The task of training ``examples/<example>``'s UNet with the class-conditional diffusion loss."""

    def task(batch_size: int, draws: int, device: torch.device) -> Task:
        from diffusers import DDPMScheduler

        model = example_unet(example, device)
        classes = model.config.num_class_embeds
        scheduler = DDPMScheduler(num_train_timesteps=1000)
        x = torch.rand(batch_size, model.config.in_channels, *model.config.sample_size, device=device) * 2 - 1
        y = torch.randint(0, classes - 1, (batch_size,), device=device)

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            x, y = x.repeat_interleave(draws, dim=0), y.repeat_interleave(draws, dim=0)
            noise = torch.randn_like(x)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (x.shape[0],), device=x.device)
            return F.mse_loss(m(scheduler.add_noise(x, noise, t), t, class_labels=y).sample, noise)

        return Task(model, (x, y), loss, draws)

    return task


TASKS = {"convnet": convnet_task, "unet": unet_task,
         "unet_eps1": example_unet_task("mnist_dp_diffusion_eps1.yaml"),
         "unet_eps10": example_unet_task("mnist_dp_diffusion.yaml")}
#: the engine's on/off switches that ``--NAME on|off`` sets for A/B measurements: (module, attribute, what it does)
SWITCHES = {
    "gram_windows": (fused_norms, "GRAM_WINDOWS", "the Gram path's windows summed and contracted by the Triton "
                                                  "kernel, against the engine's separable sums in PyTorch"),
    "row_sums": (fused_norms, "ROW_SUMS", "GroupNorm's per-example sums by the Triton kernel, against PyTorch's "
                                          "GroupNorm backward"),
    "group_norm_backward": (fused_norms, "GROUP_NORM_BACKWARD", "GroupNorm's input gradient from the row sums "
                                                                "(GroupNormFromRowSums), against PyTorch's backward"),
    "low_bits": (fused_norms, "LOW_BITS", "the TF32 rounding of book-kept operands in one Triton kernel, against "
                                          "PyTorch's add and bitwise and"),
    "gram_bounds": (per_example, "GRAM_BOUNDS", "TF32 rounding bounds of Gram-path convolutions from their Gram "
                                                "matrices' diagonals, against reading the input and output gradient"),
}
#: the models trained with the diffusion loss, where noise draws K apply
DIFFUSION = ("unet", "unet_eps1", "unet_eps10")


def make_parts(method: str, task: Task, batch_size: int
               ) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[torch.Tensor], None], DPSGD | None]:
    """The model, optimizer, backward call and (for fedgen) mechanism of ``method`` for ``task``."""
    model = task.model
    mechanism = None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward
    if method == "nonprivate":
        pass
    elif method == "opacus_hooks":
        if task.draws != 1:
            raise NotImplementedError("Opacus clips each of the B x K rows: no noise multiplicity")
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=batch_size, loss_reduction="mean")
    elif method == "fedgen":
        mechanism = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, seed=0, engine="fedgen")
        shape = task.batch[0].shape[1:]
        dataset = TensorDataset(torch.zeros(1, *shape).expand(DATASET_SIZE, *shape))
        loader = mechanism.data_loader(dataset, batch_size=batch_size)
        model, optimizer = mechanism.make_private(model, optimizer, data_loader=loader, steps=10**6)

        def backward(loss: torch.Tensor) -> None:
            mechanism.backward(loss, draws=task.draws)
    else:
        raise ValueError(f"unknown method {method!r}")
    return model, optimizer, backward, mechanism


def make_step(method: str, task: Task, batch_size: int, autocast: str = "off", cuda_graph: bool = False,
              compile_backend: str | None = None) -> Callable[[], None]:
    """One training step of ``method``: eager, with forward and backward replayed from a CUDA graph, or with the
    model (after make_private) run through ``torch.compile(backend=compile_backend)``."""
    model, optimizer, backward, mechanism = make_parts(method, task, batch_size)
    if compile_backend is not None:
        if cuda_graph:
            raise NotImplementedError("--compile and --cuda_graph: one at a time")
        # code compiled for the previous row's model would be reused without this one's hooks
        torch.compiler.reset()
        model = torch.compile(model, backend=compile_backend)
    if cuda_graph and method == "opacus_hooks":
        raise NotImplementedError("CUDA graphs here: nonprivate and fedgen only")
    if cuda_graph and method == "fedgen":  # the library's captured backward pass, one micro-batch of the batch
        captured = CapturedBackward(mechanism, lambda *batch: task.loss(model, *batch), size=batch_size,
                                    draws=task.draws)
        run_backward = lambda: captured(*task.batch)  # noqa: E731
    else:
        run_backward = lambda: backward(task.loss(model, *task.batch))  # noqa: E731
    device_type = task.batch[0].device.type

    def forward_backward() -> None:
        # autocast around forward and backward, as Lightning's precision="bf16-mixed" puts it around a step
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
            run_backward()

    if cuda_graph and method == "nonprivate":
        return graphed_step(model, optimizer, forward_backward)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()

    return step


def graphed_step(model: nn.Module, optimizer: torch.optim.Optimizer, forward_backward: Callable[[], None]
                 ) -> Callable[[], None]:
    """The non-private baseline for ``--cuda_graph``: forward and backward captured once as a CUDA graph and
    replayed, the gradients (in the graph's memory, refilled by every replay) handed to the parameters, the
    optimizer step eager. (fedgen's private step uses the library's ``CapturedBackward``.)"""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA device")
    params = [p for p in model.parameters() if p.requires_grad]

    def step_and_clear() -> None:  # the warm-up runs are whole steps
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    optimizer.zero_grad(set_to_none=True)
    graph = capture_graph(forward_backward, warmup=3, after_warmup=step_and_clear)
    captured = [p.grad for p in params]

    def step() -> None:
        graph.replay()
        for p, grad in zip(params, captured, strict=True):
            p.grad = grad
        optimizer.step()

    return step


def check_graphed_sums(batch_size: int = 256) -> float:
    """The largest relative difference between fedgen's clipped sums replayed from a CUDA graph and computed
    eagerly (``CapturedBackward(graph=False)``) from the same weights and batch, on the ConvNet (whose loss
    draws no random numbers)."""
    sums = []
    for graph in (False, True):
        torch.manual_seed(0)
        task = convnet_task(batch_size, 1, torch.device("cuda"))
        model, _, _, mechanism = make_parts("fedgen", task, batch_size)
        CapturedBackward(mechanism, lambda *batch, m=model: task.loss(m, *batch), size=batch_size,
                         graph=graph)(*task.batch)
        sums.append([p.summed_grad for p in model.parameters() if p.requires_grad])
    return max(((r - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
               for e, r in zip(*sums, strict=True))


def measure(step: Callable[[], None], warmup: int, steps: int) -> tuple[float, float]:
    """Median ms per step and peak MB allocated during the timed steps."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20


#: aten operators that launch no kernel (views, metadata, allocation)
NO_KERNEL = {"view", "_unsafe_view", "reshape", "detach", "alias", "transpose", "t", "permute", "expand", "slice",
             "select", "unsqueeze", "squeeze", "as_strided", "split", "split_with_sizes", "unbind", "empty",
             "empty_like", "new_empty", "empty_strided", "new_empty_strided", "squeeze_", "unsqueeze_",
             "promote_types", "_record_function_enter_new", "_record_function_exit"}


def count_kernel_ops(step: Callable[[], None]) -> int:
    """Operators of one step that launch a kernel, counted on any device (after one warm-up step): a
    device-independent measure of launch overhead, which dominates small steps on a GPU."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    step()
    with Count() as counter:
        step()
    return sum(n for name, n in counter.calls.items() if name not in NO_KERNEL)


def print_op_counts(models: list[str], draws: list[int], methods: list[str], batch_size: int = 8) -> None:
    print(f"batch {batch_size}; per_example.CHUNK_ELEMENTS {per_example.CHUNK_ELEMENTS}\n")
    print("| model | K | method | kernel-launching operators per step | x non-private |\n|---|---|---|---|---|")
    for name in models:
        for k in (draws if name in DIFFUSION else [1]):
            base = None
            for method in methods:
                torch.manual_seed(0)
                try:
                    task = TASKS[name](batch_size, k, torch.device("cpu"))
                    ops = count_kernel_ops(make_step(method, task, batch_size))
                except NotImplementedError as err:
                    print(f"| {name} | {k} | {method} | {err} | |")
                    continue
                base = ops if method == "nonprivate" else base
                print(f"| {name} | {k} | {method} | {ops} | {f'{ops / base:.2f}x' if base else ''} |", flush=True)


def profiled(step: Callable[[], None], steps: int, record_shapes: bool = False):
    """The profiler of ``steps`` steps after three warm-up steps (CUDA activity too on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=record_shapes) as prof:
        for _ in range(steps):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return prof


def print_profile(step: Callable[[], None], steps: int, rows: int, by_shape: bool = False) -> None:
    """Where a step's time goes: the operators of ``steps`` profiled steps (after warm-up), by device time; with
    ``by_shape`` one row per operator and input shapes (which layer a reduction or product belongs to)."""
    prof = profiled(step, steps, record_shapes=by_shape)
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages(group_by_input_shape=by_shape).table(sort_by=key, row_limit=rows, max_name_column_width=60,
                                                                 max_shapes_column_width=90))


def kernel_times(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Milliseconds per step by kernel name over ``steps`` profiled steps (after warm-up): the device kernels where
    the step launched any (each counted once, not again under the operator that launched it); for a step that ran
    on the CPU, on a machine with a GPU or without, the operators' own CPU time."""
    from torch.autograd import DeviceType

    kernels: dict[str, float] = {}
    operators: dict[str, float] = {}
    for event in profiled(step, steps).events():
        if event.device_type == DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.time_range.elapsed_us() / 1000 / steps
        elif event.device_type == DeviceType.CPU and event.name.startswith("aten::"):
            operators[event.name] = operators.get(event.name, 0.0) + event.self_cpu_time_total / 1000 / steps
    return kernels or operators


def print_profile_diff(base: Callable[[], None], other: Callable[[], None], steps: int, rows: int = 40) -> None:
    """What a method adds to the non-private step, kernel by kernel: ms per step of each, and the difference, largest
    first; the last row the totals."""
    a, b = kernel_times(base, steps), kernel_times(other, steps)
    diff = sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, 0.0) - a.get(k, 0.0)))
    print("| kernel | non-private ms / step | method ms / step | difference |\n|---|---|---|---|")
    for name in diff[:rows]:
        short = name if len(name) <= 100 else name[:97] + "..."
        base, other = a.get(name, 0.0), b.get(name, 0.0)
        print(f"| {short} | {base:.3f} | {other:.3f} | {other - base:+.3f} |")
    total_a, total_b = sum(a.values()), sum(b.values())
    print(f"| all {len(diff)} kernels | {total_a:.3f} | {total_b:.3f} | {total_b - total_a:+.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["convnet", "unet"], choices=sorted(TASKS))
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--draws", nargs="+", type=int, default=[1, 4], help="noise draws K (UNets only)")
    parser.add_argument("--methods", nargs="+", default=["nonprivate", "opacus_hooks", "fedgen"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--autocast", choices=["off", "bf16"], default="off",
                        help="bf16: every method's forward and backward under bfloat16 autocast")
    parser.add_argument("--profile", default=None, metavar="METHOD",
                        help="profile METHOD on the first model, batch and K given, and print where the time goes")
    parser.add_argument("--profile_diff", default=None, metavar="METHOD",
                        help="profile the non-private step and METHOD's on the first model, batch and K given, and "
                             "print what METHOD adds, kernel by kernel")
    parser.add_argument("--profile_shapes", action="store_true",
                        help="with --profile: one row per operator and input shapes, 60 rows")
    parser.add_argument("--cuda_graph", action="store_true",
                        help="replay forward and backward (and fedgen's clipping) from a CUDA graph, the optimizer "
                             "step eager; nonprivate and fedgen only")
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="run each method's model through torch.compile with this backend (e.g. inductor)")
    parser.add_argument("--book_keep_all", action="store_true",
                        help="fedgen book-keeps every Linear and Conv2d weight, forming none (per_example.FORM_RATIO"
                             " = 0), for an A/B against the default")
    parser.add_argument("--form_ratio", type=float, default=per_example.FORM_RATIO,
                        help="fedgen forms a weight's per-example gradients where they hold at most this many times "
                             "the values of its (input, output gradient) pair (per_example.FORM_RATIO)")
    parser.add_argument("--no_gram_norms", action="store_true",
                        help="fedgen never takes a convolution's norms from its padded input's Gram matrix "
                             "(per_example.GRAM_NORMS = False), for an A/B against the default")
    parser.add_argument("--form_precision", choices=["ieee", "tf32"], default=per_example.FORM_PRECISION,
                        help="the products that form per-example gradients (per_example.FORM_PRECISION), for an "
                             "A/B against the default")
    parser.add_argument("--book_precision", choices=["ieee", "tf32", "auto"], default=per_example.BOOK_PRECISION,
                        help="the book-kept weights' norms and clipped sums (per_example.BOOK_PRECISION): IEEE "
                             "float32, TF32 on operands rounded to TF32 values (exact products), or auto: TF32 for "
                             "the layers with many multiply-adds")
    parser.add_argument("--kernel_min_window", type=int, default=fused_norms.MIN_WINDOW,
                        help="on a GPU, fedgen's fused kernel takes convolutions with at least this many window "
                             "entries C_in k_h k_w (fused_norms.MIN_WINDOW), for an A/B against the default")
    parser.add_argument("--kernel_min_positions", type=int, default=fused_norms.MIN_POSITIONS,
                        help="... and at least this many output positions (fused_norms.MIN_POSITIONS)")
    for name, (module, attribute, what) in SWITCHES.items():
        parser.add_argument(f"--{name}", choices=["on", "off"], default="on" if getattr(module, attribute) else "off",
                            help=f"{what} ({module.__name__.rsplit('.', 1)[-1]}.{attribute}), for an A/B")
    parser.add_argument("--tf32_sums", choices=["split", "margin"], default=per_example.TF32_SUMS,
                        help="how a clipped sum book-kept in TF32 stays within C (per_example.TF32_SUMS): two exact "
                             "halves, or one product with a rounding margin in the clip factors")
    parser.add_argument("--chunk_elements", type=int, default=per_example.CHUNK_ELEMENTS,
                        help="fedgen's norms take a few examples at a time within max(this, the layer's input) values "
                             "(per_example.CHUNK_ELEMENTS), for an A/B against the default: each chunk launches its "
                             "own kernels")
    parser.add_argument("--count_ops", action="store_true",
                        help="count the kernel-launching operators of one step (on the CPU, at --count_batch) instead "
                             "of timing")
    parser.add_argument("--count_batch", type=int, default=8, help="the batch of --count_ops")
    parser.add_argument("--unet_settings", type=json.loads, default={}, metavar="JSON",
                        help="settings of build_unet that replace the example UNets' own, e.g. "
                             "'{\"attention_head_dim\": null}' (one attention head per block)")
    args = parser.parse_args()
    UNET_SETTINGS.update(args.unet_settings)
    per_example.FORM_RATIO = 0.0 if args.book_keep_all else args.form_ratio
    per_example.GRAM_NORMS = not args.no_gram_norms
    fused_norms.MIN_WINDOW, fused_norms.MIN_POSITIONS = args.kernel_min_window, args.kernel_min_positions
    per_example.FORM_PRECISION = args.form_precision
    per_example.BOOK_PRECISION = args.book_precision
    per_example.CHUNK_ELEMENTS = args.chunk_elements
    per_example.TF32_SUMS = args.tf32_sums
    for name, (module, attribute, _) in SWITCHES.items():
        setattr(module, attribute, getattr(args, name) == "on")
    if args.count_ops:
        print_op_counts(args.models, args.draws, args.methods, args.count_batch)
        return
    if args.profile or args.profile_diff:  # the first model, batch and K given, on whatever device there is
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        name, batch_size = args.models[0], args.batches[0]

        def step_of(method: str) -> Callable[[], None]:
            torch.manual_seed(0)
            task = TASKS[name](batch_size, args.draws[0] if name in DIFFUSION else 1, device)
            return make_step(method, task, batch_size, args.autocast)

        if args.profile_diff:
            print(f"profile: {args.profile_diff} against nonprivate on {name}, batch {batch_size}, {device}")
            print_profile_diff(step_of("nonprivate"), step_of(args.profile_diff), steps=5)
        else:
            print(f"profile: {args.profile} on {name}, batch {batch_size}, {device}, autocast {args.autocast}")
            print_profile(step_of(args.profile), steps=5, rows=60 if args.profile_shapes else 30,
                          by_shape=args.profile_shapes)
        return
    if not torch.cuda.is_available():
        raise SystemExit("dp_step.py times GPU steps: no CUDA device found")
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; median of {args.steps} steps "
          f"after {args.warmup}; autocast {args.autocast}; CUDA graphs {'on' if args.cuda_graph else 'off'}; "
          f"torch.compile {args.compile or 'off'}; fedgen forms per-example weight gradients up to "
          f"{per_example.FORM_RATIO:g} times their pair's size; Gram norms "
          f"{'on' if per_example.GRAM_NORMS else 'off'}; the fused kernel from {fused_norms.MIN_WINDOW} window "
          f"entries and {fused_norms.MIN_POSITIONS} positions; formed gradients in {per_example.FORM_PRECISION}; "
          f"book-kept norms and sums in {per_example.BOOK_PRECISION}; Gram windows by the kernel "
          f"{args.gram_windows}; GroupNorm sums by the kernel {args.row_sums}; GroupNorm backward from them "
          f"{args.group_norm_backward}; TF32 rounding by the kernel "
          f"{args.low_bits}; TF32 clipped sums by {args.tf32_sums}; Gram-path bounds from diagonals "
          f"{args.gram_bounds}; "
          f"chunks of {per_example.CHUNK_ELEMENTS} values\n")
    if args.cuda_graph:
        print(f"check: fedgen's clipped sums on the ConvNet, replayed against eager, largest relative difference "
              f"{check_graphed_sums():.1e}\n")
    print("| model | batch | K | method | ms / step | x non-private | peak MB | x non-private |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for batch_size in args.batches:
            for draws in (args.draws if name in DIFFUSION else [1]):
                base = None
                for method in args.methods:
                    # Opacus' hooks hold the module in reference cycles: collect the previous row's model and
                    # per-example gradients so that they do not count in this row's peak memory.
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.manual_seed(0)
                    try:
                        task = TASKS[name](batch_size, draws, device)
                        ms, mb = measure(make_step(method, task, batch_size, args.autocast, args.cuda_graph,
                                                   args.compile), args.warmup, args.steps)
                    except Exception as err:  # a method that cannot run this row says why, the table goes on
                        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
                        if not isinstance(err, NotImplementedError):
                            traceback.print_exc()
                        print(f"| {name} | {batch_size} | {draws} | {method} | fails: {reason} | | | |", flush=True)
                        continue
                    if method == "nonprivate":
                        base = (ms, mb)
                    ratio = f"{ms / base[0]:.2f}x" if base else ""
                    mem_ratio = f"{mb / base[1]:.2f}x" if base else ""
                    print(f"| {name} | {batch_size} | {draws} | {method} | {ms:.2f} | {ratio} | {mb:.0f} | "
                          f"{mem_ratio} |", flush=True)
                    del task


if __name__ == "__main__":
    main()
