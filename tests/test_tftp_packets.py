"""The TFTP codec (``orchestrator/protocols/tftp/packets.py``): request parsing and round trips."""

from __future__ import annotations

import pytest

from orchestrator.protocols import tftp as p


# -- request parsing ---------------------------------------------------------------------


def test_parse_well_formed_request():
    req = p.parse_packet(b"\x00\x01pxelinux.0\x00OcTeT\x00tsize\x000\x00")
    assert req == p.ReadRequest("pxelinux.0", "octet", {"tsize": "0"})
    assert p.parse_packet(p.encode_request("a/b", "netascii", {"blksize": 8})) == p.ReadRequest("a/b", "netascii", {"blksize": "8"})
    assert isinstance(p.parse_packet(p.encode_request("x", write=True)), p.WriteRequest)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x01",  # nothing at all
        b"\x00\x01file",  # no NUL anywhere
        b"\x00\x01file\x00octet",  # mode not NUL-terminated
        b"\x00\x01file\x00",  # missing mode
        b"\x00\x01\x00octet\x00",  # empty name
        b"\x00\x01f\x00oct\xffet\x00",  # non-ASCII mode
    ],
)
def test_malformed_requests(raw):
    with pytest.raises(p.RemoteProtocolError) as e:
        p.parse_packet(raw)
    assert e.value.error_code == p.ERR_ILLEGAL_OPERATION


@pytest.mark.parametrize(
    "raw, options",
    [
        (b"\x00\x01f\x00octet\x00blksize\x00", {}),  # dangling option name
        (b"\x00\x01f\x00octet\x00blksize\x001024", {}),  # value without NUL
        (b"\x00\x01f\x00octet\x00tsize\x000\x00blksize\x00", {"tsize": "0"}),
        (b"\x00\x01f\x00octet\x00\x00\x00", {}),  # empty name, empty value
        (b"\x00\x01f\x00octet\x00\xff\xfe\x001\x00", {}),  # non-ASCII option name
        (b"\x00\x01f\x00octet\x00a\x00b\x00c\x00", {"a": "b"}),
    ],
)
def test_odd_option_tokens_are_ignored_not_fatal(raw, options):
    req = p.parse_packet(raw)
    assert req.filename == "f" and req.mode == "octet"
    assert dict(req.options) == options


def test_codec_round_trips():
    assert p.parse_packet(p.encode_ack(70000)) == p.Ack(70000 & 0xFFFF)
    assert p.parse_packet(p.encode_data(3, b"xyz")) == p.Data(3, b"xyz")
    assert p.parse_packet(p.encode_error(1)) == p.Error(1, "File not found")
    assert p.parse_packet(p.encode_error(0, "a\x00b")) == p.Error(0, "a b")
    assert p.parse_packet(p.encode_oack({"tsize": "9"})) == p.OptionAck({"tsize": "9"})
    assert p.parse_packet(b"\x00\x04\x00\x07junk") == p.Ack(7)  # lenient about padding
    with pytest.raises(p.RemoteProtocolError):
        p.parse_packet(b"\x00\x07")
