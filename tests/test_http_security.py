"""HTTP boot server against clients that hold transfer slots: slow readers, greedy addresses.

The attack: a few clients request a big file and then read it very slowly (or
not at all), so each holds an admission slot for as long as it likes and real
clients queue behind them. The defences: a per-client-address cap on body
transfers, and a minimum transfer rate -- measured over the time the client
makes the server wait in ``send`` -- that a transfer must keep up *when others
are waiting for a slot*.

Clients bind 127.0.0.x source addresses to act as different machines (TCP
source addresses cannot be forged the way a UDP source can). Time logic runs
under the autojump clock with in-process clients that either read nothing or
read slowly in virtual time; the kernel moves loopback data synchronously, so
no test depends on a real-time kernel timer for its outcome. curl checks that a
real client we did not write still downloads normally under the new limits.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tracemalloc
from pathlib import Path

import pytest
import trio
import trio.testing

from orchestrator.bootserver.admission import Admission
from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.http import CHUNK_SIZE, serve_http
from orchestrator.events import EventKind
from tests.test_http_server import Srv, curl, read_response, start

HUGE = 64 * 1024 * 1024  # sparse; far more than any socket buffer holds
GET_HUGE = b"GET /huge.bin HTTP/1.1\r\nHost: x\r\n\r\n"
GET_SMALL = b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "boot"
    r.mkdir()
    (r / "small.txt").write_bytes(b"hello boot\n")
    with open(r / "huge.bin", "wb") as f:
        f.truncate(HUGE)
    (r / "kernel").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    return r


async def connect(srv: Srv, source: str, *, rcvbuf: int | None = None) -> trio.SocketStream:
    """A TCP connection to the server from ``source`` (a 127.0.0.x address), small receive buffer on request."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:  # before connect, so the window scale is small too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.bind((source, 0))
        await sock.connect((srv.host, srv.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def reset(stream: trio.SocketStream) -> None:
    """Close with RST (not FIN): the server's next write fails at once."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await stream.aclose()


async def read_until_closed(stream: trio.SocketStream) -> None:
    """Read until the server ends the connection (EOF or reset); bounded by what the server sent."""
    while True:  # ends: the server has closed its side, so the bytes in flight are finite
        try:
            if not await stream.receive_some(1 << 20):
                return
        except trio.BrokenResourceError:
            return


def failed_events(srv: Srv) -> list:
    return [e for e in srv.drain() if e.kind is EventKind.FILE_FAILED]


async def test_slow_readers_holding_every_slot_do_not_starve_a_normal_get(autojump_clock, nursery, root: Path):
    """Four addresses take all four slots and stop reading; a fifth address still gets its file.

    Before: the GET queued until a slow reader's send timed out (here: never,
    ``send_timeout`` is long, as a 256 KiB chunk at ~9 KB/s is enough to beat
    the default 30 s). After: one slow reader -- only one, as one client waits --
    loses its slot with FILE_FAILED ``too_slow``, and the server keeps holding
    about one chunk of memory per transfer.
    """
    adm = Admission(max_active=4)
    srv = await start(nursery, root, admission=adm, send_timeout=3600.0)
    with trio.fail_after(600):
        slow = []
        tracemalloc.start()
        try:
            for i in range(4):
                s = await connect(srv, f"127.0.0.{2 + i}", rcvbuf=4096)
                await s.send_all(GET_HUGE)
                slow.append(s)
            await trio.testing.wait_all_tasks_blocked()
            assert adm.load(trio.current_time()).active == 4
            # Python memory: one chunk per stalled transfer (the kernel holds the socket buffers).
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * CHUNK_SIZE + 2 * 1024 * 1024, peak

        normal = await connect(srv, "127.0.0.10")
        await normal.send_all(GET_SMALL)
        head, body = await read_response(normal)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello boot\n"

        failed = failed_events(srv)
        assert [(e.filename, e.result) for e in failed] == [("huge.bin", "too_slow")]
        assert failed[0].client_ip in {"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"}
        assert failed[0].size == HUGE and failed[0].bytes < HUGE
        assert srv.stats.too_slow == 1
        # Nobody waits any more: the other three keep their slots.
        await trio.testing.wait_all_tasks_blocked()
        assert adm.load(trio.current_time()).active == 3
        # The evicted client's connection is closed; the others' are not.
        evicted = next(s for s in slow if s.socket.getsockname()[0] == failed[0].client_ip)
        await read_until_closed(evicted)
        for s in slow:
            await s.aclose()
        await normal.aclose()


async def test_one_address_cannot_hold_more_than_the_per_client_cap(autojump_clock, nursery, root: Path):
    """Six GETs from one address: four transfer (the default cap), two wait without a slot."""
    adm = Admission(max_active=10)
    srv = await start(nursery, root, admission=adm, send_timeout=3600.0)
    with trio.fail_after(600):
        conns = []
        for _ in range(6):
            s = await connect(srv, "127.0.0.2", rcvbuf=4096)
            await s.send_all(GET_HUGE)
            conns.append(s)
        await trio.testing.wait_all_tasks_blocked()
        assert srv.stats.active == 4
        # The two over the cap wait at the client's own gate, not in the shared slot queue.
        load = adm.load(trio.current_time())
        assert (load.active, load.queued) == (4, 0)
        assert srv.stats.client_waits == 2

        started, waiting = [], []
        for s in conns:
            with trio.move_on_after(5):
                got = await s.receive_some(65536)
                assert got.startswith(b"HTTP/1.1 200 ")
                started.append(s)
                continue
            waiting.append(s)
        assert (len(started), len(waiting)) == (4, 2)

        # Another address is not held up by the first one's queue.
        other = await connect(srv, "127.0.0.3")
        await other.send_all(GET_SMALL)
        head, body = await read_response(other)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello boot\n"

        # When one of the four ends, a waiting request of the same client starts.
        await reset(started[0])
        async with trio.open_nursery() as n:
            heads: list[bytes] = []

            async def first_bytes(s: trio.SocketStream) -> None:
                heads.append(await s.receive_some(65536))
                n.cancel_scope.cancel()

            for s in waiting:
                n.start_soon(first_bytes, s)
        assert len(heads) == 1 and heads[0].startswith(b"HTTP/1.1 200 ")
        await trio.testing.wait_all_tasks_blocked()
        assert srv.stats.active == 4
        assert [e.result for e in failed_events(srv)] == ["aborted"]
        for s in [*started[1:], *waiting]:
            await reset(s)
        await other.aclose()


async def test_slow_reader_alone_is_not_evicted(autojump_clock, nursery, root: Path):
    """A client reading ~8 KiB/s -- far below min_rate -- keeps its slot while nobody waits.

    Only when another request queues for the slot does it lose it (and the
    waiting request is then served).
    """
    adm = Admission(max_active=1)
    srv = await start(nursery, root, admission=adm, send_timeout=3600.0)
    with trio.fail_after(1200):
        s = await connect(srv, "127.0.0.2", rcvbuf=16384)
        await s.send_all(GET_HUGE)
        got = 0
        t0 = trio.current_time()
        while trio.current_time() - t0 < 120:  # two minutes of virtual time at ~8 KiB/s
            chunk = await s.receive_some(8192)
            assert chunk, "the server closed the slow reader's connection"
            got += len(chunk)
            await trio.sleep(1.0)
        assert got < 2 * 1024 * 1024  # it really was slow
        assert srv.stats.too_slow == 0 and srv.stats.timeouts == 0
        assert failed_events(srv) == []
        assert srv.stats.active == 1

        # Now someone waits for that slot: the slow reader gives it up.
        async with trio.open_nursery() as n:

            async def keep_reading() -> None:
                try:
                    while await s.receive_some(8192):  # until the server ends it
                        await trio.sleep(1.0)
                except trio.BrokenResourceError:
                    pass

            n.start_soon(keep_reading)
            normal = await connect(srv, "127.0.0.3")
            await normal.send_all(GET_SMALL)
            head, body = await read_response(normal)
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello boot\n"
        assert [e.result for e in failed_events(srv)] == ["too_slow"]
        await s.aclose()
        await normal.aclose()


async def test_our_own_pacing_does_not_count_against_the_client(autojump_clock, nursery, root: Path):
    """A fast client paced by the byte budget to 256 KiB/s is not evicted under a 1 MiB/s min_rate.

    The rate is measured over the time the *client* makes us wait in send, not
    over the time we sleep for the budget; a queued request waits its turn.
    """
    (root / "two-mib").write_bytes(bytes(2 * 1024 * 1024))
    adm = Admission(max_active=1, rate=256 * 1024, burst=64 * 1024)
    srv = await start(nursery, root, admission=adm, chunk_size=64 * 1024, min_rate=1024 * 1024)
    done: list[str] = []

    async def fetch(tag: str, source: str) -> None:
        s = await connect(srv, source)
        async with s:
            await s.send_all(b"GET /two-mib HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = await read_response(s)
            assert head.startswith(b"HTTP/1.1 200 ") and len(body) == 2 * 1024 * 1024
            done.append(tag)

    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            n.start_soon(fetch, "a", "127.0.0.2")
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(fetch, "b", "127.0.0.3")
    assert done == ["a", "b"]
    assert srv.stats.too_slow == 0
    assert failed_events(srv) == []


async def test_curl_parallel_downloads_under_per_client_cap(nursery, root: Path):
    """curl fetching six files at once from one address: two at a time transfer, the rest queue, all arrive intact."""
    want = hashlib.sha256((root / "kernel").read_bytes()).hexdigest()
    adm = Admission(max_active=8, rate=16 * 1024 * 1024)  # ~1.2 s in all: the six requests overlap
    srv = await start(nursery, root, admission=adm, max_per_client=2)
    out = root.parent / "out"
    out.mkdir()
    args: list[str] = []
    for i in range(6):
        args += ["-o", str(out / str(i)), srv.url("kernel")]
    with trio.fail_after(60):
        r = await curl("--parallel", "--parallel-max", "6", "--parallel-immediate", *args)
    assert r.returncode == 0, r.stderr
    for i in range(6):
        assert hashlib.sha256((out / str(i)).read_bytes()).hexdigest() == want
    assert srv.stats.by_status[200] == 6
    assert srv.stats.client_waits >= 1  # some requests did wait for the client's cap
    assert srv.stats.too_slow == 0
    assert failed_events(srv) == []


@pytest.mark.parametrize(
    ("kw", "msg"),
    [({"max_per_client": 0}, "max_per_client"), ({"min_rate": 0}, "min_rate"), ({"rate_window": 0}, "rate_window")],
)
async def test_limit_parameters_validated(root: Path, kw, msg):
    with trio.fail_after(5), pytest.raises(ValueError, match=msg):
        await serve_http(BootFiles(root), "127.0.0.1", 0, **kw)


async def test_one_address_cannot_fill_the_connection_cap(autojump_clock, nursery, root: Path):
    """An address beyond ``max_connections_per_client``: its own oldest idle connection goes, else the new one.

    Before: one address could open ``max_connections`` connections (requests
    queued at its own transfer gate hold theirs), and every other client then
    waited in the listen backlog.
    """
    srv = await start(nursery, root, max_connections=8, max_connections_per_client=3)
    with trio.fail_after(60):
        busy = []
        for _ in range(3):  # each has sent half a request: not idle, not evictable
            s = await connect(srv, "127.0.0.2")
            await s.send_all(b"GET /small.txt HTTP/1.1\r\n")
            busy.append(s)
        await trio.testing.wait_all_tasks_blocked()
        extra = await connect(srv, "127.0.0.2")
        assert await extra.receive_some(100) == b""  # closed at once: no idle one of its own to give up
        assert srv.stats.refused == 1
        other = await connect(srv, "127.0.0.3")  # another address is served meanwhile
        await other.send_all(GET_SMALL)
        head, body = await read_response(other)
        assert head.startswith(b"HTTP/1.1 200") and body == b"hello boot\n"
        # Idle keep-alives of the same address make room instead.
        for s in busy:
            await s.aclose()
        idle = []
        for _ in range(3):
            s = await connect(srv, "127.0.0.4")
            await s.send_all(GET_SMALL)
            await read_response(s)  # served, now idle (keep-alive)
            idle.append(s)
        await trio.testing.wait_all_tasks_blocked()
        newer = await connect(srv, "127.0.0.4")
        await newer.send_all(GET_SMALL)
        head, _ = await read_response(newer)
        assert head.startswith(b"HTTP/1.1 200")
        assert await idle[0].receive_some(100) == b""  # the oldest idle one was closed for it
        assert srv.stats.evictions >= 1
