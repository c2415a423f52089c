"""The admission window (orchestrator/window.py) on plain numbers: no trio, no clock, one test per rule."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from orchestrator.window import AdmissionWindow, DecisionKind, WindowTuning


@dataclass
class Load:
    """The fields of bootserver.admission.Load that the window reads."""

    active: int = 0
    retransmit_rate: float = 0.0
    client_retry_rate: float = 0.0
    rtt: float | None = None


QUIET = Load()


def full(w: AdmissionWindow, load: Load = QUIET, now: float = 0.0, *, downloading: int | None = None):
    """An update with the window full, nodes queued and (by default) all of it downloading."""
    return w.update(load, now, in_flight=w.size, downloading=w.size if downloading is None else downloading, queued=True)


def test_starts_at_the_initial_window_capped_by_the_plan():
    assert AdmissionWindow(32).size == 8
    assert AdmissionWindow(3).size == 3
    assert AdmissionWindow(32, tuning=WindowTuning(initial_window=2)).size == 2


def test_slow_start_doubles_only_once_half_the_window_downloads():
    w = AdmissionWindow(64)
    d = full(w, downloading=3)  # 8 woken, 3 loading: the rest are still in POST and DHCP
    assert (d.kind, d.size, d.changed) == (DecisionKind.HOLD, 8, False)
    assert d.reason == "slow start: 3 of 8 downloading, waiting for half"
    d = full(w, downloading=4)
    assert (d.kind, d.old, d.size, d.reason) == (DecisionKind.GROW_SLOW_START, 8, 16, "room")
    assert w.slow_start


def test_no_growth_while_the_window_is_not_full_or_nothing_waits():
    w = AdmissionWindow(64)
    d = w.update(QUIET, 0.0, in_flight=7, downloading=7, queued=True)
    assert (d.kind, d.size, d.reason) == (DecisionKind.HOLD, 8, "window not full")
    d = w.update(QUIET, 0.0, in_flight=8, downloading=8, queued=False)
    assert (d.kind, d.size, d.reason) == (DecisionKind.HOLD, 8, "nothing queued")


def test_loss_halves_and_ends_slow_start():
    w = AdmissionWindow(64)
    full(w)
    assert w.size == 16
    d = full(w, Load(retransmit_rate=50.0))
    assert (d.kind, d.old, d.size, d.reason) == (DecisionKind.SHRINK_LOSS, 16, 8, "loss: 50.0 retransmits/s")
    assert not w.slow_start
    d = full(w)  # congestion avoidance from now on: an eighth, not double
    assert (d.kind, d.size) == (DecisionKind.GROW, 9)
    d = full(w)
    assert d.size == 10  # max(1, 9 // 8) = 1


def test_client_resends_are_loss_too():
    w = AdmissionWindow(64, tuning=WindowTuning(initial_window=32))
    d = full(w, Load(client_retry_rate=40.0))
    assert (d.kind, d.size, d.reason) == (DecisionKind.SHRINK_LOSS, 16, "loss: 40.0 client re-sends/s")
    d = full(w, Load(retransmit_rate=5.0, client_retry_rate=5.0))  # at the threshold is not above it
    assert d.kind is DecisionKind.GROW


def test_loss_never_goes_below_one():
    w = AdmissionWindow(64, tuning=WindowTuning(initial_window=1))
    d = full(w, Load(retransmit_rate=99.0))
    assert (d.kind, d.size, d.changed) == (DecisionKind.SHRINK_LOSS, 1, False)
    d = full(w, Load(retransmit_rate=99.0))
    assert d.size == 1


def test_delay_takes_a_quarter_off_once_per_backlog():
    w = AdmissionWindow(64, tuning=WindowTuning(initial_window=16))
    base, loaded = Load(active=80, rtt=0.0005), Load(active=80, rtt=0.012)  # 80 * (1 - 0.5/12) ~ 77 blocks queued > 64
    assert full(w, base, 0.0).size == 32  # the unloaded round trip: no signal
    d = full(w, loaded, 1.0)
    assert (d.kind, d.old, d.size) == (DecisionKind.SHRINK_DELAY, 32, 24)
    assert d.reason == "delay: ~77 blocks queued (rtt 12.0 ms vs 0.5 ms unloaded, 80 transfers)"
    assert not w.slow_start
    # The 32 admitted before the queue showed are still in flight: no second shrink for them.
    d = w.update(loaded, 2.0, in_flight=32, downloading=32, queued=True)
    assert (d.kind, d.size) == (DecisionKind.HOLD, 24) and d.reason.startswith("delay: ~77 blocks queued")
    d = w.update(loaded, 3.0, in_flight=24, downloading=24, queued=True)  # drained to the window: shrink again
    assert (d.kind, d.size) == (DecisionKind.SHRINK_DELAY, 18)


def test_a_few_dozen_queued_blocks_are_no_signal():
    w = AdmissionWindow(64, tuning=WindowTuning(initial_window=16))
    full(w, Load(active=80, rtt=0.0005), 0.0)
    d = full(w, Load(active=80, rtt=0.0006), 1.0)  # ~13 queued: under half the target of 64
    assert d.kind is DecisionKind.GROW_SLOW_START


def test_slow_start_ends_on_a_building_queue_without_shrinking():
    # HyStart's delay exit: more than half the target queued ends the doubling; the window then grows by an eighth.
    w = AdmissionWindow(512, tuning=WindowTuning(initial_window=32))
    full(w, Load(active=80, rtt=0.001), 0.0)
    assert (w.size, w.slow_start) == (64, True)
    d = full(w, Load(active=80, rtt=0.0018), 1.0)  # 80 * (1 - 1/1.8) ~ 36 queued: > 32, < 64
    assert (d.kind, d.old, d.size) == (DecisionKind.GROW, 64, 72)
    assert not w.slow_start
    d = full(w, Load(active=80, rtt=0.006), 2.0)  # ~67 queued > 64: now a quarter off
    assert (d.kind, d.size) == (DecisionKind.SHRINK_DELAY, 54)


def test_loss_shrinks_once_per_backlog():
    # A client re-send rate that stays up for seconds (the nodes admitted before the cut are still
    # downloading) halves the window once, not once a second down to 1.
    w = AdmissionWindow(64, tuning=WindowTuning(initial_window=32))
    lossy = Load(active=32, client_retry_rate=6.0)
    d = w.update(lossy, 0.0, in_flight=32, downloading=32, queued=True)
    assert (d.kind, d.size) == (DecisionKind.SHRINK_LOSS, 16)
    for t in (1.0, 2.0, 3.0):
        d = w.update(lossy, t, in_flight=30, downloading=30, queued=True)
        assert (d.kind, d.size) == (DecisionKind.HOLD, 16)
        assert d.reason == "loss: 6.0 client re-sends/s; 30 in flight > window 16"
    d = w.update(lossy, 4.0, in_flight=16, downloading=16, queued=True)  # the backlog drained and loss goes on
    assert (d.kind, d.size) == (DecisionKind.SHRINK_LOSS, 8)


def test_the_unloaded_round_trip_is_the_smallest_of_the_last_rtt_base_window_seconds():
    w = AdmissionWindow(512, tuning=WindowTuning(initial_window=16, rtt_base_window=10.0))
    full(w, Load(active=100, rtt=0.001), 0.0)
    assert full(w, Load(active=100, rtt=0.004), 5.0).kind is DecisionKind.SHRINK_DELAY  # 75 queued against 1 ms
    d = w.update(Load(active=100, rtt=0.004), 11.0, in_flight=0, downloading=0, queued=False)
    assert d.kind is DecisionKind.HOLD and d.reason == "nothing queued"  # the 1 ms sample aged out: 4 ms is the base now


def test_a_loss_update_adds_no_round_trip_sample():
    w = AdmissionWindow(512, tuning=WindowTuning(initial_window=16))
    full(w, Load(active=100, retransmit_rate=50.0, rtt=0.0001), 0.0)  # loss: this tiny rtt is not kept
    d = full(w, Load(active=100, rtt=0.004), 1.0)
    assert d.kind is DecisionKind.GROW  # 4 ms is the only sample, so the base: nothing queued


def test_growth_stops_at_max_window():
    w = AdmissionWindow(12)
    d = full(w)
    assert (d.kind, d.size) == (DecisionKind.GROW_SLOW_START, 12)
    d = full(w)
    assert (d.kind, d.size, d.changed) == (DecisionKind.GROW_SLOW_START, 12, False)
    full(w, Load(retransmit_rate=50.0))
    assert [full(w).size for _ in range(8)] == [7, 8, 9, 10, 11, 12, 12, 12]


def test_not_adaptive_is_max_window_whatever_the_load():
    w = AdmissionWindow(32, adaptive=False)
    assert w.size == 32
    d = full(w, Load(retransmit_rate=99.0))
    assert (d.kind, d.size, d.reason) == (DecisionKind.HOLD, 32, "not adaptive")


@pytest.mark.parametrize("load, line", [
    (Load(retransmit_rate=50.0), "admission window 16 -> 8 (loss: 50.0 retransmits/s: retransmits 50.0/s, client retries 0.0/s)"),
    (Load(active=80, rtt=0.012, retransmit_rate=50.0, client_retry_rate=1.25),
     "admission window 16 -> 8 (loss: 50.0 retransmits/s: retransmits 50.0/s, client retries 1.2/s, rtt 12.0 ms)"),
])
def test_log_line(load, line):
    w = AdmissionWindow(64, tuning=WindowTuning(initial_window=16))
    assert full(w, load).log_line() == line


def test_log_line_of_growth_says_room():
    w = AdmissionWindow(64)
    assert full(w, Load(rtt=0.0005)).log_line() == ("admission window 8 -> 16 (room: retransmits 0.0/s, client retries 0.0/s, "
                                                   "rtt 0.5 ms)")
