"""Who is calling: the cluster's users, their API keys, and the sessions a revoked key must lose.

A user has a name, a role (`ADMIN`: cluster settings, users, every job; `USER`: their own jobs)
and at most one live API key. A key reads ``burla_key_<id>_<secret>``: the id (12 hex digits,
not secret) finds the key's row, and only the sha256 of the whole key is kept, compared in
constant time; the secret is 256 random bits, so one hash round is enough. A key is shown once,
when it is made, and never stored or logged: errors and logs name its user instead.

The cluster's admin token (tokens.json) acts as the user `BOOTSTRAP`, an admin; the node token
and agents' tokens are not users (app.py). Rotating a key ends the old one; revoking ends it with
no new one; removing a user ends their keys and cancels their running jobs (`UserAdmin`). A key
that ends fails at once: the next request gets 401, a request under way when it ended is refused
once its body is read (`Users.current`), and the user's open event websockets are closed
(`Sessions`). A removed user's name is never given again: jobs are owned by name.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from burla.schemas import messages as m

from .errors import BadRequest, Conflict, NotFound, Unauthorized
from .store import Store, hash_token

if TYPE_CHECKING:
    from .service import ControlPlane

log = logging.getLogger("burla.daemon")

ADMIN = "admin"
USER = "user"
ROLES = (ADMIN, USER)
BOOTSTRAP = "admin"  # the user the admin token acts as; jobs of daemons older than users are theirs
KEY_PREFIX = "burla_key_"
_KEY = re.compile(r"burla_key_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,39}")


@dataclasses.dataclass(frozen=True)
class Principal:
    """The user a request acts for."""

    name: str
    role: str
    key_id: str = ""  # the key it came with ("": the admin token, or the daemon itself)

    @property
    def admin(self) -> bool:
        return self.role == ADMIN

    def may_act_on(self, owner: str) -> bool:
        """May this caller see, follow and cancel a job of `owner`?"""
        return self.admin or owner == self.name


SYSTEM = Principal("burlad", ADMIN)  # the daemon's own decisions (abandoned jobs, restore)


def valid_name(value: Any, what: str = "name") -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise BadRequest(
            f"{what}: expected a user name of 1 to 40 lowercase letters, digits, '.', '_' or '-', starting with a "
            f"letter, got {str(value)[:60]!r}"
        )
    return value


def make_key() -> tuple[str, str]:
    """(key id, key): a fresh API key."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(token: str) -> str | None:
    """The id of a well-formed API key (None: not one)."""
    found = _KEY.fullmatch(token)
    return found.group(1) if found else None


@dataclasses.dataclass
class _Key:
    user: str
    key_hash: str
    ended: float | None = None
    why: str = ""  # why it ended


class Users:
    """The users and keys of the store, kept in memory too: a request's key is checked without SQLite."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store, self.clock = store, clock
        users = store.users()
        self.roles: dict[str, str] = {name: role for name, role, _ in users if role in ROLES}
        self.removed: set[str] = {name for name, role, _ in users if role not in ROLES}  # names never reused
        self.created: dict[str, float] = {name: created for name, _, created in users}
        self._keys: dict[str, _Key] = {k: _Key(u, h, e, w) for k, u, h, _, e, w in store.keys()}

    def authenticate(self, token: str) -> Principal:
        """The user whose live key `token` is; else Unauthorized, naming the user when the key was theirs."""
        key_id = key_id_of(token)
        key = self._keys.get(key_id) if key_id else None
        if key is None or not hmac.compare_digest(hash_token(token), key.key_hash):
            raise Unauthorized("this API key is not one of this cluster's: check BURLA_API_KEY or `burla login`")
        role = self.roles.get(key.user)
        if key.ended is not None or role is None:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(key.ended or 0))
            raise Unauthorized(
                f"the API key of user {key.user} was {key.why or 'revoked'} at {when}: ask the cluster's admin for "
                "a new one (`burla users rotate NAME`), then `burla login`"
            )
        return Principal(key.user, role, key_id or "")

    def current(self, who: Principal) -> Principal:
        """`who` again, if the key it came with is still live (a request under way may outlast its key)."""
        if who.key_id:
            key = self._keys.get(who.key_id)
            if key is None or key.ended is not None or who.name not in self.roles:
                why = key.why if key is not None and key.why else "revoked"
                raise Unauthorized(f"the API key of user {who.name} was {why} while this request was under way")
        return who

    def list(self) -> list[dict[str, Any]]:
        live = {k.user: (key_id, k) for key_id, k in self._keys.items() if k.ended is None}
        return [
            {"name": name, "role": role, "created": self.created.get(name, 0.0),
             "key_id": live[name][0] if name in live else None}
            for name, role in sorted(self.roles.items())
        ]  # fmt: skip

    def add(self, name: str, role: str) -> str:
        """A new user; returns their key."""
        valid_name(name)
        if role not in ROLES:
            raise BadRequest(f"role: expected one of {', '.join(ROLES)}, got {str(role)[:40]!r}")
        if name == BOOTSTRAP or name == SYSTEM.name:
            raise Conflict(f"name: {name!r} is the cluster's own: pick another name")
        if name in self.roles:
            raise Conflict(f"user {name} already exists: `burla users rotate {name}` gives them a new key")
        if name in self.removed:
            raise Conflict(
                f"name: a user {name} was removed before, and the jobs they left are theirs: pick another name"
            )
        now = self.clock()
        with self.store.tx():
            self.store.add_user(name, role, now)
            key = self._new_key(name, now)
        self.roles[name], self.created[name] = role, now
        return key

    def rotate(self, name: str) -> str:
        """A new key for `name`; the old one fails from now on. Returns the new key."""
        self.existing(name)
        now = self.clock()
        with self.store.tx():
            self._end(name, now, "rotated")
            return self._new_key(name, now)

    def revoke(self, name: str) -> None:
        """End `name`'s key, with no new one (rotate gives one)."""
        self.existing(name)
        self._end(name, self.clock(), "revoked")

    def remove(self, name: str) -> None:
        self.existing(name)
        now = self.clock()
        with self.store.tx():
            self._end(name, now, "removed with its user")
            self.store.remove_user(name)
        self.roles.pop(name, None)
        self.removed.add(name)

    def existing(self, name: str) -> None:
        """Raise NotFound unless `name` is a user now."""
        valid_name(name)
        if name not in self.roles:
            raise NotFound(f"no user {name}: `burla users list` shows who there is")

    def _new_key(self, name: str, now: float) -> str:
        key_id, key = make_key()
        key_hash = hash_token(key)
        self.store.add_key(key_id, name, key_hash, now)
        self.store.after_commit(lambda: self._keys.__setitem__(key_id, _Key(name, key_hash)))
        return key

    def _end(self, name: str, now: float, why: str) -> None:
        ended = self.store.end_keys(name, now, why)

        def forget() -> None:
            for key_id in ended:
                key = self._keys.get(key_id)
                if key is not None:
                    key.ended, key.why = now, why

        self.store.after_commit(forget)


class Session(Protocol):
    """An open connection acting for a user (an events websocket)."""

    def end(self, why: str, grace: bool) -> None: ...


class Sessions:
    """The open event websockets of each user: ended when the user's key ends."""

    def __init__(self) -> None:
        self._open: collections.defaultdict[str, set[Session]] = collections.defaultdict(set)

    def opened(self, user: str, session: Session) -> None:
        self._open[user].add(session)

    def closed(self, user: str, session: Session) -> None:
        sessions = self._open.get(user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._open[user]

    def end(self, user: str, why: str, grace: bool = False) -> int:
        """End every open session of `user` (`grace`: let their final events go out first). Returns how many."""
        sessions = list(self._open.get(user, ()))
        for session in sessions:
            session.end(why, grace)
        return len(sessions)


class UserAdmin:
    """The admin's user commands (`burla users ...`), with what each means for the user's jobs and sessions."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    def list(self) -> list[dict[str, Any]]:
        plane = self.plane
        running = collections.Counter(j.owner for j in plane.scheduler.jobs.values() if j.state == m.RUNNING)
        return [u | {"running_jobs": running.get(u["name"], 0)} for u in plane.users.list()]

    def add(self, name: Any, role: Any, by: Principal) -> dict[str, Any]:
        key = self.plane.users.add(name, role)
        log.info("user %s (%s) added by %s", name, role, by.name)
        return {"name": name, "role": role, "api_key": key}

    def rotate(self, name: str, by: Principal) -> dict[str, Any]:
        key = self.plane.users.rotate(name)
        ended = self.plane.sessions.end(name, f"the API key of user {name} was rotated by {by.name}")
        log.info("user %s: key rotated by %s (%d open sessions closed)", name, by.name, ended)
        return {"name": name, "api_key": key}

    def revoke(self, name: str, by: Principal) -> None:
        self.plane.users.revoke(name)
        ended = self.plane.sessions.end(name, f"the API key of user {name} was revoked by {by.name}")
        log.info("user %s: key revoked by %s (%d open sessions closed)", name, by.name, ended)

    def remove(self, name: str, by: Principal) -> dict[str, Any]:
        """Remove a user: their running jobs are cancelled (their callers are told why), their keys end."""
        plane = self.plane
        plane.users.existing(name)
        why = f"user {name} was removed from the cluster by {by.name}"
        cancelled = plane.cancel_jobs_of(name, why)
        plane.users.remove(name)
        plane.sessions.end(name, why, grace=True)
        log.info("%s (%d running jobs cancelled)", why, len(cancelled))
        return {"name": name, "cancelled_jobs": cancelled}


class BadTokens:
    """Slows down an address that keeps sending bad tokens.

    Up to `burst` bad tokens a minute from one address are answered at once; after that, each
    waits before its 401, twice as long as the one before, up to `max_delay`. Good tokens are
    never slowed. At most `size` addresses are remembered (the least recent are forgotten).
    """

    WINDOW = 60.0

    def __init__(
        self, burst: int, max_delay: float, clock: Callable[[], float] = time.monotonic, size: int = 10_000
    ) -> None:
        self.burst, self.max_delay, self.clock, self.size = burst, max_delay, clock, size
        self._seen: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()

    def failed(self, address: str) -> float:
        """Count a bad token from `address`; returns how long its answer waits (seconds)."""
        now = self.clock()
        since, count = self._seen.pop(address, (now, 0))
        if now - since > self.WINDOW:
            since, count = now, 0
        count += 1
        self._seen[address] = (since, count)
        while len(self._seen) > self.size:
            self._seen.popitem(last=False)
        if self.max_delay <= 0 or count <= self.burst:
            return 0.0
        return float(min(self.max_delay, 0.05 * 2.0 ** min(count - self.burst - 1, 20)))
