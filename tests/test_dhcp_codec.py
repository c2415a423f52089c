"""DHCP codec: checked against scapy, an independent implementation, both ways."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP

from orchestrator.protocols.dhcp import (
    BOOTREPLY,
    MAGIC_COOKIE,
    MalformedPacket,
    MessageType,
    Opt,
    Packet,
    encode,
    encode_suboptions,
    ip_int,
    mac_bytes,
    parse,
    sanitize_hostname,
)

MAC = "52:54:00:12:34:56"
PXE_VC = b"PXEClient:Arch:00000:UNDI:002001"


def scapy_request(*options, **bootp) -> bytes:
    fields = dict(op=1, chaddr=mac_bytes(MAC) + b"\x00" * 10, xid=0x1234ABCD, flags=0x8000)
    fields.update(bootp)
    return bytes(BOOTP(**fields) / DHCP(options=[*options, "end"]))


def test_parse_pxe_discover_built_by_scapy():
    data = scapy_request(
        ("message-type", "discover"),
        ("vendor_class_id", PXE_VC),
        (93, b"\x00\x00"),
        (94, b"\x01\x02\x01"),
        (97, b"\x00" + bytes(range(16))),
        ("max_dhcp_size", 1464),
        ("param_req_list", [1, 3, 43, 60, 66, 67]),
    )
    p = parse(data)
    assert p.msg_type == MessageType.DISCOVER and p.mac == MAC and p.xid == 0x1234ABCD
    assert p.is_pxe and not p.is_ipxe and p.client_arch == [0] and p.broadcast
    assert p.vendor_class == PXE_VC.decode() and p.max_message_size == 1464
    assert p.options[Opt.CLIENT_UUID] == b"\x00" + bytes(range(16))


def test_ipxe_user_class_raw_and_rfc3004():
    assert parse(scapy_request(("message-type", "discover"), (77, b"iPXE"))).is_ipxe
    assert parse(scapy_request(("message-type", "discover"), (77, b"\x04iPXE"))).is_ipxe
    assert not parse(scapy_request(("message-type", "discover"), (77, b"iPXEx"))).is_ipxe


def test_os_client_is_not_pxe():
    p = parse(scapy_request(("message-type", "request"), ("vendor_class_id", b"udhcp 1.36.1")))
    assert not p.is_pxe and p.msg_type == MessageType.REQUEST


def test_encode_decoded_by_scapy():
    p = Packet(
        op=BOOTREPLY, xid=77, flags=0x8000, yiaddr=ip_int("10.0.0.5"), siaddr=ip_int("10.0.0.1"),
        chaddr=mac_bytes(MAC), file=b"pxelinux.0",
        options={
            Opt.MESSAGE_TYPE: bytes((MessageType.OFFER,)),
            Opt.SERVER_ID: bytes([10, 0, 0, 1]),
            Opt.LEASE_TIME: (3600).to_bytes(4, "big"),
            Opt.VENDOR_CLASS: b"PXEClient",
            Opt.VENDOR_SPECIFIC: encode_suboptions({6: b"\x08"}),
        },
    )
    data = encode(p)
    assert len(data) >= 300
    s = BOOTP(data)
    assert s.op == 2 and s.xid == 77 and s.yiaddr == "10.0.0.5" and s.siaddr == "10.0.0.1"
    assert s.file.rstrip(b"\x00") == b"pxelinux.0" and s.chaddr[:6] == mac_bytes(MAC)
    opts = {o[0]: o[1:] for o in s[DHCP].options if isinstance(o, tuple)}
    assert opts["message-type"] == (2,) and opts["server_id"] == ("10.0.0.1",)
    assert opts["lease_time"] == (3600,) and opts["vendor_class_id"] == (b"PXEClient",)
    assert opts["vendor_specific"] == (b"\x06\x01\x08\xff",)


def test_long_option_split_and_concatenated():
    """RFC 3396: a value over 255 bytes is sent as several instances and read back as one."""
    value = bytes(range(256)) * 2
    p = Packet(options={Opt.MESSAGE_TYPE: b"\x01", 224: value})
    data = encode(p)
    assert parse(data).options[224] == value


def test_option_overload_file_and_sname():
    header = bytearray(scapy_request(("message-type", "discover"), (52, b"\x03")))
    # Options continue in file (offset 108) then sname (offset 44), RFC 2131 §4.1.
    header[108:108 + 8] = bytes([60, 4]) + b"PXEC" + bytes([255, 0])
    header[44:44 + 8] = bytes([12, 4]) + b"node" + bytes([255, 0])
    p = parse(bytes(header))
    assert p.options[Opt.VENDOR_CLASS] == b"PXEC" and p.options[Opt.HOSTNAME] == b"node"
    assert p.file == b"" and p.sname == b""


def raw(options: bytes) -> bytes:
    """A BOOTREQUEST header for MAC, the cookie, and ``options`` as given (no checks)."""
    base = bytearray(236)
    base[0], base[1], base[2] = 1, 1, 6
    base[28:34] = mac_bytes(MAC)
    return bytes(base) + MAGIC_COOKIE + options


MALFORMED = {
    "empty": b"",
    "truncated-header": raw(b"\x35\x01\x01\xff")[:200],
    "header-only": raw(b"")[:239],
    "bad-cookie": raw(b"\x35\x01\x01\xff")[:236] + b"\x63\x82\x53\x64\x35\x01\x01\xff",
    "option-past-end": raw(b"\x35\x01\x01\x0c\x20abc"),
    "length-byte-missing": raw(b"\x35\x01\x01\x0c"),
    "overload-0": raw(b"\x35\x01\x01\x34\x01\x00\xff"),
    "overload-4": raw(b"\x35\x01\x01\x34\x01\x04\xff"),
    "overload-255": raw(b"\x35\x01\x01\x34\x01\xff\xff"),
    "overload-long": raw(b"\x35\x01\x01\x34\x02\x01\x01\xff"),
    "client-id-129": raw(b"\x35\x01\x01" + b"\x3d\xff" + b"\x01" * 255 + b"\xff"),
    "bad-op": bytes([9]) + raw(b"\x35\x01\x01\xff")[1:],
    "bad-hlen": raw(b"\x35\x01\x01\xff")[:2] + bytes([17]) + raw(b"\x35\x01\x01\xff")[3:],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_packets_raise_malformed(name):
    with pytest.raises(MalformedPacket):
        parse(MALFORMED[name])


def test_overload_inside_file_is_malformed():
    data = bytearray(raw(b"\x35\x01\x01\x34\x01\x01\xff"))
    data[108:111] = bytes([52, 1, 1])
    with pytest.raises(MalformedPacket, match="inside file"):
        parse(bytes(data))


def test_client_id_of_128_is_fine():
    p = parse(raw(b"\x35\x01\x01" + b"\x3d\x80" + b"\x01" * 128 + b"\xff"))
    assert len(p.options[Opt.CLIENT_ID]) == 128


def test_max_message_size_below_576_is_clamped():
    p = parse(raw(b"\x35\x01\x01\x39\x02" + struct.pack("!H", 100) + b"\xff"))
    assert p.max_message_size == 576


@pytest.mark.parametrize(
    "raw_name,expected",
    [
        (b"node01", "node01"),
        (b"Node-7.example.org", "node-7"),
        (b"x) via eth9", "xviaeth9"),
        (b"$(reboot)", "reboot"),
        (b"; rm -rf /", "rm-rf"),
        (b"...", None),
        (b"", None),
        (b"\x00\x00", None),
        (b"a" * 64, None),
        (b"a" * 63, "a" * 63),
        (b"!@#$%", None),
        (b"caf\xc3\xa9", "caf"),
    ],
)
def test_sanitize_hostname(raw_name, expected):
    assert sanitize_hostname(raw_name) == expected


option_values = st.dictionaries(
    st.integers(1, 254).filter(lambda c: c not in (Opt.OVERLOAD, Opt.MESSAGE_TYPE, Opt.CLIENT_ID)),
    st.binary(min_size=0, max_size=300),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(option_values, st.integers(0, 2**32 - 1), st.binary(min_size=6, max_size=6))
def test_encode_parse_round_trip(opts, xid, mac):
    p = Packet(xid=xid, chaddr=mac + b"\x00" * 10, options={Opt.MESSAGE_TYPE: b"\x03", **opts})
    q = parse(encode(p))
    assert q.xid == xid and q.chaddr[:6] == mac
    assert q.options == {Opt.MESSAGE_TYPE: b"\x03", **opts}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(224, 254), st.binary(min_size=1, max_size=200), max_size=6))
def test_scapy_reads_what_we_encode(opts):
    p = Packet(op=BOOTREPLY, xid=5, options={Opt.MESSAGE_TYPE: b"\x05", **opts})
    s = BOOTP(encode(p))
    got = {o[0]: o[1] for o in s[DHCP].options if isinstance(o, tuple) and isinstance(o[0], int)}
    assert got == opts


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=600))
def test_parse_never_raises_anything_but_malformed(data):
    try:
        parse(data)
    except MalformedPacket:
        pass
