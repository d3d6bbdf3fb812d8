"""The Podman runtime beside the process runtime, in the same run.

    sudo python bench/bench_podman.py [--quick]      (root: agents run as the rootless user)

Needs scripts/setup-podman. For each runtime it starts `burlad serve` and one
agent with 2 workers, run as the rootless user (for Podman: keeping 2 warm
containers of localhost/burla-base:py3; for processes, the same user so the
two move data the same way, over HTTP), then prints the core figures:
warm 4-input map, 100,000 and 1,000,000 trivial inputs, 64 x 4 MiB, and cold
start (from nothing running: burlad, the agent, its workers or containers,
to the results of a 4-input map). Then custom containers, each a 4-input
map: the first and the second job of `image=` (another local image) and of a
new `dockerfile=` (a build, then the cache), and a plain job right after each
(on standby's containers). The second jobs and the plain ones after them are
repeated and their median shown.

    sudo python bench/bench_podman.py --containers   (the custom-container figures only)
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
ALT = "localhost/burla-alt:py3"
REPEATS = 5  # of each second job and each plain job after a custom one


def double(x: int) -> int:
    return x * 2


def size(x: bytes) -> int:
    return len(x)


def timed_map(client: Client, **kwargs: Any) -> float:
    t = time.perf_counter()
    assert client.map(double, range(4), spinner=False, **kwargs) == [0, 2, 4, 6]
    return time.perf_counter() - t


def custom_figures(client: Client) -> dict[str, float]:
    """Seconds to the results of a 4-input map: custom containers the first time, the second, and a plain
    job right after one."""
    context = Path(tempfile.mkdtemp(prefix="burla-bench-build-"))
    (context / "Dockerfile").write_text(f"FROM {BASE}\nRUN echo {time.time()} > /etc/burla-bench\n")
    out: dict[str, float] = {}
    for name, kwargs in (("image", {"image": ALT}), ("dockerfile", {"dockerfile": context / "Dockerfile"})):
        out[f"{name}_first"] = timed_map(client, **kwargs)
        seconds, plains = [], []
        for _ in range(REPEATS):
            seconds.append(timed_map(client, **kwargs))
            plains.append(timed_map(client))
        out[f"{name}_second"] = statistics.median(seconds)
        out[f"{name}_plain_after"] = statistics.median(plains)
        out[f"{name}_spread"] = max(seconds + plains) - min(seconds + plains)
    return out


def print_custom(figures: dict[str, float]) -> None:
    for name in ("image", "dockerfile"):
        first = "an image in the node's store" if name == "image" else "builds"
        print(f"{name}=: first job {figures[f'{name}_first']:.2f} s ({first}), second "
              f"{figures[f'{name}_second']:.2f} s, a plain job after it {figures[f'{name}_plain_after']:.2f} s "
              f"(medians of {REPEATS}, all within {figures[f'{name}_spread']:.2f} s)")  # fmt: skip


def podman_cluster(root: Path) -> Cluster:
    return Cluster(root, agents=1, workers=2, env={"BURLA_STANDBY_IMAGES": BASE}, podman_user=USER, agent_user=USER)


def containers_only() -> int:
    with tempfile.TemporaryDirectory(prefix="burla-bench-") as root:
        cluster = podman_cluster(Path(root) / "podman")
        client = Client(cluster.url, cluster.admin_token)
        try:
            timed_map(client)  # the standby containers warm
            figures = custom_figures(client)
        finally:
            client.close()
            cluster.stop()
    print(f"\ncustom containers on a Podman node, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
          "4-input maps\n")  # fmt: skip
    print_custom(figures)
    return 0


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
            out.update(custom_figures(client))
        return out
    finally:
        client.close()
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the 1,000,000-input run")
    parser.add_argument("--containers", action="store_true", help="only the custom-container figures")
    args = parser.parse_args()
    if args.containers:
        return containers_only()
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
    print()
    print_custom(podman)
    process = rows["process"]
    for key, label in (("warm", "warm"), ("mb_per_s", "MB/s"), *((f"many_{n}", f"{n:,} inputs") for n in sizes)):
        ratio = podman[key] / process[key]
        print(f"podman/process {label}: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
