"""Follow a log file like ``tail -F``: complete lines with a resumable offset.

The log watchers (:mod:`orchestrator.logwatch.watch`) read the logs of boot
servers a site already runs: dnsmasq, ISC dhcpd, tftp-hpa, Kea. Those files
are rotated under our feet, and bootorch itself is restarted. This module
turns "a path" into a stream of :class:`Line` values -- the bytes of one
complete line and the :class:`Offset` just after it -- such that a consumer
that persists the offset of the last line it processed, and resumes from it,
sees every line exactly once across rotations and restarts (within the limits
listed at the end).

Two layers, in the h11 spirit:

* :class:`Follower` is the core. It does plain file I/O (regular files never
  block meaningfully) but owns no clock and no event loop: :meth:`Follower.poll`
  is called with the current time and returns the lines that became complete.
* :func:`follow` / :func:`follow_lines` are the trio shell: poll, hand out the
  lines, ``trio.sleep(poll)``, repeat. Under ``MockClock`` the sleep is free.

Identity: inode, device and a fingerprint
-----------------------------------------
An :class:`Offset` names a file by ``(device, inode)`` and a *fingerprint*: the
SHA-256 of the first ``fingerprint_len`` bytes of the file (up to
``fingerprint_size``, 1024 by default) as they were when the offset was made.
Log files only grow, so those bytes never change while it is the same file. The
inode alone is not enough: a deleted file's inode is reused by the next file
created, and a file truncated and rewritten keeps its inode. The fingerprint
tells those apart. Bytes are hashed as read, partial last line included: an
append-only writer never changes bytes already written.

The state machine
-----------------
The follower has one *source*: an open descriptor, the file position of the
next byte to read, the buffered partial line and the head bytes (the
fingerprint). Each poll runs these steps::

    NO SOURCE ──(path appears / saved offset resolved)──> READING
    READING ──read chunk──> verify ──ok──> split lines, emit ──> READING
                              └─truncated─> TRUNCATED
    READING ──EOF, path is the same file────────────────> (sleep) READING
    READING ──EOF, path is missing───────────────────────> (sleep) READING
    READING ──EOF, path is another file──> ROTATION PENDING
    ROTATION PENDING ──new file non-empty, or rotate_wait passed──>
        final read of the old descriptor, drop its partial tail (counted),
        close it, open the next file at 0 ──> READING

The *next file* is the path's file, unless we lag more than one rotation
behind (see "Catching up" below).

*verify* runs after every read: ``fstat`` size below the read position, or the
head bytes (``pread`` at 0) no longer starting with the recorded head, means
the file was truncated (and perhaps rewritten) in place. Because the check comes
*after* the read, a chunk is only trusted if the file was still the same file
once the bytes were in hand; a chunk that raced a truncation is discarded.

The cases
---------
*Rename rotation* (logrotate's default, ``create``; Python's
``RotatingFileHandler``): the file is renamed to ``path.1`` (or ``path-DATE``)
and a new file is created at ``path``. Our descriptor still points at the old
file, so nothing in it is lost: at EOF we see that ``path`` is now another
inode, read the old descriptor to its end, and switch to the new file at
position 0. We switch only once the new file has data (the writer has reopened,
so it will not write to the old file any more) or ``rotate_wait`` seconds after
we first saw the new file: logrotate creates the new file before the daemon
reopens (``postrotate``'s HUP), and lines written in between still land in the
old file.

*Catching up*: if we are slow, or were stopped, the file after ours may itself
have been rotated already (``log.2`` is ours, ``log.1`` is next, ``log`` is
newest). Following only the name (as ``tail -F`` does) would skip ``log.1``.
When we finish a rotated file we therefore look for a sibling with a
rotation-style name (``log.N``, ``log-DATE``), not compressed, not the file at
the path, whose mtime is later than ours, and read the earliest such file from 0
before the path's file. Rotation order is taken from mtimes: a file is last
written before the next one is first written.

*Deleted and recreated*: the same as rename rotation. While ``path`` is missing
we keep reading the open (unlinked) descriptor; a writer may still hold it.

*copytruncate*: the file is copied to ``path.1`` and then truncated to 0 in
place; the inode does not change. *verify* notices. The lines we had not read
yet are gone from the file but are in the copy: we look for it among the
siblings (same head fingerprint, size at least our position), read it from the
end of the last line we emitted, then read ``path`` from 0. Real copytruncate
has an inherent race no reader can fix: lines written between the copy and the
truncation are in neither file. A truncation to a smaller non-zero size also
restarts from 0 (the kept prefix is read again).

*The file does not exist yet*: each poll tries again.

*Resume after restart* from a saved :class:`Offset` (on open, and on later polls
while ``path`` is missing):

* ``path`` has the saved ``(device, inode)``, its head matches the fingerprint
  and it is at least ``position`` long: continue at ``position``.
* Same inode, fingerprint differs (inode reuse, or truncated and rewritten while
  we were stopped): look for a copytruncate copy by fingerprint and finish it
  from ``position``; then read ``path`` from 0.
* Another inode (rotated while we were stopped): look for the saved inode with a
  matching fingerprint among the siblings whose name starts with the file's
  name (``path.1``, ``path-20261125``, ...; compressed ones are skipped), finish
  its unread tail, catch up through any later rotated files, then read
  ``path`` from 0. If it is not found, read ``path`` from 0 and count a
  possible gap in :attr:`FollowStats.gaps`.
* ``path`` missing and the saved file not found: keep the saved offset and try
  again on the next poll (the file may come back).

Lines
-----
A line is the bytes up to, not including, ``\\n`` (a ``\\r`` is kept: decoding is
the parser's business, as are syslog timestamps without a year). A line is only
emitted once its newline has arrived. A line longer than ``max_line`` is cut:
its first ``max_line`` bytes are kept, the rest is skipped as it arrives, and
the line is emitted with ``cut=True`` when its newline arrives, so memory stays
bounded and the offset still lands on a line boundary.

Limits
------
* A rotated file compressed before we finished it cannot be read (a gap is
  counted when it was the saved one; a compressed file met while catching up
  is skipped silently).
* Catching up trusts mtimes: touching an old rotated file, or a
  ``log.1``-style name that is not a rotation (a manual ``cp log log.1``),
  can make us read it. Files written in the same timestamp tick (ext4 stamps
  with the kernel tick) can be ordered wrongly.
* A rotation by rename racing our search of the siblings (``log.1`` renamed to
  ``log.2`` while we list the directory) can hide the saved file (gap counted).
* With several writers, lines written to the old file after the new file got
  data (from another writer) are lost, as with ``tail -F``; one writer is safe.
* Two files whose first ``fingerprint_len`` bytes are identical (a daemon that
  writes a long constant banner) are indistinguishable by fingerprint.
* While ``path`` is missing, the unlinked descriptor is held open (its disk
  space is not freed until a new file appears).
* A partial last line left in a rotated or truncated file when we switch away is
  dropped and counted in :attr:`FollowStats.partial_dropped`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, NamedTuple

import trio

log = logging.getLogger(__name__)

#: Bytes hashed into an Offset's fingerprint (the file head).
FINGERPRINT_SIZE = 1024
#: Bytes per read() call.
CHUNK_SIZE = 64 * 1024
#: Longest line kept; longer lines are cut and flagged.
MAX_LINE = 64 * 1024
#: Chunks read per poll before handing the lines out (bounds memory per poll).
MAX_CHUNKS_PER_POLL = 16
#: Seconds to keep reading a rotated file while the new file stays empty
#: (fluent-bit's Rotate_Wait default). Cheap: once the new file has data we
#: switch at once, and while it is empty there is nothing in it to miss.
ROTATE_WAIT = 5.0
#: Rotated siblings examined per search.
MAX_SIBLINGS = 200
#: Suffixes of rotated files we cannot read as text.
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma", ".Z", ".zip")
#: What logrotate appends to a rotated file's name: ``.1`` or ``-20261125``
#: (dateext, with optional time). Only such files are read while catching up.
_ROTATED_NAME = re.compile(r"[.-][0-9][0-9._-]*")


@dataclass(frozen=True, slots=True)
class Offset:
    """Where to resume: just after a complete line of one particular file.

    ``fingerprint`` is the hex SHA-256 of the file's first ``fingerprint_len``
    bytes when the offset was made. Store all five fields; :meth:`to_dict` and
    :meth:`from_dict` give a JSON-friendly form.
    """

    inode: int
    device: int
    position: int
    fingerprint: str
    fingerprint_len: int

    def to_dict(self) -> dict[str, int | str]:
        return {
            "inode": self.inode,
            "device": self.device,
            "position": self.position,
            "fingerprint": self.fingerprint,
            "fingerprint_len": self.fingerprint_len,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Offset:
        return cls(
            inode=int(d["inode"]),
            device=int(d["device"]),
            position=int(d["position"]),
            fingerprint=str(d["fingerprint"]),
            fingerprint_len=int(d["fingerprint_len"]),
        )


class Line(NamedTuple):
    """One complete line: ``data`` without its ``\\n``, the offset after it."""

    data: bytes
    offset: Offset
    #: True when the line was longer than ``max_line`` and ``data`` is its head.
    cut: bool = False


@dataclass(slots=True)
class FollowStats:
    """Counters of what the follower went through (for metrics and tests)."""

    #: Switches from one file to the next one at the path (rename, delete).
    rotations: int = 0
    #: In-place truncations detected while following (copytruncate).
    truncations: int = 0
    #: Rotated or copied files found by inode/fingerprint whose tail we read.
    recovered: int = 0
    #: Rotated files read in full because we lagged more than one rotation.
    caught_up: int = 0
    #: Places where lines may have been lost: a truncation with no copy found,
    #: a saved offset whose file was neither at the path nor among siblings.
    gaps: int = 0
    #: Saved offsets rejected because the file head no longer matched.
    fingerprint_mismatches: int = 0
    #: Lines longer than ``max_line`` (emitted cut).
    cut_lines: int = 0
    #: Partial last lines left behind in a file we switched away from.
    partial_dropped: int = 0
    #: Chunks discarded because the file was truncated while we read them.
    discarded_chunks: int = 0


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Source:
    """One open file: descriptor, read position, partial line, head bytes."""

    __slots__ = (
        "fd", "device", "inode", "read_pos", "line_start", "buf", "skipping", "head", "fp", "name", "copy"
    )

    def __init__(self, fd: int, st: os.stat_result, position: int, head: bytes, name: str) -> None:
        self.fd = fd
        self.device = st.st_dev
        self.inode = st.st_ino
        #: File position of the next byte to read.
        self.read_pos = position
        #: File position where the current (incomplete) line starts: the offset
        #: after the last emitted line.
        self.line_start = position
        #: Kept bytes of the incomplete line (at most max_line).
        self.buf = bytearray()
        #: True while skipping the rest of a line longer than max_line.
        self.skipping = False
        #: First bytes of the file as verified so far, and their hash.
        self.head = head
        self.fp = _hash(head)
        self.name = name
        #: A copytruncate copy: finishing it is not a rotation.
        self.copy = False

    def identity(self) -> tuple[int, int]:
        return (self.device, self.inode)

    def offset(self, position: int) -> Offset:
        return Offset(self.inode, self.device, position, self.fp, len(self.head))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Follower:
    """The ``tail -F`` core: call :meth:`poll` with the time, get complete lines.

    ``offset`` is a saved :class:`Offset` to resume from; without one, reading
    starts at the beginning of the file, or with ``from_end=True`` after the
    last complete line present when the file is first opened.

    Not thread-safe; one follower per path. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        offset: Offset | None = None,
        *,
        from_end: bool = False,
        chunk_size: int = CHUNK_SIZE,
        max_line: int = MAX_LINE,
        fingerprint_size: int = FINGERPRINT_SIZE,
        rotate_wait: float = ROTATE_WAIT,
        max_chunks: int = MAX_CHUNKS_PER_POLL,
    ) -> None:
        if chunk_size < 1 or max_line < 1 or fingerprint_size < 1 or max_chunks < 1:
            raise ValueError("chunk_size, max_line, fingerprint_size and max_chunks must be positive")
        self.path = Path(path)
        self.chunk_size = chunk_size
        self.max_line = max_line
        self.fingerprint_size = fingerprint_size
        self.rotate_wait = rotate_wait
        self.max_chunks = max_chunks
        self.from_end = from_end and offset is None
        self.stats = FollowStats()
        #: True when the last poll stopped early (read budget spent): poll
        #: again soon instead of sleeping.
        self.more = False
        self._pending: Offset | None = offset
        self._src: _Source | None = None
        self._last: Offset | None = offset
        self._rotation_seen: float | None = None

    # -- public -----------------------------------------------------------

    @property
    def offset(self) -> Offset | None:
        """Offset after the last emitted line (or where the next read starts)."""
        src = self._src
        if src is not None:
            return src.offset(src.line_start)
        return self._last

    def poll(self, now: float) -> list[Line]:
        """Read what is new and return the lines that became complete.

        ``now`` is any monotonic clock in seconds (``trio.current_time()``);
        it only times ``rotate_wait``. At most ``max_chunks`` chunks are read;
        :attr:`more` says whether there is more to read right away.
        """
        out: list[Line] = []
        self.more = False
        budget = self.max_chunks
        # Each pass either returns or changes the source, and the source can
        # change at most a few times per poll (truncation, rotation, reopen).
        for _ in range(8):
            if self._src is None:
                self._open(now)
                if self._src is None:
                    return out
            src = self._src
            budget = self._read(src, out, budget)
            if self._src is not src:  # truncated: now draining the copy, or reopening
                continue
            if budget == 0:
                self.more = True
                return out
            if not self._maybe_switch(src, now, out, budget):
                return out
        self.more = True
        return out

    def close(self) -> None:
        if self._src is not None:
            self._last = self.offset
            self._src.close()
            self._src = None

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------

    def _read(self, src: _Source, out: list[Line], budget: int) -> int:
        """Read chunks until EOF or the budget is spent; return what is left."""
        while budget > 0:
            chunk = os.pread(src.fd, self.chunk_size, src.read_pos)
            if not self._verify(src):
                self.stats.discarded_chunks += bool(chunk)
                self._truncated(src)
                return budget
            if not chunk:
                return budget
            budget -= 1
            self._split(src, chunk, out)
        return budget

    def _verify(self, src: _Source) -> bool:
        """After a read: is the descriptor still the file we were reading?

        Also extends the recorded head while the file is shorter than the
        fingerprint size.
        """
        size = os.fstat(src.fd).st_size
        if size < src.read_pos:
            return False
        if len(src.head) < self.fingerprint_size and size > len(src.head):
            head = os.pread(src.fd, self.fingerprint_size, 0)
            if not head.startswith(src.head):
                return False
            src.head = head
            src.fp = _hash(head)
        elif src.head and os.pread(src.fd, len(src.head), 0) != src.head:
            return False
        return True

    def _split(self, src: _Source, chunk: bytes, out: list[Line]) -> None:
        base = src.read_pos
        src.read_pos += len(chunk)
        start = 0
        max_line = self.max_line
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                break
            if src.skipping:
                data, cut = bytes(src.buf), True
            else:
                if src.buf:
                    src.buf += chunk[start:nl]
                    data = bytes(src.buf)
                else:
                    data = chunk[start:nl]
                cut = len(data) > max_line
                if cut:
                    data = data[:max_line]
            if src.buf:
                src.buf.clear()
            src.skipping = False
            if cut:
                self.stats.cut_lines += 1
            src.line_start = base + nl + 1
            out.append(Line(data, src.offset(src.line_start), cut))
            start = nl + 1
        if start < len(chunk) and not src.skipping:
            rest = chunk[start:]
            room = max_line - len(src.buf)
            if len(rest) > room:
                src.buf += rest[:room]
                src.skipping = True
            else:
                src.buf += rest

    def _drop(self, src: _Source) -> None:
        if src.buf or src.skipping or src.read_pos > src.line_start:
            self.stats.partial_dropped += 1
            log.warning("%s: dropping a partial last line of %s", self.path, src.name)
        src.close()
        self._last = src.offset(src.line_start)
        self._src = None

    # -- rotation and truncation ---------------------------------------------

    def _maybe_switch(self, src: _Source, now: float, out: list[Line], budget: int) -> bool:
        """At EOF: switch to the file now at the path if it is time.

        Returns True if the source changed (the caller reads the new one).
        """
        st = self._stat_path()
        if st is None or (st.st_dev, st.st_ino) == src.identity():
            self._rotation_seen = None
            return False
        if self._rotation_seen is None:
            self._rotation_seen = now
        if st.st_size == 0 and now - self._rotation_seen < self.rotate_wait:
            return False
        # The writer has moved on (or we waited long enough): a last read of
        # the old file (it may have grown since our EOF), then the new one.
        if self._read(src, out, budget) == 0:
            self.more = True  # still more in the old file; switch next poll
            return False
        if self._src is not src:
            return True  # truncated meanwhile; the caller reads the new source
        # If we lag more than one rotation behind, the file after ours is no
        # longer at the path but among the rotated siblings: read it next.
        successor = self._next_rotated(src, exclude=(st.st_dev, st.st_ino))
        self._drop(src)
        self._rotation_seen = None
        if not src.copy:
            self.stats.rotations += 1
        if successor is not None:
            log.info("%s: catching up through %s", self.path, successor.name)
            self.stats.caught_up += 1
            self._src = successor
        else:
            log.info("%s: following the new file", self.path)
            self._open_path_at_start()
        return True

    def _truncated(self, src: _Source) -> None:
        """``src`` shrank or its head changed under us: copytruncate."""
        self.stats.truncations += 1
        log.info("%s: truncated in place", self.path)
        src_offset = src.offset(src.line_start)
        src.close()
        self._src = None
        copy = self._find_sibling(src_offset, by_inode=False, exclude=src.identity())
        if copy is not None:
            copy.copy = True
            self._src = copy
        else:
            self.stats.gaps += 1
            self._last = src_offset
            self._open_path_at_start()

    # -- opening ----------------------------------------------------------------

    def _stat_path(self) -> os.stat_result | None:
        try:
            return os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _open_fd(self, path: Path) -> tuple[int, os.stat_result] | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return fd, os.fstat(fd)

    def _open_path_at_start(self) -> None:
        opened = self._open_fd(self.path)
        if opened is None:
            return  # gone again; _open retries on the next poll
        fd, st = opened
        self._src = _Source(fd, st, 0, b"", self.path.name)

    def _open(self, now: float) -> None:
        """No source: open the path, applying a saved offset if we have one."""
        saved = self._pending
        if saved is None:
            self._open_path_at_start()
            if self._src is not None and self.from_end:
                self._seek_end(self._src)
            # from_end applies to a file present at the first poll only; a file
            # that appears later is new and read from its start.
            self.from_end = False
            return
        opened = self._open_fd(self.path)
        if opened is not None:
            fd, st = opened
            if (st.st_dev, st.st_ino) == (saved.device, saved.inode):
                head = os.pread(fd, max(saved.fingerprint_len, self.fingerprint_size), 0)
                if st.st_size >= saved.position and _hash(head[: saved.fingerprint_len]) == saved.fingerprint:
                    self._pending = None
                    self._src = _Source(fd, st, saved.position, head, self.path.name)
                    return
                # Same inode, other content: reused inode, or truncated (and
                # rewritten) while we were stopped. A copytruncate copy may
                # still hold what we had not read.
                self.stats.fingerprint_mismatches += 1
                log.info("%s: saved offset's fingerprint does not match the file", self.path)
                os.close(fd)
                self._pending = None
                self._src = self._find_sibling(saved, by_inode=False, exclude=(st.st_dev, st.st_ino))
                if self._src is not None:
                    self._src.copy = True
                else:
                    self.stats.gaps += int(saved.position > 0)
                    self._open_path_at_start()
                return
            os.close(fd)
        # The path holds another file, or none: rotated while we were stopped.
        rotated = self._find_sibling(saved, by_inode=True, exclude=None)
        if rotated is not None:
            self._pending = None
            self._src = rotated
            return
        if opened is None:
            return  # keep the saved offset until the path (or its rotated file) shows up
        self._pending = None
        self.stats.gaps += 1
        log.warning("%s: saved offset's file not found; reading the current file from 0", self.path)
        self._open_path_at_start()

    def _seek_end(self, src: _Source) -> None:
        """Start after the last complete line present now (``from_end``)."""
        size = os.fstat(src.fd).st_size
        pos = size
        while pos > 0:
            start = max(0, pos - self.chunk_size)
            block = os.pread(src.fd, pos - start, start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                pos = start + nl + 1
                break
            pos = start
        src.read_pos = src.line_start = pos
        src.head = os.pread(src.fd, self.fingerprint_size, 0)
        src.fp = _hash(src.head)

    def _candidates(self) -> list[Path]:
        """Siblings that may be rotated versions of the path, likeliest first."""
        parent, name = self.path.parent, self.path.name
        try:
            names = [
                n for n in os.listdir(parent)
                if n != name and n.startswith(name) and not n.endswith(_COMPRESSED)
            ]
        except OSError:
            return []
        first = [n for n in names if n == name + ".1"]
        rest = []
        for n in names:
            if n == name + ".1":
                continue
            try:
                rest.append((os.stat(parent / n).st_mtime, n))
            except OSError:
                continue
        rest.sort(reverse=True)
        return [parent / n for n in first + [n for _, n in rest]][:MAX_SIBLINGS]

    def _next_rotated(self, src: _Source, exclude: tuple[int, int]) -> _Source | None:
        """The file rotated right after ``src``, if it is not the one at the path.

        Candidates have a rotation-style name (``log.3``, ``log-20261125``),
        are not ``src`` nor the file at the path (``exclude``), and were written
        after ``src`` was: the one with the oldest mtime above ``src``'s is
        next. A copytruncate copy is never followed by another copy.
        """
        if src.copy:
            return None
        after = os.fstat(src.fd).st_mtime_ns
        best: tuple[int, Path] | None = None
        for cand in self._candidates():
            if not _ROTATED_NAME.fullmatch(cand.name[len(self.path.name):]):
                continue
            try:
                st = os.stat(cand)
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in (exclude, src.identity()) or st.st_mtime_ns <= after:
                continue
            if best is None or st.st_mtime_ns < best[0]:
                best = (st.st_mtime_ns, cand)
        if best is None:
            return None
        opened = self._open_fd(best[1])
        if opened is None:
            return None
        fd, st = opened
        return _Source(fd, st, 0, b"", best[1].name)

    def _find_sibling(self, saved: Offset, *, by_inode: bool, exclude: tuple[int, int] | None) -> _Source | None:
        """Find the file ``saved`` points into among the path's siblings.

        ``by_inode``: the file was renamed (same inode, same head). Otherwise it
        was copied (other inode, same head): ``exclude`` is the truncated
        original. The candidate must be at least ``saved.position`` long.
        Returns a source positioned at ``saved.position``.
        """
        for cand in self._candidates():
            try:
                st = os.stat(cand)
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if by_inode and ident != (saved.device, saved.inode):
                continue
            if exclude is not None and ident == exclude:
                continue
            if st.st_size < saved.position or st.st_size < saved.fingerprint_len:
                continue
            opened = self._open_fd(cand)
            if opened is None:
                continue
            fd, st = opened
            head = os.pread(fd, max(saved.fingerprint_len, self.fingerprint_size), 0)
            if _hash(head[: saved.fingerprint_len]) != saved.fingerprint or st.st_size < saved.position:
                os.close(fd)
                continue
            self.stats.recovered += 1
            log.info("%s: finishing %s from position %d", self.path, cand.name, saved.position)
            return _Source(fd, st, saved.position, head, cand.name)
        return None


# -- trio shell -------------------------------------------------------------------


async def follow_lines(follower: Follower, *, poll: float = 0.2) -> AsyncIterator[Line]:
    """Async-iterate the lines of ``follower``, polling every ``poll`` seconds.

    Runs until cancelled. Does not close the follower. Wrap it in
    ``contextlib.aclosing`` when you may stop iterating early.
    """
    while True:
        lines = follower.poll(trio.current_time())
        for line in lines:
            yield line
        if follower.more:
            await trio.lowlevel.checkpoint()
        else:
            await trio.sleep(poll)


async def follow(
    path: str | os.PathLike[str],
    offset: Offset | None = None,
    *,
    poll: float = 0.2,
    buffer: int = 0,
    task_status: trio.TaskStatus[trio.MemoryReceiveChannel[Line]] = trio.TASK_STATUS_IGNORED,
    **options: object,
) -> None:
    """Follow ``path`` as a task: ``rx = await nursery.start(follow, path, offset)``.

    ``task_status.started`` hands back the receive end of a memory channel of
    :class:`Line` (``buffer`` lines deep; 0 = hand over one at a time, so the
    follower never reads far ahead of the consumer). ``options`` go to
    :class:`Follower`. Returns within one poll interval of the receive end
    being closed; otherwise runs until cancelled.
    """
    send, recv = trio.open_memory_channel[Line](buffer)
    with Follower(path, offset, **options) as follower, send:  # type: ignore[arg-type]
        task_status.started(recv)
        while send.statistics().open_receive_channels:
            try:
                for line in follower.poll(trio.current_time()):
                    await send.send(line)
            except trio.BrokenResourceError:
                return
            if follower.more:
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep(poll)


__all__ = [
    "CHUNK_SIZE",
    "FINGERPRINT_SIZE",
    "MAX_LINE",
    "FollowStats",
    "Follower",
    "Line",
    "Offset",
    "follow",
    "follow_lines",
]
