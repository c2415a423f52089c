"""The programs every image shares, from Debian's packages: static busybox (with
its applet list) and dropbear with the shared libraries its ELF headers ask for.

The libraries are found by reading DT_NEEDED transitively in the unpacked
trees of dropbear's ``lib*`` dependencies, so the build host's own libraries
never leak into the image. The packaged ``dropbearkey`` is run through the
packaged loader (:attr:`Userland.dropbearkey`), so the build host needs no
dropbear either.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from orchestrator.image.debs import DebCache
from orchestrator.image.elf import elf_needed
from orchestrator.image.errors import ImageError

BUSYBOX_PKG = "busybox-static"
DROPBEAR_PKG = "dropbear-bin"
MULTIARCH = "x86_64-linux-gnu"


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


def _lib_closure(cache: DebCache, start_pkg: str, packages: dict[str, str]) -> list[Path]:
    """Unpacked trees of ``start_pkg``'s library dependencies (transitively, lib* only); their versions into ``packages``."""
    roots: list[Path] = []
    seen: set[str] = set()
    level = cache.depends(start_pkg)
    while level:
        level = [n for n in dict.fromkeys(level) if n not in seen and n.startswith(("lib", "zlib"))]
        cache.ensure(level)
        nxt: list[str] = []
        for name in level:
            seen.add(name)
            tree, version = cache.unpacked(name)
            packages[name] = version
            roots.append(tree)
            nxt += cache.depends(name)
        level = nxt
    return roots


def load_userland(cache: DebCache, packages: dict[str, str]) -> Userland:
    """busybox, dropbear and its libraries from the cached packages; each package's version into ``packages``."""
    bb_tree, bb_ver = cache.unpacked(BUSYBOX_PKG)
    packages[BUSYBOX_PKG] = bb_ver
    bb_path = bb_tree / "bin" / "busybox"
    busybox = bb_path.read_bytes()
    # The static busybox runs on the build host and lists its own applets.
    r = subprocess.run([str(bb_path), "--list-full"], capture_output=True, text=True)
    if r.returncode != 0:
        raise ImageError(f"busybox --list-full failed: {r.stderr.strip()}")
    applets = sorted(line.strip() for line in r.stdout.splitlines() if line.strip())

    db_tree, db_ver = cache.unpacked(DROPBEAR_PKG)
    packages[DROPBEAR_PKG] = db_ver
    dropbear = (db_tree / "usr" / "sbin" / "dropbear").read_bytes()
    roots = _lib_closure(cache, DROPBEAR_PKG, packages)

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
