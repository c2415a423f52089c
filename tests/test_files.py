"""Unit tests of BootFiles: name normalisation, confinement, dynamic overlay."""

from __future__ import annotations

import os
import threading
import time

import pytest

from orchestrator.bootserver.files import AccessViolation, BootFiles, DiskFile, MemoryFile, NotFound, normalize_name


@pytest.fixture
def tree(tmp_path):
    """srv/tftp (the root) next to srv/tftp-private (a sibling-prefix directory)."""
    root = tmp_path / "srv" / "tftp"
    private = tmp_path / "srv" / "tftp-private"
    (root / "pxelinux.cfg").mkdir(parents=True)
    private.mkdir(parents=True)
    (root / "pxelinux.0").write_bytes(b"loader")
    (root / "pxelinux.cfg" / "default").write_text("DEFAULT linux\n")
    (private / "secret").write_text("secret\n")
    return root, private


@pytest.mark.parametrize(
    "name, rel",
    [
        ("pxelinux.0", "pxelinux.0"),
        ("/pxelinux.0", "pxelinux.0"),
        ("//pxelinux.cfg//default", "pxelinux.cfg/default"),
        ("./pxelinux.cfg/./default", "pxelinux.cfg/default"),
        ("pxelinux.cfg/", "pxelinux.cfg"),
    ],
)
def test_normalize_name(name, rel):
    assert normalize_name(name) == rel


@pytest.mark.parametrize("name", ["", "/", "//", ".", "..", "../x", "a/../../b", "a/..", "x\\y", "..\\..\\etc", "a\x00b", "/../etc/passwd"])
def test_normalize_refuses(name):
    with pytest.raises(AccessViolation):
        normalize_name(name)


def test_open_regular_file(tree):
    root, _ = tree
    files = BootFiles(root)
    f = files.open("/pxelinux.0")
    try:
        assert isinstance(f, DiskFile)
        assert f.size == 6
        assert f.pread(0, 100) == b"loader"
        assert f.pread(3, 2) == b"de"
        assert f.pread(0, 3) == b"loa"  # pread: no shared offset
    finally:
        f.close()
    f.close()  # idempotent


def test_missing_and_non_regular(tree, tmp_path):
    root, _ = tree
    files = BootFiles(root)
    with pytest.raises(NotFound):
        files.open("nope")
    with pytest.raises(NotFound):
        files.open("pxelinux.cfg")  # a directory
    with pytest.raises(NotFound):
        files.open("pxelinux.0/x")  # ENOTDIR
    with pytest.raises(NotFound):
        files.open("x" * 5000)  # ENAMETOOLONG


def test_fifo_does_not_hang(tree):
    root, _ = tree
    os.mkfifo(root / "fifo")
    files = BootFiles(root)
    done = threading.Event()

    def attempt():
        with pytest.raises(NotFound):
            files.open("fifo")
        done.set()

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(5)
    assert done.is_set(), "opening a FIFO blocked"


def test_symlink_out_of_root_refused(tree, tmp_path):
    root, private = tree
    (root / "escape").symlink_to(private / "secret")
    (root / "escdir").symlink_to(private)
    (root / "etcpw").symlink_to("/etc/passwd")
    files = BootFiles(root)
    for name in ("escape", "escdir/secret", "etcpw"):
        with pytest.raises(AccessViolation):
            files.open(name)


def test_sibling_prefix_directory_refused(tree):
    """Root srv/tftp must not admit srv/tftp-private/... (a plain startswith bug)."""
    root, private = tree
    (root / "sib").symlink_to("../tftp-private")
    files = BootFiles(root)
    with pytest.raises(AccessViolation):
        files.open("sib/secret")
    with pytest.raises(AccessViolation):
        files.open("../tftp-private/secret")


def test_symlink_inside_root_is_fine(tree):
    root, _ = tree
    (root / "alias").symlink_to("pxelinux.0")
    (root / "cfg").symlink_to("pxelinux.cfg")
    files = BootFiles(root)
    f = files.open("alias")
    assert f.pread(0, 10) == b"loader"
    f.close()
    g = files.open("cfg/default")
    assert g.size == len("DEFAULT linux\n")
    g.close()


def test_root_given_through_symlink(tree, tmp_path):
    root, _ = tree
    (tmp_path / "rootlink").symlink_to(root)
    files = BootFiles(tmp_path / "rootlink")
    f = files.open("pxelinux.0")
    assert f.size == 6
    f.close()


def test_bad_roots(tmp_path):
    with pytest.raises(FileNotFoundError):
        BootFiles(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        BootFiles(tmp_path / "file")


def test_dynamic_overlay_first_then_disk(tree):
    root, _ = tree
    seen = []

    def dynamic(name, client_ip):
        seen.append((name, client_ip))
        if name == "pxelinux.cfg/01-aa-bb-cc-dd-ee-ff":
            return b"LABEL node01\n"
        return None

    files = BootFiles(root, dynamic=dynamic)
    f = files.open("/pxelinux.cfg/01-aa-bb-cc-dd-ee-ff", "10.0.0.5")
    assert isinstance(f, MemoryFile) and f.pread(0, 100) == b"LABEL node01\n" and f.size == 13
    g = files.open("pxelinux.cfg/default", "10.0.0.5")  # falls through to disk
    assert isinstance(g, DiskFile)
    g.close()
    with pytest.raises(NotFound):
        files.open("pxelinux.cfg/C0A80001", "10.0.0.5")
    assert seen[0] == ("pxelinux.cfg/01-aa-bb-cc-dd-ee-ff", "10.0.0.5")
    with pytest.raises(AccessViolation):  # confinement is checked before the overlay
        files.open("../x", "10.0.0.5")
    assert all(".." not in n for n, _ in seen)


def test_dynamic_only_without_root():
    files = BootFiles(None, dynamic=lambda n, ip: b"x" if n == "a" else None)
    assert files.open("a").size == 1
    with pytest.raises(NotFound):
        files.open("b")


def test_unencodable_name_is_not_found(tree):
    root, _ = tree
    with pytest.raises(NotFound):
        BootFiles(root).open("\ud800bad")


@pytest.mark.parametrize("mode, served", [
    (0o600, False), (0o640, False), (0o660, False), (0o400, False), (0o604, True), (0o644, True), (0o444, True),
])
def test_files_others_may_not_read_are_refused(tree, mode, served):
    """tftpd-hpa's rule (S_IROTH), even when the server's own user could read the file."""
    root, _ = tree
    (root / "pxelinux.0").chmod(mode)
    files = BootFiles(root)
    if served:
        files.open("pxelinux.0").close()
    else:
        with pytest.raises(AccessViolation, match="not world-readable"):
            files.open("pxelinux.0")
    BootFiles(root, require_world_readable=False).open("pxelinux.0").close()  # the opt-out


def test_dynamic_content_is_not_subject_to_the_world_readable_rule(tree):
    root, _ = tree
    (root / "pxelinux.0").chmod(0o600)
    files = BootFiles(root, dynamic=lambda name, ip: b"generated" if name == "pxelinux.0" else None)
    assert files.open("pxelinux.0").pread(0, 100) == b"generated"


def test_disk_file_identity_is_the_file_version(tree):
    root, _ = tree
    files = BootFiles(root)
    a, b = files.open("pxelinux.0"), files.open("/pxelinux.0")
    st = os.stat(root / "pxelinux.0")
    assert a.identity == b.identity == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    a.close()
    b.close()
    deadline = time.monotonic() + 5
    while True:  # until the file system's (coarse) clock has ticked since the first write
        with open(root / "pxelinux.0", "r+b") as f:
            f.write(b"LOADER")  # same size ...
        os.utime(root / "pxelinux.0", ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the mtime put back, as cp -p would
        if os.stat(root / "pxelinux.0").st_ctime_ns != st.st_ctime_ns:
            break
        assert time.monotonic() < deadline
    c = files.open("pxelinux.0")
    assert c.size == st.st_size and c.identity[3] == st.st_mtime_ns
    assert c.identity != a.identity  # the ctime moved: a new version
    c.close()
