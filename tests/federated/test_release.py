"""Federated DP-Merf release: the securely aggregated sum equals the central sum; one release, noise calibrated
to the quantization-aware sensitivity."""

from __future__ import annotations

import math

import pytest

from fedgen.data import DirichletPartitioner
from fedgen.errors import ConfigError
from fedgen.federated import FederatedRelease, make_clients
from fedgen.mechanisms import GaussianMechanism, clip_rows
from tests.generators.test_dp_merf import blobs, tiny_merf


def capture_release(monkeypatch, mechanism: GaussianMechanism) -> dict:
    seen: dict = {}
    original = mechanism.release

    def spy(clipped_sum, *, sensitivity=None):
        seen["sum"], seen["sensitivity"] = clipped_sum.clone(), sensitivity
        return original(clipped_sum, sensitivity=sensitivity)

    monkeypatch.setattr(mechanism, "release", spy)
    return seen


@pytest.mark.parametrize(("secure", "dropout"), [(True, 0.0), (True, 0.25), (False, 0.0)])
def test_federated_sum_equals_the_central_sum(monkeypatch, secure, dropout):
    data = blobs(300)
    merf = tiny_merf(mechanism=GaussianMechanism(target_epsilon=1.0, delta=1e-4, seed=0))
    seen = capture_release(monkeypatch, merf.mechanism)
    federation = FederatedRelease(num_clients=8, partitioner=DirichletPartitioner(alpha=0.5, seed=2),
                                  secure_aggregation=secure, scale=2.0**20, dropout=dropout)
    report = federation.run(merf, data)
    central = merf.embedding_sum(data)
    # 8 clients, each rounded to 1/scale: at most 8 * 0.5 / 2^20 per coordinate (plus float32 rounding).
    assert (seen["sum"] - central).abs().max() < 1e-4
    expected = 1.0 + math.sqrt(central.numel()) / 2.0**20 if secure else 1.0
    assert seen["sensitivity"] == pytest.approx(expected)
    assert [e.count for e in merf.mechanism.ledger.events] == [1] and merf.mechanism.epsilon() <= 1.0
    assert bool(merf.released) and int(merf.num_private) == 300
    assert sum(report["client_sizes"]) == 300 and report["noise"] == "central"
    if secure:
        assert len(report["secure_aggregation"]["dropped_after_masking"]) == int(dropout * 8)


def test_noise_is_calibrated_to_the_quantization_aware_sensitivity():
    merf = tiny_merf(mechanism=GaussianMechanism(noise_multiplier=2.0, delta=1e-4, seed=0))
    data = blobs(300)
    central = merf.embedding_sum(data)
    FederatedRelease(num_clients=5, scale=2.0**4).run(merf, data)  # a coarse scale makes the effect visible
    sensitivity = 1.0 + math.sqrt(central.numel()) / 2.0**4
    residual = merf.noisy_sum - central
    assert abs(residual.std().item() / (2.0 * sensitivity) - 1) < 0.1  # 2010 coordinates


@pytest.mark.parametrize(("kwargs", "field"), [({"num_clients": 2}, "num_clients"), ({"num_clients": 0}, "num_clients"),
                                               ({"dropout": 0.4}, "dropout")])
def test_bad_federation_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        FederatedRelease(**kwargs)


def test_user_level_release_clips_each_client_sum_and_records_a_user_level_ledger(monkeypatch):
    data = blobs(300)
    merf = tiny_merf(mechanism=GaussianMechanism(target_epsilon=1.0, delta=1e-3, seed=0, unit="user"))
    seen = capture_release(monkeypatch, merf.mechanism)
    partitioner = DirichletPartitioner(alpha=0.5, seed=2)
    federation = FederatedRelease(num_clients=6, partitioner=partitioner, client_clip_norm=2.0, scale=2.0**20)
    report = federation.run(merf, data)
    expected = sum(clip_rows(merf.embedding_sum(c.dataset(data)).unsqueeze(0), 2.0)[0]
                   for c in make_clients(data, partitioner, 6))
    assert (seen["sum"] - expected).abs().max() < 1e-4
    assert seen["sensitivity"] == pytest.approx(2.0 + math.sqrt(expected.numel()) / 2.0**20)
    assert report["unit"] == "user" and merf.mechanism.ledger.unit == "user"
    assert "user-level" in merf.mechanism.ledger.summary(1e-3)


@pytest.mark.parametrize(("unit", "client_clip_norm"), [("example", 5.0), ("user", None)])
def test_the_mechanism_unit_must_match_the_federation(unit, client_clip_norm):
    merf = tiny_merf(mechanism=GaussianMechanism(noise_multiplier=1.0, delta=1e-4, unit=unit))
    with pytest.raises(ConfigError, match="unit"):
        FederatedRelease(num_clients=4, client_clip_norm=client_clip_norm).run(merf, blobs(100))
    assert len(merf.mechanism.ledger) == 0
