"""Topic names, patterns, and the index that finds a topic's subscribers.

One syntax, AMQP's: a topic is dot-separated segments of ``[A-Za-z0-9_@:-]+`` (at
most 255 bytes); in a pattern ``*`` matches exactly one segment and ``#`` zero or
more (``net.*`` matches ``net.eth0`` but not ``net.eth0.up``; ``dev.#`` matches
``dev`` and ``dev.usb.1``). The same patterns say what the policy grants.

:class:`SubscriptionIndex` keeps the subscriptions in a trie of segments (``*``
and ``#`` are children like any other) and answers "who gets topic T" from a
cache keyed by topic, dropped whole on every (un)subscribe. The rejected
alternative, matching every pattern against every published topic, costs
O(patterns) per message; with the cache a publish to a known topic is one dict
lookup however many patterns there are, and a subscription change (rare next to
publishes) pays for a fresh walk of the trie per topic.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Generic, TypeVar

#: The longest topic or pattern, in bytes.
MAX_TOPIC = 255
#: Topics whose subscribers are cached at most (the cache is emptied past it).
CACHE_SIZE = 65536

_SEGMENT = re.compile(r"[A-Za-z0-9_@:-]+\Z")

K = TypeVar("K", bound=Hashable)


def topic_error(topic: object) -> str | None:
    """Why ``topic`` is not a valid topic name, or None when it is."""
    return _check(topic, "topic", wildcards=False)


def pattern_error(pattern: object) -> str | None:
    """Why ``pattern`` is not a valid pattern, or None when it is."""
    return _check(pattern, "pattern", wildcards=True)


def _check(text: object, what: str, *, wildcards: bool) -> str | None:
    if not isinstance(text, str):
        return f"the {what} must be a string, not {type(text).__name__}"
    if not text:
        return f"the {what} is empty"
    if len(text.encode()) > MAX_TOPIC:
        return f"the {what} is longer than {MAX_TOPIC} bytes"
    for segment in text.split("."):
        if wildcards and segment in ("*", "#"):
            continue
        if not _SEGMENT.match(segment):
            shown = text if len(text) <= 60 else text[:57] + "..."
            allowed = "[A-Za-z0-9_@:-]+" + (", '*' or '#'" if wildcards else "")
            return f"bad segment {segment!r} in {what} {shown!r}: segments are {allowed}"
    return None


def matches(pattern: str, topic: str) -> bool:
    """Whether ``pattern`` matches ``topic`` (both assumed valid).

    Runs the pattern as an automaton over the topic's segments, keeping the set of
    pattern positions reached: O(pattern * topic) whatever the pattern, where
    backtracking over several ``#`` would be exponential (``#.#.#...x`` against a
    long topic is a pattern anyone may send).
    """
    pat = pattern.split(".")
    states = _closure(pat, {0})
    for seg in topic.split("."):
        nxt = set()
        for i in states:
            if i < len(pat):
                p = pat[i]
                if p == "#":
                    nxt.add(i)  # '#' takes this segment and may take more
                elif p == "*" or p == seg:
                    nxt.add(i + 1)
        if not nxt:
            return False
        states = _closure(pat, nxt)
    return len(pat) in states


def _closure(pat: list[str], states: set[int]) -> set[int]:
    """``states`` plus the positions after any ``#`` taking zero segments."""
    out = set(states)
    todo = list(states)
    while todo:
        i = todo.pop()
        if i < len(pat) and pat[i] == "#" and i + 1 not in out:
            out.add(i + 1)
            todo.append(i + 1)
    return out


class _Node(Generic[K]):
    __slots__ = ("children", "keys")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] = {}
        self.keys: dict[K, None] = {}  # insertion-ordered set


class SubscriptionIndex(Generic[K]):
    """Which keys (subscriptions) a topic reaches, for many patterns at once.

    ``add(pattern, key)`` and ``remove(pattern, key)`` maintain the trie;
    :meth:`match` returns, per matching pattern, the keys subscribed with it,
    as a tuple of ``(pattern, (key, ...))`` so that a caller can encode one
    delivery per pattern and share it across that pattern's keys.
    """

    def __init__(self) -> None:
        self._root: _Node[K] = _Node()
        self._patterns: dict[str, dict[K, None]] = {}
        self._cache: dict[str, tuple[tuple[str, tuple[K, ...]], ...]] = {}

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._patterns.values())

    @property
    def patterns(self) -> dict[str, int]:
        """Every pattern subscribed, with its number of subscribers."""
        return {p: len(k) for p, k in self._patterns.items()}

    def add(self, pattern: str, key: K) -> bool:
        """Subscribe ``key`` with ``pattern``; False if it already was."""
        keys = self._patterns.setdefault(pattern, {})
        if key in keys:
            return False
        keys[key] = None
        node = self._root
        for seg in pattern.split("."):
            node = node.children.setdefault(seg, _Node())
        node.keys[key] = None
        self._cache.clear()
        return True

    def remove(self, pattern: str, key: K) -> bool:
        """Unsubscribe ``key`` from ``pattern``; False if it was not subscribed."""
        keys = self._patterns.get(pattern)
        if keys is None or key not in keys:
            return False
        del keys[key]
        if not keys:
            del self._patterns[pattern]
        path = [self._root]
        segs = pattern.split(".")
        for seg in segs:
            path.append(path[-1].children[seg])
        del path[-1].keys[key]
        # prune the branch left empty, so that the trie stays as small as what is subscribed
        for depth in range(len(segs), 0, -1):
            node = path[depth]
            if node.keys or node.children:
                break
            del path[depth - 1].children[segs[depth - 1]]
        self._cache.clear()
        return True

    def match(self, topic: str) -> tuple[tuple[str, tuple[K, ...]], ...]:
        """``((pattern, keys), ...)`` for every pattern matching ``topic``."""
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        search: _Search[K] = _Search(topic.split("."))
        search.walk(self._root, 0)
        result = tuple(search.found.items())
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[topic] = result
        return result


class _Search(Generic[K]):
    """One walk of the trie for one topic: the patterns found and the states seen.

    A trie node is one pattern prefix, so reaching it again at the same topic
    position finds nothing new: each (node, position) is visited once, for
    :meth:`walk` and for :meth:`absorb` apart. Without this, patterns with several
    '#' make the walk exponential in the topic's length.
    """

    __slots__ = ("found", "path", "seen", "segs")

    def __init__(self, segs: list[str]) -> None:
        self.segs = segs
        self.path: list[str] = []
        self.found: dict[str, tuple[K, ...]] = {}
        self.seen: set[tuple[int, int]] = set()

    def walk(self, node: _Node[K], j: int) -> None:
        """At ``node`` with the topic's segments before ``j`` matched."""
        visit = (id(node), j)
        if visit in self.seen:
            return
        self.seen.add(visit)
        segs, path = self.segs, self.path
        if j == len(segs) and node.keys:
            self.found.setdefault(".".join(path), tuple(node.keys))
        children = node.children
        if not children:
            return
        if j < len(segs):
            for seg in (segs[j], "*"):
                child = children.get(seg)
                if child is not None:
                    path.append(seg)
                    self.walk(child, j + 1)
                    path.pop()
        hash_child = children.get("#")
        if hash_child is not None:
            path.append("#")
            self.absorb(hash_child, j)
            path.pop()

    def absorb(self, node: _Node[K], j: int) -> None:
        """After a '#' (``node``): it takes segments j.. one by one, each a place to go on."""
        visit = (id(node), -1 - j)
        if visit in self.seen:
            return
        self.seen.add(visit)
        self.walk(node, j)
        if j < len(self.segs):
            self.absorb(node, j + 1)
