"""systemd's command lines: the ``Exec*=`` syntax, ``$VAR`` expansion, ExecStopPost='s environment.

The part of :mod:`ikos.platform._unit` that an executable's options need
without a unit file: ``exec_start_pre``, ``exec_stop``... are written in
systemd's ``Exec*=`` syntax in any ``ikos.Exec`` (:class:`UnitCommand`,
:func:`parse_command_list`), and the daemon that runs them expands their
``$VAR`` (:func:`expand_variables`) and gives ExecStopPost= its
``$SERVICE_RESULT`` (:func:`stop_post_environment`). It stands apart so that
ikosd imports the unit files' reader, its directive table and its dataclasses
only when a unit is used (docs/performance.md, "Launch"); ``_unit`` re-exports
every name. Pure functions, no process.
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "UnitCommand",
    "expand_variables",
    "parse_command_list",
    "split_command",
    "split_words",
    "stop_post_environment",
]

_SIMPLE_ESCAPES = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
    "\\": "\\", '"': '"', "'": "'", "s": " ", ";": ";",
}  # fmt: skip


def _unescape(text: str, i: int) -> tuple[str, int]:
    """The C escape starting after the backslash at ``text[i - 1]``; its end."""
    if i >= len(text):
        raise ValueError("a backslash at the end of the line")
    c = text[i]
    if c in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[c], i + 1
    for lead, digits, base in (("x", 2, 16), ("u", 4, 16), ("U", 8, 16)):
        if c == lead:
            chunk = text[i + 1 : i + 1 + digits]
            if len(chunk) != digits or not all(ch in "0123456789abcdefABCDEF" for ch in chunk):
                raise ValueError(f"a bad escape \\{c}{chunk}")
            code = int(chunk, base)
            if code == 0:
                raise ValueError("a NUL byte (\\0) in a value")
            return chr(code), i + 1 + digits
    if c in "01234567":
        chunk = text[i : i + 3]
        if len(chunk) != 3 or not all(ch in "01234567" for ch in chunk) or int(chunk, 8) == 0:
            raise ValueError(f"a bad octal escape \\{chunk}")
        return chr(int(chunk, 8)), i + 3
    raise ValueError(f"an unknown escape \\{c}")


def split_words(text: str) -> list[tuple[str, bool]]:
    """Split ``text`` into words as systemd does; each with whether it was written ``;``.

    Blanks separate words; single or double quotes group (a quote opens
    only at the start of a word, and the word ends where it closes); C
    escapes (``\\n``, ``\\x41``, ``\\\\``...) are decoded everywhere. The
    flag is True for a bare ``;`` (a command separator in ``Exec*=``);
    ``\\;`` is a literal semicolon. Raises ValueError for an unclosed
    quote or a bad escape.

    >>> split_words("a 'b c' \\"d\\\\\\"e\\" \\\\; ;")
    [('a', False), ('b c', False), ('d"e', False), (';', False), (';', True)]
    """
    words: list[tuple[str, bool]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return words
        if text[i] in "'\"":
            quote = text[i]
            i += 1
            chars: list[str] = []
            while True:
                if i >= n:
                    raise ValueError(f"an unclosed {quote} quote")
                c = text[i]
                if c == quote:
                    i += 1
                    break
                if c == "\\":
                    decoded, i = _unescape(text, i + 1)
                    chars.append(decoded)
                    continue
                chars.append(c)
                i += 1
            if i < n and not text[i].isspace():
                raise ValueError(f"text right after a closing {quote} quote")
            words.append(("".join(chars), False))
            continue
        chars = []
        separator = text[i] == ";" and (i + 1 >= n or text[i + 1].isspace())
        while i < n and not text[i].isspace():
            c = text[i]
            if c == "\\":
                decoded, i = _unescape(text, i + 1)
                chars.append(decoded)
                continue
            chars.append(c)
            i += 1
        words.append(("".join(chars), separator))


@dataclass(frozen=True)
class UnitCommand:
    """One command of an ``Exec*=`` line: its argv and what its prefixes ask.

    ``ignore_failure`` (``-``): a failure is logged and the next step runs;
    ``privileged`` (``+``): run as root with ikosd's privileges, not as
    ``User=``; ``argv0`` (``@``): the name the program sees as ``argv[0]``;
    ``expand`` (no ``:``): ``$VAR`` and ``${VAR}`` are expanded from the
    daemon's environment when it runs. The argv keeps its ``$`` until then.
    """

    argv: tuple[str, ...]
    ignore_failure: bool = False
    privileged: bool = False
    argv0: str | None = None
    expand: bool = True

    def __post_init__(self) -> None:
        if not self.argv or not self.argv[0]:
            raise ValueError("a command needs a program")

    def text(self) -> str:
        """The command in systemd's syntax (what :func:`parse_command_list` reads back)."""
        prefix = "-" * self.ignore_failure + "+" * self.privileged + ":" * (not self.expand)
        words = list(self.argv)
        if self.argv0 is not None:
            prefix += "@"
            words.insert(1, self.argv0)
        return prefix + " ".join(_quote(w) for w in words)


def _quote(word: str) -> str:
    if word and not any(c.isspace() or c in "'\"\\;" or not c.isprintable() for c in word):
        return word
    return '"' + "".join(_escape(c) for c in word) + '"'


def _escape(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if c.isprintable() or c == " ":
        return c
    code = ord(c)
    return (
        f"\\x{code:02x}"
        if code < 0x80
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def split_command(text: str) -> list[UnitCommand]:
    """The commands of one ``Exec*=`` value (several when separated by ``;``).

    Raises ValueError naming what is wrong (an empty command, a prefix
    ikos does not know, ``@`` without the argv[0] word...).

    >>> commands = split_command("-/bin/echo 'a b' ; @/bin/sh sh -c :")
    >>> [(c.argv, c.ignore_failure, c.argv0) for c in commands]
    [(('/bin/echo', 'a b'), True, None), (('/bin/sh', '-c', ':'), False, 'sh')]
    """
    words = split_words(text)
    if not words:
        return []
    groups: list[list[str]] = [[]]
    for word, is_separator in words:
        if is_separator:
            groups.append([])
        else:
            groups[-1].append(word)
    if not all(groups):
        raise ValueError("an empty command (two ';' in a row, or one at an end)")
    return [_command_from_words(group) for group in groups]


def _command_from_words(words: list[str]) -> UnitCommand:
    head = words[0]
    flags = ""
    while head and head[0] in "@-:+!":
        flags += head[0]
        head = head[1:]
    if "+" in flags and "!" in flags:
        raise ValueError("the prefixes + and ! exclude each other")
    argv = [head, *words[1:]]
    argv0 = None
    if "@" in flags:
        if len(argv) < 2:
            raise ValueError("the @ prefix needs the argv[0] word after the program")
        argv0 = argv.pop(1)
    if not argv[0]:
        raise ValueError("a command without a program")
    if "$" in argv[0] and ":" not in flags:
        raise ValueError(f"the program cannot come from a variable, got {argv[0]!r}")
    return UnitCommand(
        tuple(argv), ignore_failure="-" in flags, privileged="+" in flags, argv0=argv0,
        expand=":" not in flags,
    )  # fmt: skip


def parse_command_list(value: object) -> tuple[UnitCommand, ...]:
    """The ``exec_*`` options' values: command lines in systemd's syntax, or UnitCommands.

    A string is one ``Exec*=`` value (``;`` separates commands); a list holds
    strings or :class:`UnitCommand` values. Raises ValueError.
    """
    items = [value] if isinstance(value, str | UnitCommand) else value
    if not isinstance(items, list | tuple):
        raise ValueError("a command line or a list of command lines")
    commands: list[UnitCommand] = []
    for item in items:
        if isinstance(item, UnitCommand):
            commands.append(item)
        elif isinstance(item, str) and "\0" not in item:
            parsed = split_command(item)
            if not parsed:
                raise ValueError("an empty command line")
            commands += parsed
        else:
            raise ValueError("command lines (strings in systemd's Exec syntax)")
    return tuple(commands)


_VAR_WORD = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")
_VAR_BRACED = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_variables(words: Iterable[str], env: Mapping[str, str]) -> list[str]:
    """systemd's expansion of an Exec line's arguments (systemd.service(5)).

    A word that is exactly ``$NAME`` becomes the value split at blanks (zero
    or more words); ``${NAME}`` anywhere in a word becomes the value as is;
    ``$$`` is a literal ``$``. Unset variables are empty.

    >>> expand_variables(["-f", "$OPTS", "${DIR}/x", "$$5"], {"OPTS": "-a  -b", "DIR": "/d e"})
    ['-f', '-a', '-b', '/d e/x', '$5']
    """
    out: list[str] = []
    for word in words:
        whole = _VAR_WORD.match(word)
        if whole:
            out += env.get(whole.group(1), "").split()
            continue
        out.append(
            _VAR_BRACED.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), ""), word)
        )
    return out


#: Signals that end a daemon cleanly when it was asked to stop (systemd's rule for
#: $SERVICE_RESULT: SIGHUP, SIGINT, SIGTERM and SIGPIPE, besides the stop signal).
_CLEAN_STOP_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})
#: $SERVICE_RESULT for the reasons ikos gives an end it caused (the start timed out...).
_REASON_RESULTS = (("did not become ready", "timeout"), ("watchdog", "watchdog"),
                   ("forking:", "protocol"), ("internal error", "resources"))  # fmt: skip


def stop_post_environment(
    code: int | None,
    sig: int | None,
    *,
    reason: str = "",
    success: Iterable[int | str] = (),
    stop_signals: Iterable[int] | None = None,
) -> dict[str, str]:
    """ExecStopPost='s ``$SERVICE_RESULT``, ``$EXIT_CODE``, ``$EXIT_STATUS`` (systemd.exec(5)).

    ``code``/``sig``: how the main process ended; ``reason``: why ikos ended
    it, if it did (a start timeout, the watchdog, a forking daemon without
    its main process); ``success``: SuccessExitStatus=; ``stop_signals``:
    the stop signal(s) when a stop was asked for (None: it was not). A
    stop ended by one of them, or by SIGHUP/SIGINT/SIGTERM/SIGPIPE, is a
    ``success``; by another signal (the SIGKILL after the stop timeout), a
    ``timeout``.

    >>> stop_post_environment(None, 9)
    {'EXIT_CODE': 'killed', 'EXIT_STATUS': 'KILL', 'SERVICE_RESULT': 'signal'}
    >>> stop_post_environment(None, 15, stop_signals={15})["SERVICE_RESULT"]
    'success'
    """
    env: dict[str, str] = {}
    signame = None
    if sig is not None:
        with contextlib.suppress(ValueError):
            signame = signal.Signals(sig).name
        env["EXIT_CODE"], env["EXIT_STATUS"] = "killed", (signame or f"SIG{sig}")[3:]
    elif code is not None:
        env["EXIT_CODE"], env["EXIT_STATUS"] = "exited", str(code)
    clean = set(success)
    if reason:
        result = next((r for start, r in _REASON_RESULTS if start in reason), "exit-code")
    elif code == 0 or code in clean or (signame is not None and signame in clean):
        result = "success"
    elif stop_signals is not None and sig is not None:
        asked = {*stop_signals, *_CLEAN_STOP_SIGNALS}
        result = "success" if sig in asked else "timeout"
    else:
        result = "exit-code" if sig is None else "signal"
    env["SERVICE_RESULT"] = result
    return env
