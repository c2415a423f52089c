"""``bootorch image build``: the cpio writer, the image's shell code, module
resolution and keys (fast tier), then real builds from Debian's packages and a
QEMU boot of the result (slow tier: the first build downloads ~75 MB of .debs
into var/cache/debs; later builds take seconds).

Independent decoders: the host's busybox ``cpio`` reads our archives, busybox
``sh`` runs the image's shell functions, paramiko logs into the booted image.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import lzma
import os
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from orchestrator import image
from orchestrator.image import (
    READY_MARKER,
    DebCache,
    ImageError,
    Tree,
    _dep_names,
    elf_needed,
    ensure_user_key,
    gzip_reproducible,
    newc_archive,
    render_init,
    resolve_modules,
)
from orchestrator.plan import load_plan
from tests.conftest import REPO, require_tool

# --------------------------------------------------------------------------- helpers


def parse_newc(data: bytes) -> list[dict]:
    """A deliberately separate newc reader, for header fields busybox does not print."""
    out, off = [], 0
    while True:
        assert data[off : off + 6] == b"070701", f"bad magic at {off}"
        f = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, size = f[11], f[6]
        name = data[off + 110 : off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off : off + size]
        off += size
        off += -off % 4
        if name == "TRAILER!!!":
            return out
        out.append({"name": name, "ino": f[0], "mode": f[1], "uid": f[2], "gid": f[3], "nlink": f[4],
                    "mtime": f[5], "rdev": (f[9], f[10]), "data": body})


def busybox() -> str:
    return require_tool("busybox")


def run_sh(script: str) -> str:
    r = subprocess.run([busybox(), "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def make_elf(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 relocatable with the given sections (enough for .modinfo)."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    body = b""
    offsets = []
    for data in [*sections.values(), names]:
        offsets.append(64 + len(body))
        body += data
    shoff = 64 + len(body)
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    ehdr += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(sections) + 2, len(sections) + 1)
    shdrs = b"\0" * 64
    name_off = 1
    for (name, data), off in zip([*sections.items(), (".shstrtab", names)], offsets):
        typ = 3 if name == ".shstrtab" else 1
        shdrs += struct.pack("<IIQQQQIIQQ", name_off, typ, 0, 0, off, len(data), 0, 0, 1, 0)
        name_off += len(name) + 1
    return ehdr + body + shdrs


def fake_module(path: Path, **info: str) -> None:
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info.items())
    data = make_elf({".modinfo": modinfo, ".text": b"\x90" * 16})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(data) if path.name.endswith(".xz") else data)


# --------------------------------------------------------------------------- cpio


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


# --------------------------------------------------------------------------- ELF and modules


def test_elf_needed_matches_ldd() -> None:
    ldd = require_tool("ldd")
    target = "/bin/ls"
    interp, needed = elf_needed(Path(target).read_bytes())
    assert interp == "/lib64/ld-linux-x86-64.so.2"
    out = subprocess.run([ldd, target], capture_output=True, text=True, timeout=30).stdout
    ldd_names = {line.split()[0] for line in out.splitlines() if "=>" in line}
    assert "libc.so.6" in needed
    assert set(needed) <= ldd_names


def test_modules_in_dependency_order(tmp_path: Path) -> None:
    md = tmp_path / "6.1.0-test"
    fake_module(md / "kernel/drivers/net/nic-drv.ko", depends="mii,ring", softdep="pre: crc post: nothing")
    fake_module(md / "kernel/drivers/net/mii.ko.xz", depends="ring")
    fake_module(md / "kernel/lib/ring.ko", depends="")
    fake_module(md / "kernel/lib/crc.ko", depends="")
    (md / "modules.builtin").write_text("kernel/net/packet/af_packet.ko\n")
    mods = resolve_modules(md, ["nic_drv", "af-packet"])
    names = [n for n, _rel, _data in mods.load_order]
    assert names == ["ring", "mii", "crc", "nic_drv"]
    assert mods.builtin == ["af_packet"]
    rel = {n: r for n, r, _d in mods.load_order}
    assert rel["mii"] == "kernel/drivers/net/mii.ko"  # decompressed: busybox insmod takes plain ELF
    data = {n: d for n, _r, d in mods.load_order}
    assert data["mii"][:4] == b"\x7fELF"


def test_unknown_module_names_the_chain(tmp_path: Path) -> None:
    md = tmp_path / "k"
    fake_module(md / "kernel/a.ko", depends="missing")
    with pytest.raises(ImageError, match=r"'missing'.*needed by a"):
        resolve_modules(md, ["a"])
    with pytest.raises(ImageError, match="nosuch"):
        resolve_modules(md, ["nosuch"])


def test_modules_dep_file_wins_when_present(tmp_path: Path) -> None:
    md = tmp_path / "k"
    fake_module(md / "kernel/a.ko", depends="")
    fake_module(md / "kernel/b.ko", depends="")
    (md / "modules.dep").write_text("kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n")
    assert [n for n, _r, _d in resolve_modules(md, ["a"]).load_order] == ["b", "a"]


def test_depends_field() -> None:
    assert _dep_names("libc6 (>= 2.34), libcrypt1 (>= 1:4.1.0), zlib1g | libz-ng, foo:any") == [
        "libc6", "libcrypt1", "zlib1g", "foo"]
    assert _dep_names("linux-image-6.1.0-56-amd64 (= 6.1.192-2)") == ["linux-image-6.1.0-56-amd64"]


# --------------------------------------------------------------------------- apt cache


def test_apt_update_once_when_apt_does_not_know_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh machine has no package lists: `apt-get download` fails, we update once and retry."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (bindir / "apt-get").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$*" >> {calls}
        case "$1" in
          update) touch {tmp_path}/updated; exit 0 ;;
          download)
            if [ ! -e {tmp_path}/updated ]; then echo "E: Unable to locate package foo" >&2; exit 100; fi
            touch foo_1.0_amd64.deb; exit 0 ;;
        esac
        exit 1
        """))
    (bindir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    cache = DebCache(tmp_path / "cache", log=lambda m: None)
    assert cache.deb("foo").name == "foo_1.0_amd64.deb"
    assert cache.deb("foo").name == "foo_1.0_amd64.deb"  # cached: no second download
    assert calls.read_text().splitlines() == ["download -q foo", "update -q", "download -q foo"]


# --------------------------------------------------------------------------- the image's shell code


def lib_sh(tmp_path: Path) -> Path:
    p = tmp_path / "bootorch.sh"
    p.write_text(image.LIB_SH)
    return p


@pytest.mark.parametrize(
    "spec, expect",
    [
        ("10.77.0.11:10.77.0.1:10.77.0.1:255.255.255.0:node01:eth0:off",
         "static|10.77.0.11|10.77.0.1|255.255.255.0|node01|eth0"),
        ("10.77.0.11:10.77.0.1::255.255.0.0:node01:eth1:off:10.77.0.53",
         "static|10.77.0.11||255.255.0.0|node01|eth1"),
        ("::::node02:eth0:dhcp", "dhcp||||node02|eth0"),
        ("dhcp", "dhcp|||||eth0"),
        ("", "dhcp|||||eth0"),
        ("off", "none|||||eth0"),
        (":::::eth0:off", "none|||||eth0"),
    ],
    ids=["static", "static-dns", "kernel-dhcp-form", "dhcp", "absent", "off", "no-client"],
)
def test_parse_ip(tmp_path: Path, spec: str, expect: str) -> None:
    out = run_sh(f'. {lib_sh(tmp_path)}; parse_ip "{spec}"; '
                 'echo "$ip_mode|$ip_client|$ip_gw|$ip_mask|$ip_host|$ip_dev"').strip()
    assert out == expect


def test_cmdline_ip_and_mask_bits(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("BOOT_IMAGE=vmlinuz initrd=rootfs.gz root=/dev/ram0 rw ip=1.2.3.4:::255.255.255.0:n:eth0:off console=ttyS0 *\n")
    lib = lib_sh(tmp_path)
    assert run_sh(f". {lib}; cmdline_ip {cmdline}").strip() == "1.2.3.4:::255.255.255.0:n:eth0:off"
    assert run_sh(f". {lib}; mask_bits 255.255.255.0; mask_bits 255.255.240.0; mask_bits 255.0.0.0").split() == [
        "24", "20", "8"]


def test_do_mount_completes_nfs_options(tmp_path: Path) -> None:
    """busybox-static has no NFS helper: the kernel gets text options and needs addr= (and vers=3)."""
    lib = lib_sh(tmp_path)
    out = run_sh(
        f'. {lib}; MOUNT="echo mount"; '
        f'do_mount 10.0.2.2:/usr {tmp_path}/usr nfs ro,nolock; '
        f'do_mount 10.0.2.2:/home {tmp_path}/home nfs rw,vers=4.2,addr=10.0.2.9; '
        f'do_mount tmpfs {tmp_path}/scratch tmpfs size=8m; '
        'run_command "exit 3"; run_command true'
    ).splitlines()
    assert out == [
        f"mount -t nfs -o ro,nolock,addr=10.0.2.2,vers=3 10.0.2.2:/usr {tmp_path}/usr",
        f"bootorch-image: mount: 10.0.2.2:/usr on {tmp_path}/usr",
        f"mount -t nfs -o rw,vers=4.2,addr=10.0.2.9 10.0.2.2:/home {tmp_path}/home",
        f"bootorch-image: mount: 10.0.2.2:/home on {tmp_path}/home",
        f"mount -t tmpfs -o size=8m tmpfs {tmp_path}/scratch",
        f"bootorch-image: mount: tmpfs on {tmp_path}/scratch",
        "bootorch-image: command failed (exit 3): exit 3",
    ]
    assert (tmp_path / "usr").is_dir()


def tiny_plan(tmp_path: Path, **profile: object) -> Path:
    prof = {"kernel": "vmlinuz", "initrd": "rootfs.gz", "root": "initramfs", "ip": "dhcp",
            "append": "console=ttyS0 panic=10", **profile}
    plan = {
        "version": 1,
        "name": "imgtest",
        "state_dir": "state",
        "network": {"subnet": "10.0.2.0/24", "server": "10.0.2.2", "gateway": "10.0.2.2"},
        "boot": {"root": "tftpboot"},
        "profiles": {"ramdisk": prof},
        "nodes": [{"name": "node01", "mac": "52:54:00:77:00:01", "ip": "10.0.2.15"}],
        "readiness": {"ssh": {"key": "ssh/id_ed25519"}},
    }
    p = tmp_path / "plan.yaml"
    p.write_text(json.dumps(plan))  # JSON is YAML
    return p


def test_init_script_is_valid_shell_with_quoted_templates(tmp_path: Path) -> None:
    lp = load_plan(tiny_plan(
        tmp_path,
        mounts=[{"source": "{server}:/export/$home \"{name}\"", "target": "/mnt/{name}", "type": "nfs"}],
        commands=["echo 'it''s' \"$NODE_NAME\" > /run/x", "awk '{print $1}' /proc/loadavg"],
    ))
    prof = lp.model.profiles["ramdisk"]
    text = render_init(lp, "ramdisk", prof, "6.1.0-test", ["e1000"])
    script = tmp_path / "init"
    script.write_text(text)
    r = subprocess.run([busybox(), "sh", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert 'do_mount "10.0.2.2:/export/\\$home \\"${NODE_NAME}\\"" "/mnt/${NODE_NAME}" nfs ro,nolock' in text
    assert "run_command 'awk '\"'\"'{print $1}'\"'\"' /proc/loadavg'" in text
    assert READY_MARKER.split(": ")[1] in text
    # the quoting survives a real shell: the mount source becomes what the plan says
    line = next(x for x in text.splitlines() if x.startswith('do_mount "'))
    words = run_sh("NODE_NAME=n1; set -- " + line.removeprefix("do_mount ") + '; printf "%s\\n" "$@"')
    assert words.splitlines() == ['10.0.2.2:/export/$home "n1"', "/mnt/n1", "nfs", "ro,nolock"]
    udhcpc = tmp_path / "udhcpc.script"
    udhcpc.write_text(image.UDHCPC_SCRIPT)
    assert subprocess.run([busybox(), "sh", "-n", str(udhcpc)], timeout=30).returncode == 0


# --------------------------------------------------------------------------- keys


def test_user_key_generated_once_and_usable(tmp_path: Path) -> None:
    paramiko = pytest.importorskip("paramiko")
    key = tmp_path / "ssh" / "id_ed25519"
    pub = ensure_user_key(key, log=lambda m: None)
    assert pub.startswith("ssh-ed25519 ")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert ensure_user_key(key, log=lambda m: None) == pub  # not regenerated
    loaded = paramiko.Ed25519Key.from_private_key_file(str(key))
    assert pub.split()[1] == loaded.get_base64()
    # a private key without its .pub: the public half is derived
    (tmp_path / "ssh" / "id_ed25519.pub").unlink()
    assert ensure_user_key(key, log=lambda m: None).split()[:2] == pub.split()[:2]


def test_start_ssh_uses_the_delivered_key_else_generates_one(tmp_path: Path) -> None:
    """The node's own key when its key archive arrived; otherwise dropbear -R, and the console says why."""
    lib = lib_sh(tmp_path)
    key = tmp_path / "dropbear_ed25519_host_key"
    key.write_bytes(b"k" * 83)
    out = run_sh(f'. {lib}; DROPBEAR="echo dropbear"; start_ssh {key}; wait').splitlines()
    assert out[0] == "bootorch-image: ssh: this node's own host key (delivered by the boot server)"
    assert out[1] == f"dropbear -r {key} -p 22 -s -E -F -P /run/dropbear.pid"
    out = run_sh(f'. {lib}; DROPBEAR="echo dropbear"; start_ssh {tmp_path}/absent; wait').splitlines()
    assert "no host key was delivered" in out[0] and "dropbear -R" in out[0] and "refuse" in out[0]
    assert out[1] == "dropbear -R -p 22 -s -E -F -P /run/dropbear.pid"


def test_host_key_archive_is_a_tiny_cpio_busybox_reads(tmp_path: Path) -> None:
    from orchestrator.image import HOST_KEY_PATH, host_key_archive

    archive = host_key_archive(b"secret key bytes")
    assert archive == host_key_archive(b"secret key bytes") and len(archive) % 4 == 0
    listing = subprocess.run([busybox(), "cpio", "-t"], input=archive, capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.decode().split() == ["etc", "etc/dropbear", HOST_KEY_PATH]
    assert HOST_KEY_PATH == "etc/dropbear/dropbear_ed25519_host_key"
    r = subprocess.run([busybox(), "cpio", "-i", "-d", "-m"], input=archive, cwd=tmp_path, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / HOST_KEY_PATH).read_bytes() == b"secret key bytes"
    assert stat.S_IMODE((tmp_path / HOST_KEY_PATH).stat().st_mode) == 0o600
    modes = {e["name"]: stat.S_IMODE(e["mode"]) for e in parse_newc(archive)}
    assert modes == {"etc": 0o755, "etc/dropbear": 0o700, HOST_KEY_PATH: 0o600}  # as in the image's root


def test_host_keys_one_per_node_made_once_and_pinned(tmp_path: Path) -> None:
    """Keys by the dropbearkey given (here the host's: an independent build of the same tool), kept across
    builds; each node's public key goes into known_hosts for its address, replacing an older entry."""
    from orchestrator.image import ensure_host_keys, host_key_paths
    from orchestrator.readiness import pin_host_keys

    dropbearkey = require_tool("dropbearkey")
    plan = tiny_plan(tmp_path)
    text = json.loads(plan.read_text())
    text["nodes"] = [{"name": "node[01-03]", "mac": "52:54:00:77:00:01", "ip": "10.0.2.15"},
                     {"name": "site01", "mac": "52:54:00:77:01:01", "ip": "10.0.2.40", "profile": "site"}]
    text["profiles"]["site"] = {"kernel": "vmlinuz", "host_key": "none"}
    text["nodes"][0]["profile"] = "ramdisk"
    plan.write_text(json.dumps(text))
    lp = load_plan(plan)
    known = lp.state_dir / "known_hosts"
    known.parent.mkdir(parents=True)
    old, keep = ensure_user_key(tmp_path / "old", log=lambda m: None), ensure_user_key(tmp_path / "keep", log=lambda m: None)
    known.write_text(f"10.0.2.16 {' '.join(old.split()[:2])}\n10.0.2.99 {' '.join(keep.split()[:2])}\n")
    pubs = ensure_host_keys(lp, [dropbearkey], log=lambda m: None)
    assert sorted(pubs) == ["node01", "node02", "node03"]  # site01's profile says host_key: none
    assert len(set(pubs.values())) == 3
    for node in lp.nodes[:3]:
        private, public = host_key_paths(lp, node)
        assert private.parent == lp.state_dir / "hostkeys" / node.name
        assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE((lp.state_dir / "hostkeys").stat().st_mode) == 0o700
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        y = subprocess.run([dropbearkey, "-y", "-f", str(private)], capture_output=True, text=True, timeout=30)
        line = next(x for x in y.stdout.splitlines() if x.startswith("ssh-ed25519 "))
        assert line.split()[:2] == pubs[node.name].split()[:2] == public.read_text().split()[:2]
    before = {n.name: host_key_paths(lp, n)[0].read_bytes() for n in lp.nodes[:3]}
    assert ensure_host_keys(lp, [dropbearkey], log=lambda m: None) == pubs  # kept, not made again
    assert {n.name: host_key_paths(lp, n)[0].read_bytes() for n in lp.nodes[:3]} == before

    pin_host_keys(lp, pubs)
    lines = known.read_text().splitlines()
    entries = {line.split()[0]: line.split()[2] for line in lines}
    assert entries == {"10.0.2.15": pubs["node01"].split()[1], "10.0.2.16": pubs["node02"].split()[1],
                       "10.0.2.17": pubs["node03"].split()[1],
                       "10.0.2.99": keep.split()[1]}
    assert len(lines) == 4  # node02's old key replaced, not added beside

    # A rollout's readiness pins them again from the key files (known_hosts lost or edited meanwhile).
    from orchestrator.readiness import Readiness

    known.unlink()
    r = Readiness.from_plan(lp)
    assert sorted(line.split()[0] for line in known.read_text().splitlines()) == ["10.0.2.15", "10.0.2.16", "10.0.2.17"]
    assert "hostkeys/10.0.2.15.cpio" in r.pinned["10.0.2.15"] and "10.0.2.40" not in r.pinned
    assert r.known.lookup("10.0.2.16")["ssh-ed25519"].get_base64() == pubs["node02"].split()[1]


# --------------------------------------------------------------------------- real builds (slow)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, image.ImageReport]:
    """One real build into a temporary plan directory, from the shared package cache."""
    require_tool("apt-get")
    require_tool("dpkg")
    d = tmp_path_factory.mktemp("image")
    plan = tiny_plan(
        d,
        mounts=[{"source": "tmpfs", "target": "/scratch", "type": "tmpfs", "options": "size=8m"}],
        commands=["echo hello from $NODE_NAME at $NODE_IP > /run/hello"],
    )
    report = image.build_images(load_plan(plan), log=lambda m: print(m, file=sys.stderr))
    return d, report


@pytest.mark.slow
def test_build_writes_every_file(built: tuple[Path, image.ImageReport]) -> None:
    d, report = built
    names = {f.name for f in report.files}
    assert names == {"vmlinuz", "rootfs.gz", "pxelinux.0", "ldlinux.c32"}
    for f in report.files:
        path = d / "tftpboot" / f.name
        assert path.is_file() and not path.is_symlink()
        assert path.stat().st_size == f.size and sha256_of(path) == f.sha256
    assert report.kernel_release.startswith("6.")
    assert (d / "ssh" / "id_ed25519").exists() and (d / "ssh" / "id_ed25519.pub").exists()

    entries = {e["name"]: e for e in parse_newc(gzip.decompress((d / "tftpboot" / "rootfs.gz").read_bytes()))}
    for must in ("init", "bin/busybox", "bin/sh", "sbin/udhcpc", "usr/sbin/dropbear",
                 "lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                 "lib64/ld-linux-x86-64.so.2", "etc/dropbear",
                 "root/.ssh/authorized_keys", "etc/bootorch/modules", "dev/console"):
        assert must in entries, must
    # The shared image holds no host key: each node has its own, outside the boot root, pinned for readiness.
    assert not [n for n in entries if "host_key" in n]
    assert report.host_key is None and list(report.host_keys) == ["node01"]
    private = d / "state" / "hostkeys" / "node01" / "dropbear_ed25519_host_key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and not private.is_relative_to(d / "tftpboot")
    assert (d / "state" / "known_hosts").read_text().split() == ["10.0.2.15", *report.host_keys["node01"].split()[:2]]
    assert report.known_hosts == str(d / "state" / "known_hosts")
    assert entries["root/.ssh/authorized_keys"]["data"].decode().strip() == report.authorized_key
    mods = entries["etc/bootorch/modules"]["data"].decode().split()
    assert any(m.endswith("/e1000.ko") for m in mods)
    assert all(f"lib/modules/{report.kernel_release}/{m}" in entries for m in mods)
    # every library dropbear (and its libraries) need is in the image
    for name, e in entries.items():
        if name.startswith(("usr/sbin/dropbear", "lib/x86_64-linux-gnu/")) and e["data"][:4] == b"\x7fELF":
            for so in elf_needed(e["data"])[1]:
                assert f"lib/x86_64-linux-gnu/{so}" in entries, (name, so)


@pytest.mark.slow
def test_build_twice_gives_identical_sha256(built: tuple[Path, image.ImageReport], tmp_path: Path) -> None:
    d, first = built
    # Same plan, fresh boot root, through the command line this time.
    plan = d / "plan.yaml"
    other = tmp_path / "plan.yaml"
    text = json.loads(plan.read_text())
    text["boot"]["root"] = str(tmp_path / "tftpboot2")
    text["readiness"]["ssh"]["key"] = str(d / "ssh" / "id_ed25519")
    other.write_text(json.dumps(text))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "orchestrator.image", "build", str(other), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    warm = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    second = json.loads(r.stdout)
    assert second["ok"] is True
    assert {f["name"]: f["sha256"] for f in second["files"]} == {f.name: f.sha256 for f in first.files}
    for f in first.files:
        assert sha256_of(tmp_path / "tftpboot2" / f.name) == f.sha256
    # Another state directory, so other host keys: the shared files do not change with them.
    assert second["host_keys"]["node01"] != first.host_keys["node01"]
    assert second["known_hosts"] == str(tmp_path / "state" / "known_hosts")
    assert warm < 120, f"a warm-cache build took {warm:.0f} s"


@pytest.mark.slow
def test_source_date_epoch_changes_only_the_image(built: tuple[Path, image.ImageReport],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    d, first = built
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    text = json.loads((d / "plan.yaml").read_text())
    text["boot"]["root"] = "tftpboot-sde"
    (d / "plan-sde.yaml").write_text(json.dumps(text))
    report = image.build_images(load_plan(d / "plan-sde.yaml"), log=lambda m: None)
    before = {f.name: f.sha256 for f in first.files}
    after = {f.name: f.sha256 for f in report.files}
    assert after["vmlinuz"] == before["vmlinuz"] and after["rootfs.gz"] != before["rootfs.gz"]
    assert report.host_keys == first.host_keys  # same state directory: the node keeps its key across builds
    entries = parse_newc(gzip.decompress((d / "tftpboot-sde" / "rootfs.gz").read_bytes()))
    assert {e["mtime"] for e in entries} == {1700000000}


def test_ramdisk_profile_without_initrd_fails_before_any_download(tmp_path: Path) -> None:
    lp = load_plan(tiny_plan(tmp_path, initrd=[], root="ramdisk"))
    with pytest.raises(ImageError, match="needs an initrd"):
        image.build_images(lp, cache_dir=tmp_path / "cache", log=lambda m: None)
    assert not list((tmp_path / "cache").glob("*.deb")) if (tmp_path / "cache").exists() else True


def test_arguments_plug_into_a_parent_parser() -> None:
    """How cli.py wires it: ``bootorch image build PLAN``."""
    import argparse

    top = argparse.ArgumentParser(prog="bootorch")
    sub = top.add_subparsers(dest="command")
    image.add_arguments(sub.add_parser("image"))
    args = top.parse_args(["image", "build", "plans/full.yaml", "--json", "--cache", "/tmp/c"])
    assert (args.image_cmd, args.plan, args.json, args.cache, args.refresh) == (
        "build", "plans/full.yaml", True, Path("/tmp/c"), False)
    with pytest.raises(SystemExit) as e:
        top.parse_args(["image"])
    assert e.value.code == 2


def test_cli_reports_plan_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nnetwork: {subnet: 10.0.0.0/24}\n")
    r = subprocess.run([sys.executable, "-m", "orchestrator.image", "build", str(bad)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1
    assert "bad.yaml:" in r.stderr
    r = subprocess.run([sys.executable, "-m", "orchestrator.image"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2


# --------------------------------------------------------------------------- booting it (slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BOOT_TIMEOUT = 150.0


def initrds_as_a_loader_concatenates_them(parts: list[bytes]) -> bytes:
    """What pxelinux and iPXE hand the kernel for ``initrd=a,b``: each file from a 4-byte boundary, zero-padded."""
    return b"".join(p + b"\0" * (-len(p) % 4) for p in parts)


@pytest.mark.slow
@pytest.mark.parametrize(
    "cmdline, with_key",
    [
        # plans/full.yaml's profile: initramfs root, the kernel's ip=dhcp form -> udhcpc; the node's key delivered
        ("console=ttyS0 panic=10 ip=::::node01:eth0:dhcp", True),
        # the seed's form: root: ramdisk, static ip= (no second DHCP round); the key archive did not arrive
        ("console=ttyS0 panic=10 root=/dev/ram0 rw ramdisk_size=65536 "
         "ip=10.0.2.15:10.0.2.2:10.0.2.2:255.255.255.0:node01:eth0:off", False),
    ],
    ids=["dhcp-own-key", "static-ramdisk-no-key"],
)
def test_image_boots_to_ssh(built: tuple[Path, image.ImageReport], tmp_path: Path, cmdline: str, with_key: bool) -> None:
    """QEMU (TCG) boots the kernel + image (+ the node's key archive, concatenated as a
    loader does) directly; the console shows the ready marker and SSH through user-mode
    networking (restrict=on, host forward on 127.0.0.1 only) presents node01's own host
    key and runs commands with the plan's key. Without the archive the node makes a key
    at boot, and readiness refuses it, naming that cause."""
    import trio

    from orchestrator.readiness import Readiness

    qemu = require_tool("qemu-system-x86_64")
    paramiko = pytest.importorskip("paramiko")
    d, report = built
    boot = d / "tftpboot"
    port = free_port()
    log = tmp_path / "serial.log"
    initrd = tmp_path / "initrd"
    parts = [(boot / "rootfs.gz").read_bytes()]
    if with_key:
        key = (d / "state" / "hostkeys" / "node01" / "dropbear_ed25519_host_key").read_bytes()
        parts.append(image.host_key_archive(key))
    initrd.write_bytes(initrds_as_a_loader_concatenates_them(parts))
    cmd = [
        qemu, "-accel", "tcg", "-m", "256", "-smp", "1", "-display", "none", "-monitor", "none",
        "-no-reboot", "-serial", f"file:{log}",
        "-kernel", str(boot / "vmlinuz"), "-initrd", str(initrd), "-append", cmdline,
        "-nic", f"user,model=e1000,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while True:
            text = log.read_text(errors="replace") if log.exists() else ""
            if READY_MARKER in text:
                break
            assert proc.poll() is None, f"QEMU exited ({proc.returncode}):\n{text[-3000:]}"
            assert time.monotonic() - t0 < BOOT_TIMEOUT, f"no ready marker in {BOOT_TIMEOUT} s:\n{text[-3000:]}"
            time.sleep(0.5)
        ready_after = time.monotonic() - t0
        print(f"boot to ready marker: {ready_after:.1f} s (TCG)", file=sys.stderr)
        assert "Run /init as init process" in text
        assert "insmod" not in text.split(READY_MARKER)[0]  # init reports only failed insmods
        if "dhcp" in cmdline.split("ip=")[1]:
            assert "bootorch-image: dhcp bound: 10.0.2.15" in text
        else:
            assert "bootorch-image: network: static 10.0.2.15/24 on eth0" in text

        host_type, host_b64 = report.host_keys["node01"].split()[:2]
        client = paramiko.SSHClient()
        if with_key:
            assert "bootorch-image: ssh: this node's own host key" in text
            # strict: the host key must be node01's own, as the build reported it
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            client.get_host_keys().add(f"[127.0.0.1]:{port}", host_type, paramiko.Ed25519Key(data=base64.b64decode(host_b64)))
        else:
            assert "no host key was delivered" in text
            known = tmp_path / "known_hosts"
            known.write_text(f"[127.0.0.1]:{port} {host_type} {host_b64}\n")
            hint = "node01's own host key"
            r = Readiness(known_hosts=known, policy="tofu", checks=[], port=port, key_file=d / "ssh" / "id_ed25519",
                          pinned={"127.0.0.1": hint}, step_timeout=60)
            v = trio.run(r.check, "127.0.0.1")
            assert v.host_key_error and "CHANGED" in v.error and hint in v.error and "did not get its host key" in v.error
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # the rest: what the image does anyway
        client.connect("127.0.0.1", port=port, username="root", key_filename=str(d / "ssh" / "id_ed25519"),
                       allow_agent=False, look_for_keys=False, timeout=30, banner_timeout=60, auth_timeout=60)
        try:
            def run(c: str) -> str:
                _i, out, _e = client.exec_command(c, timeout=30)
                data = out.read().decode()
                assert out.channel.recv_exit_status() == 0, c
                return data.strip()

            assert run("uname -r") == report.kernel_release
            assert run("awk '$2 == \"/\" {print $3}' /proc/mounts") == "rootfs"
            assert run("pidof dropbear")
            assert run("hostname") == "node01"
            assert run("cat /run/hello") == "hello from node01 at 10.0.2.15"
            assert run("awk '$2 == \"/scratch\" {print $3}' /proc/mounts") == "tmpfs"
            assert "e1000" in run("lsmod")
        finally:
            client.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.slow
def test_pxe_chain_boots_the_image(built: tuple[Path, image.ImageReport], tmp_path: Path) -> None:
    """The whole BIOS path with the files the build placed: QEMU's iPXE ROM
    (Debian's ipxe-qemu) gets pxelinux.0 from user-mode networking's TFTP,
    pxelinux loads ldlinux.c32 and the node's rendered config, then the kernel,
    the image and the node's host-key archive (``initrd=rootfs.gz,hostkeys/...``),
    and the node comes up to the ready marker presenting its own host key."""
    import paramiko

    from orchestrator.protocols.pxelinux import mac_config_name
    from orchestrator.render import render_all

    qemu = require_tool("qemu-system-x86_64")
    d, report = built
    lp = load_plan(d / "plan.yaml")
    node = lp.nodes[0]
    root = tmp_path / "tftp"
    root.mkdir()
    for f in ("pxelinux.0", "ldlinux.c32", "vmlinuz", "rootfs.gz"):
        (root / f).write_bytes((d / "tftpboot" / f).read_bytes())
    rendered = render_all(lp)  # the bytes bootorch's server answers this node with
    cfg_name = f"pxelinux.cfg/{mac_config_name(node.mac)}"
    assert "initrd=rootfs.gz,hostkeys/10.0.2.15.cpio " in rendered[cfg_name].decode()
    for name in (cfg_name, "hostkeys/10.0.2.15.cpio"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(rendered[name])
    # SERIAL: pxelinux's own messages go to the VGA console unless told.
    (root / cfg_name).write_bytes(b"SERIAL 0 115200\n" + rendered[cfg_name])
    log = tmp_path / "serial.log"
    port = free_port()
    cmd = [
        qemu, "-accel", "tcg", "-m", "256", "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{log}", "-boot", "n",
        "-nic", f"user,model=e1000,mac={node.mac},restrict=on,tftp={root},bootfile=pxelinux.0,"
                f"hostfwd=tcp:127.0.0.1:{port}-:22",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while True:
            text = log.read_text(errors="replace") if log.exists() else ""
            if READY_MARKER in text:
                break
            assert proc.poll() is None, f"QEMU exited ({proc.returncode}):\n{text[-3000:]}"
            assert time.monotonic() - t0 < BOOT_TIMEOUT + 60, f"no ready marker:\n{text[-3000:]}"
            time.sleep(0.5)
        print(f"PXE boot to ready marker: {time.monotonic() - t0:.1f} s (TCG)", file=sys.stderr)
        assert "PXELINUX 6" in text and "Loading vmlinuz" in text and "Loading rootfs.gz" in text
        assert "Loading hostkeys/10.0.2.15.cpio" in text
        assert "ip=::::node01:eth0:dhcp" in text  # the rendered command line reached the kernel
        assert "bootorch-image: dhcp bound:" in text
        assert "bootorch-image: ssh: this node's own host key" in text
        host_type, host_b64 = report.host_keys["node01"].split()[:2]
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.get_host_keys().add(f"[127.0.0.1]:{port}", host_type, paramiko.Ed25519Key(data=base64.b64decode(host_b64)))
        client.connect("127.0.0.1", port=port, username="root", key_filename=str(d / "ssh" / "id_ed25519"),
                       allow_agent=False, look_for_keys=False, timeout=30, banner_timeout=60, auth_timeout=60)
        client.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()
