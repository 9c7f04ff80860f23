"""``fedgen audit`` and ``fedgen attack``: run folders, metrics, pictures, and bad input refused before work."""

from __future__ import annotations

import json

import pytest
import torch

from fedgen.attacks import client_gradient, dp_sgd_update, lenet_for_inversion
from fedgen.cli_attacks import attack, audit
from fedgen.errors import ConfigError


def test_fedgen_audit_catches_dp_sgd_without_noise(tmp_path) -> None:
    run = tmp_path / "audit"
    metrics = audit(["--mechanism=fedgen.mechanisms.DPSGD", "--mechanism.noise_multiplier=1e-6",
                     "--mechanism.delta=1e-5", "--mechanism.seed=1", f"--run_dir={run}"])
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["epsilon_lower_bound"] == metrics["epsilon_lower_bound"] > 2
    assert saved["correct"] == saved["guesses"] == 200
    assert len(saved["canaries"]["scores"]) == 1000
    assert (run / "scores.png").stat().st_size > 0 and (run / "config.yaml").exists()


def test_fedgen_audit_refuses_bad_guesses_before_training(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        audit(["--mechanism=fedgen.mechanisms.DPSGD", "--mechanism.noise_multiplier=1.0", "--guesses=3",
               f"--run_dir={tmp_path / 'audit'}"])
    assert err.value.field == "guesses"


def _attack_args(root, run, *extra: str) -> list[str]:
    return ["--attack=fedgen.attacks.DLG", "--attack.iterations=100", "--data=fedgen.data.MNISTDataModule",
            f"--data.root={root}", "--data.train_subset=10", "--examples=[0, 1]", f"--run_dir={run}", *extra]


def test_fedgen_attack_inverts_plain_gradients_and_not_dp_sgd_updates(real_data_root, tmp_path) -> None:
    plain = attack(_attack_args(real_data_root, tmp_path / "plain"))
    assert plain["mean_psnr"] >= 30 and plain["label_accuracy"] == 1.0 and len(plain["updates"]) == 2
    assert (tmp_path / "plain" / "reconstructions.png").stat().st_size > 0
    private = attack(_attack_args(real_data_root, tmp_path / "dp", "--defence=dp_sgd", "--noise_multiplier=1.0"))
    assert private["mean_psnr"] < 12
    assert 0 < private["epsilon_of_one_update"] < 10
    assert json.loads((tmp_path / "dp" / "metrics.json").read_text())["defence"] == "dp_sgd"


def test_fedgen_attack_on_the_generative_pipeline_sees_noise_or_masks(real_data_root, tmp_path) -> None:
    bare = attack(_attack_args(real_data_root, tmp_path / "bare", "--defence=dp_merf", "--noise_multiplier=0"))
    assert bare["mean_psnr"] >= 30 and bare["label_accuracy"] == 1.0 and bare["epsilon_of_one_update"] is None
    released = attack(_attack_args(real_data_root, tmp_path / "released", "--defence=dp_merf",
                                   "--noise_multiplier=3.8"))
    assert released["mean_psnr"] < 12
    assert 0 < released["epsilon_of_one_update"] < 1.0  # sigma 3.8 on sensitivity 1: just under epsilon 1
    masked = attack(_attack_args(real_data_root, tmp_path / "masked", "--defence=secure_aggregation"))
    assert masked["mean_psnr"] < 12 and "masked by secure aggregation among 3 clients" in masked["sent"]
    assert masked["epsilon_of_one_update"] is None  # masking hides the input from the server; it is not DP


@pytest.mark.parametrize(("extra", "field"), [(["--batch_size=3"], "examples"),
                                              (["--defence=dp_sgd", "--noise_multiplier=-1"], "noise_multiplier"),
                                              (["--examples=[0, 99]"], "examples"),
                                              (["--defence=secure_aggregation", "--secure_aggregation_clients=2"],
                                               "secure_aggregation_clients")])
def test_fedgen_attack_refuses_bad_input_before_any_work(real_data_root, tmp_path, extra, field) -> None:
    run = tmp_path / "bad"
    with pytest.raises(ConfigError) as err:
        attack(_attack_args(real_data_root, run, *extra))
    assert err.value.field == field
    assert not (run / "metrics.json").exists()


def test_a_dp_sgd_update_is_the_mean_of_clipped_gradients_plus_noise() -> None:
    torch.manual_seed(1)
    model = lenet_for_inversion()
    images, labels = torch.rand(3, 1, 28, 28), torch.tensor([1, 2, 3])
    clipped = []
    for i in range(3):
        g = torch.cat([t.flatten() for t in client_gradient(model, images[i:i + 1], labels[i:i + 1])])
        clipped.append(g * min(1.0, 0.01 / float(g.norm())))
    sent = dp_sgd_update(model, images, labels, max_grad_norm=0.01, noise_multiplier=0.0)
    torch.testing.assert_close(torch.cat([t.flatten() for t in sent]), torch.stack(clipped).mean(0))
    noisy = dp_sgd_update(model, images, labels, max_grad_norm=0.01, noise_multiplier=2.0,
                          generator=torch.Generator().manual_seed(0))
    noise = (torch.cat([t.flatten() for t in noisy]) - torch.stack(clipped).mean(0)) * 3
    assert float(noise.std()) == pytest.approx(2.0 * 0.01, rel=0.05)


def test_fedgen_membership_attacks_a_fit_runs_releases_and_only_reads_the_run(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit
    from fedgen.cli_attacks import membership
    from tests.generators.test_ddpm import _tiny_cli

    run = tmp_path / "fit"
    trained = fit(_tiny_cli(real_data_root, 2, f"--run_dir={run}"))
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    args = [f"--run={run}", "--members=40", "--non_members=40", "--repeats=2"]
    metrics = membership([*args, f"--run_dir={tmp_path / 'm1'}"])
    assert set(metrics["attacks"]) == {"gan_leaks", "diffusion_loss"}
    assert metrics["generator"] == "DPDiffusion" and metrics["epsilon"] == trained["epsilon"] > 0
    assert all((tmp_path / "m1" / f"roc_{name}.png").stat().st_size > 0 for name in metrics["attacks"])
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before

    # A release that copies its training data is caught: every member is at distance 0 from it.
    train = torch.stack([x for x, _ in _mnist_train(real_data_root, 300)])
    torch.save({"images": (train * 255).round().to(torch.uint8), "labels": torch.zeros(300, dtype=torch.long)},
               run / "synthetic.pt")
    leaky = membership([*args, f"--run_dir={tmp_path / 'm2'}"])["attacks"]["gan_leaks"]
    assert leaky["auc"] == 1.0 and leaky["tpr_at_fpr"]["0.001"] == 1.0


def _mnist_train(root, n: int):
    from fedgen.data import MNISTDataModule

    data = MNISTDataModule(root=str(root), train_subset=n)
    data.prepare_data()
    data.setup("fit")
    return [data.train_set[i] for i in range(n)]


@pytest.mark.parametrize(("extra", "field"), [(["--members=100000"], "members"), (["--repeats=0"], "repeats")])
def test_fedgen_membership_refuses_bad_input_before_any_work(real_data_root, tmp_path, extra, field) -> None:
    from fedgen.cli_attacks import membership

    with pytest.raises(ConfigError) as err:
        membership([f"--run={tmp_path / 'nothing'}", f"--run_dir={tmp_path / 'm'}"])
    assert err.value.field == "run"
    if field == "members":
        from fedgen.cli import fit
        from tests.generators.test_ddpm import _tiny_cli

        fit(_tiny_cli(real_data_root, 1, f"--run_dir={tmp_path / 'fit'}"))
    with pytest.raises(ConfigError) as err:
        membership([f"--run={tmp_path / 'fit'}", f"--run_dir={tmp_path / 'm'}", *extra])
    assert err.value.field == field and not (tmp_path / "m").exists()


def test_fedgen_membership_refuses_a_run_dir_in_the_attacked_run(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit
    from fedgen.cli_attacks import membership
    from tests.generators.test_ddpm import _tiny_cli

    run = tmp_path / "fit"
    fit(_tiny_cli(real_data_root, 1, f"--run_dir={run}", "--evaluation.repeats=1"))
    (tmp_path / "link").symlink_to(run)
    before = {str(p): p.stat().st_mtime_ns for p in run.rglob("*")}
    for run_dir in (run / "membership", tmp_path / "link" / "a" / "b", run):
        with pytest.raises(ConfigError) as err:
            membership([f"--run={run}", "--members=20", "--non_members=20", "--repeats=1", f"--run_dir={run_dir}"])
        assert err.value.field == "run_dir" and "inside, the attacked run" in str(err.value)
        assert {str(p): p.stat().st_mtime_ns for p in run.rglob("*")} == before


@pytest.mark.parametrize("command", ["audit", "attack", "membership"])
def test_fedgen_attack_commands_refuse_a_negative_seed_with_exit_2(real_data_root, tmp_path, capsys, command) -> None:
    from fedgen.cli import main

    run = tmp_path / "run"
    args = {"audit": ["--mechanism=fedgen.mechanisms.DPSGD", "--mechanism.noise_multiplier=1.0", f"--run_dir={run}"],
            "attack": _attack_args(real_data_root, run),
            "membership": [f"--run={tmp_path / 'nothing'}", f"--run_dir={run}"]}[command]
    with pytest.raises(SystemExit) as exited:
        main([command, *args, "--seed_everything=-1"])
    assert exited.value.code == 2
    assert "fedgen: error: seed_everything: " in capsys.readouterr().err and not run.exists()


@pytest.mark.parametrize(("extra", "field"), [
    (["--beta=0"], "beta"),
    (["--beta=2"], "beta"),
    (["--steps=0"], "steps"),
    (["--mechanism.delta=0.1", "--num_canaries=100", "--guesses=2"], "mechanism.delta"),  # about 50 included
])
def test_fedgen_audit_refuses_a_bad_plan_before_the_run_folder(tmp_path, extra, field) -> None:
    run = tmp_path / "audit"
    with pytest.raises(ConfigError) as err:
        audit(["--mechanism=fedgen.mechanisms.DPSGD", "--mechanism.noise_multiplier=1.0", f"--run_dir={run}", *extra])
    assert err.value.field == field and not run.exists()


@pytest.mark.parametrize(("extra", "field"), [(["--defence=dp_sgd", "--delta=2"], "delta"),
                                              (["--defence=dp_merf", "--num_features=101"], "num_features"),
                                              (["--defence=secure_aggregation", "--length_scale=0"], "length_scale")])
def test_fedgen_attack_names_bad_defence_options_before_the_run_folder(real_data_root, tmp_path, extra,
                                                                       field) -> None:
    run = tmp_path / "bad"
    with pytest.raises(ConfigError) as err:
        attack(_attack_args(real_data_root, run, *extra))
    assert err.value.field == field and not run.exists()


def test_inverting_gradients_on_batches_is_given_the_labels_or_refused_before_the_run_folder(real_data_root,
                                                                                             tmp_path) -> None:
    """Inverting Gradients cannot optimize labels: a batch of two needs known_labels, checked before any work."""
    ig = ["--attack=fedgen.attacks.InvertingGradients", "--attack.iterations=30", "--batch_size=2"]
    run = tmp_path / "refused"
    with pytest.raises(ConfigError) as err:
        attack(_attack_args(real_data_root, run, *ig))
    assert err.value.field == "known_labels" and "DLG" in err.value.fix and not run.exists()
    given = attack(_attack_args(real_data_root, tmp_path / "given", *ig, "--known_labels=true"))
    assert given["known_labels"] and given["label_accuracy"] == 1.0 and len(given["updates"]) == 1
    assert given["updates"][0]["recovered_labels"] == given["updates"][0]["labels"]
