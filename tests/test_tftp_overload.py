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
from orchestrator.bootserver.tftp import TftpCounters, TftpServer, serve_tftp, tftp_get
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


async def test_a_request_for_a_missing_file_is_answered_at_once_not_queued(nursery, root, autojump_clock):
    """Every slot taken: a request for a file that does not exist (pxelinux's config walk) gets its ERROR 1
    at once -- it needs no slot --, while one for an existing file waits silently. (Only a request that would
    get a place in the queue is looked up: one that finds the queue full is dropped before any file work.)"""
    with trio.fail_after(60):
        addr, counters = await _start(nursery, root, max_transfers=1, max_waiting=4, engine="trio")
        a, b, c = Udp(), Udp(), Udp()
        a.send(p.encode_request("big.bin"), addr)
        _, tid_a = await a.recv()
        c.send(p.encode_request("small.txt"), addr)
        b.send(p.encode_request("pxelinux.cfg/01-52-54-00-00-00-01"), addr)
        t0 = trio.current_time()
        data, _ = await b.recv()
        assert isinstance(p.parse_packet(data), p.Error) and p.parse_packet(data).code == p.ERR_FILE_NOT_FOUND
        assert trio.current_time() == t0  # not after a.'s transfer
        assert counters.waiting == 1 and counters.waited == 1 and counters.transfers_failed == 1
        assert await c.silent(1.0)
        a.send(p.encode_error(0, "stop"), tid_a)
        data, _ = await c.recv()
        assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")
        for q in (a, b, c):
            q.close()


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
    this server takes the newest forged waiter's place and starts in the first round of freed
    slots (no forged transfer has ended yet, so the queues take turns: it is next, not fifth)."""
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


async def test_under_a_sustained_forged_flood_a_proven_client_gets_the_first_free_slot(nursery, root, autojump_clock):
    """A flood that keeps the one slot and the queue full for 40 s: once most transfers to unproven
    addresses die without an ACK, the proven queue goes first: a node that downloaded before starts
    when the slot next frees (<= 2 s, one forged transfer's life), whenever it asks, and so does a second
    request asking at the same time (taking turns with the flood, it would wait for a forged transfer first)."""
    server = TftpServer(BootFiles(root), max_transfers=1, max_waiting=4, max_per_client=100, timeout=1.0, retries=1,
                        unproven_resend_rate=0, counters=TftpCounters())
    addr = await nursery.start(server.serve, HOST, 0)
    flood: list[Udp] = []
    with trio.fail_after(120):
        c = await tftp_get(*addr, "small.txt")  # 127.0.0.1 is now a proven address
        assert bytes(c.data) == b"hello\nworld\r\n"

        async def forge() -> None:
            for i in range(160):  # 4 RRQs a second from fresh ports: more than the slot serves (one per 2 s)
                q = Udp(FLOOD[i % len(FLOOD)])
                flood.append(q)
                q.send(p.encode_request("big.bin"), addr)
                await trio.sleep(0.25)

        async with trio.open_nursery() as n:
            n.start_soon(forge)
            await trio.sleep(20.0)  # ten forged transfers died
            assert server.flooded() and server.counters.waiting >= 3  # no forged transfer was ever ACKed; the queue stays full
            for _ in range(3):
                nodes = [Udp(), Udp()]  # two requests from the proven address at once
                t0 = trio.current_time()
                for node in nodes:
                    node.send(p.encode_request("small.txt"), addr)
                for node in nodes:
                    data, tid = await node.recv()
                    assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")
                    # The slot's next two turns, ahead of every forged waiter (taking turns with the flood, the
                    # second would wait for one forged transfer: up to 4 s).
                    assert trio.current_time() - t0 <= 2.0
                    node.send(p.encode_ack(1), tid)
                    node.close()
                await trio.sleep(7.3)
        assert server.counters.transfers_ok == 7 and server.counters.refused > 100
    for q in flood:
        q.close()


async def test_a_waiter_whose_client_went_silent_is_dropped_before_it_gets_a_slot(nursery, root, autojump_clock):
    """One slot, held 20 s by a slow client. One waiter asks once and goes silent (a ROM that gave up),
    one keeps re-sending its RRQ: when the slot frees, the silent one (not heard for > 15 s) is dropped
    and the live one starts -- no slot is spent on a client that is gone."""
    with trio.fail_after(120):
        addr, counters = await _start(nursery, root, max_transfers=1, max_waiting=4, engine="trio")
        a, gone, live = Udp(), Udp("127.0.0.2"), Udp("127.0.0.3")
        a.send(p.encode_request("big.bin"), addr)
        data, tid_a = await a.recv()
        gone.send(p.encode_request("small.txt"), addr)
        live.send(p.encode_request("small.txt"), addr)
        for block in range(1, 41):  # 20 s of slow ACKs
            await trio.sleep(0.5)
            a.send(p.encode_ack(block), tid_a)
            await a.recv()
            if block % 10 == 0:
                live.send(p.encode_request("small.txt"), addr)  # every 5 s: still there
        assert counters.waiting == 2
        a.send(p.encode_error(0, "stop"), tid_a)
        data, _ = await live.recv()
        assert p.parse_packet(data) == p.Data(1, b"hello\nworld\r\n")
        assert await gone.silent(5.0)
        assert counters.wait_expired == 1 and counters.waiting == 0
        for q in (a, gone, live):
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


ROMS = [f"127.0.0.{i}" for i in range(30, 40)]
NODES = [f"127.0.0.{i}" for i in range(20, 24)]
ROM_TIMEOUTS = (1.0, 2.0, 4.0, 8.0)  # orchestrator.sim.machine.ROM_TFTP_TIMEOUTS: gives up after 15 s


async def _lockstep(q: Udp, data: bytes, tid, ack_delay: float = 0.0) -> int:
    """Receive a file block by block from ``data`` (DATA 1) on: ACK each block (after ``ack_delay``), ignore resends; its size."""
    pkt, expect, size = p.parse_packet(data), 1, 0
    while True:
        if isinstance(pkt, p.Data) and pkt.block == expect:
            size += len(pkt.payload)
            if ack_delay:
                await trio.sleep(ack_delay)
            q.send(p.encode_ack(pkt.block), tid)
            if len(pkt.payload) < 512:
                return size
            expect += 1
        data, _ = await q.recv()
        pkt = p.parse_packet(data)


async def _rom(addr, src: str, filename: str) -> float | None:
    """A PXE ROM: its RRQ re-sent from the same port after 1, 2 and 4 s; it gives up 8 s after the last
    (15 s in all) without an answer. Returns how long it waited for its first DATA, or None if it gave up."""
    q = Udp(src)
    try:
        t0 = trio.current_time()
        for t in ROM_TIMEOUTS:
            q.send(p.encode_request(filename), addr)
            with trio.move_on_after(t):
                data, tid = await q.recv()
                break
        else:
            return None
        waited = trio.current_time() - t0
        await _lockstep(q, data, tid)
        return waited
    finally:
        q.close()


async def _node(addr, src: str, filename: str, n: int, ack_delay: float) -> None:
    """A booting node past its ROM (pxelinux-like): ``n`` downloads one after the other, its RRQ re-sent every 2 s
    while it waits (patient), each block ACKed after ``ack_delay`` (so each download holds its slot for a while)."""
    for _ in range(n):
        q = Udp(src)
        try:
            while True:
                q.send(p.encode_request(filename), addr)
                with trio.move_on_after(2.0):
                    data, tid = await q.recv()
                    break
            await _lockstep(q, data, tid, ack_delay)
        finally:
            q.close()


async def test_a_storm_of_roms_is_not_starved_by_proven_nodes_next_files(nursery, root, autojump_clock):
    """Two slots; four proven nodes keep asking for their next (slow, ~2 s) file, so proven requests always
    wait; ten ROMs (15 s patience) ask for their loader. The ROMs' transfers do get ACKed (a storm of real
    ROMs, not a forged flood), so the queue serves them in turn with the proven nodes: every ROM gets its
    loader well within its patience, and every node its files."""
    (root / "mid.bin").write_bytes(b"m" * 1800)  # 4 blocks: ~2 s at 0.5 s per ACK
    with trio.fail_after(300):
        addr, counters = await _start(nursery, root, max_transfers=2, max_waiting=32, max_per_client=100, engine="trio")
        for src in NODES:  # each node downloads once: its address is proven
            await _node(addr, src, "small.txt", 1, 0.0)
        waits: dict[str, float | None] = {}

        async def rom(src: str) -> None:
            waits[src] = await _rom(addr, src, "small.txt")

        async with trio.open_nursery() as n:
            for src in NODES:
                n.start_soon(_node, addr, src, "mid.bin", 8, 0.5)
            await trio.sleep(1.0)  # both slots busy, two proven requests waiting
            assert counters.active == 2 and counters.waiting == 2
            for src in ROMS:
                n.start_soon(rom, src)
        await trio.testing.wait_all_tasks_blocked()  # the last final ACKs are read
        assert all(w is not None for w in waits.values()), waits  # no ROM gave up
        assert len(waits) == len(ROMS) and max(waits.values()) < sum(ROM_TIMEOUTS), waits  # two every ~2 s: 1, 3, 3, ... 11 s
        assert counters.transfers_ok == len(NODES) * 9 + len(ROMS) and counters.transfers_failed == 0
        assert counters.wait_expired == 0 and counters.refused == 0


async def test_a_rom_that_comes_to_a_queue_full_of_proven_requests_takes_the_newest_ones_place(nursery, root, autojump_clock):
    """One slot, room for two waiters, all taken by proven nodes (patient: they re-send every 2 s). A late ROM
    takes the newest proven waiter's place (that node asks again later) and gets its loader within its patience."""
    (root / "mid.bin").write_bytes(b"m" * 1800)
    with trio.fail_after(120):
        addr, counters = await _start(nursery, root, max_transfers=1, max_waiting=2, max_per_client=100, engine="trio")
        for src in NODES[:3]:
            await _node(addr, src, "small.txt", 1, 0.0)
        waits: list[float | None] = []

        async def rom() -> None:
            waits.append(await _rom(addr, ROMS[0], "small.txt"))

        async with trio.open_nursery() as n:
            for src in NODES[:3]:
                n.start_soon(_node, addr, src, "mid.bin", 2, 0.5)
            await trio.sleep(0.1)
            assert counters.active == 1 and counters.waiting == 2 and counters.refused == 0
            n.start_soon(rom)
            await trio.sleep(0.1)
            assert counters.waiting == 2 and counters.refused == 1  # the ROM waits; the newest node was dropped
        assert waits[0] is not None and waits[0] < sum(ROM_TIMEOUTS), waits
        await trio.testing.wait_all_tasks_blocked()
        assert counters.transfers_ok == 3 + 6 + 1 and counters.transfers_failed == 0
