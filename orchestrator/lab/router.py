"""Routed racks in the lab: one router namespace with ISC ``dhcrelay`` per ``network.relayed`` subnet.

For the ``i``-th relayed subnet (1-based) ``lab up`` builds::

    lab namespace (lab.namespace)                 router namespace <lab.namespace>-r<i>
    ┌──────────────────────────────────┐          ┌────────────────────────────────────────────┐
    │ bridge network.interface         │  veth    │ "boot": router (10.82.0.254/24)            │
    │   network.server (10.82.0.1/24)  ├─ rtr<i> ─┤ ip_forward=1, bc_forwarding on "boot"       │
    │   boot-subnet nodes' taps        │          │ dhcrelay -id rack -iu boot network.server   │
    │ route <subnet> via <router>      │          │ bridge "rack": gateway (10.83.0.1/24)       │
    └──────────────────────────────────┘          │   the relayed nodes' taps; their QEMUs     │
                                                  └────────────────────────────────────────────┘

Why the rack bridge and its taps live in the router namespace: that keeps the
rack's layer 2 entirely out of the lab namespace, where bootorch's servers (and
the site's dnsmasq or dhcpd, ``lab.site``) run. A bridge without an address in
the lab namespace would still hand the rack's limited broadcasts
(255.255.255.255, the DHCPDISCOVERs) to every unbound socket on port 67 there:
bootorch's own socket is pinned to ``network.interface`` and would not hear
them, but a site server bound to ``0.0.0.0:67`` might answer directly, and the
test would no longer prove the relay path. Here a rack DHCPDISCOVER reaches the
boot network only as dhcrelay's unicast with giaddr set, as behind a real
router. The price: a relayed node's QEMU runs in the router namespace
(:func:`namespace_of`; QEMU opens its tap by name in its own namespace), and the
lab daemon's Wake-on-LAN listener for the rack opens its socket there
(:mod:`orchestrator.lab.wol_listener`, ``netns=``).

Wake-on-LAN across the router: ``wake: directed-broadcast`` (the default) sets
``net.ipv4.conf.all.bc_forwarding=1`` and ``net.ipv4.conf.boot.bc_forwarding=1``
in the router namespace, so a UDP magic packet to the subnet's broadcast address
that arrives on "boot" leaves "rack" as an Ethernet broadcast (what Cisco's ``ip
directed-broadcast`` does); with ``wake: bmc`` they stay off, as at a site that
forbids directed broadcasts.

Names and files: the router namespace is ``<lab.namespace>-r<i>``; the lab-side
veth ``rtr<i>``; in the router namespace the boot leg is ``boot`` and the rack
bridge ``rack``. ``lab.json`` lists the router namespaces (written before any is
created, so ``down`` after a crash removes them). dhcrelay runs in the
foreground (``-d``) with its PID file ``<state_dir>/lab/relay-r<i>.pid`` and its
log ``relay-r<i>.log`` (kept after ``down``); ``down`` kills it by PID after
checking that the process's command line names that PID file.

``router:`` (the router's boot-side address) is required by the lab: the lab
cannot guess an address nobody else uses on the boot subnet.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from orchestrator.lab.netns import run_checked
from orchestrator.lab.procs import is_ours as _is_ours
from orchestrator.lab.procs import kill as _kill
from orchestrator.lab.procs import read_pid as _read_pid

DHCRELAY = "dhcrelay"
#: Interface names inside a router namespace (its own namespace, so fixed names do not collide).
BOOT_LEG = "boot"
RACK_BRIDGE = "rack"
#: Seconds ``up`` waits for dhcrelay to open its interfaces.
RELAY_START_TIMEOUT = 10.0


@dataclass(frozen=True)
class Router:
    """One relayed subnet's router in the lab: names, addresses and files; nothing here touches the system."""

    index: int
    namespace: str
    subnet: IPv4Network
    gateway: IPv4Address
    router: IPv4Address
    boot_prefixlen: int
    server: IPv4Address
    lab_dir: Path
    directed_broadcast: bool

    @property
    def lab_leg(self) -> str:
        """The veth end in the lab namespace, a port of the boot bridge."""
        return f"rtr{self.index}"

    @property
    def pidfile(self) -> Path:
        return self.lab_dir / f"relay-r{self.index}.pid"

    @property
    def logfile(self) -> Path:
        return self.lab_dir / f"relay-r{self.index}.log"

    def relay_argv(self) -> list[str]:
        """ISC dhcrelay in the foreground: requests heard on the rack go to ``server`` with giaddr = the rack address."""
        return [DHCRELAY, "-4", "-d", "-pf", str(self.pidfile), "-id", RACK_BRIDGE, "-iu", BOOT_LEG, str(self.server)]


def routers(lab: Any) -> list[Router]:
    """The routers of ``lab`` (a :class:`orchestrator.lab.lab.Lab`), one per ``network.relayed`` entry."""
    net = lab.plan.model.network
    out = []
    for i, r in enumerate(net.relayed, 1):
        if r.router is None:
            raise RouterError(f"network.relayed entry {i} ({r.subnet}) has no router: the lab gives its router "
                              f"namespace that address on the boot subnet {net.subnet}; add e.g. router: {net.subnet[-1 - i]}")
        out.append(Router(i, f"{lab.namespace}-r{i}", r.subnet, r.gateway, r.router,
                          ipaddress.IPv4Network(net.subnet).prefixlen, lab.plan.model.network.server, lab.dir,
                          r.wake == "directed-broadcast"))
    return out


def router_of(lab: Any, node: Any) -> Router | None:
    """The router whose rack holds ``node`` (its address is in that relayed subnet), else None."""
    return next((r for r in routers(lab) if node.ip in r.subnet), None)


def namespace_of(lab: Any, node: Any) -> str:
    """The namespace ``node``'s tap and QEMU live in: its router's, or the lab's."""
    r = router_of(lab, node)
    return r.namespace if r is not None else lab.namespace


def bridge_of(lab: Any, node: Any) -> str:
    """The bridge ``node``'s tap is a port of."""
    return RACK_BRIDGE if router_of(lab, node) is not None else lab.bridge


# ----------------------------------------------------------------------------- system
# (lab.py imports this module, so the few process and link helpers are our own, not lab.py's.)


class RouterError(RuntimeError):
    """The lab cannot build a router the plan asks for; the message says why."""


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_checked(argv, timeout=30, check=check, error=RouterError)


def _say(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def namespace_exists(name: str) -> bool:
    return any(line.split()[0] == name for line in _run(["ip", "netns", "list"]).stdout.splitlines() if line.strip())


def link_exists(ns: str, dev: str) -> bool:
    return _run(["ip", "-n", ns, "link", "show", "dev", dev], check=False).returncode == 0


def relay_pid(r: Router) -> int | None:
    """The running dhcrelay's PID (its command line names our PID file), else None."""
    pid = _read_pid(r.pidfile)
    return pid if _is_ours(pid, str(r.pidfile)) else None


def up(lab: Any) -> list[Router]:
    """Create (or complete) every router of ``lab`` and start its relay; idempotent. Needs the lab namespace and bridge."""
    rs = routers(lab)
    if not rs:
        return rs
    if shutil.which(DHCRELAY) is None:
        raise RouterError("network.relayed needs ISC dhcrelay in the lab (Debian: apt-get install isc-dhcp-relay)")
    ns, br = lab.namespace, lab.bridge
    for r in rs:
        rn = r.namespace
        if not namespace_exists(rn):
            _run(["ip", "netns", "add", rn])
            _say(f"router namespace {rn} created for {r.subnet}")
        _run(["ip", "-n", rn, "link", "set", "lo", "up"])
        if not link_exists(ns, r.lab_leg):
            if link_exists(rn, BOOT_LEG):
                _run(["ip", "-n", rn, "link", "del", BOOT_LEG])  # half of a pair whose other half went
            _run(["ip", "-n", ns, "link", "add", r.lab_leg, "type", "veth", "peer", "name", BOOT_LEG, "netns", rn])
        _run(["ip", "-n", ns, "link", "set", r.lab_leg, "master", br, "up"])
        _address(rn, BOOT_LEG, f"{r.router}/{r.boot_prefixlen}")
        if not link_exists(rn, RACK_BRIDGE):
            _run(["ip", "-n", rn, "link", "add", RACK_BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0"])
        _address(rn, RACK_BRIDGE, f"{r.gateway}/{r.subnet.prefixlen}")
        _run(["ip", "-n", rn, "link", "set", RACK_BRIDGE, "up"])
        bc = "1" if r.directed_broadcast else "0"
        _run(["ip", "netns", "exec", rn, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                f"net.ipv4.conf.all.bc_forwarding={bc}", f"net.ipv4.conf.{BOOT_LEG}.bc_forwarding={bc}"])
        _run(["ip", "-n", ns, "route", "replace", str(r.subnet), "via", str(r.router), "dev", br])
        if relay_pid(r) is None:
            start_relay(r)
    return rs


def _address(ns: str, dev: str, cidr: str) -> None:
    have = _run(["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", dev]).stdout.split()
    if cidr not in have:
        _run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
    _run(["ip", "-n", ns, "link", "set", dev, "up"])


def start_relay(r: Router) -> int:
    """Start dhcrelay in ``r``'s namespace; its PID once it has opened its interfaces (its log says so)."""
    r.pidfile.unlink(missing_ok=True)
    start = r.logfile.stat().st_size if r.logfile.exists() else 0
    with open(r.logfile, "ab") as logf:
        p = subprocess.Popen(["ip", "netns", "exec", r.namespace, *r.relay_argv()], stdin=subprocess.DEVNULL,
                             stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    r.pidfile.write_text(f"{p.pid}\n")  # `ip netns exec` execs: this PID is dhcrelay's
    deadline = time.monotonic() + RELAY_START_TIMEOUT
    while True:
        text = _log_since(r.logfile, start)
        if p.poll() is not None:
            r.pidfile.unlink(missing_ok=True)
            raise RouterError(f"dhcrelay for {r.subnet} exited {p.returncode}; see {r.logfile}: {last_line(_log_since(r.logfile, start))}")
        # dhcrelay prints "Listening on LPF/<if>/..." per interface before it relays anything.
        if f"LPF/{RACK_BRIDGE}/" in text and f"LPF/{BOOT_LEG}/" in text:
            break
        if time.monotonic() > deadline:
            _kill(p.pid)
            r.pidfile.unlink(missing_ok=True)
            raise RouterError(f"dhcrelay for {r.subnet} did not open its interfaces in {RELAY_START_TIMEOUT:.0f}s; see {r.logfile}")
        time.sleep(0.05)
    _say(f"router {r.namespace}: {r.router} on {r.lab_leg} <-> {r.gateway} on {r.subnet}; dhcrelay pid {p.pid} "
           f"-> {r.server}; directed broadcasts {'forwarded' if r.directed_broadcast else 'dropped'}")
    return p.pid


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _log_since(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(65536).decode(errors="replace")
    except FileNotFoundError:
        return ""


def down(lab: Any, namespaces: list[str]) -> list[str]:
    """Stop the relays and remove the router namespaces (``namespaces``: those ``lab.json`` lists); what was removed."""
    done: list[str] = []
    try:
        rs = routers(lab)
    except RouterError:
        rs = []
    for r in rs:
        pid = relay_pid(r)
        if pid is not None:
            _kill(pid)
            done.append(f"dhcrelay {pid}")
        r.pidfile.unlink(missing_ok=True)
    for rn in dict.fromkeys([*namespaces, *(r.namespace for r in rs)]):
        if not namespace_exists(rn):
            continue
        # Processes a crash left without a PID file: only ones naming our lab directory (QEMU, dhcrelay).
        for tok in _run(["ip", "netns", "pids", rn], check=False).stdout.split():
            if tok.isdigit() and _is_ours(int(tok), str(lab.dir)):
                _kill(int(tok))
                done.append(f"leftover {tok}")
        _run(["ip", "netns", "del", rn])  # takes the rack bridge, its taps and the veth pair with it
        done.append(f"namespace {rn}")
    return done


def status(lab: Any) -> list[dict[str, Any]]:
    """The routers' part of ``lab status``."""
    try:
        rs = routers(lab)
    except RouterError as e:
        return [{"problem": str(e)}]
    out = []
    for r in rs:
        pid = relay_pid(r)
        exists = namespace_exists(r.namespace) if os.geteuid() == 0 else None
        out.append({
            "namespace": r.namespace, "namespace_exists": exists, "subnet": str(r.subnet), "gateway": str(r.gateway),
            "router": str(r.router), "lab_leg": r.lab_leg, "relay": {"pid": pid, "running": pid is not None,
                                                                    "log": str(r.logfile)},
            "directed_broadcast": r.directed_broadcast,
        })
    return out


def format_status(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        if "problem" in row:
            lines.append(f"router: {row['problem']}")
            continue
        relay = f"dhcrelay pid {row['relay']['pid']}" if row["relay"]["running"] else "dhcrelay not running"
        lines.append(f"router {row['namespace']}: {'present' if row['namespace_exists'] else 'absent'}; "
                     f"{row['router']} <-> {row['gateway']} ({row['subnet']}); {relay}; directed broadcasts "
                     f"{'forwarded' if row['directed_broadcast'] else 'dropped'}")
    return lines


def wol_listeners(lab: Any, on_magic: Any) -> list[Any]:
    """The lab daemon's Wake-on-LAN listeners: the boot bridge for its nodes, each rack bridge (in its router
    namespace, whole frames) for the nodes behind that router."""
    from orchestrator.lab.wol_listener import WolListener

    rs = routers(lab)
    behind = {r.index: [n.mac for n in lab.plan.nodes if n.ip in r.subnet] for r in rs}
    local = [n.mac for n in lab.plan.nodes if not any(n.ip in r.subnet for r in rs)]
    out = [WolListener(lab.bridge, on_magic, macs=local if rs else None)]
    out += [WolListener(RACK_BRIDGE, on_magic, netns=r.namespace, macs=behind[r.index], routed=True) for r in rs]
    return out
