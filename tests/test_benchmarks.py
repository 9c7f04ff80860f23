"""The benchmarks' building blocks on the CPU (the timings themselves need a GPU): each method's step trains, CUDA
graphs are refused without a CUDA device, with a message that says so, the DP diffusion signal estimate is that
of per-example gradients, and the training-seed table reads only trainings of one configuration."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

DP_STEP = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "dp_step.py"))


@pytest.mark.parametrize("method", ["nonprivate", "opacus_hooks", "fedgen"])
def test_each_method_steps_the_convnet(method):
    torch.manual_seed(0)
    task = DP_STEP["TASKS"]["convnet"](4, 1, torch.device("cpu"))
    before = [p.detach().clone() for p in task.model.parameters()]
    DP_STEP["make_step"](method, task, 4)()
    assert any(not torch.equal(b, p) for b, p in zip(before, task.model.parameters(), strict=True))


@pytest.mark.parametrize("method", ["nonprivate", "fedgen"])
def test_each_method_steps_the_convnet_through_torch_compile(method):
    """--compile: the model made private, then compiled (a backend without code generation, for speed here)."""
    torch.manual_seed(0)
    task = DP_STEP["TASKS"]["convnet"](4, 1, torch.device("cpu"))
    before = [p.detach().clone() for p in task.model.parameters()]
    try:
        DP_STEP["make_step"](method, task, 4, compile_backend="aot_eager")()
    finally:
        torch.compiler.reset()
    assert any(not torch.equal(b, p) for b, p in zip(before, task.model.parameters(), strict=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_graphs_are_refused_without_cuda():
    task = DP_STEP["TASKS"]["convnet"](4, 1, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        DP_STEP["make_step"]("fedgen", task, 4, cuda_graph=True)


@pytest.mark.parametrize("method", ["nonprivate", "fedgen"])
@pytest.mark.parametrize(("row", "example"), [("unet_eps1", "mnist_dp_diffusion_eps1.yaml"),
                                              ("unet_eps10", "mnist_dp_diffusion.yaml")])
def test_each_method_steps_the_examples_unet_with_noise_draws(method, row, example):
    """The ``unet_eps1`` and ``unet_eps10`` rows train the UNets that their examples state, K draws per example."""
    import yaml

    torch.manual_seed(0)
    task = DP_STEP["TASKS"][row](2, 2, torch.device("cpu"))
    settings = yaml.safe_load((DP_STEP["EXAMPLES"] / example).read_text())["model"]["init_args"]
    assert list(task.model.config.block_out_channels) == settings["block_channels"]
    assert task.batch[0].shape == (2, *settings["image_shape"]) and task.draws == 2
    before = [p.detach().clone() for p in task.model.parameters()]
    DP_STEP["make_step"](method, task, 2)()
    assert any(not torch.equal(b, p) for b, p in zip(before, task.model.parameters(), strict=True))


def test_the_unet_operator_benchmark_compares_equal_computations():
    """unet_ops.py times pairs that compute the same values: its forward-and-backward runs agree on the CPU."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)  # as when the script runs: its folder is on the path
    try:
        ops = runpy.run_path(str(Path(folder) / "unet_ops.py"))
    finally:
        sys.path.remove(folder)
    x = torch.randn(3, 16, 5, 5, dtype=torch.float64, requires_grad=True)
    up_grad = torch.randn(3, 16, 10, 10, dtype=torch.float64)
    up = [ops["forward_backward"](op, [x], up_grad)() for op in (ops["interpolate_2x"], ops["repeat_2x"])]
    weight, bias = (torch.randn(16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out_grad = torch.randn_like(x)
    norm = [ops["forward_backward"](op, [x, weight, bias], out_grad)()
            for op in (ops["group_norm"], ops["group_norm_as_batch_norm"])]
    for first, second in (up, norm):
        torch.testing.assert_close(first, second)


def test_op_counts_follow_the_chunk_size(monkeypatch, capsys):
    """--count_ops --chunk_elements: the norms of a few examples at a time launch their kernels once a chunk, so
    chunks of one example launch more than one chunk of all (the A/B that --chunk_elements gives on a GPU)."""
    from fedgen.mechanisms import per_example

    counts = {}
    for chunk in (1, 2**30):
        monkeypatch.setattr(per_example, "CHUNK_ELEMENTS", chunk)
        DP_STEP["print_op_counts"](["convnet"], [1], ["fedgen"], batch_size=4)
        counts[chunk] = int(capsys.readouterr().out.strip().splitlines()[-1].split("|")[4])
    assert counts[1] > counts[2**30] > 0


def test_the_signal_estimate_is_the_cross_terms_of_the_clipped_gradients():
    """dp_diffusion_signal.py's rho from grouped clipped sums: with one group per example it is exactly
    ``sqrt(mean_{i != j} <c_i g_i, c_j g_j>) / C`` over each example's own clipped K-draw gradient, computed here
    by autograd one example at a time, with C between the examples' norms (some clipped, some not); with two
    groups, the mean of the terms between them."""
    import copy

    from fedgen.mechanisms import DPSGD
    from tests.generators.test_ddpm import _data, _tiny

    signal = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "dp_diffusion_signal.py"))
    data = _data()
    x, y = data.tensors[0][:6], data.tensors[1][:6]
    reference = _tiny(label_dropout=0.3)
    model = copy.deepcopy(reference)
    draws = reference.hparams.noise_draws
    torch.manual_seed(3)
    rows = reference.diffusion_loss(x, y, reduction="none")
    params = list(reference.unet.parameters())
    grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        rows[i * draws:(i + 1) * draws].mean(), params, retain_graph=True)]) for i in range(6)])
    norms = grads.norm(dim=1)
    clip = float(norms.sort().values[2:4].mean())  # three examples above it, three below
    clipped = grads * (clip / norms).clamp(max=1).unsqueeze(1)
    assert (norms > clip).any() and (norms < clip).any()

    model.mechanism = DPSGD(noise_multiplier=1e-6, max_grad_norm=clip, seed=0)
    model.mechanism.make_private(model.unet, torch.optim.SGD(model.unet.parameters(), lr=0.0),
                                 data_loader=model.attach_private_data(data), steps=5)
    for groups, cross, pairs in [(6, clipped.sum(0).square().sum() - clipped.square().sum(), 30),
                                 (2, 2 * clipped[:3].sum(0) @ clipped[3:].sum(0), 18)]:
        assert cross > 0
        torch.manual_seed(3)  # the same diffusion noise, steps and dropped labels as the reference's rows
        r = signal["signal_by_groups"](model, x, y, draws, 6, clip, num_groups=groups)
        assert r["rho"] == pytest.approx(float(cross / pairs) ** 0.5 / clip, rel=1e-6)
        assert r["signal_to_noise_at_sigma_1"] == pytest.approx(6 * r["rho"] / grads.shape[1] ** 0.5)


@pytest.mark.parametrize("bad, named", [(["--repeats", "0"], "--repeats"), (["--clip_norms", "0"], "--clip_norms")])
def test_the_signal_benchmark_refuses_bad_settings_before_any_work(bad, named, monkeypatch, capsys):
    signal = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "dp_diffusion_signal.py"))
    monkeypatch.setattr(sys, "argv", ["dp_diffusion_signal.py", "--run", "no/such/run", *bad])
    with pytest.raises(SystemExit):
        signal["main"]()
    assert named in capsys.readouterr().err


def test_the_signal_benchmark_measures_before_and_after_its_training_steps(real_data_root, monkeypatch, capsys):
    """The default mode on real MNIST: a row for each stage and K, with rho in (0, 1]; after the training steps the
    optimizer's last sums are cleared, so the grouped clipped sums of the measurement start from nothing."""
    signal = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "dp_diffusion_signal.py"))
    monkeypatch.setenv("FEDGEN_DATA_ROOT", str(real_data_root))
    monkeypatch.setattr(sys, "argv", ["dp_diffusion_signal.py", "--channels", "8,16,16", "--draws", "1", "2",
                                      "--batch", "32", "--train_steps", "1"])
    signal["main"]()
    rows = [line.split(" | ") for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert [(r[1], r[2]) for r in rows] == [("init", "1"), ("init", "2"), ("after 1 steps", "1"),
                                            ("after 1 steps", "2")]
    assert all(0 < float(r[4]) <= 1 for r in rows)


def test_the_profile_diff_gives_each_kernel_of_both_steps_and_totals_that_add_up(capsys):
    """--profile_diff: per kernel (here, off a GPU, per operator) the non-private step's and the method's time, their
    difference, and a totals row equal to the sums of the rows when every kernel is listed."""
    torch.manual_seed(0)
    steps = [DP_STEP["make_step"](method, DP_STEP["TASKS"]["convnet"](4, 1, torch.device("cpu")), 4)
             for method in ("nonprivate", "fedgen")]
    DP_STEP["print_profile_diff"](*steps, steps=2, rows=10_000)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    *kernels, total = rows
    assert kernels and total[0].strip().startswith("all")
    assert any(float(r[1]) > 0 for r in kernels) and any(float(r[2]) > 0 for r in kernels)
    for column in (1, 2):
        assert abs(sum(float(r[column]) for r in kernels) - float(total[column])) <= 1e-3 * len(kernels) + 1e-6
    for r in kernels:
        assert abs(float(r[2]) - float(r[1]) - float(r[3])) <= 2e-3
    differences = [abs(float(r[3])) for r in kernels]
    assert differences == sorted(differences, reverse=True)


PRIOR = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "pretraining_prior.py"))


def test_the_prior_benchmark_paints_its_sources_and_measures_a_loss_per_step():
    generator = torch.Generator().manual_seed(0)
    strokes = PRIOR["source_images"]("mixed", 16, generator, None)
    assert strokes.shape == (16, 1, 28, 28)
    model = PRIOR["untrained_unet"]()
    before = PRIOR["loss_on"](model, strokes)
    assert len(before) == len(PRIOR["STEPS_MEASURED"]) and all(0 < v < 10 for v in before)
    assert PRIOR["loss_on"](model, strokes) == before  # fixed noise: the same weights give the same losses
    optimizer = torch.optim.Adam(model.unet.parameters(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        model.diffusion_loss(strokes, torch.full((16,), model.null_class)).backward()
        optimizer.step()
    assert sum(PRIOR["loss_on"](model, strokes)) < sum(before)


SEEDS = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "training_seeds.py"))


def _tiny_merf_extra(root) -> str:
    """tests/test_cli.py's tiny DP-Merf run as one string of fedgen fit arguments, less its config and run folder."""
    import shlex

    from tests.test_cli import tiny_args

    args = tiny_args(root, Path("unused"))
    return shlex.join(a for a in args[2:] if not a.startswith("--run_dir="))


def test_training_seeds_trains_once_per_seed_and_reports_the_mean(real_data_root, tmp_path, capsys):
    """--config: one whole fit per seed, each in its own folder with that seed; the table's mean, smallest and
    largest are those of the runs' own metrics.json."""
    import json

    import yaml

    from tests.test_cli import EXAMPLE

    out = tmp_path / "seeds"
    report = SEEDS["main"](["--config", str(EXAMPLE), "--seeds", "3", "5", "--out", str(out),
                            "--extra", _tiny_merf_extra(real_data_root)])
    accuracies = []
    for seed in (3, 5):
        folder = out / f"seed{seed}"
        assert yaml.safe_load((folder / "config.yaml").read_text())["seed_everything"] == seed
        accuracies.append(json.loads((folder / "metrics.json").read_text())["test_accuracy"])
        assert f"| {folder} | {seed} |" in report
    sd = 100 * abs(accuracies[0] - accuracies[1]) / 2 ** 0.5  # two runs: sd = |a - b| / sqrt(2), error = sd / sqrt(2)
    assert report.endswith(f"over 2 training seeds: mean {50 * sum(accuracies):.2f}%, standard deviation {sd:.2f} "
                           f"points (standard error {sd / 2 ** 0.5:.2f}), smallest {100 * min(accuracies):.2f}%, "
                           f"largest {100 * max(accuracies):.2f}%")
    assert report in capsys.readouterr().out

    # the finished runs are refused as a new --out before anything trains ...
    def must_not_train(args):
        raise AssertionError("trained")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fedgen.cli.fit", must_not_train)
        with pytest.raises(ValueError, match="already hold finished runs"):
            SEEDS["main"](["--config", str(EXAMPLE), "--seeds", "3", "4", "--out", str(out)])
        # so is a folder holding an unfinished run's checkpoints, though its seed comes after one to train
        (tmp_path / "more" / "seed4" / "checkpoints").mkdir(parents=True)
        (tmp_path / "more" / "seed4" / "checkpoints" / "last.ckpt").write_bytes(b"ledger")
        with pytest.raises(ValueError, match=r"out: .*seed4 holds an unfinished run's checkpoints"):
            SEEDS["main"](["--config", str(EXAMPLE), "--seeds", "3", "4", "--out", str(tmp_path / "more")])
        assert (tmp_path / "more" / "seed4" / "checkpoints" / "last.ckpt").read_bytes() == b"ledger"
        assert not (tmp_path / "more" / "seed3").exists()
    # ... and read again with --runs, to the same table
    assert SEEDS["main"](["--runs", str(out / "seed3"), str(out / "seed5")]) == report


def _fake_run(folder: Path, seed, accuracy: float, **config) -> Path:
    import json

    import yaml

    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "seed_everything": seed, "run_dir": str(folder), "ckpt_path": None,
        "trainer": {"default_root_dir": str(folder), "max_epochs": 80},
        "model": {"init_args": {"noise_draws": 8, "sample_scale": 0.3}}, **config}))
    (folder / "metrics.json").write_text(json.dumps({
        "epsilon": 0.99987, "test_accuracy": accuracy,
        "per_classifier": [{"test_accuracy": accuracy - 0.01}, {"test_accuracy": accuracy + 0.01}]}))
    return folder


def test_training_seeds_reads_finished_runs_of_one_configuration(tmp_path):
    first = _fake_run(tmp_path / "a", 0, 0.9615)
    second = _fake_run(tmp_path / "b", 1, 0.9510)
    report = SEEDS["main"](["--runs", str(first), str(second)])
    assert f"| {first} | 0 | 0.9999 | 96.15% | 95.15, 97.15 |" in report
    assert report.endswith("over 2 training seeds: mean 95.62%, standard deviation 0.74 points (standard error "
                           "0.53), smallest 95.10%, largest 96.15%")
    third = _fake_run(tmp_path / "c", 2, 0.9528)
    report = SEEDS["main"](["--runs", str(first), str(second), str(third)])
    # the three trainings of the epsilon-1 example (runs 92 to 94): sd = sqrt(sum (a - mean)^2 / 2)
    assert report.endswith("over 3 training seeds: mean 95.51%, standard deviation 0.56 points (standard error "
                           "0.32), smallest 95.10%, largest 96.15%")
    fourth = _fake_run(tmp_path / "d", 3, 0.9624)
    report = SEEDS["main"](["--runs", str(first), str(second), str(third), str(fourth)])
    # the four trainings (runs 92 to 95)
    assert report.endswith("over 4 training seeds: mean 95.69%, standard deviation 0.59 points (standard error "
                           "0.29), smallest 95.10%, largest 96.24%")
    alone = SEEDS["main"](["--runs", str(third)])
    assert alone.endswith("over 1 training seed: mean 95.28%, smallest 95.28%, largest 95.28%")


@pytest.mark.parametrize("second, problem", [
    ({"seed": 1, "model": {"init_args": {"noise_draws": 4, "sample_scale": 0.3}}},
     "differ in model.init_args.noise_draws"),
    ({"seed": 0}, "both trained with seed 0"),
    ({"seed": 1, "ckpt_path": "other/generator.ckpt"}, "started from the checkpoint other/generator.ckpt"),
    ({"seed": True}, "without a fixed integer seed"),
])
def test_training_seeds_refuses_runs_that_are_not_trainings_of_one_configuration(tmp_path, second, problem):
    """Different settings, a shared seed (runs 88 and 92 of the benchmarks), a generator trained by another run,
    or no fixed seed: the spread would not be one configuration's over independent trainings."""
    first = _fake_run(tmp_path / "a", 0, 0.96)
    seed = second.pop("seed")
    other = _fake_run(tmp_path / "b", seed, 0.95, **second)
    with pytest.raises(ValueError, match=problem):
        SEEDS["table"]([first, other])


def test_training_seeds_refuses_a_folder_given_twice_or_unfinished(tmp_path):
    first = _fake_run(tmp_path / "a", 0, 0.96)
    with pytest.raises(ValueError, match="given more than once"):
        SEEDS["table"]([first, tmp_path / "a" / ".." / "a"])
    (tmp_path / "c").mkdir()
    unfinished = r"^runs: .*c is not a finished `fedgen fit` run folder \(missing \['config.yaml', 'metrics.json'\]\)"
    with pytest.raises(ValueError, match=unfinished):
        SEEDS["table"]([first, tmp_path / "c"])
    (tmp_path / "d").mkdir()  # a folder where metrics.json should be a file is no finished run either
    (tmp_path / "d" / "config.yaml").write_text((first / "config.yaml").read_text())
    (tmp_path / "d" / "metrics.json").mkdir()
    with pytest.raises(ValueError, match=r"d is not a finished `fedgen fit` run folder \(missing \['metrics.json'\]"):
        SEEDS["table"]([first, tmp_path / "d"])
