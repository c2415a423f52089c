"""The native lock-step loop (``orchestrator/bootserver/_lockstep.c`` via ``lockstep_native``).

The client and server tests already download through it (every lock-step
transfer of the thread engine runs it when it is built), so these cover what is
particular to it: that it is built and loaded, that it really carries the
transfers, that everything it must not judge is handed back to the Python core
(strangers, duplicates, the final ACK, a file that shrank), its adaptive spin,
and that a transfer blocked inside C is still woken and closed on shutdown.
The same real-client downloads run once more with the native loop off, so the
Python lock-step path keeps its coverage. Real clock, 127.0.0.1, port 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import trio

from orchestrator.bootserver import lockstep_native
from orchestrator.bootserver.files import BootFiles, DiskFile
from orchestrator.bootserver.tftp import TftpCounters, serve_tftp
from orchestrator.bootserver.tftp_engine import _timeval
from orchestrator.events import BootEvent, EventKind
from orchestrator.lab.netns import NetLab
from orchestrator.protocols import tftp as p
from tests.conftest import require_root, require_tool

HOST = "127.0.0.1"
needs_native = pytest.mark.skipif(not lockstep_native.AVAILABLE, reason=f"native loop: {lockstep_native.why_unavailable()}")


def test_the_native_loop_is_built_and_loads():
    # scripts/setup installs a C compiler and `pip install -e .` runs hatch_build.py:
    # on a set-up machine the library must be there (else the fast path silently is not).
    assert lockstep_native.AVAILABLE, lockstep_native.why_unavailable()
    assert lockstep_native.why_unavailable() == ""


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    (r / "big.bin").write_bytes(os.urandom(300_000))
    # 65 536 + 3 blocks at blksize 8: block numbers roll over past 65535.
    (r / "roll.bin").write_bytes(os.urandom(8 * 65_538 + 5))
    (r / "exact.bin").write_bytes(os.urandom(1468 * 40))  # ends with an empty DATA
    return r


@pytest.fixture
def runs(monkeypatch):
    """Count calls into the C loop."""
    n = [0]
    real = lockstep_native.Driver.run

    def run(self):
        n[0] += 1
        return real(self)

    monkeypatch.setattr(lockstep_native.Driver, "run", run)
    return n


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


async def done(recv) -> BootEvent:
    while True:
        ev = await recv.receive()
        if ev.kind is not EventKind.FILE_REQUEST:
            return ev


def curl_cmd(host, port, name, out, blksize, windowsize):
    return [require_tool("curl"), "-sS", "--tftp-blksize", str(blksize), "-o", out, f"tftp://{host}:{port}/{name}"]


def atftp_cmd(host, port, name, out, blksize, windowsize):
    opts = ["--option", f"blksize {blksize}", "--option", f"windowsize {windowsize}", "--option", "tsize 0"]
    return [require_tool("atftp", "/usr/bin/atftp"), "-g", "-r", name, "-l", out, *opts, host, str(port)]


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("client, name, blksize, windowsize", [
    (curl_cmd, "big.bin", 512, 1),
    (curl_cmd, "exact.bin", 1468, 1),
    pytest.param(curl_cmd, "roll.bin", 8, 1, marks=pytest.mark.slow),  # 65 539 round trips: ~8 s
    (atftp_cmd, "big.bin", 1468, 16),  # GSO windows of 16
    (atftp_cmd, "exact.bin", 1468, 7),  # 40 blocks: the last window is short and ends with an empty DATA
], ids=["curl-512", "curl-exact", "curl-rollover", "atftp-ws16", "atftp-exact-ws7"])
async def test_real_clients_download_byte_identical(nursery, root, tmp_path, runs, monkeypatch, native, client, name, blksize, windowsize):
    if native and not lockstep_native.AVAILABLE:
        pytest.skip(lockstep_native.why_unavailable())
    monkeypatch.setattr(lockstep_native, "AVAILABLE", native)
    send, recv = trio.open_memory_channel[BootEvent](100)
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, BootFiles(root), HOST, 0, events=send, counters=counters,
                                       engine="thread", blksize_max=8192))
    out = tmp_path / "out"
    with trio.fail_after(120):
        proc = await trio.run_process(client(addr[0], addr[1], name, str(out), blksize, windowsize), capture_stderr=True, check=False)
        assert proc.returncode == 0, proc.stderr
        ev = await done(recv)
    size = (root / name).stat().st_size
    assert ev.kind is EventKind.FILE_DONE and ev.result == "ok" and ev.bytes == size, ev
    assert sha(out) == sha(root / name)
    blocks = size // blksize + 1
    # Every block once, plus the OACK: nothing sent twice but real retransmits (none
    # expected on loopback; a stalled CI machine could force one after 1 s).
    assert counters.packets_out == blocks + 1 + counters.retransmits
    if native:
        assert runs[0] >= 1  # the C loop carried it (it returns every SLICE, hands back the final ACK)
    else:
        assert runs[0] == 0


@needs_native
async def test_strangers_duplicates_and_errors_are_judged_by_the_core(nursery, root, runs):
    """A wrong TID, a duplicate ACK and a garbage datagram reach the Python core; the transfer goes on."""
    send, recv = trio.open_memory_channel[BootEvent](100)
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, BootFiles(root), HOST, 0, events=send, counters=counters, engine="thread", timeout=5))
    a = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with a, b, trio.fail_after(20):
        await a.bind((HOST, 0))
        await b.bind((HOST, 0))
        await a.sendto(p.encode_request("big.bin"), addr)  # no options: DATA 1 at once, blksize 512
        data, tid = await a.recvfrom(65536)
        assert p.parse_packet(data) == p.Data(1, (root / "big.bin").read_bytes()[:512])
        await a.sendto(p.encode_ack(1), tid)  # from here the C loop is waiting
        data, _ = await a.recvfrom(65536)
        assert p.parse_packet(data).block == 2
        await b.sendto(p.encode_ack(2), tid)  # a stranger: ERROR 5 to it, nothing to the client
        err, _ = await b.recvfrom(65536)
        assert p.parse_packet(err).code == p.ERR_UNKNOWN_TID
        await a.sendto(p.encode_ack(1), tid)  # duplicate: no second DATA 2 (Sorcerer's Apprentice)
        await a.sendto(b"\x00\x09junk", tid)  # unknown opcode: counted as malformed
        await a.sendto(p.encode_ack(2), tid)
        data, _ = await a.recvfrom(65536)
        assert p.parse_packet(data).block == 3  # the next datagram is DATA 3, not a repeated 2
        # Now let the loop run to the end.
        want = (root / "big.bin").read_bytes()
        got = bytearray(want[:1024])
        blk, pkt = 3, p.parse_packet(data)
        while True:
            assert pkt.block == blk & 0xFFFF
            got += pkt.payload
            await a.sendto(p.encode_ack(blk), tid)
            if len(pkt.payload) < 512:
                break
            data, _ = await a.recvfrom(65536)
            pkt, blk = p.parse_packet(data), blk + 1
        ev = await done(recv)
    assert bytes(got) == want
    assert ev.kind is EventKind.FILE_DONE, ev
    assert counters.wrong_tid == 1 and counters.malformed == 1 and counters.retransmits == 0
    assert runs[0] >= 3  # re-entered after each hand-back


@needs_native
async def test_a_transfer_blocked_inside_c_is_woken_and_closed_on_shutdown(root, runs):
    """With the 30 s retransmit timeout, only shutdown() can wake recvfrom in C."""
    fds0 = len(os.listdir("/proc/self/fd"))
    clients = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(partial(serve_tftp, BootFiles(root), HOST, 0, engine="thread", timeout=30))
            for _ in range(2):  # both lock-step threads, each inside the C loop
                s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                await s.bind((HOST, 0))
                await s.sendto(p.encode_request("big.bin"), addr)
                _, tid = await s.recvfrom(65536)
                await s.sendto(p.encode_ack(1), tid)
                data, _ = await s.recvfrom(65536)
                assert p.parse_packet(data).block == 2
                clients.append(s)
            while runs[0] < 2:
                await trio.sleep(0.01)  # polling a counter the threads bump; nothing to await
            t0 = time.monotonic()
            nursery.cancel_scope.cancel()
        assert time.monotonic() - t0 < 2
    for s in clients:
        s.close()
    assert len(os.listdir("/proc/self/fd")) == fds0


# -- the C loop alone: a real core, real sockets, no server ---------------------------------


class Rig:
    def __init__(self, path, *, blksize: int = 512, windowsize: int = 1, rcvtimeo: float = 0.005) -> None:
        fd = os.open(path, os.O_RDONLY)
        self.file = DiskFile("f", fd, os.fstat(fd).st_size)
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind((HOST, 0))
        self.client.settimeout(2)
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind((HOST, 0))
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(rcvtimeo))
        opts = {"blksize": str(blksize)} if blksize != 512 else {}
        if windowsize != 1:
            opts["windowsize"] = str(windowsize)
        req = p.ReadRequest("f", "octet", opts)
        self.core = p.ReadTransfer(req, self.file, blksize_max=8192)
        pkts, _ = self.core.start(time.monotonic())
        for pkt in pkts:
            self.server.sendto(pkt, self.client.getsockname())
        if opts:  # OACK, then the client's ACK 0 through the core: the first window is out
            assert isinstance(p.parse_packet(self.client.recv(600)), p.OptionAck)
            pkts, _ = self.core.datagram(p.encode_ack(0), time.monotonic())
            for pkt in pkts:
                self.server.sendto(pkt, self.client.getsockname())
        self.tid = self.server.getsockname()
        drv = lockstep_native.Driver.for_transfer(self.core, self.server, self.client.getsockname())
        assert drv is not None
        self.drv = drv

    def step(self) -> int:
        self.drv.load()
        code = self.drv.run()
        self.drv.store()
        return code

    def close(self) -> None:
        self.client.close()
        self.server.close()
        self.file.close()


@pytest.fixture
def rig_file(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(os.urandom(512 * 10 + 7))
    return f


@needs_native
def test_loop_answers_acks_and_hands_back_the_final_one(rig_file):
    rig = Rig(rig_file)
    try:
        assert p.parse_packet(rig.client.recv(600)).block == 1
        for blk in range(1, 11):  # ACK 1..10: C sends 2..11 (11 is the short last block)
            rig.client.sendto(p.encode_ack(blk), rig.tid)
            assert rig.core.forwardable()
            assert rig.step() == lockstep_native.NODATA  # answered, then SO_RCVTIMEO ran out
            data = p.parse_packet(rig.client.recv(600))
            assert data.block == blk + 1
            assert data.payload == rig_file.read_bytes()[blk * 512 : (blk + 1) * 512]
            assert rig.core.acked == blk and rig.core.high == blk + 1
        assert rig.core.rtt_n == 10 and rig.core.rtt_sum > 0
        assert not rig.core.forwardable()  # the last block is out: its ACK is the core's
        rig.client.sendto(p.encode_ack(11), rig.tid)
        pkts, evs = rig.core.datagram(p.encode_ack(11), time.monotonic())
        assert pkts == [] and isinstance(evs[0], p.TransferComplete)
    finally:
        rig.close()


@needs_native
def test_loop_hands_back_a_block_the_file_no_longer_has(rig_file):
    rig = Rig(rig_file)
    try:
        rig.client.recv(600)
        os.truncate(rig_file, 700)  # block 2 would be bytes 512..1023: only 188 are left
        rig.client.sendto(p.encode_ack(1), rig.tid)
        rig.drv.load()
        assert rig.drv.run() == lockstep_native.HANDOFF
        data, src = rig.drv.handed_off()
        assert data == p.encode_ack(1) and src == rig.client.getsockname()
        assert rig.drv.store() == (0, 0, 0) and rig.core.acked == 0  # nothing done: the core decides
    finally:
        rig.close()


@needs_native
def test_spinning_pauses_after_four_misses(rig_file, monkeypatch):
    monkeypatch.setattr(lockstep_native, "spin_us", 1000)
    rig = Rig(rig_file)
    try:
        rig.client.recv(600)
        st = rig.drv.loop_state
        assert st.spin_ns == 1_000_000
        for miss in (1, 2, 3):  # nobody ACKs: each call spins (up to 1 ms after the send), then blocks 5 ms
            assert rig.step() == lockstep_native.NODATA
            assert (st.spin_miss, st.spin_skip) == (miss, 0)
        assert rig.step() == lockstep_native.NODATA
        assert (st.spin_miss, st.spin_skip) == (0, 128)  # four misses: the next 128 receives block at once
        assert rig.step() == lockstep_native.NODATA
        assert st.spin_skip == 127
        rig.client.sendto(p.encode_ack(1), rig.tid)
        assert rig.step() == lockstep_native.NODATA and rig.core.acked == 1
    finally:
        rig.close()


@needs_native
def test_loop_sends_whole_windows_and_hands_back_a_partial_ack(tmp_path):
    f = tmp_path / "w"
    f.write_bytes(os.urandom(512 * 30 + 1))  # 31 blocks
    want = f.read_bytes()
    rig = Rig(f, windowsize=4)
    try:
        assert [p.parse_packet(rig.client.recv(600)).block for _ in range(4)] == [1, 2, 3, 4]
        rig.client.sendto(p.encode_ack(4), rig.tid)
        assert rig.core.forwardable()
        assert rig.step() == lockstep_native.NODATA
        got = [p.parse_packet(rig.client.recv(600)) for _ in range(4)]  # one GSO send, four datagrams
        assert [d.block for d in got] == [5, 6, 7, 8]
        assert b"".join(d.payload for d in got) == want[4 * 512 : 8 * 512]
        assert (rig.core.acked, rig.core.high) == (4, 8)
        # Block 7 was lost, says the client: that is the core's call (resend from 7).
        rig.client.sendto(p.encode_ack(6), rig.tid)
        rig.drv.load()
        assert rig.drv.run() == lockstep_native.HANDOFF
        data, _ = rig.drv.handed_off()
        assert data == p.encode_ack(6) and rig.drv.store() == (0, 0, 0)
        pkts, _ = rig.core.datagram(data, time.monotonic())
        assert [p.parse_packet(x).block for x in pkts] == [7, 8, 9, 10]
    finally:
        rig.close()


_GSO_REFUSED = r"""
import json, sys
from orchestrator.bootserver import lockstep_native
from orchestrator.protocols import tftp as p
from tests.test_tftp_native import Rig

rig = Rig(sys.argv[1], blksize=2048, windowsize=4)
try:
    first = [p.parse_packet(rig.client.recv(4096)).block for _ in range(4)]
    rig.client.sendto(p.encode_ack(4), rig.tid)
    code = rig.step()
    after = [p.parse_packet(rig.client.recv(4096)) for _ in range(4)]
    print(json.dumps({"first": first, "code": code, "gso": rig.drv.loop_state.gso,
                      "blocks": [d.block for d in after], "sizes": [len(d.payload) for d in after]}))
finally:
    rig.close()
"""


@needs_native
@pytest.mark.root
def test_loop_falls_back_to_one_datagram_each_when_the_path_refuses_gso(tmp_path):
    """A real refusal: loopback MTU 1500 in a namespace of our own, so 2048-byte segments get EMSGSIZE."""
    require_root()
    f = tmp_path / "g"
    f.write_bytes(os.urandom(2048 * 20))
    repo = Path(__file__).resolve().parent.parent
    with NetLab(prefix="bt") as lab:
        ns = lab.namespace("gso")
        lab.run(None, ["ip", "-n", ns.name, "link", "set", "lo", "mtu", "1500"], timeout=10, check=True)
        r = lab.run(ns, [sys.executable, "-c", _GSO_REFUSED, str(f)], timeout=30, cwd=repo,
                    env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["first"] == [1, 2, 3, 4] and out["code"] == lockstep_native.NODATA
    assert out["gso"] == 0  # the loop noticed, and turned GSO off for this transfer ...
    assert out["blocks"] == [5, 6, 7, 8] and out["sizes"] == [2048] * 4  # ... and still sent the window
