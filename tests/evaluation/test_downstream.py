"""Train on synthetic, test on real: the architecture, model selection off the test set, DP-SGD noise."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedgen.errors import ConfigError
from fedgen.evaluation import MLP, ConvNet, TrainOnSynthetic, classifiers


def separable(n: int, seed: int, shuffle_labels: bool = False) -> TensorDataset:
    """Images whose class c has a bright row 2c + 4 (easy to learn), plus noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    images = torch.rand(n, 1, 28, 28, generator=gen) * 0.3
    images[torch.arange(n), 0, 2 * labels + 4, :] = 1.0
    if shuffle_labels:
        labels = labels[torch.randperm(n, generator=gen)]
    return TensorDataset(images, labels)


class CountingDataset(Dataset):
    """Counts how often each example is read."""

    def __init__(self, inner: TensorDataset) -> None:
        self.inner = inner
        self.reads = torch.zeros(len(inner), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        self.reads[i] += 1
        return self.inner[i]


def test_convnet_is_three_blocks_of_conv128_groupnorm_relu_avgpool():
    net = ConvNet(image_shape=(1, 28, 28), num_classes=10)
    blocks = list(net.features)
    assert [type(m) for m in blocks] == [nn.Conv2d, nn.GroupNorm, nn.ReLU, nn.AvgPool2d] * 3
    convs = [m for m in blocks if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128] * 3 and all(c.kernel_size == (3, 3) for c in convs)
    assert all(g.num_groups == g.num_channels == 128 for g in blocks if isinstance(g, nn.GroupNorm))
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert net.classifier.in_features == 128 * 3 * 3
    assert ConvNet(image_shape=(3, 32, 32), num_classes=10)(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert MLP(image_shape=(1, 28, 28), num_classes=10)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert classifiers.names() == ["convnet", "mlp"]


def test_learns_separable_data_and_reads_the_real_test_set_exactly_once():
    real_test = CountingDataset(separable(300, seed=1))
    result = TrainOnSynthetic(classifier="mlp", epochs=4, progress_bar=False, accelerator="cpu").run(
        separable(1000, seed=0), real_test, num_classes=10, image_shape=(1, 28, 28))
    assert result["test_accuracy"] > 0.9
    assert torch.equal(real_test.reads, torch.ones(300, dtype=torch.long))  # tested once, never used to select
    assert 0 <= result["selected_epoch"] < 4 and result["synthetic_val_accuracy"] > 0.9


def test_repeats_train_that_many_classifiers_and_report_their_means():
    """Each repeat tests once on the real set; the first classifier is the one a single run trains (same seed);
    the reported accuracies are the means of the per-classifier ones."""
    def run(repeats: int, real_test):
        torch.manual_seed(3)
        return TrainOnSynthetic(classifier="mlp", epochs=2, progress_bar=False, accelerator="cpu", repeats=repeats
                                ).run(separable(400, seed=0, shuffle_labels=True), real_test, num_classes=10,
                                      image_shape=(1, 28, 28))

    single = run(1, separable(300, seed=1))
    real_test = CountingDataset(separable(300, seed=1))
    result = run(3, real_test)
    assert torch.equal(real_test.reads, torch.full((300,), 3, dtype=torch.long))
    each = result["per_classifier"]
    assert len(each) == 3 and each[0] == single["per_classifier"][0]
    assert len({r["test_accuracy"] for r in each}) > 1  # their own splits, initializations and batch orders
    assert result["test_accuracy"] == pytest.approx(sum(r["test_accuracy"] for r in each) / 3)
    assert result["synthetic_val_accuracy"] == pytest.approx(sum(r["synthetic_val_accuracy"] for r in each) / 3)
    assert result["selected_epoch"] == each[0]["selected_epoch"]


def test_the_printed_summary_names_the_classifier_the_set_and_a_mean_only_over_several():
    assert (TrainOnSynthetic(repeats=3).summary(0.96353, 60000)
            == "test_accuracy=0.9635 (convnet trained on 60000 synthetic examples, the mean of 3 classifiers)")
    assert (TrainOnSynthetic(classifier="mlp").summary(0.5, 40)
            == "test_accuracy=0.5000 (mlp trained on 40 synthetic examples)")


def test_labels_unrelated_to_images_give_chance_accuracy():
    result = TrainOnSynthetic(classifier="mlp", epochs=2, progress_bar=False, accelerator="cpu").run(
        separable(1000, seed=0, shuffle_labels=True), separable(500, seed=1), num_classes=10, image_shape=(1, 28, 28))
    assert result["test_accuracy"] < 0.25


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"classifier": "resnet9000"}, "classifier"), ({"epochs": 0}, "evaluation.epochs"),
    ({"val_fraction": 1.0}, "evaluation.val_fraction"), ({"batch_size": 0}, "evaluation.batch_size"),
    ({"repeats": 0}, "evaluation.repeats"),
    ({"augment_shift": -1}, "evaluation.augment_shift"), ({"augment_shift": 1.5}, "evaluation.augment_shift"),
    ({"augment_shift": True}, "evaluation.augment_shift"),
])
def test_bad_evaluation_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        TrainOnSynthetic(**kwargs)


def test_fit_classifier_returns_the_selected_network_with_its_validation_accuracy():
    """The network handed out (what a user of the pipeline releases) is the selected epoch's: its accuracy on
    the synthetic validation split is the reported one."""
    from torch.utils.data import random_split

    from fedgen.evaluation.downstream import evaluate_accuracy

    synthetic = separable(600, seed=0)
    evaluation = TrainOnSynthetic(classifier="mlp", epochs=3, progress_bar=False, accelerator="cpu")
    torch.manual_seed(5)
    split_seed = int(torch.randint(0, 2**62, (1,)))  # the draw fit_classifier makes for its split
    n_val = int(len(synthetic) * evaluation.val_fraction)
    _, val = random_split(synthetic, [len(synthetic) - n_val, n_val],
                          generator=torch.Generator().manual_seed(split_seed))
    torch.manual_seed(5)
    net, report = evaluation.fit_classifier(synthetic, num_classes=10, image_shape=(1, 28, 28))
    assert not net.training and 0 <= report["selected_epoch"] < 3
    assert evaluate_accuracy(net, val, num_classes=10) == pytest.approx(report["synthetic_val_accuracy"], abs=1e-6)
    real = separable(200, seed=1)
    assert evaluate_accuracy(net, real, num_classes=10) > 0.9


class RecordingNet(nn.Module):
    """An MLP that keeps every batch it is shown, with whether it was training."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = MLP(image_shape=(1, 28, 28), num_classes=10)
        self.seen: list[tuple[bool, torch.Tensor]] = []

    def forward(self, x):
        self.seen.append((self.training, x.detach().clone()))
        return self.inner(x)


@pytest.mark.parametrize("flip", [False, True])
def test_augmented_training_sees_moved_views_while_validation_and_test_see_the_images(flip):
    """With augment_shift = 2 every training batch is its images each moved by its own offset in [-2, 2]^2 (and
    mirrored when asked), drawn anew in every batch; validation and the real test set are read unmoved."""
    gen = torch.Generator().manual_seed(0)
    images = torch.zeros(200, 1, 28, 28)
    images[:, :, 6:22, 6:22] = torch.rand(200, 1, 16, 16, generator=gen)  # a zero border wider than the shift
    synthetic = TensorDataset(images, torch.randint(0, 10, (200,), generator=gen))
    nets: list[RecordingNet] = []

    class Recorded(TrainOnSynthetic):
        def build_net(self, image_shape, num_classes):
            nets.append(RecordingNet())
            return nets[-1]

    test = TensorDataset(images[:50], synthetic.tensors[1][:50])
    Recorded(classifier="mlp", epochs=2, batch_size=50, progress_bar=False, accelerator="cpu", augment_shift=2,
             augment_flip=flip).run(synthetic, test, num_classes=10, image_shape=(1, 28, 28))
    views = [images.roll((dy, dx), dims=(2, 3)) for dy in range(-2, 3) for dx in range(-2, 3)]
    views += [v.flip(-1) for v in views] if flip else []
    originals = {tuple(row.flatten().tolist()): i for i, row in enumerate(images)}
    moved = mirrored = trained = 0
    for training, batch in nets[0].seen:
        for row in batch:
            key = tuple(row.flatten().tolist())
            if not training:  # validation or test: an image exactly as given
                assert key in originals
                continue
            trained += 1
            matches = [k for k, v in enumerate(views) if (v == row).flatten(1).all(1).any()]
            assert matches, "a training input that is no view of any image"
            moved += key not in originals
            mirrored += flip and min(matches) >= 25
    assert trained == 2 * 180  # two epochs of the 180 training images
    assert moved > 0.9 * trained  # 24 of the 25 offsets move an image
    assert not flip or 0.3 * trained < mirrored < 0.7 * trained
