"""HTTPS end to end: burlad serves TLS itself with a certificate the test makes; clients and agents verify it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import burla
from burla.errors import ClusterUnavailableError
from tests.certs import make_tls_files
from tests.cluster import Cluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("tls")
    cluster = Cluster(root / "cluster", agents=1, workers=2, tls=make_tls_files(root / "certs"))
    yield cluster
    cluster.stop()


def test_a_map_runs_over_https_and_wss(tls_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tls_cluster.url.startswith("https://")
    tls_cluster.use(monkeypatch)  # BURLA_CLUSTER_URL=https://..., BURLA_CA_FILE=the test's CA
    with burla.Client() as client:
        assert client.map(lambda x: x * 2, range(50), spinner=False) == [x * 2 for x in range(50)]
    assert "burlad serving on https://" in tls_cluster.log_text()
    assert tls_cluster.status()["nodes"][0]["workers"] == 2  # the agent, with --ca-file, registered over TLS


def test_a_client_without_the_ca_is_refused_and_told_what_to_set(tls_cluster: Cluster) -> None:
    with burla.Client(tls_cluster.url, tls_cluster.admin_token) as client:
        with pytest.raises(ClusterUnavailableError) as e:
            client.map(lambda x: x, [1], spinner=False)
    message = str(e.value)
    assert "does not trust" in message and "BURLA_CA_FILE" in message and "--ca-file" in message


def test_an_agent_without_the_ca_stops_and_says_what_to_pass(tls_cluster: Cluster, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "burla.daemon", "agent", tls_cluster.url, "--state-dir", str(tmp_path / "agent"),
         "--workers", "1"],
        env={**tls_cluster.env, "BURLA_AGENT_TOKEN": tls_cluster.node_token},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "does not trust" in proc.stderr and "--ca-file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plain_http_to_the_tls_port_fails_cleanly(tls_cluster: Cluster) -> None:
    plain = tls_cluster.url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/v1/health", timeout=10)
    with burla.Client(plain, tls_cluster.admin_token) as client:
        with pytest.raises(ClusterUnavailableError, match="cannot reach"):
            client.map(lambda x: x, [1], spinner=False)
    assert httpx.get(f"{tls_cluster.url}/v1/health", verify=tls_cluster.verify, timeout=10).status_code == 200


def test_burla_login_keeps_the_ca_file(tls_cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from burla import cli

    monkeypatch.chdir(tmp_path)
    ca = Path(tls_cluster.ca_file)
    assert cli.main(["login", tls_cluster.url, "--api-key", tls_cluster.admin_token, "--ca-file", str(ca)]) == 0
    with burla.Client() as client:  # nothing in the environment: the login file names the cluster and its CA
        assert client.settings.ca_file == str(ca.resolve())
        assert client.map(lambda x: x + 1, range(5), spinner=False) == [1, 2, 3, 4, 5]


def square(x: int) -> int:
    return x * x


def test_nodes_the_daemon_starts_trust_its_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key, ca = make_tls_files(tmp_path / "certs")
    path = tmp_path / "burla.toml"
    path.write_text(
        f'[cluster]\nprovider = "local"\nname = "tls"\nca_file = "{ca}"\nmax_cpus = 4\n'
        '[[cluster.groups]]\nmachine_type = "e2-standard-2"\ncpus = 1\nstandby = 1\n'
    )
    cluster = Cluster(tmp_path / "cluster", agents=0, env={"BURLA_CONFIG": str(path)}, tls=(cert, key, ca))
    try:
        cluster.use(monkeypatch)
        cluster.wait_nodes(1, timeout=90)  # its agent verified the daemon's certificate by the CA it was given
        assert burla.remote_parallel_map(square, range(10), spinner=False) == [x * x for x in range(10)]
    finally:
        cluster.stop()
        for pid_file in (cluster.root / "daemon" / "nodes").glob("*/pid"):  # local nodes outlive their daemon
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
