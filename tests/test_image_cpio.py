"""The newc cpio writer and reproducible gzip (orchestrator.image.cpio); the host's busybox ``cpio``
reads what we write, and a separate reader checks the header fields busybox does not print.
"""

from __future__ import annotations

import gzip
import os
import stat
import subprocess
from pathlib import Path

import pytest

from orchestrator.image import ImageError
from orchestrator.image.cpio import Tree, gzip_reproducible, newc_archive
from tests.image_helpers import busybox, parse_newc


def sample_tree() -> Tree:
    t = Tree()
    t.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    t.symlink("bin/sh", "/bin/busybox")
    t.file("bin/busybox", b"\x7fELF fake", 0o755)
    t.dir("root", 0o700)
    t.file("root/.ssh/authorized_keys", b"ssh-ed25519 AAAA test\n", 0o600)
    t.file("odd-size", b"x" * 5)  # data needs padding
    return t


def test_newc_is_read_by_busybox_cpio(tmp_path: Path) -> None:
    archive = newc_archive(sample_tree())
    listing = subprocess.run([busybox(), "cpio", "-t"], input=archive, capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    names = listing.stdout.decode().split()
    assert names == sorted(names)  # sorted, and so each directory before its contents
    assert {"init", "bin/sh", "root/.ssh/authorized_keys", "etc", "root/.ssh"} <= set(names)

    out = tmp_path / "x"
    out.mkdir()
    r = subprocess.run([busybox(), "cpio", "-i", "-d", "-m"], input=archive, cwd=out, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "init").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "root/.ssh/authorized_keys").stat().st_mode) == 0o600
    assert os.readlink(out / "bin/sh") == "/bin/busybox"
    assert (out / "odd-size").read_bytes() == b"xxxxx"
    assert (out / "init").stat().st_mtime == 0


def test_newc_headers_are_fixed() -> None:
    t = sample_tree()
    t.chardev("dev/console", 5, 1)
    entries = parse_newc(newc_archive(t, mtime=1234))
    assert [e["ino"] for e in entries] == list(range(1, len(entries) + 1))
    assert all(e["uid"] == 0 and e["gid"] == 0 and e["mtime"] == 1234 for e in entries)
    console = next(e for e in entries if e["name"] == "dev/console")
    assert stat.S_ISCHR(console["mode"]) and console["rdev"] == (5, 1)
    assert all(e["nlink"] == (2 if stat.S_ISDIR(e["mode"]) else 1) for e in entries)


def test_newc_does_not_depend_on_insertion_order() -> None:
    a, b = Tree(), Tree()
    a.file("z/1", b"1")
    a.file("a/2", b"2")
    b.file("a/2", b"2")
    b.file("z/1", b"1")
    assert newc_archive(a) == newc_archive(b)
    assert newc_archive(a, mtime=0) != newc_archive(a, mtime=1)


def test_tree_refuses_a_file_as_directory() -> None:
    t = Tree()
    t.file("etc", b"")
    with pytest.raises(ImageError, match="not a directory"):
        t.file("etc/passwd", b"")


def test_gzip_has_no_name_and_no_time() -> None:
    data = newc_archive(sample_tree())
    z = gzip_reproducible(data)
    assert z == gzip_reproducible(data)
    assert z[:3] == b"\x1f\x8b\x08"
    assert z[3] & 0x08 == 0  # no FNAME
    assert z[4:8] == b"\0\0\0\0"  # MTIME 0
    assert gzip.decompress(z) == data
