"""What reaches a worker: its environment without tokens, and the checks of `agent.worker_user`."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from burla.errors import ConfigError
from burla.node_agent import worker_user
from burla.node_agent.runtime import worker_env

ALL_CAPS = "CapEff:\t000001ffffffffff\n"
NO_CAPS = "Name:\tburlad\nCapEff:\t0000000000000000\n"


def test_worker_env_drops_every_burla_variable_and_any_holding_a_secret() -> None:
    base = {
        "PATH": "/usr/bin",
        "BURLA_AGENT_TOKEN": "burla_node_abc",
        "BURLA_API_KEY": "burla_admin_xyz",
        "BURLA_DAEMON_ADMIN_TOKEN": "burla_admin_xyz",
        "BURLA_CLUSTER_URL": "http://x",
        "BURLA_LOG_FLUSH_SECONDS": "0.1",
        "MY_NODE_TOKEN": "burla_node_abc",
        "SOMETHING": "prefix-burla_node_abc-suffix",
        "HOME": "/root",
    }
    env = worker_env(base, secrets=("burla_node_abc", ""))
    assert env == {"PATH": "/usr/bin", "BURLA_LOG_FLUSH_SECONDS": "0.1", "HOME": "/root"}
    assert worker_env(base)["MY_NODE_TOKEN"] == "burla_node_abc"  # no secrets named: only BURLA_* go


def test_missing_capabilities_reads_capeff() -> None:
    assert worker_user.missing_capabilities(ALL_CAPS) == []
    assert worker_user.missing_capabilities(NO_CAPS) == list(worker_user.NEEDED)
    setuid_only = f"CapEff:\t{1 << 7:016x}\n"
    assert "CAP_SETUID" not in worker_user.missing_capabilities(setuid_only)
    assert "CAP_SETGID" in worker_user.missing_capabilities(setuid_only)
    assert worker_user.missing_capabilities("") == list(worker_user.NEEDED)


def other_user() -> pwd.struct_passwd:
    for entry in pwd.getpwall():
        if entry.pw_uid not in (0, os.geteuid()):
            return entry
    pytest.skip("no user on this host other than root and this one")


def test_resolve_names_the_key_and_the_fix() -> None:
    assert worker_user.resolve("", NO_CAPS) is None
    with pytest.raises(ConfigError, match=r"agent\.worker_user: there is no user 'no-such-user-x'.*useradd"):
        worker_user.resolve("no-such-user-x", ALL_CAPS)
    with pytest.raises(ConfigError, match="is root"):
        worker_user.resolve("0", ALL_CAPS)
    if os.geteuid() != 0:
        with pytest.raises(ConfigError, match="agent's own user"):
            worker_user.resolve(str(os.geteuid()), ALL_CAPS)
    entry = other_user()
    with pytest.raises(ConfigError, match=r"agent\.worker_user: .* runs as root \(or has CAP_CHOWN"):
        worker_user.resolve(entry.pw_name, NO_CAPS)
    by_name = worker_user.resolve(entry.pw_name, ALL_CAPS)
    by_uid = worker_user.resolve(str(entry.pw_uid), ALL_CAPS)
    assert by_name == by_uid and by_name is not None
    assert (by_name.uid, by_name.gid, by_name.name) == (entry.pw_uid, entry.pw_gid, entry.pw_name)
    assert by_name.popen_options() == {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    assert by_name.env()["USER"] == entry.pw_name


def test_share_and_open_state_dir_give_the_group_read_and_pass_never_write(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("handing files to another group needs root")
    entry = other_user()
    user = worker_user.WorkerUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
    state = tmp_path / "state"
    (state / "envs" / "dists" / "pkg").mkdir(parents=True)
    (state / "node_id").write_text("x")
    os.chmod(state / "node_id", 0o644)
    code = state / "envs" / "code.zip"
    code.write_bytes(b"zip")
    os.chmod(code, 0o600)
    tool = state / "envs" / "dists" / "pkg" / "tool"
    tool.write_text("#!/bin/sh\n")
    os.chmod(tool, 0o770)
    worker_user.open_state_dir(user, state)
    worker_user.share(user, state / "envs")

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(state) == 0o710 and state.stat().st_gid == user.gid
    assert mode(state / "node_id") == 0o600
    assert mode(code) == 0o640 and code.stat().st_gid == user.gid
    assert mode(tool) == 0o750  # runnable by the group as by its owner, never writable
    assert mode(state / "envs" / "dists" / "pkg") & 0o070 == 0o050


def test_worker_user_is_refused_with_the_podman_runtime() -> None:
    from burla.common.config import AgentConfig
    from burla.node_agent.agent import Agent
    from burla.node_agent.podman_runtime import PodmanRuntime

    config = AgentConfig(url="http://127.0.0.1:9", token="t", worker_user="burla-worker")
    with pytest.raises(ConfigError, match=r"agent\.worker_user is for the process runtime"):
        Agent(config, PodmanRuntime())
