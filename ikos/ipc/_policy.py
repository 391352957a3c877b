"""Who may do what on the broker: the policy of ``broker.json`` as a pure decision.

The instance's owner and root may do everything; any other peer only what a rule
grants, a rule applying when the peer's uid is in its ``uids`` or its primary gid
or one of its supplementary groups (read once, at connect) is in its ``gids``.
A rule grants by right (``call``, ``serve``, ``publish``, ``subscribe``,
``queues``) a list of patterns in the topic syntax: ``"#"`` grants every name,
``"app.*"`` one segment under ``app``. A subscription is allowed when some
granted pattern covers every topic the requested pattern can match
(:func:`covers`), so ``subscribe "#"`` needs ``"#"``, not merely ``"app.#"``.

Decisions are plain functions over values (:class:`Peer`, :class:`Policy`) so
they are tested without sockets; the broker applies them and audits the
refusals. Parsing raises :class:`ValueError` naming the rule and the key, so
that a bad ``broker.json`` is reported where it is wrong.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ikos.ipc._topics import matches, pattern_error
from ikos.platform._unix import process_groups

Right = Literal["call", "serve", "publish", "subscribe", "queues"]
RIGHTS: tuple[Right, ...] = ("call", "serve", "publish", "subscribe", "queues")


@dataclass(frozen=True, slots=True)
class Peer:
    """A connected client as the kernel vouches for it (SO_PEERCRED) plus its groups."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Rule:
    """One grant: to these uids and gids, these patterns per right."""

    uids: frozenset[int]
    gids: frozenset[int]
    grants: Mapping[Right, tuple[str, ...]]

    def applies(self, peer: Peer) -> bool:
        return peer.uid in self.uids or bool(self.gids & ({peer.gid} | peer.groups))


@dataclass(frozen=True, slots=True)
class Policy:
    """The owner's uid and the rules for everyone else."""

    owner_uid: int
    rules: tuple[Rule, ...] = ()

    def trusted(self, peer: Peer) -> bool:
        """Root and the owner: everything allowed, pickle accepted."""
        return peer.uid == 0 or peer.uid == self.owner_uid

    def grants(self, peer: Peer) -> dict[Right, tuple[str, ...]]:
        """The patterns ``peer`` is granted per right (all rules applying, merged)."""
        if self.trusted(peer):
            return {right: ("#",) for right in RIGHTS}
        out: dict[Right, list[str]] = {right: [] for right in RIGHTS}
        for rule in self.rules:
            if rule.applies(peer):
                for right in RIGHTS:
                    out[right].extend(rule.grants.get(right, ()))
        return {right: tuple(dict.fromkeys(pats)) for right, pats in out.items()}


def allowed(granted: Iterable[str], name: str, right: Right) -> bool:
    """Whether the patterns ``granted`` allow ``right`` on ``name``.

    For ``subscribe`` ``name`` is a pattern and must be covered; for every other
    right it is a name (a topic, a served name, an actor, a queue) and must match.
    """
    if right == "subscribe":
        return any(covers(g, name) for g in granted)
    return any(matches(g, name) for g in granted)


def covers(granted: str, requested: str) -> bool:
    """Whether every topic ``requested`` matches is also matched by ``granted``.

    Decided on segments: ``#`` in the grant covers any run of requested segments
    (wildcards included), ``*`` covers one segment that is a name or ``*``, a
    name covers only itself.
    """
    g, r = granted.split("."), requested.split(".")

    @functools.cache
    def cover(i: int, j: int) -> bool:
        # memoised on (grant position, request position): polynomial for any patterns
        if i == len(g):
            return j == len(r)
        seg = g[i]
        if seg == "#":
            return cover(i + 1, j) or (j < len(r) and cover(i, j + 1))
        if j >= len(r) or r[j] == "#":
            return False
        if seg != "*" and seg != r[j]:
            return False
        return cover(i + 1, j + 1)

    return cover(0, 0)


def parse_policy(owner_uid: int, rules: Any) -> Policy:
    """The :class:`Policy` of ``broker.json``'s ``policy`` list; ValueError names what is wrong."""
    if not isinstance(rules, list):
        raise ValueError(f"policy must be a list of rules, not {type(rules).__name__}")
    parsed = []
    for n, raw in enumerate(rules):
        where = f"policy[{n}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where} must be an object")
        unknown = set(raw) - {"uids", "gids", *RIGHTS}
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
        ids: dict[str, frozenset[int]] = {}
        for key in ("uids", "gids"):
            value = raw.get(key, [])
            if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
            ):
                raise ValueError(f"{where}.{key} must be a list of non-negative integers")
            ids[key] = frozenset(value)
        grants: dict[Right, tuple[str, ...]] = {}
        for right in RIGHTS:
            pats = raw.get(right, [])
            if not isinstance(pats, list):
                raise ValueError(f"{where}.{right} must be a list of patterns")
            for p in pats:
                err = pattern_error(p)
                if err is not None:
                    raise ValueError(f"{where}.{right}: {err}")
            grants[right] = tuple(pats)
        parsed.append(Rule(ids["uids"], ids["gids"], grants))
    return Policy(owner_uid, tuple(parsed))


def supplementary_groups(pid: int, uid: int) -> frozenset[int]:
    """The supplementary groups of process ``pid`` (``Groups:`` of /proc/PID/status).

    Falls back to the user's groups in the group database when the process is
    already gone (``os.getgrouplist``), and to none when the user has no name.
    """
    groups = process_groups(pid)
    if groups is not None:
        return groups
    try:
        import pwd

        pw = pwd.getpwuid(uid)
        return frozenset(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except (KeyError, OSError):
        return frozenset()
