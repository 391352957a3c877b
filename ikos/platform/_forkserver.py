"""The fork server: every daemon process starts as a fork of this one.

The manager is an asyncio program with worker threads, and forking a
threaded process is unsafe (locks held by other threads stay locked in the
child). So at start-up the manager launches this small single-threaded
server with a fresh interpreter, has it import ikos and the actor modules
once (``preload``), freezes the heap against copy-on-write, and from then on
asks it to fork. The server double-forks: the intermediate child exits at
once, so the daemon is re-parented to the manager, which is a child
subreaper; the manager then owns a pidfd for it and collects its exit status
itself, exactly as if it had forked the daemon directly. What runs in the
daemon is named by an entry point (``"package.module:function"``) taking
the request's payload and the file descriptors passed along with it, so
this layer knows nothing of actors or executables.

Requests and answers are pickles on a SOCK_SEQPACKET socket pair, with
descriptors passed as SCM_RIGHTS; both ends are the same trusted program.

**The gate.** A daemon does not run its entry point as soon as it exists:
it first blocks on a *gate*, a pipe whose write end only the manager holds.
The manager learns the PID, records it durably (``on_forked``), and only
then opens the gate. If the manager dies before that, the gate's write end
closes with it and the daemon exits without running a line of user code, so
a crash of the manager at any moment never leaves an unrecorded copy of a
daemon running.

**Death of the server.** If the server dies or stops answering (a request
has a deadline), every pending request fails with a :class:`SpawnError`
that says so, the server is killed if it still runs, and the next request
starts a new one with the same path and preloaded modules.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import importlib
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ikos._errors import SpawnError
from ikos.platform._process import disown, own

log = logging.getLogger("ikos.forkserver")

MAX_REQUEST = 4 * 1024 * 1024
_PRIVATE_ENV = frozenset({"NOTIFY_SOCKET", "INVOCATION_ID"})
MAX_FDS = 16
#: Seconds a request may wait for its answer before the server is declared hung.
REQUEST_TIMEOUT = 30.0


def resolve_entry(path: str) -> Any:
    """Import ``"package.module:function"`` and return the function."""
    module_name, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# -- the server process ------------------------------------------------------


def _recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    fds = array.array("i")
    data, ancdata, _flags, _ = sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - (len(payload) % fds.itemsize)
            fds.frombytes(payload[:usable])
    if not data:
        return None, list(fds)
    return pickle.loads(data), list(fds)


def _spawn(sock: socket.socket, req: dict[str, Any], fds: list[int]) -> int:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # intermediate: fork the daemon and vanish
        try:
            os.close(r)
            sock.close()
            gpid = os.fork()
            if gpid == 0:
                os.close(w)
                _become_daemon(req, fds)
            os.write(w, str(gpid).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        data = b""
        while True:
            chunk = os.read(r, 64)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not data:
        raise OSError("the intermediate process failed to fork")
    return int(data)


def _wait_gate(fds: list[int]) -> list[int]:
    """Block until the manager opens the gate (the last fd); exit at once if it never does."""
    gate = fds[-1]
    try:
        opened = os.read(gate, 1)
    except OSError:
        opened = b""
    if not opened:
        os._exit(0)  # the manager died before recording us: never run user code
    os.close(gate)
    return fds[:-1]


def _become_daemon(req: dict[str, Any], fds: list[int]) -> None:
    code = 127
    try:
        if req.get("gate"):
            fds = _wait_gate(fds)
        # the entry point starts its own session (exec_in_child does, as systemd's
        # units get one); doing it here would make a second setsid fail with EPERM
        # SIGPIPE stays ignored, as in any Python process: a write to a peer that
        # died must be an EPIPE error, not the death of the actor (an exec resets
        # every disposition itself)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        gc.unfreeze()
        entry = resolve_entry(req["entry"])
        entry(req["payload"], fds)
    except BaseException as exc:
        try:
            os.write(2, f"ikos fork server: {req.get('entry')} failed: {exc!r}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


def serve(fd: int) -> None:
    """Run the fork server on the inherited socket ``fd`` until the manager closes it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    while True:
        try:
            req, fds = _recv(sock)
        except (ConnectionResetError, EOFError):
            return
        if req is None:
            return
        answer: dict[str, Any] = {"id": req.get("id")}
        try:
            op = req["op"]
            if op == "init":
                for p in reversed(req.get("sys_path", [])):
                    if p not in sys.path:
                        sys.path.insert(0, p)
                os.environ.update(req.get("environ", {}))
                answer["ok"] = True
            elif op == "preload":
                failed = {}
                for name in req.get("modules", []):
                    try:
                        importlib.import_module(name)
                    except Exception as exc:  # reported, and the spawn will fail clearly
                        failed[name] = repr(exc)
                gc.collect()
                gc.freeze()
                answer["ok"] = True
                answer["failed"] = failed
            elif op == "spawn":
                # import in the server, once: every later fork finds them loaded
                resolve_entry(req["entry"])
                for name in req.get("modules", []):
                    importlib.import_module(name)
                answer["pid"] = _spawn(sock, req, fds)
            else:
                answer["error"] = f"unknown op {op!r}"
        except Exception as exc:
            answer["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            for f in fds:
                try:
                    os.close(f)
                except OSError:
                    pass
        try:
            sock.send(pickle.dumps(answer))
        except OSError:  # the manager is gone: so is the reason to serve
            return


# -- the manager's side ------------------------------------------------------


class ForkServer:
    """The manager's handle on its fork server (asyncio; one request per spawn).

    ``environ`` is added to the server's environment (and so to every
    process it forks that does not exec).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._sock: socket.socket | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._environ = dict(environ or {})
        self._sys_path: list[str] = []
        self._preload: list[str] = []
        self._starting: asyncio.Future[None] | None = None
        self._launched = False
        self._launching: asyncio.Task[None] | None = None
        #: How many times the server died or hung and was replaced.
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self._sock is not None and self.process is not None and self.process.poll() is None

    async def start(
        self, sys_path: Sequence[str], preload: Sequence[str], *, lazily: bool = False
    ) -> dict[str, str]:
        """Launch the server and preload modules; returns modules that failed to import.

        With ``lazily``, only remember how: the first :meth:`spawn` launches it
        (and logs what failed to preload). A tree of executables started by
        posix_spawn never needs it, and ikosd answers sooner without waiting
        for a second interpreter to import ikos and the actors' modules.
        """
        self._sys_path = list(sys_path)
        self._preload = list(preload)
        self._loop = asyncio.get_running_loop()
        if lazily:
            return {}
        self._launched = True
        return await self._launch()

    async def _launch(self) -> dict[str, str]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ours, theirs):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_REQUEST)
        # what ikosd's own service manager gave it is not for the daemons
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in _PRIVATE_ENV and not k.startswith(("LISTEN_", "WATCHDOG_"))
        }
        env.update(self._environ)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ikos.platform._forkserver", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        own(self.process.pid)  # ours to reap (Popen does), not the orphan reaper's
        theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(ours.fileno(), self._on_readable)
        await self._request({"op": "init", "sys_path": self._sys_path}, [])
        answer = await self._request({"op": "preload", "modules": self._preload}, [])
        return dict(answer.get("failed", {}))

    def launch_soon(self) -> None:
        """Launch the server in the background after a lazy :meth:`start` (actors will need it).

        Spawns wait for it as for any launch; ikosd does not, so it answers
        while the server imports the actors' modules.
        """
        assert self._loop is not None, "start() first"
        self._launching = self._loop.create_task(self._ensure_running())
        self._launching.add_done_callback(_launch_done)

    async def _ensure_running(self) -> None:
        """Replace a server that died (or was declared hung) before sending a request."""
        if self.running:
            return
        if self._starting is not None:
            await asyncio.shield(self._starting)
            return
        assert self._loop is not None, "the fork server was never started"
        self._starting = self._loop.create_future()
        try:
            self._discard()
            if self._launched:
                self.restarts += 1
                log.warning("starting a new fork server (replacement number %d)", self.restarts)
            self._launched = True
            failed = await self._launch()
            for mod, err in failed.items():
                log.warning("fork server could not preload %s: %s", mod, err)
        except BaseException as exc:
            self._discard()
            self._starting.set_exception(SpawnError("fork server", None, f"cannot start: {exc}"))
            self._starting.exception()  # retrieved: a later caller gets its own error
            raise
        else:
            self._starting.set_result(None)
        finally:
            self._starting = None

    def _on_readable(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._fail_all(self._death_reason())
                self._discard()
                return
            try:
                answer = pickle.loads(data)
                rid = answer.get("id")
            except Exception:
                log.error("the fork server sent an unreadable answer: replacing it")
                self._fail_all("the fork server sent an unreadable answer")
                self._discard()
                return
            fut = self._waiting.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(answer)

    def _death_reason(self) -> str:
        proc = self.process
        code = None
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(timeout=0.2)
        if code is None:
            return "the fork server closed its socket"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"the fork server was killed by {name}"
        return f"the fork server exited with status {code}"

    def _fail_all(self, reason: str) -> None:
        if self._waiting:
            log.error("%s: failing %d pending requests", reason, len(self._waiting))
        else:
            log.error("%s", reason)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(_ServerGone(reason))
        self._waiting.clear()

    def _close_socket(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(ValueError, RuntimeError):
                    self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _discard(self) -> None:
        """Forget the current server: close the socket, kill and reap the process."""
        self._close_socket()
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            disown(proc.pid)

    async def _request(
        self, req: dict[str, Any], fds: Sequence[int], timeout: float = REQUEST_TIMEOUT
    ) -> dict[str, Any]:
        if self._sock is None or self._loop is None:
            raise _ServerGone("the fork server is not running")
        rid = next(self._ids)
        req["id"] = rid
        data = pickle.dumps(req)
        if len(data) > MAX_REQUEST:
            raise ValueError(f"spawn request of {len(data)} bytes exceeds {MAX_REQUEST}")
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._waiting[rid] = fut
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sock = self._sock
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        sock.sendmsg([data], anc)
                        break
                    except BlockingIOError:
                        writable = self._loop.create_future()
                        self._loop.add_writer(sock.fileno(), writable.set_result, None)
                        try:
                            await writable
                        finally:
                            self._loop.remove_writer(sock.fileno())
                    except OSError as exc:
                        raise _ServerGone(f"the fork server is gone ({exc})") from None
                return await fut
        except TimeoutError:
            if self._sock is sock:
                log.error("the fork server did not answer within %gs: replacing it", timeout)
                self._fail_all(f"the fork server did not answer within {timeout:g}s")
                self._discard()
            raise _ServerGone(f"the fork server did not answer within {timeout:g}s") from None
        finally:
            self._waiting.pop(rid, None)

    async def spawn(
        self,
        daemon: str,
        entry: str,
        payload: Any,
        fds: Sequence[int],
        modules: Sequence[str] = (),
        *,
        on_forked: Callable[[int], None] | None = None,
    ) -> int:
        """Fork a daemon running ``entry(payload, fds)``; return its PID.

        The daemon waits at the gate until ``on_forked(pid)`` has returned
        (record it there); if ``on_forked`` raises, the daemon exits without
        running ``entry`` and the error propagates.
        """
        try:
            await self._ensure_running()
        except SpawnError as exc:
            raise SpawnError(daemon, None, exc.reason) from None
        gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                answer = await self._request(
                    {
                        "op": "spawn",
                        "entry": entry,
                        "payload": payload,
                        "modules": list(modules),
                        "gate": True,
                    },
                    [*fds, gate_r],
                )
            finally:
                os.close(gate_r)
            if "error" in answer:
                raise SpawnError(
                    daemon, None, f"the fork server could not start it: {answer['error']}"
                )
            pid = int(answer["pid"])
            if on_forked is not None:
                on_forked(pid)
            os.write(gate_w, b"1")
            return pid
        except _ServerGone as exc:
            raise SpawnError(daemon, None, str(exc)) from None
        finally:
            os.close(gate_w)

    def close(self) -> None:
        """Close the socket (the server exits on EOF) and reap the server."""
        if self._launching is not None and not self._launching.done():
            self._launching.cancel()  # a launch cut short discards what it started
        self._close_socket()
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            disown(self.process.pid)
            self.process = None


def _launch_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning(
            "the fork server did not start: %s (the next spawn tries again)", task.exception()
        )


class _ServerGone(OSError):
    """The fork server died, hung or never started (turned into a SpawnError per daemon)."""


if __name__ == "__main__":
    serve(int(sys.argv[1]))
