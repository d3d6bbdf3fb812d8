"""The daemon's certificate and the clients' CA file are checked up front, each error naming its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from burla.common import tls
from burla.daemon import cli
from burla.errors import ConfigError
from tests.certs import make_tls_files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_tls_files(tmp_path_factory.mktemp("certs"))


def test_no_certificate_means_plain_http() -> None:
    assert tls.server_files("", "") is None


def test_a_certificate_and_its_key_are_accepted(files: tuple[Path, Path, Path]) -> None:
    cert, key, _ = files
    assert tls.server_files(str(cert), str(key)) == (str(cert), str(key))


@pytest.mark.parametrize("given, missing", [("cert", "daemon.tls_key"), ("key", "daemon.tls_cert")])
def test_one_without_the_other_names_the_missing_key(files: tuple[Path, Path, Path], given: str, missing: str) -> None:
    cert, key, _ = files
    with pytest.raises(ConfigError, match=f"{missing} is not"):
        tls.server_files(str(cert) if given == "cert" else "", str(key) if given == "key" else "")


def test_an_unreadable_file_is_named(files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cert, key, _ = files
    with pytest.raises(ConfigError, match="daemon.tls_key = .*cannot read"):
        tls.server_files(str(cert), str(tmp_path / "nope.key"))


def test_a_file_that_is_not_a_certificate_is_named(files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, key, _ = files
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="daemon.tls_cert = .*no PEM certificate"):
        tls.server_files(str(junk), str(key))


def test_a_key_of_another_certificate_is_named(files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    cert, _, _ = files
    _, other_key, _ = make_tls_files(tmp_path / "other")
    with pytest.raises(ConfigError, match="daemon.tls_key = .*not a PEM private key"):
        tls.server_files(str(cert), str(other_key))


def test_a_bad_ca_file_names_where_it_was_set(tmp_path: Path, files: tuple[Path, Path, Path]) -> None:
    assert tls.client_context("", "agent.ca_file") is None
    assert tls.client_context(str(files[2]), "agent.ca_file") is not None
    junk = tmp_path / "ca.pem"
    junk.write_text("nothing here")
    with pytest.raises(ConfigError, match="agent.ca_file = .*no PEM certificate"):
        tls.client_context(str(junk), "agent.ca_file")
    with pytest.raises(ConfigError, match="agent.ca_file = .*cannot read"):
        tls.client_context(str(tmp_path / "missing.pem"), "agent.ca_file")


def test_burlad_serve_with_half_a_tls_config_exits_with_the_key_named(
    tmp_path: Path, files: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BURLA_DAEMON_TLS_CERT", str(files[0]))
    assert cli.main(["serve", "--port", "0", "--state-dir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "daemon.tls_key is not" in err and "Traceback" not in err


def test_the_ca_given_to_nodes_never_carries_the_daemons_private_key(
    files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """A file holding both certificate and key is a valid tls_cert; what nodes get of it is the certificate
    only (found in review: the whole file went into every node's metadata)."""
    cert, key, _ = files
    both = tmp_path / "both.pem"
    both.write_text(key.read_text() + cert.read_text())
    assert tls.server_files(str(both), str(both)) is not None
    given = tls.read_ca(str(both), "daemon.tls_cert")
    assert "PRIVATE KEY" not in given and given.count("BEGIN CERTIFICATE") == cert.read_text().count(
        "BEGIN CERTIFICATE"
    )
