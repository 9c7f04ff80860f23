"""The ``fedgen`` command line: ``fedgen fit --config file.yaml`` (LightningCLI underneath).

``fit`` runs the generative-privacy pipeline: train a private generator on the private training set,
synthesize a labelled dataset, train a downstream classifier on it alone (model selection on synthetic
validation data), test once on the real test set, and write a run folder:

    run_dir/config.yaml        the resolved configuration
    run_dir/checkpoints/       Lightning checkpoints; each carries the privacy ledger
    run_dir/generator.ckpt     the final generator checkpoint (with the ledger)
    run_dir/synthetic.pt       {"images": uint8 (N, C, H, W), "labels": int64 (N,)}
    run_dir/samples.png        a grid of samples, one row per class
    run_dir/metrics.json       epsilon, delta, test_accuracy, num_synthetic, ...
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from fedgen.data import VisionDataModule
from fedgen.errors import ConfigError, DataNotFoundError, PrivacyBudgetExceeded
from fedgen.evaluation import TrainOnSynthetic
from fedgen.federated import FederatedRelease
from fedgen.generators import Generator

log = logging.getLogger("fedgen")

USAGE = """usage: fedgen <command> [options]

commands:
  fit     train a private generator, synthesize data, train and test a classifier on it
          (fedgen fit --config examples/mnist_dp_merf.yaml; fedgen fit --help for all options)
"""


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
        parser.add_argument("--federation", type=FederatedRelease | None, default=None,
                            help="Release the generator's statistic from data split across simulated clients.")

    def before_instantiate_classes(self) -> None:
        config = self.config
        config.run_dir = str(resolve_run_dir(config))
        config.trainer.default_root_dir = config.run_dir


def resolve_run_dir(config: Any) -> Path:
    """The run folder: ``run_dir``, else the folder of the checkpoint being resumed, else a new timestamped one.

    A folder that holds a finished run (its ``metrics.json``) is never written into again.
    """
    if config.run_dir is not None:
        run_dir = Path(config.run_dir)
    elif config.ckpt_path is not None:
        run_dir = Path(config.ckpt_path).resolve().parent
        if run_dir.name == "checkpoints":
            run_dir = run_dir.parent
    else:
        generator = config.model.class_path.rsplit(".", 1)[-1].lower()
        dataset = config.data.init_args.get("dataset") or config.data.class_path.rsplit(".", 1)[-1]
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{generator}-{str(dataset).replace('DataModule', '').lower()}-{stamp}"
    if (run_dir / "metrics.json").exists():
        raise ConfigError("run_dir", f"{run_dir} already holds a finished run",
                          "give a new --run_dir (to continue a finished run, resume its checkpoint into a new folder)")
    return run_dir


def _config_error(err: BaseException) -> ConfigError:
    """The ConfigError that jsonargparse wrapped while instantiating, or one carrying its message."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConfigError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return ConfigError("config", str(err).strip(), "correct the value named above")


def save_samples(generator: Generator, path: Path, per_class: int = 10) -> None:
    """A PNG grid: one row per class, ``per_class`` samples each."""
    labels = torch.arange(generator.num_classes).repeat_interleave(per_class)
    images = torch.cat([generator.sample(len(chunk), chunk).cpu() for chunk in labels.split(1000)])
    torchvision.utils.save_image(images.clamp(0, 1), path, nrow=per_class, padding=2)


def fit(args: list[str]) -> dict[str, Any]:
    """``fedgen fit``: the whole pipeline; returns the metrics written to ``metrics.json``."""
    # fedgen passes its own argument list to LightningCLI on purpose.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    try:
        cli = FedgenCLI(Generator, VisionDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        run=False, args=args, save_config_callback=None, seed_everything_default=0,
                        auto_configure_optimizers=False,
                        trainer_defaults={"logger": False, "max_epochs": 5,
                                          "callbacks": [ModelCheckpoint(save_last=True, save_top_k=0)]},
                        parser_kwargs={"prog": "fedgen fit"})
    except ValueError as err:  # building the configured objects failed: report the config error inside
        raise _config_error(err) from err
    config, generator, data, trainer = cli.config, cli.model, cli.datamodule, cli.trainer
    run_dir = Path(config.run_dir)
    evaluation: TrainOnSynthetic = cli.config_init.evaluation
    federation: FederatedRelease | None = cli.config_init.federation
    if federation is not None and not (hasattr(generator, "embedding_sum") and hasattr(generator, "store_release")):
        raise ConfigError("federation", f"{type(generator).__name__} does not release a single sum",
                          "use a one-release generator such as fedgen.generators.DPMerf, or remove federation")
    if config.num_synthetic < generator.num_classes:
        raise ConfigError("num_synthetic", f"{config.num_synthetic} is fewer than one per class",
                          "synthesize at least one example per class")

    # Everything that can be checked is checked before the first private release.
    data.prepare_data()
    data.setup("fit")
    loader = generator.attach_private_data(data.train_set)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_name = "config.yaml" if not (run_dir / "config.yaml").exists() else \
        f"config-resumed-{datetime.now():%Y%m%d-%H%M%S}.yaml"
    cli.parser.save(config, run_dir / config_name, skip_none=False, skip_check=True)
    log.info("Run folder: %s", run_dir)
    log.info("Privacy: %s on %d private examples (add/remove-one-%s neighbouring)",
             generator.mechanism.describe(), len(data.train_set), generator.mechanism.ledger.unit)

    federation_report = None
    if federation is not None and config.ckpt_path is None:
        federation_report = federation.run(generator, data.train_set)
    elif federation is not None:
        log.info("Resuming: the checkpoint carries the federated release; the clients are not asked again.")

    start = time.perf_counter()
    trainer.fit(generator, loader, ckpt_path=config.ckpt_path)
    generator_seconds = time.perf_counter() - start
    trainer.save_checkpoint(run_dir / "generator.ckpt")
    epsilon = generator.mechanism.epsilon()
    log.info("Generator trained in %.1f s; %s", generator_seconds,
             generator.mechanism.ledger.summary(generator.mechanism.delta))

    synthetic = generator.synthesize(config.num_synthetic)
    images_u8 = (synthetic.tensors[0] * 255).round().to(torch.uint8)
    torch.save({"images": images_u8, "labels": synthetic.tensors[1]}, run_dir / "synthetic.pt")
    save_samples(generator, run_dir / "samples.png")
    # The classifier is trained on exactly what was saved (8-bit images).
    synthetic = torch.utils.data.TensorDataset(images_u8.float() / 255, synthetic.tensors[1])

    start = time.perf_counter()
    result = evaluation.run(synthetic, data.test_set, num_classes=generator.num_classes,
                            image_shape=generator.image_shape)
    metrics = {
        "epsilon": epsilon,
        "delta": generator.mechanism.delta,
        "neighbouring": f"add/remove one {generator.mechanism.ledger.unit}",
        "accountant": generator.mechanism.ledger.accountant,
        "test_accuracy": result["test_accuracy"],
        "synthetic_val_accuracy": result["synthetic_val_accuracy"],
        "selected_epoch": result["selected_epoch"],
        "classifier": result["classifier"],
        "num_synthetic": config.num_synthetic,
        "num_private": len(data.train_set),
        "generator": type(generator).__name__,
        "dataset": getattr(data, "dataset", type(data).__name__),
        "privacy_ledger": generator.mechanism.ledger.state_dict(),
        "federation": federation_report,
        "generator_seconds": generator_seconds,
        "classifier_seconds": time.perf_counter() - start,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"fedgen: epsilon={epsilon:.4f} delta={metrics['delta']:g} ({metrics['neighbouring']}), "
          f"test_accuracy={metrics['test_accuracy']:.4f} ({metrics['classifier']} trained on "
          f"{config.num_synthetic} synthetic examples); run folder: {run_dir}")
    return metrics


COMMANDS = {"fit": fit}


def _configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s fedgen: %(message)s", datefmt="%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    _configure_logging()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"fedgen: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    try:
        command(argv[1:])
    except (ConfigError, DataNotFoundError) as err:
        print(f"fedgen: error: {err}", file=sys.stderr)
        sys.exit(2)
    except PrivacyBudgetExceeded as err:
        print(f"fedgen: stopped: {err}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
