"""Wake-on-LAN sender: the magic packet, etherwake's frame and the UDP form.

Checked with decoders we did not write: scapy parses our frames, and (root,
slow) etherwake's own frames captured on a veth in a test namespace must be
byte-identical to ours.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from orchestrator.power import wol
from tests.conftest import require_root, require_tool

MAC = "52:54:00:77:00:01"
SRC = "02:00:00:00:00:aa"


def test_magic_packet_layout():
    p = wol.magic_packet(MAC)
    assert len(p) == 102
    assert p == b"\xff" * 6 + bytes.fromhex("525400770001") * 16
    assert wol.magic_packet("52-54-00-77-00-01") == p == wol.magic_packet("525400770001")


def test_secureon_password_forms():
    assert wol.magic_packet(MAC, "01:02:03:04:05:06")[102:] == bytes([1, 2, 3, 4, 5, 6])
    assert wol.magic_packet(MAC, "10.1.2.3")[102:] == bytes([10, 1, 2, 3])
    assert wol.magic_packet(MAC, b"\x01\x02\x03\x04")[102:] == b"\x01\x02\x03\x04"
    for bad in ("1.2.3", "01:02:03", b"\x01\x02\x03", "300.1.1.1"):
        with pytest.raises(wol.WolError):
            wol.magic_packet(MAC, bad)


@pytest.mark.parametrize("bad", ["", "52:54:00:77:00", "zz:54:00:77:00:01", "52:54:00:77:00:01:02"])
def test_bad_mac_rejected(bad):
    with pytest.raises(wol.WolError):
        wol.magic_packet(bad)


def test_frame_parsed_by_scapy():
    fr = wol.ether_frame(MAC, SRC)
    e = Ether(fr)
    assert e.dst == MAC and e.src == SRC and e.type == 0x0842
    assert bytes(e.payload) == wol.magic_packet(MAC)
    assert len(fr) == 116
    b = Ether(wol.ether_frame(MAC, SRC, broadcast=True, password="10.1.2.3"))
    assert b.dst == "ff:ff:ff:ff:ff:ff"
    assert bytes(b.payload)[-4:] == bytes([10, 1, 2, 3])


def test_parse_magic_roundtrip_and_rejects():
    assert wol.parse_magic(wol.magic_packet(MAC)) == (MAC, b"")
    assert wol.parse_magic(wol.magic_packet(MAC, "01:02:03:04:05:06")) == (MAC, bytes([1, 2, 3, 4, 5, 6]))
    # Ethernet padding or a longer UDP body after the packet is not a password
    assert wol.parse_magic(wol.magic_packet(MAC) + bytes(20)) == (MAC, b"")
    good = wol.magic_packet(MAC)
    for bad in (good[:-1], b"\xfe" + good[1:], good[:50] + b"\x99" + good[51:], b"\xff" * 102):
        with pytest.raises(wol.WolError):
            wol.parse_magic(bad)
    assert wol.parse_ether_frame(wol.ether_frame(MAC, SRC)) == (MAC, b"")
    assert wol.parse_ether_frame(b"\x00" * 12 + b"\x08\x00" + good) is None  # not 0x0842


def test_udp_form_sent_and_parsed_by_scapy():
    """The UDP form on loopback: scapy decodes the datagram we put on the wire."""
    import socket

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5)
    port = rx.getsockname()[1]
    # send_udp only allows 9 and 7: check that, then send the same payload to our port
    with pytest.raises(wol.WolError):
        wol.send_udp([MAC], broadcast="127.0.0.1", port=port)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.sendto(wol.magic_packet(MAC), ("127.0.0.1", port))
    data, _ = rx.recvfrom(2048)
    pkt = IP(src="127.0.0.1", dst="127.0.0.1") / UDP(sport=1, dport=9) / Raw(data)
    again = IP(bytes(pkt))
    assert again[UDP].dport == 9 and bytes(again[Raw]) == wol.magic_packet(MAC)
    rx.close()
    tx.close()


# ------------------------------------------------------------------ on a real link (root)

CAPTURE = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind((sys.argv[1], 3))
    s.settimeout(0.2)
    print("ready", flush=True)
    end = time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        try:
            fr, addr = s.recvfrom(4096)
        except TimeoutError:
            continue
        if fr[12:14] in (b"\\x08\\x42",) or (fr[12:14] == b"\\x08\\x00" and fr[23] == 17):
            print(fr.hex(), flush=True)
""")


def _capture(lab, ns, dev, seconds, send):
    p = lab.popen(ns, [sys.executable, "-c", CAPTURE, dev, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    send()
    out, _ = p.communicate(timeout=seconds + 10)
    return [bytes.fromhex(line) for line in out.split()]


@pytest.mark.slow
@pytest.mark.root
def test_raw_and_udp_on_a_veth_match_etherwake():
    require_root()
    from orchestrator.lab.netns import NetLab

    with NetLab(prefix="btw") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        link = lab.veth(a, b)
        src = wol.mac_str(bytes.fromhex(lab.run(a, ["cat", f"/sys/class/net/{link.a_dev}/address"], timeout=5,
                                                stdout=subprocess.PIPE, text=True).stdout.strip().replace(":", "")))

        def ours(**kw):
            code = (f"from orchestrator.power import wol; wol.send_raw({link.a_dev!r}, [{MAC!r}], "
                    f"**{kw!r})")
            lab.run(a, [sys.executable, "-c", code], timeout=10, check=True)

        got = _capture(lab, b, link.b_dev, 1.5, ours)
        assert got == [wol.ether_frame(MAC, src)]
        assert Ether(got[0]).type == 0x0842

        # UDP form bound to the device: a limited broadcast out of the veth, parsed by scapy
        def udp():
            code = f"from orchestrator.power import wol; wol.send_udp([{MAC!r}], port=7, interface={link.a_dev!r})"
            lab.run(a, [sys.executable, "-c", code], timeout=10, check=True)

        got = _capture(lab, b, link.b_dev, 1.5, udp)
        assert len(got) == 1
        e = Ether(got[0])
        assert e.dst == "ff:ff:ff:ff:ff:ff" and e[IP].dst == "255.255.255.255" and e[UDP].dport == 7
        assert bytes(e[UDP].payload) == wol.magic_packet(MAC)

        etherwake = require_tool("etherwake")
        for args, kw in (([], {}), (["-b"], {"broadcast": True}), (["-p", "01:02:03:04:05:06"], {"password": "01:02:03:04:05:06"}),
                         (["-p", "10.1.2.3"], {"password": "10.1.2.3"})):
            theirs = _capture(lab, b, link.b_dev, 1.5,
                              lambda: lab.run(a, [etherwake, "-i", link.a_dev, *args, MAC], timeout=10, check=True))
            mine = _capture(lab, b, link.b_dev, 1.5, lambda: ours(**kw))
            assert theirs and theirs == mine, (args, theirs, mine)
