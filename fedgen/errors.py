"""Errors fedgen raises on bad input and on privacy-budget exhaustion.

Every configuration error names the field at fault and how to fix it, so a wrong YAML fails before any
training starts and before anything already saved is touched.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid.

    The message reads ``<field>: <problem>. Fix: <fix>``.
    """

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}. Fix: {fix}")


@contextlib.contextmanager
def fields_under(paths: dict[str, str]) -> Iterator[None]:
    """Re-raise a ConfigError from inside under the name its field has in the config at hand: a field that is, or
    starts with, a key of ``paths`` (e.g. ``"mechanism"``, raised by a mechanism that does not know where it was
    configured) gets that key replaced by its value (``"model.mechanism"``)."""
    try:
        yield
    except ConfigError as err:
        for inner, outer in paths.items():
            if err.field == inner or err.field.startswith(inner + "."):
                raise ConfigError(outer + err.field[len(inner):], err.problem, err.fix) from err
        raise


def check_at_least_one(field: str, value: int, fix: str) -> None:
    """Refuse a count below 1 with a ConfigError naming ``field``."""
    if value < 1:
        raise ConfigError(field, f"must be >= 1, got {value}", fix)


def check_integer(field: str, value: Any, minimum: int, *, allow_none: bool = False) -> None:
    """Refuse a value that is not a whole number >= ``minimum`` (a Python or NumPy integer, not a bool) with a
    ConfigError naming ``field``; with ``allow_none``, None passes too."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(field, f"must be an integer >= {minimum}{' or null' if allow_none else ''}, got {value!r}",
                          f"set {field} to an integer >= {minimum}")


def check_positive(field: str, value: float, fix: str) -> None:
    """Refuse a value that is not a finite number > 0 with a ConfigError naming ``field``."""
    if not (value > 0 and value != float("inf")):
        raise ConfigError(field, f"must be a finite number > 0, got {value}", fix)


def check_accelerator(field: str, accelerator: str) -> None:
    """Refuse a Lightning accelerator name that is unknown, or that this machine does not have."""
    if accelerator == "auto":
        return
    from lightning.pytorch.accelerators import AcceleratorRegistry

    known = sorted(AcceleratorRegistry.available_accelerators())
    names = ["cuda", "mps"] if accelerator == "gpu" else [accelerator]  # Lightning's "gpu" is either
    if not any(name in known for name in names):
        raise ConfigError(field, f"unknown accelerator {accelerator!r}", f"use auto, gpu or one of {known}")
    if not any(AcceleratorRegistry[name]["accelerator"].is_available() for name in names if name in known):
        raise ConfigError(field, f"{accelerator} is not available on this machine", "use auto or cpu")


def machine_memory() -> int | None:
    """This machine's memory in bytes; None where the OS does not report it."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def device_memory(device: Any = None) -> int | None:
    """The memory in bytes of ``device`` (a ``torch.device``): a CUDA device's own, else (the CPU, or None) this
    machine's; None where it is not reported."""
    if device is not None and device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory if torch.cuda.is_available() else None
    if device is None or device.type == "cpu":
        return machine_memory()
    return None


def check_fits_in_memory(field: str, needed: int, what: str, fix: str | Callable[[int], str],
                         device: Any = None) -> None:
    """Refuse a setting whose ``what`` needs ``needed`` bytes, more than the memory of ``device`` (default: this
    machine's; no check where it is not reported). ``fix`` is the error's fix, or a function of the memory in bytes
    that gives it (e.g. the largest setting that fits)."""
    total = device_memory(device)
    if total is not None and needed > total:
        where = f"{device}'s" if device is not None and device.type == "cuda" else "this machine's"
        raise ConfigError(field, f"{what} needs about {needed / 2**30:.3g} GiB of memory, more than {where} "
                          f"{total / 2**30:.3g} GiB", fix(total) if callable(fix) else fix)


def load_checkpoint(field: str, path: str | Path, fix: str) -> Any:
    """``torch.load`` of the file at ``path`` (onto the CPU), or a ConfigError naming ``field`` if there is no such
    file or it cannot be read as a checkpoint."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(field, f"{path} is not a file", fix)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # any unreadable file: empty, truncated, a text file, another format
        raise ConfigError(field, f"{path} cannot be read as a checkpoint ({type(err).__name__}: {err})", fix) from err


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing and cannot be downloaded."""


class PrivacyBudgetExceeded(RuntimeError):
    """A release was refused because it would spend more than the mechanism's epsilon budget."""
