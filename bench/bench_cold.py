"""Cold start: from nothing running to the results of a 4-input map, in a bare venv and in one of ~100 packages.

    python bench/bench_cold.py [--runs 3] [--sources tree | COMMIT,COMMIT] [--no-dask] [--json OUT]

Each source (a commit, or `tree`: this checkout as it is) is installed, not editable, into two venvs: a bare
one (Burla and its dependencies) and a big one (the same plus small distributions from PyPI, about 100 in
all). Dask distributed gets a venv of its own (skip it with --no-dask); multiprocessing runs in the first
bare venv. Venvs and downloads are cached under ~/.cache/burla-bench-cold (BURLA_BENCH_CACHE), so a rerun
installs only the sources that changed.

Every measurement is a fresh Python process in an empty folder (no local code to ship; in the big venv also
as main.py with a helpers.py beside it, which travel as the job's code) with a fresh BURLA_HOME (no local
cluster, nothing installed by an earlier run), timed as bench_core.py's "cold" is:
from before `from burla import remote_parallel_map` to the results, 2 workers. The runs alternate between
systems and venvs; the table gives the median and the spread of the runs, the CPU seconds all of Burla's
processes used (client, daemon, agent, workers), and each figure over multiprocessing's and Dask's median.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("BURLA_BENCH_CACHE") or Path.home() / ".cache" / "burla-bench-cold")

# Small distributions from PyPI, wheels only; with Burla's own about 100 in the venv.
PADDING = """
    appdirs asgiref async-timeout backoff beautifulsoup4 cachetools certifi chardet charset-normalizer
    colorama decorator deprecated dill docutils executing filelock idna inflection iniconfig isort
    jsonpointer markdown mccabe more-itertools mypy-extensions packaging parso pathspec pexpect platformdirs
    ply ptyprocess pure-eval pyasn1 pycodestyle pycparser pyflakes pyparsing python-dotenv python-slugify
    pytz requests soupsieve tenacity termcolor text-unidecode toml tomli toolz tqdm traitlets
    typing-extensions tzdata unidecode urllib3 wcwidth webencodings wrapt xmltodict zipp
""".split()

CLIENT = """
import json, os, sys, time
t = time.perf_counter()
from burla import remote_parallel_map
def double(x):
    return x * 2
out = remote_parallel_map(double, range(4), spinner=False)
wall = time.perf_counter() - t
assert out == [0, 2, 4, 6], out
mine = os.times()
cpu = mine.user + mine.system
tick = os.sysconf("SC_CLK_TCK")
from burla.common.local import DISCOVERY_FILE, local_cluster_home
info = json.loads((local_cluster_home() / DISCOVERY_FILE).read_text())
parents = {}
for pid in os.listdir("/proc"):
    try:
        parents[int(pid)] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        continue
tree, grew = {int(info["pid"])}, True
while grew:  # the daemon, its agent, the workers
    more = {pid for pid, parent in parents.items() if parent in tree} - tree
    tree |= more
    grew = bool(more)
for pid in tree:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    cpu += sum(int(f) for f in fields[11:15]) / tick  # its own and its reaped children's
print("RESULT " + json.dumps({"cold": wall, "cpu": cpu}), flush=True)
"""

MULTIPROCESSING = """
import json, time
t = time.perf_counter()
import multiprocessing
def double(x):
    return x * 2
pool = multiprocessing.Pool(2)
out = pool.map(double, range(4))
print("RESULT " + json.dumps({"cold": time.perf_counter() - t}), flush=True)
pool.terminate()
"""

DASK = """
import json, logging, time
logging.disable(logging.WARNING)
t = time.perf_counter()
from dask.distributed import Client, LocalCluster
def double(x):
    return x * 2
client = Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None))
out = client.gather(client.map(double, range(4), pure=False))
print("RESULT " + json.dumps({"cold": time.perf_counter() - t}), flush=True)
client.close()
"""


def sh(*cmd: str | Path, **kwargs: Any) -> None:
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def _uv() -> list[str] | None:
    if shutil.which("uv"):
        return ["uv"]
    try:
        import uv  # type: ignore[import-not-found]  # the uv package from PyPI, as in this checkout's .venv

        return [uv.find_uv_bin()]
    except (ImportError, FileNotFoundError):
        return None


def install(venv: Path, *args: str | Path) -> None:
    """pip install into `venv` (with uv when there is one: much faster), compiling bytecode as pip does."""
    uv = _uv()
    if uv is not None:
        sh(*uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", venv / "bin" / "python", *args)
    else:
        sh(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args)


def new_venv(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    sh(sys.executable, "-m", "venv", path)
    return path


def wheelhouse() -> Path:
    """The padding's wheels, downloaded once."""
    wheels = CACHE / "wheels"
    done = wheels / f".done-{hashlib.sha256(' '.join(PADDING).encode()).hexdigest()[:12]}"
    if not done.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        sh(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary",
           ":all:", "-d", wheels, *PADDING)  # fmt: skip
        done.touch()
    return wheels


def source_dir(source: str) -> tuple[str, Path]:
    """A source's tag and a folder holding its files: a commit (git archive) or `tree`, this checkout."""
    if source == "tree":
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                               check=True).stdout.split(b"\0")  # fmt: skip
        digest = hashlib.sha256()
        for name in sorted(f for f in files if f and (ROOT / f.decode()).is_file()):
            digest.update(name + b"\0" + (ROOT / name.decode()).read_bytes())
        tag = f"tree-{digest.hexdigest()[:10]}"
        dest = CACHE / "src" / tag
        if not dest.exists():
            tmp = dest.with_name(dest.name + ".part")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in files:
                if name and (ROOT / name.decode()).is_file():
                    (tmp / name.decode()).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / name.decode(), tmp / name.decode())
            tmp.rename(dest)
        return tag, dest
    commit = subprocess.run(["git", "rev-parse", "--short", source], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    dest = CACHE / "src" / commit
    if not dest.exists():
        tmp = dest.with_name(dest.name + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        tmp.rename(dest)
    return commit, dest


def burla_venv(tag: str, src: Path, big: bool) -> Path:
    path = CACHE / "venvs" / f"{tag}-{'big' if big else 'bare'}"
    if not (path / ".done").exists():
        print(f"installing {path.name}...", file=sys.stderr)
        new_venv(path)
        install(path, src)
        if big:
            install(path, "--find-links", wheelhouse(), *PADDING)
        (path / ".done").touch()
    return path


def dask_venv() -> Path:
    path = CACHE / "venvs" / "dask"
    if not (path / ".done").exists():
        print("installing dask[distributed]...", file=sys.stderr)
        new_venv(path)
        install(path, "dask[distributed]")
        (path / ".done").touch()
    return path


def count_distributions(venv: Path) -> int:
    code = "import importlib.metadata as m; print(len({d.metadata['Name'] for d in m.distributions()}))"
    return int(subprocess.run([venv / "bin" / "python", "-c", code], capture_output=True, text=True).stdout)


def measure(python: Path, script: str, timeout: float, as_file: bool = False) -> dict[str, Any]:
    """One cold start, of `script` given with -c or (`as_file`) as main.py with a module of its own beside it."""
    with tempfile.TemporaryDirectory(prefix="burla-cold-") as scratch:
        env = {**os.environ, "BURLA_HOME": str(Path(scratch) / "home"), "BURLA_EMBEDDED_WORKERS": "2"}
        for name in ("BURLA_CLUSTER_URL", "BURLA_API_KEY", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE"):
            env.pop(name, None)
        work = Path(scratch) / "work"
        work.mkdir()
        command = [str(python), "-c", textwrap.dedent(script)]
        if as_file:  # local code the workers need: main.py and helpers.py travel as the job's code zip
            (work / "helpers.py").write_text("def double(x):\n    return x * 2\n")
            (work / "main.py").write_text(
                textwrap.dedent(script).replace("return x * 2", "import helpers\n    return helpers.double(x)")
            )
            command = [str(python), "main.py"]
        try:
            proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"did not finish in {timeout:.0f}s"}
        finally:
            if script is CLIENT:
                subprocess.run([python, "-m", "burla.cli", "local", "stop"], cwd=work, env=env, capture_output=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    return {"error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="measurements of each system and venv (alternated)")
    parser.add_argument("--sources", default="tree", help="commits to compare, comma-separated; `tree`: this checkout")
    parser.add_argument("--no-dask", action="store_true", help="leave Dask out")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", help="also write every measurement to this file")
    args = parser.parse_args()

    systems: dict[str, tuple[Path, str, bool]] = {}
    for source in args.sources.split(","):
        tag, src = source_dir(source.strip())
        for big in (False, True):
            venv = burla_venv(tag, src, big)
            name = f"burla {tag} {'big' if big else 'bare'} ({count_distributions(venv)} dists)"
            systems[name] = (venv, CLIENT, False)
            if big:
                systems[f"{name}, main.py + helpers.py"] = (venv, CLIENT, True)
    first = next(iter(systems.values()))[0]
    systems["multiprocessing"] = (first, MULTIPROCESSING, False)
    if not args.no_dask:
        systems["dask LocalCluster"] = (dask_venv(), DASK, False)

    for venv, script, as_file in systems.values():  # a first run each: bytecode and the page cache are warm
        measure(venv / "bin" / "python", script, args.timeout, as_file)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    for run in range(args.runs):
        for name, (venv, script, as_file) in systems.items():
            results[name].append(measure(venv / "bin" / "python", script, args.timeout, as_file))
        print(f"run {run + 1}: " + "; ".join(f"{n} {_fmt(r[-1])}" for n, r in results.items()), file=sys.stderr)

    def median(name: str) -> float | None:
        times = [r["cold"] for r in results.get(name, []) if "cold" in r]
        return statistics.median(times) if times else None

    mp, dask = median("multiprocessing"), median("dask LocalCluster")
    print(f"\nBurla cold start, {time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, 2 workers, {args.runs} runs each (alternated)\n")  # fmt: skip
    header = ["system", "median", "min-max", "CPU s (all processes)", "/ multiprocessing", "/ Dask"]
    table = [header, ["-" * len(h) for h in header]]
    for name, runs in results.items():
        times = [r["cold"] for r in runs if "cold" in r]
        if not times:
            table.append([name, runs[-1].get("error", "?"), "", "", "", ""])
            continue
        med = statistics.median(times)
        cpus = [r["cpu"] for r in runs if "cpu" in r]
        table.append([
            name, f"{med:.3f} s", f"{min(times):.3f}-{max(times):.3f}",
            f"{statistics.median(cpus):.2f}" if cpus else "",
            f"{med / mp:.1f} x" if mp else "", f"{med / dask:.2f} x" if dask else "",
        ])  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "runs": results}, indent=2))
    return 0


def _fmt(result: dict[str, Any]) -> str:
    return f"{result['cold']:.2f}s" if "cold" in result else "error"


if __name__ == "__main__":
    sys.exit(main())
