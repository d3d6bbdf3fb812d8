"""The first and the second job with the same new environment, per runtime.

    sudo python bench/bench_environment.py        (root: agents run as the rootless user)

Needs scripts/setup-podman. The client's environment is a handful of PyPI
packages the workers lack, with their dependencies (installed with pip
--target on the client's PYTHONPATH; the rest of this venv is excluded, so the
environment really is that handful). For each runtime a fresh cluster (burlad + one agent with 2
workers, run as the rootless user, its uv download cache emptied first) runs
the same client twice in one process: the first job downloads and installs the
packages into the node's cache; the second installs nothing. A third run, from
a new client process, shows the second job's time including the client's own
start.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.cluster import Cluster  # noqa: E402

USER = os.environ.get("BURLA_PODMAN_USER", "burla")
BASE = "localhost/burla-base:py3"
CANDIDATES = ["humanize==4.9.0", "emoji==2.12.1", "tomlkit==0.13.2", "python-slugify==8.0.4",
              "text-unidecode==1.3", "pyfiglet==1.0.2", "colorama==0.4.6"]  # fmt: skip

CLIENT = """
import json, sys, time
from burla import remote_parallel_map
modules = json.loads(sys.argv[1])
exclude = json.loads(sys.argv[2])
def uses(x):
    import importlib
    return [importlib.import_module(m).__name__ for m in modules]
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    out = remote_parallel_map(uses, range(4), spinner=False, exclude_packages=exclude)
    times.append(time.perf_counter() - t)
    assert out == [modules] * 4, out
print("TIMES", json.dumps(times))
"""


def handful() -> list[str]:
    """Packages this venv lacks (so the workers, which share or mirror it, lack them too)."""
    chosen = []
    for pin in CANDIDATES:
        name = pin.split("==")[0]
        module = {"python-slugify": "slugify", "text-unidecode": "text_unidecode"}.get(name, name)
        if importlib.util.find_spec(module) is None:
            chosen.append(pin)
    return chosen


def run_client(
    cluster: Cluster, site: Path, modules: list[str], exclude: list[str], jobs: int, cwd: Path
) -> list[float]:
    script = cwd / "client.py"
    script.write_text(CLIENT)
    env = {**os.environ, **cluster.client_env(), "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, str(script), json.dumps(modules), json.dumps(exclude), str(jobs)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return list(json.loads(result.stdout.split("TIMES", 1)[1]))


def main() -> int:
    pins = handful()
    modules = [{"python-slugify": "slugify", "text-unidecode": "text_unidecode"}.get(p.split("==")[0], p.split("==")[0])
               for p in pins]  # fmt: skip
    rows = {}
    with tempfile.TemporaryDirectory(prefix="burla-bench-env-") as tmp:
        root = Path(tmp)
        site = root / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site), *pins],
                       check=True, capture_output=True)  # fmt: skip
        # the environment is the handful and what they depend on: the rest of this venv is excluded
        needed = {d.metadata["Name"].lower() for d in metadata.distributions(path=[str(site)])}
        exclude = sorted({d.metadata["Name"] for d in metadata.distributions()} - needed)
        home = Path(os.path.expanduser(f"~{USER}"))
        for runtime in ("process", "podman"):
            shutil.rmtree(home / ".cache" / "uv", ignore_errors=True)  # downloads too, in the first job
            cluster = Cluster(
                root / runtime,
                agents=1,
                workers=2,
                env={"BURLA_STANDBY_IMAGES": BASE} if runtime == "podman" else {},
                podman_user=USER if runtime == "podman" else None,
                agent_user=USER,
            )
            try:
                (root / runtime / "proj").mkdir()
                first, second = run_client(cluster, site, modules, exclude, 2, root / runtime / "proj")
                (fresh,) = run_client(cluster, site, modules, exclude, 1, root / runtime / "proj")
                rows[runtime] = (first, second, fresh)
            finally:
                cluster.stop()
    print(f"\nA new environment of {len(pins)} packages ({', '.join(pins)}), {time.strftime('%Y-%m-%d')}\n")
    print("runtime | first job (download + install) | second job | second job, new client process")
    for runtime, (first, second, fresh) in rows.items():
        print(f"{runtime} | {first:.2f} s | {second * 1000:.0f} ms | {fresh * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
