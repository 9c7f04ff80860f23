"""Where privacy noise comes from.

Privacy noise is drawn from its own generator, separate from the randomness of training, so that
seeding a run (reproducibility) and protecting the noise are separate decisions:

- seeded (default): a ``torch.Generator`` seeded from the mechanism's ``seed`` (through a hash, so that it never
  draws the stream ``torch.manual_seed(seed)`` gives the training's own randomness); if no seed is given, it is
  drawn from torch's global generator, so ``seed_everything`` makes a whole run reproducible.
- ``secure=True``: every draw uses the operating system's cryptographically secure generator
  (``os.urandom``); standard normals come from uniforms by the Box-Muller transform in float64.
  Runs are then not reproducible, which is the point.

Integer Skellam noise (:meth:`NoiseSource.skellam`, the distributed noise of secure aggregation) is the
difference of two Poisson draws from numpy's ``Generator.poisson`` (exact PTRS rejection sampling for large
rates, Hormann 1993). Seeded, its generator (PCG64) is seeded from ``seed`` and kept in the state dict; with
``secure=True`` each call seeds a fresh PCG64 from 256 bits of ``os.urandom``, so draws are unpredictable from
run to run but, within a call, come from PCG64, not from a cryptographic generator.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch


class NoiseSource:
    """Draws Gaussian privacy noise, seeded or cryptographically secure."""

    def __init__(self, *, seed: int | None = None, secure: bool = False) -> None:
        self.secure = secure
        if seed is None and not secure:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}  # one stream per device type
        self._numpy: np.random.Generator | None = None

    def _generator(self, device: torch.device) -> torch.Generator:
        """The stream of ``device``'s type. A run draws from one stream per type wherever it runs: moved to another
        GPU (e.g. resumed on ``cuda:1`` after ``cuda:0``), the stream carries on from its state there; restarted
        from the seed, it would repeat noise the run has already added."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self._generators.get(device.type)
        if gen is None or gen.device != device:
            moved = torch.Generator(device=device)
            if gen is None:
                moved.manual_seed(stream_seed(self.seed, 0))
            else:
                moved.set_state(gen.get_state())
            self._generators[device.type] = gen = moved
        return gen

    @property
    def mode(self) -> str:
        """``"secure"`` (``os.urandom``) or ``"seeded"`` (reproducible from ``seed``)."""
        return self.mode_of(self.secure)

    @staticmethod
    def mode_of(secure: bool) -> str:
        """The mode's name for a source that is ``secure`` or not (e.g. one saved in a checkpoint)."""
        return "secure" if secure else "seeded"

    def normal(self, shape: tuple[int, ...] | torch.Size, *, std: float, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor of i.i.d. N(0, std^2) draws, of a floating-point ``dtype``."""
        if not dtype.is_floating_point:
            raise TypeError(f"Gaussian noise must be floating point, not {dtype}: rounded draws are not the noise "
                            "the accountant assumes")
        device = torch.device(device)
        if self.secure:  # scaled in float64, then rounded once to dtype
            return (std * _secure_standard_normal(tuple(shape))).to(device=device, dtype=dtype)
        return torch.normal(0.0, std, size=tuple(shape), generator=self._generator(device), device=device, dtype=dtype)

    def skellam(self, shape: int | tuple[int, ...], mu: float) -> np.ndarray:
        """An int64 array of i.i.d. Sk(mu, mu) = Poisson(mu) - Poisson(mu) draws (mean 0, variance 2 mu).

        Sums of independent Skellam draws are Skellam (Sk(a, a) + Sk(b, b) = Sk(a + b, a + b)), so n parties
        drawing Sk(mu / n, mu / n) each add exactly Sk(mu, mu) in total. ``mu`` may be as large as about 1e17
        (each Poisson draw, mean mu, then stays far below 2^63); numpy refuses rates above about 9.2e18.
        """
        if not (math.isfinite(mu) and mu > 0):
            raise ValueError(f"the Skellam parameter mu must be a finite number > 0, got {mu}")
        if mu > 1e17:
            raise ValueError(f"mu={mu:.3g} is too large for int64 Poisson draws (at most 1e17)")
        if self.secure:
            rng = np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "little")))
        else:
            if self._numpy is None:
                self._numpy = np.random.Generator(np.random.PCG64([self.seed, 0x5EC1A3]))
            rng = self._numpy
        return rng.poisson(mu, size=shape).astype(np.int64) - rng.poisson(mu, size=shape).astype(np.int64)

    def sampling_seed(self) -> int:
        """A seed for a data sampler (e.g. Poisson sampling), derived from this source's seed; from the OS's
        secure generator when ``secure``. The sampler itself is torch's generator, not a cryptographic one."""
        return self.derived_seed(1)

    def derived_seed(self, stream: int) -> int:
        """The seed of independent stream number ``stream`` (>= 1; 0 is this source's own Gaussian noise) derived
        from this source's seed, so that two uses of randomness (the noise and the sampling of different releases)
        never share a stream; from the OS's secure generator when ``secure``."""
        if stream < 1:
            raise ValueError(f"streams are numbered from 1, got {stream}")
        if self.secure:
            return int.from_bytes(os.urandom(8), "little") >> 1
        return stream_seed(self.seed, stream)

    def state_dict(self) -> dict:
        state = {"seed": self.seed, "secure": self.secure,
                 "states": {kind: g.get_state() for kind, g in self._generators.items()}}
        if self._numpy is not None:
            state["numpy"] = self._numpy.bit_generator.state
        return state

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.secure = state["seed"], state["secure"]
        self._generators = {}
        self._numpy = None
        if state.get("numpy") is not None:
            self._numpy = np.random.Generator(np.random.PCG64())
            self._numpy.bit_generator.state = state["numpy"]
        by_type: dict[str, torch.Tensor] = {}
        for name, rng_state in state.get("states", {}).items():  # keyed by type ("cuda"; "cuda:0" before)
            kind = torch.device(name).type
            if kind in by_type:  # an older checkpoint drew on two GPUs, each stream from the seed: go past both
                rng_state = max(rng_state, by_type[kind], key=_philox_offset)
            by_type[kind] = rng_state
        for kind, rng_state in by_type.items():
            if kind == "cuda" and not torch.cuda.is_available():
                continue  # drawn on the CPU from here on: another generator, whose stream this run has not used
            self._generator(torch.device(kind)).set_state(rng_state)


def stream_seed(seed: int, stream: int) -> int:
    """The 63-bit seed of stream ``stream`` of ``seed``: the first 8 bytes of BLAKE2b over both. No stream is then
    the one ``torch.manual_seed(seed)`` starts (the training's own randomness under ``seed_everything(seed)``, which
    a privacy noise equal to it would not be independent of), nor an affine function of another stream's seed."""
    digest = hashlib.blake2b(f"fedgen noise stream {stream} of seed {seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _philox_offset(state: torch.Tensor) -> int:
    """The offset of a CUDA generator's state (16 bytes: the seed, then the Philox offset): how far its stream
    has been drawn."""
    return int.from_bytes(bytes(state[8:16].tolist()), "little")


def _secure_standard_normal(shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    pairs = (n + 1) // 2
    raw = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    # 53 random bits -> uniform in (0, 1]; never 0, so the log is finite.
    u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53
    radius = np.sqrt(-2.0 * np.log(u[0]))
    angle = 2.0 * np.pi * u[1]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
    return torch.from_numpy(z).reshape(shape)
