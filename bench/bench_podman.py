"""The Podman runtime beside the process runtime, in the same run.

    sudo python bench/bench_podman.py [--quick]      (root: agents run as the rootless user)

Needs scripts/setup-podman. For each runtime it starts `burlad serve` and one
agent with 2 workers, run as the rootless user (for Podman: keeping 2 warm
containers of localhost/burla-base:py3; for processes, the same user so the
two move data the same way, over HTTP), then prints the core figures:
warm 4-input map, 100,000 and 1,000,000 trivial inputs, 64 x 4 MiB, and cold
start (from nothing running: burlad, the agent, its workers or containers,
to the results of a 4-input map). Then the first and the second job of a
new `dockerfile=` (a build, then the cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from burla import Client  # noqa: E402
from tests.cluster import Cluster  # noqa: E402

USER = os.environ.get("BURLA_PODMAN_USER", "burla")
BASE = "localhost/burla-base:py3"


def double(x: int) -> int:
    return x * 2


def size(x: bytes) -> int:
    return len(x)


def figures(runtime: str, root: Path, quick: bool) -> dict[str, Any]:
    podman = runtime == "podman"
    started = time.perf_counter()
    cluster = Cluster(
        root / runtime,
        agents=1,
        workers=2,
        env={"BURLA_STANDBY_IMAGES": BASE} if podman else {},
        podman_user=USER if podman else None,
        agent_user=USER,  # both agents as the same non-root user: large payloads go over HTTP for both
    )
    client = Client(cluster.url, cluster.admin_token)
    try:
        assert client.map(double, range(4), spinner=False) == [0, 2, 4, 6]
        out: dict[str, Any] = {"cold": time.perf_counter() - started}
        times = []
        for _ in range(50):
            t = time.perf_counter()
            client.map(double, range(4), spinner=False)
            times.append(time.perf_counter() - t)
        out["warm"] = statistics.median(times)
        for n in [100_000] if quick else [100_000, 1_000_000]:
            t = time.perf_counter()
            result = client.map(double, range(n), spinner=False)
            out[f"many_{n}"] = time.perf_counter() - t
            assert len(result) == n
        data = [os.urandom(4 * 1024 * 1024) for _ in range(64)]
        t = time.perf_counter()
        assert client.map(size, data, spinner=False) == [4 * 1024 * 1024] * 64
        out["mb_per_s"] = 64 * 4 * 1.048576 / (time.perf_counter() - t)
        if podman:
            context = Path(tempfile.mkdtemp(prefix="burla-bench-build-"))
            (context / "Dockerfile").write_text(f"FROM {BASE}\nRUN echo {time.time()} > /etc/burla-bench\n")
            for name in ("dockerfile_first", "dockerfile_second"):
                t = time.perf_counter()
                client.map(double, range(4), dockerfile=context / "Dockerfile", spinner=False)
                out[name] = time.perf_counter() - t
        return out
    finally:
        client.close()
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the 1,000,000-input run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="burla-bench-") as root:
        rows = {runtime: figures(runtime, Path(root), args.quick) for runtime in ("process", "podman")}
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    print(f"\nPodman runtime beside the process runtime, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
          "burlad + 1 agent with 2 workers each\n")  # fmt: skip
    header = ["runtime", "warm 4-input map", *[f"{n:,} inputs" for n in sizes], "64 x 4 MiB", "cold start"]
    table = [header]
    for runtime, r in rows.items():
        table.append([
            runtime, f"{r['warm'] * 1000:.2f} ms", *[f"{r[f'many_{n}']:.2f} s ({n / r[f'many_{n}']:,.0f}/s)" for n in sizes],
            f"{r['mb_per_s']:.0f} MB/s", f"{r['cold']:.2f} s",
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    podman = rows["podman"]
    print(f"\ndockerfile=: first job {podman['dockerfile_first']:.2f} s (builds), "
          f"second {podman['dockerfile_second']:.2f} s (cached image)")  # fmt: skip
    process = rows["process"]
    for key, label in (("warm", "warm"), ("mb_per_s", "MB/s"), *((f"many_{n}", f"{n:,} inputs") for n in sizes)):
        ratio = podman[key] / process[key]
        print(f"podman/process {label}: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
