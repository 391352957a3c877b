"""``python -m examples.system.log``: query the logger and send it records from a shell.

A thin client of the ``log`` actor (the same requests ``ikosctl call log``
sends), for reading logs as lines rather than JSON::

    python -m examples.system.log --root .demo query --since 10m --level warning
    python -m examples.system.log --root .demo query --program 'cron*' --json
    python -m examples.system.log --root .demo send --level err --tag backup "disk full"
    python -m examples.system.log --root .demo stats

Exit status 0, or 1 with one line on stderr saying what was wrong (a bad
condition, the logger not running).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

import ikos
from examples.system.log import LogInputError, query, send


def format_line(record: dict[str, Any]) -> str:
    """A record as one line, as syslog files show them (local time, ``program[pid]``)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record["time"]))
    who = record.get("program") or "-"
    if record.get("pid"):
        who += f"[{record['pid']}]"
    host = record.get("host") or "-"
    error = f"  (unparsed: {record['error']})" if record.get("error") else ""
    return f"{stamp} {host} {who} {record['facility']}.{record['level']}: {record['msg']}{error}"


def _when(text: str) -> float | str:
    """Epoch seconds as a number; ``10m`` as the age ``-10m`` (argparse takes a
    leading ``-`` for an option); anything else (ISO 8601) as the logger reads it."""
    try:
        return float(text)
    except ValueError:
        pass
    if re.fullmatch(r"\d+(?:\.\d+)?[smhd]", text):
        return "-" + text
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.system.log", description=__doc__)
    parser.add_argument("--root", help="the instance root (default: as ikosctl finds it)")
    parser.add_argument("--name", default="log", help="the logger's name (default log)")
    verbs = parser.add_subparsers(dest="verb", required=True)
    q = verbs.add_parser("query", help="print the records that match, oldest first")
    q.add_argument("--since", type=_when, help="epoch seconds, ISO 8601, or an age: 10m, 2h, 1d")
    q.add_argument("--until", type=_when, help="as --since")
    q.add_argument("-p", "--program", help="a program name or glob")
    q.add_argument("-l", "--level", help="the least severe level shown")
    q.add_argument("-f", "--facility")
    q.add_argument("--host")
    q.add_argument("--uid", type=int, help="the sender's user id (syslog datagrams)")
    q.add_argument("-g", "--grep", help="a substring of the message")
    q.add_argument("-n", "--limit", type=int, help="the most records shown (default 100)")
    q.add_argument("--token", help="a session token, when the logger wants one")
    q.add_argument("--json", action="store_true", help="one JSON array")
    s = verbs.add_parser("send", help="log a message")
    s.add_argument("-l", "--level", default="info")
    s.add_argument("-t", "--tag", help="the program name (default: this one)")
    s.add_argument("-f", "--facility", default="user")
    s.add_argument("message", nargs="+")
    verbs.add_parser("stats", help="the logger's counters, files and forwarders (JSON)")
    args = parser.parse_args(argv)
    try:
        if args.verb == "query":
            keys = ("since", "until", "program", "level", "facility", "host", "uid", "grep",
                    "limit", "token")  # fmt: skip
            conditions = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
            records = query(name=args.name, root=args.root, **conditions)
            if args.json:
                print(json.dumps(records, ensure_ascii=False, indent=2))
            else:
                for record in records:
                    print(format_line(record))
        elif args.verb == "send":
            reply = send(
                " ".join(args.message),
                level=args.level,
                program=args.tag,
                facility=args.facility,
                wait=True,
                name=args.name,
                root=args.root,
            )
            if not reply or not reply.get("ok"):
                raise LogInputError((reply or {}).get("error", "the logger refused the record"))
        else:
            ref: ikos.ActorRef[Any] = ikos.ActorRef(args.name, root=args.root)
            print(json.dumps(ref.ask({"op": "stats"}, timeout=10.0), indent=2))
    except (LogInputError, ikos.IkosError) as exc:
        print(f"log: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
