"""An in-memory file tree written as a newc cpio archive, byte-for-byte reproducible.

:class:`Tree` holds paths (no leading slash) and their entries; parents are
made as directories on the way. :func:`newc_archive` writes the tree in sorted
path order with inode numbers counted from 1, owner 0:0 and one mtime, so the
same tree always gives the same bytes; :func:`gzip_reproducible` compresses
with no file name and mtime 0. The kernel unpacks such an archive as an
initrd (Documentation/driver-api/early-userspace/buffer-format.rst).
"""

from __future__ import annotations

import gzip
import io
import stat
from dataclasses import dataclass

from orchestrator.image.errors import ImageError

S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR


@dataclass(frozen=True)
class Entry:
    mode: int  # including the file type bits
    data: bytes = b""  # file contents or symlink target
    rdev: tuple[int, int] = (0, 0)


class Tree:
    """An in-memory root file system: path (no leading slash) -> :class:`Entry`."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            e = self.entries.get(p)
            if e is None:
                self.entries[p] = Entry(S_IFDIR | 0o755)
            elif not stat.S_ISDIR(e.mode):
                raise ImageError(f"/{p} is not a directory (needed for /{path})")

    def dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(S_IFDIR | mode)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = Entry(S_IFCHR | mode, b"", (major, minor))

    def exists(self, path: str) -> bool:
        return path.strip("/") in self.entries

    @property
    def size(self) -> int:
        return sum(len(e.data) for e in self.entries.values())


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def newc_archive(tree: Tree, mtime: int = 0) -> bytes:
    """The tree as a newc ("070701") cpio archive, byte-for-byte reproducible.

    Entries in sorted path order (a directory sorts before everything in it),
    inode numbers counted from 1 in that order, owner 0:0, one mtime, nlink 1
    for files (no hard links, so the kernel's unpacker needs no link table)
    (Documentation/driver-api/early-userspace/buffer-format.rst).
    """
    out = io.BytesIO()

    def header(ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int], name: bytes) -> None:
        fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(hdr + name + b"\0")
        out.write(_pad4(len(hdr) + len(name) + 1))

    for ino, path in enumerate(sorted(tree.entries), start=1):
        e = tree.entries[path]
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        header(ino, e.mode, nlink, len(e.data), e.rdev, path.encode())
        out.write(e.data)
        out.write(_pad4(len(e.data)))
    header(0, 0, 1, 0, (0, 0), b"TRAILER!!!")
    return out.getvalue()


def gzip_reproducible(data: bytes) -> bytes:
    """gzip with no file name and mtime 0 (the header then depends on nothing else)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()
