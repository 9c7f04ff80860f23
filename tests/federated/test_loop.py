"""The federated round loop: FedAvg learns, FedProx pulls towards the global model, DP-FedAvg clips, adds
noise, accounts per user and stops at the budget, and a resumed federation ends where an uninterrupted one does."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
import torch
from torch import nn

from fedgen.data import IIDPartitioner
from fedgen.errors import ConfigError
from fedgen.federated import ClientLevelDP, ClientSampler, FedAvg, FedProx, FederatedTrainer, make_clients
from fedgen.mechanisms import GaussianMechanism, clip_rows
from fedgen.mechanisms.ledger import RDP_ORDERS
from tests.evaluation.test_downstream import separable


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def accuracy(model: nn.Module, data) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def federation(strategy, rounds=4, rate=None, count=5, num_clients=5, ckpt_dir=None):
    data = separable(1000, seed=0)
    clients = make_clients(data, IIDPartitioner(seed=0), num_clients)
    sampler = ClientSampler(rate=rate, seed=0) if rate else ClientSampler(count=count, seed=0)
    trainer = FederatedTrainer(rounds=rounds, sampler=sampler, strategy=strategy, checkpoint_dir=ckpt_dir)
    return trainer, clients, data


def user_level(**kwargs) -> GaussianMechanism:
    return GaussianMechanism(unit="user", delta=1e-3, seed=0, **kwargs)


def test_fedavg_learns_across_clients():
    trainer, clients, data = federation(FedAvg(lr=0.1), rounds=3)
    model = trainer.fit(mlp(), clients, data)
    assert accuracy(model, separable(500, seed=1)) > 0.9
    assert [h["clients"] for h in trainer.history] == [5, 5, 5]


def test_fedavg_is_the_size_weighted_mean_and_fedprox_pulls_towards_the_global_model():
    updates, sizes = torch.tensor([[1.0, 0.0], [0.0, 4.0]]), torch.tensor([3.0, 1.0])
    assert torch.allclose(FedAvg().aggregate(updates, sizes, num_clients=2), torch.tensor([0.75, 1.0]))
    moved = {}
    for name, strategy in [("fedavg", FedAvg(lr=0.1)), ("fedprox", FedProx(mu=100.0, lr=0.005))]:
        trainer, clients, data = federation(strategy, rounds=1)
        start = nn.utils.parameters_to_vector(mlp().parameters())
        moved[name] = (nn.utils.parameters_to_vector(trainer.fit(mlp(), clients, data).parameters()) - start).norm()
    assert moved["fedprox"] < 0.2 * moved["fedavg"]


def test_client_level_dp_clips_each_update_and_divides_by_the_expected_number_of_clients():
    mechanism = user_level(noise_multiplier=1e-9, clip_norm=0.5, sample_rate=0.5)
    strategy = ClientLevelDP(strategy=FedAvg(), mechanism=mechanism)
    updates = torch.randn(4, 50) * 3
    result = strategy.aggregate(updates, torch.ones(4), num_clients=10)
    assert torch.allclose(result, clip_rows(updates, 0.5).sum(0) / (0.5 * 10), atol=1e-6)
    assert mechanism.ledger.unit == "user" and len(mechanism.ledger) == 1


def test_client_level_dp_adds_noise_of_the_calibrated_scale():
    mechanism = user_level(noise_multiplier=2.0, clip_norm=1.0, sample_rate=0.2)
    strategy = ClientLevelDP(strategy=FedAvg(), mechanism=mechanism)
    result = strategy.aggregate(torch.zeros(0, 20000), torch.zeros(0), num_clients=50)  # an empty round still releases
    assert abs(result.std().item() * (0.2 * 50) / 2.0 - 1) < 0.03


def test_dp_fedavg_epsilon_matches_an_independent_accountant():
    mechanism = user_level(noise_multiplier=1.1, clip_norm=1.0, sample_rate=0.4, accountant="rdp")
    trainer, clients, data = federation(ClientLevelDP(strategy=FedAvg(lr=0.1), mechanism=mechanism), rounds=6,
                                        rate=0.4, num_clients=10)
    trainer.fit(mlp(), clients, data)
    accountant = dp_accounting.rdp.RdpAccountant(orders=RDP_ORDERS)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.4, dp_accounting.GaussianDpEvent(1.1)), 6)
    assert mechanism.epsilon() == pytest.approx(accountant.get_epsilon(1e-3), rel=0.01)


def test_the_federation_stops_cleanly_at_the_budget(tmp_path):
    mechanism = user_level(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.5, target_epsilon=3.0)
    trainer, clients, data = federation(ClientLevelDP(strategy=FedAvg(), mechanism=mechanism), rounds=200,
                                        rate=0.5, num_clients=6, ckpt_dir=tmp_path)
    trainer.fit(mlp(), clients, data)
    assert 0 < trainer.round < 200 and len(mechanism.ledger) == trainer.round
    assert mechanism.epsilon() <= 3.0
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["round"] == trainer.round


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    def dp_strategy():
        return ClientLevelDP(strategy=FedProx(mu=0.01, lr=0.1),
                             mechanism=user_level(noise_multiplier=0.5, clip_norm=1.0, sample_rate=0.6))

    whole, clients, data = federation(dp_strategy(), rounds=4, rate=0.6, num_clients=6)
    uninterrupted = nn.utils.parameters_to_vector(whole.fit(mlp(), clients, data).parameters())

    first, clients, data = federation(dp_strategy(), rounds=2, rate=0.6, num_clients=6, ckpt_dir=tmp_path)
    first.fit(mlp(), clients, data)
    second, clients, data = federation(dp_strategy(), rounds=4, rate=0.6, num_clients=6)
    resumed = second.fit(mlp(), clients, data, ckpt_path=str(tmp_path / "last.ckpt"))
    assert second.round == 4 and len(second.strategy.mechanism.ledger) == 4
    assert torch.equal(nn.utils.parameters_to_vector(resumed.parameters()), uninterrupted)
    assert second.strategy.mechanism.epsilon() == whole.strategy.mechanism.epsilon()


def test_client_level_dp_refuses_a_fixed_count_of_clients_before_any_round():
    """A user added to the data may displace a picked client: the clipped sum moves by 2 S, not S."""
    strategy = ClientLevelDP(strategy=FedAvg(), mechanism=user_level(noise_multiplier=1.0, sample_rate=1.0))
    with pytest.raises(ConfigError, match="federation.sampler.count") as err:
        FederatedTrainer(rounds=2, sampler=ClientSampler(count=5), strategy=strategy)
    assert "rate: 1.0" in err.value.fix and len(strategy.mechanism.ledger) == 0


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "secure"])
def test_client_level_dp_samples_clients_from_the_mechanisms_noise_source(secure, monkeypatch):
    """The sampler's seed is in config.yaml; the amplification needs a sampling nobody can replay."""
    seeds = []
    sample = ClientSampler.sample
    monkeypatch.setattr(ClientSampler, "sample",
                        lambda self, n, r, seed=None: seeds.append(seed) or sample(self, n, r, seed=seed))

    def run() -> ClientLevelDP:
        mechanism = GaussianMechanism(unit="user", delta=1e-3, noise_multiplier=1.0, sample_rate=0.5,
                                      seed=None if secure else 0, secure_noise=secure)
        strategy = ClientLevelDP(strategy=FedAvg(), mechanism=mechanism)
        trainer, clients, data = federation(strategy, rounds=2, rate=0.5, num_clients=6)
        trainer.fit(mlp(), clients, data)
        return strategy

    strategy = run()
    first = seeds[:]
    assert len(first) == 2 and first[0] == first[1] != 0  # one seed a run, not the sampler's (0)
    run()
    if secure:
        assert seeds[2] != first[0]  # os.urandom: a new secret each run
    else:
        assert seeds[2] == first[0] == strategy.mechanism.noise.sampling_seed()  # reproducible from the seed


def test_bad_federation_config_names_the_field():
    with pytest.raises(ConfigError, match="unit"):
        ClientLevelDP(strategy=FedAvg(), mechanism=GaussianMechanism(noise_multiplier=1.0))
    with pytest.raises(ConfigError, match="rounds"):
        FederatedTrainer(rounds=0, sampler=ClientSampler(count=1), strategy=FedAvg())
    with pytest.raises(ConfigError, match="mu"):
        FedProx(mu=-1.0)
    with pytest.raises(ConfigError, match="local_epochs"):
        FedAvg(local_epochs=0)


def test_two_fabric_processes_give_the_same_model_and_ledger_as_one():
    """Clients spread over two CPU processes (gloo all-reduce) give the same aggregate as one process."""

    def run(devices: int):
        mechanism = user_level(noise_multiplier=0.5, clip_norm=1.0, sample_rate=0.7)
        data = separable(600, seed=0)
        clients = make_clients(data, IIDPartitioner(seed=0), 6)
        trainer = FederatedTrainer(rounds=2, sampler=ClientSampler(rate=0.7, seed=0), devices=devices,
                                   strategy=ClientLevelDP(strategy=FedAvg(lr=0.1), mechanism=mechanism))
        model = trainer.fit(mlp(), clients, data)
        return nn.utils.parameters_to_vector(model.parameters()), mechanism, trainer

    one, mechanism_one, _ = run(1)
    two, mechanism_two, trainer_two = run(2)
    assert trainer_two.round == 2 and len(mechanism_two.ledger) == 2
    assert torch.allclose(one, two, atol=1e-5), (one - two).abs().max()
    assert not torch.equal(one, nn.utils.parameters_to_vector(mlp().parameters()))
    assert mechanism_two.epsilon() == mechanism_one.epsilon()


def test_one_fedavg_round_is_the_weighted_mean_of_independent_client_updates():
    """Every client starts from the same global model (local training must not leak into the global vector)."""
    trainer, clients, data = federation(FedAvg(lr=0.1), rounds=1, count=3, num_clients=3)
    start = nn.utils.parameters_to_vector(mlp().parameters()).detach()
    result = nn.utils.parameters_to_vector(trainer.fit(mlp(), clients, data).parameters()).detach()
    expected = torch.zeros_like(start)
    for client in clients:
        model = mlp()
        seed = np.random.SeedSequence([0, 0, client.id]).generate_state(1)[0]
        update = FedAvg(lr=0.1).client_update(model, start.clone(), client.dataset(data),
                                               torch.Generator().manual_seed(int(seed)))
        expected += update * len(client) / len(data)
    assert torch.allclose(result, start + expected, atol=1e-6)


def test_the_traffic_of_a_chosen_client_in_a_chosen_round_is_captured_exactly():
    data = separable(1000, seed=0)
    clients = make_clients(data, IIDPartitioner(seed=0), 3)
    trainer = FederatedTrainer(rounds=2, sampler=ClientSampler(count=3, seed=0), strategy=FedAvg(lr=0.1),
                               capture=[(1, 2)])
    trainer.fit(mlp(), clients, data)
    assert set(trainer.captured) == {(1, 2)}
    sent = trainer.captured[(1, 2)]
    # replaying client 2's local training from the global model it received gives exactly what it sent
    model = mlp()
    nn.utils.vector_to_parameters(sent["global_params"].clone(), model.parameters())
    seed = np.random.SeedSequence([0, 1, 2]).generate_state(1)[0]
    update = FedAvg(lr=0.1).client_update(model, sent["global_params"].clone(), clients[2].dataset(data),
                                          torch.Generator().manual_seed(int(seed)))
    torch.testing.assert_close(sent["update"], update)
    torch.testing.assert_close(sent["contribution"], update * len(clients[2]))
    with pytest.raises(ConfigError, match="devices"):
        FederatedTrainer(rounds=1, sampler=ClientSampler(count=1, seed=0), strategy=FedAvg(), devices=2,
                         capture=[(0, 0)])
