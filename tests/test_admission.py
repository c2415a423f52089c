"""Admission: token-bucket math with explicit times, and the FIFO slot queue.

Bucket and rate-window tests pass times in directly (the math reads no clock).
Slot-queue tests run under pytest-trio's ``autojump_clock`` so waits are exact
and instant; every test has a ``fail_after``.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from orchestrator.bootserver.admission import Admission, Load, RateWindow, TokenBucket

# -- token bucket -------------------------------------------------------------


def test_unlimited_rate_always_go():
    adm = Admission()
    assert adm.rate is None
    assert adm.try_consume(10**12, 0.0) == 0.0
    assert adm.try_consume(10**12, 0.0) == 0.0


def test_bucket_starts_full_then_waits_for_refill():
    # Binary-exact numbers so the assertions can be exact.
    adm = Admission(rate=1024.0, burst=2048)
    assert adm.try_consume(1536, 10.0) == 0.0  # 512 left
    assert adm.try_consume(512, 10.0) == 0.0  # 0 left
    assert adm.try_consume(128, 10.0) == 0.125  # 128 bytes at 1024 B/s
    # A refusal takes nothing: half-way there, half the wait remains.
    assert adm.try_consume(128, 10.0625) == 0.0625
    assert adm.try_consume(128, 10.125) == 0.0
    assert adm.try_consume(1, 10.125) == 1 / 1024


def test_bucket_refill_caps_at_burst():
    b = TokenBucket(rate=1000.0, burst=2000)
    assert b.try_consume(2000, 0.0) == 0.0
    # An hour idle refills only to burst: 2000 go, the 2001st waits.
    assert b.try_consume(2000, 3600.0) == 0.0
    assert b.try_consume(1, 3600.0) == pytest.approx(0.001)


def test_bucket_long_run_rate_is_respected():
    """Drain a 64 KiB/s bucket with 4 KiB chunks for 10 s of simulated time."""
    rate, chunk = 65536.0, 4096
    b = TokenBucket(rate=rate, burst=chunk)
    now, sent = 0.0, 0
    for _ in range(10_000):  # bounded; ends by time
        if now >= 10.0:
            break
        wait = b.try_consume(chunk, now)
        if wait == 0.0:
            sent += chunk
        else:
            now += wait
    assert now >= 10.0
    # burst + rate * elapsed, give or take one chunk
    assert abs(sent - (chunk + rate * now)) <= chunk


def test_chunk_bigger_than_burst_goes_into_debt():
    b = TokenBucket(rate=100.0, burst=1000)
    assert b.try_consume(5000, 0.0) == 0.0  # full bucket: granted, 4000 in debt
    assert b.tokens == pytest.approx(-4000.0)
    # The next request waits for the debt plus its own tokens.
    assert b.try_consume(100, 0.0) == pytest.approx(41.0)
    # A big request waits for a full bucket, never forever.
    assert b.try_consume(5000, 0.0) == pytest.approx(50.0)
    assert b.try_consume(5000, 50.0) == 0.0


def test_time_going_backwards_refills_nothing():
    b = TokenBucket(rate=1000.0, burst=1000)
    assert b.try_consume(1000, 100.0) == 0.0
    assert b.try_consume(500, 50.0) == pytest.approx(0.5)
    assert b.try_consume(500, 100.5) == 0.0


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_rate_refused(rate):
    with pytest.raises(ValueError):
        Admission(rate=rate)


def test_bad_arguments_refused():
    with pytest.raises(ValueError):
        Admission(max_active=0)
    with pytest.raises(ValueError):
        Admission(rate=10.0, burst=0)
    with pytest.raises(ValueError):
        TokenBucket(10.0, 10).try_consume(-1, 0.0)


async def test_consume_waits_on_trio_clock(autojump_clock):
    with trio.fail_after(60):
        adm = Admission(rate=1000.0, burst=1000)
        t0 = trio.current_time()
        await adm.consume(1000)  # bucket full: immediate
        assert trio.current_time() == t0
        await adm.consume(500)
        assert trio.current_time() - t0 == pytest.approx(0.5)
        await Admission().consume(10**9)  # unlimited: immediate


# -- load reporting -------------------------------------------------------------


def test_rate_window_sliding():
    w = RateWindow(window=5.0, bins=10)
    assert w.rate(0.0) == 0.0
    for i in range(100):  # 1000 bytes every 0.1 s for 10 s => 10 000 B/s
        w.add(1000, i * 0.1)
    assert w.rate(9.95) == pytest.approx(10_000, rel=0.11)
    assert w.rate(30.0) == 0.0  # everything aged out


def test_rate_window_young_server_not_underreported():
    w = RateWindow(window=5.0, bins=10)
    w.add(1000, 100.0)
    w.add(1000, 100.9)
    assert w.rate(101.0) == pytest.approx(2000.0)  # 2000 B over 1 s, not over 5 s


def test_load_snapshot():
    adm = Admission(max_active=4)
    adm.note_sent(50_000, 10.0)
    adm.note_sent(50_000, 11.0)
    adm.note_retransmits(3, 10.5)
    ld = adm.load(12.0)
    assert isinstance(ld, Load)
    assert (ld.active, ld.queued) == (0, 0)
    assert ld.bytes_per_s == pytest.approx(50_000.0)  # 100 kB over 2 s
    assert ld.retransmit_rate == pytest.approx(2.0)  # 3 over 1.5 s: measured from its first sample at 10.5
    assert adm.load(100.0).bytes_per_s == 0.0


# -- slots --------------------------------------------------------------------------


@pytest.mark.parametrize("max_active", [1, 2, 3])
async def test_max_active_respected_and_fifo(autojump_clock, max_active):
    adm = Admission(max_active=max_active)
    order: list[int] = []
    peak = 0

    async def transfer(i: int, started: trio.Event) -> None:
        nonlocal peak
        started.set()
        async with adm.slot():
            order.append(i)
            peak = max(peak, adm.load(0).active)
            await trio.sleep(1)

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            for i in range(6):
                ev = trio.Event()
                n.start_soon(transfer, i, ev)
                await ev.wait()  # enqueue in a known order
                await trio.testing.wait_all_tasks_blocked()
            ld = adm.load(0)
            assert (ld.active, ld.queued) == (max_active, 6 - max_active)
    # Slots go to the queue in arrival order, round by round (trio may run the
    # tasks woken in one tick in any order, so compare each round as a set).
    rounds = [order[i : i + max_active] for i in range(0, 6, max_active)]
    assert [set(r) for r in rounds] == [set(range(i, min(i + max_active, 6))) for i in range(0, 6, max_active)]
    assert peak == max_active
    # max_active at a time, one second each.
    assert trio.current_time() == pytest.approx(len(rounds))
    assert adm.load(0) == Load(0, 0, 0.0, 0.0)


async def test_cancelled_waiter_leaves_queue_and_leaks_nothing(autojump_clock):
    adm = Admission(max_active=1)
    got: list[str] = []
    release = trio.Event()

    async def holder() -> None:
        async with adm.slot():
            got.append("holder")
            await release.wait()

    async def waiter(name: str) -> None:
        async with adm.slot():
            got.append(name)

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            n.start_soon(holder)
            await trio.testing.wait_all_tasks_blocked()
            cs_holder: list[trio.CancelScope] = []

            async def cancellable() -> None:
                with trio.CancelScope() as cs:
                    cs_holder.append(cs)
                    await waiter("cancelled")

            n.start_soon(cancellable)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(waiter, "second")
            await trio.testing.wait_all_tasks_blocked()
            assert adm.load(0).queued == 2
            cs_holder[0].cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert adm.load(0).queued == 1
            release.set()
    assert got == ["holder", "second"]
    assert adm.load(0).active == 0 and adm.load(0).queued == 0


async def test_cancel_racing_handoff_never_leaks(autojump_clock):
    """Release a slot and cancel its designated heir in the same tick: either the
    heir gets it and releases it, or it passes on -- never lost."""
    adm = Admission(max_active=1)
    with trio.fail_after(60):
        for _ in range(20):
            async with trio.open_nursery() as n:
                entered = trio.Event()
                release = trio.Event()

                async def holder() -> None:
                    async with adm.slot():
                        entered.set()
                        await release.wait()

                async def heir(cs_out: list[trio.CancelScope]) -> None:
                    with trio.CancelScope() as cs:
                        cs_out.append(cs)
                        async with adm.slot():
                            await trio.sleep(0)

                n.start_soon(holder)
                await entered.wait()
                scopes: list[trio.CancelScope] = []
                n.start_soon(heir, scopes)
                await trio.testing.wait_all_tasks_blocked()
                release.set()
                await trio.sleep(0)  # holder releases -> heir unparked
                scopes[0].cancel()
            assert adm.load(0).active == 0
            assert adm.load(0).queued == 0
        # And the pool still works.
        async with adm.slot():
            assert adm.load(0).active == 1


async def test_cancelled_before_acquire_takes_nothing(autojump_clock):
    adm = Admission(max_active=1)
    with trio.fail_after(60):
        with trio.CancelScope() as cs:
            cs.cancel()
            async with adm.slot():
                pytest.fail("entered a slot in a cancelled scope")  # pragma: no cover
        assert adm.load(0).active == 0


async def test_no_barging_past_the_queue(autojump_clock):
    """A slot released while others queue goes to the queue head, not a newcomer."""
    adm = Admission(max_active=1)
    order: list[str] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as n:

            async def user(name: str, hold: float) -> None:
                async with adm.slot():
                    order.append(name)
                    await trio.sleep(hold)

            n.start_soon(user, "a", 1.0)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(user, "b", 1.0)
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(1.0)  # a releases at t=1, b is handed the slot
            n.start_soon(user, "late", 0.0)
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["a", "b"]
    assert order == ["a", "b", "late"]


async def test_unlimited_slots_counted(autojump_clock):
    adm = Admission()
    with trio.fail_after(60):
        async with adm.slot(), adm.slot(), adm.slot():
            assert adm.load(0).active == 3
        assert adm.load(0).active == 0


async def test_set_max_active_grow_and_shrink(autojump_clock):
    adm = Admission(max_active=1)
    running: list[int] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            gate = trio.Event()

            async def user(i: int) -> None:
                async with adm.slot():
                    running.append(i)
                    await gate.wait()

            for i in range(4):
                n.start_soon(user, i)
                await trio.testing.wait_all_tasks_blocked()
            assert running == [0]
            adm.set_max_active(3)
            await trio.testing.wait_all_tasks_blocked()
            # The queue head (1, 2) got the new slots, not 3; trio may run the
            # two woken tasks in either order.
            assert sorted(running) == [0, 1, 2]
            assert adm.load(0) == Load(3, 1, 0.0, 0.0)
            adm.set_max_active(1)  # shrink: nobody new until below 1
            gate.set()
        assert sorted(running) == [0, 1, 2, 3] and running[-1] == 3
        assert adm.load(0).active == 0


def test_load_reports_client_retries_and_median_rtt():
    from orchestrator.bootserver.admission import Admission

    adm = Admission(window=5.0)
    assert adm.load(0.0).rtt is None  # no samples: no claim
    adm.note_rtt([0.001] * 5, 1.0)
    assert adm.load(1.0).rtt == 0.001
    assert adm._rtt.median(1.0, min_samples=8) is None  # the window itself can insist on more
    adm.note_rtt([0.001] * 10 + [0.5, 0.6, 0.7], 1.2)  # a few outliers do not move the median
    assert adm.load(1.5).rtt == 0.001
    adm.note_rtt([0.02] * 100, 3.0)
    assert adm.load(3.1).rtt == 0.02
    assert adm.load(20.0).rtt is None  # everything aged out of the window
    adm.note_client_retries(10, 4.0)
    assert adm.load(5.0).client_retry_rate == 10.0  # 10 in the 1 s since the first (a fresh window)
