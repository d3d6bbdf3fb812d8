"""The core benchmark: Burla's embedded default beside multiprocessing, Dask and Ray.

    python bench/bench_core.py [--quick] [--peers burla,multiprocessing,dask,ray] [--peer-python PY] [--json OUT]
                               [--figures cold,warm,many,bytes,sleep] [--repeat N]

Every system gets 2 workers on this machine and is called the way its users
call it (one task per input). Each figure is measured in a fresh Python
process, so one system's leftovers never slow another. Figures:

  1. warm:   median time of a 4-input trivial map on a warm cluster, to all results
  2. many:   wall time and inputs/s for 100,000 and 1,000,000 trivial inputs (x * 2)
  3. bytes:  MB/s moving 64 inputs of 4 MiB each (the function returns len(x))
  4. sleep:  200 calls of time.sleep(0.05): efficiency = ideal wall time (5 s on 2 workers) / wall time
  5. cold:   from nothing running to the results of a 4-input map

Then the aims of issue 12, each a ratio to a peer measured in the same run, marked met or not.

Dask and Ray are measured only when installed (pip install burla[bench]) in the interpreter of
--peer-python (default: this one; e.g. a separate venv with dask[distributed] and ray), which runs
the peers; Burla runs in this interpreter. A measurement that runs past --timeout seconds is
reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

WORKERS = 2

COMMON = """
import json, os, statistics, sys, time
def double(x):
    return x * 2
def size(x):
    return len(x)
def nap(x):
    time.sleep(0.05)
    return x
def report(**figures):
    print("RESULT " + json.dumps(figures), flush=True)
"""

# Each system: setup code (run before timing), then the code of each figure.
# `run(fn, inputs)` must return the results of fn over inputs, in order.
SYSTEMS: dict[str, dict[str, str]] = {
    "burla": {
        "setup": """
from burla import remote_parallel_map
def run(fn, inputs):
    return remote_parallel_map(fn, inputs, spinner=False)
run(double, range(4))
""",
        "cold": """
t = time.perf_counter()
from burla import remote_parallel_map
out = remote_parallel_map(double, range(4), spinner=False)
report(cold=time.perf_counter() - t)
""",
        "teardown": "from burla import _local; _local.stop()",
    },
    "multiprocessing": {
        "setup": """
import multiprocessing
pool = multiprocessing.Pool(2)
def run(fn, inputs):
    return pool.map(fn, inputs)
run(double, range(4))
""",
        "cold": """
import multiprocessing
t = time.perf_counter()
pool = multiprocessing.Pool(2)
out = pool.map(double, range(4))
report(cold=time.perf_counter() - t)
pool.terminate()
""",
        "teardown": "pool.terminate()",
    },
    "dask": {
        "setup": """
import logging
logging.disable(logging.WARNING)
from dask.distributed import Client, LocalCluster
client = Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None))
def run(fn, inputs):
    return client.gather(client.map(fn, list(inputs), pure=False))
run(double, range(4))
""",
        "cold": """
import logging
logging.disable(logging.WARNING)
from dask.distributed import Client, LocalCluster
t = time.perf_counter()
client = Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None))
out = client.gather(client.map(double, range(4), pure=False))
report(cold=time.perf_counter() - t)
client.close()
""",
        "teardown": "client.close()",
    },
    "ray": {
        "setup": """
import logging
import ray
ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
_remote = {}
def run(fn, inputs):
    f = _remote.get(fn) or _remote.setdefault(fn, ray.remote(fn))
    return ray.get([f.remote(x) for x in inputs])
run(double, range(4))
""",
        "cold": """
import logging
import ray
t = time.perf_counter()
ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
f = ray.remote(double)
out = ray.get([f.remote(x) for x in range(4)])
report(cold=time.perf_counter() - t)
ray.shutdown()
""",
        "teardown": "ray.shutdown()",
    },
}

FIGURES = {
    "warm": """
times = []
for _ in range({repeats}):
    t = time.perf_counter()
    assert run(double, range(4)) == [0, 2, 4, 6]
    times.append(time.perf_counter() - t)
report(warm=statistics.median(times), warm_min=min(times))
""",
    "many": """
n = {n}
t = time.perf_counter()
out = run(double, range(n))
dt = time.perf_counter() - t
assert len(out) == n and out[-1] == 2 * (n - 1)
report(n=n, seconds=dt, per_second=n / dt)
""",
    "bytes": """
data = [os.urandom(4 * 1024 * 1024) for _ in range(64)]
t = time.perf_counter()
out = run(size, data)
dt = time.perf_counter() - t
assert out == [4 * 1024 * 1024] * 64
report(seconds=dt, mb_per_second=64 * 4 * 1.048576 / dt)
""",
    "sleep": """
t = time.perf_counter()
out = run(nap, range(200))
dt = time.perf_counter() - t
assert out == list(range(200))
report(seconds=dt, efficiency=200 * 0.05 / {workers} / dt)
""",
}

# The aims of issue 12: (what, figure, field, peer, how Burla's figure compares to the peer's, bound).
# "ratio<=": Burla's / the peer's at most the bound; "ratio>=": at least; "atleast": Burla's at least the
# peer's and at least the bound.
AIMS = [
    ("warm 4-input map vs Ray", "warm", "warm", "ray", "ratio<=", 0.5),
    ("sleep efficiency vs multiprocessing", "sleep", "efficiency", "multiprocessing", "atleast", 0.98),
    ("64 x 4 MiB MB/s vs Ray", "bytes", "mb_per_second", "ray", "ratio>=", 1.2),
    ("cold start vs Dask", "cold", "cold", "dask", "ratio<=", 0.5),
    ("1,000,000 inputs vs multiprocessing.Pool.map", "many_1000000", "seconds", "multiprocessing", "ratio<=", 2.0),
]


def aims(rows: dict[str, dict[str, Any]]) -> list[str]:
    """One line per aim: Burla's figure beside the peer's of the same run, the ratio, met or not."""
    lines = []
    for what, figure, field, peer, how, bound in AIMS:
        ours = rows.get("burla", {}).get(figure, {}).get(field)
        theirs = rows.get(peer, {}).get(figure, {}).get(field)
        if ours is None or theirs is None or not theirs:
            lines.append(f"{what}: not measured in this run")
            continue
        ratio = ours / theirs
        if how == "atleast":
            met = ours >= theirs and ours >= bound
            aim = f"at least {peer}'s and at least {bound}"
            shown = f"Burla {ours:.3f}, {peer} {theirs:.3f} ({ratio:.2f}x)"
        else:
            met = ratio <= bound if how == "ratio<=" else ratio >= bound
            aim = f"{'at most' if how == 'ratio<=' else 'at least'} {bound}x"
            shown = f"{ratio:.2f}x (Burla {ours:.4g}, {peer} {theirs:.4g})"
        lines.append(f"{what}: {shown}; aim {aim}: {'met' if met else 'NOT met'}")
    return lines


PYTHON: dict[str, str] = {}  # system -> the interpreter that runs it (main() sets the peers')


def python(system: str) -> str:
    return PYTHON.get(system, sys.executable)


def available(system: str) -> bool:
    module = {"dask": "distributed", "ray": "ray"}.get(system)
    if module is None:
        return True
    return subprocess.run([python(system), "-c", f"import {module}"], capture_output=True).returncode == 0


def measure(system: str, figure: str, timeout: float, home: str, **params: Any) -> dict[str, Any]:
    spec = SYSTEMS[system]
    if figure == "cold":
        body = COMMON + spec["cold"]
    else:
        body = COMMON + spec["setup"] + FIGURES[figure].format(**params) + spec.get("teardown", "")
    script = textwrap.dedent(body)
    env = {**os.environ, "BURLA_HOME": home, "BURLA_EMBEDDED_WORKERS": str(WORKERS)}
    env.pop("BURLA_CLUSTER_URL", None)
    if figure == "cold" and system == "burla":
        subprocess.run([sys.executable, "-m", "burla.cli", "local", "stop"], env=env, capture_output=True)
    started = time.monotonic()
    try:
        proc = subprocess.run([python(system), "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        _cleanup(system, env)
        return {"error": f"did not finish in {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"failed after {time.monotonic() - started:.0f}s: {' | '.join(tail)}"}


def _cleanup(system: str, env: dict[str, str]) -> None:
    if system == "burla":
        subprocess.run([sys.executable, "-m", "burla.cli", "local", "stop"], env=env, capture_output=True)
    elif system == "ray":
        subprocess.run([python(system), "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


ALL_FIGURES = ("cold", "warm", "many", "bytes", "sleep")
NOT_RUN = {"error": "not run"}
_MEDIAN_OF = {"cold": "cold", "warm": "warm", "bytes": "mb_per_second", "sleep": "efficiency", "many": "seconds"}


def _median(figure: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median figure (the lower middle one of an even count), its other fields with it;
    the first error if no round finished."""
    good = sorted((r for r in results if "error" not in r), key=lambda r: float(r[_MEDIAN_OF[figure.split("_")[0]]]))
    return good[(len(good) - 1) // 2] if good else results[0]


def fmt(result: dict[str, Any], key: str, scale: float = 1.0, unit: str = "", digits: int = 1) -> str:
    if "error" in result:
        return result["error"]
    return f"{result[key] * scale:,.{digits}f}{unit}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", default="burla,multiprocessing,dask,ray")
    parser.add_argument("--quick", action="store_true", help="skip the 1,000,000-input run")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a measurement is abandoned")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--figures", default=",".join(ALL_FIGURES),
                        help="measure only these figures (comma-separated: cold,warm,many,bytes,sleep)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure each figure this many times, alternating the systems; the median is shown")  # fmt: skip
    parser.add_argument(
        "--peer-python",
        default=os.environ.get("BURLA_BENCH_PEER_PYTHON", ""),
        help="the interpreter that runs multiprocessing, Dask and Ray (default: $BURLA_BENCH_PEER_PYTHON, or this one)",
    )
    args = parser.parse_args()
    figures = [f for f in args.figures.split(",") if f]
    unknown = sorted(set(figures) - set(ALL_FIGURES))
    if unknown or args.repeat < 1:
        parser.error(
            f"unknown figure(s) {unknown}: choose from {','.join(ALL_FIGURES)}" if unknown else "--repeat: at least 1"
        )
    if args.peer_python:
        PYTHON.update(dict.fromkeys(("multiprocessing", "dask", "ray"), args.peer_python))
    systems = [s for s in args.peers.split(",") if s]
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    for system in [s for s in systems if not available(s)]:
        print(f"{system}: not installed, skipped (pip install burla[bench])", file=sys.stderr)
        systems.remove(system)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in systems}
    with tempfile.TemporaryDirectory(prefix="burla-bench-") as home:
        for round_ in range(args.repeat):  # the systems alternate, so a noisy minute hits them all alike
            for system in systems:
                print(f"measuring {system}{f' (round {round_ + 1})' if args.repeat > 1 else ''}...", file=sys.stderr)
                row = runs[system]
                if "cold" in figures:
                    row.setdefault("cold", []).append(measure(system, "cold", args.timeout, home))
                if "warm" in figures:
                    row.setdefault("warm", []).append(measure(system, "warm", args.timeout, home, repeats=50))
                if "many" in figures:
                    for n in sizes:
                        row.setdefault(f"many_{n}", []).append(measure(system, "many", args.timeout, home, n=n))
                for figure in ("bytes", "sleep"):
                    if figure in figures:
                        row.setdefault(figure, []).append(measure(system, figure, args.timeout, home, workers=WORKERS))
                _cleanup(system, {**os.environ, "BURLA_HOME": home})
    rows = {
        system: {figure: _median(figure, results) for figure, results in row.items()} for system, row in runs.items()
    }
    print(f"\nBurla core benchmark, {time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {WORKERS} workers per system\n")  # fmt: skip
    header = ["system", "warm 4-input map", *[f"{n:,} inputs" for n in sizes], "64 x 4 MiB", "sleep efficiency",
              "cold start"]  # fmt: skip
    table = [header, ["-" * len(h) for h in header]]
    for system, row in rows.items():
        many = []
        for n in sizes:
            r = row.get(f"many_{n}", NOT_RUN)
            many.append(r["error"] if "error" in r else f"{r['seconds']:.2f} s ({r['per_second']:,.0f}/s)")
        table.append([
            system,
            fmt(row.get("warm", NOT_RUN), "warm", 1000, " ms", 2),
            *many,
            fmt(row.get("bytes", NOT_RUN), "mb_per_second", 1, " MB/s", 0),
            fmt(row.get("sleep", NOT_RUN), "efficiency", 1, "", 3),
            fmt(row.get("cold", NOT_RUN), "cold", 1, " s", 2),
        ])  # fmt: skip
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    for r in table:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    print("\nAims (issue 12), each against the peer measured in this run:")
    for line in aims(rows):
        print(f"  {line}")
    if args.repeat > 1:
        print(f"\n(medians of {args.repeat} rounds; every round's figures are in --json)")
    if args.json:
        with open(args.json, "w") as f:
            out = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "rows": rows, "aims": aims(rows),
                   "rounds": runs}  # fmt: skip
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
