"""The public names of ``ikos`` and its exception tree, pinned.

Changing what ``import ikos`` offers is a decision, not an accident: adding
or removing a name means editing the literal list below. Errors cross
process boundaries (an actor's failure is raised again in the asker), so
each must survive pickling with its attributes, also through a separate
interpreter.
"""

from __future__ import annotations

import importlib
import pickle
import pkgutil
import re
import subprocess
import sys

import pytest

import ikos
import ikos._errors

PUBLIC_NAMES = [
    "Actor",
    "ActorCrashed",
    "ActorDeadError",
    "ActorError",
    "ActorRef",
    "AskTimeout",
    "AuthenticationError",
    "Backoff",
    "Child",
    "ConfigError",
    "Down",
    "Exec",
    "IkosError",
    "LocalSystem",
    "MailboxFull",
    "ManagerError",
    "ManagerUnavailable",
    "MessageTooLarge",
    "MethodRefused",
    "NoSuchDaemon",
    "PermissionDenied",
    "Ray",
    "SpawnError",
    "SpecError",
    "Supervisor",
    "Timer",
    "UpgradeFailed",
    "__version__",
    "local",
    "run",
    "spawn",
    "start_child",
    "terminate_child",
    "upgrade",
]

# Each error and the parents it must have, as drawn in ikos/_errors.py.
HIERARCHY = {
    "IkosError": (Exception,),
    "ConfigError": (ikos.IkosError,),
    "SpecError": (ikos.ConfigError,),
    "ActorError": (ikos.IkosError,),
    "ActorDeadError": (ikos.ActorError,),
    "ActorCrashed": (ikos.ActorError,),
    "AskTimeout": (ikos.ActorError, TimeoutError),
    "MailboxFull": (ikos.ActorError,),
    "MessageTooLarge": (ikos.ActorError,),
    "MethodRefused": (ikos.ActorError, AttributeError),
    "AuthenticationError": (ikos.IkosError,),
    "SpawnError": (ikos.IkosError,),
    "ManagerError": (ikos.IkosError,),
    "ManagerUnavailable": (ikos.ManagerError,),
    "NoSuchDaemon": (ikos.ManagerError,),
    "PermissionDenied": (ikos.ManagerError,),
    "UpgradeFailed": (ikos.ManagerError,),
}


def test_public_names_are_pinned():
    assert ikos.__all__ == PUBLIC_NAMES
    assert sorted(set(ikos.__all__)) == ikos.__all__
    for name in ikos.__all__:
        assert hasattr(ikos, name), name


def test_every_public_error_is_in_the_tree():
    errors = sorted(
        name
        for name in ikos.__all__
        if isinstance(getattr(ikos, name), type) and issubclass(getattr(ikos, name), BaseException)
    )
    assert errors == sorted(HIERARCHY)
    for name, parents in HIERARCHY.items():
        cls = getattr(ikos, name)
        assert issubclass(cls, ikos.IkosError), name
        for parent in parents:
            assert issubclass(cls, parent), f"{name} should subclass {parent.__name__}"
        assert name in ikos._errors.__doc__, f"{name} is missing from the drawn tree"


def test_no_error_class_hides_outside_the_tree():
    defined = [
        obj
        for obj in vars(ikos._errors).values()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    ]
    assert defined
    for cls in defined:
        assert issubclass(cls, ikos.IkosError), cls


def all_error_classes() -> set[type[ikos.IkosError]]:
    """Every subclass of IkosError in the package, once every ikos module is imported."""
    for info in pkgutil.walk_packages(ikos.__path__, "ikos."):
        importlib.import_module(info.name)
    found: set[type[ikos.IkosError]] = set()
    todo = [ikos.IkosError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("ikos.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def drawn_tree() -> dict[str, str | None]:
    """The tree drawn in ``ikos/_errors.py``'s docstring: each class and its drawn parent."""
    doc = ikos._errors.__doc__ or ""
    drawing = doc[doc.index("    IkosError\n") :]
    parents: dict[str, str | None] = {}
    stack: list[str] = []
    for line in drawing.splitlines():
        found = re.match(r"^    ((?:[│ ]   )*)(├── |└── )?([A-Za-z]+)\b", line)
        if found is None or (found.group(2) is None and found.group(1)):
            continue  # a blank line, or a description continued on the next line
        depth = len(found.group(1)) // 4 + (1 if found.group(2) else 0)
        name = found.group(3)
        del stack[depth:]
        assert name not in parents, f"{name} is drawn twice"
        parents[name] = stack[-1] if stack else None
        stack.append(name)
    return parents


def test_the_drawn_tree_has_every_error_of_the_package_under_its_parent():
    classes = all_error_classes() | {ikos.IkosError}
    drawn = drawn_tree()
    assert drawn["IkosError"] is None
    assert sorted(drawn) == sorted({c.__name__ for c in classes}), "draw every class, once"
    for cls in classes - {ikos.IkosError}:
        bases = {b.__name__ for b in cls.__mro__[1:] if issubclass(b, ikos.IkosError)}
        parent = drawn[cls.__name__]
        assert parent in bases and parent == cls.__bases__[0].__name__, (cls, parent)


def test_daemon_exists_is_one_class_found_again_from_its_code():
    import ikos.daemon

    assert ikos.daemon.DaemonExists is ikos._errors.DaemonExists
    err = ikos._errors.error_for_code("daemon_exists", str(ikos._errors.DaemonExists("web")))
    assert type(err) is ikos._errors.DaemonExists and err.name == "web"
    assert ikos._errors.error_for_code("no_such_daemon", "x").code == "no_such_daemon"


def samples() -> list[ikos.IkosError]:
    return [
        ikos.IkosError("plain"),
        ikos.ConfigError("/etc/ikos/ikos.toml", "actors.echo", "restart", "one of ...", "x"),
        ikos.SpecError("root/workers/echo", "restart", "one of permanent, ...", "sometimes"),
        ikos.ActorError("echo", "cannot connect"),
        ikos.ActorDeadError("echo", "stopped before answering"),
        ikos.ActorCrashed("echo", "receive raised ValueError: x", "ValueError", "Traceback..."),
        ikos.AskTimeout("echo", "no reply within 0.5 s"),
        ikos.MailboxFull("echo", "mailbox full: the send timed out"),
        ikos.MessageTooLarge("echo", 100_000, 65536),
        ikos.MethodRefused("counter", "_secret", "private (the name starts with '_')"),
        ikos.AuthenticationError("the peer failed the HMAC challenge"),
        ikos.SpawnError("netd", "user", "no such user 'nobody2'"),
        ikos.ManagerError("refused", "timeout"),
        ikos.ManagerUnavailable("no manager at /run/ikos/ikosd.sock"),
        ikos.NoSuchDaemon("no daemon named 'ech'"),
        ikos.PermissionDenied("uid 1000 may only read"),
        ikos.UpgradeFailed("echo", "actor 'echo' was not upgraded: set_state raised", "tb"),
    ]


def attributes(err: BaseException) -> dict[str, object]:
    return {k: v for k, v in vars(err).items() if not k.startswith("__")}


def test_samples_cover_every_error():
    assert sorted(type(e).__name__ for e in samples()) == sorted(HIERARCHY)


@pytest.mark.parametrize("err", samples(), ids=lambda e: type(e).__name__)
def test_errors_round_trip_through_pickle_with_their_attributes(err):
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        back = pickle.loads(pickle.dumps(err, protocol=protocol))
        assert type(back) is type(err)
        assert back.args == err.args
        assert str(back) == str(err)
        assert attributes(back) == attributes(err)


def test_error_attributes_users_act_on():
    crashed = ikos.ActorCrashed("echo", "receive raised ValueError: x", "ValueError", "tb")
    assert (crashed.name, crashed.exc_type, crashed.traceback) == ("echo", "ValueError", "tb")
    big = ikos.MessageTooLarge("echo", 100_000, 65536)
    assert (big.name, big.size, big.limit) == ("echo", 100_000, 65536)
    assert str(big) == "actor 'echo': message of 100000 bytes exceeds the limit of 65536 bytes"
    spec = ikos.SpecError("root/workers/echo", "restart", "one of a, b", "c")
    assert (spec.path, spec.key, spec.got, spec.file) == ("root/workers/echo", "restart", "c", None)
    assert str(spec) == "root/workers/echo: restart: expected one of a, b, got 'c'"
    assert ikos.ManagerError("x", "timeout").code == "timeout"
    assert ikos.NoSuchDaemon("x").code == "no_such_daemon"
    assert ikos.PermissionDenied("x").code == "permission_denied"
    assert ikos.ManagerUnavailable("x").code == "unavailable"


ROUND_TRIP = """
import pickle, sys
errors = pickle.loads(sys.stdin.buffer.read())
sys.stdout.buffer.write(pickle.dumps([(e, dict(vars(e)), str(e)) for e in errors]))
"""


def test_errors_cross_a_process_boundary():
    errs = samples()
    res = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP],
        input=pickle.dumps(errs),
        capture_output=True,
        timeout=60,
        cwd="/",
    )
    assert res.returncode == 0, res.stderr.decode()
    back = pickle.loads(res.stdout)
    for err, (again, attrs, text) in zip(errs, back, strict=True):
        assert type(again) is type(err)
        assert attrs == attributes(err)
        assert text == str(err)


def test_ask_timeout_is_caught_as_a_timeout():
    with pytest.raises(TimeoutError):
        raise ikos.AskTimeout("echo", "no reply")


def test_version_is_a_string():
    assert isinstance(ikos.__version__, str) and ikos.__version__.count(".") >= 1
