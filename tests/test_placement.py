"""Placement values, their configuration and their display, without Ray (issue 13).

What runs on a Ray cluster is tested in tests/test_ray.py (skipped where Ray is
not installed); the spec values, the TOML form and the CLI's NODE column are
plain code, checked here everywhere.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import ikos
from ikos.cli._render import Style, render_list, render_tree
from ikos.cli._top import top_rows


def test_placement_is_a_checked_value() -> None:
    assert ikos.Ray({"zone_a": 1}) == ikos.Ray(resources={"zone_a": 1.0})
    assert ikos.Child("x", "m:C", placement="ray").placement == ikos.Ray()
    with pytest.raises(ikos.SpecError, match=r"resources\.zone_a"):
        ikos.Ray({"zone_a": -1})
    with pytest.raises(ikos.SpecError, match="placement"):
        ikos.Child("x", "m:C", placement="moon")
    sup = ikos.Supervisor("s", children=[ikos.Child("x", "m:C")], placement=ikos.Ray({"z": 1}))
    assert sup.children[0].placement == ikos.Ray({"z": 1})  # inherited by the children


def test_config_reads_ray_address_and_placement(tmp_path: Path) -> None:
    from ikos.manager._config import load_config

    path = tmp_path / "ikos.toml"
    path.write_text(
        textwrap.dedent("""
        [ray]
        address = "10.0.0.1:6379"

        [supervisors.pool]
        placement = { resources = { zone_a = 0.5 } }

        [actors.w]
        class = "ray_actors:Where"
        supervisor = "pool"

        [actors.local]
        class = "ray_actors:Where"
        placement = "local"
        """)
    )
    loaded = load_config(path)
    assert loaded.settings.ray_address == "10.0.0.1:6379"
    pool = next(s for _, s in loaded.tree.walk() if s.name == "pool")
    w = next(s for _, s in loaded.tree.walk() if s.name == "w")
    local = next(s for _, s in loaded.tree.walk() if s.name == "local")
    assert pool.placement == ikos.Ray({"zone_a": 0.5}) == w.placement
    assert local.placement is None


def _status(name: str, node: str | None = None) -> dict[str, object]:
    status: dict[str, object] = {"name": name, "kind": "actor", "state": "running", "pid": 7,
                                 "restarts": 0, "supervisor": "root"}  # fmt: skip
    if node is not None:
        status.update(placement="ray", node=node, node_id="0123456789abcdef")
    return status


def test_node_column_only_when_some_daemon_is_placed() -> None:
    pipe = Style(color=False, unicode=False, table=False)
    local = render_list([_status("a")], pipe, now=0.0)
    assert local.splitlines() == ["a\tactor\trunning\t7\t0\t-\troot"]  # unchanged
    mixed = render_list([_status("a"), _status("w", "10.0.0.2")], pipe, now=0.0)
    assert [line.split("\t")[-1] for line in mixed.splitlines()] == ["-", "10.0.0.2 01234567"]
    assert "@10.0.0.2 01234567" in render_tree(_status("w", "10.0.0.2"), pipe)
    rows = top_rows([_status("a"), _status("w", "10.0.0.2")])
    assert "node" not in rows[0] and rows[1]["node"] == "10.0.0.2"


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ("placement = { resource = { a = 1 } }", "key 'placement'"),
        ("placement = { resources = { a = -1 } }", "key 'placement.resources.a'"),
        ("placement = 5", "key 'placement'"),
    ],
)
def test_a_bad_placement_names_file_table_and_key(tmp_path: Path, entry: str, key: str) -> None:
    from ikos.manager._config import load_config

    path = tmp_path / "ikos.toml"
    path.write_text(f'[actors.w]\nclass = "ray_actors:Where"\n{entry}\n')
    with pytest.raises(ikos.ConfigError) as bad:
        load_config(path)
    assert str(path) in str(bad.value) and "[actors.w]" in str(bad.value)
    assert key in str(bad.value)
