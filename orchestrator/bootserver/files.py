"""The boot root: confined, read-only file access shared by the TFTP and HTTP servers.

Two sources answer a name:

* a *dynamic* overlay (a callable), which the plan uses to answer
  ``pxelinux.cfg/<name>`` and iPXE scripts from the same rendering code as
  ``bootorch render`` -- no per-node files on disk;
* the *static* root directory.

Confinement is the part that matters. Each rule below exists because a real TFTP
server got it wrong (tftp-hpa, atftpd, dnsmasq, tftpy and fbtftp all had path
escapes at some point):

* names with a NUL, a backslash, or a ``..`` component are refused outright
  (``a/../b`` is harmless but refusing every ``..`` is simpler to reason about);
* leading slashes are stripped and the name is taken relative to the root, as
  ``in.tftpd -s`` does, because PXE configs commonly say ``/pxelinux.0``;
* we *open first, then check the opened file*: after ``open()`` we read the
  kernel's idea of the path from ``/proc/self/fd/N`` and require it to lie below
  the root's real path plus a separator, so a symlink out of the root or a
  sibling-prefix directory (root ``/srv/tftp`` vs ``/srv/tftp-private``) is
  caught without a stat-then-open race;
* only regular files are served; the open is non-blocking so a FIFO planted in
  the root cannot hang the server;
* a file that "others" may not read (no ``S_IROTH``) is refused with an access
  violation, as tftpd-hpa does: whatever the server's own user could open, a
  0600 or 0640 file in a boot root is a secret someone forgot there, not a boot
  file (``require_world_readable=False`` turns this off). Dynamic content is
  generated for serving and is not subject to it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol


class BootFileError(Exception):
    """A name that cannot be served. ``code`` maps onto TFTP error codes / HTTP status."""

    code = "error"


class NotFound(BootFileError):
    code = "not_found"


class AccessViolation(BootFileError):
    code = "access_violation"


class BootFile(Protocol):
    """An open file. ``pread`` never moves a shared offset, so one file may serve many."""

    name: str
    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class MemoryFile:
    """A file held in memory (dynamic content)."""

    name: str
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def close(self) -> None:
        pass


class DiskFile:
    """A file in the root, held open by descriptor.

    ``identity`` is ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)`` when
    known: the same for the same version of the same file, different after any
    write (the ctime moves even when a copy puts the mtime back). The TFTP
    server keys netascii sizes by it (``NetasciiSizes``).
    """

    __slots__ = ("name", "fd", "size", "identity")

    def __init__(self, name: str, fd: int, size: int, identity: tuple[int, ...] | None = None) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self.identity = identity

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:  # pragma: no cover - safety net only
        self.close()


#: ``dynamic(name, client_ip)`` returns content for ``name`` or None to fall through.
DynamicSource = Callable[[str, "str | None"], "bytes | None"]


def normalize_name(name: str) -> str:
    """Turn a client's file name into a root-relative path, or raise.

    >>> normalize_name("/pxelinux.cfg//01-aa-bb")
    'pxelinux.cfg/01-aa-bb'
    """
    if not name:
        raise AccessViolation("empty file name")
    if "\x00" in name:
        raise AccessViolation("NUL in file name")
    if "\\" in name:
        # Windows-style clients (WDS's pxeboot) send backslashes; tftp-hpa needs a
        # remap rule for them. We refuse rather than guess a mapping.
        raise AccessViolation("backslash in file name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise AccessViolation("'..' in file name")
    if not parts:
        raise AccessViolation("file name names the root")
    return "/".join(parts)


class BootFiles:
    """Answer a name from the dynamic overlay, then from the root directory.

    ``require_world_readable`` (default True) refuses files on disk without the
    "others may read" permission bit (see the module docstring).
    """

    def __init__(self, root: str | os.PathLike[str] | None, dynamic: DynamicSource | None = None, *,
                 require_world_readable: bool = True) -> None:
        self.root: Path | None = Path(root).resolve(strict=True) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise NotADirectoryError(str(self.root))
        self._prefix = (str(self.root).rstrip("/") + "/") if self.root is not None else ""
        self.dynamic = dynamic
        self.require_world_readable = require_world_readable

    def open(self, name: str, client_ip: str | None = None) -> BootFile:
        rel = normalize_name(name)
        if self.dynamic is not None:
            data = self.dynamic(rel, client_ip)
            if data is not None:
                return MemoryFile(rel, data)
        if self.root is None:
            raise NotFound(rel)
        path = self._prefix + rel
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(rel) from None
        except NotADirectoryError:
            raise NotFound(rel) from None
        except PermissionError:
            raise AccessViolation(rel) from None
        except UnicodeEncodeError:
            # A str that is not an encodable path (lone surrogates from some caller's
            # decoding): no file can have that name.
            raise NotFound(rel) from None
        except OSError as e:
            raise NotFound(f"{rel}: {e.strerror}") from None
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            if not real.startswith(self._prefix):
                raise AccessViolation(f"{rel} leaves the boot root")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotFound(f"{rel} is not a regular file")
            if self.require_world_readable and not st.st_mode & stat.S_IROTH:
                raise AccessViolation(f"{rel} is not world-readable")
            os.set_blocking(fd, True)
            return DiskFile(rel, fd, st.st_size, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except BaseException:
            os.close(fd)
            raise
