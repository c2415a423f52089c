"""`bootorch serve`: the plan's boot server answers DHCP, TFTP and HTTP from the rendered tree."""

from __future__ import annotations

import hashlib
import subprocess

import trio
from scapy.layers.dhcp import BOOTP, DHCP

from orchestrator.bootserver.serve import Ports, serve_plan
from orchestrator.events import EventKind
from orchestrator.plan import load_plan
from orchestrator.protocols.dhcp import mac_bytes
from orchestrator.render import boot_tree
from tests.conftest import REPO, require_tool


def _plan(tmp_path):
    text = (REPO / "plans" / "full.yaml").read_text()
    text = text.replace("root: ../var/lab/tftpboot", f"root: {tmp_path / 'root'}")
    text = text.replace("state_dir: ../var/lab/state", f"state_dir: {tmp_path / 'state'}")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "pxelinux.0").write_bytes(b"\x90" * 4096)
    (tmp_path / "root" / "vmlinuz").write_bytes(bytes(range(256)) * 4000)
    (tmp_path / "root" / "rootfs.gz").write_bytes(b"\x1f\x8b" + bytes(70000))
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return load_plan(p)


async def test_serve_plan_answers_all_three(tmp_path):
    curl = require_tool("curl")
    plan = _plan(tmp_path)
    node = plan.nodes[0]
    send, recv = trio.open_memory_channel(1000)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await nursery.start(lambda task_status: serve_plan(
                plan, Ports(host="127.0.0.1", dhcp=0, pxe=0, tftp=0, http=0, interface=""), events=send, task_status=task_status))
            cfg = f"pxelinux.cfg/01-{node.mac.replace(':', '-')}"
            got = await trio.run_process([curl, "-sS", "--max-time", "10", f"tftp://127.0.0.1:{run.tftp}/{cfg}"], capture_stdout=True)
            assert got.stdout == boot_tree(plan)[cfg]
            got = await trio.run_process([curl, "-sS", "--max-time", "10", f"tftp://127.0.0.1:{run.tftp}/vmlinuz"], capture_stdout=True)
            assert hashlib.sha256(got.stdout).digest() == hashlib.sha256((tmp_path / "root" / "vmlinuz").read_bytes()).digest()
            script = f"ipxe/{node.mac.replace(':', '-')}.ipxe"
            got = await trio.run_process([curl, "-sS", "--max-time", "10", f"http://127.0.0.1:{run.http}/{script}"], capture_stdout=True)
            assert got.stdout == boot_tree(plan)[script]
            # pxelinux's next candidate name is "not found", like a real server's
            miss = await trio.run_process([curl, "-sS", "--max-time", "10", f"tftp://127.0.0.1:{run.tftp}/pxelinux.cfg/0A4D000"], check=False, capture_stdout=True, capture_stderr=True)
            assert miss.returncode != 0
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await sock.bind(("127.0.0.1", 0))
            discover = bytes(BOOTP(op=1, chaddr=mac_bytes(node.mac), xid=9) / DHCP(options=[("message-type", "discover"), ("vendor_class_id", b"PXEClient:Arch:00000"), "end"]))
            await sock.sendto(discover, ("127.0.0.1", run.dhcp))
            data, _ = await sock.recvfrom(2048)
            offer = BOOTP(data)
            assert offer.yiaddr == str(node.ip) and offer.file.rstrip(b"\0") == b"pxelinux.0"
            sock.close()
            seen = []
            while len(seen) < 9:
                seen.append(await recv.receive())
            nursery.cancel_scope.cancel()
    kinds = {(e.source, e.kind) for e in seen}
    assert ("tftp", EventKind.FILE_DONE) in kinds and ("http", EventKind.FILE_DONE) in kinds and ("dhcp", EventKind.DHCP) in kinds
    assert ("tftp", EventKind.FILE_FAILED) in kinds


def test_serve_cli_help():
    r = subprocess.run([str(REPO / ".venv" / "bin" / "bootorch"), "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--no-dhcp" in r.stdout


def test_serve_cli_prints_stage_changes_and_resumes_from_journal(tmp_path):
    """The real command: stage changes on stdout, journaled, and restored after a restart."""
    import re
    import signal
    import socket

    require_tool("curl")
    plan = _plan(tmp_path)
    node = plan.nodes[0]
    exe = str(REPO / ".venv" / "bin" / "bootorch")
    args = [exe, "serve", str(plan.path), "--listen", "127.0.0.1", "--interface", "", "--tftp-port", "0",
            "--http-port", "0", "--dhcp-port", "0", "--pxe-port", "-1", "--metrics-port", "0"]

    def start():
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in p.stderr:
            m = re.search(r"serving tftp 127.0.0.1:(\d+), http 127.0.0.1:(\d+), dhcp :(\d+)", line)
            if m:
                return p, [int(x) for x in m.groups()]
        raise AssertionError("serve did not start: " + p.stderr.read())

    p, (tftp, http, dhcp) = start()
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(node.mac), xid=3) / DHCP(options=[("message-type", "discover"), ("vendor_class_id", b"PXEClient:Arch:00000"), "end"])), ("127.0.0.1", dhcp))
        s.recvfrom(2048)
        s.close()
        first = p.stdout.readline()
        assert first.startswith(f"{node.name} pending -> pxe_dhcp (attempt 1)"), first
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
    p, (tftp, http, dhcp) = start()
    try:
        # Restored at pxe_dhcp: loopback reads are not joined to the node, so make the evidence DHCP-borne: an OS DHCP.
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(bytes(BOOTP(op=1, chaddr=mac_bytes(node.mac), xid=4) / DHCP(options=[("message-type", "discover"), "end"])), ("127.0.0.1", dhcp))
        s.recvfrom(2048)
        s.close()
        line = p.stdout.readline()
        assert line.startswith(f"{node.name} pxe_dhcp -> os_dhcp (attempt 1)"), line
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
