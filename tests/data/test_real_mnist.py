"""The real MNIST in the shared, read-only data folder loads through FEDGEN_DATA_ROOT."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from fedgen.data import DATA_ROOT_ENV, MNISTDataModule


def _shared_data_root() -> Path:
    from_env = os.environ.get(DATA_ROOT_ENV)
    root = Path(from_env) if from_env else Path(__file__).resolve().parents[3] / "shared" / "data"
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(
            f"real MNIST not found at {root / 'MNIST' / 'raw'}: set {DATA_ROOT_ENV} to the folder holding "
            "MNIST/raw (torchvision's layout)"
        )
    return root


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_real_mnist_loads_from_env_root(monkeypatch: pytest.MonkeyPatch, network_attempts) -> None:
    root = _shared_data_root()
    monkeypatch.setenv(DATA_ROOT_ENV, str(root))
    before = _snapshot(root)
    start = time.perf_counter()
    dm = MNISTDataModule()
    dm.prepare_data()
    dm.setup()
    elapsed = time.perf_counter() - start
    assert dm.data_root == root and dm.download is False
    assert dm.num_train == 60000 and len(dm.test_set) == 10000
    assert dm.image_shape == (1, 28, 28) and dm.num_classes == 10
    images, labels = dm.train_set.tensors
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert abs(float(images.mean()) - 0.1307) < 1e-3
    assert elapsed < 5.0, f"loading MNIST took {elapsed:.1f}s"
    assert network_attempts == []
    assert _snapshot(root) == before, "the shared data folder must not be written to"
