"""Just enough of ELF64 (little-endian) to read what the image needs: a program's
interpreter and DT_NEEDED shared libraries, and a kernel module's ``.modinfo``.

It reads section headers only (``.interp``, ``.dynamic`` and its string table,
``.modinfo``); a stripped binary keeps them.
"""

from __future__ import annotations

import struct

from orchestrator.image.errors import ImageError

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
