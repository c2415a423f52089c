"""Confinement and read-only rules, through the real server on 127.0.0.1.

Each form below is a path escape some TFTP server shipped (tftp-hpa, atftpd,
dnsmasq, tftpy, fbtftp). Every refusal must be an ERROR packet -- never a DATA
with the secret -- and must show up as a FILE_FAILED event.
"""

from __future__ import annotations

import os
import socket
from functools import partial

import pytest
import trio

from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.tftp import TftpCounters, serve_tftp, tftp_get
from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols import tftp as p

SECRET = b"TOP SECRET outside the root\n"


@pytest.fixture
def tree(tmp_path):
    """tmp/srv/tftp is the root; tmp/srv/tftp-private and tmp/outside hold secrets."""
    root = tmp_path / "srv" / "tftp"
    private = tmp_path / "srv" / "tftp-private"
    outside = tmp_path / "outside"
    for d in (root / "pxelinux.cfg", private, outside):
        d.mkdir(parents=True)
    (root / "pxelinux.0").write_bytes(b"LOADER" * 100)
    (root / "pxelinux.cfg" / "default").write_bytes(b"DEFAULT linux\n")
    (private / "f").write_bytes(SECRET)
    (outside / "secret").write_bytes(SECRET)
    (root / "out-link").symlink_to(outside / "secret")
    (root / "out-dir").symlink_to(outside)
    (root / "sib").symlink_to("../tftp-private")
    (root / "passwd-link").symlink_to("/etc/passwd")
    (root / "in-link").symlink_to("pxelinux.0")
    (root / "cfg-link").symlink_to("pxelinux.cfg")
    os.mkfifo(root / "fifo")
    return root


@pytest.fixture
async def server(nursery, tree):
    send, recv = trio.open_memory_channel[BootEvent](1000)
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, BootFiles(tree), "127.0.0.1", 0, events=send, counters=counters))
    return addr, recv, counters


async def raw_request(addr, payload: bytes) -> p.Packet:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        await sock.sendto(payload, addr)
        data, _ = await sock.recvfrom(65536)
        return p.parse_packet(data)


async def failed_event(recv) -> BootEvent:
    while True:
        ev = await recv.receive()
        if ev.kind is EventKind.FILE_FAILED:
            return ev
        assert ev.kind is EventKind.FILE_REQUEST, f"unexpected {ev}"


@pytest.mark.parametrize(
    "name, code",
    [
        ("..", p.ERR_ACCESS_VIOLATION),
        ("../tftp-private/f", p.ERR_ACCESS_VIOLATION),
        ("../../outside/secret", p.ERR_ACCESS_VIOLATION),
        ("a/../../b", p.ERR_ACCESS_VIOLATION),
        ("pxelinux.cfg/../../tftp-private/f", p.ERR_ACCESS_VIOLATION),
        ("/../outside/secret", p.ERR_ACCESS_VIOLATION),
        ("./../outside/secret", p.ERR_ACCESS_VIOLATION),
        ("..\\..\\outside\\secret", p.ERR_ACCESS_VIOLATION),
        ("pxelinux.cfg\\default", p.ERR_ACCESS_VIOLATION),
        ("out-link", p.ERR_ACCESS_VIOLATION),  # symlink to a file outside
        ("out-dir/secret", p.ERR_ACCESS_VIOLATION),  # through a symlinked directory
        ("sib/f", p.ERR_ACCESS_VIOLATION),  # sibling-prefix dir: tftp vs tftp-private
        ("passwd-link", p.ERR_ACCESS_VIOLATION),
        ("/etc/passwd", p.ERR_FILE_NOT_FOUND),  # absolute: taken relative to the root
        ("/", p.ERR_ACCESS_VIOLATION),
        ("pxelinux.cfg", p.ERR_FILE_NOT_FOUND),  # a directory
        ("fifo", p.ERR_FILE_NOT_FOUND),  # must not hang the server either
        ("%2e%2e/outside/secret", p.ERR_FILE_NOT_FOUND),  # no URL decoding in TFTP
    ],
)
async def test_confinement(server, name, code):
    addr, recv, counters = server
    with trio.fail_after(10):
        pkt = await raw_request(addr, p.encode_request(name))
        assert isinstance(pkt, p.Error), f"{name!r} was served: {pkt}"
        assert pkt.code == code
        ev = await failed_event(recv)
        assert ev.filename == name
        assert ev.result == ("access_violation" if code == p.ERR_ACCESS_VIOLATION else "not_found")
        assert counters.active == 0


async def test_nul_in_name_cannot_smuggle_a_path(server):
    """RRQ "pxelinux.0 NUL ../../outside/secret NUL": the NUL ends the name, the rest is the mode."""
    addr, recv, counters = server
    with trio.fail_after(10):
        pkt = await raw_request(addr, b"\x00\x01pxelinux.0\x00../../outside/secret\x00octet\x00")
        assert isinstance(pkt, p.Error) and pkt.code == p.ERR_ILLEGAL_OPERATION
        pkt = await raw_request(addr, b"\x00\x01../../outside/secret\x00")  # name, no mode
        assert isinstance(pkt, p.Error) and pkt.code == p.ERR_ILLEGAL_OPERATION
        pkt = await raw_request(addr, b"\x00\x01\x00octet\x00")  # empty name
        assert isinstance(pkt, p.Error) and pkt.code == p.ERR_ILLEGAL_OPERATION


async def test_absolute_path_inside_root_is_served_from_root(server, tree):
    """in.tftpd -s semantics: "/etc/passwd" means ROOT/etc/passwd, never the real one."""
    addr, recv, counters = server
    (tree / "etc").mkdir()
    (tree / "etc" / "passwd").write_bytes(b"root-local copy\n")
    with trio.fail_after(10):
        c = await tftp_get(*addr, "/etc/passwd")
        assert bytes(c.data) == b"root-local copy\n"


@pytest.mark.parametrize("name", ["in-link", "cfg-link/default", "/pxelinux.0", "pxelinux.cfg//default"])
async def test_symlinks_and_odd_spelling_inside_root_are_fine(server, tree, name):
    addr, recv, counters = server
    with trio.fail_after(10):
        c = await tftp_get(*addr, name)
        expected = (tree / "pxelinux.cfg" / "default").read_bytes() if "default" in name else (tree / "pxelinux.0").read_bytes()
        assert bytes(c.data) == expected


async def test_wrq_refused_and_nothing_written(server, tree):
    addr, recv, counters = server
    before = sorted(os.listdir(tree))
    with trio.fail_after(10):
        for name in ("new.bin", "pxelinux.0", "../outside/evil"):
            pkt = await raw_request(addr, p.encode_request(name, "octet", write=True))
            assert isinstance(pkt, p.Error) and pkt.code == p.ERR_ACCESS_VIOLATION
            ev = await failed_event(recv)
            assert ev.detail["op"] == "wrq"
        # A DATA sent to the listening port as if a WRQ had been accepted: dropped.
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.sendto(p.encode_data(1, b"payload"), addr)
            await trio.testing.wait_all_tasks_blocked()
    assert sorted(os.listdir(tree)) == before
    assert (tree / "pxelinux.0").read_bytes() == b"LOADER" * 100
    assert counters.active == 0
