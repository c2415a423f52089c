"""The TFTP server when requests outnumber its slots: nobody is told "busy", finished slots free at once.

A PXE ROM takes any TFTP ERROR as final (PXE-E32/E35: it sits until a power
cycle), so a server that is only full must never send one: a request that finds
every slot taken waits (bounded), and one over a cap gets no answer at all (the
ROM retries, as after a lost datagram). Real UDP sockets on 127.0.0.1, port 0;
``autojump_clock`` wherever a timeout is the point.
"""

from __future__ import annotations

import socket
from functools import partial

import pytest
import trio
import trio.testing

from orchestrator.bootserver.admission import Admission
from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.tftp import TftpCounters, serve_tftp, tftp_get
from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols import tftp as p

HOST = "127.0.0.1"
FLOOD = [f"127.0.0.{i}" for i in range(2, 12)]


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (r / "small.txt").write_bytes(b"hello\nworld\r\n")
    (r / "big.bin").write_bytes(bytes(range(256)) * 1000)
    return r


async def _start(nursery, root, **kw):
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, BootFiles(root), HOST, 0, counters=counters, **kw))
    return addr, counters


class Udp:
    """A plain non-blocking socket: ``send`` does not yield, so two sends land back to back."""

    def __init__(self, host: str = HOST) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((host, 0))

    def send(self, data: bytes, addr) -> None:
        self.sock.sendto(data, addr)

    async def recv(self) -> tuple[bytes, tuple[str, int]]:
        while True:
            try:
                data, src = self.sock.recvfrom(65536)
                return data, src[:2]
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)

    async def silent(self, seconds: float) -> bool:
        """True if nothing arrives for ``seconds``."""
        with trio.move_on_after(seconds):
            await self.recv()
            return False
        return True

    def close(self) -> None:
        self.sock.close()


async def test_a_finished_transfers_slot_is_free_before_its_clients_next_request(nursery, root, autojump_clock):
    """One slot, no waiting room: the final ACK and the next RRQ arrive together (sent back to
    back, before the server runs); the next request must find the slot already free."""
    with trio.fail_after(30):
        addr, counters = await _start(nursery, root, max_transfers=1, max_waiting=0, engine="trio")
        for _ in range(3):
            a, b = Udp(), Udp()
            a.send(p.encode_request("small.txt"), addr)
            data, tid = await a.recv()
            assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")  # the last block
            a.send(p.encode_ack(1), tid)  # the final ACK ...
            b.send(p.encode_request("small.txt"), addr)  # ... and the next request, at once
            data, tid_b = await b.recv()
            assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")  # served, not dropped, never "busy"
            b.send(p.encode_ack(1), tid_b)
            a.close()
            b.close()
            await trio.testing.wait_all_tasks_blocked()
        assert counters.refused == 0 and counters.waited == 0
        assert counters.transfers_ok == 6 and counters.transfers_failed == 0


async def test_next_request_right_after_the_final_ack_is_served_on_the_engine_thread(nursery, root):
    """The same race on the real clock with the engine's threads: the request may wait an instant, never refused."""
    with trio.fail_after(30):
        addr, counters = await _start(nursery, root, max_transfers=1)
        for _ in range(5):
            a, b = Udp(), Udp()
            a.send(p.encode_request("small.txt"), addr)
            data, tid = await a.recv()
            a.send(p.encode_ack(1), tid)
            b.send(p.encode_request("small.txt"), addr)
            data, tid_b = await b.recv()
            assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")
            b.send(p.encode_ack(1), tid_b)
            a.close()
            b.close()
        while counters.transfers_ok < 10:
            await trio.sleep(0.001)  # the engine thread reports the last ACK asynchronously; bounded by fail_after
        assert counters.refused == 0 and counters.transfers_failed == 0


async def test_a_retried_request_waits_and_is_never_answered_busy(nursery, root, autojump_clock):
    with trio.fail_after(60):
        addr, counters = await _start(nursery, root, max_transfers=1, timeout=1.0, retries=5)
        a, b = Udp(), Udp()
        a.send(p.encode_request("big.bin"), addr)
        data, tid_a = await a.recv()
        assert p.parse_packet(data).block == 1
        a.send(p.encode_ack(1), tid_a)  # a proven client holding the only slot
        await a.recv()
        b.send(p.encode_request("small.txt"), addr)
        for _ in range(3):  # the ROM's timer: it asks again, and again
            assert await b.silent(1.0), "a waiting request was answered"
            b.send(p.encode_request("small.txt"), addr)
        await trio.testing.wait_all_tasks_blocked()
        assert counters.waiting == 1 and counters.duplicate_requests == 3 and counters.refused == 0
        a.send(p.encode_error(0, "done"), tid_a)  # the slot frees
        data, tid_b = await b.recv()
        assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")
        b.send(p.encode_ack(1), tid_b)
        assert await b.silent(5.0)  # one answer, no ERROR after it
        await trio.testing.wait_all_tasks_blocked()
        assert counters.transfers_ok == 1 and counters.waiting == 0 and counters.waited == 1
        a.close()
        b.close()


async def test_the_waiting_queue_is_bounded_and_a_full_one_answers_nothing(nursery, root, autojump_clock):
    with trio.fail_after(60):
        addr, counters = await _start(nursery, root, max_transfers=2, max_waiting=3, max_per_client=100, retries=1)
        peers = [Udp() for _ in range(10)]
        for q in peers:
            q.send(p.encode_request("big.bin"), addr)
        await trio.testing.wait_all_tasks_blocked()
        assert counters.active == 2 and counters.waiting == 3 and counters.refused == 5
        for q in peers[5:]:
            assert await q.silent(0.1)  # dropped: no ERROR for a ROM to take as final
        for q in peers:
            q.close()


async def test_a_superseding_request_ends_a_wait_for_an_admission_slot(nursery, root, autojump_clock):
    """A port whose request waits for admission asks for something else: the wait ends ("superseded")
    and the new request takes its turn; the old file is never sent."""
    with trio.fail_after(60):
        adm = Admission(max_active=1)
        addr, counters = await _start(nursery, root, admission=adm)
        a, b = Udp(), Udp()
        a.send(p.encode_request("big.bin"), addr)
        _, tid_a = await a.recv()
        b.send(p.encode_request("big.bin"), addr)
        await trio.testing.wait_all_tasks_blocked()
        assert adm.queued == 1
        b.send(p.encode_request("small.txt"), addr)
        await trio.testing.wait_all_tasks_blocked()
        assert counters.superseded == 1 and adm.queued == 1  # the new request waits in the old one's place
        a.send(p.encode_error(0, "stop"), tid_a)
        data, _ = await b.recv()
        assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")
        a.close()
        b.close()


async def test_a_client_that_acked_before_goes_ahead_of_a_forged_flood(nursery, root, autojump_clock):
    """Slots and queue full of forged RRQs (never ACKed): a node that already downloaded from
    this server takes the newest forged waiter's place and gets the first free slot."""
    with trio.fail_after(60):
        addr, counters = await _start(nursery, root, max_transfers=2, max_waiting=4, max_per_client=100, timeout=1.0, retries=1,
                                      unproven_resend_rate=0)
        c = await tftp_get(*addr, "small.txt")  # 127.0.0.1 is now a proven address
        assert bytes(c.data) == b"hello\nworld\r\n"
        await trio.testing.wait_all_tasks_blocked()
        flood = [Udp(FLOOD[i]) for i in range(6)]
        for q in flood:
            q.send(p.encode_request("big.bin"), addr)
        await trio.testing.wait_all_tasks_blocked()
        assert counters.active == 2 and counters.waiting == 4
        t0 = trio.current_time()
        node = Udp()
        node.send(p.encode_request("small.txt"), addr)
        await trio.testing.wait_all_tasks_blocked()
        assert counters.waiting == 4 and counters.refused == 1  # the newest forged waiter left
        data, _ = await node.recv()
        assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")
        # The first forged pair ends after its one resend (2 x 1 s): the node is next, not fifth.
        assert trio.current_time() - t0 == pytest.approx(2.0)
        for q in [*flood, node]:
            q.close()


async def test_a_different_request_from_a_waiting_port_takes_its_place(nursery, root, autojump_clock):
    with trio.fail_after(60):
        addr, counters = await _start(nursery, root, max_transfers=1, max_waiting=4)
        a, b, c = Udp(), Udp(), Udp()
        a.send(p.encode_request("big.bin"), addr)
        _, tid_a = await a.recv()
        b.send(p.encode_request("big.bin"), addr)
        c.send(p.encode_request("small.txt"), addr)  # waits behind b
        b.send(p.encode_request("small.txt"), addr)  # b moved on: it keeps its place, with the new request
        await trio.testing.wait_all_tasks_blocked()
        assert counters.waiting == 2 and counters.superseded == 1 and counters.duplicate_requests == 0
        a.send(p.encode_error(0, "stop"), tid_a)
        data, tid_b = await b.recv()
        assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")  # the new request, first in line
        assert await c.silent(0.5)
        b.send(p.encode_ack(1), tid_b)
        data, _ = await c.recv()
        assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")
        for q in (a, b, c):
            q.close()


async def test_a_client_that_only_re_acks_is_served_until_max_stall_not_given_up_by_the_retries(nursery, root, autojump_clock):
    """A proven client that keeps re-ACKing block 1 while every later DATA is lost to it (here: it
    ignores them) is alive: the server resends on its timer past its 5 retries, never in answer to a
    duplicate ACK, and ends the transfer only at max_stall (60 s) -- the cap for a peer that only re-ACKs."""
    send, recv = trio.open_memory_channel[BootEvent](100)
    addr, counters = await _start(nursery, root, events=send, retries=5)
    c = Udp()
    with trio.fail_after(300):
        c.send(p.encode_request("big.bin"), addr)
        data, tid = await c.recv()
        assert p.parse_packet(data).block == 1
        c.send(p.encode_ack(1), tid)
        t_ack = trio.current_time()
        data2 = 0

        async def reack() -> None:
            while True:
                await trio.sleep(0.5)
                c.send(p.encode_ack(1), tid)

        async def count_data() -> None:
            nonlocal data2
            while True:
                pkt = p.parse_packet((await c.recv())[0])
                assert pkt.block == 2, pkt  # never anything but DATA 2 again
                data2 += 1

        async with trio.open_nursery() as n:
            n.start_soon(reack)
            n.start_soon(count_data)
            while (ev := await recv.receive()).kind is not EventKind.FILE_FAILED:
                assert ev.kind is EventKind.FILE_REQUEST, ev
            n.cancel_scope.cancel()
        assert ev.result == "timeout" and ev.bytes == 512
        assert trio.current_time() - t_ack == pytest.approx(60.0)  # max_stall, not 5 backed-off timeouts (~10 s)
        assert ev.retransmits > 5
        assert data2 == 1 + ev.retransmits  # the first send and the timer's resends: no answer to ~120 duplicate ACKs
        assert counters.transfers_failed == 1 and counters.active == 0
        c.close()
