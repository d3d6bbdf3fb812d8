"""Which cluster a client talks to, and with which key.

In order: the arguments given, ``BURLA_CLUSTER_URL`` / ``BURLA_API_KEY`` (and
``BURLA_CA_FILE``, the CA of an https cluster with its own), the file `burla login` writes in the user's config folder, and otherwise the
embedded local cluster (started on demand).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    url: str | None  # None: the embedded local cluster
    api_key: str | None
    ca_file: str | None = None  # a PEM CA an https cluster's certificate is verified by (besides the system's)

    @property
    def embedded(self) -> bool:
        return self.url is None


def config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "burla"


def login_file() -> Path:
    return config_dir() / "credentials.json"


def resolve(url: str | None = None, api_key: str | None = None, ca_file: str | None = None) -> ClusterSettings:
    url = url or os.environ.get("BURLA_CLUSTER_URL") or None
    api_key = api_key or os.environ.get("BURLA_API_KEY") or None
    ca_file = ca_file or os.environ.get("BURLA_CA_FILE") or None
    if url is None:
        saved = read_login()
        if saved is not None:
            url = saved["url"]
            api_key = api_key or saved.get("api_key")
            ca_file = ca_file or saved.get("ca_file") or None
    if url is not None:
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"cluster URL {url!r} must start with http:// or https:// (BURLA_CLUSTER_URL or burla login)"
            )
        if not api_key:
            raise ConfigError(
                f"no API key for the cluster at {url}: pass api_key=, set BURLA_API_KEY, or run `burla login {url}`"
            )
    return ClusterSettings(url, api_key, ca_file)


def read_login() -> dict[str, str] | None:
    path = login_file()
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            raise ValueError("no 'url'")
        return data
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); run `burla login URL` again, or delete it") from None


def write_login(url: str, api_key: str, ca_file: str | None = None) -> Path:
    path = login_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    saved = {"url": url.rstrip("/"), "api_key": api_key}
    if ca_file:
        saved["ca_file"] = str(Path(ca_file).expanduser().resolve())
    with os.fdopen(fd, "w") as f:
        json.dump(saved, f)
    return path
