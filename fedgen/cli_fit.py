"""The ``fedgen fit`` command: ``fedgen fit --config file.yaml`` (LightningCLI underneath).

``fit`` runs the generative-privacy pipeline: train a private generator on the private training set,
synthesize a labelled dataset, train a downstream classifier on it alone (model selection on synthetic
validation data), test once on the real test set, and write a run folder:

    run_dir/config.yaml        the resolved configuration
    run_dir/checkpoints/       Lightning checkpoints; each carries the privacy ledger
    run_dir/generator.ckpt     the final generator checkpoint (with the ledger)
    run_dir/synthetic.pt       {"images": uint8 (N, C, H, W), "labels": int64 (N,)}
    run_dir/samples.png        a grid of samples, one row per class
    run_dir/metrics.json       epsilon, delta, noise (seeded or secure), test_accuracy, num_synthetic, ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torchvision
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from fedgen.data import VisionDataModule, same_source
from fedgen.errors import ConfigError, DataNotFoundError, check_at_least_one, fields_under, load_checkpoint
from fedgen.evaluation import TrainOnSynthetic
from fedgen.evaluation.fid import NETWORK as FID_NETWORK
from fedgen.evaluation.fid import InceptionFeatures, frechet_inception_distance
from fedgen.federated import FederatedDPSGD, FederatedRelease
from fedgen.generators import CentralImages, Generator, MerfImages
from fedgen.mechanisms.lightning import CHECKPOINT_KEY
from fedgen.cli_sample import save_synthetic
from fedgen.runs import (check_images_fit_in_memory, check_seed, config_error, dataset_name, resolve_run_dir,
                         write_config)

log = logging.getLogger("fedgen")


class FedgenCLI(LightningCLI):
    """LightningCLI with fedgen's pipeline options: run folder, synthetic set size, downstream evaluation."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Run folder (default: runs/<generator>-<dataset>-<time>).")
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Resume from this checkpoint; its ledger carries the privacy already spent.")
        parser.add_argument("--num_synthetic", type=int, default=10000,
                            help="Size of the synthetic dataset the downstream classifier is trained on.")
        parser.add_class_arguments(TrainOnSynthetic, "evaluation")
        parser.add_argument("--federation", type=FederatedRelease | FederatedDPSGD | None, default=None,
                            help="Train on data split across simulated clients: FederatedRelease (a one-release "
                                 "generator's sum) or FederatedDPSGD (a DP-SGD generator's steps).")
        parser.add_argument("--public_data", type=VisionDataModule | None, default=None,
                            help="A dataset declared PUBLIC: the generator is pretrained on its training split "
                                 "without privacy, before private training. The run folder and metrics name it.")
        parser.add_argument("--public_steps", type=int, default=1000, help="Steps of public pretraining.")
        parser.add_argument("--fid_samples", type=int, default=0,
                            help="FID between this many synthetic and real test images (0: no FID; needs "
                                 "fedgen[fid]; slow on a CPU).")

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        seed = self.config.seed_everything
        if type(seed) is int:  # checked before LightningCLI seeds with it; True/False (a random seed, or none) pass
            check_seed(seed)

    def before_instantiate_classes(self) -> None:
        config = self.config
        generator = config.model.class_path.rsplit(".", 1)[-1].lower()
        name = f"{generator}-{dataset_name(config.data)}"
        if config.public_data is not None:
            name += f"-pretrained_on_public_{dataset_name(config.public_data)}"
        config.run_dir = str(resolve_run_dir(config.run_dir, config.ckpt_path, name))
        config.trainer.default_root_dir = config.run_dir


def save_samples(generator: Generator, path: Path, per_class: int = 10) -> None:
    """A PNG grid: one row per class, ``per_class`` samples each."""
    labels = torch.arange(generator.num_classes).repeat_interleave(per_class)
    images = torch.cat([generator.sample(len(chunk), chunk).cpu() for chunk in labels.split(1000)])
    torchvision.utils.save_image(images.clamp(0, 1), path, nrow=per_class, padding=2)


def epoch_checkpoint() -> ModelCheckpoint:
    """``<run>/checkpoints/last.ckpt``, rewritten at the end of every epoch, so that a run stopped part-way (a
    time limit, a lost machine) resumes with ``--ckpt_path`` from its last epoch, ledger included.
    (Lightning's ``save_last`` alone writes it only when a top-k checkpoint is written, i.e. at the end.)"""
    return ModelCheckpoint(filename="last", save_top_k=1, enable_version_counter=False)


class EpochLog(Callback):
    """A log line at the end of the first and the last training epoch, and of any epoch at least ``every_seconds``
    after the previous line: the epoch, the optimizer steps so far, the generator's logged training metrics, the
    epsilon its ledger has spent and the training time. The progress bar shows the same only on a terminal; logs of
    batch jobs and remote runs get these lines instead. (Epsilon takes the ledger's accountant 0.1 to 0.3 s on a CPU
    at the diffusion examples' ledgers, hence not every epoch.)"""

    def __init__(self, every_seconds: float = 30.0) -> None:
        self.every_seconds = every_seconds
        self._last: float | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Generator) -> None:
        now, epoch = time.perf_counter(), trainer.current_epoch + 1
        last_epoch = trainer.max_epochs is not None and epoch >= trainer.max_epochs > 0
        if self._last is not None and now - self._last < self.every_seconds and not last_epoch:
            return
        self._last = now
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        metrics = "".join(f", {name} {float(value):.4g}" for name, value in trainer.callback_metrics.items()
                          if name.startswith("train/"))
        mechanism = pl_module.mechanism
        spent = (f", epsilon {mechanism.epsilon():.4g} spent (delta {mechanism.delta:g})"
                 if mechanism is not None else "")
        log.info("epoch %d%s, step %d%s%s, %.0f s", epoch, epochs, trainer.global_step, metrics, spent,
                 pl_module.training_seconds)


class TrainingRandomness(Callback):
    """Carries the global random state (torch's, the current CUDA device's, NumPy's and Python's) in every checkpoint
    and sets it again on resume, so that the training draws a resumed run makes (diffusion steps and noise, label
    dropout, augmentation) are those the run would have made without stopping, not the seed's first draws over again.
    The privacy noise and the Poisson sampler have their own generators, which the mechanism's state carries. Of CUDA
    it keeps the current device's state once CUDA is in use; in a run on several GPUs every process resumes from the
    checkpointing process's, as every process started from the same seed."""

    def state_dict(self) -> dict[str, Any]:  # tensors, lists and numbers: a weights-only load reads it
        kind, keys, position, has_gauss, gauss = np.random.get_state()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
                "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
                "python": random.getstate()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if state_dict["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])
        kind, keys, position, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        random.setstate(state_dict["python"])


DATA_KEY = "fedgen_data"


class PrivateDataRecord(Callback):
    """Writes into every checkpoint which private data the run trains on (dataset name and size), so that a resume
    on other data is refused before anything runs."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[DATA_KEY] = self.record


def check_resume_checkpoint(ckpt_path: str, generator: Generator, record: dict[str, Any]) -> None:
    """Refuse, before anything is written or released, a ``ckpt_path`` that cannot continue this run: missing,
    unreadable, without a privacy ledger, of another generator class or settings, or of other private data."""
    fix = "give a checkpoint of this run (<run>/checkpoints/last.ckpt), or start a new run without --ckpt_path"
    path = Path(ckpt_path)
    checkpoint = load_checkpoint("ckpt_path", path, fix)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or CHECKPOINT_KEY not in checkpoint:
        raise ConfigError("ckpt_path", f"{path} is not a fedgen checkpoint (no weights or no privacy ledger)", fix)
    saved_class = checkpoint.get("hyper_parameters", {}).get("_class_path")
    if saved_class is not None and saved_class.rsplit(".", 1)[-1] != type(generator).__qualname__:
        raise ConfigError("ckpt_path", f"{path} holds a {saved_class}, the config a {type(generator).__name__}", fix)
    saved = checkpoint["state_dict"]  # may hold more (parts made during training, e.g. an EMA), never less
    if any(k not in saved or tuple(saved[k].shape) != tuple(v.shape) for k, v in generator.state_dict().items()):
        raise ConfigError("ckpt_path", f"{path} holds a {type(generator).__name__} of other settings (its weights "
                          "differ in names or shapes)", "resume with the model settings the run was started with")
    saved_data = checkpoint.get(DATA_KEY)
    if saved_data is not None and any(saved_data.get(key, value) != value for key, value in record.items()):
        raise ConfigError("ckpt_path", f"{path} trained on {saved_data['dataset']} ({saved_data['examples']} "
                          f"examples; public pretraining: {saved_data.get('public_data') or 'none'}), the config "
                          f"gives {record['dataset']} ({record['examples']}; {record['public_data'] or 'none'})",
                          "resume on the private data, and with the public_data and public_steps, the run began with")
    # The generator's and mechanism's own resume checks (noise, budget, warm-ups), now rather than in trainer.fit,
    # which loads the same checkpoint again: restoring is idempotent.
    generator.on_load_checkpoint(checkpoint)


def check_training_length(trainer: L.Trainer) -> None:
    """Refuse a generator's training of no steps (the privacy would be spent on an untrained generator) or of no
    bound (DP-SGD plans its noise for a known number of steps; the run would never end)."""
    for field, value in (("trainer.max_epochs", trainer.max_epochs), ("trainer.max_steps", trainer.max_steps),
                         ("trainer.limit_train_batches", trainer.limit_train_batches)):
        if value == 0:
            raise ConfigError(field, "is 0: the private data would be released to a generator that never trains",
                              "train for at least one epoch or step")
    if trainer.max_epochs == -1 and trainer.max_steps == -1:
        raise ConfigError("trainer.max_epochs", "is -1 with max_steps -1: the training has no end",
                          "set trainer.max_epochs or trainer.max_steps")


#: where the objects fit builds sit in its config: an error raised inside one names its field from there
FIT_PATHS = {"mechanism": "model.mechanism", "batch_size": "model.batch_size",
             "partitioner": "federation.partitioner"}


def build_fit_cli(args: list[str]) -> FedgenCLI:
    """``fedgen fit``'s parser and the objects it configures (generator, mechanism, data, trainer), built from
    ``args`` without running anything; a config that cannot be built raises :class:`ConfigError`."""
    # fedgen passes its own argument list to LightningCLI on purpose.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    try:
        return FedgenCLI(Generator, VisionDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         run=False, args=args, save_config_callback=None, seed_everything_default=0,
                         auto_configure_optimizers=False,
                         trainer_defaults={"logger": False, "max_epochs": 5,
                                           "callbacks": [epoch_checkpoint(), EpochLog(),
                                                         TrainingRandomness()]},
                         parser_kwargs={"prog": "fedgen fit", "exit_on_error": False})
    except ArgumentError as err:  # the parser refused an option: name it, as fedgen's other commands do
        raise ConfigError("config", str(err).strip(), "see fedgen fit --help") from err
    except ValueError as err:  # building the configured objects failed: report the config error inside, by the
        with fields_under(FIT_PATHS):  # name its field has in this config
            raise config_error(err) from err
    except MisconfigurationException as err:  # Lightning refused the trainer's settings
        raise ConfigError("trainer", str(err).strip(), "correct the trainer's settings (e.g. accelerator: cpu "
                          "where there is no GPU)") from err


def fit(args: list[str]) -> dict[str, Any]:
    """``fedgen fit``: the whole pipeline; returns the metrics written to ``metrics.json``."""
    cli = build_fit_cli(args)
    config, generator, data, trainer = cli.config, cli.model, cli.datamodule, cli.trainer
    run_dir = Path(config.run_dir)
    evaluation: TrainOnSynthetic = cli.config_init.evaluation
    federation: FederatedRelease | FederatedDPSGD | None = cli.config_init.federation
    if isinstance(federation, FederatedRelease) and not (hasattr(generator, "embedding_sum")
                                                         and hasattr(generator, "store_release")):
        raise ConfigError("federation", f"{type(generator).__name__} does not release a single sum",
                          "use a one-release generator such as fedgen.generators.DPMerf, or remove federation")
    warm_ups = getattr(generator, "warm_up_releases", ())
    if warm_ups and federation is not None:
        raise ConfigError(warm_ups[0].field, "the warm-up's release is drawn from the pooled private data, which a "
                          "federation does not have", f"remove {warm_ups[0].name}, or the federation")
    public: VisionDataModule | None = cli.config_init.public_data
    if public is not None and same_source(dataset_name(config.public_data), dataset_name(config.data)):
        same = dataset_name(config.public_data) == dataset_name(config.data)
        raise ConfigError("public_data", f"is {dataset_name(config.public_data)}, " + (
                          "the private dataset itself" if same else f"cut from the same images as the private "
                          f"{dataset_name(config.data)}"), "declare a dataset of other images public (e.g. "
                          "FashionMNIST or KMNIST for MNIST), or remove it")
    check_at_least_one("public_steps", config.public_steps, "use e.g. 1000")
    check_training_length(trainer)
    generator.check_trainer(trainer)
    # the synthetic set: 8-bit images saved, and twice in float32 to train on
    check_images_fit_in_memory("num_synthetic", config.num_synthetic, generator.image_shape, bytes_per_pixel=9)
    if config.fid_samples == 1 or config.fid_samples < 0 or config.fid_samples > config.num_synthetic:
        raise ConfigError("fid_samples", f"{config.fid_samples} is not 0 or between 2 and num_synthetic "
                          f"({config.num_synthetic})", "use e.g. 10000, or 0 for no FID")
    fid_network = InceptionFeatures() if config.fid_samples else None  # it must load before any private work
    evaluation.check_image_shape(generator.image_shape)
    if config.num_synthetic < generator.num_classes:
        raise ConfigError("num_synthetic", f"{config.num_synthetic} is fewer than one per class",
                          "synthesize at least one example per class")

    # Everything that can be checked is checked before the first private release.
    data.prepare_data()
    data.setup("fit")
    with fields_under(FIT_PATHS):  # the loader's batch size, the mechanism's settings, named as in fit's config
        if isinstance(federation, FederatedDPSGD):  # the clients compute every step
            loader = federation.attach(generator, data.train_set)
        else:
            loader = generator.attach_private_data(data.train_set)
        clients = None  # the federated release's split, made once here and used by its run
        if isinstance(federation, FederatedRelease):
            clients = federation.check(generator, data.train_set)
        if public is not None:
            try:
                public.prepare_data()
                public.setup("fit")
            except DataNotFoundError as err:  # it names data.*: the public dataset's fields are public_data.*
                raise DataNotFoundError(str(err).replace("data.", "public_data.")) from err
            generator.check_public_data(public.train_set)
        generator.check_training(trainer.strategy.root_device)
    if config.fid_samples and min(config.fid_samples, len(data.test_set)) < 2:
        raise ConfigError("fid_samples", f"the test set has {len(data.test_set)} image(s); FID needs 2 or more",
                          "use a larger data.test_subset, or fid_samples: 0")
    record = {"dataset": dataset_name(config.data), "examples": len(data.train_set),
              "public_data": None if public is None else [dataset_name(config.public_data), config.public_steps]}
    if config.ckpt_path is not None:
        check_resume_checkpoint(config.ckpt_path, generator, record)
    trainer.callbacks.append(PrivateDataRecord(record))
    write_config(cli.parser, config, run_dir)
    log.info("Privacy: %s on %d private examples (add/remove-one-%s neighbouring)",
             generator.mechanism.describe(), len(data.train_set), generator.mechanism.ledger.unit)

    procedural_report = None
    if getattr(generator, "procedural_pretraining", None) is not None:
        if config.ckpt_path is None:
            generator.to(trainer.strategy.root_device)
            procedural_report = generator.pretrain_on_procedural_images()
        else:
            procedural_report = generator.procedural_pretraining.report() | {"trained": "by the run's first segment"}

    public_report = None
    if public is not None:  # loaded and checked above, before the run folder
        public_report = {"dataset": dataset_name(config.public_data), "split": "train",
                         "examples": len(public.train_set), "steps": config.public_steps,
                         "privacy": "declared public by the user: outside the privacy guarantee"}
        if config.ckpt_path is None:
            generator.to(trainer.strategy.root_device)
            generator.pretrain_on_public(public.train_set, steps=config.public_steps)
        log.warning("The generator was pretrained on %s (%d examples), declared PUBLIC: epsilon covers the "
                    "private data only.", public_report["dataset"], public_report["examples"])

    warm_up_reports = {release.name: dataclasses.asdict(release) for release in warm_ups}
    if warm_ups and config.ckpt_path is None:
        generator.to(trainer.strategy.root_device)
        for name, report in generator.warm_up(data.train_set).items():
            warm_up_reports[name] |= report
    elif warm_ups:
        for report in warm_up_reports.values():
            report["released"] = "by the run's first segment; the checkpoint's ledger holds it"
        log.info("Resuming: the checkpoint's ledger carries the warm-up's release; nothing is released.")

    federation_report = None
    if isinstance(federation, FederatedDPSGD):
        pass  # its report is complete after training
    elif federation is not None and config.ckpt_path is None:
        federation_report = federation.run(generator, data.train_set, clients=clients,
                                           device=trainer.strategy.root_device)
    elif federation is not None:
        log.info("Resuming: the checkpoint carries the federated release; the clients are not asked again.")

    trainer.fit(generator, loader, ckpt_path=config.ckpt_path)
    generator_seconds = generator.training_seconds  # every segment of a resumed run
    trainer.save_checkpoint(run_dir / "generator.ckpt")
    if isinstance(federation, FederatedDPSGD):
        federation_report = federation.summary()
    generator.to(trainer.strategy.root_device)  # Lightning's teardown moved it to the CPU; sample on the device
    epsilon = generator.mechanism.epsilon()
    log.info("Generator trained in %.1f s; %s", generator_seconds,
             generator.mechanism.ledger.summary(generator.mechanism.delta))

    synthetic = generator.synthesize(config.num_synthetic)
    sampling_report = generator.sampling_report()  # of the saved set, before the grid's samples
    synthetic = save_synthetic(synthetic, run_dir / "synthetic.pt")  # the classifier trains on exactly what was saved
    save_samples(generator, run_dir / "samples.png")

    fid = None
    if config.fid_samples:
        real = torch.stack([data.test_set[i][0] for i in range(min(config.fid_samples, len(data.test_set)))])
        fid = {"value": frechet_inception_distance(real, synthetic.tensors[0][:config.fid_samples],
                                                   device=trainer.strategy.root_device, features=fid_network),
               "synthetic_images": config.fid_samples, "real_images": len(real), "real_split": "test",
               "network": FID_NETWORK}
        log.info("FID %.2f (%d synthetic vs %d real test images)", fid["value"], config.fid_samples, len(real))

    start = time.perf_counter()
    result = evaluation.run(synthetic, data.test_set, num_classes=generator.num_classes,
                            image_shape=generator.image_shape)
    metrics = {
        "epsilon": epsilon,
        "delta": generator.mechanism.delta,
        "neighbouring": f"add/remove one {generator.mechanism.ledger.unit}",
        "accountant": generator.mechanism.ledger.accountant,
        "noise": generator.mechanism.noise.mode,
        "test_accuracy": result["test_accuracy"],
        "synthetic_val_accuracy": result["synthetic_val_accuracy"],
        "selected_epoch": result["selected_epoch"],
        "classifier": result["classifier"],
        "per_classifier": result["per_classifier"],
        "num_synthetic": config.num_synthetic,
        "num_private": len(data.train_set),
        "generator": type(generator).__name__,
        "dataset": getattr(data, "dataset", type(data).__name__),
        "privacy_ledger": generator.mechanism.ledger.state_dict(),
        "federation": federation_report,
        "procedural_pretraining": procedural_report,
        "public_data": public_report,
        "central_images": warm_up_reports.get(CentralImages.name),
        "merf_images": warm_up_reports.get(MerfImages.name),
        "fid": fid,
        "sampling": sampling_report,
        "generator_seconds": generator_seconds,
        "classifier_seconds": time.perf_counter() - start,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"fedgen: epsilon={epsilon:.4f} delta={metrics['delta']:g} ({metrics['neighbouring']}), "
          f"{evaluation.summary(metrics['test_accuracy'], config.num_synthetic)}; run folder: {run_dir}")
    return metrics
