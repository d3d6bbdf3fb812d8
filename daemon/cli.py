"""``burlad``: the daemon and the node agent, one binary.

    burlad serve  [--config F] [--host H] [--port P] [--state-dir D]
    burlad agent  URL [--token-file F] [--ca-file F] [--workers N] [--runtime process|podman] [--state-dir D]
                  (the node token in $BURLA_AGENT_TOKEN or the file: never on the command line)
    burlad tokens [--state-dir D]

Settings come from burla.toml, then BURLA_* environment variables, then these
flags; see burla.toml.example.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from functools import partial
from pathlib import Path
from typing import Any

from burla.common.config import Config
from burla.errors import ConfigError

from .state_dir import TOKENS_FILE, StateDirInUse


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="path to burla.toml (default: ./burla.toml, ~/.config/burla/burla.toml)")
    common.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p = argparse.ArgumentParser(prog="burlad", description="Burla's control-plane daemon and node agent.")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the control plane")
    serve.add_argument("--host", dest="daemon.host")
    serve.add_argument("--port", dest="daemon.port", type=int)
    serve.add_argument("--state-dir", dest="daemon.state_dir", help="where the SQLite file and tokens live")
    serve.add_argument("--embedded", action="store_true", help="run the local cluster (daemon + one agent)")
    serve.add_argument("--nodes", dest="embedded.nodes", type=int, help="with --embedded: N local nodes, not one agent")
    serve.add_argument(
        "--idle-timeout", dest="embedded.idle_timeout", help="with --embedded: stop after this long idle"
    )

    agent = sub.add_parser("agent", parents=[common], help="run a node agent")
    agent.add_argument("url", help="the daemon's URL, e.g. http://10.0.0.2:8080 or https://burla.example:8080")
    agent.add_argument(
        "--token-file", help="a file holding the daemon's node token (burlad tokens); or set $BURLA_AGENT_TOKEN"
    )
    agent.add_argument("--token", dest="token_in_argv", help=argparse.SUPPRESS)
    agent.add_argument("--ca-file", dest="agent.ca_file", help="a PEM CA that signed an https daemon's certificate")
    agent.add_argument("--workers", dest="agent.workers", type=int, help="warm workers (default: one per CPU)")
    agent.add_argument("--runtime", dest="agent.runtime", choices=["process", "podman"])
    agent.add_argument("--python", dest="agent.python", help="interpreter for process workers")
    agent.add_argument("--state-dir", dest="agent.state_dir")
    agent.add_argument("--cpus", dest="agent.cpus", type=int, help="CPUs to offer (default: all)")
    agent.add_argument("--ram", dest="agent.ram", help="RAM to offer, e.g. 16GB (default: all)")

    tokens = sub.add_parser("tokens", parents=[common], help="print the admin and node tokens")
    tokens.add_argument("--state-dir", dest="daemon.state_dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    early_stop: list[int] = []
    if args.command == "agent":  # a SIGTERM while it still imports is kept for when it listens, not fatal
        signal.signal(signal.SIGTERM, lambda signum, frame: early_stop.append(signum))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(
        max(logging.WARNING, logging.getLevelName(args.log_level))
    )  # not a line per poll
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if "." in k}
    if args.command == "agent":
        overrides["agent.url"] = args.url
        if args.token_in_argv is not None:
            print("burlad agent: --token is refused: a token on the command line is readable by every user of this "
                  "machine (ps). Put it in $BURLA_AGENT_TOKEN or in a file only you can read and pass --token-file.",
                  file=sys.stderr)  # fmt: skip
            return 2
        if args.token_file:
            try:
                overrides["agent.token"] = Path(args.token_file).read_text().strip()
            except OSError as e:
                print(f"burlad agent: cannot read --token-file {args.token_file}: {e.strerror}", file=sys.stderr)
                return 2
    try:
        config = Config.load(args.config, overrides=overrides)
    except ConfigError as e:
        print(f"burlad: {e}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve_unless_taken(config, args.embedded)
    if args.command == "agent":
        return run_agent(config, early_stop)
    if args.command == "tokens":
        path = config.daemon.resolved_state_dir() / TOKENS_FILE  # SQLite keeps only their hashes
        try:
            print(json.dumps(json.loads(path.read_text()), indent=2))
        except (OSError, ValueError) as e:
            print(f"burlad tokens: cannot read {path} ({e}); it is written when `burlad serve` starts", file=sys.stderr)
            return 1
        return 0
    return 2  # pragma: no cover


def _serve_unless_taken(config: Config, embedded: bool) -> int:
    """Serve until stopped; 1, with a one-line error, where another burlad holds the state directory."""
    refused: BaseException | None = None
    try:
        if embedded:
            from .embedded import run_embedded

            run_embedded(config)
        else:
            _serve(config)
    except* StateDirInUse as group:
        refused = group.exceptions[0]
    except* ConfigError as group:
        refused = group.exceptions[0]
    if refused is not None:
        print(f"burlad: {refused}", file=sys.stderr)
        return 1
    return 0


def _serve(config: Config) -> None:
    import trio

    from .server import serve

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            running = await nursery.start(partial(serve, config.daemon, standby=config.standby, cluster=config.cluster))
            print(f"burlad serving on {running.url}", file=sys.stderr)
            print(f"  state: {running.state_dir} (tokens in tokens.json there)", file=sys.stderr)
            print(f"  start agents with: BURLA_AGENT_TOKEN=<node token> burlad agent {config.daemon.public_url or running.url}",
                  file=sys.stderr)  # fmt: skip
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

    trio.run(main)


def run_agent(config: Config, early_stop: list[int]) -> int:
    """Run a node agent until SIGTERM or SIGINT; `early_stop` is not empty once one came before it listened."""
    import trio

    from burla.node_agent.agent import Agent, AgentError

    if not config.agent.token:
        print("burlad agent: the node token is required: set $BURLA_AGENT_TOKEN or pass --token-file "
              "(see `burlad tokens` on the daemon's machine)", file=sys.stderr)  # fmt: skip
        return 2
    runtime = None
    if config.agent.runtime == "podman":
        try:
            from burla.node_agent.podman_runtime import PodmanRuntime
        except ImportError as e:
            print(f"burlad agent: the podman runtime needs `pip install burla[podman]` ({e})", file=sys.stderr)
            return 2
        runtime = PodmanRuntime.from_config(config.agent)
    elif config.agent.runtime != "process":
        print(f"burlad agent: unknown runtime {config.agent.runtime!r} (process or podman)", file=sys.stderr)
        return 2
    try:
        agent = Agent(config.agent, runtime)  # checks agent.worker_user: its user, and the right to be it
    except (ConfigError, AgentError) as e:
        print(f"burlad agent: {e}", file=sys.stderr)
        return 2

    async def main() -> None:
        # Listening before the agent starts: a SIGTERM while it starts its workers or registers (a local
        # cluster stopped right after it started) stops it cleanly too, its workers with it.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                if early_stop:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
                await nursery.start(agent.run)

    if early_stop:
        return 0
    try:
        trio.run(main)
    except BaseException as e:  # AgentError, or a taken state dir, maybe inside exception groups
        error = e
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if isinstance(error, (AgentError, RuntimeError)) and not isinstance(error, BaseExceptionGroup):
            print(f"burlad agent: {error}", file=sys.stderr)
            return 1
        raise
    return 0


async def _cancel_on_signal(signals: Any, scope: Any) -> None:
    async for _ in signals:
        scope.cancel()
        return


if __name__ == "__main__":
    sys.exit(main())
