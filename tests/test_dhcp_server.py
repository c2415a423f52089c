"""DHCP server decisions (sans-IO core) and the trio shell on loopback.

Requests are built and replies decoded with scapy, not with our codec.
"""

from __future__ import annotations

import random
from collections import Counter
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
import trio
from scapy.layers.dhcp import BOOTP, DHCP

from orchestrator.bootserver.dhcp import DhcpStats, StaticPolicy, plan_config, plan_policy, serve_dhcp
from orchestrator.bootserver.leases import LeaseStore
from orchestrator.events import EventKind
from orchestrator.plan import load_plan
from orchestrator.protocols.dhcp import PXE_PORT, ip_int, mac_bytes, parse
from orchestrator.protocols.dhcp_server import (
    ClientKind,
    DhcpServerCore,
    MessageType,
    Reservation,
    ServerConfig,
    Subnet,
    reply_destination,
)
from orchestrator.protocols.leases import Lease, LeaseConflict
from tests.conftest import REPO
from tests.test_dhcp_codec import MALFORMED

SERVER = "10.5.0.1"
NODE_MAC, NODE_IP = "52:54:00:00:00:0a", "10.5.0.10"
OTHER_NET = IPv4Network("10.6.0.0/24")
PXE_VC = b"PXEClient:Arch:00000:UNDI:002001"


def make_core(pool=True, mode="full", leases=None) -> tuple[DhcpServerCore, StaticPolicy]:
    subnets = (
        Subnet(IPv4Network("10.5.0.0/24"), router=IPv4Address(SERVER),
               pool=(ip_int("10.5.0.5"), ip_int("10.5.0.20")) if pool else None, lease_time=3600),
        Subnet(OTHER_NET, pool=(ip_int("10.6.0.100"), ip_int("10.6.0.110")), lease_time=600),
    )
    policy = StaticPolicy(
        {NODE_MAC: Reservation(ip_int(NODE_IP), "node10")},
        next_server=SERVER,
        loaders={ClientKind.BIOS: "pxelinux.0", ClientKind.UEFI: "syslinux.efi"},
        ipxe_script=f"http://{SERVER}:8080/boot.ipxe",
        ipxe_script_for={NODE_MAC: f"http://{SERVER}:8080/ipxe/" + "x" * 120 + ".ipxe"},
    )
    core = DhcpServerCore(ServerConfig(IPv4Address(SERVER), subnets, mode=mode), policy, leases if leases is not None else LeaseStore(None))
    return core, policy


def req(mtype: str, mac: str = NODE_MAC, *opts, **bootp) -> bytes:
    fields = dict(op=1, chaddr=mac_bytes(mac) + b"\x00" * 10, xid=random.getrandbits(32), flags=0x8000)
    fields.update(bootp)
    return bytes(BOOTP(**fields) / DHCP(options=[("message-type", mtype), *opts, "end"]))


def pxe(*extra):
    return (("vendor_class_id", PXE_VC), (93, b"\x00\x00"), (94, b"\x01\x02\x01"), *extra)


def decode(data: bytes) -> tuple[BOOTP, dict]:
    s = BOOTP(data)
    return s, {o[0]: (o[1] if len(o) == 2 else o[1:]) for o in s[DHCP].options if isinstance(o, tuple)}


def one_reply(core, data, port=67, src=("0.0.0.0", 68)):
    out = core.receive(data, src, now=100.0, wall=time.time(), port=port)
    assert len(out.replies) == 1, core.counters
    return out.replies[0], out


# --------------------------------------------------------------------------- full mode


def test_pxe_bios_discover_gets_reserved_offer_with_boot_info():
    core, _ = make_core()
    reply, out = one_reply(core, req("discover", NODE_MAC, *pxe()))
    s, o = decode(reply.data)
    assert s.op == 2 and s.yiaddr == NODE_IP and s.siaddr == SERVER
    assert s.file.rstrip(b"\0") == b"pxelinux.0"
    assert o["message-type"] == 2 and o["server_id"] == SERVER and o["lease_time"] == 3600
    assert o["vendor_class_id"] == b"PXEClient"
    assert o["vendor_specific"] == b"\x06\x01\x08\xff"  # discovery control: use this boot file
    assert o["subnet_mask"] == "255.255.255.0" and o["router"] == SERVER and o["hostname"] == b"node10"
    assert (reply.ip, reply.port, reply.broadcast) == ("255.255.255.255", 68, True)
    ev_in, ev_out = out.events
    assert ev_in.kind == EventKind.DHCP and ev_in.mac == NODE_MAC and ev_in.detail["pxe"] is True
    assert ev_in.detail["msg"] == "DISCOVER" and ev_in.detail["arch"] == 0
    assert ev_out.detail["msg"] == "OFFER" and ev_out.client_ip == NODE_IP and ev_out.detail["boot_file"] == "pxelinux.0"


def test_uefi_client_gets_uefi_loader():
    core, _ = make_core()
    reply, _ = one_reply(core, req("discover", NODE_MAC, ("vendor_class_id", b"PXEClient:Arch:00007:UNDI:003016"), (93, b"\x00\x07")))
    assert BOOTP(reply.data).file.rstrip(b"\0") == b"syslinux.efi"


def test_ipxe_client_gets_its_script_and_long_urls_go_in_option_67():
    core, _ = make_core()
    reply, out = one_reply(core, req("discover", NODE_MAC, *pxe((77, b"iPXE"))))
    s, o = decode(reply.data)
    assert s.file.rstrip(b"\0") == b""  # 130-byte URL does not fit 'file'
    assert o["boot-file-name"].startswith(b"http://10.5.0.1:8080/ipxe/")
    assert out.events[0].detail["kind"] == "ipxe"


def test_dora_binds_lease_and_marks_dirty():
    core, _ = make_core()
    one_reply(core, req("discover", NODE_MAC, *pxe()))
    reply, out = one_reply(core, req("request", NODE_MAC, *pxe(), ("server_id", SERVER), ("requested_addr", NODE_IP)))
    s, o = decode(reply.data)
    assert o["message-type"] == 5 and s.yiaddr == NODE_IP
    assert out.dirty
    lease = core.leases.by_mac(NODE_MAC)
    assert lease.ip == NODE_IP and lease.state == "bound" and lease.hostname == "node10"


def test_os_dhcp_gets_address_but_no_boot_file():
    core, _ = make_core()
    reply, out = one_reply(core, req("discover", NODE_MAC, ("vendor_class_id", b"udhcp 1.36.1")))
    s, o = decode(reply.data)
    assert s.yiaddr == NODE_IP and s.file.rstrip(b"\0") == b"" and s.siaddr == "0.0.0.0"
    assert "vendor_class_id" not in o and out.events[0].detail["pxe"] is False


def test_unknown_client_without_pool_gets_nothing():
    core, _ = make_core(pool=False)
    out = core.receive(req("discover", "52:54:00:ff:ff:ff", *pxe()), ("0.0.0.0", 68), 1.0, time.time())
    assert out.replies == [] and core.counters["unknown_client"] == 1
    assert len(out.events) == 1  # still witnessed


def test_random_mac_flood_cannot_take_reservations_or_grow_without_bound():
    core, _ = make_core()
    rng = random.Random(1)
    offered = set()
    for _ in range(3000):
        mac = "02:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(5))
        out = core.receive(req("discover", mac, *pxe()), ("0.0.0.0", 68), 1.0, time.time())
        for r in out.replies:
            offered.add(BOOTP(r.data).yiaddr)
    assert NODE_IP not in offered and SERVER not in offered
    assert len(offered) == 15  # the pool .5-.20 minus the reserved .10
    assert len(core._offers) <= 16 and len(core._offered_ips) <= 16
    assert core.counters["pool_exhausted"] == 3000 - 15
    # The planned node still gets its own address mid-flood.
    reply, _ = one_reply(core, req("discover", NODE_MAC, *pxe()))
    assert BOOTP(reply.data).yiaddr == NODE_IP


def test_request_for_another_server_releases_offer_silently():
    core, _ = make_core()
    mac = "02:00:00:00:00:01"
    first, _ = one_reply(core, req("discover", mac))
    ip = BOOTP(first.data).yiaddr
    out = core.receive(req("request", mac, ("server_id", "10.5.0.99"), ("requested_addr", ip)), ("0.0.0.0", 68), 100.0, time.time())
    assert out.replies == [] and core.counters["request_for_other_server"] == 1
    assert mac not in core._offers


def test_init_reboot_wrong_address_naks_right_address_acks():
    core, _ = make_core()
    reply, _ = one_reply(core, req("request", NODE_MAC, ("requested_addr", "10.5.0.11")))
    s, o = decode(reply.data)
    assert o["message-type"] == 6 and s.yiaddr == "0.0.0.0" and reply.broadcast
    reply, _ = one_reply(core, req("request", NODE_MAC, ("requested_addr", NODE_IP)))
    assert decode(reply.data)[1]["message-type"] == 5


def test_init_reboot_unknown_client_is_silent():
    core, _ = make_core(pool=False)
    out = core.receive(req("request", "02:00:00:00:00:09", ("requested_addr", "10.5.0.77")), ("0.0.0.0", 68), 1.0, time.time())
    assert out.replies == [] and core.counters["request_unknown_client"] == 1


def test_renew_unicasts_to_ciaddr():
    core, _ = make_core()
    reply, _ = one_reply(core, req("request", NODE_MAC, ciaddr=NODE_IP, flags=0), src=(NODE_IP, 68))
    assert (reply.ip, reply.port, reply.broadcast) == (NODE_IP, 68, False)
    assert decode(reply.data)[1]["message-type"] == 5


def test_relayed_discover_served_from_giaddr_subnet_with_option_82_echoed():
    core, _ = make_core()
    data = req("discover", "02:00:00:00:00:02", *pxe(), (82, b"\x01\x04rack"), giaddr="10.6.0.1", hops=1)
    reply, _ = one_reply(core, data, src=("10.6.0.1", 67))
    s, o = decode(reply.data)
    assert IPv4Address(s.yiaddr) in OTHER_NET and s.giaddr == "10.6.0.1"
    assert (reply.ip, reply.port) == ("10.6.0.1", 67)
    assert o["relay_agent_information"] == b"\x01\x04rack" and o["lease_time"] == 600
    # A relay for a subnet we do not serve: dropped.
    out = core.receive(req("discover", "02:00:00:00:00:03", giaddr="10.7.0.1"), ("10.7.0.1", 67), 1.0, time.time())
    assert out.replies == [] and core.counters["dropped_no_subnet"] == 1


def test_decline_quarantines_the_address():
    core, _ = make_core()
    a = "02:00:00:00:00:0a"
    ip = BOOTP(one_reply(core, req("discover", a))[0].data).yiaddr
    core.receive(req("decline", a, ("server_id", SERVER), ("requested_addr", ip)), ("0.0.0.0", 68), 101.0, time.time())
    b = "02:00:00:00:00:0b"
    ip_b = BOOTP(one_reply(core, req("discover", b, ("requested_addr", ip)))[0].data).yiaddr
    assert ip_b != ip


def test_release_frees_the_lease():
    core, _ = make_core()
    one_reply(core, req("request", NODE_MAC, ("requested_addr", NODE_IP)))
    assert core.leases.by_mac(NODE_MAC) is not None
    out = core.receive(req("release", NODE_MAC, ("server_id", SERVER), ciaddr=NODE_IP), (NODE_IP, 68), 1.0, time.time())
    assert out.replies == [] and out.dirty and core.leases.by_mac(NODE_MAC) is None


def test_inform_gets_options_without_lease():
    core, _ = make_core()
    reply, _ = one_reply(core, req("inform", NODE_MAC, ciaddr=NODE_IP), src=(NODE_IP, 68))
    s, o = decode(reply.data)
    assert o["message-type"] == 5 and s.yiaddr == "0.0.0.0" and "lease_time" not in o
    assert reply.ip == NODE_IP


def test_netboot_gate_stops_offering_boot_file():
    core, policy = make_core()
    policy.close_gate(NODE_MAC)
    reply, _ = one_reply(core, req("discover", NODE_MAC, *pxe()))
    s, o = decode(reply.data)
    assert s.yiaddr == NODE_IP and s.file.rstrip(b"\0") == b"" and "vendor_specific" not in o
    assert core.counters["netboot_gated"] == 1
    policy.open_gate(NODE_MAC)
    assert BOOTP(one_reply(core, req("discover", NODE_MAC, *pxe()))[0].data).file.rstrip(b"\0") == b"pxelinux.0"


def test_stale_pool_lease_on_reserved_address_loses_to_the_reservation():
    core, _ = make_core()
    core.leases.put(Lease(mac="02:00:00:00:00:77", ip=NODE_IP, expires=time.time() + 999, state="bound"))
    reply, _ = one_reply(core, req("request", NODE_MAC, ("requested_addr", NODE_IP)))
    assert decode(reply.data)[1]["message-type"] == 5
    assert core.leases.by_ip(NODE_IP).mac == NODE_MAC


# --------------------------------------------------------------------------- the lease table


class DictLeases:
    """The core's :class:`LeaseTable` and nothing more: two dicts, no journal, no commit."""

    def __init__(self) -> None:
        self.macs: dict[str, Lease] = {}
        self.ips: dict[str, str] = {}

    def by_mac(self, mac: str) -> Lease | None:
        return self.macs.get(mac)

    def by_ip(self, ip: str) -> Lease | None:
        mac = self.ips.get(ip)
        return None if mac is None else self.macs[mac]

    def put(self, lease: Lease) -> None:
        holder = self.ips.get(lease.ip)
        if holder is not None and holder != lease.mac:
            raise LeaseConflict(lease.ip)
        self.remove(lease.mac)
        self.macs[lease.mac], self.ips[lease.ip] = lease, lease.mac

    def remove(self, mac: str) -> None:
        old = self.macs.pop(mac, None)
        if old is not None:
            del self.ips[old.ip]


def test_core_serves_from_any_lease_table():
    """The protocol is all the core needs: DORA, a stale holder of a reserved address, RELEASE."""
    table = DictLeases()
    core, _ = make_core(leases=table)
    one_reply(core, req("discover", NODE_MAC, *pxe()))
    reply, out = one_reply(core, req("request", NODE_MAC, *pxe(), ("server_id", SERVER), ("requested_addr", NODE_IP)))
    assert decode(reply.data)[1]["message-type"] == 5 and out.dirty
    assert table.by_ip(NODE_IP).mac == NODE_MAC and table.by_mac(NODE_MAC).state == "bound"
    table.remove(NODE_MAC)
    table.put(Lease(mac="02:00:00:00:00:77", ip=NODE_IP, expires=time.time() + 999, state="bound"))
    reply, _ = one_reply(core, req("request", NODE_MAC, ("requested_addr", NODE_IP)))
    assert decode(reply.data)[1]["message-type"] == 5 and table.by_ip(NODE_IP).mac == NODE_MAC
    out = core.receive(req("release", NODE_MAC, ciaddr=NODE_IP), ("10.5.0.10", 68), now=101.0, wall=time.time())
    assert out.replies == [] and out.dirty and table.macs == {} and table.ips == {}


def test_the_core_imports_no_io():
    """``protocols/dhcp_server.py`` and its lease record load neither the journal nor threads, files locks or trio."""
    code = ("import sys; import orchestrator.protocols.dhcp_server; "
            "print(' '.join(m for m in ('orchestrator.bootserver', 'fcntl', 'threading', 'trio', 'subprocess') if m in sys.modules))")
    cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == []


# --------------------------------------------------------------------------- proxy


def test_proxy_offer_has_boot_info_and_no_address():
    core, _ = make_core(mode="proxy")
    uuid = b"\x00" + bytes(range(16))
    reply, out = one_reply(core, req("discover", "02:00:00:00:00:05", *pxe((97, uuid))))
    s, o = decode(reply.data)
    assert s.yiaddr == "0.0.0.0" and s.siaddr == SERVER and s.file.rstrip(b"\0") == b"pxelinux.0"
    assert o["vendor_class_id"] == b"PXEClient" and o["pxe_client_machine_identifier"] == uuid and "lease_time" not in o
    assert out.events[0].source == "proxydhcp"


def test_proxy_ignores_non_pxe_and_requests_on_67():
    core, _ = make_core(mode="proxy")
    assert core.receive(req("discover", "02:00:00:00:00:05"), ("0.0.0.0", 68), 1.0, time.time()).replies == []
    assert core.receive(req("request", "02:00:00:00:00:05", *pxe()), ("0.0.0.0", 68), 1.0, time.time()).replies == []


def test_port_4011_request_gets_unicast_ack():
    core, _ = make_core(mode="proxy")
    reply, _ = one_reply(core, req("request", "02:00:00:00:00:05", *pxe(), ciaddr="10.5.0.50"), port=PXE_PORT, src=("10.5.0.50", 4011))
    s, o = decode(reply.data)
    assert o["message-type"] == 5 and s.file.rstrip(b"\0") == b"pxelinux.0"
    assert (reply.ip, reply.port, reply.broadcast) == ("10.5.0.50", 4011, False)


def test_reply_destination_table():
    def pkt(**kw):
        return parse(req("discover", NODE_MAC, **kw))

    assert reply_destination(pkt(giaddr="10.6.0.1"), MessageType.OFFER, 67, "10.6.0.1", 67) == ("10.6.0.1", 67, False)
    assert reply_destination(pkt(ciaddr="10.5.0.3"), MessageType.NAK, 67, "x", 68) == ("255.255.255.255", 68, True)
    assert reply_destination(pkt(ciaddr="10.5.0.3"), MessageType.ACK, 67, "x", 68) == ("10.5.0.3", 68, False)
    assert reply_destination(pkt(flags=0), MessageType.OFFER, 67, "0.0.0.0", 68) == ("255.255.255.255", 68, True)
    assert reply_destination(pkt(), MessageType.ACK, PXE_PORT, "10.5.0.9", 4011) == ("10.5.0.9", 4011, False)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_counted_and_dropped(name):
    core, _ = make_core()
    out = core.receive(MALFORMED[name], ("1.2.3.4", 68), 1.0, time.time())
    assert out.replies == [] and out.events == [] and core.counters["malformed"] == 1


@pytest.mark.parametrize("port", [67, PXE_PORT])
def test_non_dhcp_garbage_on_both_ports(port):
    core, _ = make_core()
    for junk in (b"GET / HTTP/1.0\r\n\r\n", b"\x00" * 600, bytes(range(256)) * 2, b"\x01"):
        assert core.receive(junk, ("1.2.3.4", 68), 1.0, time.time(), port=port).replies == []
    assert core.counters["malformed"] + core.counters["dropped_no_type"] == 4


def test_hostile_hostname_is_sanitised_in_events():
    core, _ = make_core()
    out = core.receive(req("discover", NODE_MAC, ("hostname", b"x) via eth9 $(reboot)")), ("0.0.0.0", 68), 1.0, time.time())
    assert out.events[0].detail["hostname"] == "xviaeth9reboot"
    out = core.receive(req("discover", NODE_MAC, ("hostname", b"a" * 64)), ("0.0.0.0", 68), 1.0, time.time())
    assert "hostname" not in out.events[0].detail and len(out.replies) == 1


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 8)):
        op = rng.randrange(4)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            i = rng.randrange(240, len(b)) if len(b) > 240 else len(b)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
        else:
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    return bytes(b)


@pytest.mark.slow
def test_100k_fuzzed_datagrams_then_still_serves():
    core, _ = make_core()
    rng = random.Random(20261125)
    seeds = [
        req("discover", NODE_MAC, *pxe()), req("request", NODE_MAC, ("requested_addr", NODE_IP)),
        req("discover", "02:00:00:00:00:01", (52, b"\x01")), req("inform", NODE_MAC, ciaddr=NODE_IP),
        req("discover", NODE_MAC, *pxe((82, b"\x01\x02ab"))), req("decline", NODE_MAC, ("requested_addr", NODE_IP)),
    ]
    wall = time.time()
    for i in range(100_000):
        data = mutate(rng, rng.choice(seeds)) if i % 2 else rng.randbytes(rng.randrange(0, 700))
        core.receive(data, ("10.5.0.99", 68), float(i), wall, port=rng.choice((67, PXE_PORT)))
    assert core.counters["packets_in"] == 100_000 and core.counters["malformed"] > 40_000
    assert len(core._offers) <= 16 + 1
    core.leases.remove(NODE_MAC)
    reply, _ = one_reply(core, req("discover", NODE_MAC, *pxe()))
    assert BOOTP(reply.data).yiaddr == NODE_IP


# --------------------------------------------------------------------------- trio shell


async def test_serve_on_loopback_dora_and_events(tmp_path):
    leases = LeaseStore(tmp_path / "leases")
    core, _ = make_core(leases=leases)
    send, recv = trio.open_memory_channel(100)
    stats = DhcpStats()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port, pxe_port = await nursery.start(lambda task_status: serve_dhcp(
                core, host="127.0.0.1", port=0, pxe_port=0, interface=None, events=send, stats=stats, task_status=task_status))
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            await sock.sendto(req("discover", NODE_MAC, *pxe()), ("127.0.0.1", port))
            data, _ = await sock.recvfrom(2048)  # broadcast redirected to the source: no interface
            assert decode(data)[1]["message-type"] == 2
            await sock.sendto(req("request", NODE_MAC, *pxe(), ("server_id", SERVER), ("requested_addr", NODE_IP)), ("127.0.0.1", port))
            data, _ = await sock.recvfrom(2048)
            assert decode(data)[1]["message-type"] == 5
            await sock.sendto(b"garbage", ("127.0.0.1", pxe_port))
            msgs = [(await recv.receive()).detail["msg"] for _ in range(4)]
            assert msgs == ["DISCOVER", "OFFER", "REQUEST", "ACK"]
            # The ACK was sent after the lease reached the disk: a second store sees it.
            sock.close()
            nursery.cancel_scope.cancel()
    leases.close()
    again = LeaseStore(tmp_path / "leases")
    assert again.by_mac(NODE_MAC).ip == NODE_IP and again.skipped == 0
    again.close()
    assert core.counters["malformed"] == 1


async def test_the_server_sheds_stale_discovers_unanswered_and_still_answers_requests(tmp_path, monkeypatch):
    import orchestrator.bootserver.dhcp as shell

    monkeypatch.setattr(shell, "DISCOVER_MAX_AGE", -1.0)  # every DISCOVER is stale when its slice is taken
    leases = LeaseStore(tmp_path / "leases")
    core, _ = make_core(leases=leases)
    stats = DhcpStats()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port, _ = await nursery.start(lambda task_status: serve_dhcp(
                core, host="127.0.0.1", port=0, pxe_port=None, interface=None, stats=stats, task_status=task_status))
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            await sock.sendto(req("discover", NODE_MAC, *pxe()), ("127.0.0.1", port))
            await sock.sendto(req("request", NODE_MAC, *pxe(), ("server_id", SERVER), ("requested_addr", NODE_IP)),
                              ("127.0.0.1", port))
            data, _ = await sock.recvfrom(2048)
            assert decode(data)[1]["message-type"] == 5  # the ACK: the only reply
            sock.close()
            nursery.cancel_scope.cancel()
    leases.close()
    assert stats.shed == Counter(discover_stale=1)
    assert core.counters["in_discover"] == 0 and core.counters["out_offer"] == 0  # shed before the core saw it
    assert core.emit_events is False  # no events channel: none built


def test_plan_policy_and_config_from_full_plan():
    plan = load_plan(REPO / "plans" / "full.yaml")
    config, policy = plan_config(plan), plan_policy(plan)
    node = plan.nodes[1]
    assert policy.reservation(node.mac).ip == int(node.ip) and policy.reservation(node.mac).hostname == node.name
    assert policy.boot(node.mac, ClientKind.BIOS).filename == "pxelinux.0"
    # The lab's plan gives iPXE ROMs pxelinux.0 (boot.ipxe: loader); the default is the node's HTTP script.
    assert policy.boot(node.mac, ClientKind.IPXE).filename == "pxelinux.0"
    policy.ipxe_gets_loader = False
    assert policy.boot(node.mac, ClientKind.IPXE).filename == f"http://10.77.0.1:8080/ipxe/{node.mac.replace(':', '-')}.ipxe"
    assert config.subnets[0].pool is None and config.mode == "full" and str(config.server_ip) == "10.77.0.1"
    core = DhcpServerCore(config, policy, LeaseStore(None))
    reply, _ = one_reply(core, req("discover", node.mac, *pxe()))
    assert BOOTP(reply.data).yiaddr == str(node.ip)


def test_privileged_port_error_is_clear():
    import os

    from orchestrator.bootserver.dhcp import DhcpPrivilegeError, open_socket

    if os.geteuid() == 0:
        with pytest.raises(OSError, match="does not exist"):
            open_socket("127.0.0.1", 0, "no-such-if0")
    else:
        with pytest.raises(DhcpPrivilegeError, match="CAP_NET_BIND_SERVICE"):
            open_socket("0.0.0.0", 67, None)


def test_netboot_gate_follows_stages():
    """boot.gate_after_ready: ready closes the gate, a wake opens it (rollout's NetbootGate)."""
    from orchestrator.app import NetbootGate
    from orchestrator.tracker import Stage, Transition

    core, policy = make_core()
    gate = NetbootGate()
    gate.attach(policy)
    gate([Transition(NODE_MAC, "node10", Stage.SSH, Stage.READY, 1.0, 1, "checks passed")])
    assert BOOTP(one_reply(core, req("discover", NODE_MAC, *pxe()))[0].data).file.rstrip(b"\0") == b""
    gate([Transition(NODE_MAC, "node10", Stage.READY, Stage.WAKING, 2.0, 2, "woken")])
    assert BOOTP(one_reply(core, req("discover", NODE_MAC, *pxe()))[0].data).file.rstrip(b"\0") == b"pxelinux.0"


def test_core_without_events_sends_the_same_bytes_and_builds_no_events():
    quiet, _ = make_core()
    loud, _ = make_core()
    quiet.emit_events = False
    xid = 0x1234
    for data in (req("discover", NODE_MAC, *pxe(), xid=xid),
                 req("request", NODE_MAC, *pxe(), ("server_id", SERVER), ("requested_addr", NODE_IP), xid=xid),
                 req("discover", "02:00:00:00:00:77", ("hostname", b"x\x1bbad"), xid=xid),
                 req("inform", "02:00:00:00:00:78", ciaddr="10.5.0.7", xid=xid)):
        a = quiet.receive(data, ("0.0.0.0", 68), now=100.0, wall=1e9)
        b = loud.receive(data, ("0.0.0.0", 68), now=100.0, wall=1e9)
        assert [r.data for r in a.replies] == [r.data for r in b.replies] and a.replies
        assert a.events == [] and len(b.events) == 1 + len(b.replies)
    assert quiet.counters == loud.counters


def test_backlog_serves_exchanges_under_way_first_and_newest_discovers_next():
    from orchestrator.bootserver.dhcp import Backlog

    shed: Counter[str] = Counter()
    backlog = Backlog(shed)
    for i, (mtype, src) in enumerate([("discover", "a"), ("request", "b"), ("discover", "c"), ("release", "d"),
                                      ("discover", "e"), ("inform", "f")]):
        backlog.add(req(mtype, f"02:00:00:00:00:0{i}"), (src, 1), now=10.0)
    backlog.add(b"garbage", ("g", 1), now=10.0)  # no option 53 first: waits with the DISCOVERs
    assert [src[0] for _, src in backlog.take(10.0, 3)] == ["b", "d", "f"]
    assert [src[0] for _, src in backlog.take(10.0, 10)] == ["g", "e", "c", "a"]
    assert not backlog and not shed


def test_a_request_flood_cannot_lock_discovers_out():
    from orchestrator.bootserver.dhcp import Backlog

    backlog = Backlog(Counter())
    for i in range(40):
        backlog.add(req("request", f"02:00:00:00:06:{i:02x}"), (f"r{i}", 1), now=1.0)
    for i in range(5):
        backlog.add(req("discover", f"02:00:00:00:07:{i:02x}"), (f"d{i}", 1), now=1.0)
    # An eighth of each slice goes to the waiting DISCOVERs, the rest to the REQUESTs.
    assert [src[0] for _, src in backlog.take(1.0, 16)] == [f"r{i}" for i in range(14)] + ["d4", "d3"]
    assert [src[0] for _, src in backlog.take(1.0, 16)] == [f"r{i}" for i in range(14, 28)] + ["d2", "d1"]
    # Fewer REQUESTs than a slice: they all go, then the DISCOVERs.
    assert [src[0] for _, src in backlog.take(1.0, 16)] == [f"r{i}" for i in range(28, 40)] + ["d0"]


def test_backlog_sheds_discovers_that_waited_too_long_and_counts_them():
    from orchestrator.bootserver.dhcp import Backlog

    shed: Counter[str] = Counter()
    backlog = Backlog(shed, max_age=1.0)
    for i in range(5):
        backlog.add(req("discover", f"02:00:00:00:01:0{i}"), (f"old{i}", 1), now=10.0)
    backlog.add(req("request", "02:00:00:00:02:00"), ("req", 1), now=10.0)
    backlog.add(req("discover", "02:00:00:00:03:00"), ("new", 1), now=10.8)
    # At 11.5 the five DISCOVERs read at 10.0 are past their client's retry: shed unanswered.
    # A REQUEST is never shed for its age (its exchange is under way).
    assert [src[0] for _, src in backlog.take(11.5, 10)] == ["req", "new"]
    assert shed == Counter(discover_stale=5)


def test_backlog_is_bounded_per_queue_and_counts_what_it_refuses():
    from orchestrator.bootserver.dhcp import Backlog

    shed: Counter[str] = Counter()
    backlog = Backlog(shed, queue_max=4)
    for i in range(10):
        backlog.add(req("discover", f"02:00:00:00:04:0{i}"), (f"d{i}", 1), now=1.0)
        backlog.add(req("request", f"02:00:00:00:05:0{i}"), (f"r{i}", 1), now=1.0)
    assert len(backlog) == 8
    assert shed == Counter(discover_overflow=6, request_overflow=6)
    # The oldest DISCOVERs went (their clients retry first), the earliest REQUESTs stay (first come).
    assert [src[0] for _, src in backlog.take(1.0, 8)] == ["r0", "r1", "r2", "r3", "d9", "d8", "d7", "d6"]


# --------------------------------------------------------------------------- boot paths of the lab matrix

HTTP_VC = b"HTTPClient:Arch:00016:UNDI:003000"
EFI_PXE_VC = b"PXEClient:Arch:00007:UNDI:003000"


def test_uefi_http_boot_gets_httpclient_and_a_url():
    """edk2 HTTP Boot (option 93 = 16): the offer must say HTTPClient and carry a URL, no PXE options."""
    plan = load_plan(REPO / "plans" / "examples" / "lab-matrix.yaml")
    core = DhcpServerCore(plan_config(plan), plan_policy(plan), LeaseStore(None))
    node = plan.by_name["m03"]
    reply, out = one_reply(core, req("discover", node.mac, ("vendor_class_id", HTTP_VC), (93, b"\x00\x10")))
    s, o = decode(reply.data)
    assert s.file.rstrip(b"\0") == b"http://10.78.0.1:8080/ipxe.efi" and s.yiaddr == str(node.ip)
    assert o["vendor_class_id"] == b"HTTPClient" and "vendor_specific" not in o
    assert out.events[0].detail["kind"] == "uefi_http" and out.events[0].detail["pxe"] is True


def test_lab_matrix_each_client_kind_gets_its_file():
    plan = load_plan(REPO / "plans" / "examples" / "lab-matrix.yaml")
    core = DhcpServerCore(plan_config(plan), plan_policy(plan), LeaseStore(None))

    def boot_file(name: str, *opts) -> bytes:
        reply, _ = one_reply(core, req("discover", plan.by_name[name].mac, *opts))
        return BOOTP(reply.data).file.rstrip(b"\0")

    ipxe_uefi = (("vendor_class_id", EFI_PXE_VC), (93, b"\x00\x07"), (77, b"iPXE"))
    ipxe_bios = (("vendor_class_id", PXE_VC), (93, b"\x00\x00"), (77, b"iPXE"))
    assert boot_file("m01", *ipxe_bios) == b"pxelinux.0"  # profile pxelinux: ipxe: loader
    assert boot_file("m02", ("vendor_class_id", EFI_PXE_VC), (93, b"\x00\x07")) == b"syslinux.efi"  # edk2 PXE
    assert boot_file("m02", ("hostname", b"m02")) == b""  # syslinux.efi's own DHCP: no class, no file
    assert boot_file("m04", *ipxe_bios) == b"http://10.78.0.1:8080/ipxe/52-54-00-78-00-04.ipxe"  # boot.ipxe: script
    assert boot_file("m03", *ipxe_uefi) == b"http://10.78.0.1:8080/ipxe/52-54-00-78-00-03.ipxe"  # ipxe.efi after HTTP Boot
    assert boot_file("m06", *ipxe_uefi) == b"syslinux.efi"  # UEFI iPXE ROM, ipxe: loader: its firmware's loader
    assert boot_file("m05", *ipxe_bios) == b"pxelinux.0"
