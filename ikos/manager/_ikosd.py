"""``ikosd``: the command that runs a supervision tree until it is told to stop.

Exit status: 0 after an orderly shutdown, 1 when the root supervisor gave
up (or the manager could not run), 2 for a usage or configuration error, 3
when a shutdown ran out of its grace period (``--shutdown-timeout``) and
what was left had to be killed.

As PID 1 of a PID namespace (a container's entry point), ikosd handles the
shutdown signals as soon as its command runs, before the configuration is
read (the kernel drops those PID 1 has no handler for), gives the shutdown
:data:`INIT_SHUTDOWN_TIMEOUT` seconds unless told otherwise (less than
Docker's 10 s, so that it still kills what is left and exits with its own
status), and copies the daemons' output to its stdout and stderr
(``--log-to-stdout``), where ``docker logs`` reads it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ikos._errors import ConfigError, IkosError
from ikos.platform._asyncio_tls import import_asyncio_without_tls
from ikos.platform._gc import hold_gc
from ikos.platform._paths import InstancePaths
from ikos.supervision._spec import Supervisor

if TYPE_CHECKING:
    from ikos.manager._extension import Config, ConfigSource
    from ikos.manager._manager import Manager

log = logging.getLogger("ikos.manager")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The grace period of a shutdown: 30 s, but 8 s as PID 1, within Docker's default 10 s.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
INIT_SHUTDOWN_TIMEOUT = 8.0
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def load_tree_ref(ref: str) -> Supervisor:
    """Load ``MODULE:ATTR`` (a module on sys.path, or a ``.py`` file path) as a Supervisor."""
    module_part, sep, attr = ref.rpartition(":")
    if not sep or not module_part or not attr:
        raise ConfigError(None, None, "--tree", "MODULE:ATTR (e.g. mypkg.tree:root)", ref)
    # Like `python -m` and gunicorn: the working directory is importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if module_part.endswith(".py") or os.sep in module_part:
        path = Path(module_part).resolve()
        if not path.is_file():
            raise ConfigError(str(path), None, "--tree", "an existing Python file", module_part)
        # Run it as `python file.py` would see it: its directory first on sys.path, and
        # importable by its plain name, so the fork server can import it too.
        directory = str(path.parent)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        module_name = path.stem
    else:
        module_name = module_part
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(None, None, "--tree", f"an importable module ({exc})", module_part)
    except Exception as exc:
        raise ConfigError(
            None, None, "--tree", f"a module that imports cleanly ({exc!r})", module_part
        )
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(None, None, "--tree", f"an attribute '{attr}' of {module_name}", ref)
    if callable(obj) and not isinstance(obj, Supervisor):
        obj = obj()
    if not isinstance(obj, Supervisor):
        raise ConfigError(
            None,
            None,
            "--tree",
            "an ikos.Supervisor (or a function returning one)",
            type(obj).__name__,
        )
    return obj


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r} (expected one of {', '.join(LOG_LEVELS)})"
        )
    return level


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ikosd", description="Run an ikos supervision tree (the ikos manager)."
    )
    p.add_argument("--root", metavar="DIR", help="keep every path of this instance under DIR")
    p.add_argument("-c", "--config", metavar="CONFIG", help="an ikos.toml configuration file")
    p.add_argument("--tree", metavar="MODULE:ATTR", help="a Supervisor defined in Python")
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics here, or 'off' (default: a free port of 127.0.0.1; "
        "127.0.0.1:9464 for the system instance)",
    )
    p.add_argument(
        "--log-level",
        type=_log_level,
        default=None,
        metavar="LEVEL",
        help="debug, info, warning, error or critical (default info)",
    )
    p.add_argument(
        "--shutdown-timeout",
        "--stop-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="grace period of a shutdown, after which what is left is killed and ikosd "
        f"exits 3 (default: [ikosd] shutdown_timeout, else {DEFAULT_SHUTDOWN_TIMEOUT:g}; "
        f"{INIT_SHUTDOWN_TIMEOUT:g} as PID 1)",
    )
    p.add_argument(
        "--log-to-stdout",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write every daemon's lines, prefixed 'NAME | ', to ikosd's stdout and "
        "stderr (default: [ikosd] log_to_stdout, else on only as PID 1)",
    )
    return p


#: ikosd.log is rotated at this size, keeping this many old files.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5


class _TerminalHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Logs to stderr until stderr goes away; then only the log file gets them.

    A closed stderr (``ikosd 2>&1 | head -3``) must not make every later log
    call fail, nor take ikosd down: on the first failed write the handler
    removes itself.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        logging.getLogger().removeHandler(self)


class _PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """ikosd.log: rotated by size, readable by the instance's owner only (it holds audit lines)."""

    def _open(self) -> Any:
        fd = os.open(
            self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)


def setup_logging(level: str, log_dir: Path | None, *, terminal_level: str | None = None) -> None:
    """Log to ``log_dir/ikosd.log`` at ``level`` and to stderr at ``terminal_level``.

    Without an explicit ``terminal_level``, a terminal gets warnings only (the
    ready line is printed on stdout besides), anything else (a pipe, a file,
    journald) gets ``level``.
    """
    root = logging.getLogger()
    root.handlers.clear()
    if terminal_level is None:
        terminal_level = "warning" if sys.stderr.isatty() and log_dir is not None else level
    stderr = _TerminalHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(LOG_FORMAT))
    stderr.setLevel(terminal_level.upper())
    root.addHandler(stderr)
    root.setLevel(min(logging.getLevelName(level.upper()), stderr.level))
    if log_dir is not None:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            fh = _PrivateRotatingHandler(
                log_dir / "ikosd.log", maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS
            )
            fh.setFormatter(logging.Formatter(LOG_FORMAT))
            fh.setLevel(level.upper())
            root.addHandler(fh)
        except OSError as exc:
            log.warning("cannot write %s: %s", log_dir / "ikosd.log", exc.strerror or exc)


def _importable(*directories: str) -> None:
    """Put ``directories`` first on ``sys.path`` (as ``python -m`` does with the cwd)."""
    for directory in reversed(directories):
        if directory not in sys.path:
            sys.path.insert(0, directory)


def prepare(
    args: argparse.Namespace,
) -> tuple[InstancePaths, Config, ConfigSource | None, dict[str, Any]]:
    """Resolve paths and load the configuration (raises ConfigError).

    With ``-c``, the configuration file's directory and the working directory
    are importable, in that order, so that ``class = "examples.demo:Echo"``
    works from where the file is as from where ikosd was started.
    """
    from ikos.manager._extension import Config

    paths = InstancePaths.resolve(args.root) if args.root else InstancePaths.default()
    config_file = Path(args.config) if args.config else None
    if config_file is None and args.tree is None and paths.config_file.is_file():
        config_file = paths.config_file
    if config_file is None and args.tree is None:
        raise ConfigError(
            None,
            None,
            None,
            f"a tree to run: --tree MODULE:ATTR, -c CONFIG, or {paths.config_file}",
        )
    if config_file is not None:
        _importable(str(config_file.resolve().parent), os.getcwd())
    base = load_tree_ref(args.tree) if args.tree else None
    settings: dict[str, Any] = {}
    if config_file is None:
        assert base is not None
        return paths, Config(base), None, settings
    from ikos.manager._config import load_config

    def read() -> Config:
        fresh = load_tree_ref(args.tree) if args.tree else None
        loaded = load_config(config_file, base_tree=fresh, instance_root=paths.root)
        return Config(
            loaded.tree,
            loaded.file,
            loaded.services,
            loaded.health,
            loaded.warnings,
        )

    loaded = load_config(config_file, base_tree=base, instance_root=paths.root)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    s = loaded.settings
    settings = {
        "max_message_bytes": s.max_message_bytes,
        "shutdown_timeout": s.shutdown_timeout,
        "log_level": s.log_level,
        "metrics": s.metrics,
        "readers": s.readers,
        "log_to_stdout": s.log_to_stdout,
        "ray": (s.ray_address, s.ray_namespace),
    }
    config = Config(loaded.tree, loaded.file, loaded.services, loaded.health, loaded.warnings)
    return paths, config, read, settings


def parse_metrics(value: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (or ``off``) of the metrics endpoint; ConfigError otherwise."""
    if value.strip().lower() in ("off", "none", "false", "no"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(None, None, "--metrics", "HOST:PORT (e.g. 127.0.0.1:9464) or off", value)
    return (host.strip("[]") or "0.0.0.0", int(port))


def metrics_address(
    paths: InstancePaths, given: tuple[str, int] | str | None
) -> tuple[str, int, bool] | None:
    """``(host, port, fallback)`` to serve metrics on, or None when they are off.

    ``given`` is ``--metrics`` or ``[ikosd] metrics`` (``"auto"`` when neither
    says). By default the system instance (root's, without ``--root``) listens
    on 127.0.0.1:9464, falling back to a free port if that one is taken, and
    every other instance on a free port of 127.0.0.1, so that any number of
    them run side by side; an explicit address is used as given (``fallback``
    false: ikosd refuses to start when it cannot be bound).
    """
    # deferred: ``ikos.run`` reaches this module, and the settings bring the alert rules
    # (without a configuration file, ikosd never loads its reader, ikos.manager._config)
    from ikos.manager._settings import DEFAULT_METRICS

    if given is None:
        return None
    if isinstance(given, tuple):
        return (*given, False)
    if paths.root is None and os.geteuid() == 0:
        return (*DEFAULT_METRICS, True)
    return ("127.0.0.1", 0, False)


def _first(*values: Any) -> Any:
    """The first of ``values`` that is not None (the last one otherwise)."""
    return next((v for v in values if v is not None), values[-1])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ikosd`` command."""
    hold_gc()  # until ikosd answers (the manager releases it)
    init = os.getpid() == 1
    # PID 1 drops the signals it has no handler for: from now until the manager's
    # handlers take over, a shutdown request is noted, not lost
    early: list[int] = []
    if init:
        for sig in _SHUTDOWN_SIGNALS:
            signal.signal(sig, lambda signum, frame: early.append(signum))
    # before the tree module or the manager import it: ikosd's asyncio has no ssl
    # (OpenSSL's libcrypto) until an https:// health check asks (docs/performance.md)
    import_asyncio_without_tls()
    import asyncio

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=(args.log_level or "info").upper(), format=LOG_FORMAT)
    try:
        paths, config, reload, settings = prepare(args)
    except IkosError as exc:
        print(f"ikosd: {exc}", file=sys.stderr)
        return 2
    from ikos.manager._settings import AUTO_METRICS

    try:
        metrics = metrics_address(
            paths,
            parse_metrics(args.metrics) if args.metrics else settings.get("metrics", AUTO_METRICS),
        )
    except IkosError as exc:
        print(f"ikosd: {exc}", file=sys.stderr)
        return 2
    level = args.log_level or settings.get("log_level") or "info"
    try:
        setup_logging(level, paths.log_dir, terminal_level=args.log_level)
    except ValueError:
        print(f"ikosd: unknown log level {level!r}", file=sys.stderr)
        return 2
    from ikos.manager._manager import Manager

    try:
        manager = Manager(
            paths,
            config,
            reload=reload,
            max_message_bytes=settings.get("max_message_bytes", 64 * 1024 * 1024),
            shutdown_timeout=_first(
                args.shutdown_timeout,
                settings.get("shutdown_timeout"),
                INIT_SHUTDOWN_TIMEOUT if init else DEFAULT_SHUTDOWN_TIMEOUT,
            ),
            metrics=metrics,
            reader_gid=settings.get("readers"),
            init=init,
            log_to_stdout=_first(args.log_to_stdout, settings.get("log_to_stdout"), init),
            ray=settings.get("ray"),
        )
    except IkosError as exc:
        print(f"ikosd: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(manager, early))
    except IkosError as exc:
        print(f"ikosd: {exc}", file=sys.stderr)
        return 1


#: The signals that stop ikosd (as the manager's SHUTDOWN_SIGNALS, without importing it).
_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGPWR)
#: The signals ikosd handles while it runs, ignored once it is done.
_CONTROL_SIGNALS = (*_SHUTDOWN_SIGNALS, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


async def _serve(manager: Manager, early: Sequence[int] = ()) -> int:
    """Run the manager; once it is done, make the control signals harmless for good.

    The manager's handlers are Python-level ones (never the loop's, whose
    removal puts back SIG_DFL process-wide while other threads can still take
    the signal: a SIGTERM after a clean shutdown then ended ikosd with -15).
    Going from them to SIG_IGN is one ``signal.signal`` each, with no SIG_DFL
    in between, and nothing is left for the closing loop to restore.
    """

    import asyncio

    def take_early() -> None:  # runs once manager.run() has put its own handlers in place
        if early:
            log.info("shutdown requested (signal %d) while ikosd was starting", early[0])
            manager.request_shutdown()

    asyncio.get_running_loop().call_soon(take_early)
    try:
        return await manager.run()
    finally:
        for sig in _CONTROL_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def run(
    tree: Supervisor,
    root: str | os.PathLike[str] | None = None,
    *,
    ray_address: str | None = None,
    ray_namespace: str = "ikos",
) -> int:
    """Run ``tree`` as ikosd would, blocking until shutdown; return the exit status.

    ``ray_address`` names the Ray cluster of the children placed on Ray
    (``placement=ikos.Ray(...)``), as ``[ray] address`` does in a configuration.

    Example::

        if __name__ == "__main__":
            raise SystemExit(ikos.run(ikos.Supervisor("root", children=[...]), root=".demo"))
    """
    import asyncio

    from ikos.manager._manager import Manager

    paths = InstancePaths.resolve(root)
    if not logging.getLogger().handlers:
        setup_logging("info", paths.log_dir)
    saved = {sig: signal.getsignal(sig) for sig in _CONTROL_SIGNALS}
    try:
        ray = (ray_address, ray_namespace)
        return asyncio.run(Manager(paths, tree, ray=ray).run())
    finally:  # the caller's process gets its own handlers back
        for sig, handler in saved.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


if __name__ == "__main__":
    sys.exit(main())
