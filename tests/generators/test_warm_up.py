"""What every warm-up release does inside DPDiffusion: it trains the UNet on the released images before DP-SGD, on
the same ledger, and only one release warms a generator up."""

from __future__ import annotations

import pytest
import torch

from fedgen.errors import ConfigError
from fedgen.generators import CentralImages, MerfImages
from fedgen.mechanisms import DPSGD
from tests.generators.test_ddpm import _data, _fit, _tiny

RELEASES = {
    "central_images": (CentralImages(epsilon=1.0, releases=2, sample_rate=0.5, clip_norm=8.0, steps=3), 6),
    "merf_images": (MerfImages(epsilon=1.0, images=30, steps=3, batch_size=8, num_features=500, length_scale=4.0,
                               epochs=1), 30),
}


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_the_warm_up_trains_on_the_released_images_then_dp_sgd_shares_the_ledger(name: str) -> None:
    release, images = RELEASES[name]
    mechanism = DPSGD(target_epsilon=10.0, delta=1e-3, seed=0, accountant="rdp")
    model = _tiny(mechanism=mechanism, **{name: release})
    before = [p.detach().clone() for p in model.unet.parameters()]
    report = model.warm_up(_data(200))
    assert report["images"] == images and report["warm_up_steps"] == 3 and len(mechanism.ledger.events) == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, model.unet.parameters(), strict=True))
    assert int(model.ema.n_averaged) == 0  # the EMA restarts from the warmed-up weights
    _fit(model, _data(200), max_steps=2)
    assert len(mechanism.ledger.events) == 2 and mechanism.epsilon() <= 10.0
    with pytest.raises(RuntimeError, match="before private training"):
        model.warm_up(_data(200))


def test_a_generator_warms_up_on_one_release_only() -> None:
    mechanism = DPSGD(target_epsilon=10.0, delta=1e-3, seed=0)
    with pytest.raises(ConfigError) as err:
        _tiny(mechanism=mechanism, central_images=RELEASES["central_images"][0],
              merf_images=RELEASES["merf_images"][0])
    assert err.value.field == "model.merf_images" and "remove one" in err.value.fix


@pytest.mark.parametrize(("name", "settings", "first"), [
    ("central_images", {"epsilon": 2.0, "releases": 3, "sample_rate": 0.5, "clip_norm": 10.0, "steps": 2}, (3, 0.5)),
    ("merf_images", {"epsilon": 2.0, "images": 60, "steps": 2, "num_features": 200, "epochs": 1}, (1, 1.0)),
])
def test_fedgen_fit_warms_up_and_calibrates_dp_sgd_for_the_rest(real_data_root, tmp_path, name: str, settings: dict,
                                                                first: tuple[int, float]) -> None:
    """The warm-up's release and the DP-SGD steps sit in one ledger: DP-SGD's noise is calibrated so that both
    together spend the target epsilon; the metrics report the release under the warm-up's name."""
    import json

    from fedgen.cli import fit
    from tests.generators.test_ddpm import _tiny_cli

    run = tmp_path / "run"
    metrics = fit(_tiny_cli(real_data_root, 4, f"--run_dir={run}", f"--model.init_args.{name}={json.dumps(settings)}",
                            "--model.init_args.mechanism.init_args.accountant=rdp", fixed_noise=False))
    saved = json.loads((run / "metrics.json").read_text())
    report = saved[name]
    assert [key for key in RELEASES if saved[key] is not None] == [name]
    assert report["warm_up_steps"] == 2 and 1.9 < report["epsilon"] <= 2.0
    assert report["images"] == (30 if name == "central_images" else 60)
    released, steps = saved["privacy_ledger"]["events"]
    assert (released["count"], released["sample_rate"], released["noise_multiplier"]) == (*first,
                                                                                         report["noise_multiplier"])
    assert (steps["count"], steps["sample_rate"]) == (4, 0.1)
    assert 9.0 < metrics["epsilon"] <= 10.0  # both together, at the target
