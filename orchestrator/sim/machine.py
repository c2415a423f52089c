"""One simulated node, sans-IO: a PXE ROM, pxelinux and a booting kernel as a state machine.

Bytes and times in, effects out. Nothing here opens a socket or reads a clock;
:mod:`orchestrator.sim.runtime` feeds it datagrams and ``now`` (trio's clock)
and carries out the effects it returns (send a datagram, add an address, start
the SSH answer). The unit tests drive it with plain floats.

What it does, phase by phase (what a real node does on the wire):

==============  ==============================================================  =====================
phase           on the wire                                                     gives up (stuck) when
==============  ==============================================================  =====================
``off``         nothing; a magic packet or a power-on starts ``post``           --
``post``        nothing for ``post_delay`` (+ jitter): firmware self-test       --
``rom_dhcp``    DISCOVER / REQUEST with option 60 ``PXEClient:Arch:00000:       no OFFER/ACK after
                UNDI:002001``, 93, 94, 97, broadcast flag; retransmitted at     retransmits at
                4, 8, 16, 32 s (PXE 2.1)                                        4/8/16/32 s (PXE-E51)
``rom_tftp``    RRQ of the DHCP boot file (``tsize``, ``blksize 1456``),        ERROR, or no progress
                lock-step ACKs                                                  for 1+2+4+8 s
``pxelinux``    RRQ ``pxelinux.cfg/<uuid>``, ``01-<mac>``, hex IP and its       ERROR on the kernel or
                prefixes, ``default`` (file-not-found walks on); then the       initrd, or no progress
                KERNEL and each ``initrd=`` of the config (``blksize 1408``);   through pxelinux's
                re-ACKs on pxelinux's TimeoutTable (110 ms ... 14 s)            TimeoutTable (~131 s)
``kernel_boot`` nothing for ``kernel_delay``: the kernel unpacks and starts     --
``os_dhcp``     DISCOVER / REQUEST *without* the PXE class (``Linux             no lease after the
                ipconfig``): the kernel's ``ip=dhcp``                           kernel's 6 tries
``up``          TCP 22 on the leased address answers with SSH                   --
``gave_up``     nothing, until the power is cut (BMC off / cycle)               --
==============  ==============================================================  =====================

A node that gave up ignores magic packets (it is powered on: Wake-on-LAN only
starts a node in soft-off), exactly like the real thing: only a power cycle
brings it back. Timeouts count only the time without progress, as in the ROMs.
"""

from __future__ import annotations

import enum
import hashlib
import random
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from orchestrator.protocols import dhcp, tftp
from orchestrator.protocols.dhcp import MessageType, Opt
from orchestrator.protocols.pxelinux import CFG_DIR, lookup_names

#: PXE 2.1 §2.2.1: DHCPDISCOVER retransmitted at 4, 8, 16 and 32 s, then the ROM gives up (PXE-E51).
ROM_DHCP_TIMEOUTS = (4.0, 8.0, 16.0, 32.0)
#: A PXE ROM's TFTP (loader download): a few retries with doubling timeouts, then PXE-E32/E35.
ROM_TFTP_TIMEOUTS = (1.0, 2.0, 4.0, 8.0)
#: pxelinux's ``TimeoutTable`` (syslinux core/fs/pxe/pxe.c), in BIOS ticks of 55 ms: re-ACK
#: after each entry without new data; when the table runs out pxelinux gives up.
PXELINUX_TIMEOUTS = tuple(t * 0.055 for t in (
    2, 2, 3, 3, 4, 5, 6, 7, 9, 10, 12, 15, 18, 21, 26, 31, 37, 44,
    53, 64, 77, 92, 110, 132, 159, 191, 229, 255, 255, 255, 255))
#: Linux ipconfig (net/ipv4/ipconfig.c): 6 sends, the timeout growing ~1.5x from 2 s.
KERNEL_DHCP_TIMEOUTS = (2.0, 3.0, 4.5, 6.75, 10.1, 15.2)

PXE_VENDOR_CLASS = b"PXEClient:Arch:00000:UNDI:002001"
OS_VENDOR_CLASS = b"Linux ipconfig"
ROM_BLKSIZE = 1456
PXELINUX_BLKSIZE = 1408
TFTP_PORT = 69


class Phase(str, enum.Enum):
    OFF = "off"
    POST = "post"
    ROM_DHCP = "rom_dhcp"
    ROM_TFTP = "rom_tftp"
    PXELINUX = "pxelinux"
    KERNEL_BOOT = "kernel_boot"
    OS_DHCP = "os_dhcp"
    UP = "up"
    GAVE_UP = "gave_up"


# --------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class DhcpSend:
    """Broadcast ``data`` from port 68 to 255.255.255.255:67."""

    data: bytes


@dataclass(frozen=True, slots=True)
class TftpOpen:
    """A new transfer: a fresh socket (new TID) on ``src``, ``data`` (the RRQ) to ``server``:69."""

    data: bytes
    src: str
    server: str


@dataclass(frozen=True, slots=True)
class TftpSend:
    """``data`` to the transfer's peer (the pinned server TID; port 69 until one answered)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class TftpClose:
    pass


@dataclass(frozen=True, slots=True)
class AddAddress:
    ip: str


@dataclass(frozen=True, slots=True)
class RemoveAddress:
    ip: str


@dataclass(frozen=True, slots=True)
class SshUp:
    ip: str


@dataclass(frozen=True, slots=True)
class SshDown:
    pass


Effect = DhcpSend | TftpOpen | TftpSend | TftpClose | AddAddress | RemoveAddress | SshUp | SshDown


# --------------------------------------------------------------------------- configuration


@dataclass(slots=True)
class Timing:
    """Delays and retry schedules; the defaults are a real node's (but a short POST)."""

    post_delay: float = 2.0
    post_jitter: float = 0.5
    kernel_delay: float = 1.0
    ssh_delay: float = 0.5
    rom_dhcp: tuple[float, ...] = ROM_DHCP_TIMEOUTS
    rom_tftp: tuple[float, ...] = ROM_TFTP_TIMEOUTS
    pxelinux_tftp: tuple[float, ...] = PXELINUX_TIMEOUTS
    kernel_dhcp: tuple[float, ...] = KERNEL_DHCP_TIMEOUTS


@dataclass(slots=True)
class Faults:
    """Fault injection for tests."""

    #: The first N boots send no DHCP at all (a switch port still in STP listening):
    #: the ROM times out through its schedule and gives up.
    drop_dhcp_boots: int = 0
    #: The NIC ignores magic packets (Wake-on-LAN off in the BIOS).
    wol_disabled: bool = False


@dataclass(slots=True)
class Stats:
    boots: int = 0
    dhcp_timeouts: int = 0
    tftp_timeouts: int = 0
    duplicate_data: int = 0
    tftp_errors: int = 0
    files: int = 0
    bytes: int = 0
    dhcp_dropped: int = 0
    gave_up: int = 0
    gave_up_reasons: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- TFTP receive side


class _Xfer:
    """One lock-step TFTP read (RFC 1350 + 2347/2348/2349), counting bytes, keeping them only if asked."""

    __slots__ = ("filename", "schedule", "tries", "expect", "blksize", "asked_blksize", "bytes", "keep", "data",
                 "last", "deadline", "tsize", "started")

    def __init__(self, filename: str, blksize: int, schedule: tuple[float, ...], keep: bool, now: float) -> None:
        self.filename = filename
        self.asked_blksize = blksize
        self.blksize = 512
        self.schedule = schedule
        self.tries = 0
        self.expect = 1
        self.bytes = 0
        self.keep = keep
        self.data = bytearray() if keep else None
        self.tsize: int | None = None
        self.last = _rrq(filename, blksize)
        self.deadline = now + schedule[0]
        self.started = now


def _rrq(filename: str, blksize: int) -> bytes:
    """The RRQ a PXE ROM and pxelinux send: octet, tsize 0, their block size."""
    return tftp.encode_request(filename, "octet", {"tsize": 0, "blksize": blksize})


# --------------------------------------------------------------------------- the node


def node_uuid(mac: str) -> bytes:
    """A stable SMBIOS UUID per MAC (option 97 carries it; pxelinux asks for it first)."""
    return hashlib.sha256(b"bootorch-sim" + dhcp.mac_bytes(mac)).digest()[:16]


def uuid_str(u: bytes) -> str:
    h = u.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class NodeMachine:
    """One node. Inputs: :meth:`power_on`, :meth:`power_off`, :meth:`magic`, :meth:`dhcp_in`,
    :meth:`tftp_in`, :meth:`timer`; each returns a list of effects. Call :meth:`timer` when
    ``now >= next_deadline``.
    """

    def __init__(self, mac: str, *, timing: Timing | None = None, faults: Faults | None = None,
                 rng: random.Random | None = None, name: str = "") -> None:
        self.mac = mac.lower()
        self.name = name or self.mac
        self.chaddr = dhcp.mac_bytes(self.mac)
        self.uuid = node_uuid(self.mac)
        self.timing = timing or Timing()
        self.faults = faults or Faults()
        self.rng = rng or random.Random(int.from_bytes(self.chaddr, "big"))
        self.stats = Stats()
        self.phase = Phase.OFF
        self.next_deadline: float | None = None
        self.ip: str | None = None  # address on the wire (added to the interface)
        self.server: str | None = None
        self.xid = 0
        self._dhcp_msg: bytes | None = None
        self._dhcp_state = ""  # "selecting" | "requesting"
        self._dhcp_tries = 0
        self._dhcp_t0 = 0.0
        self._schedule: tuple[float, ...] = ()
        self._xfer: _Xfer | None = None
        self._queue: list[str] = []  # files still to fetch in this phase
        self._cfg_names: list[str] = []
        self.kernel: str | None = None
        self.initrds: list[str] = []
        self.history: list[tuple[float, str]] = []

    # -- helpers ----------------------------------------------------------------------

    def _enter(self, phase: Phase, now: float) -> None:
        self.phase = phase
        self.history.append((now, phase.value))

    def _give_up(self, now: float, reason: str, out: list[Effect]) -> list[Effect]:
        self.stats.gave_up += 1
        self.stats.gave_up_reasons.append(reason)
        self._enter(Phase.GAVE_UP, now)
        self.next_deadline = None
        if self._xfer is not None:
            self._xfer = None
            out.append(TftpClose())
        return out

    @property
    def gave_up(self) -> bool:
        return self.phase is Phase.GAVE_UP

    @property
    def powered(self) -> bool:
        return self.phase is not Phase.OFF

    # -- power ------------------------------------------------------------------------

    def power_on(self, now: float) -> list[Effect]:
        if self.phase is not Phase.OFF:
            return []
        self.stats.boots += 1
        self._enter(Phase.POST, now)
        t = self.timing
        self.next_deadline = now + t.post_delay + (self.rng.uniform(0, t.post_jitter) if t.post_jitter else 0.0)
        return []

    def magic(self, now: float) -> list[Effect]:
        """A magic packet for our MAC: starts the node only from soft-off, and only with WoL enabled."""
        if self.faults.wol_disabled:
            return []
        return self.power_on(now)

    def power_off(self, now: float) -> list[Effect]:
        if self.phase is Phase.OFF:
            return []
        out: list[Effect] = []
        if self._xfer is not None:
            out.append(TftpClose())
        if self.phase is Phase.UP:
            out.append(SshDown())
        if self.ip is not None:
            out.append(RemoveAddress(self.ip))
        self._xfer = None
        self.ip = None
        self.next_deadline = None
        self._enter(Phase.OFF, now)
        return out

    def cycle(self, now: float) -> list[Effect]:
        return self.power_off(now) + self.power_on(now)

    # -- timers -----------------------------------------------------------------------

    def timer(self, now: float) -> list[Effect]:
        if self.next_deadline is None or now < self.next_deadline:
            return []
        ph = self.phase
        out: list[Effect] = []
        if ph is Phase.POST:
            self._enter(Phase.ROM_DHCP, now)
            return self._discover(now, out)
        if ph is Phase.KERNEL_BOOT:
            self._enter(Phase.OS_DHCP, now)
            return self._discover(now, out)
        if ph in (Phase.ROM_DHCP, Phase.OS_DHCP):
            self.stats.dhcp_timeouts += 1
            self._dhcp_tries += 1
            if self._dhcp_tries >= len(self._schedule):
                what = "PXE-E51: no DHCP offers" if ph is Phase.ROM_DHCP else "IP-Config: no DHCP answer"
                return self._give_up(now, what, out)
            if self._dhcp_state == "requesting" and self._dhcp_tries >= 2:
                # No ACK to two REQUESTs: back to DISCOVER (RFC 2131 §4.4.1 lets a client restart).
                return self._discover(now, out, restart=False)
            self.next_deadline = now + self._schedule[self._dhcp_tries]
            return self._send_dhcp(self._dhcp_msg, out)
        if ph in (Phase.ROM_TFTP, Phase.PXELINUX) and self._xfer is not None:
            x = self._xfer
            self.stats.tftp_timeouts += 1
            x.tries += 1
            if x.tries >= len(x.schedule):
                return self._give_up(now, f"TFTP timeout on {x.filename} after {now - x.started:.1f}s", out)
            x.deadline = now + x.schedule[x.tries]
            self.next_deadline = x.deadline
            out.append(TftpSend(x.last))
            return out
        if ph is Phase.UP and self.next_deadline is not None:
            self.next_deadline = None
            assert self.ip is not None
            out.append(SshUp(self.ip))
            return out
        return out

    # -- DHCP -------------------------------------------------------------------------

    def _pxe(self) -> bool:
        return self.phase is Phase.ROM_DHCP

    def _base_options(self, mtype: MessageType) -> dict[int, bytes]:
        opts: dict[int, bytes] = {Opt.MESSAGE_TYPE: bytes([mtype])}
        if self._pxe():
            opts[Opt.MAX_MESSAGE_SIZE] = (1260).to_bytes(2, "big")
            opts[Opt.PARAM_REQUEST] = bytes([1, 2, 3, 4, 5, 6, 11, 12, 13, 15, 16, 17, 18, 22, 23, 28, 40, 41, 42,
                                              43, 50, 51, 54, 58, 59, 60, 66, 67, 128, 129, 130, 131, 132, 133, 134, 135])
            opts[Opt.CLIENT_ARCH] = b"\x00\x00"
            opts[Opt.CLIENT_NDI] = b"\x01\x02\x01"
            opts[Opt.CLIENT_UUID] = b"\x00" + self.uuid
            opts[Opt.VENDOR_CLASS] = PXE_VENDOR_CLASS
        else:
            opts[Opt.PARAM_REQUEST] = bytes([1, 3, 6, 12, 15, 17, 26, 28, 42])
            opts[Opt.VENDOR_CLASS] = OS_VENDOR_CLASS
        return opts

    def _packet(self, opts: dict[int, bytes], secs: int) -> bytes:
        return dhcp.encode(dhcp.Packet(xid=self.xid, secs=secs, flags=dhcp.FLAG_BROADCAST,
                                       chaddr=self.chaddr, options=opts))

    def _discover(self, now: float, out: list[Effect], restart: bool = True) -> list[Effect]:
        if restart:
            self._dhcp_tries = 0
            self._schedule = self.timing.rom_dhcp if self._pxe() else self.timing.kernel_dhcp
            self._dhcp_t0 = now
        self.xid = self.rng.getrandbits(32)
        self._dhcp_state = "selecting"
        self._dhcp_msg = self._packet(self._base_options(MessageType.DISCOVER), int(now - self._dhcp_t0))
        self.next_deadline = now + self._schedule[self._dhcp_tries]
        return self._send_dhcp(self._dhcp_msg, out)

    def _send_dhcp(self, data: bytes | None, out: list[Effect]) -> list[Effect]:
        if data is None:
            return out
        if self.stats.boots <= self.faults.drop_dhcp_boots:
            self.stats.dhcp_dropped += 1
            return out
        out.append(DhcpSend(data))
        return out

    def dhcp_in(self, pkt: dhcp.Packet, now: float) -> list[Effect]:
        """A DHCP reply heard on port 68 (the runtime demultiplexes by chaddr)."""
        if self.phase not in (Phase.ROM_DHCP, Phase.OS_DHCP) or pkt.op != dhcp.BOOTREPLY:
            return []
        if pkt.xid != self.xid or pkt.chaddr[:6] != self.chaddr:
            return []
        mtype = pkt.msg_type
        out: list[Effect] = []
        if self.stats.boots <= self.faults.drop_dhcp_boots:
            return out  # nothing we sent got out, so nothing can be for us (defensive)
        if self._dhcp_state == "selecting" and mtype is MessageType.OFFER and pkt.yiaddr:
            server_id = pkt.server_id
            opts = self._base_options(MessageType.REQUEST)
            opts[Opt.REQUESTED_IP] = pkt.yiaddr.to_bytes(4, "big")
            if server_id is not None:
                opts[Opt.SERVER_ID] = server_id.to_bytes(4, "big")
            self._dhcp_state = "requesting"
            self._dhcp_msg = self._packet(opts, int(now - self._dhcp_t0))
            self.next_deadline = now + self._schedule[self._dhcp_tries]
            return self._send_dhcp(self._dhcp_msg, out)
        if self._dhcp_state == "requesting" and mtype is MessageType.ACK:
            return self._bound(pkt, now, out)
        if self._dhcp_state == "requesting" and mtype is MessageType.NAK:
            return self._discover(now, out, restart=False)
        return out

    def _bound(self, pkt: dhcp.Packet, now: float, out: list[Effect]) -> list[Effect]:
        ip = dhcp.ip_str(pkt.yiaddr)
        if self.ip != ip:
            if self.ip is not None:
                out.append(RemoveAddress(self.ip))
            self.ip = ip
            out.append(AddAddress(ip))
        self._dhcp_msg = None
        if self.phase is Phase.OS_DHCP:
            self._enter(Phase.UP, now)
            self.next_deadline = now + self.timing.ssh_delay
            return out
        # The ROM: next-server (siaddr, else option 66) and the boot file (file, else option 67).
        server = pkt.siaddr or None
        if server is None:
            tftp_opt = pkt.options.get(Opt.TFTP_SERVER)
            if tftp_opt:
                try:
                    server = int(IPv4Address(tftp_opt.rstrip(b"\x00").decode()))
                except ValueError:
                    server = None
        if server is None:
            server = pkt.server_id
        bootfile = pkt.file.decode(errors="replace") or (pkt.options.get(Opt.BOOTFILE) or b"").rstrip(b"\x00").decode(errors="replace")
        if not bootfile or server is None:
            return self._give_up(now, "PXE-E53: no boot filename received", out)
        self.server = dhcp.ip_str(server)
        self._enter(Phase.ROM_TFTP, now)
        return self._fetch(bootfile, now, out)

    # -- TFTP -------------------------------------------------------------------------

    def _fetch(self, filename: str, now: float, out: list[Effect], *, keep: bool = False) -> list[Effect]:
        rom = self.phase is Phase.ROM_TFTP
        x = _Xfer(filename, ROM_BLKSIZE if rom else PXELINUX_BLKSIZE,
                  self.timing.rom_tftp if rom else self.timing.pxelinux_tftp, keep, now)
        self._xfer = x
        self.next_deadline = x.deadline
        assert self.ip is not None and self.server is not None
        out.append(TftpOpen(x.last, self.ip, self.server))
        return out

    def tftp_in(self, data: bytes, now: float) -> list[Effect]:
        """A datagram from the current transfer's server TID."""
        x = self._xfer
        if x is None or len(data) < 4:
            return []
        op = (data[0] << 8) | data[1]
        if op == 3:  # DATA
            block = (data[2] << 8) | data[3]
            if block == x.expect & 0xFFFF:
                n = len(data) - 4
                x.bytes += n
                if x.keep:
                    x.data += data[4:]
                x.last = tftp.encode_ack(block)
                x.expect += 1
                x.tries = 0
                x.deadline = now + x.schedule[0]
                self.next_deadline = x.deadline
                if n < x.blksize:
                    return self._done(x, now, [TftpSend(x.last)])
                return [TftpSend(x.last)]
            if block == (x.expect - 1) & 0xFFFF:
                # The server resent the block we ACKed: our ACK was lost (or is late). ACK it again.
                self.stats.duplicate_data += 1
                return [TftpSend(x.last)]
            return []
        if op == 6:  # OACK
            if x.expect != 1 or x.last[:2] != b"\x00\x01":
                return [TftpSend(x.last)] if x.expect == 1 else []
            try:
                opts = tftp.parse_packet(data).options  # type: ignore[union-attr]
                x.blksize = int(opts.get("blksize", "512"))
                if "tsize" in opts:
                    x.tsize = int(opts["tsize"])
            except (ValueError, tftp.RemoteProtocolError):
                return self._give_up(now, f"bad OACK for {x.filename}", [TftpClose()])
            x.last = tftp.encode_ack(0)
            x.tries = 0
            x.deadline = now + x.schedule[0]
            self.next_deadline = x.deadline
            return [TftpSend(x.last)]
        if op == 5:  # ERROR
            code = (data[2] << 8) | data[3]
            self.stats.tftp_errors += 1
            return self._error(x, code, data[4:].split(b"\x00", 1)[0].decode(errors="replace"), now)
        return []

    def _error(self, x: _Xfer, code: int, message: str, now: float) -> list[Effect]:
        out: list[Effect] = [TftpClose()]
        self._xfer = None
        if self.phase is Phase.PXELINUX and x.keep and code == 1:
            return self._next_config(now, out)  # file not found: the next name
        return self._give_up(now, f"TFTP error {code} on {x.filename}: {message}", out)

    def _done(self, x: _Xfer, now: float, out: list[Effect]) -> list[Effect]:
        out.append(TftpClose())
        self._xfer = None
        self.stats.files += 1
        self.stats.bytes += x.bytes
        if self.phase is Phase.ROM_TFTP:
            self._enter(Phase.PXELINUX, now)
            self._cfg_names = lookup_names(self.mac, self.ip, uuid_str(self.uuid))
            return self._next_config(now, out)
        if x.keep:  # a pxelinux.cfg/ file: what to boot
            self._cfg_names = []
            assert x.data is not None
            kernel, initrds = parse_pxelinux_config(bytes(x.data))
            if kernel is None:
                return self._give_up(now, f"no KERNEL in {x.filename}", out)
            self.kernel, self.initrds = kernel, initrds
            self._queue = [kernel, *initrds]
        if self._queue:
            return self._fetch(self._queue.pop(0), now, out)
        self._enter(Phase.KERNEL_BOOT, now)
        self.next_deadline = now + self.timing.kernel_delay
        return out

    def _next_config(self, now: float, out: list[Effect]) -> list[Effect]:
        if not self._cfg_names:
            return self._give_up(now, "no pxelinux config found", out)
        name = self._cfg_names.pop(0)
        return self._fetch(f"{CFG_DIR}/{name}", now, out, keep=True)


def parse_pxelinux_config(text: bytes) -> tuple[str | None, list[str]]:
    """KERNEL and initrd= of the DEFAULT label (else the first LABEL) of a pxelinux config."""
    labels: dict[str, dict[str, str]] = {}
    default = None
    cur: dict[str, str] | None = None
    first = None
    for raw in text.decode(errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, rest = line.partition(" ")
        key = key.upper()
        rest = rest.strip()
        if key == "DEFAULT":
            default = rest.split()[0] if rest else None
        elif key == "LABEL":
            cur = labels.setdefault(rest, {})
            first = first or rest
        elif cur is not None and key in ("KERNEL", "LINUX", "APPEND", "INITRD"):
            cur[key] = rest
    entry = labels.get(default or "") or (labels.get(first) if first else None)
    if not entry:
        return None, []
    kernel = (entry.get("KERNEL") or entry.get("LINUX") or "").split() or [None]
    initrds: list[str] = []
    if entry.get("INITRD"):
        initrds += entry["INITRD"].split(",")
    for word in entry.get("APPEND", "").split():
        if word.startswith("initrd="):
            initrds += [f for f in word[len("initrd="):].split(",") if f]
    return kernel[0], initrds
