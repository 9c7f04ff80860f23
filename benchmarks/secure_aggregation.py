"""Secure aggregation benchmark: time and communication of the simulated protocol, full vs k-regular graph.

For each number of clients n, vector length m and graph, runs one aggregation (no dropouts unless
``--dropout`` is given) and prints a markdown table: server seconds, mean seconds per client (each client's
own key agreement, sharing, encryption and mask expansion), simulation wall seconds, and bytes sent per
client over the bytes of the plain float32 vector (communication expansion). Every row checks the secure
sum against the plain sum.

The full graph costs O(n^2) key agreements and O(n^2 m) mask elements in all; its rows are skipped by
default when the estimated work, n(n-1)/2 * (m + 250,000) elements (key agreement and share encryption per
pair count as about 250,000 mask elements on a CPU), exceeds ``--max-full-work``. Usage:

    python benchmarks/secure_aggregation.py --clients 10 100 1000 --params 10000 1000000
    python benchmarks/secure_aggregation.py --clients 1000 --params 1000000 --graphs k_regular
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from fedgen.mechanisms.secure_aggregation import SecureAggregator

PAIR_OVERHEAD_ELEMENTS = 250_000


def run_row(n: int, m: int, graph: str, args: argparse.Namespace) -> str:
    rng = np.random.default_rng(0)
    # A few distinct unit-norm vectors, shared by the clients, keep the inputs' memory small at n = 1000.
    pool = rng.normal(size=(min(n, 8), m)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True) * (1 + 1e-6)
    updates = {c: pool[c % len(pool)] for c in range(n)}
    dropped = set(rng.choice(n, size=int(args.dropout * n), replace=False).tolist())
    before = {c for i, c in enumerate(sorted(dropped)) if i % 2 == 0}
    agg = SecureAggregator(clip_norm=1.0, scale=args.scale, bits=args.bits, graph=graph, seed=0,
                           workers=args.workers)
    start = time.perf_counter()
    result = agg.aggregate(updates, dropped_before_masking=before, dropped_after_masking=dropped - before)
    wall = time.perf_counter() - start
    plain = sum(pool[c % len(pool)].astype(np.float64) for c in result.included)
    error = float(np.abs(result.total - plain).max())
    if error > result.max_quantization_error + 1e-9:
        raise AssertionError(f"secure sum off by {error} > bound {result.max_quantization_error}")
    expansion = result.mean_bytes_sent_per_client / (4 * m)
    return (f"| {n} | {m:g} | {graph} | {result.degree} | {result.threshold} | {result.server_seconds:.2f} | "
            f"{result.client_seconds:.3f} | {wall:.1f} | {result.mean_bytes_sent_per_client / 1e6:.3f} | "
            f"{expansion:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--params", nargs="+", type=float, default=[1e4, 1e6])
    parser.add_argument("--graphs", nargs="+", choices=["full", "k_regular"], default=["full", "k_regular"])
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--scale", type=float, default=2.0**16)
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="fraction of clients that drop (half before, half after sending their masked input)")
    parser.add_argument("--workers", type=int, default=None, help="threads for mask expansion (default: CPUs)")
    parser.add_argument("--max-full-work", type=float, default=1e10,
                        help="skip full-graph rows whose estimated work n(n-1)/2 (m + 250k) exceeds this")
    parser.add_argument("--no-skip", action="store_true", help="run every row, however slow")
    args = parser.parse_args()
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; bits={args.bits}, "
          f"scale={args.scale:g}, dropout={args.dropout:g}\n")
    print("| clients | params | graph | degree | threshold | server s | client s (mean) | wall s | "
          "MB sent / client | sent / float32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.clients:
        for m in (int(p) for p in args.params):
            for graph in args.graphs:
                work = n * (n - 1) / 2 * (m + PAIR_OVERHEAD_ELEMENTS)
                if graph == "full" and not args.no_skip and work > args.max_full_work:
                    print(f"| {n} | {m:g} | {graph} | {n - 1} | | skipped (cost O(n^2 m)) | | | | |", flush=True)
                    continue
                print(run_row(n, m, graph, args), flush=True)


if __name__ == "__main__":
    main()
