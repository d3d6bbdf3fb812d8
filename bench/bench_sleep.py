"""Lease pipelining: 200 calls of time.sleep(0.05) on 2 workers, Burla beside multiprocessing.Pool(2).

    python bench/bench_sleep.py [--rounds 3] [--calls 200] [--seconds 0.05]

Efficiency = (calls * seconds / 2) / wall: 1.0 means no worker ever idled while inputs were pending.
Burla runs its embedded local cluster (BURLA_EMBEDDED_WORKERS=2) in a fresh BURLA_HOME; each round
times one map of each system, alternating, and the median of the rounds is printed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

WORKERS = 2


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def warm(x: float) -> float:
    return x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=0.05)
    args = parser.parse_args()
    home = tempfile.mkdtemp(prefix="burla-bench-sleep-")
    os.environ.update(BURLA_HOME=home, BURLA_EMBEDDED_WORKERS=str(WORKERS))
    os.environ.pop("BURLA_CLUSTER_URL", None)
    from burla import _local, remote_parallel_map

    ideal = args.calls * args.seconds / WORKERS
    inputs = [args.seconds] * args.calls
    pool = multiprocessing.Pool(WORKERS)
    try:
        # warm: the cluster is up; nap's call time is not known yet, so round 1 starts with a probe
        remote_parallel_map(warm, [0.0] * 4, spinner=False)
        pool.map(warm, [0.0] * 4)
        figures: dict[str, list[float]] = {"burla": [], "multiprocessing": []}
        cpu: list[float] = []
        for _ in range(args.rounds):
            t, c = time.perf_counter(), time.process_time()
            assert remote_parallel_map(nap, inputs, spinner=False) == inputs
            figures["burla"].append(ideal / (time.perf_counter() - t))
            cpu.append(time.process_time() - c)
            t = time.perf_counter()
            assert pool.map(nap, inputs, chunksize=1) == inputs
            figures["multiprocessing"].append(ideal / (time.perf_counter() - t))
    finally:
        pool.terminate()
        _local.stop()
    for system, effs in figures.items():
        print(f"{system}: efficiency median {statistics.median(effs):.3f} "
              f"(runs {', '.join(f'{e:.3f}' for e in effs)})")  # fmt: skip
    print(f"burla client CPU per map: {statistics.median(cpu):.3f} s")
    ratio = statistics.median(figures["burla"]) / statistics.median(figures["multiprocessing"])
    print(f"burla / multiprocessing: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
