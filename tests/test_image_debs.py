"""The Debian package cache (orchestrator.image.debs): Depends fields, and apt-get through a fake ``apt-get``."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from orchestrator.image.debs import DebCache, dep_names


def test_depends_field() -> None:
    assert dep_names("libc6 (>= 2.34), libcrypt1 (>= 1:4.1.0), zlib1g | libz-ng, foo:any") == [
        "libc6", "libcrypt1", "zlib1g", "foo"]
    assert dep_names("linux-image-6.1.0-56-amd64 (= 6.1.192-2)") == ["linux-image-6.1.0-56-amd64"]


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
