"""Kernel-module resolution (orchestrator.image.modules), on fake modules: minimal ELF files with a ``.modinfo``."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from orchestrator.image import ImageError
from orchestrator.image.modules import resolve_modules


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
