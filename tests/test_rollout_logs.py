"""`bootorch rollout` with `dhcp.mode: external`: the site's own dnsmasq and nginx logs are its only evidence.

The real CLI runs as a subprocess against a one-node plan on loopback
(127.79.0.0/24: no root, no namespace). The test plays the site and the node,
one step per stage the rollout's progress reports: woken (its magic packet
went to a UDP port nobody listens on) -> dnsmasq's ``--log-dhcp`` PXE DHCP
and TFTP lines; ``config`` -> nginx's ``combined`` GETs of the kernel and
initrd; ``initrd`` -> the OS's DHCP; ``os_dhcp`` -> the node's SSH port opens
(a paramiko server answering the readiness check). Every line carries the
current time. Both logs already
hold a complete boot of the same node from the day before: a rollout must
not take those lines as evidence.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time

from orchestrator.sim.runtime import _ssh_serve_blocking, make_host_key
from tests.conftest import REPO

MAC = "52:54:00:79:00:01"
IP = "127.79.0.11"
SERVER = "127.79.0.1"


def dnsmasq_boot(stamp: str, root, *, os_dhcp: bool) -> list[str]:
    """The lines dnsmasq 2.90 (--log-dhcp, TFTP) writes for one PXE boot (tests/fixtures/logs/dnsmasq.log's shape)."""
    pre = f"{stamp} dnsmasq-dhcp[4690]:"
    if os_dhcp:
        return [f"{pre} 84073570 client provides name: n1", f"{pre} 84073570 DHCPDISCOVER(br0) {MAC} ",
                f"{pre} 84073570 DHCPOFFER(br0) {IP} {MAC} ", f"{pre} 84073570 DHCPREQUEST(br0) {IP} {MAC} ",
                f"{pre} 84073570 DHCPACK(br0) {IP} {MAC} n1"]
    tftp = f"{stamp} dnsmasq-tftp[4690]:"
    return [f"{pre} 2723328092 vendor class: PXEClient:Arch:00000:UNDI:002001",
            f"{pre} 2723328092 DHCPDISCOVER(br0) {MAC} ", f"{pre} 2723328092 DHCPOFFER(br0) {IP} {MAC} ",
            f"{pre} 2723328092 vendor class: PXEClient:Arch:00000:UNDI:002001",
            f"{pre} 2723328092 DHCPREQUEST(br0) {IP} {MAC} ", f"{pre} 2723328092 DHCPACK(br0) {IP} {MAC} ",
            f"{tftp} sent {root}/pxelinux.0 to {IP}", f"{tftp} sent {root}/ldlinux.c32 to {IP}",
            f"{tftp} sent {root}/pxelinux.cfg/01-52-54-00-79-00-01 to {IP}"]


def nginx_boot(stamp: str) -> list[str]:
    """nginx ``combined`` lines for the kernel and initrd over HTTP (what a real nginx writes: test_parsers_nginx.py)."""
    return [f'{IP} - - [{stamp}] "GET /vmlinuz HTTP/1.1" 200 5120000 "-" "iPXE/1.0.0+"',
            f'{IP} - - [{stamp}] "GET /rootfs.gz HTTP/1.1" 200 9100000 "-" "iPXE/1.0.0+"']


def append(path, lines: list[str]) -> None:
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


def write_plan(tmp_path, ssh_port: int):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = tmp_path / "id_ed25519"
    key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    key.chmod(0o600)
    plan = tmp_path / "plan.yaml"
    plan.write_text(textwrap.dedent(f"""\
    version: 1
    name: logs-only
    state_dir: {tmp_path / 'state'}
    network: {{subnet: 127.79.0.0/24, server: {SERVER}, interface: ""}}
    dhcp: {{mode: external}}
    boot: {{root: tftp}}
    profiles: {{p: {{kernel: vmlinuz, initrd: rootfs.gz, ip: dhcp}}}}
    nodes: [{{name: n1, mac: "{MAC}", ip: {IP}}}]
    power: {{wol: {{method: udp, broadcast: {SERVER}, repeat: 1}}}}
    rollout:
      timeouts: {{waking: 20, pxe_dhcp: 20, loader: 20, config: 20, kernel: 20, initrd: 20, os_dhcp: 20, ssh: 30}}
      retries: {{wake: 0, power_cycle: 0}}
    readiness:
      ssh: {{port: {ssh_port}, key: {key}, connect_timeout: 5}}
      checks: [{{name: kernel, kernel: '^6\\.'}}]
    metrics: {{listen: ""}}
    logs:
      - {{source: dnsmasq, path: dnsmasq.log}}
      - {{source: nginx, path: access.log}}
    """))
    return plan


class SshNode:
    """The node's SSH port: bound at once (connects are refused), listening once :meth:`up` is called."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((IP, 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.key = make_host_key()
        self.thread: threading.Thread | None = None

    def up(self) -> None:
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=_ssh_serve_blocking, args=(conn, self.key, self.stop), daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(5)
        self.sock.close()


def test_rollout_with_external_dhcp_boots_on_log_evidence_only(tmp_path):
    node = SshNode()
    plan = write_plan(tmp_path, node.port)
    dnsmasq_log, nginx_log = tmp_path / "dnsmasq.log", tmp_path / "access.log"
    tftp = tmp_path / "tftp"  # the plan's boot root: dnsmasq's tftp-root in `bootorch render`'s dnsmasq.conf
    # Yesterday's boot of the same node, already in both logs (dnsmasq's start line included).
    yesterday = time.time() - 86400
    append(dnsmasq_log, [f"{time.strftime('%b %d %H:%M:%S', time.localtime(yesterday - 60))} dnsmasq-tftp[4690]: TFTP root is {tftp}  "]
           + dnsmasq_boot(time.strftime("%b %d %H:%M:%S", time.localtime(yesterday)), tftp, os_dhcp=False)
           + dnsmasq_boot(time.strftime("%b %d %H:%M:%S", time.localtime(yesterday + 5)), tftp, os_dhcp=True))
    append(nginx_log, nginx_boot(time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(yesterday + 3))))
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "rollout", str(plan), "--json"], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress: list[str] = []
    try:
        deadline = time.monotonic() + 90
        acted: set[str] = set()
        buf = b""
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            if not ready:
                continue
            chunk = proc.stderr.read1(65536)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                progress.append(line)
                now = time.time()
                syslog_now = time.strftime("%b %d %H:%M:%S", time.localtime(now))
                # One step of the boot per stage the rollout reports, in the order a node takes them.
                if "pending -> waking" in line and "pxe" not in acted:
                    acted.add("pxe")
                    append(dnsmasq_log, dnsmasq_boot(syslog_now, tftp, os_dhcp=False))
                elif "-> config" in line and "http" not in acted:
                    acted.add("http")
                    append(nginx_log, nginx_boot(time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now))))
                elif "-> initrd" in line and "os" not in acted:
                    acted.add("os")
                    append(dnsmasq_log, dnsmasq_boot(syslog_now, tftp, os_dhcp=True))
                elif "-> os_dhcp" in line and "ssh" not in acted:
                    acted.add("ssh")
                    node.up()
            if not chunk:
                break
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        progress += err.decode(errors="replace").splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        node.close()
    assert proc.returncode == 0, "\n".join(progress[-40:])
    result = json.loads(out)
    [n] = result["nodes"]
    assert n["result"] == "ready" and n["attempts"] == 1, "\n".join(progress)
    steps = [(t["from"], t["to"], t["source"]) for t in n["timeline"]]
    assert steps == [
        ("pending", "waking", "scheduler"),
        ("waking", "pxe_dhcp", "log:dnsmasq"),
        ("pxe_dhcp", "loader", "log:dnsmasq"),
        ("loader", "config", "log:dnsmasq"),
        ("config", "kernel", "log:nginx"),
        ("kernel", "initrd", "log:nginx"),
        ("initrd", "os_dhcp", "log:dnsmasq"),
        ("os_dhcp", "ssh", "readiness"),
        ("ssh", "ready", "readiness"),
    ], steps
    # Today's lines only (log stamps have whole seconds): yesterday's boot was not evidence.
    assert all(t["time"] >= int(started) - 1 for t in n["timeline"]), n["timeline"]
    assert '"GET /vmlinuz HTTP/1.1" 200' in n["timeline"][4]["evidence"]
