"""Real DHCP clients in the lab's client namespace: busybox ``udhcpc`` and ISC ``dhclient``.

:func:`run_udhcpc` and :func:`run_dhclient` run one client against whatever
server the :class:`~tests.dhcp_lab.DhcpPair` has, each with a lease script that
configures nothing and dumps the environment it receives into a file per
event; the result comes back as a :class:`ClientResult`.

Every process has a timeout; every wait loop is bounded in time.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from orchestrator.lab.netns import NetnsError
from tests.dhcp_lab import DhcpPair, HarnessError, tool

#: The vendor class a BIOS PXE ROM sends (arch 0, UNDI 2.1).
PXE_VENDOR_CLASS = "PXEClient:Arch:00000:UNDI:002001"
#: Options a PXE ROM puts in its parameter request list (the part we care about).
PXE_REQUEST_OPTIONS = (1, 3, 43, 54, 60, 66, 67)


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
# pytest glue (import lazily: bench/ uses this module without pytest's fixtures)
# ---------------------------------------------------------------------------------

def require_client(name: str) -> None:
    from tests.conftest import require_tool

    if name == "udhcpc":
        require_tool("busybox", "/bin/busybox")
    elif name == "dhclient":
        require_tool("dhclient", "/sbin/dhclient", "/usr/sbin/dhclient")
    else:
        raise ValueError(name)
