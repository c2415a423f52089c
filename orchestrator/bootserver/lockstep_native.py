"""Load the native transfer loop (``_lockstep.c``) and drive one transfer with it.

The loop answers the ACK that ends a window (a window of one block in
lock-step) with the next window, and hands everything else back.

Why ctypes and a plain shared library rather than a CPython extension module:
the C side needs nothing from Python (no objects, no GIL -- ctypes drops the GIL
for the whole call), so it is plain C against libc, built by the package's
build hook (``hatch_build.py``) with the system C compiler, and it does not
depend on the Python version's ABI. One ctypes call covers a whole time slice
(:data:`SLICE` seconds, thousands of blocks), so the call's own cost is spread
over thousands of blocks.

The library is optional. Without it (no C compiler at install time, or
``BOOTORCH_TFTP_NATIVE=0``) :data:`AVAILABLE` is False and the engine's Python
lock-step path runs; behaviour is identical, only the CPU per block differs
(see ``docs/benchmarks.md``). ``BOOTORCH_TFTP_SPIN_US`` (or ``bootorch tftpd
--spin-us``) caps how long the loop polls without blocking before it sleeps in
``recvfrom`` (default :data:`SPIN_US_DEFAULT`; 0 turns polling off).
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
from pathlib import Path

from orchestrator.protocols import tftp as proto

__all__ = ["AVAILABLE", "Driver", "HANDOFF", "NODATA", "SLICE", "SLICE_CODE", "why_unavailable"]

log = logging.getLogger("orchestrator.bootserver.tftp")

_ABI = 4  # keep in step with BT_ABI in _lockstep.c
SLICE_CODE, HANDOFF, NODATA = 0, 1, 2
#: Seconds a call may run before it returns so the engine can flush counters.
SLICE = 0.1
#: Default cap on the busy-poll before a blocking receive, in microseconds (0 =
#: block at once); the poll itself lasts about as long as the client's measured
#: answer time (see _lockstep.c).
SPIN_US_DEFAULT = 300
#: Read-ahead per transfer, as in the Python core (READ_AHEAD), rounded to blocks.
_READ_AHEAD = proto.READ_AHEAD


class _LoopState(ctypes.Structure):
    """The loop's state and results: field for field the C struct bt_lockstep (natural alignment on both sides)."""

    _fields_ = [
        ("sock", ctypes.c_int32),
        ("filefd", ctypes.c_int32),
        ("blksize", ctypes.c_uint32),
        ("peerlen", ctypes.c_uint32),
        ("windowsize", ctypes.c_uint32),
        ("gso", ctypes.c_int32),
        ("size", ctypes.c_uint64),
        ("last_block", ctypes.c_uint64),
        ("timeout_ns", ctypes.c_int64),
        ("slice_ns", ctypes.c_int64),
        ("spin_ns", ctypes.c_int64),
        ("peer", ctypes.c_uint8 * 128),
        ("buf", ctypes.c_void_p),
        ("buf_cap", ctypes.c_uint64),
        ("sendbuf", ctypes.c_void_p),
        ("sendbuf_cap", ctypes.c_uint64),
        ("buf_off", ctypes.c_uint64),
        ("buf_len", ctypes.c_uint64),
        ("acked", ctypes.c_uint64),
        ("high", ctypes.c_uint64),
        ("deadline_ns", ctypes.c_int64),
        ("sent_at_ns", ctypes.c_int64),
        ("rtt_ewma_ns", ctypes.c_int64),
        ("spin_miss", ctypes.c_uint32),
        ("spin_skip", ctypes.c_uint32),
        ("acks_in", ctypes.c_uint64),
        ("blocks_out", ctypes.c_uint64),
        ("bytes_out", ctypes.c_uint64),
        ("rtt_sum_ns", ctypes.c_int64),
        ("rtt_n", ctypes.c_uint64),
        ("err", ctypes.c_int32),
        ("datalen", ctypes.c_int32),
        ("srclen", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("src", ctypes.c_uint8 * 128),
        ("data", ctypes.c_uint8 * 1024),
    ]


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("BOOTORCH_TFTP_NATIVE", "1") == "0":
        return None, "disabled by BOOTORCH_TFTP_NATIVE=0"
    path = Path(__file__).with_name("_lockstep.so")
    if not path.exists():
        return None, f"{path.name} was not built (no C compiler when the package was installed?)"
    try:
        lib = ctypes.CDLL(str(path))
        lib.bt_lockstep_abi.restype = ctypes.c_int
        lib.bt_lockstep_size.restype = ctypes.c_size_t
        lib.bt_lockstep_run.argtypes = [ctypes.POINTER(_LoopState)]
        lib.bt_lockstep_run.restype = ctypes.c_int
    except (OSError, AttributeError) as e:
        return None, f"cannot load {path}: {e}"
    if lib.bt_lockstep_abi() != _ABI or lib.bt_lockstep_size() != ctypes.sizeof(_LoopState):
        return None, f"{path.name} is from another version (ABI or struct size differs): reinstall"
    return lib, ""


_lib, _why = _load()
AVAILABLE = _lib is not None


def why_unavailable() -> str:
    """Why the native loop is not used ("" when it is)."""
    return _why


def _spin_from_env() -> float:
    try:
        return max(0.0, float(os.environ.get("BOOTORCH_TFTP_SPIN_US", SPIN_US_DEFAULT)))
    except ValueError:
        return float(SPIN_US_DEFAULT)


#: The spin cap in microseconds for transfers started from now on (``bootorch tftpd --spin-us``).
spin_us = _spin_from_env()


def _sockaddr(addr: tuple, family: socket.AddressFamily) -> bytes:
    """The C ``struct sockaddr_in``/``sockaddr_in6`` for a Python socket address."""
    if family == socket.AF_INET:
        return struct.pack("=H", socket.AF_INET) + struct.pack("!H", addr[1]) + socket.inet_pton(socket.AF_INET, addr[0]) + bytes(8)
    host = addr[0].split("%", 1)[0]
    flow = addr[2] if len(addr) > 2 else 0
    scope = addr[3] if len(addr) > 3 else 0
    return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", addr[1], flow)
            + socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", scope))


class Driver:
    """One transfer's native loop: build with :meth:`for_transfer`; then, per call, :meth:`load` (lock held),
    :meth:`run` (no lock), :meth:`store` (lock held) and, after a HANDOFF, :meth:`handed_off`.

    What the loop hands back (and a receive timeout) goes to the engine's one
    datagram handler, as a datagram from ``recvfrom`` would.
    """

    __slots__ = ("loop_state", "_buf", "_sendbuf", "core")

    def __init__(self, core: proto.ReadTransfer, sock: socket.socket, addr: tuple, fd: int) -> None:
        st = _LoopState()
        bs = core.blksize
        cap = max(_READ_AHEAD // bs, core.windowsize) * bs
        self._buf = ctypes.create_string_buffer(cap)
        # One GSO batch (at most 64 segments under 65 000 bytes, as in the engine).
        scap = 65000 if core.windowsize > 1 else 0
        self._sendbuf = ctypes.create_string_buffer(max(scap, 1))
        self.core = core
        st.sock = sock.fileno()
        st.filefd = fd
        st.blksize = bs
        st.windowsize = core.windowsize
        st.gso = 1
        peer = _sockaddr(addr, sock.family)
        st.peerlen = len(peer)
        ctypes.memmove(st.peer, peer, len(peer))
        st.size = core.size
        st.last_block = core.last_block
        st.timeout_ns = int(core.timeout * 1e9)
        st.slice_ns = int(SLICE * 1e9)
        st.spin_ns = int(spin_us * 1000)
        st.buf = ctypes.cast(self._buf, ctypes.c_void_p)
        st.buf_cap = cap
        st.buf_off = st.buf_len = 0
        st.sendbuf = ctypes.cast(self._sendbuf, ctypes.c_void_p)
        st.sendbuf_cap = scap
        #: What the C loop reads and writes (``struct bt_lockstep``): shared with it during :meth:`run`.
        self.loop_state = st

    @classmethod
    def for_transfer(cls, core: proto.ReadTransfer, sock: socket.socket, addr: tuple) -> "Driver | None":
        """A driver when the library is loaded and the transfer can use it (octet, a file on disk), else None."""
        if _lib is None or core.mode != "octet" or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        if sock.family == socket.AF_INET6 and "%" in addr[0]:
            return None  # a scoped (link-local) peer: Python compares the "%zone" text form
        fd = getattr(core.source, "fd", None)
        if not isinstance(fd, int) or fd < 0:
            return None  # dynamic (in-memory) files are a few hundred bytes: Python serves them
        return cls(core, sock, addr, fd)

    def load(self) -> None:
        """Copy the core's state in (lock held, ``core.forwardable()``)."""
        st, core = self.loop_state, self.core
        st.acked = core.acked
        st.high = core.high
        # The RTO in force (adaptive: it follows the round trip between calls; ``fast_forward`` counts from it).
        st.timeout_ns = int(core.timeout * 1e9)
        st.deadline_ns = int((core.next_deadline or 0.0) * 1e9)
        sent = core.sent_at
        st.sent_at_ns = -1 if sent is None else int(sent * 1e9)

    def run(self) -> int:
        """The loop itself; call WITHOUT the engine lock. Returns SLICE_CODE, HANDOFF or NODATA."""
        assert _lib is not None
        return _lib.bt_lockstep_run(ctypes.byref(self.loop_state))

    def store(self) -> tuple[int, int, int]:
        """Copy the state back into the core (lock held); returns (acks in, blocks out, bytes out)."""
        st = self.loop_state
        if st.acks_in:
            self.core.fast_forward(
                st.acked,
                None if st.sent_at_ns < 0 else st.sent_at_ns / 1e9,
                st.deadline_ns / 1e9,
                st.rtt_sum_ns / 1e9,
                st.rtt_n,
            )
        return st.acks_in, st.blocks_out, st.bytes_out

    def handed_off(self) -> tuple[bytes, tuple]:
        """The datagram of a HANDOFF return and its source address."""
        st = self.loop_state
        data = bytes(st.data[: max(0, min(st.datalen, len(st.data)))])
        raw = bytes(st.src[: st.srclen])
        family = struct.unpack_from("=H", raw)[0] if len(raw) >= 2 else 0
        if family == socket.AF_INET and len(raw) >= 8:
            src: tuple = (socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack_from("!H", raw, 2)[0])
        elif family == socket.AF_INET6 and len(raw) >= 28:
            port, flow = struct.unpack_from("!HI", raw, 2)
            src = (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flow, struct.unpack_from("=I", raw, 24)[0])
        else:
            src = ("", 0)
        return data, src
