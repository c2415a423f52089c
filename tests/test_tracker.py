"""Tracker: evidence -> stages. Hand-made streams for the rules, a recorded stream from our servers for the whole path."""

from __future__ import annotations

import trio

from orchestrator.events import BootEvent, EventKind
from orchestrator.store import Store
from orchestrator.tracker import BootFilesOf, NodeInfo, Stage, Tracker

MAC = "52:54:00:00:00:01"
IP = "10.0.0.11"
FILES = BootFilesOf(loaders=frozenset({"pxelinux.0", "ldlinux.c32"}), kernels=frozenset({"vmlinuz"}), initrds=frozenset({"rootfs.gz"}))
TIMEOUTS = {Stage.WAKING: 60, Stage.PXE_DHCP: 30, Stage.LOADER: 30, Stage.CONFIG: 30, Stage.KERNEL: 120,
            Stage.INITRD: 120, Stage.OS_DHCP: 60, Stage.SSH: 60}


def tracker(**kw) -> Tracker:
    return Tracker({MAC: NodeInfo("node01", IP, FILES)}, timeouts=TIMEOUTS, **kw)


def dhcp(t, msg="DISCOVER", pxe=True, mac=MAC, direction="in", ip=None):
    return BootEvent(time=t, wall=t, source="dhcp", kind=EventKind.DHCP, mac=mac, client_ip=ip,
                     detail={"msg": msg, "pxe": pxe, "direction": direction})


def read(t, name, kind=EventKind.FILE_REQUEST, ip=IP, source="tftp"):
    return BootEvent(time=t, wall=t, source=source, kind=kind, client_ip=ip, filename=name)


def stages(tr: Tracker, mac=MAC):
    return [t.to_stage for t in tr.nodes[mac].history]


FULL_PATH = [Stage.WAKING, Stage.PXE_DHCP, Stage.LOADER, Stage.CONFIG, Stage.KERNEL, Stage.INITRD, Stage.OS_DHCP, Stage.SSH, Stage.READY]


def boot(tr: Tracker, t0: float = 0.0) -> None:
    tr.wake(MAC, t0)
    tr.feed(dhcp(t0 + 1))
    tr.feed(dhcp(t0 + 1.1, "REQUEST"))
    tr.feed(read(t0 + 2, "pxelinux.0"))
    tr.feed(read(t0 + 2.5, "ldlinux.c32"))
    tr.feed(read(t0 + 3, "pxelinux.cfg/01-52-54-00-00-00-01"))
    tr.feed(read(t0 + 4, "vmlinuz"))
    tr.feed(read(t0 + 5, "vmlinuz", EventKind.FILE_DONE))
    tr.feed(read(t0 + 5.1, "rootfs.gz"))
    tr.feed(dhcp(t0 + 9, pxe=False))
    tr.ssh_up(MAC, t0 + 12)
    tr.ready(MAC, t0 + 13)


def test_full_path_in_order_with_times():
    tr = tracker()
    boot(tr)
    st = tr.nodes[MAC]
    assert stages(tr) == FULL_PATH
    assert [t.time for t in st.history] == [0, 1, 2, 3, 4, 5.1, 9, 12, 13]
    assert st.attempt == 1 and "kernel" in st.done and not st.flags


def test_uefi_pxe_path_the_loaders_own_dhcp_is_not_the_os():
    """edk2 PXE -> syslinux.efi, which DHCPs again without option 60/93, loads ldlinux.e64,
    walks pxelinux.cfg/: the same stages as BIOS; the size probe and that DHCP move nothing."""
    files = BootFilesOf(loaders=frozenset({"syslinux.efi", "ldlinux.e64"}), kernels=frozenset({"vmlinuz"}),
                        initrds=frozenset({"rootfs.gz"}))
    tr = Tracker({MAC: NodeInfo("node01", IP, files)}, timeouts=TIMEOUTS)
    tr.wake(MAC, 0)
    tr.feed(dhcp(1))
    tr.feed(read(2, "syslinux.efi"))  # the tsize probe's RRQ
    tr.feed(BootEvent(time=2.1, wall=2.1, source="tftp", kind=EventKind.FILE_REQUEST, client_ip=IP,
                      filename="syslinux.efi", result="options_declined"))
    tr.feed(read(2.2, "syslinux.efi"))
    tr.feed(dhcp(3, pxe=False))  # syslinux.efi's own DHCP
    tr.feed(dhcp(3.1, "REQUEST", pxe=False))
    tr.feed(read(4, "ldlinux.e64"))
    tr.feed(read(5, "pxelinux.cfg/01-52-54-00-00-00-01"))
    tr.feed(dhcp(5.5, pxe=False))  # after a config, before a kernel: still the loader
    tr.feed(read(6, "vmlinuz"))
    tr.feed(read(7, "rootfs.gz"))
    tr.feed(dhcp(9, pxe=False))
    tr.ssh_up(MAC, 12)
    tr.ready(MAC, 13)
    assert stages(tr) == FULL_PATH
    assert [t.time for t in tr.nodes[MAC].history] == [0, 1, 2, 5, 6, 7, 9, 12, 13]
    assert tr.nodes[MAC].attempt == 1


def test_os_dhcp_right_after_pxe_still_advances():
    # Evidence without file reads (a site's DHCP log only): the OS's DHCP moves the node on.
    tr = tracker()
    tr.wake(MAC, 0)
    tr.feed(dhcp(1))
    tr.feed(dhcp(9, pxe=False))
    assert stages(tr) == [Stage.WAKING, Stage.PXE_DHCP, Stage.OS_DHCP]


def test_skipped_stages_allowed():
    """iPXE over HTTP: no pxelinux loader; static ip=: no os_dhcp."""
    tr = tracker()
    tr.feed(dhcp(1))
    tr.feed(read(2, "ipxe/52-54-00-00-00-01.ipxe", source="http"))
    tr.feed(read(3, "vmlinuz", source="http"))
    tr.feed(read(4, "rootfs.gz", source="http"))
    tr.ssh_up(MAC, 8)
    assert stages(tr) == [Stage.PXE_DHCP, Stage.CONFIG, Stage.KERNEL, Stage.INITRD, Stage.SSH]


def test_duplicates_and_late_evidence_do_not_move_backwards():
    tr = tracker()
    tr.feed(dhcp(1))
    tr.feed(read(3, "pxelinux.cfg/01-52-54-00-00-00-01"))
    tr.feed(read(2, "pxelinux.0"))  # flushed late by another source
    tr.feed(read(3.5, "pxelinux.cfg/01-52-54-00-00-00-01"))  # duplicate
    tr.feed(dhcp(3.6, "REQUEST"))  # PXE DHCP before the kernel: a retransmit, not a reboot
    assert stages(tr) == [Stage.PXE_DHCP, Stage.CONFIG]
    assert tr.nodes[MAC].attempt == 1
    assert tr.nodes[MAC].last_evidence_time == 3.5


def test_pxe_again_after_kernel_is_a_new_attempt():
    tr = tracker()
    boot(tr)
    tr.feed(dhcp(100))
    st = tr.nodes[MAC]
    assert st.stage == Stage.PXE_DHCP and st.attempt == 2
    assert st.history[-1].from_stage == Stage.READY


def test_booted_without_netboot_flagged():
    tr = tracker()
    tr.wake(MAC, 0)
    tr.feed(dhcp(5, pxe=False))  # the OS DHCPing: it booted from a disk
    out = tr.ssh_up(MAC, 9)
    assert out[0].flags == ("booted_without_netboot",)
    assert "booted_without_netboot" in tr.nodes[MAC].flags
    # The next attempt, netbooted, clears it.
    tr.wake(MAC, 20)
    tr.feed(dhcp(21))
    assert not tr.ssh_up(MAC, 30)[0].flags


def test_ip_join_from_dhcp_ack_for_pool_clients():
    other = "52:54:00:00:00:99"
    tr = Tracker(track_unknown=True)
    tr.feed(dhcp(1, mac=other))
    tr.feed(dhcp(1.2, "ACK", mac=other, direction="out", ip="10.0.0.50"))
    tr.feed(read(2, "pxelinux.0", ip="10.0.0.50"))
    tr.feed(read(3, "linux", ip="10.0.0.50"))  # generic names without a plan
    tr.feed(read(4, "initrd.img", ip="10.0.0.50"))
    tr.feed(read(5, "x", ip="10.0.0.77"))  # nobody's IP
    assert stages(tr, other) == [Stage.PXE_DHCP, Stage.LOADER, Stage.KERNEL, Stage.INITRD]
    assert tr.nodes[other].node == other and tr.unmatched == 1


def test_unknown_macs_ignored_with_a_plan():
    tr = tracker()
    assert tr.feed(dhcp(1, mac="02:00:00:00:00:01")) == [] and tr.unmatched == 1


def test_failed_is_terminal_until_pxe_evidence():
    tr = tracker()
    tr.wake(MAC, 0)
    tr.fail(MAC, 100, "no PXE DHCP after 3 wakes")
    assert tr.feed(read(101, "vmlinuz")) == []
    assert tr.feed(dhcp(200))[0].attempt == 2


def test_timeouts_reported_once_per_stage_entry():
    tr = tracker()
    tr.wake(MAC, 0)
    assert tr.check_timeouts(59) == []
    stuck = tr.check_timeouts(60)
    assert [(s.stage, s.since, s.timeout) for s in stuck] == [(Stage.WAKING, 0, 60)]
    assert tr.check_timeouts(500) == []
    tr.feed(dhcp(501))
    assert tr.next_deadline() == 531


async def test_timeout_watch_on_mock_clock(autojump_clock):
    """A trio loop driven by next_deadline reports at exactly since + timeout."""
    tr = tracker()
    reported = []
    changed = trio.Event()

    async def watch():
        nonlocal changed
        while True:
            deadline = tr.next_deadline()
            if deadline is None:
                return
            with trio.move_on_at(deadline):
                await changed.wait()  # new evidence may move the deadline
                changed = trio.Event()
                continue
            for s in tr.check_timeouts(trio.current_time()):
                reported.append((s.stage, trio.current_time()))

    with trio.fail_after(1000):
        t0 = trio.current_time()
        tr.wake(MAC, t0)
        async with trio.open_nursery() as n:
            n.start_soon(watch)
            await trio.sleep(10)
            tr.feed(dhcp(trio.current_time()))  # pxe_dhcp at t0+10, times out at t0+40
            changed.set()
    assert reported == [(Stage.PXE_DHCP, t0 + 40)]


def test_journal_restart_rebuilds_identical_timeline(tmp_path):
    """Kill mid-stream: the journal plus the remaining evidence give the uninterrupted timeline."""
    events = []
    ref = tracker()
    boot(ref)
    uninterrupted = [(t.from_stage, t.to_stage, t.time, t.attempt, t.evidence) for t in ref.nodes[MAC].history]

    store = Store(tmp_path / "state.db")
    first = tracker()
    for t in first.wake(MAC, 0) + first.feed(dhcp(1)) + first.feed(dhcp(1.1, "REQUEST")) + first.feed(read(2, "pxelinux.0")):
        events.append(t)
    store.append(events)
    store.close()  # "crash"

    store = Store(tmp_path / "state.db")
    second = tracker()
    second.restore(store.transitions())
    rest = []
    rest += second.feed(read(2.5, "ldlinux.c32"))
    rest += second.feed(read(3, "pxelinux.cfg/01-52-54-00-00-00-01"))
    rest += second.feed(read(4, "vmlinuz"))
    rest += second.feed(read(5, "vmlinuz", EventKind.FILE_DONE))
    rest += second.feed(read(5.1, "rootfs.gz"))
    rest += second.feed(dhcp(9, pxe=False))
    rest += second.ssh_up(MAC, 12)
    rest += second.ready(MAC, 13)
    store.append(rest)
    journal = [(t.from_stage, t.to_stage, t.time, t.attempt, t.evidence) for t in store.transitions(MAC)]
    assert journal == uninterrupted
    cur = store.current()[MAC]
    assert cur.stage == Stage.READY and cur.since == 13 and cur.node == "node01"
    store.close()


def test_store_actions_audit(tmp_path):
    store = Store(tmp_path / "s.db")
    store.record_action("node01", "power_cycle", "stuck in kernel for 180s", "ok", actor="oncall", detail={"driver": "redfish"})
    a = store.actions("node01")[0]
    assert (a.action, a.result, a.actor, a.detail) == ("power_cycle", "ok", "oncall", {"driver": "redfish"})
    store.save_offset("log:dnsmasq:/var/log/x", {"inode": 5, "position": 10})
    assert store.load_offset("log:dnsmasq:/var/log/x") == {"inode": 5, "position": 10}
    store.close()


async def test_tracker_on_a_stream_recorded_from_our_servers(tmp_path):
    """The evidence a PXE client leaves on our real servers walks the tracker through every stage."""
    from scapy.layers.dhcp import BOOTP, DHCP

    from orchestrator.bootserver.serve import Ports, serve_plan
    from orchestrator.protocols.dhcp import mac_bytes
    from orchestrator.protocols.pxelinux import lookup_names
    from orchestrator.tracker import plan_nodes, plan_timeouts
    from tests.conftest import require_tool
    from tests.test_serve import _plan

    curl = require_tool("curl")
    plan = _plan(tmp_path)
    node = plan.nodes[2]
    tr = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    send, recv = trio.open_memory_channel(1000)

    def dhcp_packet(msg, vc):
        opts = [("message-type", msg), ("vendor_class_id", vc)]
        if msg == "request":
            opts += [("server_id", "10.77.0.1"), ("requested_addr", str(node.ip))]
        return bytes(BOOTP(op=1, chaddr=mac_bytes(node.mac), xid=7) / DHCP(options=[*opts, "end"]))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await nursery.start(lambda task_status: serve_plan(
                plan, Ports(host="127.0.0.1", dhcp=0, pxe=-1, tftp=0, http=0, interface=""), events=send, task_status=task_status))
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))

            async def dora(vc):
                for msg in ("discover", "request"):
                    await sock.sendto(dhcp_packet(msg, vc), ("127.0.0.1", run.dhcp))
                    await sock.recvfrom(2048)

            async def tftp(name):
                await trio.run_process([curl, "-sS", "--max-time", "10", "-o", "/dev/null", f"tftp://127.0.0.1:{run.tftp}/{name}"], check=False)

            tr.wake(node.mac, 0.0)
            await dora(b"PXEClient:Arch:00000:UNDI:002001")
            await tftp("pxelinux.0")
            for name in lookup_names(node.mac, node.ip)[:3]:  # 01-mac, hex IP..: stops at the first hit
                await tftp(f"pxelinux.cfg/{name}")
            await tftp("vmlinuz")
            await tftp("rootfs.gz")
            await dora(b"udhcp 1.36.1")
            sock.close()
            nursery.cancel_scope.cancel()
    send.close()
    # TFTP events carry 127.0.0.1, not the node's address: join the loopback client to the node.
    tr.ip_to_mac["127.0.0.1"] = node.mac
    async for ev in recv:
        tr.feed(ev)
    assert [t.to_stage for t in tr.nodes[node.mac].history] == [
        Stage.WAKING, Stage.PXE_DHCP, Stage.LOADER, Stage.CONFIG, Stage.KERNEL, Stage.INITRD, Stage.OS_DHCP]
    assert {"kernel", "initrd", "loader"} <= tr.nodes[node.mac].done
