"""The site's own DHCP/TFTP servers in the lab namespace (``lab.site``).

A lab service (:data:`orchestrator.lab.lab.SERVICES`): ``up(lab)`` starts what the plan
asks for, ``down(lab)`` stops it and says what it stopped, ``status(lab)`` reports it.
``lab.site.dhcp`` (``dnsmasq`` | ``iscdhcpd``) and ``lab.site.tftp`` (``dnsmasq`` |
``tftp-hpa``) name the daemons; what they are given depends on ``dhcp.mode``:

* ``proxy``: the site DHCP server gets an **address-only** config made from the plan
  (:func:`address_only_dnsmasq`, :func:`address_only_dhcpd`): the boot subnet, one
  reservation per node, the pool if the plan has one, routers/DNS/domain, and no
  boot file, next-server, option 60 or option 43. bootorch's own ProxyDHCP (67 and
  4011) and TFTP/HTTP add the boot. A site TFTP server makes no sense here (bootorch
  serves the files): :class:`LabError`.
* ``external``: the daemons run what ``bootorch render`` writes
  (:func:`orchestrator.render.render_all`): ``dhcpd.conf`` / ``dnsmasq.conf`` go to the
  site directory; the boot tree (``pxelinux.cfg/``, ``ipxe/``, ``boot.ipxe``,
  ``hostkeys/<ip>.cpio``) is written into the plan's boot root (``boot.root``), which
  is the site TFTP server's root, beside the loaders, kernel and initrds ``bootorch
  image build`` put there. When dnsmasq does DHCP and another server TFTP (or the
  other way round), the rendered ``dnsmasq.conf`` runs without its TFTP lines (or a
  TFTP-only one is made). bootorch serves nothing; it follows the logs below.
* ``full``: a site DHCP server would answer the same clients as bootorch's:
  :class:`LabError` (the words of :meth:`orchestrator.plan.model.LabSite.conflicts`).

In the lab the site's daemons share ``network.server``'s address with bootorch: in proxy
mode the site's DHCP server and bootorch's ProxyDHCP both bind UDP 67 in the namespace
(dnsmasq with ``bind-interfaces`` and dhcpd's fallback socket set ``SO_REUSEADDR``, as
bootorch's does), and every broadcast reaches both.

How each daemon runs (inside the lab namespace, in the foreground, as a child
process whose PID file is ours):

* dnsmasq: ``dnsmasq -k -C <site>/dnsmasq.conf --log-facility=<site>/dnsmasq.log``
  (``log-dhcp`` is in the config), ``-u root`` because the lab's boot root sits in
  directories only root may enter: as root dnsmasq serves only world-readable files.
  dnsmasq's TFTP cannot give a file to one client only (no map file), so per-node
  host keys (profile ``host_key: per-node``, the default) need tftp-hpa: a plan with
  ``tftp: dnsmasq`` and per-node keys is refused with that fix.
* ISC dhcpd: ``dhcpd -4 -f -cf <site>/dhcpd.conf -lf <site>/dhcpd.leases
  -pf <site>/dhcpd.pid.dhcpd <interface>``, logging through syslog(3).
* tftp-hpa: ``in.tftpd -L -v -v -s -u tftp -p -m <site>/tftpd.map -a <server>:69
  <boot root>``: chrooted into the boot root, running as ``tftp``; the map file
  holds render's rule ``re ^/?hostkeys/.* hostkeys/\\i.cpio`` so a node only ever
  reads its own key archive; the archives are made ``tftp``'s (mode 0600) so
  ``-p`` lets it read them while nobody else can.
* syslog: dhcpd and in.tftpd write to ``/dev/log``. The lab has no syslog daemon
  and must not touch the host's ``/dev``, so each of the three runs in its own
  mount namespace (``ip netns exec`` makes one) with a small tmpfs over ``/dev``
  (null, zero, random, urandom) whose ``log`` is a symlink to ``<site>/log.sock``:
  busybox ``syslogd -n -O <site>/syslog.log`` binds that socket, the daemons send
  to it. busybox syslogd reopens its file about once a second, so a rename
  rotation needs no signal; dnsmasq reopens its log on SIGUSR2.

Files, all in ``<state_dir>/lab/site/`` (:func:`site_dir`): ``<daemon>.conf`` /
``tftpd.map`` (what it runs), ``<daemon>.pid`` (written by us: the PID of the process
we started, checked against ``/proc/PID/cmdline`` before any signal),
``<daemon>.out`` (its stdout/stderr), ``<daemon>.run.json`` (argv and config it was
started with; a change restarts it at the next ``lab up``, and a restarted syslogd
restarts the daemons logging to it), ``dnsmasq.leases``, ``dhcpd.leases``, and the logs a
plan's ``logs:`` points at, at fixed paths (:func:`log_paths`):

====================================  ==========================================
``<state_dir>/lab/site/dnsmasq.log``  dnsmasq (``source: dnsmasq``)
``<state_dir>/lab/site/syslog.log``   dhcpd and in.tftpd (``source: syslog``)
====================================  ==========================================

Errors are :class:`~orchestrator.lab.lab.LabError` with the daemon's own words
(``dnsmasq --test`` / ``dhcpd -t`` output, or what it printed before it exited).
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from orchestrator.lab import procs
from orchestrator.plan import LoadedPlan
from orchestrator.render import dhcpd_quote

#: Seconds a daemon may take to bind its ports.
START_TIMEOUT = 15.0
BUSYBOX = "busybox"
DNSMASQ = "dnsmasq"
DHCPD = "dhcpd"
TFTPD = "in.tftpd"
#: The user tftp-hpa drops to (Debian's tftpd-hpa creates it).
TFTP_USER = "tftp"
#: render.py's rule: every host-key request becomes the asking client's own archive.
TFTP_MAP = "re ^/?hostkeys/.* hostkeys/\\i.cpio\n"
DNSMASQ_LOG = "dnsmasq.log"
SYSLOG_LOG = "syslog.log"
#: Started in this order, stopped in reverse (syslogd first: the others log to it).
ORDER = ("syslogd", "dhcpd", "dnsmasq", "tftpd")
#: UDP ports a daemon must have bound before it counts as started.
PORTS = {"dhcpd": (67,), "tftpd": (69,)}

# The daemons that log through syslog(3) get a private /dev whose "log" is our socket
# ($1); then the daemon ($2...) replaces the shell, so the PID we started is the daemon's.
_DEVLOG_SH = (
    "set -e; mount -t tmpfs -o mode=755,size=64k bootorch-site-dev /dev; "
    "mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5; "
    "mknod -m 666 /dev/random c 1 8; mknod -m 666 /dev/urandom c 1 9; "
    'ln -s "$1" /dev/log; shift; exec "$@"'
)


def _lab_error(msg: str) -> Exception:
    from orchestrator.lab.lab import LabError

    return LabError(msg)


def site_dir(plan: LoadedPlan) -> Path:
    """``<state_dir>/lab/site``: configs, PID files, leases and logs of the site's daemons."""
    return plan.state_dir / "lab" / "site"


def log_paths(plan: LoadedPlan) -> dict[str, Path]:
    """The logs the site's daemons write: ``dnsmasq`` and ``syslog`` (dhcpd, in.tftpd)."""
    d = site_dir(plan)
    return {"dnsmasq": d / DNSMASQ_LOG, "syslog": d / SYSLOG_LOG}


# ----------------------------------------------------------------------------- configs


def _lease_s(plan: LoadedPlan) -> str:
    lease = int(plan.model.dhcp.lease_time)
    return f"{lease}s" if lease < 60 else f"{lease // 60}m"


def address_only_dnsmasq(plan: LoadedPlan) -> str:
    """A site dnsmasq that hands out addresses only: reservations, the pool, routers/DNS; nothing about booting."""
    m = plan.model
    net = m.network
    out = [
        f"# The site's DHCP server for the lab plan {plan.path.name}: addresses only.",
        "# bootorch's ProxyDHCP (dhcp.mode: proxy) adds the boot file; no dhcp-boot, pxe-service,",
        "# vendor class (60) or PXE options (43) here. Check with: dnsmasq --test -C dnsmasq.conf",
        "port=0",
        f"interface={net.interface}",
        "bind-interfaces",
        "log-dhcp",
        f"dhcp-range={net.subnet.network_address},static,{net.subnet.netmask},{_lease_s(plan)}",
    ]
    if m.dhcp.pool is not None:
        out.append(f"dhcp-range={m.dhcp.pool.start},{m.dhcp.pool.end},{net.subnet.netmask},{_lease_s(plan)}")
    if net.gateway:
        out.append(f"dhcp-option=option:router,{net.gateway}")
    if net.dns:
        out.append(f"dhcp-option=option:dns-server,{','.join(map(str, net.dns))}")
    if net.domain:
        out.append(f"domain={net.domain}")
    out += [f"dhcp-host={n.mac},{n.ip},{n.name}" for n in plan.nodes]
    return "\n".join(out) + "\n"


def address_only_dhcpd(plan: LoadedPlan) -> str:
    """A site ISC dhcpd that hands out addresses only (the counterpart of :func:`address_only_dnsmasq`)."""
    m = plan.model
    net = m.network
    lease = int(m.dhcp.lease_time)
    out = [
        f"# The site's DHCP server for the lab plan {plan.path.name}: addresses only.",
        "# bootorch's ProxyDHCP (dhcp.mode: proxy) adds the boot file; no filename, next-server,",
        "# vendor class (60) or PXE options (43) here. Check with: dhcpd -4 -t -cf dhcpd.conf",
        "ddns-update-style none;",
        "authoritative;",
        f"default-lease-time {lease};",
        f"max-lease-time {lease};",
        "",
        f"subnet {net.subnet.network_address} netmask {net.subnet.netmask} {{",
    ]
    if net.gateway:
        out.append(f"  option routers {net.gateway};")
    if net.dns:
        out.append(f"  option domain-name-servers {', '.join(map(str, net.dns))};")
    if net.domain:
        out.append(f"  option domain-name {dhcpd_quote(net.domain)};")
    if m.dhcp.pool is not None:
        out += ["  pool {", f"    range {m.dhcp.pool.start} {m.dhcp.pool.end};", "    allow unknown clients;", "  }"]
    out += ["}", ""]
    for n in plan.nodes:
        out += [f"host {n.name} {{", f"  hardware ethernet {n.mac};", f"  fixed-address {n.ip};",
                f"  option host-name {dhcpd_quote(n.name)};", "}"]
    return "\n".join(out) + "\n"


def _without_tftp(dnsmasq_conf: str) -> str:
    """Render's dnsmasq.conf with its TFTP lines commented out (another server does TFTP)."""
    return "".join(f"# (TFTP by another server) {ln}" if ln.startswith(("enable-tftp", "tftp-root="))
                   else ln for ln in dnsmasq_conf.splitlines(keepends=True))


def tftp_only_dnsmasq(plan: LoadedPlan) -> str:
    """dnsmasq as the site's TFTP server only (no DNS, no DHCP): serves the boot root."""
    return "\n".join([
        f"# The site's TFTP server for the lab plan {plan.path.name} (dnsmasq, TFTP only).",
        "port=0",
        f"interface={plan.model.network.interface}",
        "bind-interfaces",
        "enable-tftp",
        f"tftp-root={plan.boot_root}",
    ]) + "\n"


# ----------------------------------------------------------------------------- what runs


def _wants(plan: LoadedPlan) -> dict[str, dict[str, Any]]:
    """Each daemon the plan asks for: ``argv`` (inside the namespace), ``files`` ({name: text}), ``ports``."""
    site = plan.model.lab.site
    mode = plan.model.dhcp.mode
    problems = site.conflicts(mode)
    if site.tftp == "dnsmasq":
        keyed = sorted({n.profile for n in plan.nodes if plan.model.profiles[n.profile].host_key == "per-node"})
        if keyed:
            problems.append(
                f"lab.site.tftp: dnsmasq cannot give a host-key archive to its own node only (it has no map file), "
                f"and profile(s) {', '.join(keyed)} have host_key: per-node: use tftp: tftp-hpa (its --map-file does), "
                "or host_key: none with readiness.ssh.host_key_policy: tofu")
    if problems:
        raise _lab_error("; ".join(problems))
    d = site_dir(plan)
    net = plan.model.network
    sock = d / "log.sock"
    if len(str(sock).encode()) > 107:
        raise _lab_error(f"the syslog socket path {sock} is longer than a Unix socket address allows (107 bytes): "
                         "use a shorter state_dir")
    wants: dict[str, dict[str, Any]] = {}
    rendered: dict[str, bytes] = {}
    if mode == "external":
        from orchestrator.render import render_all

        rendered = render_all(plan)

    def wrap(argv: list[str]) -> list[str]:
        return ["sh", "-c", _DEVLOG_SH, "bootorch-site", str(sock), *argv]

    dnsmasq_conf = None
    if site.dhcp == "dnsmasq":
        dnsmasq_conf = rendered["dnsmasq.conf"].decode() if rendered else address_only_dnsmasq(plan)
        if site.tftp != "dnsmasq" and rendered:
            dnsmasq_conf = _without_tftp(dnsmasq_conf)
    elif site.tftp == "dnsmasq":
        dnsmasq_conf = tftp_only_dnsmasq(plan)
    if dnsmasq_conf is not None:
        ports = (() if site.dhcp != "dnsmasq" else (67,)) + ((69,) if site.tftp == "dnsmasq" else ())
        wants["dnsmasq"] = {
            "argv": [DNSMASQ, "-k", "-C", str(d / "dnsmasq.conf"), f"--pid-file={d / 'dnsmasq.pid.dnsmasq'}",
                     f"--dhcp-leasefile={d / 'dnsmasq.leases'}", f"--log-facility={d / DNSMASQ_LOG}", "-u", "root"],
            "files": {"dnsmasq.conf": dnsmasq_conf}, "ports": ports, "tool": DNSMASQ,
            "test": [DNSMASQ, "--test", "-C", str(d / "dnsmasq.conf")],
        }
    if site.dhcp == "iscdhcpd":
        conf = rendered["dhcpd.conf"].decode() if rendered else address_only_dhcpd(plan)
        wants["dhcpd"] = {
            "argv": wrap([DHCPD, "-4", "-f", "-cf", str(d / "dhcpd.conf"), "-lf", str(d / "dhcpd.leases"),
                          "-pf", str(d / "dhcpd.pid.dhcpd"), net.interface]),
            "files": {"dhcpd.conf": conf}, "ports": PORTS["dhcpd"], "tool": DHCPD,
            "test": [DHCPD, "-4", "-t", "-cf", str(d / "dhcpd.conf")],
        }
    if site.tftp == "tftp-hpa":
        wants["tftpd"] = {
            "argv": wrap([TFTPD, "-L", "-v", "-v", "-s", "-u", TFTP_USER, "-p", "-m", str(d / "tftpd.map"),
                          "-a", f"{net.server}:69", str(plan.boot_root)]),
            "files": {"tftpd.map": TFTP_MAP}, "ports": PORTS["tftpd"], "tool": TFTPD,
        }
    if "dhcpd" in wants or "tftpd" in wants:
        wants["syslogd"] = {
            "argv": [BUSYBOX, "syslogd", "-n", "-O", str(d / SYSLOG_LOG)],
            # syslogd binds the symlink's target (the socket), which the others' /dev/log names.
            "files": {}, "ports": (), "socket": str(sock), "tool": BUSYBOX,
        }
        wants["syslogd"]["argv"] = wrap(wants["syslogd"]["argv"])
    if rendered:
        # The boot tree goes to the boot root, where the TFTP servers read each file at each request:
        # a changed tree needs no restart.
        wants["_tree"] = {"tree_files": {k: v for k, v in rendered.items() if k not in ("dhcpd.conf", "dnsmasq.conf")}}
    return wants


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/bin:/usr/bin")
    if found is None:
        pkg = {"dnsmasq": "dnsmasq", "dhcpd": "isc-dhcp-server", "in.tftpd": "tftpd-hpa", "busybox": "busybox-static"}
        raise _lab_error(f"lab.site needs {name}, which is not installed (Debian: apt-get install {pkg.get(name, name)})")
    return found


# ----------------------------------------------------------------------------- processes


def _pid_file(d: Path, name: str) -> Path:
    return d / f"{name}.pid"


def daemon_pid(plan: LoadedPlan, name: str) -> int | None:
    """The PID of the site daemon ``name`` we started, if it still runs (checked against its command line)."""
    d = site_dir(plan)
    return procs.ours(_pid_file(d, name), str(d))


def _argv0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _bound(pid: int, ports: tuple[int, ...]) -> bool:
    """Every port in ``ports`` has a UDP socket in the namespace of ``pid`` (``/proc/PID/net/udp``)."""
    try:
        text = Path(f"/proc/{pid}/net/udp").read_text()
    except OSError:
        return False
    have = {int(ln.split()[1].rsplit(":", 1)[1], 16) for ln in text.splitlines()[1:] if ln.split()}
    return set(ports) <= have


def _tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return ""
    return " | ".join(lines[-n:])[-800:]


def _test_config(name: str, argv: list[str]) -> None:
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if cp.returncode != 0:
        said = " | ".join(ln.strip() for ln in (cp.stderr + cp.stdout).splitlines() if ln.strip())[-1200:]
        raise _lab_error(f"the site's {name} rejects its config ({' '.join(argv)} exited {cp.returncode}): {said}")


def _start(plan: LoadedPlan, name: str, want: dict[str, Any]) -> int:
    from orchestrator.lab.lab import Lab
    from orchestrator.lab.procs import kill as _kill

    d = site_dir(plan)
    out = d / f"{name}.out"
    argv = ["ip", "netns", "exec", Lab(plan).namespace, *want["argv"]]
    if want.get("socket"):
        Path(want["socket"]).unlink(missing_ok=True)
    with open(out, "ab") as f:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {' '.join(want['argv'])}\n".encode())
        f.flush()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    _pid_file(d, name).write_text(f"{p.pid}\n")  # ip netns exec and our sh wrapper exec: this PID is the daemon's
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if p.poll() is not None:
            _pid_file(d, name).unlink(missing_ok=True)
            raise _lab_error(f"the site's {name} exited {p.returncode} at start: {_tail(out)}"
                             + (f"; syslog: {_tail(d / SYSLOG_LOG, 3)}" if name != "dnsmasq" else
                                f"; log: {_tail(d / DNSMASQ_LOG, 3)}"))
        ready = _bound(p.pid, want["ports"]) if want["ports"] else True
        if want.get("socket"):
            ready = ready and Path(want["socket"]).exists()
        # ip netns exec and the /dev wrapper have exec'd the daemon itself.
        if ready and os.path.basename(_argv0(p.pid)) == want["tool"]:
            break
        if time.monotonic() > deadline:
            _kill(p.pid)
            _pid_file(d, name).unlink(missing_ok=True)
            raise _lab_error(f"the site's {name} did not get ready in {START_TIMEOUT:.0f}s: {_tail(out)}")
        time.sleep(0.05)
    (d / f"{name}.run.json").write_text(json.dumps(_run_record(want), indent=1) + "\n")
    return p.pid


def _run_record(want: dict[str, Any]) -> dict[str, Any]:
    return {"argv": want["argv"], "files": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in want["files"].items()}}


def _stop(plan: LoadedPlan, name: str) -> int | None:
    from orchestrator.lab.procs import kill as _kill

    d = site_dir(plan)
    pid = daemon_pid(plan, name)
    if pid is not None:
        _kill(pid)
    for f in (_pid_file(d, name), d / f"{name}.run.json", d / f"{name}.pid.{name}"):
        f.unlink(missing_ok=True)  # ours, and the one dnsmasq/dhcpd write themselves
    return pid


def _say(msg: str) -> None:
    from orchestrator.lab.lab import _say as say

    say(msg)


def _write_tree(plan: LoadedPlan, tree: dict[str, bytes], tftp_user: str | None) -> None:
    """The rendered boot tree into the boot root; host-key archives owned by the TFTP daemon's user."""
    from orchestrator.hostkeys import HOST_KEY_DIR
    from orchestrator.render import write_tree

    for path in write_tree(tree, plan.boot_root):
        rel = path.relative_to(plan.boot_root).as_posix()
        if tftp_user and rel.startswith(HOST_KEY_DIR + "/"):
            pw = pwd.getpwnam(tftp_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)  # 0600: tftp-hpa (-u tftp -p) reads it, nobody else


# ----------------------------------------------------------------------------- service hooks


def up(lab: Any) -> None:
    """Start (or keep, or restart when their config changed) the site daemons the plan asks for; stop the others."""
    plan: LoadedPlan = lab.plan
    site = plan.model.lab.site
    if site.dhcp == "none" and site.tftp == "none":
        for name in reversed(ORDER):
            if (pid := _stop(plan, name)) is not None:
                _say(f"lab.site names no {name} any more: stopped pid {pid}")
        return
    wants = _wants(plan)
    tree = wants.pop("_tree", {}).get("tree_files")
    d = site_dir(plan)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for name in wants:
        _tool(wants[name]["tool"])
    if tree is not None:
        _write_tree(plan, tree, TFTP_USER if "tftpd" in wants else None)
    for name in reversed(ORDER):
        if name not in wants and (pid := _stop(plan, name)) is not None:
            _say(f"site {name} (pid {pid}) stopped: the plan no longer asks for it")
    restart_rest = False
    for name in ORDER:
        if name not in wants:
            continue
        want = wants[name]
        for fname, text in want["files"].items():
            tmp = d / f".{fname}.tmp"
            tmp.write_text(text)
            os.replace(tmp, d / fname)
        if want.get("test"):
            _test_config(name, want["test"])
        if name == "dhcpd":
            (d / "dhcpd.leases").touch()
        pid = daemon_pid(plan, name)
        if pid is not None:
            try:
                same = json.loads((d / f"{name}.run.json").read_text()) == _run_record(want)
            except (FileNotFoundError, ValueError):
                same = False
            if same and not restart_rest:
                continue
            _say(f"site {name}: its config changed: restarting (pid {pid})")
            _stop(plan, name)
            # The others keep a connection to syslogd's socket (tftp-hpa connects before its chroot).
            restart_rest = restart_rest or name == "syslogd"
        pid = _start(plan, name, want)
        where = {"dnsmasq": f"log {d / DNSMASQ_LOG}", "syslogd": f"log {d / SYSLOG_LOG}"}.get(name, f"logs to {d / SYSLOG_LOG}")
        _say(f"site {name} pid {pid} ({plan.model.dhcp.mode} mode); {where}")


def down(lab: Any) -> list[str]:
    """Stop what :func:`up` started (by PID, checked); returns what was stopped. Configs and logs stay."""
    plan: LoadedPlan = lab.plan
    done = []
    for name in reversed(ORDER):
        pid = _stop(plan, name)
        if pid is not None:
            done.append(f"site {name} {pid}")
    (site_dir(plan) / "log.sock").unlink(missing_ok=True)
    return done


def status(lab: Any) -> dict[str, Any]:
    plan: LoadedPlan = lab.plan
    site = plan.model.lab.site
    out: dict[str, Any] = {"dhcp": site.dhcp, "tftp": site.tftp, "mode": plan.model.dhcp.mode,
                           "dir": str(site_dir(plan)), "logs": {k: str(v) for k, v in log_paths(plan).items()},
                           "daemons": {}}
    for name in ORDER:
        pid = daemon_pid(plan, name)
        if pid is not None:
            out["daemons"][name] = {"pid": pid}
    return out
