"""Our TFTP server under packet loss, with real curl clients.

Topology: ``bootorch tftpd`` in one network namespace, curl clients in another,
joined by a link that drops 5 % of packets *in each direction* (``tc netem loss
5%`` on both veth ends when the kernel has netem, otherwise the user-space TUN
link emulator of ``orchestrator/lab/netns.py``; both are private to namespaces
the test creates and are removed afterwards).

Why the big test uses 64 KiB blocks on a 65535-byte-MTU link: lock-step TFTP
recovers a lost packet only by timeout, and RFC 2349's smallest ``timeout`` is
one second, so a download takes about (blocks x 10 %) seconds. 16 MiB at blksize
1468 is 11 430 blocks -- some twenty minutes -- while at blksize 65464 it is 257
blocks and about half a minute, through exactly the same code paths
(retransmission on timeout, a lost ACK answered by a duplicate DATA, duplicate
ACKs). Large blocks need the large MTU: with loss applied per frame a 64 KiB
datagram in 45 fragments would almost never arrive whole. The PXE-sized block
(1468, one frame on a 1500-byte MTU) is covered by the second, smaller test.

curl gets ``--connect-timeout 5`` because it derives the ``timeout`` option it
requests from its own limits (lib/tftp.c, ``tftp_set_timeouts``): with a 5 s
connect timeout it asks for 1 s, the fastest recovery the RFC allows (with
``--max-time 300`` it would ask for 6 s). The connect timeout bounds only the
RRQ/OACK exchange -- curl gives up if no OACK or DATA arrives within it -- and
3 s proved too tight: a lost RRQ plus a lost OACK take 2-3 s to repair.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_root, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.root]

MiB = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def _lossy_downloads(tmp_path: Path, *, clients: int, size: int, blksize: int, mtu: int, deadline_s: float) -> None:
    require_root()
    curl = require_tool("curl")
    require_tool("ip")
    from orchestrator.lab.netns import NetLab

    root = tmp_path / "root"
    root.mkdir()
    payload = root / "payload.bin"
    payload.write_bytes(os.urandom(size))
    want = _sha256(payload)
    outs = [tmp_path / f"out{i}.bin" for i in range(clients)]
    server_log = tmp_path / "server.log"

    with NetLab(prefix="btt") as lab:
        srv_ns, cli_ns = lab.namespace("srv"), lab.namespace("cli")
        link = lab.impaired_link(srv_ns, cli_ns, loss_pct=5, mtu=mtu)
        with open(server_log, "wb") as log:
            server = lab.popen(srv_ns, [
                sys.executable, "-m", "orchestrator.bootserver.tftpd_cli", "--root", str(root),
                "--listen", f"{link.a_ip}:69", "--blksize-max", "65464",
                "--max-transfers", "50", "--max-per-client", str(max(clients, 8)),
                "--user", "",  # stay root: the boot root is under pytest's 0700 temp directory
            ], stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 15
        while b"listening on" not in server_log.read_bytes():
            assert server.poll() is None, f"server exited: {server_log.read_text()}"
            assert time.monotonic() < end, "server did not start within 15 s"
            time.sleep(0.05)

        procs = [
            lab.popen(cli_ns, [curl, "-sS", "--connect-timeout", "5", "--tftp-blksize", str(blksize),
                               "-o", str(out), f"tftp://{link.a_ip}/payload.bin"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for out in outs
        ]
        end = time.monotonic() + deadline_s
        errors = []
        for i, p in enumerate(procs):
            try:
                _, err = p.communicate(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                errors.append(f"client {i}: not done within {deadline_s:.0f}s")
                continue
            if p.returncode != 0:
                errors.append(f"client {i}: curl exit {p.returncode}: {err.decode(errors='replace').strip()}")
        assert server.poll() is None, f"server died: {server_log.read_text()[-2000:]}"
        # NetLab's exit kills whatever is left (by PID) and removes both namespaces.

    assert not errors, "\n".join(errors) + "\n--- server log tail:\n" + server_log.read_text()[-2000:]
    for i, out in enumerate(outs):
        assert out.stat().st_size == size, f"client {i}: {out.stat().st_size} bytes, want {size}"
        assert _sha256(out) == want, f"client {i}: sha256 differs"
    # The impairment really bit: the server had to retransmit.
    retransmits = sum(int(n) for n in re.findall(r"retransmits=(\d+)", server_log.read_text()))
    assert retransmits > 0, "no retransmissions logged: was the link lossy?"


def test_20_concurrent_16mib_downloads_survive_5pct_loss(tmp_path: Path) -> None:
    _lossy_downloads(tmp_path, clients=20, size=16 * MiB, blksize=65464, mtu=65535, deadline_s=420)


def test_pxe_blocksize_downloads_survive_5pct_loss(tmp_path: Path) -> None:
    _lossy_downloads(tmp_path, clients=4, size=512 * 1024, blksize=1468, mtu=1500, deadline_s=300)
