"""Plans and boot files for simulated clusters (the storm bench and the tests use this).

:func:`write_sim_plan` writes, under one directory: ``tftpboot/`` with a loader,
a kernel and an initrd of the chosen sizes (random bytes: the simulator fetches
them, it does not boot them), an SSH client key for readiness, and
``plan.yaml`` whose nodes use ``power.bmc: {driver: sim}`` and whose
``network.namespace``/``interface`` name the topology ``bootorch sim up``
builds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUBNET = "10.98.0.0/16"
SERVER = "10.98.0.1"
FIRST_NODE_IP = "10.98.1.1"


def write_client_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _random_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.exists() and path.stat().st_size == size):
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 1 << 20)
                f.write(os.urandom(n))
                left -= n
    path.chmod(0o644)  # the boot servers serve only files others may read (tftpd-hpa's rule)


@dataclass
class SimPlan:
    nodes: int
    namespace: str
    interface: str
    control: str
    loader_size: int = 42_000
    kernel_size: int = 700_000
    initrd_size: int = 3_800_000
    max_downloading: int = 16
    adaptive: bool = True
    power_on_rate: float = 20.0
    max_transfers: int = 200
    timeouts: dict[str, Any] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=lambda: {"wake": 1, "power_cycle": 1})
    failure_budget: int | str = "100%"
    metrics_listen: str = ""
    checks: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "kernel", "kernel": r"^6\."}])
    name: str = "sim"
    #: The boot network: several simulators behind one orchestrator each need their own.
    subnet: str = SUBNET
    server: str = SERVER
    first_node_ip: str = FIRST_NODE_IP
    #: First MAC (counted up per node) and node name prefix: unique across simulators.
    first_mac: str = "52:54:00:5a:00:01"
    node_prefix: str = "node"
    #: ``rack:`` of every node (an orchestrator's ``servers:`` entry names it).
    rack: str | None = None

    @property
    def bytes_per_node(self) -> int:
        return self.loader_size + self.kernel_size + self.initrd_size


def write_sim_plan(directory: Path, sp: SimPlan) -> Path:
    """Boot files, SSH key and plan.yaml under ``directory``; returns the plan's path."""
    directory = Path(directory)
    boot = directory / "tftpboot"
    _random_file(boot / "pxelinux.0", sp.loader_size)
    _random_file(boot / "vmlinuz", sp.kernel_size)
    _random_file(boot / "initrd.img", sp.initrd_size)
    key = directory / "ssh" / "id_ed25519"
    if not key.exists():
        write_client_key(key)
    width = max(3, len(str(sp.nodes)))
    plan: dict[str, Any] = {
        "version": 1,
        "name": sp.name,
        "state_dir": "state",
        "network": {"namespace": sp.namespace, "interface": sp.interface, "subnet": sp.subnet, "server": sp.server},
        "dhcp": {"mode": "full", "lease_time": "1h"},
        "boot": {"root": "tftpboot", "config_names": ["mac", "ip"]},
        "bootserver": {"max_transfers": sp.max_transfers},
        "profiles": {"sim": {"kernel": "vmlinuz", "initrd": "initrd.img", "root": "initramfs", "ip": "dhcp"}},
        "nodes": [{"name": f"{sp.node_prefix}[{1:0{width}d}-{sp.nodes:0{width}d}]", "mac": sp.first_mac,
                   "ip": sp.first_node_ip, "profile": "sim", **({"rack": sp.rack} if sp.rack else {})}],
        "power": {"wol": {"method": "raw", "repeat": 1}, "bmc": {"driver": "sim", "address": sp.control}},
        "rollout": {
            "admission": {"max_downloading": sp.max_downloading, "adaptive": sp.adaptive,
                          "power_on_rate": sp.power_on_rate},
            "timeouts": sp.timeouts,
            "retries": sp.retries,
            "failure_budget": sp.failure_budget,
        },
        "readiness": {"ssh": {"user": "root", "key": "ssh/id_ed25519", "host_key_policy": "tofu"}, "checks": sp.checks},
        "metrics": {"listen": sp.metrics_listen},
    }
    path = directory / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path
