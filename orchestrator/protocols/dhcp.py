"""DHCPv4 with the PXE options: packet codec, sans-IO.

Bytes in, :class:`Packet` out, and back. No sockets, no clocks. The server logic
(which address, which boot file, where the reply goes) is in
:mod:`orchestrator.protocols.dhcp_server`; this module only knows the wire format.

The format (RFC 2131 §2, figure 1): a 236-byte BOOTP header, the magic cookie
99.130.83.99, then options (RFC 2132) as code/length/value, ``0`` pad and
``255`` end. Option overload (option 52, RFC 2132 §9.3) continues the options in
the ``file`` and/or ``sname`` fields; RFC 3396 says an option that appears more
than once is one long option whose values are concatenated.

Parsing is strict about structure and lenient about content, and every refusal
is a :class:`MalformedPacket` (the peer sent garbage: the server counts it and
drops the packet). Each check below is a class of bug that ISC dhcpd, dnsmasq or
Kea shipped at some point (out-of-bounds reads on crafted options):

* truncated packets, a header shorter than 240 bytes, a bad ``hlen``;
* an option whose length runs past the end of its field;
* option 52 with a value other than 1/2/3, or option 52 appearing *inside*
  ``file``/``sname`` (an overload loop);
* a client identifier over 128 bytes after RFC 3396 concatenation;
* a maximum-message-size option below 576 is not trusted (RFC 2132 §9.10: the
  minimum legal value is 576) -- the packet is served, the value clamped.

Host names from clients (option 12) are never used raw: :func:`sanitize_hostname`
keeps RFC 1123 labels or returns None (``x) via eth9`` and ``$(reboot)`` have
ended up in logs and shell hooks of other servers).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from orchestrator.protocols import errors

# RFC 2131 §2: op codes
BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHER = 1
MAGIC_COOKIE = b"\x63\x82\x53\x63"  # RFC 2131 §3
HEADER = struct.Struct("!BBBBIHHIIII16s64s128s")  # 236 bytes
assert HEADER.size == 236
MIN_PACKET = HEADER.size + len(MAGIC_COOKIE)  # 240
#: RFC 2131 §2: "a DHCP client must be prepared to receive ... 576 octets";
#: BOOTP relays drop replies shorter than 300 bytes (RFC 1542 §2.1), so we pad.
BOOTP_MIN_LEN = 300
MIN_MAX_MESSAGE_SIZE = 576  # RFC 2132 §9.10
MAX_CLIENT_ID = 128
FLAG_BROADCAST = 0x8000  # RFC 2131 §2, figure 2

SERVER_PORT = 67
CLIENT_PORT = 68
PXE_PORT = 4011  # PXE spec 2.1 §2.2.5: boot server discovery / ProxyDHCP requests


class MessageType(enum.IntEnum):
    """Option 53 (RFC 2132 §9.6)."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Opt(enum.IntEnum):
    """Option codes we read or write (RFC 2132 unless noted)."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS = 6
    HOSTNAME = 12
    DOMAIN = 15
    BROADCAST = 28
    VENDOR_SPECIFIC = 43  # PXE vendor options (PXE spec 2.1 table 2-1)
    REQUESTED_IP = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAM_REQUEST = 55
    MESSAGE = 56
    MAX_MESSAGE_SIZE = 57
    RENEWAL_TIME = 58  # T1
    REBINDING_TIME = 59  # T2
    VENDOR_CLASS = 60
    CLIENT_ID = 61
    TFTP_SERVER = 66
    BOOTFILE = 67
    USER_CLASS = 77  # RFC 3004
    RELAY_AGENT = 82  # RFC 3046
    CLIENT_ARCH = 93  # RFC 4578 §2.1
    CLIENT_NDI = 94  # RFC 4578 §2.2
    CLIENT_UUID = 97  # RFC 4578 §2.3
    END = 255


class RemoteProtocolError(errors.RemoteProtocolError):
    """The DHCP peer sent something we cannot use (the shared base: :mod:`orchestrator.protocols.errors`)."""


class MalformedPacket(RemoteProtocolError):
    """Structurally invalid: count it and drop it."""


def mac_str(chaddr: bytes) -> str:
    return chaddr[:6].hex(":")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "").replace("-", ""))


def ip_int(ip: str | IPv4Address) -> int:
    if isinstance(ip, str):
        parts = ip.split(".")
        if len(parts) == 4:
            # Unrolled (a lease's address is converted on every look-up of a known client).
            a, b, c, d = parts
            if (a.isdigit() and b.isdigit() and c.isdigit() and d.isdigit()
                    and len(a) <= 3 and len(b) <= 3 and len(c) <= 3 and len(d) <= 3):
                a_, b_, c_, d_ = int(a), int(b), int(c), int(d)
                if a_ <= 255 and b_ <= 255 and c_ <= 255 and d_ <= 255:
                    return (a_ << 24) | (b_ << 16) | (c_ << 8) | d_
        return int(IPv4Address(ip))  # raises ValueError with the reason
    return int(ip)


def ip_str(v: int) -> str:
    # Formatted by hand: ~3x cheaper than str(IPv4Address(v)) on the per-packet path.
    return f"{v >> 24 & 255}.{v >> 16 & 255}.{v >> 8 & 255}.{v & 255}"


@dataclass(slots=True)
class Packet:
    """One DHCP message. Addresses are ints (fast, hashable); see the helpers."""

    op: int = BOOTREQUEST
    htype: int = HTYPE_ETHER
    hlen: int = 6
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: int = 0
    yiaddr: int = 0
    siaddr: int = 0
    giaddr: int = 0
    chaddr: bytes = b"\x00" * 16
    sname: bytes = b""
    file: bytes = b""
    #: Options in order of first appearance; repeated options concatenated (RFC 3396).
    options: dict[int, bytes] = field(default_factory=dict)

    # -- convenience views -------------------------------------------------

    @property
    def mac(self) -> str:
        return mac_str(self.chaddr)

    @property
    def msg_type(self) -> MessageType | None:
        v = self.options.get(Opt.MESSAGE_TYPE)
        if v is None or len(v) != 1:
            return None
        try:
            return MessageType(v[0])
        except ValueError:
            return None

    def opt_ip(self, code: int) -> int | None:
        v = self.options.get(code)
        if v is None or len(v) != 4:
            return None
        return int.from_bytes(v, "big")

    @property
    def requested_ip(self) -> int | None:
        return self.opt_ip(Opt.REQUESTED_IP)

    @property
    def server_id(self) -> int | None:
        return self.opt_ip(Opt.SERVER_ID)

    @property
    def vendor_class(self) -> str | None:
        v = self.options.get(Opt.VENDOR_CLASS)
        return v.decode("ascii", "replace") if v is not None else None

    @property
    def user_class(self) -> bytes | None:
        return self.options.get(Opt.USER_CLASS)

    @property
    def client_arch(self) -> list[int]:
        """RFC 4578 §2.1: a list of 16-bit architecture types (0 = BIOS, 7/9 = x86-64 UEFI)."""
        v = self.options.get(Opt.CLIENT_ARCH, b"")
        return [int.from_bytes(v[i : i + 2], "big") for i in range(0, len(v) - 1, 2)]

    @property
    def max_message_size(self) -> int:
        v = self.options.get(Opt.MAX_MESSAGE_SIZE)
        if v is None or len(v) != 2:
            return MIN_MAX_MESSAGE_SIZE
        # RFC 2132 §9.10: minimum legal value 576; smaller values are ignored.
        return max(MIN_MAX_MESSAGE_SIZE, int.from_bytes(v, "big"))

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & FLAG_BROADCAST)

    @property
    def is_pxe(self) -> bool:
        """A PXE ROM (or iPXE): vendor class ``PXEClient...`` or any of options 93/94/97.

        Some firmware (seen in HP iLO and older Broadcom ROMs) omits option 60 on
        REQUEST but keeps 93/94/97, hence the second test.
        """
        vc = self.options.get(Opt.VENDOR_CLASS)
        if vc is not None and vc.startswith(b"PXEClient"):
            return True
        return any(c in self.options for c in (Opt.CLIENT_ARCH, Opt.CLIENT_NDI, Opt.CLIENT_UUID))

    @property
    def is_ipxe(self) -> bool:
        """iPXE sends user class ``iPXE`` -- raw, not in RFC 3004's length-prefixed form.

        Accept both shapes: raw ``b"iPXE"`` (iPXE) and ``b"\\x04iPXE"`` (RFC 3004).
        """
        uc = self.options.get(Opt.USER_CLASS)
        return uc is not None and (uc == b"iPXE" or uc == b"\x04iPXE")


# --------------------------------------------------------------------------- parse


def _parse_options(buf: bytes, start: int, end: int, out: dict[int, bytes], *, allow_overload: bool) -> int:
    """Parse options in ``buf[start:end]`` into ``out``; return the overload value (0 if none)."""
    i = start
    overload = 0
    while i < end:
        code = buf[i]
        if code == Opt.PAD:
            i += 1
            continue
        if code == Opt.END:
            return overload
        if i + 1 >= end:
            raise MalformedPacket(f"option {code} has no length byte")
        n = buf[i + 1]
        if i + 2 + n > end:
            raise MalformedPacket(f"option {code} length {n} runs past the end of the field")
        value = buf[i + 2 : i + 2 + n]
        if code == Opt.OVERLOAD:
            if not allow_overload:
                raise MalformedPacket("option 52 (overload) inside file/sname")
            if n != 1 or value[0] not in (1, 2, 3):
                raise MalformedPacket(f"option 52 (overload) value {value.hex()} is not 1, 2 or 3")
            overload = value[0]
        elif code in out:
            out[code] += value  # RFC 3396: concatenate
        else:
            out[code] = value
        i += 2 + n
    # No END option: tolerated (several ROMs pad to the end instead).
    return overload


def parse(data: bytes) -> Packet:
    """Parse one datagram. Raises :class:`MalformedPacket` for anything unusable."""
    if len(data) < MIN_PACKET:
        raise MalformedPacket(f"{len(data)} bytes is shorter than a DHCP header (240)")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, file) = HEADER.unpack_from(data)
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise MalformedPacket(f"op {op} is neither BOOTREQUEST nor BOOTREPLY")
    if hlen > 16 or (htype == HTYPE_ETHER and hlen != 6):
        raise MalformedPacket(f"hardware address length {hlen} for type {htype}")
    if data[236:240] != MAGIC_COOKIE:
        raise MalformedPacket("bad magic cookie (plain BOOTP is not served)")
    options: dict[int, bytes] = {}
    overload = _parse_options(data, 240, len(data), options, allow_overload=True)
    # RFC 2131 §4.1: options field, then 'file', then 'sname'.
    if overload & 1:
        _parse_options(data, 108, 236, options, allow_overload=False)
    if overload & 2:
        _parse_options(data, 44, 108, options, allow_overload=False)
    cid = options.get(Opt.CLIENT_ID)
    if cid is not None and len(cid) > MAX_CLIENT_ID:
        raise MalformedPacket(f"client identifier of {len(cid)} bytes (over {MAX_CLIENT_ID})")
    return Packet(
        op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr,
        b"" if overload & 2 else sname.rstrip(b"\x00"),
        b"" if overload & 1 else file.rstrip(b"\x00"),
        options,
    )


# --------------------------------------------------------------------------- encode


def _put_option(out: bytearray, code: int, value: bytes) -> None:
    # RFC 3396: a value over 255 bytes is split into several instances.
    if not value:
        out += bytes((code, 0))
        return
    for i in range(0, len(value), 255):
        chunk = value[i : i + 255]
        out += bytes((code, len(chunk)))
        out += chunk


_MESSAGE_TYPE = int(Opt.MESSAGE_TYPE)


def _put_part(parts: list[bytes], code: int, value: bytes) -> None:
    out = bytearray()
    _put_option(out, code, value)
    parts.append(bytes(out))


def encode(p: Packet) -> bytes:
    """Serialize; option 53 first (some ROMs insist), END, padded to 300 bytes."""
    parts = [
        HEADER.pack(
            p.op, p.htype, p.hlen, p.hops, p.xid, p.secs, p.flags,
            p.ciaddr, p.yiaddr, p.siaddr, p.giaddr,
            p.chaddr.ljust(16, b"\x00")[:16], p.sname[:64].ljust(64, b"\x00"), p.file[:128].ljust(128, b"\x00"),
        ),
        MAGIC_COOKIE,
    ]
    opts = p.options
    append = parts.append
    first = opts.get(_MESSAGE_TYPE)
    if first is not None:
        if len(first) == 1:
            append(b"\x35\x01")
            append(first)
        else:
            _put_part(parts, _MESSAGE_TYPE, first)
    for code, value in opts.items():
        if code == _MESSAGE_TYPE:
            continue
        n = len(value)
        if 0 < n <= 255:
            append(bytes((code, n)))
            append(value)
        else:
            _put_part(parts, code, value)  # empty, or over 255 bytes: RFC 3396 instances
    parts.append(b"\xff")  # END
    data = b"".join(parts)
    if len(data) < BOOTP_MIN_LEN:
        data += b"\x00" * (BOOTP_MIN_LEN - len(data))
    return data


def encode_suboptions(sub: dict[int, bytes]) -> bytes:
    """Encapsulated options (option 43), each code/len/value, END-terminated."""
    out = bytearray()
    for code, value in sub.items():
        out += bytes((code, len(value))) + value
    out.append(Opt.END)
    return bytes(out)


# --------------------------------------------------------------------------- host names


def sanitize_hostname(raw: bytes | None) -> str | None:
    """A client-sent host name as RFC 1123 labels, or None.

    Characters outside ``[A-Za-z0-9-]`` are dropped from each label; labels
    longer than 63 bytes or a result longer than 253 make the name unusable
    (None), as does an empty result. Only the first label is kept as the host
    name, the rest is a domain the client has no say over.
    """
    if not raw:
        return None
    text = raw.split(b"\x00", 1)[0].decode("ascii", "ignore")
    if len(text) > 253:
        return None
    label = text.split(".", 1)[0]
    if len(label) > 63:
        return None
    clean = "".join(c for c in label if c.isascii() and (c.isalnum() or c == "-")).strip("-")
    return clean.lower() or None
