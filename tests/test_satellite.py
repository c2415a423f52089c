"""Satellite event streams over real TCP: every event reaches the orchestrator once, across broken connections and restarts."""

from __future__ import annotations

import json

import trio

from orchestrator.bootserver.admission import Load
from orchestrator.events import BootEvent, EventKind
from orchestrator.satellite import EventTap, SatelliteLink, follow, offset_key
from orchestrator.store import Store


class Recorder:
    """Stands in for the tracker: keeps what it is fed (the tracker's own tests cover what it makes of events)."""

    def __init__(self) -> None:
        self.events: list[BootEvent] = []
        self.fed = trio.Event()

    def feed(self, ev: BootEvent) -> list:
        self.events.append(ev)
        self.fed.set()
        return []

    async def until(self, n: int) -> None:
        while len(self.events) < n:
            self.fed = trio.Event()
            await self.fed.wait()


def event(i: int) -> BootEvent:
    return BootEvent(time=float(i), wall=1_700_000_000.0 + i, source="tftp", kind=EventKind.FILE_DONE,
                     client_ip="10.2.0.5", filename=f"file{i}", bytes=i)


async def serve_tap(tap: EventTap, token: str, cut_after: list[int], task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A JSON-lines listener answering ``events`` with the tap; connection k is cut after cut_after[k] records."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    conn = 0

    async def handle(stream):
        nonlocal conn
        limit = cut_after[conn] if conn < len(cut_after) else None
        conn += 1
        sent = 0
        async with stream:
            line = b""
            while not line.endswith(b"\n"):
                line += await stream.receive_some(4096)
            req = json.loads(line)
            if req.get("token") != token:
                await stream.send_all(b'{"event": "error", "error": "token"}\n')
                return

            async def send(obj):
                nonlocal sent
                if "seq" in obj:
                    if limit is not None and sent >= limit:
                        raise trio.BrokenResourceError("cut")
                    sent += 1
                await stream.send_all(json.dumps(obj).encode() + b"\n")

            try:
                await tap.stream(req, send)
            except trio.BrokenResourceError:
                pass

    await trio.serve_listeners(handle, listeners)


async def test_every_event_arrives_once_across_cut_connections_and_a_restart(tmp_path):
    tap = EventTap(heartbeat=0.2, load=lambda: Load(active=3, queued=1, bytes_per_s=1e6, retransmit_rate=0.5, rtt=0.002))
    for i in range(1, 51):
        tap.record(event(i))
    store = Store(tmp_path / "state.db")
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_tap, tap, "s3cret", [7, 0, 13, 1])
        link = SatelliteLink("row-b", "127.0.0.1", port, "s3cret", heartbeat=0.2)
        first = trio.CancelScope()
        nursery.start_soon(_follow_in, first, link, rec, store)
        with trio.fail_after(30):
            await rec.until(30)
        first.cancel()  # the orchestrator "crashes" mid-stream
        for i in range(51, 101):
            tap.record(event(i))
        link2 = SatelliteLink("row-b", "127.0.0.1", port, "s3cret", heartbeat=0.2)
        await nursery.start(follow, link2, rec, store)
        with trio.fail_after(30):
            await rec.until(100)
            for i in range(101, 121):  # live: recorded while the stream is open
                tap.record(event(i))
            await rec.until(120)
            while link2.load is None:
                await trio.sleep(0.05)  # bounded by fail_after: the first load line follows within a heartbeat
        nursery.cancel_scope.cancel()
    got = [e.filename for e in rec.events]
    assert got == [f"file{i}" for i in range(1, 121)]  # each once, in order, across 4 cut connections and a restart
    assert all(e.source == "row-b:tftp" for e in rec.events)
    assert store.load_offset(offset_key("row-b")) == {"epoch": tap.log.epoch, "last": 120}
    assert link.errors + link2.errors >= 3 and link2.cursor.lost == 0
    assert link2.load == Load(active=3, queued=1, bytes_per_s=1e6, retransmit_rate=0.5, rtt=0.002)  # for row-b's window
    store.close()


async def _follow_in(scope, link, rec, store):
    with scope:
        await follow(link, rec, store)


async def test_a_wrong_token_gets_nothing_and_the_follower_keeps_retrying(tmp_path):
    tap = EventTap(heartbeat=0.2)
    tap.record(event(1))
    store = Store(tmp_path / "state.db")
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_tap, tap, "right", [])
        link = SatelliteLink("row-b", "127.0.0.1", port, "wrong", heartbeat=0.2)
        await nursery.start(follow, link, rec, store)
        with trio.fail_after(20):
            while link.errors < 2:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert rec.events == [] and link.connects >= 2
    store.close()


async def test_the_follower_is_blind_until_the_outage_is_replayed(tmp_path):
    """``SatelliteLink.blind`` (the scheduler holds its nodes' escalations while it is True): down, then
    replaying the records the satellite kept meanwhile, then clear for live records."""
    tap = EventTap(heartbeat=0.2)
    for i in range(1, 41):  # what the satellite saw while nobody followed it
        tap.record(event(i))
    store = Store(tmp_path / "state.db")
    link = SatelliteLink("row-b", "127.0.0.1", 1, "s3cret", heartbeat=0.2)
    seen: list[bool] = []

    class Watching(Recorder):
        def feed(self, ev):
            seen.append(link.blind())
            return super().feed(ev)

    rec = Watching()
    assert link.blind()  # never connected: nothing is known
    async with trio.open_nursery() as nursery:
        link.port = await nursery.start(serve_tap, tap, "s3cret", [])
        await nursery.start(follow, link, rec, store)
        with trio.fail_after(30):
            await rec.until(40)
            assert not link.blind() and link.replay_to == 40
            tap.record(event(41))
            await rec.until(41)
        nursery.cancel_scope.cancel()
    assert seen == [True] * 40 + [False]  # every replayed record applied blind, the live one not
    store.close()
