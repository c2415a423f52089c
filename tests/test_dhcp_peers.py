"""Real DHCP clients against real DHCP servers, replies checked by an independent decoder.

Every test body runs once per server: the peers (``dnsmasq``, ``kea`` --
kea-dhcp4 with memfile leases -- and ISC ``dhcpd``) prove the harness
(``tests/dhcp_lab.py``, ``dhcp_servers.py``, ``dhcp_clients.py``,
``dhcp_capture.py``) right, and the same bodies then hold ``ours``
(``python -m orchestrator.bootserver.dhcp_cli``) to what the peers do. ``ours``
is skipped -- never failed -- until that module exists.

Pick servers with the test IDs (``-k ours``, ``-k dnsmasq``) or with
``BOOTORCH_DHCP_SERVERS=ours,dnsmasq``.

Topology: a server namespace (10.66.0.1/24) and a client namespace joined by a
veth; the client end has no address and a fixed MAC, so the clients do a real
broadcast DORA. The server answers PXE clients (vendor class ``PXEClient...``)
with next-server = its own address, boot file ``pxelinux.0``, option 60
``PXEClient`` and option 43 (PXE vendor options). Replies are captured with a
raw socket in the client namespace and decoded with scapy, never with
``orchestrator.protocols.dhcp``.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess

import pytest

from orchestrator.lab.netns import NetLab
from tests.conftest import require_root
from tests.dhcp_capture import Capture, DhcpPacket, parse_suboptions, replies, requests, require_decoder
from tests.dhcp_clients import PXE_REQUEST_OPTIONS, PXE_VENDOR_CLASS, ClientResult, require_client, run_dhclient, run_udhcpc
from tests.dhcp_lab import DhcpPair, dhcp_pair
from tests.dhcp_servers import (
    BOOT_FILE,
    PXE_OPTION_43,
    SERVER_KINDS,
    ServerConfig,
    ServerHandle,
    require_server,
    start_server,
    stop_server,
)

pytestmark = [pytest.mark.slow, pytest.mark.root]

SERVERS = [s.strip() for s in os.environ.get("BOOTORCH_DHCP_SERVERS", ",".join(SERVER_KINDS)).split(",")
           if s.strip()]
SUBNET = "10.66.0.0/24"
SERVER_IP = "10.66.0.1"
RESERVED = "10.66.0.50"
POOL = ("10.66.0.100", "10.66.0.199")
CLIENT_MAC = "02:42:0b:00:70:01"
OTHER_MAC = "02:42:0b:00:70:99"


@pytest.fixture(params=SERVERS)
def server_kind(request: pytest.FixtureRequest) -> str:
    """The server under test; the ID hook that points every test at ``ours`` too."""
    require_root()
    require_server(request.param)
    require_decoder()
    return request.param


@pytest.fixture
def lab():
    require_root()
    with NetLab(prefix="bt") as lab:
        yield lab


@pytest.fixture
def pair(lab: NetLab, tmp_path) -> DhcpPair:
    return dhcp_pair(lab, tmp_path, subnet=SUBNET, client_mac=CLIENT_MAC)


def _serve(pair: DhcpPair, kind: str, reservations: tuple[tuple[str, str], ...]) -> ServerHandle:
    cfg = ServerConfig(subnet=SUBNET, pool=POOL, reservations=reservations)
    return start_server(pair, kind, cfg)


@pytest.fixture
def server(pair: DhcpPair, server_kind: str):
    """``server_kind`` serving SUBNET with CLIENT_MAC reserved at RESERVED."""
    srv = _serve(pair, server_kind, ((CLIENT_MAC, RESERVED),))
    yield srv
    stop_server(pair, srv)
    print(f"--- {server_kind} log (tail) ---\n{srv.log_text()}")  # shown by pytest on failure


def _run(pair: DhcpPair, client: str, vendor_class: str | None) -> ClientResult:
    require_client(client)
    if client == "udhcpc":
        opts = PXE_REQUEST_OPTIONS if vendor_class else ()
        return run_udhcpc(pair, vendor_class=vendor_class, request_options=opts)
    return run_dhclient(pair, vendor_class=vendor_class)


def _explain(res: ClientResult) -> str:
    return f"{res.client} rc={res.returncode} events={res.events} timed_out={res.timed_out}\n{res.output[-2000:]}"


def _check_reply_envelope(p: DhcpPacket, yiaddr: str) -> None:
    """RFC 2131 4.1: from the server port to the client port, to the new address or broadcast."""
    assert (p.src_ip, p.sport, p.dport) == (SERVER_IP, 67, 68)
    assert p.dst_ip in (yiaddr, "255.255.255.255"), p
    assert p.giaddr == "0.0.0.0"
    assert p.chaddr == CLIENT_MAC


@pytest.mark.parametrize("client", ["udhcpc", "dhclient"])
def test_pxe_client_gets_reserved_address_and_boot_info(pair, server, client):
    with Capture(pair) as cap:
        res = _run(pair, client, PXE_VENDOR_CLASS)
    assert res.ok, _explain(res)
    assert res.ip == RESERVED
    assert res.server_id == SERVER_IP
    assert res.subnet_mask == "255.255.255.0"
    assert res.lease_time and res.lease_time > 0
    assert res.boot_file == BOOT_FILE
    assert res.next_server == SERVER_IP

    packets = cap.decode()
    sent = requests(packets, "discover")
    assert sent and sent[0].vendor_class == PXE_VENDOR_CLASS.encode(), "the client did not send option 60"
    offers, acks = replies(packets, "offer", chaddr=CLIENT_MAC), replies(packets, "ack", chaddr=CLIENT_MAC)
    assert offers and acks, [(p.message_type, p.xid) for p in packets]
    for p in (offers[0], acks[-1]):
        _check_reply_envelope(p, RESERVED)
        assert p.yiaddr == RESERVED
        assert p.siaddr == SERVER_IP  # next-server
        assert p.boot_file == BOOT_FILE
        assert p.options.get(54) == SERVER_IP
        assert p.options.get(1) == "255.255.255.0"
        # A PXE ROM takes an offer as a PXE offer when it says PXEClient (option 60)
        # and carries PXE vendor options (43) that parse as sub-options. The PXE
        # spec ends them with 255 (PXE_END); ISC dhcpd leaves it out and ROMs
        # accept that, so END is not required here.
        assert p.vendor_class is not None and p.vendor_class.startswith(b"PXEClient"), p.options
        raw43 = p.opt_bytes(43)
        assert raw43, f"no option 43 in the {p.message_type}: {p.options}"
        assert p.pxe_suboptions, raw43.hex()
    assert offers[0].xid == sent[0].xid


@pytest.mark.parametrize("client", ["udhcpc", "dhclient"])
def test_os_client_without_pxe_vendor_class_gets_no_pxe_options(pair, server, client):
    """The booted OS DHCPs again without ``PXEClient``: same address, no PXE vendor options."""
    with Capture(pair) as cap:
        res = _run(pair, client, None)
    assert res.ok, _explain(res)
    assert res.ip == RESERVED
    assert res.server_id == SERVER_IP
    acks = replies(cap.decode(), "ack", chaddr=CLIENT_MAC)
    assert acks
    for p in acks:
        _check_reply_envelope(p, RESERVED)
        assert p.yiaddr == RESERVED
        assert 43 not in p.options, p.options
        assert not (p.vendor_class or b"").startswith(b"PXEClient"), p.options


def test_unknown_client_gets_a_pool_address(pair, server_kind):
    srv = _serve(pair, server_kind, ((OTHER_MAC, RESERVED),))
    try:
        with Capture(pair) as cap:
            res = _run(pair, "udhcpc", PXE_VENDOR_CLASS)
    finally:
        stop_server(pair, srv)
        print(srv.log_text())
    assert res.ok, _explain(res)
    lo, hi = (ipaddress.IPv4Address(a) for a in POOL)
    assert lo <= ipaddress.IPv4Address(res.ip) <= hi, res.ip
    acks = replies(cap.decode(), "ack", chaddr=CLIENT_MAC)
    assert acks and acks[-1].yiaddr == res.ip


def test_udhcpc_and_dhclient_agree(pair, server):
    """Two different clients, one after the other, get the same reservation and server id."""
    a = _run(pair, "udhcpc", PXE_VENDOR_CLASS)
    b = _run(pair, "dhclient", PXE_VENDOR_CLASS)
    assert a.ok and b.ok, (_explain(a), _explain(b))
    assert (a.ip, a.server_id) == (b.ip, b.server_id) == (RESERVED, SERVER_IP)


def test_parse_suboptions():
    """The test-side option 43 splitter (part of the independent decoder)."""
    assert parse_suboptions(PXE_OPTION_43) == {1: b"\0\0\0\0"}
    assert parse_suboptions(bytes.fromhex("00 06 01 08 ff".replace(" ", ""))) == {6: b"\x08"}
    with pytest.raises(ValueError):
        parse_suboptions(bytes.fromhex("0605"))


def test_relayed_dora_is_answered_to_the_relay(lab, tmp_path, server_kind):
    """Kea's perfdhcp speaks as a relay (giaddr = its address, source port 67): the
    server must pick the subnet from giaddr and answer the relay on port 67 (RFC 2131 4.1)."""
    from tests.conftest import require_tool

    perfdhcp = require_tool("perfdhcp", "/usr/sbin/perfdhcp")
    relay = "10.66.0.2"
    pair = dhcp_pair(lab, tmp_path, subnet=SUBNET, client_mac=CLIENT_MAC, client_ip=relay)
    srv = _serve(pair, server_kind, ())
    try:
        with Capture(pair) as cap:
            cp = lab.run(pair.client_ns, [perfdhcp, "-4", "-g", "single", "-r", "10", "-n", "5", "-R", "5", "-W", "1000000",
                                          "-o", "60,505845436c69656e74", SERVER_IP],
                         timeout=30, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        stop_server(pair, srv)
        print(srv.log_text())
    assert cp.returncode == 0, cp.stdout  # 3: some exchange was not completed
    acks = replies(cap.decode(), "ack")
    assert len(acks) >= 5
    lo, hi = (ipaddress.IPv4Address(a) for a in POOL)
    for p in acks:
        assert (p.src_ip, p.sport, p.dst_ip, p.dport) == (SERVER_IP, 67, relay, 67), p
        assert p.giaddr == relay
        assert lo <= ipaddress.IPv4Address(p.yiaddr) <= hi
        assert p.siaddr == SERVER_IP and p.boot_file == BOOT_FILE
