"""Real TFTP clients we did not write download byte-identical files (sha256).

curl (``tftp://`` with ``--tftp-blksize``), tftp-hpa's ``tftp``, ``atftp`` (with
its blksize/windowsize/tsize options) and busybox ``tftp``, against the server
running in this process on 127.0.0.1, port 0. Sizes cover the edge cases: empty,
exact multiples of the block size (the transfer ends with an empty DATA), odd
sizes and a few MB. The server grants blksize up to 8192 here so curl's
``--tftp-blksize 8192`` is really exercised.
"""

from __future__ import annotations

import hashlib
import os
import random
from functools import partial

import pytest
import trio

from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.tftp import TftpCounters, serve_tftp
from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols import tftp as p
from tests.conftest import require_tool

SIZES = {
    "zero": 0,
    "one": 1,
    "x512": 512 * 4,
    "x1468": 1468 * 3,
    "x8192": 8192 * 2,
    "odd": 100_003,
    "mb": 3 * 1024 * 1024 + 17,
}
TEXT = b"DEFAULT linux\nLABEL linux\n  KERNEL vmlinuz\r\n  APPEND initrd=initrd.img\rx\n" * 50


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("clients-root")
    rng = random.Random(42)
    for name, size in SIZES.items():
        (r / name).write_bytes(rng.randbytes(size))
    (r / "text.cfg").write_bytes(TEXT)
    return r


@pytest.fixture
async def server(nursery, root):
    send, recv = trio.open_memory_channel[BootEvent](1000)
    counters = TftpCounters()
    addr = await nursery.start(partial(serve_tftp, BootFiles(root), "127.0.0.1", 0, events=send, counters=counters, blksize_max=8192, windowsize_max=64))
    return addr, recv, counters


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


async def run(cmd: list[str], cwd) -> None:
    proc = await trio.run_process(cmd, cwd=cwd, capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout.decode(errors='replace')}\n{proc.stderr.decode(errors='replace')}"


async def done_event(recv, name: str) -> BootEvent:
    while True:
        ev = await recv.receive()
        if ev.kind is not EventKind.FILE_REQUEST:
            assert ev.filename.lstrip("/") == name, ev
            return ev


async def check_download(server, root, tmp_path, cmd_for, name: str) -> BootEvent:
    (host, port), recv, counters = server
    out = tmp_path / f"out-{name}"
    with trio.fail_after(60):
        await run(cmd_for(host, port, name, str(out)), tmp_path)
        ev = await done_event(recv, name)
    assert ev.kind is EventKind.FILE_DONE and ev.result == "ok", ev
    assert ev.bytes == SIZES.get(name, ev.bytes)
    assert out.exists()
    assert sha(out) == sha(root / name)
    return ev


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("blksize", [512, 1468, 8192])
async def test_curl(server, root, tmp_path, name, blksize):
    curl = require_tool("curl")
    ev = await check_download(server, root, tmp_path, lambda h, p, n, o: [curl, "-sS", "--tftp-blksize", str(blksize), "-o", o, f"tftp://{h}:{p}/{n}"], name)
    assert ev.detail["blksize"] == blksize


@pytest.mark.parametrize("name", list(SIZES))
async def test_tftp_hpa(server, root, tmp_path, name):
    tftp = require_tool("tftp", "/usr/bin/tftp")
    await check_download(server, root, tmp_path, lambda h, p, n, o: [tftp, "-m", "binary", h, str(p), "-c", "get", n, o], name)


async def test_tftp_hpa_netascii(server, root, tmp_path):
    """tftp-hpa decodes netascii itself: an independent check of our encoder."""
    tftp = require_tool("tftp", "/usr/bin/tftp")
    (host, port), recv, counters = server
    out = tmp_path / "text.out"
    with trio.fail_after(30):
        await run([tftp, "-m", "netascii", host, str(port), "-c", "get", "text.cfg", str(out)], tmp_path)
        ev = await done_event(recv, "text.cfg")
    assert ev.result == "ok" and ev.detail["mode"] == "netascii"
    assert out.read_bytes() == TEXT
    assert ev.size == len(TEXT) + TEXT.count(b"\n") + TEXT.count(b"\r")


ATFTP_OPTIONS = {
    "plain": [],
    "blksize1468-tsize": ["--option", "blksize 1468", "--option", "tsize 0"],
    "windowsize8": ["--option", "blksize 1468", "--option", "windowsize 8"],
    "windowsize64-8192": ["--option", "blksize 8192", "--option", "windowsize 64", "--option", "tsize 0"],
}


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("opts", list(ATFTP_OPTIONS))
async def test_atftp(server, root, tmp_path, name, opts):
    atftp = require_tool("atftp", "/usr/bin/atftp")
    ev = await check_download(server, root, tmp_path, lambda h, p, n, o: [atftp, "-g", "-r", n, "-l", o, *ATFTP_OPTIONS[opts], h, str(p)], name)
    if "windowsize" in opts:
        asked, blksize = int(ATFTP_OPTIONS[opts][3].split()[1]), int(ATFTP_OPTIONS[opts][1].split()[1])
        assert ev.detail["windowsize"] == min(asked, p.CLIENT_RCVBUF // p.datagram_cost(blksize))
        assert ev.retransmits == 0  # the window fits the client's socket buffer


@pytest.mark.parametrize("name", list(SIZES))
@pytest.mark.parametrize("blksize", [512, 1468, 8192])
async def test_busybox(server, root, tmp_path, name, blksize):
    busybox = require_tool("busybox", "/usr/bin/busybox")
    await check_download(server, root, tmp_path, lambda h, p, n, o: [busybox, "tftp", "-g", "-r", n, "-l", o, "-b", str(blksize), h, str(p)], name)


@pytest.mark.slow
@pytest.mark.parametrize("client", ["curl", "tftp-hpa", "atftp-windowsize16"])
async def test_block_number_rollover_with_real_clients(server, root, tmp_path, client):
    """Over 32 MB at blksize 512 is more than 65535 blocks: real clients follow the wrap to 0."""
    name = "rollover.bin"
    size = 512 * 65536 + 1000
    path = root / name
    if not path.exists():
        path.write_bytes(os.urandom(size))
    if client == "curl":
        tool = require_tool("curl")
        cmd = lambda h, p, n, o: [tool, "-sS", "--tftp-blksize", "512", "-o", o, f"tftp://{h}:{p}/{n}"]  # noqa: E731
    elif client == "tftp-hpa":
        tool = require_tool("tftp", "/usr/bin/tftp")
        cmd = lambda h, p, n, o: [tool, "-m", "binary", h, str(p), "-c", "get", n, o]  # noqa: E731
    else:
        tool = require_tool("atftp", "/usr/bin/atftp")
        cmd = lambda h, p, n, o: [tool, "-g", "-r", n, "-l", o, "--option", "blksize 512", "--option", "windowsize 16", h, str(p)]  # noqa: E731
    ev = await check_download(server, root, tmp_path, cmd, name)
    assert ev.bytes == size and ev.detail["blksize"] == 512
