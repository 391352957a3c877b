"""Health checks of services: probes, thresholds and the monitor loop.

A service's health comes from its checks, each of one kind: ``exec`` (a
command's exit status), ``tcp`` (a connection is accepted), ``http`` (a GET
answers 2xx or 3xx), ``ttl`` (the service sent a heartbeat recently) and
``method`` (a method of the actor answers, asked through the manager). The
probes are coroutines for the manager's asyncio loop: they never block it,
every one of them is bounded by its timeout, and an ``exec`` probe that
runs over is killed with its whole process group and reaped, so a check
leaves neither orphans nor zombies behind.

Each check's result feeds a small state machine with Consul's and AWS load
balancers' thresholds (:func:`next_check_state`): ``unknown`` until enough
consecutive results agree, ``passing`` after ``healthy_threshold``
consecutive passes, ``critical`` after ``unhealthy_threshold`` consecutive
failures, and ``warning`` for a passing check that has started failing but
not yet reached its threshold. A service is as healthy as its worst check.
The state machine is a pure function, kept apart from the probes so that it
is tested on its own; :class:`HealthMonitor` wires the two together and
reports changes.

A monitor belongs to one incarnation of a daemon: the manager makes a new
one each time the daemon becomes ready, so every incarnation starts
``unknown`` with no passes or failures counted. Each check may give it a
``start_period`` (Docker's name; Kubernetes' startup probe): failures
during that many seconds after the monitor started do not count, and the
first pass ends the period early. The default is 0, as Docker's: ikos
probes a daemon only once it reported ready, the thresholds already give
``interval * unhealthy_threshold`` seconds before a check turns
``critical``, and a restart for health counts against the supervisor's
restart intensity, so a daemon killed too early shows up as a supervisor
giving up, not as a silent restart loop; a daemon that says it is ready
before it serves (``type = "simple"``) sets a ``start_period``.

HTTP is spoken by hand over asyncio streams (one GET, ``Connection:
close``, status line and headers parsed, a bounded piece of the body kept
as output) rather than with aiohttp or httpx: a health GET needs a few
dozen lines, and the manager should not carry an HTTP client dependency
for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import shlex
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias, cast
from urllib.parse import urlsplit

from ikos._errors import ConfigError
from ikos.platform._asyncio_tls import enable_asyncio_tls
from ikos.platform._process import run_command

log = logging.getLogger(__name__)

CheckKind: TypeAlias = Literal["exec", "tcp", "http", "ttl", "method"]
OnFailure: TypeAlias = Literal["restart", "alert"]
HealthState: TypeAlias = Literal["unknown", "passing", "warning", "critical"]
MethodCaller: TypeAlias = Callable[[str], Awaitable[object]]
OnChange: TypeAlias = Callable[[str, str, str], "Awaitable[None] | None"]
OnResult: TypeAlias = Callable[["HealthCheck", bool], None]

CHECK_KINDS: tuple[str, ...] = ("exec", "tcp", "http", "ttl", "method")
ON_FAILURE: tuple[str, ...] = ("restart", "alert")
OUTPUT_MAX = 4096
THRESHOLD_MAX = 1000
_HTTP_HEADERS_MAX = 100
# Worst first: the service's status is the first of these any check is in.
_SEVERITY: tuple[HealthState, ...] = ("critical", "warning", "unknown", "passing")
_KEYS = (
    "kind",
    "target",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
    "on_failure",
    "ttl",
    "start_period",
)


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe: ``ok``, what it said (at most 4 KiB), how long it took."""

    ok: bool
    output: str
    duration: float


def _result(ok: bool, output: str | bytes, started: float) -> ProbeResult:
    if isinstance(output, bytes):
        output = output[:OUTPUT_MAX].decode("utf-8", "replace")
    elif len(output.encode()) > OUTPUT_MAX:
        output = output.encode()[:OUTPUT_MAX].decode("utf-8", "ignore")
    return ProbeResult(ok, output, time.monotonic() - started)


# -- probes -------------------------------------------------------------------


async def probe_exec(cmd: Sequence[str], timeout: float) -> ProbeResult:
    """Run ``cmd`` (no shell); it passes when it exits 0 within ``timeout`` seconds.

    Standard output and error are captured together (the first 4 KiB kept,
    the rest drained so the command never blocks on a full pipe). The
    command runs in a new session; on timeout, or when the probe is
    cancelled, its whole session is killed with SIGKILL and the command
    reaped. (A descendant that leaves the session with ``setsid`` escapes,
    as it would escape any supervisor short of a cgroup.) It is started and
    watched by :func:`run_command`, as the manager's other short commands:
    asyncio's subprocesses were rejected, because their child watcher races
    the manager's reaper of orphans, which took the status of about one
    command in ten (asyncio then reports status 255).

    Example::

        >>> asyncio.run(probe_exec(["true"], timeout=2)).ok
        True
    """
    started = time.monotonic()
    if not cmd:
        return _result(False, "empty command", started)
    try:
        result = await run_command(list(cmd), timeout=timeout, output_limit=OUTPUT_MAX)
    except OSError as exc:
        return _result(False, f"cannot run {cmd[0]!r}: {exc.strerror or exc}", started)
    said = "\n" + _text(result.output) if result.output else ""
    status = result.status
    if status is None:
        return _result(False, f"timed out after {timeout:g}s, killed{said}", started)
    if status.code == 0:
        return _result(True, result.output, started)
    if status.code is not None:
        return _result(False, f"exit status {status.code}{said}", started)
    return _result(False, f"killed by signal {status.signal}{said}", started)


def _text(data: bytes | bytearray) -> str:
    return bytes(data[:OUTPUT_MAX]).decode("utf-8", "replace")


async def probe_tcp(host: str, port: int, timeout: float) -> ProbeResult:
    """Pass when a TCP connection to ``host:port`` is accepted within ``timeout`` seconds."""
    started = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return _result(False, f"connect to {host}:{port}: timed out after {timeout:g}s", started)
    except OSError as exc:
        return _result(False, f"connect to {host}:{port}: {exc.strerror or exc}", started)
    finally:
        if writer is not None:
            await _close(writer)
    return _result(True, f"connected to {host}:{port}", started)


async def probe_http(url: str, timeout: float) -> ProbeResult:
    """GET ``url`` (HTTP/1.1, ``http`` or ``https``); pass on a 2xx or 3xx status.

    Redirects are not followed (a 3xx passes, as in Consul). The output is
    the status line and the start of the body.

    Example::

        >>> asyncio.run(probe_http("http://127.0.0.1:9/", timeout=1)).ok
        False
    """
    started = time.monotonic()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return _result(False, f"not an http(s) URL: {url!r}", started)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return _result(False, f"bad port in URL {url!r}", started)
    host = parts.hostname
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: ikos-health\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii", "replace")
    if parts.scheme == "https":
        enable_asyncio_tls()  # ikosd's asyncio starts without ssl
    deadline = asyncio.get_running_loop().time() + timeout
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout_at(deadline):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=True if parts.scheme == "https" else None
            )
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
            fields = status_line.split(None, 2)
            if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
                return _result(False, f"malformed status line {_text(status_line)!r}", started)
            code = int(fields[1])
            length = await _read_headers(reader)
        body = b""
        if length != 0:
            with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, OSError):
                async with asyncio.timeout_at(deadline):
                    body = await reader.read(
                        OUTPUT_MAX if length is None else min(length, OUTPUT_MAX)
                    )
    except TimeoutError:
        return _result(False, f"GET {url}: timed out after {timeout:g}s", started)
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        # ValueError: a line longer than the stream's limit.
        return _result(False, f"GET {url}: {getattr(exc, 'strerror', None) or exc}", started)
    finally:
        if writer is not None:
            await _close(writer)
    output = status_line.decode("latin-1").strip() + ("\n" + _text(body) if body else "")
    return _result(200 <= code < 400, output, started)


async def _read_headers(reader: asyncio.StreamReader) -> int | None:
    """Skip the response headers; return Content-Length when given."""
    length: int | None = None
    for _ in range(_HTTP_HEADERS_MAX):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return length
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    raise ValueError(f"more than {_HTTP_HEADERS_MAX} header lines")


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


class TtlCheck:
    """A heartbeat check: passes while :meth:`heartbeat` was called within ``ttl`` seconds.

    It fails until the first heartbeat, as Consul's TTL checks start
    critical; the monitor's thresholds give a starting service its grace.
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._last: float | None = None
        self._note = ""

    def heartbeat(self, note: str = "") -> None:
        """Record that the service is alive now; ``note`` becomes the probe's output."""
        self._last = self._clock()
        self._note = note[:OUTPUT_MAX]

    @property
    def alive(self) -> bool:
        """Whether the last heartbeat is at most ``ttl`` seconds old."""
        return self._last is not None and self._clock() - self._last <= self.ttl

    def probe(self) -> ProbeResult:
        """The check's current result (no I/O)."""
        started = time.monotonic()
        if self._last is None:
            return _result(False, "no heartbeat yet", started)
        age = self._clock() - self._last
        text = f"last heartbeat {age:.3g}s ago (ttl {self.ttl:g}s)"
        return _result(age <= self.ttl, text + (f": {self._note}" if self._note else ""), started)


async def probe_method(call: MethodCaller, method: str, timeout: float) -> ProbeResult:
    """Ask the service to run its health method ``method`` through ``call``.

    ``call(method)`` is supplied by the manager, which asks the actor. The
    check fails when the call raises, times out or returns ``False``;
    anything else passes, its ``repr`` (or the string itself) kept as output.
    """
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout) as scope:
            result = await call(method)
    except TimeoutError as exc:
        if scope.expired():
            return _result(False, f"{method}(): timed out after {timeout:g}s", started)
        return _result(False, f"{method}(): {type(exc).__name__}: {exc}", started)
    except Exception as exc:
        return _result(False, f"{method}(): {type(exc).__name__}: {exc}", started)
    output = result if isinstance(result, str) else repr(result)
    return _result(result is not False, output, started)


# -- checks and their configuration --------------------------------------------


@dataclass(frozen=True)
class HealthCheck:
    """One health check of a service, as configured.

    ``target`` depends on ``kind``: the command (a tuple of strings, or a
    string split as a shell would) for ``exec``; ``"host:port"`` for
    ``tcp``; the URL for ``http``; ``None`` for ``ttl``; the method's name
    for ``method``. The check runs every ``interval`` seconds, each probe
    bounded by ``timeout``; ``healthy_threshold`` consecutive passes make
    it ``passing`` and ``unhealthy_threshold`` consecutive failures
    ``critical``, when ``on_failure`` says whether the manager restarts the
    daemon or only alerts. ``ttl`` (``ttl`` kind only) is the heartbeat's
    time to live. During the first ``start_period`` seconds of an
    incarnation failures do not count, until the first pass. Invalid values
    raise :class:`~ikos._errors.ConfigError`.

    Example::

        >>> HealthCheck("tcp", "127.0.0.1:5432", interval=5).port
        5432
    """

    kind: CheckKind
    target: tuple[str, ...] | str | None = None
    interval: float = 10.0
    timeout: float = 2.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 3
    on_failure: OnFailure = "alert"
    ttl: float | None = None
    start_period: float = 0.0

    def __post_init__(self) -> None:
        target = _validate_check(
            "health",
            {f: getattr(self, f) for f in _KEYS},
        )
        object.__setattr__(self, "target", target)

    @classmethod
    def from_mapping(cls, daemon: str, m: object) -> HealthCheck:
        """Build a check from a configuration table (``[health.DAEMON]`` or a list item).

        Keys are the field names; errors name the table ``health.DAEMON``,
        the key, what was expected and what was found. Unknown keys are
        logged as warnings, as the configuration's rule says.

        Example::

            >>> HealthCheck.from_mapping("net", {"kind": "exec", "target": "pgrep -x dhcpd"}).target
            ('pgrep', '-x', 'dhcpd')
        """
        table = f"health.{daemon}"
        if not isinstance(m, Mapping):
            raise ConfigError(None, table, None, "a table of check settings", m)
        for key in m:
            if key not in _KEYS:
                log.warning("[%s]: unknown key %r ignored", table, key)
        if "kind" not in m:
            raise ConfigError(None, table, "kind", "one of " + ", ".join(CHECK_KINDS))
        values = {key: m[key] if key in m else _DEFAULTS[key] for key in _KEYS}
        target = _validate_check(table, values)
        ttl = values["ttl"]
        return cls(
            kind=cast(CheckKind, values["kind"]),
            target=target,
            interval=float(cast(float, values["interval"])),
            timeout=float(cast(float, values["timeout"])),
            healthy_threshold=cast(int, values["healthy_threshold"]),
            unhealthy_threshold=cast(int, values["unhealthy_threshold"]),
            on_failure=cast(OnFailure, values["on_failure"]),
            ttl=None if ttl is None else float(cast(float, ttl)),
            start_period=float(cast(float, values["start_period"])),
        )

    @property
    def host(self) -> str:
        """For a ``tcp`` check, the host to connect to."""
        return _split_host_port(cast(str, self.target))[0]

    @property
    def port(self) -> int:
        """For a ``tcp`` check, the port to connect to."""
        return _split_host_port(cast(str, self.target))[1]

    def describe(self) -> str:
        """A short human label: ``"http http://127.0.0.1:8080/health"``."""
        if self.kind == "exec":
            return "exec " + shlex.join(cast(tuple[str, ...], self.target))
        if self.kind == "ttl":
            return f"ttl {self.ttl:g}s"
        return f"{self.kind} {self.target}"


_DEFAULTS: dict[str, object] = {
    "target": None,
    "interval": 10.0,
    "timeout": 2.0,
    "healthy_threshold": 1,
    "unhealthy_threshold": 3,
    "on_failure": "alert",
    "ttl": None,
    "start_period": 0.0,
}


def _validate_check(table: str, v: Mapping[str, object]) -> tuple[str, ...] | str | None:
    """Check the fields of a health check; return the normalised target."""

    def fail(key: str, expected: str) -> ConfigError:
        return ConfigError(None, table, key, expected, v[key])

    kind = v["kind"]
    if kind not in CHECK_KINDS:
        raise fail("kind", "one of " + ", ".join(CHECK_KINDS))
    for key in ("interval", "timeout"):
        if not _positive(v[key]):
            raise fail(key, "a positive number of seconds")
    period = v["start_period"]
    if not (_positive(period) or (_number(period) and period == 0)):
        raise fail("start_period", "a number of seconds >= 0")
    for key in ("healthy_threshold", "unhealthy_threshold"):
        n = v[key]
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= THRESHOLD_MAX:
            raise fail(key, f"an integer from 1 to {THRESHOLD_MAX}")
    if v["on_failure"] not in ON_FAILURE:
        raise fail("on_failure", "one of " + ", ".join(ON_FAILURE))
    if kind == "ttl":
        if not _positive(v["ttl"]):
            raise fail("ttl", "a positive number of seconds (required for kind ttl)")
    elif v["ttl"] is not None:
        raise fail("ttl", "no ttl: it applies to kind ttl only")
    target = v["target"]
    if kind == "exec":
        if isinstance(target, str):
            try:
                target = shlex.split(target)
            except ValueError:
                raise fail("target", "a command line a shell could split") from None
        if (
            not isinstance(target, list | tuple)
            or not target
            or not all(isinstance(a, str) and a for a in target)
        ):
            raise fail("target", "a command: a non-empty list of non-empty strings")
        return tuple(target)
    if kind == "tcp":
        try:
            _split_host_port(target)
        except ValueError:
            raise fail("target", "an address 'host:port' (port 1-65535; '[::1]:port' for IPv6)")
        return cast(str, target)
    if kind == "http":
        parts = urlsplit(target) if isinstance(target, str) else None
        try:
            ok = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)
            ok = ok and parts is not None and parts.port != 0
        except ValueError:
            ok = False
        if not ok:
            raise fail("target", "an http:// or https:// URL with a host")
        return cast(str, target)
    if kind == "method":
        if not isinstance(target, str) or not target.isidentifier():
            raise fail("target", "the name of a method of the actor")
        return target
    if target is not None:
        raise fail("target", "no target for kind ttl")
    return None


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x: object) -> bool:
    return _number(x) and cast(float, x) > 0


def _split_host_port(text: object) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` into its parts; ValueError when malformed."""
    if not isinstance(text, str):
        raise ValueError(text)
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(text)
    return host, int(port_text)


# -- the state machine ---------------------------------------------------------


@dataclass(frozen=True)
class CheckState:
    """Where one check stands: its status and its consecutive passes and failures."""

    status: HealthState = "unknown"
    passes: int = 0
    failures: int = 0


def next_check_state(
    state: CheckState, ok: bool, healthy_threshold: int, unhealthy_threshold: int
) -> CheckState:
    """The state of a check after one more probe result (a pure function).

    * a pass resets the failures; ``healthy_threshold`` consecutive passes
      make the check ``passing`` (a ``warning`` check passes again at once:
      it never stopped being passing);
    * a failure resets the passes; ``unhealthy_threshold`` consecutive
      failures make it ``critical``; before that a ``passing`` check turns
      ``warning`` while ``unknown`` and ``critical`` stay as they are.

    Example::

        >>> s = CheckState()
        >>> for ok in (True, False, False, False):
        ...     s = next_check_state(s, ok, 1, 3)
        ...     print(s.status)
        passing
        warning
        warning
        critical
    """
    if ok:
        passes = state.passes + 1
        status = state.status
        if passes >= healthy_threshold or status == "warning":
            status = "passing"
        return CheckState(status, passes, 0)
    failures = state.failures + 1
    status = state.status
    if failures >= unhealthy_threshold:
        status = "critical"
    elif status == "passing":
        status = "warning"
    return CheckState(status, 0, failures)


def worst(statuses: Sequence[str]) -> HealthState:
    """The status of a service from its checks' statuses: the worst one.

    ``critical`` beats ``warning``, which beats ``unknown``, which beats
    ``passing``; no checks at all is ``unknown``.
    """
    for status in _SEVERITY:
        if status in statuses:
            return status
    return "unknown"


@dataclass(frozen=True)
class CheckStatus:
    """One check of a service as it stands, with its last probe result."""

    check: HealthCheck
    state: CheckState
    last: ProbeResult | None

    @property
    def status(self) -> HealthState:
        """The check's status (``unknown|passing|warning|critical``)."""
        return self.state.status


@dataclass(frozen=True)
class HealthStatus:
    """The health of one service: its overall ``status`` and each check's."""

    service: str
    status: HealthState
    checks: tuple[CheckStatus, ...] = field(default=())

    @property
    def restart_requested(self) -> bool:
        """Whether a ``critical`` check is configured with ``on_failure="restart"``."""
        return any(c.status == "critical" and c.check.on_failure == "restart" for c in self.checks)


class HealthMonitor:
    """Runs the checks of one service and tracks its health.

    ``call_method`` is how ``method`` checks reach the actor (supplied by
    the manager, required when there is such a check). :meth:`run_once`
    probes every check once; :meth:`run` probes each at its own interval
    until cancelled, calling ``on_change(service, old, new)`` whenever the
    service's status changes. :meth:`heartbeat` feeds the ``ttl`` checks.
    ``on_result(check, ok)``, if given, hears every probe result as it comes
    (start period included), for counting (the metrics).
    One monitor watches one incarnation: it starts ``unknown``, and each
    check's ``start_period`` runs from its creation on ``clock`` (monotonic
    seconds).

    Example::

        monitor = HealthMonitor("net/dhcp", [HealthCheck("tcp", "127.0.0.1:67")])
        task = asyncio.create_task(monitor.run(on_change=report))
        ...
        task.cancel()   # stops every probe, kills a running exec check
    """

    def __init__(
        self,
        service: str,
        checks: Sequence[HealthCheck],
        *,
        call_method: MethodCaller | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_result: OnResult | None = None,
    ) -> None:
        self.service = service
        self._on_result = on_result
        self.checks: tuple[HealthCheck, ...] = tuple(checks)
        for check in self.checks:
            if check.kind == "method" and call_method is None:
                raise ConfigError(
                    None, f"health.{service}", "kind", "a method check only on an actor", "method"
                )
        self._call_method = call_method
        self._ttl: dict[int, TtlCheck] = {
            i: TtlCheck(cast(float, c.ttl)) for i, c in enumerate(self.checks) if c.kind == "ttl"
        }
        self._states = [CheckState() for _ in self.checks]
        self._last: list[ProbeResult | None] = [None for _ in self.checks]
        self._reported: HealthState = "unknown"
        self._clock = clock
        self._started = clock()
        # checks still in their start period: failures do not count yet
        self._starting = [c.start_period > 0 for c in self.checks]

    @property
    def status(self) -> HealthState:
        """The service's current status: the worst of its checks'."""
        return worst([s.status for s in self._states])

    def snapshot(self) -> HealthStatus:
        """The service's status with every check's state and last result."""
        return HealthStatus(
            self.service,
            self.status,
            tuple(
                CheckStatus(check, state, last)
                for check, state, last in zip(self.checks, self._states, self._last, strict=True)
            ),
        )

    def heartbeat(self, note: str = "") -> None:
        """Record a heartbeat for every ``ttl`` check of the service."""
        for ttl in self._ttl.values():
            ttl.heartbeat(note)

    async def run_once(self) -> HealthStatus:
        """Probe every check once (concurrently), update the states, return the status."""
        results = await asyncio.gather(*(self._probe(i) for i in range(len(self.checks))))
        for i, result in enumerate(results):
            self._record(i, result)
        return self.snapshot()

    async def run(self, on_change: OnChange) -> None:
        """Probe each check every ``interval`` seconds until cancelled.

        Calls ``on_change(service, old, new)`` (awaited when it returns an
        awaitable) whenever the service's status changes; a callback that
        raises is logged and the checks go on. Cancelling the task running
        this stops every probe (killing a running ``exec`` command) and
        raises :class:`asyncio.CancelledError` as usual. Returns at once when
        the service has no checks.
        """
        async with asyncio.TaskGroup() as group:
            for i in range(len(self.checks)):
                group.create_task(self._check_loop(i, on_change))

    async def _check_loop(self, index: int, on_change: OnChange) -> None:
        loop = asyncio.get_running_loop()
        interval = self.checks[index].interval
        while True:
            started = loop.time()
            self._record(index, await self._probe(index))
            new = self.status
            if new != self._reported:
                old, self._reported = self._reported, new
                try:
                    outcome = on_change(self.service, old, new)
                    if inspect.isawaitable(outcome):
                        await outcome
                except Exception:
                    log.exception("health on_change callback failed for %s", self.service)
            await asyncio.sleep(max(0.0, started + interval - loop.time()))

    def in_start_period(self, index: int) -> bool:
        """Whether check ``index`` is still in its start period (no pass yet, not over)."""
        if self._starting[index] and (
            self._clock() - self._started >= self.checks[index].start_period
        ):
            self._starting[index] = False
        return self._starting[index]

    def _record(self, index: int, result: ProbeResult) -> None:
        check = self.checks[index]
        self._last[index] = result
        if self._on_result is not None:
            try:
                self._on_result(check, result.ok)
            except Exception:  # counting must never stop the checks
                log.exception("health on_result callback failed for %s", self.service)
        if self.in_start_period(index):
            if not result.ok:
                return  # a failure in the start period: shown, not counted
            self._starting[index] = False
        self._states[index] = next_check_state(
            self._states[index], result.ok, check.healthy_threshold, check.unhealthy_threshold
        )

    async def _probe(self, index: int) -> ProbeResult:
        check = self.checks[index]
        started = time.monotonic()
        try:
            if check.kind == "exec":
                return await probe_exec(cast(tuple[str, ...], check.target), check.timeout)
            if check.kind == "tcp":
                return await probe_tcp(check.host, check.port, check.timeout)
            if check.kind == "http":
                return await probe_http(cast(str, check.target), check.timeout)
            if check.kind == "ttl":
                return self._ttl[index].probe()
            assert self._call_method is not None
            return await probe_method(self._call_method, cast(str, check.target), check.timeout)
        except Exception as exc:
            # A probe that breaks is a failed probe, not a dead monitor.
            log.exception("health probe %s of %s failed", check.describe(), self.service)
            return _result(False, f"probe error: {type(exc).__name__}: {exc}", started)
