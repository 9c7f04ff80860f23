"""Fixtures shared by all tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedgen.data import DATA_ROOT_ENV


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The folder with real MNIST / Fashion-MNIST (FEDGEN_DATA_ROOT, else ../shared/data); fails if absent."""
    from_env = os.environ.get(DATA_ROOT_ENV)
    root = Path(from_env) if from_env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"real MNIST not found at {root / 'MNIST' / 'raw'}: set {DATA_ROOT_ENV} to the folder "
                    "holding MNIST/raw (torchvision's layout)")
    return root


@pytest.fixture(autouse=True)
def _seeded():
    import lightning as L

    L.seed_everything(0, verbose=False)
