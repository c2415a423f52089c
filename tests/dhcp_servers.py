"""The DHCP servers we compare, each started from one config in the lab's server namespace.

:class:`ServerConfig` says what every server is asked to do; :func:`server_argv`
renders it for ``dnsmasq``, ``kea`` (kea-dhcp4, memfile), ``dhcpd`` (ISC) and
``ours`` (``python -m orchestrator.bootserver.dhcp_cli``), and :func:`start_server`
runs one in a :class:`~tests.dhcp_lab.DhcpPair`'s server namespace and waits
until it listens. Every server gets the same subnet, pool, reservations, boot
file ``pxelinux.0`` with next-server = the server's address for PXE clients
only (vendor class ``PXEClient...``), and for those also option 60
``PXEClient`` and option 43 ``01 04 00 00 00 00 ff`` (PXE sub-option 1, MTFTP
IP 0.0.0.0 -- the classic ``option PXE.mtftp-ip 0.0.0.0`` that makes Intel/UNDI
ROMs accept the offer).

Every process has a timeout; every wait loop is bounded in time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from orchestrator.lab.netns import Namespace
from tests.dhcp_lab import DHCP_SERVER_PORT, REPO, DhcpPair, HarnessError, tool

#: Option 43 every server is configured to send PXE clients: sub-option 1
#: (PXE_MTFTP_IP) = 0.0.0.0, then END.
PXE_OPTION_43 = bytes.fromhex("0104000000" "00ff")
BOOT_FILE = "pxelinux.0"

SERVER_KINDS = ("dnsmasq", "kea", "dhcpd", "ours")
OURS_MODULE = "orchestrator.bootserver.dhcp_cli"
OURS_PATH = REPO / "orchestrator" / "bootserver" / "dhcp_cli.py"

#: What each server kind needs installed (program, Debian package).
SERVER_TOOLS = {
    "dnsmasq": ("dnsmasq", "/usr/sbin/dnsmasq", "dnsmasq"),
    "kea": ("kea-dhcp4", "/usr/sbin/kea-dhcp4", "kea-dhcp4-server"),
    "dhcpd": ("dhcpd", "/usr/sbin/dhcpd", "isc-dhcp-server"),
}


def ours_available() -> bool:
    """True when this checkout has our DHCP CLI; without it ``ours`` is skipped, never failed."""
    return OURS_PATH.exists()


def server_missing(kind: str) -> str | None:
    """Why ``kind`` cannot run here, or None."""
    if kind == "ours":
        return None if ours_available() else f"{OURS_MODULE} does not exist yet"
    prog, abs_path, pkg = SERVER_TOOLS[kind]
    return None if tool(prog, abs_path) else f"{prog} not installed (Debian package {pkg})"


@dataclass(frozen=True)
class ServerConfig:
    """What every server is asked to do, whatever its config language.

    ``pool`` None means "reservations only" (unknown clients are ignored).
    ``fast`` drops per-packet logging (the benchmark's setting).

    The ping-before-offer checks that dnsmasq and dhcpd make by default are
    always off: each delays an OFFER of a new pool address by one to three
    seconds (past udhcpc's and perfdhcp's 1 s retry/drop time), Kea and ours do
    not ping, and every address here lives in namespaces we just made.
    """

    subnet: str = "10.66.0.0/24"
    pool: tuple[str, str] | None = ("10.66.0.100", "10.66.0.199")
    reservations: tuple[tuple[str, str], ...] = ()
    boot_file: str = BOOT_FILE
    lease_time: int = 3600
    fast: bool = False

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def pool_size(self) -> int:
        if not self.pool:
            return 0
        return int(ipaddress.IPv4Address(self.pool[1])) - int(ipaddress.IPv4Address(self.pool[0])) + 1


@dataclass
class ServerHandle:
    kind: str
    argv: list[str]
    proc: subprocess.Popen
    log: Path
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self, tail: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None


def _dnsmasq_argv(cfg: ServerConfig, pair: DhcpPair, d: Path) -> list[str]:
    net = cfg.network
    mask = str(net.netmask)
    argv = [
        tool("dnsmasq", "/usr/sbin/dnsmasq") or "dnsmasq",
        "-k", "--port=0", "--conf-file=/dev/null", "--log-facility=-",
        f"--interface={pair.server_if}", "--bind-interfaces", "--except-interface=lo",
        f"--dhcp-leasefile={d / 'dnsmasq.leases'}", f"--pid-file={d / 'dnsmasq.pid'}",
        "--user=root", "--group=root",  # our run directory is root's; no privilege drop games
        "--dhcp-authoritative",
        f"--dhcp-lease-max={max(1000, cfg.pool_size + len(cfg.reservations) + 16)}",
        "--dhcp-vendorclass=set:pxe,PXEClient",
        f"--dhcp-boot=tag:pxe,{cfg.boot_file},,{pair.server_ip}",
        # option 43 (vendor:PXEClient encapsulation) and option 60 back to PXE clients
        "--dhcp-option-force=tag:pxe,vendor:PXEClient,1,0.0.0.0",
        "--dhcp-option-force=tag:pxe,60,PXEClient",
    ]
    if cfg.pool:
        argv.append(f"--dhcp-range={cfg.pool[0]},{cfg.pool[1]},{mask},{cfg.lease_time}")
    else:
        argv.append(f"--dhcp-range={net.network_address},static,{mask},{cfg.lease_time}")
    for mac, ip in cfg.reservations:
        argv.append(f"--dhcp-host={mac},{ip}")
    argv.append("--no-ping")  # see ServerConfig
    argv.append("--quiet-dhcp" if cfg.fast else "--log-dhcp")
    return argv


def kea_config(cfg: ServerConfig, pair: DhcpPair, d: Path) -> dict:
    """kea-dhcp4 configuration: memfile leases in ``d``, logs to stderr."""
    subnet: dict = {"id": 1, "subnet": cfg.subnet,
                    "reservations": [{"hw-address": m, "ip-address": ip} for m, ip in cfg.reservations]}
    if cfg.pool:
        subnet["pools"] = [{"pool": f"{cfg.pool[0]} - {cfg.pool[1]}"}]
    return {"Dhcp4": {
        "interfaces-config": {"interfaces": [pair.server_if], "dhcp-socket-type": "raw"},
        "lease-database": {"type": "memfile", "persist": True, "name": str(d / "kea-leases4.csv"),
                           "lfc-interval": 0},
        "valid-lifetime": cfg.lease_time,
        "renew-timer": cfg.lease_time // 2,
        "rebind-timer": cfg.lease_time * 7 // 8,
        "authoritative": True,
        "client-classes": [{
            "name": "PXE",
            "test": "substring(option[60].hex,0,9) == 'PXEClient'",
            "next-server": pair.server_ip,
            "boot-file-name": cfg.boot_file,
            # Kea lets a client class (re)define option 43 and nothing else.
            "option-def": [{"name": "vendor-encapsulated-options", "code": 43, "type": "binary"}],
            "option-data": [
                {"name": "vendor-encapsulated-options", "code": 43, "csv-format": False,
                 "data": PXE_OPTION_43.hex(), "always-send": True},
                {"name": "vendor-class-identifier", "data": "PXEClient", "always-send": True},
            ],
        }],
        "subnet4": [subnet],
        "loggers": [{"name": "kea-dhcp4", "output_options": [{"output": "stderr"}],
                     "severity": "WARN" if cfg.fast else "INFO"}],
    }}


def _kea_argv(cfg: ServerConfig, pair: DhcpPair, d: Path) -> list[str]:
    conf = d / "kea-dhcp4.json"
    conf.write_text(json.dumps(kea_config(cfg, pair, d), indent=2))
    return [tool("kea-dhcp4", "/usr/sbin/kea-dhcp4") or "kea-dhcp4", "-c", str(conf)]


def dhcpd_config(cfg: ServerConfig, pair: DhcpPair) -> str:
    net = cfg.network
    lines = [
        "authoritative;",
        "ddns-update-style none;",
        f"default-lease-time {cfg.lease_time};",
        f"max-lease-time {cfg.lease_time};",
        "ping-check false;",  # see ServerConfig
        "option space PXE;",
        "option PXE.mtftp-ip code 1 = ip-address;",
        'class "pxe" {',
        '  match if substring(option vendor-class-identifier, 0, 9) = "PXEClient";',
        "  vendor-option-space PXE;",
        "  option PXE.mtftp-ip 0.0.0.0;",
        '  option vendor-class-identifier "PXEClient";',
        f"  next-server {pair.server_ip};",
        f'  filename "{cfg.boot_file}";',
        "}",
        f"subnet {net.network_address} netmask {net.netmask} {{",
    ]
    if cfg.pool:
        lines.append(f"  range {cfg.pool[0]} {cfg.pool[1]};")
    else:
        lines.append("  deny unknown-clients;")
    lines.append("}")
    for i, (mac, ip) in enumerate(cfg.reservations):
        lines.append(f"host r{i} {{ hardware ethernet {mac}; fixed-address {ip}; }}")
    return "\n".join(lines) + "\n"


def _dhcpd_argv(cfg: ServerConfig, pair: DhcpPair, d: Path) -> list[str]:
    conf, leases = d / "dhcpd.conf", d / "dhcpd.leases"
    conf.write_text(dhcpd_config(cfg, pair))
    leases.touch()
    # -d: foreground + log to stderr (our log file); -f alone: foreground, logs to
    # syslog (none here, so: nowhere) -- the benchmark's choice.
    mode = "-f" if cfg.fast else "-d"
    return [tool("dhcpd", "/usr/sbin/dhcpd") or "dhcpd", "-4", mode, "-cf", str(conf), "-lf", str(leases),
            "-pf", str(d / "dhcpd.pid"), pair.server_if]


def _ours_argv(cfg: ServerConfig, pair: DhcpPair, d: Path) -> list[str]:
    """``python -m orchestrator.bootserver.dhcp_cli`` with the same subnet, pool, reservations and boot file."""
    argv = [sys.executable, "-m", OURS_MODULE, "--interface", pair.server_if, "--listen", "0.0.0.0",
            "--subnet", cfg.subnet, "--server", pair.server_ip, "--port", str(DHCP_SERVER_PORT),
            "--leases", str(d / "ours.leases"), "--boot-file", cfg.boot_file, "--lease-time", str(cfg.lease_time)]
    if cfg.pool:
        argv += ["--pool", f"{cfg.pool[0]}-{cfg.pool[1]}"]
    for mac, ip in cfg.reservations:
        argv += ["--host", f"{mac},{ip}"]
    if not cfg.fast:
        argv.append("-v")
    return argv


_BUILDERS = {"dnsmasq": _dnsmasq_argv, "kea": _kea_argv, "dhcpd": _dhcpd_argv, "ours": _ours_argv}


def server_argv(kind: str, cfg: ServerConfig, pair: DhcpPair, workdir: Path) -> list[str]:
    """The argv (config files written into ``workdir``) that runs server ``kind`` for ``cfg``."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown server kind {kind!r} (one of {', '.join(SERVER_KINDS)})")
    workdir.mkdir(parents=True, exist_ok=True)
    return _BUILDERS[kind](cfg, pair, workdir)


def udp_port_bound(ns: Namespace, port: int) -> bool:
    """True when some UDP socket in ``ns`` is bound to ``port`` (read from that namespace's /proc/net/udp)."""
    cp = subprocess.run(ns.exec_argv(["cat", "/proc/net/udp"]), capture_output=True, text=True, timeout=15)
    want = f":{port:04X}"
    for line in cp.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) > 1 and parts[1].endswith(want):
            return True
    return False


def start_server(pair: DhcpPair, kind: str, cfg: ServerConfig, *, argv: Sequence[str] | None = None,
                 ready_timeout: float = 20.0, settle: float = 0.3, tag: str = "") -> ServerHandle:
    """Start ``kind`` in the server namespace and wait until it is listening.

    Ready means: UDP port 67 bound in the server namespace (and, for ``ours``,
    ``listening on`` on its stderr), then ``settle`` seconds for raw packet
    sockets that some servers open after the UDP one. Raises
    :class:`HarnessError` with the log tail if it exits or never gets ready.
    ``argv`` overrides the generated command line (config files still written).
    Config, leases and log go to ``WORKDIR/server-KIND[-TAG]`` (a new ``tag``
    per run gives a server with no leases from the last one).
    """
    d = pair.workdir / (f"server-{kind}-{tag}" if tag else f"server-{kind}")
    built = server_argv(kind, cfg, pair, d)
    argv = list(argv) if argv is not None else built
    log = d / "server.log"
    fh = open(log, "wb")
    env = dict(os.environ)
    if kind == "kea":
        # Kea's pid file and logger lock default to /run/kea (absent when the
        # Debian service never ran); keep both in our run directory.
        env["KEA_PIDFILE_DIR"] = str(d)
        env["KEA_LOCKFILE_DIR"] = str(d)
    if kind == "ours":
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
    try:
        proc = pair.lab.popen(pair.server_ns, argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(d))
    finally:
        fh.close()
    h = ServerHandle(kind, argv, proc, log, {p.name: p for p in d.iterdir()})
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if not h.alive():
            raise HarnessError(f"{kind} exited {proc.returncode} while starting: {' '.join(argv)}\n{h.log_text()}")
        said = kind != "ours" or "listening on" in h.log_text(tail=100_000)
        if said and udp_port_bound(pair.server_ns, DHCP_SERVER_PORT):
            time.sleep(settle)
            if not h.alive():
                continue
            return h
        time.sleep(0.05)
    stop_server(pair, h)
    raise HarnessError(f"{kind} not listening on UDP {DHCP_SERVER_PORT} after {ready_timeout}s\n{h.log_text()}")


def stop_server(pair: DhcpPair, h: ServerHandle) -> None:
    """Stop the server by PID (SIGTERM, then SIGKILL after a grace period)."""
    pair.lab.kill(h.proc)


# ---------------------------------------------------------------------------------
# pytest glue (import lazily: bench/ uses this module without pytest's fixtures)
# ---------------------------------------------------------------------------------

def require_server(kind: str) -> None:
    """Skip (fail under CI) when a peer server is missing; ``ours`` without its CLI is skipped, never failed."""
    import pytest

    from tests.conftest import require_tool

    if kind == "ours":
        if not ours_available():
            pytest.skip(f"{OURS_MODULE} does not exist yet")
        return
    prog, abs_path, _pkg = SERVER_TOOLS[kind]
    require_tool(prog, abs_path)
