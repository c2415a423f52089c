"""The ELF reader (orchestrator.image.elf), against ``ldd``."""

from __future__ import annotations

import subprocess
from pathlib import Path

from orchestrator.image.elf import elf_needed
from tests.conftest import require_tool


def test_elf_needed_matches_ldd() -> None:
    ldd = require_tool("ldd")
    target = "/bin/ls"
    interp, needed = elf_needed(Path(target).read_bytes())
    assert interp == "/lib64/ld-linux-x86-64.so.2"
    out = subprocess.run([ldd, target], capture_output=True, text=True, timeout=30).stdout
    ldd_names = {line.split()[0] for line in out.splitlines() if "=>" in line}
    assert "libc.so.6" in needed
    assert set(needed) <= ldd_names
