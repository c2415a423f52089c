"""The DHCP server's decisions, sans-IO: a datagram and the time in, replies and events out.

:class:`DhcpServerCore.receive` takes one datagram (and where it came from, on
which port, at what time) and returns the replies to send (bytes and a
destination) and the :class:`BootEvent` values it saw.

Two things the core needs come from outside, each declared here as a protocol:

* policy -- which address and which boot file a MAC gets -- is not decided
  here: a :class:`BootPolicy` answers (pixiecore's ``Booter`` idea), so the
  same core serves a plan, a test table or an API;
* leases live in a :class:`LeaseTable` (by MAC, by IP, put, remove) holding
  :class:`~orchestrator.protocols.leases.Lease` values. The core changes it and
  sets :attr:`Output.dirty`; making the change durable is the caller's job. The
  trio shell (:mod:`orchestrator.bootserver.dhcp`) does the sockets and, with
  the journal (:mod:`orchestrator.bootserver.leases`) as the table, commits it
  before sending a dirty batch's replies, so an ACK is never on the wire before
  its lease is on disk.

The address rules, in the order they are tried (RFC 2131 §4.3.1):

1. a plan reservation for the MAC (reservations always win: the pool never
   hands out a reserved address, so a flood of unknown MACs cannot take a
   planned node's address);
2. the client's current lease or pending offer;
3. the address it asks for (option 50), if free in the pool;
4. the next free pool address after the last one handed out (a cursor that
   wraps around). Offers are held ``offer_hold`` seconds, in memory: one per
   MAC and at most one per pool address, so memory is bounded by the pool size
   whatever arrives. The search skips the addresses it already knows are held
   (:class:`_FreeHints`), so a flood of DISCOVERs from new MACs against a full
   pool costs O(1) each, not a walk over the pool; the address chosen is the
   one the walk would choose.

No reservation and no pool: the client gets no answer (``deny unknown clients``).

Replies that RFC 2131 §4.1 sends to ``ciaddr`` (an OFFER or an INFORM's ACK)
are only sent there when ``ciaddr`` is a host address of a served network;
otherwise the request is dropped and counted (``dropped_<type>_ciaddr_not_served``),
so a spoofed datagram cannot make the server send to an arbitrary host. A
DECLINE counts only from the client the address was offered or leased to.

Where a reply goes is :func:`reply_destination` (RFC 2131 §4.1), one pure
function, as in pixiecore's ``txType``.

Cost per datagram: what the replies and events of one datagram share (MAC,
client kind, the event detail) is worked out once (:meth:`DhcpServerCore._context`),
the options that depend only on the subnet are encoded once per subnet, and a
shell with no one to take events sets :attr:`DhcpServerCore.emit_events` to
False so none are built (the replies are the same bytes either way).

Fast path: :meth:`DhcpServerCore.answer` takes the common exchange (a
DISCOVER, a SELECTING REQUEST, full mode, no events) without building a
:class:`Packet`: one ``struct`` call for the header, the options into a dict,
the reply written from pieces cached per subnet and per boot answer, and the
address choice and the lease binding shared with the general path
(:meth:`DhcpServerCore._choose`, :meth:`DhcpServerCore._bind`). It returns
None, having changed and counted nothing, for anything else; the shell then
calls :meth:`DhcpServerCore.receive`. Both paths must send the same bytes to
the same place and make the same changes: ``tests/test_dhcp_fast.py`` runs
generated datagrams through both. A change to what :meth:`DhcpServerCore._reply`
writes, or to which requests :meth:`DhcpServerCore._request` ACKs, must be made
in :meth:`DhcpServerCore.answer` as well (or make it decline those requests).
The fast path follows a replaced :attr:`DhcpServerCore.config` and
:attr:`DhcpServerCore.policy` from the next datagram on (the policy is asked on
every datagram).
"""

from __future__ import annotations

import enum
import struct
from collections import Counter
from dataclasses import dataclass, field
from heapq import heappop, heappush
from ipaddress import IPv4Address, IPv4Network
from typing import Generic, Protocol, TypeVar

from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols.dhcp import (
    BOOTP_MIN_LEN,
    BOOTREPLY,
    CLIENT_PORT,
    FLAG_BROADCAST,
    MAGIC_COOKIE,
    PXE_PORT,
    SERVER_PORT,
    MAX_CLIENT_ID,
    MIN_MAX_MESSAGE_SIZE,
    MalformedPacket,
    MessageType,
    Opt,
    Packet,
    _put_option,
    encode,
    encode_suboptions,
    ip_int,
    ip_str,
    parse,
    sanitize_hostname,
)
from orchestrator.protocols.leases import Lease, LeaseConflict

BROADCAST = 0xFFFFFFFF


class ClientKind(str, enum.Enum):
    BIOS = "bios"
    UEFI = "uefi"  # UEFI PXE: edk2's own network stack, a loader over TFTP
    UEFI_HTTP = "uefi_http"  # UEFI HTTP Boot: a URL as the boot file
    IPXE = "ipxe"
    OTHER = "other"  # an OS DHCP client: no boot file


#: RFC 4578 §2.1 / IANA processor architecture types that are x86 UEFI: 6 x86 UEFI,
#: 7 x86-64 UEFI, 9 EBC (used by some x86-64 UEFI firmware, e.g. older VMware),
#: 15 x86 and 16 x86-64 UEFI HTTP Boot.
UEFI_ARCHES = frozenset({6, 7, 9, 15, 16})
#: UEFI HTTP Boot architecture types: 15 x86, 16 x86-64.
HTTP_ARCHES = frozenset({15, 16})


def client_kind(p: Packet) -> ClientKind:
    """What is asking. iPXE first: it also sends PXEClient and option 93.

    UEFI HTTP Boot sends vendor class ``HTTPClient:Arch:00016:...`` and option
    93 = 16; its offer must carry ``HTTPClient`` and a URL.
    """
    if p.is_ipxe:
        return ClientKind.IPXE
    vc = p.options.get(Opt.VENDOR_CLASS)
    arch = p.client_arch
    if (vc is not None and vc.startswith(b"HTTPClient")) or (arch and arch[0] in HTTP_ARCHES):
        return ClientKind.UEFI_HTTP
    if not p.is_pxe:
        return ClientKind.OTHER
    if arch and arch[0] in UEFI_ARCHES:
        return ClientKind.UEFI
    return ClientKind.BIOS


def is_uefi(p: Packet) -> bool:
    """The client runs UEFI firmware (option 93), whatever is asking: edk2 or iPXE's EFI build."""
    arch = p.client_arch
    return bool(arch) and arch[0] in UEFI_ARCHES


@dataclass(frozen=True, slots=True)
class BootAnswer:
    filename: str
    next_server: int  # siaddr


@dataclass(frozen=True, slots=True)
class Reservation:
    ip: int
    hostname: str | None = None


class BootPolicy(Protocol):
    """What a MAC gets. Implemented by :class:`orchestrator.bootserver.dhcp.StaticPolicy` (the plan's: ``plan_policy``)."""

    def reservation(self, mac: str) -> Reservation | None: ...

    def is_reserved_ip(self, ip: int) -> bool: ...

    def boot(self, mac: str, kind: ClientKind, uefi: bool = False) -> BootAnswer | None:
        """The boot file for ``mac`` asking as ``kind``; ``uefi``: its firmware is UEFI
        (option 93), which matters when iPXE asks and gets a loader."""
        ...


class LeaseTable(Protocol):
    """The leases the core reads and changes. Implemented by the journal
    (:class:`orchestrator.bootserver.leases.LeaseStore`; ``LeaseStore(None)`` keeps it in memory).

    A change is visible to ``by_mac`` / ``by_ip`` at once. One lease per MAC
    (``put`` replaces the MAC's lease) and one MAC per IP: ``put`` of an IP that
    another MAC holds raises :class:`~orchestrator.protocols.leases.LeaseConflict`,
    so the core removes a stale holder first; ``put`` may refuse any other
    lease it cannot keep with ``ValueError``. ``remove`` of a MAC without a
    lease does nothing. ``ip`` is a dotted quad, ``mac`` lower-case, as in
    :class:`~orchestrator.protocols.leases.Lease`.
    """

    def by_mac(self, mac: str) -> Lease | None: ...

    def by_ip(self, ip: str) -> Lease | None: ...

    def put(self, lease: Lease) -> None: ...

    def remove(self, mac: str) -> None: ...


#: The lease table a core was built with: the shell that built it keeps its full type (e.g. the journal's ``commit``).
LeasesT = TypeVar("LeasesT", bound=LeaseTable)


@dataclass(frozen=True, slots=True)
class Subnet:
    network: IPv4Network
    router: IPv4Address | None = None
    dns: tuple[IPv4Address, ...] = ()
    domain: str | None = None
    #: Inclusive (first, last) as ints; None = no pool.
    pool: tuple[int, int] | None = None
    lease_time: int = 86400

    def __contains__(self, ip: int) -> bool:
        return int(self.network.network_address) <= ip <= int(self.network.broadcast_address)

    def in_pool(self, ip: int) -> bool:
        return self.pool is not None and self.pool[0] <= ip <= self.pool[1]

    def has_host(self, ip: int) -> bool:
        """``ip`` is a host of this network: neither its network nor its broadcast address (a /31 or /32 has no such)."""
        lo, hi = int(self.network.network_address), int(self.network.broadcast_address)
        if self.network.prefixlen >= 31:
            return lo <= ip <= hi
        return lo < ip < hi


@dataclass(frozen=True, slots=True)
class ServerConfig:
    server_ip: IPv4Address
    subnets: tuple[Subnet, ...]
    #: "full" answers address requests; "proxy" only adds boot information.
    mode: str = "full"
    offer_hold: float = 30.0
    decline_hold: float = 600.0
    source: str = "dhcp"


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes
    ip: str
    port: int
    broadcast: bool
    msg: MessageType


@dataclass(slots=True)
class Output:
    replies: list[Reply] = field(default_factory=list)
    events: list[BootEvent] = field(default_factory=list)
    #: True when the lease table was changed: make it durable before sending these replies.
    dirty: bool = False


def reply_destination(req: Packet, reply: MessageType, port: int, src_ip: str, src_port: int) -> tuple[str, int, bool]:
    """RFC 2131 §4.1, "where does the reply go":

    * giaddr set: to the relay, server port 67 (it forwards to the client);
    * NAK: broadcast (the client may not have a usable address);
    * ciaddr set (RENEWING/REBINDING, INFORM): unicast to ciaddr;
    * otherwise broadcast. The RFC prefers a unicast to yiaddr at chaddr when
      the broadcast flag is clear, which needs an ARP entry injected for an
      address the client does not hold yet; broadcasting is always delivered
      and is what we do (dnsmasq does the same without CAP_NET_ADMIN).

    Requests to the PXE boot-server port 4011 come from clients that already
    have an address: the reply goes back to where the request came from.
    """
    if port == PXE_PORT:
        return src_ip, src_port, False
    if req.giaddr:
        return ip_str(req.giaddr), SERVER_PORT, False
    if reply == MessageType.NAK:
        return "255.255.255.255", CLIENT_PORT, True
    if req.ciaddr:
        return ip_str(req.ciaddr), CLIENT_PORT, False
    return "255.255.255.255", CLIENT_PORT, True


#: Counter keys and event results per message type, built once (f-strings and enum names cost per packet).
_IN_KEY = {t: f"in_{t.name.lower()}" for t in MessageType}
_OUT_KEY = {t: f"out_{t.name.lower()}" for t in MessageType}
_RESULT = {t: t.name.lower() for t in MessageType}
_NAME = {t: t.name for t in MessageType}
_TYPE_BYTE = {t: bytes((t,)) for t in MessageType}
#: PXE vendor options (option 43): discovery control (6) = 8, "use the boot file in this offer".
_PXE_USE_BOOT_FILE = encode_suboptions({6: b"\x08"})

#: Per datagram: (MAC, client kind, UEFI firmware, event detail shared by its events, event source).
_Context = tuple[str, ClientKind, bool, dict[str, object], str]

#: What :meth:`DhcpServerCore._bind` did: leased (ACK), conflict (NAK), refused (no answer).
_BOUND, _CONFLICT, _REFUSED = "bound", "conflict", "refused"

# The fast path's wire pieces (:meth:`DhcpServerCore.answer`): a request's fixed header up to
# giaddr (RFC 2131 §2: op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr), and a reply's.
_FIXED = struct.Struct("!BBBBIHHIIII")
_ZERO_SNAME = bytes(64)
_ZERO_FILE = bytes(128)
#: A fast reply: (datagram, destination address, destination port, broadcast, dirty).
FastReply = tuple[bytes, str, int, bool, bool]
#: Options the fast path's reply may have to drop to fit the client's maximum message size, in
#: :meth:`DhcpServerCore._reply`'s order.
_TRIMMED = (Opt.DOMAIN, Opt.DNS, Opt.HOSTNAME, Opt.BROADCAST)
_FAST_CACHE_MAX = 4096


def _opt_bytes(code: int, value: bytes) -> bytes:
    """One option as :func:`~orchestrator.protocols.dhcp.encode` writes it (RFC 3396 split past 255 bytes)."""
    n = len(value)
    if 0 < n <= 255:
        return bytes((code, n)) + value
    out = bytearray()
    _put_option(out, code, value)
    return bytes(out)


def _fast_options(data: bytes, n: int) -> dict[int, bytes] | None:
    """The options field of a datagram, or None when the fast path must not take it: a
    structural error (the general parser counts it), option overload (52) or an option that
    appears twice (RFC 3396 concatenation). Otherwise the same dict :func:`parse` builds."""
    opts: dict[int, bytes] = {}
    i = 240
    while i < n:
        code = data[i]
        if code == 0:
            i += 1
            continue
        if code == 255:
            break
        if i + 1 >= n:
            return None
        j = i + 2 + data[i + 1]
        if j > n or code == 52 or code in opts:
            return None
        opts[code] = data[i + 2 : j]
        i = j
    return opts


def _kind_of(opts: dict[int, bytes]) -> tuple[ClientKind, bool]:
    """:func:`client_kind` and :func:`is_uefi` over an options dict."""
    arch = opts.get(Opt.CLIENT_ARCH)
    arch0 = int.from_bytes(arch[:2], "big") if arch is not None and len(arch) >= 2 else -1
    uefi = arch0 in UEFI_ARCHES
    uc = opts.get(Opt.USER_CLASS)
    if uc == b"iPXE" or uc == b"\x04iPXE":
        return ClientKind.IPXE, uefi
    vc = opts.get(Opt.VENDOR_CLASS)
    if (vc is not None and vc.startswith(b"HTTPClient")) or arch0 in HTTP_ARCHES:
        return ClientKind.UEFI_HTTP, uefi
    if not ((vc is not None and vc.startswith(b"PXEClient")) or arch is not None
            or Opt.CLIENT_NDI in opts or Opt.CLIENT_UUID in opts):
        return ClientKind.OTHER, uefi
    return (ClientKind.UEFI if uefi else ClientKind.BIOS), uefi


def _subnet_options(subnet: Subnet) -> dict[int, bytes]:
    """The reply options that depend only on the subnet, in the order replies carry them."""
    lt = subnet.lease_time
    opts: dict[int, bytes] = {
        Opt.LEASE_TIME: lt.to_bytes(4, "big"),
        Opt.RENEWAL_TIME: (lt // 2).to_bytes(4, "big"),  # T1, RFC 2131 §4.4.5
        Opt.REBINDING_TIME: (lt * 7 // 8).to_bytes(4, "big"),  # T2
        Opt.SUBNET_MASK: subnet.network.netmask.packed,
        Opt.BROADCAST: subnet.network.broadcast_address.packed,
    }
    if subnet.router is not None:
        opts[Opt.ROUTER] = subnet.router.packed
    if subnet.dns:
        opts[Opt.DNS] = b"".join(a.packed for a in subnet.dns)
    if subnet.domain:
        opts[Opt.DOMAIN] = subnet.domain.encode()
    return opts


# The clock a hold ends on (for _FreeHints): never, trio's monotonic clock, the wall clock.
_FOREVER, _MONO, _WALL = 0, 1, 2
_Hold = tuple[int, float]  # (clock, the moment the hold ends on that clock)


class _FreeHints:
    """Which addresses of one pool may be free, so the pool search skips those it knows are held.

    ``maybe[i]`` is 1 when address ``first + i`` may be free: the search checks
    it exactly. It is 0 only while the address is held for every client but,
    possibly, the one whose offer or lease holds it (the search checks the
    asking client's own offer and lease apart): the search found it held, and
    nothing that could free it has happened since. What can free it:

    * time: the hold found runs out (an offer's or a decline's on the monotonic
      clock, a lease's on the wall clock). Each 0 queues the end of the hold
      found in a heap, and :meth:`due` turns the addresses whose moment has come
      back into 1s. An address held several ways is queued for one of them;
      still held when that one ends, it is found held again and queued again;
    * an event: the core calls :meth:`touch` whenever an offer, a decline or a
      lease on the address is made, changed or dropped (the core is the only
      writer of its lease table);
    * nothing, for the server's own address, the router and reservations: the
      policy's reservations change only through :meth:`DhcpServerCore.set_policy`,
      which starts every hint over.

    Cost: a 1 found held becomes 0, and becomes 1 again only through an event
    (a few per packet at most) or its queued moment (one per 0). So a search
    does O(1) exact checks amortised, plus a ``bytearray.find`` (memchr) over
    the pool; with no 1 left (an exhausted pool) it does none. Each 0 has one
    live heap entry, so at most ``size`` are live; the entries of addresses
    touched before their moment are stale. Past ``2 * size + SLACK`` entries
    the hints start over (all 1s): finding the held addresses again costs at
    most ``size`` checks, paid for by the ``size + SLACK`` events (packets)
    that it took to get there.
    """

    __slots__ = ("first", "size", "maybe", "ones", "_mono", "_wall")
    SLACK = 64

    def __init__(self, first: int, last: int) -> None:
        self.first = first
        self.size = max(0, last - first + 1)
        self.maybe = bytearray(b"\x01") * self.size
        self.ones = self.size
        self._mono: list[tuple[float, int]] = []
        self._wall: list[tuple[float, int]] = []

    def touch(self, ip: int) -> None:
        i = ip - self.first
        if 0 <= i < self.size and not self.maybe[i]:
            self.maybe[i] = 1
            self.ones += 1

    def held(self, i: int, hold: _Hold) -> None:
        if self.maybe[i]:
            self.maybe[i] = 0
            self.ones -= 1
        clock, until = hold
        if clock == _MONO:
            heappush(self._mono, (until, i))
        elif clock == _WALL:
            heappush(self._wall, (until, i))
        if len(self._mono) + len(self._wall) > 2 * self.size + self.SLACK:
            self.reset()

    def due(self, now: float, wall: float) -> None:
        for heap, t in ((self._mono, now), (self._wall, wall)):
            while heap and heap[0][0] <= t:
                i = heappop(heap)[1]
                if not self.maybe[i]:
                    self.maybe[i] = 1
                    self.ones += 1

    def reset(self) -> None:
        self.maybe = bytearray(b"\x01") * self.size
        self.ones = self.size
        self._mono.clear()
        self._wall.clear()

    def find(self, lo: int, hi: int) -> int:
        """The first index in ``[lo, hi)`` that may be free, or -1."""
        return self.maybe.find(1, lo, hi) if self.ones and lo < hi else -1


class DhcpServerCore(Generic[LeasesT]):
    """One server's state: pending offers, declines, pool hints, counters; leases in the table.

    The core must be the only writer of its lease table while it runs (the
    pool hints follow the changes it makes).
    """

    def __init__(self, config: ServerConfig, policy: BootPolicy, leases: LeasesT) -> None:
        self.config = config
        self.policy = policy
        self.leases = leases
        self.server_ip = int(config.server_ip)
        self._server_id = config.server_ip.packed
        self._offers: dict[str, tuple[int, float]] = {}  # mac -> (ip, expires, monotonic)
        self._offered_ips: dict[int, str] = {}  # ip -> mac
        self._declined: dict[int, float] = {}  # ip -> until (monotonic)
        # Per pool (first, last): the search cursor and the free hints (keyed by the pool's tuple of
        # ints: an IPv4Network's hash is computed in Python on every look-up).
        self._cursor: dict[tuple[int, int], int] = {}
        self._hints: dict[tuple[int, int], _FreeHints] = {}
        self.counters: Counter[str] = Counter()
        #: Build :class:`BootEvent` values (``Output.events``). A shell with no one to hand them to turns
        #: this off: an event costs about as much as parsing the datagram.
        self.emit_events = True
        # What every reply and event for the datagram being answered shares (:meth:`_context`),
        # computed once per datagram in :meth:`receive`; ``_ctx_req`` is the datagram it belongs to.
        self._ctx_req: Packet | None = None
        self._ctx: _Context | None = None
        # Per subnet: the reply options that depend only on the subnet, encoded once (:meth:`_subnet_options`).
        self._subnet_opts: dict[int, tuple[Subnet, dict[int, bytes]]] = {}
        # The fast path's (:meth:`answer`): each subnet's address range, in config order; per (subnet,
        # reply type) options 53, 54 and the subnet's, encoded; per boot answer its reply pieces.
        self._fast_config = config
        self._ranges = [(int(s.network.network_address), int(s.network.broadcast_address), s) for s in config.subnets]
        self._proxy_mode = config.mode == "proxy"
        self._heads: dict[tuple[int, MessageType], tuple[Subnet, bytes, bytes]] = {}
        self._boots: dict[tuple[str, bool, bool], tuple[bytes, bytes]] = {}
        self._nak_opts = b"\x35\x01" + _TYPE_BYTE[MessageType.NAK] + _opt_bytes(Opt.SERVER_ID, self._server_id)

    # ------------------------------------------------------------------ entry

    def set_policy(self, policy: BootPolicy) -> None:
        """Answer from ``policy`` from the next datagram on (a reload).

        Its reservations may differ from the old one's, so the pool's free-address
        hints start over (the next search re-checks each address once); the fast
        path's caches hold nothing per MAC and stay.
        """
        self.policy = policy
        for hints in self._hints.values():
            hints.reset()

    def receive(self, data: bytes, src: tuple[str, int], now: float, wall: float, port: int = SERVER_PORT) -> Output:
        out = Output()
        self.counters["packets_in"] += 1
        try:
            req = parse(data)
        except MalformedPacket:
            self.counters["malformed"] += 1
            return out
        if req.op != 1:  # BOOTREPLY from another server: not ours to answer
            self.counters["dropped_not_request"] += 1
            return out
        mtype = req.msg_type
        if mtype is None:
            self.counters["dropped_no_type"] += 1
            return out
        self.counters[_IN_KEY[mtype]] += 1
        self._ctx_req, self._ctx = req, self._context(req, port)
        if self.emit_events:
            out.events.append(self._event(req, mtype, "in", now, wall, port))
        subnet = self._subnet_for(req)
        if subnet is None:
            self.counters["dropped_no_subnet"] += 1
            return out
        if (
            mtype in (MessageType.DISCOVER, MessageType.INFORM) and req.ciaddr and not req.giaddr and port != PXE_PORT
            and not any(s.has_host(req.ciaddr) for s in self.config.subnets)
        ):
            # The reply would be unicast to ciaddr (RFC 2131 §4.1; §4.3.5 for INFORM). A client
            # we serve has its address in a network we serve; any other ciaddr is a stranger's,
            # and answering would let one spoofed datagram aim our replies at any host. (A
            # REQUEST's ACK goes to ciaddr only when it is the client's own address, in the
            # subnet; its NAK is broadcast. Relayed replies go to the relay.)
            self.counters[f"dropped_{mtype.name.lower()}_ciaddr_not_served"] += 1
            return out
        if port == PXE_PORT or self.config.mode == "proxy":
            self._proxy(req, mtype, subnet, src, port, now, wall, out)
        else:
            self._full(req, mtype, subnet, src, port, now, wall, out)
        return out

    def answer(self, data: bytes, src: tuple[str, int], now: float, wall: float, port: int = SERVER_PORT) -> FastReply | tuple[()] | None:
        """The fast path for the common exchange; None: not taken, call :meth:`receive` instead.

        Takes, in full mode with :attr:`emit_events` off and not on the PXE port, a
        well-formed Ethernet DISCOVER (ciaddr 0) and a SELECTING REQUEST to this
        server (option 54 ours, option 50 set, ciaddr 0) that :meth:`receive` would
        answer with OFFER or ACK (or, for a REQUEST whose lease the table refuses
        while binding, NAK or nothing), relayed or direct. Returns
        ``(datagram, ip, port, broadcast, dirty)``, or ``()`` when the answer is
        nothing; the datagram, the destination, the counters and every change to
        the lease table, offers and pool hints are the ones :meth:`receive` makes
        for the same datagram (``tests/test_dhcp_fast.py`` checks that on generated
        datagrams). It reads the header with one ``struct`` call and the options
        into a dict, skips :class:`Packet`, the client-kind enum work and the
        general encoder, and writes the reply from pieces cached per subnet and per
        boot answer. Everything else -- INFORM, DECLINE, RELEASE, renewals,
        INIT-REBOOT, NAKs decided before binding, option overload, repeated
        options, odd hardware types, proxy mode, events wanted -- returns None
        before anything is changed or counted.
        """
        n = len(data)
        if self._fast_config is not self.config:  # a new config: its subnets and mode
            config = self._fast_config = self.config
            self._ranges = [(int(s.network.network_address), int(s.network.broadcast_address), s) for s in config.subnets]
            self._proxy_mode = config.mode == "proxy"
        if n < 240 or self.emit_events or port == PXE_PORT or self._proxy_mode:
            return None
        op, htype, hlen, _, xid, _, flags, ciaddr, _, _, giaddr = _FIXED.unpack_from(data)
        if op != 1 or htype != 1 or hlen != 6 or ciaddr or data[236:240] != MAGIC_COOKIE:
            return None
        opts = _fast_options(data, n)
        if opts is None:
            return None
        mt = opts.get(Opt.MESSAGE_TYPE)
        if mt == b"\x01":
            mtype = MessageType.DISCOVER
        elif mt == b"\x03":
            mtype = MessageType.REQUEST
        else:
            return None
        cid = opts.get(Opt.CLIENT_ID)
        if cid is not None and len(cid) > MAX_CLIENT_ID:
            return None
        if giaddr:
            for lo, hi, subnet in self._ranges:
                if lo <= giaddr <= hi:
                    break
            else:
                return None
        elif self._ranges:
            subnet = self._ranges[0][2]
        else:
            return None
        mac = data[28:34].hex(":")
        v = opts.get(Opt.REQUESTED_IP)
        wanted = int.from_bytes(v, "big") if v is not None and len(v) == 4 else None
        kind, uefi = _kind_of(opts)
        policy = self.policy
        res = policy.reservation(mac)
        host = b""
        if res is not None and res.hostname:
            try:
                host = _opt_bytes(Opt.HOSTNAME, res.hostname.encode())
            except UnicodeEncodeError:
                return None  # :meth:`_reply` raises there: let it, on the general path
        counters = self.counters
        if mtype == MessageType.DISCOVER:
            counters["packets_in"] += 1
            counters["in_discover"] += 1
            ip = self._choose(mac, wanted, subnet, now, wall)
            if ip is None:
                counters["dropped_no_address"] += 1
                return ()
            rtype, dirty = MessageType.OFFER, False
        else:
            v = opts.get(Opt.SERVER_ID)
            if wanted is None or v is None or len(v) != 4 or int.from_bytes(v, "big") != self.server_ip:
                return None
            known = self._known_address(mac, subnet, now, wall)
            if known is None and self._free_in_pool(wanted, mac, subnet, now, wall):
                known = wanted
            if wanted != known:
                return None  # a NAK: the general path words it
            counters["packets_in"] += 1
            counters["in_request"] += 1
            bound = self._bind(mac, subnet, wanted, wall)
            if bound is _REFUSED:
                return ()
            if bound is _CONFLICT:
                counters["out_nak"] += 1
                tail = _opt_bytes(Opt.RELAY_AGENT, opts[Opt.RELAY_AGENT]) if Opt.RELAY_AGENT in opts else b""
                reply = b"".join((
                    _FIXED.pack(BOOTREPLY, 1, 6, 0, xid, 0, flags & FLAG_BROADCAST, 0, 0, 0, giaddr), data[28:44],
                    _ZERO_SNAME, _ZERO_FILE, MAGIC_COOKIE, self._nak_opts, tail, b"\xff",
                ))
                if len(reply) < BOOTP_MIN_LEN:
                    reply += bytes(BOOTP_MIN_LEN - len(reply))
                if giaddr:
                    return reply, ip_str(giaddr), SERVER_PORT, False, False
                return reply, "255.255.255.255", CLIENT_PORT, True, False
            ip, rtype, dirty = wanted, MessageType.ACK, True
        # The reply, as _reply builds it: 53, 54, the subnet's options, 12, the boot answer's, 97, 82.
        head, head_trimmed = self._fast_head(subnet, rtype)
        siaddr, file_field, boot = 0, _ZERO_FILE, b""
        if kind is not ClientKind.OTHER:
            boot_answer = policy.boot(mac, kind, uefi)
            if boot_answer is not None:
                vc = opts.get(Opt.VENDOR_CLASS)
                file_field, boot = self._fast_boot(
                    boot_answer.filename, kind is ClientKind.UEFI_HTTP, vc is not None and vc.startswith(b"PXEClient"))
                siaddr = boot_answer.next_server
                if Opt.CLIENT_UUID in opts:
                    boot += _opt_bytes(Opt.CLIENT_UUID, opts[Opt.CLIENT_UUID])  # PXE spec: echo 97
            else:
                counters["netboot_gated"] += 1
        tail = _opt_bytes(Opt.RELAY_AGENT, opts[Opt.RELAY_AGENT]) if Opt.RELAY_AGENT in opts else b""  # RFC 3046 §2.2
        fixed = b"".join((
            _FIXED.pack(BOOTREPLY, 1, 6, 0, xid, 0, flags & FLAG_BROADCAST, 0, ip, siaddr, giaddr), data[28:44],
            _ZERO_SNAME, file_field, MAGIC_COOKIE,
        ))
        reply = b"".join((fixed, head, host, boot, tail, b"\xff"))
        v = opts.get(Opt.MAX_MESSAGE_SIZE)
        limit = (max(MIN_MAX_MESSAGE_SIZE, int.from_bytes(v, "big")) if v is not None and len(v) == 2
                 else MIN_MAX_MESSAGE_SIZE) - 28  # IP + UDP headers
        if len(reply) > limit:
            reply = b"".join((fixed, head_trimmed, boot, tail, b"\xff"))
        if len(reply) < BOOTP_MIN_LEN:
            reply += bytes(BOOTP_MIN_LEN - len(reply))
        counters[_OUT_KEY[rtype]] += 1
        if giaddr:
            return reply, ip_str(giaddr), SERVER_PORT, False, dirty
        return reply, "255.255.255.255", CLIENT_PORT, True, dirty

    def _fast_head(self, subnet: Subnet, rtype: MessageType) -> tuple[bytes, bytes]:
        """Options 53, 54 and the subnet's, encoded: whole, and without the ones a too-long reply drops."""
        key = (id(subnet), rtype)
        cached = self._heads.get(key)
        if cached is None or cached[0] is not subnet:
            so = _subnet_options(subnet)
            first = b"\x35\x01" + _TYPE_BYTE[rtype] + _opt_bytes(Opt.SERVER_ID, self._server_id)
            whole = first + b"".join(_opt_bytes(c, v) for c, v in so.items())
            trimmed = first + b"".join(_opt_bytes(c, v) for c, v in so.items() if c not in _TRIMMED)
            cached = self._heads[key] = (subnet, whole, trimmed)
        return cached[1], cached[2]

    def _fast_boot(self, filename: str, http: bool, pxe_vc: bool) -> tuple[bytes, bytes]:
        """A boot answer's reply pieces: the ``file`` field, and options 67 / 60 / 43 as :meth:`_reply` writes them."""
        key = (filename, http, pxe_vc)
        cached = self._boots.get(key)
        if cached is None:
            fname = filename.encode()
            opts = b""
            if len(fname) < 128:
                field_ = fname.ljust(128, b"\x00")
            else:
                field_ = _ZERO_FILE
                opts = _opt_bytes(Opt.BOOTFILE, fname)  # long iPXE URLs: option 67 only
            if http:
                opts += _opt_bytes(Opt.VENDOR_CLASS, b"HTTPClient")  # UEFI spec 2.x §24.7
            elif pxe_vc:
                opts += _opt_bytes(Opt.VENDOR_CLASS, b"PXEClient") + _opt_bytes(Opt.VENDOR_SPECIFIC, _PXE_USE_BOOT_FILE)
            if len(self._boots) >= _FAST_CACHE_MAX:
                self._boots.clear()
            cached = self._boots[key] = (field_, opts)
        return cached

    def expire(self, now: float) -> None:
        """Forget pending offers and declines past their hold time."""
        for mac, (ip, until) in list(self._offers.items()):
            if until <= now:
                del self._offers[mac]
                self._offered_ips.pop(ip, None)
                self._touch(ip)
        for ip, until in list(self._declined.items()):
            if until <= now:
                del self._declined[ip]
                self._touch(ip)

    # ------------------------------------------------------------------ full mode

    def _full(self, req: Packet, mtype: MessageType, subnet: Subnet, src: tuple[str, int], port: int, now: float, wall: float, out: Output) -> None:
        mac = req.mac
        if mtype == MessageType.DISCOVER:
            ip = self._choose(mac, req.requested_ip, subnet, now, wall)
            if ip is None:
                self.counters["dropped_no_address"] += 1
                return
            self._reply(req, MessageType.OFFER, subnet, ip, src, port, now, wall, out)
        elif mtype == MessageType.REQUEST:
            self._request(req, subnet, src, port, now, wall, out)
        elif mtype == MessageType.DECLINE:
            # RFC 2131 §4.3.3: the address is in use by someone else (ARP said so).
            ip = req.requested_ip
            if ip is not None and req.server_id in (None, self.server_ip):
                lease = self.leases.by_ip(ip_str(ip))
                leased = lease is not None and lease.mac == mac
                offer = self._offers.get(mac)
                if not leased and (offer is None or offer[0] != ip):
                    # Only the client the address was offered or leased to can have found it
                    # in use (Kea ignores the rest too: DHCP4_DECLINE_LEASE_MISMATCH). Anyone
                    # else's DECLINE would quarantine any address for one spoofed datagram, and
                    # add an entry per address named to _declined, without bound.
                    self.counters["dropped_decline_not_holder"] += 1
                    return
                if leased:
                    self.leases.remove(mac)
                    out.dirty = True
                self._drop_offer(mac)
                self._declined[ip] = now + self.config.decline_hold
                self._touch(ip)
        elif mtype == MessageType.RELEASE:
            lease = self.leases.by_mac(mac)
            if lease is not None and (not req.ciaddr or ip_str(req.ciaddr) == lease.ip):
                self.leases.remove(mac)
                self._touch(ip_int(lease.ip))
                out.dirty = True
        elif mtype == MessageType.INFORM:
            # RFC 2131 §4.3.5: configuration only; no yiaddr, no lease time.
            self._reply(req, MessageType.ACK, subnet, 0, src, port, now, wall, out, inform=True)

    def _request(self, req: Packet, subnet: Subnet, src: tuple[str, int], port: int, now: float, wall: float, out: Output) -> None:
        mac = req.mac
        sid, wanted, ciaddr = req.server_id, req.requested_ip, req.ciaddr
        known = self._known_address(mac, subnet, now, wall)
        if sid is not None:
            # SELECTING (RFC 2131 §4.3.2): the client picked a server.
            if sid != self.server_ip:
                self._drop_offer(mac)
                self.counters["request_for_other_server"] += 1
                return
            if wanted is None:
                wanted = ciaddr or None
            if known is None and wanted is not None and self._free_in_pool(wanted, mac, subnet, now, wall):
                known = wanted  # our offer expired but the address is still free
            if wanted is not None and wanted == known:
                self._ack(req, subnet, wanted, src, port, now, wall, out)
            else:
                self._reply(req, MessageType.NAK, subnet, 0, src, port, now, wall, out)
            return
        if wanted is not None and not ciaddr:
            # INIT-REBOOT: verify the remembered address.
            if wanted not in subnet:
                self._reply(req, MessageType.NAK, subnet, 0, src, port, now, wall, out)
            elif known == wanted:
                self._ack(req, subnet, wanted, src, port, now, wall, out)
            elif known is not None or self._held_by_other(wanted, mac, now, wall):
                self._reply(req, MessageType.NAK, subnet, 0, src, port, now, wall, out)
            else:
                self.counters["request_unknown_client"] += 1  # RFC: remain silent
            return
        if ciaddr:
            # RENEWING (unicast) / REBINDING (broadcast).
            if known == ciaddr:
                self._ack(req, subnet, ciaddr, src, port, now, wall, out)
            elif known is not None:
                self._reply(req, MessageType.NAK, subnet, 0, src, port, now, wall, out)
            else:
                self.counters["request_unknown_client"] += 1
            return
        self.counters["dropped_bad_request"] += 1

    def _ack(self, req: Packet, subnet: Subnet, ip: int, src: tuple[str, int], port: int, now: float, wall: float, out: Output) -> None:
        bound = self._bind(req.mac, subnet, ip, wall)
        if bound is _BOUND:
            out.dirty = True
            self._reply(req, MessageType.ACK, subnet, ip, src, port, now, wall, out)
        elif bound is _CONFLICT:
            self._reply(req, MessageType.NAK, subnet, 0, src, port, now, wall, out)

    def _bind(self, mac: str, subnet: Subnet, ip: int, wall: float) -> str:
        """Lease ``ip`` to ``mac`` (the lease-table side of an ACK): :data:`_BOUND`, or
        :data:`_CONFLICT` (answer NAK) or :data:`_REFUSED` (answer nothing), counted."""
        res = self.policy.reservation(mac)
        hostname = res.hostname if res else None
        ip_s = ip_str(ip)
        holder = self.leases.by_ip(ip_s)
        if holder is not None and holder.mac != mac:
            if res is not None or holder.state != "bound" or holder.expires <= wall:
                # A stale holder (expired, released, declined), or a pool lease on an
                # address the plan now reserves: the reservation wins.
                self.leases.remove(holder.mac)
                self._touch(ip)
        previous = self.leases.by_mac(mac)
        try:
            self.leases.put(Lease(mac=mac, ip=ip_s, expires=wall + subnet.lease_time, state="bound", hostname=hostname))
        except LeaseConflict:
            self.counters["lease_conflict"] += 1
            return _CONFLICT
        except ValueError:
            self.counters["dropped_bad_client"] += 1  # e.g. hlen 0: no usable hardware address
            return _REFUSED
        self._touch(ip)  # its lease's end moved
        if previous is not None:
            self._touch(ip_int(previous.ip))  # the client's earlier address, if another, is free
        self._drop_offer(mac)
        return _BOUND

    # ------------------------------------------------------------------ addresses

    def _known_address(self, mac: str, subnet: Subnet, now: float, wall: float) -> int | None:
        res = self.policy.reservation(mac)
        if res is not None:
            return res.ip if res.ip in subnet else None
        lease = self.leases.by_mac(mac)
        if lease is not None and lease.state == "bound" and lease.expires > wall:
            ip = ip_int(lease.ip)
            if ip in subnet:
                return ip
        offer = self._offers.get(mac)
        if offer is not None and offer[1] > now and offer[0] in subnet:
            return offer[0]
        return None

    def _hold(self, ip: int, mac: str, now: float, wall: float) -> _Hold | None:
        """What keeps ``ip`` from ``mac``, and until when; None if nothing does."""
        if self.policy.is_reserved_ip(ip):
            return _FOREVER, 0.0
        lease = self.leases.by_ip(ip_str(ip))
        if lease is not None and lease.mac != mac and lease.expires > wall and lease.state == "bound":
            return _WALL, lease.expires
        holder = self._offered_ips.get(ip)
        if holder is not None and holder != mac:
            until = self._offers.get(holder, (0, 0.0))[1]
            if until > now:
                return _MONO, until
        until = self._declined.get(ip, 0.0)
        if until > now:
            return _MONO, until
        return None

    def _held_by_other(self, ip: int, mac: str, now: float, wall: float) -> bool:
        return self._hold(ip, mac, now, wall) is not None

    def _pool_hold(self, ip: int, mac: str, subnet: Subnet, now: float, wall: float) -> _Hold | None:
        """Like :meth:`_hold`, and addresses outside the pool, the server's and the router's are held for good."""
        if not subnet.in_pool(ip) or ip == self.server_ip or (subnet.router and ip == int(subnet.router)):
            return _FOREVER, 0.0
        return self._hold(ip, mac, now, wall)

    def _free_in_pool(self, ip: int, mac: str, subnet: Subnet, now: float, wall: float) -> bool:
        return self._pool_hold(ip, mac, subnet, now, wall) is None

    def _choose(self, mac: str, wanted: int | None, subnet: Subnet, now: float, wall: float) -> int | None:
        """The address to offer ``mac`` (module docstring's rules); ``wanted``: its option 50."""
        known = self._known_address(mac, subnet, now, wall)
        if known is not None:
            if self.policy.reservation(mac) is None:
                self._hold_offer(mac, known, now)
            return known
        if subnet.pool is None:
            self.counters["unknown_client"] += 1
            return None
        if wanted is not None and self._free_in_pool(wanted, mac, subnet, now, wall):
            self._hold_offer(mac, wanted, now)
            return wanted
        first, last = subnet.pool
        ip = self._search(mac, subnet, self._cursor.get(subnet.pool, first), now, wall)
        if ip is not None:
            self._cursor[subnet.pool] = ip + 1 if ip < last else first
            self._hold_offer(mac, ip, now)
            return ip
        self.counters["pool_exhausted"] += 1
        return None

    def _search(self, mac: str, subnet: Subnet, start: int, now: float, wall: float) -> int | None:
        """The first address free for ``mac`` in pool order from ``start`` (wrapping around):
        what a walk over the whole pool would find, without looking at the addresses the
        hints know are held."""
        assert subnet.pool is not None
        hints = self._hints.get(subnet.pool)
        if hints is None:
            hints = self._hints[subnet.pool] = _FreeHints(*subnet.pool)
        size = hints.size
        if size == 0:
            return None
        hints.due(now, wall)
        first, k0 = hints.first, start - hints.first
        # The client's own offer and lease are free for it though held for everyone else, so
        # the hints may show them held: check them apart. The walk then only needs to look at
        # the positions before the nearer of them.
        limit, own = size, None
        offer, lease = self._offers.get(mac), self.leases.by_mac(mac)
        for ip in (offer[0] if offer else None, ip_int(lease.ip) if lease else None):
            if ip is not None and 0 <= ip - first < size and not hints.maybe[ip - first]:
                pos = (ip - start) % size
                if pos < limit and self._pool_hold(ip, mac, subnet, now, wall) is None:
                    limit, own = pos, ip
        for lo, hi in ((k0, min(size, k0 + limit)), (0, k0 + limit - size)):
            i = hints.find(lo, hi)
            while i >= 0:
                ip = first + i
                hold = self._pool_hold(ip, mac, subnet, now, wall)
                if hold is None:
                    return ip
                hints.held(i, hold)
                i = hints.find(i + 1, hi)
        return own

    def _touch(self, ip: int) -> None:
        """An offer, decline or lease on ``ip`` was made, changed or dropped: the pool search must look at it again."""
        for hints in self._hints.values():
            hints.touch(ip)

    def _hold_offer(self, mac: str, ip: int, now: float) -> None:
        self._drop_offer(mac)
        previous = self._offered_ips.get(ip)
        if previous is not None:
            self._drop_offer(previous)  # its hold ran out: keep one offer per address
        self._offers[mac] = (ip, now + self.config.offer_hold)
        self._offered_ips[ip] = mac
        self._touch(ip)

    def _drop_offer(self, mac: str) -> None:
        old = self._offers.pop(mac, None)
        if old is not None and self._offered_ips.get(old[0]) == mac:
            del self._offered_ips[old[0]]
            self._touch(old[0])

    def _subnet_for(self, req: Packet) -> Subnet | None:
        """Relayed: the subnet holding giaddr (RFC 2131 §4.3.1). Direct: ciaddr's, else the first."""
        subs = self.config.subnets
        key = req.giaddr or req.ciaddr
        if key:
            for s in subs:
                if key in s:
                    return s
            if req.giaddr:
                return None
        return subs[0] if subs else None

    # ------------------------------------------------------------------ proxy / boot server

    def _proxy(self, req: Packet, mtype: MessageType, subnet: Subnet, src: tuple[str, int], port: int, now: float, wall: float, out: Output) -> None:
        """ProxyDHCP (PXE spec 2.1 §2.2.4): boot information only, yiaddr 0.

        Port 67: answer a PXE DISCOVER with an OFFER carrying next-server, the
        boot file and discovery control "use the boot file" (option 43/6 = 8,
        so the ROM skips multicast/broadcast boot server discovery). Port 4011:
        a PXE REQUEST gets an ACK with the same (BIOS ROMs ask there even when
        the offer had everything).
        """
        if not req.is_pxe:
            self.counters["proxy_ignored_non_pxe"] += 1
            return
        if port == PXE_PORT and mtype in (MessageType.REQUEST, MessageType.INFORM):
            self._reply(req, MessageType.ACK, subnet, 0, src, port, now, wall, out, proxy=True)
        elif port != PXE_PORT and mtype == MessageType.DISCOVER:
            self._reply(req, MessageType.OFFER, subnet, 0, src, port, now, wall, out, proxy=True)
        else:
            self.counters["proxy_ignored"] += 1

    # ------------------------------------------------------------------ replies

    def _reply(
        self, req: Packet, mtype: MessageType, subnet: Subnet, yiaddr: int, src: tuple[str, int], port: int,
        now: float, wall: float, out: Output, *, inform: bool = False, proxy: bool = False,
    ) -> None:
        ctx = self._ctx if self._ctx_req is req else self._context(req, port)
        assert ctx is not None
        mac, kind, uefi, _, _ = ctx
        opts: dict[int, bytes] = {Opt.MESSAGE_TYPE: _TYPE_BYTE[mtype], Opt.SERVER_ID: self._server_id}
        rep = Packet(
            op=BOOTREPLY, htype=req.htype, hlen=req.hlen, hops=0, xid=req.xid, secs=0,
            flags=req.flags & FLAG_BROADCAST, ciaddr=req.ciaddr if mtype != MessageType.NAK else 0,
            yiaddr=yiaddr, siaddr=0, giaddr=req.giaddr, chaddr=req.chaddr, options=opts,
        )
        boot_file = None
        if mtype != MessageType.NAK:
            if not proxy:
                cached = self._subnet_opts.get(id(subnet))
                if cached is None or cached[0] is not subnet:
                    cached = self._subnet_opts[id(subnet)] = (subnet, _subnet_options(subnet))
                so = cached[1]
                if inform:
                    opts.update(so)
                    for code in (Opt.LEASE_TIME, Opt.RENEWAL_TIME, Opt.REBINDING_TIME):
                        del opts[code]
                else:
                    opts.update(so)
                res = self.policy.reservation(mac)
                if res is not None and res.hostname:
                    opts[Opt.HOSTNAME] = res.hostname.encode()
            if kind != ClientKind.OTHER:
                answer = self.policy.boot(mac, kind, uefi)
                if answer is not None:
                    boot_file = answer.filename
                    rep.siaddr = answer.next_server
                    fname = answer.filename.encode()
                    if len(fname) < 128:
                        rep.file = fname
                    else:
                        opts[Opt.BOOTFILE] = fname  # long iPXE URLs: option 67 only
                    if kind == ClientKind.UEFI_HTTP:
                        # UEFI spec 2.x §24.7: an HTTP Boot client takes only offers that
                        # say HTTPClient in option 60, with a URI as the boot file.
                        opts[Opt.VENDOR_CLASS] = b"HTTPClient"
                    elif req.options.get(Opt.VENDOR_CLASS, b"").startswith(b"PXEClient"):
                        # The seed's discovery control: at least one PXE vendor option
                        # must be present for a ROM to accept the offer as PXE. 6=8:
                        # "use the boot file in this offer, no boot server discovery".
                        opts[Opt.VENDOR_CLASS] = b"PXEClient"
                        opts[Opt.VENDOR_SPECIFIC] = _PXE_USE_BOOT_FILE
                    if Opt.CLIENT_UUID in req.options:
                        opts[Opt.CLIENT_UUID] = req.options[Opt.CLIENT_UUID]  # PXE spec: echo 97
                elif proxy:
                    self.counters["netboot_gated"] += 1
                    return  # nothing to add: a proxy reply without a boot file is noise
                else:
                    self.counters["netboot_gated"] += 1
        if Opt.RELAY_AGENT in req.options:
            opts[Opt.RELAY_AGENT] = req.options[Opt.RELAY_AGENT]  # RFC 3046 §2.2: echo, last
        data = encode(rep)
        limit = req.max_message_size - 28  # IP + UDP headers
        if len(data) > limit:
            for code in (Opt.DOMAIN, Opt.DNS, Opt.HOSTNAME, Opt.BROADCAST):
                opts.pop(code, None)
            data = encode(rep)
        ip, dport, bcast = reply_destination(req, mtype, port, *src)
        out.replies.append(Reply(data, ip, dport, bcast, mtype))
        self.counters[_OUT_KEY[mtype]] += 1
        if self.emit_events:
            out.events.append(self._event(req, mtype, "out", now, wall, port, yiaddr=yiaddr, boot_file=boot_file, inform=inform))

    # ------------------------------------------------------------------ events

    def _context(self, req: Packet, port: int) -> _Context:
        """What the replies and events for ``req`` share: its MAC, client kind, UEFI-ness and the
        event detail that does not depend on the message (in :data:`_Context` order)."""
        kind = client_kind(req)
        arch = req.client_arch
        uefi = bool(arch) and arch[0] in UEFI_ARCHES
        if not self.emit_events:
            return req.mac, kind, uefi, {}, ""
        opts = req.options
        base: dict[str, object] = {"xid": req.xid, "pxe": req.is_pxe, "ipxe": kind is ClientKind.IPXE,
                                   "kind": kind.value, "port": port}
        vc = opts.get(Opt.VENDOR_CLASS)
        if vc is not None:
            base["vendor_class"] = vc.decode("ascii", "replace")
        if arch:
            base["arch"] = arch[0]
        uc = opts.get(Opt.USER_CLASS)
        if uc is not None:
            base["user_class"] = uc.decode("ascii", "replace")
        hn = sanitize_hostname(opts.get(Opt.HOSTNAME))
        if hn:
            base["hostname"] = hn
        if req.giaddr:
            base["relay"] = ip_str(req.giaddr)
        source = "proxydhcp" if (port == PXE_PORT or self.config.mode == "proxy") else self.config.source
        return req.mac, kind, uefi, base, source

    def _event(self, req: Packet, mtype: MessageType, direction: str, now: float, wall: float, port: int, *, yiaddr: int = 0,
               boot_file: str | None = None, inform: bool = False) -> BootEvent:
        ctx = self._ctx if self._ctx_req is req else self._context(req, port)
        assert ctx is not None
        mac, _, _, base, source = ctx
        ip = yiaddr or req.ciaddr or (req.requested_ip or 0)
        detail: dict[str, object] = {"msg": _NAME[mtype], "direction": direction, **base}
        if boot_file:
            detail["boot_file"] = boot_file
        if inform:
            # The ACK to an INFORM assigns nothing: its address is the client's claim (ciaddr).
            detail["inform"] = True
        return BootEvent(
            time=now, source=source, kind=EventKind.DHCP, client_ip=ip_str(ip) if ip else None,
            mac=mac, wall=wall, result=_RESULT[mtype], detail=detail,
        )
