"""NFS root profiles (``root: nfs``): the image's mount-and-switch shell code, the exported tree, and a real boot.

Fast tier: lib.sh's ``parse_nfsroot`` / ``mount_nfsroot`` / ``enter_nfsroot`` run
by the host's busybox with recording stand-ins for mount, chroot and switch_root
(the host kernel has no NFS client); :mod:`orchestrator.image.nfsroot` writes
real directories. Slow tier: a real build, and one QEMU (TCG) guest booting the
built kernel + initramfs in a network namespace of ours against nfs-ganesha
(NFSv4 only, graceless) exporting the built tree; readiness logs in over SSH
with the node's pinned host key and finds ``/`` on nfs4. A second boot names a
path the server does not export and must stay in the initramfs, reachable over SSH for a post-mortem.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator import image
from orchestrator.hostkeys import HOST_KEY_PATH, host_key_archive
from orchestrator.image import READY_MARKER, ImageError
from orchestrator.image.build import _package_file
from orchestrator.image.cpio import Tree
from orchestrator.image.nfsroot import export_view, nfsroot_fstype, write_export
from orchestrator.plan import load_plan
from tests.conftest import REPO, require_root, require_tool
from tests.image_helpers import busybox, lib_sh, parse_newc, run_sh, tiny_plan

# --------------------------------------------------------------------------- lib.sh, with the host's busybox


@pytest.mark.parametrize(
    "spec, expect",
    [
        ("10.99.0.1:/export/root,vers=4", "10.99.0.1|/export/root|nfs4|ro,vers=4,addr=10.99.0.1"),
        ("10.99.0.1:/export/root", "10.99.0.1|/export/root|nfs4|ro,addr=10.99.0.1"),
        ("/export/%s/root,rw", "10.0.2.2|/export/10.0.2.15/root|nfs4|rw,addr=10.0.2.2"),
        ("", "10.0.2.2|/tftpboot/10.0.2.15|nfs4|ro,addr=10.0.2.2"),
        ("10.9.9.9:/r,vers=3,addr=10.9.9.8", "10.9.9.9|/r|nfs|ro,vers=3,addr=10.9.9.8,nolock"),
        ("10.9.9.9:/r,nfsvers=3,lock", "10.9.9.9|/r|nfs|ro,nfsvers=3,lock,addr=10.9.9.9"),
    ],
    ids=["vers4", "plain", "default-server-and-%s", "kernel-default-path", "v3", "v3-lock"],
)
def test_parse_nfsroot(tmp_path: Path, spec: str, expect: str) -> None:
    """The kernel's nfsroot= syntax; the server defaults to ip='s, %s is the client's address."""
    out = run_sh(f'. {lib_sh(tmp_path)}; parse_nfsroot "{spec}" 10.0.2.2 10.0.2.15; '
                 'echo "$nfs_server|$nfs_path|$nfs_type|$nfs_opts"').strip()
    assert out == expect
    assert nfsroot_fstype(spec) == expect.split("|")[2], "build.py's module choice and lib.sh disagree"


def test_cmdline_arg(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("BOOT_IMAGE=vmlinuz root=/dev/ram0 root=/dev/nfs nfsroot=10.0.2.2:/r,vers=4.1 "
                       "ip=10.0.2.15:10.0.2.2::255.255.255.0:n1:eth0:off xroot=no\n")
    lib = lib_sh(tmp_path)
    out = run_sh(f'. {lib}; cmdline_arg root {cmdline}; cmdline_arg nfsroot {cmdline}; cmdline_ip {cmdline}; '
                 f'echo "[$(cmdline_arg absent {cmdline})]"').splitlines()
    assert out == ["/dev/nfs", "10.0.2.2:/r,vers=4.1", "10.0.2.15:10.0.2.2::255.255.255.0:n1:eth0:off", "[]"]


def run_lib(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """``script`` in the host's busybox sh after sourcing lib.sh; its exit status is the caller's to check."""
    return subprocess.run([busybox(), "sh", "-c", f". {lib_sh(tmp_path)}; {script}"], capture_output=True, text=True,
                          timeout=30, check=False)


def fake_tool(tmp_path: Path, name: str, body: str) -> Path:
    """A stand-in program that appends its argv to calls.log, then runs ``body``."""
    p = tmp_path / name
    p.write_text(f'#!/bin/sh\necho "{name} $*" >>{tmp_path}/calls.log\n{body}\n')
    p.chmod(0o755)
    return p


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_mount_nfsroot_negotiates_the_minor_version(tmp_path: Path) -> None:
    """No vers= in nfsroot: 4.2, then 4.1 when the server says 'Protocol not supported' (as mount.nfs does)."""
    mount = fake_tool(tmp_path, "mount", textwrap.dedent("""\
        case "$*" in *vers=4.2*) echo "mount: mounting $5 on $6 failed: Protocol not supported" >&2; exit 255 ;; esac
        exit 0"""))
    out = run_sh(f'. {lib_sh(tmp_path)}; MOUNT={mount}; parse_nfsroot 10.0.2.2:/export/root; '
                 f'mount_nfsroot {tmp_path}/newroot && echo "ok $nfs_vers"').splitlines()
    assert calls(tmp_path) == [
        f"mount -t nfs4 -o ro,addr=10.0.2.2,vers=4.2 10.0.2.2:/export/root {tmp_path}/newroot",
        f"mount -t nfs4 -o ro,addr=10.0.2.2,vers=4.1 10.0.2.2:/export/root {tmp_path}/newroot",
    ]
    assert out == [
        "bootorch-image: nfsroot 10.0.2.2:/export/root: mounting (nfs4, ro,addr=10.0.2.2), attempt 1 of 10",
        f"bootorch-image: nfsroot 10.0.2.2:/export/root: mounted on {tmp_path}/newroot (vers=4.1)",
        "ok 4.1",
    ]
    assert (tmp_path / "newroot").is_dir()


def test_mount_nfsroot_keeps_a_given_version(tmp_path: Path) -> None:
    mount = fake_tool(tmp_path, "mount", "exit 0")
    out = run_sh(f'. {lib_sh(tmp_path)}; MOUNT={mount}; parse_nfsroot 10.0.2.2:/r,vers=4.1; mount_nfsroot {tmp_path}/n')
    assert calls(tmp_path) == [f"mount -t nfs4 -o ro,vers=4.1,addr=10.0.2.2 10.0.2.2:/r {tmp_path}/n"]
    assert out.splitlines()[-1] == f"bootorch-image: nfsroot 10.0.2.2:/r: mounted on {tmp_path}/n"


def test_mount_nfsroot_gives_up_with_a_clear_message(tmp_path: Path) -> None:
    """Bounded retries, each failure said, the last one as 'nfsroot SERVER:PATH: mount failed: ...'."""
    mount = fake_tool(tmp_path, "mount", 'echo "mount: mounting $5 on $6 failed: No such file or directory" >&2; exit 255')
    r = run_lib(tmp_path, f"MOUNT={mount} NFS_TRIES=3 NFS_WAIT=0; "
                          f"parse_nfsroot 10.0.2.2:/export/nope,vers=4.2; mount_nfsroot {tmp_path}/n")
    assert r.returncode == 1
    out = r.stdout.splitlines()
    assert len(calls(tmp_path)) == 3
    assert out[1] == "bootorch-image: nfsroot 10.0.2.2:/export/nope: attempt 1 failed: No such file or directory"
    assert out[-1] == ("bootorch-image: nfsroot 10.0.2.2:/export/nope: mount failed: No such file or directory "
                       "(gave up after 3 attempts)")


def test_mount_nfsroot_kills_a_mount_that_hangs(tmp_path: Path) -> None:
    mount = fake_tool(tmp_path, "mount", "exec sleep 60")  # exec: the killed process holds the output pipe
    t0 = time.monotonic()
    r = run_lib(tmp_path, f"MOUNT={mount} NFS_TRIES=1 NFS_TIMEOUT=1; parse_nfsroot 10.0.2.2:/r,vers=4.2; "
                          f"mount_nfsroot {tmp_path}/n")
    assert r.returncode == 1 and time.monotonic() - t0 < 20
    assert r.stdout.splitlines()[-1] == ("bootorch-image: nfsroot 10.0.2.2:/r: mount failed: no answer in 1 s "
                                         "(gave up after 1 attempts)")


@pytest.mark.parametrize("spec, default, why", [
    ("nfs.example:/r", "", "the server must be an IPv4 address"),
    ("/r", "", "no server"),
])
def test_mount_nfsroot_needs_a_server_address(tmp_path: Path, spec: str, default: str, why: str) -> None:
    mount = fake_tool(tmp_path, "mount", "exit 0")
    r = run_lib(tmp_path, f'MOUNT={mount}; parse_nfsroot "{spec}" "{default}" 10.0.2.15; mount_nfsroot {tmp_path}/n')
    assert r.returncode == 1 and "mount failed: " + why in r.stdout and calls(tmp_path) == []


def nfs_tree(root: Path) -> Path:
    for d in ("sbin", "lib", "proc", "sys", "dev", "run", "tmp", "etc/dropbear"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for f in ("init", "sbin/init", "lib/bootorch.sh"):
        (root / f).write_text("#!/bin/sh\n")
    return root


def test_enter_nfsroot_prepares_the_root_and_switches(tmp_path: Path) -> None:
    """tmpfs /run, /tmp, /etc/dropbear with the key copied in (0600), /proc /sys /dev moved, then
    switch_root into the root's /init with BOOTORCH_STAGE=nfsroot, in that order."""
    new = nfs_tree(tmp_path / "newroot")
    resolv = Path("/etc/resolv.conf")
    differs = resolv.exists() and resolv.stat().st_size > 0
    (new / "etc" / "resolv.conf").write_text("nameserver 192.0.2.1 # not the initramfs's\n")
    key = tmp_path / "initramfs" / HOST_KEY_PATH
    key.parent.mkdir(parents=True)
    key.write_bytes(b"k" * 83)
    mount = fake_tool(tmp_path, "mount", "exit 0")
    chroot = fake_tool(tmp_path, "chroot", "exit 0")
    switch = fake_tool(tmp_path, "switch_root", 'echo "stage=$BOOTORCH_STAGE root=$BOOTORCH_NFSROOT"')
    out = run_sh(f'. {lib_sh(tmp_path)}; MOUNT={mount} CHROOT={chroot} SWITCH_ROOT={switch}; '
                 f'parse_nfsroot 10.0.2.2:/export/root; enter_nfsroot {new} {key}; echo not-reached').splitlines()
    expect = [
        f"chroot {new} /bin/sh -c :",
        f"mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs {new}/run",
        f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {new}/tmp",
        f"mount -t tmpfs -o mode=0700,size=1m,nosuid,nodev,noexec tmpfs {new}/etc/dropbear",
    ]
    if differs:
        expect.append(f"mount --bind {new}/run/resolv.conf {new}/etc/resolv.conf")
    expect += [f"mount --move /proc {new}/proc", f"mount --move /sys {new}/sys", f"mount --move /dev {new}/dev",
               f"switch_root {new} /init"]
    assert calls(tmp_path) == expect
    assert out[-2:] == ["bootorch-image: nfsroot 10.0.2.2:/export/root: switching root",
                        "stage=nfsroot root=10.0.2.2:/export/root"]
    copied = new / HOST_KEY_PATH
    assert copied.read_bytes() == b"k" * 83 and stat.S_IMODE(copied.stat().st_mode) == 0o600


@pytest.mark.parametrize("broken", ["no-init", "no-shell"])
def test_enter_nfsroot_stays_when_the_root_cannot_run(tmp_path: Path, broken: str) -> None:
    """switch_root cannot come back, so a root without /init or whose /bin/sh does not run is refused first."""
    new = nfs_tree(tmp_path / "newroot")
    if broken == "no-init":
        (new / "init").unlink()
    mount = fake_tool(tmp_path, "mount", "exit 0")
    chroot = fake_tool(tmp_path, "chroot", "echo \"chroot: can't execute '/bin/sh': Stale file handle\" >&2; exit 127")
    r = run_lib(tmp_path, f"MOUNT={mount} CHROOT={chroot} SWITCH_ROOT=false; parse_nfsroot 10.0.2.2:/r; "
                          f'enter_nfsroot {new} /absent; echo "returned $?"')
    out = r.stdout.splitlines()
    assert out[-1] == "returned 1"
    if broken == "no-init":
        assert "mounted, but /init is missing there" in out[0] and calls(tmp_path) == []
    else:
        assert out[0] == ("bootorch-image: nfsroot 10.0.2.2:/r: mounted, but its /bin/sh does not run: "
                          "chroot: can't execute '/bin/sh': Stale file handle")
        assert calls(tmp_path) == [f"chroot {new} /bin/sh -c :"]


# --------------------------------------------------------------------------- the exported tree


def image_like_tree() -> Tree:
    t = Tree()
    t.dir("root", 0o700)
    t.dir("root/.ssh", 0o700)
    t.file("root/.ssh/authorized_keys", b"ssh-ed25519 AAAA test\n", 0o600)
    t.dir("tmp", 0o1777)
    t.dir("etc/dropbear", 0o700)
    t.file("etc/dropbear/dropbear_ed25519_host_key", b"secret", 0o600)
    t.file("etc/shadow", b"root:*:0:0:99999:7:::\n", 0o600)
    t.chardev("dev/console", 5, 1, 0o600)
    t.chardev("dev/null", 1, 3, 0o666)
    t.file("bin/busybox", b"\x7fELF...", 0o755)
    t.symlink("bin/sh", "/bin/busybox")
    t.file("init", b"#!/bin/sh\n", 0o700)
    return t


def test_export_view_drops_devices_and_keys_and_opens_modes() -> None:
    v = export_view(image_like_tree())
    assert "dev/console" not in v.entries and "dev/null" not in v.entries and "dev" in v.entries
    assert "etc/dropbear" in v.entries and "etc/dropbear/dropbear_ed25519_host_key" not in v.entries
    modes = {p: e.mode for p, e in v.entries.items()}
    assert modes["root"] == stat.S_IFDIR | 0o755 and modes["root/.ssh"] == stat.S_IFDIR | 0o755
    assert modes["root/.ssh/authorized_keys"] == stat.S_IFREG | 0o644
    assert modes["etc/shadow"] == stat.S_IFREG | 0o644 and modes["init"] == stat.S_IFREG | 0o755
    assert modes["tmp"] == stat.S_IFDIR | 0o1777 and modes["etc/dropbear"] == stat.S_IFDIR | 0o755
    assert stat.S_ISLNK(modes["bin/sh"]) and v.entries["bin/sh"].data == b"/bin/busybox"
    assert not any(m & 0o022 for p, m in modes.items() if not stat.S_ISLNK(m) and p != "tmp")


def listing(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            body = os.readlink(p).encode() if stat.S_ISLNK(st.st_mode) else (p.read_bytes() if stat.S_ISREG(st.st_mode) else b"")
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, int(st.st_mtime), body)
    return out


def test_write_export_writes_skips_and_replaces(tmp_path: Path) -> None:
    dest = tmp_path / "state" / "nfsroot" / "prof"
    view = export_view(image_like_tree())
    assert write_export(view, dest, mtime=1700000000) is True
    got = listing(dest)
    assert set(got) == set(view.entries)
    for path, e in view.entries.items():
        mode, uid, mtime, body = got[path]
        assert mode == e.mode and mtime == 1700000000, path
        assert body == (e.data if not stat.S_ISDIR(e.mode) else b""), path
        if os.geteuid() == 0:
            assert uid == 0
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    inode = dest.stat().st_ino

    assert write_export(view, dest, mtime=1700000000) is False  # unchanged: left alone
    assert dest.stat().st_ino == inode

    (dest / "stray").write_text("hand edit")  # anything else in there: rewritten
    (dest.parent / ".prof.new-leftover").mkdir()  # an interrupted run's temporary directory
    view.file("etc/motd", b"new\n")
    assert write_export(view, dest) is True
    assert not (dest / "stray").exists() and (dest / "etc" / "motd").read_text() == "new\n"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["prof"]  # no temporary or old tree left


def test_package_file_follows_links_inside_the_package(tmp_path: Path) -> None:
    """ipxe's usr/lib/ipxe/ipxe.efi is a link to /boot/ipxe.efi: the package's file, never the build host's."""
    pkg = tmp_path / "pkg"
    (pkg / "boot").mkdir(parents=True)
    (pkg / "usr/lib/ipxe").mkdir(parents=True)
    (pkg / "boot" / "ipxe.efi").write_bytes(b"from the package")
    (pkg / "usr/lib/ipxe/ipxe.efi").symlink_to("/boot/ipxe.efi")
    (pkg / "usr/lib/ipxe/rel.efi").symlink_to("../../../../../boot/ipxe.efi")  # cannot climb out either
    (pkg / "usr/lib/ipxe/loop.efi").symlink_to("loop.efi")
    assert _package_file(pkg, "usr/lib/ipxe/ipxe.efi") == b"from the package"
    assert _package_file(pkg, "usr/lib/ipxe/rel.efi") == b"from the package"
    with pytest.raises(ImageError, match="too many symlinks"):
        _package_file(pkg, "usr/lib/ipxe/loop.efi")
    with pytest.raises(ImageError, match="has no file"):
        _package_file(pkg, "usr/lib/ipxe/snponly.efi")


def test_nfs_profile_without_initrd_fails_before_any_download(tmp_path: Path) -> None:
    plan = load_plan(tiny_plan(tmp_path, initrd=[], root="nfs", nfsroot="{server}:/export/root"))
    with pytest.raises(ImageError, match="root: nfs needs an initrd"):
        image.build_images(plan, cache_dir=tmp_path / "cache", log=lambda m: None)
    assert not list((tmp_path / "cache").glob("*.deb"))


# --------------------------------------------------------------------------- a real build and a real boot (slow)

NODE_IP, SERVER = "10.99.0.11", "10.99.0.1"
NODE_MAC = "52:54:00:99:00:11"


def nfs_plan(d: Path) -> Path:
    plan = {
        "version": 1,
        "name": "nfstest",
        "state_dir": "state",
        "network": {"subnet": "10.99.0.0/24", "server": SERVER, "gateway": SERVER},
        "boot": {"root": "tftpboot", "loaders": {"uefi": "syslinux.efi", "uefi_http": "shim-http.efi"}},
        "profiles": {"nfsroot": {
            "kernel": "vmlinuz", "initrd": "nfsinit.gz", "root": "nfs", "nfsroot": "{server}:/export/root",
            "ip": "static", "append": "console=ttyS0 panic=10",
            "mounts": [{"source": "tmpfs", "target": "/scratch", "type": "tmpfs", "options": "size=1m"}],
            "commands": ["echo hello from $NODE_NAME > /run/hello"],
        }},
        "nodes": [{"name": "n1", "mac": NODE_MAC, "ip": NODE_IP, "profile": "nfsroot"}],
        "readiness": {
            "ssh": {"key": "ssh/id_ed25519", "host_key_policy": "strict", "connect_timeout": 30},
            "checks": [
                {"name": "root-is-nfs", "command": "awk '$2 == \"/\" {print $3}' /proc/mounts; cat /run/bootorch/nfsroot.error 2>/dev/null || true", "expect": "^nfs4$"},
                {"name": "hello", "command": "cat /run/hello", "expect": "^hello from n1$"},
                {"name": "sshd", "service": "dropbear"},
            ],
        },
    }
    p = d / "plan.yaml"
    p.write_text(json.dumps(plan))
    return p


@pytest.fixture(scope="module")
def nfs_built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, image.ImageReport]:
    require_tool("apt-get")
    require_tool("dpkg")
    d = tmp_path_factory.mktemp("nfsimage")
    report = image.build_images(load_plan(nfs_plan(d)), log=lambda m: print(m, file=sys.stderr))
    return d, report


@pytest.mark.slow
def test_nfs_build_writes_the_export_and_the_loaders(nfs_built: tuple[Path, image.ImageReport]) -> None:
    d, report = nfs_built
    plan = load_plan(d / "plan.yaml")
    names = {f.name: f for f in report.files}
    assert set(names) == {"vmlinuz", "nfsinit.gz", "pxelinux.0", "ldlinux.c32", "syslinux.efi", "ldlinux.e64"}
    assert names["syslinux.efi"].source.startswith("syslinux-efi_") and names["ldlinux.e64"].source.startswith("syslinux-common_")
    assert (d / "tftpboot" / "ldlinux.e64").read_bytes()[:2] == b"\x7fE"  # syslinux's efi64 module is ELF
    assert (d / "tftpboot" / "syslinux.efi").read_bytes()[:2] == b"MZ"  # a PE image
    assert any("boot.loaders.uefi_http is 'shim-http.efi'" in w for w in report.warnings)

    info = report.images["nfsinit.gz"]
    export = plan.nfs_export("nfsroot")
    assert info["nfs_export"] == str(export) and info["root"] == "nfs"
    assert {"sunrpc", "nfs", "nfsv4"} <= set(info["modules"]) and "nfsv3" not in info["modules"]
    entries = {e["name"]: e for e in parse_newc(gzip.decompress((d / "tftpboot" / "nfsinit.gz").read_bytes()))}
    exported = listing(export)
    # The same tree, minus device nodes (and the initramfs holds no key either).
    assert set(exported) == set(entries) - {"dev/console", "dev/null"}
    assert "scratch" in exported  # a static mount target exists on the read-only root
    for name, (mode, uid, _mtime, body) in exported.items():
        assert mode & 0o004 and not (not stat.S_ISLNK(mode) and name != "tmp" and mode & 0o022), name
        if stat.S_ISREG(mode):
            assert body == entries[name]["data"], name
        if os.geteuid() == 0:
            assert uid == 0, name
    assert not [n for n in exported if n.startswith("etc/dropbear/")]
    assert exported["root/.ssh/authorized_keys"][3].decode().strip() == report.authorized_key

    again = image.build_images(plan, log=lambda m: None)  # same plan, same packages: the export is left alone
    assert again.images["nfsinit.gz"]["nfs_export_changed"] is False


#: QEMU start to the ready marker, TCG: ~10-13 s measured here (the RAM-disk image: ~8-11 s).
BOOT_TIMEOUT = 150.0

#: nfs-ganesha 4.3 serving the built tree, NFSv4 only (no rpcbind needed), and nothing outside the test's
#: directory: Graceless (else 90 s of grace before the first open), the recovery and Kerberos
#: credential-cache directories in tmp (the defaults are /var/lib/nfs/ganesha and /var/run/ganesha).
#: Only_Numeric_Owners: owners go over the wire as "0", which the image's kernel maps without an idmapper;
#: as names they arrive as nobody and dropbear refuses root's authorized_keys. Root_Squash is fine: the
#: tree is world-readable.
GANESHA_CONF = """\
NFS_CORE_PARAM {{
    Protocols = 4;
    Bind_addr = {server};
    NFS_Port = 2049;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFS_KRB5 {{
    Active_krb5 = false;
    CCacheDir = {ccache};
}}
NFSV4 {{
    Graceless = true;
    RecoveryRoot = {recovery};
    Only_Numeric_Owners = true;
}}
EXPORT {{
    Export_Id = 1;
    Path = {path};
    Pseudo = /export/root;
    Protocols = 4;
    Transports = TCP;
    Access_Type = RO;
    Squash = Root_Squash;
    SecType = sys;
    FSAL {{ Name = VFS; }}
}}
"""


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what()
        time.sleep(0.2)


@pytest.mark.slow
def test_nfs_root_boots_to_ssh(nfs_built: tuple[Path, image.ImageReport], tmp_path: Path) -> None:
    """The built kernel + initramfs (+ the node's key archive, concatenated as a loader does) boot in QEMU on
    a bridge in our namespace; nfs-ganesha there exports the built tree. The node mounts it over NFSv4,
    switches into it, and readiness (the plan's, strict host key) finds / on nfs4. Then a boot naming an
    unexported path stays in the initramfs with the reason on the console, and readiness logs in and fails
    root-is-nfs with that reason."""
    require_root()
    from orchestrator.lab.netns import NetLab

    qemu = require_tool("qemu-system-x86_64")
    ganesha = require_tool("ganesha.nfsd", "/usr/bin/ganesha.nfsd")
    d, report = nfs_built
    plan = load_plan(d / "plan.yaml")
    boot = d / "tftpboot"
    image_bytes = (boot / "nfsinit.gz").read_bytes()
    key = (d / "state" / "hostkeys" / "n1" / "dropbear_ed25519_host_key").read_bytes()
    initrd = tmp_path / "initrd"
    initrd.write_bytes(image_bytes + b"\0" * (-len(image_bytes) % 4) + host_key_archive(key))
    (tmp_path / "recovery").mkdir()
    (tmp_path / "ccache").mkdir()
    conf = tmp_path / "ganesha.conf"
    conf.write_text(GANESHA_CONF.format(server=SERVER, recovery=tmp_path / "recovery", ccache=tmp_path / "ccache",
                                        path=plan.nfs_export("nfsroot")))
    glog = tmp_path / "ganesha.log"
    ip_arg = f"ip={NODE_IP}:{SERVER}:{SERVER}:255.255.255.0:n1:eth0:off"

    with NetLab() as lab:
        ns = lab.namespace("nfs")
        for cmd in (["link", "add", "br0", "type", "bridge"], ["addr", "add", f"{SERVER}/24", "dev", "br0"],
                    ["link", "set", "br0", "up"], ["tuntap", "add", "tap0", "mode", "tap"],
                    ["link", "set", "tap0", "master", "br0"], ["link", "set", "tap0", "up"]):
            subprocess.run(["ip", "-n", ns.name, *cmd], check=True, timeout=10)
        server = lab.popen(ns, [ganesha, "-F", "-f", str(conf), "-L", str(glog), "-p", str(tmp_path / "ganesha.pid")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: glog.exists() and "NFS SERVER INITIALIZED" in glog.read_text(errors="replace"), 30,
                 lambda: f"ganesha did not start (exit {server.poll()}):\n{glog.read_text(errors='replace')[-2000:] if glog.exists() else ''}")

        def boot_vm(append: str, log: Path, until: tuple[str, ...]) -> tuple[subprocess.Popen, str, float]:
            vm = lab.popen(ns, [
                qemu, "-accel", "tcg", "-m", "256", "-smp", "1", "-display", "none", "-monitor", "none", "-no-reboot",
                "-serial", f"file:{log}", "-kernel", str(boot / "vmlinuz"), "-initrd", str(initrd), "-append", append,
                "-nic", f"tap,ifname=tap0,script=no,downscript=no,model=e1000,mac={NODE_MAC}",
            ], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            t0 = time.monotonic()
            text = ""

            def done() -> bool:
                nonlocal text
                text = log.read_text(errors="replace") if log.exists() else ""
                assert vm.poll() is None, f"QEMU exited ({vm.returncode}):\n{text[-3000:]}"
                return any(u in text for u in until)

            wait_for(done, BOOT_TIMEOUT, lambda: f"none of {until} in {BOOT_TIMEOUT} s:\n{text[-3000:]}")
            return vm, text, time.monotonic() - t0

        vm, text, took = boot_vm(f"root=/dev/nfs nfsroot={SERVER}:/export/root {ip_arg} console=ttyS0 panic=10",
                                 tmp_path / "serial.log", (READY_MARKER, "staying in the initramfs"))
        print(f"NFS root: QEMU start to ready marker {took:.1f} s (TCG)", file=sys.stderr)
        assert READY_MARKER in text, text[-3000:]
        said = [line for line in text.splitlines() if line.startswith("bootorch-image: ")]
        assert said[said.index("bootorch-image: network: static 10.99.0.11/24 on eth0") + 1:] == [
            f"bootorch-image: nfsroot {SERVER}:/export/root: mounting (nfs4, ro,addr={SERVER}), attempt 1 of 10",
            f"bootorch-image: nfsroot {SERVER}:/export/root: mounted on /newroot (vers=4.2)",
            f"bootorch-image: nfsroot {SERVER}:/export/root: switching root",
            f"bootorch-image: init: profile nfsroot, kernel {report.kernel_release}, on the NFS root {SERVER}:/export/root",
            "bootorch-image: mount: tmpfs on /scratch",
            "bootorch-image: ssh: this node's own host key (delivered by the boot server)",
            f"bootorch-image: ready (n1 {NODE_IP} {NODE_MAC}, ssh on port 22)",
        ]
        assert "insmod" not in text  # init reports only failed insmods

        # The plan's own readiness, from inside the namespace: strict host key, / on nfs4.
        code = textwrap.dedent(f"""\
            import json, trio
            from orchestrator.plan import load_plan
            from orchestrator.readiness import Readiness
            r = Readiness.from_plan(load_plan({str(d / 'plan.yaml')!r}))
            v = trio.run(r.check, {NODE_IP!r})
            print(json.dumps({{"ok": v.ok, "error": v.error, "checks": {{c.name: [c.ok, c.output.strip()] for c in v.checks}}}}))
        """)
        r = lab.run(ns, [sys.executable, "-c", code], timeout=120, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    cwd=REPO, text=True)
        assert r.returncode == 0, r.stderr
        verdict = json.loads(r.stdout)
        assert verdict["ok"], verdict
        ok, output = verdict["checks"]["root-is-nfs"]
        assert ok and output.startswith("nfs4") and "rootfs" not in output  # (readiness escapes the newline)
        lab.kill(vm)

        vm, text, took = boot_vm(f"root=/dev/nfs nfsroot={SERVER}:/export/nope {ip_arg} console=ttyS0 panic=10 "
                                 "NFS_TRIES=2 NFS_WAIT=1", tmp_path / "serial-nope.log", ("console shell follows",))
        assert (f"bootorch-image: nfsroot {SERVER}:/export/nope: mount failed: No such file or directory "
                "(gave up after 2 attempts)") in text
        assert READY_MARKER not in text and "ssh answers for a post-mortem" in text
        # Reachable for a post-mortem: readiness logs in and says why the node is not what the plan wants.
        r = lab.run(ns, [sys.executable, "-c", code], timeout=120, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    cwd=REPO, text=True)
        assert r.returncode == 0, r.stderr
        verdict = json.loads(r.stdout)
        ok, output = verdict["checks"]["root-is-nfs"]
        assert not verdict["ok"] and not ok, verdict
        assert output.startswith("rootfs") and f"nfsroot {SERVER}:/export/nope: mount failed: No such file" in output
        lab.kill(vm)
        lab.kill(server)
