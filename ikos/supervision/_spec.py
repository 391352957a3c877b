"""Specifications of a supervision tree: what to run, not how it runs.

``Child`` (an actor), ``Exec`` (an external executable) and ``Supervisor``
are plain immutable values. They are validated up front, as OTP's
``supervisor:check_childspecs`` does, with errors that name the path from
the root to the offending child and the offending value, so that a bad tree
is refused before anything starts. Equality of specs is what a configuration
reload uses to decide which children changed.

The runtime (``ikos.supervision._runtime``) turns these values into running
processes; keeping the two apart lets the config loader, the reload diff and
the tests handle trees without starting anything.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from ikos._errors import SpecError
from ikos.platform._exec_options import EXEC_OPTIONS, ExecOptions
from ikos.platform._fields import (
    FieldSpec,
    FrozenDict,
    InvalidField,
    UnknownField,
    boolean,
    check_fields,
    choice,
    field_table,
    integer,
    option,
    seconds,
)
from ikos.platform._signals import parse_signal, signal_name
from ikos.supervision._placement import PlacementLike, Ray, placement_of

if TYPE_CHECKING:  # the unit files' reader comes with the first unit (from_unit, from_units)
    from ikos.platform._unit import UnitSpec

log = logging.getLogger("ikos.unit")

RestartType: TypeAlias = Literal["permanent", "transient", "temporary"]
Strategy: TypeAlias = Literal["one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one"]
Shutdown: TypeAlias = float | Literal["brutal_kill", "infinity"]

RESTART_TYPES: tuple[str, ...] = ("permanent", "transient", "temporary")
#: systemd's ``Restart=`` choices, for executables (field ``restart_on``).
RESTART_ON: tuple[str, ...] = (
    "no", "always", "on-success", "on-failure", "on-abnormal", "on-abort", "on-watchdog",
)  # fmt: skip
STRATEGIES: tuple[str, ...] = ("one_for_one", "one_for_all", "rest_for_one", "simple_one_for_one")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
NAME_RULE = (
    "a name of 1-64 characters: letters, digits, '_', '.', '@', '-', not starting with a symbol"
)


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off between restarts, as Akka's BackoffSupervisor computes it.

    The n-th consecutive restart waits ``min(max, min * 2**n) * (1 + u * random_factor)``
    seconds for a uniform ``u`` in [0, 1). The count returns to zero once the
    child has run for ``reset_after`` seconds (Akka's auto-reset; defaults to
    ``min``, as Akka's does).
    """

    min: float = 0.1
    max: float = 10.0
    random_factor: float = 0.2
    reset_after: float | None = None

    @property
    def reset_period(self) -> float:
        """Seconds of stable running after which the back-off count resets."""
        return self.min if self.reset_after is None else self.reset_after


@dataclass(frozen=True)
class _ChildBase:
    """Fields every kind of child has."""

    name: str
    restart: RestartType = "permanent"
    shutdown: Shutdown = 5.0
    requires: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True, eq=True)
class Child(_ChildBase):
    """An actor child: ``actor`` is an :class:`ikos.Actor` subclass or ``"pkg.mod:Class"``.

    Example::

        Child("echo", Echo, restart="transient", shutdown=2.0, args=(1,))
    """

    actor: Any = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    mailbox_size: int = 1000
    start_timeout: float = 30.0
    backoff: Backoff | None = None
    #: Where its process runs: None, a local process; ``ikos.Ray(...)``, a Ray actor.
    placement: Ray | None = None

    def __init__(
        self,
        name: str,
        actor: Any,
        restart: RestartType = "permanent",
        shutdown: Shutdown = 5.0,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        requires: Sequence[str] = (),
        after: Sequence[str] = (),
        description: str = "",
        mailbox_size: int = 1000,
        start_timeout: float = 30.0,
        backoff: Backoff | None = None,
        placement: PlacementLike = None,
    ) -> None:
        _set(self, name=name, actor=actor, restart=restart, shutdown=shutdown)
        _set(self, args=tuple(args), kwargs=dict(kwargs or {}), requires=_names(requires))
        _set(self, after=_names(after), description=description, mailbox_size=mailbox_size)
        _set(self, start_timeout=start_timeout, backoff=backoff)
        _set(self, placement=placement_of(placement, name))  # ikos.Ray (issue 13)

    @property
    def actor_path(self) -> str:
        """``module:qualname`` of the actor class (for display and the fork server)."""
        if isinstance(self.actor, str):
            return self.actor
        from ikos.actors._carried import CarriedActor

        if isinstance(self.actor, CarriedActor):
            return self.actor.class_path
        return f"{self.actor.__module__}:{self.actor.__qualname__}"


def exit_statuses(value: object) -> tuple[int | str, ...]:
    """Exit statuses (0-255) and signal names, normalised (``"TERM"`` -> ``"SIGTERM"``)."""
    expected = "a list of exit statuses (0-255) and signal names, like [143, 'SIGTERM']"
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise InvalidField(None, expected, value)
    out: list[int | str] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= 255:
            out.append(item)
        elif isinstance(item, str) and item.isdigit() and int(item) <= 255:
            out.append(int(item))
        else:
            try:
                out.append(signal_name(parse_signal(item)))
            except ValueError:
                raise InvalidField(None, expected, value) from None
    return tuple(dict.fromkeys(out))


#: The keywords of ``ikos.Exec`` that every kind of child has, plus ``start_timeout``.
EXEC_SPEC_KEYS: tuple[str, ...] = (
    "restart", "shutdown", "requires", "after", "description", "start_timeout", "backoff",
)  # fmt: skip
_NO_OPTIONS = ExecOptions()


@dataclass(frozen=True, eq=True)
class Exec(_ChildBase):
    """An external executable supervised like any child.

    ``fields`` are those of the design's ``daemon_config_t`` and the contract
    (``args``, ``environment``, ``working_directory``, ``type``, ``stdout``...,
    see ``docs/configuration.md``): the process-shaping ones are kept,
    checked and normalised, in :attr:`options` (an
    :class:`~ikos.platform._exec_options.ExecOptions`), the restart policy
    (``auto_start``, ``auto_restart``, ``restart_delay``, ``max_restarts``,
    ``restart_on``) as attributes of the spec. An unknown field or a value of
    the wrong kind is a :class:`SpecError` naming the daemon and the field,
    raised here; what depends on the machine (does the user exist) is checked
    when the daemon starts. Specs are values: hashable, equal when they run
    the same process with the same policy.

    Example::

        Exec("web", "/usr/sbin/nginx", args=["-g", "daemon off;"], user="www-data",
             restart_delay=1.5, limits={"nofile": 4096})
    """

    executable: str = ""
    start_timeout: float = 30.0
    backoff: Backoff | None = None
    options: ExecOptions = _NO_OPTIONS
    auto_start: bool = option(
        True, boolean, "start with the tree (false: stopped until started)", restarts=False
    )
    auto_restart: bool = option(
        True, boolean, "restart after an exit at all (false: never)", restarts=False
    )
    restart_delay: float = option(
        0.0, seconds(), "seconds to wait before each restart", restarts=False
    )
    max_restarts: int | None = option(
        None,
        integer(0),
        "restarts after which the daemon is failed (none: no limit)",
        restarts=False,
    )
    restart_window: float | None = option(
        None,
        seconds(zero_ok=False),
        "max_restarts counts the restarts of this many seconds, a sliding window "
        "(systemd's StartLimitIntervalSec=); none: of the daemon's whole life",
        restarts=False,
    )
    restart_on: str | None = option(
        None, choice(RESTART_ON), "systemd's Restart=: which exits restart", restarts=False
    )
    success_exit_status: tuple[int | str, ...] = option(
        (), exit_statuses, "exits that count as clean (SuccessExitStatus=)", restarts=False
    )
    restart_prevent_exit_status: tuple[int | str, ...] = option(
        (), exit_statuses, "exits never restarted (RestartPreventExitStatus=)", restarts=False
    )

    def __init__(
        self,
        name: str,
        executable: str,
        *,
        restart: RestartType = "permanent",
        shutdown: Shutdown = 5.0,
        requires: Sequence[str] = (),
        after: Sequence[str] = (),
        description: str = "",
        start_timeout: float = 30.0,
        backoff: Backoff | None = None,
        options: ExecOptions | None = None,
        fields: Mapping[str, Any] | None = None,
        **more_fields: Any,
    ) -> None:
        # `options` (and the policy keywords) let dataclasses.replace() rebuild an
        # Exec; `fields` is the older spelling of the keywords. Users pass keywords.
        _set(self, name=name, executable=executable, restart=restart, shutdown=shutdown)
        _set(self, requires=_names(requires), after=_names(after), description=description)
        _set(self, start_timeout=start_timeout, backoff=backoff)
        try:
            values = check_fields(EXEC_FIELDS, {**(fields or {}), **more_fields})
        except UnknownField as exc:
            known = (*EXEC_FIELDS, *EXEC_SPEC_KEYS)
            unknown = UnknownField.among(str(exc.key), known, "executable field")
            raise SpecError(name, unknown.key, unknown.expected) from None
        except InvalidField as exc:
            raise SpecError(name, exc.key, exc.expected, exc.got) from None
        given = {k: v for k, v in values.items() if k in EXEC_OPTIONS}
        if options is None:
            options = ExecOptions(**given) if given else _NO_OPTIONS
        elif given:
            options = dataclasses.replace(options, **given)
        _set(self, options=options)
        for key, spec in RESTART_POLICY.items():
            _set(self, **{key: values.get(key, spec.default)})

    # -- systemd units (ikos/platform/_unit.py reads them) ---------------------------------

    @classmethod
    def from_unit(
        cls,
        path: str | os.PathLike[str],
        name: str | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
        **fields: Any,
    ) -> Exec:
        """An executable from a systemd ``.service`` file, run as the unit says.

        ``name`` defaults to the unit's name without ``.service``; a template
        runs as ``from_unit("/lib/systemd/system/redis-server@6380.service")``.
        ``root`` is the instance root under which ``RuntimeDirectory=`` and
        ``%t`` live (default ``/``). Keywords override what the unit says
        (``restart_on="always"``, ``requires=[...]``). Every directive ikos
        ignores, and every dependency on a unit it does not run, is logged
        once as a warning naming file and line; a unit that cannot run (no
        ``ExecStart=``, an unknown ``Type=``) raises
        :class:`~ikos.platform._unit.UnitError` naming file and line.

        Example::

            Exec.from_unit("/lib/systemd/system/redis-server.service", "redis")
        """
        from ikos.platform._unit import link_units, load_unit

        unit = load_unit(path, name=name, root=root)
        _, unknown = link_units([unit], {})
        for line in (*unit.warnings, *unknown):
            log.warning("%s", line)
        return exec_from_unit(unit, **fields)

    @classmethod
    def from_units(
        cls, directory: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
    ) -> list[Exec]:
        """Every ``*.service`` of ``directory`` (templates left out), dependencies linked.

        ``Requires=``/``Wants=`` and ``After=``/``Before=`` between these
        units become ``requires`` and ``after``; the others are logged.

        Example::

            Supervisor("units", children=Exec.from_units("/etc/ikos/units"))
        """
        specs, warnings = units_in_directory(directory, root=root)
        for line in warnings:
            log.warning("%s", line)
        return specs

    @property
    def fields(self) -> Mapping[str, Any]:
        """The fields set to other than their defaults, by name (normalised values).

        Example: ``Exec("x", "/bin/true", umask="027").fields == {"umask": 0o27}``.
        """
        policy = {
            key: getattr(self, key)
            for key, spec in RESTART_POLICY.items()
            if getattr(self, key) != spec.default
        }
        return FrozenDict({**self.options.changed_fields(), **policy})


def exec_from_unit(
    unit: UnitSpec,
    requires: Sequence[str] = (),
    after: Sequence[str] = (),
    **overrides: Any,
) -> Exec:
    """The :class:`Exec` of a mapped unit; ``overrides`` win over what the unit says.

    A value the unit gives that ikos refuses raises
    :class:`~ikos.platform._unit.UnitError` naming the unit's file.
    """
    values = {**unit.fields, **overrides}
    if overrides.keys() & {"reload_signal", "reload_command", "exec_reload"}:
        values.pop("reloadable", None)  # a reload the user gives is one the unit can do
    try:
        return Exec(unit.name, unit.executable, requires=requires, after=after, **values)
    except SpecError as exc:
        if exc.key is not None and exc.key in overrides:
            raise
        from ikos.platform._unit import UnitError

        raise UnitError(unit.file, None, None, str(exc)) from None


def units_in_directory(
    directory: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> tuple[list[Exec], list[str]]:
    """The executables of a directory's units, their dependencies linked, and the warnings."""
    from ikos.platform._unit import link_units, load_unit, unit_files

    units = [load_unit(path, root=root) for path in unit_files(directory)]
    deps, warnings = link_units(units, {u.unit_name: u.name for u in units})
    specs = [exec_from_unit(u, *deps[u.name]) for u in units]
    return specs, [line for u in units for line in u.warnings] + warnings


#: The restart policy's fields (attributes of :class:`Exec`), by name.
RESTART_POLICY: Mapping[str, FieldSpec] = FrozenDict(field_table(Exec))
#: Every field of an executable: its process options, then its restart policy.
EXEC_FIELDS: Mapping[str, FieldSpec] = FrozenDict({**EXEC_OPTIONS, **RESTART_POLICY})


@dataclass(frozen=True, eq=True)
class Supervisor(_ChildBase):
    """A supervisor: runs ``children`` under ``strategy`` with OTP's restart intensity.

    More than ``max_restarts`` restarts within ``within`` seconds make it stop
    its children in reverse start order and fail to its parent. With
    ``simple_one_for_one``, ``children`` holds exactly one template child and
    instances are added at run time.

    Example::

        Supervisor("root", strategy="one_for_all", max_restarts=3, within=10,
                   children=[Child("db", Db), Child("api", Api, requires=["db"])])
    """

    strategy: Strategy = "one_for_one"
    max_restarts: int = 1
    within: float = 5.0
    children: tuple[Child | Exec | Supervisor, ...] = ()
    backoff: Backoff | None = None
    #: Given to every actor child below that names no placement of its own.
    placement: Ray | None = None

    def __init__(
        self,
        name: str,
        strategy: Strategy = "one_for_one",
        max_restarts: int = 1,
        within: float = 5.0,
        children: Sequence[Child | Exec | Supervisor] = (),
        *,
        restart: RestartType = "permanent",
        shutdown: Shutdown = "infinity",
        requires: Sequence[str] = (),
        after: Sequence[str] = (),
        description: str = "",
        backoff: Backoff | None = None,
        placement: PlacementLike = None,
    ) -> None:
        _set(self, name=name, strategy=strategy, max_restarts=max_restarts, within=within)
        _set(self, placement=placement_of(placement, name))  # ikos.Ray (issue 13)
        children = tuple(_placed(c, self.placement) for c in children)
        _set(self, children=children, restart=restart, shutdown=shutdown)
        _set(self, requires=_names(requires), after=_names(after), description=description)
        _set(self, backoff=backoff)

    def walk(self, path: str = "") -> Iterator[tuple[str, Child | Exec | Supervisor]]:
        """Yield ``(path, spec)`` for this supervisor and every descendant, depth first."""
        here = f"{path}/{self.name}" if path else self.name
        yield here, self
        for child in self.children:
            if isinstance(child, Supervisor):
                yield from child.walk(here)
            else:
                yield f"{here}/{child.name}", child


AnySpec: TypeAlias = Child | Exec | Supervisor


def _names(value: Sequence[str] | str) -> tuple[str, ...]:
    """``requires``/``after`` as a tuple; a lone string stays one name, not its letters."""
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _placed(child: AnySpec, placement: Ray | None) -> AnySpec:
    """``child`` with the supervisor's ``placement`` where it names none (executables
    always run locally: Ray runs Python actors)."""
    if placement is None or isinstance(child, Exec) or child.placement is not None:
        return child
    if isinstance(child, Supervisor):
        return Supervisor(
            child.name, child.strategy, child.max_restarts, child.within, child.children,
            restart=child.restart, shutdown=child.shutdown, requires=child.requires,
            after=child.after, description=child.description, backoff=child.backoff,
            placement=placement,
        )  # fmt: skip
    return dataclasses.replace(child, placement=placement)


def _set(obj: object, **values: Any) -> None:
    for key, value in values.items():
        object.__setattr__(obj, key, value)


def resolve_actor_class(ref: Any) -> type:
    """Import ``"pkg.mod:Class"`` (or return a class as is)."""
    if not isinstance(ref, str):
        return ref  # type: ignore[no-any-return]
    module_name, sep, qualname = ref.partition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"expected 'package.module:Class', got {ref!r}")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise ValueError(f"{ref!r} is not a class")
    return obj


def _check_common(path: str, spec: AnySpec) -> None:
    if not isinstance(spec.name, str) or not NAME_RE.fullmatch(spec.name):
        raise SpecError(path, "name", NAME_RULE, spec.name)
    if not isinstance(spec.description, str):
        raise SpecError(path, "description", "a string", spec.description)
    if spec.restart not in RESTART_TYPES:
        raise SpecError(path, "restart", "one of " + ", ".join(RESTART_TYPES), spec.restart)
    sd = spec.shutdown
    if not (
        sd in ("brutal_kill", "infinity")
        or (
            isinstance(sd, int | float)
            and not isinstance(sd, bool)
            and sd >= 0
            and math.isfinite(sd)
        )
    ):
        raise SpecError(path, "shutdown", "seconds >= 0, 'brutal_kill' or 'infinity'", sd)
    for key in ("requires", "after"):
        names = getattr(spec, key)
        if not all(isinstance(n, str) and n for n in names):
            raise SpecError(path, key, "a list of child names", list(names))
        if spec.name in names:
            raise SpecError(path, key, "names other than the child itself", spec.name)
    if spec.backoff is not None:
        _check_backoff(path, spec.backoff)


def _check_backoff(path: str, b: Backoff) -> None:
    if not isinstance(b, Backoff):
        raise SpecError(path, "backoff", "an ikos.Backoff", b)
    if not (_number(b.min) and b.min > 0):
        raise SpecError(path, "backoff.min", "seconds > 0", b.min)
    if not (_number(b.max) and b.max >= b.min):
        raise SpecError(path, "backoff.max", f"seconds >= backoff.min ({b.min})", b.max)
    if not (_number(b.random_factor) and b.random_factor >= 0):
        raise SpecError(path, "backoff.random_factor", "a number >= 0", b.random_factor)
    if b.reset_after is not None and not (_number(b.reset_after) and b.reset_after >= 0):
        raise SpecError(path, "backoff.reset_after", "seconds >= 0", b.reset_after)


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate_child(path: str, spec: AnySpec) -> None:
    """Validate one child spec (not its descendants); raise :class:`SpecError`."""
    if isinstance(spec, Supervisor):
        _check_common(path, spec)
        if spec.strategy not in STRATEGIES:
            raise SpecError(path, "strategy", "one of " + ", ".join(STRATEGIES), spec.strategy)
        mr = spec.max_restarts
        if not (isinstance(mr, int) and not isinstance(mr, bool) and mr >= 0):
            raise SpecError(path, "max_restarts", "an integer >= 0", mr)
        if not (_number(spec.within) and spec.within > 0):
            raise SpecError(path, "within", "seconds > 0", spec.within)
        if spec.strategy == "simple_one_for_one" and (
            len(spec.children) != 1 or isinstance(spec.children[0], Supervisor)
        ):
            raise SpecError(
                path, "children", "exactly one template Child or Exec for simple_one_for_one"
            )
        return
    if isinstance(spec, Child):
        _check_common(path, spec)
        from ikos.actors._actor import Actor  # lower layer: supervision builds on actors
        from ikos.actors._carried import CarriedActor

        # a class carried by value was checked where it was encoded: loading it here
        # would run the client's code in this process
        if not isinstance(spec.actor, CarriedActor):
            try:
                cls = resolve_actor_class(spec.actor)
            except (ImportError, AttributeError, ValueError) as exc:
                raise SpecError(
                    path, "actor", "an importable ikos.Actor subclass", f"{spec.actor}: {exc}"
                )
            if not (isinstance(cls, type) and issubclass(cls, Actor)):
                raise SpecError(path, "actor", "a subclass of ikos.Actor", spec.actor)
        ms = spec.mailbox_size
        if not (isinstance(ms, int) and not isinstance(ms, bool) and ms >= 1):
            raise SpecError(path, "mailbox_size", "an integer >= 1", ms)
        if not (_number(spec.start_timeout) and spec.start_timeout > 0):
            raise SpecError(path, "start_timeout", "seconds > 0", spec.start_timeout)
        return
    if isinstance(spec, Exec):
        _check_common(path, spec)
        if not isinstance(spec.executable, str) or not spec.executable:
            raise SpecError(path, "executable", "a path to an executable", spec.executable)
        if not (_number(spec.start_timeout) and spec.start_timeout > 0):
            raise SpecError(path, "start_timeout", "seconds > 0", spec.start_timeout)
        return
    raise SpecError(path, None, "an ikos.Child, ikos.Exec or ikos.Supervisor", type(spec).__name__)


def validate_tree(root: object) -> Supervisor:
    """Validate a whole tree: every spec, unique names tree-wide, known dependencies.

    Returns the tree typed as a :class:`Supervisor`; raises :class:`SpecError`
    naming the path of the first problem found.
    """
    if not isinstance(root, Supervisor):
        raise SpecError("<tree>", None, "an ikos.Supervisor as the root", type(root).__name__)
    seen: dict[str, str] = {}
    specs: list[tuple[str, AnySpec]] = []

    def visit(path: str, spec: object) -> None:
        if not isinstance(spec, Child | Exec | Supervisor):
            raise SpecError(path, None, "an ikos.Child, ikos.Exec or ikos.Supervisor", repr(spec))
        here = f"{path}/{spec.name}" if path else str(spec.name)
        validate_child(here, spec)
        if spec.name in seen:
            raise SpecError(
                here, "name", f"a name unique in the tree (also at {seen[spec.name]})", spec.name
            )
        seen[spec.name] = here
        specs.append((here, spec))
        if isinstance(spec, Supervisor):
            for child in spec.children:
                visit(here, child)

    visit("", root)
    for here, spec in specs:
        for key in ("requires", "after"):
            for dep in getattr(spec, key):
                if dep not in seen:
                    raise SpecError(here, key, "the name of a child in the tree", dep)
    return root
