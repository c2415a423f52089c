"""`kill -9` of a real `bootorch serve` during 1 000 DHCP exchanges and a TFTP download, then a restart.

What systemd's ``Restart=on-failure`` does after a crash, done by the test:
start the same command again on the same ports (readiness seen on a real
``$NOTIFY_SOCKET`` datagram socket). Checked afterwards:

* no ACKed lease lost or doubled (the lease journal, read back as in
  ``tests/test_dhcp_crash.py``, which proves the same for the DHCP server
  alone);
* the node stage journaled before the kill is still there after it;
* curl, downloading a file over TFTP when the server died, finishes it
  byte-identical after retrying (``--retry``; a PXE ROM restarts the file the
  same way: TFTP transfers do not resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import time

import pytest

from orchestrator.plan import load_plan
from tests.conftest import require_tool
from tests.test_dhcp_crash import _reply, check_journal
from tests.test_service import PLAN, write_plan
from tests.test_service_reload import BOOTORCH, Serve

pytestmark = pytest.mark.slow


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_kill_9_during_1000_dora_and_a_tftp_download_then_restart(tmp_path):
    curl = require_tool("curl")
    text = PLAN.replace("127.0.0.0/24", "127.0.0.0/21").replace("dhcp:\n  mode: full\n",
                                                                "dhcp:\n  mode: full\n  pool: {start: 127.0.1.0, end: 127.0.7.250}\n")
    plan_path = write_plan(tmp_path, text)
    plan = load_plan(plan_path)
    big = os.urandom(16 << 20)
    (tmp_path / "root" / "big.img").write_bytes(big)
    dhcp_port, tftp_port = free_udp_port(), free_udp_port()
    # DHCP replies go to 127.0.0.1 (the server's server_id is network.server); the crash test's helpers expect it.
    ports = ("--tftp-port", str(tftp_port), "--dhcp-port", str(dhcp_port), "--http-port", "0", "--pxe-port", "-1")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(f"\0bootorch-test-crash-{os.getpid()}")
    notify.settimeout(60)

    def start() -> Serve:
        srv = Serve(plan_path, tmp_path, *ports, notify=notify)
        srv.wait_notify("READY")
        return srv

    rng = random.Random(20)
    leases = plan.state_dir / "leases.journal"
    acked: dict[str, str] = {}
    done = kills = misses = 0
    kill_at = sorted(rng.sample(range(50, 950), 4))
    deadline = time.monotonic() + 240
    srv = start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    download = None
    out = tmp_path / "big.out"
    try:
        # A plan node's PXE DHCP: journaled as pxe_dhcp before any kill.
        node = plan.nodes[0]
        from tests.test_service_reload import dora as pxe_dora

        pxe_dora(dhcp_port, node.mac, 0x77)
        srv.wait_out(rf"^{node.name} pending -> pxe_dhcp")
        while done < 1000 and time.monotonic() < deadline:
            if kills < len(kill_at) and done == kill_at[kills]:
                if kills == 0:
                    # The download is in flight (the server saw its request) when the server dies.
                    # curl's TFTP gives up on a silent server after --max-time (5 s per block timeout);
                    # --retry then starts the file again, as a ROM restarts a failed download.
                    download = subprocess.Popen([curl, "-sS", "--retry", "20", "--retry-delay", "1", "--retry-all-errors",
                                                 "--max-time", "15", f"tftp://127.0.0.1:{tftp_port}/big.img", "-o", str(out)])
                    srv.wait_out(r"^tftp file_request 127\.0\.0\.1 big\.img")
                mac = "02:%02x:%02x:%02x:%02x:%02x" % tuple(rng.randrange(256) for _ in range(5))
                sock.sendto(_discover(mac), ("127.0.0.1", dhcp_port))
                os.kill(srv.p.pid, signal.SIGKILL)
                srv.p.wait(timeout=10)
                kills += 1
                check_journal(leases, acked)
                srv = start()
                continue
            mac = "02:%02x:%02x:%02x:%02x:%02x" % tuple(rng.randrange(256) for _ in range(5))
            ip = dora(sock, dhcp_port, mac, done + 10)
            if ip is not None:
                acked[mac] = ip
                done += 1
                misses = 0
            else:
                misses += 1
                assert misses < 20, f"the server does not answer (after {done} exchanges, {kills} kills): {srv.err_lines}"
        assert download is not None and download.wait(timeout=300) == 0
    finally:
        sock.close()
        if download is not None and download.poll() is None:
            download.kill()
            download.wait()
        srv.stop(close_notify=False)
        notify.close()
    assert done == 1000 and kills == 4
    check_journal(leases, acked)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(big).digest()
    status = subprocess.run([BOOTORCH, "status", str(plan_path), "--json"], capture_output=True, text=True, timeout=60)
    rows = {r["node"]: r for r in json.loads(status.stdout)["nodes"]}
    assert rows[node.name]["stage"] == "pxe_dhcp"


def dora(sock: socket.socket, port: int, mac: str, xid: int) -> str | None:
    """One DORA with server_id 127.0.0.1 (the plan's server); the ACKed address or None (server gone)."""
    from scapy.layers.dhcp import BOOTP, DHCP

    from orchestrator.protocols.dhcp import mac_bytes

    try:
        sock.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(mac), xid=xid) / DHCP(options=[("message-type", "discover"), "end"])),
                    ("127.0.0.1", port))
        ip = _reply(sock, xid, 2).yiaddr
        sock.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(mac), xid=xid) / DHCP(options=[
            ("message-type", "request"), ("server_id", "127.0.0.1"), ("requested_addr", ip), "end"])), ("127.0.0.1", port))
        ack = _reply(sock, xid, 5)
    except (TimeoutError, ConnectionRefusedError, OSError):
        return None
    opts = {o[0]: o[1] for o in ack[DHCP].options if isinstance(o, tuple)}
    return ack.yiaddr if opts.get("message-type") == 5 else None


def _discover(mac: str) -> bytes:
    from scapy.layers.dhcp import BOOTP, DHCP

    from orchestrator.protocols.dhcp import mac_bytes

    return bytes(BOOTP(op=1, chaddr=mac_bytes(mac), xid=1) / DHCP(options=[("message-type", "discover"), "end"]))
