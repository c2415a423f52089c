"""safetext: untrusted text becomes printable, valid and bounded where it enters (BootEvent and friends)."""

from __future__ import annotations

import json
import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.events import BootEvent, EventKind
from orchestrator.safetext import MAX_ITEMS, safe_mapping, safe_text, safe_value
from orchestrator.tracker import Tracker, describe


def test_escapes_are_shown_not_passed():
    assert safe_text("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert safe_text("\x1b]8;;http://evil/\x07click\x1b]8;;\x07") == "\\x1b]8;;http://evil/\\x07click\\x1b]8;;\\x07"
    assert safe_text("left\u202eright") == "left\\u202eright"  # a bidi override
    assert safe_text("c1\x9bcsi") == "c1\\x9bcsi"  # an 8-bit CSI
    assert safe_text("tab\tnl\n") == "tab\\x09nl\\x0a"


def test_bytes_that_are_not_utf8_become_their_hex():
    assert safe_text(b"pxelinux.cfg/\xff") == "pxelinux.cfg/\\xff"
    assert safe_text(b"pxelinux.cfg/\xff".decode("utf-8", "surrogateescape")) == "pxelinux.cfg/\\xff"
    assert safe_text("\ud800") == "\\ud800"  # a lone surrogate that was never a byte


def test_plain_text_is_returned_as_is():
    s = "PXEClient:Arch:00007:UNDI:003000 [/x] [link=http://x] ünïcödé"
    assert safe_text(s) is s


def test_bounded_with_a_visible_cut():
    out = safe_text("x" * 5000, 100)
    assert len(out) == 100 and out.endswith("...")
    out = safe_text("\x1b" * 100, 20)
    assert len(out) <= 20 and out.endswith("...") and "\x1b" not in out


def test_structures_are_copied_bounded_and_safe():
    d = {"vendor_class": "a\x1bb", "n": 3, "ok": True, "opts": {"x\x00": ["y\x07", 1]}, "many": list(range(1000))}
    out = safe_mapping(d)
    assert out["vendor_class"] == "a\\x1bb" and out["n"] == 3 and out["ok"] is True
    assert out["opts"] == {"x\\x00": ["y\\x07", 1]}
    assert len(out["many"]) == MAX_ITEMS
    assert safe_value({"a": {"b": {"c": {"d": {"e": "deep"}}}}})["a"]["b"]["c"]["d"] == "{'e': 'deep'}"


def test_a_boot_event_carries_only_safe_text():
    ev = BootEvent(time=1.0, source="tftp", kind=EventKind.FILE_REQUEST, client_ip="10.0.0.1",
                   filename=b"pxelinux.cfg/\xff\x1b[2J".decode("utf-8", "surrogateescape"),
                   detail={"options": {"blk\x1bsize": "1\x07"}, "user_agent": "iPXE\r\nX: y"})
    assert ev.filename == "pxelinux.cfg/\\xff\\x1b[2J"
    assert ev.detail == {"options": {"blk\\x1bsize": "1\\x07"}, "user_agent": "iPXE\\x0d\\x0aX: y"}
    # Everything downstream can store and serialise it.
    db = sqlite3.connect(":memory:")
    db.execute("create table t (x text)")
    db.execute("insert into t values (?)", (describe(ev),))
    json.dumps(ev.detail)


def test_an_event_detail_is_a_copy():
    detail = {"method": "GET"}
    ev = BootEvent(time=1.0, source="http", kind=EventKind.FILE_REQUEST, detail=detail)
    detail["range"] = (0, 1)  # a server that keeps filling its dict after emitting
    assert "range" not in ev.detail


@settings(max_examples=500, deadline=None)
@given(st.text() | st.binary().map(lambda b: b.decode("utf-8", "surrogateescape")), st.integers(3, 300))
def test_anything_in_is_printable_valid_and_bounded_out(text, limit):
    out = safe_text(text, limit)
    assert out.isprintable() and len(out) <= limit
    out.encode("utf-8")  # no lone surrogates left


def test_tracker_evidence_from_a_hostile_name_is_safe():
    tr = Tracker(track_unknown=True)
    mac = "52:54:00:00:00:01"
    tr.feed(BootEvent(time=1.0, source="dhcp", kind=EventKind.DHCP, mac=mac, client_ip="10.0.0.5",
                      detail={"msg": "ACK", "direction": "out"}))
    ts = tr.feed(BootEvent(time=2.0, source="tftp", kind=EventKind.FILE_REQUEST, client_ip="10.0.0.5",
                           filename="pxelinux.cfg/\x1b]52;c;ZXZpbA==\x07"))
    assert ts and ts[0].evidence.isprintable() and "\\x1b]52" in ts[0].evidence
