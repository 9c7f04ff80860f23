"""NoiseSource: seeded streams."""

from __future__ import annotations

import pytest
import torch

from fedgen.mechanisms import NoiseSource


def test_each_stream_has_its_own_seed_and_the_sampler_is_stream_one() -> None:
    source = NoiseSource(seed=5)
    seeds = [source.derived_seed(k) for k in (1, 2, 3)]
    assert len(set(seeds)) == 3 and seeds[0] == source.sampling_seed() and 5 not in seeds
    assert seeds == [NoiseSource(seed=5).derived_seed(k) for k in (1, 2, 3)]  # reproducible from the seed
    assert NoiseSource(seed=6).derived_seed(2) != seeds[1]
    assert NoiseSource(secure=True).derived_seed(2) != NoiseSource(secure=True).derived_seed(2)  # os.urandom
    with pytest.raises(ValueError, match="from 1"):
        source.derived_seed(0)


@pytest.mark.parametrize("seed", [0, 5])
def test_seeded_noise_is_not_the_stream_torch_manual_seed_gives_the_training(seed: int) -> None:
    """A mechanism seeded with the run's own seed (``seed: 0`` beside ``seed_everything: 0``) must not add, as its
    privacy noise, the very draws the training takes for its own randomness (diffusion noise, label dropout), which
    the gradients depend on; nor may the sampler's stream be the training's."""
    source = NoiseSource(seed=seed)
    noise = source.normal((1000,), std=1.0)
    training = torch.normal(0.0, 1.0, size=(1000,), generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(noise, training)
    assert (noise - training).abs().max() > 1.0  # not a shifted or rounded copy either
    assert torch.equal(noise, NoiseSource(seed=seed).normal((1000,), std=1.0))  # still reproducible from the seed
    assert seed not in {source.derived_seed(k) for k in (1, 2, 3)}


def test_a_restored_source_continues_its_stream_and_never_draws_the_first_noise_again() -> None:
    first = NoiseSource(seed=7)
    used = first.normal((1000,), std=1.0)
    state = first.state_dict()
    ahead = first.normal((1000,), std=1.0)
    resumed = NoiseSource(seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.normal((1000,), std=1.0), ahead) and not torch.equal(ahead, used)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="restores a CUDA generator's state: needs a CUDA device")
def test_checkpoints_keyed_by_gpu_index_continue_past_every_stream_they_drew() -> None:
    """Checkpoints written before the streams were kept per device type name the device ("cuda:0"); a run that drew
    on two GPUs then holds two streams, each from the seed, and must go on past the longer one."""
    first = NoiseSource(seed=7)
    first.normal((1000,), std=1.0, device="cuda")
    short = first.state_dict()["states"]["cuda"]
    used = first.normal((1000,), std=1.0, device="cuda")
    long = first.state_dict()["states"]["cuda"]
    ahead = first.normal((1000,), std=1.0, device="cuda")
    resumed = NoiseSource(seed=7)
    resumed.load_state_dict(first.state_dict() | {"states": {"cuda:0": long, "cuda:1": short}})
    drawn = resumed.normal((1000,), std=1.0, device="cuda")
    assert torch.equal(drawn, ahead) and not torch.equal(drawn, used)


def test_the_philox_offset_is_read_from_the_second_eight_bytes_of_a_cuda_state() -> None:
    from fedgen.mechanisms.noise import _philox_offset

    state = torch.tensor(list((7).to_bytes(8, "little") + (4096).to_bytes(8, "little")), dtype=torch.uint8)
    assert _philox_offset(state) == 4096


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="moves a stream between two GPUs: needs two CUDA devices")
def test_a_run_resumed_on_another_gpu_continues_the_stream_it_drew_on_the_first() -> None:
    first = NoiseSource(seed=7)
    used = first.normal((1000,), std=1.0, device="cuda:0")
    state = first.state_dict()
    ahead = first.normal((1000,), std=1.0, device="cuda:0")
    resumed = NoiseSource(seed=7)
    resumed.load_state_dict(state)
    moved = resumed.normal((1000,), std=1.0, device="cuda:1")
    assert torch.equal(moved.cpu(), ahead.cpu()) and not torch.equal(moved.cpu(), used.cpu())
