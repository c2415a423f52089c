"""``bootorch lab up|down|status PLAN``: the virtual cluster a plan boots in.

``lab up`` builds, inside one network namespace (``lab.namespace``):

* a bridge named ``network.interface`` carrying ``network.server/prefix`` (the
  boot network; the subnet exists only in that namespace),
* one tap per node (``tap<index>``) attached to the bridge,
* one QEMU VM per node on its tap, with the node's MAC, PXE boot order
  (iPXE from Debian's ipxe-qemu is the NIC's option ROM), serial console to
  ``<state_dir>/lab/<node>.serial.log``, QMP on ``<state_dir>/lab/<node>.qmp``,
  started **paused** (``-S``): powered off in effect,
* the lab daemon (``python -m orchestrator.lab.lab daemon PLAN``, inside the
  namespace): the Wake-on-LAN listener on the bridge (raw 0x0842 frames and
  UDP 9/7, see :mod:`orchestrator.lab.wol_listener`), which resumes the VM a
  magic packet names, and the lab BMC (:mod:`orchestrator.lab.bmc`), a Redfish
  subset on ``network.server:lab.bmc_port``.

Everything ``lab up`` starts has a PID file in ``<state_dir>/lab/``; ``lab
down`` kills exactly those PIDs (after checking that ``/proc/PID/cmdline`` is
still the process we started: the QEMU whose QMP socket is ours, the daemon
with our plan), then any process left in the lab namespace whose command line
names our state directory (a crash may have lost a PID file), and deletes the
taps, the bridge and the namespace. Both commands are idempotent and build or
remove only what is missing or present, so they also repair a half-created lab.

Power model: "off" is a paused QEMU, never a dead one (see
:mod:`orchestrator.lab.qmp`); a VM whose QEMU died is restarted (paused) by
running ``lab up`` again.

Files in ``<state_dir>/lab/``: ``lab.json`` (namespace, bridge, taps, chosen
accelerator; written *before* anything is created, so ``down`` after a crash
knows what to remove), ``<node>.pid`` / ``<node>.qmp`` / ``<node>.serial.log`` /
``<node>.qemu.log``, ``daemon.pid`` / ``daemon.log`` (every wake and BMC
request) / ``daemon.ready``. Serial logs stay after ``down`` for post-mortems;
the next ``up`` truncates them.

Credentials: the daemon resolves ``power.bmc.password`` (and
``power.wol.secureon``) when it starts, i.e. at ``lab up``, from the
environment ``lab up`` runs in; after changing them, ``lab down`` + ``lab up``.

Acceleration: ``lab.accel: auto`` runs a probe VM under KVM -- a 64 KiB
firmware that counts down a loop and writes to QEMU's ``isa-debug-exit`` port --
which must exit within a few seconds. ``/dev/kvm`` can exist and still hang
(nested virtualisation in some sandboxes), so only a finished probe counts;
otherwise TCG. The choice is logged and shown by ``lab status``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from orchestrator import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from orchestrator.lab import qmp as q
from orchestrator.lab.netns import NetnsError, require_root, run_checked
from orchestrator.plan import LoadedPlan, Node, PlanError, load_plan

log = logging.getLogger("bootorch.lab")

QEMU = "qemu-system-x86_64"
#: Seconds the KVM probe VM may take before we call KVM broken.
KVM_PROBE_TIMEOUT = 8.0
#: Seconds ``lab up`` waits for the daemon to bind its sockets.
DAEMON_START_TIMEOUT = 15.0


class LabError(RuntimeError):
    """Something ``lab up``/``down`` could not do; the message says what and why."""


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Lab:
    """Names and paths of one plan's lab; nothing here touches the system."""

    plan: LoadedPlan

    @property
    def namespace(self) -> str:
        return self.plan.model.lab.namespace

    @property
    def bridge(self) -> str:
        return self.plan.model.network.interface

    @property
    def server_cidr(self) -> str:
        net = self.plan.model.network
        return f"{net.server}/{ipaddress.IPv4Network(net.subnet).prefixlen}"

    @property
    def dir(self) -> Path:
        return self.plan.state_dir / "lab"

    def tap(self, node: Node) -> str:
        return f"tap{node.index}"

    def qmp(self, node: Node) -> Path:
        return self.dir / f"{node.name}.qmp"

    def pidfile(self, node: Node) -> Path:
        return self.dir / f"{node.name}.pid"

    def serial(self, node: Node) -> Path:
        return self.dir / f"{node.name}.serial.log"

    def qemu_log(self, node: Node) -> Path:
        return self.dir / f"{node.name}.qemu.log"

    @property
    def daemon_pidfile(self) -> Path:
        return self.dir / "daemon.pid"

    @property
    def daemon_log(self) -> Path:
        return self.dir / "daemon.log"

    @property
    def ready_file(self) -> Path:
        return self.dir / "daemon.ready"

    @property
    def sercon_file(self) -> Path:
        return self.dir / "sercon-port.bin"

    @property
    def info_file(self) -> Path:
        return self.dir / "lab.json"

    def qemu_argv(self, node: Node, accel: str) -> list[str]:
        lab = self.plan.model.lab
        return [
            QEMU,
            "-name", f"{node.name},process=lab-{node.name}",
            "-machine", "pc", "-accel", accel,
            "-m", str(lab.memory_mib), "-smp", str(lab.cpus),
            "-nodefaults", "-display", "none", "-vga", "none",
            # The node's NIC on its tap; QEMU's own scripts never run (we made the tap).
            "-nic", f"tap,ifname={self.tap(node)},script=no,downscript=no,model={lab.nic_model},mac={node.mac}",
            "-boot", "order=n",
            "-serial", f"file:{self.serial(node)}",
            # SeaBIOS "sercon": BIOS, iPXE and pxelinux text (int 10h) also goes to
            # COM1, so the serial log shows the whole boot, not just the kernel's.
            "-fw_cfg", f"name=etc/sercon-port,file={self.sercon_file}",
            "-qmp", f"unix:{self.qmp(node)},server=on,wait=off",
            "-pidfile", str(self.pidfile(node)),
            "-S",             # paused: "powered off" until a magic packet or the BMC
            "-no-shutdown",   # a guest poweroff leaves QEMU alive in 'shutdown' state
            "-daemonize",
        ]


# ----------------------------------------------------------------------------- helpers


def _run(argv: Sequence[str], *, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_checked(argv, timeout=timeout, check=check, error=LabError)


def namespace_exists(name: str) -> bool:
    out = _run(["ip", "netns", "list"]).stdout
    return any(line.split()[0] == name for line in out.splitlines() if line.strip())


def link_exists(ns: str, dev: str) -> bool:
    return _run(["ip", "-n", ns, "link", "show", "dev", dev], check=False).returncode == 0


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_ours(pid: int | None, marker: str) -> bool:
    """The process is alive and its command line contains ``marker`` (guards against PID reuse)."""
    if pid is None or pid <= 0:
        return False
    return any(marker in a for a in _cmdline(pid))


def _kill(pid: int, *, grace: float = 5.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Only called on PIDs we verified."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                # Reap it if it is our child (the daemon started by this same process).
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            if not _cmdline(pid) or _proc_state(pid) == "Z":
                return
            time.sleep(0.05)


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


def read_secret(plan: LoadedPlan, secret: Any) -> str | None:
    """Resolve a plan credential reference ({env: X} / {file: P}); None when it resolves to nothing."""
    if secret is None:
        return None
    if secret.env:
        return os.environ.get(secret.env) or None
    path = plan.resolve_path(secret.file)
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def tail_line(path: Path, *, max_bytes: int = 4096) -> str:
    """The last non-empty line of a (serial) log, control characters removed."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode(errors="replace").replace("\r", "\n")
    text = "".join(ch for ch in text if ch == "\n" or ch == "\t" or ch.isprintable())
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    return lines[-1] if lines else ""


# ----------------------------------------------------------------------------- accel


def _probe_firmware() -> bytes:
    """64 KiB 'BIOS' whose reset vector loops 65535 times, then writes 1 to port 0xf4 and halts.

    With ``-device isa-debug-exit,iobase=0xf4`` QEMU exits with status (1 << 1) | 1 = 3.
    """
    code = bytes([
        0xB9, 0xFF, 0xFF,  # mov cx, 0xffff
        0xE2, 0xFE,        # loop $
        0xB0, 0x01,        # mov al, 1
        0xE6, 0xF4,        # out 0xf4, al
        0xF4,              # hlt
        0xEB, 0xFD,        # jmp $-1 (back to hlt)
    ])
    fw = bytearray(0x10000)
    fw[0xFFF0:0xFFF0 + len(code)] = code  # F000:FFF0, the x86 reset vector
    return bytes(fw)


def _run_probe(argv: list[str], timeout: float, *, done: "callable | None" = None) -> tuple[int | None, str, float]:
    """Run a probe VM (its own session) until it exits, ``done()`` is true, or ``timeout``.

    Returns (exit status or None when we stopped it, stderr, seconds). The VM is
    killed by its PID in every case.
    """
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        while time.monotonic() - t0 < timeout:
            if p.poll() is not None:
                break
            if done is not None and done():
                break
            time.sleep(0.1)
    finally:
        rc = p.poll()
        if rc is None:
            p.kill()
        _, err = p.communicate(timeout=10)
    return rc, err.decode(errors="replace"), time.monotonic() - t0


def kvm_works(workdir: Path, *, timeout: float = KVM_PROBE_TIMEOUT, nic_model: str = "e1000") -> tuple[bool, str]:
    """Probe KVM with two tiny VMs; ``(True, why)`` only when both behave, in time.

    1. A 64 KiB firmware that loops and exits through ``isa-debug-exit``
       (status 3): KVM can run real-mode code at all.
    2. SeaBIOS + the NIC's iPXE ROM, on a NIC whose only peer is an empty QEMU
       hub (no network at all), must print "iPXE initialising devices" on the
       serial port. Seen on this project's CI machines: /dev/kvm works for (1)
       but the guest hangs for good at "iPXE ... starting execution" (iPXE's
       switch to protected mode), so (1) alone is not enough.
    """
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm not accessible"
    workdir.mkdir(parents=True, exist_ok=True)
    fw = workdir / "kvm-probe.bin"
    fw.write_bytes(_probe_firmware())
    base = [QEMU, "-machine", "pc", "-accel", "kvm", "-nodefaults", "-display", "none", "-no-reboot"]
    rc, err, took = _run_probe([*base, "-m", "16", "-bios", str(fw),
                                "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"], timeout)
    if rc is None:
        return False, f"KVM probe VM did not finish within {timeout:.0f}s (KVM hangs here)"
    if rc != 3:
        return False, f"KVM probe VM exited {rc}: {err.strip()[:200]}"
    serial = workdir / "kvm-probe.serial.log"
    serial.unlink(missing_ok=True)
    sercon = workdir / "kvm-probe.sercon.bin"
    sercon.write_bytes((0x3F8).to_bytes(2, "little"))

    def ipxe_running() -> bool:
        try:
            return b"initialising devices" in serial.read_bytes()
        except FileNotFoundError:
            return False

    rc, err, took2 = _run_probe([*base, "-m", "64", "-netdev", "hubport,id=n0,hubid=0",
                                 "-device", f"{nic_model},netdev=n0,mac=52:54:00:ff:ff:fe", "-boot", "order=n",
                                 "-serial", f"file:{serial}", "-fw_cfg", f"name=etc/sercon-port,file={sercon}"],
                                timeout, done=ipxe_running)
    if ipxe_running():
        return True, f"KVM probe VMs ran (firmware exit in {took:.2f}s, iPXE started in {took2:.1f}s)"
    if rc is not None:
        return False, f"KVM iPXE probe VM exited {rc} before iPXE started: {err.strip()[:200]}"
    return False, (f"a KVM guest runs real-mode code but hangs in iPXE (no 'initialising devices' within "
                   f"{timeout:.0f}s)")


def choose_accel(lab: Lab) -> tuple[str, str]:
    want = lab.plan.model.lab.accel
    if want == "tcg":
        return "tcg", "lab.accel: tcg"
    ok, why = kvm_works(lab.dir, nic_model=lab.plan.model.lab.nic_model)
    if want == "kvm":
        if not ok:
            raise LabError(f"lab.accel is kvm but KVM does not work: {why} (use accel: auto or tcg)")
        return "kvm", why
    return ("kvm", why) if ok else ("tcg", f"{why}; using TCG software emulation")


# ----------------------------------------------------------------------------- up / down / status


def _say(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def _info(lab: Lab) -> dict[str, Any]:
    try:
        return json.loads(lab.info_file.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_info(lab: Lab, info: dict[str, Any]) -> None:
    tmp = lab.info_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, lab.info_file)


def qemu_pid(lab: Lab, node: Node) -> int | None:
    pid = _read_pid(lab.pidfile(node))
    return pid if _is_ours(pid, str(lab.qmp(node))) else None


def daemon_pid(lab: Lab) -> int | None:
    pid = _read_pid(lab.daemon_pidfile)
    return pid if _is_ours(pid, str(lab.dir)) else None


def up(plan: LoadedPlan) -> dict[str, Any]:
    """Create (or complete) the lab for ``plan``. Returns what ``status`` returns."""
    require_root()
    if shutil.which(QEMU) is None:
        raise LabError(f"{QEMU} is not installed (Debian: apt-get install qemu-system-x86 ipxe-qemu)")
    lab = Lab(plan)
    lab.dir.mkdir(parents=True, exist_ok=True)
    ns, br = lab.namespace, lab.bridge
    net_ns = plan.model.network.namespace
    if net_ns and net_ns != ns:
        raise LabError(f"network.namespace is {net_ns} but lab.namespace is {ns}: bootorch would serve in one "
                       "namespace and the VMs would boot in the other; make them the same")
    info = _info(lab)
    info.update(namespace=ns, bridge=br, taps={n.name: lab.tap(n) for n in plan.nodes})
    _write_info(lab, info)  # before creating anything: `down` after a crash reads it

    if not namespace_exists(ns):
        _run(["ip", "netns", "add", ns])
        _say(f"namespace {ns} created")
    _run(["ip", "-n", ns, "link", "set", "lo", "up"])
    if not link_exists(ns, br):
        # forward_delay 0 / no STP: a tap forwards the moment QEMU opens it; the
        # PXE ROM's first DHCPDISCOVER must not fall into a listening state.
        _run(["ip", "-n", ns, "link", "add", br, "type", "bridge", "forward_delay", "0", "stp_state", "0"])
        _say(f"bridge {br} created")
    have = _run(["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", br]).stdout
    if lab.server_cidr not in have.split():
        _run(["ip", "-n", ns, "addr", "add", lab.server_cidr, "dev", br])
    _run(["ip", "-n", ns, "link", "set", br, "up"])
    for node in plan.nodes:
        tap = lab.tap(node)
        if not link_exists(ns, tap):
            _run(["ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"])
        _run(["ip", "-n", ns, "link", "set", tap, "master", br, "up"])

    missing = [n for n in plan.nodes if qemu_pid(lab, n) is None]
    if missing:
        if info.get("accel") is None or plan.model.lab.accel != info.get("accel_wanted"):
            accel, why = choose_accel(lab)
            info.update(accel=accel, accel_wanted=plan.model.lab.accel, accel_reason=why)
            _write_info(lab, info)
            _say(f"accelerator {accel}: {why}")
        for node in missing:
            _start_qemu(lab, node, info["accel"])
            _say(f"{node.name}: QEMU pid {qemu_pid(lab, node)} on {lab.tap(node)}, paused (powered off)")
    # The daemon knows the nodes it was started with: restart it when they changed.
    nodes_now = {n.name: n.mac for n in plan.nodes}
    pid = daemon_pid(lab)
    if pid is not None and info.get("daemon_nodes") != nodes_now:
        _say(f"nodes changed: restarting the daemon (pid {pid})")
        _kill(pid)
        pid = None
    if pid is None:
        _start_daemon(lab)
        info["daemon_nodes"] = nodes_now
        _write_info(lab, info)
    return status(plan)


def _start_qemu(lab: Lab, node: Node, accel: str) -> None:
    lab.sercon_file.write_bytes((0x3F8).to_bytes(2, "little"))  # SeaBIOS reads etc/sercon-port as an integer
    for stale in (lab.qmp(node), lab.pidfile(node)):
        stale.unlink(missing_ok=True)
    argv = ["ip", "netns", "exec", lab.namespace, *lab.qemu_argv(node, accel)]
    with open(lab.qemu_log(node), "ab") as logf:
        # -daemonize: QEMU forks once it is set up; the parent's exit status says
        # whether setup (tap, sockets) worked. Its session is its own.
        cp = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.PIPE, timeout=60,
                            start_new_session=True)
    if cp.returncode != 0:
        err = cp.stderr.decode(errors="replace").strip()
        raise LabError(f"QEMU for {node.name} did not start (exit {cp.returncode}): {err}")
    deadline = time.monotonic() + 10
    while qemu_pid(lab, node) is None or not lab.qmp(node).exists():
        if time.monotonic() > deadline:
            raise LabError(f"QEMU for {node.name} started but wrote no pid file / QMP socket")
        time.sleep(0.05)


def _start_daemon(lab: Lab) -> None:
    lab.ready_file.unlink(missing_ok=True)
    argv = ["ip", "netns", "exec", lab.namespace, sys.executable, "-m", "orchestrator.lab.lab", "daemon",
            str(lab.plan.path), "--lab-dir", str(lab.dir)]
    env = dict(os.environ)
    # The venv's orchestrator must import even when bootorch runs from elsewhere.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    with open(lab.daemon_log, "ab") as logf:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    lab.daemon_pidfile.write_text(f"{p.pid}\n")  # `ip netns exec` execs: this PID is the python daemon
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while not lab.ready_file.exists():
        if p.poll() is not None:
            raise LabError(f"the lab daemon exited {p.returncode}; see {lab.daemon_log}: {tail_line(lab.daemon_log)}")
        if time.monotonic() > deadline:
            _kill(p.pid)
            raise LabError(f"the lab daemon did not get ready in {DAEMON_START_TIMEOUT:.0f}s; see {lab.daemon_log}")
        time.sleep(0.05)
    _say(f"daemon pid {p.pid}: WoL listener on {lab.bridge} (raw 0x0842, udp 9/7), "
         f"BMC http://{lab.plan.model.network.server}:{lab.plan.model.lab.bmc_port}/redfish/v1/Systems/<node>")


def down(plan: LoadedPlan) -> list[str]:
    """Remove everything ``up`` made for ``plan``; idempotent. Returns what was removed."""
    require_root()
    lab = Lab(plan)
    info = _info(lab)
    ns = info.get("namespace", lab.namespace)
    br = info.get("bridge", lab.bridge)
    done: list[str] = []

    pid = daemon_pid(lab)
    if pid is not None:
        _kill(pid)
        done.append(f"daemon {pid}")
    for node in plan.nodes:
        pid = qemu_pid(lab, node)
        if pid is not None:
            _kill(pid)
            done.append(f"qemu {node.name} {pid}")
    if namespace_exists(ns):
        # Processes a crash left without a PID file: only ones naming our lab directory.
        cp = _run(["ip", "netns", "pids", ns], check=False)
        others = []
        for tok in cp.stdout.split():
            if tok.isdigit():
                if _is_ours(int(tok), str(lab.dir)):
                    _kill(int(tok))
                    done.append(f"leftover {tok}")
                elif _cmdline(int(tok)):
                    others.append(f"{tok} ({' '.join(_cmdline(int(tok))[:3])})")
        if others:
            _say(f"not ours, left running in {ns}: {', '.join(others)}")
        taps = info.get("taps", {}).values() or [lab.tap(n) for n in plan.nodes]
        for dev in [*taps, br]:
            if link_exists(ns, dev):
                _run(["ip", "-n", ns, "link", "del", dev], check=False)
                done.append(f"link {dev}")
        _run(["ip", "netns", "del", ns])
        done.append(f"namespace {ns}")
    for node in plan.nodes:
        for f in (lab.qmp(node), lab.pidfile(node)):
            f.unlink(missing_ok=True)
    for f in (lab.daemon_pidfile, lab.ready_file, lab.info_file):
        f.unlink(missing_ok=True)
    return done


def status(plan: LoadedPlan) -> dict[str, Any]:
    """The lab's state as one JSON-able object (``lab status --json``)."""
    lab = Lab(plan)
    info = _info(lab)
    ns_ok = namespace_exists(lab.namespace) if os.geteuid() == 0 else None
    nodes = []
    for node in plan.nodes:
        pid = qemu_pid(lab, node)
        raw = "absent"
        if pid is not None:
            try:
                raw = q.status(str(lab.qmp(node)), timeout=3)
            except q.QmpError:
                raw = "unreachable"
        # running / paused ("off": -S prelaunch, stopped, or a guest that shut down) / absent
        state = "running" if raw in q.ON_STATES else raw if raw in ("absent", "unreachable") else "paused"
        nodes.append({
            "name": node.name, "mac": node.mac, "ip": str(node.ip), "tap": lab.tap(node), "pid": pid,
            "state": state, "qemu_state": raw, "power": "On" if raw in q.ON_STATES else "Off",
            "serial_log": str(lab.serial(node)), "serial_last": tail_line(lab.serial(node)),
        })
    dpid = daemon_pid(lab)
    return {
        "namespace": lab.namespace, "namespace_exists": ns_ok, "bridge": lab.bridge,
        "bridge_exists": link_exists(lab.namespace, lab.bridge) if ns_ok else False,
        "server": f"{lab.server_cidr}", "accel": info.get("accel"), "accel_reason": info.get("accel_reason"),
        "daemon": {"pid": dpid, "running": dpid is not None, "log": str(lab.daemon_log)},
        "bmc": f"http://{plan.model.network.server}:{plan.model.lab.bmc_port}/redfish/v1/Systems/",
        "nodes": nodes,
    }


def format_status(st: dict[str, Any]) -> str:
    lines = [
        f"namespace {st['namespace']}: {'present' if st['namespace_exists'] else 'absent'}; bridge {st['bridge']} "
        f"{st['server']}: {'present' if st['bridge_exists'] else 'absent'}; accel {st['accel'] or '-'}",
        f"daemon: {'pid ' + str(st['daemon']['pid']) if st['daemon']['running'] else 'not running'}; BMC {st['bmc']}",
    ]
    w = max([len(n["name"]) for n in st["nodes"]] + [4])
    lines.append(f"{'NODE':<{w}}  {'STATE':<9} {'PID':>7}  {'TAP':<6} SERIAL (last line)")
    for n in st["nodes"]:
        lines.append(f"{n['name']:<{w}}  {n['state']:<9} {n['pid'] or '-':>7}  {n['tap']:<6} {n['serial_last'][:80]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the daemon


def daemon(plan: LoadedPlan, lab_dir: Path) -> int:
    """The lab daemon: WoL listener + BMC, until SIGTERM. Runs inside the lab namespace."""
    from orchestrator.lab.bmc import LabBmc
    from orchestrator.lab.wol_listener import WolListener

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    lab = Lab(plan)
    assert lab.dir == lab_dir, (lab.dir, lab_dir)
    by_mac = {n.mac: n for n in plan.nodes}
    locks = {n.name: threading.Lock() for n in plan.nodes}
    wol_disabled = set(plan.model.lab.wol_disabled)

    def on_magic(mac: str, how: str, peer: str, password: bytes) -> None:
        node = by_mac.get(mac)
        if node is None:
            log.info("magic packet for %s (%s from %s): not a lab node", mac, how, peer)
            return
        if node.name in wol_disabled:
            log.info("magic packet for %s (%s from %s): Wake-on-LAN disabled on this NIC (lab.wol_disabled), ignored",
                     node.name, how, peer)
            return
        if secureon and password != secureon:
            log.info("magic packet for %s (%s from %s): wrong or missing SecureOn password, ignored",
                     node.name, how, peer)
            return
        with locks[node.name]:
            if q.power_on(str(lab.qmp(node))):
                log.info("wake %s %s: powered on (%s from %s)", node.name, mac, how, peer)
            else:
                log.info("wake %s %s: already on (%s from %s)", node.name, mac, how, peer)

    from orchestrator.power.wol import secureon_bytes

    secureon = secureon_bytes(read_secret(plan, plan.model.power.wol.secureon))
    bmc_cfg = plan.model.power.bmc
    password = read_secret(plan, bmc_cfg.password)
    if password is None:
        log.info("BMC: no password configured (or its variable is unset): accepting any credentials")
    bmc = LabBmc(str(plan.model.network.server), plan.model.lab.bmc_port, {n.name: str(lab.qmp(n)) for n in plan.nodes},
                 username=bmc_cfg.username, password=password)
    listener = WolListener(lab.bridge, on_magic)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    bmc.start()
    listener.start()
    log.info("ready: WoL on %s, BMC on %s:%d", lab.bridge, *bmc.address)
    lab.ready_file.write_text(f"{os.getpid()}\n")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        listener.stop()
        bmc.stop()
        lab.ready_file.unlink(missing_ok=True)
        log.info("stopped (wol: %s)", listener.counts)
    return 0


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``bootorch lab ACTION PLAN [--json]``."""
    parser.add_argument("action", choices=("up", "down", "status"),
                        help="up: create namespace, bridge, taps, paused VMs and the WoL/BMC daemon; "
                             "down: remove all of it; status: show VMs")
    parser.add_argument("plan", metavar="PLAN", help="plan file (its lab: and network: sections)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    try:
        plan = load_plan(args.plan)
    except PlanError as e:
        for p in e.problems:
            print(str(p), file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"bootorch lab: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.action == "up":
            st = up(plan)
        elif args.action == "down":
            removed = down(plan)
            if args.json:
                print(json.dumps({"removed": removed}))
            else:
                print("removed: " + (", ".join(removed) if removed else "nothing (no lab was up)"))
            return EXIT_OK
        else:
            st = status(plan)
    except (LabError, NetnsError, q.QmpError) as e:
        print(f"bootorch lab {args.action}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchestrator.lab.lab",
                                 description="the virtual lab cluster: bootorch lab up|down|status PLAN")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["daemon"]:
        dp = argparse.ArgumentParser(prog="python -m orchestrator.lab.lab daemon")
        dp.add_argument("plan")
        dp.add_argument("--lab-dir", required=True, type=Path)
        a = dp.parse_args(argv[1:])
        return daemon(load_plan(a.plan), a.lab_dir)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
