"""``bootorch image build PLAN``: the boot files a plan's profiles name.

For every profile this writes into the plan's boot root:

- the **kernel**, Debian's ``linux-image-amd64`` (its dependency
  ``linux-image-<abi>-amd64`` carries ``/boot/vmlinuz-*`` and ``/lib/modules``),
  fetched with ``apt-get download`` into a cache and unpacked with ``dpkg -x``:
  no root, no network at boot time, and a warm cache needs no network at all;
- the **RAM-disk root** (the profile's first ``initrd`` name, ``rootfs.gz`` in
  our plans): a gzip'd newc cpio archive written here in Python, holding static
  busybox (with its applet links), dropbear with the shared libraries its ELF
  headers ask for (resolved from the Debian packages, not the build host), the
  profile's kernel modules with their dependencies (decompressed, loaded with
  ``insmod`` in dependency order), ``/root/.ssh/authorized_keys`` from
  ``readiness.ssh.key`` and an ``/init`` that brings the node up (network from
  the kernel's ``ip=`` parameter or DHCP, mounts, commands, SSH) and prints
  :data:`READY_MARKER` on the console. It holds **no host key**;
- the **BIOS boot loader** ``pxelinux.0`` and its ``ldlinux.c32``, copied from
  Debian's pxelinux / syslinux-common packages;

and, outside the boot root, for every node whose profile says ``host_key:
per-node`` (the default), **its own dropbear host key** (see below).

**Reproducible**: the same cached packages, plan and authorized key give
byte-identical files (the host keys are not in them). The cpio is written in
sorted order with fixed inode numbers, uid/gid 0 and one mtime
(``SOURCE_DATE_EPOCH``, default 0); gzip gets no name and mtime 0. Nothing
reads the build host's clock, file times or user database.

**``root: ramdisk`` vs ``root: initramfs``.** The seed article's RAM disk is an
ext2 image the kernel copies into ``/dev/ram0``. Debian's kernel builds the RAM
disk driver as a module (``CONFIG_BLK_DEV_RAM=m``), so it cannot mount such a
root before it has a root. Both kinds of profile therefore get the same cpio
archive: the kernel recognises a cpio initrd, unpacks it into its RAM file
system and runs ``/init`` (the default ``rdinit=``); ``root=/dev/ram0 rw`` on a
``ramdisk`` profile's command line is then never used. The root lives in RAM
either way, which is what the seed's recipe is for.

**SSH keys.** The node's authorized key is ``readiness.ssh.key`` + ``.pub``;
when the private key does not exist yet (a fresh lab), an ed25519 key pair is
generated there.

**Host keys, one per node.** :func:`ensure_host_keys` makes each node an
ed25519 key with the packaged ``dropbearkey`` (run through the packaged
loader), in ``<state_dir>/hostkeys/<node>/dropbear_ed25519_host_key`` (0600;
the directories 0700) with the OpenSSH public line beside it (``.pub``). A key
is made once and kept, so a node presents the same key across reboots and
rebuilds. The build then writes each public key into readiness's known_hosts
for the node's address, replacing an older entry
(:func:`orchestrator.readiness.pin_host_keys`): readiness trusts that key and
no other, under ``tofu`` as under ``strict``.

The shared image carries no host key. The boot server sends each node its key
as a second initrd, a tiny newc cpio holding only
``etc/dropbear/dropbear_ed25519_host_key`` (:func:`host_key_archive`), listed
after the profile's initrds as ``hostkeys/<ip>.cpio`` (the kernel unpacks
initrds in order into the same root), and answers that name only to a client
whose address is the node's (:func:`orchestrator.render.dynamic_source`). The
image's ``/init`` starts dropbear with that key; when it is missing (the node
did not get its archive) it says so on the console and starts ``dropbear
-R``, which makes a key at boot, and readiness refuses that key as changed,
naming the likely cause.

Limits, honestly: a netboot cannot deliver a secret confidentially. TFTP and
HTTP are clear text without client authentication, so the key goes to
whoever holds the node's IP address when it asks (a machine that takes over
the address, e.g. by answering ARP for it while the node is off, gets it) and
to anyone who can read the boot LAN's traffic. Compared with one key in a
shared image that the boot server hands to every client (anyone on the boot
LAN could fetch it and impersonate every node), a key is sent only to its own
node's address, a stolen key impersonates that one node, and a node that comes
up with any other key is refused. A site that needs more puts host keys on the
node's own disk or TPM and says ``host_key: none``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cmp_to_key
from pathlib import Path
from typing import Any, Callable, Iterable

from orchestrator.plan import LoadedPlan, PlanError, load_plan
from orchestrator.plan.model import Profile

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / "var" / "cache" / "debs"
#: The line the image's init prints on the console once SSH accepts connections.
READY_MARKER = "bootorch-image: ready"
ARCH = "amd64"
MULTIARCH = "x86_64-linux-gnu"

KERNEL_META = "linux-image-amd64"
BUSYBOX_PKG = "busybox-static"
DROPBEAR_PKG = "dropbear-bin"
PXELINUX_PKG = "pxelinux"
SYSLINUX_PKG = "syslinux-common"
PXELINUX_FILES = {
    # loader name in the boot root -> path inside the pxelinux package
    "pxelinux.0": "usr/lib/PXELINUX/pxelinux.0",
    "lpxelinux.0": "usr/lib/PXELINUX/lpxelinux.0",
}
LDLINUX = "usr/lib/syslinux/modules/bios/ldlinux.c32"

#: A NIC driver that binds to nothing without its bus driver: QEMU's virtio NIC
#: is a PCI device, and Debian builds virtio_pci as a module.
COMPANION_MODULES = {"virtio_net": ["virtio_pci"]}
#: Mount types whose kernel modules the image adds when a profile mounts them.
FS_MODULES = {"nfs": ["nfs", "nfsv3"], "nfs4": ["nfs", "nfsv4"]}


class ImageError(Exception):
    """The image cannot be built (missing package, unknown module, bad plan values)."""


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class OutputFile:
    name: str  # relative to the boot root
    role: str  # kernel | initrd | loader
    size: int
    sha256: str
    source: str  # where it came from: package_version or "built"


@dataclass
class ImageReport:
    boot_root: Path
    files: list[OutputFile] = field(default_factory=list)
    packages: dict[str, str] = field(default_factory=dict)  # name -> version used
    kernel_release: str = ""
    images: dict[str, dict[str, Any]] = field(default_factory=dict)  # initrd name -> contents summary
    authorized_key: str | None = None
    host_key: str | None = None  # always None: nodes have their own host keys (host_keys)
    host_keys: dict[str, str] = field(default_factory=dict)  # node name -> its host public key line
    known_hosts: str | None = None  # where host_keys were pinned
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object (stable; keys are only ever added):

        ``ok`` (true), ``boot_root``, ``kernel_release`` (``uname -r`` of the
        kernel), ``files`` (``name`` relative to the boot root, ``role``
        kernel/initrd/loader, ``size`` in bytes, ``sha256``, ``source``
        ``package_version`` or ``built``), ``packages`` (Debian package ->
        version used), ``images`` (per RAM-disk image: ``profile``, ``root``,
        ``entries``, ``cpio_bytes``, ``modules`` in load order,
        ``builtin_modules``, ``mounts``, ``commands``), ``authorized_key``,
        ``host_key`` (null: no key is shared by the nodes), ``host_keys``
        (node name -> the OpenSSH public key line of its own host key, for
        every node with ``host_key: per-node``), ``known_hosts`` (the file
        they were written into), ``warnings``, ``seconds``. On failure: ``{"ok": false, "plan", "error"}``
        (or ``"problems"`` for plan errors) and exit status 1.
        """
        return {
            "ok": True,
            "boot_root": str(self.boot_root),
            "kernel_release": self.kernel_release,
            "files": [
                {"name": f.name, "role": f.role, "size": f.size, "sha256": f.sha256, "source": f.source}
                for f in self.files
            ],
            "packages": dict(sorted(self.packages.items())),
            "images": self.images,
            "authorized_key": self.authorized_key,
            "host_key": self.host_key,
            "host_keys": dict(self.host_keys),
            "known_hosts": self.known_hosts,
            "warnings": self.warnings,
            "seconds": round(self.seconds, 3),
        }


# --------------------------------------------------------------------------- Debian packages


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _dep_names(depends: str) -> list[str]:
    """Package names of a Depends field; the first of each ``a | b`` alternative."""
    out = []
    for clause in depends.split(","):
        clause = clause.strip()
        if not clause:
            continue
        first = clause.split("|")[0].strip()
        name = re.split(r"[\s(:]", first, maxsplit=1)[0]
        out.append(name)
    return out


class DebCache:
    """Debian packages by name: ``apt-get download``-ed once, unpacked once.

    Layout: ``<root>/<name>_<version>_<arch>.deb`` and the unpacked tree in
    ``<root>/x/<deb file stem>/``. A package already in the cache is used as
    it is (the cache pins the versions; ``refresh=True`` fetches the current
    candidate again), so a warm build runs offline and reproduces its output.
    """

    def __init__(self, root: Path, *, refresh: bool = False, log: Callable[[str], None] = print) -> None:
        self.root = root
        self.refresh = refresh
        self.log = log
        self._updated = False
        self._refreshed: set[str] = set()
        root.mkdir(parents=True, exist_ok=True)

    def _cached(self, name: str) -> list[Path]:
        return [p for p in self.root.glob(f"{name}_*.deb") if p.name.endswith((f"_{ARCH}.deb", "_all.deb"))]

    def ensure(self, names: Iterable[str]) -> None:
        """Download those of ``names`` not cached yet, in one ``apt-get download`` (apt starts slowly)."""
        missing = [
            n for n in dict.fromkeys(names)
            if not self._cached(n) or (self.refresh and n not in self._refreshed)
        ]
        if missing:
            self.download(missing)

    def deb(self, name: str) -> Path:
        """The cached .deb of ``name`` (the highest version when several)."""
        self.ensure([name])
        found = self._cached(name)
        if not found:
            raise ImageError(f"apt-get download {name} left no {name}_*.deb in {self.root}")
        if len(found) > 1:
            found.sort(key=cmp_to_key(_cmp_deb_versions))
        return found[-1]

    def download(self, names: list[str]) -> None:
        """``apt-get download`` into the cache; ``apt-get update`` once if apt does not know a name."""
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".dl-") as tmp:
            self.log(f"image: apt-get download {' '.join(names)}")
            r = _run(["apt-get", "download", "-q", *names], cwd=tmp)
            stale = ("Unable to locate package", "has no installation candidate", "Can't select")
            if r.returncode != 0 and not self._updated and any(s in r.stderr for s in stale):
                # A fresh machine has no package lists yet (or old ones).
                self.log("image: apt does not know the package yet: apt-get update")
                self._updated = True
                u = _run(["apt-get", "update", "-q"])
                if u.returncode != 0:
                    raise ImageError(f"apt-get update failed:\n{u.stderr.strip()}")
                r = _run(["apt-get", "download", "-q", *names], cwd=tmp)
            if r.returncode != 0:
                raise ImageError(f"apt-get download {' '.join(names)} failed:\n{r.stderr.strip()}")
            for p in Path(tmp).glob("*.deb"):
                os.replace(p, self.root / p.name)
        self._refreshed.update(names)

    def field(self, deb: Path, name: str) -> str:
        r = _run(["dpkg-deb", "-f", str(deb), name])
        if r.returncode != 0:
            raise ImageError(f"dpkg-deb -f {deb.name} {name}: {r.stderr.strip()}")
        return r.stdout.strip()

    def extract(self, deb: Path) -> Path:
        """The unpacked tree of ``deb`` (``dpkg -x``, once; no root needed)."""
        dest = self.root / "x" / deb.name[: -len(".deb")]
        if (dest / ".bootorch-complete").exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".x-"))
        try:
            self.log(f"image: dpkg -x {deb.name}")
            r = _run(["dpkg", "-x", str(deb), str(tmp)])
            if r.returncode != 0:
                raise ImageError(f"dpkg -x {deb.name} failed: {r.stderr.strip()}")
            (tmp / ".bootorch-complete").touch()
            if (dest / ".bootorch-complete").exists():  # a concurrent build finished first
                return dest
            if dest.exists():  # left by an interrupted run
                shutil.rmtree(dest, ignore_errors=True)
            try:
                os.replace(tmp, dest)
            except OSError:
                if not (dest / ".bootorch-complete").exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def unpacked(self, name: str) -> tuple[Path, str]:
        """(tree, version) of package ``name``."""
        deb = self.deb(name)
        return self.extract(deb), self.field(deb, "Version")


def _cmp_deb_versions(a: Path, b: Path) -> int:
    va, vb = a.name.split("_")[1], b.name.split("_")[1]
    va, vb = va.replace("%3a", ":"), vb.replace("%3a", ":")
    if va == vb:
        return 0
    r = subprocess.run(["dpkg", "--compare-versions", va, "lt", vb])
    return -1 if r.returncode == 0 else 1


# --------------------------------------------------------------------------- ELF (just enough)

SHT_DYNAMIC = 6
DT_NEEDED = 1


def _elf_sections(data: bytes) -> dict[str, tuple[int, int, int, int]]:
    """Section name -> (type, offset, size, link) of a little-endian ELF64 file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ImageError("not a little-endian ELF64 file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQII", data, shoff + i * shentsize) for i in range(shnum)]
    stroff = raw[shstrndx][4]
    out: dict[str, tuple[int, int, int, int]] = {}
    for name_off, typ, _flags, _addr, off, size, link, _info in raw:
        end = data.index(b"\0", stroff + name_off)
        out[data[stroff + name_off : end].decode()] = (typ, off, size, link)
    return out


def elf_needed(data: bytes) -> tuple[str | None, list[str]]:
    """(PT_INTERP path, DT_NEEDED sonames) of a dynamically linked ELF64 file."""
    secs = _elf_sections(data)
    interp = None
    if ".interp" in secs:
        _t, off, size, _l = secs[".interp"]
        interp = data[off : off + size].rstrip(b"\0").decode()
    needed: list[str] = []
    by_index = list(secs.values())
    for typ, off, size, link in by_index:
        if typ != SHT_DYNAMIC:
            continue
        str_off = by_index[link][1]
        for i in range(0, size, 16):
            tag, val = struct.unpack_from("<qQ", data, off + i)
            if tag == 0:
                break
            if tag == DT_NEEDED:
                end = data.index(b"\0", str_off + val)
                needed.append(data[str_off + val : end].decode())
    return interp, needed


def modinfo(data: bytes) -> dict[str, list[str]]:
    """A kernel module's ``.modinfo`` section: key -> values (``depends``, ``softdep``, ...)."""
    secs = _elf_sections(data)
    if ".modinfo" not in secs:
        return {}
    _t, off, size, _l = secs[".modinfo"]
    out: dict[str, list[str]] = {}
    for item in data[off : off + size].split(b"\0"):
        if b"=" in item:
            k, _, v = item.decode(errors="replace").partition("=")
            out.setdefault(k, []).append(v)
    return out


# --------------------------------------------------------------------------- kernel modules


def _modname(s: str) -> str:
    return s.replace("-", "_")


def _read_module(path: Path) -> bytes:
    """A module file's ELF bytes. Debian 12's modules are plain ``.ko``; later
    kernels ship ``.ko.xz`` (busybox insmod cannot load those: decompress here)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise ImageError(f"{path.name}: zstd-compressed modules are not supported")
    return data


@dataclass
class ModuleSet:
    load_order: list[tuple[str, str, bytes]]  # (name, image path under /lib/modules/<rel>/, ELF bytes)
    builtin: list[str]


def resolve_modules(moddir: Path, wanted: Iterable[str]) -> ModuleSet:
    """The modules ``wanted`` needs, dependencies first.

    Debian's package carries no ``modules.dep`` (its postinst runs depmod), so
    dependencies come from each module's own ``.modinfo``: ``depends=`` and the
    ``pre:`` part of ``softdep=``. A ``modules.dep`` is used when present.
    Built-in modules (``modules.builtin``) need nothing and are reported.
    """
    index: dict[str, Path] = {}
    for p in sorted((moddir / "kernel").rglob("*.ko*")):
        base = p.name.split(".ko")[0]
        index.setdefault(_modname(base), p)
    builtin_names = set()
    mb = moddir / "modules.builtin"
    if mb.exists():
        for line in mb.read_text().splitlines():
            builtin_names.add(_modname(Path(line.strip()).name.split(".ko")[0]))
    depfile: dict[str, list[str]] = {}
    md = moddir / "modules.dep"
    if md.exists():
        for line in md.read_text().splitlines():
            mod, _, deps = line.partition(":")
            depfile[_modname(Path(mod).name.split(".ko")[0])] = [
                _modname(Path(d).name.split(".ko")[0]) for d in deps.split()
            ]

    order: list[tuple[str, str, bytes]] = []
    builtin: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, chain: tuple[str, ...], optional: bool) -> None:
        name = _modname(name)
        if name in done or name in visiting:
            return
        if name in builtin_names:
            done.add(name)
            builtin.append(name)
            return
        if name not in index:
            if optional:
                return
            via = f" (needed by {' <- '.join(reversed(chain))})" if chain else ""
            raise ImageError(f"kernel module {name!r} is neither a module nor built into {moddir.name}{via}")
        visiting.add(name)
        path = index[name]
        data = _read_module(path)
        info = modinfo(data)
        deps = depfile.get(name)
        if deps is None:
            deps = [d for v in info.get("depends", []) for d in v.split(",") if d]
        soft = []
        for v in info.get("softdep", []):
            m = re.search(r"pre:\s*([^:]*?)(?:\s+post:|$)", v)
            if m:
                soft += m.group(1).split()
        for d in deps:
            visit(d, chain + (name,), False)
        for d in soft:
            visit(d, chain + (name,), True)
        for d in COMPANION_MODULES.get(name, []):
            visit(d, chain + (name,), True)
        visiting.discard(name)
        done.add(name)
        rel = path.relative_to(moddir).as_posix()
        for suffix in (".xz", ".gz"):
            rel = rel.removesuffix(suffix)
        order.append((name, rel, data))

    for w in wanted:
        visit(w, (), False)
    return ModuleSet(order, builtin)


# --------------------------------------------------------------------------- keys


def ensure_user_key(private: Path, log: Callable[[str], None]) -> str:
    """The public key line for ``private`` (+ ``.pub``), generating an ed25519 pair if absent."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pub = private.with_name(private.name + ".pub")
    if not private.exists():
        log(f"image: generating the lab's SSH key {private} (ed25519, no passphrase)")
        private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        pub.write_bytes(line + b" bootorch-lab\n")
    if pub.exists():
        return pub.read_text().strip()
    # A private key without its .pub: derive the public half.
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line.decode()


HOST_KEY_FILE = "dropbear_ed25519_host_key"
#: Where the image's /init looks for the node's host key (the key archive's one file).
HOST_KEY_PATH = f"etc/dropbear/{HOST_KEY_FILE}"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def host_key_paths(lp: LoadedPlan, node: Any) -> tuple[Path, Path]:
    """(private key, ``.pub``) of ``node``'s host key: ``<state_dir>/hostkeys/<node>/``.

    Raises ValueError for a node name that cannot be a directory name.
    """
    if not _SAFE_NAME.fullmatch(node.name):
        raise ValueError(f"node name {node.name!r} cannot name a host-key directory (letters, digits, '.', '_', '-')")
    d = lp.state_dir / "hostkeys" / node.name
    return d / HOST_KEY_FILE, d / f"{HOST_KEY_FILE}.pub"


def ensure_host_keys(lp: LoadedPlan, dropbearkey: list[str], log: Callable[[str], None] = print) -> dict[str, str]:
    """Node name -> host public key line for every node whose profile says ``host_key: per-node``.

    A missing key is made with ``dropbearkey`` (an argv prefix: the packaged one
    through its loader); an existing key is kept. Directories are 0700, private
    keys 0600; two builds at once never replace each other's key (hard link).
    """
    out: dict[str, str] = {}
    made = 0
    for node in lp.nodes:
        if lp.model.profiles[node.profile].host_key != "per-node":
            continue
        try:
            private, public = host_key_paths(lp, node)
        except ValueError as e:
            raise ImageError(f"{e}: rename the node, or give its profile host_key: none") from None
        for d in (private.parent.parent, private.parent):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)
        pub = ""
        if not private.exists():
            tmp = private.with_name(f".{private.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            r = _run([*dropbearkey, "-t", "ed25519", "-f", str(tmp)])
            if r.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise ImageError(f"dropbearkey (host key of {node.name}) failed: {r.stderr.strip()}")
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, private)  # never replaces a key a concurrent build already made
                pub = next((x for x in r.stdout.splitlines() if x.startswith("ssh-")), "")
                made += 1
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        elif public.exists():
            pub = public.read_text().strip()
        if not pub:
            r = _run([*dropbearkey, "-y", "-f", str(private)])
            pub = next((x for x in r.stdout.splitlines() if x.startswith("ssh-")), "")
            if r.returncode != 0 or not pub:
                raise ImageError(f"dropbearkey -y {private} failed: {r.stderr.strip()}")
        line = " ".join(pub.split()[:2]) + f" {node.name}"
        if not public.exists() or public.read_text().strip() != line:
            tmp_pub = public.with_name(f".{public.name}.{os.getpid()}.tmp")
            tmp_pub.write_text(line + "\n")
            os.replace(tmp_pub, public)
        out[node.name] = line
    if made:
        log(f"image: made {made} node host key(s) in {lp.state_dir / 'hostkeys'}")
    return out


def host_key_archive(private_key: bytes) -> bytes:
    """The second initrd a node boots: a newc cpio holding only its host key (0600 in a 0700 dir).

    Uncompressed (a few hundred bytes) and a multiple of 4 bytes long; the
    kernel unpacks it after the image into the same root
    (Documentation/driver-api/early-userspace/buffer-format.rst).
    """
    t = Tree()
    t.dir("etc", 0o755)
    t.dir("etc/dropbear", 0o700)
    t.file(HOST_KEY_PATH, private_key, 0o600)
    return newc_archive(t)


# --------------------------------------------------------------------------- cpio (newc)

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


# --------------------------------------------------------------------------- the image's scripts

#: Shell functions /init uses; a separate file so tests can run them with the host's busybox.
LIB_SH = r"""# bootorch image helpers, sourced by /init (generated by `bootorch image build`).

say() { echo "bootorch-image: $*"; }

# parse_ip SPEC: the kernel's ip= parameter
# (Documentation/admin-guide/nfs/nfsroot.rst):
#   ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>
# or a bare autoconf word (dhcp, on, any, off, none, ...). Sets ip_mode
# (dhcp|static|none), ip_client, ip_server, ip_gw, ip_mask, ip_host, ip_dev,
# ip_dns0, ip_dns1. No ip= at all means DHCP on eth0: the node needs a network.
parse_ip() {
    ip_client= ip_server= ip_gw= ip_mask= ip_host= ip_dev= ip_dns0= ip_dns1=
    ip_auto=
    case "$1" in
        "" | dhcp | on | any | both | bootp | rarp) ip_mode=dhcp ;;
        off | none) ip_mode=none ;;
        *)
            _oldifs=$IFS
            IFS=:
            # shellcheck disable=SC2086
            set -f; set -- $1; set +f
            IFS=$_oldifs
            ip_client=$1 ip_server=$2 ip_gw=$3 ip_mask=$4 ip_host=$5 ip_dev=$6 ip_auto=$7
            ip_dns0=$8 ip_dns1=$9
            case "$ip_auto" in
                dhcp | on | any | both | bootp | rarp) ip_mode=dhcp ;;
                *) if [ -n "$ip_client" ]; then ip_mode=static; else ip_mode=none; fi ;;
            esac
            ;;
    esac
    [ -n "$ip_dev" ] || ip_dev=eth0
}

# cmdline_ip: the value of the last ip= on the kernel command line (or "").
cmdline_ip() {
    _v=
    set -f
    # shellcheck disable=SC2013
    for _a in $(cat "${1:-/proc/cmdline}"); do
        case "$_a" in ip=*) _v=${_a#ip=} ;; esac
    done
    set +f
    echo "$_v"
}

# mask_bits NETMASK: 255.255.255.0 -> 24
mask_bits() {
    _bits=0
    _oldifs=$IFS; IFS=.
    for _o in $1; do
        case "$_o" in
            255) _bits=$((_bits + 8)) ;; 254) _bits=$((_bits + 7)) ;; 252) _bits=$((_bits + 6)) ;;
            248) _bits=$((_bits + 5)) ;; 240) _bits=$((_bits + 4)) ;; 224) _bits=$((_bits + 3)) ;;
            192) _bits=$((_bits + 2)) ;; 128) _bits=$((_bits + 1)) ;;
        esac
    done
    IFS=$_oldifs
    echo "$_bits"
}

# do_mount SOURCE TARGET TYPE OPTIONS: one of the profile's mounts.
do_mount() {
    mkdir -p "$2"
    _opts=$4
    case "$3" in
        nfs)
            # Debian's busybox-static has no NFS mount helper: busybox hands the
            # options to the kernel as text, and the kernel's NFS client then
            # needs the server address (addr=) that mount.nfs would add; vers=3
            # because the image loads the NFSv3 client only.
            case ",$_opts," in *,addr=*) ;; *) _opts="$_opts,addr=${1%%:*}" ;; esac
            case ",$_opts," in *,vers=* | *,nfsvers=*) ;; *) _opts="$_opts,vers=3" ;; esac
            ;;
    esac
    if ${MOUNT:-mount} -t "$3" -o "$_opts" "$1" "$2"; then say "mount: $1 on $2"; else say "mount: $1 on $2 FAILED"; fi
}

# run_command CMD: one of the profile's commands; a failure is reported, not fatal.
run_command() {
    sh -c "$1"
    rc=$?
    [ $rc -eq 0 ] || say "command failed (exit $rc): $1"
}

# start_ssh KEYFILE: dropbear in the background with this node's own host key,
# which the boot server sent as a second initrd. Without it dropbear makes a key
# now (-R), which readiness refuses: say why on the console. -s: no password
# logins; -E -F: log to the console, stay a child of PID 1.
start_ssh() {
    if [ -s "$1" ]; then
        say "ssh: this node's own host key (delivered by the boot server)"
        ${DROPBEAR:-dropbear} -r "$1" -p 22 -s -E -F -P /run/dropbear.pid &
    else
        say "warning: no host key was delivered (the boot server's hostkeys/ archive did not arrive):" \
            "dropbear -R makes one now, and readiness will refuse it as changed"
        ${DROPBEAR:-dropbear} -R -p 22 -s -E -F -P /run/dropbear.pid &
    fi
}
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event script (generated by `bootorch image build`): configure the
# interface from the lease. udhcpc sends no PXE vendor class, so the boot
# server sees this exchange as the os_dhcp stage.
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface" 2>/dev/null
        ip link set "$interface" up
        ;;
    bound | renew)
        ip -4 addr flush dev "$interface" 2>/dev/null
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" ${broadcast:+broadcast "$broadcast"} up
        if [ -n "$router" ]; then
            while route del default dev "$interface" 2>/dev/null; do :; done
            for r in $router; do route add default gw "$r" dev "$interface" && break; done
        fi
        : >/etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        [ -n "$hostname" ] && [ "$(hostname)" = "(none)" ] && hostname "$hostname"
        echo "bootorch-image: dhcp $1: $ip/${mask:-?} on $interface from ${serverid:-?}"
        ;;
esac
exit 0
"""

INIT_TEMPLATE = r"""#!/bin/sh
# /init of a bootorch RAM-disk root (generated by `bootorch image build` for
# profile @PROFILE@ of plan @PLAN@). The kernel runs it as PID 1 from the
# unpacked cpio; it must never exit (the kernel would panic), so it ends by
# exec'ing busybox init, which keeps a shell on the console.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
umask 022
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run /tmp
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
exec </dev/console >/dev/console 2>&1
. /lib/bootorch.sh

KVER=$(uname -r)
say "init: profile @PROFILE@, kernel $KVER"
[ "$KVER" = "@KVER@" ] || say "warning: image modules are for @KVER@, the kernel is $KVER"

# Kernel modules, dependencies first (decompressed at build time: busybox insmod
# takes plain ELF modules only).
while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/@KVER@/$mod" 2>/dev/null || say "insmod $mod failed"
done </etc/bootorch/modules

parse_ip "$(cmdline_ip)"
[ -n "$ip_host" ] && hostname "$ip_host"
ifconfig lo 127.0.0.1 netmask 255.0.0.0 up

# The NIC appears when its driver probes; wait for it (bounded).
i=0
while [ ! -e "/sys/class/net/$ip_dev" ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
[ -e "/sys/class/net/$ip_dev" ] || say "warning: no network device $ip_dev (modules: @MODULES@)"

net_ok=0
if ip -4 addr show dev "$ip_dev" 2>/dev/null | grep -q inet; then
    say "network: $ip_dev already configured"
    net_ok=1
elif [ "$ip_mode" = static ]; then
    ifconfig "$ip_dev" "$ip_client" netmask "${ip_mask:-255.255.255.0}" up && net_ok=1
    [ -n "$ip_gw" ] && route add default gw "$ip_gw" dev "$ip_dev"
    if [ -n "$ip_dns0$ip_dns1" ]; then
        : >/etc/resolv.conf
        for d in $ip_dns0 $ip_dns1; do echo "nameserver $d" >>/etc/resolv.conf; done
    fi
    say "network: static $ip_client/$(mask_bits "${ip_mask:-255.255.255.0}") on $ip_dev"
elif [ "$ip_mode" = dhcp ]; then
    ifconfig "$ip_dev" up
    # udhcpc: -n exit if no lease (we retry), -x 12 sends the host name; after
    # a lease it stays in the background and renews.
    tries=0
    while [ $tries -lt 30 ]; do
        if udhcpc -i "$ip_dev" -s /etc/udhcpc.script -t 4 -T 2 -A 1 -n ${ip_host:+-x hostname:$ip_host} \
            -p /run/udhcpc.pid; then
            net_ok=1
            break
        fi
        tries=$((tries + 1))
        say "network: no DHCP lease on $ip_dev yet (round $tries)"
    done
else
    say "network: ip=off, $ip_dev left unconfigured"
fi

export NODE_NAME NODE_IP NODE_MAC BOOTORCH_SERVER=@SERVER@
NODE_NAME=$(hostname)
NODE_IP=$(ip -4 -o addr show dev "$ip_dev" 2>/dev/null | awk '{print $4}' | head -n 1)
NODE_IP=${NODE_IP%/*}
NODE_MAC=$(cat "/sys/class/net/$ip_dev/address" 2>/dev/null)

# The profile's mounts ({server} filled in at build time; {name}, {ip}, {mac}
# are per node and come from the running system).
@MOUNTS@

# The profile's commands, in order; a failing command is reported, not fatal.
@COMMANDS@

# dropbear blocks until the kernel's random pool is initialised; a blocking
# read of /dev/random waits for that too (and makes the kernel gather jitter
# entropy), so the ready marker below means SSH answers at once. Bounded: a
# guest without entropy still gets dropbear, just later.
timeout 60 head -c 1 /dev/random >/dev/null 2>&1 || say "warning: kernel random pool not ready after 60 s"

# SSH, with the node's own host key (made once by image build, so it survives reboots).
start_ssh /@HOST_KEY_PATH@
i=0
while ! netstat -ltn 2>/dev/null | grep -q ':22 ' && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done

if [ $net_ok -eq 1 ]; then
    say "ready ($NODE_NAME ${NODE_IP:-no-address} $NODE_MAC, ssh on port 22)"
else
    say "network not configured; ssh is not reachable (console shell follows)"
fi
exec /sbin/init
"""

INITTAB = """\
# busybox init (generated by `bootorch image build`): /init did the setup.
::respawn:/bin/cttyhack /bin/sh -l
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/umount -a -r
"""


def _sh_template(template: str, server: str) -> str:
    """A plan template as a double-quoted shell word: {server} now, per-node fields at boot."""
    s = template.replace("{server}", server)
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    for key, var in (("name", "NODE_NAME"), ("ip", "NODE_IP"), ("mac", "NODE_MAC")):
        s = s.replace("{" + key + "}", "${" + var + "}")
    return f'"{s}"'


def render_init(lp: LoadedPlan, pname: str, prof: Profile, kver: str, modules: list[str]) -> str:
    server = str(lp.model.network.server)
    mounts = "\n".join(
        f"do_mount {_sh_template(m.source, server)} {_sh_template(m.target, server)} "
        f"{shlex.quote(m.type)} {shlex.quote(m.options)}"
        for m in prof.mounts
    ) or ": # no mounts"
    commands = "\n".join(f"run_command {shlex.quote(c)}" for c in prof.commands) or ": # no commands"
    text = INIT_TEMPLATE
    for k, v in {
        "@PROFILE@": pname,
        "@PLAN@": lp.path.name,
        "@KVER@": kver,
        "@SERVER@": server,
        "@MODULES@": " ".join(modules) or "none",
        "@MOUNTS@": mounts,
        "@COMMANDS@": commands,
        "@HOST_KEY_PATH@": HOST_KEY_PATH,
    }.items():
        text = text.replace(k, v)
    return text


# --------------------------------------------------------------------------- assembling the root


@dataclass
class Userland:
    """Everything from packages that every image shares."""

    busybox: bytes
    applets: list[str]  # paths like "bin/sh", relative to /
    dropbear: bytes
    libs: dict[str, bytes]  # image path -> contents (the loader included)
    #: argv prefix running the packaged dropbearkey through the packaged loader
    #: (the build host need not have dropbear's libraries).
    dropbearkey: list[str]


def _find_lib(roots: list[Path], soname: str) -> Path | None:
    for root in roots:
        for d in (f"lib/{MULTIARCH}", f"usr/lib/{MULTIARCH}", "lib", "usr/lib", "lib64"):
            p = root / d / soname
            if p.exists():
                return p
    return None


def _lib_closure(
    cache: DebCache, start_pkg: str, report: ImageReport
) -> list[Path]:
    """Unpacked trees of ``start_pkg``'s library dependencies (transitively, lib* only)."""
    roots: list[Path] = []
    seen: set[str] = set()
    level = _dep_names(cache.field(cache.deb(start_pkg), "Depends"))
    while level:
        level = [n for n in dict.fromkeys(level) if n not in seen and n.startswith(("lib", "zlib"))]
        cache.ensure(level)
        nxt: list[str] = []
        for name in level:
            seen.add(name)
            tree, version = cache.unpacked(name)
            report.packages[name] = version
            roots.append(tree)
            nxt += _dep_names(cache.field(cache.deb(name), "Depends"))
        level = nxt
    return roots


def _userland(cache: DebCache, report: ImageReport) -> Userland:
    bb_tree, bb_ver = cache.unpacked(BUSYBOX_PKG)
    report.packages[BUSYBOX_PKG] = bb_ver
    bb_path = bb_tree / "bin" / "busybox"
    busybox = bb_path.read_bytes()
    # The static busybox runs on the build host and lists its own applets.
    r = _run([str(bb_path), "--list-full"])
    if r.returncode != 0:
        raise ImageError(f"busybox --list-full failed: {r.stderr.strip()}")
    applets = sorted(line.strip() for line in r.stdout.splitlines() if line.strip())

    db_tree, db_ver = cache.unpacked(DROPBEAR_PKG)
    report.packages[DROPBEAR_PKG] = db_ver
    dropbear = (db_tree / "usr" / "sbin" / "dropbear").read_bytes()
    roots = _lib_closure(cache, DROPBEAR_PKG, report)

    # Shared libraries dropbear needs, by reading DT_NEEDED transitively; from
    # the Debian packages, so the build host's own libraries never leak in.
    libs: dict[str, bytes] = {}
    interp, needed = elf_needed(dropbear)
    todo = list(needed)
    if interp is None:
        raise ImageError("dropbear is not dynamically linked as expected (no PT_INTERP)")
    loader_name = Path(interp).name
    loader = _find_lib(roots, loader_name)
    if loader is None:
        raise ImageError(f"the loader {interp} is in none of dropbear's dependencies")
    loader_data = loader.read_bytes()
    libs[f"lib/{MULTIARCH}/{loader_name}"] = loader_data
    seen = {loader_name}
    while todo:
        so = todo.pop(0)
        if so in seen:
            continue
        seen.add(so)
        p = _find_lib(roots, so)
        if p is None:
            raise ImageError(f"shared library {so} (needed by dropbear) is in none of its Debian dependencies")
        data = p.read_bytes()  # follows the soname symlink: the image gets a plain file
        libs[f"lib/{MULTIARCH}/{so}"] = data
        todo += elf_needed(data)[1]

    lib_dirs = sorted({str(_find_lib(roots, so).parent) for so in seen})  # type: ignore[union-attr]
    dropbearkey = [str(loader), "--library-path", ":".join(lib_dirs), str(db_tree / "usr/bin/dropbearkey")]
    return Userland(busybox, applets, dropbear, libs, dropbearkey)


def build_tree(
    lp: LoadedPlan,
    pname: str,
    prof: Profile,
    user: Userland,
    mods: ModuleSet,
    kver: str,
    authorized_key: str | None,
) -> Tree:
    """The RAM-disk root of profile ``pname``."""
    t = Tree()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "mnt", "var", "lib"):
        t.dir(d)
    t.dir("tmp", 0o1777)
    t.dir("root", 0o700)
    t.symlink("var/run", "/run")
    t.symlink("var/tmp", "/tmp")
    # /dev before devtmpfs is mounted: the kernel opens /dev/console for PID 1.
    t.chardev("dev/console", 5, 1, 0o600)
    t.chardev("dev/null", 1, 3, 0o666)

    t.file("bin/busybox", user.busybox, 0o755)
    for app in user.applets:
        if app != "bin/busybox" and not t.exists(app):
            t.symlink(app, "/bin/busybox")
    t.file("usr/sbin/dropbear", user.dropbear, 0o755)
    for path, data in user.libs.items():
        t.file(path, data, 0o755)
    t.symlink("lib64/ld-linux-x86-64.so.2", f"/lib/{MULTIARCH}/ld-linux-x86-64.so.2")

    for _name, rel, data in mods.load_order:
        t.file(f"lib/modules/{kver}/{rel}", data, 0o644)
    t.file("etc/bootorch/modules", "".join(f"{rel}\n" for _n, rel, _d in mods.load_order).encode())

    net = lp.model.network
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    t.file("etc/shadow", b"root:*:0:0:99999:7:::\n", 0o600)
    t.file("etc/group", b"root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    t.file("etc/shells", b"/bin/sh\n/bin/ash\n")
    t.file("etc/nsswitch.conf", b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n")
    t.file("etc/hosts", b"127.0.0.1\tlocalhost\n")
    resolv = "".join(f"nameserver {d}\n" for d in net.dns)
    if net.domain:
        resolv = f"search {net.domain}\n" + resolv
    t.file("etc/resolv.conf", resolv.encode())
    t.file("etc/profile", b'export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1="$(hostname):\\w# "\n')
    t.file("etc/inittab", INITTAB.encode())
    t.file("etc/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755)
    t.file("etc/bootorch/profile", f"{pname}\n".encode())
    t.file("lib/bootorch.sh", LIB_SH.encode())
    t.dir("etc/dropbear", 0o700)  # the node's host key arrives here in its own archive (host_key_archive)
    t.dir("root/.ssh", 0o700)
    if authorized_key:
        t.file("root/.ssh/authorized_keys", (authorized_key + "\n").encode(), 0o600)
    names = [n for n, _r, _d in mods.load_order]
    t.file("init", render_init(lp, pname, prof, kver, names).encode(), 0o755)
    return t


# --------------------------------------------------------------------------- the build


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(boot_root: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to ``boot_root/name`` atomically, skipping identical content."""
    dest = boot_root / name
    if dest.is_symlink():
        dest.unlink()
    elif dest.exists() and dest.stat().st_size == len(data) and dest.read_bytes() == data:
        os.chmod(dest, 0o644)  # the boot servers serve only what others may read
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _source_date_epoch() -> int:
    v = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(v) if v.isdigit() else 0


def build_images(
    lp: LoadedPlan,
    *,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
    refresh: bool = False,
) -> ImageReport:
    """Build every profile's kernel and RAM-disk root, and the BIOS loader, into the boot root."""
    t0 = time.monotonic()
    for pname, prof in sorted(lp.model.profiles.items()):  # before any download
        if not prof.initrd and prof.root in ("ramdisk", "initramfs"):
            raise ImageError(f"profile {pname}: root: {prof.root} needs an initrd: name (e.g. rootfs.gz)")
    cache = DebCache(cache_dir or DEFAULT_CACHE, refresh=refresh, log=log)
    boot_root = lp.boot_root
    report = ImageReport(boot_root=boot_root)
    mtime = _source_date_epoch()
    outputs: dict[str, tuple[str, bytes, str]] = {}  # name -> (role, data, source)

    def put(name: str, role: str, data: bytes, source: str) -> None:
        if name in outputs and outputs[name][1] != data:
            raise ImageError(
                f"two profiles want different {role} files under the same name {name!r}: give them different names"
            )
        outputs[name] = (role, data, source)

    # One apt-get for what we know we need (apt takes seconds to start).
    cache.ensure([KERNEL_META, BUSYBOX_PKG, DROPBEAR_PKG, PXELINUX_PKG, SYSLINUX_PKG])
    # Kernel: the meta package names the ABI package that has the files.
    meta = cache.deb(KERNEL_META)
    report.packages[KERNEL_META] = cache.field(meta, "Version")
    kpkg = next((d for d in _dep_names(cache.field(meta, "Depends")) if d.startswith("linux-image-")), None)
    if kpkg is None:
        raise ImageError(f"{meta.name} depends on no linux-image-* package")
    ktree, kver_pkg = cache.unpacked(kpkg)
    report.packages[kpkg] = kver_pkg
    vmlinuz = sorted((ktree / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise ImageError(f"{kpkg} has no /boot/vmlinuz-*")
    kver = vmlinuz[-1].name.removeprefix("vmlinuz-")
    report.kernel_release = kver
    moddir = ktree / "lib" / "modules" / kver
    kernel = vmlinuz[-1].read_bytes()
    ksource = f"{kpkg}_{kver_pkg}"

    user: Userland | None = None
    authorized_key: str | None = None
    ssh_key = lp.model.readiness.ssh.key
    if ssh_key is not None:
        authorized_key = ensure_user_key(lp.resolve_path(ssh_key), log)
    report.authorized_key = authorized_key

    for pname, prof in sorted(lp.model.profiles.items()):
        put(prof.kernel, "kernel", kernel, ksource)
        if not prof.initrd:
            log(f"image: profile {pname}: no initrd; kernel only")
            continue
        if len(prof.initrd) > 1:
            report.warnings.append(
                f"profile {pname}: built {prof.initrd[0]}; {', '.join(prof.initrd[1:])} are not ours to build"
            )
        if prof.root == "nfs":
            report.warnings.append(
                f"profile {pname}: root: nfs with an initrd: the image runs from RAM and does not switch to the NFS root"
            )
        if authorized_key is None:
            report.warnings.append(
                f"profile {pname}: readiness.ssh.key is not set: the image has no authorized key and nobody can SSH in"
            )
        if user is None:
            user = _userland(cache, report)
        wanted = list(prof.modules)
        for m in prof.mounts:
            wanted += [x for x in FS_MODULES.get(m.type, []) if x not in wanted]
        mods = resolve_modules(moddir, wanted)
        tree = build_tree(lp, pname, prof, user, mods, kver, authorized_key)
        cpio = newc_archive(tree, mtime)
        image = gzip_reproducible(cpio)
        put(prof.initrd[0], "initrd", image, "built")
        report.images[prof.initrd[0]] = {
            "profile": pname,
            "root": prof.root,
            "entries": len(tree.entries),
            "cpio_bytes": len(cpio),
            "modules": [n for n, _r, _d in mods.load_order],
            "builtin_modules": mods.builtin,
            "mounts": [m.target for m in prof.mounts],
            "commands": len(prof.commands),
        }
        log(
            f"image: {prof.initrd[0]} for profile {pname}: {len(tree.entries)} entries, "
            f"{len(cpio) / 2**20:.1f} MiB cpio -> {len(image) / 2**20:.1f} MiB gzip; "
            f"modules {' '.join(report.images[prof.initrd[0]]['modules']) or 'none'}"
            + (f" (built in: {' '.join(mods.builtin)})" if mods.builtin else "")
        )

    # The BIOS loader and the module it loads (pxelinux 6 needs ldlinux.c32 beside it).
    bios = lp.model.boot.loaders.bios
    if bios in PXELINUX_FILES:
        px_tree, px_ver = cache.unpacked(PXELINUX_PKG)
        sl_tree, sl_ver = cache.unpacked(SYSLINUX_PKG)
        report.packages[PXELINUX_PKG] = px_ver
        report.packages[SYSLINUX_PKG] = sl_ver
        put(bios, "loader", (px_tree / PXELINUX_FILES[bios]).read_bytes(), f"{PXELINUX_PKG}_{px_ver}")
        put("ldlinux.c32", "loader", (sl_tree / LDLINUX).read_bytes(), f"{SYSLINUX_PKG}_{sl_ver}")
    else:
        report.warnings.append(f"boot.loaders.bios is {bios!r}: not a pxelinux loader, not placed")

    for name in sorted(outputs):
        role, data, source = outputs[name]
        _write(boot_root, name, data)
        report.files.append(OutputFile(name, role, len(data), _sha256(data), source))

    # The nodes' own host keys, and readiness's trust in exactly those.
    if any(lp.model.profiles[n.profile].host_key == "per-node" for n in lp.nodes):
        from orchestrator.readiness import known_hosts_path, pin_host_keys

        if user is None:
            user = _userland(cache, report)
        report.host_keys = ensure_host_keys(lp, user.dropbearkey, log)
        if pin_host_keys(lp, report.host_keys):
            log(f"image: {len(report.host_keys)} node host key(s) pinned in {known_hosts_path(lp)}")
        report.known_hosts = str(known_hosts_path(lp))
    report.seconds = time.monotonic() - t0
    return report


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``image build PLAN``: the sub-commands of ``bootorch image``."""
    sub = parser.add_subparsers(dest="image_cmd", metavar="COMMAND")
    sub.required = True
    b = sub.add_parser(
        "build",
        help="build the kernel, RAM-disk root and boot loader files of every profile into the boot root",
        description="Build each profile's kernel (Debian's linux-image-amd64) and RAM-disk root "
        "(busybox + dropbear cpio), and place pxelinux.0 and ldlinux.c32, into the plan's boot root. "
        "Same cache and plan give byte-identical files.",
    )
    b.add_argument("plan", help="plan file (YAML)")
    b.add_argument("--cache", type=Path, default=None, help=f"Debian package cache (default {DEFAULT_CACHE})")
    b.add_argument("--refresh", action="store_true", help="download the current package versions again")
    b.add_argument("--json", action="store_true", help="print one JSON object (files, sizes, sha256)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "image_cmd", None) != "build":
        print("usage: bootorch image build PLAN", file=sys.stderr)
        return 2
    try:
        lp = load_plan(args.plan)
    except PlanError as e:
        if args.json:
            print(json.dumps({"ok": False, "plan": args.plan, "problems": [str(p) for p in e.problems]}, indent=2))
        else:
            for p in e.problems:
                print(p, file=sys.stderr)
        return 1

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        report = build_images(lp, cache_dir=args.cache, log=log, refresh=args.refresh)
    except ImageError as e:
        if args.json:
            print(json.dumps({"ok": False, "plan": args.plan, "error": str(e)}, indent=2))
        else:
            print(f"bootorch image build: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"boot root {report.boot_root} (kernel {report.kernel_release}), built in {report.seconds:.1f} s:")
        for f in report.files:
            print(f"  {f.name:<16} {f.size:>10} bytes  sha256 {f.sha256}  ({f.role}, {f.source})")
        if report.host_keys:
            print(f"  host keys: {len(report.host_keys)} nodes, each its own ({lp.state_dir / 'hostkeys'}), "
                  f"pinned in {report.known_hosts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.image", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
