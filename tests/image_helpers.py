"""Helpers for the image builder's tests: an independent newc reader, the host's busybox, a one-node plan."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from orchestrator.image.rootfs import LIB_SH
from tests.conftest import require_tool


def parse_newc(data: bytes) -> list[dict]:
    """A deliberately separate newc reader, for header fields busybox does not print."""
    out, off = [], 0
    while True:
        assert data[off : off + 6] == b"070701", f"bad magic at {off}"
        f = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        namesize, size = f[11], f[6]
        name = data[off + 110 : off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        body = data[off : off + size]
        off += size
        off += -off % 4
        if name == "TRAILER!!!":
            return out
        out.append({"name": name, "ino": f[0], "mode": f[1], "uid": f[2], "gid": f[3], "nlink": f[4],
                    "mtime": f[5], "rdev": (f[9], f[10]), "data": body})



def busybox() -> str:
    return require_tool("busybox")



def run_sh(script: str) -> str:
    r = subprocess.run([busybox(), "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout



def lib_sh(tmp_path: Path) -> Path:
    p = tmp_path / "bootorch.sh"
    p.write_text(LIB_SH)
    return p



def tiny_plan(tmp_path: Path, **profile: object) -> Path:
    prof = {"kernel": "vmlinuz", "initrd": "rootfs.gz", "root": "initramfs", "ip": "dhcp",
            "append": "console=ttyS0 panic=10", **profile}
    plan = {
        "version": 1,
        "name": "imgtest",
        "state_dir": "state",
        "network": {"subnet": "10.0.2.0/24", "server": "10.0.2.2", "gateway": "10.0.2.2"},
        "boot": {"root": "tftpboot"},
        "profiles": {"ramdisk": prof},
        "nodes": [{"name": "node01", "mac": "52:54:00:77:00:01", "ip": "10.0.2.15"}],
        "readiness": {"ssh": {"key": "ssh/id_ed25519"}},
    }
    p = tmp_path / "plan.yaml"
    p.write_text(json.dumps(plan))  # JSON is YAML
    return p

