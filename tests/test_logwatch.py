"""Following real daemon logs into the tracker: a restart mid-stream gives the uninterrupted timeline."""

from __future__ import annotations

import trio

from orchestrator.logwatch.watch import track_logs
from orchestrator.plan import load_plan
from orchestrator.store import Store
from orchestrator.tracker import Tracker, plan_nodes
from tests.conftest import REPO

CAPTURE = REPO / "tests" / "fixtures" / "logs" / "dnsmasq.log"


def plan(tmp_path, log):
    p = tmp_path / "plan.yaml"
    p.write_text(
        "version: 1\nnetwork: {subnet: 10.88.0.0/24, server: 10.88.0.1}\n"
        "dhcp: {mode: external}\n"
        "profiles: {p: {kernel: vmlinuz, initrd: rootfs.gz}}\n"
        "nodes: [{name: node05, mac: '52:54:00:88:00:05', ip: 10.88.0.5}, {name: node66, mac: '52:54:00:88:00:66', ip: 10.88.0.66}]\n"
        f"logs: [{{source: dnsmasq, path: {log}}}]\n")
    return load_plan(p)


def timeline(store):
    return [(t.mac, t.from_stage, t.to_stage, t.time, t.attempt, t.evidence) for t in store.transitions()]


async def feed_and_follow(plan, db, log, lines, *, stop_at=None, rotate_at=None, expected=10_000):
    """Append ``lines`` to the log while following it; cancel abruptly after ``stop_at`` lines,
    else wait (bounded) until the journal holds ``expected`` transitions."""
    store = Store(db)
    tracker = Tracker(plan_nodes(plan))
    tracker.restore(store.transitions())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: track_logs(plan, store, tracker, poll=0.01))
        with open(log, "ab") as f:
            for i, line in enumerate(lines):
                if rotate_at is not None and i == rotate_at:
                    f.close()
                    log.rename(log.with_name(log.name + ".1"))  # rename rotation mid-stream
                    f = open(log, "ab")
                f.write(line)
                f.flush()
                if i % 25 == 0:
                    await trio.sleep(0.02)
                if stop_at is not None and i == stop_at:
                    await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()  # "kill": whatever was not committed is lost
                    return store
            f.close()
        # let the follower catch up, then stop
        with trio.move_on_after(5):
            while len(store.transitions()) < expected:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    return store


async def test_restart_mid_stream_gives_identical_timeline(tmp_path):
    lines = CAPTURE.read_bytes().splitlines(keepends=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    log_a, log_b = tmp_path / "a" / "dnsmasq.log", tmp_path / "b" / "dnsmasq.log"
    lp_a, lp_b = plan(tmp_path / "a", log_a), plan(tmp_path / "b", log_b)

    with trio.fail_after(60):
        # Reference: one uninterrupted run (with the same rotation).
        ref = await feed_and_follow(lp_a, tmp_path / "a" / "state.db", log_a, lines, rotate_at=len(lines) // 2)
        reference = timeline(ref)
        ref.close()
        assert [t[2].value for t in reference if t[0] == "52:54:00:88:00:05"] == [
            "pxe_dhcp", "loader", "config", "kernel", "initrd", "os_dhcp"]

        # Interrupted: killed a third of the way in, restarted, the rest written (and rotated) while it runs.
        cut = len(lines) // 3
        first = await feed_and_follow(lp_b, tmp_path / "b" / "state.db", log_b, lines[: cut + 1], stop_at=cut)
        from orchestrator.logwatch.watch import offset_key

        saved = first.load_offset(offset_key("dnsmasq", log_b))
        first.close()
        # The position of the last line that produced evidence was journaled with its transitions.
        assert saved is not None and 0 < saved["position"] <= log_b.stat().st_size
        assert saved["inode"] == log_b.stat().st_ino
        second = await feed_and_follow(lp_b, tmp_path / "b" / "state.db", log_b, lines[cut + 1:],
                                       rotate_at=len(lines) // 2 - cut - 1, expected=len(reference))
        resumed = timeline(second)
        second.close()
    assert resumed == reference
