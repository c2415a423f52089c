"""Netascii (RFC 764 via RFC 1350 section 1): the conversion, and a file seen through it block by block.

A read transfer in netascii mode reads its file through :class:`NetasciiSource`,
which converts on the fly and knows where each block starts in the original
file; :class:`NetasciiSizes` remembers converted sizes (the tsize) so a file is
scanned once per version, and :data:`NETASCII_MAX` bounds what is converted at
all. Pure: the file is anything with ``size`` and ``pread`` (:class:`Source`).
"""

from __future__ import annotations

from typing import Protocol

from orchestrator.protocols.tftp.errors import LocalProtocolError

__all__ = ["NETASCII_MAX", "Source", "NetasciiSource", "NetasciiSizes", "netascii_encode", "netascii_decode", "netascii_size"]

#: Largest file (before conversion) served in netascii mode. Netascii is for
#: text -- menus and scripts of a few kB -- and its transfer size (tsize, and the
#: last block) is only known after converting the whole file, a scan on the
#: server's request path. A bigger file in netascii is nearly always a binary
#: asked for in the wrong mode (tftp-hpa's client defaults to netascii), which
#: the conversion would corrupt anyway: it is refused with a message saying so.
NETASCII_MAX = 1 << 20


def netascii_encode(data: bytes) -> bytes:
    """Unix text to netascii (RFC 764 via RFC 1350 section 1): CR -> CR NUL, LF -> CR LF.

    Order matters: CRs first, or the CR of each new CR LF would become CR NUL.
    """
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def netascii_decode(data: bytes) -> bytes:
    """The inverse of :func:`netascii_encode` (for clients and tests)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r\0", b"\r")


def _netascii_len(raw: bytes) -> int:
    return len(raw) + raw.count(b"\r") + raw.count(b"\n")


class Source(Protocol):
    """What a transfer reads file bytes from (a :class:`~orchestrator.bootserver.files.BootFile`, or a :class:`NetasciiSource`)."""

    size: int

    def pread(self, offset: int, length: int) -> bytes: ...


def netascii_size(source: Source, chunk: int = 1 << 20) -> int:
    """The size of ``source`` after netascii conversion (its tsize), by one streaming scan.

    tftp-hpa reports tsize only in octet mode; we compute it so pxelinux-style
    clients that insist on tsize also work in netascii mode.
    """
    total, off = 0, 0
    while off < source.size:
        raw = source.pread(off, chunk)
        if not raw:
            break
        total += _netascii_len(raw)
        off += len(raw)
    return total



class NetasciiSizes:
    """Converted sizes of files already scanned, by file identity (a bounded LRU map).

    :func:`netascii_size` reads the whole file; without this, a client repeating
    a netascii RRQ (and aborting it) makes the server scan the same file again
    and again. The key is the file's ``identity`` attribute (for a file on
    disk, ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``): any write
    changes the ctime (to the file system's timestamp granularity), even one
    that puts the mtime back (``cp -p``, ``rsync -t``), so a changed file is a
    new key. Files without an identity (in-memory, dynamic content) are not
    cached.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._sizes: dict[object, int] = {}

    def __len__(self) -> int:
        return len(self._sizes)

    def get(self, key: object) -> int | None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._sizes[key] = size  # most recently used last
        return size

    def put(self, key: object, size: int) -> None:
        self._sizes.pop(key, None)
        self._sizes[key] = size
        while len(self._sizes) > self.maxsize:
            del self._sizes[next(iter(self._sizes))]


class NetasciiSource:
    """A read-only view of a file as its netascii conversion, block by block.

    Output offsets differ from input offsets, so the view remembers, for each
    block boundary it has produced, where in the input that block starts and
    whether the first input byte's two-byte expansion was split by the previous
    block (CR|LF or CR|NUL across the boundary). Reads must start at a boundary
    already produced (0 or the end of an earlier read) and never go backwards --
    exactly how :class:`ReadTransfer` reads (windows start at ``acked + 1``, and
    ``acked`` only grows) -- so checkpoints behind the read offset are dropped.
    """

    def __init__(self, source: Source, blksize: int, size: int | None = None) -> None:
        self._src = source
        self._bs = blksize
        #: The converted size: ``size`` when the caller knows it (see :class:`NetasciiSizes`), else one scan.
        self.size = netascii_size(source) if size is None else size
        self._marks: dict[int, tuple[int, int]] = {0: (0, 0)}  # out offset -> (in offset, skip)

    def pread(self, offset: int, length: int) -> bytes:
        try:
            in_off, skip = self._marks[offset]
        except KeyError:
            raise LocalProtocolError(f"netascii read at {offset}, not a produced block boundary") from None
        for k in [k for k in self._marks if k < offset]:
            del self._marks[k]
        out = []
        pos, end = offset, min(offset + length, self.size)
        while pos < end:
            n = min(self._bs, end - pos)
            chunk, in_off, skip = self._block(in_off, skip, n)
            if not chunk:
                break  # the file shrank under us
            out.append(chunk)
            pos += len(chunk)
            self._marks[pos] = (in_off, skip)
        return b"".join(out)

    def _block(self, in_off: int, skip: int, n: int) -> tuple[bytes, int, int]:
        # Each input byte yields 1 or 2 output bytes, so n input bytes always suffice.
        raw = self._src.pread(in_off, n)
        conv = netascii_encode(raw)[skip:]
        if len(conv) <= n:
            return conv, in_off + len(raw), 0
        # Find the shortest input prefix whose conversion covers n output bytes.
        lo, hi = 1, len(raw)
        while lo < hi:
            mid = (lo + hi) // 2
            if _netascii_len(raw[:mid]) - skip >= n:
                hi = mid
            else:
                lo = mid + 1
        produced = _netascii_len(raw[:lo]) - skip
        if produced == n:
            return conv[:n], in_off + lo, 0
        # The last input byte's expansion was split: its second byte opens the next block.
        return conv[:n], in_off + lo - 1, 1
