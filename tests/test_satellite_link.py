"""A satellite boot server and its orchestrator, two real `bootorch serve` processes, with the link cut mid-boot.

The satellite (``control.listen`` + token) serves node01's DHCP and TFTP on
loopback; the orchestrator (``servers: [{satellite: ...}]``, ``dhcp.mode:
external``: no servers of its own) follows the satellite's event stream through a
TCP relay the test can cut. A boot is driven with real clients (DHCP from scapy,
TFTP with curl from the node's own address); the relay's connections are cut
after the ``loader`` stage, while the rest of the boot happens, and the
orchestrator reconnects by itself. It ends with every stage exactly once, in
order, in its output and its journal, and its journaled cursor at the
satellite's last record: no event lost, none applied twice. The same again over
TLS (a certificate from ``openssl``, verified against its CA) in the second test.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from orchestrator.plan import load_plan
from orchestrator.satellite import offset_key
from orchestrator.store import Store
from tests.conftest import require_tool
from tests.test_service import write_plan
from tests.test_service_reload import Serve, dora

pytestmark = pytest.mark.slow

STAGES = ["pxe_dhcp", "loader", "config", "kernel", "initrd"]

SAT = """\
version: 1
name: sat
state_dir: sat-state
network: {subnet: 127.0.0.0/24, server: 127.0.0.1}
dhcp: {mode: full, lease_time: 1h}
boot: {root: root, config_names: [mac]}
bootserver: {tftp_port: 0, http_port: 0, dhcp_port: 0, proxy_port: 0}
profiles:
  ramdisk: {kernel: vmlinuz, initrd: rootfs.gz, root: initramfs, host_key: none}
nodes:
  - {name: node01, mac: "52:54:00:78:00:01", ip: 127.0.0.11, rack: r1}
metrics: {listen: ""}
control:
  socket: sat-control.sock
  listen: 127.0.0.1:0
  token: {file: token}
"""

ORCH = """\
version: 1
name: orch
state_dir: orch-state
network: {subnet: 127.0.0.0/24, server: 127.0.0.1}
dhcp: {mode: external}
boot: {root: root, config_names: [mac]}
profiles:
  ramdisk: {kernel: vmlinuz, initrd: rootfs.gz, root: initramfs, host_key: none}
nodes:
  - {name: node01, mac: "52:54:00:78:00:01", ip: 127.0.0.11, rack: r1}
metrics: {listen: ""}
servers:
  - name: sat1
    racks: [r1]
    satellite: {control: "127.0.0.1:PORT", token: {file: token}TLS}
"""


class Relay:
    """A TCP relay on 127.0.0.1 to ``target``; :meth:`cut` closes every connection open now (new ones still pass)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.port = self.ls.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.ls.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            with self.lock:
                self.conns += [a, b]
                self.accepted += 1
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> int:
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        return len(conns) // 2

    def close(self) -> None:
        self.ls.close()
        self.cut()


def stage_lines(srv: Serve, until: str) -> list[dict]:
    """The orchestrator's JSON transitions for node01 up to and including the one entering ``until``."""
    out = []
    while True:
        line = srv.wait_out(r'"type": "transition"')
        t = json.loads(line)
        if t.get("node") == "node01":
            out.append(t)
            if t["to"] == until:
                return out


def tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it (openssl: a tool we did not write makes them)."""
    openssl = require_tool("openssl")
    ca_key, ca, key, csr, cert = (d / n for n in ("ca.key", "ca.pem", "sat.key", "sat.csr", "sat.pem"))
    run = lambda *a: subprocess.run([openssl, *a], check=True, capture_output=True, timeout=60)  # noqa: E731
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(ca_key),
        "-out", str(ca), "-days", "2", "-subj", "/CN=bootorch test CA")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(csr),
        "-subj", "/CN=satellite")
    ext = d / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    key.chmod(0o600)
    return ca, cert, key


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_a_cut_satellite_link_loses_no_event_and_doubles_none(tmp_path, tls):
    curl = require_tool("curl")
    token = tmp_path / "token"
    token.write_text("satellite-secret-1\n")
    token.chmod(0o600)
    sat_text = SAT
    tls_part = ""
    if tls:
        ca, cert, key = tls_files(tmp_path)
        sat_text += f"  tls: {{cert: {cert}, key: {key}}}\n"
        tls_part = f", tls_ca: {ca}"
    sat_plan = write_plan(tmp_path, sat_text, "sat.yaml")
    sat = Serve(sat_plan, tmp_path, "--json")
    relay = orch = None
    try:
        sat.wait_notify("READY")
        control_port = int(sat.wait_err(r"control API on .*, tcp 127\.0\.0\.1:(\d+)").group(1))
        tftp, dhcp = (int(x) for x in sat.wait_err(r"serving tftp 127.0.0.1:(\d+), http 127.0.0.1:\d+, dhcp :(\d+)").groups())
        relay = Relay(("127.0.0.1", control_port))
        orch_plan = write_plan(tmp_path, ORCH.replace("PORT", str(relay.port)).replace("TLS", tls_part), "orch.yaml")
        orch = Serve(orch_plan, tmp_path, "--json", notify=None)
        orch.wait_notify("READY")
        orch.wait_err(r"following satellite sat1 at 127\.0\.0\.1:\d+" + (r" \(TLS\)" if tls else ""))

        mac = "52:54:00:78:00:01"
        assert dora(dhcp, mac, 0x77).yiaddr == "127.0.0.11"

        def fetch(name: str) -> None:
            r = subprocess.run([curl, "-sS", "--max-time", "20", "--interface", "127.0.0.11", f"tftp://127.0.0.1:{tftp}/{name}"],
                               capture_output=True, timeout=60)
            assert r.returncode == 0, r.stderr

        fetch("pxelinux.0")
        seen = stage_lines(orch, "loader")
        assert relay.cut() >= 1  # the orchestrator's stream to the satellite, cut in the middle of the boot
        for name in ("pxelinux.cfg/01-52-54-00-78-00-01", "vmlinuz", "rootfs.gz"):
            fetch(name)  # evidence the satellite records while the link is down
        seen += stage_lines(orch, "initrd")
        orch.wait_err(r"satellite sat1: .*reconnecting")
        assert [t["to"] for t in seen] == STAGES, seen
        assert relay.accepted >= 2  # it did reconnect
    finally:
        for srv in (orch, sat):
            if srv is not None:
                assert srv.stop() == 0
        if relay is not None:
            relay.close()
    journal = Store(load_plan(orch_plan).state_dir / "state.db")
    try:
        assert [t.to_stage.value for t in journal.transitions(mac)] == STAGES  # each stage once, none lost
        cursor = journal.load_offset(offset_key("sat1"))
    finally:
        journal.close()
    events = 0
    while not sat.out.empty():
        if '"type": "event"' in sat.out.get():
            events += 1
    assert cursor["last"] >= events >= 8 and isinstance(cursor["epoch"], str)  # every record the satellite kept
