"""The startup script of a cloud node: install this Burla from the daemon, then run its agent.

A Compute Engine VM runs its metadata item `startup-script` as root at every boot. This one reads
the rest of what it needs from the metadata server (`burla-url`, `burla-token`, `burla-version`,
`burla-instance`, `burla-pip-args`, and `burla-ca`: the CA of an https daemon, when it has its own),
makes a virtual environment, installs exactly that Burla version from the daemon's `/v1/dist/` page
(dependencies from the package index, or only from the daemon's wheelhouse when `burla-pip-args`
says `--no-index`), and runs `burlad agent` with the instance's
token. If a step fails, it tells the daemon which step and the tail of its log
(`POST /v1/nodes/<instance>/boot-failed`), so the node is marked FAILED with that reason at once
instead of after the boot timeout.

`GCE_METADATA_HOST` (host:port) stands in for metadata.google.internal, as Google's own libraries
allow; `BURLA_NODE_HOME` for /var/lib/burla. A boot image that has this Burla version in a virtual
environment names it in `BURLA_NODE_VENV` (e.g. in /etc/environment) and skips the install; the tests
use that to start most nodes in seconds, and install from the daemon for real in one test.
"""

from __future__ import annotations

SCRIPT = r"""#!/bin/bash
# Burla node startup script (burlad writes it; see daemon/boot_script.py).
set -uo pipefail
home="${BURLA_NODE_HOME:-/var/lib/burla}"
mkdir -p "$home" && chmod 700 "$home" && cd "$home" && home="$(pwd)" || exit 1
log="$home/boot.log"
exec > >(tee -a "$log") 2>&1
meta="http://${GCE_METADATA_HOST:-metadata.google.internal}/computeMetadata/v1/instance/attributes"
attr() { curl -fsS -H 'Metadata-Flavor: Google' "$meta/$1"; }
url="$(attr burla-url)" && token="$(attr burla-token)" && version="$(attr burla-version)" \
  && instance="$(attr burla-instance)" || { echo "burla: cannot read the instance metadata"; exit 1; }
pip_args="$(attr burla-pip-args || true)"
auth="$home/.authorization"  # the token goes to curl in a file (0600), never on a command line
(umask 077 && printf 'Authorization: Bearer %s\n' "$token" > "$auth")
ca="$(attr burla-ca || true)"  # the CA of an https daemon that the system does not trust (its own CA)
curl_ca=() pip_ca=()
if [ -n "$ca" ]; then
  printf '%s\n' "$ca" > "$home/ca.pem"
  # pip's --cert replaces its trust: the system's bundle goes along, for the package index
  cat /etc/ssl/certs/ca-certificates.crt "$home/ca.pem" > "$home/ca-bundle.pem" 2>/dev/null \
    || cp "$home/ca.pem" "$home/ca-bundle.pem"
  curl_ca=(--cacert "$home/ca.pem") pip_ca=(--cert "$home/ca-bundle.pem")
  export BURLA_AGENT_CA_FILE="$home/ca.pem"
fi
step=""
fail() {
  echo "burla: $step failed"
  body="$(python3 -c 'import json,sys; print(json.dumps({"step": sys.argv[1], "log": open(sys.argv[2], errors="replace").read()[-4000:]}))' "$step" "$log" 2>/dev/null || echo '{}')"
  curl -fsS "${curl_ca[@]}" -X POST -H @"$auth" -H 'Content-Type: application/json' \
    --data "$body" "$url/v1/nodes/$instance/boot-failed" || true
  exit 1
}
apt_install() {  # the guest agent or unattended-upgrades may hold the dpkg lock at first boot
  command -v apt-get >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -yq "$@"
}
step="python3"
command -v python3 >/dev/null || apt_install python3 python3-venv || fail
venv="${BURLA_NODE_VENV:-$home/venv}"
has_burla() { "$venv/bin/python" -P -c 'import sys, burla; sys.exit(burla.__version__ != sys.argv[1])' "$version" 2>/dev/null; }
if has_burla; then  # a boot image with this Burla in $BURLA_NODE_VENV needs no install
  echo "burla: Burla $version is installed in $venv"
else
  echo "burla: installing Burla $version from $url/v1/dist/"
  venv="$home/venv"
  step="the virtual environment"
  if [ ! -x "$venv/bin/pip" ]; then  # a venv made without ensurepip has python but no pip: made again
    python3 -m venv --clear "$venv" 2>/dev/null \
      || { apt_install python3-venv && python3 -m venv --clear "$venv"; } \
      || fail
  fi
  step="pip install burla==$version"
  trusted=()
  case "$url" in
    http://*)  # plain http inside the cluster's network: pip needs telling; https keeps its certificate check
      daemon_host="${url#http://}" && daemon_host="${daemon_host%%/*}" && daemon_host="${daemon_host%:*}"
      trusted=(--trusted-host "${daemon_host#[}") ;;
  esac
  # Burla itself by URL, so no index's unrelated project of the same name can stand in for it; its
  # dependencies from the index, or (pip_args --no-index) only from the daemon's wheelhouse.
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q --disable-pip-version-check $pip_args "${trusted[@]}" "${pip_ca[@]}" \
    --find-links "$url/v1/dist/" "$url/v1/dist/burla-$version-py3-none-any.whl" || fail
fi
step="burlad agent"
export BURLA_AGENT_TOKEN="$token" BURLA_AGENT_INSTANCE="$instance"
if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null && [ -z "${BURLA_NODE_HOME:-}" ]; then
  systemd-run --unit=burla-agent --collect -p Restart=on-failure \
    -E BURLA_AGENT_TOKEN -E BURLA_AGENT_INSTANCE ${BURLA_AGENT_CA_FILE:+-E BURLA_AGENT_CA_FILE} \
    "$venv/bin/burlad" agent "$url" --state-dir "$home/agent" || fail
else
  exec "$venv/bin/burlad" agent "$url" --state-dir "$home/agent"
fi
"""


def startup_script() -> str:
    return SCRIPT
