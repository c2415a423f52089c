"""Sans-IO tests of one read transfer (``orchestrator/protocols/tftp/transfer.py``): no sockets, no clocks.

Most push bytes through a :class:`ReadClient` and a :class:`ReadTransfer` joined
by :class:`~tests.tftp_link.Link` (a fake network with an explicit clock);
timers fire only when the test advances ``now``.
"""

from __future__ import annotations

import itertools
import os
import random

import pytest

from orchestrator.bootserver.files import MemoryFile
from orchestrator.protocols import tftp as p
from orchestrator.sim.machine import PXELINUX_TIMEOUTS
from tests.tftp_link import Link, data_blocks


# -- round trips ------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 1024, 5000, 100_000])
@pytest.mark.parametrize("options", [None, {"tsize": 0}, {"blksize": 1468, "tsize": 0}, {"blksize": 8, "windowsize": 7}, {"windowsize": 64, "blksize": 1024}])
def test_round_trip(size, options):
    data = os.urandom(size)
    link = Link(data, options)
    link.run()
    assert link.client.failed is None
    assert bytes(link.client.data) == data
    assert link.server.state is p.State.DONE
    assert isinstance(link.server_events[-1], p.TransferComplete)
    assert link.server_events[-1].bytes == size
    if options and "tsize" in options:
        assert link.client.tsize == (size or None)  # no tsize for empty files (curl quirk)
    # RFC 1350 section 6: the last DATA is short -- empty when size % blksize == 0.
    last = [pkt for d, pkt in link.log if d == "s2c" and pkt[:2] == b"\x00\x03"][-1]
    assert len(last) - 4 == size % link.server.blksize


def test_exact_multiple_of_blksize_ends_with_empty_block():
    link = Link(b"x" * 1024, {"blksize": 512})
    link.run()
    blocks = data_blocks(link.log)
    assert blocks == [1, 2, 3]
    assert link.server.last_block == 3


def test_no_options_means_no_oack_and_data_first():
    link = Link(b"abc", None)
    first_dir, first = link.queue[0]
    assert first[:2] == b"\x00\x03"  # DATA 1, not an OACK
    link.run()
    assert bytes(link.client.data) == b"abc"


def test_only_unknown_options_means_no_oack():
    """RFC 2347: unsupported options "should be omitted from the OACK"; none left -> no OACK."""
    link = Link(b"abc", {"utimeout": 5000, "x-foo": "bar"})
    assert link.queue[0][1][:2] == b"\x00\x03"
    link.run()
    assert bytes(link.client.data) == b"abc"


# -- block number rollover ----------------------------------------------------------


def test_rollover_past_65535_at_blksize_512():
    """A file over 32 MB at blksize 512 needs more than 65535 blocks: the wire wraps to 0."""
    size = 512 * 65537 + 100  # 65538 blocks
    data = random.Random(1).randbytes(size)
    link = Link(data, {"blksize": 512, "windowsize": 16})
    link.run()
    assert link.client.failed is None
    assert bytes(link.client.data) == data
    blocks = data_blocks(link.log)
    i = blocks.index(65535)
    assert blocks[i + 1 : i + 4] == [0, 1, 2]
    assert link.server.last_block == 65538


def test_ack_index_maps_wire_numbers_across_rollover():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {"blksize": "8", "windowsize": "16"}), MemoryFile("f", bytes(8 * 70000)))
    t.start(0.0)
    t.acked, t.high = 65530, 65540  # pretend: blocks up to 65540 sent, 65530 acked
    assert t._ack_index(65534) == 65534
    assert t._ack_index(65535) == 65535
    assert t._ack_index(0) == 65536
    assert t._ack_index(4) == 65540
    assert t._ack_index(5) is None  # 65541: not sent yet
    assert t._ack_index(65530) is None  # duplicate of acked
    assert t._ack_index(65529) is None  # older than acked (maps far ahead: > high)


# -- Sorcerer's Apprentice, windows, stray ACKs -----------------------------------------


def test_duplicate_ack_does_not_resend_lockstep():
    """RFC 1123 4.2.3.1: never resend the current DATA on a duplicate ACK."""
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {}), MemoryFile("f", bytes(2000)))
    out, _ = t.start(0.0)
    assert [o[2:4] for o in out] == [b"\x00\x01"]
    out, _ = t.datagram(p.encode_ack(1), 0.1)
    assert [o[2:4] for o in out] == [b"\x00\x02"]
    out, _ = t.datagram(p.encode_ack(1), 0.2)  # the duplicate
    assert out == []
    out, _ = t.datagram(p.encode_ack(2), 0.3)
    assert [o[2:4] for o in out] == [b"\x00\x03"]


def test_duplicated_acks_on_the_wire_never_duplicate_data():
    """Every ACK delivered twice: each DATA block still goes out exactly once."""
    data = os.urandom(50_000)
    link = Link(data, {"blksize": 512}, dup=lambda d, pkt: d == "c2s")
    link.run()
    assert bytes(link.client.data) == data
    blocks = data_blocks(link.log)
    assert len(blocks) == len(set(blocks)) == 50_000 // 512 + 1
    assert link.server.retransmits == 0


def test_duplicate_ack_does_not_duplicate_windows():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {"windowsize": "4", "blksize": "512"}), MemoryFile("f", bytes(512 * 20)))
    out, _ = t.start(0.0)  # OACK
    assert out[0][:2] == b"\x00\x06"
    out, _ = t.datagram(p.encode_ack(0), 0.0)
    assert len(out) == 4
    out, _ = t.datagram(p.encode_ack(0), 0.0)  # duplicate ACK of the OACK
    assert out == []
    out, _ = t.datagram(p.encode_ack(4), 0.0)
    assert [int.from_bytes(o[2:4], "big") for o in out] == [5, 6, 7, 8]
    out, _ = t.datagram(p.encode_ack(4), 0.0)
    assert out == []


def test_partial_window_ack_restarts_from_ack_plus_one():
    """RFC 7440 section 4: an ACK inside the window restarts the window after it."""
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {"windowsize": "8", "blksize": "512"}), MemoryFile("f", bytes(512 * 40)))
    t.start(0.0)
    out, _ = t.datagram(p.encode_ack(0), 0.0)
    assert [int.from_bytes(o[2:4], "big") for o in out] == list(range(1, 9))
    out, _ = t.datagram(p.encode_ack(3), 0.0)
    assert [int.from_bytes(o[2:4], "big") for o in out] == list(range(4, 12))


def test_ack_for_block_not_yet_sent_is_ignored():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {"windowsize": "4"}), MemoryFile("f", bytes(512 * 40)))
    t.start(0.0)
    t.datagram(p.encode_ack(0), 0.0)  # blocks 1..4 out
    for bogus in (5, 9, 1000, 65535):
        out, ev = t.datagram(p.encode_ack(bogus), 0.0)
        assert out == [] and ev == ()
    assert t.acked == 0 and t.state is p.State.SENDING
    out, _ = t.datagram(p.encode_ack(4), 0.0)
    assert [int.from_bytes(o[2:4], "big") for o in out] == [5, 6, 7, 8]


def test_lost_block_in_window_recovered_via_gap_ack():
    data = os.urandom(512 * 30 + 7)
    dropped = set()

    def drop(d, pkt):
        # Lose block 3 the first time it is sent.
        if d == "s2c" and pkt[:4] == b"\x00\x03\x00\x03" and 3 not in dropped:
            dropped.add(3)
            return True
        return False

    link = Link(data, {"windowsize": 8, "blksize": 512}, drop=drop)
    link.run()
    assert bytes(link.client.data) == data
    assert link.now == 0.0  # recovered by the client's gap ACK, no timer needed
    assert data_blocks(link.log).count(3) == 1


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("ws", [1, 4, 16])
def test_random_loss_and_duplication(seed, ws):
    rng = random.Random(seed)
    data = rng.randbytes(rng.randrange(0, 40_000))
    link = Link(data, {"windowsize": ws, "blksize": 512, "tsize": 0}, drop=lambda d, pkt: rng.random() < 0.1, dup=lambda d, pkt: rng.random() < 0.05)
    link.run()
    assert link.client.failed is None
    assert bytes(link.client.data) == data
    assert link.server.state is p.State.DONE


# -- timers -----------------------------------------------------------------------------


def test_retransmit_only_at_deadline_and_give_up_after_retries():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {}), MemoryFile("f", bytes(3000)), timeout=2.0, retries=3)
    out, _ = t.start(10.0)
    first = out[0]
    assert t.next_deadline == 12.0
    assert t.timer(11.999) == ([], ())
    for i in range(3):
        out, ev = t.timer(t.next_deadline)
        assert out == [first] and ev == ()
    assert t.retransmits == 3
    assert t.next_deadline == 18.0
    out, ev = t.timer(18.0)
    assert out == [] and isinstance(ev[0], p.TransferFailed) and ev[0].reason == "timeout"
    assert t.state is p.State.FAILED and t.next_deadline is None


@pytest.mark.parametrize("options, acks", [({}, [1, 2, 3, 4, 5]), ({"windowsize": "4"}, [0, 4])])
def test_lost_final_ack_is_unconfirmed_not_timeout(options, acks):
    """Every block sent, only the last ACK missing: "unconfirmed" (the client has
    the data unless the final window was lost on every retry)."""
    t = p.ReadTransfer(p.ReadRequest("f", "octet", options), MemoryFile("f", bytes(512 * 5 + 10)), timeout=1.0, retries=2)
    t.start(0.0)
    for k in acks:
        t.datagram(p.encode_ack(k), 0.5)
    assert t.high == t.last_block and t.acked < t.last_block
    for now in (1.5, 2.5):
        out, ev = t.timer(now)
        assert out and ev == ()
    out, ev = t.timer(3.5)
    assert out == [] and ev[0].reason == "unconfirmed"
    assert t.state is p.State.FAILED


def test_vanished_before_the_last_block_is_a_timeout():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {"windowsize": "2"}), MemoryFile("f", bytes(512 * 5 + 10)), timeout=1.0, retries=0)
    t.start(0.0)
    t.datagram(p.encode_ack(0), 0.1)  # blocks 1-2 sent; 3-6 never
    out, ev = t.timer(1.1)
    assert ev[0].reason == "timeout"


def test_unacknowledged_oack_is_a_timeout_even_for_an_empty_file():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {"blksize": "512"}), MemoryFile("f", b""), timeout=1.0, retries=0)
    t.start(0.0)
    _, ev = t.timer(1.0)
    assert ev[0].reason == "timeout"


@pytest.mark.parametrize("options", [{}, {"blksize": "8"}, {"blksize": "1468", "tsize": "0"}, {"windowsize": "4"}])
def test_next_block_fast_path_is_datagram_without_the_lists(options):
    """``next_block`` (the engine's lock-step fast path) must agree with ``datagram``
    on every ACK, good or stray, across read-ahead refills and block rollover."""
    payload = random.Random(3).randbytes(70_000 if options.get("blksize") != "8" else 600_000)
    a = p.ReadTransfer(p.ReadRequest("f", "octet", options), MemoryFile("f", payload))
    b = p.ReadTransfer(p.ReadRequest("f", "octet", options), MemoryFile("f", payload))
    assert a.start(0.0) == b.start(0.0)
    rng = random.Random(5)
    now, fast = 0.0, 0
    while not a.finished:
        now += 0.001
        r = rng.random()
        k = a.acked + 1 if r < 0.8 else a.acked if r < 0.9 else a.high + 1
        if rng.random() < 0.03:  # a stray DATA: neither path accepts it
            stray = b"\x00\x03\x00\x01xx"
            assert b.next_block(stray, now) is None
            for t in (a, b):
                with pytest.raises(p.RemoteProtocolError):
                    t.datagram(stray, now)
            continue
        pkt = p.encode_ack(k)
        got = b.next_block(pkt, now)
        if got is not None:
            fast += 1
            got_out, got_ev = [got], ()
        else:
            got_out, got_ev = b.datagram(pkt, now)
        want_out, want_ev = a.datagram(pkt, now)
        assert (got_out, got_ev) == (want_out, want_ev)
        assert (b.acked, b.high, b.state, b.next_deadline) == (a.acked, a.high, a.state, a.next_deadline)
    assert b.finished and b.acked == a.last_block
    assert (fast > 0) == ("windowsize" not in options)


def test_progress_resets_the_retry_budget():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {}), MemoryFile("f", bytes(5000)), timeout=1.0, retries=1)
    t.start(0.0)
    out, _ = t.timer(1.0)  # one retransmit of block 1
    assert len(out) == 1
    t.datagram(p.encode_ack(1), 1.5)
    out, ev = t.timer(2.5)  # budget fresh again: retransmit block 2, not fail
    assert len(out) == 1 and ev == ()
    assert out[0][2:4] == b"\x00\x02"


def test_oack_is_retransmitted():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {"tsize": "0"}), MemoryFile("f", b"abc"))
    out, _ = t.start(0.0)
    again, _ = t.timer(1.0)
    assert again == out and out[0] == p.encode_oack({"tsize": "3"})


def test_negotiated_timeout_sets_the_deadline():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {"timeout": "7"}), MemoryFile("f", b"abc"), timeout=1.0)
    t.start(100.0)
    assert t.next_deadline == 107.0
    assert t.negotiated.oack == {"timeout": "7"}


# -- errors from the peer -------------------------------------------------------------


def test_error_8_after_the_oack_is_a_declined_size_probe_not_a_failure():
    # UEFI PXE (edk2): RRQ with tsize 0 blksize 1468 windowsize 4, then ERROR 8 on the OACK.
    opts = {"tsize": "0", "blksize": "1468", "windowsize": "4"}
    t = p.ReadTransfer(p.ReadRequest("syslinux.efi", "octet", opts), MemoryFile("syslinux.efi", bytes(200_000)))
    out = t.start(0.0)
    assert p.parse_packet(out[0][0]).options["tsize"] == "200000"
    out, ev = t.datagram(p.encode_error(p.ERR_OPTION_NEGOTIATION, "tsize only"), 0.1)
    assert out == [] and ev[0].reason == "options_declined" and ev[0].code == 8
    assert t.retransmits == 0 and t.bytes_acked == 0 and t.finished


def test_error_8_after_data_is_an_abort():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {}), MemoryFile("f", bytes(3000)))
    t.start(0.0)
    _, ev = t.datagram(p.encode_error(p.ERR_OPTION_NEGOTIATION, "late"), 0.0)
    assert ev[0].reason == "aborted"


def test_two_byte_error_ends_the_transfer():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {}), MemoryFile("f", bytes(3000)))
    t.start(0.0)
    out, ev = t.datagram(b"\x00\x05", 0.0)
    assert out == [] and ev[0].reason == "aborted"
    assert t.finished and t.next_deadline is None
    assert t.datagram(p.encode_ack(1), 0.0) == ([], ())  # terminal: ignored


def test_error_with_huge_message_is_truncated():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {}), MemoryFile("f", bytes(3000)))
    t.start(0.0)
    _, ev = t.datagram(b"\x00\x05\x00\x08" + b"A" * 60000, 0.0)
    assert ev[0].code == 8 and ev[0].message == "A" * p.MAX_PEER_MESSAGE


def test_unexpected_opcodes_raise_remote_error_and_change_nothing():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {}), MemoryFile("f", bytes(3000)))
    t.start(0.0)
    for junk in [b"", b"\x00", b"\x00\x04\x00", p.encode_data(1, b"x"), p.encode_request("f"), b"\x00\x09abc", b"\xff\xff"]:
        with pytest.raises(p.RemoteProtocolError):
            t.datagram(junk, 0.0)
    assert t.state is p.State.SENDING and t.acked == 0


def test_api_misuse_is_local_protocol_error():
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {}), MemoryFile("f", b""))
    with pytest.raises(p.LocalProtocolError):
        t.datagram(p.encode_ack(1), 0.0)
    t.start(0.0)
    with pytest.raises(p.LocalProtocolError):
        t.start(0.0)
    with pytest.raises(p.LocalProtocolError):
        p.negotiate({}, tsize=None, blksize_max=7)
    with pytest.raises(p.LocalProtocolError):
        p.negotiate({}, tsize=None, windowsize_max=0)


@pytest.mark.parametrize("mode", ["mail", "binary", "", "octet2"])
def test_unknown_modes_refused(mode):
    with pytest.raises(p.RemoteProtocolError) as e:
        p.ReadTransfer(p.ReadRequest("f", mode, {}), MemoryFile("f", b""))
    assert e.value.error_code == p.ERR_ILLEGAL_OPERATION


# -- round-trip samples and duplicate ACKs (the congestion signals) ----------------------


def test_round_trip_samples_follow_karn_and_duplicate_acks_are_counted():
    """The congestion signals the scheduler reads: block round trips (never over a retransmission) and duplicate ACKs."""
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {}), MemoryFile("f", bytes(512 * 6)), timeout=1.0, retries=3)
    t.start(0.0)
    t.datagram(p.encode_ack(1), 0.010)  # 10 ms
    assert (t.rtt_n, round(t.rtt_sum, 6)) == (1, 0.010)
    assert t.next_block(p.encode_ack(2), 0.030) is not None  # the fast path samples too: 20 ms
    assert (t.rtt_n, round(t.rtt_sum, 6)) == (2, 0.030)
    t.datagram(p.encode_ack(2), 0.040)  # the client re-ACKs: its timer fired first
    assert t.dup_acks == 1 and t.rtt_n == 2
    out, _ = t.timer(1.030)  # our own timeout: block 3 again
    assert [o[2:4] for o in out] == [b"\x00\x03"]
    t.datagram(p.encode_ack(3), 1.050)  # Karn: no sample from a retransmitted block
    assert t.rtt_n == 2
    t.datagram(p.encode_ack(4), 1.055)  # the next block is fresh again: 5 ms
    assert t.rtt_n == 3 and round(t.rtt_sum, 6) == 0.035
    t.datagram(p.encode_ack(9), 1.06)  # never sent: not a duplicate
    assert t.dup_acks == 1


# -- a peer that re-ACKs while our DATA is lost -----------------------------------------


def _lossy_run(t: p.ReadTransfer, reacks, *, lost_until: float, limit: float = 300.0) -> tuple[float, list]:
    """Drive ``t`` against a client that re-ACKs its last block at the times in ``reacks`` while
    every DATA sent before ``lost_until`` is lost; a DATA sent later is ACKed 10 ms after it left
    (lock-step). Asserts that no duplicate ACK is ever answered. Returns (when it ended, the event)."""
    reacks = iter(reacks)
    next_reack = next(reacks, float("inf"))
    pending: float | None = None  # when the ACK of a delivered DATA arrives
    now, ev = 0.0, ()
    while not t.finished and now < limit:
        due = min(t.next_deadline, next_reack, pending if pending is not None else float("inf"))
        now = due
        if pending is not None and due == pending:
            pending = None
            out, ev = t.datagram(p.encode_ack(t.high & 0xFFFF), now)
        elif due == next_reack:
            next_reack = next(reacks, float("inf"))
            out, ev = t.datagram(p.encode_ack(t.acked & 0xFFFF), now)
            assert out == [], "a duplicate ACK was answered (Sorcerer's Apprentice)"
        else:
            out, ev = t.timer(now)
        if out and now >= lost_until:
            pending = now + 0.01
    return now, list(ev)


def _pxelinux_reacks(since: float) -> list[float]:
    """When pxelinux re-ACKs after the last new DATA at ``since``: its TimeoutTable (~131 s in all)."""
    return list(itertools.accumulate(PXELINUX_TIMEOUTS, initial=since))[1:]


def _proven_lockstep(size: int = 512 * 20) -> p.ReadTransfer:
    """The trio server's settings (retries 5, max_stall 60 s, adaptive RTO); DATA 1 ACKed at 10 ms, DATA 2 out."""
    t = p.ReadTransfer(p.ReadRequest("f", "octet", {}), MemoryFile("f", bytes(size)), timeout=1.0, retries=5,
                       max_stall=60.0, rto_min=0.2, rto_max=4.0)
    t.start(0.0)
    out, _ = t.datagram(p.encode_ack(1), 0.01)
    assert [o[2:4] for o in out] == [b"\x00\x02"]
    return t


def test_a_client_that_keeps_re_acking_while_its_data_is_lost_is_served_until_max_stall():
    """pxelinux re-ACKs for ~131 s; its DATA is lost all the while (a full switch queue). The retry
    budget (5 backed-off timeouts, ~10 s) is not what ends the transfer: the duplicate ACKs show the
    client is alive, so the server keeps resending on its timer until max_stall."""
    t = _proven_lockstep()
    ended, ev = _lossy_run(t, _pxelinux_reacks(0.01), lost_until=float("inf"))
    assert ev and ev[0].reason == "timeout"
    assert ended == pytest.approx(0.01 + 60.0)  # max_stall after the last progress, not ~10 s
    assert t.retransmits > t.retries and t.dup_acks > t.retries
    assert t.longest_stall == pytest.approx(60.0)


def test_a_client_whose_data_is_lost_for_40_s_completes():
    t = _proven_lockstep()
    ended, ev = _lossy_run(t, _pxelinux_reacks(0.01), lost_until=40.0)
    assert t.state is p.State.DONE and isinstance(ev[0], p.TransferComplete)
    assert ended < 40.0 + 4.0 + 1.0  # the next timer resend after the loss (at most rto_max later) got through
    assert 40.0 - 0.01 <= t.longest_stall < 44.0  # the timer's view of the stall: from the ACK of block 1 to the resend that got through


def test_a_peer_that_only_re_acks_is_ended_at_max_stall_and_gets_only_the_timers_resends():
    """A hostile (proven) peer re-ACKing every 50 ms cannot hold its slot past max_stall, nor draw
    a single extra datagram: the server sends only what its backed-off timer sends."""
    t = _proven_lockstep()
    ended, ev = _lossy_run(t, [0.01 + 0.05 * i for i in range(1, 2000)], lost_until=float("inf"))
    assert ev and ev[0].reason == "timeout"
    assert ended == pytest.approx(0.01 + 60.0)
    assert t.dup_acks >= 1000
    # The timer's resends only: 0.2 s doubling to rto_max (0.4 + 0.8 + 1.6 + 3.2 s), then every 4 s.
    assert t.retransmits <= 4 + (60.0 - 6.0) / 4.0 + 1
