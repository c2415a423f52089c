"""Debian packages by name, ``apt-get download``-ed into a cache once and unpacked once.

The image is built from Debian's packages, not from the build host's files:
``apt-get download`` needs no root, ``dpkg -x`` unpacks without installing, and
a package already in the cache is used as it is, so a warm cache builds
offline and reproduces its output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from functools import cmp_to_key
from pathlib import Path
from typing import Any, Callable, Iterable

from orchestrator.image.errors import ImageError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / "var" / "cache" / "debs"
ARCH = "amd64"


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def dep_names(depends: str) -> list[str]:
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

    def depends(self, name: str) -> list[str]:
        """The package names package ``name`` depends on (:func:`dep_names` of its Depends field)."""
        return dep_names(self.field(self.deb(name), "Depends"))

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
