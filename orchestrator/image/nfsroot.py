"""The NFS root of a ``root: nfs`` profile: the image's tree as a directory an NFS server exports.

A ``root: nfs`` profile boots the same busybox + dropbear initramfs as a RAM-disk
profile, with the NFS client modules added; its ``/init`` mounts the kernel
command line's ``nfsroot=`` and switches into that tree's own ``/init``
(``templates/init.sh``, ``enter_nfsroot`` in ``templates/lib.sh``). The tree it
mounts is this one:

- :func:`export_view` -- the image's :class:`~orchestrator.image.cpio.Tree` as
  an NFS root: no device nodes (the node moves its devtmpfs in), nothing under
  ``etc/dropbear`` (a tmpfs mount point at boot: the node's private host key
  never leaves the initramfs), every entry world-readable and nothing
  group- or world-writable, so it serves whole even when the server squashes
  root (a mode-0600 ``authorized_keys`` could not be read then);
- :func:`write_export` -- writes that tree as a real directory
  (``plan.nfs_export(profile)``, ``<state_dir>/nfsroot/<profile>``), owned by
  root when the build runs as root, with the build's one mtime: built in a
  sibling temporary directory and renamed into place, and left alone when it
  already holds exactly that tree. A server that exported the old directory
  keeps serving it until it exports the path again (restart the NFS server
  after a build reports a changed export);
- :func:`nfsroot_fstype` -- the file system type the image mounts an
  ``nfsroot=`` spec as, which decides the kernel modules the image carries.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

from orchestrator.image.cpio import Entry, Tree

#: NFS options that ask for version 2 or 3 (``parse_nfsroot`` in templates/lib.sh says the same).
_V3_OPTIONS = {"vers=2", "vers=3", "nfsvers=2", "nfsvers=3", "v2", "v3"}


def nfsroot_fstype(spec: str) -> str:
    """``nfs4``, or ``nfs`` when the options of ``spec`` (``[server:]path[,options]``) ask for NFS version 2 or 3."""
    _root, _, opts = spec.partition(",")
    return "nfs" if _V3_OPTIONS & {o.strip() for o in opts.split(",")} else "nfs4"


def export_view(tree: Tree) -> Tree:
    """``tree`` (an image root) as an NFS root: no device nodes, no files under etc/dropbear, world-readable modes."""
    out = Tree()
    for path, e in sorted(tree.entries.items()):
        kind = stat.S_IFMT(e.mode)
        if kind == stat.S_IFCHR or kind == stat.S_IFBLK:
            continue
        if path.startswith("etc/dropbear/"):
            continue
        if kind == stat.S_IFDIR:
            mode = 0o1777 if path == "tmp" else 0o755
        elif kind == stat.S_IFREG:
            mode = 0o755 if e.mode & 0o111 else 0o644
        else:
            mode = stat.S_IMODE(e.mode)
        out.entries[path] = Entry(kind | mode, e.data, e.rdev)
    return out


def _expected_uid() -> int | None:
    return 0 if os.geteuid() == 0 else None


def _holds(dest: Path, tree: Tree) -> bool:
    """Whether directory ``dest`` holds exactly ``tree`` (types, modes, contents, link targets; owner root when we are)."""
    uid = _expected_uid()
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o755:
        return False
    found: set[str] = set()
    for root, dirs, files in os.walk(dest):
        rel = os.path.relpath(root, dest)
        for name in dirs + files:
            found.add(name if rel == "." else f"{rel}/{name}")
    if found != set(tree.entries):
        return False
    for path, e in tree.entries.items():
        p = dest / path
        st = os.lstat(p)
        if st.st_mode != e.mode or (uid is not None and (st.st_uid, st.st_gid) != (uid, uid)):
            return False
        if stat.S_ISLNK(e.mode) and os.readlink(p) != e.data.decode():
            return False
        if stat.S_ISREG(e.mode) and (st.st_size != len(e.data) or p.read_bytes() != e.data):
            return False
    return True


def _materialise(tree: Tree, root: Path, mtime: int) -> None:
    """Write ``tree`` under the existing empty directory ``root``."""
    uid = _expected_uid()
    for path in sorted(tree.entries):
        e = tree.entries[path]
        p = root / path
        if stat.S_ISDIR(e.mode):
            p.mkdir()
        elif stat.S_ISREG(e.mode):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(e.data)
        elif stat.S_ISLNK(e.mode):
            os.symlink(e.data.decode(), p)
        else:
            raise ValueError(f"/{path}: an NFS root holds directories, files and symlinks only")
        if not stat.S_ISLNK(e.mode):
            os.chmod(p, stat.S_IMODE(e.mode))
        if uid is not None:
            os.lchown(p, uid, uid)
    os.chmod(root, 0o755)
    if uid is not None:
        os.lchown(root, uid, uid)
    # Times last, deepest first: writing into a directory moves its mtime.
    for path in sorted(tree.entries, reverse=True):
        os.utime(root / path, (mtime, mtime), follow_symlinks=False)
    os.utime(root, (mtime, mtime))


def write_export(tree: Tree, dest: Path, mtime: int = 0) -> bool:
    """Write ``tree`` (an :func:`export_view`) as the directory ``dest``; False when ``dest`` already holds it.

    The new tree is built beside ``dest`` (``.<name>.new-*``) and renamed into
    place; an old ``dest`` is renamed aside first and removed after, so a
    reader sees the old tree or the new one, and ``dest`` is missing only
    between two renames. Leftovers of an interrupted run are removed.
    """
    if _holds(dest, tree):
        return False
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{dest.name}.*-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dest.name}.new-"))
    try:
        _materialise(tree, tmp, mtime)
        if os.path.lexists(dest):
            old = parent / f".{dest.name}.old-{secrets.token_hex(4)}"
            os.rename(dest, old)
            os.rename(tmp, dest)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return True
