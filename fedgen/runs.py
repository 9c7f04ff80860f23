"""Run folders and configurations, shared by the ``fedgen`` commands."""

from __future__ import annotations

import itertools
import logging
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from fedgen.errors import ConfigError, check_fits_in_memory

log = logging.getLogger("fedgen")


def resolve_run_dir(run_dir: str | None, ckpt_path: str | None, name: str) -> Path:
    """The run folder: ``run_dir``, else the folder of the checkpoint being resumed, else a new timestamped
    ``runs/<name>-<time>``.

    A folder that holds a finished run (its ``metrics.json``) is never written into again, and one that holds an
    unfinished run's checkpoints only by that run's resume (a ``ckpt_path`` inside it): any other run there would
    overwrite them, and the privacy ledger of what was already spent on the data with them.
    """
    if run_dir is not None:
        folder = Path(run_dir)
    elif ckpt_path is not None:
        folder = Path(ckpt_path).resolve().parent
        if folder.name == "checkpoints":
            folder = folder.parent
    else:
        folder = Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
    if folder.exists() and not folder.is_dir() or any(p.exists() and not p.is_dir() for p in folder.parents):
        raise ConfigError("run_dir", f"{folder} is, or lies under, a file", "give a folder path for --run_dir")
    if (folder / "metrics.json").exists():
        raise ConfigError("run_dir", f"{folder} already holds a finished run",
                          "give a new --run_dir (to continue a finished run, resume its checkpoint into a new folder)")
    checkpoints = folder / "checkpoints"
    resuming_here = ckpt_path is not None and folder.resolve() in Path(ckpt_path).resolve().parents
    if not resuming_here and ((folder / "generator.ckpt").exists() or (checkpoints.is_dir() and any(
            checkpoints.iterdir()))):
        raise ConfigError("run_dir", f"{folder} holds an unfinished run's checkpoints, which a new run would overwrite "
                          "with their privacy ledger", f"resume it with --ckpt_path={checkpoints / 'last.ckpt'}, or "
                          "give a new --run_dir")
    return folder


def check_fit_run(run: str | None, needs: tuple[str, ...], field: str = "run") -> Path:
    """``run`` as a path, after checking that it is a ``fedgen fit`` run folder holding the files ``needs``; the
    refusal names ``field``, the option that gave the folder."""
    folder = Path(run or "")
    missing = [f for f in needs if not (folder / f).is_file()]
    if not run or missing:
        raise ConfigError(field, f"{folder} is not a finished `fedgen fit` run folder (missing {missing})",
                          f"give the folder a `fedgen fit` run wrote (it holds {', '.join(needs)})")
    return folder


def read_fit_config(run: Path, field: str = "run") -> dict[str, Any]:
    """The configuration a ``fedgen fit`` run folder saved in its ``config.yaml``; the refusal of a file that is not
    such a configuration (not YAML, or without ``model`` and ``data``) names ``field``."""
    path = run / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        saved = None  # refused below
    if not isinstance(saved, dict) or not {"model", "data"} <= set(saved):
        raise ConfigError(field, f"{path} is not the configuration `fedgen fit` saves (it needs model and data)",
                          "give a run folder whose config.yaml `fedgen fit` wrote")
    return saved


def check_seed(seed: int, field: str = "seed_everything") -> None:
    """Seeds are what numpy and torch accept: integers in [0, 2^32)."""
    if not 0 <= seed < 2**32:
        raise ConfigError(field, f"{seed} is outside [0, 2^32)", "use e.g. 0")


def dataset_name(data_config: Any) -> str:
    """``mnist`` for ``fedgen.data.MNISTDataModule`` or ``VisionDataModule(dataset="MNIST")``."""
    dataset = data_config.init_args.get("dataset") or data_config.class_path.rsplit(".", 1)[-1]
    return str(dataset).replace("DataModule", "").lower()


#: a ConfigError's message, ``<field>: <problem>. Fix: <fix>``, as a line of jsonargparse's report on a union type
_NESTED_ERROR = re.compile(r"^\s*-\s*(?P<field>[\w.]+): (?P<problem>.*?)\. Fix: (?P<fix>.*)$", re.MULTILINE)


def config_error(err: BaseException) -> ConfigError:
    """The ConfigError that jsonargparse wrapped while instantiating; or, where it kept only the text (an option
    that may take one of several classes, e.g. ``federation``), the first one its report quotes; or one carrying
    its whole message."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConfigError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    quoted = _NESTED_ERROR.search(str(err))
    if quoted is not None:
        return ConfigError(quoted["field"], quoted["problem"], quoted["fix"])
    return ConfigError("config", str(err).strip(), "correct the value named above")


def parse_args(parser: Any, args: list[str]) -> Any:
    """``parser.parse_args`` with a parse failure reported as a ConfigError that points at ``--help``."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(args)
    except ArgumentError as err:
        raise ConfigError("config", str(err).strip(), f"see {parser.prog} --help") from err


def instantiate(parser: Any, config: Any) -> Any:
    """Build the configured objects; a failure inside a constructor surfaces as its own ConfigError."""
    try:
        return parser.instantiate(config)
    except ValueError as err:
        raise config_error(err) from err


def write_config(parser: Any, config: Any, run_dir: Path) -> None:
    """Create the run folder and save the resolved configuration: ``config.yaml``, or on resume beside it
    ``config-resumed-<time>.yaml`` (``-2``, ``-3``, ... after the time for a second resume within the same second)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "config.yaml"
    if (run_dir / name).exists():
        stem = f"config-resumed-{datetime.now():%Y%m%d-%H%M%S}"
        suffixes = itertools.chain([""], (f"-{i}" for i in itertools.count(2)))
        name = next(f"{stem}{s}.yaml" for s in suffixes if not (run_dir / f"{stem}{s}.yaml").exists())
    parser.save(config, run_dir / name, skip_none=False, skip_validation=True)
    log.info("Run folder: %s", run_dir)


def check_images_fit_in_memory(field: str, num: int, image_shape: tuple[int, ...], bytes_per_pixel: int) -> None:
    """Refuse ``num`` images of ``image_shape`` that would not fit in this machine's memory, at ``bytes_per_pixel``
    bytes a pixel at the command's peak."""
    per_image = bytes_per_pixel * math.prod(image_shape)
    check_fits_in_memory(field, num * per_image, f"{num} images of shape {list(image_shape)}",
                         lambda memory: f"use at most {memory // per_image} images (e.g. 60000)")
