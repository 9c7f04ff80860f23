"""Image datasets from torchvision, loaded once into memory as float tensors.

:func:`load_vision_dataset` builds a torchvision dataset by its class name and turns missing files
into a :class:`~fedgen.errors.DataNotFoundError` that says where it looked and what it expected.
:func:`dataset_to_tensors` turns such a dataset into ``(images, labels)`` tensors, and
:class:`VisionDataModule` serves those tensors to Lightning.
"""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torchvision.datasets
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.datasets import CIFAR10, MNIST, VisionDataset
from torchvision.transforms import functional as TF

from fedgen.data.root import DATA_ROOT_ENV, resolve_data_root
from fedgen.errors import ConfigError, DataNotFoundError, check_integer

COMMON_DATASETS = ("MNIST", "FashionMNIST", "KMNIST", "EMNIST", "QMNIST", "CIFAR10", "CIFAR100", "SVHN", "STL10")
"""Image-classification datasets from torchvision that fit in memory; shown when a name is wrong."""

SAME_SOURCE = (frozenset({"mnist", "qmnist", "emnist"}),)
"""Datasets cut from the same original images, by lower-case name: QMNIST rebuilds MNIST's own digits from NIST's
forms, and EMNIST converts NIST Special Database 19, which holds the forms MNIST was drawn from. One of them
declared public beside another as private would put private images outside the guarantee."""


def same_source(a: str, b: str) -> bool:
    """Whether datasets ``a`` and ``b`` (names, any case) are the same or cut from the same original images."""
    a, b = a.lower(), b.lower()
    return a == b or any(a in family and b in family for family in SAME_SOURCE)


_RESERVED_KWARGS = {
    "root": "remove it and set data.root instead",
    "download": "remove it and set data.download instead",
    "train": "remove it; the datamodule loads both the train and the test split",
}


# ----------------------------------------------------------------------------------------------
# Looking up a dataset class and its arguments


def _torchvision_dataset_names() -> list[str]:
    return sorted(
        name
        for name, obj in vars(torchvision.datasets).items()
        if not name.startswith("_")
        and isinstance(obj, type)
        and issubclass(obj, VisionDataset)
        and obj is not VisionDataset
    )


def vision_dataset_class(name: str) -> type[VisionDataset]:
    """The torchvision dataset class called ``name`` (e.g. ``"MNIST"``), or a ConfigError."""
    obj = getattr(torchvision.datasets, name, None) if isinstance(name, str) and not name.startswith("_") else None
    if isinstance(obj, type) and issubclass(obj, VisionDataset) and obj is not VisionDataset:
        return obj
    known = _torchvision_dataset_names()
    by_lower = {known_name.lower(): known_name for known_name in known}
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(by_lower[c]) for c in close)}?)" if close else ""
    raise ConfigError(
        "data.dataset",
        f"unknown torchvision dataset {name!r}{hint}",
        "use the class name of a torchvision.datasets image-classification dataset, "
        f"e.g. one of {list(COMMON_DATASETS)}",
    )


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Named ``__init__`` parameters of ``cls``, following ``**kwargs`` up to the parent classes."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        signature = inspect.signature(klass.__init__)
        passes_kwargs = False
        for index, param in enumerate(signature.parameters.values()):
            if index == 0:  # self
                continue
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                passes_kwargs = True
            elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
                params.setdefault(param.name, param)
        if not passes_kwargs:
            break
    return params


# ----------------------------------------------------------------------------------------------
# Which files a dataset needs, where that is cheap to say


@dataclass(frozen=True)
class _ExpectedFiles:
    """The folder a dataset class reads and the file names it needs there."""

    folder: Path
    files: tuple[str, ...]
    alternatives: tuple[Path, ...] = ()  # paths that, all present, also suffice (e.g. MNIST's legacy .pt files)
    note: str = ""

    def present(self) -> bool:
        if all((self.folder / name).is_file() for name in self.files):
            return True
        return bool(self.alternatives) and all(path.is_file() for path in self.alternatives)


def _expected_files(cls: type, root: Path) -> _ExpectedFiles | None:
    """The files ``cls`` checks for under ``root``, for the classes whose layout is known; else None."""
    resources = getattr(cls, "resources", None)
    if (
        issubclass(cls, MNIST)
        and cls._check_exists is MNIST._check_exists
        and isinstance(resources, list)
        and all(isinstance(item, tuple) and len(item) == 2 for item in resources)
    ):
        files = tuple(os.path.splitext(os.path.basename(url))[0] for url, _ in resources)
        processed = root / cls.__name__ / "processed"
        return _ExpectedFiles(
            folder=root / cls.__name__ / "raw",
            files=files,
            alternatives=(processed / "training.pt", processed / "test.pt"),
            note="uncompressed idx files; the .gz archives alone are only used when download is allowed",
        )
    if issubclass(cls, CIFAR10):
        files = tuple(name for name, _ in list(cls.train_list) + list(cls.test_list)) + (cls.meta["filename"],)
        return _ExpectedFiles(
            folder=root / cls.base_folder,
            files=files,
            note=f"the extracted {cls.filename} archive",
        )
    return None


def _not_found(
    name: str, root: Path, expected: _ExpectedFiles | None, download: bool, reason: str | None = None
) -> DataNotFoundError:
    if expected is not None:
        where = expected.folder.resolve()
        what = ", ".join(expected.files) + (f" ({expected.note})" if expected.note else "")
    else:
        where = root.resolve()
        what = f"the files torchvision.datasets.{name} expects"
    problem = f"{name} not found: searched {where} for {what}"
    if download:
        problem += f"; download failed ({reason})" if reason else "; download failed"
    elif reason:
        problem += f" ({reason})"
    if expected is not None:
        layout = f"{expected.folder.relative_to(root).as_posix()}/"
    else:
        layout = f"torchvision's layout for {name}"
    fix = f"set data.root or the {DATA_ROOT_ENV} environment variable to the folder that holds {layout}"
    fix += ", or place the files there by hand" if download else ", or allow download with data.download: true"
    return DataNotFoundError(f"data.root: {problem}. Fix: {fix}")


# ----------------------------------------------------------------------------------------------
# Loading


def _check_reserved_kwargs(dataset_kwargs: dict[str, Any]) -> None:
    for reserved, fix in _RESERVED_KWARGS.items():
        if reserved in dataset_kwargs:
            raise ConfigError(f"data.dataset_kwargs.{reserved}", f"{reserved!r} is set by the datamodule", fix)


def load_vision_dataset(
    name: str, root: str | os.PathLike, /, *, train: bool, download: bool, **dataset_kwargs: Any
) -> VisionDataset:
    """Build ``torchvision.datasets.<name>`` for the train or test split under ``root``.

    Datasets with a ``split`` argument instead of ``train`` (SVHN, STL10) get ``split="train"``
    or ``"test"``. Extra arguments (e.g. EMNIST's ``split="balanced"``) go in ``dataset_kwargs``.
    Raises ConfigError for a bad name or argument and DataNotFoundError for missing files.
    """
    cls = vision_dataset_class(name)
    root_path = Path(root).expanduser()
    params = _init_parameters(cls)
    kwargs = dict(dataset_kwargs)
    _check_reserved_kwargs(kwargs)
    if "train" in params:
        kwargs["train"] = train
    elif "split" in params:
        if "split" in kwargs:
            raise ConfigError(
                "data.dataset_kwargs.split",
                f"{name} picks its train/test split through 'split', which the datamodule sets",
                "remove split from data.dataset_kwargs",
            )
        kwargs["split"] = "train" if train else "test"
    else:
        raise ConfigError(
            "data.dataset",
            f"torchvision.datasets.{name} takes neither a 'train' nor a 'split' argument",
            f"use a dataset with train and test splits, e.g. one of {list(COMMON_DATASETS)}",
        )
    for param in params.values():
        if param.name != "root" and param.default is inspect.Parameter.empty and param.name not in kwargs:
            raise ConfigError(
                f"data.dataset_kwargs.{param.name}",
                f"torchvision.datasets.{name} needs the argument {param.name!r}",
                f"set data.dataset_kwargs.{param.name}",
            )
    if "download" in params:
        kwargs["download"] = download

    expected = _expected_files(cls, root_path)
    if expected is not None and not download and not expected.present():
        raise _not_found(name, root_path, expected, download=False)

    try:
        return cls(root=str(root_path), **kwargs)
    except TypeError as err:
        raise ConfigError(
            "data.dataset_kwargs", f"torchvision.datasets.{name} rejected the arguments: {err}", "fix the arguments"
        ) from err
    except (RuntimeError, OSError) as err:  # urllib's URLError is an OSError
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if download or isinstance(err, FileNotFoundError) or "not found" in str(err).lower():
            raise _not_found(name, root_path, expected, download=download, reason=message) from err
        raise


def _image_to_tensor(image: Any) -> Tensor:
    """One image (PIL, numpy HWC or tensor) as float32 (C, H, W)."""
    if isinstance(image, Tensor):
        tensor = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    else:
        tensor = TF.to_tensor(image)
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    return tensor


def _fast_tensors(ds: Dataset) -> tuple[Tensor, Tensor] | None:
    """``(images, labels)`` straight from ``ds.data`` and ``ds.targets``/``ds.labels``, or None."""
    if getattr(ds, "transform", None) is not None or getattr(ds, "target_transform", None) is not None:
        return None
    data = getattr(ds, "data", None)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = getattr(ds, "labels", None)
    if data is None or labels is None:
        return None
    try:
        data_t = data if isinstance(data, Tensor) else torch.from_numpy(np.asarray(data))
        if isinstance(labels, Tensor):
            labels_t = labels.to(torch.int64)
        else:
            labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    except (TypeError, ValueError):
        return None
    if data_t.dtype != torch.uint8 or labels_t.ndim != 1 or len(data_t) != len(labels_t) or len(data_t) != len(ds):
        return None
    if len(data_t) == 0:
        return None
    channel_sizes = (1, 3, 4)
    if data_t.ndim == 3:  # N, H, W
        images = data_t.unsqueeze(1)
    elif data_t.ndim == 4 and data_t.shape[-1] in channel_sizes and data_t.shape[1] not in channel_sizes:
        images = data_t.permute(0, 3, 1, 2)  # N, H, W, C
    elif data_t.ndim == 4 and data_t.shape[1] in channel_sizes and data_t.shape[-1] not in channel_sizes:
        images = data_t  # N, C, H, W
    else:
        return None
    # Check the guess on the first example against what the dataset itself returns.
    first_image, first_label = ds[0]
    reference = _image_to_tensor(first_image)
    if reference.shape != images[0].shape or int(first_label) != int(labels_t[0]):
        return None
    if not torch.allclose(reference, images[0].float() / 255.0, atol=1e-6):
        return None
    return images.to(torch.float32).div_(255.0).contiguous(), labels_t


def dataset_to_tensors(ds: Dataset) -> tuple[Tensor, Tensor]:
    """All of ``ds`` as ``(images, labels)``: float32 (N, C, H, W) in [0, 1] and int64 (N,)."""
    fast = _fast_tensors(ds)
    if fast is not None:
        return fast
    images: list[Tensor] = []
    labels: list[int] = []
    for index in range(len(ds)):
        image, label = ds[index]
        images.append(_image_to_tensor(image))
        labels.append(int(label))
    if not images:
        return torch.empty(0, 1, 0, 0), torch.empty(0, dtype=torch.int64)
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise ValueError(
            f"dataset images differ in shape ({sorted(shapes)[:3]} ...); "
            "pass a resizing transform in data.dataset_kwargs"
        )
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------
# Lightning datamodules


class VisionDataModule(LightningDataModule):
    """A torchvision image-classification dataset held in memory as ``TensorDataset``s.

    Images are float32 (C, H, W) in [0, 1]; labels are int64. ``train_set`` and ``test_set`` are
    filled by :meth:`setup`. The data root is ``root``, else ``$FEDGEN_DATA_ROOT``, else the user
    cache; ``download=None`` downloads only into the user cache.
    """

    def __init__(
        self,
        *,
        dataset: str = "MNIST",
        root: str | None = None,
        download: bool | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        train_subset: int | None = None,
        test_subset: int | None = None,
        dataset_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        vision_dataset_class(dataset)
        if download is not None and not isinstance(download, bool):
            raise ConfigError("data.download", f"must be true, false or null, got {download!r}", "set true, false or null")
        check_integer("data.batch_size", batch_size, 1)
        check_integer("data.num_workers", num_workers, 0)
        check_integer("data.train_subset", train_subset, 1, allow_none=True)
        check_integer("data.test_subset", test_subset, 1, allow_none=True)
        check_integer("data.seed", seed, 0)
        if dataset_kwargs is not None and not isinstance(dataset_kwargs, dict):
            raise ConfigError(
                "data.dataset_kwargs", f"must be a mapping, got {dataset_kwargs!r}", "write it as a mapping or null"
            )
        _check_reserved_kwargs(dataset_kwargs or {})
        self.dataset = dataset
        self.data_root, default_download = resolve_data_root(root)
        self.download = default_download if download is None else download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_subset = train_subset
        self.test_subset = test_subset
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self._num_classes: int | None = None

    def _load(self, *, train: bool, download: bool) -> VisionDataset:
        return load_vision_dataset(self.dataset, self.data_root, train=train, download=download, **self.dataset_kwargs)

    def prepare_data(self) -> None:
        """Download both splits when downloading is allowed and their files are missing."""
        if not self.download:
            return
        expected = _expected_files(vision_dataset_class(self.dataset), self.data_root)
        if expected is not None and expected.present():
            return
        for train in (True, False):
            self._load(train=train, download=True)

    def _tensor_split(self, *, train: bool) -> tuple[TensorDataset, VisionDataset]:
        ds = self._load(train=train, download=self.download)
        images, labels = dataset_to_tensors(ds)
        subset = self.train_subset if train else self.test_subset
        if subset is not None:
            field = "data.train_subset" if train else "data.test_subset"
            if subset > len(labels):
                raise ConfigError(
                    field,
                    f"asks for {subset} examples but the split has {len(labels)}",
                    f"set {field} <= {len(labels)} or null",
                )
            images, labels = images[:subset].clone(), labels[:subset].clone()
        return TensorDataset(images, labels), ds

    def setup(self, stage: str | None = None) -> None:
        """Load splits into memory (once): the test split alone for ``stage="test"``, both splits for any other
        stage (a ``fedgen fit`` run trains on one and scores on the other)."""
        if self.train_set is None and stage != "test":
            self.train_set, raw = self._tensor_split(train=True)
            classes = getattr(raw, "classes", None)
            labels = self.train_set.tensors[1]
            from_labels = int(labels.max()) + 1 if len(labels) else 0
            self._num_classes = max(len(classes), from_labels) if classes else from_labels
        if self.test_set is None:
            self.test_set, _ = self._tensor_split(train=False)

    def _ensure_setup(self, stage: str | None = None) -> None:
        if self.test_set is None or (stage != "test" and self.train_set is None):
            self.setup(stage)

    @property
    def num_classes(self) -> int:
        """Number of classes (from the dataset's class list, else the largest label + 1)."""
        self._ensure_setup()
        assert self._num_classes is not None
        return self._num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of one image."""
        self._ensure_setup()
        assert self.train_set is not None
        channels, height, width = self.train_set.tensors[0].shape[1:]
        return int(channels), int(height), int(width)

    @property
    def num_train(self) -> int:
        """Number of training examples (after ``train_subset``)."""
        self._ensure_setup()
        assert self.train_set is not None
        return len(self.train_set)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the order is fixed by ``seed``."""
        self._ensure_setup()
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def test_dataloader(self) -> DataLoader:
        """Test batches in dataset order."""
        self._ensure_setup("test")
        return DataLoader(
            self.test_set,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class _NamedVisionDataModule(VisionDataModule):
    """A :class:`VisionDataModule` whose dataset is fixed by the subclass (``dataset_name``), so a config names the
    class alone; its other settings are :class:`VisionDataModule`'s."""

    dataset_name: ClassVar[str]

    def __init__(
        self,
        *,
        root: str | None = None,
        download: bool | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        train_subset: int | None = None,
        test_subset: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset=self.dataset_name, root=root, download=download, batch_size=batch_size, num_workers=num_workers,
            train_subset=train_subset, test_subset=test_subset, seed=seed,
        )


class MNISTDataModule(_NamedVisionDataModule):
    """:class:`VisionDataModule` for MNIST (1 x 28 x 28, 10 classes)."""

    dataset_name = "MNIST"


class FashionMNISTDataModule(_NamedVisionDataModule):
    """:class:`VisionDataModule` for Fashion-MNIST (1 x 28 x 28, 10 classes)."""

    dataset_name = "FashionMNIST"


class CIFAR10DataModule(_NamedVisionDataModule):
    """:class:`VisionDataModule` for CIFAR-10 (3 x 32 x 32, 10 classes)."""

    dataset_name = "CIFAR10"
