"""`fedgen sample`: draws from a finished fit run's generator, reproducibly, without touching the run or its
privacy; bad input fails before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fedgen.cli import main
from fedgen.cli_sample import sample
from fedgen.errors import ConfigError


@pytest.fixture(scope="module")
def fit_run(real_data_root, tmp_path_factory) -> Path:
    """A tiny DP diffusion run of ``fedgen fit`` (two DP-SGD steps)."""
    from fedgen.cli import fit
    from tests.generators.test_ddpm import _tiny_cli

    run = tmp_path_factory.mktemp("sample") / "fit"
    fit(_tiny_cli(real_data_root, 2, f"--run_dir={run}", "--evaluation.repeats=1"))
    return run


def _files(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*")}


def test_sample_writes_labelled_images_and_reports_the_runs_epsilon(fit_run, tmp_path) -> None:
    before = _files(fit_run)
    metrics = sample([f"--run={fit_run}", "--num=25", f"--out={tmp_path / 'a.pt'}", "--accelerator=cpu"])
    drawn = torch.load(tmp_path / "a.pt")
    assert drawn["images"].dtype == torch.uint8 and drawn["images"].shape == (25, 1, 28, 28)
    assert drawn["labels"].dtype == torch.int64 and sorted(drawn["labels"].unique().tolist()) == list(range(10))
    assert Image.open(tmp_path / "a.png").size == (10 * 30 + 2, 10 * 30 + 2)  # a row a class, 28 px + padding
    # sampling is post-processing: the epsilon printed is the one the run's ledger holds, and nothing in the
    # run folder changes
    spent = json.loads((fit_run / "metrics.json").read_text())["epsilon"]
    assert metrics["epsilon"] == pytest.approx(spent) and metrics["epsilon"] > 0
    assert metrics["generator"] == "DPDiffusion" and metrics["images"] == 25
    assert _files(fit_run) == before


def test_sample_is_reproducible_by_seed(fit_run, tmp_path) -> None:
    draws = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        sample([f"--run={fit_run}", "--num=12", f"--out={tmp_path / name}.pt", f"--seed_everything={seed}",
                "--accelerator=cpu"])
        draws[name] = torch.load(tmp_path / f"{name}.pt")
    assert torch.equal(draws["a"]["images"], draws["b"]["images"])
    assert torch.equal(draws["a"]["labels"], draws["b"]["labels"])
    assert not torch.equal(draws["a"]["images"], draws["c"]["images"])


def test_sample_writes_beside_the_run_by_default_and_never_overwrites(fit_run, capsys) -> None:
    main(["sample", f"--run={fit_run}", "--num=10", "--seed_everything=7", "--accelerator=cpu"])
    out = fit_run / "samples-10-seed7.pt"
    assert out.exists() and out.with_suffix(".png").exists()
    assert f"wrote {out}" in capsys.readouterr().out
    written = out.stat().st_mtime_ns
    with pytest.raises(SystemExit) as exited:
        main(["sample", f"--run={fit_run}", "--num=10", "--seed_everything=7", "--accelerator=cpu"])
    assert exited.value.code == 2
    assert "out: " in capsys.readouterr().err and out.stat().st_mtime_ns == written
    for f in (out, out.with_suffix(".png"), out.with_suffix(".json")):
        f.unlink()  # the other tests compare the run folder's files


@pytest.mark.parametrize(("extra", "field"), [
    (["--num=5"], "num"),  # fewer than one a class
    (["--num=0"], "num"),
    (["--batch_size=0"], "batch_size"),
    (["--out=drawn.npy"], "out"),
    (["--sampling={lr: 0.1}"], "sampling"),  # changes training, not drawing
    (["--sampling={sampling_eta: 2.0}"], "model.sampling_eta"),  # the generator's own check
    (["--seed_everything=-1"], "seed_everything"),
    (["--num=100000000000"], "num"),  # more images than memory holds
    (["--evaluation={repeats: 1}"], "evaluation"),  # classifier settings, but no --evaluate
    (["--evaluate=true", "--evaluation={epoch: 3}"], "evaluation"),  # not a classifier setting
    (["--evaluate=true", "--evaluation={repeats: x}"], "evaluation"),  # not an integer
    (["--evaluate=true", "--evaluation={repeats: 0}"], "evaluation.repeats"),
    (["--evaluate=true", "--evaluation={augment_shift: 40}"], "evaluation.augment_shift"),  # larger than the image
])
def test_sample_refuses_bad_input_before_drawing(fit_run, tmp_path, extra, field) -> None:
    extra = [e.replace("drawn.npy", str(tmp_path / "drawn.npy")) for e in extra]  # a later --out wins
    with pytest.raises(ConfigError) as err:
        sample([f"--run={fit_run}", f"--out={tmp_path / 'x.pt'}", "--accelerator=cpu", *extra])
    assert err.value.field == field
    assert list(tmp_path.iterdir()) == []


def test_too_many_images_for_the_memory_are_refused_with_the_most_that_fit(fit_run, tmp_path) -> None:
    from fedgen.cli_sample import BYTES_PER_PIXEL
    from fedgen.errors import machine_memory

    with pytest.raises(ConfigError, match="100000000000 images of shape \\[1, 28, 28\\] needs about") as err:
        sample([f"--run={fit_run}", f"--out={tmp_path / 'x.pt'}", "--accelerator=cpu", "--num=100000000000"])
    assert err.value.fix == f"use at most {machine_memory() // (BYTES_PER_PIXEL * 28 * 28)} images (e.g. 60000)"


def test_sample_draws_with_other_sampler_settings_than_the_run(fit_run, tmp_path) -> None:
    """--sampling changes how the same trained weights draw: the same seed gives the same labels and other images,
    and the report names the settings used; the run folder and its privacy stay as they were."""
    before = _files(fit_run)
    common = ["--num=12", "--seed_everything=3", "--accelerator=cpu"]
    run_settings = sample([f"--run={fit_run}", f"--out={tmp_path / 'a.pt'}", *common])
    other = sample([f"--run={fit_run}", f"--out={tmp_path / 'b.pt'}", *common,
                    "--sampling={sampling_eta: 1.0, sampling_steps: 7}"])
    assert run_settings["sampling_settings"]["sampling_eta"] == 0.0 and run_settings["sampling_settings"]["sampler"]
    assert other["sampling_settings"] == {**run_settings["sampling_settings"], "sampling_eta": 1.0, "sampling_steps": 7}
    edm = sample([f"--run={fit_run}", f"--out={tmp_path / 'c.pt'}", *common,
                  "--sampling={sampler: edm, sampling_steps: 3, sampling_churn: 5, churn_range: [0.1, 20]}"])
    assert edm["sampling_settings"]["sampler"] == "edm" and list(edm["sampling_settings"]["churn_range"]) == [0.1, 20]
    a, b, c = (torch.load(tmp_path / f"{name}.pt") for name in "abc")
    assert torch.equal(a["labels"], b["labels"]) and not torch.equal(a["images"], b["images"])
    assert torch.equal(a["labels"], c["labels"]) and not torch.equal(a["images"], c["images"])
    assert other["epsilon"] == pytest.approx(run_settings["epsilon"])
    assert _files(fit_run) == before


def test_sample_refuses_sampler_settings_for_a_generator_without_them(real_data_root, tmp_path) -> None:
    from fedgen.cli import fit
    from tests.test_cli import tiny_args

    run = tmp_path / "merf"
    fit(tiny_args(real_data_root, run))
    with pytest.raises(ConfigError) as err:
        sample([f"--run={run}", f"--out={tmp_path / 'x.pt'}", "--sampling={sampling_eta: 0.5}"])
    assert err.value.field == "sampling" and "none" in str(err.value)
    assert not (tmp_path / "x.pt").exists()


def test_sample_refuses_a_folder_that_is_not_a_fit_run(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        sample([f"--run={tmp_path}", f"--out={tmp_path / 'x.pt'}"])
    assert err.value.field == "run" and "generator.ckpt" in str(err.value)


def test_sample_refuses_an_existing_png_beside_the_out_file(fit_run, tmp_path) -> None:
    (tmp_path / "x.png").write_bytes(b"kept")
    with pytest.raises(ConfigError) as err:
        sample([f"--run={fit_run}", f"--out={tmp_path / 'x.pt'}", "--accelerator=cpu"])
    assert err.value.field == "out" and (tmp_path / "x.png").read_bytes() == b"kept"
    assert not (tmp_path / "x.pt").exists()


def test_sample_draws_a_dp_merf_run_in_its_released_label_proportions(real_data_root, tmp_path) -> None:
    """DP-Merf releases its class counts with its embedding: the drawn labels follow those noisy proportions
    (largest remainders), as the run's own synthetic set did."""
    from fedgen.cli import fit
    from fedgen.cli_sample import load_fit_run
    from fedgen.generators.base import stratified_labels
    from tests.test_cli import tiny_args

    run = tmp_path / "merf"
    spent = fit(tiny_args(real_data_root, run))["epsilon"]
    metrics = sample([f"--run={run}", "--num=200", f"--out={tmp_path / 'm.pt'}", "--accelerator=cpu"])
    assert metrics["generator"] == "DPMerf" and metrics["epsilon"] == pytest.approx(spent)
    generator, _ = load_fit_run(run)
    expected = stratified_labels(generator.label_distribution(), 200).bincount(minlength=10)
    assert torch.equal(torch.load(tmp_path / "m.pt")["labels"].bincount(minlength=10), expected)


def test_sample_refuses_an_out_under_a_file_before_drawing(fit_run, tmp_path) -> None:
    (tmp_path / "f").write_bytes(b"kept")
    with pytest.raises(ConfigError) as err:
        sample([f"--run={fit_run}", "--num=10", f"--out={tmp_path / 'f' / 'x.pt'}", "--accelerator=cpu"])
    assert err.value.field == "out" and "is a file" in str(err.value)
    assert (tmp_path / "f").read_bytes() == b"kept" and list(tmp_path.iterdir()) == [tmp_path / "f"]


@pytest.mark.parametrize("checkpoint", ["empty", "another generator's"])
def test_sample_refuses_an_unreadable_checkpoint_with_exit_2(fit_run, tmp_path, capsys, checkpoint) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((fit_run / "config.yaml").read_text())
    if checkpoint == "empty":
        (run / "generator.ckpt").write_bytes(b"")
    else:
        torch.save({"state_dict": {"weight": torch.zeros(3)}}, run / "generator.ckpt")
    with pytest.raises(SystemExit) as exited:
        main(["sample", f"--run={run}", "--num=10", f"--out={tmp_path / 'x.pt'}", "--accelerator=cpu"])
    assert exited.value.code == 2
    assert "fedgen: error: run: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.yaml", "generator.ckpt", "run"]


@pytest.mark.parametrize("config", ["model: [unclosed", "a text file", "\xff\xfe", "evaluation: {repeats: 1}"])
def test_sample_refuses_a_config_yaml_that_fit_did_not_write(fit_run, tmp_path, config) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(config.encode("latin-1"))
    (run / "generator.ckpt").write_bytes((fit_run / "generator.ckpt").read_bytes())
    with pytest.raises(ConfigError, match="config.yaml is not the configuration `fedgen fit` saves") as err:
        sample([f"--run={run}", "--num=10", f"--out={tmp_path / 'x.pt'}", "--accelerator=cpu"])
    assert err.value.field == "run"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.yaml", "generator.ckpt", "run"]


def test_sample_evaluates_the_draw_as_fit_scores_its_own(fit_run, tmp_path, capsys) -> None:
    """--evaluate trains the run's classifiers (its config's evaluation, with --evaluation's changes) on the drawn
    8-bit images and tests them on the run's real test set; the report goes beside the images, the run folder is
    only read, and the same seed gives the same accuracies."""
    before = _files(fit_run)
    args = ["--num=40", "--seed_everything=5", "--accelerator=cpu", "--evaluate=true", "--evaluation={repeats: 2}"]
    first = sample([f"--run={fit_run}", f"--out={tmp_path / 'a.pt'}", *args])
    scored = first["evaluation"]
    assert scored["settings"]["classifier"] == "mlp" and scored["settings"]["epochs"] == 1  # the run's settings
    assert scored["settings"]["repeats"] == 2 and len(scored["per_classifier"]) == 2  # and the change
    assert scored["settings"]["accelerator"] == "cpu"  # where the draw ran
    assert scored["test_examples"] == 50  # the run's test subset
    assert 0.0 <= scored["test_accuracy"] <= 1.0
    assert scored["test_accuracy"] == pytest.approx(sum(c["test_accuracy"] for c in scored["per_classifier"]) / 2)
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads(json.dumps(first))
    assert f"test_accuracy={scored['test_accuracy']:.4f} (mlp trained on 40 synthetic examples, the mean of 2" in (
        capsys.readouterr().out)
    again = sample([f"--run={fit_run}", f"--out={tmp_path / 'b.pt'}", *args])
    assert again["evaluation"]["per_classifier"] == scored["per_classifier"]
    plain = sample([f"--run={fit_run}", f"--out={tmp_path / 'c.pt'}", "--num=12", "--accelerator=cpu"])
    assert plain["evaluation"] is None and json.loads((tmp_path / "c.json").read_text())["evaluation"] is None
    assert _files(fit_run) == before
