"""SIGHUP to a real `bootorch serve`, driven the way systemd drives it.

systemd is not PID 1 here: the test does what ``systemctl reload`` does
(``kill -HUP $MAINPID``) and listens where systemd would, on a real ``AF_UNIX``
datagram socket named in ``$NOTIFY_SOCKET`` (abstract, as systemd's is). Every
step waits for the message or line that says it happened (``READY=1`` after the
reload, the server's event line for a transfer's request), never a fixed time.
Traffic stays on loopback, on ports the kernel picks.

* a broken plan: the error is logged with file:line, ``READY=1`` follows, and
  the previous plan is still served (DHCP and the node's boot files);
* a plan with a node added, one removed and the profile changed, while curl
  downloads a 64 MiB file over TFTP: the new node gets its lease and boot
  files, the removed one no answer, the kept one the changed config, and the
  download completes byte-identical.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP, DHCP

from orchestrator.control import request as control_request
from orchestrator.plan import load_plan
from orchestrator.protocols.dhcp import mac_bytes
from orchestrator.render import boot_tree
from tests.conftest import REPO, require_tool
from tests.test_service import PLAN, write_plan

pytestmark = pytest.mark.slow

BOOTORCH = str(REPO / ".venv" / "bin" / "bootorch")
BIG = 64 << 20


class Serve:
    """A `bootorch serve` process with its stdout/stderr lines and sd_notify messages as queues."""

    def __init__(self, plan, tmp_path, *extra: str, notify: socket.socket | None = None) -> None:
        if notify is None:
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.bind(f"\0bootorch-test-notify-{os.getpid()}-{id(self)}")
            notify.settimeout(60)
        self.notify = notify
        env = dict(os.environ, NOTIFY_SOCKET="@" + notify.getsockname()[1:].decode())
        env.pop("JOURNAL_STREAM", None)
        self.p = subprocess.Popen([BOOTORCH, "serve", str(plan), "--interface", "", "--events", *extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.err: queue.Queue[str] = queue.Queue()
        self.out: queue.Queue[str] = queue.Queue()
        self.err_lines: list[str] = []
        self.terminated = False
        for stream, q in ((self.p.stderr, self.err), (self.p.stdout, self.out)):
            threading.Thread(target=self._pump, args=(stream, q), daemon=True).start()

    @staticmethod
    def _pump(stream, q) -> None:
        for line in stream:
            q.put(line.rstrip("\n"))

    def wait_err(self, pattern: str) -> re.Match:
        while True:
            line = self.err.get(timeout=60)
            self.err_lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def wait_out(self, pattern: str) -> str:
        while True:
            line = self.out.get(timeout=60)
            if re.search(pattern, line):
                return line

    def wait_notify(self, key: str) -> dict[str, str]:
        while True:
            fields = dict(ln.split("=", 1) for ln in self.notify.recv(4096).decode().splitlines())
            if key in fields:
                return fields

    def terminate(self) -> None:
        self.terminated = True
        self.p.send_signal(signal.SIGTERM)

    def stop(self, *, close_notify: bool = True) -> int:
        if self.p.poll() is None and not self.terminated:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout=30)
        finally:
            if close_notify:
                self.notify.close()


def dora(port: int, mac: str, xid: int) -> BOOTP:
    """DISCOVER/OFFER/REQUEST/ACK on loopback; the ACK."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    try:
        s.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(mac), xid=xid) / DHCP(options=[
            ("message-type", "discover"), ("vendor_class_id", b"PXEClient:Arch:00000"), "end"])), ("127.0.0.1", port))
        offer = BOOTP(s.recv(2048))
        s.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(mac), xid=xid) / DHCP(options=[
            ("message-type", "request"), ("server_id", "127.0.0.1"), ("requested_addr", offer.yiaddr),
            ("vendor_class_id", b"PXEClient:Arch:00000"), "end"])), ("127.0.0.1", port))
        ack = BOOTP(s.recv(2048))
    finally:
        s.close()
    assert dict(o for o in ack[DHCP].options if isinstance(o, tuple))["message-type"] == 5
    return ack


def unanswered(port: int, mac: str, known_mac: str) -> bool:
    """True when a DISCOVER from ``mac`` gets no reply: one from ``known_mac`` is sent after it and
    answered, then another, so the server has certainly read and handled ``mac``'s by then."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(10)
    seen = []
    try:
        for xid, m in ((0x5001, mac), (0x5002, known_mac)):
            s.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(m), xid=xid) / DHCP(options=[("message-type", "discover"), "end"])),
                     ("127.0.0.1", port))
        while 0x5002 not in seen:
            seen.append(BOOTP(s.recv(2048)).xid)
        s.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(known_mac), xid=0x5003) / DHCP(options=[("message-type", "discover"), "end"])),
                 ("127.0.0.1", port))
        while 0x5003 not in seen:
            seen.append(BOOTP(s.recv(2048)).xid)
    finally:
        s.close()
    return 0x5001 not in seen


def tftp_get(curl: str, port: int, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([curl, "-sS", "--max-time", "20", f"tftp://127.0.0.1:{port}/{name}"], capture_output=True, timeout=60)


def cfg_name(mac: str) -> str:
    return "pxelinux.cfg/01-" + mac.replace(":", "-")


def test_sighup_broken_plan_then_node_added_and_removed_during_a_64mib_download(tmp_path):
    curl = require_tool("curl")
    plan_path = write_plan(tmp_path)
    big = os.urandom(BIG)
    (tmp_path / "root" / "big.img").write_bytes(big)
    old = load_plan(plan_path)
    n1, n2 = old.nodes[0], old.nodes[1]
    srv = Serve(plan_path, tmp_path)
    try:
        ready = srv.wait_notify("READY")
        assert ready["STATUS"] == "serving 3 nodes of svc"
        tftp, http, dhcp = (int(x) for x in srv.wait_err(r"serving tftp 127.0.0.1:(\d+), http 127.0.0.1:(\d+), dhcp :(\d+)").groups())

        # (a) a broken plan: refused with file:line, the old plan served unchanged
        good = plan_path.read_text()
        plan_path.write_text(good.replace("    kernel: vmlinuz", "    kernal: vmlinuz"))
        srv.p.send_signal(signal.SIGHUP)
        assert srv.wait_notify("RELOADING")["RELOADING"] == "1"
        assert srv.wait_notify("READY")["STATUS"].startswith("reload refused")
        srv.wait_err(r"reload refused: still serving the previous plan")
        located = [ln for ln in srv.err_lines if ln.startswith(f"{plan_path}:")]
        assert any(re.match(rf"{re.escape(str(plan_path))}:\d+: .*kernal", ln) for ln in located), srv.err_lines
        validate = subprocess.run([BOOTORCH, "validate", str(plan_path)], capture_output=True, text=True, timeout=60)
        assert validate.returncode == 1 and set(validate.stderr.splitlines()[:-1]) == set(located[:len(validate.stderr.splitlines()) - 1])
        assert dora(dhcp, n1.mac, 0x100).yiaddr == str(n1.ip)
        assert tftp_get(curl, tftp, cfg_name(n1.mac)).stdout == boot_tree(old)[cfg_name(n1.mac)]

        # (b) node04 added, node01 removed, while a 64 MiB TFTP download is in flight
        # ... and the profile's kernel command line changed: node02 (kept) gets it on its next boot
        new_text = good.replace("node[01-03]", "node[02-04]").replace("52:54:00:78:00:01", "52:54:00:78:00:02") \
            .replace("ip: 127.0.0.11", "ip: 127.0.0.12").replace("    root: initramfs\n", "    root: initramfs\n    append: reload-test\n")
        plan_path.write_text(new_text)
        against = subprocess.run([BOOTORCH, "validate", str(plan_path), "--against-running"], capture_output=True,
                                 text=True, timeout=60)
        assert against.returncode == 0 and "nodes added (1): node04" in against.stdout \
            and "nodes removed (1): node01" in against.stdout, against.stdout + against.stderr
        out = tmp_path / "big.out"
        # curl asks for 512-byte blocks: 131 072 lock-step round trips, seconds here; the reload takes milliseconds.
        download = subprocess.Popen([curl, "-sS", "--max-time", "600", f"tftp://127.0.0.1:{tftp}/big.img", "-o", str(out)])
        try:
            srv.wait_out(r"^tftp file_request 127\.0\.0\.1 big\.img")
            srv.p.send_signal(signal.SIGHUP)
            srv.wait_notify("RELOADING")
            assert srv.wait_notify("READY")["STATUS"].startswith("reloaded: nodes added (1): node04")
            assert download.poll() is None, "the download finished before the reload: it was not in flight"
            new = load_plan(plan_path)
            n4 = new.by_name["node04"]
            ack = dora(dhcp, n4.mac, 0x400)
            assert ack.yiaddr == str(n4.ip) and ack.file.rstrip(b"\0") == b"pxelinux.0"
            assert tftp_get(curl, tftp, cfg_name(n4.mac)).stdout == boot_tree(new)[cfg_name(n4.mac)]
            script = f"ipxe/{n4.mac.replace(':', '-')}.ipxe"
            got = subprocess.run([curl, "-sS", "--max-time", "20", f"http://127.0.0.1:{http}/{script}"], capture_output=True, timeout=60)
            assert got.stdout == boot_tree(new)[script]
            assert unanswered(dhcp, n1.mac, n2.mac)
            n2_cfg = tftp_get(curl, tftp, cfg_name(n2.mac)).stdout
            assert b"reload-test" in n2_cfg and n2_cfg == boot_tree(new)[cfg_name(n2.mac)]
            assert b"reload-test" not in boot_tree(old)[cfg_name(n2.mac)]
            assert tftp_get(curl, tftp, cfg_name(n1.mac)).returncode != 0  # its pxelinux.cfg is gone
            assert download.wait(timeout=600) == 0
        finally:
            if download.poll() is None:
                download.kill()
                download.wait()
        assert out.stat().st_size == BIG and hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(big).digest()
        srv.wait_err(r"reload: dropped 1 lease\(s\) of removed nodes")
        srv.terminate()
        assert srv.wait_notify("STOPPING")["STATUS"] == "stopping (SIGTERM)"
    finally:
        code = srv.stop()
    assert code == 0


CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"connect": type(e).__name__}))
    sys.exit(0)
s.sendall(sys.argv[2].encode() + b"\n")
print(json.dumps({"answers": [json.loads(line) for line in s.makefile("rb") if line.strip()]}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to another user (root only)")
def test_group_members_get_a_read_only_control_socket(tmp_path):
    """The unit's layout (runtime directory 0750, group bootorch): a group member may ask `plan`, not `reboot`;
    a user outside the group cannot connect. `nobody` is the operator, group `daemon` stands in for group bootorch."""
    import grp
    import json
    import pwd
    import shutil
    import tempfile

    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 for the unprivileged client")
    # nobody (primary group nogroup) is the operator; group "daemon" stands in for group bootorch.
    nobody, nogroup, staff = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid, grp.getgrnam("daemon").gr_gid
    base = Path(tempfile.mkdtemp(prefix="bootorch-group-", dir="/tmp"))
    try:
        base.chmod(0o711)
        run = base / "run"
        run.mkdir(mode=0o750)
        os.chown(run, 0, staff)
        # setgid: the socket gets the directory's group, as it gets the service's Group= under systemd
        run.chmod(0o2750)
        sock = run / "control.sock"
        plan_path = write_plan(tmp_path, PLAN + f"control:\n  socket: {sock}\n")
        srv = Serve(plan_path, tmp_path)
        try:
            srv.wait_notify("READY")
            assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o660

            def ask(req: dict, groups: list[int]) -> dict:
                r = subprocess.run([python, "-c", CLIENT, str(sock), json.dumps(req)], user=nobody, group=nogroup,
                                   extra_groups=groups, capture_output=True, text=True, timeout=60, cwd="/")
                assert r.returncode == 0, r.stderr
                return json.loads(r.stdout)

            got = ask({"op": "plan"}, [staff])["answers"]
            assert got[0]["event"] == "plan" and set(got[0]["fingerprint"]["nodes"]) == {"node01", "node02", "node03"}
            refused = ask({"op": "reboot", "nodes": ["node01"], "reason": "x"}, [staff])["answers"]
            assert refused == [{"event": "error", "error": "reboot needs the orchestrator's own user or root; "
                                                           "this socket answers you read-only (ping, plan, admission)"}]
            adm = ask({"op": "admission"}, [staff])["answers"]
            assert adm[0]["event"] == "admission"
            assert ask({"op": "ping"}, [])["connect"] == "PermissionError"
            # root (the service's own user here) may still act: the request is accepted
            for msg in control_request(sock, {"op": "power_off", "nodes": ["node01"], "reason": "test", "wait": False}):
                assert msg["event"] != "error", msg
                break
        finally:
            assert srv.stop() == 0
    finally:
        shutil.rmtree(base)
