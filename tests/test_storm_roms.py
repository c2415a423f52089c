"""A small boot storm in one process: simulated PXE ROMs and pxelinux against the real TFTP server.

40 :class:`~orchestrator.sim.machine.NodeMachine` nodes (the storm bench's ROM
model: any TFTP ERROR is final, silence is retried on the ROM's 1/2/4/8 s and
pxelinux's TimeoutTable schedules) are handed a DHCP lease by hand and then
download loader, config, kernel and initrd over real UDP on loopback (each node
its own 127.0.1.x address and ports) from a server with only 8 transfer slots,
under trio's MockClock. Every request beyond the slots must wait (or, beyond the
waiting room, go unanswered) rather than be refused with an ERROR: no node may
give up, every node must reach ``kernel_boot``.
"""

from __future__ import annotations

import socket
from functools import partial
from typing import Callable

import trio
import trio.testing

from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.tftp import TftpCounters, serve_tftp
from orchestrator.protocols import dhcp
from orchestrator.protocols.dhcp import MessageType, Opt
from orchestrator.sim import machine as m

SERVER = "127.0.0.1"
NODES = 40


def _reply(req_bytes: bytes, mtype: MessageType, ip: str) -> dhcp.Packet:
    req = dhcp.parse(req_bytes)
    return dhcp.Packet(op=dhcp.BOOTREPLY, xid=req.xid, chaddr=req.chaddr, yiaddr=dhcp.ip_int(ip),
                       siaddr=dhcp.ip_int(SERVER), file=b"pxelinux.0",
                       options={Opt.MESSAGE_TYPE: bytes([mtype]), Opt.SERVER_ID: dhcp.ip_int(SERVER).to_bytes(4, "big")})


def _lease(node: m.NodeMachine, ip: str, now: float) -> list:
    """Power on, POST, and the DORA answered by hand: returns the effects that open the loader's RRQ."""
    node.power_on(now)
    out = node.timer(node.next_deadline)
    disc = next(e for e in out if isinstance(e, m.DhcpSend))
    out = node.dhcp_in(_reply(disc.data, MessageType.OFFER, ip), node.next_deadline - 3.9)
    req = next(e for e in out if isinstance(e, m.DhcpSend))
    return node.dhcp_in(_reply(req.data, MessageType.ACK, ip), node.next_deadline - 3.8)


async def _run_node(node: m.NodeMachine, port: int, effects: list, lose: Callable[[bytes, float], bool] | None = None) -> None:
    """The simulator's runtime for one node's TFTP: a socket per transfer, the server TID pinned on its first answer.

    ``lose(datagram, now)`` True: the datagram from the server is dropped (lost on the way).
    """
    sock: socket.socket | None = None
    peer = None
    try:
        while True:
            for e in effects:
                if isinstance(e, m.TftpOpen):
                    if sock is not None:
                        sock.close()
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.setblocking(False)
                    sock.bind((e.src, 0))
                    peer = None
                    sock.sendto(e.data, (e.server, port))
                elif isinstance(e, m.TftpSend) and sock is not None:
                    sock.sendto(e.data, peer or (SERVER, port))
                elif isinstance(e, m.TftpClose) and sock is not None:
                    sock.close()
                    sock, peer = None, None
            if node.phase not in (m.Phase.ROM_TFTP, m.Phase.PXELINUX):
                break
            effects = []
            assert sock is not None and node.next_deadline is not None
            with trio.move_on_at(node.next_deadline):
                await trio.lowlevel.wait_readable(sock)
            now = trio.current_time()
            try:
                data, src = sock.recvfrom(65536)
            except BlockingIOError:
                effects = node.timer(now)
                continue
            if lose is not None and lose(data, now):
                continue
            if peer is None:
                peer = src[:2]
            elif src[:2] != peer:
                continue
            effects = node.tftp_in(data, now)
    finally:
        if sock is not None:
            sock.close()


CFG = b"DEFAULT sim\nLABEL sim\n  KERNEL vmlinuz\n  APPEND initrd=initrd.img\n"


def _tree(tmp_path):
    root = tmp_path / "root"
    (root / "pxelinux.cfg").mkdir(parents=True)
    (root / "pxelinux.0").write_bytes(b"L" * 21_000)
    (root / "pxelinux.cfg" / "default").write_bytes(CFG)
    (root / "vmlinuz").write_bytes(b"K" * 35_000)
    (root / "initrd.img").write_bytes(b"I" * 90_000)
    return root


async def test_forty_roms_against_eight_slots_all_boot_and_none_gives_up(nursery, tmp_path, autojump_clock):
    root = _tree(tmp_path)
    cfg = CFG
    counters = TftpCounters()
    with trio.fail_after(600):
        _, port = await nursery.start(partial(serve_tftp, BootFiles(root), SERVER, 0, counters=counters, max_transfers=8))
        nodes = [m.NodeMachine(f"52:54:00:00:01:{i:02x}", timing=m.Timing(post_delay=1.0, post_jitter=0.0)) for i in range(NODES)]
        async with trio.open_nursery() as n:
            for i, node in enumerate(nodes):
                n.start_soon(_run_node, node, port, _lease(node, f"127.0.1.{i + 1}", trio.current_time()))
        assert [nd.stats.gave_up_reasons for nd in nodes if nd.gave_up] == [], counters
        assert all(nd.phase is m.Phase.KERNEL_BOOT for nd in nodes)
        assert all(nd.stats.bytes == 21_000 + len(cfg) + 35_000 + 90_000 for nd in nodes)
        # The slots really were short: requests waited, and those beyond the waiting room (8) got no
        # answer at all; their ROMs asked again on their own timers and got in.
        assert counters.waited > 0 and counters.refused > 0 and counters.errors == 0


async def test_a_pxelinux_node_whose_data_is_lost_for_40_s_still_boots(nursery, tmp_path, autojump_clock):
    """Every DATA to one node is lost for 40 s in the middle of its initrd (a drop-tail queue kept full
    by other flows: the storm bench's give-ups). pxelinux re-ACKs all the while; the server must not
    give up on it after its retries (it then re-ACKs into a closed port until its ~131 s TimeoutTable
    runs out and stops for good): it resends until the loss ends, within max_stall, and the node boots."""
    root = _tree(tmp_path)
    counters = TftpCounters()
    seen, lost, window = 0, 0, [None]

    def lose(data: bytes, now: float) -> bool:
        nonlocal seen, lost
        if data[:2] != b"\x00\x03":
            return False
        seen += 1
        if seen == 60:  # a few blocks into the initrd (loader 15 + config 1 + kernel 25 blocks)
            window[0] = now
        if window[0] is not None and now < window[0] + 40.0:
            lost += 1
            return True
        return False

    with trio.fail_after(600):
        _, port = await nursery.start(partial(serve_tftp, BootFiles(root), SERVER, 0, counters=counters))
        node = m.NodeMachine("52:54:00:00:02:01", timing=m.Timing(post_delay=1.0, post_jitter=0.0))
        await _run_node(node, port, _lease(node, "127.0.1.1", trio.current_time()), lose)
        assert not node.gave_up, node.stats.gave_up_reasons
        assert node.phase is m.Phase.KERNEL_BOOT and node.stats.bytes == 21_000 + len(CFG) + 35_000 + 90_000
        assert lost > 5 and trio.current_time() - window[0] >= 40.0  # it really was cut off, past the retries
        await trio.testing.wait_all_tasks_blocked()  # the server reads the final ACK
        assert counters.transfers_ok == 4 and counters.active == 0  # loader, config, kernel, initrd; no give-up
