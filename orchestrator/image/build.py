"""The build: every profile's kernel, image and NFS root, and the boot loaders, into the plan's boot root.

:func:`build_images` fetches the Debian packages it needs into the cache
(:mod:`~orchestrator.image.debs`; one ``apt-get download`` for all of them),
then for every profile

- puts the kernel under the profile's ``kernel`` name;
- builds the image's root (:func:`~orchestrator.image.rootfs.build_tree`), writes
  it as a newc cpio and gzips it reproducibly under the profile's first
  ``initrd`` name;
- for a ``root: nfs`` profile, adds the NFS client modules (NFSv4, or v3 when
  ``nfsroot``'s options ask) to that image, whose ``/init`` mounts the root and
  switches into it, and writes the same tree, without device nodes or private
  keys, as a directory at ``plan.nfs_export(profile)`` for the NFS server
  (:mod:`~orchestrator.image.nfsroot`; reported as the image's ``nfs_export``);

places the boot loaders the plan names when we know them -- ``boot.loaders.bios``
``pxelinux.0`` / ``lpxelinux.0`` with ``ldlinux.c32``; ``boot.loaders.uefi`` and
``boot.loaders.uefi_http`` from :data:`EFI_LOADERS` (``syslinux.efi`` with the
``ldlinux.e64`` it loads from its own directory, ``ipxe.efi``, ``snponly.efi``),
all at the top of the boot root -- writes every file atomically (0644, skipped
when unchanged), and finally makes the nodes' own host keys
(:func:`~orchestrator.image.keys.ensure_host_keys`) and pins them into
readiness's known_hosts (:func:`orchestrator.hostkeys.pin_host_keys`). A loader
name we do not know is a warning, and the site places that file itself.

Two profiles may share a file name only when they want the same bytes there.
``SOURCE_DATE_EPOCH`` (default 0) is the cpio's one mtime, and the NFS root's.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from orchestrator.hostkeys import pin_host_keys
from orchestrator.image.cpio import Tree, gzip_reproducible, newc_archive
from orchestrator.image.debs import DEFAULT_CACHE, DebCache, dep_names
from orchestrator.image.errors import ImageError
from orchestrator.image.keys import ensure_host_keys, ensure_user_key
from orchestrator.image.modules import FS_MODULES, resolve_modules
from orchestrator.image.nfsroot import export_view, nfsroot_fstype, write_export
from orchestrator.image.rootfs import build_tree
from orchestrator.image.userland import BUSYBOX_PKG, DROPBEAR_PKG, Userland, load_userland
from orchestrator.plan import LoadedPlan
from orchestrator.readiness import known_hosts_path
from orchestrator.render import write_atomic

KERNEL_META = "linux-image-amd64"
PXELINUX_PKG = "pxelinux"
SYSLINUX_PKG = "syslinux-common"
PXELINUX_FILES = {
    # loader name in the boot root -> path inside the pxelinux package
    "pxelinux.0": "usr/lib/PXELINUX/pxelinux.0",
    "lpxelinux.0": "usr/lib/PXELINUX/lpxelinux.0",
}
LDLINUX = "usr/lib/syslinux/modules/bios/ldlinux.c32"
#: UEFI loaders we can place (``boot.loaders.uefi`` and ``boot.loaders.uefi_http``): loader name -> the files it
#: takes, each (name in the boot root, package, path inside it). syslinux.efi loads ldlinux.e64 from its own
#: directory; Debian ships that in syslinux-common, beside the BIOS ldlinux.c32.
EFI_LOADERS: dict[str, list[tuple[str, str, str]]] = {
    "syslinux.efi": [
        ("syslinux.efi", "syslinux-efi", "usr/lib/SYSLINUX.EFI/efi64/syslinux.efi"),
        ("ldlinux.e64", SYSLINUX_PKG, "usr/lib/syslinux/modules/efi64/ldlinux.e64"),
    ],
    "ipxe.efi": [("ipxe.efi", "ipxe", "usr/lib/ipxe/ipxe.efi")],
    "snponly.efi": [("snponly.efi", "ipxe", "usr/lib/ipxe/snponly.efi")],
}


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class OutputFile:
    name: str  # relative to the boot root
    role: str  # kernel | initrd | loader (syslinux.efi's ldlinux.e64 and pxelinux's ldlinux.c32 too)
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
        version used), ``images`` (per image: ``profile``, ``root``,
        ``entries``, ``cpio_bytes``, ``modules`` in load order,
        ``builtin_modules``, ``mounts``, ``commands``; for ``root: nfs``
        also ``nfs_export``, the directory holding the NFS root, and
        ``nfs_export_changed``, false when it already held that tree), ``authorized_key``,
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
    write_atomic(dest, data, 0o644)
    return dest


def _package_file(tree: Path, rel: str) -> bytes:
    """The bytes of ``rel`` in an unpacked package ``tree``, following symlinks inside the tree.

    Packages link into their own absolute paths (ipxe's ``usr/lib/ipxe/ipxe.efi``
    is a link to ``/boot/ipxe.efi``): such a link names a file of the package, not
    of the build host.
    """
    parts = [p for p in rel.split("/") if p]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        p = tree.joinpath(*done, part)
        if p.is_symlink():
            hops += 1
            if hops > 40:
                raise ImageError(f"{rel}: too many symlinks in {tree.name}")
            target = os.readlink(p)
            if target.startswith("/"):
                done = []
            parts = [x for x in target.split("/") if x] + parts
            continue
        done.append(part)
    path = tree.joinpath(*done)
    if not path.is_file():
        raise ImageError(f"{tree.name} has no file {rel}")
    return path.read_bytes()


def _source_date_epoch() -> int:
    v = os.environ.get("SOURCE_DATE_EPOCH", "")
    return int(v) if v.isdigit() else 0


def build_images(
    plan: LoadedPlan,
    *,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
    refresh: bool = False,
) -> ImageReport:
    """Build every profile's kernel, image and NFS root, and the boot loaders, into the boot root."""
    t0 = time.monotonic()
    for pname, prof in sorted(plan.model.profiles.items()):  # before any download
        if not prof.initrd and prof.root in ("ramdisk", "initramfs"):
            raise ImageError(f"profile {pname}: root: {prof.root} needs an initrd: name (e.g. rootfs.gz)")
        if not prof.initrd and prof.root == "nfs":
            raise ImageError(
                f"profile {pname}: root: nfs needs an initrd: name (e.g. nfsinit.gz): Debian's kernel has its NFS "
                "client as a module and no IP autoconfiguration, so our image mounts the NFS root"
            )
    cache = DebCache(cache_dir or DEFAULT_CACHE, refresh=refresh, log=log)
    boot_root = plan.boot_root
    report = ImageReport(boot_root=boot_root)
    mtime = _source_date_epoch()
    outputs: dict[str, tuple[str, bytes, str]] = {}  # name -> (role, data, source)
    exports: list[tuple[str, str, Tree]] = []  # (profile, its image's name, its NFS root) for root: nfs

    def put(name: str, role: str, data: bytes, source: str) -> None:
        if name in outputs and outputs[name][1] != data:
            raise ImageError(
                f"two profiles want different {role} files under the same name {name!r}: give them different names"
            )
        outputs[name] = (role, data, source)

    # One apt-get for what we know we need (apt takes seconds to start).
    loaders = plan.model.boot.loaders
    efi_pkgs = [pkg for n in (loaders.uefi, loaders.uefi_http) for _f, pkg, _p in EFI_LOADERS.get(n, [])]
    cache.ensure([KERNEL_META, BUSYBOX_PKG, DROPBEAR_PKG, PXELINUX_PKG, SYSLINUX_PKG, *efi_pkgs])
    # Kernel: the meta package names the ABI package that has the files.
    meta = cache.deb(KERNEL_META)
    report.packages[KERNEL_META] = cache.field(meta, "Version")
    kpkg = next((d for d in dep_names(cache.field(meta, "Depends")) if d.startswith("linux-image-")), None)
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
    ssh_key = plan.model.readiness.ssh.key
    if ssh_key is not None:
        authorized_key = ensure_user_key(plan.resolve_path(ssh_key), log)
    report.authorized_key = authorized_key

    for pname, prof in sorted(plan.model.profiles.items()):
        put(prof.kernel, "kernel", kernel, ksource)
        if not prof.initrd:
            log(f"image: profile {pname}: no initrd; kernel only")
            continue
        if len(prof.initrd) > 1:
            report.warnings.append(
                f"profile {pname}: built {prof.initrd[0]}; {', '.join(prof.initrd[1:])} are not ours to build"
            )
        if authorized_key is None:
            report.warnings.append(
                f"profile {pname}: readiness.ssh.key is not set: the image has no authorized key and nobody can SSH in"
            )
        if user is None:
            user = load_userland(cache, report.packages)
        wanted = list(prof.modules)
        fs_types = [m.type for m in prof.mounts]
        if prof.root == "nfs":
            assert prof.nfsroot is not None  # the plan model requires it
            fs_types.append(nfsroot_fstype(prof.nfsroot))
        for fs in fs_types:
            wanted += [x for x in FS_MODULES.get(fs, []) if x not in wanted]
        mods = resolve_modules(moddir, wanted)
        tree = build_tree(plan, pname, prof, user, mods, kver, authorized_key)
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
        if prof.root == "nfs":
            exports.append((pname, prof.initrd[0], export_view(tree)))

    # The BIOS loader and the module it loads (pxelinux 6 needs ldlinux.c32 beside it).
    bios = loaders.bios
    if bios in PXELINUX_FILES:
        px_tree, px_ver = cache.unpacked(PXELINUX_PKG)
        sl_tree, sl_ver = cache.unpacked(SYSLINUX_PKG)
        report.packages[PXELINUX_PKG] = px_ver
        report.packages[SYSLINUX_PKG] = sl_ver
        put(bios, "loader", _package_file(px_tree, PXELINUX_FILES[bios]), f"{PXELINUX_PKG}_{px_ver}")
        put("ldlinux.c32", "loader", _package_file(sl_tree, LDLINUX), f"{SYSLINUX_PKG}_{sl_ver}")
    else:
        report.warnings.append(f"boot.loaders.bios is {bios!r}: not a pxelinux loader, not placed")
    # The UEFI loaders, each with what it loads from its own directory (syslinux.efi: ldlinux.e64).
    for key, name in (("uefi", loaders.uefi), ("uefi_http", loaders.uefi_http)):
        if name not in EFI_LOADERS:
            report.warnings.append(f"boot.loaders.{key} is {name!r}: not a loader we know ({', '.join(EFI_LOADERS)}), not placed")
            continue
        for fname, pkg, rel in EFI_LOADERS[name]:
            ptree, ver = cache.unpacked(pkg)
            report.packages[pkg] = ver
            put(fname, "loader", _package_file(ptree, rel), f"{pkg}_{ver}")

    for name in sorted(outputs):
        role, data, source = outputs[name]
        _write(boot_root, name, data)
        report.files.append(OutputFile(name, role, len(data), _sha256(data), source))

    # The NFS roots, once everything else is known to build.
    for pname, initrd, view in exports:
        export = plan.nfs_export(pname)
        changed = write_export(view, export, mtime)
        report.images[initrd]["nfs_export"] = str(export)
        report.images[initrd]["nfs_export_changed"] = changed
        nfsroot = (plan.model.profiles[pname].nfsroot or "").replace("{server}", str(plan.model.network.server))
        log(f"image: NFS root of profile {pname}: {export} ({'written' if changed else 'unchanged'}); "
            f"the image mounts nfsroot={nfsroot}" + ("; a server exporting it must export it again" if changed else ""))
        if os.geteuid() != 0:
            report.warnings.append(
                f"profile {pname}: the NFS root {export} is owned by uid {os.geteuid()}, not root: "
                "run image build as root for a root-owned export"
            )

    # The nodes' own host keys, and readiness's trust in exactly those.
    if any(plan.model.profiles[n.profile].host_key == "per-node" for n in plan.nodes):
        if user is None:
            user = load_userland(cache, report.packages)
        report.host_keys = ensure_host_keys(plan, user.dropbearkey, log)
        if pin_host_keys(plan, report.host_keys):
            log(f"image: {len(report.host_keys)} node host key(s) pinned in {known_hosts_path(plan)}")
        report.known_hosts = str(known_hosts_path(plan))
    report.seconds = time.monotonic() - t0
    return report
