"""100 000 fuzzed datagrams at the server; it must not crash, leak or misserve.

Half go to the listening port (random bytes and mutated valid requests), half to
an *active transfer's* port (mutated ACK/ERROR/DATA and random bytes, from the
right TID and from a wrong one); when a fuzzed packet ends that transfer a new
one is started. Afterwards every transfer must be reaped, the task tree and the
open file descriptors back to where they were, and a real download
byte-identical.

The clock is pytest-trio's ``autojump_clock``: no virtual time passes while we
fuzz (the fuzzer never sleeps), and the final ``trio.sleep`` that lets the
server reap fuzz-created transfers -- some negotiated RFC 2349 timeouts of
255 s -- costs no real time. Batches end with ``wait_all_tasks_blocked`` so the
server has drained its sockets before the next batch: nothing is lost to full
socket buffers, and the count of datagrams the server saw is checked.
"""

from __future__ import annotations

import gc
import os
import random
import socket
from functools import partial

import pytest
import trio
import trio.testing

from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.tftp import TftpCounters, serve_tftp, tftp_get
from orchestrator.events import BootEvent
from orchestrator.protocols import tftp as p

N_LISTEN = 50_000
N_TRANSFER = 50_000
BATCH = 64

OPTION_VALUES = ["0", "1", "7", "8", "512", "1468", "65464", "65465", "-1", "abc", "", "255", "256", "65535", "65536", "99999999999"]
OPTIONS = ["blksize", "tsize", "timeout", "windowsize", "BLKSIZE", "utimeout", "multicast", "x" * 300]
NAMES = ["boot.bin", "/boot.bin", "pxelinux.0", "missing", "../etc/passwd", "a\\b", "", "pxelinux.cfg/default", "boot.bin" * 100]


def valid_request(rng: random.Random) -> bytes:
    opts = {rng.choice(OPTIONS): rng.choice(OPTION_VALUES) for _ in range(rng.randrange(0, 5))}
    return p.encode_request(rng.choice(NAMES), rng.choice(["octet", "netascii", "OCTET", "mail", "x"]), opts, write=rng.random() < 0.05)


def valid_transfer_packet(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.6:
        return p.encode_ack(rng.choice([0, 1, 2, 3, 4, 5, 65535, rng.randrange(65536)]))
    if r < 0.62:  # rare: each ERROR from the right TID ends the transfer
        return p.encode_error(rng.randrange(10), "x" * rng.randrange(0, 100))
    if r < 0.8:
        return p.encode_data(rng.randrange(65536), rng.randbytes(rng.randrange(0, 600)))
    if r < 0.9:
        return p.encode_oack({"blksize": "1024"})
    return valid_request(rng)


def mutate(rng: random.Random, pkt: bytes) -> bytes:
    b = bytearray(pkt)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(7)
        if op == 0 and b:  # flip bytes
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1:  # truncate
            del b[rng.randrange(len(b) + 1) :]
        elif op == 2:  # append junk
            b += rng.randbytes(rng.randrange(1, 64))
        elif op == 3 and b:  # insert or delete NULs
            i = rng.randrange(len(b))
            if b[i] == 0:
                del b[i]
            else:
                b.insert(i, 0)
        elif op == 4:  # replace the opcode (ERROR rarely: it ends transfers)
            b[:2] = rng.choice([0, 1, 2, 3, 4, 4, 6, 7, 9, 5 if rng.random() < 0.1 else 4]).to_bytes(2, "big")
        elif op == 5 and b:  # duplicate a slice
            i = rng.randrange(len(b))
            b[i:i] = b[i : i + rng.randrange(1, 32)]
        elif op == 6:
            b = bytearray(rng.randbytes(rng.randrange(0, 40)))
    return bytes(b)


def random_datagram(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.001:
        return rng.randbytes(rng.randrange(1000, 60_000))  # rare giant
    if r < 0.2:
        return rng.randbytes(rng.randrange(0, 8))
    return rng.randbytes(rng.randrange(0, 600))


def count_tasks() -> int:
    n, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        t = stack.pop()
        n += 1
        for nursery in t.child_nurseries:
            stack.extend(nursery.child_tasks)
    return n


def open_fds() -> int:
    # Sockets of earlier tests caught in reference cycles would otherwise be
    # closed by a garbage collection in the middle of this test (seen in CI:
    # three fewer descriptors at the end than at the start).
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def udp() -> trio.socket.SocketType:
    s = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    return s


async def drain_nowait(sock) -> list[tuple[bytes, tuple]]:
    out = []
    while True:
        try:
            out.append(sock._sock.recvfrom(65536))
        except BlockingIOError:
            return out


@pytest.mark.slow
async def test_fuzz_listen_and_transfer_ports(nursery, tmp_path, autojump_clock):
    root = tmp_path / "root"
    (root / "pxelinux.cfg").mkdir(parents=True)
    payload = random.Random(7).randbytes(200_000)
    (root / "boot.bin").write_bytes(payload)
    (root / "pxelinux.0").write_bytes(b"L" * 3000)
    (root / "pxelinux.cfg" / "default").write_bytes(b"DEFAULT x\n" * 50)

    send, recv = trio.open_memory_channel[BootEvent](100)
    counters = TftpCounters()

    async def drain_events():
        async for _ in recv:
            pass

    nursery.start_soon(drain_events)
    addr = await nursery.start(partial(serve_tftp, BootFiles(root), "127.0.0.1", 0, events=send, counters=counters, max_transfers=64, max_per_client=64, timeout=1.0, retries=2))
    await trio.testing.wait_all_tasks_blocked()
    tasks0, fds0 = count_tasks(), open_fds()
    rng = random.Random(20261125)

    with trio.fail_after(100_000):  # virtual seconds; the real bound is pytest's own
        # Phase A: the listening port, from a pool of source ports.
        pool = [udp() for _ in range(16)]
        for s in pool:
            await s.bind(("127.0.0.1", 0))
        sent = 0
        while sent < N_LISTEN:
            for _ in range(BATCH):
                r = rng.random()
                dgram = random_datagram(rng) if r < 0.4 else mutate(rng, valid_request(rng)) if r < 0.9 else valid_request(rng)
                pool[rng.randrange(len(pool))]._sock.sendto(dgram, addr)
                sent += 1
            await trio.testing.wait_all_tasks_blocked()
            if sent % (BATCH * 16) == 0:
                for s in pool:
                    await drain_nowait(s)
        assert counters.packets_in >= 0.99 * N_LISTEN
        assert counters.malformed > N_LISTEN // 10
        assert count_tasks() <= tasks0 + 16  # at most one transfer per pool port

        # Phase B: an active transfer's port, right TID and wrong TID.
        intruder = udp()
        await intruder.bind(("127.0.0.1", 0))
        client = None
        tid = None
        restarts = 0
        sent = 0
        base_in = counters.packets_in
        while sent < N_TRANSFER:
            ended = counters.transfers_ok + counters.transfers_failed + counters.transfers_unconfirmed + counters.options_declined
            if client is None:
                client = udp()
                await client.bind(("127.0.0.1", 0))
                await client.sendto(p.encode_request("boot.bin", options={"blksize": 512, "windowsize": 4}), addr)
                _, src = await client.recvfrom(65536)  # the OACK, from the new TID
                tid = src[:2]
                restarts += 1
            for _ in range(BATCH // 4):
                r = rng.random()
                dgram = random_datagram(rng) if r < 0.3 else mutate(rng, valid_transfer_packet(rng)) if r < 0.8 else valid_transfer_packet(rng)
                (intruder if rng.random() < 0.1 else client)._sock.sendto(dgram, tid)
                sent += 1
            await trio.testing.wait_all_tasks_blocked()
            await drain_nowait(client)
            await drain_nowait(intruder)
            if counters.transfers_ok + counters.transfers_failed + counters.transfers_unconfirmed + counters.options_declined != ended:
                client.close()
                client = None
        assert restarts > 1  # fuzzed ERRORs and ACKs did end transfers
        assert counters.wrong_tid > 0
        # Datagrams to a port closed by a just-ended transfer are lost, so no exact count.
        assert counters.packets_in - base_in >= 0.8 * N_TRANSFER

        # Let the server reap everything the fuzz left behind (negotiated timeouts up to 255 s x 3).
        for s in pool + [intruder] + ([client] if client else []):
            s.close()
        await trio.sleep(255 * 3 + 10)
        await trio.testing.wait_all_tasks_blocked()
        assert counters.active == 0
        assert count_tasks() == tasks0, "a task leaked"
        assert open_fds() == fds0, "a socket or file leaked"

        # And it still serves correctly.
        c = await tftp_get(*addr, "boot.bin", options={"blksize": 1468, "windowsize": 16, "tsize": 0})
        assert bytes(c.data) == payload
        c = await tftp_get(*addr, "boot.bin")
        assert bytes(c.data) == payload
