"""Validation of supervision-tree specs: every bad field is named, with its path.

``validate_tree`` refuses a tree before anything starts, with a
:class:`ikos.SpecError` whose text reads ``path: key: expected ..., got ...``
(OTP's ``check_childspecs``). The property test checks the documented rule
for the numeric and enumerated fields against an independent statement of
it (docs/configuration.md).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import signal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ikos
from ikos.platform._exec_options import EXEC_OPTIONS, ExecOptions
from ikos.platform._fields import FrozenDict
from ikos.platform._limits import ResourceLimits
from ikos.supervision._spec import (
    EXEC_FIELDS,
    RESTART_POLICY,
    Backoff,
    Child,
    Exec,
    Supervisor,
    validate_child,
    validate_tree,
)


class Echo(ikos.Actor):
    def receive(self, message: Any) -> Any:
        return message


class NotAnActor:
    pass


def nested(leaf: Child | Exec | Supervisor) -> Supervisor:
    """``root/workers/<leaf>`` next to a harmless sibling."""
    return Supervisor(
        "root",
        children=[
            Child("logger", Echo),
            Supervisor("workers", strategy="one_for_all", children=[leaf]),
        ],
    )


def refused(tree: object) -> ikos.SpecError:
    with pytest.raises(ikos.SpecError) as info:
        validate_tree(tree)
    return info.value


def test_a_valid_tree_passes_and_comes_back():
    tree = Supervisor(
        "root",
        strategy="rest_for_one",
        max_restarts=0,
        within=0.5,
        children=[
            Child("db", Echo, restart="transient", shutdown="brutal_kill"),
            Child("api", f"{__name__}:Echo", shutdown=0, requires=["db"], mailbox_size=1),
            Exec("helper", "/bin/true", restart="temporary", shutdown="infinity", after=["api"]),
            Supervisor(
                "pool",
                strategy="simple_one_for_one",
                children=[Child("worker", Echo, backoff=Backoff(min=0.01, max=0.01))],
                requires=["db"],
            ),
        ],
    )
    assert validate_tree(tree) is tree


# -- each bad field, named with its path ---------------------------------------------

CHILD_CASES = [
    # (field values, key named in the error, text expected in it)
    ({"restart": "sometimes"}, "restart", "expected one of permanent, transient, temporary"),
    ({"restart": None}, "restart", "one of"),
    ({"shutdown": -1}, "shutdown", "expected seconds >= 0, 'brutal_kill' or 'infinity'"),
    ({"shutdown": math.inf}, "shutdown", "seconds >= 0"),
    ({"shutdown": math.nan}, "shutdown", "seconds >= 0"),
    ({"shutdown": True}, "shutdown", "seconds >= 0"),
    ({"shutdown": "kill"}, "shutdown", "seconds >= 0"),
    ({"requires": [1]}, "requires", "a list of child names"),
    ({"requires": [""]}, "requires", "a list of child names"),
    ({"requires": ["echo"]}, "requires", "names other than the child itself"),
    ({"after": ["echo"]}, "after", "names other than the child itself"),
    ({"backoff": Backoff(min=0)}, "backoff.min", "seconds > 0"),
    ({"backoff": Backoff(min=math.nan)}, "backoff.min", "seconds > 0"),
    ({"backoff": Backoff(min=2, max=1)}, "backoff.max", "seconds >= backoff.min (2)"),
    ({"backoff": Backoff(random_factor=-0.1)}, "backoff.random_factor", "a number >= 0"),
    ({"backoff": Backoff(reset_after=-1)}, "backoff.reset_after", "seconds >= 0"),
    ({"backoff": {"min": 1}}, "backoff", "an ikos.Backoff"),
    ({"mailbox_size": 0}, "mailbox_size", "an integer >= 1"),
    ({"mailbox_size": 2.0}, "mailbox_size", "an integer >= 1"),
    ({"mailbox_size": True}, "mailbox_size", "an integer >= 1"),
    ({"start_timeout": 0}, "start_timeout", "seconds > 0"),
    ({"start_timeout": math.inf}, "start_timeout", "seconds > 0"),
    ({"actor": NotAnActor}, "actor", "a subclass of ikos.Actor"),
    ({"actor": Echo()}, "actor", "a subclass of ikos.Actor"),
    ({"actor": "no_such_module_here:Echo"}, "actor", "an importable ikos.Actor subclass"),
    ({"actor": f"{__name__}:Missing"}, "actor", "an importable ikos.Actor subclass"),
    ({"actor": __name__}, "actor", "an importable ikos.Actor subclass"),
    ({"actor": f"{__name__}:nested"}, "actor", "not a class"),
    ({"actor": f"{__name__}:NotAnActor"}, "actor", "a subclass of ikos.Actor"),
]


def child(**fields: Any) -> Child:
    actor = fields.pop("actor", Echo)
    return Child("echo", actor, **fields)


@pytest.mark.parametrize(("fields", "key", "text"), CHILD_CASES, ids=lambda v: str(v)[:40])
def test_bad_child_field_is_named_with_its_path(fields, key, text):
    err = refused(nested(child(**fields)))
    assert err.path == "root/workers/echo"
    assert err.key == key
    assert str(err).startswith(f"root/workers/echo: {key}: expected ")
    assert text in str(err)


@pytest.mark.parametrize(
    "name", ["", "-lead", "_lead", "has space", "a/b", "x" * 65, "é", 42, None, "a\nb"]
)
def test_bad_names(name):
    err = refused(nested(Child(name, Echo)))
    assert err.key == "name"
    assert err.path.startswith("root/workers/")
    assert "a name of 1-64 characters" in str(err)


@pytest.mark.parametrize("name", ["a", "A1", "x" * 64, "echo.1", "svc@host", "net-d", "a_b"])
def test_good_names(name):
    validate_tree(nested(Child(name, Echo)))


EXEC_CASES = [
    ({"executable": ""}, "executable", "a path to an executable"),
    ({"executable": None}, "executable", "a path to an executable"),
    ({"start_timeout": 0}, "start_timeout", "seconds > 0"),
    ({"description": 3}, "description", "a string"),
    ({"restart": "always"}, "restart", "one of"),
    ({"shutdown": -0.5}, "shutdown", "seconds >= 0"),
    ({"requires": ["tool"]}, "requires", "names other than the child itself"),
]


@pytest.mark.parametrize(("fields", "key", "text"), EXEC_CASES, ids=lambda v: str(v)[:40])
def test_bad_exec_field_is_named_with_its_path(fields, key, text):
    executable = fields.pop("executable", "/bin/true")
    err = refused(nested(Exec("tool", executable, **fields)))
    assert err.path == "root/workers/tool" and err.key == key
    assert str(err).startswith(f"root/workers/tool: {key}: expected ")
    assert text in str(err)


SUPERVISOR_CASES = [
    ({"strategy": "one_for_none"}, "strategy", "one of one_for_one, one_for_all"),
    ({"strategy": None}, "strategy", "one of"),
    ({"max_restarts": -1}, "max_restarts", "an integer >= 0, got -1"),
    ({"max_restarts": 1.5}, "max_restarts", "an integer >= 0"),
    ({"max_restarts": True}, "max_restarts", "an integer >= 0"),
    ({"max_restarts": "3"}, "max_restarts", "an integer >= 0"),
    ({"within": 0}, "within", "seconds > 0"),
    ({"within": -5}, "within", "seconds > 0"),
    ({"within": math.inf}, "within", "seconds > 0"),
    ({"within": False}, "within", "seconds > 0"),
    ({"restart": "never"}, "restart", "one of"),
    ({"shutdown": -1}, "shutdown", "seconds >= 0"),
    ({"backoff": Backoff(min=-1)}, "backoff.min", "seconds > 0"),
]


@pytest.mark.parametrize(("fields", "key", "text"), SUPERVISOR_CASES, ids=lambda v: str(v)[:40])
def test_bad_supervisor_field_is_named_with_its_path(fields, key, text):
    sub = Supervisor("sub", children=[Child("echo", Echo)], **fields)
    err = refused(nested(sub))
    assert err.path == "root/workers/sub" and err.key == key
    assert str(err).startswith(f"root/workers/sub: {key}: expected ")
    assert text in str(err)


def test_bad_root_fields_are_named_root():
    err = refused(Supervisor("root", strategy="bogus", children=[Child("echo", Echo)]))
    assert str(err) == (
        "root: strategy: expected one of one_for_one, one_for_all, rest_for_one, "
        "simple_one_for_one, got 'bogus'"
    )


@pytest.mark.parametrize("root", [42, None, "root", Child("echo", Echo), Exec("x", "/bin/true")])
def test_the_root_must_be_a_supervisor(root):
    err = refused(root)
    assert err.path == "<tree>"
    assert "an ikos.Supervisor as the root" in str(err)
    assert type(root).__name__ in str(err)


@pytest.mark.parametrize("thing", ["echo", Echo, 3, None])
def test_a_child_that_is_not_a_spec_is_named(thing):
    err = refused(Supervisor("root", children=[Child("ok", Echo), thing]))
    assert err.path == "root"
    assert "an ikos.Child, ikos.Exec or ikos.Supervisor" in str(err)


def test_validate_child_refuses_non_specs():
    with pytest.raises(ikos.SpecError, match=r"an ikos\.Child, ikos\.Exec or ikos\.Supervisor"):
        validate_child("root/x", "not a spec")  # type: ignore[arg-type]


# -- names across the tree ----------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "path", "first"),
    [
        (
            Supervisor("root", children=[Child("echo", Echo), Child("echo", Echo)]),
            "root/echo",
            "root/echo",
        ),
        (
            Supervisor(
                "root",
                children=[
                    Supervisor("a", children=[Child("echo", Echo)]),
                    Supervisor("b", children=[Supervisor("c", children=[Exec("echo", "/x")])]),
                ],
            ),
            "root/b/c/echo",
            "root/a/echo",
        ),
        (
            Supervisor("root", children=[Supervisor("echo"), Child("echo", Echo)]),
            "root/echo",
            "root/echo",
        ),
        (Supervisor("root", children=[Child("root", Echo)]), "root/root", "root"),
    ],
)
def test_duplicate_names_anywhere_in_the_tree(tree, path, first):
    err = refused(tree)
    assert err.path == path and err.key == "name"
    assert f"a name unique in the tree (also at {first})" in str(err)


def test_dependencies_must_name_children_of_the_tree():
    err = refused(
        Supervisor(
            "root",
            children=[
                Supervisor("a", children=[Child("db", Echo)]),
                Supervisor("b", children=[Child("api", Echo, requires=["db", "cache"])]),
            ],
        )
    )
    assert str(err) == "root/b/api: requires: expected the name of a child in the tree, got 'cache'"
    err = refused(Supervisor("root", children=[Exec("x", "/bin/true", after=["nowhere"])]))
    assert (err.path, err.key, err.got) == ("root/x", "after", "nowhere")


def test_dependencies_across_branches_are_fine():
    validate_tree(
        Supervisor(
            "root",
            children=[
                Supervisor("a", children=[Child("db", Echo)]),
                Supervisor("b", children=[Child("api", Echo, requires=["db"], after=["a"])]),
            ],
        )
    )


@pytest.mark.parametrize(
    "children",
    [
        [],
        [Child("w1", Echo), Child("w2", Echo)],
        [Supervisor("inner", children=[Child("w", Echo)])],
    ],
    ids=["none", "two", "a-supervisor"],
)
def test_simple_one_for_one_needs_exactly_one_template(children):
    err = refused(
        Supervisor("root", children=[Supervisor("pool", "simple_one_for_one", children=children)])
    )
    assert err.path == "root/pool" and err.key == "children"
    assert "exactly one template Child or Exec for simple_one_for_one" in str(err)


@pytest.mark.parametrize("template", [Child("w", Echo), Exec("w", "/bin/true")])
def test_simple_one_for_one_with_one_template(template):
    validate_tree(
        Supervisor("root", children=[Supervisor("pool", "simple_one_for_one", children=[template])])
    )


# -- the documented rule, by property -------------------------------------------------

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "permanent",
            "transient",
            "temporary",
            "brutal_kill",
            "infinity",
            "Permanent",
            "",
            "5",
            "kill",
        ]
    ),
)


def rule_restart(v: object) -> bool:
    return v in ("permanent", "transient", "temporary") and isinstance(v, str)


def is_number(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)  # type: ignore[arg-type]


def rule_shutdown(v: object) -> bool:
    # docs/configuration.md: seconds >= 0, "brutal_kill" or "infinity"
    return v in ("brutal_kill", "infinity") if isinstance(v, str) else is_number(v) and v >= 0  # type: ignore[operator]


def rule_max_restarts(v: object) -> bool:
    return type(v) is int and v >= 0


def rule_within(v: object) -> bool:
    return is_number(v) and v > 0  # type: ignore[operator]


@settings(max_examples=400, deadline=None)
@given(restart=ANY_VALUE, shutdown=ANY_VALUE, max_restarts=ANY_VALUE, within=ANY_VALUE)
def test_intensity_and_shutdown_fields_follow_the_documented_rule(
    restart, shutdown, max_restarts, within
):
    tree = Supervisor(
        "root",
        children=[
            Supervisor(
                "sup",
                max_restarts=max_restarts,
                within=within,
                children=[Child("echo", Echo, restart=restart, shutdown=shutdown)],
            )
        ],
    )
    bad = {
        key
        for key, ok in (
            ("restart", rule_restart(restart)),
            ("shutdown", rule_shutdown(shutdown)),
            ("max_restarts", rule_max_restarts(max_restarts)),
            ("within", rule_within(within)),
        )
        if not ok
    }
    if not bad:
        assert validate_tree(tree) is tree
        return
    with pytest.raises(ikos.SpecError) as info:
        validate_tree(tree)
    err = info.value
    assert err.key in bad
    assert err.path == ("root/sup" if err.key in ("max_restarts", "within") else "root/sup/echo")
    # The supervisor is checked before its children.
    if bad & {"max_restarts", "within"}:
        assert err.path == "root/sup"


@settings(max_examples=200, deadline=None)
@given(
    lo=st.floats(min_value=-1, max_value=100) | st.just(math.nan),
    hi=st.floats(min_value=-1, max_value=100) | st.just(math.inf),
    factor=st.floats(min_value=-1, max_value=5),
)
def test_backoff_rule(lo, hi, factor):
    ok = is_number(lo) and lo > 0 and is_number(hi) and hi >= lo and factor >= 0
    spec = Child("echo", Echo, backoff=Backoff(min=lo, max=hi, random_factor=factor))
    if ok:
        validate_tree(Supervisor("root", children=[spec]))
    else:
        err = refused(Supervisor("root", children=[spec]))
        assert err.path == "root/echo" and err.key.startswith("backoff.")


# --- the typed fields of an executable ----------------------------------------------------


def test_an_unknown_exec_keyword_is_refused_with_a_suggestion():
    with pytest.raises(ikos.SpecError) as info:
        Exec("web", "/bin/true", restart_dealy=3)
    assert (info.value.path, info.value.key) == ("web", "restart_dealy")
    assert str(info.value) == (
        "web: restart_dealy: expected a known executable field (did you mean 'restart_delay'?)"
    )
    with pytest.raises(ikos.SpecError, match="did you mean 'shutdown'"):
        Exec("web", "/bin/true", shutdwon=3)
    with pytest.raises(ikos.SpecError) as info:
        Exec("web", "/bin/true", colour="blue")
    assert "one of args, environment" in str(info.value)


@pytest.mark.parametrize(
    ("fields", "key", "text"),
    [
        ({"auto_start": "no"}, "auto_start", "true or false"),
        ({"auto_restart": 0}, "auto_restart", "true or false"),
        ({"restart_delay": -1}, "restart_delay", "seconds >= 0"),
        ({"restart_delay": math.nan}, "restart_delay", "seconds >= 0"),
        ({"max_restarts": 1.5}, "max_restarts", "an integer >= 0"),
        ({"restart_on": "sometimes"}, "restart_on", "one of no, always"),
        ({"umask": "089"}, "umask", "an octal string like '022'"),
        ({"environment": {"A": None}}, "environment.A", "a string"),
        ({"limits": {"nofile": -5}}, "limits.nofile", "an integer >= 0, 'infinity'"),
    ],
)
def test_a_field_of_the_wrong_kind_is_refused_naming_it(fields, key, text):
    with pytest.raises(ikos.SpecError) as info:
        Exec("web", "/bin/true", **fields)
    assert (info.value.path, info.value.key) == ("web", key)
    assert text in str(info.value)
    assert pickle.loads(pickle.dumps(info.value)).key == key


def test_exec_fields_are_typed_normalised_and_hashable():
    web = Exec(
        "web",
        "/usr/sbin/nginx",
        args=["-g", "daemon off;", 8080],
        environment={"PORT": 8080},
        umask="027",
        reload_signal="hup",
        stop_signal=2,
        limits={"nofile": [1024, 4096], "as": "infinity"},
        supplementary_groups="adm",
        auto_start=False,
        restart_delay=2,
        max_restarts=3,
    )
    o = web.options
    assert o.args == ("-g", "daemon off;", "8080")
    assert o.environment == {"PORT": "8080"} and isinstance(o.environment, FrozenDict)
    assert o.umask == 0o027
    assert o.reload_signal is signal.SIGHUP and o.stop_signal is signal.SIGINT
    assert o.limits == ResourceLimits(nofile=(1024, 4096), as_=-1)
    assert o.supplementary_groups == ("adm",)
    assert (web.auto_start, web.restart_delay, web.max_restarts) == (False, 2.0, 3)
    assert web.restart_on is None and web.auto_restart is True
    # specs are values: hashable, equal whatever the spelling, rebuilt by replace()
    same = Exec(
        "web",
        "/usr/sbin/nginx",
        args=("-g", "daemon off;", "8080"),
        environment={"PORT": "8080"},
        umask=0o27,
        reload_signal=signal.SIGHUP,
        stop_signal="SIGINT",
        limits=ResourceLimits(nofile=(1024, 4096), as_=-1),
        supplementary_groups=["adm"],
        auto_start=False,
        restart_delay=2.0,
        max_restarts=3,
    )
    assert web == same and hash(web) == hash(same) and len({web, same}) == 1
    assert dataclasses.replace(web, name="web2").options is web.options
    assert dataclasses.replace(web, name="web2") == Exec("web2", "/usr/sbin/nginx", **web.fields)
    assert web != dataclasses.replace(web, restart_delay=3.0)
    # a default given explicitly is the same spec as one left out
    assert Exec("x", "/bin/true", stdin="null", auto_start=True) == Exec("x", "/bin/true")
    assert Exec("x", "/bin/true", umask="022").fields == {"umask": 0o22}
    # reprs show what differs from the defaults, not twenty default fields
    assert repr(Exec("x", "/bin/true", umask="022", limits={"nofile": 4}).options) == (
        "ExecOptions(umask=18, limits=ResourceLimits(nofile=4))"
    )
    assert Exec("x", "/bin/true", fields={"user": "nobody"}).options.user == "nobody"


def test_the_field_table_is_one_and_each_check_is_idempotent():
    assert set(EXEC_FIELDS) == set(EXEC_OPTIONS) | set(RESTART_POLICY)
    assert not set(EXEC_OPTIONS) & set(RESTART_POLICY)
    assert {f.name for f in dataclasses.fields(ExecOptions)} == set(EXEC_OPTIONS)
    samples = {
        "args": ["a", 1],
        "environment": {"A": 1},
        "environment_files": "-/etc/default/x",
        "clear_environment": True,
        "working_directory": "~/www",
        "pid_file": "x.pid",
        "root_directory": "/srv/jail",
        "user": 0,
        "group": "adm",
        "supplementary_groups": [4, "adm"],
        "umask": "00022",
        "stdin": "file:/dev/null",
        "stdout": "append:x.log",
        "stderr": "inherit",
        "limits": {"nofile": 10, "memory_max": "1G", "cpu_quota": "50%", "tasks_max": "max"},
        "type": "notify",
        "reload_signal": 40,
        "reload_command": ["kill", -1, "$MAINPID"],
        "stop_signal": "sigquit",
        "watchdog_sec": 5,
        "kill_mode": "process-group",
        "exec_start_pre": "-/bin/echo 'a b' ; :/bin/x $$1",
        "exec_start_post": ["/bin/true"],
        "exec_stop": ["@/bin/kill kill -TERM $MAINPID"],
        "exec_reload": ['+/usr/bin/x "\\x01 y"'],
        "exec_stop_post": "-/bin/rm -f /run/x.lock",
        "reloadable": False,
        "expand_environment": True,
        "argv0": "redis",
        "directories": {"/run/x": "2755", "/var/lib/x": 0o700},
        "success_exit_status": [143, "TERM"],
        "restart_prevent_exit_status": "SIGKILL 1",
        "auto_start": False,
        "auto_restart": False,
        "restart_delay": 1,
        "max_restarts": 0,
        "restart_window": 10,
        "restart_on": "on-failure",
    }
    assert set(samples) == set(EXEC_FIELDS)
    for key, value in samples.items():
        field = EXEC_FIELDS[key]
        once = field.check(value)
        assert field.check(once) == once, key
        hash(once)
        # the JSON form reads back to the same value (what daemon_get gives, daemon_create takes)
        assert field.check(field.to_json(once)) == once, key
        assert field.doc, key
        if field.default is not None:
            assert field.check(field.default) == field.default, key


def test_a_lone_name_in_requires_or_after_is_one_name_not_its_letters() -> None:
    """``requires="db"`` used to become ``("d", "b")``, refused as unknown children 'd'."""
    for make in (
        lambda: Exec("web", "/bin/true", requires="db", after="log"),
        lambda: Child("web", "examples.actors:Echo", requires="db", after="log"),
        lambda: Supervisor("web", requires="db", after="log"),
    ):
        spec = make()
        assert (spec.requires, spec.after) == (("db",), ("log",))
