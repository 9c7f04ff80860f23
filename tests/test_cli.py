"""`fedgen fit` end to end on tiny data, resume, and bad configurations that fail early and name the field."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from fedgen.cli import fit, main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist_dp_merf.yaml"


def tiny_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--config", str(EXAMPLE), f"--data.init_args.root={root}", "--data.init_args.train_subset=600",
        "--data.init_args.test_subset=200", "--model.init_args.num_features=200",
        "--model.init_args.steps_per_epoch=3", "--model.init_args.mechanism.init_args.delta=1e-4",
        "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--num_synthetic=100", "--evaluation.classifier=mlp", "--evaluation.epochs=1",
        "--evaluation.progress_bar=false", f"--run_dir={run_dir}", *extra,
    ]


def test_fit_writes_the_run_folder(real_data_root, tmp_path):
    run = tmp_path / "run"
    metrics = fit(tiny_args(real_data_root, run, "--evaluation.repeats=2"))
    assert {"config.yaml", "metrics.json", "samples.png", "synthetic.pt", "generator.ckpt", "checkpoints"} <= {
        p.name for p in run.iterdir()}
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test_accuracy"] == metrics["test_accuracy"] and 0 <= saved["test_accuracy"] <= 1
    each = [r["test_accuracy"] for r in saved["per_classifier"]]
    assert len(each) == 2 and saved["test_accuracy"] == pytest.approx(sum(each) / 2)
    assert 0.99 < saved["epsilon"] <= 1.0 and saved["delta"] == 1e-4 and saved["num_synthetic"] == 100
    assert saved["noise"] == "seeded"
    synthetic = torch.load(run / "synthetic.pt")
    assert synthetic["images"].shape == (100, 1, 28, 28) and synthetic["images"].dtype == torch.uint8
    assert synthetic["labels"].shape == (100,)
    assert Image.open(run / "samples.png").size[1] > 10 * 28  # ten rows, one per class
    for ckpt in (run / "generator.ckpt", run / "checkpoints" / "last.ckpt"):
        ledger = torch.load(ckpt, weights_only=False)["fedgen_privacy"]["ledger"]
        assert [e["count"] for e in ledger["events"]] == [1]
    assert "target_epsilon: 1.0" in (run / "config.yaml").read_text()


def test_resume_continues_the_same_ledger(real_data_root, tmp_path):
    run = tmp_path / "run"
    first = fit(tiny_args(real_data_root, run))
    (run / "metrics.json").unlink()  # pretend the run was interrupted after the generator's first epoch
    resumed = fit(tiny_args(real_data_root, run, "--trainer.max_epochs=2",
                            f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    assert resumed["epsilon"] == pytest.approx(first["epsilon"])
    assert [e["count"] for e in resumed["privacy_ledger"]["events"]] == [1]  # no second release
    assert (run / "config.yaml").exists() and list(run.glob("config-resumed-*.yaml"))


def test_a_resume_that_changes_the_noise_source_fails_and_keeps_the_run(real_data_root, tmp_path, capsys):
    """A run's noise is seeded or secure from its first release to its last: metrics.json could not say which."""
    run = tmp_path / "run"
    fit(tiny_args(real_data_root, run))
    (run / "metrics.json").unlink()  # pretend the run was interrupted after the generator's first epoch
    saved = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    with pytest.raises(SystemExit):
        main(["fit", *tiny_args(real_data_root, run, "--trainer.max_epochs=2",
                                "--model.init_args.mechanism.init_args.secure_noise=true",
                                f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")])
    err = capsys.readouterr().err
    assert "mechanism.secure_noise" in err and "seeded" in err and "secure_noise: false" in err
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == saved
    assert not list(run.glob("config-resumed-*.yaml"))  # refused before the resumed config was written


def test_fit_logs_each_epoch_with_its_steps_metrics_and_epsilon_spent(real_data_root, tmp_path, caplog):
    """What a batch job's log shows while the generator trains (no progress bar draws there): the first and the
    last epoch, and those between them at least 30 s after the previous line (none in this short run)."""
    caplog.set_level(logging.INFO, logger="fedgen")
    metrics = fit(tiny_args(real_data_root, tmp_path / "run", "--trainer.max_epochs=3"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(", ")[:2] for line in lines] == [["epoch 1/3", "step 3"], ["epoch 3/3", "step 9"]]
    assert all("train/mmd2 " in line for line in lines)
    assert f"epsilon {metrics['epsilon']:.4g} spent (delta 0.0001)" in lines[-1]


def test_the_epoch_log_logs_between_first_and_last_only_after_its_interval(caplog):
    from types import SimpleNamespace

    from fedgen.cli_fit import EpochLog

    caplog.set_level(logging.INFO, logger="fedgen")
    module = SimpleNamespace(mechanism=None, training_seconds=1.0)
    for every, logged in [(0.0, [1, 2, 3, 4]), (3600.0, [1, 4])]:
        caplog.clear()
        callback = EpochLog(every_seconds=every)
        for epoch in range(4):
            trainer = SimpleNamespace(current_epoch=epoch, max_epochs=4, global_step=2 * (epoch + 1),
                                      callback_metrics={"train/loss": torch.tensor(0.5), "val/x": 1.0})
            callback.on_train_epoch_end(trainer, module)
        assert [r.getMessage() for r in caplog.records] == [f"epoch {e}/4, step {2 * e}, train/loss 0.5, 1 s"
                                                            for e in logged]


BAD_CONFIGS = [
    (["--evaluation.repeats=0"], "evaluation.repeats"),
    (["--model.init_args.mechanism.init_args.target_epsilon=0"], "target_epsilon"),
    (["--model.init_args.mechanism.init_args.target_epsilon=-1"], "target_epsilon"),
    (["--model.init_args.mechanism.init_args.delta=1.5"], "delta"),
    (["--model.init_args.mechanism.init_args.delta=0.01"], "delta"),  # >= 1/n for n = 600
    (["--model.init_args.mechanism.class_path=fedgen.mechanisms.NoSuchMechanism"], "NoSuchMechanism"),
    (["--model.init_args.mechanism=fedgen.mechanisms.DPSGD"], "not correspond to a subclass of GaussianMechanism"),
    (["--data.init_args.root=/nonexistent/fedgen-data"], "/nonexistent/fedgen-data/MNIST/raw"),
    (["--data.class_path=fedgen.data.VisionDataModule", "--data.init_args.dataset=NoSuchDataset"], "dataset"),
    (["--model.init_args.image_shape=[3, 32, 32]"], "image_shape"),
    (["--model.init_args.num_classes=5"], "num_classes"),
    (["--model.init_args.num_features=101"], "num_features"),
    (["--num_synthetic=3"], "num_synthetic"),
    (["--evaluation.classifier=resnet9000"], "classifier"),
    (["--model.init_args.mechanism.init_args.clip_norm=0.5"], "clip_norm"),
    (["--model.init_args.latent_dim=-1"], "model.latent_dim"),
    (["--model.init_args.steps_per_epoch=-2"], "model.steps_per_epoch"),
    (["--model.init_args.embedding_batch_size=0"], "model.embedding_batch_size"),
    (["--model.init_args.lr=-1"], "model.lr"),
    (["--model.init_args.lr_decay=-1"], "model.lr_decay"),
    (["--model.init_args.mechanism.init_args.sample_rate=0.5"], "model.mechanism.sample_rate"),
    (["--trainer.max_epochs=0"], "trainer.max_epochs"),
    (["--trainer.max_epochs=-1", "--trainer.max_steps=-1"], "trainer.max_epochs"),
    (["--evaluation.lr=-1"], "evaluation.lr"),
    (["--evaluation.accelerator=tpu"], "evaluation.accelerator"),
    (["--evaluation.augment_shift=-1"], "evaluation.augment_shift"),
    (["--evaluation.augment_shift=28"], "evaluation.augment_shift"),  # the 28x28 image moved out of its frame
    *([] if torch.cuda.is_available() else [(["--trainer.accelerator=gpu"], "trainer")]),  # bad only without one
    (["--model.init_args.num_featurez=200"], "num_featurez"),
    (["--seed_everything=-1"], "seed_everything"),
    ([f"--model.init_args.mechanism.init_args.seed={2**70}"], "mechanism.seed"),  # failed at the first noise draw
    (["--fid_samples=1"], "fid_samples"),  # refused only after training before
    (["--trainer.limit_train_batches=0"], "trainer.limit_train_batches"),
    (["--model.init_args.num_features=20000000000"], "model.num_features"),  # 31 TB of frequencies
    (["--num_synthetic=100000000000"], "num_synthetic"),
    # an object's own error, named by its path in the config
    (["--model.init_args.mechanism.init_args.delta=2"], "model.mechanism.delta"),
    (['--federation={"class_path": "fedgen.federated.FederatedRelease", "init_args": {"num_clients": 2, "partitioner":'
      ' {"class_path": "fedgen.data.DirichletPartitioner", "init_args": {"alpha": -1}}}}'],
     "federation.partitioner.alpha"),
]


@pytest.mark.parametrize(("extra", "field"), BAD_CONFIGS, ids=[f"{i}-{f[:20]}" for i, (_, f) in enumerate(BAD_CONFIGS)])
def test_bad_config_fails_before_training_and_names_the_field(real_data_root, tmp_path, capsys, monkeypatch, extra,
                                                              field):
    from fedgen.mechanisms import GaussianMechanism

    monkeypatch.setattr(GaussianMechanism, "charge", lambda *a: pytest.fail("released before the check"))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *tiny_args(real_data_root, run, *extra)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert field in err, err
    assert not (run / "checkpoints").exists()  # nothing was trained


@pytest.mark.parametrize("resume", [False, True])
def test_a_finished_run_folder_is_never_overwritten(real_data_root, tmp_path, capsys, resume):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.json").write_text('{"epsilon": 1.0}')
    extra = [f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "--run_dir=null"] if resume else []
    with pytest.raises(SystemExit):
        main(["fit", *tiny_args(real_data_root, run, *extra)])
    assert "run_dir" in capsys.readouterr().err
    assert (run / "metrics.json").read_text() == '{"epsilon": 1.0}'


def test_a_new_run_never_overwrites_an_unfinished_runs_checkpoints(real_data_root, tmp_path, capsys):
    """Only a resume (--ckpt_path) may write into a folder whose checkpoints carry a ledger."""
    run = tmp_path / "run"
    fit(tiny_args(real_data_root, run))
    (run / "metrics.json").unlink()  # as if it had stopped part-way
    saved = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} | {
        "generator.ckpt": (run / "generator.ckpt").read_bytes()}
    with pytest.raises(SystemExit):
        main(["fit", *tiny_args(real_data_root, run)])
    err = capsys.readouterr().err
    assert "run_dir" in err and "--ckpt_path=" in err
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} | {
        "generator.ckpt": (run / "generator.ckpt").read_bytes()} == saved
    other = tmp_path / "other"  # another run's checkpoint resumed into this folder would overwrite its ledger too
    fit(tiny_args(real_data_root, other))
    with pytest.raises(SystemExit):
        main(["fit", *tiny_args(real_data_root, run, f"--ckpt_path={other / 'checkpoints' / 'last.ckpt'}")])
    assert "run_dir" in capsys.readouterr().err
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == saved["last.ckpt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for path in (a_file, a_file / "run"):
        with pytest.raises(SystemExit):
            main(["fit", *tiny_args(real_data_root, path)])
        assert "run_dir" in capsys.readouterr().err


def test_a_checkpoint_that_cannot_continue_the_run_is_refused_before_anything_is_written(real_data_root, tmp_path,
                                                                                         capsys):
    run = tmp_path / "run"
    fit(tiny_args(real_data_root, run))
    (run / "metrics.json").unlink()
    last = run / "checkpoints" / "last.ckpt"
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    other_data = ["--data.class_path=fedgen.data.FashionMNISTDataModule", f"--data.init_args.root={real_data_root}",
                  "--data.init_args.train_subset=600", "--data.init_args.test_subset=200"]
    cases = [([f"--ckpt_path={tmp_path / 'missing.ckpt'}"], "is not a file"),
             ([f"--ckpt_path={text}"], "cannot be read"),
             ([f"--ckpt_path={last}", "--model.init_args.num_features=100"], "other settings"),
             ([f"--ckpt_path={last}", *other_data], "trained on mnist (600 examples; public pretraining: none)")]
    for extra, problem in cases:
        target = tmp_path / f"resumed-{len(problem)}"
        with pytest.raises(SystemExit):
            main(["fit", *tiny_args(real_data_root, target, "--trainer.max_epochs=2", *extra)])
        err = capsys.readouterr().err
        assert "ckpt_path" in err and problem in err, err
        assert not target.exists()  # no run folder, no config written


def test_public_data_for_a_generator_without_public_pretraining_is_refused_before_the_run_folder(real_data_root,
                                                                                                  tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["fit", *tiny_args(real_data_root, run, "--public_data=fedgen.data.FashionMNISTDataModule",
                                f"--public_data.root={real_data_root}", "--public_data.train_subset=20")])
    assert "public_data: DPMerf has no public pretraining" in capsys.readouterr().err and not run.exists()


def test_unknown_command_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2 and "unknown command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "fit" in capsys.readouterr().out


def test_python_dash_m_fedgen_runs_the_command() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fedgen", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert all(command in done.stdout for command in ("fit", "federate", "audit", "attack"))


def test_help_and_an_unknown_command_load_no_command() -> None:
    import subprocess
    import sys

    script = ("import sys\nfrom fedgen.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    print('exit', e.code)\nprint('loaded', sorted(m for m in ('torch', 'lightning', 'fedgen.cli_fit') "
              "if m in sys.modules))")
    for args, code in ((["--help"], 0), (["trian"], 2)):
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
        assert f"exit {code}\nloaded []" in done.stdout, done.stdout + done.stderr


def test_a_command_is_an_attribute_of_fedgen_cli() -> None:
    import fedgen.cli
    from fedgen.cli_attacks import membership
    from fedgen.cli_federate import federate

    assert fedgen.cli.fit is fit and fedgen.cli.federate is federate and fedgen.cli.membership is membership
    with pytest.raises(AttributeError, match="no attribute 'train'"):
        fedgen.cli.train  # noqa: B018


FEDERATED_EXAMPLE = EXAMPLE.parent / "federated_mnist_dp_merf.yaml"


def test_federated_example_runs_end_to_end_with_one_release(real_data_root, tmp_path, monkeypatch):
    import fedgen.federated.release as release

    splits = []  # fit checks the federation before any release and runs it on the split that check made
    original = release.make_clients
    monkeypatch.setattr(release, "make_clients", lambda *a: splits.append(a) or original(*a))
    run = tmp_path / "run"
    args = tiny_args(real_data_root, run)
    args[1] = str(FEDERATED_EXAMPLE)
    metrics = fit(args)
    assert len(splits) == 1
    federation = metrics["federation"]
    assert federation["num_clients"] == 10 and sum(federation["client_sizes"]) == 600
    assert federation["secure_aggregation"]["graph"] == "full" and "DirichletPartitioner" in federation["partitioner"]
    assert [e["count"] for e in metrics["privacy_ledger"]["events"]] == [1]
    assert 0.99 < metrics["epsilon"] <= 1.0
    assert "federation" in (run / "config.yaml").read_text()


def test_a_federated_release_that_cannot_run_is_refused_before_the_run_folder_is_written(real_data_root, tmp_path,
                                                                                        capsys):
    run = tmp_path / "run"
    args = tiny_args(real_data_root, run, "--federation.init_args.num_clients=1000")
    args[1] = str(FEDERATED_EXAMPLE)
    with pytest.raises(SystemExit):
        main(["fit", *args])
    assert "federation.num_clients: 1000 clients but only 600" in capsys.readouterr().err
    assert not run.exists()
    args = tiny_args(real_data_root, run, "--federation.init_args.num_clients=0")
    args[1] = str(FEDERATED_EXAMPLE)
    with pytest.raises(SystemExit):
        main(["fit", *args])
    # fedgen's own message comes first, not the report jsonargparse makes on an option of several possible classes
    assert capsys.readouterr().err.startswith("fedgen: error: federation.num_clients: must be >= 1, got 0. Fix:")



def _fit_examples() -> list[str]:
    """The examples written for ``fedgen fit``: those that name a generator (``model``) and a ``trainer``."""
    import yaml

    return sorted(p.stem for p in EXAMPLE.parent.glob("*.yaml")
                  if {"model", "trainer"} <= set(yaml.safe_load(p.read_text())))


def test_the_fit_examples_are_found():
    assert {"mnist_dp_merf", "federated_mnist_dp_merf", "mnist_dp_diffusion", "mnist_dp_diffusion_eps1",
            "fashion_mnist_dp_diffusion", "federated_mnist_dp_diffusion"} <= set(_fit_examples())


@pytest.mark.parametrize("name", _fit_examples())
def test_every_fit_example_builds_as_written(name, tmp_path):
    """Each ``fedgen fit`` example parses and builds its generator, mechanism, data and trainer with the values it
    states (nothing is trained or loaded): an example edited into an invalid setting fails here, not on a GPU."""
    import yaml

    from fedgen.cli_fit import build_fit_cli

    example = EXAMPLE.parent / f"{name}.yaml"
    cli = build_fit_cli(["--config", str(example), f"--run_dir={tmp_path / 'run'}", "--trainer.accelerator=cpu"])
    written = yaml.safe_load(example.read_text())["model"]
    assert f"{type(cli.model).__module__.rsplit('.', 1)[0]}.{type(cli.model).__name__}" == written["class_path"]
    plain = {k: v for k, v in written["init_args"].items() if not isinstance(v, dict)}
    assert plain, "the example states no plain settings"
    for key, value in plain.items():
        built = cli.model.hparams[key]
        assert (list(built) if isinstance(value, list) else built) == value, key
    warm_ups = {k: v for k, v in written["init_args"].items() if k in ("central_images", "merf_images") and v}
    runs = {release.name: release for release in getattr(cli.model, "warm_up_releases", ())}
    assert sorted(runs) == sorted(warm_ups)  # the warm-ups the example states are the ones the generator runs
    for key, value in warm_ups.items():
        assert {k: getattr(runs[key], k) for k in value} == value, key


def test_a_second_config_replaces_the_budget_by_a_fixed_noise(tmp_path):
    """docs/cli.md's way to train an example at a fixed noise multiplier with no budget."""
    from fedgen.cli_fit import build_fit_cli

    fixed = tmp_path / "fixed_noise.yaml"
    fixed.write_text("model:\n  init_args:\n    mechanism:\n      class_path: fedgen.mechanisms.DPSGD\n"
                     "      init_args: {target_epsilon: null, noise_multiplier: 1.2}\n")
    cli = build_fit_cli(["--config", str(EXAMPLE.parent / "mnist_dp_diffusion.yaml"), "--config", str(fixed),
                         f"--run_dir={tmp_path / 'run'}", "--trainer.accelerator=cpu"])
    mechanism = cli.model.mechanism
    assert mechanism.target_epsilon is None and mechanism.noise_multiplier == 1.2 and mechanism.delta == 1e-5
    assert cli.model.hparams["noise_draws"] == 4  # the rest of the example is kept


def test_resumes_within_one_second_each_keep_their_config(tmp_path, monkeypatch) -> None:
    """A run resumed twice in the same second (say, two refused resumes) writes two resumed configs, never over one."""
    from datetime import datetime

    from fedgen import runs

    class Frozen:
        @staticmethod
        def now():
            return datetime(2026, 1, 2, 3, 4, 5)

    class Saver:
        def save(self, config, path, **kwargs):
            path.write_text(str(config))

    monkeypatch.setattr(runs, "datetime", Frozen)
    for segment in range(4):
        runs.write_config(Saver(), f"segment {segment}", tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config-resumed-20260102-030405-2.yaml", "config-resumed-20260102-030405-3.yaml",
                     "config-resumed-20260102-030405.yaml", "config.yaml"]
    assert (tmp_path / "config.yaml").read_text() == "segment 0"
    assert (tmp_path / "config-resumed-20260102-030405-3.yaml").read_text() == "segment 3"
