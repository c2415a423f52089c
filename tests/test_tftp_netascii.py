"""Netascii (``orchestrator/protocols/tftp/netascii.py``): the conversion, and transfers whose expansions straddle blocks."""

from __future__ import annotations

import random

import pytest

from orchestrator.bootserver.files import MemoryFile
from orchestrator.protocols import tftp as p
from tests.tftp_link import Link


# -- netascii ----------------------------------------------------------------------------


def test_netascii_encode_decode():
    assert p.netascii_encode(b"a\nb\rc\r\n") == b"a\r\nb\r\x00c\r\x00\r\n"
    assert p.netascii_decode(p.netascii_encode(b"a\nb\rc\r\n")) == b"a\nb\rc\r\n"


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("blksize", [8, 9, 512])
def test_netascii_transfer_with_boundary_splits(seed, blksize):
    rng = random.Random(seed)
    # Lots of CR and LF so two-byte expansions straddle block boundaries.
    text = bytes(rng.choice(b"ab\r\n") for _ in range(rng.randrange(0, 3000)))
    link = Link(text, {"tsize": 0, "blksize": blksize, "windowsize": 3}, mode="netascii", drop=lambda d, pkt: rng.random() < 0.05)
    link.run()
    expected = p.netascii_encode(text)
    assert bytes(link.client.data) == expected
    assert link.client.tsize == (len(expected) or None)  # tsize is the converted size
    assert p.netascii_decode(bytes(link.client.data)) == text


def test_netascii_split_at_exact_boundary():
    # blksize 8: "abcdefg\n" -> "abcdefg\r" | "\n..." (LF's CR ends block 1).
    link = Link(b"abcdefg\nxy", {"blksize": 8}, mode="netascii")
    link.run()
    payloads = [pkt[4:] for d, pkt in link.log if d == "s2c" and pkt[:2] == b"\x00\x03"]
    assert payloads == [b"abcdefg\r", b"\nxy"]


def test_netascii_source_refuses_reads_off_boundaries():
    src = p.NetasciiSource(MemoryFile("f", b"a\n" * 100), 8)
    assert src.size == 300
    assert src.pread(0, 16) == b"a\r\na\r\na\r\na\r\na\r\na"
    with pytest.raises(p.LocalProtocolError):
        src.pread(3, 8)
