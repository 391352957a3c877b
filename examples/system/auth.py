"""The authentication service (``auth``): users, passwords, sessions and permissions.

Users live in SQLite under the instance's state directory (WAL, the file
created 0600 in a 0700 directory), each with an argon2id hash made by
argon2-cffi's :class:`~argon2.PasswordHasher` and a list of permissions.
``login`` verifies a password and hands out a session token
(``secrets.token_urlsafe``, 256 bits); only its SHA-256 is stored, so the
database alone gives no usable token. ``validate`` and ``check`` answer what
a token is worth; ``check`` is the seam through which IPC authorization
consults the service (the net daemon asks it before a privileged op; a
broker rule could do the same, see docs/examples.md).

Main design choices:

- **Timing.** An unknown user is verified against a dummy hash made at start
  with the same parameters, so that a login for a user that does not exist
  costs what a wrong password costs; ``dummy_verifications`` in ``stats``
  counts them. Back-off applies to unknown users too, so a lockout says
  nothing about who exists.
- **Back-off per user and per peer.** After ``lockout_after`` consecutive
  failures a key (``user:NAME``, ``peer:ADDR``) is locked for
  ``lockout_base`` seconds, doubling with each further failure up to
  ``lockout_max`` (:class:`Backoff`, a pure function). A locked key refuses
  at once, without verifying. Failures are kept in memory, in a table of at
  most ``MAX_TRACKED`` keys (oldest dropped): a flood of made-up names cannot
  make the daemon grow.
- **Never block the mailbox on argon2.** The actor is async: hashing runs in
  a small thread pool (``hash_threads``) while validations, which are one
  indexed SQLite read, are answered on the loop meanwhile.
- **Who is asking.** The mailbox is reached by the owner's processes (and
  ikosctl), which are administrators, unless the broker's policy grants
  others ``call`` on the actor's name: then the broker forwards their calls
  to it, anonymously, so nobody is taken for an administrator there
  (:class:`MailboxPolicy`). Other users call ``auth.api`` instead, a name the
  same :class:`AuthService` serves on the broker, where the kernel vouches
  for each caller's uid. It is not the actor's name on purpose: the broker
  forwards a call to an actor's mailbox when nobody serves the name, which
  would make an anonymous caller of someone the service vouched for.
- Passwords and tokens are never logged or published; events carry the user,
  the peer and a session id (the first 12 hex digits of the token's hash).

Rejected: bcrypt/PBKDF2 (not memory-hard); keeping sessions in memory only
(a restart of the daemon would log everyone out); one thread doing
everything (a login would stall every session check behind ~50 ms of argon2).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import argon2
import argon2.exceptions

import ikos
import ikos.ipc
import ikos.registry
from ikos.ipc._topics import matches as topic_matches

log = logging.getLogger("examples.system.auth")

#: Input bounds, checked before anything is hashed or stored.
MAX_USER = 64
MAX_PASSWORD = 1024  # bytes, UTF-8
MAX_TOKEN = 128
MAX_PERMISSION = 128
MAX_PERMISSIONS = 64
MAX_PEER = 128
MAX_KEYS = 8  # keys of one request
#: Sessions one user may hold; a login past it ends the user's oldest session.
MAX_SESSIONS_PER_USER = 64
#: Failure records kept in memory at most (the oldest is forgotten first).
MAX_TRACKED = 4096
#: Seconds after its last failure that a key's record is forgotten (unless locked).
FORGET_AFTER = 900.0

USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,63}")
PERMISSION_RE = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*(\.\*)?|\*")
#: The permission that makes a session an administrator of users.
ADMIN_PERMISSION = "auth.admin"

LIGHT_OPS = frozenset(
    {"logout", "validate", "check", "delete_user", "set_permissions", "users", "sessions", "stats"}
)
HEAVY_OPS = frozenset({"login", "add_user", "set_password"})
ADMIN_OPS = frozenset({"add_user", "set_password", "set_permissions", "delete_user", "users"})
OPS = LIGHT_OPS | HEAVY_OPS
#: What ``stats`` counts (``dummy_verifications``: logins of unknown users, verified
#: against the dummy hash; ``hashing``: requests hashing or verifying right now).
COUNTERS = (
    "hashing",
    "requests",
    "bad_requests",
    "logins",
    "failures",
    "lockouts",
    "refused_locked",
    "dummy_verifications",
)


class BadRequest(ValueError):
    """A request the service refuses: the message says what was wrong and where."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential back-off after repeated failures, bounded.

    >>> Backoff(threshold=5, base=1.0, cap=300.0).delay(4)
    0.0
    >>> [Backoff(threshold=5, base=1.0, cap=300.0).delay(n) for n in (5, 6, 7)]
    [1.0, 2.0, 4.0]
    """

    threshold: int = 5
    base: float = 1.0
    cap: float = 300.0

    def delay(self, failures: int) -> float:
        """Seconds a key stays locked after its ``failures``-th consecutive failure."""
        if failures < self.threshold:
            return 0.0
        return float(min(self.cap, self.base * 2 ** min(failures - self.threshold, 32)))


@dataclass(slots=True)
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class FailureTable:
    """Consecutive failures per key, bounded to ``limit`` keys; time is passed in."""

    def __init__(self, backoff: Backoff, limit: int = MAX_TRACKED) -> None:
        self.backoff, self.limit = backoff, limit
        self._keys: collections.OrderedDict[str, _Failures] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def locked_for(self, key: str, now: float) -> float:
        """Seconds ``key`` is still locked (0 when it is not)."""
        rec = self._keys.get(key)
        return max(0.0, rec.locked_until - now) if rec is not None else 0.0

    def fail(self, key: str, now: float) -> float:
        """Count a failure of ``key``; returns the lock it starts (0 for none)."""
        rec = self._keys.pop(key, None) or _Failures()
        if now - rec.last > FORGET_AFTER and rec.locked_until <= now:
            rec = _Failures()
        rec.count += 1
        rec.last = now
        delay = self.backoff.delay(rec.count)
        rec.locked_until = now + delay if delay else 0.0
        self._keys[key] = rec
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)
        return delay

    def clear(self, key: str) -> None:
        """A success: ``key`` starts again from zero."""
        self._keys.pop(key, None)

    def prune(self, now: float) -> None:
        """Forget records neither locked nor recent."""
        for key in [
            k
            for k, r in self._keys.items()
            if r.locked_until <= now and now - r.last > FORGET_AFTER
        ]:
            del self._keys[key]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: through the broker, ``uid`` as the kernel vouched for it;
    through the mailbox, anyone holding the instance's secret (root, the owner,
    ikosctl's control server) *and* the broker, which forwards there the calls of
    the peers its policy grants ``call`` on the name when no process serves it.
    ``private`` says the policy grants that to nobody (:func:`mailbox_is_private`).
    """

    via: str  # "mailbox" or "broker"
    uid: int | None = None
    pid: int | None = None
    private: bool = True

    def trusted(self, owner_uids: frozenset[int]) -> bool:
        """Whether the caller is root or the owner, as far as the service can tell."""
        if self.via == "mailbox":
            return self.private
        return self.uid in owner_uids


def mailbox_is_private(name: str, broker_json: Path) -> bool:
    """Whether no rule of the broker's policy grants ``call`` on ``name``.

    Then only root and the owner reach the actor's mailbox. An unreadable or
    malformed policy counts as granting (fail closed); no file means no broker.
    """
    try:
        rules = json.loads(broker_json.read_text()).get("policy", [])
    except FileNotFoundError:
        return True
    except (OSError, ValueError, AttributeError):
        return False
    try:
        return not any(topic_matches(p, name) for rule in rules for p in rule.get("call", []))
    except (AttributeError, TypeError):
        return False


class MailboxPolicy:
    """:func:`mailbox_is_private`, read again only when ``broker.json`` changes
    (ikosd rewrites it on a reload), so that every request pays one ``stat``."""

    def __init__(self, name: str, broker_json: Path) -> None:
        self.name, self.path = name, broker_json
        self._seen: tuple[int, int, int] | None = None
        self._private = False

    def private(self) -> bool:
        try:
            st = self.path.stat()
            seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            seen = (0, 0, 0)
        if seen != self._seen:
            self._private = mailbox_is_private(self.name, self.path)
            self._seen = seen
        return self._private


def permitted(granted: list[str], permission: str) -> bool:
    """Whether ``granted`` holds ``permission``: exactly, by ``*``, or by ``prefix.*``.

    >>> permitted(["net.*"], "net.configure"), permitted(["net.*"], "network")
    (True, False)
    """
    for g in granted:
        if g == permission or g == "*":
            return True
        if g.endswith(".*") and permission.startswith(g[:-1]):
            return True
    return False


def session_id(token_hash: str) -> str:
    """The public name of a session: the first 12 hex digits of its token's hash."""
    return token_hash[:12]


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _string(req: dict[str, Any], key: str, limit: int, *, optional: bool = False) -> str | None:
    value = req.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key!r}: expected a string, got {type(value).__name__}")
    size = len(value.encode(errors="surrogatepass"))
    if size > limit:
        raise BadRequest(f"{key!r}: {size} bytes, more than the limit of {limit}")
    return value


def _user(req: dict[str, Any]) -> str:
    name = _string(req, "user", MAX_USER)
    assert name is not None
    if not USER_RE.fullmatch(name):
        raise BadRequest(f"'user': expected a name like {USER_RE.pattern}, got {name[:64]!r}")
    return name


def _password(req: dict[str, Any]) -> str:
    value = _string(req, "password", MAX_PASSWORD)
    assert value is not None
    if not value:
        raise BadRequest("'password': empty")
    return value


def _permissions(req: dict[str, Any]) -> list[str]:
    value = req.get("permissions", [])
    if not isinstance(value, list) or len(value) > MAX_PERMISSIONS:
        raise BadRequest(f"'permissions': expected a list of at most {MAX_PERMISSIONS} names")
    for p in value:
        if not isinstance(p, str) or len(p) > MAX_PERMISSION or not PERMISSION_RE.fullmatch(p):
            raise BadRequest(
                f"'permissions': {str(p)[:64]!r} is not a permission like 'net.configure', "
                "'net.*' or '*'"
            )
    return sorted(set(value))


class AuthService:
    """The service's logic over its database; thread-safe (one lock around SQLite).

    ``handle(request, caller)`` answers one request dict with a reply dict;
    nothing it is sent makes it raise. ``publish`` is called with each event
    (topic, data).
    """

    def __init__(
        self,
        db_path: Path,
        hasher: argon2.PasswordHasher,
        backoff: Backoff,
        session_ttl: float,
        owner_uids: frozenset[int],
        publish: Callable[[str, dict[str, Any]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.hasher, self.backoff, self.session_ttl = hasher, backoff, session_ttl
        self.owner_uids, self.publish, self.clock = owner_uids, publish, clock
        self.failures = FailureTable(backoff)
        self.counters = collections.Counter(dict.fromkeys(COUNTERS, 0))
        self._lock = threading.Lock()
        self._counters_lock = threading.Lock()
        self._db = _open_db(db_path)
        # the dummy hash costs what a real one does: same hasher, same parameters
        self._dummy = hasher.hash(secrets.token_urlsafe(16))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:
            yield self._db

    # -- the entry point -----------------------------------------------------

    def handle(self, request: Any, caller: Caller) -> dict[str, Any]:
        """Answer ``request``; a bad one gets ``{"ok": False, "error": ...}``."""
        try:
            req = self._parse(request)
            op = req["op"]
            if op in ADMIN_OPS:
                self._require_admin(req, caller)
            heavy = op in HEAVY_OPS
            if heavy:  # a gauge: how many requests are hashing now (stats shows it)
                self._count("hashing")
            try:
                reply: dict[str, Any] = getattr(self, "op_" + op)(req, caller)
            finally:
                if heavy:
                    self._count("hashing", -1)
            self._count("requests")
            return reply
        except BadRequest as exc:
            self._count("bad_requests")
            return {"ok": False, "error": str(exc)}

    def _count(self, counter: str, n: int = 1) -> None:
        with self._counters_lock:  # requests are handled in several threads
            self.counters[counter] += n

    @staticmethod
    def _parse(request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise BadRequest(
                f'expected a request object {{"op": ...}}, got {type(request).__name__}'
            )
        if len(request) > MAX_KEYS:
            raise BadRequest(f"a request has at most {MAX_KEYS} keys, this one {len(request)}")
        op = request.get("op")
        if op not in OPS:
            raise BadRequest(f"unknown op {str(op)[:64]!r}: expected one of {sorted(OPS)}")
        return request

    def _require_admin(self, req: dict[str, Any], caller: Caller) -> None:
        # The mailbox is reached only by holders of the instance's secret (root and
        # the owner); through the broker the kernel vouches for the uid; anyone else
        # proves it with the token of a session holding auth.admin.
        if caller.trusted(self.owner_uids):
            return
        token = _string(req, "admin_token", MAX_TOKEN, optional=True)
        if token is not None:
            session = self._session(token)
            if session is not None and permitted(session["permissions"], ADMIN_PERMISSION):
                return
        who = (
            f"uid {caller.uid}"
            if caller.via == "broker"
            else "an anonymous caller: the broker's policy grants others 'call' on this "
            "daemon's name, so they reach its mailbox too"
        )
        raise BadRequest(
            f"op {req['op']!r} needs an administrator: root or the instance's owner, "
            f"or an 'admin_token' of a session with {ADMIN_PERMISSION!r}; this is {who}"
        )

    def _peer(self, req: dict[str, Any], caller: Caller) -> str:
        # a trusted front-end (the owner's processes) names the client it logs in;
        # through the broker, the caller is its own peer unless it is the owner
        given = _string(req, "peer", MAX_PEER, optional=True)
        if caller.trusted(self.owner_uids):
            return given or "local"
        return f"uid:{caller.uid}" if caller.via == "broker" else "mailbox"

    # -- users -----------------------------------------------------------------

    def op_add_user(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        user, password, perms = _user(req), _password(req), _permissions(req)
        digest = self.hasher.hash(password)
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO users (name, hash, permissions, created) VALUES (?, ?, ?, ?)",
                    (user, digest, json.dumps(perms), self.clock()),
                )
        except sqlite3.IntegrityError:
            raise BadRequest(f"user {user!r} exists") from None
        self.publish("auth.user", {"action": "add", "user": user, "permissions": perms})
        return {"ok": True, "user": user, "permissions": perms}

    def op_set_password(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        user, password = _user(req), _password(req)
        digest = self.hasher.hash(password)
        # a new password ends the sessions the old one opened
        return self._change_user(
            user,
            "set_password",
            ("UPDATE users SET hash = ? WHERE name = ?", (digest, user)),
            ("DELETE FROM sessions WHERE user = ?", (user,)),
        )

    def op_set_permissions(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        user, perms = _user(req), _permissions(req)
        sql = "UPDATE users SET permissions = ? WHERE name = ?"
        return self._change_user(
            user, "set_permissions", (sql, (json.dumps(perms), user)), permissions=perms
        )

    def op_delete_user(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        user = _user(req)
        return self._change_user(
            user,
            "delete",
            ("DELETE FROM users WHERE name = ?", (user,)),
            ("DELETE FROM sessions WHERE user = ?", (user,)),
        )

    def _change_user(
        self,
        user: str,
        action: str,
        change: tuple[str, tuple[Any, ...]],
        *then: tuple[str, tuple[Any, ...]],
        **published: Any,
    ) -> dict[str, Any]:
        """Run ``change`` on the row of ``user``, then ``then`` if there was one; publish."""
        with self._tx() as db:
            if not db.execute(*change).rowcount:
                raise BadRequest(f"no user {user!r}")
            for statement in then:
                db.execute(*statement)
        self.publish("auth.user", {"action": action, "user": user, **published})
        return {"ok": True, "user": user, **published}

    def op_users(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        with self._tx() as db:
            rows = db.execute("SELECT name, permissions FROM users ORDER BY name").fetchall()
        return {"ok": True, "users": [{"user": n, "permissions": json.loads(p)} for n, p in rows]}

    # -- sessions --------------------------------------------------------------

    def op_login(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        user, password = _user(req), _password(req)
        peer = self._peer(req, caller)
        ttl = req.get("ttl", self.session_ttl)
        if (
            not isinstance(ttl, int | float)
            or isinstance(ttl, bool)
            or not 0 < ttl <= self.session_ttl
        ):
            raise BadRequest(f"'ttl': expected seconds in (0, {self.session_ttl:g}], got {ttl!r}")
        keys = (f"user:{user}", f"peer:{peer}")
        mono = time.monotonic()
        with self._lock:
            wait = max(self.failures.locked_for(k, mono) for k in keys)
        if wait > 0:
            self._count("refused_locked")
            return {
                "ok": False,
                "error": f"too many failed logins for user {user!r} or peer {peer!r}: "
                f"try again in {wait:.1f} s",
                "retry_after": round(wait, 3),
            }
        with self._tx() as db:
            row = db.execute(
                "SELECT hash, permissions FROM users WHERE name = ?", (user,)
            ).fetchone()
        good = self._verify(row[0] if row else None, password)
        if not good:
            return self._failed(user, peer, keys)
        assert row is not None
        if self.hasher.check_needs_rehash(row[0]):  # the parameters changed since
            digest = self.hasher.hash(password)  # not under the lock: it takes a while
            with self._tx() as db:
                db.execute("UPDATE users SET hash = ? WHERE name = ?", (digest, user))
        token = secrets.token_urlsafe(32)
        token_hash = _hash_token(token)
        now = self.clock()
        expires = now + float(ttl)
        with self._tx() as db:
            db.execute(
                "INSERT INTO sessions (token_hash, user, peer, created, expires) "
                "VALUES (?, ?, ?, ?, ?)",
                (token_hash, user, peer, now, expires),
            )
            # a user's oldest sessions make way for new ones past the bound
            db.execute(
                "DELETE FROM sessions WHERE user = ? AND token_hash NOT IN (SELECT token_hash "
                "FROM sessions WHERE user = ? ORDER BY created DESC, rowid DESC LIMIT ?)",
                (user, user, MAX_SESSIONS_PER_USER),
            )
        with self._lock:
            for k in keys:
                self.failures.clear(k)
        self._count("logins")
        sid = session_id(token_hash)
        self.publish("auth.login", {"user": user, "peer": peer, "session": sid, "expires": expires})
        return {
            "ok": True,
            "user": user,
            "token": token,
            "session": sid,
            "expires": expires,
            "permissions": json.loads(row[1]),
        }

    def _verify(self, digest: str | None, password: str) -> bool:
        if digest is None:
            self._count("dummy_verifications")
            digest = self._dummy
        try:
            ok: bool = self.hasher.verify(digest, password)
        except argon2.exceptions.VerificationError:
            ok = False
        except argon2.exceptions.InvalidHashError:
            log.warning("auth: a stored hash is not an argon2 hash; treating as a failure")
            ok = False
        return ok and digest is not self._dummy

    def _failed(self, user: str, peer: str, keys: tuple[str, str]) -> dict[str, Any]:
        mono = time.monotonic()
        with self._lock:
            locks = [self.failures.fail(k, mono) for k in keys]
        self._count("failures")
        self.publish("auth.failure", {"user": user, "peer": peer})
        for key, delay in zip(keys, locks, strict=True):
            if delay:
                self._count("lockouts")
                self.publish("auth.lockout", {"key": key, "seconds": delay})
                log.warning("auth: %s locked for %g s after repeated failures", key, delay)
        reply: dict[str, Any] = {"ok": False, "error": "wrong user or password"}
        if max(locks):
            reply["retry_after"] = max(locks)
        return reply

    def _session(self, token: str) -> dict[str, Any] | None:
        th = _hash_token(token)
        with self._tx() as db:
            row = db.execute(
                "SELECT s.user, s.peer, s.expires, u.permissions FROM sessions s "
                "JOIN users u ON u.name = s.user WHERE s.token_hash = ?",
                (th,),
            ).fetchone()
            if row is None:
                return None
            if row[2] <= self.clock():
                db.execute("DELETE FROM sessions WHERE token_hash = ?", (th,))
                return None
        return {
            "user": row[0],
            "peer": row[1],
            "expires": row[2],
            "permissions": json.loads(row[3]),
            "session": session_id(th),
        }

    def _token(self, req: dict[str, Any]) -> str:
        token = _string(req, "token", MAX_TOKEN)
        assert token is not None
        return token

    def op_validate(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        session = self._session(self._token(req))
        if session is None:
            return {"ok": False, "error": "invalid or expired token"}
        return {"ok": True, **session}

    def op_check(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        token = self._token(req)
        permission = _string(req, "permission", MAX_PERMISSION)
        assert permission is not None
        session = self._session(token)
        if session is None:
            return {"ok": True, "allowed": False, "reason": "invalid or expired token"}
        allowed = permitted(session["permissions"], permission)
        return {
            "ok": True,
            "allowed": allowed,
            "user": session["user"],
            **({} if allowed else {"reason": f"user {session['user']!r} lacks {permission!r}"}),
        }

    def op_logout(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        th = _hash_token(self._token(req))
        with self._tx() as db:
            row = db.execute("SELECT user FROM sessions WHERE token_hash = ?", (th,)).fetchone()
            db.execute("DELETE FROM sessions WHERE token_hash = ?", (th,))
        if row is None:
            return {"ok": False, "error": "invalid or expired token"}
        self.publish("auth.logout", {"user": row[0], "session": session_id(th)})
        return {"ok": True, "user": row[0]}

    def op_sessions(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        user = _user(req) if "user" in req else None
        if not caller.trusted(self.owner_uids):
            self._require_admin(req, caller)
        with self._tx() as db:
            rows = db.execute(
                "SELECT token_hash, user, peer, created, expires FROM sessions "
                "WHERE expires > ? AND (? IS NULL OR user = ?) ORDER BY created LIMIT 1000",
                (self.clock(), user, user),
            ).fetchall()
        return {
            "ok": True,
            "sessions": [
                {"session": session_id(t), "user": u, "peer": p, "created": c, "expires": e}
                for t, u, p, c, e in rows
            ],
        }

    def op_stats(self, req: dict[str, Any], caller: Caller) -> dict[str, Any]:
        with self._tx() as db:
            users = db.execute("SELECT count(*) FROM users").fetchone()[0]
            sessions = db.execute(
                "SELECT count(*) FROM sessions WHERE expires > ?", (self.clock(),)
            ).fetchone()[0]
        with self._lock:
            tracked = len(self.failures)
        return {
            "ok": True,
            "users": users,
            "sessions": sessions,
            "tracked_failures": tracked,
            **self._counters_now(),
        }

    def _counters_now(self) -> dict[str, int]:
        with self._counters_lock:
            return dict(self.counters)

    def purge(self) -> int:
        """Drop expired sessions and stale failure records; returns the sessions dropped."""
        with self._tx() as db:
            n = db.execute("DELETE FROM sessions WHERE expires <= ?", (self.clock(),)).rowcount
        with self._lock:
            self.failures.prune(time.monotonic())
        return int(n)


def _open_db(path: Path) -> sqlite3.Connection:
    """The database at ``path``: directory 0700, file 0600, WAL, schema created."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # created 0600 before SQLite opens it, so there is no moment it is readable by others
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    db = sqlite3.connect(path, check_same_thread=False, timeout=10)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    with db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, hash TEXT NOT NULL, "
            "permissions TEXT NOT NULL, created REAL NOT NULL)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS sessions (token_hash TEXT PRIMARY KEY, "
            "user TEXT NOT NULL, peer TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user)")
    return db


#: The PasswordHasher parameters an ``argon2`` option may set.
ARGON2_PARAMETERS = ("time_cost", "memory_cost", "parallelism", "hash_len", "salt_len")


def make_hasher(params: dict[str, int]) -> argon2.PasswordHasher:
    """An argon2id hasher: argon2-cffi's defaults (RFC 9106 low-memory) overridden by ``params``.

    Raises ValueError naming an unknown or non-integer parameter.
    """
    for key, value in params.items():
        if key not in ARGON2_PARAMETERS or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"auth option argon2: {key}={value!r}: expected a positive integer for one of "
                f"{', '.join(ARGON2_PARAMETERS)}"
            )
    defaults = argon2.PasswordHasher()
    return argon2.PasswordHasher(
        time_cost=params.get("time_cost", defaults.time_cost),
        memory_cost=params.get("memory_cost", defaults.memory_cost),
        parallelism=params.get("parallelism", defaults.parallelism),
        hash_len=params.get("hash_len", defaults.hash_len),
        salt_len=params.get("salt_len", defaults.salt_len),
    )


def _publish(topic: str, data: dict[str, Any]) -> None:
    try:
        ikos.ipc.publish(topic, data)
    except ikos.ipc.IpcError as exc:  # events are best effort; the reply is what counts
        log.warning("auth: event %s not published: %s", topic, exc)


class Auth(ikos.Actor):
    """The ``auth`` daemon: an async actor around :class:`AuthService`.

    Options (keyword arguments of :func:`child`): ``db_path`` (default
    ``STATE/auth/auth.db`` of the instance), ``session_ttl`` (seconds, 3600;
    the most a login may ask for with ``ttl``), ``lockout_after`` (5),
    ``lockout_base`` (1.0 s), ``lockout_max`` (300 s), ``hash_threads`` (2),
    ``argon2`` (a dict of PasswordHasher parameters; default argon2-cffi's
    RFC 9106 low-memory profile: t=3, m=64 MiB, p=4; tests pass cheap ones),
    ``admin_uids`` (uids besides root and the owner allowed admin ops over
    the broker), ``bootstrap_admin`` (``(user, password, permissions)`` to
    create when the database has no users), ``serve`` (True: also serve the
    name ``NAME.api`` on the broker, for other users).
    """

    #: validations are answered while logins hash in the pool
    max_concurrency = 32

    def __init__(
        self,
        *,
        db_path: str | None = None,
        session_ttl: float = 3600.0,
        lockout_after: int = 5,
        lockout_base: float = 1.0,
        lockout_max: float = 300.0,
        hash_threads: int = 2,
        argon2: dict[str, int] | None = None,
        admin_uids: list[int] | None = None,
        bootstrap_admin: tuple[str, str, list[str]] | None = None,
        serve: bool = True,
    ) -> None:
        for option, value, least in [
            ("session_ttl", session_ttl, 1e-3),
            ("lockout_after", lockout_after, 1),
            ("lockout_base", lockout_base, 1e-3),
            ("lockout_max", lockout_max, 1e-3),
            ("hash_threads", hash_threads, 1),
        ]:
            if not isinstance(value, int | float) or isinstance(value, bool) or value < least:
                raise ValueError(f"auth option {option}={value!r}: expected a number >= {least:g}")
        self.db_path = Path(db_path) if db_path else self.paths.state_dir / "auth/auth.db"
        self.session_ttl = float(session_ttl)
        self.backoff = Backoff(int(lockout_after), float(lockout_base), float(lockout_max))
        self.hash_threads = int(hash_threads)
        self.argon2_params = dict(argon2 or {})
        self.admin_uids = frozenset(admin_uids or ())
        self.bootstrap_admin = bootstrap_admin
        self.serve = serve

    async def on_start(self) -> None:
        hasher = make_hasher(self.argon2_params)
        self.pool = ThreadPoolExecutor(self.hash_threads, thread_name_prefix="auth-hash")
        self.service = AuthService(
            self.db_path,
            hasher,
            self.backoff,
            self.session_ttl,
            frozenset({0, os.getuid()}) | self.admin_uids,
            _publish,
        )
        if self.bootstrap_admin is not None:
            user, password, perms = self.bootstrap_admin
            if not self.service.op_users({}, Caller("mailbox"))["users"]:
                reply = self.service.handle(
                    {"op": "add_user", "user": user, "password": password, "permissions": perms},
                    Caller("mailbox"),
                )
                log.warning("auth: bootstrap admin %r: %s", user, reply.get("error", "created"))
        self.mailbox = MailboxPolicy(self.name, self.paths.run_dir / "ipc/broker.json")
        self.server: ikos.ipc.Server | None = None
        if self.serve:
            self.server = await _serve_name(f"{self.name}.api", self._serve)
        try:
            ikos.registry.register(
                self.name,
                type="auth",
                description="users, sessions and permission checks",
                endpoint=f"ikos://{self.name}",
                capabilities=["login", "validate", "check"],
            )
        except ikos.IkosError as exc:
            log.warning("auth: service not registered: %s", exc)
        self.purge_timer = self.send_interval(60.0, "purge")

    def _serve(self, message: ikos.ipc.IpcMessage) -> dict[str, Any]:
        uid = message.sender_uid
        return self.service.handle(
            message.payload,
            Caller("broker", uid if isinstance(uid, int) else -1, message.sender_pid),
        )

    async def receive(self, message: Any) -> Any:
        if message == "purge":
            self.service.purge()
            return None
        caller = Caller("mailbox", private=self.mailbox.private())
        if isinstance(message, dict) and message.get("op") in HEAVY_OPS:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, self.service.handle, message, caller)
        return self.service.handle(message, caller)

    async def on_stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.pool.shutdown(wait=True)
        self.service.close()


def check(
    token: str,
    permission: str,
    *,
    timeout: float = 5.0,
    service: str = "auth",
    root: str | os.PathLike[str] | None = None,
) -> tuple[bool, str]:
    """Whether ``token`` holds ``permission``, asked of the auth daemon: ``(allowed, why)``.

    For daemons guarding a privileged op. It denies by default: a refusal, a bad
    token, an unreachable or slow auth daemon all give ``(False, reason)``; it
    never raises. ``why`` is the user's name when allowed. From an async actor,
    run it in an executor or ask ``{"op": "check", ...}`` with ``ask_async``.

    Example::

        allowed, why = auth.check(request["token"], "net.configure")
        if not allowed:
            return {"ok": False, "error": f"not allowed: {why}"}
    """
    ref: ikos.ActorRef[Any] = ikos.ActorRef(service, root=root)
    try:
        reply = ref.ask({"op": "check", "token": token, "permission": permission}, timeout=timeout)
    except ikos.IkosError as exc:
        return False, f"the {service} service is unavailable: {exc}"
    if not isinstance(reply, dict) or not reply.get("ok"):
        error = reply.get("error") if isinstance(reply, dict) else reply
        return False, f"the {service} service refused the check: {error}"
    if reply.get("allowed") is True:
        return True, str(reply.get("user"))
    return False, str(reply.get("reason", "not allowed"))


async def _serve_name(
    name: str, handler: Callable[[ikos.ipc.IpcMessage], Any]
) -> ikos.ipc.Server | None:
    # After a kill -9 the broker may not yet have seen the old incarnation's
    # connection close, and still names it as the server: try again a while.
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return ikos.ipc.serve(name, handler, threads=4)
        except ikos.ipc.IpcError as exc:
            if time.monotonic() > deadline:
                log.warning("auth: not serving %r on the broker: %s", name, exc)
                return None
        await asyncio.sleep(0.1)


def child(name: str = "auth", **options: Any) -> ikos.Child:
    """The ``auth`` daemon as a child of a tree; ``options`` go to :class:`Auth`.

    It requires nothing (the logger and the net daemon require it).
    """
    return ikos.Child(name, Auth, kwargs=options, restart="permanent")
