"""What every Burla process loads and builds as it starts, kept small: the cold start pays it in each one."""

from __future__ import annotations

import ssl
import subprocess
import sys

import httpx

from burla.common.http import async_client


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_httpx_loads_without_its_command_line_client_which_still_runs_when_called() -> None:
    loaded = _run(
        "import burla, httpx, sys; print(sorted({m.split('.')[0] for m in sys.modules} & {'click', 'rich', 'pygments'}))"
    )
    assert loaded == "[]"
    said = _run(
        "import burla, httpx, sys\n"
        "try:\n    httpx.main(['--help'])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
    )
    assert said.splitlines()[-1] == "exit 0" and "Usage" in said
    assert _run("import burla, httpx; from httpx._main import print_response; print(print_response.__name__)") == (
        "print_response"
    )


def test_a_client_of_a_plain_http_url_trusts_no_certificate_and_one_of_https_the_default_store() -> None:
    plain = async_client("http://127.0.0.1:1", {}, httpx.Timeout(1.0))
    context = plain._transport._pool._ssl_context  # type: ignore[attr-defined]
    assert isinstance(context, ssl.SSLContext) and context.cert_store_stats()["x509_ca"] == 0
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname  # TLS there fails, never trusts
    tls = async_client("https://127.0.0.1:1", {}, httpx.Timeout(1.0))
    assert tls._transport._pool._ssl_context.cert_store_stats()["x509_ca"] > 0  # type: ignore[attr-defined]
