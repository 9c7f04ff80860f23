"""Secure aggregation: the server learns the sum of the clients' clipped updates and nothing else.

The protocol is that of Bonawitz et al. (CCS 2017), "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", with the sparse neighbour graph of SecAgg+ (Bell et al., CCS 2020, "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead") as an option. All parties run in this one
Python process and messages are Python objects, but the cryptography is real (the ``cryptography``
package): X25519 key agreement, HKDF-SHA256, AES-GCM for the shares the server relays, AES-256-CTR as the
mask generator, and Shamir secret sharing over GF(2^31 - 1).

Client u holds a fixed-point vector x_u in Z_{2^k}^m and sends the server

    y_u = x_u + PRG(b_u) + sum_{v in N(u), u < v} PRG(s_uv) - sum_{v in N(u), v < u} PRG(s_uv)   (mod 2^k),

where s_uv = HKDF(X25519(s_u^SK, s_v^PK)) is the seed that u and its neighbour v agree on and b_u is a
fresh random seed. Summed over the clients that sent, the pairwise masks cancel; the server removes the
self-masks PRG(b_u) after reconstructing b_u from Shamir shares held by u's neighbours, and the masks of
clients that dropped before sending from their reconstructed s^SK. No client's shares of both secrets
are ever revealed, so each y_u on its own is uniform on Z_{2^k}^m.

Secure aggregation adds no noise of its own: it releases the exact sum and records nothing in a privacy
ledger. It hides the individual updates from the server; a DP guarantee for the sum comes from a mechanism
(e.g. :class:`~fedgen.mechanisms.GaussianMechanism`) applied to it, whose release the ledger records. For
distributed noise, each client may add integer noise z_u to x_u before masking (``client_noise``, e.g. its
share of Skellam noise): y_u = x_u + z_u + masks stays uniform, and the server learns only sum_u (x_u + z_u).
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedgen.errors import ConfigError

GraphName = Literal["full", "k_regular"]

FIELD_PRIME = (1 << 31) - 1
"""Shamir shares live in GF(p), p = 2^31 - 1: a product of two elements fits in a uint64."""
LIMB_BITS = 30
SECRET_BYTES = 32
SECRET_LIMBS = math.ceil(8 * SECRET_BYTES / LIMB_BITS)  # a 32-byte secret is 9 field elements

# Message sizes (bytes) for the communication accounting.
ID_BYTES = 4
PUBLIC_KEY_BYTES = 32
SHARE_BYTES = 4 * SECRET_LIMBS  # one share of one secret: 9 field elements of 4 bytes
NONCE_BYTES = 12
TAG_BYTES = 16
SHARE_PLAINTEXT_BYTES = 2 * ID_BYTES + 2 * SHARE_BYTES
CIPHERTEXT_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES

CHUNK_ELEMENTS = 1 << 16
"""Masks are expanded and applied in chunks of this many coordinates (cache-sized; threads split them)."""
NORM_SLACK = 1e-5
"""Relative slack on ``clip_norm`` for float rounding in the caller's clipping; the range check includes it."""
NOISE_TAIL_STDS = 20.0
"""The range check reserves this many standard deviations of the clients' total integer noise per coordinate.
For the Skellam noise of distributed DP (a difference of Poisson variables; Bernstein's inequality) the chance
that a coordinate's noise of variance v goes past it is below 2 exp(-400 v / (2 v + 40 sqrt(v) / 3)): about
1e-11 at v = 1, 1e-52 at v = 100, and 2 exp(-200) < 1e-86 as v grows."""

_MASK_INFO = b"fedgen secure aggregation: pairwise mask seed"
_SHARE_INFO = b"fedgen secure aggregation: share encryption key"


class SecureAggregationError(RuntimeError):
    """The protocol cannot finish correctly (too few survivors, a refused request, a failed decryption)."""


# --- Shamir secret sharing over GF(2^31 - 1) -------------------------------------------------------------


def secret_to_field(secret: bytes) -> np.ndarray:
    """Split a byte string into 30-bit limbs, each an element of GF(2^31 - 1) (little-endian order)."""
    value = int.from_bytes(secret, "little")
    count = math.ceil(8 * len(secret) / LIMB_BITS)
    limb_mask = (1 << LIMB_BITS) - 1
    return np.array([(value >> (LIMB_BITS * i)) & limb_mask for i in range(count)], dtype=np.uint64)


def field_to_secret(limbs: np.ndarray, num_bytes: int = SECRET_BYTES) -> bytes:
    """Inverse of :func:`secret_to_field`; raises if the limbs are not a valid encoding."""
    value = 0
    for i, limb in enumerate(np.asarray(limbs, dtype=np.uint64).tolist()):
        if limb >= 1 << LIMB_BITS:
            raise SecureAggregationError("a reconstructed secret is not a valid encoding (inconsistent shares)")
        value |= limb << (LIMB_BITS * i)
    if value >= 1 << (8 * num_bytes):
        raise SecureAggregationError("a reconstructed secret is not a valid encoding (inconsistent shares)")
    return value.to_bytes(num_bytes, "little")


def uniform_field(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform elements of GF(2^31 - 1) from the OS's secure generator (31-bit draws, p itself redrawn)."""
    count = math.prod(shape)
    values = (np.frombuffer(os.urandom(4 * count), dtype=np.uint32) & FIELD_PRIME).astype(np.uint64)
    while True:
        bad = np.flatnonzero(values == FIELD_PRIME)
        if bad.size == 0:
            return values.reshape(shape)
        values[bad] = np.frombuffer(os.urandom(4 * bad.size), dtype=np.uint32) & FIELD_PRIME


def shamir_split(secrets: np.ndarray, xs: np.ndarray, threshold: int) -> np.ndarray:
    """Shamir t-of-n shares: share_j = f(x_j), f(0) = secret, f of degree t - 1 with uniform coefficients.

    Any ``threshold`` shares determine f and so the secret (Lagrange interpolation); any ``threshold - 1``
    are uniform and independent of it (Shamir, CACM 1979). Vectorised over the trailing axes.

    Args:
        secrets: field elements, shape ``(..., L)``; each entry is shared independently.
        xs: distinct evaluation points in [1, p), shape ``(P,)`` or ``(P, ...)`` broadcastable against
            ``secrets.shape[:-1]`` (so each secret of a batch may have its own points).
        threshold: t, the number of shares needed to reconstruct.

    Returns:
        shares of shape ``(P, ..., L)``: ``shares[j]`` is the share at ``xs[j]``.
    """
    secrets = np.asarray(secrets, dtype=np.uint64)
    xs = np.asarray(xs, dtype=np.uint64)
    if threshold < 1 or threshold > xs.shape[0]:
        raise ValueError(f"threshold must be in [1, {xs.shape[0]}] (the number of shares), got {threshold}")
    if np.any(secrets >= FIELD_PRIME):
        raise ValueError("secrets must be field elements (< 2^31 - 1)")
    if np.any(xs == 0) or np.any(xs >= FIELD_PRIME):
        raise ValueError("evaluation points must be in [1, 2^31 - 1)")
    coefficients = uniform_field((threshold - 1, *secrets.shape))
    points = xs.reshape(xs.shape + (1,) * (secrets.ndim + 1 - xs.ndim))  # (P, ..., 1)
    shape = np.broadcast_shapes(points.shape, secrets.shape)
    # Horner: f(x) = (((c_{t-1} x + c_{t-2}) x + ...) x + secret); every step stays below 2^63.
    acc = np.zeros(shape, dtype=np.uint64)
    for coefficient in coefficients[::-1]:
        acc += coefficient
        acc *= points
        acc %= FIELD_PRIME
    acc += secrets
    acc %= FIELD_PRIME
    return acc


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> np.ndarray:
    """lambda_j = prod_{i != j} x_i / (x_i - x_j) mod p, so that f(0) = sum_j lambda_j f(x_j)."""
    p = FIELD_PRIME
    coefficients = []
    for j, xj in enumerate(xs):
        numerator, denominator = 1, 1
        for i, xi in enumerate(xs):
            if i != j:
                numerator = numerator * xi % p
                denominator = denominator * (xi - xj) % p
        coefficients.append(numerator * pow(denominator, -1, p) % p)
    return np.array(coefficients, dtype=np.uint64)


def shamir_reconstruct(xs: Sequence[int], shares: np.ndarray) -> np.ndarray:
    """The secret f(0) from shares ``shares[j] = f(xs[j])`` (shape ``(t, ..., L)``), by Lagrange interpolation.

    With at least ``threshold`` shares of one sharing this is the secret; with fewer it is some other
    field element (all values are equally consistent with them), so callers must count shares.
    """
    points = tuple(int(x) % FIELD_PRIME for x in xs)
    if len(set(points)) != len(points) or 0 in points:
        raise ValueError("evaluation points must be distinct and nonzero modulo the field prime")
    shares = np.asarray(shares, dtype=np.uint64)
    weights = _lagrange_at_zero(points).reshape((len(points),) + (1,) * (shares.ndim - 1))
    return (weights * shares % FIELD_PRIME).sum(axis=0) % FIELD_PRIME


# --- Key agreement, encryption and the mask generator ----------------------------------------------------


def derive_key(private_key: X25519PrivateKey, peer_public: bytes, *, session: bytes, info: bytes) -> bytes:
    """32 bytes from X25519(private, peer) through HKDF-SHA256 (salt: the session id, info: the purpose)."""
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=session, info=info).derive(shared)


def prg(seed: bytes, start: int, count: int, dtype: np.dtype, *, out: np.ndarray | None = None,
        zeros: bytes | None = None) -> np.ndarray:
    """Elements ``start .. start + count`` of the mask stream PRG(seed): the AES-256-CTR keystream under key
    ``seed`` (counter from 0), read as little-endian unsigned integers of ``dtype``.

    AES-CTR under a uniformly random key is indistinguishable from a random string (AES as a PRP/PRF), so
    each element is uniform on Z_{2^(8 itemsize)} to any efficient observer. The stream is seekable, so a
    chunk of coordinates can be generated on its own. ``out`` (uint8, at least ``count * itemsize + 16``
    bytes) and ``zeros`` (at least ``count * itemsize`` zero bytes) avoid allocations in hot loops.
    """
    dtype = np.dtype(dtype)
    first_byte = start * dtype.itemsize
    if first_byte % 16:
        raise ValueError("chunks must start on an AES block boundary")
    num_bytes = count * dtype.itemsize
    if out is None:
        out = np.empty(num_bytes + 16, dtype=np.uint8)
    if zeros is None:
        zeros = bytes(num_bytes)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR((first_byte // 16).to_bytes(16, "big"))).encryptor()
    encryptor.update_into(memoryview(zeros)[:num_bytes], out)
    return out[:num_bytes].view(dtype.newbyteorder("<"))


def _share_plaintext(sender: int, receiver: int, s_share: np.ndarray, b_share: np.ndarray) -> bytes:
    return (struct.pack("<II", sender, receiver) + s_share.astype("<u4").tobytes()
            + b_share.astype("<u4").tobytes())


class SecureAggregationClient:
    """One client's side of the protocol: two X25519 key pairs, the self-mask seed, the shares it holds.

    ``c`` keys encrypt the shares relayed through the server; ``s`` keys seed the pairwise masks. Client
    ``index`` is also its Shamir evaluation point minus one.
    """

    def __init__(self, *, index: int, session: bytes) -> None:
        self.index = index
        self.session = session
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self.self_mask_seed = os.urandom(SECRET_BYTES)  # b_u (used by the simulation to expand PRG(b_u))
        self.c_public = self._c_key.public_key().public_bytes_raw()
        self.s_public = self._s_key.public_key().public_bytes_raw()
        self._peers: dict[int, tuple[bytes, bytes]] = {}
        self._cipher_keys: dict[int, AESGCM] = {}
        self._held: dict[int, bytes] = {}  # sender -> ciphertext of its shares for this client
        self._own_shares: tuple[np.ndarray, np.ndarray] | None = None
        self._revealed: dict[int, str] = {}  # client -> "s" (mask key) or "b" (self-mask seed)

    def learn_peers(self, public_keys: Mapping[int, tuple[bytes, bytes]]) -> None:
        """Round 1 input: the neighbours' (c, s) public keys, relayed by the server."""
        advertised = [key for pair in public_keys.values() for key in pair] + [self.c_public, self.s_public]
        if len(set(advertised)) != len(advertised):
            raise SecureAggregationError(f"client {self.index}: two advertised public keys are equal")
        self._peers = dict(public_keys)

    def _cipher(self, peer: int) -> AESGCM:
        if peer not in self._cipher_keys:
            self._cipher_keys[peer] = AESGCM(derive_key(self._c_key, self._peers[peer][0], session=self.session,
                                                        info=_SHARE_INFO))
        return self._cipher_keys[peer]

    def _aad(self, sender: int, receiver: int) -> bytes:
        return self.session + struct.pack("<II", sender, receiver)

    def share_keys(self, holders: Sequence[int], threshold: int) -> dict[int, bytes]:
        """Round 1: Shamir-share s^SK and b_u among ``holders`` (the closed neighbourhood, self included)
        and encrypt each share for its holder; the own share is kept. Returns holder -> ciphertext."""
        secrets = np.stack([secret_to_field(self._s_key.private_bytes_raw()), secret_to_field(self.self_mask_seed)])
        shares = shamir_split(secrets, np.asarray(holders, dtype=np.uint64) + 1, threshold)  # (P, 2, L)
        out = {}
        for holder, (s_share, b_share) in zip(holders, shares, strict=True):
            if holder == self.index:
                self._own_shares = (s_share, b_share)
                continue
            nonce = os.urandom(NONCE_BYTES)
            plaintext = _share_plaintext(self.index, holder, s_share, b_share)
            out[holder] = nonce + self._cipher(holder).encrypt(nonce, plaintext, self._aad(self.index, holder))
        return out

    def receive_shares(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Round 1 output, relayed by the server: sender -> ciphertext, stored until unmasking."""
        self._held.update(ciphertexts)

    def mask_seed(self, peer: int) -> bytes:
        """Round 2: the pairwise mask seed s_uv shared with ``peer``."""
        return derive_key(self._s_key, self._peers[peer][1], session=self.session, info=_MASK_INFO)

    def _open(self, sender: int) -> tuple[np.ndarray, np.ndarray]:
        if sender == self.index:
            return self._own_shares
        blob = self._held.get(sender)
        if blob is None:
            raise SecureAggregationError(f"client {self.index} holds no shares of client {sender}")
        try:
            plaintext = self._cipher(sender).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                                     self._aad(sender, self.index))
        except InvalidTag:
            raise SecureAggregationError(f"client {self.index}: the shares from client {sender} fail "
                                         "authentication") from None
        if struct.unpack("<II", plaintext[:8]) != (sender, self.index):
            raise SecureAggregationError(f"client {self.index}: shares from client {sender} are addressed wrongly")
        limbs = np.frombuffer(plaintext[8:], dtype="<u4").astype(np.uint64)
        return limbs[:SECRET_LIMBS], limbs[SECRET_LIMBS:]

    def reveal(self, *, dropped: Collection[int], survived: Collection[int]
               ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Round 4: shares of s^SK for clients the server says dropped before sending their masked input,
        shares of b for clients it says sent theirs.

        Refuses (``SecureAggregationError``) to give both kinds for one client, in one request or across
        requests: s^SK and b together would unmask that client's input.
        """
        dropped, survived = set(dropped), set(survived)
        conflict = (dropped & survived) | {v for v in dropped if self._revealed.get(v) == "b"} \
            | {v for v in survived if self._revealed.get(v) == "s"}
        if conflict:
            raise SecureAggregationError(
                f"client {self.index} refuses to unmask: the server asked for both the mask-key shares and the "
                f"self-mask shares of client(s) {sorted(conflict)}, which would reveal their inputs")
        if self.index in dropped:
            raise SecureAggregationError(f"client {self.index} was reported dropped but is asked to unmask")
        s_shares, b_shares = {}, {}
        for v in sorted(dropped):
            s_shares[v] = self._open(v)[0]
            self._revealed[v] = "s"
        for v in sorted(survived):
            b_shares[v] = self._open(v)[1]
            self._revealed[v] = "b"
        return s_shares, b_shares


# --- The neighbour graph --------------------------------------------------------------------------------


def neighbour_graph(num_clients: int, degree: int, rng: np.random.Generator
                    ) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Neighbour lists and edges ``(a, b)``, ``a < b``, of the complete graph (``degree >= n - 1``) or of a
    random ``degree``-regular circulant (Harary) graph: clients placed on a ring in random order, each
    joined to the ``degree / 2`` nearest on either side (Bell et al. 2020 use a random k-regular graph).

    Edges are listed ring position by ring position so that a client's masks are generated close together.
    """
    n = num_clients
    if degree >= n - 1:
        edges = [(a, b) for a in range(n) for b in range(a + 1, n)]
    else:
        ring = rng.permutation(n).tolist()
        edges = []
        for position in range(n):
            for step in range(1, degree // 2 + 1):
                a, b = ring[position], ring[(position + step) % n]
                edges.append((min(a, b), max(a, b)))
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    return [sorted(v) for v in neighbours], edges


# --- Results ------------------------------------------------------------------------------------------


@dataclass
class Transcript:
    """What the server saw: public keys, the relayed ciphertexts, the masked inputs (mod 2^bits)."""

    public_keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    ciphertexts: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (sender, receiver) -> bytes
    masked_inputs: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class AggregationResult:
    """The securely computed sum and the protocol's cost.

    ``total`` is the sum of the inputs of the clients in ``included`` (those whose masked input reached
    the server), within ``max_quantization_error`` per coordinate, plus their integer noise divided by
    ``scale`` if they added any (``client_noise``). Byte counts cover every message:
    public keys, encrypted shares, masked vectors at ``bits`` bits per element, unmasking shares. Client
    times are what each client would spend computing (each counts its own mask expansions, even though
    the simulation expands each pairwise mask once); ``client_seconds`` is the mean over ``included``.
    """

    total: torch.Tensor | np.ndarray
    included: tuple[int, ...]
    max_quantization_error: float
    degree: int
    threshold: int
    bytes_sent_per_client: dict[int, int]
    bytes_received_per_client: dict[int, int]
    bytes_received_by_server: int
    bytes_sent_by_server: int
    client_seconds: float
    client_seconds_max: float
    server_seconds: float
    wall_seconds: float
    neighbours: dict[int, tuple[int, ...]]
    transcript: Transcript | None = None

    @property
    def mean_bytes_sent_per_client(self) -> float:
        """Mean bytes sent by the included clients."""
        return float(np.mean([self.bytes_sent_per_client[c] for c in self.included])) if self.included else 0.0


# --- The aggregator ---------------------------------------------------------------------------------------


class _Costs:
    """Seconds and bytes, per client and for the server."""

    def __init__(self, num_clients: int) -> None:
        self.client_seconds = np.zeros(num_clients)
        self.server_seconds = 0.0
        self.client_sent = np.zeros(num_clients, dtype=np.int64)
        self.client_received = np.zeros(num_clients, dtype=np.int64)
        self.server_received = 0
        self.server_sent = 0

    def upload(self, client: int, num_bytes: int) -> None:
        self.client_sent[client] += num_bytes
        self.server_received += num_bytes

    def download(self, client: int, num_bytes: int) -> None:
        self.client_received[client] += num_bytes
        self.server_sent += num_bytes


@dataclass
class _Run:
    """The state of one aggregation: who is who, the graph, the parties, the costs so far."""

    ids: list[int]  # client ids; index u in the protocol is ids[u]
    degree: int
    threshold: int
    neighbours: list[list[int]]
    edges: list[tuple[int, int]]
    sending: np.ndarray  # U3: masked input reached the server
    answering: np.ndarray  # U5: answers the unmasking round
    costs: _Costs
    transcript: Transcript | None
    session: bytes
    clients: list[SecureAggregationClient] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.ids)

    def holders(self, u: int) -> list[int]:
        """The closed neighbourhood of u: the holders of u's shares, u included."""
        return sorted([*self.neighbours[u], u])


class SecureAggregator:
    """Secure aggregation of clipped float vectors (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020).

    Inputs are quantized as q(x) = round(x * scale) mod 2^bits (two's complement), summed mod 2^bits and
    dequantized. Each |x_i| <= ||x||_2 <= clip_norm, so the exact integer sum over n clients has
    |sum| <= n (clip_norm * scale + 1/2), which must be < 2^(bits - 1): this is checked before any key is
    made. The result differs from the float sum by at most ``n * 0.5 / scale`` per coordinate (n: clients
    included), which is returned as ``max_quantization_error``.

    Not a :class:`~fedgen.mechanisms.Mechanism`: it draws no noise and records nothing in a ledger. Add DP
    noise to the securely aggregated sum (e.g. ``GaussianMechanism.release(result.total)``, noise added by
    a trusted party), or let each client add integer noise to its quantized input before masking
    (``aggregate(..., client_noise=...)``, distributed DP), and record that release in the ledger.

    Args:
        clip_norm: C; every input must have L2 norm <= C (clipping is the caller's job).
        scale: fixed-point scale; quantization error per client and coordinate is at most 0.5 / scale.
        bits: k, the modulus 2^k of the masked arithmetic (2..64). The default 32 makes a masked vector as
            large as the float32 one; raise it for many clients or a large ``clip_norm * scale``. The
            arithmetic runs on uint32 words for k <= 32, uint64 above; messages are counted at k bits.
        graph: ``"full"`` (every pair of clients masks; Bonawitz et al.) or ``"k_regular"`` (SecAgg+).
        degree: neighbours per client for ``"k_regular"`` (even); default the smallest even number
            >= 3 log2(n), the O(log n) of Bell et al.; the graph is complete when it reaches n - 1.
        threshold: t, shares needed to reconstruct a secret, out of the d + 1 holders (the d neighbours and
            the client itself). An int is a count, a float in (1/2, 1] a fraction of d + 1 (rounded up);
            default ceil(2 (d + 1) / 3). Must satisfy (d + 1) / 2 < t <= d + 1.
        seed: seeds the choice of the neighbour graph only; keys, seeds and masks always come from the OS.
        workers: threads for mask expansion (default: the CPU count).
    """

    def __init__(self, *, clip_norm: float, scale: float = 2.0**16, bits: int = 32, graph: GraphName = "full",
                 degree: int | None = None, threshold: float | int | None = None, seed: int | None = None,
                 workers: int | None = None) -> None:
        if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
            raise ConfigError("secure_aggregation.clip_norm", f"must be a positive number, got {clip_norm!r}",
                              "use the L2 norm to which the updates were clipped")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ConfigError("secure_aggregation.scale", f"must be a positive number, got {scale!r}",
                              "use e.g. 2**16")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 64:
            raise ConfigError("secure_aggregation.bits", f"must be an integer in [2, 64], got {bits!r}",
                              "use 32 or 64")
        if graph not in ("full", "k_regular"):
            raise ConfigError("secure_aggregation.graph", f"unknown graph {graph!r}", "use 'full' or 'k_regular'")
        if degree is not None:
            if graph != "k_regular":
                raise ConfigError("secure_aggregation.degree", "degree is only used with graph='k_regular'",
                                  "set graph='k_regular' or leave degree unset")
            if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2 or degree % 2:
                raise ConfigError("secure_aggregation.degree", f"must be an even integer >= 2, got {degree!r}",
                                  "use an even degree: the circulant graph joins degree / 2 clients on each side")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
                raise ConfigError("secure_aggregation.threshold", f"must be an int or a float, got {threshold!r}",
                                  "use a count of shares or a fraction in (0.5, 1]")
            if isinstance(threshold, float) and not 0.5 < threshold <= 1.0:
                raise ConfigError("secure_aggregation.threshold", f"a fraction must be in (0.5, 1], got {threshold}",
                                  "use e.g. 2/3 (more than half of each neighbourhood must agree to unmask)")
            if isinstance(threshold, int) and threshold < 2:
                raise ConfigError("secure_aggregation.threshold", f"a count must be >= 2, got {threshold}",
                                  "use more than half of each client's neighbourhood")
        if workers is not None and workers < 1:
            raise ConfigError("secure_aggregation.workers", f"must be >= 1, got {workers}", "use 1 or more threads")
        self.clip_norm = float(clip_norm)
        self.scale = float(scale)
        self.bits = bits
        self.graph = graph
        self.degree = degree
        self.threshold = threshold
        self.workers = workers or os.cpu_count() or 1
        self._rng = np.random.default_rng(seed)
        self.dtype = np.dtype(np.uint32 if bits <= 32 else np.uint64)
        self.modulus_mask = (1 << bits) - 1

    # --- parameters that depend on the number of clients ---

    def degree_for(self, num_clients: int) -> int:
        """d, the number of neighbours of each client among ``num_clients``."""
        if self.graph == "full":
            return num_clients - 1
        degree = self.degree
        if degree is None:
            degree = 2 * math.ceil(1.5 * math.log2(num_clients))
        return min(degree, num_clients - 1)

    def threshold_for(self, num_clients: int) -> int:
        """t, the shares (out of d + 1) needed to reconstruct a client's secret."""
        holders = self.degree_for(num_clients) + 1
        if self.threshold is None:
            t = math.ceil(2 * holders / 3)
        elif isinstance(self.threshold, float):
            t = math.ceil(self.threshold * holders)
        else:
            t = self.threshold
        if not holders / 2 < t <= holders:
            raise ConfigError("secure_aggregation.threshold",
                              f"t={t} is not in ({holders / 2:g}, {holders}] for neighbourhoods of {holders} "
                              f"(degree {holders - 1} plus the client) with {num_clients} clients",
                              f"use a threshold between {holders // 2 + 1} and {holders}, or raise the degree")
        return t

    def max_dropouts(self, num_clients: int) -> int:
        """The most clients that may drop out of ``num_clients`` in any pattern and still be recovered: a dropped
        client's secrets need ``t`` answers from the ``d + 1`` holders of its neighbourhood (itself among them), so
        ``d + 1 - t`` dropped anywhere leave every neighbourhood ``t``."""
        return self.degree_for(num_clients) + 1 - self.threshold_for(num_clients)

    def check_range(self, num_clients: int, noise_std: float = 0.0) -> None:
        """Raise ``ConfigError`` unless a sum of ``num_clients`` quantized inputs, plus integer noise of total
        standard deviation ``noise_std`` per coordinate (up to ``NOISE_TAIL_STDS`` of it), fits in ``bits`` bits."""
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
        bound = self.clip_norm * (1 + NORM_SLACK) * self.scale
        if bound > 2.0**52:
            raise ConfigError("secure_aggregation.scale",
                              f"clip_norm * scale = {bound:.3g} exceeds 2^52, where float64 rounding is inexact",
                              f"use scale <= {2.0**52 / (self.clip_norm * (1 + NORM_SLACK)):.4g}")
        tail = NOISE_TAIL_STDS * noise_std
        # |sum_u round(x_u * scale)| <= n (C scale + 1/2); the noise adds at most `tail` (but for a vanishing chance)
        worst = num_clients * (bound + 0.5) + tail
        if worst < 2.0 ** (self.bits - 1):
            return
        needed = self.bits
        while needed <= 64 and worst >= 2.0 ** (needed - 1):
            needed += 1
        max_scale = ((2.0 ** (self.bits - 1) - tail) / num_clients - 0.5) / (self.clip_norm * (1 + NORM_SLACK))
        noise = f" plus {NOISE_TAIL_STDS:g} noise standard deviations ({tail:.4g})" if tail else ""
        problem = (f"{num_clients} clients with clip_norm={self.clip_norm:g} and scale={self.scale:g}{noise} can sum "
                   f"to {worst:.4g} in absolute value, but {self.bits} bits hold only |sum| < 2^{self.bits - 1}")
        if needed <= 64:
            fix = f"use bits >= {needed}" + (f", or scale <= {max_scale:.4g}" if max_scale > 0 and not tail else "")
            raise ConfigError("secure_aggregation.bits", problem, fix)
        max_scale_64 = ((2.0**63 - tail) / num_clients - 0.5) / (self.clip_norm * (1 + NORM_SLACK))
        raise ConfigError("secure_aggregation.scale", problem + " (even 64 bits are too few)",
                          f"use scale <= {max_scale_64:.4g} with bits=64" if max_scale_64 > 0
                          else "aggregate fewer clients at once")

    def max_quantization_error(self, num_included: int) -> float:
        """Per-coordinate bound on |secure sum - float sum|: each rounding is off by at most 0.5 / scale."""
        return num_included * 0.5 / self.scale

    # --- fixed point ---

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """round(x * scale) mod 2^bits, two's complement, as ``self.dtype`` (high bits past ``bits`` are
        reduced when a masked vector is sent)."""
        return self.to_ring(np.rint(np.asarray(x, dtype=np.float64) * self.scale).astype(np.int64))

    def to_ring(self, q: np.ndarray) -> np.ndarray:
        """Signed integers (int64) mod 2^bits, two's complement, as ``self.dtype``."""
        q = np.asarray(q, dtype=np.int64).view(np.uint64)
        if self.bits < 64:
            q = q & np.uint64(self.modulus_mask)
        return q.astype(self.dtype)

    def dequantize(self, total: np.ndarray) -> np.ndarray:
        """Integers mod 2^bits, read as two's complement, divided by ``scale`` (float64)."""
        total = np.asarray(total)
        if self.bits == 64:
            signed = total.astype(np.uint64).view(np.int64)
        else:
            signed = (total.astype(np.int64) & self.modulus_mask)
            signed = np.where(signed >= 1 << (self.bits - 1), signed - (1 << self.bits), signed)
        return signed.astype(np.float64) / self.scale

    # --- the protocol ---

    def aggregate(self, updates: Mapping[int, torch.Tensor | np.ndarray], *,
                  dropped_before_masking: Collection[int] = frozenset(),
                  dropped_after_masking: Collection[int] = frozenset(),
                  keep_transcript: bool = False, client_noise: Mapping[int, np.ndarray] | None = None,
                  noise_std: float = 0.0) -> AggregationResult:
        """Run the four rounds for the clients ``updates`` names and return the sum and its cost.

        Every client advertises keys and shares them. Clients in ``dropped_before_masking`` then vanish
        before sending their masked input: their input is excluded and their pairwise masks are cancelled
        from their reconstructed mask keys. Clients in ``dropped_after_masking`` send their masked input
        (it is included) but vanish before unmasking. Raises ``SecureAggregationError`` if fewer than t
        holders of a needed secret survive, ``ConfigError`` if the range does not fit (before any key is
        made) and ``ValueError`` for inputs of L2 norm above ``clip_norm``. ``keep_transcript`` keeps what
        the server saw (public keys, relayed ciphertexts, masked inputs) in ``result.transcript``.

        ``client_noise`` (distributed DP) gives each client's integer noise (an integer array of its update's
        shape), which the client adds to its quantized input before masking; the total is then the sum of the
        included clients' inputs plus their noise, and a masked input is as uniform as without noise. Give
        ``noise_std``, the standard deviation per coordinate of the included clients' total noise: the range
        check reserves ``NOISE_TAIL_STDS`` of it. This simulation also checks the drawn total against that
        reserve before any key is made (``SecureAggregationError`` if it would wrap around), which a real
        server could not do; past the reserve the chance is negligible (see ``NOISE_TAIL_STDS``).
        """
        start = time.perf_counter()
        ids = sorted(updates)
        n = len(ids)
        if n < 3:
            raise ValueError(f"secure aggregation needs at least 3 clients, got {n}")
        if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in ids):
            raise ValueError("client ids must be integers")
        before, after = set(dropped_before_masking), set(dropped_after_masking)
        if not (before | after) <= set(ids):
            raise ValueError(f"dropped clients {sorted((before | after) - set(ids))} are not in updates")
        if before & after:
            raise ValueError(f"clients {sorted(before & after)} are listed as dropped both before and after masking")
        self.check_range(n, noise_std)
        degree, threshold = self.degree_for(n), self.threshold_for(n)
        vectors, shape, as_torch = self._check_inputs(updates, ids)
        noise = None if client_noise is None else self._check_noise(client_noise, ids, shape, before, noise_std)

        neighbours, edges = neighbour_graph(n, degree, self._rng)
        sending = np.array([c not in before for c in ids])
        answering = sending & np.array([c not in after for c in ids])
        run = _Run(ids=ids, degree=degree, threshold=threshold, neighbours=neighbours, edges=edges, sending=sending,
                   answering=answering, costs=_Costs(n), transcript=Transcript() if keep_transcript else None,
                   session=os.urandom(16))
        self._advertise_keys(run)
        self._share_keys(run)
        masked_sum = self._collect_masked_inputs(run, vectors, noise)
        self._check_senders_connected(run)
        total = self._unmask(run, masked_sum)

        senders = np.flatnonzero(run.sending)
        costs = run.costs
        out = total.reshape(shape)
        return AggregationResult(
            total=torch.from_numpy(out) if as_torch else out, included=tuple(ids[u] for u in senders),
            max_quantization_error=self.max_quantization_error(senders.size), degree=degree, threshold=threshold,
            bytes_sent_per_client={ids[u]: int(costs.client_sent[u]) for u in range(n)},
            bytes_received_per_client={ids[u]: int(costs.client_received[u]) for u in range(n)},
            bytes_received_by_server=costs.server_received, bytes_sent_by_server=costs.server_sent,
            client_seconds=float(costs.client_seconds[senders].mean()) if senders.size else 0.0,
            client_seconds_max=float(costs.client_seconds.max()), server_seconds=costs.server_seconds,
            wall_seconds=time.perf_counter() - start,
            neighbours={ids[u]: tuple(ids[v] for v in neighbours[u]) for u in range(n)}, transcript=run.transcript)

    def _advertise_keys(self, run: _Run) -> None:
        """Round 0: each client makes its key pairs and b_u and sends (c^PK, s^PK); the server relays each
        client's neighbours' keys to it."""
        costs = run.costs
        for u in range(run.n):
            t0 = time.perf_counter()
            run.clients.append(SecureAggregationClient(index=u, session=run.session))
            costs.client_seconds[u] += time.perf_counter() - t0
            costs.upload(u, 2 * PUBLIC_KEY_BYTES)
            if run.transcript is not None:
                run.transcript.public_keys[run.ids[u]] = (run.clients[u].c_public, run.clients[u].s_public)
        t0 = time.perf_counter()
        keys = [(c.c_public, c.s_public) for c in run.clients]
        peer_keys = [{v: keys[v] for v in run.neighbours[u]} for u in range(run.n)]
        costs.server_seconds += time.perf_counter() - t0
        for u in range(run.n):
            costs.download(u, run.degree * (ID_BYTES + 2 * PUBLIC_KEY_BYTES))
            t0 = time.perf_counter()
            run.clients[u].learn_peers(peer_keys[u])
            costs.client_seconds[u] += time.perf_counter() - t0

    def _share_keys(self, run: _Run) -> None:
        """Round 1: each client shares s^SK and b_u among its neighbourhood, encrypted to each holder; the
        server relays the ciphertexts."""
        costs = run.costs
        inboxes: list[dict[int, bytes]] = [{} for _ in range(run.n)]
        for u in range(run.n):
            t0 = time.perf_counter()
            sealed = run.clients[u].share_keys(run.holders(u), run.threshold)
            costs.client_seconds[u] += time.perf_counter() - t0
            costs.upload(u, len(sealed) * (ID_BYTES + CIPHERTEXT_BYTES))
            t0 = time.perf_counter()
            for v, blob in sealed.items():
                inboxes[v][u] = blob
            costs.server_seconds += time.perf_counter() - t0
            if run.transcript is not None:
                run.transcript.ciphertexts.update({(run.ids[u], run.ids[v]): blob for v, blob in sealed.items()})
        for v in range(run.n):
            costs.download(v, len(inboxes[v]) * (ID_BYTES + CIPHERTEXT_BYTES))
            t0 = time.perf_counter()
            run.clients[v].receive_shares(inboxes[v])
            costs.client_seconds[v] += time.perf_counter() - t0

    def _collect_masked_inputs(self, run: _Run, vectors: list[np.ndarray], noise: list[np.ndarray] | None
                               ) -> np.ndarray:
        """Round 2: each sender agrees on a seed with every neighbour, masks its quantized input and sends
        it; the server sums what arrives (mod 2^bits)."""
        plan = []
        for a, b in run.edges:
            if not (run.sending[a] or run.sending[b]):
                continue
            seeds = []
            for u, v in ((a, b), (b, a)):
                if run.sending[u]:
                    t0 = time.perf_counter()
                    seeds.append(run.clients[u].mask_seed(v))
                    run.costs.client_seconds[u] += time.perf_counter() - t0
            if len(seeds) == 2 and seeds[0] != seeds[1]:
                raise SecureAggregationError(f"clients {run.ids[a]} and {run.ids[b]} derived different mask seeds")
            plan.append((a, b, seeds[0]))
        m = vectors[0].size
        if run.transcript is not None:
            run.transcript.masked_inputs = {run.ids[u]: np.empty(m, dtype=self.dtype)
                                            for u in np.flatnonzero(run.sending)}
        masked_sum = self._run_chunks(m, lambda lo, hi: self._mask_chunk(lo, hi, run, vectors, plan, noise),
                                      run.costs)
        for u in np.flatnonzero(run.sending):
            run.costs.upload(u, math.ceil(m * self.bits / 8))
        return masked_sum

    @staticmethod
    def _check_senders_connected(run: _Run) -> None:
        """Before any share is revealed: the clients that sent masked inputs must form one connected group of the
        neighbour graph. Pairwise masks cancel inside any group with no sending neighbour outside it, so once the
        self-masks are revealed the server could sum each group's masked inputs into that group's own sum
        (possible on a sparse graph when clients drop before masking; the complete graph never splits)."""
        senders = set(np.flatnonzero(run.sending).tolist())
        if not senders:
            return
        start = min(senders)
        reached, frontier = {start}, [start]
        while frontier:
            u = frontier.pop()
            for v in run.neighbours[u]:
                if v in senders and v not in reached:
                    reached.add(v)
                    frontier.append(v)
        if reached != senders:
            raise SecureAggregationError(
                f"the {len(senders)} clients that sent masked inputs are split into unconnected groups of the "
                f"neighbour graph (one of {len(reached)}); revealing their self-masks would give the server each "
                "group's own sum, so the round stops before any share is revealed. Use a larger degree, or the "
                "full graph")

    def _unmask(self, run: _Run, masked_sum: np.ndarray) -> np.ndarray:
        """Round 4: survivors reveal s-shares of neighbours that sent nothing and b-shares of those that
        did; the server reconstructs, removes the masks that do not cancel and dequantizes."""
        costs, n = run.costs, run.n
        s_shares: list[dict[int, np.ndarray]] = [{} for _ in range(n)]
        b_shares: list[dict[int, np.ndarray]] = [{} for _ in range(n)]
        for w in np.flatnonzero(run.answering).tolist():
            dropped, survived = self._unmask_request(run.holders(w), run.sending)
            costs.download(w, (len(dropped) + len(survived)) * ID_BYTES)
            t0 = time.perf_counter()
            s_w, b_w = run.clients[w].reveal(dropped=dropped, survived=survived)
            costs.client_seconds[w] += time.perf_counter() - t0
            costs.upload(w, (len(s_w) + len(b_w)) * (ID_BYTES + SHARE_BYTES))
            for v, share in s_w.items():
                s_shares[v][w] = share
            for v, share in b_w.items():
                b_shares[v][w] = share

        t0 = time.perf_counter()
        self_seeds = [self._reconstruct(b_shares[u], run, u, "self-mask seed b") for u in np.flatnonzero(run.sending)]
        pair_seeds = []
        for v in range(n):
            masked_peers = [u for u in run.neighbours[v] if run.sending[u]]
            if run.sending[v] or not masked_peers:
                continue
            key = X25519PrivateKey.from_private_bytes(self._reconstruct(s_shares[v], run, v, "mask key s^SK"))
            if key.public_key().public_bytes_raw() != run.clients[v].s_public:
                raise SecureAggregationError(f"the reconstructed mask key of client {run.ids[v]} does not match its "
                                             "advertised public key")
            for u in masked_peers:
                seed = derive_key(key, run.clients[u].s_public, session=run.session, info=_MASK_INFO)
                pair_seeds.append((seed, u < v))  # u added PRG(s_uv) if u < v, else subtracted it
        costs.server_seconds += time.perf_counter() - t0
        total = np.empty(masked_sum.size, dtype=np.float64)
        self._run_chunks(masked_sum.size, lambda lo, hi: self._unmask_chunk(
            lo, hi, masked_sum, total, self_seeds, pair_seeds), costs)
        return total

    def _check_inputs(self, updates: Mapping[int, torch.Tensor | np.ndarray], ids: list[int]
                      ) -> tuple[list[np.ndarray], tuple[int, ...], bool]:
        vectors, shape, as_torch = [], None, False
        for cid in ids:
            x = updates[cid]
            if isinstance(x, torch.Tensor):
                as_torch = True
                x = x.detach().cpu()
                x = (x.double() if x.dtype == torch.bfloat16 else x).numpy()
            x = np.asarray(x)
            if shape is None:
                shape = x.shape
            if x.shape != shape:
                raise ValueError(f"client {cid}'s update has shape {x.shape}, others have {shape}")
            if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
                raise ValueError(f"client {cid}'s update has dtype {x.dtype}; give a float vector")
            flat = x.reshape(-1)
            norm = math.sqrt(float(np.dot(flat, flat))) if flat.dtype == np.float64 else \
                float(np.linalg.norm(flat.astype(np.float64)))
            if not norm <= self.clip_norm * (1 + NORM_SLACK):
                raise ValueError(f"client {cid}'s update has L2 norm {norm:.6g} > clip_norm={self.clip_norm:g}; clip "
                                 "it first (fedgen.mechanisms.clip_rows); secure aggregation does not clip")
            vectors.append(flat)
        if vectors[0].size == 0:
            raise ValueError("updates are empty")
        return vectors, shape, as_torch

    def _check_noise(self, client_noise: Mapping[int, np.ndarray], ids: list[int], shape: tuple[int, ...],
                     before: set[int], noise_std: float) -> list[np.ndarray]:
        """Every client's noise as a flat int64 vector (in protocol order), after checking that the senders'
        total stays within the range check's reserve of ``NOISE_TAIL_STDS * noise_std``."""
        if set(client_noise) != set(ids):
            raise ValueError(f"client_noise must give noise for exactly the clients in updates; missing "
                             f"{sorted(set(ids) - set(client_noise))}, unknown {sorted(set(client_noise) - set(ids))}")
        noise = []
        for cid in ids:
            z = np.asarray(client_noise[cid])
            if not np.issubdtype(z.dtype, np.integer):
                raise ValueError(f"client {cid}'s noise has dtype {z.dtype}; integer noise is required (e.g. Skellam)")
            if z.shape != shape:
                raise ValueError(f"client {cid}'s noise has shape {z.shape}, its update has {shape}")
            noise.append(z.astype(np.int64).reshape(-1))
        total = np.sum([z for cid, z in zip(ids, noise, strict=True) if cid not in before], axis=0)
        reserve = NOISE_TAIL_STDS * noise_std
        if np.any(np.abs(total) > reserve):
            raise SecureAggregationError(
                f"the clients' total noise reaches {int(np.abs(total).max())} on a coordinate, beyond the range "
                f"check's reserve of {NOISE_TAIL_STDS:g} x noise_std = {reserve:.4g}; pass the noise's true standard "
                "deviation as noise_std")
        return noise

    @staticmethod
    def _unmask_request(holders: list[int], sending: np.ndarray) -> tuple[list[int], list[int]]:
        """What the server asks a survivor for: s-shares of its neighbours that never sent a masked input,
        b-shares of those (itself included) that did."""
        return [v for v in holders if not sending[v]], [v for v in holders if sending[v]]

    @staticmethod
    def _reconstruct(shares: dict[int, np.ndarray], run: _Run, client: int, what: str) -> bytes:
        """A client's secret from the first t shares revealed, or a loud failure if fewer arrived."""
        if len(shares) < run.threshold:
            raise SecureAggregationError(
                f"cannot reconstruct the {what} of client {run.ids[client]}: {len(shares)} of its "
                f"{len(run.holders(client))} share holders answered the unmasking round, {run.threshold} are "
                "needed (too many dropouts)")
        chosen = sorted(shares)[:run.threshold]
        limbs = shamir_reconstruct([w + 1 for w in chosen], np.stack([shares[w] for w in chosen]))
        return field_to_secret(limbs)

    def _run_chunks(self, m: int, task, costs: _Costs) -> np.ndarray | None:
        """Run ``task(lo, hi)`` over coordinate chunks (threads when there are several), merging its costs."""
        bounds = [(lo, min(lo + CHUNK_ELEMENTS, m)) for lo in range(0, m, CHUNK_ELEMENTS)]
        if len(bounds) == 1 or self.workers == 1:
            outputs = [task(lo, hi) for lo, hi in bounds]
        else:
            with ThreadPoolExecutor(max_workers=min(self.workers, len(bounds))) as pool:
                outputs = list(pool.map(lambda bound: task(*bound), bounds))
        for _, client_seconds, server_seconds in outputs:
            if client_seconds is not None:
                costs.client_seconds += client_seconds
            costs.server_seconds += server_seconds
        if outputs[0][0] is None:
            return None
        return np.concatenate([chunk for chunk, _, _ in outputs])

    def _mask_chunk(self, lo: int, hi: int, run: _Run, vectors: list[np.ndarray],
                    plan: list[tuple[int, int, bytes]], noise: list[np.ndarray] | None
                    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Coordinates lo..hi of every sender's masked input y_u, and of the server's running sum of them.

        Each pairwise mask is expanded once and applied to both ends (+ at the lower index, - at the
        higher); both ends are charged the expansion, as each would compute it itself.
        """
        count = hi - lo
        clients, sending, transcript = run.clients, run.sending, run.transcript
        client_seconds = np.zeros(run.n)
        server_seconds = 0.0
        self_buffer = np.empty(count * self.dtype.itemsize + 16, dtype=np.uint8)
        pair_buffer = np.empty_like(self_buffer)
        zeros = bytes(count * self.dtype.itemsize)
        server_sum = np.zeros(count, dtype=self.dtype)
        live: dict[int, np.ndarray] = {}
        remaining = {u: run.degree for u in np.flatnonzero(sending).tolist()}
        narrow = self.bits not in (32, 64)

        def masked(u: int) -> np.ndarray:
            y = live.get(u)
            if y is None:
                y = self.quantize(vectors[u][lo:hi])
                if noise is not None:  # the client's own noise, added before any mask
                    y += self.to_ring(noise[u][lo:hi])
                y += prg(clients[u].self_mask_seed, lo, count, self.dtype, out=self_buffer, zeros=zeros)
                live[u] = y
            return y

        for a, b, seed in plan:
            t0 = time.perf_counter()
            mask = prg(seed, lo, count, self.dtype, out=pair_buffer, zeros=zeros)
            expand = time.perf_counter() - t0
            for u, add in ((a, True), (b, False)):
                if not sending[u]:
                    continue
                t0 = time.perf_counter()
                y = masked(u)
                if add:
                    y += mask
                else:
                    y -= mask
                remaining[u] -= 1
                done = remaining[u] == 0
                if done and narrow:
                    y &= self.dtype.type(self.modulus_mask)
                client_seconds[u] += expand + time.perf_counter() - t0
                if done:  # y_u is complete: it goes to the server
                    t0 = time.perf_counter()
                    server_sum += y
                    server_seconds += time.perf_counter() - t0
                    if transcript is not None:
                        transcript.masked_inputs[run.ids[u]][lo:hi] = y
                    del live[u]
        return server_sum, client_seconds, server_seconds

    def _unmask_chunk(self, lo: int, hi: int, masked_sum: np.ndarray, total: np.ndarray,
                      self_seeds: list[bytes], pair_seeds: list[tuple[bytes, bool]]
                      ) -> tuple[None, None, float]:
        """Server: remove the self-masks and the dropped clients' pairwise masks from lo..hi, dequantize."""
        t0 = time.perf_counter()
        count = hi - lo
        scratch = np.empty(count * self.dtype.itemsize + 16, dtype=np.uint8)
        zeros = bytes(count * self.dtype.itemsize)
        chunk = masked_sum[lo:hi].copy()
        for seed in self_seeds:
            chunk -= prg(seed, lo, count, self.dtype, out=scratch, zeros=zeros)
        for seed, peer_added in pair_seeds:
            mask = prg(seed, lo, count, self.dtype, out=scratch, zeros=zeros)
            if peer_added:
                chunk -= mask
            else:
                chunk += mask
        total[lo:hi] = self.dequantize(chunk)
        return None, None, time.perf_counter() - t0
