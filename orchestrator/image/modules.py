"""Kernel modules for the image: the ones a profile asks for, with their dependencies, in load order.

Debian's kernel package carries no ``modules.dep`` (its postinst runs depmod),
so dependencies come from each module's own ``.modinfo``: ``depends=`` and the
``pre:`` part of ``softdep=``. A ``modules.dep`` is used when present. Modules
built into the kernel (``modules.builtin``) need nothing and are reported.
Compressed modules are decompressed here: the image loads them with busybox
``insmod``, which takes plain ELF only.
"""

from __future__ import annotations

import gzip
import lzma
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from orchestrator.image.elf import modinfo
from orchestrator.image.errors import ImageError

#: A NIC driver that binds to nothing without its bus driver: QEMU's virtio NIC
#: is a PCI device, and Debian builds virtio_pci as a module.
COMPANION_MODULES = {"virtio_net": ["virtio_pci"]}
#: Mount types whose kernel modules the image adds when a profile mounts them.
FS_MODULES = {"nfs": ["nfs", "nfsv3"], "nfs4": ["nfs", "nfsv4"]}


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
    """The modules ``wanted`` needs from ``moddir`` (``/lib/modules/<release>``), dependencies first."""
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
