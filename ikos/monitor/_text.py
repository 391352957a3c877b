"""Metric families written as text as their samples are added, without prometheus_client.

:class:`TextFamily` is what ikos's own collectors yield; the writer of the
endpoint (:mod:`ikos.monitor._exposition`) copies its lines as they are. It
lives apart from the writer and its HTTP server so that the collectors'
modules import neither ``http.server`` nor prometheus_client: ikosd loads
those only when the metrics endpoint is on (``--metrics off`` never does).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["TextFamily"]


#: most of a tree's samples (states, up, small counts), formatted once
_COMMON = {float(i): f"{i}.0" for i in range(10)}


def _float_text(value: float) -> str:
    """A value as Go (and so Prometheus) writes it: ``+Inf``, ``NaN``, ``1e+21``."""
    # only the metrics endpoint writes samples, and it has loaded prometheus_client
    from prometheus_client.utils import floatToGoString

    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _value(value: float) -> str:
    text = _COMMON.get(value)
    if text is None or (text == "0.0" and math.copysign(1.0, value) < 0):  # -0.0 == 0.0
        text = _float_text(value)
    return text


class TextFamily:
    """A metric family whose samples are written as text when they are added.

    What ikos's own collectors yield instead of prometheus_client's families:
    those build a ``Sample`` (a tuple and a dict) per sample for the writer to
    take apart again, a third of a scrape at 500 daemons. This one keeps the
    finished lines. The registry needs only ``name`` and ``type`` of it;
    :func:`render` writes ``lines`` as they are. ``kind``: ``counter``,
    ``gauge`` or ``histogram``; ``name`` without ``_total`` (as
    prometheus_client's families have it).
    """

    def __init__(self, name: str, kind: str, documentation: str, labels: Sequence[str] = ()):
        self.name, self.type, self.documentation = name, kind, documentation
        self.samples: list[Any] = []  # none as objects: everything is in ``lines``
        self.lines: list[str] = []
        self._sample = f"{name}_total" if kind == "counter" else name
        self._keys = [f'{key}="' for key in labels]

    def _head(self, sample: str, values: Sequence[str]) -> str:
        if not values:
            return sample
        inner = '",'.join([k + _escape(v) for k, v in zip(self._keys, values, strict=True)])
        return f'{sample}{{{inner}"}}'

    def add(self, values: Sequence[str], value: float) -> None:
        """A sample with these label values (in the order of ``labels``)."""
        self.lines.append(f"{self._head(self._sample, values)} {_value(value)}\n")

    def add_histogram(
        self, values: Sequence[str], buckets: Iterable[tuple[str, float]], total: float
    ) -> None:
        """A histogram's samples: cumulative ``buckets`` as (``le``, count), the last +Inf."""
        base = self._head(f"{self.name}_bucket", values)
        prefix = base[:-1] + ',le="' if values else base + '{le="'
        count = 0.0
        for le, count in buckets:
            self.lines.append(f'{prefix}{le}"}} {_value(count)}\n')
        self.lines.append(f"{self._head(self.name + '_count', values)} {_value(count)}\n")
        self.lines.append(f"{self._head(self.name + '_sum', values)} {_value(total)}\n")
