"""`fedgen federate` (the DP-FedAvg baseline) end to end on tiny data, resume, and refused configurations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedgen.cli import federate, main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "federated_mnist_dp_fedavg.yaml"
MECHANISM = "--federation.strategy.init_args.mechanism.init_args"


def tiny_args(root: Path, run_dir: Path, *extra: str, rounds: int = 2) -> list[str]:
    mechanism = MECHANISM
    return [
        "--config", str(EXAMPLE), f"--data.init_args.root={root}", "--data.init_args.train_subset=600",
        "--data.init_args.test_subset=200", "--classifier=mlp", "--classifier_args={width: 16, depth: 1}",
        "--num_clients=20", f"--federation.rounds={rounds}", "--federation.sampler.init_args.rate=0.5",
        "--federation.strategy.init_args.strategy.init_args.local_epochs=5", f"{mechanism}.clip_norm=3",
        f"{mechanism}.sample_rate=0.5", f"{mechanism}.num_releases={rounds}", f"{mechanism}.delta=1e-3",
        "--federation.accelerator=cpu", f"--run_dir={run_dir}", *extra,
    ]


def test_federate_trains_across_clients_and_writes_the_run_folder(real_data_root, tmp_path):
    run = tmp_path / "run"
    metrics = federate(tiny_args(real_data_root, run, f"{MECHANISM}.target_epsilon=100"))
    assert {"config.yaml", "metrics.json", "model.pt", "checkpoints"} <= {p.name for p in run.iterdir()}
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert 99 < saved["epsilon"] <= 100 and saved["neighbouring"] == "add/remove one user"
    assert saved["noise"] == "seeded"
    assert saved["rounds"] == 2 and saved["num_clients"] == 20 and sum(saved["client_sizes"]) == 600
    assert [e["count"] for e in saved["privacy_ledger"]["events"]] == [2]
    assert saved["privacy_ledger"]["events"][0]["sample_rate"] == 0.5
    # ten classes: chance is 0.1. Two noisy rounds over Dirichlet-skewed clients learn little: 0.27 to 0.48 over
    # seeds 0 to 4 at epsilon 100 (at epsilon 10, 0.12 to 0.27: too close to chance for a test)
    assert saved["test_accuracy"] > 0.2
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["round"] == 2


def test_federate_resumes_at_the_round_it_stopped_and_ends_where_an_uninterrupted_run_ends(real_data_root, tmp_path):
    fixed_noise = (f"{MECHANISM}.noise_multiplier=1.0", f"{MECHANISM}.target_epsilon=1000")  # the budget is not reached
    whole = federate(tiny_args(real_data_root, tmp_path / "whole", *fixed_noise, rounds=3))
    part = tmp_path / "part"
    federate(tiny_args(real_data_root, part, *fixed_noise, "--federation.rounds=1", rounds=3))
    (part / "metrics.json").unlink()  # as if the run had been stopped after round 1
    resumed = federate(tiny_args(real_data_root, part, *fixed_noise,
                                 f"--ckpt_path={part / 'checkpoints' / 'last.ckpt'}", rounds=3))
    assert resumed["rounds"] == 3 and resumed["test_accuracy"] == whole["test_accuracy"]
    assert resumed["privacy_ledger"] == whole["privacy_ledger"] and resumed["epsilon"] == whole["epsilon"]
    assert [e["count"] for e in resumed["privacy_ledger"]["events"]] == [3]
    a = torch.load(tmp_path / "whole" / "model.pt")["state_dict"]
    b = torch.load(part / "model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_federate_refuses_a_checkpoint_that_is_not_this_runs_before_writing_anything(real_data_root, tmp_path,
                                                                                     capsys):
    fixed_noise = (f"{MECHANISM}.noise_multiplier=1.0", f"{MECHANISM}.target_epsilon=1000")
    part = tmp_path / "part"
    federate(tiny_args(real_data_root, part, *fixed_noise, "--federation.rounds=1", rounds=3))
    (part / "metrics.json").unlink()
    fit_checkpoint = tmp_path / "fit.ckpt"
    torch.save({"state_dict": {}, "fedgen_privacy": {}}, fit_checkpoint)
    cases = [(tmp_path / "missing.ckpt", [], "is not a file"), (fit_checkpoint, [], "not a federation checkpoint"),
             (part / "checkpoints" / "last.ckpt", ["--classifier_args={width: 8, depth: 1}"], "parameters")]
    for i, (path, extra, problem) in enumerate(cases):
        target = tmp_path / f"resumed-{i}"
        with pytest.raises(SystemExit):
            main(["federate", *tiny_args(real_data_root, target, *fixed_noise, f"--ckpt_path={path}", *extra,
                                         rounds=3)])
        err = capsys.readouterr().err
        assert "ckpt_path" in err and problem in err, err
        assert not target.exists()


BAD = [
    ([f"{MECHANISM}.sample_rate=0.2"], "sample_rate"),  # the sampler's rate is 0.5: epsilon would be under-reported
    ([f"{MECHANISM}.num_releases=7"], "num_releases"),
    ([f"{MECHANISM}.unit=example"], "unit"),
    ([f"{MECHANISM}.delta=0.1"], "delta"),  # >= 1 / 20 clients
    (["--classifier_args={height: 3}"], "classifier_args"),
    (["--classifier=resnet"], "classifier"),
    (["--federation.sampler.init_args.rate=1.5"], "rate"),
    (["--num_clients=0"], "num_clients"),
    (["--classifier_args={width: -1, depth: 1}"], "classifier_args"),
    *([] if torch.cuda.is_available() else [(["--federation.accelerator=gpu"], "federation.accelerator")]),
    (["--seed_everything=-1"], "seed_everything"),
    (["--federation.sampler.init_args.rate=null", "--federation.sampler.init_args.count=5"],
     "federation.sampler.count"),  # client-level DP: a fixed count is refused
]


@pytest.mark.parametrize(("extra", "field"), BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_config_fails_before_any_round_and_names_the_field(real_data_root, tmp_path, capsys, extra, field):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        main(["federate", *tiny_args(real_data_root, run, *extra)])
    assert exit_info.value.code == 2
    assert field in capsys.readouterr().err
    assert not run.exists()  # nothing written: no checkpoints, not even config.yaml
