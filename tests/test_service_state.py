"""Four days of a boot service, accelerated: the state directory stays under the bound docs/service.md states.

What fills a boot service's state directory over months is lease renewals (the
lease journal, ``leases.journal``) and boots (stage changes and actions in
``state.db``). Here, on trio's MockClock, 200 nodes renew their 1 h leases every
30 minutes through the real DHCP core and its lease journal (group commits, the
journal's own compaction), and each boots ten times a day -- PXE DHCP, the OS's
DHCP, nine stage changes and an action journaled in the real ``state.db`` --
while ``serve``'s own daily compaction task (``Orchestrator._compact_daily``) runs.
After four simulated days the directory is under (20 + boots per day) x nodes x
1.6 KiB for ``state.db``, 4 MiB for its write-ahead log, plus max(10 000, 4 x leases)
x 150 bytes for the lease journal, and the state is intact: every node's lease and
current stage.
"""

from __future__ import annotations

import struct

import pytest
import trio
from scapy.layers.dhcp import BOOTP, DHCP

from orchestrator.app import JOURNAL_COMPACT_EVERY, Mode, Orchestrator
from orchestrator.bootserver.dhcp import make_core, plan_config, plan_policy
from orchestrator.plan import load_plan
from orchestrator.protocols.dhcp import mac_bytes
from orchestrator.store import WAL_LIMIT
from orchestrator.tracker import Stage, Transition
from tests.test_service import PLAN, write_plan

NODES, BOOTS_PER_DAY, DAYS = 200, 10, 4
STAGES = [Stage.PENDING, Stage.WAKING, Stage.PXE_DHCP, Stage.LOADER, Stage.CONFIG, Stage.KERNEL, Stage.INITRD,
          Stage.OS_DHCP, Stage.SSH, Stage.READY]


def packets(mac: str, ip: str) -> dict[str, bytes]:
    """A node's DISCOVER (PXE), REQUEST (selecting) and REQUEST (renewing: ciaddr set), built once by scapy."""
    ch = mac_bytes(mac) + b"\0" * 10
    pxe = [("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001")]
    return {
        "discover": bytes(BOOTP(op=1, chaddr=ch, xid=1) / DHCP(options=[("message-type", "discover"), *pxe, "end"])),
        "request": bytes(BOOTP(op=1, chaddr=ch, xid=1) / DHCP(options=[
            ("message-type", "request"), ("requested_addr", ip), ("server_id", "127.0.0.1"), "end"])),
        "renew": bytes(BOOTP(op=1, chaddr=ch, xid=1, ciaddr=ip) / DHCP(options=[("message-type", "request"), "end"])),
    }


def with_xid(pkt: bytes, xid: int) -> bytes:
    return pkt[:4] + struct.pack("!I", xid & 0xFFFFFFFF) + pkt[8:]


@pytest.mark.slow
async def test_four_accelerated_days_keep_the_state_directory_under_the_documented_bound(tmp_path, autojump_clock):
    text = PLAN.replace("name: node[01-03]", f"name: node[001-{NODES:03d}]")
    plan = load_plan(write_plan(tmp_path, text))
    orch = Orchestrator.assemble(plan, Mode.SERVE, log=lambda s: None)
    core = make_core(plan_config(plan), plan_policy(plan), str(plan.state_dir / "leases.journal"))
    pk = {n.mac: packets(n.mac, str(n.ip)) for n in plan.nodes}
    xid = 0
    acks = 0

    def exchange(kind: str, mac: str, now: float) -> None:
        nonlocal xid, acks
        xid += 1
        out = core.receive(with_xid(pk[mac][kind], xid), ("127.0.0.1", 68), now, 1.7e9 + now, 67)
        acks += sum(1 for r in out.replies if r.data[242:243] == b"\x05")  # option 53 = ACK, first option

    day, renew_every, boot_every = JOURNAL_COMPACT_EVERY, 1800.0, JOURNAL_COMPACT_EVERY / BOOTS_PER_DAY
    attempt = dict.fromkeys(pk, 0)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(orch._compact_daily)  # serve's own daily compaction, on the mock clock
            start = trio.current_time()
            t = next_boot = start
            while t < start + DAYS * day:
                now = trio.current_time()
                if now >= next_boot:
                    rows = []
                    for n in plan.nodes:  # a boot: PXE DORA, the OS's DORA, nine stage changes, one action
                        for kind in ("discover", "request", "discover", "request"):
                            exchange(kind, n.mac, now)
                        attempt[n.mac] += 1
                        rows += [Transition(n.mac, n.name, a, b, now + i, attempt[n.mac], f"evidence {i}", "dhcp", ())
                                 for i, (a, b) in enumerate(zip(STAGES, STAGES[1:]))]
                    orch.store.append(rows)
                    for n in plan.nodes:
                        orch.store.record_action(n.name, "wake", "admitted", "ok", when=now)
                    next_boot += boot_every
                for n in plan.nodes:  # every node renews (RFC 2131 T1 = half the 1 h lease)
                    exchange("renew", n.mac, now)
                core.leases.commit()  # in this task: a worker thread would let the autojumping clock leap ahead
                t += renew_every
                await trio.sleep_until(t)
            nursery.cancel_scope.cancel()
        files = {p.name: p.stat().st_size for p in plan.state_dir.rglob("*") if p.is_file()}
        lease_bound = max(10_000, 4 * NODES) * 150
        db_bound = (20 + BOOTS_PER_DAY) * NODES * 1.6 * 1024
        assert files["leases.journal"] <= lease_bound, files
        assert files["state.db"] <= db_bound, (db_bound, files)
        assert files.get("state.db-wal", 0) <= WAL_LIMIT, files
        assert sum(files.values()) <= lease_bound + db_bound + WAL_LIMIT + 64 * 1024, files  # + the WAL index (-shm)
        # The state is whole: every node's lease, and each node's current stage and last attempt kept.
        assert acks == NODES * (2 * BOOTS_PER_DAY * DAYS + DAYS * int(day / renew_every))
        assert all(core.leases.by_mac(n.mac) is not None for n in plan.nodes)
        current = orch.store.current()
        assert all(current[n.mac].stage == Stage.READY and current[n.mac].attempt == BOOTS_PER_DAY * DAYS for n in plan.nodes)
        kept = orch.store.transitions(plan.nodes[0].mac)
        # Compacted to the last 20 attempts at each day's end (the last day's boots came after it).
        assert min(t.attempt for t in kept) >= BOOTS_PER_DAY * DAYS - 20 - BOOTS_PER_DAY + 1
    finally:
        orch.store.close()
        core.leases.close()
