"""burla.common.config: defaults < burla.toml < BURLA_* variables < command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from burla.common.config import (
    Config,
    ConfigError,
    GiB,
    find_config_file,
    parse_duration,
    parse_size,
)


@pytest.fixture(autouse=True)
def no_stray_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ./burla.toml or ~/.config/burla/burla.toml of the machine running the tests is read."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return work


def write(tmp_path: Path, text: str, name: str = "burla.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


FILE = """
[daemon]
port = 9000
host = "0.0.0.0"
poll_timeout = "250ms"
agent_timeout = "10min"
max_input_bytes = "256MB"
max_function_bytes = 1000
job_retention = 7200

[agent]
ram = "4GiB"
workers = 3
workers_per_cpu = 1.5
runtime = "podman"

[embedded]
idle_timeout = "2h"
"""


def test_defaults() -> None:
    config = Config.load(env={})
    assert config == Config()
    assert config.daemon.port == 8080
    assert config.daemon.host == "127.0.0.1"
    assert config.daemon.poll_timeout == 2.0
    assert config.daemon.target_lease_seconds == 0.2
    assert config.daemon.max_function_bytes == 100 * 1000**2
    assert config.agent.runtime == "process"
    assert config.agent.workers == 0
    assert config.embedded.idle_timeout == 600.0


def test_file_overrides_defaults(tmp_path: Path) -> None:
    config = Config.load(path=write(tmp_path, FILE), env={})
    assert config.daemon.port == 9000
    assert config.daemon.host == "0.0.0.0"
    assert config.daemon.poll_timeout == pytest.approx(0.25)
    assert config.daemon.agent_timeout == pytest.approx(600.0)
    assert config.daemon.max_input_bytes == 256 * 1000**2
    assert config.daemon.max_function_bytes == 1000
    assert config.daemon.job_retention == 7200.0
    assert isinstance(config.daemon.job_retention, float)
    assert config.agent.ram == 4 * 1024**3
    assert config.agent.workers == 3
    assert config.agent.workers_per_cpu == 1.5
    assert config.agent.runtime == "podman"
    assert config.embedded.idle_timeout == 7200.0
    # untouched keys keep their defaults
    assert config.daemon.max_lease_inputs == 100_000
    assert config.agent.url == ""


def test_path_as_str(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nport = 1234\n")
    assert Config.load(path=str(path), env={}).daemon.port == 1234


def test_burla_toml_in_the_cwd_is_found(no_stray_config: Path) -> None:
    write(no_stray_config, "[daemon]\nport = 4321\n")
    assert find_config_file(None, {}) == Path("burla.toml")
    assert Config.load(env={}).daemon.port == 4321


def test_burla_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nport = 5555\n", name="other.toml")
    assert Config.load(env={"BURLA_CONFIG": str(path)}).daemon.port == 5555


def test_env_overrides_file(tmp_path: Path) -> None:
    env = {
        "BURLA_DAEMON_PORT": "7000",
        "BURLA_DAEMON_POLL_TIMEOUT": "1.5",
        "BURLA_DAEMON_AGENT_TIMEOUT": "30s",
        "BURLA_AGENT_RAM": "2GiB",
        "BURLA_AGENT_RUNTIME": "process",
        "BURLA_EMBEDDED_WORKERS": "5",
    }
    config = Config.load(path=write(tmp_path, FILE), env=env)
    assert config.daemon.port == 7000
    assert config.daemon.poll_timeout == 1.5
    assert config.daemon.agent_timeout == 30.0
    assert config.agent.ram == 2 * GiB
    assert config.agent.runtime == "process"
    assert config.embedded.workers == 5
    assert config.daemon.host == "0.0.0.0"  # from the file, not overridden


def test_unrelated_env_vars_are_ignored() -> None:
    config = Config.load(env={"BURLA_DAEMON_NOPE": "1", "PORT": "1", "BURLA_PORT": "2"})
    assert config == Config()


def test_overrides_beat_env(tmp_path: Path) -> None:
    config = Config.load(
        path=write(tmp_path, FILE),
        env={"BURLA_DAEMON_PORT": "7000", "BURLA_DAEMON_HOST": "10.0.0.1"},
        overrides={"daemon.port": 6000, "daemon.host": None, "agent.workers": "12"},
    )
    assert config.daemon.port == 6000
    assert config.daemon.host == "10.0.0.1"  # None means "flag not given"
    assert config.agent.workers == 12


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("10min", 600.0), ("2h", 7200.0), ("1d", 86400.0), ("30", 30.0), ("1.5s", 1.5),
     ("5 sec", 5.0), ("3m", 180.0), (" 2 MIN ", 120.0), ("1e3ms", 1.0)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [("256MB", 256 * 1000**2), ("4GiB", 4 * 1024**3), ("1024", 1024), ("1kb", 1000), ("2KiB", 2048),
     ("1.5GB", 1_500_000_000), ("10 mib", 10 * 1024**2), ("7b", 7), ("1TB", 1000**4)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "10 parsecs", "-5s", "1.2.3", "ms", "10GB"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["", "lots", "10min", "-1MB", "4 GiBs"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_unknown_section_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[deamon]\nport = 1\n")
    with pytest.raises(ConfigError, match="unknown config section 'deamon'") as info:
        Config.load(path=path, env={})
    assert str(path) in str(info.value)


def test_unknown_key_in_file_lists_the_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nprot = 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'daemon.prot'") as info:
        Config.load(path=path, env={})
    assert str(path) in str(info.value)
    assert "port" in str(info.value)


def test_top_level_key_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 1\n")
    with pytest.raises(ConfigError, match="must be a table"):
        Config.load(path=path, env={})


def test_unknown_key_on_command_line() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'agent\.nope' \(from command line\)"):
        Config.load(env={}, overrides={"agent.nope": 1})
    with pytest.raises(ConfigError, match=r"unknown config section 'bogus' \(from command line\)"):
        Config.load(env={}, overrides={"bogus.port": 1})


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[daemon]\nport = "eighty"\n', "daemon.port"),
        ("[daemon]\nport = true\n", "daemon.port"),
        ('[daemon]\npoll_timeout = "soon"\n', "daemon.poll_timeout"),
        ('[daemon]\nmax_input_bytes = "huge"\n', "daemon.max_input_bytes"),
        ("[daemon]\nhost = 127\n", "daemon.host"),
        ('[agent]\nram = "4 parsecs"\n', "agent.ram"),
        ("[agent]\nworkers = [1, 2]\n", "agent.workers"),
    ],
)
def test_malformed_value_in_file(tmp_path: Path, toml: str, key: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        Config.load(path=path, env={})
    message = str(info.value)
    assert f"bad value for {key}" in message
    assert f"(from {path})" in message


@pytest.mark.parametrize(
    ("var", "value"),
    [("BURLA_DAEMON_PORT", "eighty"), ("BURLA_DAEMON_AGENT_TIMEOUT", "later"), ("BURLA_AGENT_RAM", "big"),
     ("BURLA_AGENT_WORKERS", "4.5")],
)  # fmt: skip
def test_malformed_value_in_env(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env={var: value})
    key = var.removeprefix("BURLA_").lower().replace("_", ".", 1)
    assert f"bad value for {key}" in str(info.value)
    assert f"(from ${var})" in str(info.value)
    assert repr(value) in str(info.value)


def test_malformed_value_on_command_line() -> None:
    with pytest.raises(ConfigError, match=r"bad value for daemon\.port \(from command line\)"):
        Config.load(env={}, overrides={"daemon.port": "x"})


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon\nport = 1\n")
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        Config.load(path=path, env={})
    assert str(path) in str(info.value)


def test_missing_explicit_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        find_config_file(missing, {})
    assert str(missing) in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(path=missing, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(env={"BURLA_CONFIG": str(missing)})


def test_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        find_config_file(tmp_path, {})


def test_no_file_found() -> None:
    assert find_config_file(None, {}) is None


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_resolved_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BURLA_HOME", str(tmp_path / "bh"))
    config = Config.load(env={})
    assert config.daemon.resolved_state_dir() == tmp_path / "bh" / "daemon"
    assert config.agent.resolved_state_dir() == tmp_path / "bh" / "agent"
    config = Config.load(env={}, overrides={"daemon.state_dir": "~/x"})
    assert config.daemon.resolved_state_dir() == Path("~/x").expanduser()


def test_bool_for_an_int_key_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bad value for agent.workers"):
        Config.load(path=write(tmp_path, "[agent]\nworkers = false\n"), env={})


def test_bool_for_a_duration_key_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bad value for daemon.poll_timeout"):
        Config.load(path=write(tmp_path, "[daemon]\npoll_timeout = true\n"), env={})


def test_node_groups_are_tables_with_their_keys_checked(tmp_path: Path) -> None:
    from burla.common.config import NodeGroupConfig

    path = tmp_path / "burla.toml"
    path.write_text('[cluster]\nprovider = "local"\n[[cluster.groups]]\nmachine_type = "e2-standard-4"\nstandby = 2\n'
                    '[[cluster.groups]]\nmachine_type = "n2-highmem-8"\nspot = true\nram = "64GB"\n')  # fmt: skip
    groups = Config.load(path, env={}).cluster.groups
    assert groups == [
        NodeGroupConfig(machine_type="e2-standard-4", standby=2),
        NodeGroupConfig(machine_type="n2-highmem-8", spot=True, ram=64 * 10**9),
    ]
    path.write_text("[[cluster.groups]]\nmachine_typ = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown config key cluster\.groups\[0\]\.machine_typ"):
        Config.load(path, env={})
    path.write_text("[cluster]\ngroups = 'n2'\n")
    with pytest.raises(ConfigError, match=r"bad value for cluster\.groups.*list of tables"):
        Config.load(path, env={})
    path.write_text("[[cluster.groups]]\nstandby = 'two'\n")
    with pytest.raises(ConfigError, match=r"bad value for cluster\.groups\[0\]\.standby"):
        Config.load(path, env={})
