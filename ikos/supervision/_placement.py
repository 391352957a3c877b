"""Where a child runs: ``placement=ikos.Ray(...)`` puts its actors on a Ray cluster.

A placement is a value, like the rest of a spec: frozen, hashable (so that the
reload diff compares it), validated when it is made, with errors that name
the field. It says *what the actor needs* (Ray resources, CPUs, memory, a
node, a placement group, node labels), never how to get it: the Ray spawner
(``ikos/manager/_ray.py``) turns it into the options of ``ray.remote``.
Nothing here imports Ray, so a tree that names a placement can be built,
validated and shown where Ray is not installed.

Rejected: an ``engine="ray"`` flag beside a dict of Ray options. A dict is not
hashable, its keys are checked by no one until the cluster refuses them, and
it would couple the spec to Ray's own option names; ``placement="ray"`` is
kept as a spelling of ``Ray()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ikos._errors import SpecError


@dataclass(frozen=True)
class Ray:
    """Run this child's actors (or a supervisor's) as Ray actors on the configured cluster.

    ``resources``: Ray custom resources the actor needs (``{"zone_a": 0.01}``
    lands it on a node that offers ``zone_a``); ``node``: a Ray node id or
    node IP address to pin it to (hard affinity); ``num_cpus``/``memory``:
    what Ray reserves for it (0 CPUs by default: an ikos actor mostly waits
    for messages); ``labels``: node labels it requires (Ray's label
    selector); ``placement_group``: the name of an existing placement group,
    with ``bundle`` its bundle index (-1: any).

    Example::

        ikos.Supervisor("pool", children=[...], placement=ikos.Ray(resources={"gpu_box": 1}))
    """

    resources: tuple[tuple[str, float], ...] = ()
    node: str | None = None
    num_cpus: float = 0.0
    memory: int | None = None
    labels: tuple[tuple[str, str], ...] = ()
    placement_group: str | None = None
    bundle: int = -1

    def __init__(
        self,
        resources: Mapping[str, float] | None = None,
        node: str | None = None,
        *,
        num_cpus: float = 0.0,
        memory: int | None = None,
        labels: Mapping[str, str] | None = None,
        placement_group: str | None = None,
        bundle: int = -1,
    ) -> None:
        where = "placement"
        res = dict(resources or {})
        for key, amount in res.items():
            if not isinstance(key, str) or not key:
                raise SpecError(where, "resources", "resource names as non-empty strings", key)
            if isinstance(amount, bool) or not isinstance(amount, int | float):
                raise SpecError(where, f"resources.{key}", "a number", amount)
            if not math.isfinite(amount) or amount <= 0:
                raise SpecError(where, f"resources.{key}", "a positive amount", amount)
        if node is not None and (not isinstance(node, str) or not node):
            raise SpecError(where, "node", "a Ray node id or IP address", node)
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, int | float) or num_cpus < 0:
            raise SpecError(where, "num_cpus", "a number >= 0", num_cpus)
        if memory is not None and (
            isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0
        ):
            raise SpecError(where, "memory", "a positive number of bytes", memory)
        lab = dict(labels or {})
        for key, value in lab.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise SpecError(where, "labels", "a table of strings", {key: value})
        if placement_group is not None and (
            not isinstance(placement_group, str) or not placement_group
        ):
            raise SpecError(
                where, "placement_group", "the name of a placement group", placement_group
            )
        if isinstance(bundle, bool) or not isinstance(bundle, int) or bundle < -1:
            raise SpecError(where, "bundle", "a bundle index (-1: any)", bundle)
        object.__setattr__(self, "resources", tuple(sorted((k, float(v)) for k, v in res.items())))
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "num_cpus", float(num_cpus))
        object.__setattr__(self, "memory", memory)
        object.__setattr__(self, "labels", tuple(sorted(lab.items())))
        object.__setattr__(self, "placement_group", placement_group)
        object.__setattr__(self, "bundle", bundle)

    def to_json(self) -> dict[str, Any]:
        """The placement as JSON (status objects, the bridge's requests)."""
        return {
            "resources": dict(self.resources),
            "node": self.node,
            "num_cpus": self.num_cpus,
            "memory": self.memory,
            "labels": dict(self.labels),
            "placement_group": self.placement_group,
            "bundle": self.bundle,
        }


#: What a child's ``placement`` may be given as.
PlacementLike = Ray | str | Mapping[str, Any] | None


def placement_of(value: Any, where: str) -> Ray | None:
    """``value`` as a placement: ``None``/``"local"`` (a local process), ``"ray"``
    (``Ray()``), a :class:`Ray`, or a table of its fields (the TOML form)."""
    if value is None or value == "local":
        return None
    if isinstance(value, Ray):
        return value
    if value == "ray":
        return Ray()
    if isinstance(value, Mapping):
        try:
            return Ray(**dict(value))
        except TypeError as exc:
            raise SpecError(where, "placement", f"the fields of ikos.Ray ({exc})", value)
    raise SpecError(where, "placement", 'ikos.Ray(...), "ray" or "local"', value)
