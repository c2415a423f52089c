"""Structure-aware fuzz inputs for bootorch's input surfaces, deterministic from a seed.

Not a test module: ``tests/test_fuzz_surfaces.py`` sends these to a running
``bootorch serve``. Every generator takes a :class:`random.Random`, so a
failure is reproduced by the seed and the input's index; each input is plain
bytes (``repr`` of it is the reproducer a report prints).

The generators know the shape of what they fuzz and break it one piece at a
time, so most inputs get past the first length check and reach the code that
handles the content:

* :func:`dhcp_packet` -- a BOOTP header and option TLVs (RFC 2131 / 2132):
  PXE options 60/93/94/97/77 with hostile text, option overload (52) with
  options in ``file``/``sname``, long options split per RFC 3396, lengths that
  lie, missing END, random header fields and addresses;
* :func:`tftp_request`, :func:`tftp_transfer_packet` -- RRQ/WRQ with hostile
  names, modes and RFC 2347 options; ACK/DATA/ERROR/OACK garbage for a
  transfer's port;
* :func:`http_connection` -- pipelined HTTP/1.x requests with random methods,
  targets, versions, headers, ``Range`` values and bodies; some half-sent;
* :func:`control_request` -- control API request lines: random JSON, deep
  nesting, huge numbers, unicode escapes, wrong types, unknown ops, non-JSON,
  over-long and unterminated lines. :func:`control_may_act` is the guard that
  keeps every request harmless (see its docstring);
* :func:`log_line` -- mutations of the real daemon log lines in
  ``tests/fixtures/logs`` with hostile host names, vendor classes and file
  names, overlong, partial and non-UTF-8 lines.

:func:`raw_controls` is the check the tests apply to every output: the control
characters a terminal acts on must never appear raw.
"""

from __future__ import annotations

import ipaddress
import json
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "logs"

# --------------------------------------------------------------------------- hostile text

#: Pieces of text that have hurt terminals, rich, SQLite, JSON encoders and shell
#: hooks: ANSI CSI/OSC sequences (OSC 8 hyperlinks, OSC 52 clipboard writes), rich
#: markup, C0/C1 controls, DEL, bidi overrides, invalid UTF-8 (lone continuation
#: bytes, a truncated sequence, an encoded surrogate, a code point past U+10FFFF),
#: separators that some splitters treat as newlines, format strings and shell.
HOSTILE: tuple[bytes, ...] = (
    b"\x1b[2J\x1b[H",
    b"\x1b[31mRED\x1b[0m",
    b"\x1b]8;;http://evil.example/\x1b\\click\x1b]8;;\x1b\\",
    b"\x1b]8;;http://x\x07y\x1b]8;;\x07",
    b"\x1b]52;c;cm0gLXJmIH4K\x07",
    b"\x1b]0;title\x07",
    b"\x1bP+q544e\x1b\\",
    b"\x1b[6n",
    b"[/x]",
    b"[/]",
    b"[link=http://x]y[/link]",
    b"[bold red]alarm",
    b"[red",
    "\u202eevil\u202c".encode(),
    "\u2066x\u2069".encode(),
    "\u009b31m".encode(),  # C1 CSI, valid UTF-8
    "\u0085".encode(),  # C1 NEL
    b"\x9b31m",  # a raw C1 byte: not UTF-8
    b"\x00",
    b"\x7f",
    b"\r",
    b"\t",
    b"\x08\x08\x08",
    b"\x07",
    b"\xff\xfe",
    b"\xc3",
    b"\x80",
    b"\xed\xa0\x80",  # UTF-8 of the surrogate U+D800 (invalid)
    b"\xf4\x90\x80\x80",  # past U+10FFFF (invalid)
    "\u2028".encode(),
    "\ufeff".encode(),
    "\u200b".encode(),
    b"%s%n%x%d",
    b"{0}{__class__}",
    b"$(reboot)",
    b"`id`",
    b"'; DROP TABLE transitions; --",
    b"../../../etc/passwd",
    b"..\\..\\boot.ini",
    "\U0001f4a9\u00e9".encode(),
)

PRINTABLE = bytes(range(0x20, 0x7F))


def hostile_bytes(rng: random.Random, max_len: int = 200) -> bytes:
    """One to four hostile pieces mixed with printable text; rarely long."""
    parts: list[bytes] = []
    for _ in range(rng.randrange(1, 5)):
        r = rng.random()
        if r < 0.55:
            parts.append(rng.choice(HOSTILE))
        elif r < 0.8:
            parts.append(bytes(rng.choice(PRINTABLE) for _ in range(rng.randrange(0, 12))))
        elif r < 0.95:
            parts.append(rng.randbytes(rng.randrange(1, 8)))
        else:
            parts.append(bytes([rng.randrange(256)]) * rng.randrange(50, 400))
    out = b"".join(parts)
    return out[:max_len] if max_len else out


def hostile_str(rng: random.Random, max_len: int = 200) -> str:
    """:func:`hostile_bytes` as a str: invalid UTF-8 becomes lone surrogates (``surrogateescape``)."""
    return hostile_bytes(rng, max_len).decode("utf-8", "surrogateescape")


def with_bad_byte(rng: random.Random, name: bytes) -> bytes:
    """``name`` with one hostile piece inserted at a random place (or appended)."""
    i = rng.randrange(len(name) + 1)
    return name[:i] + rng.choice(HOSTILE) + name[i:]


# --------------------------------------------------------------------------- the output check

#: C0 controls except tab and newline, and DEL.
_C0 = frozenset(range(0x00, 0x09)) | frozenset(range(0x0B, 0x20)) | {0x7F}
_BAD_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")


def raw_controls(data: bytes | str, *, context: int = 40) -> list[str]:
    """Every raw control character in ``data``, each as ``repr`` of its surroundings.

    Bytes 0x00-0x08, 0x0B-0x1F and 0x7F (ESC included; tab and newline are line
    structure), and after UTF-8 decoding the C1 controls U+0080-U+009F. An empty
    list means the text is safe to show on a terminal as it is.
    """
    text = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
    found = []
    for m in _BAD_CHARS.finditer(text):
        a, b = max(0, m.start() - context), m.end() + context
        found.append(repr(text[a:b]))
    return found


def json_strings(value: Any) -> list[str]:
    """Every string (keys included) inside a decoded JSON value."""
    out: list[str] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                out.append(str(k))
                stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)
    return out


# --------------------------------------------------------------------------- mutation


def mutate_bytes(rng: random.Random, data: bytes, rounds: int | None = None) -> bytes:
    """Generic byte-level damage: flips, truncation, junk, duplication, NULs."""
    b = bytearray(data)
    for _ in range(rounds or rng.randrange(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1:
            del b[rng.randrange(len(b) + 1):]
        elif op == 2:
            b += rng.randbytes(rng.randrange(1, 64))
        elif op == 3 and b:
            i = rng.randrange(len(b))
            b[i:i] = b[i:i + rng.randrange(1, 32)]
        elif op == 4 and b:
            b.insert(rng.randrange(len(b)), 0)
        elif op == 5 and b:
            i = rng.randrange(len(b))
            b[i:i] = rng.choice(HOSTILE)
    return bytes(b)


# --------------------------------------------------------------------------- DHCP


@dataclass(frozen=True)
class DhcpTargets:
    """What the DHCP fuzzer may name: the plan's MACs and addresses it is allowed to use.

    ``addresses`` are IPv4 addresses the fuzzer may put in ciaddr/yiaddr/giaddr/
    option 50/54. They must all be on loopback: the server answers a request
    with ciaddr set by unicast to ciaddr and a relayed one to giaddr, so an
    address outside 127/8 would send datagrams out of this machine.
    """

    macs: tuple[bytes, ...]
    addresses: tuple[int, ...]
    server: int


def _ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def _option(code: int, value: bytes, rng: random.Random) -> bytes:
    """One option TLV; values over 255 bytes split into several (RFC 3396), or a length that lies."""
    if len(value) > 255 or (len(value) > 8 and rng.random() < 0.05):
        out = b""
        for i in range(0, len(value), 255 if rng.random() < 0.8 else rng.randrange(1, 255)):
            piece = value[i:i + 255]
            out += bytes([code, len(piece)]) + piece
        return out
    if rng.random() < 0.03:  # the length byte lies
        return bytes([code, rng.randrange(256)]) + value
    return bytes([code, len(value)]) + value


PXE_VENDOR = b"PXEClient:Arch:00000:UNDI:002001"


def _pxe_options(rng: random.Random) -> list[tuple[int, bytes]]:
    opts: list[tuple[int, bytes]] = []
    r = rng.random()
    if r < 0.5:
        opts.append((60, PXE_VENDOR))
    elif r < 0.75:
        opts.append((60, b"PXEClient:Arch:" + hostile_bytes(rng, 200)))
    elif r < 0.9:
        opts.append((60, hostile_bytes(rng, 600)))
    if rng.random() < 0.5:
        arch = rng.choice([0, 6, 7, 9, 10, 11, 16, 0xFFFF, rng.randrange(65536)])
        opts.append((93, struct.pack("!H", arch) if rng.random() < 0.85 else rng.randbytes(rng.choice([0, 1, 3, 4, 200]))))
    if rng.random() < 0.4:
        opts.append((94, b"\x01\x02\x01" if rng.random() < 0.8 else rng.randbytes(rng.choice([0, 1, 2, 4, 255]))))
    if rng.random() < 0.4:
        opts.append((97, b"\x00" + rng.randbytes(16) if rng.random() < 0.8 else rng.randbytes(rng.choice([0, 1, 16, 18, 255]))))
    if rng.random() < 0.4:
        r = rng.random()
        if r < 0.4:
            opts.append((77, b"iPXE"))
        elif r < 0.7:
            uc = hostile_bytes(rng, 250)
            opts.append((77, bytes([len(uc) & 0xFF]) + uc))  # RFC 3004 form, length may lie
        else:
            opts.append((77, hostile_bytes(rng, 500)))
    return opts


def dhcp_options(rng: random.Random, targets: DhcpTargets, *, pxe_port: bool = False) -> list[tuple[int, bytes]]:
    """Option TLVs for one request, as (code, value) pairs (order shuffled a little)."""
    opts: list[tuple[int, bytes]] = []
    if rng.random() < 0.93:
        mtype = rng.choice([1, 1, 3, 3, 8] if not pxe_port else [3, 3, 3, 1, 8])
        if rng.random() < 0.15:
            mtype = rng.choice([2, 4, 5, 6, 7, 0, 9, 18, 255, rng.randrange(256)])
        opts.append((53, bytes([mtype]) if rng.random() < 0.97 else rng.randbytes(rng.choice([0, 2, 5]))))
    opts += _pxe_options(rng)
    if rng.random() < 0.3:
        opts.append((12, hostile_bytes(rng, 255)))
    if rng.random() < 0.15:
        opts.append((81, bytes([rng.randrange(256), 0, 0]) + hostile_bytes(rng, 250)))
    if rng.random() < 0.3:
        ip = struct.pack("!I", rng.choice(targets.addresses))
        opts.append((50, ip if rng.random() < 0.9 else rng.randbytes(rng.choice([0, 3, 5]))))
    if rng.random() < 0.3:
        opts.append((54, struct.pack("!I", rng.choice([targets.server, rng.choice(targets.addresses)]))))
    if rng.random() < 0.3:
        cid = b"\x01" + rng.choice(targets.macs)
        opts.append((61, cid if rng.random() < 0.7 else rng.randbytes(rng.choice([0, 1, 7, 128, 129, 300]))))
    if rng.random() < 0.4:
        opts.append((55, bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))))
    if rng.random() < 0.2:
        opts.append((57, struct.pack("!H", rng.choice([0, 1, 575, 576, 1500, 65535])) if rng.random() < 0.9 else rng.randbytes(1)))
    if rng.random() < 0.15:
        subs = [hostile_bytes(rng, 60) for _ in range(rng.randrange(1, 4))]
        opts.append((82, b"".join(bytes([rng.randrange(1, 12), len(v)]) + v for v in subs)))
    if rng.random() < 0.1:
        opts.append((43, rng.randbytes(rng.randrange(0, 300))))
    for _ in range(rng.choice([0, 0, 0, 1, 2, 5])):
        opts.append((rng.randrange(1, 255), rng.randbytes(rng.randrange(0, 300))))
    if rng.random() < 0.05 and opts:
        opts.append(rng.choice(opts))  # a repeat: RFC 3396 concatenation
    if len(opts) > 2 and rng.random() < 0.3:
        head = opts[:1]
        rest = opts[1:]
        rng.shuffle(rest)
        opts = head + rest
    return opts


def dhcp_packet(rng: random.Random, targets: DhcpTargets, *, pxe_port: bool = False) -> bytes:
    """One BOOTREQUEST with mutated header fields and options (see the module docstring)."""
    op = 1 if rng.random() < 0.96 else rng.choice([0, 2, 3, 255])
    htype, hlen = (1, 6) if rng.random() < 0.93 else (rng.choice([0, 1, 6, 32]), rng.choice([0, 1, 7, 16, 17, 255]))
    mac = rng.choice(targets.macs) if rng.random() < 0.6 else rng.randbytes(6)
    chaddr = mac + (bytes(10) if rng.random() < 0.9 else rng.randbytes(10))

    def addr(p_zero: float) -> int:
        return 0 if rng.random() < p_zero else rng.choice(targets.addresses)

    ciaddr, yiaddr, siaddr = addr(0.75), addr(0.9), addr(0.9)
    giaddr = addr(0.85)
    flags = rng.choice([0, 0x8000, rng.randrange(65536)])
    sname, bootfile = bytes(64), bytes(128)
    opts = dhcp_options(rng, targets, pxe_port=pxe_port)
    overload = None
    if rng.random() < 0.08:
        # Option 52: more options in file (1), sname (2) or both (3); sometimes a bad value,
        # a 52 inside the overloaded field, or fields without an END.
        overload = rng.choice([1, 2, 3, 3, 0, 4, 255])
        extra = b"".join(_option(c, v, rng) for c, v in _pxe_options(rng))
        if rng.random() < 0.1:
            extra += b"\x34\x01\x03"
        if rng.random() < 0.8:
            extra += b"\xff"
        if overload in (1, 3):
            bootfile = (extra + bytes(128))[:128]
        if overload in (2, 3):
            sname = (extra + bytes(64))[:64]
    elif rng.random() < 0.1:
        sname = (hostile_bytes(rng, 64) + bytes(64))[:64]
        bootfile = (hostile_bytes(rng, 128) + bytes(128))[:128]
    header = struct.pack("!BBBBIHHIIII16s64s128s", op, htype, hlen, rng.choice([0, 0, 1, 16, 255]), rng.getrandbits(32),
                         rng.choice([0, 4, 65535]), flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, bootfile)
    cookie = b"\x63\x82\x53\x63" if rng.random() < 0.97 else rng.randbytes(4)
    body = b"".join(_option(c, v, rng) for c, v in opts)
    if overload is not None:
        body = _option(52, bytes([overload]), rng) + body
    if rng.random() < 0.2:
        body = b"\x00" * rng.randrange(1, 20) + body  # pads
    if rng.random() < 0.92:
        body += b"\xff"
    if rng.random() < 0.3:
        body += bytes(rng.randrange(0, 64))
    pkt = header + cookie + body
    r = rng.random()
    if r < 0.08:
        pkt = mutate_bytes(rng, pkt)
    elif r < 0.1:
        pkt = pkt[: rng.randrange(0, 260)]  # around the 240-byte minimum
    elif r < 0.105:
        pkt = pkt + rng.randbytes(rng.randrange(1000, 9000))  # oversized
    return pkt


def dhcp_probe(mac: bytes, xid: int, *, pxe_port: bool = False, ciaddr: int = 0) -> bytes:
    """A well-formed PXE DISCOVER (or, for the PXE port, a PXE REQUEST) from ``mac`` with ``xid``."""
    header = struct.pack("!BBBBIHHIIII16s64s128s", 1, 1, 6, 0, xid, 0, 0, ciaddr, 0, 0, 0, mac + bytes(10), bytes(64), bytes(128))
    opts = [(53, bytes([3 if pxe_port else 1])), (60, PXE_VENDOR), (93, b"\x00\x00"), (94, b"\x01\x02\x01"),
            (97, b"\x00" + bytes(range(16))), (55, bytes([1, 3, 43, 54, 60, 66, 67]))]
    body = b"".join(bytes([c, len(v)]) + v for c, v in opts) + b"\xff"
    return header + b"\x63\x82\x53\x63" + body


# --------------------------------------------------------------------------- TFTP

TFTP_OPTIONS = ("blksize", "tsize", "timeout", "windowsize", "BLKSIZE", "Timeout", "utimeout", "multicast", "rollover")
TFTP_VALUES = ("0", "1", "7", "8", "255", "256", "511", "512", "1468", "65464", "65465", "65535", "65536", "-1", "",
               "abc", "1e3", " 512", "0x200", "9" * 40, "9" * 5000)


def tftp_name(rng: random.Random, names: Sequence[bytes]) -> bytes:
    """A file name: a real one, one with a bad byte, traversal, long, or hostile."""
    r = rng.random()
    if r < 0.25:
        return rng.choice(names)
    if r < 0.55:
        return with_bad_byte(rng, rng.choice(tuple(names) + (b"pxelinux.cfg/default", b"ldlinux.c32", b"menu.c32", b"boot.ipxe",
                                                      b"ipxe/x.ipxe", b"pxelinux.cfg/01-52-54-00-77-00-01")))
    if r < 0.65:
        return rng.choice([b"../", b"/../", b"..\\", b"/", b"//", b"pxelinux.cfg/../../"]) * rng.randrange(1, 6) + rng.choice(names)
    if r < 0.72:
        return rng.choice(names) * rng.randrange(20, 200)  # long (up to the datagram's room)
    if r < 0.75:
        return b""
    return hostile_bytes(rng, 300).replace(b"\x00", b"")


def tftp_request(rng: random.Random, names: Sequence[bytes]) -> bytes:
    """An RRQ (mostly) or WRQ: name, mode and RFC 2347 options, then sometimes damaged."""
    opcode = 1 if rng.random() < 0.9 else 2
    name = tftp_name(rng, names)
    mode = rng.choice([b"octet", b"octet", b"netascii", b"NETASCII", b"mail", b"", b"octet\x1b[2J"])
    if rng.random() < 0.05:
        mode = hostile_bytes(rng, 40).replace(b"\x00", b"")
    opts = b""
    for _ in range(rng.choice([0, 0, 1, 2, 3, 5])):
        key = rng.choice(TFTP_OPTIONS).encode() if rng.random() < 0.85 else hostile_bytes(rng, 30).replace(b"\x00", b"")
        if key.lower() == b"timeout" and rng.random() < 0.5:
            val = b"255"
        else:
            val = rng.choice(TFTP_VALUES).encode() if rng.random() < 0.9 else hostile_bytes(rng, 30).replace(b"\x00", b"")
        opts += key + b"\0" + val + b"\0"
    pkt = struct.pack("!H", opcode) + name + b"\0" + mode + b"\0" + opts
    r = rng.random()
    if r < 0.1:
        pkt = mutate_bytes(rng, pkt)
    elif r < 0.13:
        pkt = pkt.rstrip(b"\0")  # the last field unterminated
    return pkt[:65000]


def tftp_transfer_packet(rng: random.Random) -> bytes:
    """What a client (or an attacker) could send to a transfer's port."""
    r = rng.random()
    if r < 0.55:
        pkt = struct.pack("!HH", 4, rng.choice([0, 1, 2, 3, 65535, rng.randrange(65536)]))
    elif r < 0.6:
        pkt = struct.pack("!HH", 5, rng.randrange(10)) + hostile_bytes(rng, 200) + b"\0"
    elif r < 0.75:
        pkt = struct.pack("!HH", 3, rng.randrange(65536)) + rng.randbytes(rng.randrange(0, 600))
    elif r < 0.8:
        pkt = struct.pack("!H", 6) + b"blksize\x00" + rng.choice(TFTP_VALUES).encode() + b"\0"
    elif r < 0.85:
        pkt = struct.pack("!H", 1) + b"pxelinux.0\0octet\0"
    else:
        pkt = rng.randbytes(rng.randrange(0, 40))
    if rng.random() < 0.15:
        pkt = mutate_bytes(rng, pkt)
    return pkt


def tftp_error(message: bytes = b"fuzz done") -> bytes:
    return struct.pack("!HH", 5, 0) + message + b"\0"


# --------------------------------------------------------------------------- HTTP

#: Methods h11 parses (tokens): the server answers 405 to the unknown ones and keeps the connection.
HTTP_TOKEN_METHODS = (b"GET", b"GET", b"GET", b"HEAD", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH",
                      b"get", b"FOO", b"M-SEARCH", b"X" * 300)
#: Request-line pieces that are not HTTP/1.1: the server answers 400/505 (or nothing) and closes.
HTTP_BAD_METHODS = (b"G\x1bET", b"", b"GET GET", b"\xff\xfe", b"PRI", b"[link=http://x]")
HTTP_BAD_VERSIONS = (b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1\x1b", b"HTTP/9.9", b"http/1.1", b"", b"HTTP/1.1 x", b"HTTP/1.")
#: Printable hostile text for targets and header values (what passes h11's syntax checks).
PRINTABLE_HOSTILE = (b"[/x]", b"[link=http://x]y[/link]", b"[bold red]alarm", b"\\x1b[2J", b"$(reboot)", b"%s%n", b"{0}",
                     b"'; DROP TABLE transitions; --", b"../../etc/passwd", b"\\u202e")


def _pct(rng: random.Random, raw: bytes, every: bool = False) -> bytes:
    """Percent-escape some bytes of ``raw``; all of them, and every byte outside the printable range, when ``every``."""
    return b"".join(b"%%%02X" % c if every or c <= 0x20 or c >= 0x7F or c in b"%#?" or rng.random() < 0.3 else bytes([c])
                    for c in raw)


def _utf8_hostile(rng: random.Random) -> bytes:
    """Hostile text that is valid UTF-8 (its controls and bidi included)."""
    return hostile_bytes(rng, 120).decode("utf-8", "ignore").encode()


def http_target(rng: random.Random, names: Sequence[bytes], *, keep: bool = True) -> bytes:
    """A request target; with ``keep`` one the server can decode (it answers and keeps the connection)."""
    name = rng.choice(names)
    if keep:
        r = rng.random()
        if r < 0.3:
            return b"/" + name
        if r < 0.55:
            return b"/" + _pct(rng, with_bad_byte(rng, name).decode("utf-8", "ignore").encode())  # controls, %-escaped
        if r < 0.65:
            up = rng.choice([b"%2e%2e/", b"..%2f", b"%2e%2e%5c", b"%00", b"%1b[2J", b"%e2%80%ae", b"%c2%9b"])
            return b"/" + up * rng.randrange(1, 4) + name
        if r < 0.72:
            return rng.choice([b"http://x/", b"https://127.0.0.1:1/", b"http://[::1]/"]) + name
        if r < 0.8:
            return b"/" + name + b"?" + _pct(rng, _utf8_hostile(rng)) + b"#" + _pct(rng, rng.choice(PRINTABLE_HOSTILE))
        if r < 0.85:
            return b"/" + b"a/" * rng.randrange(100, 3000)
        return b"/" + _pct(rng, rng.choice(PRINTABLE_HOSTILE) + name)
    r = rng.random()
    if r < 0.5:
        return b"/" + with_bad_byte(rng, name)  # raw control bytes, invalid UTF-8
    if r < 0.7:
        return b"/" + rng.choice([b"%ff", b"%c0%ae", b"%ed%a0%80", b"%", b"%zz", b"%e2%80"]) + name  # not UTF-8 once decoded
    if r < 0.85:
        return rng.choice([b"*", b"", b"x", b"//", b"http://[::1/"]) + name
    return b"/" + b"a" * rng.randrange(17000, 70000)  # over the header limit


def _header_value(rng: random.Random, *, keep: bool = True) -> bytes:
    if keep:
        r = rng.random()
        if r < 0.5:
            return bytes(rng.choice(PRINTABLE) for _ in range(rng.randrange(0, 40)))
        if r < 0.85:
            return rng.choice(PRINTABLE_HOSTILE) + _utf8_hostile(rng).translate(None, bytes(range(0x20)) + b"\x7f")
        return b"v" * rng.randrange(1000, 8000)
    return rng.choice([hostile_bytes(rng, 200).replace(b"\r\n", b""), b"v" * rng.randrange(17000, 30000), b"a\x00b", b"\x1b[2J"])


def _range_value(rng: random.Random) -> bytes:
    return rng.choice([
        b"bytes=0-99", b"bytes=-100", b"bytes=100-", b"bytes=5-1", b"bytes=0-0,1-1", b"bytes=99999999-",
        b"bytes=-0", b"bytes=" + b"9" * rng.choice([19, 40, 5000]) + b"-", b"bytes=-" + b"9" * 5000, b"bytes=a-b", b"bits=0-1",
        b"bytes=0-1" + b",0-1" * rng.randrange(1, 1000), b"bytes==", b"bytes=--1", b"bytes=[/x]", b"bytes= 1 - 2 ",
    ])


def http_request(rng: random.Random, names: Sequence[bytes], host: bytes, *, keep: bool = True) -> bytes:
    """One request. With ``keep`` it is well framed HTTP/1.1 with hostile content, which the
    server answers and keeps the connection for; without, it breaks the framing or the syntax
    (bad request line, version, header, length, body), which ends the connection."""
    method = rng.choice(HTTP_TOKEN_METHODS)
    target = http_target(rng, names, keep=True)
    version = b"HTTP/1.1"
    headers: list[bytes] = [b"Host: " + host] if rng.random() < 0.97 else []
    if rng.random() < 0.25:
        headers.append(b"Range: " + _range_value(rng))
        if rng.random() < 0.2:
            headers.append(b"If-Range: " + _header_value(rng))
    for _ in range(rng.choice([0, 0, 1, 2, 4])):
        name = rng.choice([b"User-Agent", b"Accept", b"X-" + bytes(rng.choice(PRINTABLE[33:58]) for _ in range(5)), b"Cookie",
                           b"Referer", b"X-Forwarded-For"])
        headers.append(name + b": " + _header_value(rng))
    body = b""
    if not keep:
        r = rng.random()
        if r < 0.2:
            method = rng.choice(HTTP_BAD_METHODS)
        elif r < 0.4:
            version = rng.choice(HTTP_BAD_VERSIONS)
        elif r < 0.6:
            target = http_target(rng, names, keep=False)
        elif r < 0.72:
            headers.append(rng.choice([b"Bad Name", b"X-\x1b", b"", b"X:Y"]) + b": " + _header_value(rng, keep=False))
        elif r < 0.76:
            headers.append(b"X-" + b"v" * 10 + b": " + _header_value(rng, keep=False))
        elif r < 0.8:
            headers += [b"X-Many: x"] * rng.randrange(500, 2000)
        elif r < 0.83:
            headers.append(b" folded continuation")
        elif r < 0.88:
            headers.append(b"Content-Length: " + rng.choice([b"-1", b"99999999999999999999", b"1, 2", b"abc", b"100000"]))
        elif r < 0.9:
            headers += [b"Content-Length: 3", b"Content-Length: 4"]
            body = b"abcd"
        elif r < 0.93:
            body = b"5\r\nhello\r\nzz\r\n" + hostile_bytes(rng, 100)
            headers.append(b"Transfer-Encoding: chunked")
        else:
            headers.append(b"Connection: close")
    elif rng.random() < 0.05:
        body = _utf8_hostile(rng)
        headers.append(b"Content-Length: " + str(len(body)).encode())
    elif rng.random() < 0.03:
        body = b"5\r\nhello\r\n0\r\n\r\n"
        headers.append(b"Transfer-Encoding: chunked")
    req = method + b" " + target + b" " + version + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body
    if not keep and rng.random() < 0.1:
        req = mutate_bytes(rng, req)
    return req


def http_connection(rng: random.Random, names: Sequence[bytes], host: bytes) -> list[bytes]:
    """Requests to pipeline on one connection: well-framed ones, then (often) one that ends it, sometimes cut short."""
    n = rng.choice([1, 2, 4, 8, 8, 16, 16, 24])
    reqs = [http_request(rng, names, host) for _ in range(n)]
    r = rng.random()
    if r < 0.5:
        reqs.append(http_request(rng, names, host, keep=False))
    elif r < 0.6:
        last = http_request(rng, names, host)
        reqs.append(last[: rng.randrange(1, max(2, len(last)))])  # half a request
    elif r < 0.62:
        reqs.append(rng.randbytes(rng.randrange(1, 3000)))  # garbage
    return reqs


# --------------------------------------------------------------------------- control API

ACTING_OPS = ("wake", "reboot", "power_off")
#: A node name no plan of the fuzz tests has.
NOT_A_NODE = "zz-not-a-node"
MAX_CONTROL_LINE = 65536


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.3:
        return rng.choice([None, True, False, 0, -1, 1.5, 10**30, -(10**30), 1e308, "", "x", hostile_str(rng, 60), [], {}])
    if r < 0.6:
        return hostile_str(rng, 120)
    if r < 0.8:
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {hostile_str(rng, 20): _json_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


_DEEP_PREFIXES = (b'{"op": "ping", "pad": ', b'{"op": "wake", "nodes": ["' + NOT_A_NODE.encode() + b'"], "pad": ', b"")
_NESTING = b'[]{}"a:1'


def _deep(rng: random.Random) -> bytes:
    depth = rng.choice([64, 500, 999, 1000, 1500, 5000, 20000, 32000, 100000])
    kind = rng.random()
    if kind < 0.5:
        inner = b"[" * depth + b"]" * depth
    elif kind < 0.8:
        inner = b'{"a":' * depth + b"1" + b"}" * depth
    else:
        inner = b"[" * depth  # never closed
    shape = rng.random()
    if shape < 0.4:
        return inner
    return rng.choice(_DEEP_PREFIXES[:2]) + inner + b"}"


def _huge_number(rng: random.Random) -> bytes:
    return rng.choice([b"9" * rng.choice([20, 4300, 4301, 10000, 60000]), b"1e999999", b"-1e-999999", b"NaN", b"Infinity",
                       b"-Infinity", b"1" + b"0" * 5000 + b".5", b"0." + b"1" * 20000])


def control_object(rng: random.Random, names: Sequence[str], token: str | None) -> dict[str, Any]:
    """A request object with each field right, wrong, hostile or missing."""
    obj: dict[str, Any] = {}
    r = rng.random()
    if r < 0.3:
        obj["op"] = "ping"
    elif r < 0.6:
        obj["op"] = rng.choice(ACTING_OPS)
    elif r < 0.75:
        obj["op"] = rng.choice(["Ping", "PING", "pong", "status", "shutdown", "power_on", "ping\x00", "wake ", "",
                                hostile_str(rng, 40)])
    elif r < 0.9:
        obj["op"] = _json_value(rng)
    if rng.random() < 0.7:
        r = rng.random()
        if r < 0.5:
            pool = list(names) + [NOT_A_NODE, "", "node", "node01 ", "NODE01", "node[01-04]", "@all", hostile_str(rng, 40)]
            obj["nodes"] = [rng.choice(pool) for _ in range(rng.choice([0, 1, 2, 3, 5, 50]))]
            if obj["nodes"] and rng.random() < 0.3:
                obj["nodes"] += obj["nodes"]  # duplicates
        elif r < 0.6:
            obj["nodes"] = [NOT_A_NODE] * rng.choice([1000, 5000])
        else:
            obj["nodes"] = _json_value(rng)
    for key in ("reason", "actor"):
        if rng.random() < 0.5:
            obj[key] = hostile_str(rng, 600) if rng.random() < 0.7 else _json_value(rng)
    for key in ("hard", "wait"):
        if rng.random() < 0.3:
            obj[key] = _json_value(rng)
    if rng.random() < 0.2:
        obj[hostile_str(rng, 30)] = _json_value(rng)
    if token is not None and rng.random() < 0.8:
        r = rng.random()
        wrong = [token + "x", token[:-1], token.upper(), "", None, 0, [token], hostile_str(rng, 40)]
        obj["token"] = token if r < 0.5 else rng.choice(wrong)
    return obj


def control_request(rng: random.Random, names: Sequence[str], token: str | None = None) -> tuple[bytes, bool]:
    """One request as sent on the wire, and whether it ends with a newline.

    Not every request is safe to send: see :func:`control_may_act`, which the
    sender must apply.
    """
    r = rng.random()
    if r < 0.55:
        obj = control_object(rng, names, token)
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.7)
        data = text.encode("utf-8", "surrogateescape")
        if rng.random() < 0.05:
            data = data.replace(b"{", b'{"op": "ping", ', 1)  # a duplicate key: json keeps the last
    elif r < 0.62:
        data = _deep(rng)
    elif r < 0.67:
        data = b'{"op": "ping", "n": ' + _huge_number(rng) + b"}"
    elif r < 0.72:
        # unicode escapes: lone surrogates, NUL, escapes of the op name itself
        data = rng.choice([b'{"op": "\\u0070ing"}', b'{"op": "ping\\u0000"}', b'{"op": "\\ud800"}', b'{"reason": "\\udc80\\u001b[2J"}',
                           b'{"op": "wake", "nodes": ["\\ud83d"]}', b'{"\\u0000": 1}', b'"\\u001b]8;;http://x\\u0007"',
                           b'{"op": "ping", "token": "\\ud800"}'])
    elif r < 0.8:
        data = rng.choice([b"", b"{", b"}", b"[]", b"null", b"1", b'"ping"', b"ping", b"{'op': 'ping'}",
                           b"\xef\xbb\xbf{\"op\": \"ping\"}", b"\xff\xfe{\x00}\x00", b"\x00" * 10,
                           b"GET / HTTP/1.1\r\nHost: x\r\n", b"SSH-2.0-x", b"{\"op\": \"ping\"}{}",
                           "{\"op\": \"ping\"}".encode("utf-16"), "{\"op\": \"ping\"}".encode("utf-32")])
    elif r < 0.85:
        data = hostile_bytes(rng, 2000).replace(b"\n", b"")
    elif r < 0.9:
        data = b'{"op": "ping", "reason": "' + b"x" * rng.choice([65530, 65536, 70000, 200000]) + b'"}'  # over-long
    else:
        data = mutate_bytes(rng, json.dumps(control_object(rng, names, token)).encode("utf-8", "surrogateescape"))
    newline = rng.random() < 0.9
    if newline and rng.random() < 0.05:
        data += b"\n" + b'{"op": "wake", "nodes": ["' + NOT_A_NODE.encode() + b'"]}'  # a second line: ignored
    return data, newline


def control_first_line(data: bytes, newline: bool) -> bytes | None:
    """The line the control server parses for this input, or None when it refuses the framing."""
    buf = data + (b"\n" if newline else b"")
    head = buf.split(b"\n", 1)[0]
    if b"\n" in buf:
        # The server reads 4 KiB chunks and gives up once it holds more than 64 KiB without a newline.
        nl = buf.index(b"\n")
        if nl >= MAX_CONTROL_LINE:
            return None
        return head
    return head if len(head) <= MAX_CONTROL_LINE and head else None


def control_may_act(data: bytes, newline: bool, names: Sequence[str]) -> bool:
    """Whether the server could take this request as a power action on real nodes.

    The guard is conservative: the line is parsed with :func:`json.loads`
    exactly as the server parses it; a request that parses to an object with an
    acting op and only known node names may act, and so may anything whose
    parse fails for another reason than :class:`ValueError` (a recursion limit
    that differs between two processes must not decide whether a node is
    powered off) unless its text cannot name an acting op.
    """
    line = control_first_line(data, newline)
    if line is None:
        return False
    try:
        req = json.loads(line)
    except ValueError:
        return False
    except Exception:  # RecursionError, MemoryError, ...: decide on the text
        # Harmless only in the shapes _deep() makes: nesting alone, or after a ping or
        # an unknown node; the nesting's alphabet cannot spell another key.
        for prefix in _DEEP_PREFIXES:
            if line.startswith(prefix) and not line[len(prefix):].strip(_NESTING):
                return False
        return True
    if not isinstance(req, dict):
        return False
    op = req.get("op")
    if not isinstance(op, str) or op not in ACTING_OPS:
        return False
    nodes = req.get("nodes")
    known = set(names)
    return isinstance(nodes, list) and bool(nodes) and all(isinstance(n, str) and n in known for n in nodes)


def make_harmless(data: bytes, newline: bool, names: Sequence[str]) -> bytes:
    """``data`` with its acting request turned into one that names an unknown node (refused by the server)."""
    line = control_first_line(data, newline) or b""
    try:
        req = json.loads(line)
    except Exception:
        return b'{"op": "ping"}'
    if isinstance(req, dict):
        nodes = req.get("nodes")
        req["nodes"] = (nodes if isinstance(nodes, list) else []) + [NOT_A_NODE]
        return json.dumps(req).encode("utf-8", "surrogateescape")
    return b'{"op": "ping"}'


# --------------------------------------------------------------------------- logs

LOG_KINDS = ("dnsmasq", "iscdhcpd", "tftp-hpa", "kea", "syslog")
_MAC_RE = re.compile(rb"\b[0-9a-fA-F]{1,2}(?::[0-9a-fA-F]{1,2}){5}\b")
_IP_RE = re.compile(rb"\b10\.88\.0\.\d{1,3}\b")
#: Places in real lines that carry client-chosen text.
_CLIENT_FIELDS = (
    re.compile(rb"(vendor class: )(.*)$"),
    re.compile(rb"(client provides name: )(.*)$"),
    re.compile(rb"(user class: )(.*)$"),
    re.compile(rb"(vendor-class )(.*)$"),
    re.compile(rb"(filename )(.*)$"),
    re.compile(rb"((?:sent|file|failed sending) )(\S+)"),
    re.compile(rb"(\()([^)]*)(\) via)"),
    re.compile(rb'(: ")(.*)(" \(string\))'),
    re.compile(rb"(VENDOR_CLASS_)(.*)$"),
    re.compile(rb"(Hostname option: )(.*)$"),
    re.compile(rb"(bootfile name: )(.*)$"),
)


def _fixture_lines() -> dict[str, list[bytes]]:
    dnsmasq = (FIXTURES / "dnsmasq.log").read_bytes().splitlines()
    isc_tftp = (FIXTURES / "iscdhcpd+tftp-hpa.log").read_bytes().splitlines()
    kea = (FIXTURES / "kea.log").read_bytes().splitlines()
    return {
        "dnsmasq": dnsmasq,
        "iscdhcpd": [ln for ln in isc_tftp if b"dhcpd[" in ln] or isc_tftp,
        "tftp-hpa": [ln for ln in isc_tftp if b"tftpd[" in ln] or isc_tftp,
        "kea": kea,
        "syslog": isc_tftp + dnsmasq,
    }


_LINES: dict[str, list[bytes]] | None = None


def fixture_lines(kind: str) -> list[bytes]:
    global _LINES
    if _LINES is None:
        _LINES = _fixture_lines()
    return _LINES[kind]


def log_line(rng: random.Random, kind: str, macs: Sequence[str], ips: Sequence[str]) -> bytes:
    """A hostile mutation of a real ``kind`` log line, with its newline (or, rarely, without: a partial line).

    MACs and IPs are replaced by ``macs``/``ips`` (the plan's nodes the fuzzer
    may move) or random ones; client-chosen fields get hostile text.
    """
    line = rng.choice(fixture_lines(kind))
    if rng.random() < 0.7:
        def mac(_: re.Match) -> bytes:
            return (rng.choice(macs) if rng.random() < 0.7 else ":".join(f"{rng.randrange(256):02x}" for _ in range(6))).encode()

        def ip(_: re.Match) -> bytes:
            return (rng.choice(ips) if rng.random() < 0.7 else "10." + ".".join(str(rng.randrange(256)) for _ in range(3))).encode()

        line = _IP_RE.sub(ip, _MAC_RE.sub(mac, line))
    for pat in _CLIENT_FIELDS:
        if rng.random() < 0.5:
            def field(m: re.Match) -> bytes:
                return m.group(1) + hostile_bytes(rng, 300).replace(b"\n", b"") + (m.group(3) if m.re.groups >= 3 else b"")

            line = pat.sub(field, line, count=1)
    r = rng.random()
    if r < 0.1:
        line = with_bad_byte(rng, line)
    elif r < 0.13:
        line = line + b"x" * rng.choice([17000, 70000])  # longer than the parsers' MAX_LINE
    elif r < 0.16:
        line = mutate_bytes(rng, line).replace(b"\n", b"")
    elif r < 0.18:
        line = line.replace(b"Nov 25", rng.choice([b"Feb 30", b"Xyz 99", b"Nov 25 99:99", b"Dec 31"]), 1)
        line = line.replace(b"2026-11-25", rng.choice([b"9999-99-99", b"0000-01-01", b"2026-02-30"]), 1)
    elif r < 0.2:
        msg = hostile_str(rng, 300)
        line = json.dumps({"__REALTIME_TIMESTAMP": rng.choice(["1764085000000000", "-1", "9" * 30, "x"]), "MESSAGE": msg,
                           "SYSLOG_IDENTIFIER": rng.choice(["dhcpd", "in.tftpd", "dnsmasq-dhcp", "kea-dhcp4"]), "_PID": "1"}).encode()
    elif r < 0.21:
        line = b"\x00" * rng.randrange(1, 100)
    if rng.random() < 0.03:
        return line  # a partial line: the next write continues it
    return line + (b"\r\n" if rng.random() < 0.03 else b"\n")
