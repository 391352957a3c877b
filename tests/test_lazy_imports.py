"""ikosd imports what its configuration uses, when it uses it (docs/performance.md, "Launch").

The rule these tests guard: a tree without ``requires``/``after`` never loads
networkx (its start order is the list order), metrics off never load
prometheus_client nor the HTTP server, no configuration file never loads the
TOML reader, and ``import ikos`` in a tree module does not bring in the
manager. A tree with dependencies still has its order computed by networkx.
What is checked is the set of modules ikosd had loaded at its exit, written
by the tree module itself (user code that runs inside ikosd), after a whole
life: start, a status request, SIGTERM. No timing is asserted here; the
figures are bench/'s and docs/performance.md's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import REPO

from ikos.actors._actor import Actor
from ikos.manager._manager import Manager
from ikos.platform._paths import InstancePaths
from ikos.supervision._spec import Child, Exec, Supervisor

#: A tree module that records the modules of the ikosd that imported it, at its exit.
TREE = """
import atexit, json, os, sys

import ikos

_pid = os.getpid()


@atexit.register
def _modules_at_exit():
    if os.getpid() == _pid:  # ikosd itself, not a process forked from it
        with open({out!r}, "w") as f:
            json.dump(sorted(sys.modules), f)


def tree():
    return ikos.Supervisor("root", children=[
        ikos.Exec("db", "/bin/sleep", args=["1000"]),
        ikos.Exec("api", "/bin/sleep", args=["1000"]{requires}),
    ])
"""

#: Loaded only when the configuration asks for what they do (ikos.ipc: by the actors
#: and the broker, never by ikosd, which holds the broker's socket through the platform;
#: the configuration file's reader, ikos.manager._config: with a file, the extensions'
#: settings and their defaults are ikos.manager._settings).
NOT_FOR_A_PLAIN_TREE = (
    "networkx",
    "prometheus_client",
    "http.server",
    "tomllib",
    "ikos.ipc",
    "ikos.manager._config",
)
#: The actor machinery (the spawner, the runtime an actor runs, the handover of an
#: upgrade, the carried classes of ``ikosctl spawn``), the unit files' reader, and the
#: actor types ``import ikos`` exports on first use (ActorRef, Down, Timer; the monitor
#: service imports them with the first Down): loaded with the first actor, the first
#: unit. ``ikos.Actor`` itself is not in the list (a light module of its own). And
#: psutil (~0.6 MiB of modules): ikosd reads ``/proc`` itself; only rows of an ikos
#: before process stamps are checked through it.
NOT_FOR_EXECUTABLES = (
    "psutil",
    "ikos.manager._actors",
    "ikos.actors._runtime",
    "ikos.actors._handover",
    "ikos.actors._carried",
    "ikos.platform._unit",
    "ikos.actors._ref",
    "ikos.actors._monitor",
    "ikos.actors._timers",
)
#: OpenSSL, which ikosd needs only for an https:// health check or an authenticated
#: mailbox handshake: asyncio comes without ssl, digests from the built-in sha256
#: (ikos.platform._asyncio_tls, ikos.platform._digest).
NO_OPENSSL = ("ssl", "_ssl", "hashlib", "_hashlib", "hmac", "secrets")


def modules_of_a_run(
    ikosd_factory: Any, tmp_path: Path, requires: str = "", maps: list[str] | None = None
) -> set[str]:
    """Run ikosd on the two-daemon tree until a status answer, stop it; its modules.

    ``maps``, if given, receives the OpenSSL libraries ikosd mapped once it answered.
    """
    out = tmp_path / "modules.json"
    tree = TREE.format(out=str(out), requires=requires)
    inst = ikosd_factory(tree=tree, args=["--metrics", "off"])
    states = {s["name"]: s["state"] for s in inst.status()}
    assert states["db"] == states["api"] == "running", states
    if maps is not None:
        maps.extend(openssl_mapped(inst.pid))
    assert inst.terminate() == 0
    return set(json.loads(out.read_text()))


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` with this checkout importable (and ``env``); it must exit 0."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=60
    )
    assert res.returncode == 0, res.stderr
    return res


def openssl_mapped(pid: int) -> list[str]:
    """The OpenSSL libraries process ``pid`` maps."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted(
        {f for f in (line.split()[-1] for line in lines) if "libcrypto" in f or "libssl" in f}
    )


def test_a_tree_without_dependencies_and_metrics_off_loads_no_graph_nor_metrics(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    mapped: list[str] = []
    loaded = modules_of_a_run(ikosd_factory, tmp_path, maps=mapped)
    assert "ikos.manager._manager" in loaded and "asyncio" in loaded  # it is ikosd's list
    assert [m for m in NOT_FOR_A_PLAIN_TREE if m in loaded] == []
    assert [m for m in NOT_FOR_EXECUTABLES if m in loaded] == []
    assert [m for m in NO_OPENSSL if m in loaded] == []
    assert mapped == []


def test_an_actor_added_by_a_reload_to_a_tree_of_executables_runs(ikosd_factory: Any) -> None:
    # the actors' spawner is made with the first actor: one that comes by a reload
    # (after ikosd started without any) starts, answers, and stops with ikosd
    inst = ikosd_factory(
        config="""
        [ikosd]
        metrics = false
        [executables.db]
        executable = "/bin/sleep"
        args = ["1000"]
        """
    )
    assert inst.state("db") == "running"
    config = inst.root.parent / "ikos.toml"
    config.write_text(config.read_text() + '\n[actors.echo]\nclass = "examples.actors:Echo"\n')
    res = inst.ctl("reload-config")
    assert (res.returncode, res.stdout) == (0, "added: echo\n"), res.stderr
    inst.wait_state("echo", "running")
    assert inst.ctl("call", "echo", "back").stdout == "back\n"
    assert inst.status("echo")["dead_letters"] == 0
    assert inst.terminate() == 0


def test_a_tree_with_dependencies_is_ordered_by_networkx(
    ikosd_factory: Any, tmp_path: Path
) -> None:
    loaded = modules_of_a_run(ikosd_factory, tmp_path, requires=', requires=["db"]')
    assert "networkx" in loaded
    assert "prometheus_client" not in loaded


def test_import_ikos_for_a_tree_module_leaves_the_manager_out() -> None:
    code = (
        "import sys, ikos\n"
        "ikos.Supervisor('root', children=[ikos.Exec('a', '/bin/true')])\n"
        "print(' '.join(sorted(sys.modules)))\n"
        # the public names still resolve, to the same objects as before
        "from ikos.manager._ikosd import run\n"
        "from ikos.manager._local import local\n"
        "assert ikos.run is run and ikos.local is local, 'lazy names'\n"
        "from ikos import spawn, LocalSystem\n"
        "assert {'run', 'spawn', 'local', 'LocalSystem'} <= set(dir(ikos))\n"
        "from ikos.actors._ref import ActorRef\n"
        "from ikos.actors._monitor import Down\n"
        "from ikos.actors._timers import Timer\n"
        "assert (ikos.ActorRef, ikos.Down, ikos.Timer) == (ActorRef, Down, Timer), 'actors'\n"
        "from ikos import *\n"
        "assert ActorRef is ikos.ActorRef, 'star import'\n"
    )
    loaded = set(run_python(code).stdout.split())
    heavy = ("ikos.ipc", "ikos.manager._ikosd", "ikos.manager._local", "ikos.supervision._client")
    assert [m for m in (*heavy, *NOT_FOR_A_PLAIN_TREE) if m in loaded] == []


def test_an_actor_subscribing_after_a_plain_import_ikos_goes_through_ikos_ipc(
    tmp_path: Path,
) -> None:
    # ikos.ipc is loaded on first use; Actor.subscribe must still reach it (here it
    # finds no broker under an empty root: IpcUnavailable, ikos.ipc's own error)
    # The client retries a missing broker for RECONNECT_TIMEOUT (15 s): once the
    # subscribing thread is inside ikos.ipc's client, the client is aborted, which
    # ends the retries with the same IpcUnavailable at once.
    code = (
        "import sys, threading, time, ikos\n"
        "from ikos.actors import _actor\n"
        "assert 'ikos.ipc' not in sys.modules, 'eager'\n"
        "errors = []\n"
        "def subscribe():\n"
        "    try:\n"
        "        _actor._subscribe('net.*', print)\n"
        "    except ikos.IkosError as exc:\n"
        "        errors.append(type(exc).__name__)\n"
        "t = threading.Thread(target=subscribe)\n"
        "t.start()\n"
        "deadline = time.monotonic() + 30\n"
        "while t.is_alive() and time.monotonic() < deadline:\n"
        "    client = sys.modules.get('ikos.ipc._client')\n"
        "    for c in list(getattr(client, '_shared', {}).values()):\n"
        "        c.abort()\n"
        "    t.join(0.01)\n"
        "t.join()\n"
        "print(*errors)\n"
        "assert _actor._subscribe is ikos.ipc._actor_subscribe, 'not installed'\n"
    )
    res = run_python(code, IKOS_ROOT=str(tmp_path / "none"))
    assert res.stdout.split() == ["IpcUnavailable"]


class Echo(Actor):
    def receive(self, message: Any) -> Any:
        return message


def test_the_fork_server_preloads_ikos_ipc_for_the_actors_only(tmp_path: Path) -> None:
    # import ikos no longer brings ikos.ipc: the fork server imports it once for the
    # actors forked from it (shared pages), and not for a tree without actors
    paths = InstancePaths.for_root(tmp_path / "root")
    actors = Supervisor("root", children=[Child("echo", Echo), Exec("db", "/bin/true")])
    assert Manager(paths, actors).preload_modules(actors) == ["ikos.ipc", __name__]
    plain = Supervisor("root", children=[Exec("db", "/bin/true")])
    assert Manager(paths, plain).preload_modules(plain) == []


def test_asyncio_without_ssl_still_speaks_tls_for_an_https_health_check() -> None:
    # ikosd's asyncio is imported without ssl; `import ssl` keeps working, and an
    # https:// check gives asyncio the real module first: what the server reads is
    # a TLS record (0x16, a handshake), and the check fails on the certificate only
    code = (
        "import sys\n"
        "from ikos.platform._asyncio_tls import import_asyncio_without_tls\n"
        "assert import_asyncio_without_tls(), 'asyncio was imported already'\n"
        "assert not import_asyncio_without_tls()\n"
        "import asyncio, asyncio.sslproto\n"
        "assert asyncio.sslproto.ssl is None and 'ssl' not in sys.modules, 'ssl loaded'\n"
        "import ssl\n"
        "assert ssl.OPENSSL_VERSION\n"
        "from ikos.registry._health import probe_http\n"
        "async def main():\n"
        "    first = asyncio.get_running_loop().create_future()\n"
        "    async def handle(reader, writer):\n"
        "        first.set_result(await reader.read(1))\n"
        "        writer.close()\n"
        "    server = await asyncio.start_server(handle, '127.0.0.1', 0)\n"
        "    port = server.sockets[0].getsockname()[1]\n"
        "    result = await probe_http(f'https://127.0.0.1:{port}/', timeout=30)\n"
        "    server.close()\n"
        "    print(first.result().hex() if first.done() else 'nothing', result.ok)\n"
        "asyncio.run(main())\n"
    )
    assert run_python(code).stdout.split() == ["16", "False"]


def test_the_private_ikosd_of_ikos_local_maps_no_openssl() -> None:
    # the first check proves the probe: this process maps OpenSSL (pytest's asyncio)
    import ikos

    assert openssl_mapped(os.getpid()) != []
    tree = Supervisor("root", children=[Exec("db", "/bin/sleep", args=["1000"])])
    with ikos.local(tree=tree) as system:
        assert system.pid is not None
        assert openssl_mapped(system.pid) == []


def test_the_builtin_sha256_gives_hashlib_s_digests() -> None:
    # the short names of cgroups and caches must stay what a previous ikosd computed
    import hashlib

    from ikos.platform._digest import sha256

    for data in (b"", b"/run/ikos", bytes(range(256)) * 70):
        assert sha256(data).hexdigest() == hashlib.sha256(data).hexdigest()
    assert type(sha256(b"")).__module__ in ("_sha256", "_sha2")  # not OpenSSL's
