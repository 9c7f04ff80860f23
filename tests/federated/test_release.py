"""Federated DP-Merf release: the securely aggregated sum equals the central sum; one release, noise calibrated
to the quantization-aware sensitivity; distributed Skellam noise: one Skellam event within the budget, the
expected spread, seeded reproducibility, refusals before any work."""

from __future__ import annotations

import math

import pytest
import torch

import fedgen.federated.release as release
from fedgen.data import DirichletPartitioner
from fedgen.errors import ConfigError, PrivacyBudgetExceeded
from fedgen.federated import FederatedRelease, make_clients
from fedgen.federated.clients import Client
from fedgen.mechanisms import GaussianMechanism, SkellamEvent, clip_rows
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
    assert seen["sum"].dtype == torch.float64  # the noise goes on the float64 total, not a float32 rounding of it
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


def test_run_releases_from_the_split_check_returned_and_refuses_one_of_other_data(monkeypatch):
    data = blobs(300)
    federation = FederatedRelease(num_clients=6, partitioner=DirichletPartitioner(alpha=0.5, seed=2))
    merf = tiny_merf(mechanism=GaussianMechanism(target_epsilon=1.0, delta=1e-4, seed=0))
    clients = federation.check(merf, data)
    monkeypatch.setattr(release, "make_clients", lambda *_: pytest.fail("split again"))
    report = federation.run(merf, data, clients=clients)
    assert report["client_sizes"] == [len(c) for c in clients] and bool(merf.released)
    other = tiny_merf(mechanism=GaussianMechanism(target_epsilon=1.0, delta=1e-4, seed=0))
    with pytest.raises(ValueError, match="not a split of these 299 examples"):
        federation.run(other, blobs(299), clients=clients)
    assert len(other.mechanism.ledger) == 0
    # as many examples, but example 0 held twice and the last by no one: its sum could move by 2 C
    overlapping = [Client(c.id, c.indices.copy()) for c in clients]
    holder = next(c for c in overlapping if len(c) and len(data) - 1 in c.indices)
    holder.indices[holder.indices == len(data) - 1] = 0
    with pytest.raises(ValueError, match="not a split of these 300 examples"):
        federation.run(other, data, clients=overlapping)
    assert len(other.mechanism.ledger) == 0


@pytest.mark.parametrize(("unit", "client_clip_norm"), [("example", 5.0), ("user", None)])
def test_the_mechanism_unit_must_match_the_federation(unit, client_clip_norm):
    merf = tiny_merf(mechanism=GaussianMechanism(noise_multiplier=1.0, delta=1e-4, unit=unit))
    with pytest.raises(ConfigError, match="unit"):
        FederatedRelease(num_clients=4, client_clip_norm=client_clip_norm).run(merf, blobs(100))
    assert len(merf.mechanism.ledger) == 0


# --- distributed noise (Skellam) ------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_distributed_release_records_one_skellam_event_within_the_budget(dropout):
    data = blobs(300)
    merf = tiny_merf(mechanism=GaussianMechanism(target_epsilon=1.0, delta=1e-4, seed=0))
    federation = FederatedRelease(num_clients=8, partitioner=DirichletPartitioner(alpha=0.5, seed=2),
                                  noise="distributed", scale=2.0**20, dropout=dropout)
    report = federation.run(merf, data)
    m = merf.embedding_sum(data).numel()
    l2 = 2.0**20 + math.sqrt(m)
    l1 = min(math.sqrt(m) * l2, l2**2)
    (event,) = merf.mechanism.ledger.events
    assert isinstance(event, SkellamEvent) and event.count == 1
    assert (event.l2_sensitivity, event.l1_sensitivity) == (pytest.approx(l2), pytest.approx(l1))
    eps = merf.mechanism.epsilon()
    assert 0.99 < eps <= 1.0  # calibrated: the smallest mu within the budget
    skellam = report["skellam"]
    assert report["noise"] == "distributed" and skellam["mu"] == event.mu
    assert skellam["mu_per_client"] == pytest.approx(event.mu / 8) and skellam["guaranteed_clients"] == 8
    assert skellam["l2_sensitivity"] == event.l2_sensitivity and skellam["l1_sensitivity"] == event.l1_sensitivity
    assert skellam["noise_multiplier"] == pytest.approx(math.sqrt(2 * event.mu) / l2)
    assert report["sensitivity"] == pytest.approx(1.0 + math.sqrt(m) / 2.0**20)
    assert len(report["secure_aggregation"]["dropped_after_masking"]) == int(dropout * 8)
    assert bool(merf.released) and int(merf.num_private) == 300
    assert "Skellam" in merf.mechanism.ledger.summary(1e-4)


def test_distributed_noise_has_the_skellam_spread():
    """Noisy sum minus the exact sum: variance 2 mu / scale^2 per coordinate, with 2 mu = (sigma Delta_2)^2 for a
    given noise multiplier; a coarse scale makes Delta_2 = C scale + sqrt(m) visibly larger than C scale."""
    merf = tiny_merf(mechanism=GaussianMechanism(noise_multiplier=2.0, delta=1e-4, seed=0))
    data = blobs(300)
    central = merf.embedding_sum(data).double()
    report = FederatedRelease(num_clients=5, scale=2.0**4, noise="distributed").run(merf, data)
    m = central.numel()
    l2 = 2.0**4 + math.sqrt(m)
    assert report["skellam"]["mu"] == pytest.approx((2.0 * l2) ** 2 / 2)
    expected_std = 2.0 * l2 / 2.0**4  # sqrt(2 mu) / scale = 2 (C + sqrt(m) / scale)
    residual = merf.noisy_sum.double() - central  # plus rounding, at most 5 * 0.5 / 16 per coordinate
    assert abs(residual.std().item() / expected_std - 1) < 0.1  # 2010 coordinates
    assert abs(residual.mean().item()) < 5 * expected_std / math.sqrt(m)
    # Power: the Gaussian release's spread ignoring rounding (sigma C only) is far off.
    assert abs(residual.std().item() / 2.0 - 1) > 0.5


def test_distributed_release_is_reproducible_with_a_seed_and_says_so_against_the_server(caplog):
    """Seeded shares follow from the seed, which is what makes the release reproducible, and also what lets whoever
    holds the seed subtract them: the release warns that it does not protect the sum from the server then."""
    data = blobs(200)
    sums = []
    for seed in (7, 7, 8):
        merf = tiny_merf(mechanism=GaussianMechanism(noise_multiplier=1.0, delta=1e-4, seed=seed))
        with caplog.at_level("WARNING", logger="fedgen"):
            FederatedRelease(num_clients=4, noise="distributed").run(merf, data)
        sums.append(merf.noisy_sum.clone())
    assert torch.equal(sums[0], sums[1]) and not torch.equal(sums[0], sums[2])
    assert sum("not against the server" in r.getMessage() for r in caplog.records) == 3  # once a release
    caplog.clear()
    merf = tiny_merf(mechanism=GaussianMechanism(noise_multiplier=1.0, delta=1e-4, secure_noise=True))
    with caplog.at_level("WARNING", logger="fedgen"):
        FederatedRelease(num_clients=4, noise="distributed").run(merf, data)
    assert not any("seeded mode" in r.getMessage() for r in caplog.records)


def test_user_level_distributed_release():
    data = blobs(300)
    merf = tiny_merf(mechanism=GaussianMechanism(target_epsilon=2.0, delta=1e-3, seed=0, unit="user"))
    report = FederatedRelease(num_clients=6, client_clip_norm=2.0, noise="distributed").run(merf, data)
    m = merf.embedding_sum(data).numel()
    assert report["skellam"]["l2_sensitivity"] == pytest.approx(2.0 * 2.0**20 + math.sqrt(m))
    assert report["unit"] == "user" and merf.mechanism.epsilon() <= 2.0


def test_distributed_noise_is_refused_before_anything_is_computed(monkeypatch):
    with pytest.raises(ConfigError) as caught:
        FederatedRelease(num_clients=4, secure_aggregation=False, noise="distributed")
    assert caught.value.field == "federation.noise" and "secure_aggregation: true" in caught.value.fix
    with pytest.raises(ConfigError, match="federation.noise"):
        FederatedRelease(noise="local")
    merf = tiny_merf(mechanism=GaussianMechanism(target_epsilon=1.0, delta=1e-4, accountant="prv"))
    monkeypatch.setattr(merf, "embedding_sum", lambda _: pytest.fail("a client computed before the check"))
    with pytest.raises(ConfigError, match="accountant"):
        FederatedRelease(num_clients=4, noise="distributed").run(merf, blobs(100))
    assert len(merf.mechanism.ledger) == 0


@pytest.mark.parametrize(("kwargs", "field"), [({"bits": 100}, "federation.bits"), ({"scale": 0.0}, "federation.scale"),
                                               ({"graph": "ring"}, "federation.graph")])
def test_secure_aggregation_settings_are_refused_when_the_federation_is_built(kwargs, field):
    """Before: only when the clients' sums were aggregated, after the run folder was written, as secure_aggregation.*."""
    with pytest.raises(ConfigError) as err:
        FederatedRelease(num_clients=4, **kwargs)
    assert err.value.field == field


@pytest.mark.parametrize("noise", ["central", "distributed"])
def test_a_subsampled_mechanism_is_refused_whatever_the_noise(monkeypatch, noise):
    """The release sums every client's whole data; a ledger event at a rate below 1 would under-report epsilon.
    DP-Merf refuses such a mechanism itself; the federation checks any generator that releases one sum."""
    merf = tiny_merf(mechanism=GaussianMechanism(noise_multiplier=1.0, delta=1e-4))
    merf.mechanism.sample_rate = 0.01  # a generator of one sum that does not check its mechanism's rate
    monkeypatch.setattr(merf, "embedding_sum", lambda _: pytest.fail("a client computed before the check"))
    with pytest.raises(ConfigError, match="model.mechanism.sample_rate"):
        FederatedRelease(num_clients=4, noise=noise).run(merf, blobs(100))
    assert len(merf.mechanism.ledger) == 0


def test_distributed_release_past_the_budget_is_refused_before_noise_is_drawn(monkeypatch):
    """A given noise multiplier with a budget it cannot meet: the charge fails, nothing is aggregated."""
    merf = tiny_merf(mechanism=GaussianMechanism(noise_multiplier=0.5, target_epsilon=1.0, delta=1e-4, seed=0))
    monkeypatch.setattr(merf.mechanism.noise, "skellam", lambda *a: pytest.fail("noise drawn after a refusal"))
    with pytest.raises(PrivacyBudgetExceeded):
        FederatedRelease(num_clients=4, noise="distributed").run(merf, blobs(100))
    assert len(merf.mechanism.ledger) == 0 and not bool(merf.released)


@pytest.mark.parametrize("noise", ["central", "distributed"])
def test_a_modular_range_too_small_for_the_sum_is_refused_by_check_before_any_client_computes(monkeypatch, noise):
    """The range needs the largest client's size (and, for distributed noise, the calibrated Skellam spread):
    known from the split alone, so ``check`` refuses it, before the run folder is written or a client computes."""
    merf = tiny_merf(mechanism=GaussianMechanism(target_epsilon=1.0, delta=1e-4, seed=0))
    monkeypatch.setattr(merf, "embedding_sum", lambda _: pytest.fail("a client computed before the check"))
    federation = FederatedRelease(num_clients=4, noise=noise, bits=24, scale=2.0**20)  # 4 x 25 x 2^20 > 2^23
    with pytest.raises(ConfigError) as err:
        federation.check(merf, blobs(100))
    assert err.value.field == "federation.bits" and "use bits >=" in err.value.fix
    assert len(merf.mechanism.ledger) == 0
    FederatedRelease(num_clients=4, noise=noise, bits=64, scale=2.0**20).check(merf, blobs(100))


@pytest.mark.parametrize("noise", ["central", "distributed"])
def test_a_dropout_the_graph_cannot_always_recover_from_is_refused_when_the_federation_is_built(noise):
    """On the k-regular graph a dropped client's secrets are held by its few neighbours only: 30% of 30 clients
    dropping failed in every draw of the graph, after the distributed release had charged the ledger. The
    federation now refuses more dropouts than every pattern can recover from, and that many always work."""
    with pytest.raises(ConfigError) as err:
        FederatedRelease(num_clients=30, graph="k_regular", dropout=0.3, noise=noise)
    assert err.value.field == "federation.dropout" and "graph: full" in err.value.fix
    tolerated = float(err.value.fix.split("<= ")[1].split(",")[0])
    assert 0 < tolerated < 0.3
    FederatedRelease(num_clients=30, graph="full", dropout=0.3, noise=noise)  # the full graph recovers from 9
    for seed in range(3):
        mechanism = GaussianMechanism(target_epsilon=1.0, delta=1e-4, seed=seed, accountant="rdp")
        merf = tiny_merf(mechanism=mechanism)
        report = FederatedRelease(num_clients=30, graph="k_regular", dropout=tolerated, noise=noise,
                                  partitioner=DirichletPartitioner(alpha=1.0, seed=seed)).run(merf, blobs(300))
        assert len(report["secure_aggregation"]["dropped_after_masking"]) == int(tolerated * 30) > 0
        assert len(mechanism.ledger) == 1
