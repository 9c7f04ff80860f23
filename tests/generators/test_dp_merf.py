"""DP-Merf: unit-norm features, exact clipping, one release, resume without a second release, utility."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import TensorDataset

from fedgen.data import MNISTDataModule
from fedgen.errors import ConfigError
from fedgen.evaluation import TrainOnSynthetic
from fedgen.generators import DPMerf
from fedgen.mechanisms import DPSGD, GaussianMechanism


def tiny_merf(**kwargs) -> DPMerf:
    mechanism = kwargs.pop("mechanism", None) or GaussianMechanism(noise_multiplier=1.0, delta=1e-4, seed=0)
    defaults = dict(num_features=200, length_scale=7.0, batch_size=20, steps_per_epoch=3, embedding_batch_size=32)
    return DPMerf(mechanism=mechanism, **(defaults | kwargs))


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     **({"max_epochs": 1, "enable_checkpointing": False} | kwargs))


def blobs(n: int = 120, num_classes: int = 10) -> TensorDataset:
    labels = torch.arange(n) % num_classes
    images = torch.rand(n, 1, 28, 28) * 0.2
    images[:, 0, labels, :] += 0.8  # class c lights up row c
    return TensorDataset(images.clamp(0, 1), labels)


def test_features_have_unit_norm_and_approximate_the_gaussian_kernel():
    merf = tiny_merf(num_features=40000, length_scale=5.0)
    x = torch.rand(6, 1, 28, 28) * 0.3
    phi = merf.features(x)
    assert torch.allclose(phi.norm(dim=1), torch.ones(6), atol=1e-5)
    kernel = torch.exp(-torch.cdist(x.flatten(1), x.flatten(1)) ** 2 / (2 * 5.0**2))
    assert (phi @ phi.T - kernel).abs().max() < 0.03


@pytest.mark.parametrize("clip_norm", [1.0, 0.3])
def test_clipped_sum_equals_explicit_clipping_of_each_contribution(clip_norm):
    merf = tiny_merf()
    merf.mechanism.clip_norm = clip_norm  # DP-Merf refuses clip_norm != 1 in configs; the formula must still hold
    x, y = torch.rand(9, 1, 28, 28), torch.randint(0, 10, (9,))
    explicit = merf.mechanism.clip(merf.contributions(x, y)).sum(0)
    assert torch.allclose(merf.clipped_contribution_sum(x, y), explicit, atol=1e-5)
    assert torch.allclose(merf.contributions(x, y).norm(dim=1), torch.ones(9), atol=1e-5)


def test_the_clipped_sum_is_computed_in_float32_under_autocast():
    """Under autocast (Lightning's precision="bf16-mixed") the features and the sum would run in bfloat16, each
    contribution rounded to 8 bits after its clip factor was set: the sum is computed in float32 regardless."""
    merf = tiny_merf()
    x, y = torch.rand(9, 1, 28, 28), torch.randint(0, 10, (9,))
    exact = merf.clipped_contribution_sum(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is on
        under_autocast = merf.clipped_contribution_sum(x.bfloat16(), y)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, merf.clipped_contribution_sum(x.bfloat16().float(), y), rtol=0, atol=0)
    assert (under_autocast - exact).abs().max() < 1e-2  # only the bfloat16 images differ


def test_contributions_take_label_probabilities_as_well_as_class_indices():
    merf = tiny_merf()
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    onehot = torch.nn.functional.one_hot(y, 10).float()
    assert torch.equal(merf.contributions(x, onehot), merf.contributions(x, y))
    soft = torch.full((5, 10), 0.1)  # a uniform label spreads the example over all classes
    assert torch.allclose(merf.contributions(x, soft).norm(dim=1), torch.full((5,), math.sqrt(0.1)), atol=1e-5)


def test_embedding_is_released_once_and_spends_the_calibrated_budget():
    mechanism = GaussianMechanism(target_epsilon=2.0, delta=1e-4, seed=0)
    merf = tiny_merf(mechanism=mechanism)
    loader = merf.attach_private_data(blobs())
    trainer(max_epochs=2).fit(merf, loader)
    events = mechanism.ledger.events
    assert len(events) == 1 and events[0].count == 1 and events[0].sample_rate == 1.0
    assert 1.9 < mechanism.epsilon() <= 2.0
    assert bool(merf.released) and int(merf.num_private) == 120


def test_released_sum_carries_noise_of_the_calibrated_scale():
    data = blobs()
    merf = tiny_merf(mechanism=GaussianMechanism(noise_multiplier=3.0, seed=1))
    exact = merf.clipped_contribution_sum(*data.tensors)
    merf.release_embedding(data)
    residual = merf.noisy_sum - exact
    assert abs(residual.std().item() / 3.0 - 1) < 0.05  # 2010 draws: std error of the std ~1.6%


def test_resume_restores_the_release_and_the_ledger_without_releasing_again(tmp_path):
    mechanism = GaussianMechanism(target_epsilon=1.0, delta=1e-4, seed=0)
    merf = tiny_merf(mechanism=mechanism)
    run = trainer(max_epochs=1, default_root_dir=tmp_path)
    run.fit(merf, merf.attach_private_data(blobs()))
    ckpt = tmp_path / "gen.ckpt"
    run.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["fedgen_privacy"]["ledger"]["events"][0]["count"] == 1

    resumed = tiny_merf(mechanism=GaussianMechanism(target_epsilon=1.0, delta=1e-4, seed=5))
    trainer(max_epochs=2, default_root_dir=tmp_path).fit(resumed, resumed.attach_private_data(blobs()),
                                                          ckpt_path=ckpt)
    assert torch.equal(resumed.noisy_sum, merf.noisy_sum)
    assert len(resumed.mechanism.ledger) == 1  # one release in total, not two
    assert resumed.mechanism.epsilon() == pytest.approx(mechanism.epsilon())


def test_synthesize_gives_a_labelled_dataset_in_the_released_proportions():
    merf = tiny_merf(mechanism=GaussianMechanism(noise_multiplier=0.1, delta=1e-4, seed=0))
    trainer().fit(merf, merf.attach_private_data(blobs(2000)))
    synthetic = merf.synthesize(100)
    images, labels = synthetic.tensors
    assert images.shape == (100, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    # 200 per class, count noise std 0.1 / count_weight = 1: proportions within ~1.5% of 1/10.
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 100 and counts.min() >= 9 and counts.max() <= 11, counts
    assert merf.sample(5, torch.tensor([3, 3, 3, 3, 3])).shape == (5, 1, 28, 28)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"num_features": 101}, "num_features"), ({"length_scale": 0.0}, "length_scale"),
     ({"count_weight": 1.0}, "count_weight"), ({"image_shape": (1, 30, 30)}, "image_shape"),
     ({"mechanism": GaussianMechanism(noise_multiplier=1.0, clip_norm=0.5)}, "clip_norm"),
     # the release sums the whole dataset: a subsampled event on the ledger would under-report epsilon
     ({"mechanism": GaussianMechanism(noise_multiplier=1.0, sample_rate=0.01)}, "mechanism.sample_rate")],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        tiny_merf(**kwargs)


def test_a_dp_sgd_mechanism_is_refused():
    with pytest.raises(ConfigError, match="model.mechanism"):
        DPMerf(mechanism=DPSGD(noise_multiplier=1.0))


def test_mismatched_data_is_refused_before_any_release():
    mechanism = GaussianMechanism(noise_multiplier=1.0)
    merf = tiny_merf(mechanism=mechanism, num_classes=5)
    with pytest.raises(ConfigError, match="num_classes"):
        merf.attach_private_data(blobs())
    with pytest.raises(ConfigError, match="delta"):
        tiny_merf(mechanism=GaussianMechanism(noise_multiplier=1.0, delta=0.05)).attach_private_data(blobs())
    assert len(mechanism.ledger) == 0


def test_the_central_release_is_refused_at_user_level_before_anything_is_released():
    """Each example is clipped on its own: a user with many examples moves the sum by more than one clip norm."""
    merf = tiny_merf(mechanism=GaussianMechanism(noise_multiplier=1.0, delta=1e-4, unit="user"))
    with pytest.raises(ConfigError, match="model.mechanism.unit") as err:
        trainer().fit(merf, merf.attach_private_data(blobs()))
    assert "client_clip_norm" in err.value.fix
    assert len(merf.mechanism.ledger) == 0 and not bool(merf.released)


def _utility(real_data_root, noise_multiplier: float) -> float:
    data = MNISTDataModule(root=str(real_data_root), train_subset=3000, test_subset=1000)
    data.setup()
    merf = DPMerf(mechanism=GaussianMechanism(noise_multiplier=noise_multiplier, delta=1e-5, seed=0),
                  num_features=1000, length_scale=7.0, batch_size=100, steps_per_epoch=100, lr=0.01)
    trainer(max_epochs=1).fit(merf, merf.attach_private_data(data.train_set))
    result = TrainOnSynthetic(classifier="mlp", epochs=3, progress_bar=False, accelerator="cpu").run(
        merf.synthesize(2000), data.test_set, num_classes=10, image_shape=(1, 28, 28))
    return result["test_accuracy"]


def test_huge_noise_drives_downstream_accuracy_to_chance_and_modest_noise_does_not(real_data_root):
    """Noise is really added: at sigma=1e5 the released embedding is pure noise and the classifier trained on
    the synthetic data is at chance on real MNIST; at sigma=1 the same pipeline learns."""
    noisy = _utility(real_data_root, 1e5)
    useful = _utility(real_data_root, 1.0)
    assert noisy < 0.2, noisy  # chance is ~0.1 on 10 classes
    assert useful > 0.5, useful
    assert math.isfinite(noisy)
