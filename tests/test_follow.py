"""Tests of the ``tail -F`` follower (orchestrator/logwatch/follow.py).

Three groups:

* Core unit tests drive :class:`Follower` by hand: write bytes, call
  ``poll(now)`` with an explicit time, look at the lines. No clock, no threads.
* Trio shell tests run :func:`follow` under pytest-trio's ``autojump_clock``, so
  ``rotate_wait`` and the poll interval cost no real time.
* Acceptance tests: a writer thread appends 100 000 numbered lines while the
  follower runs on the real clock; mid-stream the file is rotated by rename,
  or by copytruncate, or the follower is restarted from saved offsets.
  Every line must be seen exactly once, in order, and whole.

Every test is bounded: threads are joined with a timeout, loops have deadlines,
trio tests run under ``fail_after``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import threading
import time
from contextlib import aclosing
from pathlib import Path

import pytest
import trio

from orchestrator.logwatch.follow import Follower, Line, Offset, follow, follow_lines


# -- helpers ------------------------------------------------------------------


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def drain(f: Follower, now: float = 0.0) -> list[Line]:
    """Poll until the follower has nothing more to read right now."""
    out: list[Line] = []
    for _ in range(10_000):
        out += f.poll(now)
        if not f.more:
            return out
    raise AssertionError("follower kept reporting more data")


def data(lines: list[Line]) -> list[bytes]:
    return [ln.data for ln in lines]


def numbered(i: int) -> bytes:
    # Varying length so chunk boundaries fall everywhere in a line.
    return b"%06d " % i + b"x" * (i % 37) + b" end"


# -- core: lines and offsets -------------------------------------------------------


def test_complete_lines_only_partial_tail_buffered(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"one\ntwo\nthr")
    with Follower(p) as f:
        got = drain(f)
        assert data(got) == [b"one", b"two"]
        assert [ln.offset.position for ln in got] == [4, 8]
        assert f.poll(0) == []  # "thr" stays buffered
        append(p, b"ee")
        assert f.poll(0) == []
        append(p, b"\n\nfour\r\n")
        got = drain(f)
        # Empty lines are lines; \r is kept (decoding is the parser's job).
        assert data(got) == [b"three", b"", b"four\r"]
        assert got[-1].offset.position == p.stat().st_size
        assert f.offset == got[-1].offset


def test_offset_identity_and_fingerprint(tmp_path):
    import hashlib

    p = tmp_path / "log"
    p.write_bytes(b"a\nbb\n")
    with Follower(p, fingerprint_size=3) as f:
        (a, b) = drain(f)
    st = p.stat()
    assert (b.offset.inode, b.offset.device) == (st.st_ino, st.st_dev)
    assert b.offset.fingerprint_len == 3
    assert b.offset.fingerprint == hashlib.sha256(b"a\nb").hexdigest()
    assert Offset.from_dict(b.offset.to_dict()) == b.offset


def test_chunk_boundaries_anywhere(tmp_path):
    p = tmp_path / "log"
    lines = [numbered(i) for i in range(300)]
    p.write_bytes(b"\n".join(lines) + b"\n")
    for chunk in (1, 2, 7, 64, 4096):
        with Follower(p, chunk_size=chunk) as f:
            assert data(drain(f)) == lines


def test_read_budget_sets_more(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"line\n" * 1000)
    with Follower(p, chunk_size=100, max_chunks=3) as f:
        first = f.poll(0)
        assert f.more
        assert len(first) == 60
        rest = drain(f)
        assert len(first) + len(rest) == 1000


def test_long_line_cut_flagged_bounded(tmp_path):
    p = tmp_path / "log"
    with Follower(p, max_line=10, chunk_size=4) as f:
        append(p, b"short\n" + b"L" * 25)
        got = drain(f)
        assert data(got) == [b"short"]
        assert len(f._src.buf) <= 10  # never buffered beyond max_line
        append(p, b"L" * 1000)
        assert drain(f) == []
        assert len(f._src.buf) <= 10
        append(p, b"tail\nnext\n")
        cut, nxt = drain(f)
    assert cut.cut and cut.data == b"L" * 10
    # The offset of a cut line is after its newline: resuming never lands mid-line.
    assert cut.offset.position == len(b"short\n") + 25 + 1000 + len(b"tail\n")
    assert (nxt.data, nxt.cut) == (b"next", False)
    assert f.stats.cut_lines == 1


def test_exactly_max_line_is_not_cut(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"x" * 10 + b"\n" + b"y" * 11 + b"\n")
    with Follower(p, max_line=10, chunk_size=3) as f:
        a, b = drain(f)
    assert (a.data, a.cut) == (b"x" * 10, False)
    assert (b.data, b.cut) == (b"y" * 10, True)


def test_waits_for_missing_file(tmp_path):
    p = tmp_path / "log"
    with Follower(p) as f:
        assert f.poll(0) == [] and f.offset is None
        p.write_bytes(b"hello\n")
        assert data(drain(f)) == [b"hello"]


def test_from_end_skips_existing_lines_but_not_partial(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"old1\nold2\npart")
    with Follower(p, from_end=True) as f:
        assert drain(f) == []
        append(p, b"ial\nnew\n")
        assert data(drain(f)) == [b"partial", b"new"]


def test_from_end_does_not_apply_to_a_file_that_appears_later(tmp_path):
    p = tmp_path / "log"
    with Follower(p, from_end=True) as f:
        assert f.poll(0) == []
        p.write_bytes(b"first\n")
        assert data(drain(f)) == [b"first"]


# -- core: rotation while following ------------------------------------------------


def test_rename_rotation_finishes_old_file_first(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\n")
    with Follower(p) as f:
        assert data(drain(f)) == [b"a"]
        append(p, b"b\nc")  # c is incomplete at rotation time
        os.rename(p, tmp_path / "log.1")
        append(tmp_path / "log.1", b"\n")  # the writer completes it in the old file
        p.write_bytes(b"new1\n")
        got = drain(f, now=0)
        assert data(got) == [b"b", b"c", b"new1"]
        assert got[-1].offset.inode == p.stat().st_ino
        assert got[-1].offset.position == 5
        assert f.stats.rotations == 1 and f.stats.partial_dropped == 0


def test_rename_rotation_waits_while_new_file_is_empty(tmp_path):
    """logrotate ``create``: the new file exists before the daemon reopens."""
    p = tmp_path / "log"
    p.write_bytes(b"a\n")
    with Follower(p, rotate_wait=5.0) as f:
        drain(f, now=0)
        os.rename(p, tmp_path / "log.1")
        p.touch()
        assert drain(f, now=1) == []
        append(tmp_path / "log.1", b"late\n")  # daemon not reopened yet
        assert data(drain(f, now=3)) == [b"late"]
        assert f.offset.inode == (tmp_path / "log.1").stat().st_ino
        # After rotate_wait with the new file still empty, switch anyway.
        assert drain(f, now=6.5) == []
        assert f.offset.inode == p.stat().st_ino and f.offset.position == 0
        append(p, b"fresh\n")
        assert data(drain(f, now=7)) == [b"fresh"]


def test_lines_written_to_old_file_just_before_switch_are_read(tmp_path, monkeypatch):
    """The race between our EOF on the old file and seeing the new one.

    The writer appends its last lines to the old file and then writes the new
    one, both after our read hit EOF but before we stat the path. The hook on
    ``_stat_path`` puts those writes exactly in that window.
    """
    p = tmp_path / "log"
    p.write_bytes(b"a\n")
    with Follower(p) as f:
        drain(f)
        os.rename(p, tmp_path / "log.1")
        p.touch()
        assert drain(f, now=0) == []
        real_stat = Follower._stat_path

        def stat_after_race(self):
            append(tmp_path / "log.1", b"last old\n")
            append(p, b"first new\n")
            monkeypatch.setattr(Follower, "_stat_path", real_stat)
            return real_stat(self)

        monkeypatch.setattr(Follower, "_stat_path", stat_after_race)
        assert data(drain(f, now=0.1)) == [b"last old", b"first new"]


def test_partial_line_left_in_rotated_file_is_dropped_and_counted(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\nhalf")
    with Follower(p) as f:
        drain(f)
        os.rename(p, tmp_path / "log.1")
        p.write_bytes(b"b\n")
        assert data(drain(f)) == [b"b"]
        assert f.stats.partial_dropped == 1


def test_deleted_then_recreated(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\n")
    with Follower(p) as f:
        drain(f)
        append(p, b"b\n")
        p.unlink()
        # Path missing: the open descriptor is still read.
        assert data(drain(f)) == [b"b"]
        assert drain(f, now=100) == []
        p.write_bytes(b"c\n")
        assert data(drain(f, now=101)) == [b"c"]
        assert f.stats.rotations == 1


def test_copytruncate_recovers_unread_tail_from_copy(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\nb\n")
    with Follower(p) as f:
        assert data(drain(f)) == [b"a", b"b"]
        append(p, b"c\nd\n")  # written, not yet read
        shutil.copyfile(p, tmp_path / "log.1")
        os.truncate(p, 0)
        append(p, b"e\n")
        got = drain(f)
        assert data(got) == [b"c", b"d", b"e"]
        assert got[1].offset.inode == (tmp_path / "log.1").stat().st_ino
        assert got[2].offset.inode == p.stat().st_ino
        assert f.stats.truncations == 1 and f.stats.recovered == 1 and f.stats.gaps == 0


@pytest.mark.parametrize("fingerprint_size", [4, 1024])  # head full / still growing
def test_truncate_and_rewrite_past_position_detected_by_head(tmp_path, fingerprint_size):
    """Size alone misses it: the file regrew beyond our position between polls.

    The chunk read at the old position is new content ("ccccccc\n" at 5); it
    must be discarded, not emitted as a line.
    """
    p = tmp_path / "log"
    p.write_bytes(b"aaaa\n")
    with Follower(p, fingerprint_size=fingerprint_size) as f:
        drain(f)
        with open(p, "r+b") as w:
            w.truncate(0)
            w.write(b"bbbb\nccccccc\n")
        got = drain(f)
        assert data(got) == [b"bbbb", b"ccccccc"]
        assert f.stats.truncations == 1
        assert f.stats.gaps == 1  # no copy anywhere


def test_truncate_without_copy_counts_gap(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\nb\n")
    with Follower(p) as f:
        drain(f)
        os.truncate(p, 0)
        assert drain(f) == []
        append(p, b"x\n")
        assert data(drain(f)) == [b"x"]
        assert (f.stats.truncations, f.stats.gaps) == (1, 1)


def test_truncate_to_smaller_nonzero_restarts_from_zero(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"keep\ndrop\n")
    with Follower(p) as f:
        drain(f)
        os.truncate(p, 5)
        append(p, b"more\n")
        assert data(drain(f)) == [b"keep", b"more"]


def test_stale_copy_with_other_head_is_not_used(tmp_path):
    p = tmp_path / "log"
    (tmp_path / "log.1").write_bytes(b"something else entirely\n" * 10)
    p.write_bytes(b"a\n")
    with Follower(p) as f:
        drain(f)
        os.truncate(p, 0)
        append(p, b"z\n")
        assert data(drain(f)) == [b"z"]
        assert f.stats.recovered == 0


# -- core: resume after restart ------------------------------------------------------


def consume(p: Path, offset: Offset | None = None, **kw) -> tuple[list[Line], Follower]:
    f = Follower(p, offset, **kw)
    try:
        return drain(f), f
    finally:
        f.close()


def test_resume_same_file_exactly_unread_lines(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"".join(numbered(i) + b"\n" for i in range(10)))
    got, _ = consume(p)
    saved = got[3].offset  # processed 0..3, then "crashed"
    append(p, numbered(10) + b"\n")
    again, _ = consume(p, saved)
    assert data(again) == [numbered(i) for i in range(4, 11)]


def test_every_emitted_offset_is_a_valid_resume_point(tmp_path):
    p = tmp_path / "log"
    lines = [numbered(i) for i in range(50)]
    p.write_bytes(b"\n".join(lines) + b"\n")
    got, _ = consume(p, fingerprint_size=64)
    for k, ln in enumerate(got):
        rest, f = consume(p, ln.offset, fingerprint_size=64)
        assert data(rest) == lines[k + 1 :]
        assert f.stats.fingerprint_mismatches == 0


def test_resume_partial_line_at_save_time(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\nhal")
    got, f = consume(p)
    saved = f.offset
    assert saved == got[-1].offset and saved.position == 2
    append(p, b"f\n")
    again, _ = consume(p, saved)
    assert data(again) == [b"half"]


def test_resume_after_rename_rotation_while_stopped(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\nb\n")
    got, _ = consume(p)
    saved = got[0].offset  # b not processed yet
    append(p, b"c\n")
    os.rename(p, tmp_path / "log.1")
    p.write_bytes(b"d\n")
    again, f = consume(p, saved)
    assert data(again) == [b"b", b"c", b"d"]
    assert f.stats.recovered == 1 and f.stats.gaps == 0


@pytest.mark.parametrize("rotated_name", ["log-20261125", "log.0", "log.old"])
def test_resume_finds_rotated_file_by_inode_under_other_names(tmp_path, rotated_name):
    p = tmp_path / "log"
    p.write_bytes(b"a\nb\n")
    got, _ = consume(p)
    saved = got[0].offset
    os.rename(p, tmp_path / rotated_name)
    decoy = tmp_path / "log.1"  # same head, other inode, older: not ours
    decoy.write_bytes(b"a\nb\nnot this one\n")
    os.utime(decoy, ns=(10**9, 10**9))
    p.write_bytes(b"c\n")
    again, f = consume(p, saved)
    assert data(again) == [b"b", b"c"]


_MTIMES = itertools.count()


def rotate_by_rename(p: Path, content: bytes) -> None:
    """logrotate without compression: shift log.N, log -> log.1, new log."""
    shift_rotated(p)
    os.rename(p, p.with_name(p.name + ".1"))
    # Rotation order is read from mtimes; ext4 stamps them with the kernel
    # tick, so files written within a few ms could tie. Make them distinct.
    t = 2_000_000_000 * 10**9 + next(_MTIMES) * 10**9
    os.utime(p.with_name(p.name + ".1"), ns=(t, t))
    p.write_bytes(content)
    os.utime(p, ns=(t + 1, t + 1))


def test_lagging_two_rotations_behind_catches_up_in_order(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\n")
    with Follower(p) as f:
        assert data(drain(f)) == [b"a"]
        append(p, b"b\n")
        rotate_by_rename(p, b"c\n")
        rotate_by_rename(p, b"d\n")  # we never saw the file holding c at the path
        assert data(drain(f)) == [b"b", b"c", b"d"]
        assert (f.stats.rotations, f.stats.caught_up) == (2, 1)


def test_resume_after_two_rotations_while_stopped(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\nb\n")
    got, _ = consume(p)
    saved = got[0].offset
    rotate_by_rename(p, b"c\n")
    rotate_by_rename(p, b"d\n")
    rotate_by_rename(p, b"e\n")
    (tmp_path / "log.conf").write_bytes(b"not a rotated log\n")  # same prefix, newer
    again, f = consume(p, saved)
    assert data(again) == [b"b", b"c", b"d", b"e"]
    assert f.stats.gaps == 0


def test_resume_rotated_file_compressed_counts_gap(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\nb\n")
    got, _ = consume(p)
    saved = got[0].offset
    os.rename(p, tmp_path / "log.1.gz")  # compressed: unreadable as text
    p.write_bytes(b"c\n")
    again, f = consume(p, saved)
    assert data(again) == [b"c"]
    assert f.stats.gaps == 1


def test_resume_truncated_and_rewritten_while_stopped(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"first line\nsecond line\n")
    got, _ = consume(p)
    saved = got[-1].offset
    with open(p, "r+b") as w:  # same inode, new content longer than position
        w.truncate(0)
        w.write(b"brand new content\nand more of it here\n")
    again, f = consume(p, saved)
    assert data(again) == [b"brand new content", b"and more of it here"]
    assert f.stats.fingerprint_mismatches == 1


def test_resume_copytruncate_while_stopped_reads_copy_tail(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\nb\n")
    got, _ = consume(p)
    saved = got[0].offset
    append(p, b"c\n")
    shutil.copyfile(p, tmp_path / "log.1")
    os.truncate(p, 0)
    append(p, b"d\n")
    again, f = consume(p, saved)
    assert data(again) == [b"b", b"c", b"d"]
    assert f.stats.fingerprint_mismatches == 1 and f.stats.recovered == 1


def test_resume_inode_reuse_detected_by_fingerprint(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"old file line one\nold file line two\n")
    got, _ = consume(p)
    saved = got[-1].offset
    p.unlink()
    p.write_bytes(b"new file, reused inode?\nsecond\n")
    st = p.stat()
    # Filesystems usually hand the freed inode to the next file; if this one
    # did not, make the saved offset name the new inode: that is the situation.
    saved = dataclasses.replace(saved, inode=st.st_ino, device=st.st_dev)
    again, f = consume(p, saved)
    assert data(again) == [b"new file, reused inode?", b"second"]
    assert f.stats.fingerprint_mismatches == 1


def test_resume_when_path_missing_finishes_rotated_then_waits(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\nb\n")
    got, _ = consume(p)
    saved = got[0].offset
    os.rename(p, tmp_path / "log.1")
    with Follower(p, saved, rotate_wait=1.0) as f:
        assert data(drain(f, now=0)) == [b"b"]
        assert drain(f, now=10) == []
        p.write_bytes(b"c\n")
        assert data(drain(f, now=11)) == [b"c"]


def test_resume_saved_offset_kept_until_path_appears(tmp_path):
    p = tmp_path / "log"
    p.write_bytes(b"a\nb\n")
    got, _ = consume(p)
    saved = got[0].offset
    os.rename(p, tmp_path / "elsewhere")  # not a sibling by name: not found
    with Follower(p, saved) as f:
        assert f.poll(0) == [] and f.offset == saved
        os.rename(tmp_path / "elsewhere", p)  # moved back: same inode, same head
        assert data(drain(f)) == [b"b"]
        assert f.stats.gaps == 0


# -- trio shell (MockClock) -------------------------------------------------------------


async def test_follow_task_with_mock_clock(tmp_path, autojump_clock):
    p = tmp_path / "log"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            rx = await nursery.start(follow, p, None)
            async with rx:
                await trio.sleep(5)  # file missing: the follower just waits
                p.write_bytes(b"one\ntw")
                assert (await rx.receive()).data == b"one"
                append(p, b"o\n")
                assert (await rx.receive()).data == b"two"
                # rename rotation with an empty new file: keep reading the old one
                os.rename(p, tmp_path / "log.1")
                p.touch()
                append(tmp_path / "log.1", b"late\n")
                t0 = trio.current_time()
                assert (await rx.receive()).data == b"late"
                append(p, b"new\n")
                line = await rx.receive()
                assert line.data == b"new" and line.offset.inode == p.stat().st_ino
                assert trio.current_time() - t0 < 1.0  # non-empty new file: no rotate_wait
            # closing the receive end ends the task


async def test_follow_lines_rotate_wait_on_trio_clock(tmp_path, autojump_clock):
    """The new file stays empty: the switch happens rotate_wait after we saw it."""
    p = tmp_path / "log"
    old = tmp_path / "log.1"
    p.write_bytes(b"a\n")
    seen: dict[str, int] = {}

    async def writer(t0: float) -> None:
        await trio.sleep_until(t0 + 1)
        append(old, b"late\n")  # the daemon has not reopened yet
        await trio.sleep_until(t0 + 2.5)
        seen["at_2.5"] = f.offset.inode
        await trio.sleep_until(t0 + 3.5)
        seen["at_3.5"] = f.offset.inode
        append(p, b"b\n")

    with trio.fail_after(60), Follower(p, rotate_wait=3.0) as f:
        async with aclosing(follow_lines(f, poll=0.2)) as lines, trio.open_nursery() as nursery:
            assert (await anext(lines)).data == b"a"
            os.rename(p, old)
            p.touch()
            nursery.start_soon(writer, trio.current_time())
            assert (await anext(lines)).data == b"late"
            assert (await anext(lines)).data == b"b"
    assert seen == {"at_2.5": old.stat().st_ino, "at_3.5": p.stat().st_ino}


async def test_follow_resumes_from_offset(tmp_path, autojump_clock):
    p = tmp_path / "log"
    p.write_bytes(b"a\nb\nc\n")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            rx = await nursery.start(follow, p, None)
            async with rx:
                first = await rx.receive()
        async with trio.open_nursery() as nursery:
            rx = await nursery.start(follow, p, first.offset)
            async with rx:
                assert [(await rx.receive()).data for _ in range(2)] == [b"b", b"c"]


# -- acceptance: 100 000 lines with rotation mid-stream ------------------------------------

N_LINES = 100_000
EXPECTED = [numbered(i) for i in range(N_LINES)]


def assert_exactly_once_in_order(got: list[bytes]) -> None:
    """Every numbered line once, in order, whole (a cheap first-difference report)."""
    for k, (g, e) in enumerate(zip(got, EXPECTED)):
        if g != e:
            raise AssertionError(f"line {k}: got {g[:60]!r}, expected {e[:60]!r}")
    assert len(got) == N_LINES, f"{len(got)} lines, expected {N_LINES}"


class Writer(threading.Thread):
    """Appends the numbered lines, a third of them in two write() calls.

    Split writes make the follower see partial lines. ``lock`` (if given) is
    held for each whole line: the copytruncate rotator takes it so that no line
    is half in the copy and half in the truncated file.
    """

    def __init__(self, path: Path, *, lock: threading.Lock | None = None) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.lock = lock or threading.Lock()
        self.progress = 0
        self.reached = threading.Condition()
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.fd = -1

    def before_line(self, i: int) -> None:
        """Hook for subclasses (rename rotation)."""

    def run(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            for i, line in enumerate(EXPECTED):
                if self.stop.is_set():
                    return
                self.before_line(i)
                payload = line + b"\n"
                with self.lock:
                    if i % 3 == 0:
                        cut = 1 + i % (len(payload) - 1)
                        os.write(self.fd, payload[:cut])
                        os.write(self.fd, payload[cut:])
                    else:
                        os.write(self.fd, payload)
                if i % 1000 == 0:
                    with self.reached:
                        self.progress = i
                        self.reached.notify_all()
            with self.reached:
                self.progress = N_LINES
                self.reached.notify_all()
        except BaseException as e:  # pragma: no cover - reported by finish()
            self.error = e
        finally:
            if self.fd >= 0:
                os.close(self.fd)

    def wait_for(self, line: int, timeout: float) -> bool:
        with self.reached:
            return self.reached.wait_for(lambda: self.progress >= line or self.error is not None, timeout)

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=10)
        assert not self.is_alive(), "writer thread did not stop"
        if self.error is not None:
            raise self.error


def shift_rotated(path: Path, keep: int = 5) -> None:
    """logrotate's numbering: log.4 -> log.5, ..., log.1 -> log.2."""
    for k in range(keep - 1, 0, -1):
        src = path.with_name(f"{path.name}.{k}")
        if src.exists():
            os.rename(src, path.with_name(f"{path.name}.{k + 1}"))


class RenameWriter(Writer):
    """Rotates by rename at given lines, the logrotate ``create`` way.

    At a rotation line: rename log -> log.1, create an empty log, keep writing
    ``late`` more lines to the old descriptor (the daemon has not reopened
    yet), then switch to the new file.
    """

    def __init__(self, path: Path, rotate_at: tuple[int, ...], late: int = 200) -> None:
        super().__init__(path)
        self.rotate_at = set(rotate_at)
        self.late = late
        self.switch_at: int | None = None
        self.new_fd = -1
        self.rotations = 0

    def before_line(self, i: int) -> None:
        if i in self.rotate_at:
            shift_rotated(self.path)
            os.rename(self.path, self.path.with_name(self.path.name + ".1"))
            self.new_fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self.switch_at = i + self.late
        if i == self.switch_at:
            os.close(self.fd)
            self.fd, self.new_fd = self.new_fd, -1
            self.rotations += 1


async def test_acceptance_rename_rotation_100k_lines(tmp_path):
    p = tmp_path / "log"
    writer = RenameWriter(p, rotate_at=(20_000, 50_000, 80_000))
    got: list[bytes] = []
    # rotate_wait far beyond the "late" window: the switch must be triggered
    # by the new file getting data, not by the timer.
    with Follower(p, rotate_wait=30.0) as f:
        writer.start()
        try:
            with trio.fail_after(60):  # a hang guard; ~2 s on an idle 2-CPU box
                async with aclosing(follow_lines(f, poll=0.005)) as lines:
                    async for line in lines:
                        assert not line.cut
                        got.append(line.data)
                        if len(got) >= N_LINES:
                            break
        finally:
            writer.finish()
        assert f.poll(trio.current_time()) == []  # nothing extra after the last line
        stats = f.stats
    assert_exactly_once_in_order(got)
    assert writer.rotations == 3
    assert stats.rotations == 3
    assert (stats.gaps, stats.partial_dropped, stats.truncations) == (0, 0, 0)


class CopyTruncateRotator(threading.Thread):
    """logrotate ``copytruncate``: copy log to log.1, truncate log to 0.

    Real copytruncate has an inherent race: lines written between the copy and
    the truncation are in neither file, and a line being written during the
    copy is split across both. No reader can recover those. Here the rotator
    takes the writer's lock for the copy + truncate, which closes that window
    and makes "every line exactly once" a property of the follower alone.
    """

    def __init__(self, path: Path, writer: Writer, rotate_at: tuple[int, ...]) -> None:
        super().__init__(daemon=True)
        self.path, self.writer, self.rotate_at = path, writer, rotate_at
        self.copied_sizes: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for target in self.rotate_at:
                if not self.writer.wait_for(target, timeout=10):
                    raise AssertionError(f"writer never reached line {target}")
                with self.writer.lock:
                    shift_rotated(self.path)
                    copy = self.path.with_name(self.path.name + ".1")
                    shutil.copyfile(self.path, copy)
                    os.truncate(self.path, 0)
                    self.copied_sizes.append(copy.stat().st_size)
        except BaseException as e:  # pragma: no cover - reported by the test
            self.error = e


async def test_acceptance_copytruncate_100k_lines(tmp_path):
    p = tmp_path / "log"
    p.touch()
    writer = Writer(p)
    rotator = CopyTruncateRotator(p, writer, rotate_at=(20_000, 50_000, 80_000))
    got: list[bytes] = []
    with Follower(p, rotate_wait=1.0) as f:
        writer.start()
        rotator.start()
        try:
            with trio.fail_after(60):  # a hang guard; ~2 s on an idle 2-CPU box
                async with aclosing(follow_lines(f, poll=0.005)) as lines:
                    async for line in lines:
                        got.append(line.data)
                        if len(got) >= N_LINES:
                            break
        finally:
            writer.finish()
            rotator.join(timeout=10)
        assert f.poll(trio.current_time()) == []
        stats = f.stats
    assert rotator.error is None, rotator.error
    assert len(rotator.copied_sizes) == 3 and all(s > 0 for s in rotator.copied_sizes)
    assert_exactly_once_in_order(got)
    assert stats.truncations == 3
    assert stats.gaps == 0 and stats.partial_dropped == 0
    # Each truncation was seen either with nothing left unread in the old file,
    # or its unread tail was recovered from the copy.
    assert stats.recovered <= 3


def test_acceptance_restarts_mid_stream_with_rotation(tmp_path):
    """Crash the follower mid-batch many times while the file rotates.

    The consumer persists the offset of each line it processed; a "crash"
    throws away the rest of the batch and starts a new Follower from the last
    saved offset. Lines must still be seen exactly once, in order.
    """
    import random

    rng = random.Random(1125)
    p = tmp_path / "log"
    writer = RenameWriter(p, rotate_at=(15_000, 45_000, 70_000))
    got: list[bytes] = []
    saved: Offset | None = None
    restarts = 0
    recovered = 0  # restarts that found their saved file rotated away, by inode
    switched: set[int] = set()  # files whose first line caused a crash
    next_crash = rng.randrange(500, 8000)
    # Small batches (~500 lines): a crash throws the rest of a batch away and
    # re-reads it, so big batches would mostly measure re-reading.
    opts = dict(rotate_wait=30.0, chunk_size=8192, max_chunks=2)
    f = Follower(p, **opts)
    writer.start()
    try:
        deadline = time.monotonic() + 60  # a hang guard; ~2 s idle
        while len(got) < N_LINES:
            assert time.monotonic() < deadline, (
                f"timed out with {len(got)} lines, {restarts} restarts, saved {saved}, stats {f.stats}, "
                f"files {[(q.name, q.stat().st_ino, q.stat().st_size) for q in sorted(tmp_path.iterdir())]}, "
                f"src {f._src and (f._src.name, f._src.inode, f._src.read_pos)}"
            )
            batch = f.poll(time.monotonic())
            # Crash points: every few thousand lines at a random place in a
            # batch, and just before the first line of every new file (so the
            # restart has to find the rotated file by inode).
            cut = None
            for k, line in enumerate(batch):
                if len(got) + k >= next_crash:
                    cut = k
                    break
                if saved is not None and line.offset.inode != saved.inode and line.offset.inode not in switched:
                    switched.add(line.offset.inode)
                    cut = k
                    break
            crash = cut is not None
            processed = batch[:cut] if crash else batch
            for line in processed:
                got.append(line.data)
                saved = line.offset
            if crash:
                f.close()
                recovered += f.stats.recovered
                f = Follower(p, saved, **opts)
                restarts += 1
                next_crash = len(got) + rng.randrange(500, 8000)
            elif not f.more:
                time.sleep(0.002)
        assert f.poll(time.monotonic()) == []
    finally:
        f.close()
        writer.finish()
    assert_exactly_once_in_order(got)
    assert restarts >= 10, "too few restarts to mean anything"
    # A crash just before the first line of each new file: each of those
    # restarts had to find the previous file under its rotated name.
    assert len(switched) == 3
    assert recovered >= 3
    assert writer.rotations == 3
