"""Loading torchvision datasets from a data root into tensors, on tiny fake MNIST-format files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedgen.data import (
    DATA_ROOT_ENV,
    FashionMNISTDataModule,
    MNISTDataModule,
    VisionDataModule,
    dataset_to_tensors,
    load_vision_dataset,
)
from fedgen.errors import ConfigError, DataNotFoundError

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def test_setup_for_test_loads_the_test_split_alone(tmp_path: Path, fake_mnist, network_attempts) -> None:
    fake_mnist(tmp_path, n_train=50, n_test=20)
    dm = MNISTDataModule(root=str(tmp_path), test_subset=10)
    dm.setup("test")
    assert dm.train_set is None and len(dm.test_set) == 10
    assert dm.num_classes == 10 and dm.num_train == 50  # what needs the train split loads it then
    assert network_attempts == []


def test_load_fake_mnist_gives_right_tensors(tmp_path: Path, fake_mnist, network_attempts) -> None:
    arrays = fake_mnist(tmp_path, n_train=50, n_test=20)
    for train, key in ((True, "train"), (False, "test")):
        ds = load_vision_dataset("MNIST", tmp_path, train=train, download=False)
        images, labels = dataset_to_tensors(ds)
        n = len(arrays[f"{key}_labels"])
        assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert torch.equal(labels, torch.from_numpy(arrays[f"{key}_labels"].astype(np.int64)))
        assert torch.allclose(images[:, 0] * 255, torch.from_numpy(arrays[f"{key}_images"]).float())
    assert images.min() >= 0 and images.max() <= 1
    assert network_attempts == []


def test_datamodule_on_fake_mnist(tmp_path: Path, fake_mnist, network_attempts) -> None:
    arrays = fake_mnist(tmp_path, n_train=50, n_test=20)
    dm = MNISTDataModule(root=str(tmp_path), batch_size=8, train_subset=30, test_subset=10)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.image_shape == (1, 28, 28)
    assert dm.num_classes == 10
    assert dm.num_train == 30 and len(dm.test_set) == 10
    images, labels = dm.train_set.tensors
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert torch.equal(labels, torch.from_numpy(arrays["train_labels"][:30].astype(np.int64)))

    batches = list(dm.train_dataloader())
    assert sum(len(y) for _, y in batches) == 30 and batches[0][0].shape == (8, 1, 28, 28)
    again = list(dm.train_dataloader())
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again)), "same seed, same order"
    other = list(MNISTDataModule(root=str(tmp_path), batch_size=8, train_subset=30, seed=1).train_dataloader())
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(batches, other))
    test_labels = torch.cat([y for _, y in dm.test_dataloader()])
    assert torch.equal(test_labels, torch.from_numpy(arrays["test_labels"][:10].astype(np.int64)))
    assert network_attempts == []


def test_other_mnist_family_class(tmp_path: Path, fake_mnist) -> None:
    fake_mnist(tmp_path, name="FashionMNIST", n_train=7, n_test=3)
    dm = FashionMNISTDataModule(root=str(tmp_path))
    assert dm.num_train == 7 and dm.image_shape == (1, 28, 28)
    dm = VisionDataModule(dataset="KMNIST", root=str(tmp_path))
    with pytest.raises(DataNotFoundError, match="KMNIST"):
        dm.setup()


def test_missing_root_names_path_and_files_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, network_attempts
) -> None:
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(DATA_ROOT_ENV, str(missing))
    dm = MNISTDataModule()
    dm.prepare_data()
    with pytest.raises(DataNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    assert str((missing / "MNIST" / "raw").resolve()) in message
    for filename in MNIST_FILES:
        assert filename in message
    assert "data.root" in message and DATA_ROOT_ENV in message and "download" in message
    assert network_attempts == []
    assert not missing.exists(), "nothing may be created when download is not allowed"


def test_explicit_root_missing_raises_from_load(tmp_path: Path, network_attempts) -> None:
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_vision_dataset("MNIST", tmp_path, train=False, download=False)
    assert network_attempts == []


def test_failed_download_becomes_data_not_found(tmp_path: Path, network_attempts) -> None:
    dm = MNISTDataModule(root=str(tmp_path), download=True)
    with pytest.raises(DataNotFoundError) as info:
        dm.prepare_data()
    assert "download failed" in str(info.value)
    assert str((tmp_path / "MNIST" / "raw").resolve()) in str(info.value)
    assert network_attempts, "download was allowed, so it should have been tried (and refused)"


def test_unknown_dataset_is_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.dataset.*'NotADataset'.*MNIST"):
        VisionDataModule(dataset="NotADataset")
    with pytest.raises(ConfigError, match="did you mean 'MNIST'"):
        load_vision_dataset("mnist", "/nonexistent", train=True, download=False)


def test_split_argument_detected_from_signature(tmp_path: Path) -> None:
    # SVHN takes split= instead of train=; missing files then surface as DataNotFoundError, not TypeError.
    with pytest.raises(DataNotFoundError, match="SVHN"):
        load_vision_dataset("SVHN", tmp_path, train=True, download=False)
    with pytest.raises(ConfigError, match=r"data\.dataset_kwargs\.split"):
        load_vision_dataset("SVHN", tmp_path, train=True, download=False, split="extra")
    # EMNIST needs split= (its subset) and passes train= on to MNIST through **kwargs.
    with pytest.raises(ConfigError, match=r"data\.dataset_kwargs\.split"):
        load_vision_dataset("EMNIST", tmp_path, train=True, download=False)
    with pytest.raises(DataNotFoundError, match="EMNIST"):
        load_vision_dataset("EMNIST", tmp_path, train=True, download=False, split="balanced")


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("data.batch_size", {"batch_size": 0}),
        ("data.num_workers", {"num_workers": -1}),
        ("data.train_subset", {"train_subset": 0}),
        ("data.test_subset", {"test_subset": -3}),
        ("data.dataset_kwargs", {"dataset_kwargs": [1, 2]}),
        ("data.dataset_kwargs.root", {"dataset_kwargs": {"root": "/x"}}),
        ("data.dataset_kwargs.train", {"dataset_kwargs": {"train": False}}),
        ("data.dataset", {"dataset": "VisionDataset"}),
    ],
)
def test_bad_arguments_name_the_field(tmp_path: Path, field: str, kwargs: dict) -> None:
    with pytest.raises(ConfigError) as info:
        dm = VisionDataModule(root=str(tmp_path), **kwargs)
        dm.setup()
    assert info.value.field == field


def test_subset_larger_than_split(tmp_path: Path, fake_mnist) -> None:
    fake_mnist(tmp_path, n_train=5, n_test=5)
    with pytest.raises(ConfigError, match=r"data\.train_subset"):
        MNISTDataModule(root=str(tmp_path), train_subset=6).setup()


class _ChannelsLast(torch.utils.data.Dataset):
    """CIFAR-like: numpy (N, H, W, C) uint8 ``data``, list ``targets``, PIL images out."""

    def __init__(self) -> None:
        self.data = np.random.default_rng(0).integers(0, 256, size=(6, 4, 5, 3), dtype=np.uint8)
        self.targets = [3, 1, 4, 1, 5, 9]
        self.transform = None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return Image.fromarray(self.data[i]), self.targets[i]


class _ChannelsFirst(_ChannelsLast):
    """SVHN-like: numpy (N, C, H, W) ``data`` and ``labels``."""

    def __init__(self) -> None:
        super().__init__()
        self.data = np.ascontiguousarray(self.data.transpose(0, 3, 1, 2))
        self.labels = np.asarray(self.targets)
        del self.targets

    def __getitem__(self, i: int):
        return Image.fromarray(self.data[i].transpose(1, 2, 0)), int(self.labels[i])


class _NoArrays(torch.utils.data.Dataset):
    """Only ``__getitem__``: forces the generic path."""

    def __init__(self) -> None:
        self.inner = _ChannelsLast()

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]


@pytest.mark.parametrize("make", [_ChannelsLast, _ChannelsFirst, _NoArrays])
def test_dataset_to_tensors_layouts(make) -> None:
    images, labels = dataset_to_tensors(make())
    expected = torch.from_numpy(_ChannelsLast().data).permute(0, 3, 1, 2).float() / 255
    assert images.shape == (6, 3, 4, 5) and images.dtype == torch.float32
    assert torch.allclose(images, expected)
    assert labels.dtype == torch.int64 and labels.tolist() == [3, 1, 4, 1, 5, 9]
