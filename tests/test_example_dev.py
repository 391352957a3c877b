"""The device manager (``examples/system/dev.py``) on a real ikosd, with real uevents.

The daemon is run by the real ``ikosd`` as the tree's child and asked over its
mailbox, as the demo's other daemons and ``ikosctl call dev`` do. Hotplug is
exercised with the kernel's synthetic uevents: writing ``ACTION UUID KEY=VALUE``
to a device's ``uevent`` file in sysfs makes the kernel broadcast a real uevent
carrying ``SYNTH_UUID`` and ``SYNTH_ARG_KEY``, which the daemon must publish on
``dev.ACTION``; the test subscribes over ikos IPC and matches its own UUID.
The parser and the modprobe policy are unit-tested at the end.
"""

from __future__ import annotations

import collections
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import HANG, Instance, wait_for

import ikos
import ikos.ipc
import ikos.registry

# examples/ is not part of the installed distribution: import it from the checkout
from examples.system import dev as devmod
from examples.system.dev import DeviceManager, modprobe_refusal, parse_uevent

TREE = """
import ikos
from examples.system import dev

tree = ikos.Supervisor("root", children=[dev.child()])
"""

LO = "/devices/virtual/net/lo"
NULL = "/devices/virtual/mem/null"


@pytest.fixture
def dev(ikosd_factory: Callable[..., Instance]) -> tuple[Instance, ikos.ActorRef[Any]]:
    inst = ikosd_factory(tree=TREE, args=["--metrics", "off"])
    ref: ikos.ActorRef[Any] = ikos.ActorRef("dev", root=inst.root)
    wait_for(lambda: ref.ask({"op": "stats"}, timeout=5)["ok"], HANG, message="dev answering")
    return inst, ref


def ask(ref: ikos.ActorRef[Any], message: Any) -> Any:
    return ref.ask(message, timeout=HANG)


def trigger(devpath: str, action: str, **args: str) -> str:
    """Write a synthetic uevent for ``devpath``; its UUID. Skips where sysfs refuses."""
    synth = str(uuid.uuid4())
    line = " ".join([action, synth, *(f"{k}={v}" for k, v in args.items())])
    try:
        Path("/sys", devpath.lstrip("/"), "uevent").write_text(line)
    except OSError as exc:
        pytest.skip(f"sysfs does not take synthetic uevents here ({devpath}/uevent: {exc})")
    return synth


def wait_event(sub: ikos.ipc.Subscription, synth: str) -> ikos.ipc.IpcMessage:
    """The delivery whose properties carry ``SYNTH_UUID`` = ``synth`` (others are skipped)."""

    def match() -> ikos.ipc.IpcMessage | None:
        msg = sub.get(timeout=1)
        return msg if msg.payload["properties"].get("SYNTH_UUID") == synth else None

    return wait_for(match, HANG, interval=0, message=f"the uevent {synth}")  # type: ignore[no-any-return]


def test_enumerates_sysfs_and_registers(dev: tuple[Instance, ikos.ActorRef[Any]]) -> None:
    inst, ref = dev
    lo = ask(ref, {"op": "get", "devpath": LO})
    assert lo["ok"], lo
    assert lo["device"]["subsystem"] == "net"
    assert lo["device"]["properties"]["INTERFACE"] == "lo"
    # the /sys/... spelling finds the same device
    assert ask(ref, {"op": "get", "devpath": "/sys" + LO})["device"] == lo["device"]
    nets = ask(ref, {"op": "list", "subsystem": "net"})["devices"]
    assert LO in [d["devpath"] for d in nets]
    assert all(d["subsystem"] == "net" for d in nets)
    assert ask(ref, {"op": "subsystems"})["subsystems"]["net"] == len(nets)
    service = wait_for(
        lambda: ikos.registry.lookup("dev", root=inst.root), HANG, message="service dev"
    )
    assert service.active


def test_real_uevents_are_published_and_applied(
    dev: tuple[Instance, ikos.ActorRef[Any]],
) -> None:
    inst, ref = dev
    if ask(ref, {"op": "stats"})["uevents"] != "listening":
        pytest.skip(f"no uevent socket here: {ask(ref, {'op': 'stats'})['uevents']}")
    with ikos.ipc.subscribe("dev.*", root=inst.root) as sub:
        synth = trigger(LO, "change", IKOSTEST="lo")
        msg = wait_event(sub, synth)
        assert msg.topic == "dev.change"
        assert msg.payload["devpath"] == LO
        assert msg.payload["subsystem"] == "net"
        assert msg.payload["properties"]["SYNTH_ARG_IKOSTEST"] == "lo"

        synth = trigger(NULL, "add", IKOSTEST="null")
        msg = wait_event(sub, synth)
        assert msg.topic == "dev.add"
        assert msg.payload["subsystem"] == "mem"
    # the table follows the events: the last one's properties are the device's now
    null = ask(ref, {"op": "get", "devpath": NULL})["device"]
    assert null["properties"]["SYNTH_UUID"] == synth
    assert ask(ref, {"op": "stats"})["events"] >= 2


def test_modprobe_loads_or_says_why_not(dev: tuple[Instance, ikos.ActorRef[Any]]) -> None:
    _, ref = dev
    refusal = modprobe_refusal()  # the daemon runs as this test does: same answer
    reply = ask(ref, {"op": "modprobe", "modalias": "ikos-test:no-such-alias"})
    assert reply["ok"] is False
    if refusal is not None:
        assert refusal in reply["error"]
        assert ask(ref, {"op": "stats"})["drivers"] == refusal
    else:  # only the aliases of present devices are loaded on request
        assert "no device here has modalias 'ikos-test:no-such-alias'" in reply["error"]


FAKE_MODPROBE = """#!/bin/sh
# stands in for modprobe: records how it was called
echo "$@" >> "$(dirname "$0")/calls"
"""


def test_a_device_added_gets_its_driver_loaded_by_modalias(
    ikosd_factory: Callable[..., Instance], tmp_path: Path
) -> None:
    # modprobe itself is replaced (this machine may have none, and a test must not
    # load modules): what is checked is that an add with a MODALIAS runs it, as
    # 'modprobe -b -q -- ALIAS', without anyone asking
    fake = tmp_path / "bin" / "modprobe"
    fake.parent.mkdir()
    fake.write_text(FAKE_MODPROBE)
    fake.chmod(0o755)
    (tmp_path / "modules" / os.uname().release).mkdir(parents=True)
    tree = TREE.replace(
        "dev.child()",
        f"dev.child(modprobe={str(fake)!r}, modules_dir={str(tmp_path / 'modules')!r})",
    )
    inst = ikosd_factory(tree=tree, args=["--metrics", "off"])
    ref: ikos.ActorRef[Any] = ikos.ActorRef("dev", root=inst.root)
    stats = wait_for(lambda: ask(ref, {"op": "stats"}), HANG, message="dev answering")
    if stats["uevents"] != "listening":
        pytest.skip(f"no uevent socket here: {stats['uevents']}")
    assert stats["drivers"] == "loaded by modalias on add"
    # a device whose driver is bound already: on any machine, loading it is a no-op
    bound = [d for d in ask(ref, {"op": "list"})["devices"] if d["modalias"] and d["driver"]]
    if not bound:
        pytest.skip("no device here has both a modalias and a driver")
    device = bound[0]
    with ikos.ipc.subscribe("dev.add", root=inst.root) as sub:
        synth = trigger(device["devpath"], "add")
        assert wait_event(sub, synth).payload["properties"]["MODALIAS"] == device["modalias"]
    calls = tmp_path / "bin" / "calls"
    wait_for(calls.exists, HANG, message="modprobe to be run")
    assert f"-b -q -- {device['modalias']}" in calls.read_text().splitlines()
    # on request: a present device's alias, and nothing else
    alias = device["modalias"]
    assert ask(ref, {"op": "modprobe", "modalias": alias}) == {"ok": True, "modalias": alias}
    refused = ask(ref, {"op": "modprobe", "modalias": "x:y"})
    assert "this op loads drivers for present devices only" in refused["error"]


def test_bad_requests_are_answered_not_crashed(dev: tuple[Instance, ikos.ActorRef[Any]]) -> None:
    inst, ref = dev
    pid = inst.pid_of("dev")
    for message, fragment in [
        ("list", "expected a request object"),
        ({"op": "explode"}, "unknown op 'explode'"),
        ({"op": "get"}, "'devpath'"),
        ({"op": "get", "devpath": "x" * 100_000}, "at most 4096"),
        ({"op": "get", "devpath": "/devices/none"}, "no device '/devices/none'"),
        ({"op": "list", "subsystem": 5}, "'subsystem'"),
        ({"op": "modprobe", "modalias": "-r"}, "'modalias'"),
    ]:
        reply = ask(ref, message)
        assert reply["ok"] is False and fragment in reply["error"], (message, reply)
    assert inst.pid_of("dev") == pid
    proc = psutil.Process(pid)
    flood = [{"op": "get", "devpath": f"/devices/none{i}" * 100} for i in range(1300)]
    for message in flood[:300]:  # warm up: allocator pools
        ref.ask(message, timeout=HANG)
    rss = proc.memory_info().rss
    for message in flood[300:]:
        assert ref.ask(message, timeout=HANG)["ok"] is False
    grown = proc.memory_info().rss - rss
    assert grown < 8 * 1024 * 1024, f"dev grew by {grown} bytes under 1,000 bad requests"
    res = inst.ctl("call", "dev", '{"op": "get", "devpath": "/devices/virtual/net/lo"}')
    assert res.returncode == 0 and '"net"' in res.stdout, res


# -- the pure parts ------------------------------------------------------------


def test_parse_uevent() -> None:
    event = parse_uevent(b"add@/devices/x\0ACTION=add\0SUBSYSTEM=usb\0MODALIAS=usb:v1\0junk\0")
    assert event is not None
    assert (event.action, event.devpath, event.subsystem) == ("add", "/devices/x", "usb")
    assert event.properties == {"ACTION": "add", "SUBSYSTEM": "usb", "MODALIAS": "usb:v1"}
    assert parse_uevent(b"libudev\0\xfe\xed\xca\xfe...") is None  # udevd's rebroadcast
    assert parse_uevent(b"explode@/devices/x\0") is None
    assert parse_uevent(b"add@relative\0") is None
    assert parse_uevent(b"") is None
    many = b"add@/d\0" + b"\0".join(b"K%d=v" % i for i in range(10_000))
    event = parse_uevent(many)
    assert event is not None and len(event.properties) == 128  # bounded


def test_modprobe_refusal_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert modprobe_refusal() == "modprobe is not installed (Debian package kmod)"
    monkeypatch.setattr("shutil.which", lambda name: name)
    assert modprobe_refusal(modules_dir="/nonexistent").startswith(
        f"the running kernel {os.uname().release} has no modules here (/nonexistent/"
    )
    monkeypatch.setattr("shutil.which", lambda name: "/sbin/modprobe")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr("examples.system.dev._has_cap_sys_module", lambda: False)
    assert "needs root or CAP_SYS_MODULE" in str(modprobe_refusal())


def test_events_keep_the_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    published: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(devmod, "_publish", lambda topic, data: published.append((topic, data)))
    manager = DeviceManager(sysfs=str(tmp_path), load_drivers=False)
    manager.devices, manager.modprobes = {}, set()
    manager.counters = collections.Counter()
    add = parse_uevent(b"add@/devices/x\0ACTION=add\0SUBSYSTEM=usb\0DRIVER=hub\0SEQNUM=7\0")
    assert add is not None
    manager._apply(add)
    record = manager.devices["/devices/x"]
    assert (record["subsystem"], record["driver"], record["properties"]) == (
        "usb",
        "hub",
        {"SUBSYSTEM": "usb", "DRIVER": "hub"},
    )
    remove = parse_uevent(b"remove@/devices/x\0ACTION=remove\0SUBSYSTEM=usb\0SEQNUM=8\0")
    assert remove is not None
    manager._apply(remove)
    assert manager.devices == {}
    assert [(t, d["seqnum"]) for t, d in published] == [("dev.add", "7"), ("dev.remove", "8")]
