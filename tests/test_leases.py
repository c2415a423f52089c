"""Leases: the record's validation (``orchestrator/protocols/leases.py``) and the durable
store (``orchestrator/bootserver/leases.py``): invariants, journal format, damaged files,
compaction, kill -9.

The store is tested in memory and on disk (``tmp_path``). Damaged files are
built byte by byte. The kill -9 test runs a real child process that simulates
DORA traffic, SIGKILLs it at random moments and checks the reloaded journal
against what the child reported on a pipe.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.bootserver import leases as leases_mod
from orchestrator.bootserver.leases import LeaseStore, LeaseStoreError, LeaseStoreLocked
from orchestrator.protocols import leases as record_mod
from orchestrator.protocols.leases import MAX_TEXT, Lease, LeaseConflict

REPO = Path(__file__).resolve().parent.parent
T0 = 1_764_000_000.0  # a fixed wall-clock time; nothing here reads the clock


def mac(i: int) -> str:
    return f"52:54:00:00:{i >> 8:02x}:{i & 0xFF:02x}"


def lease(i: int, ip: int | None = None, **kw) -> Lease:
    fields = {"expires": T0 + 3600, "state": "bound", **kw}
    return Lease(mac(i), f"10.0.0.{i if ip is None else ip}", **fields)


def as_map(store: LeaseStore) -> dict[str, Lease]:
    return {le.mac: le for le in store.leases()}


def assert_consistent(store: LeaseStore) -> None:
    """One lease per MAC, one MAC per IP, and both indexes agree."""
    all_ = store.leases()
    assert len({le.mac for le in all_}) == len(all_)
    assert len({le.ip for le in all_}) == len(all_), "an IP maps to two MACs"
    for le in all_:
        assert store.by_mac(le.mac) == le
        assert store.by_ip(le.ip) == le


def frame(obj: object) -> bytes:
    """A well-checksummed journal line around any JSON value (NaN included)."""
    payload = json.dumps(obj, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    s = LeaseStore(None if request.param == "memory" else tmp_path / "leases")
    yield s
    s.close()


# -- Lease validation ---------------------------------------------------------


def test_lease_normalises_case_and_expiry_type():
    le = Lease("52:54:00:AA:BB:CC", "10.0.0.1", 1700000000, "bound", client_id="01ABcd")
    assert le.mac == "52:54:00:aa:bb:cc"
    assert le.client_id == "01abcd"
    assert le.expires == 1700000000.0 and type(le.expires) is float


def test_lease_accepts_long_hardware_addresses():
    ib = ":".join(["a0"] * 20)  # IPoIB: 20 octets
    assert Lease(ib, "10.0.0.1", T0, "offered").mac == ib


@pytest.mark.parametrize(
    "kw",
    [
        {"mac": "52:54:00:aa:bb"[:-1]},
        {"mac": "52-54-00-aa-bb-cc"},
        {"mac": "52:54:00:aa:bb:cg"},
        {"mac": "52:54:00:aa:bb:cc\n"},
        {"mac": ""},
        {"mac": ":".join(["00"] * 21)},
        {"mac": 0x525400AABBCC},
        {"ip": "10.0.0.256"},
        {"ip": "10.0.0.01"},
        {"ip": "10.0.0"},
        {"ip": "10.0.0.1 "},
        {"ip": "10.0.0.\u0661"},  # Arabic-Indic digit one
        {"ip": 167772161},
        {"expires": float("nan")},
        {"expires": float("inf")},
        {"expires": "1700000000"},
        {"expires": True},
        {"state": "active"},
        {"state": None},
        {"hostname": "x" * (MAX_TEXT + 1)},
        {"hostname": b"n01"},
        {"client_id": "01:52:54"},
        {"client_id": "abc"},  # odd number of digits
        {"client_id": "ab" * (MAX_TEXT // 2 + 1)},
    ],
)
def test_lease_rejects_bad_fields(kw):
    fields = {"mac": "52:54:00:aa:bb:cc", "ip": "10.0.0.1", "expires": T0, "state": "bound", **kw}
    with pytest.raises((ValueError, TypeError)):
        Lease(**fields)


# -- invariants ---------------------------------------------------------------


def test_put_is_visible_at_once(store):
    le = lease(1, hostname="n01")
    store.put(le)
    assert store.by_mac(mac(1)) == le
    assert store.by_mac(mac(1).upper()) == le
    assert store.by_ip("10.0.0.1") == le
    assert store.leases() == [le]
    assert store.by_mac(mac(2)) is None and store.by_ip("10.0.0.2") is None


def test_ip_held_by_another_mac_is_a_conflict(store):
    first = lease(1, ip=5)
    store.put(first)
    with pytest.raises(LeaseConflict) as exc:
        store.put(lease(2, ip=5))
    assert isinstance(exc.value, ValueError)
    assert store.by_ip("10.0.0.5") == first
    assert store.by_mac(mac(2)) is None
    assert_consistent(store)


def test_conflict_holds_for_released_and_declined_leases(store):
    store.put(lease(1, ip=5, state="declined"))
    with pytest.raises(LeaseConflict):
        store.put(lease(2, ip=5))
    store.remove(mac(1))
    store.put(lease(2, ip=5))
    assert store.by_ip("10.0.0.5").mac == mac(2)


def test_one_lease_per_mac_and_moving_frees_the_old_ip(store):
    store.put(lease(1, ip=5, state="offered"))
    store.put(lease(1, ip=6))
    assert store.by_ip("10.0.0.5") is None
    assert store.by_ip("10.0.0.6").mac == mac(1)
    assert len(store.leases()) == 1
    store.put(lease(2, ip=5))  # the freed address is free for others
    assert_consistent(store)


def test_renewing_the_same_ip_is_not_a_conflict(store):
    store.put(lease(1, state="offered", expires=T0 + 60))
    store.put(lease(1, state="bound", expires=T0 + 3600))
    assert store.by_mac(mac(1)).state == "bound"
    assert len(store.leases()) == 1


def test_remove_frees_ip_and_unknown_mac_is_a_noop(store):
    store.put(lease(1))
    store.remove(mac(9))
    store.remove(mac(1).upper())
    assert store.by_mac(mac(1)) is None and store.by_ip("10.0.0.1") is None
    assert store.leases() == []


def test_put_takes_only_leases(store):
    with pytest.raises(TypeError):
        store.put({"mac": mac(1), "ip": "10.0.0.1"})  # type: ignore[arg-type]


def test_expire_drops_leases_at_or_before_now_in_any_state(store):
    states = ["offered", "bound", "released", "declined"]
    for i, state in enumerate(states, start=1):
        store.put(lease(i, state=state, expires=T0 + i))
    store.put(lease(10, expires=T0 + 100))
    assert store.expire(T0) == 0
    assert store.expire(T0 + 2) == 2  # exactly-now counts as expired
    assert {le.mac for le in store.leases()} == {mac(3), mac(4), mac(10)}
    assert store.expire(T0 + 50) == 2
    assert [le.mac for le in store.leases()] == [mac(10)]
    assert store.by_ip("10.0.0.1") is None
    assert_consistent(store)


# -- durability ---------------------------------------------------------------


def test_committed_changes_survive_reopen(tmp_path):
    path = tmp_path / "leases"
    with LeaseStore(path) as s:
        for i in range(1, 6):
            s.put(lease(i, hostname=f"n{i:02d}", client_id=f"01{i:02x}"))
        s.commit()
        s.put(lease(1, ip=50))  # move
        s.remove(mac(2))
        s.put(lease(3, state="released", expires=T0 - 1))
        assert s.expire(T0) == 1
        s.commit()
        expected = as_map(s)
    with LeaseStore(path) as s:
        assert s.skipped == 0 and not s.torn
        assert as_map(s) == expected
        assert set(expected) == {mac(1), mac(4), mac(5)}
        assert s.by_ip("10.0.0.50").mac == mac(1)
        assert_consistent(s)


def test_commit_is_what_writes(tmp_path):
    path = tmp_path / "leases"
    s = LeaseStore(path)
    before = path.read_bytes()
    s.put(lease(1))
    assert path.read_bytes() == before  # staged only
    s.commit()
    after = path.read_bytes()
    assert after.startswith(before) and len(after.splitlines()) == len(before.splitlines()) + 1
    s.commit()  # nothing staged: nothing written
    assert path.read_bytes() == after
    s.close()


def test_close_commits_what_is_staged_and_is_idempotent(tmp_path):
    path = tmp_path / "leases"
    s = LeaseStore(path)
    s.put(lease(1))
    s.close()
    s.close()
    with pytest.raises(LeaseStoreError):
        s.commit()
    with LeaseStore(path) as s2:
        assert s2.by_mac(mac(1)) == lease(1)


def test_new_file_starts_with_a_header(tmp_path):
    path = tmp_path / "leases"
    LeaseStore(path).close()
    assert path.read_bytes() == frame({"op": "hdr", "v": 1})


def test_one_store_per_file(tmp_path):
    path = tmp_path / "leases"
    s = LeaseStore(path)
    with pytest.raises(LeaseStoreLocked):
        LeaseStore(path)
    s.close()
    LeaseStore(path).close()


def test_in_memory_store_touches_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = LeaseStore(None)
    s.put(lease(1))
    s.commit()
    s.compact()
    s.close()
    assert list(tmp_path.iterdir()) == []


def test_failed_write_fails_every_later_commit_until_reopen(tmp_path, monkeypatch):
    path = tmp_path / "leases"
    s = LeaseStore(path)
    s.put(lease(1))
    s.commit()

    def broken(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(leases_mod.os, "fdatasync", broken)
    s.put(lease(2))
    with pytest.raises(LeaseStoreError):
        s.commit()
    monkeypatch.undo()  # the disk is healthy again, but we cannot know what it holds
    s.put(lease(3))
    with pytest.raises(LeaseStoreError):
        s.commit()
    s.close()  # does not raise, releases the lock
    with LeaseStore(path) as s2:
        assert s2.by_mac(mac(1)) == lease(1)
        assert s2.by_mac(mac(3)) is None  # never written
        assert s2.skipped == 0
        assert_consistent(s2)


def test_commit_in_a_worker_thread_while_puts_go_on(tmp_path):
    """The trio server may run commit() in a thread; staging continues meanwhile."""
    import threading

    path = tmp_path / "leases"
    s = LeaseStore(path, compact_min=40)
    stop = threading.Event()
    errors: list[BaseException] = []

    def committer() -> None:
        try:
            while not stop.is_set():
                s.commit()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=committer)
    t.start()
    try:
        for n in range(3000):
            i = 1 + n % 50
            if n % 7 == 0:
                s.remove(mac(i))
            else:
                s.put(lease(i, expires=T0 + n))
    finally:
        stop.set()
        t.join(timeout=30)
    assert not t.is_alive() and not errors
    expected = as_map(s)
    s.close()
    with LeaseStore(path) as s2:
        assert s2.skipped == 0
        assert as_map(s2) == expected


# -- record codec: every record written loads again ---------------------------

WEIRD = [
    "",
    "\n",
    "\r\n",
    "a\nb",
    '"',
    "\\",
    '\\"\n',
    "\x00",
    "\u2028\u2029",
    "\ud800",  # a lone surrogate
    "\udfff\ud800",
    "x) via eth9",
    "$(reboot)",
    "`id`;rm -rf /",
    "ünïcödé-节点",
    "😀" * MAX_TEXT,
    "\x7f" * MAX_TEXT,
    "n" * MAX_TEXT,
    '{"op":"del","mac":"52:54:00:00:00:01"}',
    "1a2b3c4d {}",
]

hostnames = st.one_of(
    st.none(),
    st.sampled_from(WEIRD),
    st.text(st.characters(exclude_categories=()), max_size=64),
    st.text(st.characters(exclude_categories=()), min_size=MAX_TEXT - 8, max_size=MAX_TEXT),
).filter(lambda h: h is None or not record_mod._SURROGATE_PAIR_RE.search(h))
client_ids = st.one_of(st.none(), st.binary(max_size=MAX_TEXT // 2).map(bytes.hex))
weird_leases = st.builds(
    Lease,
    mac=st.binary(min_size=1, max_size=20).map(lambda b: ":".join(f"{x:02x}" for x in b)),
    ip=st.integers(0, 2**32 - 1).map(lambda n: ".".join(str((n >> s) & 255) for s in (24, 16, 8, 0))),
    expires=st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**53), 2**53)),
    state=st.sampled_from(sorted(record_mod.STATES)),
    hostname=hostnames,
    client_id=client_ids,
)


@settings(max_examples=300, deadline=None)
@given(weird_leases)
def test_every_record_decodes_to_the_same_lease(le):
    line = leases_mod._frame(leases_mod._put_record(le))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert len(line) <= leases_mod.MAX_LINE
    line.decode("ascii")  # pure ASCII on disk
    assert leases_mod._decode(line[:-1]) == ("put", le)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(weird_leases, max_size=20))
def test_weird_leases_round_trip_through_the_file(batch):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "leases"
        with LeaseStore(path) as s:
            for le in batch:
                try:
                    s.put(le)
                except LeaseConflict:
                    pass
            s.commit()
            expected = as_map(s)
        with LeaseStore(path) as s:
            assert s.skipped == 0
            assert as_map(s) == expected
            s.compact()
        with LeaseStore(path) as s:
            assert s.skipped == 0
            assert as_map(s) == expected


def test_put_refuses_a_lease_that_would_not_load_back(store):
    # Lease validation already rules this out; smuggle one past it to prove that
    # put's own round-trip check stands behind it.
    le = lease(1)
    object.__setattr__(le, "hostname", "\ud83d\ude00")
    with pytest.raises(ValueError, match="round trip"):
        store.put(le)
    assert store.leases() == []
    store.commit()
    assert store.leases() == []


def test_a_surrogate_pair_is_refused_not_silently_changed(tmp_path):
    # JSON reads "\\ud83d\\ude00" back as one astral character, a different str
    # from the two code points written: refuse it up front instead of writing it.
    pair, emoji = "\ud83d\ude00", "\U0001f600"
    with pytest.raises(ValueError):
        Lease(mac(1), "10.0.0.1", T0, "bound", hostname="x" + pair)
    with LeaseStore(tmp_path / "l") as s:
        s.put(lease(2, hostname=emoji))
        s.put(lease(3, hostname="\ude00\ud83d"))  # wrong order: two lone surrogates
        s.put(lease(4, hostname="a\udcff\udcfeb"))  # what surrogateescape produces
    with LeaseStore(tmp_path / "l") as s:
        assert s.by_mac(mac(2)).hostname == emoji
        assert s.by_mac(mac(3)).hostname == "\ude00\ud83d"
        assert s.by_mac(mac(4)).hostname == "a\udcff\udcfeb"


# -- operation sequences against a model --------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(1, 12), st.integers(1, 8), st.sampled_from(["offered", "bound"])),
        st.tuples(st.just("remove"), st.integers(1, 12)),
        st.tuples(st.just("expire"), st.integers(0, 10)),
        st.tuples(st.just("commit")),
        st.tuples(st.just("compact")),
        st.tuples(st.just("reopen")),
    ),
    max_size=60,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_random_operations_match_a_model_across_reopens(seq):
    model: dict[str, Lease] = {}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "leases"
        s = LeaseStore(path, compact_min=5)  # compacts often
        try:
            for n, op in enumerate(seq):
                if op[0] == "put":
                    le = lease(op[1], ip=op[2], state=op[3], expires=T0 + n)
                    holder = next((m for m, x in model.items() if x.ip == le.ip), None)
                    if holder not in (None, le.mac):
                        with pytest.raises(LeaseConflict):
                            s.put(le)
                    else:
                        s.put(le)
                        model[le.mac] = le
                elif op[0] == "remove":
                    s.remove(mac(op[1]))
                    model.pop(mac(op[1]), None)
                elif op[0] == "expire":
                    now = T0 + n - op[1]
                    gone = [m for m, x in model.items() if x.expires <= now]
                    assert s.expire(now) == len(gone)
                    for m in gone:
                        del model[m]
                elif op[0] == "commit":
                    s.commit()
                elif op[0] == "compact":
                    s.compact()
                else:
                    s.close()  # commits what is staged
                    s = LeaseStore(path, compact_min=5)
                    assert s.skipped == 0
                assert as_map(s) == model
                assert_consistent(s)
            lines = path.read_bytes().count(b"\n")
            assert lines <= 1 + max(5, 4 * 12) + len(seq)  # compaction bounds the journal
        finally:
            s.close()


# -- damaged files ------------------------------------------------------------


def _journal(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """A journal with a header, puts, a move and a delete; returns its lines."""
    path = tmp_path / "leases"
    with LeaseStore(path) as s:
        s.put(lease(1, hostname="n\n01"))
        s.commit()
        s.put(lease(2, client_id="01ff"))
        s.commit()
        s.put(lease(1, ip=9))
        s.commit()
        s.remove(mac(2))
        s.commit()
        s.put(lease(3, state="declined"))
        s.commit()
    return path, path.read_bytes().splitlines(keepends=True)


def _replay_model(lines: list[bytes]) -> dict[str, Lease]:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "l"
        p.write_bytes(b"".join(lines))
        with LeaseStore(p) as s:
            assert s.skipped == 0
            return as_map(s)


def test_torn_tail_at_every_byte_offset(tmp_path):
    path, lines = _journal(tmp_path)
    data = b"".join(lines)
    ends = [sum(map(len, lines[: k + 1])) for k in range(len(lines))]  # offset after each LF
    states = [_replay_model(lines[: k + 1]) for k in range(len(lines))]
    for cut in range(len(lines[0]), len(data) + 1):
        path.write_bytes(data[:cut])
        complete = sum(1 for e in ends if e <= cut)
        with LeaseStore(path) as s:
            torn = cut not in ends
            assert s.torn == torn
            assert s.skipped == (1 if torn else 0)
            assert as_map(s) == states[complete - 1], cut
            assert_consistent(s)
            # The fragment was truncated away: a new record is not glued onto it.
            s.put(lease(7, ip=77))
        with LeaseStore(path) as s:
            assert s.skipped == 0 and not s.torn
            assert s.by_mac(mac(7)) == lease(7, ip=77)
            assert as_map(s) == {**states[complete - 1], mac(7): lease(7, ip=77)}


def test_empty_file_loads_as_empty(tmp_path):
    path = tmp_path / "leases"
    path.write_bytes(b"")
    with LeaseStore(path) as s:
        assert s.leases() == [] and s.skipped == 0


BAD_LINES = {
    "garbage": b"\x00\xff\xfe not a record at all\n",
    "empty line": b"\n",
    "crc only": b"00000000\n",
    "no space": frame({"op": "del", "mac": mac(1)}).replace(b" ", b"", 1),
    "bad crc": b"00000000" + frame({"op": "del", "mac": mac(1)})[8:],
    "uppercase crc": frame({"op": "hdr", "v": 1}).upper(),
    "flipped byte": frame({"op": "del", "mac": mac(1)}).replace(b"52:54", b"52:55"),
    "not utf-8": frame({"op": "hdr", "v": 1})[:9] + b'"\xff\xfe"\n',
    "json array": frame(["put", mac(1)]),
    "json string": frame("hello"),
    "unknown op": frame({"op": "move", "mac": mac(1)}),
    "missing field": frame({"op": "put", "mac": mac(5), "ip": "10.0.0.5", "exp": T0}),
    "extra field": frame({"op": "put", "mac": mac(5), "ip": "10.0.0.5", "exp": T0, "state": "bound", "x": 1}),
    "exp as string": frame({"op": "put", "mac": mac(5), "ip": "10.0.0.5", "exp": str(T0), "state": "bound"}),
    "exp NaN": frame({"op": "put", "mac": mac(5), "ip": "10.0.0.5", "exp": float("nan"), "state": "bound"}),
    "bad state": frame({"op": "put", "mac": mac(5), "ip": "10.0.0.5", "exp": T0, "state": "BOUND"}),
    "bad ip": frame({"op": "put", "mac": mac(5), "ip": "10.0.0.300", "exp": T0, "state": "bound"}),
    "bad mac": frame({"op": "put", "mac": "nope", "ip": "10.0.0.5", "exp": T0, "state": "bound"}),
    "hostname int": frame({"op": "put", "mac": mac(5), "ip": "10.0.0.5", "exp": T0, "state": "bound", "host": 5}),
    "cid not hex": frame({"op": "put", "mac": mac(5), "ip": "10.0.0.5", "exp": T0, "state": "bound", "cid": "zz"}),
    "del bad mac": frame({"op": "del", "mac": 5}),
    "header v2": frame({"op": "hdr", "v": 2}),
    "header v true": frame({"op": "hdr", "v": True}),
    "deep nesting": b"%08x %s\n" % (zlib.crc32(b"[" * 5000), b"[" * 5000),
    "too long": frame({"op": "put", "mac": mac(5), "ip": "10.0.0.5", "exp": T0, "state": "bound", "host": "x" * 20000}),
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_a_bad_record_in_the_middle_is_counted_and_skipped(tmp_path, name):
    path, lines = _journal(tmp_path)
    expected = _replay_model(lines)
    damaged = lines[:3] + [BAD_LINES[name]] + lines[3:]
    path.write_bytes(b"".join(damaged))
    with LeaseStore(path) as s:
        assert s.skipped == 1 and not s.torn
        assert as_map(s) == expected  # nothing else lost, nothing invented
        assert_consistent(s)
    # The damaged original is kept for forensics; the journal was compacted clean.
    assert (tmp_path / "leases.corrupt").read_bytes() == b"".join(damaged)
    with LeaseStore(path) as s:
        assert s.skipped == 0
        assert as_map(s) == expected


def test_many_bad_records_and_a_torn_tail_are_all_counted(tmp_path):
    path, lines = _journal(tmp_path)
    expected = _replay_model(lines)
    bad = list(BAD_LINES.values())
    damaged = [lines[0]]
    for i, line in enumerate(lines[1:]):
        damaged += [line, bad[i % len(bad)]]
    damaged += bad[len(lines) - 1 :]
    path.write_bytes(b"".join(damaged) + b"5e6f7a8b {\"op\":\"pu")
    with LeaseStore(path) as s:
        assert s.torn
        assert s.skipped == len(bad) + 1
        assert as_map(s) == expected


def test_ip_claimed_by_two_macs_in_the_file_earlier_wins(tmp_path):
    path = tmp_path / "leases"
    first = lease(1, ip=5)
    path.write_bytes(
        frame({"op": "hdr", "v": 1})
        + frame({"op": "put", "mac": mac(1), "ip": "10.0.0.5", "exp": T0 + 3600, "state": "bound"})
        + frame({"op": "put", "mac": mac(2), "ip": "10.0.0.5", "exp": T0 + 7200, "state": "bound"})
        # After the earlier holder lets go, the address may be claimed again.
        + frame({"op": "put", "mac": mac(3), "ip": "10.0.0.6", "exp": T0, "state": "bound"})
        + frame({"op": "del", "mac": mac(3)})
        + frame({"op": "put", "mac": mac(4), "ip": "10.0.0.6", "exp": T0, "state": "offered"})
    )
    with LeaseStore(path) as s:
        assert s.skipped == 1
        assert s.by_ip("10.0.0.5") == first
        assert s.by_mac(mac(2)) is None
        assert s.by_ip("10.0.0.6").mac == mac(4)
        assert_consistent(s)


def test_stale_temp_file_from_a_crashed_compaction_is_ignored(tmp_path):
    path, lines = _journal(tmp_path)
    expected = _replay_model(lines)
    (tmp_path / "leases.tmp").write_bytes(frame({"op": "hdr", "v": 1}) + b"half a comp")
    with LeaseStore(path) as s:
        assert as_map(s) == expected and s.skipped == 0
    assert not (tmp_path / "leases.tmp").exists()


# -- compaction ---------------------------------------------------------------


def test_compaction_rewrites_one_record_per_lease(tmp_path):
    path = tmp_path / "leases"
    with LeaseStore(path) as s:
        for round_ in range(20):
            for i in range(1, 11):
                s.put(lease(i, expires=T0 + round_))
            s.commit()
        s.remove(mac(10))
        s.commit()
        assert path.read_bytes().count(b"\n") == 1 + 200 + 1
        s.put(lease(11, ip=111))  # staged, not committed: compaction takes it too
        s.compact()
        lines = path.read_bytes().splitlines()
        assert lines[0] == frame({"op": "hdr", "v": 1}).rstrip(b"\n")
        assert len(lines) == 1 + 10
        s.commit()  # what compaction wrote is not written twice
        assert path.read_bytes().count(b"\n") == 11
        s.put(lease(12, ip=112))  # appends go to the new file
        s.commit()
        expected = as_map(s)
    assert not (tmp_path / "leases.tmp").exists()
    with LeaseStore(path) as s:
        assert s.skipped == 0
        assert as_map(s) == expected
        assert s.by_mac(mac(1)).expires == T0 + 19


def test_commit_compacts_automatically(tmp_path):
    path = tmp_path / "leases"
    with LeaseStore(path, compact_min=50) as s:
        sizes = []
        for n in range(500):
            s.put(lease(1 + n % 5, expires=T0 + n))
            s.commit()
            sizes.append(path.read_bytes().count(b"\n"))
        expected = as_map(s)
    assert max(sizes) <= 50
    assert min(sizes) <= 1 + 5 + 1
    with LeaseStore(path) as s:
        assert as_map(s) == expected and s.skipped == 0


def test_commit_can_leave_the_compaction_to_compact_if_due(tmp_path):
    """The DHCP shell commits with compact=False, releases its ACKs, then calls compact_if_due."""
    path = tmp_path / "leases"
    with LeaseStore(path, compact_min=50) as s:
        for n in range(200):
            s.put(lease(1 + n % 5, expires=T0 + n))
            s.commit(compact=False)
        assert path.read_bytes().count(b"\n") == 1 + 200  # header + every record: nothing compacted
        s.compact_if_due()
        assert path.read_bytes().count(b"\n") == 1 + 5
        s.compact_if_due()  # not due any more: nothing changes
        assert path.read_bytes().count(b"\n") == 1 + 5
        expected = as_map(s)
    with LeaseStore(path) as s:
        assert as_map(s) == expected and s.skipped == 0


def test_failed_compaction_keeps_the_journal_and_the_staged_changes(tmp_path, caplog):
    path = tmp_path / "leases"
    with LeaseStore(path, compact_min=3) as s:
        (tmp_path / "leases.tmp").mkdir()  # compaction cannot create its temp file
        s.put(lease(1))
        with pytest.raises(OSError):
            s.compact()
        s.commit()  # the staged put went back to the queue and is written now
        for i in range(2, 6):
            s.put(lease(i))
            s.commit()  # automatic compaction fails when due: logged, not raised
        assert "compaction failed" in caplog.text
        expected = as_map(s)
        assert len(expected) == 5
    (tmp_path / "leases.tmp").rmdir()
    with LeaseStore(path) as s:
        assert as_map(s) == expected and s.skipped == 0


# -- kill -9 during DORA traffic ----------------------------------------------

CHILD = r"""
import json, random, sys
from orchestrator.bootserver.leases import Lease, LeaseStore

path, seed, dora = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
macs = ["52:54:00:%02x:%02x:%02x" % (0x10, i >> 8, i & 255) for i in range(400)]
pool = ["10.0.0.%d" % i for i in range(1, 255)]  # a /24: 400 MACs compete for 254 IPs
store = LeaseStore(path, compact_min=200)
out = sys.stdout
out.write("READY\n")
out.flush()
now = 1764000000.0
done = 0
while done < dora:
    batch = [rng.choice(macs) for _ in range(rng.randint(1, 4))]
    for phase in ("offered", "bound"):  # DISCOVER->OFFER, REQUEST->ACK
        ops = []
        for m in dict.fromkeys(batch):
            now += 0.001
            cur = store.by_mac(m)
            if cur is not None:
                ip = cur.ip
            else:
                free = [ip for ip in pool if store.by_ip(ip) is None]
                if free:
                    ip = rng.choice(free)
                else:  # pool full: reclaim someone else's address
                    ip = rng.choice(pool)
                    victim = store.by_ip(ip).mac
                    store.remove(victim)
                    ops.append(["del", victim])
            state = phase if rng.random() > 0.05 else "released"
            host = rng.choice([None, "n%d" % done, 'q"\n\\' + "\u00e9" * rng.randint(0, 300)])
            fields = [m, ip, now + (60 if phase == "offered" else 3600), state, host]
            store.put(Lease(*fields))  # staged in memory only: the disk sees it at commit
            ops.append(["put", fields])
        # Announce the batch, then commit it, then confirm it.
        out.write("".join("P %s\n" % json.dumps(op) for op in ops))
        out.flush()
        store.commit()
        out.write("C\n")
        out.flush()
    done += len(batch)
    if rng.random() < 0.05:
        store.compact()
store.close()
out.write("DONE\n")
out.flush()
"""


def _run_child(path: Path, seed: int, dora: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(seed), str(dora)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
        # Unbuffered: the test reads the READY line with readline() and the rest with
        # communicate(), which reads the descriptor itself. A buffered readline() could
        # take report lines past READY into its buffer, where communicate() never sees them.
        bufsize=0,
    )


def _apply(model: dict[str, Lease], op: list) -> None:
    if op[0] == "del":
        del model[op[1]]
    else:
        le = Lease(*op[1])
        holder = next((m for m, x in model.items() if x.ip == le.ip), None)
        assert holder in (None, le.mac), "the child announced a conflicting put"
        model[le.mac] = le


def _read_report(text: str) -> tuple[list[list[list]], list[list], bool]:
    """Child output -> (committed batches, the announced but unconfirmed batch, DONE seen).

    A last line without LF was cut by the kill and is ignored: an unconfirmed
    batch may or may not be on disk, which the caller allows for.
    """
    committed: list[list[list]] = []
    current: list[list] = []
    done = False
    lines = text.split("\n")
    lines.pop()  # "" after the last LF, or a fragment cut by the kill
    assert lines and lines[0] == "READY"
    for line in lines[1:]:
        if line.startswith("P "):
            current.append(json.loads(line[2:]))
        elif line == "C":
            committed.append(current)
            current = []
        elif line == "DONE":
            done = True
        else:
            raise AssertionError(f"unexpected child output {line!r}")
    return committed, current, done


def test_kill_9_during_dora_traffic(tmp_path):
    """SIGKILL a child doing DORA exchanges five times at random moments, then
    let a sixth run finish 1 000 exchanges. After every restart: the journal
    loads, at most a torn tail is skipped, no IP is held by two MACs, and the
    leases equal every confirmed commit plus a prefix of the one in flight."""
    path = tmp_path / "leases"
    rng = random.Random(0x9E3779B9)
    model: dict[str, Lease] = {}
    kills_mid_run = 0
    committed_total = 0
    for run in range(6):
        last = run == 5
        child = _run_child(path, seed=rng.randrange(2**32), dora=1000)
        try:
            assert child.stdout.readline() == b"READY\n", child.stderr.read()
            if not last:
                time.sleep(rng.uniform(0.0, 0.2))  # the kill moment, not synchronisation
                child.send_signal(signal.SIGKILL)  # our own child's PID, unreaped until wait()
            out, err = child.communicate(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        committed, in_flight, done = _read_report("READY\n" + out.decode())
        if last:
            assert child.returncode == 0 and done, err.decode()
            assert not in_flight
        else:
            assert child.returncode in (-signal.SIGKILL, 0), err.decode()
            kills_mid_run += child.returncode == -signal.SIGKILL and not done
        for batch in committed:
            for op in batch:
                _apply(model, op)
        committed_total += len(committed)

        with LeaseStore(path) as s:  # the restart
            assert s.skipped == (1 if s.torn else 0), f"run {run}: bad records besides a torn tail"
            assert_consistent(s)
            got = as_map(s)
            # Every confirmed commit is there; of the batch in flight, some prefix.
            candidates = [dict(model)]
            partial = dict(model)
            for op in in_flight:
                _apply(partial, op)
                candidates.append(dict(partial))
            if got not in candidates:  # say how, so a rare failure can be diagnosed from the CI log alone
                diff = {m: (got.get(m), model.get(m)) for m in set(got) | set(model) if got.get(m) != model.get(m)}
                raise AssertionError(f"run {run}: leases differ from every acceptable state; in flight {in_flight!r}; "
                                     f"(got, confirmed) where they differ: {diff!r}")
            model = got
        with LeaseStore(path) as s:  # and the file the restart left behind is clean
            assert s.skipped == 0
            assert as_map(s) == model
    assert kills_mid_run >= 1, "no kill landed while the child was working"
    assert committed_total >= 2 * (1000 // 4)  # at least the final run's 1 000 exchanges
