"""Hostile input against the TFTP server, through the real server on 127.0.0.1.

Confinement and read-only rules first: each form below is a path escape some
TFTP server shipped (tftp-hpa, atftpd, dnsmasq, tftpy, fbtftp). Every refusal
must be an ERROR packet -- never a DATA with the secret -- and must show up as
a FILE_FAILED event.

Then hostile clients: a flood of RRQs that never ACK (slot exhaustion), forged
RRQs (reflection), netascii requests that make the server scan big files, and
``bootorch tftpd`` as a drop-in for in.tftpd (giving up root, serving only
world-readable files). The same rules are also checked in the sans-IO core.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import pytest
import trio

from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.tftp import TftpCounters, TftpDownloadError, serve_tftp, tftp_get
from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols import tftp as p
from tests.conftest import REPO, require_root, require_tool

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


# -- hostile clients: slot exhaustion, reflection, netascii scans ------------------------
#
# Time logic runs under pytest-trio's ``autojump_clock``: the server's default
# timeout is 1 s and its retry budget 5, so every bound below is exact virtual time.

FLOOD_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 27)]  # 25 source addresses, all loopback


def _drain(sock) -> list[bytes]:
    """Every datagram already queued at ``sock``."""
    out = []
    while True:
        try:
            data, _ = sock._sock.recvfrom(65536)
        except BlockingIOError:
            return out
        out.append(data)


@contextlib.contextmanager
def _closing(socks: list):
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


async def _bound_udp(host: str = "127.0.0.1"):
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await s.bind((host, 0))
    return s


async def test_unacked_timeout_255_flood_from_25_addresses_cannot_lock_out_a_real_client(nursery, tree, autojump_clock):
    """200 RRQs asking RFC 2349 timeout=255 from 25 addresses, none ever ACKed, fill
    every slot (50) and the waiting queue (50); the rest get no answer. A real client
    is never refused with an ERROR (a ROM would give up): it retries, as after a lost
    datagram, and downloads within two rounds of the flood's short timeouts."""
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, BootFiles(tree), "127.0.0.1", 0, counters=counters))
    flood: list = []
    with trio.fail_after(3600), _closing(flood):
        for i in range(200):
            s = await _bound_udp(FLOOD_ADDRESSES[i % 25])
            flood.append(s)
            await s.sendto(p.encode_request("pxelinux.0", options={"timeout": "255"}), addr)
        await trio.testing.wait_all_tasks_blocked()
        assert counters.active == 50 and counters.waiting == 50 and counters.refused == 100  # the flood did fill both
        t0 = trio.current_time()
        while True:
            try:
                c = await tftp_get(*addr, "pxelinux.0", timeout=1.0, retries=3)
                break
            except TftpDownloadError as e:  # unanswered: a PXE ROM retries its RRQ
                assert e.failure.reason == "timeout" and e.failure.code is None, e  # never an ERROR
                assert trio.current_time() - t0 < 60, "still locked out after a minute"
        assert bytes(c.data) == b"LOADER" * 100
        # The unproven transfers end after their short timeouts (1 s each): the shared resend
        # budget can carry them to the full retries (6 s), never 255 s x the retries; the
        # waiting ones then run the same course: two such rounds at most.
        assert trio.current_time() - t0 <= 14.0


@pytest.mark.slow
async def test_timeout_255_flood_then_tftp_hpa_downloads_on_the_wire(nursery, tree, tmp_path):
    """The same flood on the real clock; tftp-hpa's client is the real client."""
    tftp = require_tool("tftp", "/usr/bin/tftp")
    counters = TftpCounters()
    # A 0.2 s timeout keeps the real-time wait short; the rule under test is the same.
    addr = await nursery.start(partial(serve_tftp, BootFiles(tree), "127.0.0.1", 0, counters=counters, timeout=0.2))
    flood: list = []
    out = tmp_path / "loader"
    with trio.fail_after(60), _closing(flood):
        for i in range(200):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            flood.append(s)
            s.bind((FLOOD_ADDRESSES[i % 25], 0))
            s.sendto(p.encode_request("pxelinux.0", options={"timeout": "255"}), addr)
        while counters.packets_in < 200:
            await trio.sleep(0.01)  # the listener counts them; nothing to await
        assert counters.refused == 100 and counters.waiting == 50
        t0 = trio.current_time()
        while True:
            out.unlink(missing_ok=True)
            await trio.run_process([tftp, "-m", "binary", addr[0], str(addr[1]), "-c", "get", "pxelinux.0", str(out)],
                                   capture_stdout=True, capture_stderr=True, check=False)
            if out.exists() and out.read_bytes() == b"LOADER" * 100:
                break
            assert trio.current_time() - t0 < 20, "tftp-hpa still locked out after 20 s"
            await trio.sleep(0.1)
        # Its first RRQ finds the waiting room full and gets no answer; tftp-hpa asks again after its own
        # 5 s timeout, when the flood (two rounds of 0.2 s timeouts, at most 1.2 s each) is over.
        assert trio.current_time() - t0 < 8.0


async def test_negotiated_timeout_above_the_cap_is_left_out_of_the_oack(server):
    addr, recv, counters = server
    with trio.fail_after(10):
        pkt = await raw_request(addr, p.encode_request("pxelinux.0", options={"timeout": "255", "tsize": "0"}))
        assert pkt == p.OptionAck({"tsize": "600"})  # RFC 2349: an option the server will not honour is omitted
        pkt = await raw_request(addr, p.encode_request("pxelinux.0", options={"timeout": "30", "tsize": "0"}))
        assert pkt == p.OptionAck({"timeout": "30", "tsize": "600"})


async def test_proven_transfer_without_progress_ends_after_max_stall(nursery, tree, autojump_clock):
    """A client that ACKs the OACK, then nothing: the retry budget (1000 x 30 s) is not the bound."""
    send, recv = trio.open_memory_channel[BootEvent](100)
    addr = await nursery.start(partial(serve_tftp, BootFiles(tree), "127.0.0.1", 0, events=send, retries=1000))
    with trio.fail_after(100_000):
        a = await _bound_udp()
        t0 = trio.current_time()
        await a.sendto(p.encode_request("pxelinux.0", options={"timeout": "30"}), addr)
        data, tid = await a.recvfrom(65536)
        assert p.parse_packet(data) == p.OptionAck({"timeout": "30"})
        await a.sendto(p.encode_ack(0), tid)  # proves its address, then vanishes
        ev = await failed_event(recv)
        assert ev.result == "timeout"
        assert trio.current_time() - t0 == pytest.approx(60.0)  # max_stall, not 30 s x 1001
        assert ev.retransmits == 1  # DATA 1 again at 30 s
        a.close()


@pytest.mark.parametrize("options", [None, {"blksize": "1468"}, {"timeout": "30", "tsize": "0"}])
async def test_rrq_from_a_client_that_never_acks_gets_at_most_two_datagrams(nursery, tree, autojump_clock, options):
    """With the shared resend budget spent (as a flood spends it), a spoofed RRQ reflects at most the
    first datagram and one retransmission at the victim, and the transfer is gone two short timeouts
    later, whatever timeout it asked for."""
    send, recv = trio.open_memory_channel[BootEvent](100)
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, BootFiles(tree), "127.0.0.1", 0, events=send, counters=counters,
                                       unproven_resend_rate=0))
    with trio.fail_after(3600):
        victim = await _bound_udp()
        t0 = trio.current_time()
        await victim.sendto(p.encode_request("pxelinux.0", options=options), addr)
        ev = await failed_event(recv)
        assert ev.result == "timeout"
        assert trio.current_time() - t0 == pytest.approx(2.0)
        got = _drain(victim)
        assert len(got) == 2 and got[0] == got[1]  # the first datagram and one retransmission (before: 6)
        assert counters.packets_out == 2 and counters.active == 0
        victim.close()


async def test_repeated_rrq_before_the_first_ack_gets_one_resend_of_the_first_datagram(nursery, tree, autojump_clock):
    """The client's own retry: its RRQ again from the same port means our DATA 1 was lost.
    (The shared budget is off: the one guaranteed resend is the subject.)"""
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, BootFiles(tree), "127.0.0.1", 0, counters=counters, unproven_resend_rate=0))
    with trio.fail_after(60):
        a = await _bound_udp()
        await a.sendto(p.encode_request("pxelinux.0"), addr)
        first, tid = await a.recvfrom(65536)
        t = trio.current_time()
        await a.sendto(p.encode_request("pxelinux.0"), addr)  # as if DATA 1 was lost
        data, src = await a.recvfrom(65536)
        assert (data, src) == (first, tid) and trio.current_time() == t  # answered at once, not by the 1 s timer
        await a.sendto(p.encode_request("pxelinux.0"), addr)  # again: one resend per transfer before an ACK
        with trio.move_on_after(0.9):
            await a.recvfrom(65536)
            pytest.fail("a second resend before any ACK")
        assert counters.duplicate_requests == 2 and counters.active == 1
        await a.sendto(p.encode_ack(1), tid)  # the client proceeds: the transfer is intact
        data, src = await a.recvfrom(65536)
        assert src == tid and p.parse_packet(data) == p.Data(2, (b"LOADER" * 100)[512:])
        await a.sendto(p.encode_ack(2), tid)
        while counters.transfers_ok < 1:
            await trio.sleep(0.01)
        a.close()


class _CountingFiles(BootFiles):
    """BootFiles whose files count what is read from them."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.reads = 0
        self.bytes_read = 0

    def open(self, name, client_ip=None):
        return _Counted(super().open(name, client_ip), self)


class _Counted:
    def __init__(self, f, owner) -> None:
        self._f, self._owner = f, owner
        self.name, self.size = f.name, f.size
        self.identity = getattr(f, "identity", None)

    def pread(self, offset, length):
        data = self._f.pread(offset, length)
        self._owner.reads += 1
        self._owner.bytes_read += len(data)
        return data

    def close(self) -> None:
        self._f.close()


async def test_too_large_netascii_request_is_refused_before_any_read(nursery, tree):
    (tree / "big.txt").write_bytes(b"line\n" * (p.NETASCII_MAX // 5 + 1))
    files = _CountingFiles(tree)
    addr = await nursery.start(partial(serve_tftp, files, "127.0.0.1", 0))
    with trio.fail_after(10):
        pkt = await raw_request(addr, p.encode_request("big.txt", "netascii", {"tsize": "0"}))
        assert isinstance(pkt, p.Error) and "octet" in pkt.message
        assert files.reads == 0  # refused on the file's size alone: no scan
        pkt = await raw_request(addr, p.encode_request("big.txt", "octet", {"tsize": "0"}))
        assert pkt == p.OptionAck({"tsize": str((tree / "big.txt").stat().st_size)})  # octet is fine


async def test_repeated_netascii_requests_scan_a_file_once_per_version(nursery, tree):
    """RRQ + ERROR in a loop: the converted size (tsize) is computed once per file version."""
    text = b"DEFAULT linux\r\nLABEL x\n" * 20_000  # 460 KB, under the netascii limit
    (tree / "menu.cfg").write_bytes(text)
    files = _CountingFiles(tree)
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, files, "127.0.0.1", 0, counters=counters))
    want = len(text) + text.count(b"\r") + text.count(b"\n")
    with trio.fail_after(30):
        for _ in range(10):
            with await _bound_udp() as a:  # a new port each time: a new transfer each time
                await a.sendto(p.encode_request("menu.cfg", "netascii", {"tsize": "0"}), addr)
                data, tid = await a.recvfrom(65536)
                assert p.parse_packet(data) == p.OptionAck({"tsize": str(want)})
                await a.sendto(p.encode_error(p.ERR_NOT_DEFINED, "changed my mind"), tid)
        assert files.bytes_read == len(text)  # one scan, not ten
        # A new version of the file (new size, mtime, ctime) is scanned again.
        with open(tree / "menu.cfg", "ab") as f:
            f.write(b"\n\n")
        with await _bound_udp() as a:
            await a.sendto(p.encode_request("menu.cfg", "netascii", {"tsize": "0"}), addr)
            data, tid = await a.recvfrom(65536)
            assert p.parse_packet(data) == p.OptionAck({"tsize": str(want + 4)})
            assert files.bytes_read == 2 * len(text) + 2
            await a.sendto(p.encode_error(p.ERR_NOT_DEFINED, "bye"), tid)
        while counters.active:
            await trio.sleep(0.01)  # the engine reports the aborts asynchronously; nothing to await


# -- files other users cannot read; bootorch tftpd as in.tftpd -----------------------------


async def test_file_others_cannot_read_is_refused_by_the_embedded_server(server, tree):
    """tftpd-hpa's rule: a boot root file that is not world-readable is a secret left there."""
    addr, recv, counters = server
    (tree / "id_rsa").write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (tree / "id_rsa").chmod(0o600)
    (tree / "shared.cfg").write_bytes(b"ok\n")
    (tree / "shared.cfg").chmod(0o604)
    with trio.fail_after(10):
        pkt = await raw_request(addr, p.encode_request("id_rsa"))
        assert isinstance(pkt, p.Error) and pkt.code == p.ERR_ACCESS_VIOLATION
        ev = await failed_event(recv)
        assert ev.filename == "id_rsa" and ev.result == "access_violation"
        c = await tftp_get(*addr, "shared.cfg")
        assert bytes(c.data) == b"ok\n"


async def _stderr_until(proc, buf: bytes, marker: bytes) -> bytes:
    while marker not in buf:
        chunk = await proc.stderr.receive_some()
        assert chunk, f"tftpd exited early: {buf.decode(errors='replace')}"
        buf += chunk
    return buf


@pytest.mark.slow
async def test_tftpd_drops_root_to_nobody_and_refuses_files_others_cannot_read(tmp_path):
    """``bootorch tftpd`` started as root: after binding it runs as nobody (tftpd-hpa's -u
    default), and a file that nobody itself owns but others cannot read is still refused."""
    require_root()
    curl = require_tool("curl")
    nobody = pwd.getpwnam("nobody")
    # pytest's tmp_path sits in a 0700 directory nobody cannot enter: use a root of its own.
    root = Path(tempfile.mkdtemp(prefix="bootorch-tftpd-", dir="/tmp"))
    try:
        root.chmod(0o755)
        public = os.urandom(5000)
        (root / "public.bin").write_bytes(public)
        (root / "public.bin").chmod(0o644)
        (root / "nobodys.key").write_bytes(b"readable by its owner only\n")
        (root / "nobodys.key").chmod(0o600)
        os.chown(root / "nobodys.key", nobody.pw_uid, nobody.pw_gid)  # nobody could open it: only the rule refuses
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                proc = await nursery.start(partial(
                    trio.run_process,
                    [sys.executable, "-m", "orchestrator.bootserver.tftpd_cli", "--root", str(root), "--listen", "127.0.0.1:0"],
                    stderr=subprocess.PIPE, check=False, cwd=REPO,
                ))
                buf = await _stderr_until(proc, b"", b"listening on")
                buf = await _stderr_until(proc, buf, b"\n")
                port = int(buf.split(b"listening on 127.0.0.1:", 1)[1].split(b"\n", 1)[0])
                status = Path(f"/proc/{proc.pid}/status").read_text()
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                assert fields["Uid"].split() == [str(nobody.pw_uid)] * 4, status
                assert fields["Gid"].split() == [str(nobody.pw_gid)] * 4, status
                assert fields["Groups"].split() == [], status
                out = tmp_path / "public.out"
                r = await trio.run_process([curl, "-sS", "-o", str(out), f"tftp://127.0.0.1:{port}/public.bin"], check=False,
                                           capture_stderr=True)
                assert r.returncode == 0, r.stderr
                assert out.read_bytes() == public
                with pytest.raises(TftpDownloadError) as e:
                    await tftp_get("127.0.0.1", port, "nobodys.key")
                assert e.value.failure.code == p.ERR_ACCESS_VIOLATION
                buf = await _stderr_until(proc, buf, b"'nobodys.key' failed (access_violation)")
                proc.send_signal(signal.SIGTERM)
        assert proc.returncode == 0
    finally:
        shutil.rmtree(root)


def test_tftpd_unknown_user_is_a_clean_error_before_binding(tmp_path, capsys):
    from orchestrator.bootserver import tftpd_cli

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:  # the port is taken: an error about the user proves the user is checked first
        rc = tftpd_cli.main(["--root", str(tmp_path), "--listen", f"127.0.0.1:{s.getsockname()[1]}",
                             "--user", "no-such-user-bootorch"])
    finally:
        s.close()
    assert rc == 2
    assert "no such user: 'no-such-user-bootorch'" in capsys.readouterr().err


@pytest.mark.parametrize("asked, euid, expect", [
    (None, 0, "nobody"),  # root: drop to nobody unless told otherwise
    ("", 0, None),  # --user '': keep root
    ("daemon", 0, "daemon"),
    (None, 1000, None),  # not root: nothing to drop
    ("", 1000, None),
])
def test_tftpd_user_to_run_as(asked, euid, expect):
    from orchestrator.bootserver.tftpd_cli import user_to_run_as

    pw = user_to_run_as(asked, euid)
    assert (pw.pw_name if pw is not None else None) == expect


def test_tftpd_another_user_needs_root():
    from orchestrator.bootserver.tftpd_cli import UserError, user_to_run_as

    with pytest.raises(UserError, match="needs root"):
        user_to_run_as("daemon", pwd.getpwnam("nobody").pw_uid)


# -- the same rules in the sans-IO core and on the thread engine -----------------------------


def _core(options=None, data=bytes(5000), **kw) -> p.ReadTransfer:
    from orchestrator.bootserver.files import MemoryFile

    return p.ReadTransfer(p.ReadRequest("f", "octet", options or {}), MemoryFile("f", data), **kw)


def test_core_unproven_peer_gets_one_resend_at_the_short_timeout_then_fails():
    t = _core({"timeout": "30"}, unproven_retries=1, unproven_timeout=1.0, timeout=1.0, retries=5)
    first, _ = t.start(0.0)
    assert t.next_deadline == 1.0 and not t.proven  # not 30: the peer has not proven its address
    assert t.timer(1.0) == (first, ())
    out, ev = t.timer(2.0)
    assert out == [] and ev[0].reason == "timeout" and t.retransmits == 1


def test_core_any_ack_proves_the_peer_and_restores_the_retry_budget():
    t = _core({"timeout": "3"}, unproven_retries=1, unproven_timeout=1.0, retries=5)
    t.start(0.0)
    assert t.timer(1.0)[0]  # the one unproven resend
    t.datagram(p.encode_ack(7), 1.5)  # acknowledges nothing, but it came from the peer's TID
    assert t.proven and t.rto == 3.0
    now = 1.0
    for _ in range(4):  # the budget is retries (5, the unproven resend included); the interval the negotiated 3 s
        now = t.next_deadline
        out, ev = t.timer(now)
        assert out and ev == ()
    assert now == 2.0 + 3 * 3.0
    assert t.next_deadline == 14.0
    assert t.timer(14.0)[1][0].reason == "timeout"


def test_core_repeated_request_shares_the_unproven_budget_with_the_timer():
    t = _core(unproven_retries=1, unproven_timeout=1.0)
    first, _ = t.start(0.0)
    assert t.repeated_request(0.4) == first and t.next_deadline == 1.4  # at once, and a full timeout to answer
    assert t.repeated_request(0.5) == []  # budget spent
    out, ev = t.timer(1.4)
    assert out == [] and ev[0].reason == "timeout"
    u = _core(unproven_retries=1, unproven_timeout=1.0)
    u.start(0.0)
    u.datagram(p.encode_ack(1), 0.1)
    assert u.repeated_request(0.2) == []  # proven: a stale duplicate
    v = _core(unproven_retries=1, unproven_timeout=1.0)
    v.start(0.0)
    assert v.timer(1.0)[0] and v.repeated_request(1.1) == []  # the timer used it


def test_core_fast_forward_proves_the_peer_and_counts_as_progress():
    """The native loop answers the first ACK itself: the core must learn the peer is proven."""
    t = _core(unproven_retries=1, unproven_timeout=1.0, timeout=1.0, retries=100, max_stall=5.0)
    t.start(0.0)
    assert t.forwardable() and not t.proven
    t.fast_forward(1, 0.25, 1.25, 0.25, 1)  # ACK 1 at 0.25, DATA 2 sent then
    assert t.proven
    while not t.finished:
        t.timer(t.next_deadline)  # the proven budget (100) is not what ends it ...
    assert t.retransmits == 4  # ... max_stall is: 5 s after the ACK at 0.25


def test_core_no_progress_for_max_stall_ends_a_transfer_whatever_the_retries():
    t = _core({"timeout": "25"}, retries=1000, max_stall=60.0)
    t.start(0.0)
    t.datagram(p.encode_ack(0), 5.0)  # the OACK acknowledged: progress at 5
    assert t.next_deadline == 30.0
    assert t.timer(30.0)[0]
    assert t.next_deadline == 55.0
    assert t.timer(55.0)[0]
    assert t.next_deadline == 65.0  # clamped to 5 + 60, not 80
    out, ev = t.timer(65.0)
    assert out == [] and ev[0].reason == "timeout"


def test_core_pacing_does_not_restart_the_stall_clock():
    t = _core(retries=1000, max_stall=10.0)
    t.start(0.0)
    for now in range(1, 20):
        t.restart_timer(float(now))  # held back by a byte budget, over and over
        if t.finished:
            break
        t.timer(t.next_deadline)
    assert t.finished and t.next_deadline is None


@pytest.mark.parametrize("value, cap, kept", [("30", 30, True), ("31", 30, False), ("255", 255, True), ("1", 1, True)])
def test_negotiate_leaves_out_timeouts_above_timeout_max(value, cap, kept):
    n = p.negotiate({"timeout": value}, tsize=None, timeout_max=cap)
    assert (n.oack.get("timeout") == value) is kept and (n.timeout == int(value) if kept else n.timeout is None)
    with pytest.raises(p.LocalProtocolError):
        p.negotiate({}, tsize=None, timeout_max=256)


def test_netascii_sizes_cache_is_keyed_by_identity_and_bounded():
    from orchestrator.bootserver.files import MemoryFile

    class F(MemoryFile):
        identity = ("dev", "ino", 1)

    f = F("f", b"a\nb\n")
    sizes = p.NetasciiSizes(maxsize=2)
    a = p.ReadTransfer(p.ReadRequest("f", "netascii", {}), f, netascii_sizes=sizes)
    assert a.size == 6 and len(sizes) == 1
    sizes.put(("other",), 1)
    assert sizes.get(F.identity) == 6  # now the most recent
    sizes.put(("third",), 1)
    assert sizes.get(("other",)) is None and sizes.get(F.identity) == 6  # the least recent went
    b = p.ReadTransfer(p.ReadRequest("f", "netascii", {}), MemoryFile("f", b"x\n" * 10), netascii_sizes=sizes)
    assert b.size == 30 and len(sizes) == 2  # no identity: computed, not cached


def test_core_refuses_netascii_above_the_limit_without_reading():
    class Unreadable:
        name, size = "big", 10_000

        def pread(self, offset, length):
            raise AssertionError("read")

    with pytest.raises(p.RemoteProtocolError, match="octet") as e:
        p.ReadTransfer(p.ReadRequest("big", "netascii", {}), Unreadable(), netascii_max=9_999)
    assert e.value.error_code == p.ERR_NOT_DEFINED
    assert p.ReadTransfer(p.ReadRequest("big", "octet", {}), Unreadable(), netascii_max=9_999).size == 10_000


async def test_thread_engine_unproven_peer_gets_two_datagrams_on_the_real_clock(nursery, tree):
    """The lock-step thread (and native loop) path, not the trio driver: same rule."""
    send, recv = trio.open_memory_channel[BootEvent](100)
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, BootFiles(tree), "127.0.0.1", 0, events=send, counters=counters,
                                       engine="thread", timeout=0.05, unproven_resend_rate=0))
    with trio.fail_after(10):
        for options in (None, {"blksize": "1468"}):
            victim = await _bound_udp()
            await victim.sendto(p.encode_request("pxelinux.0", options=options), addr)
            ev = await failed_event(recv)
            assert ev.result == "timeout" and ev.retransmits == 1
            got = _drain(victim)
            assert len(got) == 2 and got[0] == got[1]
            victim.close()
        assert counters.packets_out == 4


async def test_thread_engine_answers_a_repeated_rrq_from_the_transfer_port(nursery, tree):
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, BootFiles(tree), "127.0.0.1", 0, counters=counters, engine="thread", timeout=30))
    with trio.fail_after(10):  # far below the 30 s timer: only the repeated RRQ can bring DATA 1 again
        a = await _bound_udp()
        await a.sendto(p.encode_request("pxelinux.0"), addr)
        first, tid = await a.recvfrom(65536)
        await a.sendto(p.encode_request("pxelinux.0"), addr)
        data, src = await a.recvfrom(65536)
        assert (data, src[:2]) == (first, tid[:2])
        await a.sendto(p.encode_ack(1), tid)
        data, _ = await a.recvfrom(65536)
        assert p.parse_packet(data) == p.Data(2, (b"LOADER" * 100)[512:])
        await a.sendto(p.encode_ack(2), tid)
        while counters.transfers_ok < 1:
            await trio.sleep(0.01)  # the engine thread reports asynchronously
        assert counters.retransmits == 1 and counters.duplicate_requests == 1
        a.close()


async def test_unproven_client_on_a_lossy_link_keeps_its_retries_while_the_shared_budget_lasts(nursery, tree, autojump_clock):
    """A real client whose first ACKs are lost is not dropped after one resend: the shared budget pays the rest."""
    send, recv = trio.open_memory_channel[BootEvent](100)
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, BootFiles(tree), "127.0.0.1", 0, events=send, counters=counters))
    with trio.fail_after(60):
        a = await _bound_udp()
        await a.sendto(p.encode_request("pxelinux.0", options={"blksize": "1468"}), addr)
        for _ in range(4):  # the OACK four times: the client's ACK 0 (or our OACK) lost each time
            oack, tid = await a.recvfrom(65536)
            assert isinstance(p.parse_packet(oack), p.OptionAck)
        await a.sendto(p.encode_ack(0), tid)  # the fifth round trip works
        data, _ = await a.recvfrom(65536)
        assert p.parse_packet(data) == p.Data(1, b"LOADER" * 100)
        await a.sendto(p.encode_ack(1), tid)
        while counters.transfers_ok < 1:
            await trio.sleep(0.01)
        assert counters.retransmits == 3
        a.close()


async def test_a_flood_of_spoofed_rrqs_reflects_two_datagrams_each_plus_the_shared_budget(nursery, tree, autojump_clock):
    """300 forged RRQs at once (victims never ACK): the server sends at most 2 per request plus the
    budget (burst of 4 s, then its rate) -- not 6 per request as before the limits."""
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, BootFiles(tree), "127.0.0.1", 0, counters=counters,
                                       max_transfers=1000, max_per_client=1000, unproven_resend_rate=10))
    victims: list = []
    with trio.fail_after(3600), _closing(victims):
        t0 = trio.current_time()
        for _ in range(300):
            v = await _bound_udp()
            victims.append(v)
            await v.sendto(p.encode_request("pxelinux.0"), addr)
        await trio.testing.wait_all_tasks_blocked()
        while counters.active:
            await trio.sleep(0.5)
        elapsed = trio.current_time() - t0
        got = sum(len(_drain(v)) for v in victims)
        assert got == counters.packets_out
        assert 600 <= got <= 600 + 40 + 10 * elapsed + 1  # before: 1 800
