"""HTTP boot server with more clients than transfer slots and connections: queue fairly, never refuse.

What iPXE does with overload answers (``src/net/tcp/httpcore.c``): a fresh
connection refused or reset, or a 5xx without ``Retry-After``, fails the
download for good; a reused keep-alive connection closed by the server is
reopened; an established connection waiting for its response has no deadline.
So these tests pin that overload only ever means *waiting on an established
connection* (or the closing of an idle keep-alive): every download completes,
nothing is refused or reset, no 503 is sent, waiters are served in arrival
order, a connection flood stays under the cap, and connections queued beyond
the cap cost the server no memory.

Clients bind 127.0.0.x / 127.66.x.y source addresses to act as different
machines. curl (not ours) is the real client in the flood test; the ordering
tests run in-process clients under the autojump clock (the kernel moves
loopback data synchronously, so no outcome depends on a real-time timer).
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
from orchestrator.events import EventKind
from tests.test_http_server import read_response, start

KERNEL = 3 * 1024 * 1024 + 5  # not a multiple of the chunk
HUGE = 64 * 1024 * 1024  # sparse; far more than any socket buffer holds


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "boot"
    r.mkdir()
    (r / "vmlinuz").write_bytes(os.urandom(KERNEL))
    (r / "script.ipxe").write_bytes(b"#!ipxe\nchain vmlinuz\n")
    with open(r / "huge.bin", "wb") as f:
        f.truncate(HUGE)
    return r


def get(name: str) -> bytes:
    return f"GET /{name} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


async def files_done(srv, n: int) -> list:
    """The next ``n`` FILE_DONE events: the server records one a moment after the client has the last byte."""
    done = []
    with trio.fail_after(30):
        while len(done) < n:
            e = await srv.events.receive()
            if e.kind is EventKind.FILE_DONE:
                done.append(e)
    return done


async def connect(port: int, source: str, *, rcvbuf: int | None = None) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:port from ``source``; a small receive buffer on request (set before connect)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def reset(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    await stream.aclose()


# -- every download completes (curl, the real client) ------------------------------------


@pytest.mark.parametrize("sendfile", [True, False], ids=["sendfile", "pread"])
async def test_curl_flood_beyond_slots_and_connection_cap_all_complete(nursery, root: Path, tmp_path: Path, sendfile: bool):
    """24 nodes at once against 2 transfer slots and 6 connections: all 24 downloads complete, byte-identical.

    curl opens one connection per transfer (each from its own address, so none
    can be reused), 18 of them wait in the listen backlog, and curl keeps the
    finished ones alive, idle, which the server closes to make room. A refusal
    would be curl exit 7, a reset 56, an empty reply 52, a 503 a status != 200.
    """
    adm = Admission(max_active=2)
    srv = await start(nursery, root, admission=adm, max_connections=6, sendfile=sendfile)
    out = tmp_path / "out"
    out.mkdir()
    n = 24
    names = ["vmlinuz" if i % 3 else "script.ipxe" for i in range(n)]
    cfg = []
    for i, name in enumerate(names):
        cfg += [f'url = "{srv.url(name)}"', f'interface = "127.66.0.{i + 1}"', f'output = "{out / str(i)}"',
                'write-out = "%{http_code} %{exitcode}\\n"', "max-time = 60", "next"]
    (tmp_path / "curl.cfg").write_text("\n".join(cfg[:-1]) + "\n")
    with trio.fail_after(120):
        r = await trio.run_process(["curl", "-sS", "--noproxy", "*", "--parallel", "--parallel-immediate",
                                    "--parallel-max", str(n), "-K", str(tmp_path / "curl.cfg")],
                                   capture_stdout=True, capture_stderr=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().split("\n")[:-1] == ["200 0"] * n, r.stdout
    for i, name in enumerate(names):
        assert hashlib.sha256((out / str(i)).read_bytes()).digest() == hashlib.sha256((root / name).read_bytes()).digest()
    st = srv.stats
    assert dict(st.by_status) == {200: n}
    assert st.refused == st.too_slow == st.timeouts == st.protocol_errors == st.internal_errors == 0
    # The overload happened, and the cap held.
    assert st.cap_waits > 0
    assert st.connections_peak == 6
    assert adm.load(trio.current_time()).active == 0
    done = [e for e in srv.drain() if e.kind is EventKind.FILE_DONE]
    assert len(done) == n and all(e.bytes == e.size for e in done)
    assert max(e.detail["queued"] for e in done) > 0


# -- fairness ----------------------------------------------------------------------------


async def test_transfers_waiting_for_a_slot_are_served_in_arrival_order(autojump_clock, nursery, root: Path):
    """One slot, held by a client that reads nothing; five more ask one after the other: served 1, 2, 3, 4, 5."""
    adm = Admission(max_active=1)
    srv = await start(nursery, root, admission=adm, min_rate=None, send_timeout=3600.0)
    with trio.fail_after(600):
        holder = await connect(srv.port, "127.0.0.2", rcvbuf=4096)
        await holder.send_all(get("huge.bin"))
        await trio.testing.wait_all_tasks_blocked()
        assert adm.load(trio.current_time()).active == 1
        waiters = []
        for i in range(5):
            # A small receive buffer: the server cannot push a whole body into socket buffers ahead of its
            # reader, so the order the readers finish in is the order the server served them.
            s = await connect(srv.port, f"127.0.1.{i + 1}", rcvbuf=4096)
            await s.send_all(get("vmlinuz"))
            await trio.testing.wait_all_tasks_blocked()
            assert adm.load(trio.current_time()).queued == i + 1  # it is in the queue, behind the others
            waiters.append(s)
        order: list[int] = []

        async def fetch(i: int) -> None:
            head, body = await read_response(waiters[i])
            assert head.startswith(b"HTTP/1.1 200 ") and len(body) == KERNEL
            order.append(i)

        async with trio.open_nursery() as n:
            for i in reversed(range(5)):  # readers start in reverse: the order comes from the server
                n.start_soon(fetch, i)
            await trio.testing.wait_all_tasks_blocked()
            assert order == []
            await reset(holder)  # the slot comes free
        assert order == [0, 1, 2, 3, 4]
        done = await files_done(srv, 5)
        assert [e.client_ip for e in done] == [f"127.0.1.{i + 1}" for i in range(5)]
        for s in waiters:
            await s.aclose()


async def test_at_the_cap_waiters_are_served_in_arrival_order_and_idle_keepalives_make_room(autojump_clock, nursery, root: Path):
    """Two connection slots, both busy; three more clients wait in the backlog and are served in order.

    Each served client keeps its connection alive and idle (as iPXE does after
    a download). The next one in the backlog must not wait for that idle
    connection's ``idle_timeout``: it is closed as soon as it goes idle.
    """
    srv = await start(nursery, root, max_connections=2, idle_timeout=30.0)
    with trio.fail_after(600):
        a = await connect(srv.port, "127.0.0.2")
        b = await connect(srv.port, "127.0.0.3")
        # Both mid-request: busy, not idle, so nothing can be closed for room.
        await a.send_all(b"GET /script.ipxe HTTP/1.1\r\nHost: x\r\n")
        await b.send_all(b"GET /script.ipxe HTTP/1.1\r\nHost: x\r\n")
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        queued = []
        for i in range(3):
            s = await connect(srv.port, f"127.0.2.{i + 1}")  # the kernel completes the handshake: no refusal
            await s.send_all(get("script.ipxe"))
            queued.append(s)
        await trio.testing.wait_all_tasks_blocked()
        assert srv.stats.connections == 2 and srv.stats.cap_waits == 1
        order: list[int] = []

        async def fetch(i: int) -> None:
            head, body = await read_response(queued[i])
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"#!ipxe\nchain vmlinuz\n"
            order.append(i)

        async with trio.open_nursery() as n:
            for i in reversed(range(3)):
                n.start_soon(fetch, i)
            await trio.testing.wait_all_tasks_blocked()
            assert order == []
            await a.send_all(b"\r\n")  # a's request completes; a stays open, idle
            head, _ = await read_response(a)
            assert head.startswith(b"HTTP/1.1 200 ")
        assert order == [0, 1, 2]
        # Nobody waited for an idle timeout (virtual time: it would have jumped 30 s per waiter).
        assert trio.current_time() - t0 < 30.0
        # a and the first two waiters went idle and were closed for the next; b is still mid-request.
        assert srv.stats.evictions == 3 and srv.stats.timeouts == 0
        assert srv.stats.connections_peak == 2
        assert await a.receive_some(100) == b""
        await b.send_all(b"\r\n")
        head, _ = await read_response(b)
        assert head.startswith(b"HTTP/1.1 200 ")
        for s in (a, b, *queued):
            await s.aclose()


# -- memory per queued connection ----------------------------------------------------------


def _server_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes allocated with the server's code on the stack (not the test's clients)."""
    snap = snapshot.filter_traces([
        tracemalloc.Filter(True, "*orchestrator/bootserver/*", all_frames=True),
        tracemalloc.Filter(False, "*tests/*", all_frames=True),
    ])
    return sum(s.size for s in snap.statistics("filename"))


async def test_connection_flood_costs_bounded_memory_and_nothing_beyond_the_cap(autojump_clock, nursery, root: Path):
    """Eight connection slots, one transfer slot held: 7 accepted waiters cost a few KiB each; 40 more in the backlog cost nothing."""
    adm = Admission(max_active=1)
    srv = await start(nursery, root, admission=adm, max_connections=8, min_rate=None, send_timeout=3600.0)
    clients: list[trio.SocketStream] = []
    with trio.fail_after(600):
        holder = await connect(srv.port, "127.0.0.2", rcvbuf=4096)
        await holder.send_all(get("huge.bin"))
        await trio.testing.wait_all_tasks_blocked()
        tracemalloc.start(32)
        try:
            base = _server_bytes(tracemalloc.take_snapshot())
            for i in range(7):  # fills the connection cap: each waits for the transfer slot
                s = await connect(srv.port, f"127.0.3.{i + 1}")
                await s.send_all(get("script.ipxe"))
                clients.append(s)
            await trio.testing.wait_all_tasks_blocked()
            assert adm.load(trio.current_time()).queued == 7 and srv.stats.connections == 8
            accepted = _server_bytes(tracemalloc.take_snapshot())
            for i in range(40):  # beyond the cap: the kernel's listen backlog holds them
                s = await connect(srv.port, f"127.0.4.{i + 1}")
                await s.send_all(get("script.ipxe"))
                clients.append(s)
            await trio.testing.wait_all_tasks_blocked()
            flooded = _server_bytes(tracemalloc.take_snapshot())
        finally:
            tracemalloc.stop()
        per_waiter = (accepted - base) / 7
        assert 0 < per_waiter < 32 * 1024, per_waiter  # h11 state, a task, a file descriptor's object: no chunk
        assert flooded - accepted < 8 * 1024, flooded - accepted  # one accepted connection waiting at the cap
        assert srv.stats.connections == 8 and srv.stats.connections_peak == 8 and srv.stats.cap_waits == 1
        # The flood then drains in full: free the slot and read everyone's kernel.
        await reset(holder)

        async def fetch(s: trio.SocketStream) -> None:
            head, body = await read_response(s)
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"#!ipxe\nchain vmlinuz\n"
            await s.aclose()  # the client leaves: its connection slot goes to the next in the backlog

        async with trio.open_nursery() as n:
            for s in clients:
                n.start_soon(fetch, s)
        assert srv.stats.by_status[200] == 1 + 47 and srv.stats.refused == 0 and srv.stats.connections_peak == 8


# -- both body paths are byte-exact ---------------------------------------------------------


@pytest.mark.parametrize("sendfile", [True, False], ids=["sendfile", "pread"])
async def test_ranges_and_whole_files_byte_exact_on_both_paths(nursery, root: Path, sendfile: bool):
    srv = await start(nursery, root, sendfile=sendfile, chunk_size=64 * 1024)
    data = (root / "vmlinuz").read_bytes()
    with trio.fail_after(30):
        s = await trio.open_tcp_stream(srv.host, srv.port)
        async with s:
            for rng, want in [(None, data), (b"bytes=100-70000", data[100:70001]), (b"bytes=-5", data[-5:]),
                              (b"bytes=3000000-", data[3000000:])]:
                extra = b"Range: " + rng + b"\r\n" if rng else b""
                await s.send_all(b"GET /vmlinuz HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
                head, body = await read_response(s)
                assert head.startswith(b"HTTP/1.1 206 " if rng else b"HTTP/1.1 200 ")
                assert body == want
    done = await files_done(srv, 4)
    assert [e.bytes for e in done] == [KERNEL, 69901, 5, KERNEL - 3000000]
