"""The satellite event stream's sans-IO core: every record once, in order, across any disconnects."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols.evstream import EventLog, StreamCursor, StreamError, event_from_wire, event_to_wire


def pull(log: EventLog, cur: StreamCursor, applied: list[int], cut: int | None, limit: int = 4096) -> None:
    """One connection: request, header, records until ``cut`` records arrived (then the line breaks)."""
    req = json.loads(json.dumps(cur.request()))  # through the wire format
    batch = log.after(req["epoch"], req["after"], limit)
    cur.begin(batch.epoch, batch.lost)
    for n, (seq, _rec) in enumerate(batch.records):
        if cut is not None and n >= cut:
            return
        if cur.accept(seq):
            applied.append(seq)
            cur.applied(seq)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.one_of(st.none(), st.integers(0, 10)), st.booleans()), max_size=40))
def test_every_record_arrives_once_in_order_whatever_breaks(steps):
    log, cur, applied = EventLog("e1", capacity=10_000), StreamCursor(), []
    for produced, cut, replay_old in steps:
        log.extend({"i": i} for i in range(produced))
        if replay_old and applied:
            # A reconnect that asks from an older point (e.g. a journal write lost): duplicates are dropped.
            stale = StreamCursor(cur.epoch, max(0, cur.last - 3))
            got: list[int] = []
            pull(log, stale, got, cut)
        pull(log, cur, applied, cut, limit=7)
    while cur.last < log.last:
        pull(log, cur, applied, None, limit=7)
    assert applied == list(range(1, log.last + 1))
    assert cur.lost == 0


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.lists(st.integers(0, 50), min_size=1, max_size=20))
def test_a_full_log_drops_the_oldest_and_says_how_many(capacity, produce):
    log, cur, applied = EventLog("e1", capacity=capacity), StreamCursor(), []
    for k in produce:
        log.extend({} for _ in range(k))
        pull(log, cur, applied, None)
    assert applied == sorted(set(applied)) and (not applied or applied[-1] == log.last)
    assert len(applied) + cur.lost == log.last  # each record either arrived once or is counted lost


def test_a_restarted_satellite_starts_a_new_epoch_and_the_cursor_follows():
    log, cur, applied = EventLog("e1"), StreamCursor(), []
    log.extend({} for _ in range(5))
    pull(log, cur, applied, None)
    log2 = EventLog("e2")  # the satellite restarted
    log2.extend({} for _ in range(3))
    got: list[int] = []
    pull(log2, cur, got, None)
    assert applied == [1, 2, 3, 4, 5] and got == [1, 2, 3] and (cur.epoch, cur.last) == ("e2", 3)


def test_records_and_headers_that_break_the_format_are_refused():
    cur = StreamCursor()
    with pytest.raises(StreamError):
        cur.accept(1)  # before the header
    with pytest.raises(StreamError):
        cur.begin(["x"], 0)
    with pytest.raises(StreamError):
        cur.begin("e", -1)
    cur.begin("e", 0)
    for bad in (0, -1, "1", 1.0, True):
        with pytest.raises(StreamError):
            cur.accept(bad)


def test_events_cross_the_wire_with_their_fields_and_the_receivers_clock():
    ev = BootEvent(time=123.0, wall=1_700_000_000.5, source="tftp", kind=EventKind.FILE_DONE, client_ip="10.2.0.5",
                   client_port=2070, filename="vmlinuz", bytes=1000, size=1000, duration=0.5, result="ok", retransmits=2,
                   detail={"blksize": 1468})
    back = event_from_wire(json.loads(json.dumps(event_to_wire(ev))), 7.0, via="row-b")
    assert back.time == 7.0 and back.wall == ev.wall and back.source == "row-b:tftp"
    assert (back.kind, back.client_ip, back.client_port, back.filename, back.bytes, back.size, back.duration, back.result,
            back.retransmits, dict(back.detail)) == (ev.kind, ev.client_ip, 2070, "vmlinuz", 1000, 1000, 0.5, "ok", 2, {"blksize": 1468})


@pytest.mark.parametrize("bad", [
    [], {"kind": "nope"}, {"kind": "dhcp", "mac": 5}, {"kind": "dhcp", "bytes": -1}, {"kind": "dhcp", "bytes": True},
    {"kind": "dhcp", "bytes": 1 << 60}, {"kind": "dhcp", "wall": float("nan")}, {"kind": "dhcp", "detail": []},
])
def test_malformed_events_are_refused(bad):
    with pytest.raises(StreamError):
        event_from_wire(bad, 0.0, via="s")


def test_hostile_text_in_an_event_is_made_safe_where_it_enters():
    ev = event_from_wire({"kind": "file_request", "source": "tftp", "filename": "\x1b[2J" + "A" * 5000}, 0.0, via="s")
    assert ev.filename.isprintable() and len(ev.filename) <= 600
