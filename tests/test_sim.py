"""The PXE-client simulator: its sans-IO node machine, and `bootorch rollout` against 20 simulated nodes.

The machine tests play the boot server by hand (DHCP replies built with our
codec, TFTP OACK/DATA/ERROR bytes) on a float clock. The rollout test runs the
real thing: `bootorch sim up` in namespaces it creates, `bootorch rollout` as a
subprocess with the `sim` BMC driver, one node made to lose its DHCP (its ROM
gives up) so the rollout must power-cycle it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from orchestrator.protocols import dhcp
from orchestrator.protocols.dhcp import MessageType, Opt
from orchestrator.sim import machine as m
from tests.conftest import REPO, require_root

MAC = "52:54:00:5a:00:07"
SERVER = "10.98.0.1"
IP = "10.98.1.7"


def reply(req_bytes: bytes, mtype: MessageType, *, file: bytes = b"pxelinux.0") -> dhcp.Packet:
    req = dhcp.parse(req_bytes)
    return dhcp.Packet(op=dhcp.BOOTREPLY, xid=req.xid, chaddr=req.chaddr, yiaddr=dhcp.ip_int(IP),
                       siaddr=dhcp.ip_int(SERVER), file=file,
                       options={Opt.MESSAGE_TYPE: bytes([mtype]), Opt.SERVER_ID: dhcp.ip_int(SERVER).to_bytes(4, "big")})


def one(effects, kind):
    got = [e for e in effects if isinstance(e, kind)]
    assert len(got) == 1, effects
    return got[0]


def booted_to_dhcp(timing: m.Timing | None = None, faults: m.Faults | None = None) -> tuple[m.NodeMachine, list]:
    node = m.NodeMachine(MAC, timing=timing or m.Timing(post_delay=2.0, post_jitter=0.0), faults=faults)
    assert node.magic(0.0) == [] and node.phase is m.Phase.POST
    assert node.next_deadline == 2.0
    return node, node.timer(2.0)


def oack(blksize: int, tsize: int) -> bytes:
    return b"\x00\x06blksize\x00" + str(blksize).encode() + b"\x00tsize\x00" + str(tsize).encode() + b"\x00"


def data(block: int, payload: bytes) -> bytes:
    return b"\x00\x03" + block.to_bytes(2, "big") + payload


def serve_file(node: m.NodeMachine, content: bytes, now: float, blksize: int) -> list:
    """Answer the current RRQ with an OACK and the whole file, lock-step; returns the last effects."""
    out = node.tftp_in(oack(blksize, len(content)), now)
    assert one(out, m.TftpSend).data == b"\x00\x04\x00\x00"
    blocks = [content[i:i + blksize] for i in range(0, len(content), blksize)]
    if len(content) % blksize == 0:
        blocks.append(b"")
    for i, chunk in enumerate(blocks, 1):
        out = node.tftp_in(data(i, chunk), now)
        assert any(isinstance(e, m.TftpSend) and e.data == b"\x00\x04" + i.to_bytes(2, "big") for e in out)
    return out


def test_rom_dhcp_carries_the_pxe_options_and_broadcast_flag():
    node, out = booted_to_dhcp()
    pkt = dhcp.parse(one(out, m.DhcpSend).data)
    assert pkt.msg_type is MessageType.DISCOVER and pkt.broadcast and pkt.mac == MAC
    assert pkt.vendor_class == "PXEClient:Arch:00000:UNDI:002001"
    assert pkt.client_arch == [0] and pkt.options[Opt.CLIENT_NDI] == b"\x01\x02\x01"
    assert len(pkt.options[Opt.CLIENT_UUID]) == 17 and pkt.is_pxe


def test_full_boot_walks_every_phase_and_the_pxelinux_lookup_order():
    node, out = booted_to_dhcp()
    out = node.dhcp_in(reply(one(out, m.DhcpSend).data, MessageType.OFFER), 2.1)
    req = dhcp.parse(one(out, m.DhcpSend).data)
    assert req.msg_type is MessageType.REQUEST and req.requested_ip == dhcp.ip_int(IP) and req.is_pxe
    out = node.dhcp_in(reply(one(out, m.DhcpSend).data, MessageType.ACK), 2.2)
    assert one(out, m.AddAddress).ip == IP
    rrq = one(out, m.TftpOpen)
    assert (rrq.src, rrq.server) == (IP, SERVER)
    assert rrq.data == b"\x00\x01pxelinux.0\x00octet\x00tsize\x000\x00blksize\x001456\x00"
    assert node.phase is m.Phase.ROM_TFTP
    serve_file(node, b"L" * 3000, 2.3, 1456)
    # pxelinux: UUID, 01-MAC, hex IP and its prefixes, default -- not-found walks on.
    asked = [node._xfer.filename]
    for _ in range(2):
        out = node.tftp_in(b"\x00\x05\x00\x01File not found\x00", 2.4)
        assert isinstance(out[0], m.TftpClose) and isinstance(out[-1], m.TftpOpen)
        asked.append(node._xfer.filename)
    uuid = m.uuid_str(m.node_uuid(MAC))
    assert asked == [f"pxelinux.cfg/{uuid}", "pxelinux.cfg/01-52-54-00-5a-00-07", "pxelinux.cfg/0A620107"]
    cfg = b"DEFAULT sim\nPROMPT 0\n\nLABEL sim\n  KERNEL vmlinuz\n  APPEND initrd=initrd.img ip=dhcp\n"
    out = serve_file(node, cfg, 2.5, 1408)
    assert b"vmlinuz" in one(out, m.TftpOpen).data and node.phase is m.Phase.PXELINUX
    out = serve_file(node, b"K" * 5000, 2.6, 1408)
    assert b"initrd.img" in one(out, m.TftpOpen).data
    out = serve_file(node, b"I" * 2816, 2.7, 1408)  # a multiple of blksize: ends with an empty block
    assert node.phase is m.Phase.KERNEL_BOOT and node.next_deadline == pytest.approx(2.7 + node.timing.kernel_delay)
    out = node.timer(node.next_deadline)
    os_disc = dhcp.parse(one(out, m.DhcpSend).data)
    assert not os_disc.is_pxe and os_disc.vendor_class == "Linux ipconfig"
    out = node.dhcp_in(reply(one(out, m.DhcpSend).data, MessageType.OFFER), 4.0)
    out = node.dhcp_in(reply(one(out, m.DhcpSend).data, MessageType.ACK), 4.1)
    assert node.phase is m.Phase.UP and not any(isinstance(e, m.AddAddress) for e in out)  # same address
    assert one(node.timer(node.next_deadline), m.SshUp).ip == IP
    assert node.stats.files == 4 and node.stats.gave_up == 0 and node.stats.bytes == 3000 + len(cfg) + 5000 + 2816


def test_rom_dhcp_retransmits_at_4_8_16_32_then_gives_up_and_only_a_power_cycle_helps():
    node, out = booted_to_dhcp()
    xid = dhcp.parse(one(out, m.DhcpSend).data).xid
    t = 2.0
    sends = 1
    for gap in (4.0, 8.0, 16.0):
        assert node.timer(t + gap - 0.01) == []
        t += gap
        out = node.timer(t)
        sends += 1
        assert dhcp.parse(one(out, m.DhcpSend).data).xid == xid  # a retransmission, same xid
    t += 32.0
    assert node.timer(t) == [] and node.gave_up and node.next_deadline is None
    assert node.stats.dhcp_timeouts == 4 and "PXE-E51" in node.stats.gave_up_reasons[0]
    assert node.magic(t + 1) == [] and node.gave_up  # powered on: magic packets do nothing
    assert node.cycle(t + 2) == [] and node.phase is m.Phase.POST and node.stats.boots == 2


def test_a_late_reply_for_another_xid_or_mac_is_ignored():
    node, out = booted_to_dhcp()
    offer = reply(one(out, m.DhcpSend).data, MessageType.OFFER)
    offer.xid ^= 1
    assert node.dhcp_in(offer, 2.1) == []
    offer.xid ^= 1
    offer.chaddr = dhcp.mac_bytes("52:54:00:5a:00:08")
    assert node.dhcp_in(offer, 2.1) == []


def test_rom_tftp_gives_up_after_its_retries_and_the_address_goes_with_power_off():
    node, out = booted_to_dhcp()
    out = node.dhcp_in(reply(one(out, m.DhcpSend).data, MessageType.OFFER), 2.1)
    node.dhcp_in(reply(one(out, m.DhcpSend).data, MessageType.ACK), 2.2)
    rrq = node._xfer.last
    t = 2.2
    for gap in m.ROM_TFTP_TIMEOUTS[:-1]:
        t += gap
        assert one(node.timer(t), m.TftpSend).data == rrq  # the RRQ again
    t += m.ROM_TFTP_TIMEOUTS[-1]
    out = node.timer(t)
    assert node.gave_up and isinstance(out[-1], m.TftpClose) and "TFTP timeout on pxelinux.0" in node.stats.gave_up_reasons[0]
    off = node.power_off(t + 1)
    assert m.RemoveAddress(IP) in off and node.phase is m.Phase.OFF


def test_pxelinux_reacks_on_its_timeout_table_and_a_duplicate_block_is_acked_again():
    node, out = booted_to_dhcp()
    out = node.dhcp_in(reply(one(out, m.DhcpSend).data, MessageType.OFFER), 2.1)
    node.dhcp_in(reply(one(out, m.DhcpSend).data, MessageType.ACK), 2.2)
    serve_file(node, b"L" * 10, 2.3, 1456)
    node.tftp_in(oack(1408, 5000), 3.0)
    node.tftp_in(data(1, b"x" * 1408), 3.0)
    assert node.next_deadline == pytest.approx(3.0 + 0.110)
    assert one(node.timer(3.11), m.TftpSend).data == b"\x00\x04\x00\x01"
    assert one(node.tftp_in(data(1, b"x" * 1408), 3.2), m.TftpSend).data == b"\x00\x04\x00\x01"
    assert node.stats.duplicate_data == 1 and node.stats.tftp_timeouts == 1
    assert sum(m.PXELINUX_TIMEOUTS) == pytest.approx(131.01)


def test_drop_dhcp_fault_silences_the_first_boot_only():
    node, out = booted_to_dhcp(faults=m.Faults(drop_dhcp_boots=1))
    assert out == [] and node.stats.dhcp_dropped == 1
    node.cycle(100.0)
    assert one(node.timer(node.next_deadline), m.DhcpSend)


def test_wol_disabled_ignores_magic_but_not_the_bmc():
    node = m.NodeMachine(MAC, faults=m.Faults(wol_disabled=True))
    assert node.magic(0.0) == [] and node.phase is m.Phase.OFF
    node.power_on(0.0)
    assert node.phase is m.Phase.POST


def test_parse_pxelinux_config_takes_the_default_label():
    cfg = b"# x\nDEFAULT b\nLABEL a\n KERNEL ka\nLABEL b\n  KERNEL kb\n  APPEND initrd=i1,i2 quiet\n"
    assert m.parse_pxelinux_config(cfg) == ("kb", ["i1", "i2"])
    assert m.parse_pxelinux_config(b"LABEL x\n LINUX k\n INITRD r\n") == ("k", ["r"])
    assert m.parse_pxelinux_config(b"PROMPT 0\n") == (None, [])


def test_the_sim_answers_readiness_commands_honestly():
    from orchestrator.sim.runtime import SIM_KERNEL, answer_command

    assert answer_command("uname -r") == ((SIM_KERNEL + "\n").encode(), 0)
    assert answer_command("pidof dropbear")[1] == 0 and answer_command("pidof nginx")[1] == 1
    assert answer_command("awk '$2 == \"/\"' /proc/mounts")[1] == 127


def test_sim_bmc_driver_comes_from_the_plan(tmp_path):
    from orchestrator.plan import load_plan
    from orchestrator.power.drivers import plan_drivers
    from orchestrator.sim.plan import SimPlan, write_sim_plan
    from orchestrator.sim.power import SimPowerDriver

    path = write_sim_plan(tmp_path, SimPlan(nodes=2, namespace="bt-x", interface="btx", control="sim.sock",
                                            loader_size=10, kernel_size=10, initrd_size=10))
    _, bmc = plan_drivers(load_plan(path))
    assert isinstance(bmc, SimPowerDriver) and bmc.path == tmp_path / "sim.sock"


def test_sim_bmc_driver_without_address_is_a_precise_validation_error(tmp_path):
    from orchestrator.plan.model import Bmc

    with pytest.raises(ValueError, match="driver sim needs address"):
        Bmc(driver="sim")


async def test_sim_power_driver_reports_an_unreachable_socket(tmp_path):
    from orchestrator.power import Target
    from orchestrator.sim.power import SimPowerDriver

    r = await SimPowerDriver(tmp_path / "nope.sock", timeout=1).cycle(Target("n1", MAC, IP))
    assert not r.ok and "nope.sock" in r.detail


# --------------------------------------------------------------------------- end to end


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline and b"\n" not in buf:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


STAGES = ["waking", "pxe_dhcp", "loader", "config", "kernel", "initrd", "os_dhcp", "ssh", "ready"]


@pytest.mark.root
def test_rollout_boots_20_simulated_nodes_and_power_cycles_the_one_that_gave_up(tmp_path):
    require_root()
    from orchestrator.sim.plan import SimPlan, write_sim_plan

    pid = os.getpid()
    server_ns, client_ns = f"bt-sims-t{pid}", f"bt-simc-t{pid}"
    plan = write_sim_plan(tmp_path, SimPlan(
        nodes=20, namespace=server_ns, interface=f"bts{pid}"[:15], control=str(tmp_path / "sim.sock"),
        loader_size=42_000, kernel_size=300_000, initrd_size=1_200_000, max_downloading=20, power_on_rate=50,
        timeouts={"waking": "6s"}, retries={"wake": 0, "power_cycle": 1}, failure_budget=0))
    sim = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.sim.cli", "up", str(plan), "--rate", "200mbit", "--client-ns", client_ns,
         "--client-dev", f"btc{pid}"[:15], "--post-delay", "1", "--post-jitter", "0.5", "--kernel-delay", "0.5",
         "--fault", "node005:drop_dhcp=1", "--stats-out", str(tmp_path / "stats.json")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        line = _read_line(sim, 30)
        assert line.startswith("sim ready: 20 nodes"), (line, sim.poll())
        r = subprocess.run([sys.executable, "-m", "orchestrator", "rollout", str(plan), "--json"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout)
    finally:
        _stop(sim)
    assert not os.path.exists(f"/run/netns/{client_ns}") and not os.path.exists(f"/run/netns/{server_ns}")
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert out["ready"] == 20 and out["failed"] == 0, [n["reason"] for n in out["nodes"] if n["result"] != "ready"]
    for node in out["nodes"]:
        seen = [t["to"] for t in node["timeline"] if t["attempt"] == node["attempts"]]
        assert [s for s in STAGES if s in seen] == STAGES and seen[-1] == "ready", (node["name"], seen)
    n5 = next(n for n in out["nodes"] if n["name"] == "node005")
    cycles = [a for a in n5["actions"] if a["action"] == "power_cycle"]
    assert len(cycles) == 1 and cycles[0]["ok"] and "stuck in waking" in cycles[0]["reason"]
    assert all(not [a for a in n["actions"] if a["action"] == "power_cycle"] for n in out["nodes"] if n["name"] != "node005")
    assert stats["totals"]["dhcp_dropped"] >= 1 and stats["totals"]["boots"] == 21
