"""Data root precedence: explicit root, then FEDGEN_DATA_ROOT, then the user cache (with download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedgen.data import DATA_ROOT_ENV, MNISTDataModule, resolve_data_root


def test_explicit_root_wins_over_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "explicit") == (tmp_path / "explicit", False)
    assert resolve_data_root(str(tmp_path / "explicit")) == (tmp_path / "explicit", False)


def test_env_root_used_without_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env"))
    assert resolve_data_root(None) == (tmp_path / "env", False)


def test_user_cache_allows_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_root(None) == (tmp_path / "xdg" / "fedgen" / "data", True)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_root(None) == (tmp_path / "home" / ".cache" / "fedgen" / "data", True)


def test_datamodule_follows_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env"))
    dm = MNISTDataModule()
    assert (dm.data_root, dm.download) == (tmp_path / "env", False)
    dm = MNISTDataModule(root=str(tmp_path / "cfg"))
    assert (dm.data_root, dm.download) == (tmp_path / "cfg", False)
    dm = MNISTDataModule(root=str(tmp_path / "cfg"), download=True)
    assert (dm.data_root, dm.download) == (tmp_path / "cfg", True)
    monkeypatch.delenv(DATA_ROOT_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    dm = MNISTDataModule()
    assert (dm.data_root, dm.download) == (tmp_path / "xdg" / "fedgen" / "data", True)
    dm = MNISTDataModule(download=False)
    assert dm.download is False


def test_env_root_loads_fake_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_mnist, network_attempts) -> None:
    fake_mnist(tmp_path / "env", n_train=12, n_test=4)
    fake_mnist(tmp_path / "cfg", n_train=30, n_test=6)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env"))
    assert MNISTDataModule().num_train == 12
    assert MNISTDataModule(root=str(tmp_path / "cfg")).num_train == 30
    assert network_attempts == []
