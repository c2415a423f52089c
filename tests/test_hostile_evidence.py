"""Evidence from the boot LAN is hostile: it can neither stop bootorch, nor reach a terminal raw, nor power a node.

* On the wire, against the real ``bootorch serve``: TFTP and HTTP names with
  bytes that are not UTF-8 and terminal escapes, and daemon log lines carrying
  them, keep serve running, and nothing raw reaches serve's output, the journal,
  ``status``, ``history`` or ``replay``.
* In process: rich's live view shows such text literally.
* On MockClock with the scheduler and a simulated cluster: forged PXE
  DHCPDISCOVERs (built as bytes and decoded by the real DHCP core) for ready,
  failed and booting nodes never lead to a power action.
"""

from __future__ import annotations

import io
import json
import socket
import sqlite3
import subprocess
import time

import pytest
import trio
from scapy.layers.dhcp import BOOTP, DHCP

from orchestrator.bootserver.dhcp import plan_config, plan_policy
from orchestrator.bootserver.leases import LeaseStore
from orchestrator.protocols import tftp as tftp_proto
from orchestrator.protocols.dhcp import mac_bytes
from orchestrator.protocols.dhcp_server import DhcpServerCore
from orchestrator.tracker import Stage
from tests.conftest import require_tool
from tests.test_control_security import EXE, Serve, serve_plan_file
from tests.test_oncall_ops import Harness, _with
from tests.test_scheduler import make_plan

#: What must never reach an operator raw: C0 controls but TAB/LF, DEL, and the C1 range as UTF-8.
_RAW = [bytes([b]) for b in range(0x20) if b not in (0x09, 0x0A)] + [b"\x7f"] + [chr(c).encode() for c in range(0x80, 0xA0)]


def raw_controls(data: bytes) -> list[bytes]:
    return [c for c in _RAW if c in data]


HOSTILE_NAMES = [
    b"pxelinux.cfg/\xff",  # one byte that is not UTF-8 (it crashed the journal)
    b"pxelinux.cfg/\x1b]8;;http://evil.example/\x07click\x1b]8;;\x07",  # an OSC 8 hyperlink
    b"menu\x1b[2J\x1b[31m.c32",  # clear screen, red
    b"x[/x][link=http://evil.example]y.ipxe",  # rich markup
]


def _rrq(name: bytes) -> bytes:
    return b"\x00\x01" + name + b"\x00octet\x00"


def test_hostile_tftp_and_http_names_and_log_lines_on_the_wire(tmp_path):
    """Findings 2 and 4: one datagram from a node's address ended serve; escapes reached serve's output and status."""
    curl = require_tool("curl")
    log = tmp_path / "tftpd.log"
    log.write_text("")
    plan, port = serve_plan_file(tmp_path, extra=f"logs:\n  - {{source: tftp-hpa, path: {log}}}\n")
    srv = Serve(plan, tmp_path)
    try:
        node_ip = "127.77.0.11"  # n1's address: its reads are evidence for n1
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((node_ip, 0))
            s.settimeout(5)
            for name in HOSTILE_NAMES:
                s.sendto(_rrq(name), ("127.0.0.1", srv.ports["tftp"]))
                data, _ = s.recvfrom(2048)  # each is answered (not found): serve read it and lives
                assert tftp_proto.parse_packet(data).__class__.__name__ == "Error"
        for target in ("/%1b%5b2J%1b%5d0;pwned%07.ipxe", "/pxelinux.cfg/%ff%1b[1m"):
            subprocess.run([curl, "-sS", "--max-time", "5", "--interface", "127.77.0.11", f"http://127.0.0.1:{srv.ports['http']}{target}"],
                           capture_output=True, timeout=10)
        # A followed tftp-hpa log (content chosen by clients) with a hostile name for n2.
        stamp = time.strftime("%b %d %H:%M:%S")
        with log.open("ab") as f:
            f.write(f"{stamp} bootsrv in.tftpd[4242]: RRQ from 127.77.0.12 filename ".encode() + b"pxelinux.cfg/\x1b[31mred\x9b2J\xff\n")
        # serve is alive and answering; wait until the log line has become evidence for n2.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = subprocess.run([EXE, "status", str(plan.path), "--json"], capture_output=True, timeout=30)
            nodes = {n["node"]: n for n in json.loads(status.stdout)["nodes"]}
            if "red" in nodes["n2"]["evidence"]:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the log line never became evidence: {nodes}")
        assert srv.alive()
        assert nodes["n1"]["stage"] == "config" and "\\xff" in json.dumps(nodes)
        outputs = {"status": subprocess.run([EXE, "status", str(plan.path)], capture_output=True, timeout=30).stdout,
                   "status --json": status.stdout,
                   "history": subprocess.run([EXE, "history", str(plan.path)], capture_output=True, timeout=30).stdout,
                   "replay": subprocess.run([EXE, "replay", "--plan", str(plan.path), "--source", "tftp-hpa", str(log)], capture_output=True, timeout=30).stdout}
        db = sqlite3.connect(plan.state_dir / "state.db")
        outputs["journal"] = "\n".join(r[0] for r in db.execute("select evidence from transitions")).encode()
        db.close()
        assert b"red" in outputs["replay"] and b"red" in outputs["history"]
    finally:
        assert srv.stop() == 0, srv.err.read_text(errors="replace")
    outputs["serve"] = srv.output()
    assert b"pxelinux.cfg/\\xff" in outputs["serve"]  # the escaped form is what an operator sees
    for what, data in outputs.items():
        assert raw_controls(data) == [], f"raw control characters in {what}: {raw_controls(data)}"


def test_the_live_view_shows_markup_and_escapes_literally():
    """Finding 3: rich parsed table cells as markup: ``[/x]`` raised MarkupError, ``[link=...]`` made a hyperlink."""
    from rich.console import Console

    from orchestrator.events import BootEvent, EventKind
    from orchestrator.present import LiveProgress
    from orchestrator.tracker import NodeInfo, Tracker

    tr = Tracker({"52:54:00:00:00:09": NodeInfo("n9[/b]", "10.0.0.9")}, timeouts={Stage.CONFIG: 30.0})
    tr.feed(BootEvent(time=time.time(), wall=time.time(), source="tftp", kind=EventKind.FILE_REQUEST, client_ip="10.0.0.9",
                      filename="pxelinux.cfg/[/x][link=http://e.x]c[/link]\x1b[2J"))
    view = LiveProgress()
    view.tracker = tr
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, width=200).print(view.render())  # MarkupError before
    out = buf.getvalue()
    assert "[/x]" in out and "[link=http://e.x]" in out and "n9[/b]" in out
    assert "\x1b]8;" not in out  # no OSC 8 hyperlink was made
    assert "\x1b[2J" not in out and "\\x1b[2J" in out


# --------------------------------------------------------------------------- forged evidence, no power


def _forged_discover(core: DhcpServerCore, mac: str, xid: int, now: float):
    """A PXE DHCPDISCOVER any host on the LAN can send, decoded by the real DHCP core into its events."""
    pkt = bytes(BOOTP(op=1, chaddr=mac_bytes(mac), xid=xid)
                / DHCP(options=[("message-type", "discover"), ("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"), "end"]))
    return core.receive(pkt, ("0.0.0.0", 68), now, time.time()).events


async def test_forged_discovers_never_power_a_node(tmp_path, autojump_clock):
    """Finding 16: forged PXE DISCOVERs for ready, failed and booting nodes cause no power action.

    Before: a forged DISCOVER for a failed node (or one past ``kernel`` in its
    boot) started an attempt whose timeout climbed the ladder: a BMC power cycle.
    """
    plan = make_plan(tmp_path, n=3)
    h = Harness(plan, tmp_path)
    core = DhcpServerCore(plan_config(plan), plan_policy(plan), LeaseStore(tmp_path / "leases.journal"))
    n1, n2, n3 = (n.mac for n in plan.nodes)

    async def forge(mac: str, xid: int) -> None:
        for ev in _forged_discover(core, mac, xid, trio.current_time()):
            await h.send.send(ev)

    async def body(nursery):
        await h.boot_all(nursery)  # every node ready, through bootorch's own wakes
        # n3 fails: its checks now fail and an operator reboot ends in "failed".
        h.cluster.nodes[n3].bad_checks = True
        op, _ = h.sched.submit("reboot", ["n3"], reason="test", actor="t")
        await op.done.wait()
        assert op.results["n3"]["result"] == "failed"
        # n2 is rebooted by an operator and is mid-boot (past the kernel) when the forgery comes.
        before = h.tracker.nodes[n2].attempt
        op2, _ = h.sched.submit("reboot", ["n2"], reason="test", actor="t")
        while not (h.tracker.nodes[n2].attempt > before and h.tracker.nodes[n2].stage in (Stage.OS_DHCP, Stage.SSH)):
            await h.sched.changed.wait()
        powered = (list(h.cluster.wakes), list(h.cluster.cycles), list(h.ssh.calls))
        for i in range(5):
            for mac in (n1, n2, n3):
                await forge(mac, 1000 + i)
            await trio.sleep(60)  # past every stage timeout of the plan
        await op2.done.wait()
        await trio.sleep(600)
        assert (h.cluster.wakes, h.cluster.cycles, h.ssh.calls) == powered  # not one power action since the forgeries
        st = h.tracker.nodes
        assert st[n1].stage == Stage.READY and st[n2].stage == Stage.READY  # looked at, found up
        assert st[n3].stage == Stage.FAILED and "no power action" in st[n3].last_evidence
        assert any("unrequested boot evidence" in t.evidence for t in st[n1].history)

    await _with(h, body)


async def test_a_node_that_reboots_by_itself_is_checked_not_cycled(tmp_path, autojump_clock):
    """A real reboot nobody here asked for looks the same as a forgery: the node is checked, never cycled."""
    plan = make_plan(tmp_path, n=1)
    h = Harness(plan, tmp_path)
    mac = plan.nodes[0].mac

    async def body(nursery):
        await h.boot_all(nursery)
        node = h.cluster.nodes[mac]
        node.hang_in = "vmlinuz"  # it reboots on its own and hangs before its kernel
        node.stubborn = True
        h.cluster._boot(node)  # not through a driver: bootorch did not ask for this boot
        cycles = len(h.cluster.cycles)
        await trio.sleep(600)
        st = h.tracker.nodes[mac]
        assert st.stage == Stage.FAILED and not st.requested
        assert "did not start" in st.last_evidence and len(h.cluster.cycles) == cycles
        # An operator's reboot is a request: the ladder may act again.
        op, _ = h.sched.submit("reboot", ["n1"], reason="on-call", actor="t")
        await trio.sleep(600)
        assert h.tracker.nodes[mac].requested and len(h.cluster.cycles) > cycles

    await _with(h, body)


@pytest.mark.parametrize("stage_source", ["scheduler", "dhcp"])
def test_restore_remembers_who_started_the_attempt(tmp_path, stage_source):
    from orchestrator.store import Store
    from orchestrator.tracker import Tracker, Transition, plan_nodes, plan_timeouts

    plan = make_plan(tmp_path, n=1)
    mac = plan.nodes[0].mac
    store = Store(tmp_path / "s.db")
    first = Stage.WAKING if stage_source == "scheduler" else Stage.PXE_DHCP
    store.append([Transition(mac, "n1", Stage.PENDING, first, 1.0, 1, "x", stage_source),
                  Transition(mac, "n1", first, Stage.KERNEL, 2.0, 1, "y", "tftp")])
    tr = Tracker(plan_nodes(plan), timeouts=plan_timeouts(plan))
    tr.restore(store.transitions())
    assert tr.nodes[mac].requested is (stage_source == "scheduler")
    store.close()
