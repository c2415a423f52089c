"""The adaptive retransmit timeout: RFC 6298's estimator, in the sans-IO core and over real UDP.

The estimator and the core are fed plain floats (no clock); the server test
runs real sockets on 127.0.0.1 under trio's MockClock, with a client that delays
its ACKs to make the round trip what the test wants, then drops one block and
times the server's retransmission.
"""

from __future__ import annotations

import socket
from functools import partial

import pytest
import trio

from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.tftp import TftpCounters, serve_tftp
from orchestrator.protocols import tftp as p
from orchestrator.protocols.tftp.rto import RTO_MIN, RtoEstimator

HOST = "127.0.0.1"


class MemFile:
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def pread(self, off: int, n: int) -> bytes:
        return self.data[off:off + n]


# -- the estimator -----------------------------------------------------------------------


def test_first_sample_sets_srtt_and_half_variance():
    e = RtoEstimator(1.0, rto_min=0.01, rto_max=10)
    assert e.rto == 1.0 and e.srtt is None  # RFC 6298 (2.1): the initial RTO before any sample
    e.sample(0.1)
    assert e.srtt == pytest.approx(0.1) and e.rttvar == pytest.approx(0.05)
    assert e.rto == pytest.approx(0.1 + 4 * 0.05)  # (2.2)


def test_later_samples_smooth_with_the_rfc_gains():
    e = RtoEstimator(1.0, rto_min=0.01, rto_max=10)
    e.sample(0.1)
    e.sample(0.3)
    assert e.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.2)  # (2.3), with the old srtt
    assert e.srtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.3)
    assert e.rto == pytest.approx(e.srtt + 4 * e.rttvar)


def test_rto_follows_a_changing_round_trip_within_its_bounds():
    e = RtoEstimator(1.0)
    for _ in range(50):
        e.sample(0.0005)  # an idle LAN
    assert e.rto == RTO_MIN  # the floor
    for _ in range(50):
        e.sample(0.4)  # a congested link
    assert 0.4 < e.rto < 0.5
    for _ in range(50):
        e.sample(0.05)
    assert e.rto == pytest.approx(max(RTO_MIN, e.srtt + 4 * e.rttvar)) and e.rto < 0.25
    for _ in range(50):
        e.sample(30.0)
    assert e.rto == 4.0  # the ceiling


def test_backoff_doubles_up_to_the_ceiling_and_a_sample_recomputes():
    e = RtoEstimator(1.0, rto_max=5.0)
    assert [e.backoff() for _ in range(4)] == [2.0, 4.0, 5.0, 5.0]
    e.sample(0.01)
    assert e.rto == RTO_MIN


def test_n_samples_of_a_mean_move_the_estimate_like_n_samples():
    a, b = RtoEstimator(1.0, rto_min=0.001), RtoEstimator(1.0, rto_min=0.001)
    a.sample(0.2)
    b.sample(0.2)
    a.sample(0.05, 10)
    for _ in range(10):
        b.sample(0.05)
    assert a.srtt == pytest.approx(b.srtt) and a.rttvar == pytest.approx(b.rttvar) and a.rto == pytest.approx(b.rto)


# -- in the core -------------------------------------------------------------------------


def _core(**kw) -> p.ReadTransfer:
    kw.setdefault("rto_min", RTO_MIN)
    return p.ReadTransfer(p.ReadRequest("f", "octet", {}), MemFile(bytes(512 * 100)), timeout=1.0, retries=5, **kw)


def _lockstep(x: p.ReadTransfer, now: float, rtt: float, blocks: int) -> float:
    for _ in range(blocks):
        now += rtt
        pkts, _ = x.datagram(p.encode_ack(x.high & 0xFFFF), now)
        assert pkts
    return now


def test_core_timeout_tracks_the_round_trip_and_karns_rule_skips_resent_blocks():
    x = _core()
    now = 0.0
    x.start(now)
    assert x.timeout == 1.0  # before any sample
    now = _lockstep(x, now, 0.5, 20)
    assert 0.5 < x.timeout < 0.7
    slow = x.timeout
    # A loss: the timer resends and backs off; the ACK that follows is no sample (Karn).
    now = x.next_deadline
    pkts, _ = x.timer(now)
    assert len(pkts) == 1 and x.timeout == pytest.approx(2 * slow)
    samples = x.rto_estimator.samples
    now += 0.001  # an ACK right after the resend: it may answer the first copy
    x.datagram(p.encode_ack(x.high & 0xFFFF), now)
    assert x.rto_estimator.samples == samples and x.timeout == pytest.approx(2 * slow)
    now = _lockstep(x, now, 0.01, 40)  # the link drains
    assert x.timeout == RTO_MIN
    assert x.next_deadline == pytest.approx(now + RTO_MIN)


def test_a_negotiated_timeout_stays_fixed():
    x = p.ReadTransfer(p.ReadRequest("f", "octet", {"timeout": "3"}), MemFile(bytes(5000)), timeout=1.0, rto_min=RTO_MIN)
    x.start(0.0)
    x.datagram(p.encode_ack(0), 0.01)
    x.datagram(p.encode_ack(1), 0.02)
    assert x.rto_estimator is None and x.timeout == 3.0 and x.next_deadline == pytest.approx(3.02)


def test_without_rto_min_the_timeout_is_fixed():
    x = _core(rto_min=None)
    x.start(0.0)
    _lockstep(x, 0.0, 0.01, 10)
    assert x.rto_estimator is None and x.timeout == 1.0


def test_fast_forward_feeds_the_native_loops_round_trips():
    x = _core()
    x.start(0.0)
    x.datagram(p.encode_ack(1), 0.3)  # one sample of 0.3 s
    loaded = x.timeout
    # The native loop ran 30 lock-step rounds of 10 ms; its deadline = last ACK + the RTO it was given.
    x.fast_forward(31, 0.6, 0.6 + loaded, 30 * 0.01, 30)
    assert x.timeout < loaded and x.next_deadline == pytest.approx(0.6 + x.timeout)


# -- over real UDP ---------------------------------------------------------------------------


async def _gap_after_a_loss(sock: socket.socket, tid, rtt: float, blocks: int, first: int) -> tuple[float, int]:
    """ACK ``blocks`` blocks ``rtt`` after each arrives, then ignore one and time its resend."""
    expect = first
    for _ in range(blocks):
        data, _ = await _recv(sock)
        pkt = p.parse_packet(data)
        assert pkt.block == expect
        await trio.sleep(rtt)
        sock.sendto(p.encode_ack(expect), tid)
        expect += 1
    data, _ = await _recv(sock)  # this one is "lost": no ACK
    t_lost = trio.current_time()
    assert p.parse_packet(data).block == expect
    data, _ = await _recv(sock)
    assert p.parse_packet(data).block == expect  # the retransmission
    gap = trio.current_time() - t_lost
    sock.sendto(p.encode_ack(expect), tid)
    return gap, expect + 1


async def _recv(sock: socket.socket):
    while True:
        try:
            return sock.recvfrom(65536)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def test_server_retransmit_timeout_follows_a_changing_round_trip(nursery, tmp_path, autojump_clock):
    """Lock-step over loopback; the client's ACK delay is the link's round trip (virtual time, exact):
    300 ms, then 20 ms. The resend of a lost block comes one RTO after the block: above 300 ms on the
    slow link, at the 200 ms floor on the fast one, and 1 s (the fixed timeout) with adaptation off."""
    (tmp_path / "f").write_bytes(bytes(512 * 400))
    with trio.fail_after(600):
        gaps = {}
        for adaptive in (True, False):
            counters = TftpCounters()
            addr = await nursery.start(partial(serve_tftp, BootFiles(tmp_path), HOST, 0, counters=counters, timeout=1.0,
                                               rto_min=RTO_MIN if adaptive else None))
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind((HOST, 0))
            try:
                s.sendto(p.encode_request("f"), addr)
                data, tid = await _recv(s)
                assert p.parse_packet(data).block == 1
                s.sendto(p.encode_ack(1), tid)
                slow, nxt = await _gap_after_a_loss(s, tid, 0.3, 30, 2)
                fast, _ = await _gap_after_a_loss(s, tid, 0.02, 60, nxt)
                gaps[adaptive] = (slow, fast)
            finally:
                s.close()
        slow, fast = gaps[True]
        assert 0.3 < slow < 0.5
        assert fast == pytest.approx(RTO_MIN, abs=1e-3)
        assert gaps[False] == (pytest.approx(1.0, abs=1e-3), pytest.approx(1.0, abs=1e-3))
