"""The control plane's one SQLite file: the whole schema, and every write.

All state that must survive a restart of burlad is here: tokens, agents, jobs,
their functions and input batches, the leases out, and each job's event log
(accepted results, printed lines, errors). The file runs in WAL mode with
``synchronous=NORMAL``: a crash of the process loses nothing committed.

Writes go through `Store.tx()`, so each decision of the control plane lands
atomically. The schema is versioned in the ``meta`` table; `MIGRATIONS` bring
an older file up to date when it is opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from burla.schemas import messages as m
from burla.schemas import wire

if TYPE_CHECKING:
    import sqlite_utils

from .payloads import PayloadStore
from .state_dir import new_token

SCHEMA_VERSION = 7


class StoreError(RuntimeError):
    """The control plane's database failed; the message says which operation."""


def _v1(db: sqlite_utils.Database) -> None:
    db.table("meta").create({"key": str, "value": str}, pk="key")
    db.table("tokens").create({"role": str, "token": str}, pk="role")
    db.table("agents").create(
        {"agent_id": str, "node_id": str, "info": str, "registered": float, "last_seen": float}, pk="agent_id"
    )
    db.table("functions").create({"hash": str, "blob": bytes, "size": int, "created": float}, pk="hash")
    db.table("jobs").create(
        {
            "job_id": str, "spec": str, "state": str, "n_inputs": int, "created": float,
            "finished": float, "log_bytes": int, "dropped_log_bytes": int, "dropped_log_lines": int,
        },
        pk="job_id",
        defaults={"log_bytes": 0, "dropped_log_bytes": 0, "dropped_log_lines": 0},
    )  # fmt: skip
    db.table("batches").create(
        {"job_id": str, "seq": int, "start": int, "count": int, "payload": bytes}, pk=("job_id", "seq")
    )
    db.table("leases").create(
        {
            "lease_id": int, "job_id": str, "agent_id": str, "function_hash": str, "batch_seq": int,
            "batch_start": int, "lo": int, "hi": int, "func_cpu": float, "func_ram_bytes": int,
        },
        pk="lease_id",
    )  # fmt: skip
    db.execute(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, kind TEXT NOT NULL,"
        " lo INTEGER NOT NULL DEFAULT 0, hi INTEGER NOT NULL DEFAULT 0, data TEXT, payload BLOB)"
    )
    db.table("events").create_index(["job_id", "seq"])
    db.table("leases").create_index(["job_id"])


def _v2(db: sqlite_utils.Database) -> None:
    # The standby spec: which images nodes keep warm (node agents read it).
    db.table("standby").create({"image": str, "python_version": str, "per_cpu": float, "position": int}, pk="image")


def _v3(db: sqlite_utils.Database) -> None:
    # Large payloads move to files (see payloads.py): a row names its file instead.
    db.table("batches").add_column("payload_ref", str)
    db.table("events").add_column("payload_ref", str)


def _v4(db: sqlite_utils.Database) -> None:
    # A lease names the agent's pool it runs on and the job's environment, so a restarted daemon counts it
    # against that pool. Leases of older files: their job's environment; pool "process" on process agents,
    # unknown ("") on container agents.
    db.table("leases").add_column("pool", str, not_null_default="")
    db.table("leases").add_column("env", str, not_null_default="")
    db.execute(
        "UPDATE leases SET env = COALESCE((SELECT json_extract(spec, '$.env') FROM jobs"
        " WHERE jobs.job_id = leases.job_id), '')"
    )
    db.execute(
        "UPDATE leases SET pool = 'process' WHERE agent_id IN (SELECT agent_id FROM agents"
        " WHERE COALESCE(json_extract(info, '$.runtime'), 'process') = 'process')"
    )


def _v5(db: sqlite_utils.Database) -> None:
    # The machines the daemon starts itself (node_keeper.py): one row each, and every change of state.
    db.table("nodes").create(
        {
            "name": str, "grp": int, "state": str, "since": float, "job": str, "zone": str, "reason": str,
            "agent_id": str, "created": float, "token_hash": str,
        },
        pk="name",
    )  # fmt: skip
    db.execute(
        "CREATE TABLE node_events (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, at REAL NOT NULL,"
        " state TEXT NOT NULL, why TEXT NOT NULL)"
    )
    db.table("node_events").create_index(["name", "id"])


def _v6(db: sqlite_utils.Database) -> None:
    # Users and their API keys (users.py): keys are kept as hashes, found by their public id. A job has an
    # owner; jobs of older files were made with the admin token.
    db.table("users").create({"name": str, "role": str, "created": float}, pk="name")
    db.table("keys").create(
        {"key_id": str, "user": str, "key_hash": str, "created": float, "ended": float, "why": str}, pk="key_id"
    )
    db.table("keys").create_index(["user"])
    db.table("jobs").add_column("owner", str, not_null_default="admin")
    # A prefetched lease names the lease it follows in its slot (0: none), so a restarted daemon counts it as
    # waiting there, not as a call of its own.
    db.table("leases").add_column("after", int, not_null_default=0)


def _v7(db: sqlite_utils.Database) -> None:
    # Every failed attempt of a job's calls that ran again (retries=, a lost node) or failed its input after
    # others: shown by `burla status`, and counted on after a restart (scheduler.restore_job).
    db.execute(
        "CREATE TABLE attempts (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, lo INTEGER NOT NULL,"
        " hi INTEGER NOT NULL, attempt INTEGER NOT NULL, kind TEXT NOT NULL, type_name TEXT NOT NULL,"
        " message TEXT NOT NULL, node TEXT NOT NULL, at REAL NOT NULL, retried INTEGER NOT NULL)"
    )
    db.table("attempts").create_index(["job_id", "id"])


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1, _v2, _v3, _v4, _v5, _v6, _v7]
assert len(MIGRATIONS) == SCHEMA_VERSION


class Store:
    def __init__(self, path: str | Path, payload_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)  # tokens and every job's data: for the daemon's user only
        self.payloads = PayloadStore(Path(payload_dir) if payload_dir else self.path.parent / "payloads")
        try:
            self.path.touch(mode=0o600, exist_ok=True)
            for suffix in ("", "-wal", "-shm"):  # SQLite makes its WAL and shm files with the database's mode
                if Path(f"{self.path}{suffix}").exists():
                    os.chmod(f"{self.path}{suffix}", 0o600)
            self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA busy_timeout=5000")
            self.conn.execute("PRAGMA foreign_keys=OFF")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the control-plane database {self.path}: {e}") from None
        self._depth = 0
        self._after_commit: list[Callable[[], None]] = []
        self.migrate()
        self.payloads.sweep(r[0] for r in self.conn.execute("SELECT job_id FROM jobs"))

    def close(self) -> None:
        self.conn.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One atomic write. Nested calls join the outer transaction, so a decision of the control plane
        that makes several store calls inside one `tx()` commits once, or not at all."""
        if self._depth:
            self._depth += 1
            try:
                yield self.conn
            finally:
                self._depth -= 1
            return
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StoreError(f"cannot start a transaction on {self.path}: {e}") from None
        self._depth = 1
        try:
            yield self.conn
        except BaseException:
            self._depth = 0
            self._after_commit.clear()
            self.conn.execute("ROLLBACK")
            raise
        self._depth = 0
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._after_commit.clear()
            self.conn.execute("ROLLBACK")
            raise StoreError(f"cannot commit to {self.path}: {e}") from None
        done, self._after_commit = self._after_commit, []
        for fn in done:
            fn()

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run `fn` once the transaction in progress commits (now, outside one); never if it rolls back.

        Files that rows name are deleted this way: a rolled-back (or crashed) transaction still finds them.
        """
        if self._depth:
            self._after_commit.append(fn)
        else:
            fn()

    def _one(self, sql: str, params: Iterable[Any] = ()) -> Any:
        row = self.conn.execute(sql, tuple(params)).fetchone()
        return None if row is None else row[0]

    # ---- schema --------------------------------------------------------------

    def schema_version(self) -> int:
        if self._one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'") is None:
            return 0
        value = self._one("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(value or 0)

    def migrate(self) -> None:
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {current}, newer than this burlad ({SCHEMA_VERSION}); upgrade burla"
            )
        if current == SCHEMA_VERSION:
            return
        import sqlite_utils  # only schema changes need it: a restart on a current file skips the import

        db = sqlite_utils.Database(self.conn)
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with self.tx():
                MIGRATIONS[version - 1](db)
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(version),)
                )

    # ---- tokens ------------------------------------------------------------------

    def tokens(self, admin: str = "", node: str = "", known: Mapping[str, str] | None = None) -> dict[str, str]:
        """The admin and node tokens in plaintext, where they can be known; SQLite keeps only their hashes.

        A token is known when it is made now (first start), set from config (`admin`, `node`), found in
        plaintext in a database of an older burlad (hashed here once and for all), or in `known` (the
        state dir's tokens.json) and matching its hash. A role missing from the answer still works: its
        hash checks requests; only its plaintext is lost.
        """
        with self.tx():
            out = {}
            for role, given in (("admin", admin), ("node", node)):
                stored = self._one("SELECT token FROM tokens WHERE role = ?", (role,))
                plain = ""
                if stored and not str(stored).startswith(TOKEN_HASH):
                    plain, stored = str(stored), None  # an older burlad kept it as it is
                candidate = given or plain or (known or {}).get(role, "")
                if stored is None or (given and not hmac.compare_digest(hash_token(given), str(stored))):
                    token = candidate or new_token(role)
                    self.conn.execute(
                        "INSERT OR REPLACE INTO tokens (role, token) VALUES (?, ?)", (role, hash_token(token))
                    )
                    out[role] = token
                elif candidate and hmac.compare_digest(hash_token(candidate), str(stored)):
                    out[role] = candidate
        return out

    def token_hashes(self) -> dict[str, str]:
        rows = self.conn.execute("SELECT role, token FROM tokens WHERE role IN ('admin', 'node')").fetchall()
        return {str(role): str(token) for role, token in rows}

    def secret(self, role: str) -> str:
        """A random secret of the daemon's own, made once and kept (e.g. the key of agents' tokens)."""
        with self.tx():
            existing = self._one("SELECT token FROM tokens WHERE role = ?", (role,))
            if existing:
                return str(existing)
            value = secrets.token_hex(32)
            self.conn.execute("INSERT INTO tokens (role, token) VALUES (?, ?)", (role, value))
            return value

    def meta(self, key: str) -> str | None:
        value = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if value is None else str(value)

    def set_meta(self, key: str, value: str) -> None:
        with self.tx() as c:
            c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # ---- cluster nodes (node_keeper.py) ----------------------------------------------

    NODE_COLUMNS = ("name", "grp", "state", "since", "job", "zone", "reason", "agent_id", "created", "token_hash")
    NODE_EVENTS_KEPT = 50  # per node
    NODE_EVENTS_KEPT_IN_ALL = 20_000  # of nodes long gone too: a growing cluster's churn stays bounded

    def node_rows(self) -> list[dict[str, Any]]:
        rows = self.conn.execute(f"SELECT {', '.join(self.NODE_COLUMNS)} FROM nodes ORDER BY created").fetchall()
        return [dict(zip(self.NODE_COLUMNS, row, strict=True)) for row in rows]

    def put_node_row(self, row: dict[str, Any], at: float, why: str) -> None:
        with self.tx() as c:
            c.execute(
                f"INSERT OR REPLACE INTO nodes ({', '.join(self.NODE_COLUMNS)}) VALUES ({', '.join('?' * len(self.NODE_COLUMNS))})",
                tuple(row[k] for k in self.NODE_COLUMNS),
            )
            self._node_event(c, row["name"], at, row["state"], why)

    def drop_node_row(self, name: str, at: float, why: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM nodes WHERE name = ?", (name,))
            self._node_event(c, name, at, "GONE", why)

    def _node_event(self, c: sqlite3.Connection, name: str, at: float, state: str, why: str) -> None:
        c.execute("INSERT INTO node_events (name, at, state, why) VALUES (?, ?, ?, ?)", (name, at, state, why[:4000]))
        c.execute(
            "DELETE FROM node_events WHERE name = ? AND id <= (SELECT id FROM node_events WHERE name = ?"
            " ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (name, name, self.NODE_EVENTS_KEPT),
        )
        c.execute("DELETE FROM node_events WHERE id <= (SELECT MAX(id) FROM node_events) - ?",
                  (self.NODE_EVENTS_KEPT_IN_ALL,))  # fmt: skip

    def node_events(self, name: str | None = None, limit: int = 200) -> list[tuple[str, float, str, str]]:
        """(node, time, state, why), newest first."""
        where, params = ("WHERE name = ?", (name, limit)) if name else ("", (limit,))
        sql = f"SELECT name, at, state, why FROM node_events {where} ORDER BY id DESC LIMIT ?"
        return [tuple(r) for r in self.conn.execute(sql, params).fetchall()]

    # ---- agents --------------------------------------------------------------------

    def put_agent(self, agent_id: str, info: m.NodeInfo, now: float) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO agents (agent_id, node_id, info, registered, last_seen) VALUES (?, ?, ?, ?, ?)",
                (agent_id, info.node_id, json.dumps(info.to_wire()), now, now),
            )

    def delete_agents(self, agent_ids: Iterable[str]) -> None:
        with self.tx() as c:
            c.executemany("DELETE FROM agents WHERE agent_id = ?", [(a,) for a in agent_ids])

    def agents(self) -> list[tuple[str, m.NodeInfo]]:
        """The agents registered before a restart; a row that does not load is dropped (that agent registers again)."""
        out = []
        for agent_id, info in self.conn.execute("SELECT agent_id, info FROM agents ORDER BY registered").fetchall():
            try:
                out.append((str(agent_id), m.NodeInfo.from_wire(wire.loads(info))))
            except (ValueError, TypeError):
                self.delete_agents([agent_id])
        return out

    # ---- jobs ----------------------------------------------------------------------

    def create_job(self, spec: m.JobSpec, function_blob: bytes, now: float, owner: str) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO functions (hash, blob, size, created) VALUES (?, ?, ?, ?)",
                (spec.function_hash, function_blob, len(function_blob), now),
            )
            c.execute(
                "INSERT INTO jobs (job_id, spec, state, created, owner) VALUES (?, ?, ?, ?, ?)",
                (spec.job_id, json.dumps(spec.to_wire()), m.RUNNING, now, owner),
            )

    def job_exists(self, job_id: str) -> bool:
        return self._one("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)) is not None

    def job_owner(self, job_id: str) -> str | None:
        """Who made the job (None: no such job)."""
        owner = self._one("SELECT owner FROM jobs WHERE job_id = ?", (job_id,))
        return None if owner is None else str(owner)

    def running_jobs_of(self, owner: str) -> list[str]:
        rows = self.conn.execute("SELECT job_id FROM jobs WHERE owner = ? AND state = ?", (owner, m.RUNNING))
        return [str(r[0]) for r in rows.fetchall()]

    # ---- users and their keys (users.py) ----------------------------------------------

    def users(self) -> list[tuple[str, str, float]]:
        """(name, role, created) of every user, by name."""
        rows = self.conn.execute("SELECT name, role, created FROM users ORDER BY name").fetchall()
        return [(str(n), str(r), float(c)) for n, r, c in rows]

    def keys(self) -> list[tuple[str, str, str, float, float | None, str]]:
        """(key_id, user, key_hash, created, ended, why ended) of every key, the ended ones too."""
        rows = self.conn.execute("SELECT key_id, user, key_hash, created, ended, why FROM keys").fetchall()
        return [(str(k), str(u), str(h), float(c), None if e is None else float(e), str(w or "")) for k, u, h, c, e, w in rows]  # fmt: skip

    def add_user(self, name: str, role: str, now: float) -> None:
        with self.tx() as c:
            c.execute("INSERT INTO users (name, role, created) VALUES (?, ?, ?)", (name, role, now))

    def remove_user(self, name: str) -> None:
        """Keep the name, with no role: jobs are owned by name, and a new user of that name must not get them."""
        with self.tx() as c:
            c.execute("UPDATE users SET role = 'removed' WHERE name = ?", (name,))

    def add_key(self, key_id: str, user: str, key_hash: str, now: float) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO keys (key_id, user, key_hash, created) VALUES (?, ?, ?, ?)", (key_id, user, key_hash, now)
            )

    def end_keys(self, user: str, now: float, why: str) -> list[str]:
        """End every live key of `user`; returns their ids."""
        with self.tx() as c:
            ids = [str(r[0]) for r in c.execute("SELECT key_id FROM keys WHERE user = ? AND ended IS NULL", (user,))]
            c.execute("UPDATE keys SET ended = ?, why = ? WHERE user = ? AND ended IS NULL", (now, why, user))
        return ids

    def function_blob(self, function_hash: str) -> bytes | None:
        blob = self._one("SELECT blob FROM functions WHERE hash = ?", (function_hash,))
        return None if blob is None else bytes(blob)

    def add_batches(
        self, job_id: str, batches: Iterable[tuple[m.BatchMeta, bytes | memoryview | None]], final_count: int | None
    ) -> None:
        rows: list[tuple[str, int, int, int, bytes | memoryview | None, str | None]] = []
        for b, payload in batches:
            if b.payload_ref:  # the client wrote the file itself (see common.local)
                rows.append((job_id, b.seq, b.start, b.count, None, b.payload_ref))
            elif payload is not None and self.payloads.is_large(payload):  # written before its row commits
                rows.append((job_id, b.seq, b.start, b.count, None, self.payloads.put(job_id, f"b{b.seq}", payload)))
            else:
                rows.append((job_id, b.seq, b.start, b.count, payload, None))
        with self.tx() as c:
            c.executemany(
                "INSERT OR IGNORE INTO batches (job_id, seq, start, count, payload, payload_ref)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            if final_count is not None:
                c.execute("UPDATE jobs SET n_inputs = ? WHERE job_id = ?", (final_count, job_id))

    def batch_ref(self, job_id: str, seq: int) -> str | None:
        """The file a batch lives in, if it is kept as a file."""
        ref = self._one("SELECT payload_ref FROM batches WHERE job_id = ? AND seq = ?", (job_id, seq))
        return str(ref) if ref else None

    def batch_payload(self, job_id: str, seq: int) -> bytes | None:
        row = self.conn.execute(
            "SELECT payload, payload_ref FROM batches WHERE job_id = ? AND seq = ?", (job_id, seq)
        ).fetchone()
        if row is None:
            return None
        return self.payloads.get(row[1]) if row[1] else bytes(row[0])

    def set_job_state(self, job_id: str, state: str, now: float) -> None:
        """Record a job's state; a finished job's inputs and leases are dropped."""
        finished = state in m.FINISHED_STATES
        with self.tx() as c:
            c.execute(
                "UPDATE jobs SET state = ?, finished = ? WHERE job_id = ?", (state, now if finished else None, job_id)
            )
            if not finished:
                return
            refs = c.execute(
                "SELECT payload_ref FROM batches WHERE job_id = ? AND payload_ref IS NOT NULL", (job_id,)
            ).fetchall()
            c.execute("DELETE FROM batches WHERE job_id = ?", (job_id,))
            c.execute("DELETE FROM leases WHERE job_id = ?", (job_id,))
            paths = [self.payloads.path(ref) for (ref,) in refs]

            def unlink() -> None:
                for path in paths:
                    path.unlink(missing_ok=True)

            self.after_commit(unlink)

    def delete_job(self, job_id: str) -> None:
        with self.tx() as c:
            for table in ("events", "batches", "leases", "attempts", "jobs"):
                c.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
            c.execute(
                "DELETE FROM functions WHERE hash NOT IN (SELECT json_extract(spec, '$.function_hash') FROM jobs)"
            )
            self.after_commit(lambda: self.payloads.delete_job(job_id))

    def job_rows(self, owner: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """The newest jobs (of `owner`; None: everyone's), newest first: their rows as they are kept."""
        where, params = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        rows = self.conn.execute(
            "SELECT job_id, spec, state, n_inputs, created, finished, owner FROM jobs "
            f"{where} ORDER BY created DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        keys = ("job_id", "spec", "state", "n_inputs", "created", "finished", "owner")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def job_row(self, job_id: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT job_id, spec, state, n_inputs, created, finished, owner FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        keys = ("job_id", "spec", "state", "n_inputs", "created", "finished", "owner")
        return None if row is None else dict(zip(keys, row, strict=True))

    def inputs_done(self, job_id: str) -> tuple[int, int]:
        """How many inputs of the job are done (a result, or with return_exceptions their error), and how
        many of those failed."""
        row = self.conn.execute(
            "SELECT COALESCE(SUM(hi - lo), 0), COALESCE(SUM(CASE WHEN kind = ? THEN hi - lo ELSE 0 END), 0) "
            "FROM events WHERE job_id = ? AND kind IN (?, ?)",
            (m.CALL_FAILED, job_id, m.RESULTS, m.CALL_FAILED),
        ).fetchone()
        return int(row[0]), int(row[1])

    def finished_jobs_before(self, cutoff: float) -> list[str]:
        rows = self.conn.execute(
            "SELECT job_id FROM jobs WHERE finished IS NOT NULL AND finished < ?", (cutoff,)
        ).fetchall()
        return [r[0] for r in rows]

    def running_jobs(self) -> list[dict[str, Any]]:
        """Everything needed to rebuild the scheduler's view of unfinished jobs.

        Every row is checked as a message from a peer would be. A job whose rows cannot be used
        (written by a buggy or older burlad, or edited by hand) comes back as {"job_id", "error"},
        for the daemon to fail with that reason: one bad row never stops the daemon from starting.
        """
        out: list[dict[str, Any]] = []
        for job_id, spec, n_inputs, created, owner in self.conn.execute(
            "SELECT job_id, spec, n_inputs, created, owner FROM jobs WHERE state = ? ORDER BY created", (m.RUNNING,)
        ).fetchall():
            try:
                out.append(self._running_job(job_id, spec, n_inputs, created) | {"owner": str(owner)})
            except (ValueError, TypeError, OverflowError, KeyError, sqlite3.Error) as e:
                out.append({"job_id": str(job_id), "error": f"{type(e).__name__}: {e}"})
        return out

    def _running_job(self, job_id: str, spec: Any, n_inputs: Any, created: Any) -> dict[str, Any]:
        batches = [
            m.BatchMeta.from_wire({"seq": seq, "start": start, "count": count})
            for seq, start, count in self.conn.execute(
                "SELECT seq, start, count FROM batches WHERE job_id = ?", (job_id,)
            )
        ]
        done = self.conn.execute(
            "SELECT lo, hi FROM events WHERE job_id = ? AND kind = ? AND hi > lo", (job_id, m.RESULTS)
        ).fetchall()
        failed = self.conn.execute(  # inputs done with their error (return_exceptions)
            "SELECT lo, hi FROM events WHERE job_id = ? AND kind = ? AND hi > lo", (job_id, m.CALL_FAILED)
        ).fetchall()
        leases = [
            (
                m.Lease.from_wire(
                    {
                        "lease_id": lid,
                        "job_id": job_id,
                        "function_hash": fh,
                        "batch_seq": seq,
                        "batch_start": start,
                        "lo": lo,
                        "hi": hi,
                        "func_cpu": cpu,
                        "func_ram_bytes": ram,
                        "pool": pool,
                        "env": env,
                        "after": after,
                    }
                ),
                str(agent),
            )  # fmt: skip
            for lid, agent, fh, seq, start, lo, hi, cpu, ram, pool, env, after in self.conn.execute(
                "SELECT lease_id, agent_id, function_hash, batch_seq, batch_start, lo, hi, func_cpu,"
                " func_ram_bytes, pool, env, after FROM leases WHERE job_id = ? ORDER BY lease_id",  # before who follows
                (job_id,),
            )
        ]
        if n_inputs is not None and not (isinstance(n_inputs, int) and 0 <= n_inputs <= m.MAX_INDEX):
            raise ValueError(f"n_inputs {n_inputs!r} is not a count of inputs")
        if not all(isinstance(v, int) and 0 <= v <= m.MAX_INDEX for row in [*done, *failed] for v in row):
            raise ValueError("a result range is not a range of input indices")
        return {
            "spec": m.JobSpec.from_wire(wire.loads(spec)),
            "n_inputs": n_inputs,
            "created": float(created),
            "batches": batches,
            "done": [tuple(r) for r in [*done, *failed]],
            "leases": leases,
            "attempts": self.iter_attempts(job_id),  # read as the job is rebuilt: never all in memory at once
            "failed": sum(hi - lo for lo, hi in failed),
        }

    # ---- failed attempts -------------------------------------------------------------

    def add_attempt(self, job_id: str, a: m.Attempt) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO attempts (job_id, lo, hi, attempt, kind, type_name, message, node, at, retried)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, a.lo, a.hi, a.attempt, a.kind, a.type_name, a.message, a.node, a.at, int(a.retried)),
            )

    def attempts(self, job_id: str, last: int | None = None) -> list[m.Attempt]:
        """A job's failed attempts, oldest first (the `last` ones only, when given); each row checked."""
        rows = self.conn.execute(
            f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE job_id = ? ORDER BY id DESC LIMIT ?",
            (job_id, -1 if last is None else last),
        ).fetchall()
        return [_attempt(row) for row in reversed(rows)]

    def iter_attempts(self, job_id: str) -> Iterator[m.Attempt]:
        """A job's failed attempts, oldest first, read one row at a time (a job of a million failing inputs with
        retries= has millions: a restart must not hold them all)."""
        rows = self.conn.execute(f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE job_id = ? ORDER BY id", (job_id,))
        for row in rows:  # a generator: the query runs only when the job is rebuilt
            yield _attempt(row)

    def max_lease_id(self) -> int:
        return int(self._one("SELECT COALESCE(MAX(lease_id), 0) FROM leases") or 0)

    # ---- leases --------------------------------------------------------------------

    def put_leases(self, leases: Iterable[tuple[m.Lease, str]]) -> None:
        with self.tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO leases (lease_id, job_id, agent_id, function_hash, batch_seq, batch_start,"
                " lo, hi, func_cpu, func_ram_bytes, pool, env, after) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        x.lease_id,
                        x.job_id,
                        agent,
                        x.function_hash,
                        x.batch_seq,
                        x.batch_start,
                        x.lo,
                        x.hi,
                        x.func_cpu,
                        x.func_ram_bytes,
                        x.pool,
                        x.env,
                        x.after,
                    )
                    for x, agent in leases
                ],  # fmt: skip
            )

    def delete_leases(self, lease_ids: Iterable[int]) -> None:
        with self.tx() as c:
            c.executemany("DELETE FROM leases WHERE lease_id = ?", [(i,) for i in lease_ids])

    # ---- events ----------------------------------------------------------------------

    def add_event(
        self,
        job_id: str,
        kind: str,
        lo: int = 0,
        hi: int = 0,
        data: dict[str, Any] | None = None,
        payload: bytes | memoryview | None = None,
    ) -> tuple[int, str | None]:
        """Append an event; returns its sequence and, for a large payload, the file it was written to."""
        ref = None
        if payload is not None and self.payloads.is_large(payload):
            ref = self.payloads.put(job_id, f"e{kind[0]}{lo}-{hi}-{secrets.token_hex(4)}", payload)
            payload = None
        with self.tx() as c:
            cur = c.execute(
                "INSERT INTO events (job_id, kind, lo, hi, data, payload, payload_ref) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, kind, lo, hi, json.dumps(data) if data else None, payload, ref),
            )
            return int(cur.lastrowid or 0), ref

    def last_seq(self, job_id: str) -> int:
        """The sequence number of the job's newest event (0: none)."""
        return int(self._one("SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = ?", (job_id,)) or 0)

    def events_after(
        self,
        job_id: str,
        after: int,
        max_bytes: int = 8 * 1024**2,
        spill: int | None = None,
        kinds: tuple[str, ...] | None = None,
    ) -> list[tuple[m.Event, bytes | None]]:
        """A job's events after sequence `after` (of `kinds` only; None: all), up to about `max_bytes` of payload.

        A payload file larger than `spill` bytes is not read: its event names it (`ref`, `size`) and
        its reader fetches it on its own, so a big result never sits whole in the daemon's memory.
        """
        out: list[tuple[m.Event, bytes | None]] = []
        total = 0
        only = f" AND kind IN ({', '.join('?' * len(kinds))})" if kinds else ""
        cursor = self.conn.execute(
            f"SELECT seq, kind, lo, hi, data, payload, payload_ref FROM events WHERE job_id = ? AND seq > ?{only}"
            " ORDER BY seq",
            (job_id, after, *(kinds or ())),
        )
        for seq, kind, lo, hi, data, payload, ref in cursor:
            event = m.Event(seq, kind, lo, hi, json.loads(data) if data else {})
            if ref:
                size = self.payloads.path(ref).stat().st_size
                if spill is not None and size > spill:
                    out.append((dataclasses.replace(event, size=size, ref=ref), None))
                    continue
                payload = self.payloads.get(ref)
            out.append((event, payload))
            total += len(payload or b"")
            if total >= max_bytes:
                break
        cursor.close()
        return out

    def add_log_bytes(self, job_id: str, nbytes: int, dropped_bytes: int = 0, dropped_lines: int = 0) -> None:
        with self.tx() as c:
            c.execute(
                "UPDATE jobs SET log_bytes = log_bytes + ?, dropped_log_bytes = dropped_log_bytes + ?,"
                " dropped_log_lines = dropped_log_lines + ? WHERE job_id = ?",
                (nbytes, dropped_bytes, dropped_lines, job_id),
            )

    def event_payload(self, job_id: str, seq: int) -> Path | None:
        """The file of an event's payload, when it has one."""
        ref = self._one("SELECT payload_ref FROM events WHERE job_id = ? AND seq = ?", (job_id, seq))
        return self.payloads.path(str(ref)) if ref else None

    def log_bytes(self, job_id: str) -> int:
        return int(self._one("SELECT log_bytes FROM jobs WHERE job_id = ?", (job_id,)) or 0)

    # ---- standby ---------------------------------------------------------------------

    def standby(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT image, python_version, per_cpu, position FROM standby ORDER BY position")
        return [dict(zip(("image", "python_version", "per_cpu", "position"), row, strict=True)) for row in rows]

    def set_standby(self, images: list[dict[str, Any]]) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM standby")
            for i, image in enumerate(images):
                c.execute(
                    "INSERT INTO standby (image, python_version, per_cpu, position) VALUES (?, ?, ?, ?)",
                    (image["image"], image.get("python_version", ""), float(image.get("per_cpu", 1.0)), i),
                )


TOKEN_HASH = "sha256:"


def hash_token(token: str) -> str:
    """How a token is kept: tokens are long random strings, so one round of sha256 is enough."""
    return TOKEN_HASH + hashlib.sha256(token.encode()).hexdigest()


_ATTEMPT_KEYS = ("lo", "hi", "attempt", "kind", "type_name", "message", "node", "at", "retried")
_ATTEMPT_COLUMNS = ", ".join(_ATTEMPT_KEYS)


def _attempt(row: tuple[Any, ...]) -> m.Attempt:
    """One row of the attempts table, checked as any message is."""
    return m.Attempt.from_wire(dict(zip(_ATTEMPT_KEYS, (*row[:8], bool(row[8])), strict=True)))
