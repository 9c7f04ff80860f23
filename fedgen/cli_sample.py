"""The ``fedgen sample`` command: draw a labelled synthetic dataset from a finished ``fedgen fit`` run.

    fedgen sample --run runs/<a fedgen fit run> --num 60000
    fedgen sample --run runs/<a fedgen fit run> --num 60000 --seed_everything 1 --evaluate true

Drawing from a trained generator is post-processing of what the run released: it reads the privacy the run
spent from the checkpoint's ledger and adds none. With ``--evaluate`` the drawn images are scored as ``fedgen fit``
scores its own: classifiers trained on them alone, tested once on the real test set (a fresh draw of the same
generator, to tell how much of a run's accuracy is its draw).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torchvision
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from fedgen.data import VisionDataModule
from fedgen.errors import ConfigError, check_at_least_one, load_checkpoint
from fedgen.evaluation import TrainOnSynthetic
from fedgen.generators import Generator
from fedgen.mechanisms.lightning import CHECKPOINT_KEY
from fedgen.runs import (check_fit_run, check_images_fit_in_memory, check_seed, instantiate, parse_args,
                         read_fit_config)

log = logging.getLogger("fedgen")


def load_fit_run(run: Path, sampling: dict[str, Any] | None = None, *,
                 saved: dict[str, Any] | None = None) -> tuple[Generator, VisionDataModule]:
    """The generator of a ``fedgen fit`` run folder, built from the run's own ``config.yaml`` (``saved``, that
    file as :func:`~fedgen.runs.read_fit_config` read it; read here when not given) with the weights and privacy
    ledger of its ``generator.ckpt``, and the run's data module (built, nothing loaded).

    ``sampling`` sets some of the generator's :attr:`~fedgen.generators.Generator.sampling_fields` anew (how it
    draws: post-processing of the trained weights); any other field is refused, since it would change the trained
    generator the checkpoint holds."""
    saved = read_fit_config(run) if saved is None else saved
    model = _with_sampling(saved["model"], sampling) if sampling else saved["model"]  # the caller's dict untouched
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=Generator)
    parser.add_argument("--data", type=VisionDataModule)
    built = instantiate(parser, parse_args(parser, ["--model", json.dumps(model),
                                                    "--data", json.dumps(saved["data"])]))
    path = run / "generator.ckpt"
    checkpoint = load_checkpoint("run", path, "give a run folder whose generator.ckpt `fedgen fit` wrote in full")
    try:
        built.model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:  # no state_dict, or another generator's weights
        problem = " ".join(f"{type(err).__name__}: {err}".split())
        problem = problem if len(problem) <= 300 else problem[:300] + " ..."
        raise ConfigError("run", f"{path} does not hold the weights of the {type(built.model).__name__} its "
                          f"config.yaml builds ({problem})", "give a run folder whose config.yaml and "
                          "generator.ckpt come from the same `fedgen fit` run") from err
    # what the run spent, read only: the first config.yaml may predate a resume's settings (e.g. a raised budget)
    built.model.mechanism.load_state_dict(checkpoint[CHECKPOINT_KEY], resume=False)
    return built.model.eval(), built.data


def _with_sampling(model: dict[str, Any], sampling: dict[str, Any]) -> dict[str, Any]:
    """The saved ``model`` config with ``sampling``'s values in its init arguments, after checking that each names
    one of the generator class's sampling fields."""
    module, _, name = model["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    unknown = sorted(set(sampling) - set(cls.sampling_fields))
    if unknown:
        allowed = ", ".join(cls.sampling_fields) or "none"
        raise ConfigError("sampling", f"{unknown} would change the trained {cls.__name__}, not only how it draws "
                          f"(its sampling settings: {allowed})",
                          "set only those here; to change anything else, train a new `fedgen fit` run")
    return {**model, "init_args": {**model.get("init_args", {}), **sampling}}


def save_synthetic(synthetic: torch.utils.data.TensorDataset, path: Path) -> torch.utils.data.TensorDataset:
    """Save a synthetic set as 8-bit images with their labels, ``{"images": uint8 (N, C, H, W), "labels": int64
    (N,)}`` (the layout of a run's ``synthetic.pt``); returns the set as saved, the 8-bit values back in [0, 1],
    which is what classifiers train on."""
    images = (synthetic.tensors[0] * 255).round().to(torch.uint8)
    torch.save({"images": images, "labels": synthetic.tensors[1]}, path)
    return torch.utils.data.TensorDataset(images.float().div_(255), synthetic.tensors[1])  # no second float copy


def check_out_folder(out: Path) -> None:
    """Refuse an ``out`` whose folder cannot be created or written: a file on its path, or a folder not writable."""
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError("out", f"{existing} is a file, so the folder of {out} cannot be created",
                          "give a path whose folders are folders (or can be created)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("out", f"{existing} is not writable", "give a path in a folder you can write")


#: bytes a drawn pixel takes at the peak of ``fedgen sample``: the float32 images, and two float32 copies while
#: they are clamped and turned into 8-bit values
BYTES_PER_PIXEL = 12


def sample_parser() -> ArgumentParser:
    """The options of ``fedgen sample``."""
    parser = ArgumentParser(prog="fedgen sample", description=sample.__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with the options below.")
    parser.add_argument("--run", type=str, help="The `fedgen fit` run folder whose generator draws.")
    parser.add_argument("--num", type=int, default=10000,
                        help="Images to draw, labels in the generator's class proportions (at least one a class).")
    parser.add_argument("--out", type=str | None, default=None,
                        help="The .pt file to write (default: <run>/samples-<num>-seed<seed>.pt); never overwritten.")
    parser.add_argument("--seed_everything", type=int, default=0, help="Seed of the labels' order and the draws.")
    parser.add_argument("--accelerator", type=Literal["auto", "cpu", "gpu"], default="auto",
                        help="Where to draw (and, with --evaluate, train the classifiers): auto takes a GPU when "
                             "there is one.")
    parser.add_argument("--batch_size", type=int, default=1000, help="Images drawn at once.")
    parser.add_argument("--sampling", type=dict[str, Any] | None, default=None,
                        help="Sampler settings to draw with instead of the run's, e.g. '{sampling_eta: 0.5, "
                             "sampling_steps: 100}' for a DP diffusion run (only the generator's sampling fields; "
                             "post-processing, no privacy cost).")
    parser.add_argument("--evaluate", type=bool, default=False,
                        help="Also train the run's downstream classifiers on the drawn (8-bit) images and test them "
                             "once on the run's real test set, as `fedgen fit` does; the accuracies go to "
                             "<out>.json.")
    parser.add_argument("--evaluation", type=dict[str, Any] | None, default=None,
                        help="With --evaluate: classifier settings instead of the run's, e.g. '{repeats: 1}' (the "
                             "fields of `fedgen fit`'s evaluation).")
    return parser


def run_evaluation(saved: dict[str, Any], overrides: dict[str, Any] | None, accelerator: str) -> TrainOnSynthetic:
    """The downstream evaluation of a ``fedgen fit`` run whose ``config.yaml`` reads ``saved`` (its
    ``evaluation``), with ``overrides`` set anew, each checked as ``fedgen fit`` checks it; it trains where the
    draw runs unless ``overrides`` names an ``accelerator``."""
    run_settings = saved.get("evaluation") or {}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TrainOnSynthetic, "evaluation")
    try:
        config = parser.parse_object({"evaluation": {**run_settings, "accelerator": accelerator,
                                                     **(overrides or {})}})
    except ArgumentError as err:  # an unknown field, or a value of the wrong type
        raise ConfigError("evaluation", " ".join(str(err).split()), "give only the fields of `fedgen fit`'s "
                          "evaluation with values of their types (fedgen fit --help), e.g. '{repeats: 1}'") from err
    return instantiate(parser, config).evaluation


def sample(args: list[str]) -> dict[str, Any]:
    """``fedgen sample``: draw ``num`` labelled images from a finished ``fedgen fit`` run's generator (for a
    DP diffusion run, from its averaged weights with the run's sampler settings).

    Writes ``out`` as ``{"images": uint8 (N, C, H, W), "labels": int64 (N,)}``, the layout of the run's own
    ``synthetic.pt``, and beside it ``<out>.png``, a grid of the first images of each class. The run folder's
    existing files are only read. Sampling is post-processing: the privacy printed is what the run spent. With
    ``sampling`` the generator draws with those sampler settings instead of the run's (e.g. another DDIM eta).
    With ``evaluate`` the run's downstream classifiers (``evaluation`` changes their settings) are trained on the
    drawn images and tested on the run's real test set. The report, accuracies included, goes to ``<out>.json``.
    """
    parser = sample_parser()
    config = parse_args(parser, args)
    check_seed(config.seed_everything)
    check_at_least_one("num", config.num, "use e.g. 10000")
    check_at_least_one("batch_size", config.batch_size, "use e.g. 1000")
    if config.evaluation is not None and not config.evaluate:
        raise ConfigError("evaluation", "is set, but nothing is evaluated", "add --evaluate true, or drop it")
    run = check_fit_run(config.run, ("config.yaml", "generator.ckpt"))
    out = Path(config.out) if config.out else run / f"samples-{config.num}-seed{config.seed_everything}.pt"
    if out.suffix != ".pt":
        raise ConfigError("out", f"{out} does not end in .pt", "name a .pt file, e.g. samples.pt")
    for path in (out, out.with_suffix(".png"), out.with_suffix(".json")):
        if path.exists():
            raise ConfigError("out", f"{path} exists already", "name a new file; fedgen sample never overwrites")
    check_out_folder(out)
    if config.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("accelerator", "gpu asked, but torch sees no CUDA device", "use auto or cpu")
    saved_config = read_fit_config(run)
    generator, data = load_fit_run(run, config.sampling, saved=saved_config)
    if config.num < generator.num_classes:
        raise ConfigError("num", f"{config.num} is fewer than one image per class ({generator.num_classes})",
                          f"draw at least {generator.num_classes}")
    check_images_fit_in_memory("num", config.num, generator.image_shape, BYTES_PER_PIXEL)
    evaluation = None
    if config.evaluate:  # the classifiers' settings and the real test set are checked before the draw
        evaluation = run_evaluation(saved_config, config.evaluation, config.accelerator)
        evaluation.check_image_shape(generator.image_shape)
        data.prepare_data()
        data.setup("test")

    L.seed_everything(config.seed_everything, verbose=False)
    use_gpu = config.accelerator == "gpu" or (config.accelerator == "auto" and torch.cuda.is_available())
    generator.to("cuda" if use_gpu else "cpu")
    synthetic = generator.synthesize(config.num, batch_size=config.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = save_synthetic(synthetic, out)
    images, labels = saved.tensors
    per_class = 10  # a row a class; a class with fewer images in the file leaves its row's end blank
    rows = [images[labels == c][:per_class] for c in range(generator.num_classes)]
    grid = torch.cat([torch.cat([row, row.new_zeros((per_class - len(row), *row.shape[1:]))]) for row in rows])
    torchvision.utils.save_image(grid, out.with_suffix(".png"), nrow=per_class, padding=2)

    mechanism = generator.mechanism
    metrics = {"run": str(run), "out": str(out), "images": config.num, "seed": config.seed_everything,
               "generator": type(generator).__name__, "epsilon": mechanism.epsilon(), "delta": mechanism.delta,
               "sampling_settings": generator.sampling_settings(), "sampling": generator.sampling_report(),
               "evaluation": None}
    if evaluation is not None:  # on exactly the saved 8-bit images, as `fedgen fit` scores its own draw
        metrics["evaluation"] = {**evaluation.run(saved, data.test_set, num_classes=generator.num_classes,
                                                  image_shape=generator.image_shape),
                                 "settings": {name: getattr(evaluation, name)
                                              for name in inspect.signature(TrainOnSynthetic).parameters},
                                 "test_examples": len(data.test_set)}
    out.with_suffix(".json").write_text(json.dumps(metrics, indent=2))
    log.info("Drew %d images from %s; privacy as the run spent it: %s", config.num, run,
             mechanism.ledger.summary(mechanism.delta))
    scored = ""
    if evaluation is not None:
        scored = f"; {evaluation.summary(metrics['evaluation']['test_accuracy'], config.num)}"
    print(f"fedgen: drew {config.num} images from {run} (post-processing: epsilon={metrics['epsilon']:.4f} "
          f"delta={metrics['delta']:g}, as the run spent){scored}; wrote {out}")
    return metrics
