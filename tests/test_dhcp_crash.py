"""kill -9 the real DHCP server during 1 000 DORA exchanges: every ACKed lease survives, none doubled."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from orchestrator.bootserver.leases import LeaseStore
from orchestrator.protocols.dhcp import mac_bytes

pytestmark = pytest.mark.slow


def start_server(leases) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.bootserver.dhcp_cli", "--listen", "127.0.0.1", "--port", "0", "--pxe-port", "-1",
         "--subnet", "10.80.0.0/22", "--server", "10.80.0.1", "--pool", "10.80.0.10-10.80.3.250", "--leases", str(leases)],
        stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        m = re.search(r"listening on 127.0.0.1:(\d+)", line)
        if m:
            return p, int(m.group(1))
    raise AssertionError("dhcp server did not start")


def _reply(sock: socket.socket, xid: int, want: int) -> BOOTP:
    """The next reply for this exchange (stale replies from before a kill are skipped)."""
    while True:
        pkt = BOOTP(sock.recv(2048))
        opts = {o[0]: o[1] for o in pkt[DHCP].options if isinstance(o, tuple)}
        if pkt.xid == xid and opts.get("message-type") in (want, 6):
            return pkt


def dora(sock: socket.socket, port: int, mac: str, xid: int) -> str | None:
    """One DISCOVER/OFFER/REQUEST/ACK; returns the ACKed address or None (server gone)."""
    try:
        sock.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(mac), xid=xid) / DHCP(options=[("message-type", "discover"), "end"])), ("127.0.0.1", port))
        ip = _reply(sock, xid, 2).yiaddr
        sock.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(mac), xid=xid) / DHCP(options=[
            ("message-type", "request"), ("server_id", "10.80.0.1"), ("requested_addr", ip), "end"])), ("127.0.0.1", port))
        ack = _reply(sock, xid, 5)
    except (TimeoutError, ConnectionRefusedError, OSError):
        return None
    opts = {o[0]: o[1] for o in ack[DHCP].options if isinstance(o, tuple)}
    return ack.yiaddr if opts.get("message-type") == 5 else None


def test_kill_9_during_1000_dora(tmp_path):
    rng = random.Random(9)
    leases = tmp_path / "leases.journal"
    acked: dict[str, str] = {}
    done = 0
    kills = 0
    deadline = time.monotonic() + 120
    proc, port = start_server(leases)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    kill_at = sorted(rng.sample(range(50, 950), 4))
    try:
        while done < 1000 and time.monotonic() < deadline:
            if kills < len(kill_at) and done == kill_at[kills]:
                # Mid-exchange: send a DISCOVER+REQUEST burst, then SIGKILL without waiting.
                mac = "02:%02x:%02x:%02x:%02x:%02x" % tuple(rng.randrange(256) for _ in range(5))
                sock.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(mac), xid=1) / DHCP(options=[("message-type", "discover"), "end"])), ("127.0.0.1", port))
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
                kills += 1
                check_journal(leases, acked)
                proc, port = start_server(leases)
                continue
            mac = "02:%02x:%02x:%02x:%02x:%02x" % tuple(rng.randrange(256) for _ in range(5))
            ip = dora(sock, port, mac, done + 10)
            if ip is not None:
                acked[mac] = ip
                done += 1
    finally:
        sock.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    assert done == 1000 and kills == 4
    check_journal(leases, acked)


def check_journal(path, acked: dict[str, str]) -> None:
    store = LeaseStore(path)
    try:
        assert store.skipped <= 1  # at most a torn tail
        by_ip: dict[str, str] = {}
        for lease in store.leases():
            assert lease.ip not in by_ip, f"{lease.ip} given to {by_ip.get(lease.ip)} and {lease.mac}"
            by_ip[lease.ip] = lease.mac
        for mac, ip in acked.items():
            got = store.by_mac(mac)
            assert got is not None and got.ip == ip and got.state == "bound", f"ACKed lease of {mac} lost"
    finally:
        store.close()
