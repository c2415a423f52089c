"""The transfer engine (``orchestrator/bootserver/tftp_engine.py``) in its thread mode.

The server tests in ``test_tftp_server.py`` already run every case against the
engine thread (real clock) and the trio driver. These cover what only the
thread mode has: real-time reaping, shutdown of the thread, batched counters
and admission accounting, and the UDP GSO send path with its fallback. Real
clock, localhost, port 0, a ``fail_after`` on every test; waits are on events,
never on sleeps.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from functools import partial

import pytest
import trio

from orchestrator.bootserver import lockstep_native
from orchestrator.bootserver.admission import Admission
from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.tftp import TftpCounters, TftpServer, serve_tftp, tftp_get
from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols import tftp as p

HOST = "127.0.0.1"


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (r / "big.bin").write_bytes(os.urandom(300_000))
    return r


async def next_event(recv, kind: EventKind) -> BootEvent:
    while True:
        ev = await recv.receive()
        if ev.kind is kind:
            return ev


def engine_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name in ("tftp-engine", "tftp-transfer"))


async def test_thread_engine_reaps_a_vanished_client_on_the_real_clock(nursery, root):
    with trio.fail_after(10):
        send, recv = trio.open_memory_channel[BootEvent](100)
        counters = TftpCounters()
        addr = await nursery.start(partial(serve_tftp, BootFiles(root), HOST, 0, events=send, counters=counters,
                                           engine="thread", timeout=0.05, retries=2))
        s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            await s.bind((HOST, 0))
            await s.sendto(p.encode_request("big.bin"), addr)
            _, tid = await s.recvfrom(65536)
            # Any ACK from the client's port proves its address (even this one, which
            # acknowledges nothing): the full retry budget applies, not the one resend
            # a client that never ACKs gets.
            await s.sendto(p.encode_ack(0), tid)
            ev = await next_event(recv, EventKind.FILE_FAILED)
        assert ev.result == "timeout" and ev.retransmits == 2
        # Counters reach trio before the event that ends the transfer.
        assert counters.retransmits == 2 and counters.packets_out == 3 and counters.active == 0


@pytest.mark.parametrize("options, threads", [
    # Windows get threads of their own only with the native loop (a Python thread gains nothing there).
    ({"windowsize": 8}, ["tftp-engine", "tftp-transfer", "tftp-transfer"] if lockstep_native.AVAILABLE else ["tftp-engine"]),
    # Lock-step: the first TRANSFER_THREADS transfers get their own thread, the third shares the epoll.
    ({"blksize": 512}, ["tftp-engine", "tftp-transfer", "tftp-transfer"]),
])
async def test_cancelling_the_server_stops_the_thread_and_closes_every_socket(root, options, threads):
    with trio.fail_after(10):
        fds0 = len(os.listdir("/proc/self/fd"))
        assert engine_threads() == []
        clients = []
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(partial(serve_tftp, BootFiles(root), HOST, 0, engine="thread"))
            for _ in range(3):  # three transfers in flight, each waiting for an ACK
                s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                await s.bind((HOST, 0))
                await s.sendto(p.encode_request("big.bin", options=options), addr)
                data, _ = await s.recvfrom(65536)
                assert isinstance(p.parse_packet(data), p.OptionAck)
                clients.append(s)
            assert engine_threads() == threads
            nursery.cancel_scope.cancel()
        for s in clients:
            s.close()
        # The engine thread returned before serve_tftp did (trio's thread cache may
        # keep the OS thread, idle and renamed), and every socket and file is closed.
        assert engine_threads() == []
        assert len(os.listdir("/proc/self/fd")) == fds0


async def test_thread_engine_feeds_admission_slots_and_byte_accounting(nursery, root):
    with trio.fail_after(20):
        adm = Admission(max_active=1)  # slots but no byte-rate budget: the thread engine
        send, recv = trio.open_memory_channel[BootEvent](100)
        server = TftpServer(BootFiles(root), events=send, admission=adm)
        addr = await nursery.start(partial(server.serve, HOST, 0))
        assert server._engine is not None and server._engine.mode == "thread"
        got = []

        async def one() -> None:
            c = await tftp_get(*addr, "big.bin", options={"blksize": 1468, "windowsize": 16})
            got.append(bytes(c.data))

        async with trio.open_nursery() as inner:
            for _ in range(3):
                inner.start_soon(one)
        want = (root / "big.bin").read_bytes()
        assert got == [want] * 3
        for _ in range(3):
            await next_event(recv, EventKind.FILE_DONE)
        load = adm.load(trio.current_time())
        assert load.active == 0 and load.queued == 0
        assert load.bytes_per_s > 0  # note_sent reached the admission object, in batches
        assert load.rtt is not None and 0 < load.rtt < 1.0  # block round trips too (the scheduler's delay signal)


def test_rate_budget_or_virtual_clock_selects_the_trio_driver(root):
    async def pick(**kw) -> str:
        return TftpServer(BootFiles(root), **kw)._pick_engine()

    assert trio.run(pick) == "thread"
    assert trio.run(partial(pick, admission=Admission(max_active=2))) == "thread"
    assert trio.run(partial(pick, admission=Admission(rate=1e6))) == "trio"
    assert trio.run(pick, clock=trio.testing.MockClock()) == "trio"
    assert trio.run(partial(pick, engine="thread"), clock=trio.testing.MockClock()) == "thread"
    with pytest.raises(ValueError):
        TftpServer(BootFiles(root), engine="fibres")


async def test_a_gso_window_arrives_as_separate_datagrams(nursery, root):
    """One sendmsg with UDP_SEGMENT must look, to the client, like N plain DATA packets."""
    with trio.fail_after(10):
        addr = await nursery.start(partial(serve_tftp, BootFiles(root), HOST, 0, engine="thread"))
        s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            await s.bind((HOST, 0))
            await s.sendto(p.encode_request("big.bin", options={"blksize": 512, "windowsize": 16}), addr)
            _, tid = await s.recvfrom(65536)
            await s.sendto(p.encode_ack(0), tid)
            want = (root / "big.bin").read_bytes()
            for blk in range(1, 17):
                data, src = await s.recvfrom(65536)
                assert src[:2] == tid[:2]
                assert p.parse_packet(data) == p.Data(blk, want[(blk - 1) * 512 : blk * 512])
            await s.sendto(p.encode_error(0, "enough"), tid)


async def test_gso_refused_by_the_path_falls_back_to_one_datagram_each(nursery, root, monkeypatch):
    """EIO (no checksum offload, e.g. a TUN link) or EINVAL (block > MTU): send one by one."""
    calls = []

    def refuse(self, *args, **kw):
        calls.append(len(args[0]))
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(socket.socket, "sendmsg", refuse)
    with trio.fail_after(10):
        counters = TftpCounters()
        addr = await nursery.start(partial(serve_tftp, BootFiles(root), HOST, 0, engine="thread", counters=counters))
        c = await tftp_get(*addr, "big.bin", options={"blksize": 1468, "windowsize": 16})
        assert bytes(c.data) == (root / "big.bin").read_bytes()
        assert calls == [16]  # tried once, then GSO is off for the transfer


async def test_stray_datagrams_cannot_keep_a_lock_step_thread_transfer_alive(nursery, root):
    """On the fast path a stray datagram restarts the blocking recvfrom: the timer must still fire."""
    with trio.fail_after(20):
        send, recv = trio.open_memory_channel[BootEvent](100)
        counters = TftpCounters()
        addr = await nursery.start(partial(serve_tftp, BootFiles(root), HOST, 0, events=send, counters=counters,
                                           engine="thread", timeout=0.3, retries=1))
        a = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with a, b:
            await a.bind((HOST, 0))
            await b.bind((HOST, 0))
            await a.sendto(p.encode_request("big.bin"), addr)
            _, tid = await a.recvfrom(65536)
            t0 = trio.current_time()
            done = None
            while done is None:
                await b.sendto(p.encode_ack(1), tid)  # faster than the 0.3 s timeout
                with trio.move_on_after(0.05):
                    done = await next_event(recv, EventKind.FILE_FAILED)
        assert done.result == "timeout"
        assert trio.current_time() - t0 < 0.3 * 2 + 0.5  # 1 retransmit, then give up: not postponed
        assert counters.wrong_tid >= 5
