"""Synchronous client of ikosd's JSON control protocol (``docs/protocol.md``).

ikosctl, the Python API in plain processes and the tests talk to the manager
through :class:`ControlClient`: one JSON line out, one JSON line back, over
the instance's Unix stream socket.

Design: the client is synchronous and keeps one connection, reused across
calls and guarded by a lock, so that one thread's request and answer are
never interleaved with another's. Pipelining, which the protocol allows,
would buy a command-line client nothing and cost an id-matching reader.
Streaming verbs (``logs -f``, ``subscribe``) get a connection of their own,
so that a long stream never blocks calls. Any transport failure (timeout,
garbage, a peer that hung up) drops the connection: the next call starts on
a fresh one instead of reading the rest of a stale answer.

Unix socket addresses are limited to 107 bytes; :func:`connect_unix` and
:func:`bind_unix` reach longer paths through ``/proc/self/fd/N/NAME``, N an
``O_PATH`` descriptor of the socket's directory, rather than ``chdir``,
which would change the directory of every thread of the process.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from ikos._errors import ManagerError, ManagerUnavailable, error_for_code
from ikos.platform._paths import InstancePaths
from ikos.platform._unix import bind_unix, connect_unix

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_REQUEST_BYTES",
    "ControlClient",
    "EventStream",
    "bind_unix",
    "connect_unix",
    "take_line",
]

#: The server closes the connection on a longer request line.
MAX_REQUEST_BYTES = 1 << 20
#: Bound of one answer line; a status list of thousands of daemons fits.
MAX_ANSWER_BYTES = 64 << 20
_RECV_CHUNK = 1 << 16


def take_line(buffer: bytearray, start: int = 0) -> bytes | None:
    """Remove and return the first line of ``buffer`` (without its newline), if it has one.

    ``start``: where to look for the newline, past bytes known to hold none.
    """
    end = buffer.find(b"\n", start)
    if end < 0:
        return None
    line = bytes(buffer[:end])
    del buffer[: end + 1]
    return line


class _Connection:
    """One socket to ikosd and the bytes read from it but not yet consumed."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path
        self._buffer = bytearray()

    @classmethod
    def open(cls, path: Path, deadline: _Deadline, verb: str) -> _Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(deadline.remaining(path, verb))
            connect_unix(sock, path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            sock.close()
            raise ManagerUnavailable(
                f"no ikosd answers at {path} (is it running? use --root or $IKOS_ROOT)"
            )
        except TimeoutError:
            sock.close()
            raise deadline.expired(path, verb)
        except OSError as exc:
            sock.close()
            raise ManagerUnavailable(f"cannot connect to ikosd at {path}: {exc.strerror or exc}")
        except BaseException:
            sock.close()
            raise
        return cls(sock, path)

    def close(self) -> None:
        self.sock.close()

    def is_reusable(self) -> bool:
        """Whether the peer is still there and has sent nothing unasked for."""
        if self._buffer:
            return False
        try:
            self.sock.settimeout(0.0)
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        # Readable while idle: b"" (the peer hung up, e.g. ikosd restarted)
        # or bytes nobody asked for. Either way, start afresh.
        return False

    def send_line(self, line: bytes, deadline: _Deadline, verb: str) -> None:
        self.sock.settimeout(deadline.remaining(self.path, verb))
        try:
            self.sock.sendall(line)
        except TimeoutError:
            raise deadline.expired(self.path, verb)
        except (BrokenPipeError, ConnectionResetError):
            raise _lost_error(self.path, verb)

    def read_line(self, deadline: _Deadline | None, verb: str) -> bytes:
        """The next answer line; ``deadline`` None waits as long as it takes."""
        scanned = 0  # the bytes before this hold no newline: never rescan them
        while True:
            line = take_line(self._buffer, scanned)
            if line is not None:
                return line
            if len(self._buffer) > MAX_ANSWER_BYTES:
                raise _garbage_error(
                    self.path, verb, f"an answer line longer than {MAX_ANSWER_BYTES} bytes"
                )
            self.sock.settimeout(None if deadline is None else deadline.remaining(self.path, verb))
            try:
                chunk = self.sock.recv(_RECV_CHUNK)
            except TimeoutError:
                assert deadline is not None  # a blocking recv does not time out
                raise deadline.expired(self.path, verb)
            except ConnectionResetError:
                raise _lost_error(self.path, verb)
            if not chunk:
                raise _lost_error(self.path, verb)
            scanned = len(self._buffer)
            self._buffer += chunk


class ControlClient:
    """A synchronous client of one ikosd's control socket.

    ``paths`` locates the instance (default: :meth:`InstancePaths.resolve`,
    that is ``$IKOS_ROOT`` else the user's default instance); ``timeout``
    bounds every call unless the call gives its own. The connection is opened
    on the first call and reused; the client is safe to share between
    threads (calls are serialised) and is a context manager that closes it.

    >>> with ControlClient(InstancePaths.for_root("/srv/ikos")) as client:  # doctest: +SKIP
    ...     client.call("status", {"names": ["echo"]})
    [{'name': 'echo', 'state': 'running', ...}]

    Errors: an ``ok: false`` answer raises the exception of its code
    (:func:`ikos._errors.error_for_code`, e.g. ``NoSuchDaemon``); no socket or
    nobody listening raises ``ManagerUnavailable``; no answer in time raises
    ``ManagerError`` with code ``"timeout"``; an answer that is not a protocol
    answer raises code ``"bad_response"``; a peer that hangs up before
    answering raises code ``"connection_lost"``.
    """

    def __init__(self, paths: InstancePaths | None = None, timeout: float = 30.0) -> None:
        self.paths = paths if paths is not None else InstancePaths.resolve()
        self.timeout = timeout
        self._lock = threading.Lock()
        self._connection: _Connection | None = None
        self._ids = itertools.count(1)

    @property
    def socket_path(self) -> Path:
        """The control socket this client talks to."""
        return self.paths.control_socket

    def call(
        self, verb: str, args: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Send one request and return its ``result``.

        ``timeout`` (seconds, default the client's) bounds the whole call:
        waiting for another thread's call, connecting, sending and reading.

        >>> client.call("kill", {"name": "echo", "signal": "SIGUSR1"})  # doctest: +SKIP
        {'name': 'echo', 'pid': 1234, 'signal': 10}
        """
        deadline = _Deadline(self.timeout if timeout is None else timeout)
        request_id = next(self._ids)
        line = _encode_request(request_id, verb, args)
        if not self._lock.acquire(timeout=deadline.remaining(self.socket_path, verb)):
            raise deadline.expired(self.socket_path, verb)
        try:
            connection = self._connect(deadline, verb)
            try:
                connection.send_line(line, deadline, verb)
                raw = connection.read_line(deadline, verb)
                answer = _decode_answer(raw, request_id, verb, connection.path)
                if "event" in answer:
                    raise _garbage_error(connection.path, verb, "an event for a plain request")
            except BaseException:
                self._drop()
                raise
        finally:
            self._lock.release()
        return _result(answer, verb, self.socket_path)

    def stream(
        self,
        verb: str,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> EventStream:
        """Send a streaming request and return an iterator over its events.

        The server answers ``{"id", "event": ...}`` lines, each yielded, until
        ``{"id", "ok": true, "result": ...}`` ends the stream (its result is
        then :attr:`EventStream.result`); ``ok: false`` raises as
        :meth:`call` does. The stream has its own connection, closed when it
        ends or when :meth:`EventStream.close` is called (it is a context
        manager too). ``timeout`` (default the client's) bounds connecting and
        the wait for the first line; ``idle_timeout`` bounds each later wait,
        None meaning none: a followed log may rightly stay quiet for hours.

        >>> for line in client.stream("logs", {"name": "echo", "follow": True}):  # doctest: +SKIP
        ...     print(line)
        """
        deadline = _Deadline(self.timeout if timeout is None else timeout)
        request_id = next(self._ids)
        line = _encode_request(request_id, verb, args)
        connection = _Connection.open(self.socket_path, deadline, verb)
        try:
            connection.send_line(line, deadline, verb)
        except BaseException:
            connection.close()
            raise
        return EventStream(connection, request_id, verb, deadline, idle_timeout)

    def close(self) -> None:
        """Close the connection; a later call opens a new one."""
        with self._lock:
            self._drop()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connect(self, deadline: _Deadline, verb: str) -> _Connection:
        if self._connection is not None and not self._connection.is_reusable():
            self._drop()
        if self._connection is None:
            self._connection = _Connection.open(self.socket_path, deadline, verb)
        return self._connection

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class EventStream(Iterator[Any]):
    """The events of one streaming request; see :meth:`ControlClient.stream`."""

    def __init__(
        self,
        connection: _Connection,
        request_id: int,
        verb: str,
        first_deadline: _Deadline,
        idle_timeout: float | None,
    ) -> None:
        self._connection: _Connection | None = connection
        self._id = request_id
        self._verb = verb
        self._deadline: _Deadline | None = first_deadline
        self._idle_timeout = idle_timeout
        #: The final answer's ``result``, once the stream has ended.
        self.result: Any = None

    def __next__(self) -> Any:
        connection = self._connection
        if connection is None:
            raise StopIteration
        try:
            raw = connection.read_line(self._deadline, self._verb)
            answer = _decode_answer(raw, self._id, self._verb, connection.path)
            if "event" in answer:
                idle = self._idle_timeout
                self._deadline = None if idle is None else _Deadline(idle)
                return answer["event"]
            self.result = _result(answer, self._verb, connection.path)
        except BaseException:
            self.close()
            raise
        self.close()
        raise StopIteration

    def close(self) -> None:
        """Stop listening: closes the stream's connection."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _encode_request(request_id: int, verb: str, args: Mapping[str, Any] | None) -> bytes:
    request = {"id": request_id, "verb": verb, "args": dict(args or {})}
    try:
        text = json.dumps(request, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ManagerError(
            f"cannot send '{verb}': its arguments are not JSON ({exc})", "bad_request"
        )
    line = text.encode("utf-8") + b"\n"
    if len(line) > MAX_REQUEST_BYTES:
        raise ManagerError(
            f"cannot send '{verb}': the request is {len(line)} bytes, "
            f"more than the protocol's {MAX_REQUEST_BYTES}",
            "bad_request",
        )
    return line


def _decode_answer(line: bytes, request_id: int, verb: str, path: Path) -> dict[str, Any]:
    """Parse and check one answer line (not its outcome)."""
    try:
        answer = json.loads(line)
    except ValueError:
        raise _garbage_error(path, verb, f"not JSON: {_excerpt(line)}")
    if not isinstance(answer, dict):
        raise _garbage_error(path, verb, f"not a JSON object: {_excerpt(line)}")
    if answer.get("id") != request_id:
        raise _garbage_error(
            path, verb, f"answer id {answer.get('id')!r} for request id {request_id}"
        )
    if "event" not in answer and not isinstance(answer.get("ok"), bool):
        raise _garbage_error(path, verb, f"no boolean 'ok': {_excerpt(line)}")
    return answer


def _result(answer: Mapping[str, Any], verb: str, path: Path) -> Any:
    """The result of a checked final answer, or its error raised."""
    if answer["ok"]:
        return answer.get("result")
    error = answer.get("error")
    if (
        not isinstance(error, dict)
        or not isinstance(error.get("code"), str)
        or not isinstance(error.get("message"), str)
    ):
        raise _garbage_error(path, verb, f"a failure without code and message: {error!r}")
    raise error_for_code(error["code"], error["message"])


class _Deadline:
    """A point in time a wait must not pass, and the limit it came from."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.at = time.monotonic() + limit

    def remaining(self, path: Path, verb: str) -> float:
        """Seconds left, or the timeout error when there are none."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.expired(path, verb)
        return left

    def expired(self, path: Path, verb: str) -> ManagerError:
        return ManagerError(
            f"ikosd at {path} did not answer '{verb}' within {self.limit:g}s", "timeout"
        )


def _lost_error(path: Path, verb: str) -> ManagerError:
    return ManagerError(
        f"ikosd at {path} closed the connection before answering '{verb}'", "connection_lost"
    )


def _garbage_error(path: Path, verb: str, detail: str) -> ManagerError:
    return ManagerError(
        f"ikosd at {path} sent a malformed answer to '{verb}': {detail}", "bad_response"
    )


def _excerpt(line: bytes, limit: int = 80) -> str:
    text = line.decode("utf-8", "replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")
