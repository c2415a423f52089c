"""Real-peer harness for DHCP: namespaces, servers, real clients, captured replies.

Not a test module: ``tests/test_dhcp_peers.py`` and ``bench/dhcp_bench.py``
build on it. Everything happens inside two network namespaces that
:func:`dhcp_pair` creates, joined by one veth::

    [server ns]  ds<tok> 10.66.0.1/24  <==veth==>  dc<tok> (no address, fixed MAC)  [client ns]

DHCP is broadcast, so nothing here ever touches an interface of the root
namespace: the veth is created with both ends already inside our namespaces,
and ``NetLab`` (``orchestrator/lab/netns.py``) deletes the namespaces -- and with
them the veth -- and kills every process it started, by PID, on exit.

Pieces
------

* :func:`dhcp_pair` -- the namespace pair. ``NetLab.veth`` addresses both ends
  from a /30, which leaves no room for a pool and gives the *client* an
  address, so the pair is built by a small local helper (:func:`_veth_pair`)
  on top of ``NetLab.namespace`` (netns.py itself is not ours to change).
* :class:`ServerConfig` + :func:`start_server` -- one config, rendered for each
  server we compare: ``dnsmasq``, ``kea`` (kea-dhcp4, memfile), ``dhcpd`` (ISC)
  and ``ours`` (``python -m orchestrator.bootserver.dhcp_cli``). Every server
  gets the same subnet, pool, reservations, boot file ``pxelinux.0`` with
  next-server = the server's address for PXE clients only (vendor class
  ``PXEClient...``), and for those also option 60 ``PXEClient`` and option 43
  ``01 04 00 00 00 00 ff`` (PXE sub-option 1, MTFTP IP 0.0.0.0 -- the classic
  ``option PXE.mtftp-ip 0.0.0.0`` that makes Intel/UNDI ROMs accept the offer).
* :func:`run_udhcpc`, :func:`run_dhclient` -- real clients in the client
  namespace, each with a lease script that dumps the environment it receives
  into a file per event; results come back as :class:`ClientResult`.
* :class:`Capture` -- a raw ``AF_PACKET`` socket in the client namespace
  (``python -m tests.dhcp_harness capture``) writing every UDP 67/68 frame to a
  pcap file; :func:`decode_pcap` decodes it with **scapy**, an independent
  decoder (never with ``orchestrator.protocols.dhcp``).

Every process has a timeout; every wait loop is bounded in time.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from orchestrator.lab.netns import Namespace, NetLab, NetnsError

REPO = Path(__file__).resolve().parent.parent

#: The vendor class a BIOS PXE ROM sends (arch 0, UNDI 2.1).
PXE_VENDOR_CLASS = "PXEClient:Arch:00000:UNDI:002001"
#: Option 43 every server is configured to send PXE clients: sub-option 1
#: (PXE_MTFTP_IP) = 0.0.0.0, then END.
PXE_OPTION_43 = bytes.fromhex("0104000000" "00ff")
BOOT_FILE = "pxelinux.0"
#: Options a PXE ROM puts in its parameter request list (the part we care about).
PXE_REQUEST_OPTIONS = (1, 3, 43, 54, 60, 66, 67)

SERVER_KINDS = ("dnsmasq", "kea", "dhcpd", "ours")
OURS_MODULE = "orchestrator.bootserver.dhcp_cli"
OURS_PATH = REPO / "orchestrator" / "bootserver" / "dhcp_cli.py"

DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68


class HarnessError(RuntimeError):
    """A server or client could not be run; the message says what and shows its log."""


# ---------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------

def tool(name: str, *candidates: str) -> str | None:
    """Path of an external program (PATH, then absolute candidates), or None."""
    for cand in (name, *candidates):
        path = shutil.which(cand)
        if path:
            return path
        if os.path.isabs(cand) and os.access(cand, os.X_OK):
            return cand
    return None


#: What each server kind needs installed (program, Debian package).
SERVER_TOOLS = {
    "dnsmasq": ("dnsmasq", "/usr/sbin/dnsmasq", "dnsmasq"),
    "kea": ("kea-dhcp4", "/usr/sbin/kea-dhcp4", "kea-dhcp4-server"),
    "dhcpd": ("dhcpd", "/usr/sbin/dhcpd", "isc-dhcp-server"),
}


def ours_available() -> bool:
    """True once the lead's CLI exists (until then, ``ours`` is skipped, never failed)."""
    return OURS_PATH.exists()


def server_missing(kind: str) -> str | None:
    """Why ``kind`` cannot run here, or None."""
    if kind == "ours":
        return None if ours_available() else f"{OURS_MODULE} does not exist yet"
    prog, abs_path, pkg = SERVER_TOOLS[kind]
    return None if tool(prog, abs_path) else f"{prog} not installed (Debian package {pkg})"


# ---------------------------------------------------------------------------------
# The namespace pair
# ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class DhcpPair:
    """Server and client namespaces joined by one veth, and where files go."""

    lab: NetLab
    server_ns: Namespace
    client_ns: Namespace
    server_if: str
    client_if: str
    server_ip: str
    client_mac: str
    subnet: ipaddress.IPv4Network
    workdir: Path
    client_ip: str | None = None  # set only for relay-style clients (perfdhcp)

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen


def _ip(ns: Namespace, *args: str, timeout: float = 15) -> None:
    argv = ["ip", "-n", ns.name, *args]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if cp.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {cp.returncode}: {cp.stderr.strip()}")


def _veth_pair(a: Namespace, b: Namespace, a_dev: str, b_dev: str, *, b_mac: str | None) -> None:
    """A veth with both ends created directly inside our namespaces, no addresses.

    Local stand-in for ``NetLab.veth``, which always addresses both ends from a
    /30. Never touches the root namespace; deleting either namespace removes it.
    """
    argv = ["ip", "link", "add", a_dev, "netns", a.name, "type", "veth", "peer", "name", b_dev, "netns", b.name]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    if cp.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {cp.returncode}: {cp.stderr.strip()}")
    if b_mac:
        _ip(b, "link", "set", b_dev, "address", b_mac)


def _quiet_ipv6(ns: Namespace) -> None:
    """No IPv6 in our namespaces: keeps router solicitations and MLD out of captures."""
    for key in ("all", "default"):
        path = f"/proc/sys/net/ipv6/conf/{key}/disable_ipv6"
        subprocess.run(ns.exec_argv(["sh", "-c", f"[ -w {path} ] && echo 1 > {path} || true"]),
                       capture_output=True, timeout=15)


def random_mac(token: str = "") -> str:
    """A locally administered unicast MAC (02:...)."""
    raw = bytes.fromhex((token or os.urandom(5).hex())[:10].ljust(10, "0"))
    return "02:" + ":".join(f"{b:02x}" for b in raw)


def dhcp_pair(lab: NetLab, workdir: Path, *, subnet: str = "10.66.0.0/24", client_mac: str | None = None,
              client_ip: str | None = None) -> DhcpPair:
    """Create the server/client namespace pair.

    The server end gets the subnet's first host address. The client end gets
    ``client_mac`` (random locally administered by default) and no address,
    unless ``client_ip`` is given (perfdhcp speaks as a relay from an address).
    """
    net = ipaddress.IPv4Network(subnet)
    server_ip = str(next(net.hosts()))
    sns, cns = lab.namespace("ds"), lab.namespace("dc")
    s_if, c_if = f"ds{lab.token}", f"dc{lab.token}"
    mac = client_mac or random_mac()
    _veth_pair(sns, cns, s_if, c_if, b_mac=mac)
    for ns in (sns, cns):
        _quiet_ipv6(ns)
    _ip(sns, "addr", "add", f"{server_ip}/{net.prefixlen}", "dev", s_if)
    if client_ip:
        _ip(cns, "addr", "add", f"{client_ip}/{net.prefixlen}", "dev", c_if)
    _ip(sns, "link", "set", s_if, "up")
    _ip(cns, "link", "set", c_if, "up")
    workdir.mkdir(parents=True, exist_ok=True)
    return DhcpPair(lab, sns, cns, s_if, c_if, server_ip, mac, net, workdir, client_ip)


# ---------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------

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
# Clients
# ---------------------------------------------------------------------------------

@dataclass
class ClientResult:
    """What a real client got. ``env`` is what its script saw on the success event."""

    client: str
    returncode: int | None
    env: dict[str, str]
    events: list[str]
    elapsed: float
    output: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.ip)

    @property
    def ip(self) -> str | None:
        return self.env.get("ip") or self.env.get("new_ip_address")

    @property
    def server_id(self) -> str | None:
        return self.env.get("serverid") or self.env.get("new_dhcp_server_identifier")

    @property
    def boot_file(self) -> str | None:
        """The BOOTP ``file`` field, else option 67 (dnsmasq uses 67 when the client asks for it)."""
        return (self.env.get("boot_file") or self.env.get("new_filename") or self.env.get("bootfile")
                or self.env.get("new_bootfile_name"))

    @property
    def next_server(self) -> str | None:
        """siaddr (udhcpc exports it; dhclient 4.4 does not -- use the capture)."""
        return self.env.get("siaddr") or self.env.get("new_next_server")

    @property
    def subnet_mask(self) -> str | None:
        return self.env.get("subnet") or self.env.get("new_subnet_mask")

    @property
    def lease_time(self) -> int | None:
        v = self.env.get("lease") or self.env.get("new_dhcp_lease_time")
        return int(v) if v and v.isdigit() else None


_DUMP_SCRIPT = """#!/bin/sh
# Lease script for the DHCP harness: configures nothing, records what it is told.
# udhcpc passes the event as $1; dhclient sets $reason.
ev="${{1:-$reason}}"
env > "{d}/$ev.env"
echo "$ev" >> "{d}/events"
exit 0
"""


def _dump_script(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    script = d / "lease-script.sh"
    script.write_text(_DUMP_SCRIPT.format(d=d))
    script.chmod(0o755)
    return script


def _read_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return env
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            env[key] = value
    return env


def _events(d: Path) -> list[str]:
    try:
        return (d / "events").read_text().split()
    except OSError:
        return []


_run_counter = 0

#: Clients run with this environment only, so the script's dump holds just what the client set.
CLIENT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


def _client_dir(pair: DhcpPair, name: str) -> Path:
    global _run_counter
    _run_counter += 1
    d = pair.workdir / f"{name}-{_run_counter}"
    d.mkdir(parents=True)
    return d


def run_udhcpc(pair: DhcpPair, *, vendor_class: str | None = PXE_VENDOR_CLASS, tries: int = 3,
               request_options: Iterable[int] = PXE_REQUEST_OPTIONS, extra: Sequence[str] = (),
               timeout: float = 30.0) -> ClientResult:
    """``busybox udhcpc -i IF -n -q -f -s SCRIPT [-V VC] -t N -T 1`` in the client namespace.

    ``-n`` exit if no lease, ``-q`` exit after getting one, ``-f`` foreground,
    ``-t``/``-T`` retries and seconds between them. ``-O N`` adds options to
    the parameter request list (a PXE ROM asks for 43 and 60, so the PXE
    default does too). The script records each event's environment
    (``ip subnet router siaddr boot_file sname serverid lease opt43 ...``).
    """
    busybox = tool("busybox", "/bin/busybox", "/usr/bin/busybox")
    if not busybox:
        raise HarnessError("busybox not installed (Debian package busybox-static or busybox)")
    d = _client_dir(pair, "udhcpc")
    script = _dump_script(d)
    argv = [busybox, "udhcpc", "-i", pair.client_if, "-n", "-q", "-f", "-s", str(script),
            "-t", str(tries), "-T", "1"]
    if vendor_class:
        argv += ["-V", vendor_class]
    for opt in request_options:
        argv += ["-O", str(opt)]
    argv += list(extra)
    t0 = time.monotonic()
    timed_out = False
    try:
        cp = pair.lab.run(pair.client_ns, argv, timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=CLIENT_ENV)
        rc, out = cp.returncode, cp.stdout or ""
    except NetnsError as e:
        rc, out, timed_out = None, str(e), True
    elapsed = time.monotonic() - t0
    events = _events(d)
    env = _read_env(d / "bound.env") if "bound" in events else {}
    return ClientResult("udhcpc", rc, env, events, elapsed, out, timed_out)


_DHCLIENT_CONF = """# DHCP harness: dhclient configuration
timeout {timeout};
retry 1;
initial-interval 1;
backoff-cutoff 2;
{vendor}request subnet-mask, broadcast-address, routers, domain-name-servers, host-name,
        dhcp-server-identifier, dhcp-lease-time, vendor-encapsulated-options, vendor-class-identifier;
"""


def run_dhclient(pair: DhcpPair, *, vendor_class: str | None = PXE_VENDOR_CLASS, lease_timeout: int = 15,
                 timeout: float = 30.0) -> ClientResult:
    """ISC ``dhclient -d -1 -v -cf CONF -sf SCRIPT -lf LEASEFILE -pf PIDFILE IF`` in the client namespace.

    ``-1``: one try, exit 2 if no lease within the config's ``timeout``. ``-d``
    keeps it in the foreground: without it dhclient forks a daemon (new
    session) after binding, which we would then have to find by pid file. With
    ``-d`` it keeps running after BOUND, so we stop it (by PID) as soon as the
    script has recorded BOUND. The config sends ``vendor-class-identifier``.
    """
    dhclient = tool("dhclient", "/sbin/dhclient", "/usr/sbin/dhclient")
    if not dhclient:
        raise HarnessError("dhclient not installed (Debian package isc-dhcp-client)")
    d = _client_dir(pair, "dhclient")
    script = _dump_script(d)
    conf = d / "dhclient.conf"
    vendor = f'send vendor-class-identifier "{vendor_class}";\n' if vendor_class else ""
    conf.write_text(_DHCLIENT_CONF.format(timeout=lease_timeout, vendor=vendor))
    argv = [dhclient, "-d", "-1", "-v", "-cf", str(conf), "-sf", str(script), "-lf", str(d / "dhclient.leases"),
            "-pf", str(d / "dhclient.pid"), pair.client_if]
    out_path = d / "dhclient.out"
    t0 = time.monotonic()
    with open(out_path, "wb") as fh:
        proc = pair.lab.popen(pair.client_ns, argv, stdout=fh, stderr=subprocess.STDOUT, env=CLIENT_ENV)
    deadline = t0 + timeout
    timed_out = True
    while time.monotonic() < deadline:
        if {"BOUND", "RENEW", "REBOOT"} & set(_events(d)):
            timed_out = False
            break
        if proc.poll() is not None:
            timed_out = False
            break
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    pair.lab.kill(proc)
    events = _events(d)
    env: dict[str, str] = {}
    for ev in ("BOUND", "REBOOT", "RENEW"):
        if ev in events:
            env = _read_env(d / f"{ev}.env")
            break
    out = out_path.read_text(errors="replace")
    return ClientResult("dhclient", proc.returncode, env, events, elapsed, out, timed_out)


CLIENTS = {"udhcpc": run_udhcpc, "dhclient": run_dhclient}


# ---------------------------------------------------------------------------------
# Capture (raw AF_PACKET socket) and independent decoding (scapy)
# ---------------------------------------------------------------------------------

class Capture:
    """Capture UDP 67/68 frames on the client interface into ``path`` (pcap).

    Runs ``python -m tests.dhcp_harness capture`` inside the client namespace
    (a process cannot change namespace per thread in Python 3.11). Use as a
    context manager; it stops by itself after ``max_seconds`` or ``max_packets``.
    """

    def __init__(self, pair: DhcpPair, path: Path | None = None, *, max_seconds: float = 120,
                 max_packets: int = 10_000) -> None:
        self.pair = pair
        self.path = path or pair.workdir / f"capture-{time.monotonic_ns()}.pcap"
        self.max_seconds = max_seconds
        self.max_packets = max_packets
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Capture":
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        argv = [sys.executable, "-m", "tests.dhcp_harness", "capture", self.pair.client_if, str(self.path),
                "--seconds", str(self.max_seconds), "--count", str(self.max_packets)]
        self.proc = self.pair.lab.popen(self.pair.client_ns, argv, stdout=subprocess.PIPE, env=env, cwd=str(REPO))
        assert self.proc.stdout is not None
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], 15.0)  # bounded wait for "ready"
        line = self.proc.stdout.readline() if ready else b"(nothing within 15 s)"
        if line.strip() != b"ready":
            self.pair.lab.kill(self.proc)
            raise HarnessError(f"capture did not start (said {line!r})")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None:
            time.sleep(0.1)  # let the last reply in flight land
            self.pair.lab.kill(self.proc)
            self.proc = None

    def decode(self) -> list["DhcpPacket"]:
        return decode_pcap(self.path)


def _capture_main(ifname: str, path: str, seconds: float, count: int) -> int:
    """Write every IPv4/UDP frame to or from port 67/68 seen on ``ifname`` to a pcap file."""
    import select
    import socket
    import struct

    ETH_P_ALL = 0x0003
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    deadline = time.monotonic() + seconds
    n = 0
    with open(path, "wb") as f:
        # pcap global header: magic, v2.4, tz 0, sigfigs 0, snaplen, LINKTYPE_ETHERNET
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        f.flush()
        print("ready", flush=True)
        while not stop and n < count and time.monotonic() < deadline:
            try:
                r, _, _ = select.select([s], [], [], 0.1)
            except InterruptedError:
                continue
            if not r:
                continue
            frame = s.recv(65535)
            # Ethernet type IPv4, IP proto UDP, either port 67/68.
            if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
                continue
            ihl = (frame[14] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
            if not ({sport, dport} & {DHCP_SERVER_PORT, DHCP_CLIENT_PORT}):
                continue
            now = time.time()
            f.write(struct.pack("<IIII", int(now), int((now % 1) * 1e6), len(frame), len(frame)) + frame)
            f.flush()
            n += 1
    return 0


@dataclass(frozen=True)
class DhcpPacket:
    """One captured BOOTP/DHCP packet as scapy decoded it.

    ``options`` maps option *code* to the value scapy gives (bytes, str, int,
    list); ``file``/``sname`` have their NUL padding stripped.
    """

    time: float
    src_mac: str
    dst_mac: str
    src_ip: str
    dst_ip: str
    sport: int
    dport: int
    op: int
    xid: int
    flags: int
    ciaddr: str
    yiaddr: str
    siaddr: str
    giaddr: str
    chaddr: str
    sname: str
    file: str
    options: dict[int, object]

    @property
    def message_type(self) -> str | None:
        from scapy.layers.dhcp import DHCPTypes

        v = self.options.get(53)
        return DHCPTypes.get(v, str(v)) if isinstance(v, int) else None

    @property
    def boot_file(self) -> str:
        """The ``file`` field, else option 67 (RFC 2132 9.5): dnsmasq moves it there when asked for 67."""
        return self.file or (self.opt_bytes(67) or b"").rstrip(b"\0").decode("latin-1")

    @property
    def is_reply(self) -> bool:
        return self.op == 2

    def opt_bytes(self, code: int) -> bytes | None:
        v = self.options.get(code)
        if v is None:
            return None
        if isinstance(v, bytes):
            return v
        if isinstance(v, str):
            return v.encode()
        return None

    @property
    def vendor_class(self) -> bytes | None:
        return self.opt_bytes(60)

    @property
    def pxe_suboptions(self) -> dict[int, bytes] | None:
        """Option 43 split into PXE sub-options (None when absent; raises ValueError when malformed)."""
        raw = self.opt_bytes(43)
        return None if raw is None else parse_suboptions(raw)


def parse_suboptions(raw: bytes) -> dict[int, bytes]:
    """TLV sub-options of option 43 (PXE spec 2.1, section 2.2.5): code, len, value; 0 pad, 255 end."""
    out: dict[int, bytes] = {}
    i = 0
    while i < len(raw):
        code = raw[i]
        if code == 255:
            return out
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(raw) or i + 2 + raw[i + 1] > len(raw):
            raise ValueError(f"option 43 sub-option {code} runs past the end: {raw.hex()}")
        out[code] = raw[i + 2:i + 2 + raw[i + 1]]
        i += 2 + raw[i + 1]
    return out


def decode_pcap(path: Path) -> list[DhcpPacket]:
    """Decode a capture with scapy (``scapy.layers.dhcp``): our codec is never involved."""
    from scapy.layers.dhcp import BOOTP, DHCP, DHCPRevOptions
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap

    out: list[DhcpPacket] = []
    for pkt in rdpcap(str(path)):
        if BOOTP not in pkt:
            continue
        b = pkt[BOOTP]
        opts: dict[int, object] = {}
        if DHCP in pkt:
            for item in pkt[DHCP].options:
                if not isinstance(item, tuple) or not item:
                    continue  # "end" / "pad"
                name, *vals = item
                value = vals[0] if len(vals) == 1 else vals
                if isinstance(name, int):
                    code = name
                elif name in DHCPRevOptions:
                    code = DHCPRevOptions[name][0]
                else:
                    continue
                if code is not None:
                    opts[code] = value
        out.append(DhcpPacket(
            time=float(pkt.time), src_mac=pkt[Ether].src, dst_mac=pkt[Ether].dst,
            src_ip=pkt[IP].src, dst_ip=pkt[IP].dst, sport=pkt[UDP].sport, dport=pkt[UDP].dport,
            op=b.op, xid=b.xid, flags=int(b.flags), ciaddr=b.ciaddr, yiaddr=b.yiaddr, siaddr=b.siaddr,
            giaddr=b.giaddr, chaddr=":".join(f"{x:02x}" for x in bytes(b.chaddr)[:6]),
            sname=bytes(b.sname).rstrip(b"\0").decode("latin-1"),
            file=bytes(b.file).rstrip(b"\0").decode("latin-1"),
            options=opts,
        ))
    return out


def replies(packets: Iterable[DhcpPacket], message_type: str | None = None, *,
            chaddr: str | None = None) -> list[DhcpPacket]:
    """Server replies (op 2), optionally of one message type (``offer``, ``ack``, ``nak``) and for one MAC."""
    return [p for p in packets if p.is_reply and (message_type is None or p.message_type == message_type)
            and (chaddr is None or p.chaddr == chaddr.lower())]


def requests(packets: Iterable[DhcpPacket], message_type: str | None = None) -> list[DhcpPacket]:
    return [p for p in packets if p.op == 1 and (message_type is None or p.message_type == message_type)]


# ---------------------------------------------------------------------------------
# pytest glue (import lazily: bench/ uses this module without pytest's fixtures)
# ---------------------------------------------------------------------------------

def require_server(kind: str) -> None:
    """Skip (fail under CI) when a peer server is missing; ``ours`` only ever skips until it exists."""
    import pytest

    from tests.conftest import require_tool

    if kind == "ours":
        if not ours_available():
            pytest.skip(f"{OURS_MODULE} does not exist yet")
        return
    prog, abs_path, _pkg = SERVER_TOOLS[kind]
    require_tool(prog, abs_path)


def require_client(name: str) -> None:
    from tests.conftest import require_tool

    if name == "udhcpc":
        require_tool("busybox", "/bin/busybox")
    elif name == "dhclient":
        require_tool("dhclient", "/sbin/dhclient", "/usr/sbin/dhclient")
    else:
        raise ValueError(name)


def require_decoder() -> None:
    import pytest

    from tests.conftest import IN_CI

    try:
        import scapy.layers.dhcp  # noqa: F401
    except ImportError:
        msg = "scapy (the independent DHCP decoder) is not installed: pip install scapy"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tests.dhcp_harness")
    sub = ap.add_subparsers(dest="cmd", required=True)
    cap = sub.add_parser("capture", help="raw capture of UDP 67/68 on IF into a pcap file")
    cap.add_argument("ifname")
    cap.add_argument("path")
    cap.add_argument("--seconds", type=float, default=120)
    cap.add_argument("--count", type=int, default=10_000)
    args = ap.parse_args(argv)
    return _capture_main(args.ifname, args.path, args.seconds, args.count)


if __name__ == "__main__":
    raise SystemExit(_main())
