"""``ikosctl top``: the daemons' resource usage, as a snapshot or a refreshing view.

The figures are the ``usage`` objects ikosd's sampler adds to each
daemon's status (docs/operations.md), read with the ``list`` request: no
verb of its own, so ``top`` sees exactly what ``list`` may show to its
caller. ``list`` is public, but ``usage`` is not among the fields every user
sees: a caller who is not root, the owner or in the reader group gets names,
states, pids and restarts with the usage left blank, as for ``status``.

On a terminal (unless ``--once`` or ``--json``) the table is redrawn every
``--interval`` seconds on the alternate screen, keys read in cbreak mode:
``q`` quits, ``c``/``m``/``r``/``n`` sort; the terminal is restored on
every way out (``q``, Ctrl-C, an error). Rejected: curses, whose
initialisation fails on terminals without a terminfo entry and which brings
nothing a table redrawn whole needs.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TextIO

from ikos.cli import _render
from ikos.cli._render import Style

__all__ = ["SORTS", "run_live", "sort_rows", "top_rows"]

#: The fields of a daemon's status that a ``top`` row keeps (``usage`` null when unknown).
ROW_FIELDS = ("name", "kind", "state", "pid", "restarts", "supervisor")
#: ``--sort`` keys, each with the key a person presses in the live view.
SORTS = {"cpu": "c", "memory": "m", "restarts": "r", "name": "n"}


def top_rows(statuses: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per daemon (supervisors have no processes of their own and are left out)."""
    rows = []
    for status in statuses:
        if status.get("kind") == "supervisor":
            continue
        row = {key: status.get(key) for key in ROW_FIELDS}
        usage = status.get("usage")
        row["usage"] = dict(usage) if isinstance(usage, Mapping) else None
        if status.get("placement") == "ray":  # where it runs (docs/scaling.md)
            row.update(placement="ray", node=status.get("node"), node_id=status.get("node_id"))
        rows.append(row)
    return rows


def _figure(row: Mapping[str, Any], *keys: str) -> float:
    usage = row.get("usage")
    if isinstance(usage, Mapping):
        for key in keys:
            value = usage.get(key)
            if isinstance(value, int | float):
                return float(value)
    return -1.0  # unknown sorts after every known figure


def sort_rows(rows: Sequence[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """``rows`` by ``by`` (one of :data:`SORTS`): the largest first, names alphabetically.

    ``memory`` is the unique set size where known, else the resident size;
    ``cpu`` the share over the last interval, then the CPU seconds.
    """
    by_name = sorted(rows, key=lambda r: str(r.get("name")))
    if by == "name":
        return by_name
    if by == "restarts":
        return sorted(by_name, key=lambda r: -int(r.get("restarts") or 0))
    if by == "memory":
        return sorted(by_name, key=lambda r: -_figure(r, "uss_bytes", "rss_bytes"))
    return sorted(by_name, key=lambda r: (-_figure(r, "cpu_percent"), -_figure(r, "cpu_seconds")))


def run_live(
    fetch: Callable[[], list[dict[str, Any]]], sort: str, interval: float, out: TextIO
) -> None:
    """Redraw the table every ``interval`` seconds until ``q`` or Ctrl-C (KeyboardInterrupt)."""
    with _screen(out), _keys() as read_key:
        while True:
            rows = sort_rows(fetch(), sort)
            out.write("\x1b[H\x1b[2J" + _frame(rows, sort, interval))
            out.flush()
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                key = read_key(left)
                if key in ("q", "Q"):
                    return
                chosen = next((s for s, k in SORTS.items() if k == key), None)
                if chosen is not None:
                    sort = chosen
                    break


def _frame(rows: list[dict[str, Any]], sort: str, interval: float) -> str:
    size = shutil.get_terminal_size()
    head = (
        f"ikos top - {time.strftime('%H:%M:%S')} - {len(rows)} daemons, sorted by {sort}, "
        f"every {interval:g}s - q quit, c/m/r/n sort"
    )
    table = _render.render_top(rows, Style(color=not os.environ.get("NO_COLOR"), table=True))
    lines = [head[: size.columns], "", *table.splitlines()]
    return "\n".join(lines[: max(size.lines - 1, 3)]) + "\n"


@contextlib.contextmanager
def _screen(out: TextIO) -> Iterator[None]:
    out.write("\x1b[?1049h\x1b[?25l")  # alternate screen, cursor hidden
    try:
        yield
    finally:
        out.write("\x1b[?25h\x1b[?1049l")
        out.flush()


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str | None]]:
    """A function reading one key within a timeout; keys unread when stdin is no terminal."""
    stdin = sys.stdin
    try:
        fd = stdin.fileno()
        interactive = os.isatty(fd)
    except (AttributeError, ValueError, OSError):
        fd, interactive = -1, False

    def wait(timeout: float) -> str | None:
        time.sleep(timeout)
        return None

    if not interactive:
        yield wait
        return
    saved = termios.tcgetattr(fd)

    def read(timeout: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return None
        data = os.read(fd, 32)
        return data[:1].decode(errors="replace") if data else "q"  # end of input: quit

    try:
        tty.setcbreak(fd)
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
