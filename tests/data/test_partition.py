"""Federated partitioners: disjoint cover, reproducibility, label skew, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedgen.data import DirichletPartitioner, IIDPartitioner, Partitioner, ShardPartitioner
from fedgen.errors import ConfigError

# 10 balanced classes of 100 examples each, in a scrambled order.
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 100))


def _label_fractions(part: np.ndarray, labels: np.ndarray = LABELS) -> np.ndarray:
    return np.bincount(labels[part], minlength=10) / len(part)


def _make(name: str, seed: int) -> Partitioner:
    kwargs = {"dirichlet": {"alpha": 0.5}}.get(name, {})
    return Partitioner.create(name, seed=seed, **kwargs)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("num_clients", [1, 7, 10])
def test_every_example_in_exactly_one_client(name: str, num_clients: int) -> None:
    parts = _make(name, seed=0).partition(LABELS, num_clients)
    assert len(parts) == num_clients
    for part in parts:
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0), "sorted, no repeats"
    everything = np.concatenate(parts)
    assert len(everything) == len(LABELS), "pairwise disjoint"
    assert np.array_equal(np.sort(everything), np.arange(len(LABELS))), "union is all indices"


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards"])
def test_reproducible_from_seed(name: str) -> None:
    first = _make(name, seed=3).partition(LABELS, 10)
    again = _make(name, seed=3).partition(torch.from_numpy(LABELS), 10)
    other = _make(name, seed=4).partition(LABELS, 10)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_registry_names_and_classes() -> None:
    assert {"iid", "dirichlet", "shards"} <= set(Partitioner.registry.names())
    assert Partitioner.registry.get("iid") is IIDPartitioner
    assert Partitioner.registry.get("dirichlet") is DirichletPartitioner
    assert Partitioner.registry.get("shards") is ShardPartitioner
    with pytest.raises(ConfigError, match="dirichlet"):
        Partitioner.create("nope")


def test_iid_sizes_balanced() -> None:
    sizes = [len(p) for p in IIDPartitioner(seed=0).partition(LABELS, 7)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_large_alpha_is_near_uniform() -> None:
    parts = DirichletPartitioner(alpha=1000.0, seed=0).partition(LABELS, 5)
    for part in parts:
        assert np.abs(_label_fractions(part) - 0.1).max() < 0.05


def test_dirichlet_small_alpha_is_skewed() -> None:
    parts = DirichletPartitioner(alpha=0.05, seed=0).partition(LABELS, 5)
    top = [_label_fractions(part).max() for part in parts]
    assert np.mean(top) > 0.5, top  # uniform would be 0.1
    distinct = [np.count_nonzero(_label_fractions(part) > 0.02) for part in parts]
    assert np.mean(distinct) < 6, distinct


def test_dirichlet_min_size_respected_or_clear_error() -> None:
    parts = DirichletPartitioner(alpha=0.5, seed=0, min_size=40).partition(LABELS, 10)
    assert min(len(p) for p in parts) >= 40
    with pytest.raises(ConfigError, match=r"partitioner\.min_size.*tries"):
        DirichletPartitioner(alpha=0.01, seed=0, min_size=90, max_tries=5).partition(LABELS, 10)
    with pytest.raises(ConfigError, match=r"partitioner\.min_size"):
        DirichletPartitioner(alpha=1.0, min_size=200).partition(LABELS, 10)


def test_shards_limit_labels_per_client() -> None:
    for spc in (1, 2, 3):
        # 10 clients * spc shards; class size 100 is a multiple of the shard size 100 / spc only for 1 and 2.
        num_clients = 10 if spc < 3 else 5
        labels = LABELS if spc < 3 else np.random.default_rng(0).permutation(np.repeat(np.arange(5), 60))
        parts = ShardPartitioner(shards_per_client=spc, seed=1).partition(labels, num_clients)
        assert all(len(np.unique(labels[p])) <= spc for p in parts)
        assert all(len(p) == len(labels) // num_clients for p in parts)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), True])
def test_bad_alpha(alpha) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        DirichletPartitioner(alpha=alpha)


@pytest.mark.parametrize("make", [lambda: IIDPartitioner(), lambda: DirichletPartitioner(alpha=1.0), lambda: ShardPartitioner()])
@pytest.mark.parametrize("num_clients", [0, -2, 1001, 2.5])
def test_bad_num_clients(make, num_clients) -> None:
    with pytest.raises(ConfigError, match="num_clients"):
        make().partition(LABELS, num_clients)


def test_bad_other_arguments() -> None:
    with pytest.raises(ConfigError, match="shards_per_client"):
        ShardPartitioner(shards_per_client=0)
    with pytest.raises(ConfigError, match="shards_per_client"):
        ShardPartitioner(shards_per_client=200).partition(LABELS, 10)
    with pytest.raises(ConfigError, match="seed"):
        IIDPartitioner(seed=-1)
    with pytest.raises(ConfigError, match="min_size"):
        DirichletPartitioner(alpha=1.0, min_size=-1)
    with pytest.raises(ConfigError, match="labels"):
        IIDPartitioner().partition(np.zeros((4, 2)), 2)
