"""The trio TFTP server over real UDP sockets on 127.0.0.1, port 0.

Rules (trio-websocket's): localhost only, port 0, a ``fail_after`` on every test,
and pytest-trio's ``autojump_clock`` wherever a timeout or reaping is the point,
so those tests take no real time and their timing is exact.
"""

from __future__ import annotations

import hashlib
import os
import socket
from functools import partial

import pytest
import trio

from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.tftp import TftpCounters, TftpDownloadError, serve_tftp, tftp_get
from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols import tftp as p

HOST = "127.0.0.1"


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (r / "small.txt").write_bytes(b"hello\nworld\r\n")
    (r / "big.bin").write_bytes(os.urandom(300_000))
    (r / "empty").write_bytes(b"")
    return r


class Server:
    def __init__(self, addr, counters, events):
        self.addr = addr
        self.counters = counters
        self.events = events  # receive channel

    async def next_event(self, kind: EventKind | None = None) -> BootEvent:
        while True:
            ev = await self.events.receive()
            if kind is None or ev.kind is kind:
                return ev


@pytest.fixture(params=["auto", "trio"])
def start(nursery, root, request):
    """Every server test runs twice: ``auto`` is the engine thread under a real
    clock (and the trio driver under ``autojump_clock``), ``trio`` the trio driver."""

    async def start(files=None, **kw) -> Server:
        send, recv = trio.open_memory_channel[BootEvent](1000)
        counters = TftpCounters()
        kw.setdefault("events", send)
        kw.setdefault("engine", request.param)
        addr = await nursery.start(partial(serve_tftp, files or BootFiles(root), HOST, 0, counters=counters, **kw))
        return Server(addr, counters, recv)

    return start


class Peer:
    """A hand-driven client socket (for what tftp_get would not do)."""

    def __init__(self) -> None:
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    async def bind(self) -> "Peer":
        await self.sock.bind((HOST, 0))
        return self

    async def send(self, data: bytes, addr) -> None:
        await self.sock.sendto(data, addr)

    async def recv(self) -> tuple[bytes, tuple[str, int]]:
        data, src = await self.sock.recvfrom(65536)
        return data, src[:2]

    def close(self) -> None:
        self.sock.close()


async def peer() -> Peer:
    return await Peer().bind()


# -- downloads and events -------------------------------------------------------------


async def test_download_with_options_and_events(start, root):
    with trio.fail_after(10):
        srv = await start()
        c = await tftp_get(*srv.addr, "/big.bin", options={"tsize": 0, "blksize": 1468, "windowsize": 8})
        assert hashlib.sha256(c.data).digest() == hashlib.sha256((root / "big.bin").read_bytes()).digest()
        assert c.oack == {"tsize": "300000", "blksize": "1468", "windowsize": "8"}
        req = await srv.next_event()
        assert req.kind is EventKind.FILE_REQUEST and req.source == "tftp" and req.filename == "/big.bin"
        assert req.client_ip == HOST and req.detail["options"]["blksize"] == "1468"
        done = await srv.next_event()
        assert done.kind is EventKind.FILE_DONE and done.result == "ok"
        assert done.bytes == done.size == 300_000
        assert done.client_port == req.client_port
        assert done.duration is not None and done.duration >= 0
        assert done.retransmits == 0 and done.detail["windowsize"] == 8
        k = srv.counters
        assert (k.transfers_ok, k.transfers_failed, k.active, k.bytes_sent) == (1, 0, 0, 300_000)
        assert k.packets_out >= 300_000 // 1468 + 2  # OACK + every block
        assert k.packets_in >= 1 + 300_000 // 1468 // 8


@pytest.mark.parametrize("name, size", [("empty", 0), ("small.txt", 13)])
async def test_small_files(start, root, name, size):
    with trio.fail_after(10):
        srv = await start()
        c = await tftp_get(*srv.addr, name)
        assert bytes(c.data) == (root / name).read_bytes() and len(c.data) == size


async def test_netascii_download(start):
    with trio.fail_after(10):
        srv = await start()
        c = await tftp_get(*srv.addr, "small.txt", mode="netascii", options={"tsize": 0})
        assert bytes(c.data) == b"hello\r\nworld\r\x00\r\n"
        assert c.tsize == len(c.data)


async def test_blksize_capped_by_server_max(start):
    with trio.fail_after(10):
        srv = await start(blksize_max=1024, windowsize_max=4)
        c = await tftp_get(*srv.addr, "big.bin", options={"blksize": 8192, "windowsize": 64})
        assert c.oack == {"blksize": "1024", "windowsize": "4"}
        assert len(c.data) == 300_000


async def test_dynamic_file_and_not_found(start, root):
    def dynamic(name, ip):
        return b"DEFAULT node\n" if name == "pxelinux.cfg/01-52-54-00-00-00-01" else None

    with trio.fail_after(10):
        srv = await start(BootFiles(root, dynamic=dynamic))
        c = await tftp_get(*srv.addr, "pxelinux.cfg/01-52-54-00-00-00-01")
        assert bytes(c.data) == b"DEFAULT node\n"
        # pxelinux walks its candidate list on "File not found": it must be code 1.
        with pytest.raises(TftpDownloadError) as e:
            await tftp_get(*srv.addr, "pxelinux.cfg/C0A8000A")
        assert e.value.failure.code == p.ERR_FILE_NOT_FOUND
        ev = await srv.next_event(EventKind.FILE_FAILED)
        assert ev.result == "not_found" and ev.filename == "pxelinux.cfg/C0A8000A"


async def test_wrq_refused(start, root):
    with trio.fail_after(10):
        srv = await start()
        a = await peer()
        await a.send(p.encode_request("upload.bin", write=True), srv.addr)
        data, _ = await a.recv()
        assert p.parse_packet(data).code == p.ERR_ACCESS_VIOLATION
        assert not (root / "upload.bin").exists()
        ev = await srv.next_event(EventKind.FILE_FAILED)
        assert ev.result == "access_violation" and ev.detail["op"] == "wrq"


# -- robustness -------------------------------------------------------------------------


async def test_malformed_request_answered_garbage_dropped(start):
    with trio.fail_after(10):
        srv = await start()
        a = await peer()
        await a.send(b"\x00\x01small.txt\x00octet", srv.addr)  # no terminating NUL
        data, _ = await a.recv()
        assert p.parse_packet(data).code == p.ERR_ILLEGAL_OPERATION
        for junk in (b"", b"\x00", b"\xff\xff\xff", p.encode_ack(1), p.encode_data(1, b"x"), b"\x00\x05"):
            await a.send(junk, srv.addr)  # not requests: no reply
        await a.send(p.encode_request("small.txt"), srv.addr)
        data, _ = await a.recv()
        assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")  # first reply is the DATA
        assert srv.counters.malformed == 7


async def test_unknown_mode_refused(start):
    with trio.fail_after(10):
        srv = await start()
        a = await peer()
        await a.send(p.encode_request("small.txt", "mail"), srv.addr)
        data, _ = await a.recv()
        assert p.parse_packet(data).code == p.ERR_ILLEGAL_OPERATION


async def test_wrong_tid_gets_error_5_and_transfer_continues(start):
    with trio.fail_after(10):
        srv = await start()
        a, b = await peer(), await peer()
        await a.send(p.encode_request("big.bin"), srv.addr)
        data, tid = await a.recv()
        assert p.parse_packet(data).block == 1 and tid != srv.addr  # a fresh TID
        await b.send(p.encode_ack(1), tid)  # an intruder
        data, src = await b.recv()
        assert src == tid and p.parse_packet(data).code == p.ERR_UNKNOWN_TID
        await a.send(p.encode_ack(1), tid)  # the real client carries on
        data, src = await a.recv()
        assert src == tid and p.parse_packet(data).block == 2
        await a.send(b"\x00\x05\x00\x00bye\x00", tid)
        # The engine hands its counters to trio in batches, at the latest with the
        # transfer's end event.
        ev = await srv.next_event(EventKind.FILE_FAILED)
        assert ev.result == "aborted"
        assert srv.counters.wrong_tid == 1


async def test_retry_from_new_port_is_a_new_transfer_same_port_is_not(start, autojump_clock):
    with trio.fail_after(30):
        srv = await start()
        a, b = await peer(), await peer()
        await a.send(p.encode_request("big.bin"), srv.addr)
        _, tid_a = await a.recv()
        await a.send(p.encode_request("big.bin"), srv.addr)  # request retransmitted: same port
        await b.send(p.encode_request("big.bin"), srv.addr)  # client restarted: new port
        data, tid_b = await b.recv()
        assert p.parse_packet(data).block == 1 and tid_b != tid_a
        assert srv.counters.active == 2 and srv.counters.duplicate_requests == 1
        # What A receives next is block 1 again *from the same TID* (the timer's
        # retransmission), never a second transfer.
        data, src = await a.recv()
        assert src == tid_a and p.parse_packet(data).block == 1


async def test_two_byte_error_ends_transfer(start):
    with trio.fail_after(10):
        srv = await start()
        a = await peer()
        await a.send(p.encode_request("big.bin"), srv.addr)
        _, tid = await a.recv()
        await a.send(b"\x00\x05", tid)
        ev = await srv.next_event(EventKind.FILE_FAILED)
        assert ev.result == "aborted" and ev.bytes == 0
        assert srv.counters.active == 0


async def test_huge_error_ends_transfer(start):
    with trio.fail_after(10):
        srv = await start()
        a = await peer()
        await a.send(p.encode_request("big.bin", options={"blksize": 1024}), srv.addr)
        _, tid = await a.recv()  # OACK
        await a.send(p.encode_ack(0), tid)
        await a.recv()
        await a.send(b"\x00\x05\x00\x03" + b"X" * 60_000 + b"\x00", tid)
        ev = await srv.next_event(EventKind.FILE_FAILED)
        assert ev.result == "aborted" and ev.detail["error_code"] == 3
        assert len(ev.detail["error_message"]) <= p.MAX_PEER_MESSAGE


async def test_uefi_size_probe_then_windowed_read(start, root):
    """edk2's PXE reads its loader twice: a tsize probe it declines with ERROR 8 after
    the OACK, then the file at windowsize 4. The probe is no failure, no retransmit."""
    with trio.fail_after(20):
        srv = await start()
        a = await peer()
        await a.send(p.encode_request("big.bin", options={"tsize": 0, "blksize": 1468, "windowsize": 4}), srv.addr)
        data, tid = await a.recv()
        assert p.parse_packet(data).options == {"tsize": "300000", "blksize": "1468", "windowsize": "4"}
        await a.send(p.encode_error(p.ERR_OPTION_NEGOTIATION, "tsize probe"), tid)
        # At once, from the same port (edk2 keeps its UDP port): a new transfer, not a duplicate.
        await a.send(p.encode_request("big.bin", options={"blksize": 1468, "windowsize": 4}), srv.addr)
        data, tid2 = await a.recv()
        assert p.parse_packet(data).options == {"blksize": "1468", "windowsize": "4"}
        got, block = bytearray(), 0
        await a.send(p.encode_ack(0), tid2)
        while True:
            data, _ = await a.recv()
            pkt = p.parse_packet(data)
            if pkt.block == block + 1:
                got += pkt.payload
                block = pkt.block
                if block % 4 == 0 or len(pkt.payload) < 1468:
                    await a.send(p.encode_ack(block), tid2)
                if len(pkt.payload) < 1468:
                    break
        assert bytes(got) == (root / "big.bin").read_bytes()
        ev = await srv.next_event()
        assert ev.kind is EventKind.FILE_REQUEST  # the RRQ
        ev = await srv.next_event()
        # The probe ends declined, or superseded when the re-read overtook its ERROR 8: never failed.
        assert ev.kind is EventKind.FILE_REQUEST and ev.result in ("options_declined", "superseded")
        done = await srv.next_event(EventKind.FILE_DONE)
        assert done.result == "ok" and done.detail["windowsize"] == 4 and done.detail["oack"]["windowsize"] == "4"
        assert srv.counters.transfers_failed == 0
        assert srv.counters.options_declined + srv.counters.superseded == 1
        assert srv.counters.retransmits == 0 and srv.counters.transfers_ok == 1
        assert srv.counters.duplicate_requests == 0


async def test_another_request_from_a_transfers_port_supersedes_it(start, root):
    """A new client on the port of a vanished one (or a client that moved on) gets its own file
    from a new TID at once; the old transfer ends "superseded" and sends it nothing more."""
    with trio.fail_after(20):
        srv = await start()
        a = await peer()
        await a.send(p.encode_request("big.bin"), srv.addr)
        data, old_tid = await a.recv()
        assert p.parse_packet(data).block == 1
        await a.send(p.encode_request("small.txt"), srv.addr)  # same port, another request
        data, new_tid = await a.recv()
        assert new_tid != old_tid and p.parse_packet(data).payload == (root / "small.txt").read_bytes()
        await a.send(p.encode_ack(1), new_tid)
        ev = await srv.next_event(EventKind.FILE_DONE)
        assert ev.filename == "small.txt" and ev.result == "ok"
        assert srv.counters.superseded == 1 and srv.counters.duplicate_requests == 0
        with trio.move_on_after(2.5):  # past the old transfer's resend timer: nothing from it
            data, src = await a.recv()
            assert src != old_tid, "the superseded transfer still sends"


async def test_vanished_client_is_reaped_after_retry_budget(start, autojump_clock):
    with trio.fail_after(60):
        srv = await start(timeout=2.0, retries=3, rto_min=None)  # a fixed timeout (the adaptive one: test_tftp_rto.py)
        a = await peer()
        t0 = trio.current_time()
        # The client ACKs the OACK (proving its address: the full retry budget
        # applies), then vanishes. One that never ACKs gets one retransmission:
        # tests/test_tftp_security.py.
        await a.send(p.encode_request("big.bin", options={"blksize": "512"}), srv.addr)
        data, tid = await a.recv()
        assert p.parse_packet(data) == p.OptionAck({"blksize": "512"})
        await a.send(p.encode_ack(0), tid)
        ev = await srv.next_event(EventKind.FILE_FAILED)
        assert ev.result == "timeout" and ev.retransmits == 3
        assert ev.duration == pytest.approx(2.0 * 4)  # 1 send + 3 retransmits, 2 s apart
        assert trio.current_time() - t0 == pytest.approx(8.0)
        assert srv.counters.active == 0 and srv.counters.retransmits == 3
        copies = 0
        while True:  # the original and the 3 retransmissions are queued at the peer
            with trio.move_on_after(0.1):
                data, _ = await a.recv()
                assert p.parse_packet(data).block == 1
                copies += 1
                continue
            break
        assert copies == 4


async def test_lost_final_ack_is_reported_unconfirmed(start, autojump_clock):
    """The client got every block but its last ACK never arrives: not a failure."""
    with trio.fail_after(60):
        srv = await start(timeout=1.0, retries=2)
        a = await peer()
        await a.send(p.encode_request("small.txt", options={"tsize": "0"}), srv.addr)  # 13 bytes: one block
        data, tid = await a.recv()
        assert p.parse_packet(data) == p.OptionAck({"tsize": "13"})
        await a.send(p.encode_ack(0), tid)  # the client proves its address ...
        data, tid = await a.recv()
        assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")  # ... and we never ACK the data
        ev = await srv.next_event(EventKind.FILE_DONE)
        assert ev.result == "unconfirmed" and ev.retransmits == 2
        assert srv.counters.transfers_unconfirmed == 1
        assert srv.counters.transfers_failed == 0 and srv.counters.transfers_ok == 0


async def test_negotiated_timeout_is_honoured(start, autojump_clock):
    with trio.fail_after(600):
        srv = await start(timeout=1.0, retries=1)
        a = await peer()
        t0 = trio.current_time()
        await a.send(p.encode_request("big.bin", options={"timeout": 30}), srv.addr)
        data, tid = await a.recv()
        assert p.parse_packet(data) == p.OptionAck({"timeout": "30"})
        await a.send(p.encode_ack(0), tid)  # before the first ACK the server's own 1 s timeout applies
        ev = await srv.next_event(EventKind.FILE_FAILED)
        assert trio.current_time() - t0 == pytest.approx(60.0)
        assert ev.result == "timeout"


async def test_per_client_limit(start, autojump_clock):
    """Over its address's cap a request gets no answer (a ROM takes an ERROR as final, a silence
    as a lost datagram): it is counted, holds nothing, and its retry is served once a slot frees."""
    with trio.fail_after(60):
        srv = await start(max_per_client=2, max_transfers=10)
        peers = [await peer() for _ in range(3)]
        tids = []
        for q in peers[:2]:
            await q.send(p.encode_request("big.bin"), srv.addr)
            data, tid = await q.recv()
            assert p.parse_packet(data).block == 1
            tids.append(tid)
        await peers[2].send(p.encode_request("small.txt"), srv.addr)
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.5):
            await peers[2].recv()
            pytest.fail("a request over the address's cap was answered")
        assert srv.counters.refused == 1 and srv.counters.active == 2 and srv.counters.waiting == 0
        await peers[0].send(p.encode_error(0, "stop"), tids[0])  # one of the two ends
        await trio.testing.wait_all_tasks_blocked()
        await peers[2].send(p.encode_request("small.txt"), srv.addr)  # the client's retry
        data, _ = await peers[2].recv()
        assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")


async def test_global_limit_waits_then_drops_and_every_one_is_reaped(start, autojump_clock):
    """An RRQ flood from 200 ports: never more than max_transfers run and max_waiting wait, the
    rest get no answer at all, and every one admitted is reaped."""
    with trio.fail_after(120):
        srv = await start(max_transfers=20, max_waiting=20, max_per_client=1000, timeout=1.0, retries=2)
        peers = [await peer() for _ in range(200)]
        for q in peers:
            await q.send(p.encode_request("big.bin"), srv.addr)
        await trio.testing.wait_all_tasks_blocked()
        assert srv.counters.active == 20 and srv.counters.waiting == 20
        assert srv.counters.refused == 160
        await trio.sleep(20)  # virtual: two rounds of 3 timeouts of 1 s reap everything
        assert srv.counters.active == 0 and srv.counters.waiting == 0
        assert srv.counters.transfers_failed == 40 and srv.counters.waited == 20
        answered = 0
        for q in peers:
            with trio.move_on_after(0.01):
                data, _ = await q.recv()
                assert p.parse_packet(data).block == 1  # never an ERROR
                answered += 1
        assert answered == 40
        c = await tftp_get(*srv.addr, "small.txt")  # and it still serves
        assert bytes(c.data) == b"hello\nworld\r\n"
        for q in peers:
            q.close()


async def test_full_event_channel_never_blocks_the_server(start):
    with trio.fail_after(10):
        send, recv = trio.open_memory_channel[BootEvent](0)  # nobody reads it
        srv = await start(events=send)
        for _ in range(3):
            c = await tftp_get(*srv.addr, "small.txt")
            assert len(c.data) == 13
        # The last ACK reaches the server after the client is done (and the engine
        # thread reports it asynchronously): wait for the count, bounded by fail_after.
        while srv.counters.transfers_ok < 3:
            await trio.sleep(0.001)
        assert srv.counters.events_dropped == 6
        assert srv.counters.transfers_ok == 3


async def test_closed_event_channel_never_crashes(start):
    with trio.fail_after(10):
        send, recv = trio.open_memory_channel[BootEvent](10)
        recv.close()
        srv = await start(events=send)
        c = await tftp_get(*srv.addr, "small.txt")
        assert len(c.data) == 13


async def test_ipv6_loopback(nursery, root):
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.bind(("::1", 0))
        s.close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    with trio.fail_after(10):
        addr = await nursery.start(partial(serve_tftp, BootFiles(root), "::1", 0))
        assert addr[0] == "::1"
        c = await tftp_get("::1", addr[1], "big.bin", options={"windowsize": 4})
        assert bytes(c.data) == (root / "big.bin").read_bytes()


# -- admission ------------------------------------------------------------------------


def _admission():
    mod = pytest.importorskip("orchestrator.bootserver.admission")
    return mod.Admission


async def test_admission_queues_instead_of_refusing(start, autojump_clock):
    Admission = _admission()
    with trio.fail_after(60):
        adm = Admission(max_active=1)
        srv = await start(admission=adm)
        a, b = await peer(), await peer()
        await a.send(p.encode_request("big.bin"), srv.addr)
        _, tid_a = await a.recv()
        await b.send(p.encode_request("small.txt"), srv.addr)
        with trio.move_on_after(0.5):  # < the 1 s timeout: A still holds the slot
            await b.recv()
            pytest.fail("B was served while A held the only slot")
        assert srv.counters.active == 2 and srv.counters.refused == 0
        await a.send(b"\x00\x05\x00\x00stop\x00", tid_a)  # A gives up its slot
        data, _ = await b.recv()
        assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")


async def test_admission_rate_limit_paces_the_transfer(start, autojump_clock):
    Admission = _admission()
    with trio.fail_after(600):
        rate = 100_000
        adm = Admission(rate=rate, burst=16_384)
        srv = await start(admission=adm)
        t0 = trio.current_time()
        c = await tftp_get(*srv.addr, "big.bin", options={"blksize": 1468, "windowsize": 4}, timeout=5.0)
        elapsed = trio.current_time() - t0
        assert len(c.data) == 300_000
        # 300 kB at 100 kB/s after a 16 kB burst: about 2.8 s of (virtual) time.
        assert (300_000 - 16_384) / rate * 0.95 <= elapsed <= 300_000 / rate * 1.5


# -- the standalone command ----------------------------------------------------------


async def test_tftpd_cli_standalone(root, tmp_path):
    """``python -m orchestrator.bootserver.tftpd_cli --listen 127.0.0.1:0``: the benchmark's way in."""
    import signal
    import subprocess
    import sys

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            # --user '': pytest's tmp_path is in a 0700 directory that nobody cannot
            # enter; dropping root is tested in tests/test_tftp_security.py.
            proc = await nursery.start(partial(
                trio.run_process,
                [sys.executable, "-m", "orchestrator.bootserver.tftpd_cli", "--root", str(root), "--listen", "127.0.0.1:0",
                 "--blksize-max", "4096", "--user", ""],
                stderr=subprocess.PIPE, check=False,
            ))
            buf = b""
            while b"\n" not in buf:
                chunk = await proc.stderr.receive_some()
                assert chunk, "tftpd exited before listening"
                buf += chunk
            first, _, buf = buf.partition(b"\n")
            assert first.startswith(b"listening on 127.0.0.1:")
            port = int(first.rsplit(b":", 1)[1])
            c = await tftp_get(HOST, port, "big.bin", options={"blksize": 8192, "tsize": 0})
            assert bytes(c.data) == (root / "big.bin").read_bytes()
            assert c.oack["blksize"] == "4096"
            with pytest.raises(TftpDownloadError):
                await tftp_get(HOST, port, "../etc/passwd")
            # The client is done when it sends the final ACK; the server's log line
            # follows once that ACK is processed. Wait for it, then stop the server.
            while b"'big.bin' ok" not in buf:
                chunk = await proc.stderr.receive_some()
                assert chunk, "tftpd exited early"
                buf += chunk
            proc.send_signal(signal.SIGTERM)
            async for chunk in proc.stderr:
                buf += chunk
        assert proc.returncode == 0
        log = buf.decode()
        assert "'big.bin' ok 300000 bytes" in log
        assert "'../etc/passwd' failed (access_violation)" in log
        assert "SIGTERM, exiting" in log


def test_tftpd_cli_bind_error_is_a_clean_exit(root, capsys):
    from orchestrator.bootserver import tftpd_cli

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, 0))
    try:
        rc = tftpd_cli.main(["--root", str(root), "--listen", f"{HOST}:{s.getsockname()[1]}"])
    finally:
        s.close()
    assert rc == 1
    assert "Address already in use" in capsys.readouterr().err


@pytest.mark.parametrize("value, expect", [("127.0.0.1:69", ("127.0.0.1", 69)), ("[::1]:6969", ("::1", 6969)), (":0", ("0.0.0.0", 0)), ("10.0.0.1", ("10.0.0.1", 69))])
def test_parse_listen(value, expect):
    from orchestrator.bootserver.tftpd_cli import parse_listen

    assert parse_listen(value) == expect


async def test_failing_dynamic_source_and_read_errors_cost_one_request(start, root):
    class Broken(BootFiles):
        def open(self, name, client_ip=None):
            if name == "boom":
                raise RuntimeError("bug in the plan's renderer")
            if name == "eio":
                return EioFile()
            return super().open(name, client_ip)

    class EioFile:
        name, size = "eio", 5000

        def pread(self, offset, length):
            raise OSError(5, "Input/output error")

        def close(self):
            pass

    with trio.fail_after(10):
        srv = await start(Broken(root))
        with pytest.raises(TftpDownloadError) as e:
            await tftp_get(*srv.addr, "boom")
        assert e.value.failure.code == p.ERR_NOT_DEFINED
        a = await peer()
        await a.send(p.encode_request("eio"), srv.addr)  # fails on the first read
        ev = await srv.next_event(EventKind.FILE_FAILED)
        ev = await srv.next_event(EventKind.FILE_FAILED)
        assert ev.filename == "eio" and ev.result == "error"
        assert ev.detail["blksize"] == 512  # failed inside the transfer, not at open
        assert srv.counters.errors == 2 and srv.counters.active == 0
        c = await tftp_get(*srv.addr, "small.txt")  # still serving
        assert len(c.data) == 13


async def test_stray_datagram_stream_cannot_keep_a_transfer_alive(start, autojump_clock):
    """Wrong-TID packets arriving faster than the timeout must not postpone reaping."""
    with trio.fail_after(60):
        srv = await start(timeout=1.0, retries=2, rto_min=None)
        a, b = await peer(), await peer()
        await a.send(p.encode_request("big.bin", options={"blksize": "512"}), srv.addr)
        _, tid = await a.recv()
        await a.send(p.encode_ack(0), tid)  # a proven client: the full retry budget, which b must not extend
        t0 = trio.current_time()
        while srv.counters.active:
            assert trio.current_time() - t0 < 10, "transfer not reaped"
            await b.send(p.encode_ack(1), tid)
            await trio.sleep(0.25)
        assert srv.counters.wrong_tid >= 10
        ev = await srv.next_event(EventKind.FILE_FAILED)
        assert ev.result == "timeout"
