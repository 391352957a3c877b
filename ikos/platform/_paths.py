"""Where one ikos instance keeps its files.

Every path of an instance derives from one :class:`InstancePaths`: with a
root directory (``ikosd --root DIR``) everything lives under DIR, so any
number of instances run side by side without privileges; without one, root
uses the FHS locations and other users the XDG base directories. Clients
(ikosctl, ``ikos.daemon``, ActorRefs in plain processes) find the same paths
from ``$IKOS_ROOT`` the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_ROOT = "IKOS_ROOT"


@dataclass(frozen=True)
class InstancePaths:
    """The directories and files of one ikos instance."""

    root: Path | None
    run_dir: Path
    state_dir: Path
    log_dir: Path
    config_file: Path

    @property
    def control_socket(self) -> Path:
        """The manager's JSON control socket."""
        return self.run_dir / "ikosd.sock"

    @property
    def actors_dir(self) -> Path:
        """Private (0700) directory of the actors' mailbox sockets."""
        return self.run_dir / "actors"

    @property
    def secret_file(self) -> Path:
        """The per-instance HMAC secret (0600), kept across manager restarts."""
        return self.state_dir / "secret"

    @property
    def instance_file(self) -> Path:
        """JSON facts a client needs about the running instance (e.g. the frame limit)."""
        return self.run_dir / "instance.json"

    @property
    def pid_file(self) -> Path:
        """ikosd's own PID file, locked while it runs."""
        return self.run_dir / "ikosd.pid"

    def actor_socket(self, name: str) -> Path:
        """The mailbox socket of the actor called ``name``."""
        return self.actors_dir / f"{name}.sock"

    @classmethod
    def for_root(cls, root: str | os.PathLike[str]) -> InstancePaths:
        """Paths of an instance kept entirely under ``root``."""
        base = Path(root).resolve()
        return cls(
            root=base,
            run_dir=base / "run" / "ikos",
            state_dir=base / "var" / "lib" / "ikos",
            log_dir=base / "var" / "log" / "ikos",
            config_file=base / "etc" / "ikos" / "ikos.toml",
        )

    @classmethod
    def default(cls) -> InstancePaths:
        """The paths of the default instance for the current user."""
        if os.geteuid() == 0:
            return cls(
                root=None,
                run_dir=Path("/run/ikos"),
                state_dir=Path("/var/lib/ikos"),
                log_dir=Path("/var/log/ikos"),
                config_file=Path("/etc/ikos/ikos.toml"),
            )
        home = Path.home()
        runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/ikos-{os.getuid()}"
        state = Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "ikos"
        config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "ikos"
        return cls(
            root=None,
            run_dir=Path(runtime) / "ikos",
            state_dir=state,
            log_dir=state / "log",
            config_file=config / "ikos.toml",
        )

    @classmethod
    def resolve(cls, root: str | os.PathLike[str] | None = None) -> InstancePaths:
        """Paths for an explicit root, else ``$IKOS_ROOT``, else the default."""
        if root is not None:
            return cls.for_root(root)
        env = os.environ.get(ENV_ROOT)
        if env:
            return cls.for_root(env)
        return cls.default()

    def create(self) -> None:
        """Create the directories with their modes (actors' directory private)."""
        for d in (self.run_dir, self.state_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        # The control socket must be reachable by other users (read-only
        # access); the mailboxes and the secret must not.
        os.chmod(self.run_dir, 0o755)
        os.chmod(self.state_dir, 0o700)
        self.actors_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.actors_dir, 0o700)
