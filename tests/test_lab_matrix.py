"""Every boot path of plans/examples/lab-matrix.yaml, booted by real firmware in the lab.

One node per path: BIOS iPXE ROM -> pxelinux.0; OVMF's own PXE -> syslinux.efi
(TFTP windowsize 4); OVMF HTTP Boot -> ipxe.efi -> its script over HTTP; BIOS
iPXE -> its script over HTTP; pxelinux -> an NFS root from the lab's
nfs-ganesha with kernel-level static ``ip=``; OVMF + iPXE EFI ROM ->
syslinux.efi. Slow (TCG, ~5 min) and root. Each test runs a copy of the plan in
a namespace, boot root and state directory of its own.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, require_root, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.root]

EXE = [sys.executable, "-m", "orchestrator"]
MATRIX = REPO / "plans" / "examples" / "lab-matrix.yaml"

FULL = ["waking", "pxe_dhcp", "loader", "config", "kernel", "initrd", "os_dhcp", "ssh", "ready"]
#: The stages each path passes (the matrix plan's nodes).
PATHS = {
    "m01": FULL,  # BIOS iPXE ROM -> pxelinux.0
    "m02": FULL,  # edk2 PXE -> syslinux.efi: the same stages as BIOS
    "m03": FULL,  # edk2 HTTP Boot -> ipxe.efi (loader, over HTTP) -> its script (config)
    "m04": ["waking", "pxe_dhcp", "config", "kernel", "initrd", "os_dhcp", "ssh", "ready"],  # iPXE script: no loader
    "m05": ["waking", "pxe_dhcp", "loader", "config", "kernel", "initrd", "ssh", "ready"],  # static ip=: no os_dhcp
    "m06": FULL,  # OVMF + iPXE EFI ROM -> syslinux.efi
}


def matrix_plan(tmp_path: Path, *, keep: tuple[str, ...] | None = None) -> tuple[Path, str]:
    """A copy of the matrix plan in its own namespace and directories (``keep``: only these nodes)."""
    ns = f"bt-mx-{secrets.token_hex(3)}"
    text = MATRIX.read_text()
    for old, new in {
        "../../var/lab-matrix/state": str(tmp_path / "state"),
        "../../var/lab-matrix/tftpboot": str(tmp_path / "tftpboot"),
        "../../var/lab-matrix/ssh/id_ed25519": str(REPO / "var" / "lab" / "ssh" / "id_ed25519"),
        "../../var/lab-matrix/bmc.password": str(tmp_path / "bmc.password"),
        "bootorch-matrix": ns,
        "listen: 127.0.0.1:9811": "listen: 127.0.0.1:0",
    }.items():
        assert old in text, old
        text = text.replace(old, new)
    if keep is not None:
        lines = []
        for line in text.splitlines():
            m = re.match(r"\s+(?:- \{name: |)(m0\d)\b", line)  # a node, or its lab.firmware entry
            if m and m.group(1) not in keep:
                continue
            lines.append(line)
        text = "\n".join(lines) + "\n"
        text = re.sub(r"  firmware:\n(?!    )", "", text)  # no UEFI node left: every node is bios
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    r = subprocess.run([*EXE, "image", "build", str(p), "--json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return p, ns


def lab(action: str, plan: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EXE, "lab", action, str(plan)], capture_output=True, text=True, timeout=300)


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def tftp_options(pcap: Path) -> dict[str, list[tuple[str, bytes]]]:
    """TFTP packets by client IP from a capture: (direction, payload) of RRQs, OACKs and ERRORs."""
    from scapy.all import UDP, IP, rdpcap  # noqa: PLC0415 -- scapy is slow to import

    out: dict[str, list[tuple[str, bytes]]] = {}
    for pkt in rdpcap(str(pcap)):
        if IP not in pkt or UDP not in pkt:
            continue
        data = bytes(pkt[UDP].payload)
        op = data[:2]
        if op == b"\x00\x01" and pkt[UDP].dport == 69:
            out.setdefault(pkt[IP].src, []).append(("rrq", data))
        elif op == b"\x00\x06":
            out.setdefault(pkt[IP].dst, []).append(("oack", data))
        elif op == b"\x00\x05" and pkt[IP].src != pkt[IP].dst:
            out.setdefault(pkt[IP].src, []).append(("error", data))
    return out


@pytest.fixture
def lab_ready():
    require_root()
    require_tool("qemu-system-x86_64")
    require_tool("tcpdump")
    require_tool("ganesha.nfsd", "/usr/bin/ganesha.nfsd")


def test_every_boot_path_to_ready_in_one_rollout(tmp_path, lab_ready):
    plan, ns = matrix_plan(tmp_path)
    cap = tmp_path / "boot.pcap"
    dump = None
    try:
        r = lab("up", plan)
        assert r.returncode == 0, r.stderr[-3000:]
        # What the firmware negotiates, seen on the wire (UDP only; headers and options fit in 300 bytes).
        dump = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", "br-boot", "-U", "-s", "300", "-w", str(cap),
                                 "udp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        r = subprocess.run([*EXE, "rollout", str(plan), "--json", "--keep-lab"], capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, r.stderr[-4000:]
        out = json.loads(r.stdout)
        assert out["ok"] and out["ready"] == 6, out
        nodes = {n["name"]: n for n in out["nodes"]}
        for name, path in PATHS.items():
            n = nodes[name]
            assert n["result"] == "ready" and n["attempts"] == 1, (name, n)
            assert [t["to"] for t in n["timeline"]] == path, (name, n["timeline"])
        ev = {name: {t["to"]: t["evidence"] for t in n["timeline"]} for name, n in nodes.items()}
        # The HTTP paths show their HTTP evidence; the TFTP paths theirs.
        assert ev["m03"]["loader"].startswith("http: ") and "ipxe.efi" in ev["m03"]["loader"], ev["m03"]
        assert ev["m03"]["kernel"].startswith("http: ") and ev["m04"]["kernel"].startswith("http: ")
        assert ev["m02"]["loader"].startswith("tftp: ") and "syslinux.efi" in ev["m02"]["loader"], ev["m02"]
        assert ev["m02"]["kernel"].startswith("tftp: ") and ev["m06"]["loader"].startswith("tftp: ")

        # status shows the same timelines, per path.
        r = subprocess.run([*EXE, "status", str(plan), "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        st = {n["node"]: n for n in json.loads(r.stdout)["nodes"]}
        assert all(st[name]["stage"] == "ready" for name in PATHS), st
        r = subprocess.run([*EXE, "history", str(plan), "m02", "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        moves = [h["what"].split(" -> ")[1] for h in json.loads(r.stdout) if h["kind"] == "stage"]
        assert moves == FULL, moves

        # edk2 (m02) probed syslinux.efi's size, declined our OACK with ERROR 8, then read it at windowsize 4.
        time.sleep(0.5)  # tcpdump -U flushes per packet; give the last one a moment
        seen = tftp_options(cap)["10.78.0.12"]
        rrqs = [d for kind, d in seen if kind == "rrq" and b"syslinux.efi" in d]
        assert b"tsize\x000\x00" in rrqs[0] and b"windowsize\x004\x00" in rrqs[0], rrqs
        assert any(kind == "oack" and b"windowsize\x004\x00" in d and b"tsize" not in d for kind, d in seen), seen
        assert any(kind == "error" and d[2:4] == b"\x00\x08" for kind, d in seen), seen
        # ... which was no failure, no retransmit: one attempt, no failed transfer in the node's evidence.
        assert not [t for t in nodes["m02"]["timeline"] if "failed" in t["evidence"]]
    finally:
        if dump is not None:
            dump.send_signal(signal.SIGTERM)
            dump.wait(timeout=30)
        lab("down", plan)
    assert ns not in namespaces()


def test_nfs_server_stopped_mid_boot_fails_that_node_others_go_on(tmp_path, lab_ready):
    from orchestrator.lab.lab import nfs_stop
    from orchestrator.plan import load_plan

    plan, ns = matrix_plan(tmp_path, keep=("m04", "m05"))
    text = plan.read_text()
    text = text.replace("failure_budget: 0", "failure_budget: 1")
    text = text.replace("retries: {wake: 2, power_cycle: 1}", "retries: {wake: 2, power_cycle: 0}")
    # Readiness retries m05's checks until then (m04's ssh stage takes 0.3 s).
    text = text.replace("    ssh: 5m\n", "    ssh: 20s\n")
    assert "    ssh: 20s\n" in text
    plan.write_text(text)
    loaded = load_plan(plan)
    try:
        p = subprocess.Popen([*EXE, "rollout", str(plan), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        err, stopped = [], False
        assert p.stderr is not None
        for line in p.stderr:
            err.append(line)
            if not stopped and re.search(r"\bm05\b.*-> kernel", line):
                assert nfs_stop(loaded) is not None  # the kernel is on its way; the root it will mount is not
                stopped = True
        out_text = p.stdout.read() if p.stdout else ""
        rc = p.wait(timeout=900)
        assert stopped, "".join(err)[-3000:]
        out = json.loads(out_text)
        nodes = {n["name"]: n for n in out["nodes"]}
        assert nodes["m04"]["result"] == "ready", nodes["m04"]
        m05 = nodes["m05"]
        assert m05["result"] == "failed", m05
        assert "root-is-nfs" in m05["reason"] and "nfsroot" in m05["reason"], m05["reason"]
        assert rc == 0 and out["ok"] and out["failed"] == 1  # within the failure budget of 1
        serial = (tmp_path / "state" / "lab" / "m05.serial.log").read_text(errors="replace")
        assert "nfsroot" in serial and "mount failed" in serial
    finally:
        lab("down", plan)
    assert ns not in namespaces()
