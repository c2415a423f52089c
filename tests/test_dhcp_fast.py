"""The DHCP core's fast path (:meth:`DhcpServerCore.answer`) against its general path (:meth:`DhcpServerCore.receive`).

Two cores with the same configuration and policy get the same generated
datagrams, one after the other, at the same times: one as the trio shell feeds
it (``answer`` first, ``receive`` when the fast path declines), one through
``receive`` only. After every datagram both must have sent the same bytes to
the same place, asked for the same commit, counted the same, and hold the
same leases, offers and declines. The datagrams are built here byte by byte
(not with our codec): DISCOVERs and REQUESTs in every shape the fast path must
take or decline -- relayed or direct, reserved or pool clients, every client
kind, echoed options, small maximum message sizes, gated MACs, requests for
other servers or addresses, repeated and overloaded options, odd hardware
types -- plus the other message types and random byte damage.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from ipaddress import IPv4Address, IPv4Network

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.bootserver.dhcp import DhcpStats, StaticPolicy, serve_dhcp
from orchestrator.bootserver.leases import LeaseStore, _frame, _plain_put_line, _put_record
from orchestrator.protocols.dhcp import ip_int
from orchestrator.protocols.dhcp_server import ClientKind, DhcpServerCore, Reservation, ServerConfig, Subnet
from orchestrator.protocols.leases import Lease

SERVER = "10.5.0.1"
RELAY = "10.6.0.1"
MACS = [f"52:54:00:00:00:{i:02x}" for i in range(1, 9)]
RESERVED = {MACS[0]: ("10.5.0.10", "node10"), MACS[1]: ("10.6.0.50", None), MACS[2]: ("10.5.0.11", "n\u00f6de-" + "x" * 300),
            MACS[3]: ("10.5.0.12", "bad\udcff")}
ADDRESSES = ["10.5.0.5", "10.5.0.6", "10.5.0.7", "10.5.0.10", "10.5.0.12", "10.6.0.100", "10.6.0.101", "10.6.0.50",
             "10.7.0.1", "10.5.0.255", "10.5.0.1"]


def make_core(mode: str) -> DhcpServerCore:
    subnets = (
        Subnet(IPv4Network("10.5.0.0/24"), router=IPv4Address(SERVER), dns=(IPv4Address("10.5.0.2"),), domain="lab.example",
               pool=(ip_int("10.5.0.5"), ip_int("10.5.0.8")), lease_time=3600),
        Subnet(IPv4Network("10.6.0.0/24"), router=IPv4Address(RELAY), pool=(ip_int("10.6.0.100"), ip_int("10.6.0.101")),
               lease_time=600),
        Subnet(IPv4Network("10.8.0.0/24"), pool=None),
    )
    policy = StaticPolicy(
        {m: Reservation(ip_int(ip), host) for m, (ip, host) in RESERVED.items()},
        next_server=SERVER,
        loaders={ClientKind.BIOS: "pxelinux.0", ClientKind.UEFI: "syslinux.efi",
                 ClientKind.UEFI_HTTP: f"http://{SERVER}/" + "u" * 130 + ".efi"},
        ipxe_script=f"http://{SERVER}:8080/boot.ipxe",
        ipxe_script_for={MACS[0]: f"http://{SERVER}:8080/ipxe/" + "x" * 300 + ".ipxe"},
        ipxe_gets_loader_for={MACS[1]: True},
    )
    policy.close_gate(MACS[5])
    core = DhcpServerCore(ServerConfig(IPv4Address(SERVER), subnets, mode=mode, offer_hold=30.0), policy, LeaseStore(None))
    core.emit_events = False
    return core


def option(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def ip_b(ip: str) -> bytes:
    return IPv4Address(ip).packed


@st.composite
def datagrams(draw: st.DrawFn) -> tuple[bytes, tuple[str, int], int, float, bool]:
    """One datagram, its source, the port it came to, how far the clock moves before it, and
    whether the client follows an OFFER up with its REQUEST (:func:`follow_up`)."""
    # Most datagrams are the common exchange's (the fast path must take them); the rest are odd in one
    # or more ways (it must decline them, or take them and still answer as the general path does).
    odd_ok = draw(st.integers(0, 9)) >= 6

    def odd(common, *others):
        return draw(st.sampled_from([common, *others])) if odd_ok else common

    mac = draw(st.sampled_from(MACS))
    mtype = odd(draw(st.sampled_from([1, 3])), 2, 4, 5, 7, 8, 9)
    giaddr = draw(st.sampled_from(["0.0.0.0", RELAY])) if not odd_ok else draw(
        st.sampled_from(["0.0.0.0", RELAY, "10.5.0.200", "10.8.0.1", "192.0.2.1", "10.6.0.255", "10.5.0.0"]))
    ciaddr = odd("0.0.0.0", "10.5.0.5", "10.6.0.100", "192.0.2.9")
    htype, hlen = odd((1, 6), (6, 6), (1, 5), (32, 16), (1, 0))
    op = odd(1, 2)
    flags = draw(st.sampled_from([0, 0x8000, 0x8001, 0x0001]))
    chaddr = bytes.fromhex(mac.replace(":", "")) + draw(st.sampled_from([bytes(10), b"\x01" * 10]))
    head = struct.pack("!BBBBIHHIIII", op, htype, hlen, draw(st.integers(0, 3)), draw(st.integers(0, 2**32 - 1)),
                       draw(st.integers(0, 9)), flags, ip_int(ciaddr), 0, 0, ip_int(giaddr))
    sname = draw(st.sampled_from([bytes(64), b"srv".ljust(64, b"\x00")]))
    file = draw(st.sampled_from([bytes(128), b"boot".ljust(128, b"\x00")]))
    opts = [option(53, bytes((mtype,)))]
    extra: list[bytes] = []
    v = draw(st.sampled_from([None, None, b"PXEClient:Arch:00000:UNDI:002001", b"PXEClient:Arch:00007:UNDI:003016",
                              b"HTTPClient:Arch:00016:UNDI:003001", b"udhcp 1.36.1", b"PXEClient", b""]))
    if v is not None:
        extra.append(option(60, v))
    v = draw(st.sampled_from([None, None, b"\x00\x00", b"\x00\x07", b"\x00\x10", b"\x00\x09\x00\x00", b"\x00", b""]))
    if v is not None:
        extra.append(option(93, v))
    v = draw(st.sampled_from([None, None, b"iPXE", b"\x04iPXE", b"other"]))
    if v is not None:
        extra.append(option(77, v))
    if draw(st.booleans()):
        extra.append(option(94, b"\x01\x02\x01"))
    v = draw(st.sampled_from([None, None, b"\x00" + bytes(range(16)), b"", b"\x00" * 200]))
    if v is not None:
        extra.append(option(97, v))
    v = draw(st.sampled_from([None, None, b"\x01\x04ab12", b"", b"r" * 255]))
    if v is not None:
        extra.append(option(82, v))
    v = draw(st.sampled_from([None, None, b"\x02\x40", b"\x05\xdc", b"\x00\x10", b"\x02"]))
    if v is not None:
        extra.append(option(57, v))
    v = draw(st.sampled_from([None, None, b"\x01" + chaddr[:6], b"c" * 129, b"c" * 128]))
    if v is not None:
        extra.append(option(61, v))
    v = draw(st.sampled_from([None, SERVER, SERVER, "10.5.0.2", b"\x0a\x05"] if mtype == 3 else [None] * 4 + [SERVER]))
    if v is not None:
        extra.append(option(54, v if isinstance(v, bytes) else ip_b(v)))
    v = draw(st.sampled_from([None, *ADDRESSES, b"\x0a\x05\x00"] if mtype == 3 else [None] * 12 + ADDRESSES[:4]))
    if v is not None:
        extra.append(option(50, v if isinstance(v, bytes) else ip_b(v)))
    if draw(st.booleans()):
        extra.append(option(12, draw(st.sampled_from([b"host", b"$(reboot)", b"a" * 70]))))
    if draw(st.booleans()):
        extra.append(option(55, b"\x01\x03\x06\x0c\x0f\x1c\x2b\x3c\x42\x43"))
    shape = odd(None, "dup", "overload", "pad", "noend", "trunc", "trail")
    if shape == "dup" and extra:
        extra.append(extra[0])  # RFC 3396: a repeated option is one long option
    elif shape == "overload":
        extra.append(option(52, b"\x01"))
        file = (option(67, b"f.0") + b"\xff").ljust(128, b"\x00")
    elif shape == "pad":
        extra.insert(0, b"\x00\x00")
    extra = draw(st.permutations(extra))
    body = head + chaddr + sname + file + b"\x63\x82\x53\x63" + b"".join(opts) + b"".join(extra)
    if shape == "noend":
        pass
    elif shape == "trunc":
        body = body[:-1]
    elif shape == "trail":
        body += b"\xff" + b"\x35\x01\x03"
    else:
        body += b"\xff"
    if odd_ok and draw(st.integers(0, 5)) == 0:  # random damage
        b = bytearray(body)
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        body = bytes(b)
    port = odd(67, 4011)
    src = (giaddr, 67) if giaddr != "0.0.0.0" else ("0.0.0.0", 68)
    step = draw(st.sampled_from([0.0, 0.0, 0.5, 5.0, 31.0, 700.0]))
    return body, src, port, step, draw(st.integers(0, 3)) > 0


def follow_up(discover: bytes, offer: bytes) -> bytes | None:
    """The REQUEST a client sends after ``offer`` (SELECTING): the DISCOVER with option 53 = 3, 54, 50."""
    if discover[240:243] != b"\x35\x01\x01" or len(offer) < 243 or offer[240:243] != b"\x35\x01\x02":
        return None
    return (discover[:240] + option(53, b"\x03") + option(54, ip_b(SERVER)) + option(50, offer[16:20])
            + discover[243:])


def run_fast(core: DhcpServerCore, data: bytes, src: tuple[str, int], now: float, wall: float, port: int):
    """What the shell does: the fast path, the general path when it declines. (replies, dirty, took fast path)."""
    r = core.answer(data, src, now, wall, port)
    if r is None:
        out = core.receive(data, src, now, wall, port)
        return [(x.data, x.ip, x.port, x.broadcast) for x in out.replies], out.dirty, False
    if not r:
        return [], False, True
    return [r[:4]], r[4], True


def run_general(core: DhcpServerCore, data: bytes, src: tuple[str, int], now: float, wall: float, port: int):
    out = core.receive(data, src, now, wall, port)
    return [(x.data, x.ip, x.port, x.broadcast) for x in out.replies], out.dirty


def state(core: DhcpServerCore) -> tuple:
    return (sorted(core.leases.leases(), key=lambda lease: lease.mac), dict(core._offers), dict(core._offered_ips),
            dict(core._declined), +core.counters)


def outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 -- both paths must fail alike
        return type(exc).__name__


@pytest.mark.parametrize("mode", ["full", "proxy"])
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(datagrams(), min_size=1, max_size=40))
def test_fast_path_sends_the_same_bytes_and_changes_the_same_state(mode, steps):
    fast, general = make_core(mode), make_core(mode)
    now, wall = 100.0, 1_800_000_000.0
    for data, src, port, step, follow in steps:
        now += step
        wall += step
        sent = [data]
        while sent:
            data = sent.pop()
            got = outcome(run_fast, fast, data, src, now, wall, port)
            want = outcome(run_general, general, data, src, now, wall, port)
            if isinstance(got, tuple):
                assert isinstance(want, tuple), (got, want)
                assert got[:2] == want
                if follow and want[0] and (request := follow_up(data, want[0][0][0])) is not None:
                    sent.append(request)
            else:
                assert got == want
            assert state(fast) == state(general)
        if step >= 5.0:
            fast.expire(now)
            general.expire(now)


def dora_datagrams(mac: str, *, relayed: bool) -> tuple[bytes, callable]:
    head = struct.pack("!BBBBIHHIIII", 1, 1, 6, 0, 0x1234, 0, 0, 0, 0, 0, ip_int(RELAY) if relayed else 0)
    chaddr = bytes.fromhex(mac.replace(":", "")) + bytes(10)
    base = head + chaddr + bytes(192) + b"\x63\x82\x53\x63"
    pxe = option(60, b"PXEClient:Arch:00000:UNDI:002001") + option(93, b"\x00\x00") + option(94, b"\x01\x02\x01")
    discover = base + option(53, b"\x01") + pxe + b"\xff"

    def request(ip: int) -> bytes:
        return base + option(53, b"\x03") + option(54, ip_b(SERVER)) + option(50, ip.to_bytes(4, "big")) + pxe + b"\xff"

    return discover, request


@pytest.mark.parametrize("mac,relayed", [(MACS[4], False), (MACS[4], True), (MACS[0], False)])
def test_the_common_exchange_takes_the_fast_path(mac, relayed):
    core = make_core("full")
    discover, request = dora_datagrams(mac, relayed=relayed)
    src = (RELAY, 67) if relayed else ("0.0.0.0", 68)
    offer = core.answer(discover, src, 100.0, 1e9, 67)
    assert offer and not offer[4]
    yiaddr = int.from_bytes(offer[0][16:20], "big")
    ack = core.answer(request(yiaddr), src, 100.5, 1e9, 67)
    assert ack and ack[4] and ack[0][242] == 5  # option 53 = ACK, dirty: commit before sending
    assert ack[1:4] == ((RELAY, 67, False) if relayed else ("255.255.255.255", 68, True))
    assert core.leases.by_mac(mac).ip == str(IPv4Address(yiaddr))


def test_fast_path_steps_aside_when_events_are_wanted_or_in_proxy_mode():
    discover, _ = dora_datagrams(MACS[4], relayed=False)
    core = make_core("full")
    core.emit_events = True
    assert core.answer(discover, ("0.0.0.0", 68), 100.0, 1e9, 67) is None
    assert make_core("proxy").answer(discover, ("0.0.0.0", 68), 100.0, 1e9, 67) is None
    assert make_core("full").answer(discover, ("0.0.0.0", 68), 100.0, 1e9, 4011) is None
    assert not make_core("full").counters  # declining counts nothing: receive() does
    core = make_core("full")
    assert core.answer(discover, ("0.0.0.0", 68), 100.0, 1e9, 67)
    core.config = dataclasses.replace(core.config, mode="proxy")  # a replaced config counts from the next datagram
    assert core.answer(discover, ("0.0.0.0", 68), 100.0, 1e9, 67) is None


_macs = st.lists(st.integers(0, 255), min_size=1, max_size=20).map(lambda b: ":".join(f"{x:02x}" for x in b))
_ips = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
_times = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**60), 2**60))


@given(_macs, _ips, _times, st.sampled_from(["offered", "bound", "released", "declined"]))
def test_plain_journal_line_is_the_encoders(mac, ip, expires, state_):
    lease = Lease(mac=mac, ip=ip, expires=expires, state=state_)
    assert math.isfinite(lease.expires)
    assert _plain_put_line(lease) == _frame(_put_record(lease))


async def test_the_shell_serves_the_common_exchange_on_the_fast_path_and_acks_after_the_journal(tmp_path):
    journal = tmp_path / "leases"
    core = make_core("full")
    core.leases = LeaseStore(journal)
    stats = DhcpStats()
    taken = []
    answer = core.answer

    def counting_answer(*args):
        r = answer(*args)
        taken.append(r is not None)
        return r

    core.answer = counting_answer
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port, _ = await nursery.start(lambda task_status: serve_dhcp(
                core, host="127.0.0.1", port=0, pxe_port=None, interface=None, stats=stats, task_status=task_status))
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            for mac in (MACS[4], MACS[0]):  # a pool client, a reserved one
                discover, request = dora_datagrams(mac, relayed=False)
                await sock.sendto(discover, ("127.0.0.1", port))
                offer, _ = await sock.recvfrom(2048)  # broadcast redirected to the source: no interface
                assert offer[242] == 2
                await sock.sendto(request(int.from_bytes(offer[16:20], "big")), ("127.0.0.1", port))
                ack, _ = await sock.recvfrom(2048)
                assert ack[242] == 5 and ack[16:20] == offer[16:20]
                # The ACK left after its lease reached the journal.
                ip = str(IPv4Address(ack[16:20]))
                assert f'"mac":"{mac}","ip":"{ip}"'.encode() in journal.read_bytes()
            sock.close()
            nursery.cancel_scope.cancel()
    core.leases.close()
    assert taken == [True] * 4 and core.counters["out_ack"] == 2
    again = LeaseStore(journal)
    assert again.by_mac(MACS[0]).ip == RESERVED[MACS[0]][0] and again.by_mac(MACS[0]).hostname == "node10"
    again.close()
