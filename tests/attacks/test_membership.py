"""Membership inference metrics and the LOSS attack: exact ROC numbers on hand-made scores, and the attack
separates the members of a deliberately overfit model from non-members (and is at chance on a model that
saw neither set)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedgen.attacks import evaluate_membership, loss_scores
from fedgen.errors import ConfigError


def test_roc_numbers_on_known_scores() -> None:
    members = torch.tensor([10.0, 9.0, 8.0, 1.0])
    # one non-member above 8 (9.5), five between 1 and 8, 994 below 1
    non_members = torch.cat([torch.tensor([9.5]), torch.full((5,), 7.5), torch.linspace(0, 0.5, 994)])
    result = evaluate_membership(members, non_members)
    assert result.tpr_at_fpr[0.001] == pytest.approx(0.75)  # one false positive: 10, 9 and 8 are caught
    assert result.tpr_at_fpr[0.01] == pytest.approx(1.0)  # six false positives (0.6%): all four are caught
    assert result.auc == pytest.approx((1000 + 999 + 999 + 994) / 4000)
    assert (result.members, result.non_members) == (4, 1000)


def test_only_the_order_of_the_scores_counts_however_large_they_are() -> None:
    """torchmetrics passes scores outside [0, 1] through a sigmoid, which in float64 merges all above about 37."""
    members, non_members = torch.linspace(60, 80, 50, dtype=torch.float64), torch.linspace(38, 58, 50,
                                                                                          dtype=torch.float64)
    for shift in (0.0, -70.0, 1e6):
        result = evaluate_membership(members + shift, non_members + shift)
        assert result.auc == 1.0 and result.tpr_at_fpr[0.001] == 1.0
    tied = evaluate_membership(torch.tensor([50.0, 50.0]), torch.tensor([50.0, 50.0]))
    assert tied.auc == 0.5 and tied.tpr_at_fpr[0.001] == 0.0  # ties stay ties: no guess below FPR 1


def test_loss_scores_do_not_tie_at_zero_for_confident_examples() -> None:
    """In float32 every cross-entropy below about 1e-7 rounds to 0: the most confident examples all tied."""
    net = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    data = TensorDataset(torch.tensor([[20.0, 0.0], [25.0, 0.0], [30.0, 0.0]]), torch.zeros(3, dtype=torch.long))
    scores = loss_scores(net, data)
    assert scores.dtype == torch.float64 and scores[0] < scores[1] < scores[2] < 0


def test_nan_scores_are_refused_not_ranked() -> None:
    """A diverged model (NaN weights) scores every example NaN; ranked, the NaNs read as a perfect attack (AUC 1.0,
    TPR 1.0 at 0.1% FPR, seen before the check). They are refused, naming how many of each set are NaN."""
    net = nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.fill_(float("nan"))
    members = TensorDataset(torch.randn(50, 2), torch.randint(0, 2, (50,)))
    others = TensorDataset(torch.randn(50, 2), torch.randint(0, 2, (50,)))
    with pytest.raises(ConfigError, match="50 member and 50 non-member scores are NaN") as err:
        evaluate_membership(loss_scores(net, members), loss_scores(net, others))
    assert "finite weights" in err.value.fix
    with pytest.raises(ConfigError, match="1 member and 0 non-member"):
        evaluate_membership(torch.tensor([1.0, float("nan")]), torch.tensor([0.0, 2.0]))
    evaluate_membership(torch.tensor([1.0, float("inf")]), torch.tensor([0.0, -float("inf")]))  # ordered: kept


def test_the_roc_curve_is_written_as_a_png(tmp_path) -> None:
    from PIL import Image

    result = evaluate_membership(torch.tensor([3.0, 2.0, 0.5]), torch.tensor([1.0, 0.0, -1.0, 0.2]))
    result.save_roc(tmp_path / "roc.png", title="test")
    image = Image.open(tmp_path / "roc.png")
    assert image.format == "PNG" and min(image.size) >= 400
    assert set(result.to_dict()) == {"auc", "tpr_at_fpr", "members", "non_members"}


def test_loss_attack_separates_the_members_of_an_overfit_model() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 20, generator=gen), torch.randint(0, 2, (200,), generator=gen)  # random labels
    members, non_members = TensorDataset(x[:100], y[:100]), TensorDataset(x[100:], y[100:])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 2))
    fresh = [p.detach().clone() for p in model.parameters()]
    before = evaluate_membership(loss_scores(model, members), loss_scores(model, non_members))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):  # memorize 100 random labels
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:100]), y[:100]).backward()
        optimizer.step()
    after = evaluate_membership(loss_scores(model, members), loss_scores(model, non_members))
    assert after.auc > 0.8  # (at 1% FPR the LOSS attack is weak: non-members with lucky labels score high)
    assert 0.35 < before.auc < 0.65  # before training, neither set is special
    assert any(not torch.equal(p, f) for p, f in zip(model.parameters(), fresh, strict=True))
    with pytest.raises(ConfigError):
        evaluate_membership(torch.tensor([1.0]), torch.tensor([]))


def test_lira_beats_the_loss_attack_at_one_percent_fpr_on_an_overfit_model() -> None:
    from torch.utils.data import Subset

    from fedgen.attacks import LiRA

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 20, generator=gen), torch.randint(0, 2, (400,), generator=gen)  # random labels
    population = TensorDataset(x, y)
    trained = [0]

    def train(dataset) -> nn.Module:  # the user's factory: a fresh MLP that memorizes its data
        trained[0] += 1
        torch.manual_seed(trained[0])
        xs, ys = (torch.stack(t) for t in zip(*(dataset[i] for i in range(len(dataset))), strict=True))
        model = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 2))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(200):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xs), ys).backward()
            optimizer.step()
        return model

    members = torch.randperm(400, generator=gen)[:200]
    is_member = torch.zeros(400, dtype=torch.bool)
    is_member[members] = True
    target = train(Subset(population, members.tolist()))
    lira = LiRA(train=train, num_shadows=16, seed=1).fit(population)
    assert trained[0] == 17 and lira._membership.sum(0).eq(8).all()  # each example IN half of the shadows
    scores = lira.scores(target, population)
    lira_result = evaluate_membership(scores[is_member], scores[~is_member])
    loss = loss_scores(target, population)
    loss_result = evaluate_membership(loss[is_member], loss[~is_member])
    assert lira_result.tpr_at_fpr[0.01] > loss_result.tpr_at_fpr[0.01] + 0.05
    assert lira_result.auc > 0.85
    for too_few in (3, 2):  # two shadows leave one IN and one OUT value per example: no variance
        with pytest.raises(ConfigError, match="num_shadows"):
            LiRA(train=train, num_shadows=too_few)


def test_gan_leaks_finds_members_of_a_memorizing_generator_and_not_of_an_independent_one() -> None:
    from fedgen.attacks import gan_leaks_scores, nearest_distance

    gen = torch.Generator().manual_seed(3)
    members, non_members = torch.rand(100, 1, 8, 8, generator=gen), torch.rand(100, 1, 8, 8, generator=gen)
    queries = torch.cat([members, non_members])
    torch.testing.assert_close(nearest_distance(members[:3], members), torch.zeros(3, dtype=torch.float64))

    def auc(synthetic: torch.Tensor, reference: torch.Tensor | None = None) -> float:
        scores = gan_leaks_scores(queries, synthetic, reference)
        return evaluate_membership(scores[:100], scores[100:]).auc

    memorizing = members + 0.01 * torch.randn(members.shape, generator=gen)  # releases near-copies
    independent = torch.rand(500, 1, 8, 8, generator=gen)  # the same distribution, never saw the members
    assert auc(memorizing) > 0.99
    assert 0.35 < auc(independent) < 0.65
    assert auc(memorizing, reference=torch.rand(500, 1, 8, 8, generator=gen)) > 0.99  # calibration keeps the signal


def test_the_loss_attack_finds_the_members_a_diffusion_model_memorized() -> None:
    from fedgen.attacks import diffusion_loss_scores
    from fedgen.generators import DPDiffusion
    from fedgen.mechanisms import DPSGD

    gen = torch.Generator().manual_seed(4)
    images, labels = torch.rand(40, 1, 8, 8, generator=gen), torch.zeros(40, dtype=torch.long)
    torch.manual_seed(0)
    model = DPDiffusion(mechanism=DPSGD(noise_multiplier=1.0), num_classes=1, image_shape=(1, 8, 8),
                        block_channels=(8, 16), attention=(False, False), norm_groups=4, noise_draws=2,
                        batch_size=10, num_train_timesteps=100, lr=3e-3, ema_decay=0.0)
    before = diffusion_loss_scores(model, images, labels, repeats=4)
    model.pretrain_on_public(TensorDataset(images[:10], labels[:10]), steps=300)  # memorize 10 images, no privacy
    after = diffusion_loss_scores(model, images, labels, repeats=4)
    torch.testing.assert_close(after, diffusion_loss_scores(model, images, labels, repeats=4))  # fixed draws
    assert model.training  # the mode it had; scoring ran in eval mode, with no label dropout:
    model.hparams.label_dropout = 0.9
    torch.testing.assert_close(after, diffusion_loss_scores(model, images, labels, repeats=4))
    assert evaluate_membership(after[:10], after[10:]).auc > 0.9
    assert 0.25 < evaluate_membership(before[:10], before[10:]).auc < 0.75
