"""``bootorch lab up|down|status PLAN``: the virtual cluster a plan boots in.

``lab up`` builds, inside one network namespace (``lab.namespace``):

* a bridge named ``network.interface`` carrying ``network.server/prefix`` (the
  boot network; the subnet exists only in that namespace),
* one tap per node (``tap<index>``) attached to the bridge,
* one QEMU VM per node on its tap, with the node's MAC, network boot first,
  the firmware ``lab.firmware`` gives the node (:meth:`Lab.qemu_argv`), serial
  console to ``<state_dir>/lab/<node>.serial.log``, QMP on
  ``<state_dir>/lab/<node>.qmp``, started **paused** (``-S``): powered off in
  effect,
* the NFS server when a node's profile has an NFS root the lab serves
  (nfs-ganesha, NFSv4, read-only, on ``network.server:2049``; what it exports
  and why it is configured so: :mod:`orchestrator.lab.nfs`). ``lab up`` waits
  until the port accepts TCP from inside the namespace, restarts the server
  when its rendered config changed and stops it when no profile needs it any
  more; :func:`nfs_stop` / :func:`nfs_start` do it by hand (a test stops the
  server mid-boot),
* the lab daemon (``python -m orchestrator.lab.lab daemon PLAN``, inside the
  namespace): the Wake-on-LAN listener on the bridge (raw 0x0842 frames and
  UDP 9/7, see :mod:`orchestrator.lab.wol_listener`), which resumes the VM a
  magic packet names, and (with ``lab.bmc: builtin``, the default) the lab BMC
  (:mod:`orchestrator.lab.bmc`), a Redfish subset on ``network.server:lab.bmc_port``,
* the services :data:`SERVICES` names, when the plan asks for them: the site's own
  DHCP/TFTP servers (``lab.site``), ``ipmi_sim`` or ``sushy-emulator`` as the BMCs
  (``lab.bmc``), Slurm (``lab.slurm``); and per ``network.relayed`` subnet a router
  namespace with ``dhcrelay`` holding that rack's bridge, taps and VMs
  (:mod:`orchestrator.lab.router`).

Everything ``lab up`` starts has a PID file in ``<state_dir>/lab/``; ``lab
down`` kills exactly those PIDs (after checking that ``/proc/PID/cmdline`` is
still the process we started: the QEMU whose QMP socket is ours, the daemon
with our plan, ganesha with our config), then any process left in the lab
namespace whose command line names our state directory (a crash may have lost
a PID file), and deletes the taps, the bridge and the namespace. Both commands are idempotent and build or
remove only what is missing or present, so they also repair a half-created lab;
a running QEMU whose command line differs from what the plan now asks (firmware,
memory, ...) is restarted (paused).

Firmware (``lab.firmware``, per node: ``plan.firmware_of(node)``):

* ``bios``: ``pc`` machine, SeaBIOS with "sercon" (its text and iPXE's go to the
  serial port too), NIC ``lab.nic_model`` with its iPXE ROM from ipxe-qemu.
* ``uefi``: ``q35``, OVMF (``/usr/share/OVMF/OVMF_CODE.fd`` read-only pflash, Debian
  package ``ovmf``) with a per-VM NVRAM ``<node>.OVMF_VARS.fd`` -- copied from
  ``OVMF_VARS.fd`` at every QEMU start, so each VM starts from default NVRAM; it
  persists across the guest's reboots and the BMC's power cycles (a reset still
  PXE boots first: OVMF rebuilds BootOrder from QEMU's ``bootindex`` at every
  boot) -- and a virtio-net NIC with ``romfile=`` empty, so edk2's own PXE stack
  runs (DHCP option 93 = 7, vendor class ``PXEClient:Arch:00007``). OVMF writes
  to the serial port by itself.
* ``uefi-http``: the same, with PXE switched off in fw_cfg
  (``opt/org.tianocore/IPv4PXESupport``/``IPv6PXESupport`` = ``no``) so HTTP Boot
  over IPv4 comes first (option 93 = 16, ``HTTPClient:Arch:00016``); with
  default settings OVMF tries PXEv4 and PXEv6 for ~2 minutes first.
* ``uefi-ipxe``: OVMF with an e1000 NIC and its default option ROM, ipxe-qemu's
  ``efi-e1000.rom``: iPXE's EFI build (option 93 = 7, user class ``iPXE``).

UEFI VMs get at least :data:`UEFI_MIN_MEMORY_MIB` of memory whatever
``lab.memory_mib`` says: under OVMF, once syslinux.efi has loaded our kernel
and initrd, the kernel hangs silently below ~210 MiB plus the initrd's size,
where SeaBIOS + pxelinux boots the same image in 96 MiB. An OVMF whose
network boot gets no answer tries PXEv4, PXEv6, HTTPv4 and HTTPv6 and then
stops in the EFI shell (~250 s under TCG); only a power cycle (the BMC) makes
it try again.

Power model: "off" is a paused QEMU, never a dead one (see
:mod:`orchestrator.lab.qmp`); a VM whose QEMU died is restarted (paused) by
running ``lab up`` again.

Files in ``<state_dir>/lab/``: ``lab.json`` (namespace, bridge, taps, chosen
accelerator; written *before* anything is created, so ``down`` after a crash
knows what to remove), ``<node>.pid`` / ``<node>.qmp`` / ``<node>.serial.log`` /
``<node>.qemu.log`` / ``<node>.OVMF_VARS.fd`` (UEFI), ``daemon.pid`` /
``daemon.log`` (every wake and BMC request) / ``daemon.ready``, ``nfs.pid`` /
``nfs.log`` / ``ganesha.conf`` / ``nfs-recovery/``. Serial logs, ``nfs.log``
and ``ganesha.conf`` stay after ``down`` for post-mortems.

Credentials: the daemon resolves ``power.bmc.password`` (and
``power.wol.secureon``) when it starts, i.e. at ``lab up``, from the
environment ``lab up`` runs in; after changing them, ``lab down`` + ``lab up``.

Acceleration: ``lab.accel: auto`` runs probe VMs under KVM (:func:`kvm_works`)
-- a 64 KiB firmware that must exit through ``isa-debug-exit``, SeaBIOS + iPXE
that must print on the serial port and, when a node has a UEFI firmware, OVMF
that must reach its boot manager -- each within a few seconds. ``/dev/kvm`` can
exist and still hang (nested virtualisation in some sandboxes), so only
finished probes count; otherwise TCG. The choice and its reason are logged and
shown by ``lab status``; the probe is redone when UEFI nodes appear in a lab
whose choice did not probe OVMF.
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
from orchestrator.lab import nfs
from orchestrator.lab import qmp as q
from orchestrator.lab import router as rt
from orchestrator.lab.procs import cmdline as _cmdline
from orchestrator.lab.procs import is_ours as _is_ours
from orchestrator.lab.procs import kill as _kill
from orchestrator.lab.procs import read_pid as _read_pid
from orchestrator.lab.netns import NetnsError, require_root, run_checked
from orchestrator.plan import LoadedPlan, Node, PlanError, load_plan

log = logging.getLogger("bootorch.lab")

QEMU = "qemu-system-x86_64"
#: Seconds the KVM probe VM may take before we call KVM broken.
KVM_PROBE_TIMEOUT = 8.0
#: Seconds ``lab up`` waits for the daemon to bind its sockets.
DAEMON_START_TIMEOUT = 15.0
#: Seconds ``lab up`` waits for the NFS server's port to accept TCP.
NFS_START_TIMEOUT = 15.0

#: Debian's ovmf: the UEFI firmware (read-only) and the NVRAM template each UEFI VM gets a copy of.
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
#: Debian's ipxe-qemu: the e1000's default ROM (iPXE, BIOS + EFI); QEMU finds it in its data path.
IPXE_EFI_ROM = Path("/usr/lib/ipxe/qemu/efi-e1000.rom")
UEFI_FIRMWARES = frozenset({"uefi", "uefi-http", "uefi-ipxe"})
#: Memory floor of a UEFI VM (module docstring), with room for initrds far bigger than today's.
UEFI_MIN_MEMORY_MIB = 384


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

    def ovmf_vars(self, node: Node) -> Path:
        return self.dir / f"{node.name}.OVMF_VARS.fd"

    def firmware(self, node: Node) -> str:
        return self.plan.firmware_of(node)

    def memory_mib(self, node: Node) -> int:
        mem = self.plan.model.lab.memory_mib
        return max(mem, UEFI_MIN_MEMORY_MIB) if self.firmware(node) in UEFI_FIRMWARES else mem

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
        """QEMU's command line for ``node`` under its firmware (module docstring); touches nothing."""
        lab = self.plan.model.lab
        fw = self.firmware(node)
        tap = f"tap,ifname={self.tap(node)},script=no,downscript=no"
        argv = [
            QEMU,
            "-name", f"{node.name},process=lab-{node.name}",
            "-machine", "pc" if fw == "bios" else "q35", "-accel", accel,
            "-m", str(self.memory_mib(node)), "-smp", str(lab.cpus),
            "-nodefaults", "-display", "none", "-vga", "none",
        ]
        if fw == "bios":
            argv += [
                # The node's NIC on its tap; QEMU's own scripts never run (we made the tap).
                "-nic", f"{tap},model={lab.nic_model},mac={node.mac}",
                "-boot", "order=n",
                "-serial", f"file:{self.serial(node)}",
                # SeaBIOS "sercon": BIOS, iPXE and pxelinux text (int 10h) also goes to
                # COM1, so the serial log shows the whole boot, not just the kernel's.
                "-fw_cfg", f"name=etc/sercon-port,file={self.sercon_file}",
            ]
        else:
            # uefi/uefi-http: romfile= keeps QEMU's iPXE ROM off the NIC, so edk2's own
            # network stack boots; uefi-ipxe: the e1000's default ROM is ipxe-qemu's efi-e1000.rom.
            nic = (f"e1000,netdev=net0,mac={node.mac}" if fw == "uefi-ipxe"
                   else f"virtio-net-pci,netdev=net0,mac={node.mac},romfile=")
            argv += [
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={self.ovmf_vars(node)}",
                "-netdev", f"{tap},id=net0",
                # bootindex: OVMF puts this NIC's boot options first at every boot (from fw_cfg bootorder).
                "-device", f"{nic},bootindex=0",
                "-boot", "order=n",
                "-serial", f"file:{self.serial(node)}",
            ]
            if fw == "uefi-http":
                # OVMF's default order is PXEv4, PXEv6, HTTPv4, HTTPv6: without PXE, HTTP Boot goes first.
                argv += ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=no",
                         "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=no"]
        argv += [
            "-qmp", f"unix:{self.qmp(node)},server=on,wait=off",
            "-pidfile", str(self.pidfile(node)),
            "-S",             # paused: "powered off" until a magic packet or the BMC
            "-no-shutdown",   # a guest poweroff leaves QEMU alive in 'shutdown' state
            "-daemonize",
        ]
        return argv


def check_firmware_files(plan: LoadedPlan) -> None:
    """:class:`LabError` naming the Debian package when a firmware file the plan's VMs need is missing."""
    fws = {plan.firmware_of(n) for n in plan.nodes}
    if fws & UEFI_FIRMWARES:
        for f in (OVMF_CODE, OVMF_VARS):
            if not f.is_file():
                raise LabError(f"lab.firmware has UEFI nodes but {f} is missing (Debian: apt-get install ovmf)")
    if "uefi-ipxe" in fws and not IPXE_EFI_ROM.is_file():
        raise LabError(f"lab.firmware uefi-ipxe needs iPXE's EFI ROM {IPXE_EFI_ROM} (Debian: apt-get install ipxe-qemu)")


# ----------------------------------------------------------------------------- helpers


def _run(argv: Sequence[str], *, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_checked(argv, timeout=timeout, check=check, error=LabError)


def namespace_exists(name: str) -> bool:
    out = _run(["ip", "netns", "list"]).stdout
    return any(line.split()[0] == name for line in out.splitlines() if line.strip())


def link_exists(ns: str, dev: str) -> bool:
    return _run(["ip", "-n", ns, "link", "show", "dev", dev], check=False).returncode == 0


def ensure_secret(plan: LoadedPlan) -> None:
    """The lab BMC's password file (a credential reference in the plan): made once, mode 0600."""
    import secrets

    pw = plan.model.power.bmc.password
    if pw is None or pw.file is None:
        return
    path = pw.file if pw.file.is_absolute() else plan.base / pw.file
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            # 16 characters: IPMI passwords are at most 20 bytes (ipmi_sim takes 19).
            f.write(secrets.token_urlsafe(12) + "\n")
    elif path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)  # the lab's own file, from an older bootorch: credentials are read only when private


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


def _run_probe(argv: list[str], timeout: float, *, done: "callable | None" = None,
               err_file: Path | None = None) -> tuple[int | None, str, float]:
    """Run a probe VM (its own session) until it exits, ``done()`` is true, or ``timeout``.

    Returns (exit status or None when we stopped it, stderr, seconds). The VM is
    killed by its PID in every case. With ``err_file`` stderr goes there while
    the VM runs (so ``done`` can read it), else to a pipe read at the end.
    """
    t0 = time.monotonic()
    errf = open(err_file, "wb") if err_file is not None else None
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=errf if errf is not None else subprocess.PIPE, start_new_session=True)
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
    finally:
        if errf is not None:
            errf.close()
    if err_file is not None:
        err = err_file.read_bytes()[-4096:]
    return rc, (err or b"").decode(errors="replace"), time.monotonic() - t0


def kvm_works(workdir: Path, *, timeout: float = KVM_PROBE_TIMEOUT, nic_model: str = "e1000",
              ovmf: bool = False) -> tuple[bool, str]:
    """Probe KVM with tiny VMs; ``(True, why)`` only when all behave, in time.

    1. A 64 KiB firmware that loops and exits through ``isa-debug-exit``
       (status 3): KVM can run real-mode code at all.
    2. SeaBIOS + the NIC's iPXE ROM, on a NIC whose only peer is an empty QEMU
       hub (no network at all), must print "iPXE initialising devices" on the
       serial port. Seen on this project's CI machines: /dev/kvm works for (1)
       but the guest hangs for good at "iPXE ... starting execution" (iPXE's
       switch to protected mode), so (1) alone is not enough.
    3. With ``ovmf`` (a node has a UEFI firmware): :func:`ovmf_runs` under KVM,
       before (2) since a KVM that cannot run OVMF usually says so at once.
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
    ovmf_why = ""
    if ovmf:
        ok, ovmf_why = ovmf_runs(workdir, accel="kvm", timeout=timeout)
        if not ok:
            return False, ovmf_why
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
        return True, (f"KVM probe VMs ran (firmware exit in {took:.2f}s, iPXE started in {took2:.1f}s"
                      + (f", {ovmf_why})" if ovmf_why else ")"))
    if rc is not None:
        return False, f"KVM iPXE probe VM exited {rc} before iPXE started: {err.strip()[:200]}"
    return False, (f"a KVM guest runs real-mode code but hangs in iPXE (no 'initialising devices' within "
                   f"{timeout:.0f}s)")


def ovmf_runs(workdir: Path, *, accel: str = "kvm", timeout: float = KVM_PROBE_TIMEOUT) -> tuple[bool, str]:
    """OVMF with no NIC and no disk under ``accel`` must print "BdsDxe" (its boot manager) on the serial port.

    A KVM that cannot run OVMF may instead report "KVM internal error ...
    emulation failure" on stderr and stop the guest: the probe ends at that
    message and says so.
    """
    if not (OVMF_CODE.is_file() and OVMF_VARS.is_file()):
        return False, f"OVMF is not installed ({OVMF_CODE}; Debian: apt-get install ovmf)"
    workdir.mkdir(parents=True, exist_ok=True)
    serial, err = workdir / "ovmf-probe.serial.log", workdir / "ovmf-probe.err"
    nvram = workdir / "ovmf-probe.OVMF_VARS.fd"
    shutil.copyfile(OVMF_VARS, nvram)
    serial.unlink(missing_ok=True)

    def seen(path: Path, marker: bytes) -> bool:
        try:
            return marker in path.read_bytes()
        except FileNotFoundError:
            return False

    rc, text, took = _run_probe(
        [QEMU, "-machine", "q35", "-accel", accel, "-m", "128", "-nodefaults", "-display", "none", "-no-reboot",
         "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
         "-drive", f"if=pflash,format=raw,unit=1,file={nvram}", "-serial", f"file:{serial}"],
        timeout, done=lambda: seen(serial, b"BdsDxe") or seen(err, b"internal error"), err_file=err)
    nvram.unlink(missing_ok=True)
    if seen(serial, b"BdsDxe"):
        return True, f"OVMF reached its boot manager in {took:.1f}s"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "warning" not in ln]
    detail = "; ".join([ln for ln in lines if "error" in ln or "fail" in ln][:2] or lines[:2])[:200]
    if "internal error" in text:
        return False, f"OVMF under {accel.upper()} stops at once: {detail}"
    if rc is not None:
        return False, f"the OVMF probe VM exited {rc} before its boot manager: {detail}"
    return False, f"OVMF under {accel.upper()} did not reach its boot manager (no 'BdsDxe') within {timeout:.0f}s"


def choose_accel(lab: Lab) -> tuple[str, str]:
    want = lab.plan.model.lab.accel
    if want == "tcg":
        return "tcg", "lab.accel: tcg"
    ok, why = kvm_works(lab.dir, nic_model=lab.plan.model.lab.nic_model, ovmf=_needs_ovmf(lab.plan))
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


def _needs_ovmf(plan: LoadedPlan) -> bool:
    return any(plan.firmware_of(n) in UEFI_FIRMWARES for n in plan.nodes)


def qemu_pid(lab: Lab, node: Node) -> int | None:
    pid = _read_pid(lab.pidfile(node))
    return pid if _is_ours(pid, str(lab.qmp(node))) else None


def daemon_pid(lab: Lab) -> int | None:
    pid = _read_pid(lab.daemon_pidfile)
    return pid if _is_ours(pid, str(lab.dir)) else None


#: Services the lab runs beside its VMs, one module each with ``up(lab)``, ``down(lab) -> list[str]``
#: (what it stopped) and ``status(lab) -> dict``: the site's own DHCP/TFTP servers (``lab.site``),
#: BMC implementations other than the daemon's builtin one (``lab.bmc``), Slurm (``lab.slurm``).
#: ``up`` runs them in this order after the VMs and the daemon; ``down`` in reverse, before the
#: namespace goes. Each does nothing when the plan does not ask for it.
SERVICES = ("orchestrator.lab.site", "orchestrator.lab.bmcs", "orchestrator.lab.caches", "orchestrator.lab.slurm")


def _services() -> list[Any]:
    import importlib

    return [importlib.import_module(name) for name in SERVICES]


def up(plan: LoadedPlan) -> dict[str, Any]:
    """Create (or complete) the lab for ``plan``. Returns what ``status`` returns."""
    require_root()
    if shutil.which(QEMU) is None:
        raise LabError(f"{QEMU} is not installed (Debian: apt-get install qemu-system-x86 ipxe-qemu)")
    check_firmware_files(plan)
    try:
        exports = nfs.plan_exports(plan)  # before creating anything: a missing tree stops `up` here
    except nfs.NfsError as e:
        raise LabError(str(e)) from None
    lab = Lab(plan)
    lab.dir.mkdir(parents=True, exist_ok=True)
    ns, br = lab.namespace, lab.bridge
    net_ns = plan.model.network.namespace
    if net_ns and net_ns != ns:
        raise LabError(f"network.namespace is {net_ns} but lab.namespace is {ns}: bootorch would serve in one "
                       "namespace and the VMs would boot in the other; make them the same")
    info = _info(lab)
    try:
        routers = rt.routers(lab)  # network.relayed: a router namespace per routed rack subnet
    except rt.RouterError as e:
        raise LabError(str(e)) from None
    info.update(namespace=ns, bridge=br, taps={n.name: lab.tap(n) for n in plan.nodes},
                routers=sorted({*info.get("routers", []), *(r.namespace for r in routers)}))
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
    try:
        rt.up(lab)
    except rt.RouterError as e:
        raise LabError(str(e)) from None
    for node in plan.nodes:
        tap, tap_ns, tap_br = lab.tap(node), rt.namespace_of(lab, node), rt.bridge_of(lab, node)
        if not link_exists(tap_ns, tap):
            _run(["ip", "-n", tap_ns, "tuntap", "add", "dev", tap, "mode", "tap"])
        _run(["ip", "-n", tap_ns, "link", "set", tap, "master", tap_br, "up"])

    if exports:
        nfs_start(plan, exports)
    elif (pid := nfs_stop(plan)) is not None:
        _say(f"no NFS root to serve any more: NFS server (pid {pid}) stopped")

    missing = [n for n in plan.nodes if qemu_pid(lab, n) is None]
    if info.get("accel") is not None:
        # A running VM whose command line the plan changed (firmware, memory, NIC): restart it, paused.
        for node in plan.nodes:
            pid = qemu_pid(lab, node)
            if pid is not None and node not in missing and _cmdline(pid) != lab.qemu_argv(node, info["accel"]):
                _say(f"{node.name}: the plan changed its VM (firmware {lab.firmware(node)}): restarting QEMU pid {pid}")
                _kill(pid)
                missing.append(node)
    if missing:
        if (info.get("accel") is None or plan.model.lab.accel != info.get("accel_wanted")
                or (_needs_ovmf(plan) and info.get("accel") == "kvm" and not info.get("accel_ovmf"))):
            accel, why = choose_accel(lab)
            info.update(accel=accel, accel_wanted=plan.model.lab.accel, accel_reason=why, accel_ovmf=_needs_ovmf(plan))
            _write_info(lab, info)
            _say(f"accelerator {accel}: {why}")
        for node in missing:
            _start_qemu(lab, node, info["accel"])
            _say(f"{node.name}: QEMU pid {qemu_pid(lab, node)} on {lab.tap(node)}, firmware {lab.firmware(node)}, "
                 "paused (powered off)")
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
    for service in _services():
        service.up(lab)
    return status(plan)


def _start_qemu(lab: Lab, node: Node, accel: str) -> None:
    if lab.firmware(node) == "bios":
        lab.sercon_file.write_bytes((0x3F8).to_bytes(2, "little"))  # SeaBIOS reads etc/sercon-port as an integer
    else:
        shutil.copyfile(OVMF_VARS, lab.ovmf_vars(node))  # default NVRAM at every QEMU start
    for stale in (lab.qmp(node), lab.pidfile(node)):
        stale.unlink(missing_ok=True)
    argv = ["ip", "netns", "exec", rt.namespace_of(lab, node), *lab.qemu_argv(node, accel)]
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
    bmc = (f"BMC http://{lab.plan.model.network.server}:{lab.plan.model.lab.bmc_port}/redfish/v1/Systems/<node>"
           if lab.plan.model.lab.bmc == "builtin" else f"BMCs: {lab.plan.model.lab.bmc} (started next)")
    _say(f"daemon pid {p.pid}: WoL listener on {lab.bridge} (raw 0x0842, udp 9/7), {bmc}")


def down(plan: LoadedPlan) -> list[str]:
    """Remove everything ``up`` made for ``plan``; idempotent. Returns what was removed."""
    require_root()
    lab = Lab(plan)
    info = _info(lab)
    ns = info.get("namespace", lab.namespace)
    br = info.get("bridge", lab.bridge)
    done: list[str] = []

    for service in reversed(_services()):
        done.extend(service.down(lab))
    pid = daemon_pid(lab)
    if pid is not None:
        _kill(pid)
        done.append(f"daemon {pid}")
    for node in plan.nodes:
        pid = qemu_pid(lab, node)
        if pid is not None:
            _kill(pid)
            done.append(f"qemu {node.name} {pid}")
    pid = nfs_stop(plan)
    if pid is not None:
        done.append(f"nfs {pid}")
    shutil.rmtree(nfs.recovery_dir(lab.dir), ignore_errors=True)  # ganesha's client records: runtime state
    done.extend(rt.down(lab, info.get("routers", [])))
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
        for f in (lab.qmp(node), lab.pidfile(node), lab.ovmf_vars(node)):
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
            "firmware": lab.firmware(node), "memory_mib": lab.memory_mib(node),
            "state": state, "qemu_state": raw, "power": "On" if raw in q.ON_STATES else "Off",
            "serial_log": str(lab.serial(node)), "serial_last": tail_line(lab.serial(node)),
        })
    dpid = daemon_pid(lab)
    return {
        "namespace": lab.namespace, "namespace_exists": ns_ok, "bridge": lab.bridge,
        "bridge_exists": link_exists(lab.namespace, lab.bridge) if ns_ok else False,
        "server": f"{lab.server_cidr}", "accel": info.get("accel"), "accel_reason": info.get("accel_reason"),
        "daemon": {"pid": dpid, "running": dpid is not None, "log": str(lab.daemon_log)},
        # lab.bmc builtin: the daemon's Redfish endpoint; otherwise services.bmcs says where each BMC listens.
        "bmc": (f"http://{plan.model.network.server}:{plan.model.lab.bmc_port}/redfish/v1/Systems/"
                if plan.model.lab.bmc == "builtin" else f"{plan.model.lab.bmc}: see services.bmcs"),
        "nfs": nfs_status(plan),
        "services": {service.__name__.rpartition(".")[2]: service.status(lab) for service in _services()},
        "routers": rt.status(lab),
        "nodes": nodes,
    }


def format_status(st: dict[str, Any]) -> str:
    lines = [
        f"namespace {st['namespace']}: {'present' if st['namespace_exists'] else 'absent'}; bridge {st['bridge']} "
        f"{st['server']}: {'present' if st['bridge_exists'] else 'absent'}; accel {st['accel'] or '-'}",
        f"daemon: {'pid ' + str(st['daemon']['pid']) if st['daemon']['running'] else 'not running'}; BMC {st['bmc']}",
    ]
    srv = st["nfs"]
    if srv["exports"] or srv["running"] or srv["problem"]:
        what = ", ".join(f"{e['pseudo']} ({e['profile']})" for e in srv["exports"]) or "nothing"
        run = f"pid {srv['pid']} on {srv['address']}" if srv["running"] else "not running"
        lines.append(f"nfs: {run}; exports {what}" + (f"; {srv['problem']}" if srv["problem"] else ""))
    lines += rt.format_status(st.get("routers", []))
    for name, service in st.get("services", {}).items():
        if service:  # a service the plan does not ask for reports {}
            lines.append(f"{name}: " + json.dumps(service, sort_keys=True, default=str)[:400])
    w = max([len(n["name"]) for n in st["nodes"]] + [4])
    lines.append(f"{'NODE':<{w}}  {'STATE':<9} {'PID':>7}  {'TAP':<6} {'FIRMWARE':<9} SERIAL (last line)")
    for n in st["nodes"]:
        lines.append(f"{n['name']:<{w}}  {n['state']:<9} {n['pid'] or '-':>7}  {n['tap']:<6} {n['firmware']:<9} "
                     f"{n['serial_last'][:80]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the NFS server


def nfs_pid(plan: LoadedPlan) -> int | None:
    """The running NFS server's PID (checked against its command line: our ganesha.conf), else None."""
    lab = Lab(plan)
    pid = _read_pid(nfs.pid_file(lab.dir))
    return pid if _is_ours(pid, str(nfs.conf_file(lab.dir))) else None


def nfs_start(plan: LoadedPlan, exports: list[nfs.Export] | None = None, *,
              timeout: float = NFS_START_TIMEOUT) -> int:
    """Start the NFS server in the lab namespace (or keep the running one if its config is unchanged); its PID.

    Needs the namespace and the bridge address (``lab up``). Returns once port
    2049 accepts TCP from inside the namespace; :class:`LabError` with the
    log's last line when ganesha exits or ``timeout`` passes first.
    """
    lab = Lab(plan)
    try:
        exports = nfs.plan_exports(plan) if exports is None else exports
    except nfs.NfsError as e:
        raise LabError(str(e)) from None
    if not exports:
        raise LabError("no node of this plan boots an NFS root the lab serves (root: nfs, nfsroot: '{server}:/PATH')")
    if not nfs.installed():
        raise LabError(f"{nfs.GANESHA} or its VFS module is not installed "
                       "(Debian: apt-get install nfs-ganesha nfs-ganesha-vfs)")
    if not namespace_exists(lab.namespace):
        raise LabError(f"namespace {lab.namespace} does not exist: `bootorch lab up {plan.path}` first")
    conf, pidf, logf_path = nfs.conf_file(lab.dir), nfs.pid_file(lab.dir), nfs.log_file(lab.dir)
    text = nfs.render_config(plan, exports, lab.dir)
    pid = nfs_pid(plan)
    if pid is not None:
        try:
            if conf.read_text() == text:
                return pid
        except FileNotFoundError:
            pass
        _say(f"NFS exports changed: restarting the NFS server (pid {pid})")
        nfs_stop(plan)
    lab.dir.mkdir(parents=True, exist_ok=True)
    nfs.recovery_dir(lab.dir).mkdir(exist_ok=True)
    tmp = conf.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, conf)
    pidf.unlink(missing_ok=True)
    with open(logf_path, "ab") as logf:
        p = subprocess.Popen(nfs.server_argv(lab.dir, lab.namespace), stdin=subprocess.DEVNULL, stdout=logf,
                             stderr=subprocess.STDOUT, start_new_session=True)
    pidf.write_text(f"{p.pid}\n")  # `ip netns exec` and the sh wrapper exec: this PID is ganesha's
    server = str(plan.model.network.server)
    probe = subprocess.Popen(["ip", "netns", "exec", lab.namespace, sys.executable, "-c", nfs.PROBE, server,
                              str(nfs.NFS_PORT), str(timeout)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout + 5
        while probe.poll() is None:
            if p.poll() is not None:
                raise LabError(f"the NFS server exited {p.returncode}; see {logf_path}: {tail_line(logf_path)}")
            if time.monotonic() > deadline:
                raise LabError(f"the NFS server's port probe did not finish in {timeout:.0f}s")
            time.sleep(0.05)
        if probe.returncode != 0:
            err = probe.stderr.read().decode(errors="replace").strip()[-200:] if probe.stderr else ""
            raise LabError(f"the NFS server did not accept TCP on {server}:{nfs.NFS_PORT} within {timeout:.0f}s "
                           f"({err}); see {logf_path}: {tail_line(logf_path)}")
    except BaseException:
        if probe.poll() is None:
            probe.kill()
        if p.poll() is None:
            _kill(p.pid)
        pidf.unlink(missing_ok=True)
        raise
    finally:
        probe.wait(timeout=10)
        if probe.stderr:
            probe.stderr.close()
    _say(f"NFS server pid {p.pid} on {server}:{nfs.NFS_PORT} (NFSv4, read-only): "
         + ", ".join(f"{e.pseudo} = {e.path}" for e in exports))
    return p.pid


def nfs_stop(plan: LoadedPlan) -> int | None:
    """Stop the NFS server by its PID (SIGTERM, SIGKILL after 5 s); the PID stopped, or None when none ran."""
    pid = nfs_pid(plan)
    if pid is not None:
        _kill(pid)
    nfs.pid_file(Lab(plan).dir).unlink(missing_ok=True)
    return pid


def nfs_status(plan: LoadedPlan) -> dict[str, Any]:
    """The NFS server's part of ``lab status``: pid, running, exports (or why they cannot be served), log."""
    try:
        exports, problem = nfs.plan_exports(plan, check_dirs=False), None
    except nfs.NfsError as e:
        exports, problem = [], str(e)
    pid = nfs_pid(plan)
    return {
        "pid": pid, "running": pid is not None, "address": f"{plan.model.network.server}:{nfs.NFS_PORT}",
        "exports": [{"profile": e.profile, "pseudo": e.pseudo, "path": str(e.path)} for e in exports],
        "problem": problem, "log": str(nfs.log_file(Lab(plan).dir)),
    }


# ----------------------------------------------------------------------------- the daemon


def daemon(plan: LoadedPlan, lab_dir: Path) -> int:
    """The lab daemon: WoL listener + BMC, until SIGTERM. Runs inside the lab namespace."""
    from orchestrator.lab.bmc import LabBmc

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
    from orchestrator.lab.bmc import ACTION_DELAY

    # lab.bmc other than builtin: orchestrator.lab.bmcs runs that BMC (ipmi_sim, sushy-emulator), not the daemon.
    bmc = LabBmc(str(plan.model.network.server), plan.model.lab.bmc_port, {n.name: str(lab.qmp(n)) for n in plan.nodes},
                 username=bmc_cfg.username, password=password, delay=ACTION_DELAY) if plan.model.lab.bmc == "builtin" else None
    listeners = rt.wol_listeners(lab, on_magic)  # the boot bridge, and each routed rack's bridge
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if bmc is not None:
        bmc.start()
    for listener in listeners:
        listener.start()
    log.info("ready: WoL on %s, BMC %s", lab.bridge,
             "on %s:%d" % bmc.address if bmc is not None else f"{plan.model.lab.bmc} (lab.bmc)")
    lab.ready_file.write_text(f"{os.getpid()}\n")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for listener in listeners:
            listener.stop()
        if bmc is not None:
            bmc.stop()
        lab.ready_file.unlink(missing_ok=True)
        log.info("stopped (wol: %s)", [listener.counts for listener in listeners])
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
            ensure_secret(plan)  # the BMCs read their password at `up`: the managed lab's file, made once
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
