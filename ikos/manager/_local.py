"""``with ikos.local() as system:``: a private ikosd for a script or a test.

The block starts a real ikosd (the same manager, supervision, restarts and
recovery as ``ikosd``; metrics off) as a child process on a temporary root,
waits for its ``READY=1`` (sd_notify, on a socket of the block's own), and
on exit shuts it down in order and removes the root, after an exception in
the block too. :mod:`ikos.manager._private_ikosd` is the child's side.

The private ikosd must not outlive the process that opened the block, even
one killed with SIGKILL. It holds the read end of a pipe whose only write
end stays in the user's process: when that process is gone, however it
died, the kernel closes the write end, the read end sees end of file, and
the private ikosd shuts down as on SIGTERM and removes the temporary root.
``PR_SET_PDEATHSIG`` was rejected: it fires when the *thread* that started
the child ends, so a block opened in a worker thread would lose its ikosd
with that thread. The pipe's limit is the opposite one: a child forked
(without exec) by the user's process while the block is open inherits the
write end and keeps the private ikosd alive until it exits too.

Rejected: an in-process manager on a thread of the user's process. ikosd
needs the main thread's signal handling (SIGCHLD, SIGTERM) and makes its
process a child subreaper so that every daemon's exit status reaches it;
doing that inside a user's program would change how *their* process
handles signals and children (a notebook kernel's, a test runner's), and a
crash in their code would take the manager down with the daemons'
supervision. A child process costs a few hundred milliseconds at start and
keeps their process as it was.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from ikos._codec import encode
from ikos._errors import ManagerError, ManagerUnavailable
from ikos.actors._carried import carry, source_directories
from ikos.actors._context import pop_local_root, push_local_root
from ikos.actors._ref import ActorRef
from ikos.platform._notify import NotifySocket
from ikos.supervision._client import spawn, terminate_child
from ikos.supervision._spec import AnySpec, Child, Supervisor, validate_tree

#: Seconds the private ikosd may take to be ready, and to stop (on a loaded machine).
START_TIMEOUT = 120.0
STOP_TIMEOUT = 120.0
#: The name of the root supervisor when the block brings no tree.
LOCAL_ROOT_NAME = "local"
TREE_FILE = "local-tree.bin"
STDERR_FILE = "local-ikosd.err"


def carried_tree(tree: Supervisor) -> Supervisor:
    """``tree`` with each actor class (and its arguments) carried by value or reference.

    The private ikosd runs in another interpreter, where a class of the
    caller's ``__main__`` does not exist: every ``Child`` whose actor is a
    class gets a :class:`CarriedActor` instead, loaded only by the actor's
    process. Children naming ``"module:Class"`` are left as they are.
    """
    import dataclasses

    def convert(spec: AnySpec) -> AnySpec:
        if isinstance(spec, Supervisor):
            return dataclasses.replace(spec, children=tuple(convert(c) for c in spec.children))
        if isinstance(spec, Child) and isinstance(spec.actor, type):
            carried = carry(spec.actor, spec.args, spec.kwargs, name=spec.name)
            return dataclasses.replace(spec, actor=carried, args=(), kwargs={})
        return spec

    converted = convert(tree)
    assert isinstance(converted, Supervisor)
    return converted


class LocalSystem:
    """A private ikosd running while the ``with`` block is open; see the module docstring.

    Example::

        with ikos.local() as system:
            counter = system.spawn(Counter)
            assert counter.ask(1) == 1
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        tree: Supervisor | None = None,
        *,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self._given_root = Path(root).resolve() if root is not None else None
        self._tree = tree
        self._start_timeout = start_timeout
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lifeline = -1  # the write end the private ikosd watches

    @property
    def root(self) -> Path:
        """The instance's root directory (``--root`` of the private ikosd)."""
        if self._root is None:
            raise ManagerUnavailable("the local system is not running (use it in a with block)")
        return self._root

    @property
    def pid(self) -> int | None:
        """The private ikosd's PID, while it runs."""
        return self._proc.pid if self._proc is not None else None

    # -- the with block ---------------------------------------------------------------

    def __enter__(self) -> LocalSystem:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the private ikosd and wait until it is ready (ManagerError if it is not)."""
        if self._proc is not None:
            raise ManagerError("the local system is already running")
        tree = self._tree if self._tree is not None else Supervisor(LOCAL_ROOT_NAME)
        tree = carried_tree(validate_tree(tree))
        root = self._given_root or Path(tempfile.mkdtemp(prefix="ikos-local-"))
        self._root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
            tree_file = root / TREE_FILE
            fd = os.open(tree_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(encode(tree))
            self._launch(root, tree_file)
        except BaseException:
            self.close()
            raise
        push_local_root(str(root))

    def _launch(self, root: Path, tree_file: Path) -> None:
        address = f"@ikos-local-{os.getpid()}-{secrets.token_hex(8)}"
        notify = NotifySocket(address)
        read_end, self._lifeline = os.pipe2(os.O_CLOEXEC)
        package_parent = str(Path(__file__).resolve().parents[2])
        pythonpath = [package_parent, *source_directories()]
        env = {
            **os.environ,
            "NOTIFY_SOCKET": address,
            "PYTHONPATH": os.pathsep.join(dict.fromkeys(pythonpath)),
        }
        argv = [sys.executable, "-m", "ikos.manager._private_ikosd", "--root", str(root)]
        argv += ["--tree-file", str(tree_file), "--lifeline", str(read_end)]
        if self._given_root is None:
            argv.append("--remove-root")
        try:
            with open(root / STDERR_FILE, "wb") as err:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=env,
                    pass_fds=[read_end],
                    # Ctrl-C reaches the user's process only: its with block then
                    # shuts the system down in order
                    start_new_session=True,
                )
            self._wait_ready(notify)
        finally:
            os.close(read_end)
            notify.close()

    def _wait_ready(self, notify: NotifySocket) -> None:
        """Until the private ikosd itself (the kernel's credentials say who sent it)
        notifies ``READY=1``; anyone may send to an abstract socket."""
        assert self._proc is not None and self._root is not None
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([notify], [], [], 0.1)
            while ready and (msg := notify.recv()) is not None:
                if msg.pid == self._proc.pid and msg.fields.get("READY") == "1":
                    return
            if self._proc.poll() is not None:
                raise ManagerError(
                    f"the local ikosd exited with status {self._proc.returncode} before it "
                    f"was ready: {self._stderr_tail()}"
                )
        raise ManagerError(
            f"the local ikosd was not ready within {self._start_timeout:g} s: "
            + self._stderr_tail()
        )

    def _stderr_tail(self) -> str:
        assert self._root is not None
        try:
            text = (self._root / STDERR_FILE).read_text(errors="replace").strip()
        except OSError:
            text = ""
        return text[-2000:] or "(nothing on its stderr)"

    def close(self) -> None:
        """Shut the private ikosd down in order, wait for it, remove a temporary root."""
        if self._root is not None:
            pop_local_root(str(self._root))
        if self._lifeline >= 0:
            os.close(self._lifeline)  # end of file for the private ikosd: it shuts down
            self._lifeline = -1
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()  # its daemons are its children's: its recovery is gone with it
                proc.wait()
        if self._given_root is None and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
        self._root = None

    # -- what a script does with it ----------------------------------------------------

    def spawn(
        self, actor_class: type, *args: Any, name: str | None = None, **kwargs: Any
    ) -> ActorRef:
        """``ikos.spawn`` on this system."""
        return spawn(actor_class, *args, name=name, root=self.root, **kwargs)

    def ref(self, name: str) -> ActorRef:
        """A reference to the actor ``name`` of this system."""
        return ActorRef(name, root=self.root)

    def stop(self, name: str) -> None:
        """Stop the spawned actor ``name`` and remove it (``ikos.terminate_child``)."""
        terminate_child(name, root=self.root)


def local(
    root: str | os.PathLike[str] | None = None,
    tree: Supervisor | None = None,
    *,
    start_timeout: float = START_TIMEOUT,
) -> LocalSystem:
    """A small ikos system for a script or a test, without a separate ikosd.

    ``with ikos.local() as system:`` starts a private ikosd on a temporary
    root (or ``root``, which is then kept), running ``tree`` if given (its
    actor classes may live in ``__main__``), and stops it when the block
    ends. Inside the block ``ikos.spawn`` without ``root`` uses it.
    """
    return LocalSystem(root, tree, start_timeout=start_timeout)
