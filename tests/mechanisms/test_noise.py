"""NoiseSource: seeded streams."""

from __future__ import annotations

import pytest

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
