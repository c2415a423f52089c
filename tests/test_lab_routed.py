"""Routed racks (``network.relayed``): nodes behind a router namespace running ISC dhcrelay.

Fast: the embedded server's answer to a relayed request (scapy-built, decoded
by scapy), the lab router's names, the magic-packet frame parser and the rack
listener's BPF filter on real frames in a namespace, the wake driver's choice
per subnet. Slow (root, TCG): one rollout with one node on the boot subnet and
two behind the relay, woken by a directed broadcast through the router, every
node ready, the per-rack power-on rate held; and the same relayed boot from the
site's own dnsmasq (``lab.site``, ``dhcp.mode: external``) through dhcrelay.
"""

from __future__ import annotations

import json
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest
import yaml
from scapy.layers.dhcp import BOOTP, DHCP

from orchestrator.bootserver.dhcp import make_core, plan_config, plan_policy
from orchestrator.plan import load_plan
from orchestrator.power import PowerResult, Target
from orchestrator.power.wol import SegmentWake, magic_packet, parse_udp_frame, plan_wake
from orchestrator.protocols.dhcp import mac_bytes
from tests.conftest import REPO, require_root, require_tool

EXE = [sys.executable, "-m", "orchestrator"]
FULL = REPO / "plans" / "full.yaml"
SSH_KEY = REPO / "var" / "lab" / "ssh" / "id_ed25519"
BOOT_NET, RACK_NET = "10.82.0", "10.83.0"
MACS = {"rt01": "52:54:00:82:00:01", "rt02": "52:54:00:82:00:02", "rt03": "52:54:00:82:00:03"}
#: Nodes per second per rack: the two relayed nodes share rack r1, so their power-ons are >= 8 s apart.
RACK_RATE = 0.125


def routed_plan(tmp_path: Path, *, nodes: tuple[str, ...] = ("rt01", "rt02", "rt03"), external: str | None = None) -> tuple[Path, str]:
    """plans/full.yaml turned into a routed lab: rt01 on the boot subnet (rack r0), rt02/rt03 behind the relay (rack r1)."""
    ns = f"bt-rt-{secrets.token_hex(3)}"
    d = yaml.safe_load(FULL.read_text())
    d["state_dir"] = str(tmp_path / "state")
    d["network"].update(namespace=ns, subnet=f"{BOOT_NET}.0/24", server=f"{BOOT_NET}.1", gateway=f"{BOOT_NET}.1", relayed=[
        {"subnet": f"{RACK_NET}.0/24", "gateway": f"{RACK_NET}.1", "router": f"{BOOT_NET}.254", "racks": ["r1"]}])
    d["boot"]["root"] = str(tmp_path / "tftpboot")
    all_nodes = [
        {"name": "rt01", "mac": MACS["rt01"], "ip": f"{BOOT_NET}.11", "rack": "r0"},
        {"name": "rt02", "mac": MACS["rt02"], "ip": f"{RACK_NET}.12", "rack": "r1"},
        {"name": "rt03", "mac": MACS["rt03"], "ip": f"{RACK_NET}.13", "rack": "r1"},
    ]
    d["nodes"] = [n for n in all_nodes if n["name"] in nodes]
    d["power"]["bmc"]["address"] = f"http://{BOOT_NET}.1:9200/redfish/v1/Systems/{{name}}"
    d["power"]["bmc"]["password"] = {"file": str(tmp_path / "bmc.password")}
    ro = d["rollout"]
    ro.pop("waves", None)  # one wave: the racks' limits, not the waves, space the power-ons
    ro["admission"].update(max_downloading=3, power_on_rate=2, rack_power_on_rate=RACK_RATE)
    ro["timeouts"]["waking"] = "60s"
    d["readiness"]["ssh"]["key"] = str(SSH_KEY)
    d["metrics"]["listen"] = "127.0.0.1:0"
    d["lab"].update(namespace=ns, memory_mib=256)
    if external:
        d["dhcp"]["mode"] = "external"
        d["lab"]["site"] = {"dhcp": external, "tftp": "tftp-hpa"}
        site = tmp_path / "state" / "lab" / "site"
        # dnsmasq logs its DHCP to its own file; dhcpd and in.tftpd go through the lab's syslog.
        d["logs"] = ([{"source": "dnsmasq", "path": str(site / "dnsmasq.log")}] if external == "dnsmasq" else []) + [
            {"source": "syslog", "path": str(site / "syslog.log")}]
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p, ns


# ----------------------------------------------------------------------------- fast


def discover(mac: str, *, giaddr: str = "0.0.0.0") -> bytes:
    pkt = BOOTP(op=1, chaddr=mac_bytes(mac) + b"\x00" * 10, xid=random.getrandbits(32), flags=0x8000, giaddr=giaddr,
                hops=1 if giaddr != "0.0.0.0" else 0) / DHCP(options=[
                    ("message-type", "discover"), ("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"),
                    (93, b"\x00\x00"), "end"])
    return bytes(pkt)


def test_embedded_server_answers_a_relayed_discover_from_the_relayed_subnet(tmp_path):
    p, _ = routed_plan(tmp_path)
    plan = load_plan(p)
    config = plan_config(plan)
    assert [str(s.network) for s in config.subnets] == [f"{BOOT_NET}.0/24", f"{RACK_NET}.0/24"]
    core = make_core(config, plan_policy(plan), None)
    out = core.receive(discover(MACS["rt02"], giaddr=f"{RACK_NET}.1"), (f"{BOOT_NET}.254", 67), 1.0, time.time())
    [reply] = out.replies
    assert (reply.ip, reply.port, reply.broadcast) == (f"{RACK_NET}.1", 67, False)  # to the relay, server port
    b = BOOTP(reply.data)
    opts = {o[0]: o[1] for o in b[DHCP].options if isinstance(o, tuple)}
    assert b.yiaddr == f"{RACK_NET}.12" and b.giaddr == f"{RACK_NET}.1"
    assert opts["router"] == f"{RACK_NET}.1" and opts["subnet_mask"] == "255.255.255.0"
    assert b.siaddr == f"{BOOT_NET}.1" and b.file.rstrip(b"\0") == b"pxelinux.0"  # files still from network.server
    assert [e.detail.get("relay") for e in out.events] == [f"{RACK_NET}.1", f"{RACK_NET}.1"]  # DISCOVER in, OFFER out
    # The same node heard directly on the boot segment gets nothing: its reservation is not on that subnet.
    assert core.receive(discover(MACS["rt02"]), ("0.0.0.0", 68), 2.0, time.time()).replies == []
    # ... and a boot-subnet node relayed from the rack gets nothing either.
    assert core.receive(discover(MACS["rt01"], giaddr=f"{RACK_NET}.1"), (f"{BOOT_NET}.254", 67), 3.0, time.time()).replies == []


def test_lab_router_names_and_relay_command(tmp_path):
    from orchestrator.lab.lab import Lab
    from orchestrator.lab.router import RACK_BRIDGE, RouterError, bridge_of, namespace_of, routers

    p, ns = routed_plan(tmp_path)
    lab = Lab(load_plan(p))
    [r] = routers(lab)
    assert r.namespace == f"{ns}-r1" and r.lab_leg == "rtr1" and r.directed_broadcast
    assert r.relay_argv() == ["dhcrelay", "-4", "-d", "-pf", str(r.pidfile), "-id", "rack", "-iu", "boot", f"{BOOT_NET}.1"]
    assert r.pidfile.parent == lab.dir and r.logfile.parent == lab.dir
    nodes = lab.plan.by_name
    assert namespace_of(lab, nodes["rt01"]) == ns and bridge_of(lab, nodes["rt01"]) == "br-boot"
    assert namespace_of(lab, nodes["rt02"]) == r.namespace and bridge_of(lab, nodes["rt02"]) == RACK_BRIDGE
    d = yaml.safe_load(p.read_text())
    del d["network"]["relayed"][0]["router"]
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(RouterError, match="has no router"):
        routers(Lab(load_plan(p)))


def frame(payload: bytes, *, dst_ip: str = f"{RACK_NET}.255", dport: int = 9, frag: int = 0, proto: int = 17) -> bytes:
    """An Ethernet + IPv4 + UDP frame around ``payload`` (checksums zero: the parser does not need them)."""
    udp = (40000).to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") + b"\0\0" + payload
    ip = (bytes([0x45, 0]) + (20 + len(udp)).to_bytes(2, "big") + b"\0\0" + frag.to_bytes(2, "big") + bytes([64, proto])
          + b"\0\0" + socket.inet_aton(f"{BOOT_NET}.1") + socket.inet_aton(dst_ip))
    return b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x08\x00" + ip + udp


def test_udp_magic_packet_found_in_a_whole_frame():
    magic = magic_packet(MACS["rt02"])
    assert parse_udp_frame(frame(magic)) == (MACS["rt02"], b"", f"{RACK_NET}.255", 9)
    assert parse_udp_frame(frame(magic + b"\x01\x02\x03\x04", dport=7))[1:] == (b"\x01\x02\x03\x04", f"{RACK_NET}.255", 7)
    assert parse_udp_frame(frame(magic, dport=10)) is None
    assert parse_udp_frame(frame(magic, frag=0x2000)) is None  # a first fragment (MF)
    assert parse_udp_frame(frame(magic, proto=6)) is None
    assert parse_udp_frame(frame(magic)[:60]) is None  # truncated: the IP total length lies
    assert parse_udp_frame(frame(magic[:-1])) is None
    assert parse_udp_frame(b"") is None


@pytest.mark.root
def test_rack_listener_hears_a_forwarded_directed_broadcast_and_only_its_segment(tmp_path):
    """A real router namespace forwards the directed broadcast onto the rack bridge; the listener there wakes the
    rack's node, ignores another segment's MAC, and hears nothing once the router stops forwarding them."""
    require_root()
    from orchestrator.lab.netns import NetLab, run_checked
    from orchestrator.lab.wol_listener import WolListener

    with NetLab(prefix="bt-rt") as nl:
        lab_ns, r_ns = nl.namespace("l"), nl.namespace("r")
        for argv in (
            ["ip", "-n", lab_ns.name, "link", "add", "rtr1", "type", "veth", "peer", "name", "boot", "netns", r_ns.name],
            ["ip", "-n", lab_ns.name, "addr", "add", f"{BOOT_NET}.1/24", "dev", "rtr1"],
            ["ip", "-n", lab_ns.name, "link", "set", "rtr1", "up"],
            ["ip", "-n", r_ns.name, "addr", "add", f"{BOOT_NET}.254/24", "dev", "boot"],
            ["ip", "-n", r_ns.name, "link", "set", "boot", "up"],
            ["ip", "-n", r_ns.name, "link", "add", "rack", "type", "bridge"],
            ["ip", "-n", r_ns.name, "addr", "add", f"{RACK_NET}.1/24", "dev", "rack"],
            ["ip", "-n", r_ns.name, "link", "set", "rack", "up"],
            ["ip", "-n", lab_ns.name, "route", "add", f"{RACK_NET}.0/24", "via", f"{BOOT_NET}.254"],
            ["ip", "netns", "exec", r_ns.name, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
             "net.ipv4.conf.all.bc_forwarding=1", "net.ipv4.conf.boot.bc_forwarding=1"],
        ):
            run_checked(argv)
        heard: list[tuple[str, str]] = []
        got = threading.Event()

        def on_magic(mac: str, how: str, peer: str, pw: bytes) -> None:
            heard.append((mac, how))
            got.set()

        listener = WolListener("rack", on_magic, netns=r_ns.name, macs=[MACS["rt02"]], routed=True, poll=0.1)
        listener.start()
        sender = [sys.executable, "-c", (
            "import sys; from orchestrator.power.wol import send_udp; "
            "send_udp(sys.argv[1:], broadcast='10.83.0.255', port=9, interface='rtr1')")]
        try:
            nl.run(lab_ns, [*sender, MACS["rt03"], MACS["rt02"]], timeout=20, check=True, cwd=str(REPO))
            assert got.wait(5), listener.counts
            time.sleep(0.3)  # the other MAC's frame came first; let a late duplicate show itself
            assert heard == [(MACS["rt02"], f"udp/9 to {RACK_NET}.255")], heard
            assert listener.counts["elsewhere"] == 1 and listener.counts["udp"] == 2, listener.counts
            # The router told not to forward directed broadcasts (a site's default): nothing reaches the rack.
            run_checked(["ip", "netns", "exec", r_ns.name, "sysctl", "-q", "-w", "net.ipv4.conf.boot.bc_forwarding=0"])
            got.clear()
            nl.run(lab_ns, [*sender, MACS["rt02"]], timeout=20, check=True, cwd=str(REPO))
            assert not got.wait(1.0) and listener.counts["udp"] == 2, listener.counts
        finally:
            listener.stop()


RELAY_PROBE = """
import random, socket, sys
from scapy.layers.dhcp import BOOTP, DHCP
pkt = BOOTP(op=1, chaddr=bytes.fromhex(sys.argv[1].replace(":", "")) + bytes(10), xid=random.getrandbits(32),
            giaddr=sys.argv[2], hops=1) / DHCP(options=[("message-type", "discover"),
            ("vendor_class_id", b"PXEClient:Arch:00000:UNDI:002001"), (93, b"\\x00\\x00"), "end"])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 67))
s.settimeout(2)
for _ in range(8):
    s.sendto(bytes(pkt), (sys.argv[3], 67))
    try:
        data = s.recv(4096)
        break
    except TimeoutError:
        continue
b = BOOTP(data)
opts = {o[0]: o[1] for o in b[DHCP].options if isinstance(o, tuple)}
print(b.yiaddr, opts.get("router"), b.siaddr, b.file.rstrip(bytes(1)).decode())
"""


@pytest.mark.root
@pytest.mark.parametrize("daemon", ["dhcpd", "dnsmasq"])
def test_site_daemons_answer_a_relayed_discover_with_the_relayed_gateway(tmp_path, daemon):
    """The config ``bootorch render`` writes, run by the real daemon: a relayed PXE DISCOVER (giaddr on the rack)
    gets the rack address, the rack's gateway as router (ISC dhcpd gives the boot subnet's when the PXE class
    is declared inside the boot subnet: measured), and the boot file from network.server."""
    require_root()
    exe = require_tool(daemon, f"/usr/sbin/{daemon}")
    from orchestrator.lab.netns import NetLab, run_checked
    from orchestrator.render import render_dhcpd, render_dnsmasq

    p, _ = routed_plan(tmp_path, external="iscdhcpd" if daemon == "dhcpd" else "dnsmasq")
    plan = load_plan(p)
    plan.boot_root.mkdir(parents=True, exist_ok=True)
    conf = tmp_path / f"{daemon}.conf"
    conf.write_text(render_dhcpd(plan) if daemon == "dhcpd" else render_dnsmasq(plan))
    leases = tmp_path / f"{daemon}.leases"
    leases.touch()
    with NetLab(prefix="bt-rt") as nl:
        srv, relay = nl.namespace("s"), nl.namespace("g")
        for argv in (
            ["ip", "-n", srv.name, "link", "add", "name", "br-boot", "type", "veth", "peer", "name", "boot", "netns", relay.name],
            ["ip", "-n", srv.name, "addr", "add", f"{BOOT_NET}.1/24", "dev", "br-boot"],
            ["ip", "-n", srv.name, "link", "set", "br-boot", "up"],
            ["ip", "-n", relay.name, "addr", "add", f"{BOOT_NET}.254/24", "dev", "boot"],
            ["ip", "-n", relay.name, "link", "set", "boot", "up"],
            ["ip", "-n", relay.name, "addr", "add", f"{RACK_NET}.1/32", "dev", "lo"],  # the relay's rack address: giaddr
            ["ip", "-n", srv.name, "route", "add", f"{RACK_NET}.0/24", "via", f"{BOOT_NET}.254"],
        ):
            run_checked(argv)
        argv = ([exe, "-4", "-f", "-q", "-cf", str(conf), "-lf", str(leases), "-pf", str(tmp_path / "pid"), "br-boot"]
                if daemon == "dhcpd" else
                [exe, "-k", "-C", str(conf), f"--dhcp-leasefile={leases}", "-u", "root", "--log-facility=-"])
        server = nl.popen(srv, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        r = nl.run(relay, [sys.executable, "-c", RELAY_PROBE, MACS["rt02"], f"{RACK_NET}.1", f"{BOOT_NET}.1"],
                   timeout=30, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
        nl.kill(server)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [f"{RACK_NET}.12", f"{RACK_NET}.1", f"{BOOT_NET}.1", "pxelinux.0"], r.stdout


class Recorder:
    def __init__(self, name: str) -> None:
        self.name, self.calls, self.sent = name, [], 0

    async def on(self, t: Target) -> PowerResult:
        self.calls.append(("on", t.name))
        return PowerResult(True, self.name)


async def test_segment_wake_keeps_the_boot_subnet_and_routes_the_rest(tmp_path):
    p, _ = routed_plan(tmp_path)
    plan = load_plan(p)
    local, bmc = Recorder("local"), Recorder("bmc")
    assert plan_wake(load_plan(FULL), local, bmc) is local  # no relayed subnet: the plan's driver itself
    wake = plan_wake(plan, local, bmc)
    assert isinstance(wake, SegmentWake) and wake.segments == [(IPv4Network(f"{RACK_NET}.0/24"), "directed-broadcast")]
    r = await wake.on(Target("rt01", MACS["rt01"], f"{BOOT_NET}.11"))
    assert r.detail == "local" and local.calls == [("on", "rt01")]
    # wake: bmc: the BMC powers a relayed node on; no magic packet at all.
    wake = SegmentWake(local, [(IPv4Network(f"{RACK_NET}.0/24"), "bmc")], bmc=bmc, interface="lo")
    r = await wake.on(Target("rt02", MACS["rt02"], f"{RACK_NET}.12"))
    assert r.ok and r.detail == "bmc" and bmc.calls == [("on", "rt02")] and wake.sent == 0
    assert not (await SegmentWake(local, wake.segments, interface="lo").on(Target("rt02", MACS["rt02"], f"{RACK_NET}.12"))).ok


# ----------------------------------------------------------------------------- slow: the lab

FULL_STAGES = ["waking", "pxe_dhcp", "loader", "config", "kernel", "initrd", "os_dhcp", "ssh", "ready"]


@pytest.fixture
def lab_tools():
    require_root()
    require_tool("qemu-system-x86_64")
    require_tool("dhcrelay", "/usr/sbin/dhcrelay")
    require_tool("tcpdump")


def build(plan: Path, tmp_path: Path) -> None:
    pw = tmp_path / "bmc.password"
    pw.write_text(secrets.token_urlsafe(12) + "\n")
    pw.chmod(0o600)
    r = subprocess.run([*EXE, "image", "build", str(plan), "--json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def lab(action: str, plan: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, "lab", action, str(plan), *extra], capture_output=True, text=True, timeout=300)


def namespaces() -> list[str]:
    return [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
            if line.strip()]


def dhcp_on_the_boot_bridge(pcap: Path) -> list[tuple[str, str, int, str, int, int, str]]:
    """(mac, src, sport, dst, dport, op, giaddr) of every BOOTP packet captured on the boot bridge."""
    from scapy.all import IP, UDP, rdpcap  # noqa: PLC0415 -- scapy is slow to import

    out = []
    for pkt in rdpcap(str(pcap)):
        if BOOTP in pkt:
            b = pkt[BOOTP]
            mac = ":".join(f"{x:02x}" for x in bytes(b.chaddr)[:6])
            out.append((mac, pkt[IP].src, pkt[UDP].sport, pkt[IP].dst, pkt[UDP].dport, b.op, b.giaddr))
    return out


def rollout_with_capture(plan: Path, ns: str, pcap: Path) -> dict:
    """``lab up``, a capture of DHCP on the boot bridge, ``rollout --json --keep-lab``; its JSON. The caller takes the lab down."""
    r = lab("up", plan)
    assert r.returncode == 0, r.stderr[-3000:]
    st = json.loads(lab("status", plan, "--json").stdout)
    [router] = st["routers"]
    assert router["namespace"] == f"{ns}-r1" and router["namespace_exists"] and router["relay"]["running"], router
    assert f"{ns}-r1" in namespaces()
    dump = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", "br-boot", "-U", "-s", "400", "-w", str(pcap),
                             "udp port 67 or udp port 68"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        assert dump.stderr is not None
        assert b"listening on" in dump.stderr.readline()  # capturing before the first wake
        r = subprocess.run([*EXE, "rollout", str(plan), "--json", "--keep-lab"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
    finally:
        dump.send_signal(signal.SIGTERM)
        dump.wait(timeout=30)
        if dump.stderr:
            dump.stderr.close()
    return json.loads(r.stdout)


def assert_relayed_dhcp(pcap: Path, relayed: list[str], direct: list[str]) -> None:
    """The relayed nodes' DHCP reached the boot network only through the relay (giaddr = the rack gateway) and its
    answers went back to the relay; the boot-subnet nodes' DHCP was direct."""
    seen = dhcp_on_the_boot_bridge(pcap)
    for name in relayed:
        mine = [p for p in seen if p[0] == MACS[name]]
        requests, replies = [p for p in mine if p[5] == 1], [p for p in mine if p[5] == 2]
        assert len(requests) >= 2 and replies, (name, mine)  # PXE ROM and the OS's DHCP, at least
        assert all(p[1:5] == (f"{BOOT_NET}.254", 67, f"{BOOT_NET}.1", 67) and p[6] == f"{RACK_NET}.1" for p in requests), mine
        assert all(p[3:5] == (f"{RACK_NET}.1", 67) and p[6] == f"{RACK_NET}.1" for p in replies), mine
    for name in direct:
        mine = [p for p in seen if p[0] == MACS[name]]
        assert mine and all(p[6] == "0.0.0.0" for p in mine), mine


@pytest.mark.slow
@pytest.mark.root
def test_routed_racks_boot_to_ready_from_the_embedded_server(tmp_path, lab_tools):
    """One node on the boot subnet (rack r0), two behind the router (rack r1): woken by raw frame and by
    directed broadcast through the router, served through dhcrelay, all ready; rack r1's power-ons spaced."""
    plan, ns = routed_plan(tmp_path)
    build(plan, tmp_path)
    try:
        out = rollout_with_capture(plan, ns, tmp_path / "boot.pcap")
        assert out["ok"] and out["ready"] == 3 and out["failed"] == 0, out
        nodes = {n["name"]: n for n in out["nodes"]}
        for name, n in nodes.items():
            assert n["result"] == "ready" and n["attempts"] == 1, (name, n)
            assert [t["to"] for t in n["timeline"]] == FULL_STAGES, (name, n["timeline"])
            assert [a["action"] for a in n["actions"]] == ["wake"], (name, n["actions"])  # no BMC fallback
        assert "(raw)" in nodes["rt01"]["actions"][0]["detail"]
        for name in ("rt02", "rt03"):
            assert f"(udp directed broadcast) to {MACS[name]} at {RACK_NET}.255:9" in nodes[name]["actions"][0]["detail"]
        # The per-rack power-on rate held: r1's two power-ons at least 1/rate apart; r0's did not wait for r1's.
        woke = {name: next(t["time"] for t in n["timeline"] if t["to"] == "waking") for name, n in nodes.items()}
        assert woke["rt03"] - woke["rt02"] >= 1 / RACK_RATE - 0.05, woke
        assert abs(woke["rt02"] - woke["rt01"]) < 1 / RACK_RATE - 1, woke
        # The rack's "NIC" heard the magic packet on the rack side, forwarded by the router.
        daemon_log = (tmp_path / "state" / "lab" / "daemon.log").read_text()
        for name in ("rt02", "rt03"):
            assert f"wake {name} {MACS[name]}: powered on (udp/9 to {RACK_NET}.255 from " in daemon_log, daemon_log[-2000:]
        assert_relayed_dhcp(tmp_path / "boot.pcap", ["rt02", "rt03"], ["rt01"])
        # The stage evidence itself names the relay (the DHCP event's giaddr).
        for name in ("rt02", "rt03"):
            ev = next(t["evidence"] for t in nodes[name]["timeline"] if t["to"] == "pxe_dhcp")
            assert f"via relay {RACK_NET}.1" in ev, ev
        assert "via relay" not in next(t["evidence"] for t in nodes["rt01"]["timeline"] if t["to"] == "pxe_dhcp")
        relay_log = (tmp_path / "state" / "lab" / "relay-r1.log").read_text()
        assert f"Forwarded BOOTREQUEST for {MACS['rt02']} to {BOOT_NET}.1" in relay_log, relay_log[-2000:]
    finally:
        r = lab("down", plan)
    assert r.returncode == 0, r.stderr
    assert ns not in namespaces() and f"{ns}-r1" not in namespaces()
    assert "dhcrelay" in r.stdout and not (tmp_path / "state" / "lab" / "relay-r1.pid").exists()


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.parametrize("site_dhcp", ["dnsmasq", "iscdhcpd"])
def test_relayed_node_boots_from_the_sites_dhcp_server_through_the_relay(tmp_path, lab_tools, site_dhcp):
    """dhcp.mode external: the site's DHCP server (run by lab.site with the config bootorch render wrote) and
    tftp-hpa serve a node behind dhcrelay; bootorch follows their logs to ready."""
    require_tool(site_dhcp if site_dhcp == "dnsmasq" else "dhcpd", f"/usr/sbin/{'dnsmasq' if site_dhcp == 'dnsmasq' else 'dhcpd'}")
    require_tool("in.tftpd", "/usr/sbin/in.tftpd")
    plan, ns = routed_plan(tmp_path, nodes=("rt02",), external=site_dhcp)
    build(plan, tmp_path)
    try:
        out = rollout_with_capture(plan, ns, tmp_path / "boot.pcap")
        assert out["ok"] and out["ready"] == 1, out
        [n] = out["nodes"]
        assert n["result"] == "ready" and n["attempts"] == 1, n
        assert [t["to"] for t in n["timeline"]] == FULL_STAGES, n["timeline"]
        sources = {t["to"]: t["source"] for t in n["timeline"]}
        # Evidence from the site's servers' logs, not from a server of bootorch's.
        assert sources["pxe_dhcp"] == f"log:{site_dhcp}" and sources["kernel"] == "log:tftp-hpa", sources
        assert_relayed_dhcp(tmp_path / "boot.pcap", ["rt02"], [])
    finally:
        r = lab("down", plan)
    assert r.returncode == 0, r.stderr
    assert ns not in namespaces() and f"{ns}-r1" not in namespaces()
