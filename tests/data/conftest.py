"""Fixtures for the data tests: tiny fake MNIST-format datasets and a network that refuses to work."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torchvision.datasets.mnist
import torchvision.datasets.utils


def _idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte idx file (magic 0x08, big-endian int32 dimensions) holding ``array``."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fake_mnist(root: Path, name: str = "MNIST", n_train: int = 50, n_test: int = 20, size: int = 28, seed: int = 0) -> dict[str, np.ndarray]:
    """Write idx files for a tiny MNIST-format dataset under ``root/<name>/raw``; return the arrays.

    torchvision's MNIST checks only that the uncompressed files exist (no md5), so those are what it
    reads; the .gz archives are written beside them as a real download would leave them.
    """
    rng = np.random.default_rng(seed)
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, size=(n_train, size, size), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, size=(n_test, size, size), dtype=np.uint8),
        "test_labels": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    arrays["train_images"][0] = 255  # make sure both ends of the range occur
    arrays["train_images"][1] = 0
    files = {
        "train-images-idx3-ubyte": arrays["train_images"],
        "train-labels-idx1-ubyte": arrays["train_labels"],
        "t10k-images-idx3-ubyte": arrays["test_images"],
        "t10k-labels-idx1-ubyte": arrays["test_labels"],
    }
    for filename, array in files.items():
        data = _idx_bytes(array)
        (raw / filename).write_bytes(data)
        (raw / f"{filename}.gz").write_bytes(gzip.compress(data))
    return arrays


@pytest.fixture
def fake_mnist() -> Callable[..., dict[str, np.ndarray]]:
    return write_fake_mnist


@pytest.fixture
def network_attempts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every download attempt and make it fail as an offline machine would."""
    attempts: list[str] = []

    def refuse_urlopen(request, *args, **kwargs):
        url = request.full_url if isinstance(request, urllib.request.Request) else str(request)
        attempts.append(url)
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    def refuse_download(url, *args, **kwargs):
        attempts.append(str(url))
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setattr(urllib.request, "urlopen", refuse_urlopen)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", refuse_download)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", refuse_download)
    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", refuse_download)
    return attempts
