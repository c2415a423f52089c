"""Hostile DHCP input: what one datagram, or a flood of them, may cost the server.

* An exhausted pool answers "no address" without walking the pool again, and a
  freed address is offered to the next client at once. The address chosen is
  always the one a plain linear scan from the cursor would choose.
* The server never unicasts a reply to a ``ciaddr`` outside the networks it
  serves (DHCPINFORM / DHCPDISCOVER reflection).
* DECLINEs from clients that do not hold the address leave no state behind.
* A packet that makes the core raise is dropped and counted; the server goes on.

Requests are built with scapy, not with our codec.
"""

from __future__ import annotations

import random
import socket
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
import trio
from scapy.layers.dhcp import BOOTP

from orchestrator.bootserver.dhcp import DhcpStats, StaticPolicy, serve_dhcp
from orchestrator.bootserver.leases import LeaseStore
from orchestrator.protocols.dhcp import PXE_PORT, ip_int, ip_str
from orchestrator.protocols.dhcp_server import ClientKind, DhcpServerCore, Reservation, ServerConfig, Subnet, _FreeHints
from orchestrator.protocols.leases import Lease
from tests.test_dhcp_server import NODE_IP, NODE_MAC, SERVER, decode, make_core, one_reply, pxe, req

# --------------------------------------------------------------------------- pool exhaustion


class CountingPolicy(StaticPolicy):
    """Counts the per-address checks of the pool search (every one asks ``is_reserved_ip``).

    With ``budget`` set, the check past the budget raises: a test against an
    unbounded search fails at once instead of running for minutes.
    """

    checks = 0
    budget: int | None = None

    def is_reserved_ip(self, ip: int) -> bool:
        self.checks += 1
        if self.budget is not None and self.checks > self.budget:
            raise AssertionError(f"pool search did {self.checks} address checks, budget {self.budget}")
        return super().is_reserved_ip(ip)


BIG_POOL = ip_int("10.8.255.254") - ip_int("10.8.0.2") + 1  # 65 533 addresses


def pool_core(network: str = "10.8.0.0/16") -> tuple[DhcpServerCore, CountingPolicy]:
    """A server for ``network`` (router and server at .0.1) whose pool is every other host address."""
    net = IPv4Network(network)
    subnet = Subnet(net, router=IPv4Address("10.8.0.1"), pool=(ip_int("10.8.0.2"), int(net.broadcast_address) - 1), lease_time=3600)
    policy = CountingPolicy({}, next_server="10.8.0.1", loaders={})
    return DhcpServerCore(ServerConfig(IPv4Address("10.8.0.1"), (subnet,)), policy, LeaseStore(None)), policy


class Discovers:
    """DISCOVERs from MAC number i: one packet built by scapy, chaddr patched (building 65 000 with scapy is slow)."""

    def __init__(self) -> None:
        self.tmpl = bytearray(req("discover", "02:00:00:00:00:00", flags=0x8000))

    def __call__(self, i: int) -> bytes:
        self.tmpl[28:34] = (0x0A0000000000 + i).to_bytes(6, "big")
        self.tmpl[4:8] = i.to_bytes(4, "big")  # xid
        return bytes(self.tmpl)


def mac_of(i: int) -> str:
    return ":".join(f"{b:02x}" for b in (0x0A0000000000 + i).to_bytes(6, "big"))


def test_exhausted_slash16_pool_answers_no_address_without_rescanning():
    core, policy = pool_core()
    discover = Discovers()
    src, now, wall = ("0.0.0.0", 68), 1.0, 1_700_000_000.0
    # One client binds the first address through DORA; every other address is leased
    # already, as after a restart with a full journal (65 000 DORAs would take a while).
    client = mac_of(0)
    offer = BOOTP(core.receive(discover(0), src, now, wall).replies[0].data).yiaddr
    assert offer == "10.8.0.2"
    ack = core.receive(req("request", client, ("server_id", "10.8.0.1"), ("requested_addr", offer)), src, now, wall)
    assert decode(ack.replies[0].data)[1]["message-type"] == 5
    for i in range(1, BIG_POOL):
        core.leases.put(Lease(mac_of(i), ip_str(ip_int(offer) + i), wall + 3600, "bound"))
    # 1 000 new MACs: no address, and at most one walk over the pool plus O(1) each.
    policy.checks, policy.budget = 0, BIG_POOL + 4 * 1000
    for i in range(BIG_POOL, BIG_POOL + 1000):
        assert core.receive(discover(i), src, now, wall).replies == []
    assert core.counters["pool_exhausted"] == 1000
    # RELEASE: the very next DISCOVER gets the freed address, with O(1) work.
    out = core.receive(req("release", client, ("server_id", "10.8.0.1"), ciaddr=offer), (offer, 68), now, wall)
    assert out.dirty and core.leases.by_mac(client) is None
    policy.checks, policy.budget = 0, 4
    reply = core.receive(discover(BIG_POOL + 1000), src, now, wall).replies
    assert [BOOTP(r.data).yiaddr for r in reply] == [offer]
    assert core.receive(discover(BIG_POOL + 1001), src, now, wall).replies == []
    # The leases run out an hour later: the next client gets the address after the cursor.
    policy.checks, policy.budget = 0, 4
    assert [BOOTP(r.data).yiaddr for r in core.receive(discover(BIG_POOL + 1002), src, now, wall + 3600).replies] == ["10.8.0.3"]


def test_exhausted_pool_offers_again_once_the_offer_holds_run_out():
    core, policy = pool_core("10.8.0.0/20")
    size = 4093
    discover = Discovers()
    src, wall = ("0.0.0.0", 68), 1_700_000_000.0
    for i in range(size):
        # The offers are made over 10 seconds, so they run out in that order.
        assert len(core.receive(discover(i), src, 1.0 + 10 * i / size, wall).replies) == 1
    assert core.receive(discover(size), src, 11.0, wall).replies == []
    policy.checks, policy.budget = 0, 1000
    for i in range(size + 1, size + 1001):
        assert core.receive(discover(i), src, 20.0, wall).replies == []
    # offer_hold is 30 s: at 31.5 s the offers made before 1.5 s have run out; the
    # next clients get them in pool order, from the cursor (the pool's start).
    got = [BOOTP(core.receive(discover(size + 2000 + k), src, 31.5, wall).replies[0].data).yiaddr for k in range(3)]
    assert got == ["10.8.0.2", "10.8.0.3", "10.8.0.4"]
    # A DECLINEd address stays out while the offers made after it run out and are made again.
    policy.budget = None
    mac = mac_of(size + 2000)
    core.receive(req("decline", mac, ("server_id", "10.8.0.1"), ("requested_addr", "10.8.0.2")), src, 31.5, wall)
    core.expire(100.0)
    nxt = [BOOTP(r.data).yiaddr for k in range(size) for r in core.receive(discover(10_000 + k), src, 100.0, wall).replies]
    assert len(nxt) == size - 1 and "10.8.0.2" not in nxt
    assert core.receive(discover(20_000), src, 129.9, wall).replies == []


def test_renewals_between_discovers_on_a_full_pool_stay_cheap():
    """Every renewal makes the pool search look at the renewed address again (its lease's end moved):
    a client renewing between DISCOVERs from new MACs must not make the search walk the pool."""
    core, policy = pool_core("10.8.0.0/22")
    size = 1021
    discover = Discovers()
    src, now, wall = ("0.0.0.0", 68), 1.0, 1_700_000_000.0
    for i in range(size):
        ip = BOOTP(core.receive(discover(i), src, now, wall).replies[0].data).yiaddr
        ack = core.receive(req("request", mac_of(i), ("server_id", "10.8.0.1"), ("requested_addr", ip)), src, now, wall)
        assert decode(ack.replies[0].data)[1]["message-type"] == 5
    renew = req("request", mac_of(7), ciaddr="10.8.0.9", flags=0)
    assert core.receive(discover(size), src, now, wall).replies == []
    pairs = 5000
    policy.checks, policy.budget = 0, 4 * pairs + 2 * size
    for k in range(pairs):
        assert decode(core.receive(renew, ("10.8.0.9", 68), now, wall).replies[0].data)[1]["message-type"] == 5
        assert core.receive(discover(size + 1 + k), src, now, wall).replies == []


class LinearScanCore(DhcpServerCore):
    """The address search as the plain specification: walk the pool from the cursor, take the first free address."""

    def _search(self, mac, subnet, start, now, wall):  # noqa: ANN001, ANN202
        first, last = subnet.pool
        size = last - first + 1
        for k in range(size):
            ip = first + (start - first + k) % size
            if self._free_in_pool(ip, mac, subnet, now, wall):
                return ip
        return None


def small_config() -> tuple[ServerConfig, StaticPolicy]:
    subnets = (
        # The router and a reservation sit inside the pool; a second reservation outside it.
        Subnet(IPv4Network("10.9.0.0/24"), router=IPv4Address("10.9.0.7"),
               pool=(ip_int("10.9.0.2"), ip_int("10.9.0.20")), lease_time=300),
        Subnet(IPv4Network("10.10.0.0/24"), pool=(ip_int("10.10.0.100"), ip_int("10.10.0.110")), lease_time=90),
    )
    policy = StaticPolicy(
        {"52:54:00:00:00:01": Reservation(ip_int("10.9.0.12"), "r1"), "52:54:00:00:00:02": Reservation(ip_int("10.9.0.40"), "r2")},
        next_server="10.9.0.1", loaders={ClientKind.BIOS: "pxelinux.0"},
    )
    return ServerConfig(IPv4Address("10.9.0.1"), subnets, offer_hold=30.0, decline_hold=100.0), policy


@pytest.mark.parametrize("slack", [_FreeHints.SLACK, -25], ids=["slack", "frequent-reset"])
@pytest.mark.parametrize("seed", range(4))
def test_address_choice_matches_a_linear_scan_over_random_traffic(seed, slack, monkeypatch):
    """Same datagrams, same times: the indexed core and the linear scan send the same bytes."""
    monkeypatch.setattr(_FreeHints, "SLACK", slack)
    config, policy = small_config()
    ours, spec = DhcpServerCore(config, policy, LeaseStore(None)), LinearScanCore(config, policy, LeaseStore(None))
    rng = random.Random(seed)
    macs = ["52:54:00:00:00:01", "52:54:00:00:00:02"] + [f"02:00:00:00:{k >> 8:02x}:{k & 255:02x}" for k in range(45)]
    addrs = [f"10.9.0.{k}" for k in range(0, 45)] + [f"10.10.0.{k}" for k in range(98, 113)] + ["192.0.2.1"]
    now, wall = 0.0, 1_700_000_000.0
    replies = 0
    for step in range(2500):
        mac = rng.choice(macs[:2] if rng.random() < 0.15 else macs)  # reserved MACs relayed hold pool offers
        lease = ours.leases.by_mac(mac)
        offer = ours._offers.get(mac)
        mine = [a for a in (lease.ip if lease else None, ip_str(offer[0]) if offer else None) if a]
        addr = rng.choice(mine) if mine and rng.random() < 0.7 else rng.choice(addrs)
        relay = {"giaddr": "10.10.0.1"} if rng.random() < (0.7 if mac in macs[:2] else 0.2) else {}
        kind = rng.random()
        if kind < 0.4:
            opts = [("requested_addr", addr)] if rng.random() < 0.3 else []
            data = req("discover", mac, *opts, **relay)
        elif kind < 0.6:
            sid = rng.choice(["10.9.0.1", "10.9.0.1", "10.9.0.99"])
            data = req("request", mac, ("server_id", sid), ("requested_addr", addr), **relay)
        elif kind < 0.7:
            data = req("request", mac, ("requested_addr", addr), **relay)
        elif kind < 0.78:
            data = req("request", mac, ciaddr=addr, flags=0, **relay)
        elif kind < 0.88:
            data = req("release", mac, ("server_id", "10.9.0.1"), ciaddr=addr)
        else:
            data = req("decline", mac, ("server_id", "10.9.0.1"), ("requested_addr", addr), **relay)
        a = ours.receive(data, ("0.0.0.0", 68), now, wall)
        b = spec.receive(data, ("0.0.0.0", 68), now, wall)
        assert [(r.data, r.ip, r.port) for r in a.replies] == [(r.data, r.ip, r.port) for r in b.replies], f"step {step}"
        assert a.dirty == b.dirty
        replies += len(a.replies)
        # Bursts at one instant, then a jump: offers, declines and leases run out in between.
        now += rng.choice((0.0,) * 40 + (0.5, 3.0, 17.0, 31.0))
        wall += rng.choice((0.0,) * 40 + (1.0, 40.0, 150.0, 301.0))
        if rng.random() < 0.05:
            ours.expire(now)
            spec.expire(now)
    assert ours.counters == spec.counters
    assert sorted(map(repr, ours.leases.leases())) == sorted(map(repr, spec.leases.leases()))
    assert replies > 1000 and ours.counters["pool_exhausted"] > 10 and ours.counters["out_offer"] > 100


def test_reserved_mac_relayed_from_another_subnet_gets_its_pool_offer_back():
    """A MAC reserved in one subnet, relayed from another, holds a pool offer there:
    with that pool otherwise full, its next DISCOVER gets that offer again."""
    config, policy = small_config()
    core = DhcpServerCore(config, policy, LeaseStore(None))
    relayed = {"giaddr": "10.10.0.1"}
    mac = "52:54:00:00:00:01"  # reserved 10.9.0.12, in the first subnet
    first = BOOTP(one_reply(core, req("discover", mac, **relayed), src=("10.10.0.1", 67))[0].data).yiaddr
    assert first == "10.10.0.100"
    for k in range(10):
        one_reply(core, req("discover", f"02:00:00:00:01:{k:02x}", **relayed), src=("10.10.0.1", 67))
    assert core.receive(req("discover", "02:00:00:00:02:00", **relayed), ("10.10.0.1", 67), 100.0, time.time()).replies == []
    assert BOOTP(one_reply(core, req("discover", mac, **relayed), src=("10.10.0.1", 67))[0].data).yiaddr == first


# --------------------------------------------------------------------------- reflection through ciaddr


FOREIGN = "192.0.2.7"  # TEST-NET-1: in none of the served subnets


def test_inform_with_foreign_ciaddr_is_dropped_and_counted():
    core, _ = make_core()
    out = core.receive(req("inform", "02:00:00:00:00:31", ciaddr=FOREIGN, flags=0), (FOREIGN, 68), 1.0, time.time())
    assert out.replies == []
    assert core.counters["dropped_inform_ciaddr_not_served"] == 1
    assert [e.detail["msg"] for e in out.events] == ["INFORM"]  # still witnessed


@pytest.mark.parametrize("ciaddr", ["10.5.0.255", "10.5.0.0", "255.255.255.255", "127.0.0.1"])
def test_inform_to_a_broadcast_network_or_loopback_address_is_dropped(ciaddr):
    core, _ = make_core()
    assert core.receive(req("inform", "02:00:00:00:00:31", ciaddr=ciaddr, flags=0), ("0.0.0.0", 68), 1.0, time.time()).replies == []
    assert core.counters["dropped_inform_ciaddr_not_served"] == 1


def test_inform_from_a_served_address_is_still_answered_there():
    core, _ = make_core()
    reply, _ = one_reply(core, req("inform", "02:00:00:00:00:31", ciaddr="10.6.0.50", flags=0), src=("10.6.0.50", 68))
    s, o = decode(reply.data)
    assert (reply.ip, reply.port, reply.broadcast) == ("10.6.0.50", 68, False)
    assert o["message-type"] == 5 and o["subnet_mask"] == "255.255.255.0" and "lease_time" not in o


def test_relayed_inform_with_foreign_ciaddr_goes_to_the_relay():
    """Through a relay of a served subnet, the reply goes to the relay (RFC 2131 §4.1), never to ciaddr."""
    core, _ = make_core()
    reply, _ = one_reply(core, req("inform", "02:00:00:00:00:31", ciaddr=FOREIGN, giaddr="10.6.0.1", flags=0), src=("10.6.0.1", 67))
    assert (reply.ip, reply.port) == ("10.6.0.1", 67)
    # A relay address we do not serve: dropped, as any relayed packet from it.
    out = core.receive(req("inform", "02:00:00:00:00:31", ciaddr=FOREIGN, giaddr="10.7.0.1"), ("10.7.0.1", 67), 1.0, time.time())
    assert out.replies == [] and core.counters["dropped_no_subnet"] == 1


@pytest.mark.parametrize("mode", ["full", "proxy"])
def test_discover_with_foreign_ciaddr_is_dropped(mode):
    """A DISCOVER carries ciaddr 0 (RFC 2131 table 5); with ciaddr set, the OFFER would be unicast there."""
    core, _ = make_core(mode=mode)
    out = core.receive(req("discover", NODE_MAC, *pxe(), ciaddr=FOREIGN, flags=0), (FOREIGN, 68), 1.0, time.time())
    assert out.replies == [] and core.counters["dropped_discover_ciaddr_not_served"] == 1
    assert core._offers == {}
    # The same DISCOVER from a served address is answered, at that address.
    reply, _ = one_reply(core, req("discover", NODE_MAC, *pxe(), ciaddr="10.5.0.77", flags=0))
    assert reply.ip == "10.5.0.77"


def test_request_with_foreign_ciaddr_never_unicasts_there():
    """RENEWING/REBINDING with a foreign ciaddr: an ACK needs ciaddr to be the client's own
    address (in a served subnet); a NAK is broadcast. Nothing goes to the foreign host."""
    core, _ = make_core()
    macs = [NODE_MAC, "02:00:00:00:00:41"]  # reserved; pool client with a lease
    one_reply(core, req("discover", macs[1]))
    leased = BOOTP(one_reply(core, req("request", macs[1], ("server_id", SERVER), ("requested_addr", "10.5.0.5")))[0].data).yiaddr
    assert leased == "10.5.0.5"
    for mac in [*macs, "02:00:00:00:00:42"]:
        for sid in ((), (("server_id", SERVER),)):
            out = core.receive(req("request", mac, *sid, ciaddr=FOREIGN, flags=0), (FOREIGN, 68), 1.0, time.time())
            assert all(r.ip != FOREIGN for r in out.replies), (mac, sid, out.replies)
            assert all(decode(r.data)[1]["message-type"] == 6 and r.broadcast for r in out.replies)


def test_pxe_port_replies_go_to_the_source_not_ciaddr():
    core, _ = make_core(mode="proxy")
    reply, _ = one_reply(core, req("request", "02:00:00:00:00:05", *pxe(), ciaddr=FOREIGN), port=PXE_PORT, src=("10.5.0.50", 4011))
    assert (reply.ip, reply.port) == ("10.5.0.50", 4011)


async def test_inform_with_foreign_ciaddr_sends_nothing_on_the_wire():
    """On loopback: an INFORM naming 127.0.0.2 (not served) must not reach a socket listening there."""
    try:
        victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        victim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        victim.bind(("127.0.0.2", 68))
    except OSError as e:
        victim.close()
        pytest.skip(f"cannot listen on 127.0.0.2:68 ({e}); port 68 needs root")
    victim.setblocking(False)
    core, _ = make_core()
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                port, _ = await nursery.start(lambda task_status: serve_dhcp(
                    core, host="127.0.0.1", port=0, pxe_port=None, interface=None, task_status=task_status))
                client = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
                await client.bind(("127.0.0.1", 0))
                await client.sendto(req("inform", "02:00:00:00:00:31", ciaddr="127.0.0.2", flags=0), ("127.0.0.1", port))
                # The server answers in arrival order: once this OFFER is back, the INFORM was handled.
                await client.sendto(req("discover", NODE_MAC, *pxe()), ("127.0.0.1", port))
                data, _ = await client.recvfrom(2048)
                assert decode(data)[1]["message-type"] == 2
                with pytest.raises(BlockingIOError):
                    victim.recv(2048)
                client.close()
                nursery.cancel_scope.cancel()
    finally:
        victim.close()
    assert core.counters["dropped_inform_ciaddr_not_served"] == 1


# --------------------------------------------------------------------------- DECLINE


def test_decline_from_a_client_not_holding_the_address_is_ignored():
    core, _ = make_core()
    rng = random.Random(5)
    for _ in range(2000):
        mac = "02:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(5))
        ip = ip_str(rng.getrandbits(32))
        out = core.receive(req("decline", mac, ("server_id", SERVER), ("requested_addr", ip)), ("0.0.0.0", 68), 1.0, time.time())
        assert out.replies == [] and not out.dirty
    # A pool address declined by a stranger stays available.
    core.receive(req("decline", "02:00:00:00:00:51", ("requested_addr", "10.5.0.6")), ("0.0.0.0", 68), 1.0, time.time())
    assert core._declined == {}
    assert core.counters["dropped_decline_not_holder"] == 2001
    reply, _ = one_reply(core, req("discover", "02:00:00:00:00:52", ("requested_addr", "10.5.0.6")))
    assert BOOTP(reply.data).yiaddr == "10.5.0.6"


def test_decline_of_a_held_lease_quarantines_it():
    core, _ = make_core()
    mac = "02:00:00:00:00:53"
    one_reply(core, req("discover", mac))
    ip = BOOTP(one_reply(core, req("request", mac, ("server_id", SERVER), ("requested_addr", "10.5.0.5")))[0].data).yiaddr
    out = core.receive(req("decline", mac, ("server_id", SERVER), ("requested_addr", ip)), ("0.0.0.0", 68), 100.0, time.time())
    assert out.dirty and core.leases.by_mac(mac) is None
    reply, _ = one_reply(core, req("discover", "02:00:00:00:00:54", ("requested_addr", ip)))
    assert BOOTP(reply.data).yiaddr != ip


# --------------------------------------------------------------------------- the server loop


class Exploding(DhcpServerCore):
    """A core with a bug: a DISCOVER with option 50 = 10.5.0.66 raises."""

    def _choose(self, mac, wanted, subnet, now, wall):  # noqa: ANN001, ANN202
        if wanted == ip_int("10.5.0.66"):
            raise KeyError("\x1b[2Jboom")
        return super()._choose(mac, wanted, subnet, now, wall)


async def test_a_packet_that_makes_the_core_raise_is_dropped_and_the_server_goes_on(caplog):
    base, policy = make_core()
    core = Exploding(base.config, policy, LeaseStore(None))
    stats = DhcpStats()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port, _ = await nursery.start(lambda task_status: serve_dhcp(
                core, host="127.0.0.1", port=0, pxe_port=None, interface=None, stats=stats, task_status=task_status))
            client = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await client.bind(("127.0.0.1", 0))
            for _ in range(3):
                await client.sendto(req("discover", "02:00:00:00:00:61", ("requested_addr", "10.5.0.66")), ("127.0.0.1", port))
            await client.sendto(req("discover", NODE_MAC, *pxe()), ("127.0.0.1", port))
            data, _ = await client.recvfrom(2048)
            assert BOOTP(data).yiaddr == NODE_IP
            client.close()
            nursery.cancel_scope.cancel()
    assert core.counters["internal_error"] == 3
    logged = [r.getMessage() for r in caplog.records if "raised" in r.getMessage()]
    assert logged and all("\x1b" not in m for m in logged)
