"""The device manager (``dev``): the devices of sysfs, kept current by kernel uevents.

At start it enumerates ``/sys/bus/*/devices/*`` and ``/sys/class/*/*`` (each
device once, by its real path under ``/sys/devices``; its ``uevent`` file gives
the properties, its ``driver`` link the driver). Then it listens to the
kernel's uevents itself, on a ``NETLINK_KOBJECT_UEVENT`` socket bound to the
kernel's multicast group: it needs no udevd, and ignores what udevd
rebroadcasts (group 2, "libudev" messages) and anything not sent by the
kernel (sender port 0). Each event updates the device table and is published
on ``dev.ACTION`` (``dev.add``, ``dev.remove``, ``dev.change``, ``dev.bind``,
``dev.unbind``, ``dev.move``, ``dev.online``, ``dev.offline``).

On ``add`` of a device with a ``MODALIAS`` it loads the matching driver with
``modprobe -b -q -- ALIAS`` (blacklist honoured) when it may: it runs as
root or holds ``CAP_SYS_MODULE``, ``modprobe`` is installed and the running
kernel has a module tree. When it may not, it says why once in its log, and
the ``modprobe`` op answers with that reason.

Main design choice: an async actor whose event loop reads the netlink socket
(``loop.add_reader``) and runs modprobe as an asyncio subprocess with a
timeout, so neither a burst of uevents nor a slow modprobe stalls the answers
to queries. Rejected: a reader thread (it would have to hand every event to
the actor's thread, which only the loop does without a lock); libudev/pyudev
(they need udevd's database, which a minimal system has not got).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ikos
import ikos.ipc
import ikos.registry

log = logging.getLogger("examples.system.dev")

NETLINK_KOBJECT_UEVENT = 15
#: The kernel's multicast group (udevd rebroadcasts on group 2).
KERNEL_GROUP = 1
#: The largest uevent the kernel sends is 2 KiB of environment plus the header.
RECV_SIZE = 16 * 1024
RCVBUF = 4 * 1024 * 1024
ACTIONS = ("add", "remove", "change", "move", "online", "offline", "bind", "unbind")
#: Bounds: devices in the table, properties kept per device, modprobes waiting.
MAX_DEVICES = 65536
MAX_PROPERTIES = 128
MAX_PENDING_MODPROBES = 256
MODPROBE_TIMEOUT = 30.0
MAX_REQUEST_PATH = 4096
CAP_SYS_MODULE = 16


@dataclass(frozen=True, slots=True)
class Uevent:
    """One kernel uevent: ``ACTION@DEVPATH`` and its ``KEY=VALUE`` properties."""

    action: str
    devpath: str
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def subsystem(self) -> str | None:
        return self.properties.get("SUBSYSTEM")


def parse_uevent(data: bytes) -> Uevent | None:
    """The kernel's message ``ACTION@DEVPATH\\0KEY=VALUE\\0...``, or None when it is not one.

    >>> parse_uevent(b"change@/devices/virtual/net/lo\\0ACTION=change\\0SUBSYSTEM=net\\0")
    Uevent(action='change', devpath='/devices/virtual/net/lo', properties={'ACTION': 'change', \
'SUBSYSTEM': 'net'})
    """
    if data.startswith(b"libudev\0"):
        return None  # udevd's own format, rebroadcast after its rules ran
    parts = data.split(b"\0")
    head = parts[0].decode(errors="replace")
    action, sep, devpath = head.partition("@")
    if not sep or action not in ACTIONS or not devpath.startswith("/"):
        return None
    props: dict[str, str] = {}
    for raw in parts[1 : MAX_PROPERTIES + 1]:
        key, eq, value = raw.decode(errors="replace").partition("=")
        if eq and key:
            props[key] = value
    return Uevent(action, devpath, props)


def read_properties(uevent_file: Path) -> dict[str, str]:
    """The ``KEY=VALUE`` lines of a sysfs ``uevent`` file ({} when unreadable)."""
    try:
        text = uevent_file.read_text(errors="replace")
    except OSError:
        return {}
    props = {}
    for line in text.splitlines()[:MAX_PROPERTIES]:
        key, eq, value = line.partition("=")
        if eq:
            props[key] = value
    return props


def describe(sysfs: Path, devpath: str, props: dict[str, str] | None = None) -> dict[str, Any]:
    """The record of the device at ``sysfs`` + ``devpath``: subsystem, driver, modalias..."""
    where = sysfs / devpath.lstrip("/")
    if props is None:
        props = read_properties(where / "uevent")
    subsystem = props.get("SUBSYSTEM") or _link_name(where / "subsystem")
    driver = props.get("DRIVER") or _link_name(where / "driver")
    return {
        "devpath": devpath,
        "subsystem": subsystem,
        "driver": driver,
        "modalias": props.get("MODALIAS"),
        "devname": props.get("DEVNAME") or props.get("INTERFACE"),
        "properties": props,
    }


def _link_name(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def enumerate_devices(sysfs: Path) -> dict[str, dict[str, Any]]:
    """Every device of ``sysfs`` (by devpath, e.g. ``/devices/virtual/net/lo``)."""
    devices: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    links = [*sysfs.glob("bus/*/devices/*"), *sysfs.glob("class/*/*")]
    for link in links:
        try:
            real = link.resolve(strict=True)
        except OSError:
            continue
        devpath = "/" + str(real.relative_to(sysfs)) if real.is_relative_to(sysfs) else None
        if devpath is None or devpath in seen or not (real / "uevent").exists():
            continue
        seen.add(devpath)
        devices[devpath] = describe(sysfs, devpath)
        if len(devices) >= MAX_DEVICES:
            log.warning("dev: more than %d devices; the rest are not listed", MAX_DEVICES)
            break
    return devices


def modprobe_refusal(modprobe: str = "modprobe", modules_dir: str = "/lib/modules") -> str | None:
    """Why this process may not load modules, or None when it may try."""
    if shutil.which(modprobe) is None:
        return f"{modprobe} is not installed (Debian package kmod)"
    if os.geteuid() != 0 and not _has_cap_sys_module():
        return "loading drivers needs root or CAP_SYS_MODULE, which this daemon lacks"
    release = os.uname().release
    if not Path(modules_dir, release).is_dir():
        return f"the running kernel {release} has no modules here ({modules_dir}/{release})"
    return None


def _has_cap_sys_module() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << CAP_SYS_MODULE))
    except (OSError, ValueError):
        pass
    return False


def open_uevent_socket() -> socket.socket:
    """A non-blocking socket on the kernel's uevent multicast group."""
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
        NETLINK_KOBJECT_UEVENT,
    )
    try:
        # a burst (a USB hub plugged in) must not overflow the buffer: force it when root
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.bind((0, KERNEL_GROUP))
    except BaseException:
        sock.close()
        raise
    return sock


def _publish(topic: str, data: dict[str, Any]) -> None:
    try:
        ikos.ipc.publish(topic, data)
    except ikos.ipc.IpcError as exc:  # events are best effort; the table stays right
        log.warning("dev: event %s not published: %s", topic, exc)


class DeviceManager(ikos.Actor):
    """The ``dev`` daemon.

    Options (keyword arguments of :func:`child`): ``sysfs`` (``/sys``),
    ``load_drivers`` (True: modprobe by MODALIAS on ``add``),
    ``modprobe_timeout`` (30 s), ``modprobe`` (the command, found on PATH),
    ``modules_dir`` (``/lib/modules``, where the running kernel's modules must be).

    Requests (dicts): ``{"op": "list", "subsystem": S?}``, ``{"op": "get",
    "devpath": P}`` (``/devices/...`` or ``/sys/...``), ``{"op":
    "subsystems"}``, ``{"op": "modprobe", "modalias": A}`` (A: a present
    device's modalias), ``{"op":
    "rescan"}``, ``{"op": "stats"}``; replies carry ``ok`` and, when it is
    False, ``error``.
    """

    def __init__(
        self,
        *,
        sysfs: str = "/sys",
        load_drivers: bool = True,
        modprobe_timeout: float = MODPROBE_TIMEOUT,
        modprobe: str = "modprobe",
        modules_dir: str = "/lib/modules",
    ) -> None:
        self.sysfs = Path(sysfs)
        self.load_drivers = load_drivers
        self.modprobe_timeout = float(modprobe_timeout)
        self.modprobe, self.modules_dir = modprobe, modules_dir

    async def on_start(self) -> None:
        loop = asyncio.get_running_loop()
        self.counters: collections.Counter[str] = collections.Counter()
        self.devices = await loop.run_in_executor(None, enumerate_devices, self.sysfs)
        self.refusal = modprobe_refusal(self.modprobe, self.modules_dir)
        if self.refusal is not None and self.load_drivers:
            log.warning("dev: drivers will not be loaded: %s", self.refusal)
        self.modprobes: set[asyncio.Task[dict[str, Any]]] = set()
        self.sock: socket.socket | None = None
        self.netlink_error: str | None = None
        try:
            self.sock = open_uevent_socket()
            loop.add_reader(self.sock.fileno(), self._readable)
        except OSError as exc:
            self.netlink_error = f"the kernel's uevent socket cannot be opened: {exc}"
            log.warning("dev: %s; hotplug events will not be seen", self.netlink_error)
        try:
            ikos.registry.register(
                self.name,
                type="devices",
                description="sysfs devices and kernel hotplug events",
                endpoint=f"ikos://{self.name}",
                capabilities=["list", "get", "modprobe", "uevents"],
            )
        except ikos.IkosError as exc:
            log.warning("dev: service not registered: %s", exc)
        log.info("dev: %d devices, uevents %s", len(self.devices), self.netlink_error or "on")

    # -- uevents -------------------------------------------------------------

    def _readable(self) -> None:
        assert self.sock is not None
        for _ in range(64):  # then let the loop answer queries before reading on
            try:
                data, (port, _groups) = self.sock.recvfrom(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # events were lost: the table may be stale, so read it again
                    self.counters["overruns"] += 1
                    log.warning("dev: uevent buffer overrun; rescanning sysfs")
                    self.devices = enumerate_devices(self.sysfs)
                    continue
                # anything else will not go away by reading again: stop listening, say why
                self.netlink_error = f"reading uevents failed: {exc}"
                log.warning("dev: %s; hotplug events will not be seen", self.netlink_error)
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
                return
            if port != 0:
                self.counters["foreign"] += 1  # not the kernel: ignored
                continue
            event = parse_uevent(data)
            if event is None:
                self.counters["ignored"] += 1
                continue
            self._apply(event)

    def _apply(self, event: Uevent) -> None:
        self.counters["events"] += 1
        if event.action == "remove":
            self.devices.pop(event.devpath, None)
        elif len(self.devices) < MAX_DEVICES or event.devpath in self.devices:
            # sysfs may already be gone or changed again; the event's own properties win
            record = describe(self.sysfs, event.devpath, dict(event.properties))
            record["properties"].pop("ACTION", None)
            record["properties"].pop("SEQNUM", None)
            self.devices[event.devpath] = record
        _publish(
            f"dev.{event.action}",
            {
                "action": event.action,
                "devpath": event.devpath,
                "subsystem": event.subsystem,
                "seqnum": event.properties.get("SEQNUM"),
                "properties": event.properties,
            },
        )
        alias = event.properties.get("MODALIAS")
        if event.action == "add" and alias and self.load_drivers and self.refusal is None:
            if len(self.modprobes) >= MAX_PENDING_MODPROBES:
                self.counters["modprobes_dropped"] += 1
                return
            task = asyncio.get_running_loop().create_task(self._modprobe(alias))
            self.modprobes.add(task)
            task.add_done_callback(self.modprobes.discard)

    async def _modprobe(self, alias: str) -> dict[str, Any]:
        """Run ``modprobe -b -q -- alias`` with a timeout; the reply of the ``modprobe`` op."""
        if self.refusal is not None:
            return {"ok": False, "error": f"cannot load a driver for {alias!r}: {self.refusal}"}
        self.counters["modprobes"] += 1
        try:
            proc = await asyncio.create_subprocess_exec(
                self.modprobe,
                "-b",
                "-q",
                "--",
                alias,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            self.counters["modprobe_failures"] += 1
            return {"ok": False, "error": f"modprobe {alias!r} could not be run: {exc}"}
        try:
            _, err = await asyncio.wait_for(proc.communicate(), self.modprobe_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            self.counters["modprobe_failures"] += 1
            return {
                "ok": False,
                "error": f"modprobe {alias!r}: no answer in {self.modprobe_timeout:g} s",
            }
        if proc.returncode != 0:
            self.counters["modprobe_failures"] += 1
            why = err.decode(errors="replace").strip()[:500] or f"exit status {proc.returncode}"
            return {"ok": False, "error": f"modprobe {alias!r} failed: {why}"}
        return {"ok": True, "modalias": alias}

    # -- requests ------------------------------------------------------------

    async def receive(self, message: Any) -> Any:
        if not isinstance(message, dict):
            return _error(f'expected a request object {{"op": ...}}, got {type(message).__name__}')
        op = message.get("op")
        if op == "list":
            subsystem = message.get("subsystem")
            if subsystem is not None and not isinstance(subsystem, str):
                return _error("'subsystem': expected a string")
            found = [
                d for d in self.devices.values() if subsystem is None or d["subsystem"] == subsystem
            ]
            return {"ok": True, "devices": sorted(found, key=lambda d: d["devpath"])}
        if op == "get":
            devpath = message.get("devpath")
            if not isinstance(devpath, str) or len(devpath) > MAX_REQUEST_PATH:
                return _error(
                    f"'devpath': expected a path of at most {MAX_REQUEST_PATH} characters"
                )
            key = "/" + devpath.removeprefix(str(self.sysfs)).strip("/")
            device = self.devices.get(key)
            if device is None:
                return _error(f"no device {devpath[:200]!r} (devpaths look like /devices/...)")
            return {"ok": True, "device": device}
        if op == "subsystems":
            counts = collections.Counter(d["subsystem"] for d in self.devices.values())
            return {
                "ok": True,
                "subsystems": {str(k): v for k, v in sorted(counts.items(), key=str)},
            }
        if op == "modprobe":
            alias = message.get("modalias")
            if not isinstance(alias, str) or not alias or len(alias) > 512 or alias[0] == "-":
                return _error(
                    "'modalias': expected an alias or module name (at most 512 characters)"
                )
            if self.refusal is None and alias not in {d["modalias"] for d in self.devices.values()}:
                # loading any module by name is root's business, not a caller's of this op
                return _error(
                    f"no device here has modalias {alias[:200]!r}: "
                    "this op loads drivers for present devices only"
                )
            return await self._modprobe(alias)
        if op == "rescan":
            loop = asyncio.get_running_loop()
            self.devices = await loop.run_in_executor(None, enumerate_devices, self.sysfs)
            return {"ok": True, "devices": len(self.devices)}
        if op == "stats":
            return {
                "ok": True,
                "devices": len(self.devices),
                "uevents": self.netlink_error or "listening",
                "drivers": self.refusal or "loaded by modalias on add",
                **self.counters,
            }
        return _error(
            f"unknown op {str(op)[:64]!r}: "
            "expected list, get, subsystems, modprobe, rescan or stats"
        )

    async def on_stop(self) -> None:
        for task in list(self.modprobes):
            task.cancel()
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def child(name: str = "dev", **options: Any) -> ikos.Child:
    """The ``dev`` daemon as a child of a tree; ``options`` go to :class:`DeviceManager`.

    It requires nothing but the kernel.
    """
    return ikos.Child(name, DeviceManager, kwargs=options, restart="permanent")
