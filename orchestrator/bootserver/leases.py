"""Durable DHCP lease store: a checksummed append-only journal with compaction.

:class:`LeaseStore` is the lease table the DHCP core asks for
(:class:`orchestrator.protocols.dhcp_server.LeaseTable`: ``by_mac``, ``by_ip``,
``put``, ``remove``), made durable. The lease record itself,
:class:`~orchestrator.protocols.leases.Lease`, and :class:`LeaseConflict` live
on the protocol side and are re-exported here.

The store keeps every lease in memory (two dicts: MAC -> lease, IP -> MAC) and
makes changes durable through one file, the *journal*. The server stages
changes with :meth:`LeaseStore.put` / :meth:`LeaseStore.remove` (visible at once
to :meth:`~LeaseStore.by_mac` / :meth:`~LeaseStore.by_ip`), then the trio shell
(:mod:`orchestrator.bootserver.dhcp`) calls :meth:`LeaseStore.commit` once per
batch of packets, *before* it sends the ACKs of that batch: group commit, one
``fdatasync`` per batch.

File format
-----------
One record per line, pure ASCII::

    <crc32 of JSON, 8 lower-case hex digits> <space> <JSON object> <LF>

    55327a29 {"op":"hdr","v":1}
    db5d0b31 {"op":"put","mac":"52:54:00:aa:bb:cc","ip":"10.0.0.7","exp":1764085800.5,"state":"bound","host":"n01","cid":"01525400aabbcc"}
    b674414b {"op":"del","mac":"52:54:00:aa:bb:cc"}

``put`` replaces the MAC's lease, ``del`` drops it, ``hdr`` names the format
version. ``host`` and ``cid`` are omitted when ``None``. The JSON is written
with ``ensure_ascii=True``: every newline, quote, control character, non-ASCII
character (even a lone surrogate) inside a hostname is an escape sequence, so a
record can never contain a raw LF and always splits back into exactly one line.
Replaying the records in order rebuilds the state. Compaction rewrites the file
as a header plus one ``put`` per live lease.

Why this and not SQLite (WAL)?

* *Bad records are skipped one by one.* A record is self-contained and
  self-checking, so the loader drops exactly the damaged line and keeps the
  rest, and the server starts. A damaged SQLite page ("database disk image is
  malformed") takes the whole file down, and the server with it.
* *Written means loadable, by construction.* :class:`Lease` validates its
  fields on construction, and the loader builds leases through the same
  constructor. For a lease with a hostname or a client id, ``put`` also
  checks, before it changes anything, that the encoded record is one line
  within the loader's size limit and that its JSON decodes to exactly the
  values written (a lease without either -- every pool lease -- holds only
  plain ASCII fields the constructor checked, so its record is written
  directly, the same bytes, and needs no check). A lease that would not load
  back is refused with ``ValueError`` at ``put`` and never written, so a
  journal we wrote can always be loaded. The one str that JSON does not round-trip, a
  surrogate *pair* written as two code points, is rejected by ``Lease`` itself.
  Lone surrogates, as ``surrogateescape`` makes them, round-trip fine.
* *Same cost where it matters.* The commit is one ``write`` + ``fdatasync``,
  the same disk work as an SQLite WAL commit with ``synchronous=FULL``. And the
  file is greppable.

Crash safety (``kill -9`` at any instant; power loss on a disk that honours
flushes)
-------------------------------------------------------------------------------
* *Commit:* the batch is appended with ``write`` and made durable with
  ``fdatasync`` before :meth:`commit` returns. A crash before that returns
  leaves some prefix of the batch in the file, possibly ending in a torn
  (partial) line. Nothing of that batch was ACKed, so any prefix is acceptable.
* *Torn tail:* a final line with no LF is a torn write. The loader counts it in
  :attr:`LeaseStore.skipped`, sets :attr:`LeaseStore.torn`, and truncates the
  file back to the last LF before appending again (so a later record can never
  be glued onto the fragment). A complete line that is not a valid record
  (wrong checksum, bad JSON, wrong fields or types, over-long) is also skipped
  and counted, wherever it is. The store starts anyway. When records in the
  middle were bad, the damaged file is kept as ``<file>.corrupt`` for
  forensics and the journal is compacted clean.
* *Compaction:* write ``<file>.tmp`` and fsync it, ``rename`` it over the
  journal, fsync the directory, then append to the new file. Before the rename
  the old journal is whole; after it the new one is whole (it was fsynced
  first). The directory fsync comes before any later commit lands in the new
  file: otherwise a power cut could bring back the old name, and the commits
  made after the compaction would be lost. A stale ``.tmp`` from a crash
  mid-compaction is deleted on open.
* *Write errors:* if ``write``/``fdatasync`` fails, we cannot know what reached
  the disk (the "fsyncgate" lesson: the error is reported once, then the pages
  count as clean). The store is *failed*: this and every later :meth:`commit`
  raise :class:`LeaseStoreError`. The server must stop ACKing, then close the
  store and open it again, which reloads the truth from disk. Records from the
  failed batch may or may not be on disk; none was ACKed, and they are valid
  records that obey the invariants, so loading them is harmless.
* *One writer:* an exclusive ``flock`` on ``<file>.lock`` is held while the
  store is open. A second store on the same file, in this process or another,
  raises :class:`LeaseStoreLocked` instead of interleaving records.

Invariants and conflicts
------------------------
An IP maps to at most one MAC, and a MAC holds at most one lease. ``put`` of an
IP held by another MAC raises :class:`LeaseConflict`; the server must
``remove`` the old holder first (a released, declined or expired lease still
holds its IP until it is removed or :meth:`~LeaseStore.expire` drops it). The
loader replays records with the same rule, so **the earlier holder wins**: a
``put`` that claims an IP another MAC holds at that point of the replay is
skipped and counted. The writer checks the same rule under the same lock in
the same order as it appends, so a journal we wrote never contains such a
record. One can only come from damage or a foreign writer. The earlier holder
is the one whose claim we can account for, and it may already be using the
address. Either way two MACs never get the same IP.

Throughput
----------
``python -m orchestrator.bootserver.leases bench [DIR]`` measures put + commit
for batches of 1, 10 and 100 puts, on disk and in memory; each put builds a
fresh Lease over a 250-lease pool, as the server does. A DORA exchange is one
put (bound); with group commit over a burst, the CPU cost of ``put`` (building
and validating the Lease, the record) is the limit, not the ``fdatasync``. The
DHCP shell commits with ``commit(compact=False)`` and runs
:meth:`LeaseStore.compact_if_due` after it has released the ACKs, so no ACK
waits for a compaction.

Threading
---------
All methods are thread-safe. :meth:`commit` may run in a worker thread
(``trio.to_thread.run_sync(store.commit)``) while the event loop goes on calling
:meth:`put`. A commit writes what was staged when it started. Commits are
serialised, so records reach the file in the order they were staged.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
import zlib
from pathlib import Path
from types import TracebackType

# The record and its conflict error are the protocol side's; the journal's API takes and returns them.
from orchestrator.protocols.leases import MAX_TEXT, STATES, Lease, LeaseConflict, check_mac

__all__ = [
    "FORMAT_VERSION",
    "MAX_LINE",
    "MAX_TEXT",
    "STATES",
    "Lease",
    "LeaseConflict",
    "LeaseStore",
    "LeaseStoreError",
    "LeaseStoreLocked",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: Longest journal line the loader accepts. Worst case for a valid record:
#: MAX_TEXT astral characters escaped as surrogate pairs (12 bytes each) +
#: MAX_TEXT hex digits + the fixed fields, about 13.5 KiB.
MAX_LINE = 16 * 1024

_CRC_RE = re.compile(rb"[0-9a-f]{8}")
_PUT_KEYS = frozenset({"op", "mac", "ip", "exp", "state"})
_PUT_OPTIONAL = frozenset({"host", "cid"})


class LeaseStoreError(RuntimeError):
    """The journal could not be written; the store must be closed and reopened."""


class LeaseStoreLocked(LeaseStoreError):
    """Another open store (in this or another process) holds the lease file."""


# -- record codec -------------------------------------------------------------


# One encoder for every record: ``json.dumps`` with non-default arguments builds a new one per call.
_ENCODER = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def _frame(obj: dict[str, object]) -> bytes:
    payload = _ENCODER.encode(obj).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _put_record(lease: Lease) -> dict[str, object]:
    rec: dict[str, object] = {
        "op": "put",
        "mac": lease.mac,
        "ip": lease.ip,
        "exp": lease.expires,
        "state": lease.state,
    }
    if lease.hostname is not None:
        rec["host"] = lease.hostname
    if lease.client_id is not None:
        rec["cid"] = lease.client_id
    return rec


def _plain_put_line(lease: Lease) -> bytes:
    """``_frame(_put_record(lease))`` for a lease without hostname and client id, built directly
    (``float.__repr__`` is what the JSON encoder writes for a finite float)."""
    payload = b'{"op":"put","mac":"%s","ip":"%s","exp":%s,"state":"%s"}' % (
        lease.mac.encode("ascii"), lease.ip.encode("ascii"), float.__repr__(lease.expires).encode("ascii"),
        lease.state.encode("ascii"))
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _encode_del(mac: str) -> bytes:
    return _frame({"op": "del", "mac": mac})


_HEADER = _frame({"op": "hdr", "v": FORMAT_VERSION})


def _decode(line: bytes) -> tuple[str, Lease | str | None]:
    """One journal line (without its LF) -> ``("put", Lease)``, ``("del", mac)``
    or ``("hdr", None)``. Anything else raises ValueError/TypeError."""
    if len(line) > MAX_LINE or len(line) < 10 or line[8:9] != b" " or not _CRC_RE.fullmatch(line[:8]):
        raise ValueError("not a journal record")
    payload = line[9:]
    if zlib.crc32(payload) != int(line[:8], 16):
        raise ValueError("checksum mismatch")
    rec = json.loads(payload)
    if not isinstance(rec, dict):
        raise ValueError("record is not an object")
    op = rec.get("op")
    keys = rec.keys()
    if op == "put":
        if not (_PUT_KEYS <= keys and keys <= _PUT_KEYS | _PUT_OPTIONAL):
            raise ValueError("put record has wrong fields")
        return "put", Lease(
            mac=rec["mac"],
            ip=rec["ip"],
            expires=rec["exp"],
            state=rec["state"],
            hostname=rec.get("host"),
            client_id=rec.get("cid"),
        )
    if op == "del":
        if keys != {"op", "mac"}:
            raise ValueError("del record has wrong fields")
        return "del", check_mac(rec["mac"])
    if op == "hdr":
        if keys != {"op", "v"} or rec["v"] != FORMAT_VERSION or isinstance(rec["v"], bool):
            raise ValueError(f"unsupported header {rec!r}")
        return "hdr", None
    raise ValueError(f"unknown record op {op!r}")


# -- the store ----------------------------------------------------------------


class LeaseStore:
    """Leases in memory, made durable by :meth:`commit` (see the module docstring).

    ``path=None`` keeps everything in memory (tests, dry runs): ``commit`` is a
    no-op. Otherwise the journal at ``path`` is loaded (created when missing);
    :attr:`skipped` counts the records that were skipped while loading it and
    :attr:`torn` says whether one of them was a torn last line.
    ``compact_min``: compact once the journal holds at least this many records
    and more than four per live lease.
    """

    def __init__(self, path: str | os.PathLike[str] | None, *, compact_min: int = 10_000) -> None:
        self.path = Path(path) if path is not None else None
        #: Bad records skipped while loading (torn tail included).
        self.skipped = 0
        #: True when the file ended in a torn (partial) record, now truncated away.
        self.torn = False
        self._compact_min = max(1, compact_min)
        self._by_mac: dict[str, Lease] = {}
        self._by_ip: dict[str, str] = {}
        self._pending: list[bytes] = []
        self._lock = threading.Lock()  # the maps and _pending
        self._io = threading.Lock()  # the file: commits and compactions, in order
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._records = 0  # lines in the journal file
        self._next_compact = self._compact_min
        self._failed: BaseException | None = None
        self._closed = False
        if self.path is not None:
            try:
                self._open(self.path)
            except BaseException:
                self._release()
                raise

    # -- queries --------------------------------------------------------------

    def by_mac(self, mac: str) -> Lease | None:
        return self._by_mac.get(mac.lower())

    def by_ip(self, ip: str) -> Lease | None:
        with self._lock:
            mac = self._by_ip.get(ip)
            return None if mac is None else self._by_mac[mac]

    def leases(self) -> list[Lease]:
        with self._lock:
            return list(self._by_mac.values())

    def __len__(self) -> int:
        return len(self._by_mac)

    # -- changes (staged; durable after commit) -------------------------------

    def put(self, lease: Lease) -> None:
        """Stage ``lease`` as the MAC's lease (replacing any it had).

        Raises :class:`LeaseConflict` if another MAC holds ``lease.ip``, and
        ``ValueError`` if the record would not load back (cannot happen for a
        valid :class:`Lease`; checked anyway, it is cheap).
        """
        if not isinstance(lease, Lease):
            raise TypeError(f"put() takes a Lease, got {type(lease).__name__}")
        if lease.hostname is None and lease.client_id is None:
            # The common record (a pool client): every field is plain ASCII that a Lease has
            # already checked (MAC and IP by pattern, the state from STATES, a finite float),
            # so the JSON is written directly -- the same bytes the encoder writes -- and
            # round-trips by construction.
            line = _plain_put_line(lease)
        else:
            rec = _put_record(lease)
            line = _frame(rec)
            # Written means loadable: the line is one line, within the loader's limit, and
            # its JSON decodes to the very values of a Lease that already validated.
            if len(line) > MAX_LINE or line.count(b"\n") != 1 or json.loads(line[9:]) != rec:
                raise ValueError(f"lease does not survive a round trip: {lease!r}")
        with self._lock:
            self._apply_put(lease)
            self._pending.append(line)

    def remove(self, mac: str) -> None:
        """Stage the removal of the MAC's lease; no-op when it has none."""
        mac = mac.lower()
        with self._lock:
            if mac in self._by_mac:
                self._apply_del(mac)
                self._pending.append(_encode_del(mac))

    def expire(self, now: float) -> int:
        """Stage the removal of every lease with ``expires <= now``, whatever
        its state (an offer not taken up, a released or declined address past
        its quarantine, a bound lease not renewed). Returns how many.

        Not durable until the next :meth:`commit`; a removal lost to a crash
        only brings back an expired lease, which the next ``expire`` drops.
        """
        with self._lock:
            victims = [m for m, lease in self._by_mac.items() if lease.expires <= now]
            for mac in victims:
                self._apply_del(mac)
                self._pending.append(_encode_del(mac))
        return len(victims)

    def commit(self, *, compact: bool = True) -> None:
        """Make every change staged so far durable (write + fdatasync).

        Then, if the journal has grown past its compaction point, compact it
        (best effort: a failure is logged); ``compact=False`` leaves that to a
        later :meth:`compact_if_due`, so a caller that waits for the commit to
        send ACKs does not wait for the compaction too.

        Raises :class:`LeaseStoreError` if the journal cannot be written, and on
        every call after that: close the store and open it again.
        """
        with self._io:
            if self._failed is not None:
                raise LeaseStoreError(f"lease journal {self.path} failed earlier; reopen the store") from self._failed
            if self._closed:
                raise LeaseStoreError("lease store is closed")
            with self._lock:
                batch, self._pending = self._pending, []
            if self._fd is None or not batch:
                return
            try:
                _write_all(self._fd, b"".join(batch))
                os.fdatasync(self._fd)
            except OSError as exc:
                self._failed = exc
                raise LeaseStoreError(f"cannot write lease journal {self.path}: {exc}") from exc
            self._records += len(batch)
            if compact and self._records >= self._next_compact:
                self._compact_best_effort()

    def compact_if_due(self) -> None:
        """Compact (best effort) if the journal has grown past its compaction point; the
        automatic step of :meth:`commit`, on its own."""
        with self._io:
            if self._failed is None and not self._closed and self._fd is not None and self._records >= self._next_compact:
                self._compact_best_effort()

    def compact(self) -> None:
        """Rewrite the journal as one record per live lease (also makes every
        staged change durable). Raises ``OSError``/:class:`LeaseStoreError` on
        failure; the automatic compaction in :meth:`commit` only logs."""
        with self._io:
            if self._failed is not None:
                raise LeaseStoreError(f"lease journal {self.path} failed earlier; reopen the store") from self._failed
            if self._fd is None:
                with self._lock:
                    self._pending = []
                return
            self._compact()

    def close(self) -> None:
        """Commit what is staged, then release the file. Idempotent."""
        if self._closed:
            return
        try:
            if self._failed is None:
                self.commit()
        finally:
            with self._io:
                self._closed = True
                self._release()

    def __enter__(self) -> LeaseStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals ------------------------------------------------------------

    def _apply_put(self, lease: Lease) -> None:
        holder = self._by_ip.get(lease.ip)
        if holder is not None and holder != lease.mac:
            raise LeaseConflict(f"{lease.ip} is leased to {holder}, not {lease.mac}")
        old = self._by_mac.get(lease.mac)
        if old is not None and old.ip != lease.ip:
            del self._by_ip[old.ip]
        self._by_mac[lease.mac] = lease
        self._by_ip[lease.ip] = lease.mac

    def _apply_del(self, mac: str) -> None:
        old = self._by_mac.pop(mac, None)
        if old is not None:
            del self._by_ip[old.ip]

    def _open(self, path: Path) -> None:
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._lock_fd = lock_fd
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LeaseStoreLocked(f"lease file {path} is in use by another store") from None
        try:
            os.unlink(self._tmp_path())  # left by a crash during compaction
        except FileNotFoundError:
            pass
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self._compact()  # creates the file, durably
            return
        good_end, bad_middle = self._replay(data)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if good_end < len(data):
            log.warning("lease journal %s: dropping a torn last record (%d bytes)", path, len(data) - good_end)
            os.ftruncate(self._fd, good_end)
            os.fdatasync(self._fd)
        if bad_middle:
            log.warning(
                "lease journal %s: skipped %d bad record(s); original kept as %s.corrupt", path, bad_middle, path
            )
            self._keep_corrupt_copy(data)
        if bad_middle or self._records >= self._next_compact:
            self._compact_best_effort()

    def _replay(self, data: bytes) -> tuple[int, int]:
        """Apply the journal's records; return (end of the last complete line,
        number of bad complete lines)."""
        good_end = data.rfind(b"\n") + 1
        if good_end < len(data):
            self.skipped += 1
            self.torn = True
        bad = 0
        lines = data[:good_end].split(b"\n")
        lines.pop()  # the empty string after the last LF
        for line in lines:
            try:
                op, value = _decode(line)
                if op == "put":
                    assert isinstance(value, Lease)
                    self._apply_put(value)
                elif op == "del":
                    assert isinstance(value, str)
                    self._apply_del(value)
            except (ValueError, TypeError, RecursionError):  # LeaseConflict is a ValueError
                bad += 1
        self.skipped += bad
        self._records = len(lines)
        self._next_compact = max(self._compact_min, 4 * len(self._by_mac))
        return good_end, bad

    def _tmp_path(self) -> str:
        return f"{self.path}.tmp"

    def _compact_best_effort(self) -> None:
        try:
            self._compact()
        except OSError as exc:
            # The journal itself is intact; try again after another batch of records.
            log.warning("lease journal %s: compaction failed (%s); will retry later", self.path, exc)
            self._next_compact = self._records + self._compact_min

    def _compact(self) -> None:
        """Write-temp + fsync + rename + fsync(dir). Caller holds ``_io``."""
        assert self.path is not None
        with self._lock:
            snapshot = list(self._by_mac.values())
            # The snapshot already contains what is staged; on failure it goes back.
            staged, self._pending = self._pending, []
        tmp = self._tmp_path()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                chunks = [_HEADER]
                chunks.extend(_plain_put_line(lease) if lease.hostname is None and lease.client_id is None
                              else _frame(_put_record(lease)) for lease in snapshot)
                _write_all(fd, b"".join(chunks))
                os.fsync(fd)
                os.rename(tmp, self.path)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            with self._lock:
                self._pending = staged + self._pending
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        # Renamed: from here on the new file is the journal.
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)
        self._records = len(chunks)
        self._next_compact = max(self._compact_min, 4 * len(snapshot))
        try:
            _fsync_dir(self.path.parent)
        except OSError as exc:
            # Until the rename is durable, appends to the new file could vanish in a
            # power cut. Everything committed so far is in the old file as well.
            self._failed = exc
            log.error("lease journal %s: directory fsync failed after compaction: %s", self.path, exc)

    def _keep_corrupt_copy(self, data: bytes) -> None:
        """Best effort: keep the damaged journal for forensics as ``<file>.corrupt``."""
        dest = f"{self.path}.corrupt"
        try:
            with open(dest + ".tmp", "wb") as f:
                f.write(data)
            os.replace(dest + ".tmp", dest)
        except OSError as exc:
            log.warning("cannot keep a copy of the damaged lease journal: %s", exc)

    def _release(self) -> None:
        for name in ("_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)  # closing the lock fd releases the flock


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- benchmark ----------------------------------------------------------------


def _bench(directory: str, repeat: int = 3) -> None:
    """put+commit throughput with batches of 1, 10 and 100, best of ``repeat``,
    printed as a table. Each put builds a fresh Lease, as the server does."""
    base = time.time() + 3600
    macs = [f"52:54:00:00:{i >> 8:02x}:{i & 0xFF:02x}" for i in range(250)]
    ips = [f"10.0.{i >> 8}.{i & 0xFF}" for i in range(250)]

    def run(path: str | None, batch: int, total: int) -> float:
        with LeaseStore(path) as store:
            t0 = time.perf_counter()
            for i in range(total):
                k = i % 250
                store.put(Lease(macs[k], ips[k], base + i, "bound", f"node{k:03d}"))
                if (i + 1) % batch == 0:
                    store.commit()
            return time.perf_counter() - t0

    print("batch  journal puts/s  ms/commit  in-memory puts/s")
    for batch in (1, 10, 100):
        total = 2_000 if batch == 1 else 20_000
        path = os.path.join(directory, f"bench-{batch}.leases")
        disk = min(run(path, batch, total) for _ in range(repeat))
        mem = min(run(None, batch, total) for _ in range(repeat))
        print(f"{batch:5d}  {total / disk:14.0f}  {disk / (total / batch) * 1e3:9.3f}  {total / mem:16.0f}")
        for suffix in ("", ".lock"):
            os.unlink(path + suffix)


if __name__ == "__main__":
    import sys
    import tempfile

    if len(sys.argv) < 2 or sys.argv[1] != "bench":
        sys.exit("usage: python -m orchestrator.bootserver.leases bench [DIR]")
    if len(sys.argv) > 2:
        _bench(sys.argv[2])
    else:
        with tempfile.TemporaryDirectory() as d:
            _bench(d)
