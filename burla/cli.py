"""``burla``: the command line of the client.

burla login URL [--api-key KEY] [--ca-file CA]   remember a cluster, its API key (and its CA)
burla status [--json]             nodes, workers and jobs of the cluster
burla local start|stop|status     the embedded local cluster
burla cluster start|stop|restart  the machines of a cluster whose daemon starts its own ([cluster] provider)
burla cluster nodes [--json]      each such machine: state, type, zone, age, job, and why it failed
burla cluster spec show|set FILE  node groups, zones and limits, changed while burlad runs
burla cluster standby show|set    the images container nodes keep warm
burla users list|add|remove|rotate|revoke [NAME] [--admin]
                                  the cluster's users and their API keys (an admin's commands)
burla jobs list|show|logs|results|cancel [ID] [--follow] [--pickle FILE] [--json]
                                  your jobs (an admin: every job), kept until daemon.job_retention after
                                  they end; ID may be a unique prefix of the job's id
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from typing import Any

from . import _local, _settings
from ._client import Client
from .errors import BurlaError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="burla", description="Run Python functions on every input at once, on a cluster.")
    sub = p.add_subparsers(dest="command", required=True)
    login = sub.add_parser("login", help="remember a cluster's URL and API key")
    login.add_argument("url", help="the cluster's URL, e.g. http://10.0.0.2:8080")
    login.add_argument("--api-key", help="your API key for the cluster (asked for when omitted)")
    login.add_argument("--ca-file", help="a PEM CA that signed an https cluster's certificate")
    status = sub.add_parser("status", help="show the cluster's nodes, workers and jobs")
    status.add_argument("--json", action="store_true", help="print raw JSON")
    local = sub.add_parser("local", help="the embedded local cluster")
    local.add_argument("action", choices=["start", "stop", "status"])
    local.add_argument("--nodes", type=int, default=0, help="with start: N nodes (one job each), not one shared agent")
    cluster = sub.add_parser("cluster", help="the cluster's settings")
    cluster_sub = cluster.add_subparsers(dest="setting", required=True)
    standby = cluster_sub.add_parser("standby", help="the images container nodes keep warm")
    standby.add_argument("action", choices=["show", "set"])
    standby.add_argument("images", nargs="*", help="with set: the images, the first one the default")
    standby.add_argument("--per-cpu", type=float, default=1.0, help="warm containers per CPU, per image")
    standby.add_argument("--python", default="", help="the images' Python minor version, checked by agents")
    cluster_sub.add_parser("start", help="start the standby nodes and keep them warm")
    cluster_sub.add_parser("stop", help="delete every node (running jobs are cancelled)")
    cluster_sub.add_parser("restart", help="stop, then start")
    spec = cluster_sub.add_parser("spec", help="the node groups, zones and limits of the cluster")
    spec.add_argument("action", choices=["show", "set"])
    spec.add_argument("file", nargs="?", help="with set: a TOML file with a [cluster] section and [[cluster.groups]]")
    nodes = cluster_sub.add_parser("nodes", help="the machines the daemon runs, with their state")
    nodes.add_argument("--json", action="store_true", help="print raw JSON")
    users = sub.add_parser("users", help="the cluster's users and their API keys (for its admins)")
    users.add_argument("action", choices=["list", "add", "remove", "rotate", "revoke"],
                       help="add prints the new user's key once; rotate gives a new key and ends the old one; "
                            "revoke ends it; remove also cancels the user's running jobs")  # fmt: skip
    users.add_argument("name", nargs="?", help="the user (all but list)")
    users.add_argument("--admin", action="store_true", help="with add: an admin, who manages the cluster and its users")
    users.add_argument("--json", action="store_true", help="with list: print raw JSON")
    jobs = sub.add_parser("jobs", help="your jobs: list them, reattach to one (detach=True), cancel one")
    jobs.add_argument("action", choices=["list", "show", "logs", "results", "cancel"],
                      help="logs prints what the calls printed; results prints one JSON line per result, in input "
                           "order (or --pickle FILE writes the list); cancel stops a running job")  # fmt: skip
    jobs.add_argument("job_id", nargs="?", metavar="ID", help="the job (all but list): its id, or a unique prefix")
    jobs.add_argument("--follow", "-f", action="store_true", help="with logs: go on printing until the job ends")
    jobs.add_argument("--pickle", metavar="FILE", help="with results: write the list of results, pickled, to FILE")
    jobs.add_argument("--json", action="store_true", help="with list and show: print raw JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "login":
            return _login(args.url, args.api_key, args.ca_file)
        if args.command == "status":
            return _status(args.json)
        if args.command == "local":
            return _local_command(args.action, args.nodes)
        if args.command == "cluster" and args.setting == "standby":
            return _standby(args.action, args.images, args.per_cpu, args.python)
        if args.command == "cluster" and args.setting == "spec":
            return _spec(args.action, args.file)
        if args.command == "cluster" and args.setting == "nodes":
            return _nodes(args.json)
        if args.command == "cluster":
            return _cluster_action(args.setting)
        if args.command == "users":
            return _users(args.action, args.name, args.admin, args.json)
        if args.command == "jobs":
            return _jobs(args.action, args.job_id, args.follow, args.pickle, args.json)
    except BurlaError as e:
        print(f"burla: {e}", file=sys.stderr)
        return 1
    return 2  # pragma: no cover


def _login(url: str, api_key: str | None, ca_file: str | None = None) -> int:
    key = api_key or getpass.getpass(f"API key for {url}: ")
    with Client(url, key, ca_file=ca_file) as client:
        r = client.request("GET", "/v1/info", "log in", check=False, timeout=10)
        me = client.request("GET", "/v1/me", "log in", check=False, timeout=10) if r.status_code == 200 else r
    if r.status_code != 200:
        print(f"burla: {url} refused the key ({r.status_code}): {r.text[:200]}", file=sys.stderr)
        return 1
    path = _settings.write_login(url, key, ca_file)
    who = me.json() if me.status_code == 200 else {}
    as_user = f" as {who['name']} ({who['role']})" if who.get("name") else ""
    print(f"Logged in to {url}{as_user} ({r.json().get('nodes', 0)} nodes). Saved in {path}.")
    return 0


def _cluster() -> Client:
    """A client of the configured cluster (or the running local one: a command never starts it)."""
    settings = _settings.resolve()
    if settings.embedded:
        info = _local.discover()
        if info is None:
            raise BurlaError("no cluster configured and the local cluster is not running (burla local start)")
        return Client(info["url"], info["admin_token"])
    return Client(settings.url, settings.api_key)


def _standby(action: str, images: list[str], per_cpu: float, python: str) -> int:
    with _cluster() as client:
        if action == "set" and not images:
            raise BurlaError("burla cluster standby set: name at least one image")
        what = f"{action} the standby spec"
        if action == "set":
            body = {"images": [{"image": i, "per_cpu": per_cpu, "python_version": python} for i in images]}
            r = client.request("PUT", "/v1/standby", what, json=body, timeout=10)
        else:
            r = client.request("GET", "/v1/standby", what, timeout=10)
    spec = r.json()["images"]
    if not spec:
        print("No standby images: nodes with the Podman runtime keep no containers warm.")
    for i, image in enumerate(spec):
        default = " (default)" if i == 0 else ""
        python = f", python {image['python_version']}" if image.get("python_version") else ""
        print(f"{image['image']}{default}: {image['per_cpu']:g} per CPU{python}")
    return 0


def _spec(action: str, file: str | None) -> int:
    with _cluster() as client:
        if action == "set":
            if not file:
                raise BurlaError("burla cluster spec set: name a TOML file with a [cluster] section, as burla.toml has")
            import dataclasses

            from burla.common.config import Config

            cluster = Config.load(file, env={}).cluster  # a bad file raises ConfigError naming the key
            body = {
                "groups": [dataclasses.asdict(g) for g in cluster.groups], "zones": cluster.zones,
                "max_cpus": cluster.max_cpus, "grow": cluster.grow, "idle_timeout": cluster.idle_timeout,
                "standby_idle_timeout": cluster.standby_idle_timeout, "boot_timeout": cluster.boot_timeout,
            }  # fmt: skip
            r = client.request("PUT", "/v1/cluster/spec", "change the cluster spec", json=body, timeout=120)
        else:
            r = client.request("GET", "/v1/cluster/spec", "read the cluster spec", timeout=10)
    spec = r.json()
    print(f"max_cpus = {spec['max_cpus']}, grow = {str(spec['grow']).lower()}, idle_timeout = {spec['idle_timeout']:g}s, "
          f"boot_timeout = {spec['boot_timeout']:g}s, zones = {', '.join(spec['zones']) or 'those of the region'}")  # fmt: skip
    for g in spec["groups"]:
        spot = ", spot" if g["spot"] else ""
        gpu = f", {g['accelerator_count']} x {g['accelerator_type']}" if g["accelerator_count"] else ""
        print(f"  {g['machine_type']}: standby {g['standby']}{spot}{gpu}, {g['disk_gb']} GB disk, image {g['image']}")
    return 0


def _cluster_action(action: str) -> int:
    with _cluster() as client:
        r = client.request("POST", f"/v1/cluster/{action}", f"{action} the cluster", timeout=600)
    data = r.json()
    print(data.get("message", f"cluster {action}: done"))
    return 0


def _nodes(as_json: bool) -> int:
    with _cluster() as client:
        data = client.request("GET", "/v1/cluster/nodes", "list the cluster's nodes", timeout=10).json()
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    provider = escape(str(data.get("provider") or "none"))
    console.print(
        f"[bold]Provider[/bold] {provider}, standby {'on' if data.get('standby_on') else 'off'}, "
        f"{data.get('cpus', 0)} of at most {data.get('max_cpus', 0)} CPUs"
    )
    table = Table("node", "state", "machine type", "zone", "age", "job", "why", title="Nodes")
    for n in data.get("nodes", ()):
        cells = [n["name"], n["state"], n["machine_type"], n["zone"] or "-", _age(n["age"]), n["job"][:8] or "-",
                 n["reason"]]  # fmt: skip
        table.add_row(*(escape(str(c)) for c in cells))  # a node's log text is not markup
    console.print(table if data.get("nodes") else "No nodes.")
    for why in data.get("failures", ())[-5:]:
        console.print(f"[red]could not start a node:[/red] {escape(str(why))}")
    for failed in data.get("failed", ())[:5]:
        console.print(f"[red]{escape(str(failed['name']))} failed:[/red] {escape(str(failed['why']))[:500]}")
    return 0


def _users(action: str, name: str | None, admin: bool, as_json: bool) -> int:
    if action != "list" and not name:
        raise BurlaError(f"burla users {action}: name the user, e.g. `burla users {action} alice`")
    if admin and action != "add":
        raise BurlaError("--admin: only with `burla users add NAME`")
    with _cluster() as client:
        if action == "list":
            users = client.request("GET", "/v1/users", "list the users", timeout=10).json()["users"]
        elif action == "add":
            body = {"name": name, "role": "admin" if admin else "user"}
            added = client.request("POST", "/v1/users", f"add user {name}", json=body, timeout=10).json()
        elif action == "rotate":
            added = client.request("POST", f"/v1/users/{name}/key", f"rotate {name}'s key", timeout=10).json()
        elif action == "revoke":
            client.request("DELETE", f"/v1/users/{name}/key", f"revoke {name}'s key", timeout=10)
        else:
            removed = client.request("DELETE", f"/v1/users/{name}", f"remove user {name}", timeout=30).json()
    if action == "list":
        if as_json:
            print(json.dumps(users, indent=2))
            return 0
        if not users:
            print("No users but the admin token's. Add one: burla users add NAME")
        for u in users:
            key = f"key {u['key_id']}" if u["key_id"] else "no key (revoked: `burla users rotate` gives one)"
            print(f"{u['name']}  {u['role']}  {key}  {u['running_jobs']} running jobs")
    elif action in ("add", "rotate"):
        what = (
            f"User {name} ({added['role']}) added."
            if action == "add"
            else f"New key for {name}; the old one no longer works."
        )
        print(f"{what} Their API key, shown only this once:\n\n    {added['api_key']}\n")
        print(f"They log in with: burla login {client.url} --api-key KEY (or set BURLA_API_KEY)")
    elif action == "revoke":
        print(f"{name}'s key no longer works; `burla users rotate {name}` gives them a new one.")
    else:
        cancelled = removed.get("cancelled_jobs", [])
        print(f"User {name} removed" + (f"; {len(cancelled)} running jobs cancelled." if cancelled else "."))
    return 0


def _jobs(action: str, job_id: str | None, follow: bool, pickle_file: str | None, as_json: bool) -> int:
    if action != "list" and not job_id:
        raise BurlaError(
            f"burla jobs {action}: name the job, e.g. `burla jobs {action} 3f2a9c01` (see burla jobs list)"
        )
    if follow and action != "logs":
        raise BurlaError("--follow: only with `burla jobs logs ID`")
    if pickle_file and action != "results":
        raise BurlaError("--pickle: only with `burla jobs results ID --pickle FILE`")
    from ._handle import Job

    with _cluster() as client:
        if action == "list":
            listed = client.request("GET", "/v1/jobs", "list the jobs", timeout=30).json()["jobs"]
            return _print_jobs(listed, as_json)
        job = Job(client, _resolve_job(client, job_id or ""))
        if action == "show":
            status = job.status().to_wire()
            print(json.dumps(status, indent=2) if as_json else _describe_job(status))
        elif action == "logs":
            for stream, text in job.log_entries(follow):
                (sys.stderr if stream == 2 else sys.stdout).write(text)
            sys.stdout.flush()
        elif action == "results":
            return _print_results(job, pickle_file)
        else:
            job.cancel("cancelled with `burla jobs cancel`")
            print(f"job {job.id}: {job.status().state}")
    return 0


def _resolve_job(client: Client, given: str) -> str:
    """A job's full id from its id or a unique prefix of it (as `burla status` and `burla jobs list` show it)."""
    from ._handle import check_job_id

    check_job_id(given)
    if len(given) == 32:
        return given
    listed = client.request("GET", "/v1/jobs", "list the jobs", timeout=30).json()["jobs"]
    matches = [j["job_id"] for j in listed if j["job_id"].startswith(given)]
    if len(matches) == 1:
        return str(matches[0])
    if matches:
        raise BurlaError(f"{len(matches)} jobs have ids that start with {given}: give more of the id")
    return given  # a job of another length, or none: the daemon says which


def _print_results(job: Any, pickle_file: str | None) -> int:
    results = job.results()
    if pickle_file:
        import pickle

        with open(pickle_file, "wb") as f:
            pickle.dump(results, f)
        print(f"{len(results)} results of job {job.id} written to {pickle_file}", file=sys.stderr)
        return 0
    for i, value in enumerate(results):
        if isinstance(value, BaseException):  # return_exceptions=True: the input's slot holds how it failed
            value = {"error": {"type": type(value).__name__, "message": str(value), "input_index": i}}
        try:
            line = json.dumps(value)
        except (TypeError, ValueError):
            raise BurlaError(
                f"result {i} of job {job.id} is a {type(value).__name__}, which JSON cannot hold: "
                "use `burla jobs results ID --pickle FILE`"
            ) from None
        print(line)
    return 0


def _describe_job(j: dict[str, Any]) -> str:
    import time

    total = j["n_inputs"] if j["n_inputs"] is not None else f"{j['n_uploaded']}+"
    lines = [
        f"job {j['job_id']}",
        f"  function  {j['function_name'] or '-'}",
        f"  user      {j.get('owner') or '-'}",
        f"  state     {j['state']}{' (detached)' if j.get('detached') else ''}",
        f"  done      {j['n_done']:,} of {total}",
        f"  created   {_age(time.time() - j['created'])} ago" if j.get("created") else "  created   -",
    ]
    if j.get("finished"):
        lines.append(f"  finished  {_age(time.time() - j['finished'])} ago")
    if j.get("phase") and j["state"] == "running":
        lines.append(f"  now       {j['phase']}")
    return "\n".join(lines)


def _print_jobs(listed: list[dict[str, Any]], as_json: bool) -> int:
    if as_json:
        print(json.dumps(listed, indent=2))
        return 0
    if not listed:
        print("No jobs.")
        return 0
    import time

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table("job", "user", "function", "state", "done", "inputs", "created", title="Jobs")
    now = time.time()
    for j in listed:
        total = j["n_inputs"] if j["n_inputs"] is not None else f"{j['n_uploaded']}+"
        state = j["state"] + (", detached" if j.get("detached") else "")
        cells = [j["job_id"], j.get("owner") or "-", j["function_name"], state, f"{j['n_done']:,}", str(total),
                 f"{_age(now - j['created'])} ago"]  # fmt: skip
        table.add_row(*(escape(str(c)) for c in cells))
    console.print(table)
    return 0


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}min"
    return f"{seconds // 3600}h"


def _fetch_status() -> dict[str, Any]:
    with _cluster() as client:
        data: dict[str, Any] = client.request("GET", "/v1/cluster", "read the cluster's status", timeout=10).json()
        data["url"] = client.url
    return data


def _status(as_json: bool) -> int:
    data = _fetch_status()
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)  # a pipe gets whole rows
    console.print(f"[bold]Burla cluster[/bold] {data['url']}")
    nodes = Table("node", "host", "runtime", "python", "CPUs", "RAM", "workers", "busy", "idle", "seen", title="Nodes")
    for n in data["nodes"]:
        nodes.add_row(
            n["agent_id"][:8], n["hostname"], n.get("runtime", ""), n["python_version"], str(n["cpus"]),
            f"{n['ram_bytes'] / 1e9:.1f} GB", str(n["workers"]), str(n["busy"]), str(max(0, n["workers"] - n["busy"])),
            f"{n['last_seen_ago']:.1f}s ago",
        )  # fmt: skip
    console.print(nodes if data["nodes"] else "No nodes.")
    pools = [(n, p) for n in data["nodes"] for p in n.get("pools", ()) if p.get("image")]
    if pools:
        table = Table(
            "node", "image", "for", "state", "ready", "CPUs each", "RAM each", "containers", title="Containers"
        )
        for n, p in pools:
            containers = ", ".join(f"{cid or '-'} {state}" for cid, state in p.get("containers", ()))
            table.add_row(
                n["agent_id"][:8], p["image"], p["job_id"][:8] or "standby", p["phase"] or p["state"],
                f"{p['ready']}/{p['slots']}", f"{p['cpus']:g}", f"{p['ram_bytes'] / 1e9:.1f} GB", containers or "-",
            )  # fmt: skip
        console.print(table)
    jobs = Table("job", "user", "function", "state", "done", "inputs", "running", "retried", "failed", "calls/s",
                 title="Jobs")  # fmt: skip
    for j in data["jobs"]:
        total = j["n_inputs"] if j["n_inputs"] is not None else f"{j['n_uploaded']}+"
        jobs.add_row(
            j["job_id"][:8], j.get("owner", "") or "-", j["function_name"],
            j["state"] + (", detached" if j.get("detached") else ""), f"{j['n_done']:,}", str(total),
            str(j["running"]), f"{j.get('retried', 0):,}", f"{j.get('failed', 0):,}", f"{j['calls_per_second']:,.0f}",
        )  # fmt: skip
    console.print(jobs if data["jobs"] else "No jobs.")
    attempts = [(j, a) for j in data["jobs"] for a in j.get("attempts", ())]
    if attempts:
        table = Table("job", "input", "attempt", "what", "node", "then", title="Failed attempts (latest)")
        for j, a in attempts:
            where = f"#{a['lo']}" if a["hi"] - a["lo"] <= 1 else f"#{a['lo']}-#{a['hi'] - 1}"
            what = f"{a['type_name'].rpartition('.')[2]}: {a['message']}"[:120]
            table.add_row(j["job_id"][:8], where, str(a["attempt"]), what, a["node"] or "-",
                          "retried" if a["retried"] else "failed")  # fmt: skip
        console.print(table)
    return 0


def _local_command(action: str, nodes: int = 0) -> int:
    if action == "stop":
        outcome = _local.stop()
        if outcome == "killed":
            print("local cluster killed: it did not stop within 10s of SIGTERM", file=sys.stderr)
        print("local cluster stopped" if outcome else "no local cluster running")
        return 0
    if nodes < 0 or nodes and action != "start":
        raise BurlaError("--nodes: a positive number of nodes, with `burla local start`")
    running = _local.discover() if nodes else None
    if nodes:
        if running is not None:
            print(f"local cluster already running at {running['url']}: `burla local stop` first to start it with "
                  f"--nodes {nodes}", file=sys.stderr)  # fmt: skip
            return 1
        os.environ["BURLA_EMBEDDED_NODES"] = str(nodes)  # read by the daemon it starts (embedded.nodes)
    info = _local.ensure_started() if action == "start" else _local.discover()
    if info is None:
        print("no local cluster running")
        return 0
    version = f", Burla {info['version']}" if info.get("version") else ""
    print(f"local cluster running at {info['url']} (pid {info['pid']}{version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
