"""Daemon logs: line splitting, timestamped records, size rotation, tail, modes, followers."""

from __future__ import annotations

import grp
import os
import re
import stat
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ikos.monitor._logfile import (
    LineSplitter,
    RotatingLog,
    format_timestamp,
    secure_log_dir,
    tail,
)

RECORD_RE = re.compile(r"^(\S+) (stdout|stderr) (.*)$")


def records(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        m = RECORD_RE.match(line)
        assert m, line
        datetime.fromisoformat(m.group(1))  # a valid ISO-8601 timestamp
        out.append((m.group(2), m.group(3)))
    return out


def all_lines(log: RotatingLog) -> list[str]:
    """Every record's text, oldest file first."""
    files = [log.backup_path(n) for n in range(log.backups, 0, -1)] + [log.path]
    return [text for f in files if f.exists() for _, text in records(f)]


# -- records ---------------------------------------------------------------------------------


def test_record_format(tmp_path: Path) -> None:
    with RotatingLog(tmp_path / "web.log") as log:
        log.write_lines("stdout", ["hello", "world"], when=1_700_000_000.123456)
        log.write("stderr", "oops\r")
        log.write("stdout", "two\nlines")
    text = (tmp_path / "web.log").read_text().splitlines()
    stamp = format_timestamp(1_700_000_000.123456)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", stamp)
    assert datetime.fromisoformat(stamp).timestamp() == pytest.approx(1_700_000_000.123, abs=1e-3)
    assert text[:2] == [f"{stamp} stdout hello", f"{stamp} stdout world"]
    assert records(tmp_path / "web.log")[2:] == [
        ("stderr", "oops"),
        ("stdout", "two"),
        ("stdout", "lines"),
    ]


def test_flushed_per_batch(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "a.log")
    try:
        log.write_lines("stdout", ["one", "two"])
        # Another reader sees the batch without close().
        assert [t for _, t in records(tmp_path / "a.log")] == ["one", "two"]
    finally:
        log.close()


def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    with RotatingLog(tmp_path / "a.log") as log:
        log.write("stdout", "first run")
    with RotatingLog(tmp_path / "a.log") as log:
        log.write("stdout", "second run")
    assert [t for _, t in records(tmp_path / "a.log")] == ["first run", "second run"]


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RotatingLog(tmp_path / "x.log", max_bytes=0)
    with pytest.raises(ValueError):
        RotatingLog(tmp_path / "x.log", backups=-1)
    with RotatingLog(tmp_path / "x.log") as log, pytest.raises(ValueError):
        log.write("std out", "x")


# -- rotation --------------------------------------------------------------------------------


def test_rotation_keeps_exactly_backups_files_and_the_order(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    log = RotatingLog(path, max_bytes=1000, backups=3)
    try:
        for i in range(500):
            log.write("stdout" if i % 2 else "stderr", f"line {i:04d}")
    finally:
        log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["svc.log", "svc.log.1", "svc.log.2", "svc.log.3"]
    for p in tmp_path.iterdir():
        assert p.stat().st_size <= 1000
    kept = all_lines(log)
    # The newest lines, contiguous and in order across the files.
    assert kept == [f"line {i:04d}" for i in range(500 - len(kept), 500)]
    assert len(kept) > 3 * 20


def test_backups_zero_truncates(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    with RotatingLog(path, max_bytes=300, backups=0) as log:
        for i in range(100):
            log.write("stdout", f"line {i}")
    assert [p.name for p in tmp_path.iterdir()] == ["svc.log"]
    assert records(path)[-1] == ("stdout", "line 99")
    assert path.stat().st_size <= 300


def test_fewer_backups_than_before_removes_the_extra_files(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    with RotatingLog(path, max_bytes=200, backups=5) as log:
        for i in range(200):
            log.write("stdout", f"line {i}")
    assert (tmp_path / "svc.log.5").exists()
    with RotatingLog(path, max_bytes=200, backups=2) as log:
        for i in range(50):
            log.write("stdout", f"again {i}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.log", "svc.log.1", "svc.log.2"]


def test_a_record_larger_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    with RotatingLog(path, max_bytes=100, backups=2) as log:
        log.write("stdout", "small")
        log.write("stdout", "x" * 500)
        log.write("stdout", "after")
    assert [t for _, t in records(path)] == ["after"]
    assert [t for _, t in records(tmp_path / "svc.log.1")] == ["x" * 500]
    assert [t for _, t in records(tmp_path / "svc.log.2")] == ["small"]


# -- line splitting --------------------------------------------------------------------------


def test_partial_lines() -> None:
    s = LineSplitter()
    assert s.feed(b"hel") == []
    assert s.feed(b"lo\nwor") == ["hello"]
    assert s.pending == 3
    assert s.feed(b"ld\r\n\n") == ["world", ""]
    assert s.feed(b"tail without newline") == []
    assert s.flush() == ["tail without newline"]
    assert s.flush() == []


def test_invalid_utf8_is_replaced() -> None:
    s = LineSplitter()
    assert s.feed(b"caf\xc3\xa9 \xff\xfe ok\n") == ["caf\u00e9 \ufffd\ufffd ok"]
    # A character split across two chunks is decoded whole.
    assert s.feed(b"\xe2\x82") == []
    assert s.feed(b"\xac\n") == ["\u20ac"]


def test_very_long_lines_are_cut_at_64_kib() -> None:
    s = LineSplitter()
    out = s.feed(b"a" * (200 * 1024) + b"\nnext\n")
    assert [len(x) for x in out] == [65536, 65536, 65536, 8192, 4]
    assert s.pending == 0
    # Fed a byte at a time, never more than 64 KiB is held.
    s2 = LineSplitter(max_line=16)
    got = []
    for b in b"0123456789" * 5:
        got += s2.feed(bytes([b]))
        assert s2.pending <= 16
    assert "".join(got + s2.flush()) == "0123456789" * 5


def test_cut_does_not_split_a_utf8_character() -> None:
    s = LineSplitter(max_line=8)
    text = "\u20ac" * 6  # 3 bytes each
    out = s.feed(text.encode()) + s.flush()
    assert "".join(out) == text
    assert all("\ufffd" not in piece for piece in out)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(1, 300), max_size=30))
def test_splitting_is_independent_of_chunking(data: bytes, cuts: list[int]) -> None:
    whole = LineSplitter(max_line=64)
    expected = whole.feed(data) + whole.flush()
    chunked = LineSplitter(max_line=64)
    got: list[str] = []
    pos = 0
    for c in cuts:
        got += chunked.feed(data[pos : pos + c])
        pos += c
    got += chunked.feed(data[pos:]) + chunked.flush()
    assert got == expected


# -- tail ------------------------------------------------------------------------------------


def test_tail_reads_the_last_lines(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    with RotatingLog(path) as log:
        for i in range(10_000):
            log.write("stdout", f"line {i}")
    last = tail(path, 5)
    assert [RECORD_RE.match(x).group(3) for x in last] == [f"line {i}" for i in range(9995, 10_000)]  # type: ignore[union-attr]
    assert len(tail(path, 20_000)) == 10_000
    assert tail(path, 0) == []
    assert tail(tmp_path / "missing.log", 5) == []


def test_tail_spans_the_previous_file_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    with RotatingLog(path, max_bytes=2000, backups=2) as log:
        for i in range(60):
            log.write("stdout", f"line {i:03d}")
    current = len(path.read_text().splitlines())
    wanted = current + 3
    texts = [RECORD_RE.match(x).group(3) for x in tail(path, wanted)]  # type: ignore[union-attr]
    assert texts == [f"line {i:03d}" for i in range(60 - wanted, 60)]


def test_tail_of_a_file_without_final_newline_and_long_lines(tmp_path: Path) -> None:
    path = tmp_path / "raw.log"
    path.write_bytes(b"first\n" + b"y" * 200_000 + b"\nlast without newline")
    assert tail(path, 2) == ["y" * 200_000, "last without newline"]
    assert tail(path, 3) == ["first", "y" * 200_000, "last without newline"]
    assert tail(path, 10) == ["first", "y" * 200_000, "last without newline"]
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    assert tail(empty, 3) == []


# -- who may read them ----------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_log_files_are_the_owners_alone_rotated_ones_too(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # the usual umask would make a plain open() 0644
    try:
        with RotatingLog(tmp_path / "web.log", max_bytes=200, backups=2) as log:
            for i in range(20):
                log.write("stdout", f"API_TOKEN=secret {i}")
        assert log.backup_path(2).exists()
        for path in (log.path, log.backup_path(1), log.backup_path(2)):
            assert mode(path) == 0o600, path
    finally:
        os.umask(old_umask)


def test_a_log_file_left_readable_is_made_private_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "old.log"
    path.write_text("written by an older ikos\n")
    path.chmod(0o644)
    with RotatingLog(path) as log:
        log.write("stdout", "new line")
    assert mode(path) == 0o600
    assert path.read_text().startswith("written by an older ikos\n")


def test_the_log_directory_is_private_unless_a_reader_group_is_set(tmp_path: Path) -> None:
    path = tmp_path / "var" / "log" / "ikos"
    secure_log_dir(path)
    assert mode(path) == 0o700
    path.chmod(0o755)
    secure_log_dir(path)
    assert mode(path) == 0o700
    group = grp.getgrnam("adm").gr_gid if os.geteuid() == 0 else os.getgid()
    secure_log_dir(path, group)
    assert mode(path) == 0o750
    assert path.stat().st_gid == group


# -- followers (ikosctl logs -f) ---------------------------------------------------------------


def texts(lines: list[str]) -> list[str]:
    return [line.split(" ", 2)[2] for line in lines]


def test_a_follower_gets_every_line_written_after_it_attached(tmp_path: Path) -> None:
    with RotatingLog(tmp_path / "web.log") as log:
        log.write("stdout", "before")
        follower = log.follow()
        woken: list[int] = []
        follower.wake = lambda: woken.append(1)
        log.write_lines("stdout", ["one", "two"])
        log.write("stderr", "three")
        assert len(woken) == 2  # once per batch
        lines = follower.take()
        assert texts(lines) == ["one", "two", "three"]
        assert lines[2].split(" ")[1] == "stderr"
        assert follower.take() == []
        follower.close()
        log.write("stdout", "after")
        assert follower.take() == [] and follower.closed


def test_a_follower_survives_rotation(tmp_path: Path) -> None:
    with RotatingLog(tmp_path / "web.log", max_bytes=300, backups=1) as log:
        follower = log.follow()
        for i in range(50):
            log.write("stdout", f"line {i}")
        assert log.backup_path(1).exists()
        assert texts(follower.take()) == [f"line {i}" for i in range(50)]
        follower.close()


def test_a_follower_that_falls_behind_gets_a_marker_not_unbounded_memory(tmp_path: Path) -> None:
    with RotatingLog(tmp_path / "web.log") as log:
        follower = log.follow(limit_bytes=4096)
        for i in range(10_000):
            log.write("stdout", f"line {i:05d}")
        lines = follower.take()
        kept = len(lines) - 1
        assert 0 < kept < 100  # about 4 KiB of records, not 10,000 of them
        assert texts(lines[:kept]) == [f"line {i:05d}" for i in range(kept)]
        assert re.fullmatch(rf"\S+ ikos {10_000 - kept} lines dropped \(.*\)", lines[-1])
        # Caught up: new lines flow again.
        log.write("stdout", "fresh")
        assert texts(follower.take()) == ["fresh"]
        follower.close()


def test_followers_are_independent(tmp_path: Path) -> None:
    with RotatingLog(tmp_path / "web.log") as log:
        first, second = log.follow(), log.follow()
        log.write("stdout", "a")
        assert texts(first.take()) == ["a"]
        log.write("stdout", "b")
        assert texts(first.take()) == ["b"]
        assert texts(second.take()) == ["a", "b"]
        first.close()
        second.close()
        with pytest.raises(ValueError, match="limit_bytes"):
            log.follow(0)
