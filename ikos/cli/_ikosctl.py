"""ikosctl: control a running ikosd from the command line.

Each verb is one small function that sends protocol requests through
:class:`~ikos.platform._control.ControlClient` and prints the result: with
``--json`` exactly one JSON document (JSON Lines for the streams of
``logs -f`` and ``events``), otherwise text from :mod:`ikos.cli._render`.

Design: exit codes and errors follow systemctl, because scripts already
know them: 0 success, 3 "not active" (``is-active``, ``status``), 4 no such
daemon or service, 1 any other failure, 130 interrupted; a failure prints
one line, ``ikosctl: <message>``, on stderr and never a traceback, usage
errors included (argparse's exit status 2 and usage dump are replaced, as
the contract has no place for them). ``--root`` and ``--json`` are accepted
before and after the verb: they live in a parent parser shared by the main
parser and every subparser, with ``SUPPRESS`` defaults so that a subparser
never overwrites a value given before the verb.

Output on a terminal is for people: aligned tables with a header, colours
(unless ``NO_COLOR``), a hint line on stderr when there is nothing to show.
Anywhere else (a pipe, a file) it is for programs, and stable: ``list`` and
``services`` print one tab-separated row per entry and no header (``list``:
NAME KIND STATE PID RESTARTS UPTIME_SECONDS SUPERVISOR; ``services``: NAME
TYPE VERSION ENDPOINT CAPABILITIES PID OWNER ACTIVE HEALTH, capabilities
comma-separated), ``-`` for an empty field, no colour, and nothing at all
for an empty result. ``--json`` is the format to parse when in doubt.

The IPC verbs (``publish``, ``subscribe``, ``queue``) talk to the instance's
broker (``RUN/ipc/broker.sock``) through :mod:`ikos.ipc`, not to ikosd; their
data is JSON. A queue lease belongs to a broker connection, and a command line
lives one invocation, so ``queue get --ack`` takes and acknowledges in one go,
while a plain ``queue get`` asks for a detached lease (kept until the queue's
visibility timeout, whatever becomes of the connection) that a later ``queue
ack QUEUE ID`` or ``queue nack QUEUE ID`` by the owner settles.

Only verbs that ikosd serves are offered (:data:`PROTOCOL_VERBS` names the
requests each one sends, and a test checks them against a real ikosd); the
contract's verbs that this version lacks (:data:`UNAVAILABLE_VERBS`) answer
one line saying so and exit 1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

from ikos._errors import (
    IkosError,
    IpcNoSuchTarget,
    ManagerError,
    NoSuchDaemon,
    UpgradeFailed,
)
from ikos.cli import _render
from ikos.cli._render import Style
from ikos.platform._control import ControlClient
from ikos.platform._paths import InstancePaths
from ikos.platform._signals import parse_signal as _parse_signal
from ikos.platform._signals import signal_name

__all__ = [
    "PROTOCOL_VERBS",
    "UNAVAILABLE_VERBS",
    "build_parser",
    "main",
    "parse_data",
    "parse_signal",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_NOT_ACTIVE = 3
EXIT_NO_SUCH = 4
EXIT_INTERRUPTED = 130

#: Reads answer at once; a slower answer means ikosd is stuck.
READ_TIMEOUT = 30.0
#: start/stop/restart/reload/shutdown answer when the work is done, which
#: takes as long as the daemons' own start and shutdown timeouts; ikosd
#: enforces those, this only guards against a manager that hangs.
LIFECYCLE_TIMEOUT = 600.0
#: How much longer than an ask's own timeout ``call`` waits for ikosd's answer.
CALL_MARGIN = 1.0
#: ``call``'s ask timeout when ``--timeout`` is not given.
DEFAULT_CALL_TIMEOUT = 10.0

#: Every verb of ikosctl and the protocol requests it sends.
PROTOCOL_VERBS: dict[str, tuple[str, ...]] = {
    "start": ("start",),
    "stop": ("stop",),
    "restart": ("restart",),
    "reload": ("reload",),
    "status": ("status", "ipc_stats"),
    "list": ("list",),
    "tree": ("tree",),
    "is-active": ("status",),
    "kill": ("kill",),
    "upgrade": ("upgrade",),
    "call": ("call",),
    "tell": ("tell",),
    "reload-config": ("reload_config",),
    "shutdown": ("shutdown",),
    "logs": ("logs",),
    "services": ("services",),
    "discover": ("discover",),
    "top": ("list",),
    "alerts": ("alerts",),
    "events": ("events",),
    # the IPC verbs talk to the broker; status also reads its figures from ikosd
    "publish": (),
    "subscribe": (),
    "queue": (),
}
#: Verbs of the contract (CONTRACT.md) that this version of ikosd does not serve yet.
UNAVAILABLE_VERBS: frozenset[str] = frozenset()
#: ``top``'s refresh interval on a terminal when ``--interval`` is not given.
DEFAULT_TOP_INTERVAL = 2.0
#: ``queue get``'s wait when ``--timeout`` is not given.
DEFAULT_QUEUE_TIMEOUT = 0.0


class _UsageError(Exception):
    """A command line argparse refused."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see '{self.prog} --help')")


@dataclass
class _Context:
    """What a verb needs: the client, its arguments and where to print."""

    client: ControlClient
    args: argparse.Namespace
    out: TextIO
    json: bool
    style: Style
    paths: InstancePaths | None = None

    def broker(self) -> Any:
        """This invocation's connection to the instance's IPC broker."""
        from ikos.ipc._client import BrokerClient

        assert self.paths is not None
        client = getattr(self, "_broker", None)
        if client is None:
            client = BrokerClient(self.paths, label="ikosctl", reconnect_timeout=1.0)
            self._broker = client
        return client

    def close(self) -> None:
        client = getattr(self, "_broker", None)
        if client is not None:
            client.close()

    def emit_json(self, document: Any, *, compact: bool = False) -> None:
        indent = None if compact else 2
        self.out.write(json.dumps(document, ensure_ascii=False, indent=indent) + "\n")
        if compact:
            self.out.flush()

    def emit_text(self, text: str) -> None:
        self.out.write(text)

    def hint(self, text: str) -> None:
        """Say why nothing was printed, to a person only: on a terminal, on stderr."""
        if self.style.table:
            print(text, file=sys.stderr)


_Verb = Callable[[_Context], int]


def parse_data(text: str) -> Any:
    """DATA of ``call``/``tell``: JSON if it parses, else the string.

    >>> parse_data('{"n": 1}'), parse_data("42"), parse_data("hello"), parse_data("NaN")
    ({'n': 1}, 42, 'hello', 'NaN')
    """

    def refuse_constant(name: str) -> NoReturn:
        # NaN and Infinity are not JSON; keep them as the words they are.
        raise ValueError(name)

    try:
        return json.loads(text, parse_constant=refuse_constant)
    except ValueError:
        return text


def parse_signal(text: str) -> int | str:
    """A signal for ``kill -s``: a number, or a name with or without ``SIG``.

    Returns the number as is, or the canonical name, which is what the
    protocol carries.

    >>> parse_signal("9"), parse_signal("kill"), parse_signal("SIGUSR1")
    (9, 'SIGKILL', 'SIGUSR1')
    """
    try:
        sig = _parse_signal(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return int(sig) if text.strip().isdigit() else signal_name(sig)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a non-negative number of seconds: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a non-negative number: {text!r}")
    return value


# --- verbs ------------------------------------------------------------------


def _lifecycle(verb: str) -> _Verb:
    def run(ctx: _Context) -> int:
        results = [
            ctx.client.call(verb, {"name": name}, timeout=LIFECYCLE_TIMEOUT)
            for name in ctx.args.names
        ]
        if ctx.json:
            ctx.emit_json(results)
        return EXIT_OK

    return run


def _status(ctx: _Context) -> int:
    statuses = _expect_list(ctx.client.call("status", {"names": ctx.args.names}), "status")
    broker = next((s for s in statuses if s.get("name") == "ikos-broker"), None)
    ipc = _ipc_figures(ctx) if broker is not None else None
    if ipc is not None and broker is not None and ipc.get("up"):
        broker["ipc"] = {k: ipc.get(k, 0) for k in _IPC_FIGURES}
    if ctx.json:
        ctx.emit_json(statuses)
    else:
        ctx.emit_text(_render.render_status(statuses, ctx.style, time.time()))
        if ipc is not None:
            ctx.emit_text(_ipc_line(ipc))
        # ikosd's own facts travel with the root supervisor's status
        root = next((s for s in statuses if s.get("supervisor") is None), None)
        if root is not None and "metrics" in root:
            ctx.emit_text(f"ikosd: metrics at {root['metrics'] or 'nowhere (not serving)'}\n")
    # a socket-activated daemon waiting for its first client is as it should be
    running = all(s.get("state") == "running" or s.get("activation") for s in statuses)
    return EXIT_OK if running else EXIT_NOT_ACTIVE


def _list(ctx: _Context) -> int:
    statuses = _expect_list(ctx.client.call("list"), "list")
    if ctx.json:
        ctx.emit_json(statuses)
    else:
        ctx.emit_text(_render.render_list(statuses, ctx.style, time.time()))
    return EXIT_OK


def _top(ctx: _Context) -> int:
    from ikos.cli import _top as top

    def fetch() -> list[dict[str, Any]]:
        return top.top_rows(_expect_list(ctx.client.call("list"), "list"))

    sort = str(ctx.args.sort)
    if ctx.json:
        ctx.emit_json(top.sort_rows(fetch(), sort))
    elif ctx.args.once or not ctx.style.table:
        ctx.emit_text(_render.render_top(top.sort_rows(fetch(), sort), ctx.style))
    else:
        return _until_interrupted(
            lambda: top.run_live(fetch, sort, float(ctx.args.interval), ctx.out)
        )
    return EXIT_OK


def _tree(ctx: _Context) -> int:
    root = ctx.client.call("tree")
    if not isinstance(root, dict):
        raise _bad_result("tree", "an object")
    if ctx.json:
        ctx.emit_json(root)
    else:
        deps = bool(getattr(ctx.args, "deps", False))
        ctx.emit_text(_render.render_tree(root, ctx.style, deps=deps))
    return EXIT_OK


def _is_active(ctx: _Context) -> int:
    # One request per name, so that an unknown name does not hide the
    # others' states (``status`` refuses the whole list for one unknown).
    entries: list[dict[str, Any]] = []
    unknown: NoSuchDaemon | None = None
    for name in ctx.args.names:
        try:
            statuses = _expect_list(ctx.client.call("status", {"names": [name]}), "status")
        except NoSuchDaemon as exc:
            unknown = unknown or exc
            entries.append({"name": name, "state": "unknown", "active": False})
            continue
        state = statuses[0].get("state") if statuses else None
        state = state if isinstance(state, str) else "unknown"
        entries.append({"name": name, "state": state, "active": state == "running"})
    if ctx.json:
        ctx.emit_json(entries)
    else:
        ctx.emit_text("".join(f"{ctx.style.state(e['state'])}\n" for e in entries))
    if unknown is not None:
        raise unknown
    return EXIT_OK if all(e["active"] for e in entries) else EXIT_NOT_ACTIVE


def _kill(ctx: _Context) -> int:
    result = ctx.client.call("kill", {"name": ctx.args.name, "signal": ctx.args.signal})
    if ctx.json:
        ctx.emit_json(result)
    return EXIT_OK


def _upgrade(ctx: _Context) -> int:
    try:
        result = ctx.client.call("upgrade", {"name": ctx.args.name}, timeout=LIFECYCLE_TIMEOUT)
    except UpgradeFailed as exc:
        return _fail(exc.reason, EXIT_FAILURE)  # one line; the traceback is in the daemon's log
    if not isinstance(result, dict) or "pid" not in result:
        raise _bad_result("upgrade", 'an object with "pid"')
    if ctx.json:
        ctx.emit_json(result)
    else:
        ctx.emit_text(
            f"{result.get('name')}: upgraded, pid {result.get('old_pid')} -> {result['pid']}, "
            f"{'state handed over' if result.get('state') == 'handed over' else 'fresh state'}\n"
        )
    return EXIT_OK


def _call(ctx: _Context) -> int:
    timeout: float = ctx.args.timeout
    args = {"name": ctx.args.name, "data": parse_data(ctx.args.data), "timeout": timeout}
    result = ctx.client.call("call", args, timeout=timeout + CALL_MARGIN)
    if not isinstance(result, dict) or not ("reply" in result or "reply_repr" in result):
        raise _bad_result("call", 'an object with "reply" or "reply_repr"')
    if "reply" in result:
        reply = result["reply"]
        if ctx.json:
            ctx.emit_json(reply)
        elif isinstance(reply, str):
            ctx.emit_text(reply + "\n")
        else:
            ctx.emit_text(json.dumps(reply, ensure_ascii=False) + "\n")
    elif ctx.json:
        ctx.emit_json(result["reply_repr"])
    else:
        ctx.emit_text(f"{result['reply_repr']}\n")
    return EXIT_OK


def _tell(ctx: _Context) -> int:
    result = ctx.client.call("tell", {"name": ctx.args.name, "data": parse_data(ctx.args.data)})
    if ctx.json:
        ctx.emit_json(result)
    return EXIT_OK


def _reload_config(ctx: _Context) -> int:
    result = ctx.client.call("reload_config", timeout=LIFECYCLE_TIMEOUT)
    changes = result if isinstance(result, dict) else {}
    warnings = changes.get("warnings")
    for warning in warnings if isinstance(warnings, list) else []:
        print(f"ikosctl: warning: {' '.join(str(warning).split())}", file=sys.stderr)
    if ctx.json:
        ctx.emit_json(result)
        return EXIT_OK
    lines = [
        f"{what}: {', '.join(str(n) for n in changes[what])}\n"
        for what in ("added", "removed", "changed")
        if changes.get(what)
    ]
    ctx.emit_text("".join(lines) or "no changes\n")
    return EXIT_OK


def _shutdown(ctx: _Context) -> int:
    result = ctx.client.call("shutdown", timeout=LIFECYCLE_TIMEOUT)
    if ctx.json:
        ctx.emit_json(result)
    return EXIT_OK


def _logs(ctx: _Context) -> int:
    args: dict[str, Any] = {"name": ctx.args.name, "follow": ctx.args.follow}
    if ctx.args.lines is not None:
        args["lines"] = ctx.args.lines
    if not ctx.args.follow:
        result = ctx.client.call("logs", args)
        if ctx.json:
            ctx.emit_json(result)
            return EXIT_OK
        entries = result.get("lines") if isinstance(result, dict) else result
        entries = entries if isinstance(entries, list) else [entries]
        for entry in entries:
            ctx.emit_text(_log_line(entry))
        if not entries:
            ctx.hint(f"no log lines of '{ctx.args.name}'")
        return EXIT_OK

    def follow() -> None:
        with ctx.client.stream("logs", args) as events:
            for event in events:
                if ctx.json:
                    ctx.emit_json(event, compact=True)
                else:
                    ctx.emit_text(_log_line(event))
                    ctx.out.flush()

    return _until_interrupted(follow)


def _alerts(ctx: _Context) -> int:
    alerts = _expect_list(ctx.client.call("alerts"), "alerts")
    if ctx.json:
        ctx.emit_json(alerts)
    elif alerts:
        ctx.emit_text(_render.render_alerts(alerts, ctx.style, time.time()))
    else:
        ctx.hint("no active alerts")
    return EXIT_OK


def _events(ctx: _Context) -> int:
    def follow() -> None:
        with ctx.client.stream("events") as events:
            for event in events:
                if ctx.json:  # ``subscribed`` first: a script knows when it may act
                    ctx.emit_json(event, compact=True)
                elif isinstance(event, dict) and event.get("type") != "subscribed":
                    ctx.emit_text(_render.render_event(event))
                    ctx.out.flush()

    return _until_interrupted(follow)


def _until_interrupted(follow: Callable[[], None]) -> int:
    """Run a verb that prints until stopped: Ctrl-C, or the reader of a pipe leaving
    (``| head``). Both are a normal end, not a failure: exit 0, quietly."""
    try:
        follow()
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        _silence_stdout()
    return EXIT_OK


def _log_line(entry: Any) -> str:
    if isinstance(entry, dict):
        text = entry.get("line", entry.get("message"))
        if isinstance(text, str):
            return text if text.endswith("\n") else text + "\n"
    if isinstance(entry, str):
        return entry if entry.endswith("\n") else entry + "\n"
    return json.dumps(entry, ensure_ascii=False) + "\n"


def _services(ctx: _Context) -> int:
    args: dict[str, Any] = {}
    if ctx.args.active:
        args["active_only"] = True
    services = _expect_list(ctx.client.call("services", args), "services")
    if ctx.json:
        ctx.emit_json(services)
    elif services:
        ctx.emit_text(_render.render_services(services, ctx.style))
    else:
        ctx.hint("no active services" if ctx.args.active else "no services registered")
    return EXIT_OK


def _discover(ctx: _Context) -> int:
    ns = ctx.args
    args: dict[str, Any] = {}
    if ns.name is not None:
        # A name with glob characters is a pattern: `ikosctl discover 'net/*'`.
        args["pattern" if any(c in ns.name for c in "*?[") else "name"] = ns.name
    if ns.capability is not None:
        args["capability"] = ns.capability
    if ns.type is not None:
        args["type"] = ns.type
    if ns.active:
        args["active_only"] = True
    if not args or args == {"active_only": True}:
        raise _UsageError("discover needs a NAME (or glob), --capability or --type")
    result = ctx.client.call("discover", args)
    if isinstance(result, list) and not result:
        what = ", ".join(f"{k} {v!r}" for k, v in args.items() if k != "active_only")
        raise NoSuchDaemon(f"no {'active ' if ns.active else ''}service matches {what}")
    if ctx.json:
        ctx.emit_json(result)
    elif isinstance(result, dict):
        ctx.emit_text(_render.render_service(result))
    elif isinstance(result, list) and len(result) == 1 and isinstance(result[0], dict):
        ctx.emit_text(_render.render_service(result[0]))
    else:
        ctx.emit_text(_render.render_services(_expect_list(result, "discover"), ctx.style))
    return EXIT_OK


# --- IPC -------------------------------------------------------------------------


def _ipc_figures(ctx: _Context) -> dict[str, Any] | None:
    """ikosd's ``ipc_stats`` (which also refreshes the figures in the broker's status)."""
    try:
        result = ctx.client.call("ipc_stats")
    except ManagerError as exc:
        if exc.code in ("permission_denied", "unknown_verb"):
            return None  # another user, or an ikosd without IPC: status shows the rest
        raise
    return result if isinstance(result, dict) else None


def _ipc_line(figures: dict[str, Any]) -> str:
    if not figures.get("enabled", True):
        return "ikos.ipc: disabled ([ipc] enabled = false)\n"
    if figures.get("activation") == "waiting":
        return "ikos.ipc: the broker starts at its first connection (ikosd listens for it)\n"
    if not figures.get("up"):
        return f"ikos.ipc: broker not answering: {figures.get('error', '')}\n"
    f = {k: figures.get(k, 0) for k in _IPC_FIGURES}
    return (
        f"ikos.ipc: {f['clients']} clients, {f['subscriptions']} subscriptions, "
        f"{f['served']} served names; published {f['published']}, delivered {f['delivered']}, "
        f"dropped {f['dropped']}; {f['queues']} queues holding {f['queued']} messages "
        f"({f['dead']} dead)\n"
    )


_IPC_FIGURES = (
    "clients",
    "subscriptions",
    "served",
    "published",
    "delivered",
    "dropped",
    "queues",
    "queued",
    "dead",
)


def _jsonable(value: Any) -> Any:
    """A received payload as JSON can show it: bytes as UTF-8 text, else base64."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(raw).decode()}
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_jsonable(value), ensure_ascii=False, default=repr)


def _text(value: Any) -> str:
    """DATA as one line of text: a string as is, anything else as JSON."""
    value = _jsonable(value)
    return value.replace("\n", "\\n") if isinstance(value, str) else _dumps(value)


def _publish(ctx: _Context) -> int:
    ctx.broker().publish(ctx.args.topic, parse_data(ctx.args.data), codec="json", ack=True)
    if ctx.json:
        ctx.emit_json({"topic": ctx.args.topic, "published": True})
    return EXIT_OK


def _subscribe(ctx: _Context) -> int:
    from ikos.ipc._subscription import Subscription

    client = ctx.broker()
    sub = Subscription(client, ctx.args.topic)
    client._add_subscription(sub)
    left: int | None = ctx.args.count

    def follow() -> None:
        nonlocal left
        while left is None or left > 0:
            message = sub.get()
            if ctx.json:
                document = {
                    "topic": message.topic,
                    "data": _jsonable(message.payload),
                    "sender_pid": message.sender_pid,
                    "message_id": message.message_id,
                    "timestamp": message.timestamp,
                }
                ctx.out.write(_dumps(document) + "\n")
            else:
                ctx.out.write(f"{message.topic} {_text(message.payload)}\n")
            ctx.out.flush()
            if left is not None:
                left -= 1

    return _until_interrupted(follow)


def _queue_message_json(queue: str, msg: int, deliveries: int, data: Any) -> dict[str, Any]:
    return {"queue": queue, "msg": msg, "deliveries": deliveries, "data": _jsonable(data)}


def _queue(ctx: _Context) -> int:
    from ikos.ipc._durable import Queue

    ns = ctx.args
    client = ctx.broker()
    if ns.action == "list":
        queues = client.queues()
        if ctx.json:
            ctx.emit_json(queues)
        elif queues:
            ctx.emit_text(_render.render_queues(queues, ctx.style))
        else:
            ctx.hint("no queues")
        return EXIT_OK
    queue = Queue(client, ns.queue)
    if ns.action == "put":
        msg = queue.put(parse_data(ns.data), codec="json")
        if ctx.json:
            ctx.emit_json({"queue": ns.queue, "msg": msg})
        else:
            ctx.emit_text(f"{msg}\n")
        return EXIT_OK
    if ns.action == "get":
        m = queue.get_leased(ns.timeout, detach=not ns.ack)
        if ns.ack:
            m.ack()
        if ctx.json:
            ctx.emit_json(_queue_message_json(ns.queue, m.id, m.deliveries, m.data))
        else:
            ctx.emit_text(f"{m.id}\t{m.deliveries}\t{_text(m.data)}\n")
        return EXIT_OK
    if ns.action in ("ack", "nack"):
        if ns.action == "ack":
            queue.ack(ns.msg, detached=True)
        else:
            queue.nack(ns.msg, delay=ns.delay, detached=True)
        if ctx.json:
            ctx.emit_json({"queue": ns.queue, "msg": ns.msg, ns.action: True})
        return EXIT_OK
    assert ns.action == "dead"
    dead = queue.dead(ns.limit)
    if ctx.json:
        ctx.emit_json(dead)
        return EXIT_OK
    for letter in dead:
        data = _text(letter.get("data"))
        ctx.emit_text(f"{letter.get('msg')}\t{letter.get('deliveries')}\t{data}\n")
    if not dead:
        ctx.hint(f"no dead letters in '{ns.queue}'")
    return EXIT_OK


def _expect_list(result: Any, verb: str) -> list[dict[str, Any]]:
    if not isinstance(result, list) or not all(isinstance(s, dict) for s in result):
        raise _bad_result(verb, "an array of objects")
    return result


def _bad_result(verb: str, expected: str) -> ManagerError:
    return ManagerError(
        f"ikosd answered '{verb}' with something other than {expected}", "bad_response"
    )


# --- command line -----------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ikosctl (every verb, both option placements)."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--root",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="the instance's root directory (default: $IKOS_ROOT, else ikosd's default)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print one JSON document (JSON Lines for streams)",
    )
    parser = _Parser(
        prog="ikosctl",
        parents=[common],
        description="Control a running ikosd.",
        epilog="Exit status: 0 success, 1 failure, 3 not active, 4 no such daemon or service.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, run: _Verb, help: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    for name, does in (
        ("start", "start daemons (a supervisor with its subtree)"),
        ("stop", "stop daemons; they stay stopped until started"),
        ("restart", "restart daemons"),
        ("reload", "reload daemons (their reload signal)"),
    ):
        verb(name, _lifecycle(name), does).add_argument("names", nargs="+", metavar="NAME")
    verb(
        "status", _status, "show daemons' status (all without NAME); 3 when one is not running"
    ).add_argument("names", nargs="*", metavar="NAME")
    verb("list", _list, "list every daemon and supervisor")
    top = verb(
        "top",
        _top,
        "daemons' CPU, memory, files and processes; refreshing on a terminal (q quits)",
    )
    top.add_argument(
        "--sort",
        choices=("cpu", "memory", "restarts", "name"),
        default="cpu",
        help="order of the rows (default cpu)",
    )
    top.add_argument(
        "--interval",
        type=_positive_float,
        default=DEFAULT_TOP_INTERVAL,
        metavar="S",
        help=f"seconds between refreshes on a terminal (default {DEFAULT_TOP_INTERVAL:g})",
    )
    top.add_argument(
        "--once", action="store_true", help="print one snapshot and exit, even on a terminal"
    )
    verb("alerts", _alerts, "list the active alerts")
    verb(
        "events",
        _events,
        "print daemons' state transitions and alerts as they happen, until ikosd stops or ^C",
    )
    verb("tree", _tree, "show the supervision tree").add_argument(
        "--deps",
        action="store_true",
        help="show each child's requires/after (children are listed in start order)",
    )
    verb(
        "is-active", _is_active, "print each daemon's state; 3 when one is not running"
    ).add_argument("names", nargs="+", metavar="NAME")
    kill = verb("kill", _kill, "send a signal to a daemon")
    kill.add_argument(
        "-s",
        "--signal",
        type=parse_signal,
        default="SIGTERM",
        metavar="SIG",
        help="number or name, with or without SIG (default SIGTERM)",
    )
    kill.add_argument("name", metavar="NAME")
    verb(
        "upgrade",
        _upgrade,
        "run an actor's current code, handing its state over without losing a message",
    ).add_argument("name", metavar="NAME")
    call = verb("call", _call, "ask an actor DATA and print its reply")
    call.add_argument("name", metavar="NAME")
    call.add_argument("data", metavar="DATA", help="JSON if it parses as JSON, else a string")
    call.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_CALL_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for the reply (default {DEFAULT_CALL_TIMEOUT:g})",
    )
    tell = verb("tell", _tell, "send DATA to an actor without waiting for a reply")
    tell.add_argument("name", metavar="NAME")
    tell.add_argument("data", metavar="DATA", help="JSON if it parses as JSON, else a string")
    verb("reload-config", _reload_config, "reload ikosd's configuration")
    verb("shutdown", _shutdown, "stop every daemon in order and ikosd itself")
    logs = verb("logs", _logs, "print a daemon's log")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=_non_negative_int, metavar="N", help="last N lines")
    logs.add_argument("name", metavar="NAME")
    services = verb("services", _services, "list registered services")
    services.add_argument("--active", action="store_true", help="only services whose owner runs")
    discover = verb(
        "discover",
        _discover,
        "show a service by name, or the services matching a glob, capability or type; 4 when none",
    )
    discover.add_argument("name", metavar="NAME", nargs="?", help="a name, or a glob like 'net/*'")
    discover.add_argument("--capability", metavar="CAP", help="services offering CAP")
    discover.add_argument("--type", metavar="TYPE", help="services of type TYPE")
    discover.add_argument("--active", action="store_true", help="only services whose owner runs")
    publish = verb("publish", _publish, "publish DATA on TOPIC through the IPC broker")
    publish.add_argument("topic", metavar="TOPIC", help="dot-separated, like net.eth0.up")
    publish.add_argument("data", metavar="DATA", help="JSON if it parses as JSON, else a string")
    subscribe = verb(
        "subscribe", _subscribe, "print each message published on TOPIC (a pattern) until ^C"
    )
    subscribe.add_argument("topic", metavar="TOPIC", help="a topic or pattern: net.*, dev.#")
    subscribe.add_argument(
        "-n", "--count", type=_non_negative_int, metavar="N", help="exit after N messages"
    )
    queue = verb("queue", _queue, "put, get, ack, nack durable queue messages; list queues")
    actions = queue.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, parents=[common], help=help, description=help)

    put = action("put", "append DATA to QUEUE; prints its id once it is on disk")
    put.add_argument("queue", metavar="QUEUE")
    put.add_argument("data", metavar="DATA", help="JSON if it parses as JSON, else a string")
    get = action("get", "take the next message of QUEUE: ID, DELIVERIES, DATA")
    get.add_argument("queue", metavar="QUEUE")
    get.add_argument(
        "--ack", action="store_true", help="acknowledge at once (take the message for good)"
    )
    get.add_argument(
        "--timeout",
        type=_non_negative_float,
        default=DEFAULT_QUEUE_TIMEOUT,
        metavar="S",
        help="seconds to wait for a message (default: do not wait)",
    )
    for name, does in (
        ("ack", "acknowledge message ID of QUEUE, taken by 'queue get'"),
        ("nack", "give message ID of QUEUE back for another delivery"),
    ):
        settle = action(name, does)
        settle.add_argument("queue", metavar="QUEUE")
        settle.add_argument("msg", metavar="ID", type=_non_negative_int)
        if name == "nack":
            settle.add_argument(
                "--delay", type=_non_negative_float, default=0.0, metavar="S", help="after S s"
            )
    action("list", "the queues and what they hold")
    dead = action("dead", "the dead letters of QUEUE")
    dead.add_argument("queue", metavar="QUEUE")
    dead.add_argument("--limit", type=_non_negative_int, default=100, metavar="N", help="at most N")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ikosctl with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    >>> main(["--root", "/srv/ikos", "status", "echo", "--json"])  # doctest: +SKIP
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        verb = _verb_of(argv)
        if verb in UNAVAILABLE_VERBS:
            return _fail(f"'{verb}' is not available in this version of ikos", EXIT_FAILURE)
        return _fail(str(exc), EXIT_FAILURE)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    out = sys.stdout
    ctx: _Context | None = None
    try:
        paths = InstancePaths.resolve(getattr(args, "root", None))
        with ControlClient(paths, timeout=READ_TIMEOUT) as client:
            style = Style.for_stream(out)
            ctx = _Context(client, args, out, getattr(args, "json", False), style, paths)
            status: int = args.run(ctx)
        out.flush()
        return status
    except (NoSuchDaemon, IpcNoSuchTarget) as exc:
        return _fail(str(exc), EXIT_NO_SUCH)
    except BrokenPipeError:
        # Our reader went away (``ikosctl list | head``): nothing to say, and
        # the interpreter must not complain when it flushes stdout at exit.
        _silence_stdout()
        return EXIT_FAILURE
    except (IkosError, OSError, _UsageError) as exc:
        return _fail(str(exc) or type(exc).__name__, EXIT_FAILURE)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if ctx is not None:
            ctx.close()


def _verb_of(argv: Sequence[str]) -> str | None:
    """The verb of a command line: its first word that is not a global option."""
    words = iter(argv)
    for word in words:
        if word == "--root":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _fail(message: str, status: int) -> int:
    one_line = " ".join(message.split())
    print(f"ikosctl: {one_line}", file=sys.stderr)
    return status


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
