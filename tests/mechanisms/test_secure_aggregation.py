"""Tests of secure aggregation: the secure sum against the plain sum (with and without dropouts), loud
failure when too few clients survive, uniformity of what the server sees, the range check, input checks,
encryption of relayed shares, refusal to reveal both shares of one client, Shamir sharing, byte accounting,
and integer client noise (distributed DP) added before masking.

The uniformity tests are chi-square tests (255 degrees of freedom) at significance ALPHA = 1e-6 on the top
and the low 8 bits of one client's masked vector. Masks come from fresh OS randomness every run, so each test
fails a correct implementation with probability 1e-6 per run: below 1e-5 for the file by a union bound
(8 tests, and one with client noise added before masking). Each is shown able to fail: the same test rejects the unmasked quantized input.

Shamir's other half, that t - 1 shares carry no information, holds because for every candidate secret
there is exactly one polynomial of degree t - 1 through it and the t - 1 shares; it is stated, not tested
beyond checking that t - 1 shares do not reconstruct the secret.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from scipy import stats

from fedgen.errors import ConfigError
from fedgen.mechanisms import NoiseSource
from fedgen.mechanisms import secure_aggregation as sa
from fedgen.mechanisms.secure_aggregation import (
    CHUNK_ELEMENTS,
    CIPHERTEXT_BYTES,
    SecureAggregationClient,
    SecureAggregationError,
    SecureAggregator,
    field_to_secret,
    secret_to_field,
    shamir_reconstruct,
    shamir_split,
    uniform_field,
)

ALPHA = 1e-6


def clipped_updates(n: int, m: int, seed: int, clip_norm: float = 1.0) -> dict[int, np.ndarray]:
    """n vectors of L2 norm at most ``clip_norm`` (a third of them exactly at it), under non-consecutive ids."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, m))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    radii = np.where(np.arange(n)[:, None] % 3 == 0, 1.0, rng.uniform(0.1, 1.0, size=(n, 1)))
    x = x / norms * radii * clip_norm
    return {7 * i + 3: x[i] for i in range(n)}


def plain_sum(updates: dict[int, np.ndarray], included: tuple[int, ...]) -> np.ndarray:
    return np.sum([np.asarray(updates[c], dtype=np.float64) for c in included], axis=0)


def rejects_uniform(values: np.ndarray, bins: int = 256, alpha: float = ALPHA) -> bool:
    """Chi-square goodness-of-fit test of H0: ``values`` are i.i.d. uniform on {0, ..., bins - 1}."""
    counts = np.bincount(values.astype(np.int64), minlength=bins)
    expected = values.size / bins
    statistic = float(((counts - expected) ** 2 / expected).sum())
    return stats.chi2.sf(statistic, bins - 1) < alpha


# --- the secure sum -------------------------------------------------------------------------------------

# k-regular settings whose neighbourhoods of d + 1 holders tolerate n // 3 losses with t = floor((d+1)/2) + 1;
# the full graph's default t = ceil(2n/3) tolerates exactly n // 3.
K_REGULAR = {5: (2, 2), 12: (8, 5), 30: (20, 11)}


@pytest.mark.parametrize("dropouts", ["none", "third"])
@pytest.mark.parametrize("m", [1, 100, 10_000])
@pytest.mark.parametrize("n", [5, 12, 30])
@pytest.mark.parametrize("graph", ["full", "k_regular"])
def test_secure_sum_equals_plain_sum(graph, n, m, dropouts):
    updates = clipped_updates(n, m, seed=n * m)
    if graph == "full":
        agg = SecureAggregator(clip_norm=1.0, graph="full")
    else:
        degree, threshold = K_REGULAR[n]
        agg = SecureAggregator(clip_norm=1.0, graph="k_regular", degree=degree, threshold=threshold, seed=n)
    before, after = set(), set()
    if dropouts == "third":
        rng = np.random.default_rng(m + n)
        dropped = rng.choice(sorted(updates), size=n // 3, replace=False).tolist()
        before, after = set(dropped[::2]), set(dropped[1::2])  # mixed: some before, some after masking
    result = agg.aggregate(updates, dropped_before_masking=before, dropped_after_masking=after)
    assert result.included == tuple(sorted(set(updates) - before))
    assert result.max_quantization_error == pytest.approx(len(result.included) * 0.5 / agg.scale)
    error = np.abs(result.total - plain_sum(updates, result.included)).max()
    assert error <= result.max_quantization_error + 1e-12


def test_k_regular_defaults_and_graph():
    agg = SecureAggregator(clip_norm=1.0, graph="k_regular", seed=0)
    assert agg.degree_for(1000) == 30 and agg.threshold_for(1000) == 21  # 3 log2(1000) = 29.9; ceil(2 * 31 / 3)
    assert agg.degree_for(10) == 9  # the default degree reaches n - 1: the complete graph
    updates = clipped_updates(30, 50, seed=1)
    result = agg.aggregate(updates, dropped_before_masking={3, 10}, dropped_after_masking={17, 24, 31})
    assert result.degree == 16 and result.threshold == 12
    for client, peers in result.neighbours.items():
        assert len(peers) == 16 and client not in peers
        assert all(client in result.neighbours[peer] for peer in peers)
    assert np.abs(result.total - plain_sum(updates, result.included)).max() <= result.max_quantization_error


def test_senders_split_by_dropouts_stop_the_round_before_any_share_is_revealed(monkeypatch):
    """On a ring of degree 4, clients 3, 4, 8 and 9 dropping before masking leave {0, 1, 2} and {5, 6, 7} with no
    edge between them; each dropped client still has 3 of its 5 share holders, so the round could finish, and
    the server could then unmask {5, 6, 7}'s own sum from their masked inputs."""
    def ring(n: int, degree: int, rng: np.random.Generator) -> tuple[list[list[int]], list[tuple[int, int]]]:
        assert degree == 4  # clients in ring order 0 .. n - 1, each joined to the two nearest on either side
        edges = [(min(u, (u + d) % n), max(u, (u + d) % n)) for u in range(n) for d in (1, 2)]
        return [sorted({(u + d) % n for d in (-2, -1, 1, 2)}) for u in range(n)], edges

    monkeypatch.setattr(sa, "neighbour_graph", ring)
    revealed = []
    monkeypatch.setattr(sa.SecureAggregationClient, "reveal", lambda *a, **k: revealed.append(1))
    updates = {i: v for i, v in enumerate(clipped_updates(10, 5, seed=5).values())}
    agg = SecureAggregator(clip_norm=1.0, graph="k_regular", degree=4, threshold=3, seed=0)
    with pytest.raises(SecureAggregationError, match="unconnected groups"):
        agg.aggregate(updates, dropped_before_masking={3, 4, 8, 9})
    assert not revealed
    monkeypatch.undo()
    monkeypatch.setattr(sa, "neighbour_graph", ring)
    result = agg.aggregate(updates, dropped_before_masking={3, 8})  # still one group: the round completes
    assert np.abs(result.total - plain_sum(updates, result.included)).max() <= result.max_quantization_error


@pytest.mark.parametrize("bits", [32, 64])
def test_chunks_and_threads_agree(bits):
    updates = clipped_updates(6, 3 * CHUNK_ELEMENTS + 5, seed=2)  # t = 4 of 6: two may drop
    totals = []
    for workers in (1, 2):
        result = SecureAggregator(clip_norm=1.0, bits=bits, workers=workers).aggregate(
            updates, dropped_before_masking={3}, dropped_after_masking={10})
        assert np.abs(result.total - plain_sum(updates, result.included)).max() <= result.max_quantization_error
        totals.append(result.total)
    np.testing.assert_array_equal(totals[0], totals[1])  # the quantized sum is exact, whatever the chunking


def test_torch_inputs_give_a_float64_tensor_of_their_shape():
    updates = {c: torch.from_numpy(v.reshape(4, 5)).float() for c, v in clipped_updates(5, 20, seed=3).items()}
    result = SecureAggregator(clip_norm=1.0).aggregate(updates)
    assert isinstance(result.total, torch.Tensor) and result.total.dtype == torch.float64
    assert result.total.shape == (4, 5)
    expected = torch.stack([u.double() for u in updates.values()]).sum(0)
    assert (result.total - expected).abs().max() <= result.max_quantization_error + 1e-6


# --- dropouts beyond the threshold ----------------------------------------------------------------------


@pytest.mark.parametrize(("graph", "kwargs", "before", "after", "available", "needed"), [
    ("full", {}, 5, 0, 7, 8),
    ("full", {}, 0, 5, 7, 8),
    ("full", {}, 3, 2, 7, 8),
    ("k_regular", {"degree": 4, "threshold": 3}, 10, 0, None, None),  # the 2 senders left are not neighbours
    ("k_regular", {"degree": 4, "threshold": 3}, 0, 10, None, 3),
])
def test_too_many_dropouts_fail_loudly(graph, kwargs, before, after, available, needed):
    updates = clipped_updates(12, 10, seed=4)
    ids = sorted(updates)
    agg = SecureAggregator(clip_norm=1.0, graph=graph, seed=0, **kwargs)
    pattern = rf"\d+ of its \d+ share holders answered .*, {needed} are needed" if needed else "unconnected groups"
    with pytest.raises(SecureAggregationError, match=pattern) as caught:
        agg.aggregate(updates, dropped_before_masking=set(ids[:before]),
                      dropped_after_masking=set(ids[before:before + after]))
    if available is not None:
        assert f"{available} of its 12 share holders" in str(caught.value)


# --- what the server sees -------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "graph"), [(32, "full"), (64, "full"), (24, "full"), (32, "k_regular")])
def test_a_masked_update_is_uniform(bits, graph):
    m, clip_norm = 1 << 16, 1.0
    constant = np.full(m, clip_norm / math.sqrt(m) / (1 + 1e-9))  # every coordinate equal, norm at clip_norm
    updates = {c: (constant if c % 2 else np.zeros(m)) for c in range(12)}
    kwargs = {"degree": 4} if graph == "k_regular" else {}
    agg = SecureAggregator(clip_norm=clip_norm, bits=bits, graph=graph, seed=0, **kwargs)
    result = agg.aggregate(updates, keep_transcript=True)
    assert np.abs(result.total - constant * 6).max() <= result.max_quantization_error
    for client in (0, 1):  # a zero input and a constant nonzero input
        seen = result.transcript.masked_inputs[client].astype(np.uint64)
        assert seen.max() < 2**bits
        top, low = (seen >> np.uint64(bits - 8)) & np.uint64(255), seen & np.uint64(255)
        assert not rejects_uniform(top) and not rejects_uniform(low)
    # Power: the same test rejects the unmasked quantized input (constant, so one bin each).
    quantized = agg.quantize(constant).astype(np.uint64)
    assert rejects_uniform((quantized >> np.uint64(bits - 8)) & np.uint64(255))
    assert rejects_uniform(quantized & np.uint64(255))


def three_clients() -> tuple[list[SecureAggregationClient], list[dict[int, bytes]]]:
    """Rounds 0 and 1 by hand for clients 0, 1, 2 (all neighbours, threshold 2)."""
    session = os.urandom(16)
    clients = [SecureAggregationClient(index=i, session=session) for i in range(3)]
    keys = {c.index: (c.c_public, c.s_public) for c in clients}
    for c in clients:
        c.learn_peers({j: keys[j] for j in keys if j != c.index})
    sealed = [c.share_keys([0, 1, 2], threshold=2) for c in clients]
    for c in clients:
        c.receive_shares({u: sealed[u][c.index] for u in range(3) if u != c.index})
    return clients, sealed


def test_relayed_shares_are_ciphertexts():
    result = SecureAggregator(clip_norm=1.0).aggregate(clipped_updates(5, 10, seed=5), keep_transcript=True)
    ciphertexts = result.transcript.ciphertexts
    assert len(ciphertexts) == 5 * 4
    assert all(len(blob) == CIPHERTEXT_BYTES for blob in ciphertexts.values())
    for blob in ciphertexts.values():
        with pytest.raises(sa.InvalidTag):
            sa.AESGCM(os.urandom(32)).decrypt(blob[:12], blob[12:], None)

    clients, sealed = three_clients()
    blob = sealed[0][1]
    share = clients[1].reveal(dropped=[], survived=[0])[1][0]  # client 1's share of client 0's seed b
    assert share.astype("<u4").tobytes() not in blob
    # Client 2 holds a different key with client 0: it cannot open what client 0 sent client 1.
    clients[2].receive_shares({0: blob})
    with pytest.raises(SecureAggregationError, match="fail authentication"):
        clients[2].reveal(dropped=[], survived=[0])
    # Client 1 and client 0's own share reconstruct client 0's self-mask seed.
    shares = np.stack([clients[0].reveal(dropped=[], survived=[0])[1][0], share])
    assert field_to_secret(shamir_reconstruct([1, 2], shares)) == clients[0].self_mask_seed


def test_clients_never_reveal_both_shares_of_one_client(monkeypatch):
    clients, _ = three_clients()
    with pytest.raises(SecureAggregationError, match="refuses to unmask"):
        clients[1].reveal(dropped=[0], survived=[0])
    clients[1].reveal(dropped=[], survived=[0, 1])
    with pytest.raises(SecureAggregationError, match="refuses to unmask"):
        clients[1].reveal(dropped=[0], survived=[])  # already gave client 0's b-share
    # A server that asks for both kinds of share of a client is refused in the protocol too.
    monkeypatch.setattr(SecureAggregator, "_unmask_request",
                        staticmethod(lambda holders, sending: (list(holders), list(holders))))
    with pytest.raises(SecureAggregationError, match="refuses to unmask"):
        SecureAggregator(clip_norm=1.0).aggregate(clipped_updates(5, 10, seed=6))


# --- range, inputs, configuration -------------------------------------------------------------------------


def minimal_bits(n: int, clip_norm: float, scale: float) -> int:
    return math.floor(math.log2(n * (clip_norm * (1 + sa.NORM_SLACK) * scale + 0.5))) + 2


def test_overflow_is_refused_before_any_key(monkeypatch):
    def no_keys():
        raise AssertionError("a key was generated before the range check")
    monkeypatch.setattr(sa.X25519PrivateKey, "generate", no_keys)
    zeros = {c: np.zeros(3) for c in range(5)}
    with pytest.raises(ConfigError) as caught:
        SecureAggregator(clip_norm=1.0, scale=2.0**30, bits=32).aggregate(zeros)
    assert caught.value.field == "secure_aggregation.bits"
    assert f"bits >= {minimal_bits(5, 1.0, 2.0**30)}" in caught.value.fix
    with pytest.raises(ConfigError) as caught:  # even 64 bits are too few: the scale must go down
        SecureAggregator(clip_norm=1e3, scale=2.0**48, bits=64).aggregate({c: np.zeros(3) for c in range(40)})
    assert caught.value.field == "secure_aggregation.scale"
    with pytest.raises(ConfigError) as caught:  # float64 cannot round x * scale exactly
        SecureAggregator(clip_norm=1.0, scale=2.0**60, bits=64).aggregate(zeros)
    assert caught.value.field == "secure_aggregation.scale"
    with pytest.raises(ConfigError) as caught:  # too many clients for the default 32 bits
        SecureAggregator(clip_norm=1.0).check_range(100_000)
    assert caught.value.field == "secure_aggregation.bits"
    assert f"bits >= {minimal_bits(100_000, 1.0, 2.0**16)}" in caught.value.fix


def test_largest_accepted_population_sums_extreme_inputs_exactly():
    agg = SecureAggregator(clip_norm=1.0, scale=16.0, bits=12, graph="k_regular", degree=4, seed=0)
    n = int((2**11 - 1e-9) // (16.0 * (1 + sa.NORM_SLACK) + 0.5))
    agg.check_range(n)
    with pytest.raises(ConfigError):
        agg.check_range(n + 1)
    for sign in (1.0, -1.0):  # every client at +clip_norm (or -clip_norm): the largest |sum|
        result = agg.aggregate({c: np.array([sign]) for c in range(n)})
        assert result.total[0] == sign * n


def test_inputs_above_clip_norm_are_refused():
    updates = clipped_updates(5, 10, seed=7)
    updates[3] = updates[3] * 1.01
    with pytest.raises(ValueError, match="L2 norm .* > clip_norm"):
        SecureAggregator(clip_norm=1.0).aggregate(updates)
    updates[3] = np.full(10, np.nan)
    with pytest.raises(ValueError, match="L2 norm"):
        SecureAggregator(clip_norm=1.0).aggregate(updates)
    with pytest.raises(ValueError, match="shape"):
        SecureAggregator(clip_norm=1.0).aggregate({0: np.zeros(3), 1: np.zeros(3), 2: np.zeros(4)})
    with pytest.raises(ValueError, match="both before and after"):
        SecureAggregator(clip_norm=1.0).aggregate(clipped_updates(5, 3, seed=8), dropped_before_masking={3},
                                                  dropped_after_masking={3})


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"clip_norm": 0.0}, "clip_norm"),
    ({"clip_norm": 1.0, "scale": -1.0}, "scale"),
    ({"clip_norm": 1.0, "bits": 65}, "bits"),
    ({"clip_norm": 1.0, "graph": "ring"}, "graph"),
    ({"clip_norm": 1.0, "degree": 4}, "degree"),
    ({"clip_norm": 1.0, "graph": "k_regular", "degree": 5}, "degree"),
    ({"clip_norm": 1.0, "threshold": 0.5}, "threshold"),
    ({"clip_norm": 1.0, "threshold": 1}, "threshold"),
])
def test_bad_configuration_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as caught:
        SecureAggregator(**kwargs)
    assert caught.value.field == f"secure_aggregation.{field}"


def test_threshold_must_exceed_half_of_the_neighbourhood(monkeypatch):
    monkeypatch.setattr(sa.X25519PrivateKey, "generate", lambda: pytest.fail("a key was generated"))
    for threshold in (2, 6):  # 5 clients, full graph: 5 holders, so t must be in (2.5, 5]
        with pytest.raises(ConfigError) as caught:
            SecureAggregator(clip_norm=1.0, threshold=threshold).aggregate({c: np.zeros(2) for c in range(5)})
        assert caught.value.field == "secure_aggregation.threshold"


def test_bytes_are_accounted():
    n, m, bits = 5, 1000, 24
    result = SecureAggregator(clip_norm=1.0, bits=bits).aggregate(clipped_updates(n, m, seed=9))
    sent = (2 * 32                                  # public keys
            + (n - 1) * (4 + CIPHERTEXT_BYTES)      # encrypted shares, one per neighbour
            + m * bits // 8                         # the masked vector at 24 bits per element
            + n * (4 + 36))                         # b-shares of every holder's client (itself included)
    received = (n - 1) * (4 + 64) + (n - 1) * (4 + CIPHERTEXT_BYTES) + n * 4
    assert set(result.bytes_sent_per_client.values()) == {sent}
    assert set(result.bytes_received_per_client.values()) == {received}
    assert result.bytes_received_by_server == n * sent and result.bytes_sent_by_server == n * received
    assert result.client_seconds > 0 and result.server_seconds > 0


# --- Shamir sharing -------------------------------------------------------------------------------------


def test_shamir_any_t_shares_reconstruct_and_t_minus_1_do_not():
    rng = np.random.default_rng(10)
    secret = os.urandom(32)
    limbs = secret_to_field(secret)
    assert field_to_secret(limbs) == secret
    xs = np.arange(1, 11)
    shares = shamir_split(limbs, xs, threshold=7)
    for size in (7, 8, 10):
        for _ in range(10):
            chosen = rng.choice(10, size=size, replace=False)
            assert np.array_equal(shamir_reconstruct(xs[chosen], shares[chosen]), limbs)
    for _ in range(10):
        chosen = rng.choice(10, size=6, replace=False)
        assert not np.array_equal(shamir_reconstruct(xs[chosen], shares[chosen]), limbs)
    with pytest.raises(ValueError):
        shamir_split(limbs, xs, threshold=11)


def test_shamir_vectorised_round_trip():
    rng = np.random.default_rng(11)
    secrets = uniform_field((50, 2, 9))
    # Each of the 50 secret pairs has its own 12 evaluation points.
    xs = np.stack([rng.choice(np.arange(1, 1000), size=12, replace=False) for _ in range(50)], axis=1)[..., None]
    shares = shamir_split(secrets, xs, threshold=8)
    assert shares.shape == (12, 50, 2, 9)
    for i in range(50):
        chosen = rng.choice(12, size=8, replace=False)
        assert np.array_equal(shamir_reconstruct(xs[chosen, i, 0], shares[chosen, i]), secrets[i])
    common = shamir_split(secrets, np.arange(1, 13), threshold=8)  # shared points: one batched reconstruction
    assert np.array_equal(shamir_reconstruct(range(3, 11), common[2:10]), secrets)


# --- client noise (distributed DP) ----------------------------------------------------------------------


def integer_noise(ids, m: int, seed: int, scale: float = 1000.0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(-int(scale), int(scale) + 1, size=m) for c in ids}


@pytest.mark.parametrize("bits", [32, 64])
def test_client_noise_is_added_to_the_quantized_sum_exactly(bits):
    updates = clipped_updates(7, 500, seed=12)
    ids = sorted(updates)
    noise = integer_noise(ids, 500, seed=13)
    agg = SecureAggregator(clip_norm=1.0, bits=bits)
    before, after = {ids[1]}, {ids[4]}
    result = agg.aggregate(updates, dropped_before_masking=before, dropped_after_masking=after,
                           client_noise=noise, noise_std=1000.0 * math.sqrt(7))
    assert result.included == tuple(c for c in ids if c not in before)
    exact = sum(np.rint(updates[c] * agg.scale).astype(np.int64) + noise[c] for c in result.included)
    np.testing.assert_array_equal(result.total, exact / agg.scale)  # the dropped-before client's noise is lost


def test_a_masked_noisy_update_is_uniform():
    m, bits = 1 << 16, 32
    constant = np.full(m, 1.0 / math.sqrt(m) / (1 + 1e-9))
    updates = {c: constant for c in range(6)}
    noise = {c: NoiseSource(seed=c).skellam(m, 2.0) for c in range(6)}  # small noise: the input stays nearly constant
    agg = SecureAggregator(clip_norm=1.0, bits=bits)
    result = agg.aggregate(updates, keep_transcript=True, client_noise=noise, noise_std=math.sqrt(2 * 2.0 * 6))
    seen = result.transcript.masked_inputs[0].astype(np.uint64)
    assert not rejects_uniform((seen >> np.uint64(bits - 8)) & np.uint64(255))
    assert not rejects_uniform(seen & np.uint64(255))
    # Power: the noisy quantized input itself, unmasked, is far from uniform.
    unmasked = (agg.quantize(constant) + agg.to_ring(noise[0])).astype(np.uint64)
    assert rejects_uniform((unmasked >> np.uint64(bits - 8)) & np.uint64(255))
    assert rejects_uniform(unmasked & np.uint64(255))


def test_range_check_reserves_the_noise_tail(monkeypatch):
    agg = SecureAggregator(clip_norm=1.0, scale=16.0, bits=12)
    n = 100
    room = 2.0**11 - n * (16.0 * (1 + sa.NORM_SLACK) + 0.5)  # what the inputs leave of |sum| < 2^11
    agg.check_range(n, noise_std=0.99 * room / sa.NOISE_TAIL_STDS)
    with pytest.raises(ConfigError) as caught:
        agg.check_range(n, noise_std=1.01 * room / sa.NOISE_TAIL_STDS)
    assert caught.value.field == "secure_aggregation.bits" and "noise" in caught.value.problem

    def no_keys():
        raise AssertionError("a key was generated before the range check")
    monkeypatch.setattr(sa.X25519PrivateKey, "generate", no_keys)
    zeros = {c: np.zeros(3) for c in range(n)}
    with pytest.raises(ConfigError):
        agg.aggregate(zeros, client_noise={c: np.zeros(3, dtype=np.int64) for c in range(n)},
                      noise_std=1.01 * room / sa.NOISE_TAIL_STDS)
    # Noise beyond the reserved tail would wrap around: the simulation refuses it before any key, too.
    loud = {c: np.full(3, 10, dtype=np.int64) for c in range(5)}
    with pytest.raises(SecureAggregationError, match="reserve"):
        SecureAggregator(clip_norm=1.0).aggregate({c: np.zeros(3) for c in range(5)}, client_noise=loud,
                                                  noise_std=2.0)


@pytest.mark.parametrize(("noise", "message"), [
    ({0: np.zeros(4, dtype=np.int64), 1: np.zeros(4, dtype=np.int64)}, "exactly the clients"),
    ({c: np.zeros(4) for c in range(3)}, "integer noise"),
    ({c: np.zeros(5, dtype=np.int64) for c in range(3)}, "shape"),
])
def test_bad_client_noise_is_refused(noise, message):
    with pytest.raises(ValueError, match=message):
        SecureAggregator(clip_norm=1.0).aggregate({c: np.zeros(4) for c in range(3)}, client_noise=noise,
                                                  noise_std=1.0)
