"""A real Slurm controller for the lab's nodes (``lab.slurm``), its power saving through bootorch.

A lab service (:data:`orchestrator.lab.lab.SERVICES`): ``up(lab)`` starts, in the lab namespace,

* **munged** with the lab's own key (``munge/munge.key``, 0600, made once) on its own socket
  (``munge/munge.socket``; ``slurm.conf`` names it in ``AuthInfo=socket=``), as root (``--force``);
* **slurmctld** (``-D``) with the generated ``slurm.conf``: ``SlurmUser`` is ``lab.slurm.user``,
  one partition ``lab.slurm.partition`` holding every node, each node ``State=CLOUD`` (it starts
  powered down: ``idle~``), ``SuspendProgram``/``ResumeProgram``/``ResumeFailProgram`` the
  documented wrapper (``scripts/bootorch-slurm``) installed in ``bin/`` as a site installs it,
  with its two site lines pointing at this bootorch and this plan, plus a sudoers rule
  (``/etc/sudoers.d/bootorch-lab-<namespace>``) letting SlurmUser run it as root;
* the **slurmd supervisor** (``python -m orchestrator.lab.slurm agent PLAN``): the lab's VMs run a
  RAM-disk image without Slurm, so each node's slurmd runs on the host, in the namespace, in a
  UTS namespace of its own (``hostname`` is the node's name: a job sees it) and a time namespace
  whose boot time is the moment slurmd starts (slurmctld counts a node as resumed only when it
  reports a boot after the resume request), listening on ``NodeAddr=network.server`` and its own
  ``Port`` (``lab.slurm.slurmd_port + 1 + index``). The supervisor starts a node's slurmd only
  once the node's VM runs and answers TCP on port 22 (its OS booted), and stops it after
  :data:`MISSES` failed probes in a row (powered off, paused or reset). So Slurm sees a node
  register only because its VM booted -- Slurm cannot tell it from a slurmd in the image.

Why not slurmd in the node image: it needs slurmd, munged, their ~60 shared libraries and a
munge key served to each node only (like its host key), and grows the RAM disk every TCG boot
copies; the Slurm side (ResumeProgram, registration, ResumeTimeout, ResumeFailProgram) is the
same either way, and that is what the lab proves.

Daemons run with ``nsenter --net`` rather than ``ip netns exec``, which remounts ``/sys`` and so
hides the cgroup mounts slurmd's cgroup plugin needs at start. Each has a PID file under
``<state_dir>/lab/slurm/`` (``munged.pid``, ``slurmctld.pid``, ``agent.pid``, slurmd's own
``slurmd-<node>.pid``); ``down(lab)`` kills exactly those PIDs after checking
``/proc/PID/cmdline`` names our files, and removes the sudoers rule. Logs stay for post-mortems:
``munged.log``, ``slurmctld.log``, ``slurmd-<node>.log``, ``agent.log``.

SlurmUser must reach ``<state_dir>/lab/slurm`` (every directory above it searchable by it): its
state directory, log and the wrapper live there; ``up`` checks it as that user and says which
path to open. With ``lab.slurm.user: root`` the wrapper runs bootorch directly (no sudo).

Slurm's client commands for the lab: ``SLURM_CONF=<state_dir>/lab/slurm/slurm.conf ip netns exec
NAMESPACE sinfo`` (:func:`client_env`).
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from orchestrator.lab.lab import LabError
from orchestrator.lab.procs import kill as _kill
from orchestrator.lab.procs import ours as _ours
from orchestrator.lab.procs import read_pid as _read_pid

#: Failed port-22 probes in a row after which a node counts as down and its slurmd is stopped.
MISSES = 3
#: Seconds between probe rounds, and one probe's connect timeout.
PROBE_EVERY = 1.0
PROBE_TIMEOUT = 0.8
#: Seconds ``up`` waits for munged's socket and for slurmctld to answer.
START_TIMEOUT = 20.0
#: The repository's wrapper: what docs/oncall.md tells a site to install.
WRAPPER_SOURCE = Path(__file__).resolve().parents[2] / "scripts" / "bootorch-slurm"
#: The wrapper's two site lines, replaced for the lab.
SITE_BOOTORCH = "BOOTORCH=/opt/bootorch/.venv/bin/bootorch"
SITE_PLAN = "BOOTORCH_PLAN=/etc/bootorch/cluster.yaml"
PROGRAMS = ("resume", "suspend", "fail")
TOOLS = ("munged", "slurmctld", "slurmd", "scontrol", "nsenter", "unshare", "runuser")


class SlurmError(LabError):
    """What ``up`` could not do, and why."""


@dataclass(frozen=True)
class Files:
    """Paths of one lab's Slurm; touches nothing."""

    dir: Path
    namespace: str

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def munge_dir(self) -> Path:
        return self.dir / "munge"

    @property
    def munge_key(self) -> Path:
        return self.munge_dir / "munge.key"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    @property
    def state(self) -> Path:
        return self.dir / "ctld"

    @property
    def bin(self) -> Path:
        return self.dir / "bin"

    @property
    def wrapper(self) -> Path:
        return self.bin / "bootorch-slurm"

    def program(self, action: str) -> Path:
        return self.bin / f"bootorch-slurm-{action}"

    @property
    def sudoers(self) -> Path:
        return Path("/etc/sudoers.d") / f"bootorch-lab-{self.namespace}"

    def pid(self, name: str) -> Path:
        return self.dir / f"{name}.pid"

    def log(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def spool(self, node: str) -> Path:
        return self.dir / "spool" / node


def files(lab: Any) -> Files:
    return Files(lab.dir / "slurm", lab.namespace)


def client_env(lab: Any) -> dict[str, str]:
    """The environment Slurm's client commands need for this lab (run them in its namespace)."""
    return {**os.environ, "SLURM_CONF": str(files(lab).conf)}


def slurmd_port(plan: Any, node: Any) -> int:
    return plan.model.lab.slurm.slurmd_port + 1 + node.index


# ----------------------------------------------------------------------------- rendering


def render_conf(plan: Any, f: Files, *, controller: str | None = None) -> str:
    """``slurm.conf`` for the plan's nodes (every one ``State=CLOUD``: powered down until resumed)."""
    cfg = plan.model.lab.slurm
    lab = plan.model.lab
    server = str(plan.model.network.server)
    host = controller or socket.gethostname().split(".")[0]
    names = ",".join(n.name for n in plan.nodes)
    lines = [
        "# Generated by bootorch lab up (orchestrator/lab/slurm.py) from the plan; edits are overwritten.",
        f"ClusterName={_cluster_name(plan)}",
        f"SlurmctldHost={host}({server})",
        f"SlurmctldPort={cfg.ctld_port}",
        f"SlurmdPort={cfg.slurmd_port}",
        f"SlurmUser={cfg.user}",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={f.munge_socket}",
        f"StateSaveLocation={f.state}",
        f"SlurmdSpoolDir={f.dir / 'spool'}/%n",
        f"SlurmctldPidFile={f.pid('slurmctld-own')}",
        f"SlurmdPidFile={f.dir}/slurmd-%n.pid",
        f"SlurmctldLogFile={f.log('slurmctld')}",
        f"SlurmdLogFile={f.dir}/slurmd-%n.log",
        "SlurmctldDebug=debug",  # DebugFlags=Power lines (each program run) need debug
        "SlurmdDebug=info",
        "DebugFlags=Power",
        # Several slurmd on one host and no systemd: no cgroup-based tracking or confinement.
        "ProctrackType=proctrack/pgid",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/linear",
        "MpiDefault=none",
        "ReturnToService=2",
        # Powered-down CLOUD nodes are listed by sinfo and scontrol.
        "PrivateData=cloud",
        f"SuspendProgram={f.program('suspend')}",
        f"ResumeProgram={f.program('resume')}",
        f"ResumeFailProgram={f.program('fail')}",
        f"SuspendTime={_secs(cfg.suspend_time)}",
        f"SuspendTimeout={_secs(cfg.suspend_timeout)}",
        f"ResumeTimeout={_secs(cfg.resume_timeout)}",
        "ResumeRate=0",
        "SuspendRate=0",
        "TreeWidth=65533",
    ]
    for n in plan.nodes:
        lines.append(f"NodeName={n.name} NodeHostname={n.name} NodeAddr={server} Port={slurmd_port(plan, n)} "
                     f"CPUs={lab.cpus} RealMemory={max(1, lab.memory_mib // 2)} State=CLOUD")
    lines.append(f"PartitionName={cfg.partition} Nodes={names} Default=YES MaxTime=60 State=UP")
    return "\n".join(lines) + "\n"


def _secs(v: float) -> int:
    return max(1, int(round(v)))


def _cluster_name(plan: Any) -> str:
    name = "".join(ch for ch in plan.model.name.lower() if ch.isalnum())[:30]
    return name or "lab"


def render_wrapper(plan: Any, *, bootorch: str | None = None) -> str:
    """``scripts/bootorch-slurm`` with its two site lines pointing at this bootorch and ``plan``."""
    text = WRAPPER_SOURCE.read_text()
    exe = bootorch or str(Path(sys.executable).with_name("bootorch"))
    for old, new in ((SITE_BOOTORCH, f"BOOTORCH={exe}"), (SITE_PLAN, f"BOOTORCH_PLAN={Path(plan.path).resolve()}")):
        if text.count(old) != 1:
            raise SlurmError(f"{WRAPPER_SOURCE} no longer has the site line {old!r} once")
        text = text.replace(old, new)
    return text


def render_sudoers(user: str, wrapper: Path) -> str:
    return (f"# bootorch lab (orchestrator/lab/slurm.py): SlurmUser runs the power-saving wrapper as root\n"
            f"{user} ALL=(root) NOPASSWD: {wrapper}\n")


# ----------------------------------------------------------------------------- processes


def _in_ns(namespace: str, argv: list[str]) -> list[str]:
    # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup mounts slurmd needs.
    return ["nsenter", f"--net=/run/netns/{namespace}", *argv]


def _spawn(argv: list[str], log: Path, pidfile: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "ab") as fh:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    pidfile.write_text(f"{p.pid}\n")  # nsenter (no --fork) execs: this PID is the daemon's
    return p


def _say(msg: str) -> None:
    print(f"lab: slurm: {msg}", file=sys.stderr, flush=True)


def _tail(path: Path, n: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- up / down / status


def _as_user(user: str, argv: list[str]) -> bool:
    return subprocess.run(["runuser", "-u", user, "--", *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=10).returncode == 0


def _write(path: Path, text: str, mode: int) -> bool:
    """Write ``text`` to ``path`` (mode ``mode``) when it differs; True when it changed."""
    try:
        if path.read_text() == text:
            os.chmod(path, mode)
            return False
    except OSError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def up(lab: Any) -> None:
    """Start munged, slurmctld and the slurmd supervisor for the plan (``lab.slurm.enabled``); idempotent."""
    plan = lab.plan
    cfg = plan.model.lab.slurm
    if not cfg.enabled:
        return
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if cfg.user != "root" and shutil.which("sudo") is None:
        missing.append("sudo")
    if missing:
        raise SlurmError(f"lab.slurm needs {', '.join(missing)} (Debian: apt-get install slurmctld slurmd slurm-client "
                         "munge util-linux sudo)")
    try:
        pw = pwd.getpwnam(cfg.user)
    except KeyError:
        raise SlurmError(f"lab.slurm.user {cfg.user!r} does not exist (Debian's slurmctld package creates 'slurm')") from None
    f = files(lab)
    for d in (f.dir, f.bin, f.munge_dir, f.state, f.dir / "spool"):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(f.dir, 0o755)
    os.chmod(f.bin, 0o755)
    os.chmod(f.munge_dir, 0o755)  # munged checks its socket directory; the key inside stays 0600
    os.chown(f.state, pw.pw_uid, pw.pw_gid)
    os.chmod(f.state, 0o700)
    for n in plan.nodes:
        f.spool(n.name).mkdir(exist_ok=True)
    if not f.munge_key.exists():
        fd = os.open(f.munge_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(1024))
    ctld_log = f.log("slurmctld")
    ctld_log.touch()
    os.chown(ctld_log, pw.pw_uid, pw.pw_gid)  # slurmctld writes it as SlurmUser
    conf_changed = _write(f.conf, render_conf(plan, f), 0o644)
    _write(f.wrapper, render_wrapper(plan), 0o755)
    for action in PROGRAMS:
        link = f.program(action)
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to(f.wrapper.name)
    if cfg.user != "root":
        text = render_sudoers(cfg.user, f.wrapper)
        tmp = f.dir / "sudoers.check"
        tmp.write_text(text)
        cp = subprocess.run(["visudo", "-cf", str(tmp)], capture_output=True, text=True, timeout=10)
        tmp.unlink()
        if cp.returncode != 0:
            raise SlurmError(f"visudo refuses the lab's sudoers rule: {cp.stdout.strip()} {cp.stderr.strip()}")
        _write(f.sudoers, text, 0o440)
        for what, argv in (("run the wrapper", ["test", "-x", str(f.wrapper)]), ("write its state", ["test", "-w", str(f.state)]),
                           ("read slurm.conf", ["test", "-r", str(f.conf)])):
            if not _as_user(cfg.user, argv):
                raise SlurmError(f"SlurmUser {cfg.user} cannot {what} under {f.dir}: every directory above it must be "
                                 f"searchable by {cfg.user} (chmod o+x), or use lab.slurm.user: root")

    if _ours(f.pid("munged"), str(f.munge_key)) is None:
        f.munge_socket.unlink(missing_ok=True)
        _spawn(_in_ns(lab.namespace, ["munged", "-F", "--force", f"--socket={f.munge_socket}", f"--key-file={f.munge_key}",
                                      f"--log-file={f.log('munged')}", f"--pid-file={f.pid('munged-own')}",
                                      f"--seed-file={f.munge_dir / 'munged.seed'}"]),
               f.dir / "munged.out", f.pid("munged"))
        _wait(lambda: f.munge_socket.exists(), "munged's socket", f.log("munged"))
        _say(f"munged pid {_read_pid(f.pid('munged'))} on {f.munge_socket}")
    pid = _ours(f.pid("slurmctld"), str(f.conf))
    if pid is not None and conf_changed:
        _say(f"slurm.conf changed: restarting slurmctld (pid {pid})")
        _kill(pid)
        pid = None
    if pid is None:
        _spawn(_in_ns(lab.namespace, ["slurmctld", "-D", "-f", str(f.conf)]), f.dir / "slurmctld.out", f.pid("slurmctld"))
        _wait(lambda: _ping(lab), "slurmctld to answer (scontrol ping)", ctld_log)
        _say(f"slurmctld pid {_read_pid(f.pid('slurmctld'))} on {plan.model.network.server}:{cfg.ctld_port}, "
             f"SlurmUser {cfg.user}, nodes {','.join(n.name for n in plan.nodes)} powered down")
    if _ours(f.pid("agent"), str(f.dir)) is None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
        _spawn(_in_ns(lab.namespace, [sys.executable, "-m", "orchestrator.lab.slurm", "agent", str(plan.path),
                                      "--slurm-dir", str(f.dir)]), f.log("agent"), f.pid("agent"), env=env)
        _say(f"slurmd supervisor pid {_read_pid(f.pid('agent'))}: a node's slurmd runs while its VM answers on port 22")


def _ping(lab: Any) -> bool:
    cp = subprocess.run(_in_ns(lab.namespace, ["scontrol", "ping"]), env=client_env(lab), capture_output=True, text=True,
                        timeout=10)
    return cp.returncode == 0 and "UP" in cp.stdout


def _wait(cond: Any, what: str, log: Path, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SlurmError(f"gave up waiting {timeout:.0f}s for {what}; see {log}: {_tail(log)}")
        time.sleep(0.2)


def _slurmd_pids(lab: Any) -> dict[str, int]:
    f = files(lab)
    out = {}
    for n in lab.plan.nodes:
        pid = _ours(f.dir / f"slurmd-{n.name}.pid", str(f.conf))
        if pid is not None:
            out[n.name] = pid
    return out


def down(lab: Any) -> list[str]:
    """Stop what :func:`up` started (by PID, command lines checked) and remove the sudoers rule."""
    f = files(lab)
    done: list[str] = []
    for name, marker in (("agent", str(f.dir)),):
        pid = _ours(f.pid(name), marker)
        if pid is not None:
            _kill(pid, grace=15.0)  # it stops its slurmds first
            done.append(f"slurm {name} {pid}")
    for node, pid in _slurmd_pids(lab).items():
        _kill(pid)
        done.append(f"slurmd {node} {pid}")
    for name, marker in (("slurmctld", str(f.conf)), ("munged", str(f.munge_key))):
        pid = _ours(f.pid(name), marker)
        if pid is not None:
            _kill(pid)
            done.append(f"{name} {pid}")
        f.pid(name).unlink(missing_ok=True)
    f.pid("agent").unlink(missing_ok=True)
    f.munge_socket.unlink(missing_ok=True)
    if f.sudoers.exists() and f.sudoers.read_text().startswith("# bootorch lab"):
        f.sudoers.unlink()
        done.append(f"sudoers rule {f.sudoers}")
    return done


def status(lab: Any) -> dict[str, Any]:
    cfg = lab.plan.model.lab.slurm
    if not cfg.enabled:
        return {}
    f = files(lab)
    return {
        "conf": str(f.conf), "user": cfg.user, "partition": cfg.partition,
        "munged": _ours(f.pid("munged"), str(f.munge_key)), "slurmctld": _ours(f.pid("slurmctld"), str(f.conf)),
        "agent": _ours(f.pid("agent"), str(f.dir)), "slurmd": _slurmd_pids(lab),
        "wrapper": str(f.wrapper), "sudoers": str(f.sudoers) if f.sudoers.exists() else None, "logs": str(f.dir),
    }


# ----------------------------------------------------------------------------- the slurmd supervisor


class Agent:
    """Runs each node's slurmd while the node's VM is up (module docstring); inside the lab namespace."""

    def __init__(self, lab: Any) -> None:
        self.lab, self.f = lab, files(lab)
        self.procs: dict[str, subprocess.Popen] = {}
        self.misses = {n.name: MISSES for n in lab.plan.nodes}

    def log(self, msg: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {msg}", flush=True)

    def booted(self, node: Any) -> bool:
        """The node's VM runs (its QEMU is alive) and its OS answers TCP on port 22."""
        from orchestrator.lab import lab as lab_mod

        if lab_mod.qemu_pid(self.lab, node) is None:
            return False
        try:
            with socket.create_connection((str(node.ip), 22), timeout=PROBE_TIMEOUT):
                return True
        except OSError:
            return False

    def start(self, node: Any) -> None:
        with open("/proc/uptime") as fh:
            uptime = int(float(fh.read().split()[0]))
        # The node's clock says it booted a second ago: slurmctld takes a registration as a
        # resume only with a boot time after the resume request.
        argv = ["unshare", "--uts", "--time", "--fork", "--boottime", str(-(uptime - 1)), "--kill-child=SIGTERM", "--",
                "sh", "-c", 'hostname "$0" && exec slurmd -D -N "$0" -f "$1"', node.name, str(self.f.conf)]
        with open(self.f.dir / f"slurmd-{node.name}.out", "ab") as out:
            self.procs[node.name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                     start_new_session=True)
        self.log(f"{node.name}: its VM answers on {node.ip}:22: slurmd started (pid {self.procs[node.name].pid}, "
                 f"port {slurmd_port(self.lab.plan, node)})")

    def stop(self, name: str, why: str) -> None:
        p = self.procs.pop(name, None)
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)  # unshare --kill-child passes it on to slurmd
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pid = _ours(self.f.dir / f"slurmd-{name}.pid", str(self.f.conf))
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                p.kill()
                p.wait(timeout=5)
        self.log(f"{name}: {why}: slurmd stopped")

    def round(self) -> None:
        nodes = self.lab.plan.nodes
        results: dict[str, bool] = {}
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(n.name, self.booted(n))) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in nodes:
            p = self.procs.get(n.name)
            if p is not None and p.poll() is not None:
                self.procs.pop(n.name)
                self.log(f"{n.name}: slurmd exited {p.returncode}; see slurmd-{n.name}.log")
            if results.get(n.name):
                self.misses[n.name] = 0
                if n.name not in self.procs:
                    self.start(n)
            else:
                self.misses[n.name] += 1
                if self.misses[n.name] >= MISSES and n.name in self.procs:
                    self.stop(n.name, f"its VM stopped answering on {n.ip}:22 ({MISSES} probes)")

    def run(self) -> int:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        self.log(f"watching {', '.join(n.name for n in self.lab.plan.nodes)} (port 22 every {PROBE_EVERY:g}s)")
        try:
            while not stop.is_set():
                try:
                    self.round()
                except Exception as e:  # one bad round never ends the supervisor
                    self.log(f"probe round failed: {e!r}")
                stop.wait(PROBE_EVERY)
        finally:
            for name in list(self.procs):
                self.stop(name, "supervisor stopping")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    from orchestrator.lab.lab import Lab
    from orchestrator.plan import load_plan

    ap = argparse.ArgumentParser(prog="python -m orchestrator.lab.slurm")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ag = sub.add_parser("agent", help="run each node's slurmd while its VM is up (started by bootorch lab up)")
    ag.add_argument("plan")
    ag.add_argument("--slurm-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    lab = Lab(load_plan(args.plan))
    if files(lab).dir != args.slurm_dir:
        print(f"--slurm-dir {args.slurm_dir} is not this plan's ({files(lab).dir})", file=sys.stderr)
        return 2
    return Agent(lab).run()


if __name__ == "__main__":
    raise SystemExit(main())
