"""BMC implementations other than the lab daemon's builtin one (``lab.bmc``).

A lab service (:data:`orchestrator.lab.lab.SERVICES`): ``up(lab)`` starts what the plan
asks for, ``down(lab)`` stops it and says what it stopped, ``status(lab)`` reports it.
With ``lab.bmc: builtin`` the lab daemon serves Redfish itself (:mod:`orchestrator.lab.bmc`)
and this module only stops what an earlier plan started.

Each BMC listens where the plan's ``power.bmc`` says a node's BMC is (``address`` filled
in for the node, or the node's own ``bmc:``), inside the lab namespace. An IPv4 address
that is not the namespace's already is added there as a /32 on ``lo`` (a BMC on a
management address of its own, as on a real site); the nodes' own IPs are refused.

* ``ipmi_sim``: OpenIPMI's IPMI simulator (Debian ``openipmi``), one process per node,
  each with a generated ``lan.conf`` (one LAN channel on the node's BMC address, port
  623 unless the address names one, IPMI 2.0 / RMCP+ with the plan's user at ADMIN
  privilege) and a ``chassis_control`` program, :mod:`orchestrator.lab.ipmi_chassis`,
  that maps the chassis commands to the node's VM through QMP. Needs ``power.bmc.driver:
  ipmi`` and ``power.bmc.cipher_suite: 3`` (ipmi_sim 2.0.33 offers no 17) and a password
  of at most 19 bytes (ipmi_sim 2.0.33 keeps no more; IPMI 2.0 allows 20, many BMCs 16).
  Files: ``<state_dir>/lab/ipmi/<node>/`` (``lan.conf``, ``sim.emu``, ``state/``),
  ``ipmi-<node>.pid``, ``ipmi-<node>.log``, ``<node>.ipmi-boot`` (the boot device the
  last ``chassis bootdev`` set).
* ``sushy``: sushy-tools' sushy-emulator (Redfish) with our QMP systems driver
  (:mod:`orchestrator.lab.sushy_qmp` says which parts are sushy's and which ours), one
  process for all nodes on the origin of the plan's Redfish address (plain HTTP). HTTP
  basic auth from a bcrypt htpasswd file holding the plan's user and password (bcrypt is
  sushy-tools' own dependency); without a password configured, no auth file: anyone may
  (as the builtin BMC). Needs ``power.bmc.driver: redfish``. Files: ``sushy.conf``,
  ``sushy.htpasswd`` (0600), ``sushy-state/`` (sushy's private state: it pickles into
  SQLite files there, never in the shared temp directory it defaults to), ``sushy.pid``,
  ``sushy.log``.

Processes are started with ``ip netns exec`` (which execs: the PID is the server's),
recorded in PID files, and stopped by PID after ``/proc/PID/cmdline`` shows our config
file. ``up`` waits until each server's port is bound inside the namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from orchestrator.lab import procs

IPMI_SIM = "ipmi_sim"
#: Seconds ``up`` waits for a BMC's port to be bound.
START_TIMEOUT = 15.0
#: ipmi_sim 2.0.33 rejects a session for a password of 20 bytes or more (measured).
IPMI_SIM_MAX_PASSWORD = 19


def _lab_mod():
    from orchestrator.lab import lab as lab_mod

    return lab_mod


class BmcsError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- where each BMC listens


def _targets(plan) -> list[tuple[Any, str]]:
    """(node, its BMC address as the power driver will use it)."""
    from orchestrator.power import fill
    from orchestrator.power.drivers import target

    b = plan.model.power.bmc
    return [(n, t.bmc or fill(b.address or "", t)) for n, t in ((n, target(n)) for n in plan.nodes)]


def ipmi_endpoints(plan) -> dict[str, tuple[str, int]]:
    """Node name -> (IPv4 address, UDP port) of its ipmi_sim."""
    from orchestrator.power.drivers import split_host_port

    out: dict[str, tuple[str, int]] = {}
    for node, addr in _targets(plan):
        try:
            host, port = split_host_port(addr, 623)
            ipaddress.IPv4Address(host)
        except ValueError as e:
            raise BmcsError(f"lab.bmc ipmi_sim: {node.name}'s BMC address {addr!r} must be an IPv4 address "
                            f"with an optional :port ({e})") from None
        out[node.name] = (host, port or 623)
    _no_duplicates(out)
    return out


def sushy_endpoint(plan) -> tuple[str, int]:
    """(IPv4 address, TCP port) of the lab's sushy-emulator: the one origin of every node's Redfish address."""
    import httpx

    origins = set()
    for node, addr in _targets(plan):
        url = httpx.URL(addr if "://" in addr else "https://" + addr)
        if url.scheme != "http":
            raise BmcsError(f"lab.bmc sushy serves plain HTTP: {node.name}'s address {addr!r} must start with "
                            "http:// (and power.bmc.verify_tls: false)")
        try:
            ipaddress.IPv4Address(url.host)
        except ValueError:
            raise BmcsError(f"lab.bmc sushy: {node.name}'s address {addr!r} must name an IPv4 address") from None
        origins.add((url.host, url.port or 80))
    if len(origins) != 1:
        raise BmcsError(f"lab.bmc sushy runs one emulator for all nodes: their Redfish addresses must share one "
                        f"host:port, not {sorted(origins)}")
    return origins.pop()


def _no_duplicates(eps: dict[str, tuple[str, int]]) -> None:
    seen: dict[tuple[str, int], str] = {}
    for name, ep in eps.items():
        if ep in seen:
            raise BmcsError(f"lab.bmc: nodes {seen[ep]} and {name} have the same BMC address {ep[0]}:{ep[1]}")
        seen[ep] = name


def _ensure_address(lab, host: str) -> None:
    """``host`` is an address of the lab namespace (added to ``lo`` as /32 when it is not yet)."""
    plan = lab.plan
    if host in {str(n.ip) for n in plan.nodes}:
        raise BmcsError(f"lab.bmc: BMC address {host} is a node's own IP; give the BMCs addresses of their own")
    lm = _lab_mod()
    have = lm._run(["ip", "-n", lab.namespace, "-4", "-o", "addr", "show"]).stdout
    if any(tok.split("/")[0] == host for tok in have.split()):
        return
    lm._run(["ip", "-n", lab.namespace, "addr", "add", f"{host}/32", "dev", "lo"])


def _bound(lab, proto: str, host: str, port: int) -> bool:
    """Something listens on ``host:port`` (``proto`` udp/tcp) inside the lab namespace."""
    flag = "-Hunl" if proto == "udp" else "-Htnl"
    cp = subprocess.run(["ip", "netns", "exec", lab.namespace, "ss", flag, f"sport = :{port}"], capture_output=True, check=False,
                        text=True, timeout=10)
    return any(f"{host}:{port}" in line or f"*:{port}" in line or f"0.0.0.0:{port}" in line for line in cp.stdout.splitlines())


def _credentials(lab) -> tuple[str | None, str | None]:
    b = lab.plan.model.power.bmc
    return b.username, _lab_mod().read_secret(lab.plan, b.password)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The venv's orchestrator must import even when bootorch runs from elsewhere.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    return env


def _start(lab, argv: list[str], pidfile: Path, logfile: Path, ready, what: str) -> int:
    lm = _lab_mod()
    pidfile.unlink(missing_ok=True)
    with open(logfile, "ab") as logf:
        p = subprocess.Popen(["ip", "netns", "exec", lab.namespace, *argv], stdin=subprocess.DEVNULL, stdout=logf,
                             stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    pidfile.write_text(f"{p.pid}\n")  # `ip netns exec` execs: this PID is the server's
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if p.poll() is not None:
            pidfile.unlink(missing_ok=True)
            raise BmcsError(f"{what} exited {p.returncode}; see {logfile}: {lm.tail_line(logfile)}")
        if time.monotonic() > deadline:
            procs.kill(p.pid)
            pidfile.unlink(missing_ok=True)
            raise BmcsError(f"{what} did not listen within {START_TIMEOUT:.0f}s; see {logfile}")
        time.sleep(0.05)
    return p.pid


def _pid(pidfile: Path, marker: str) -> int | None:
    return procs.ours(pidfile, marker)


def _stop(pidfile: Path, marker: str, what: str) -> list[str]:
    pid = _pid(pidfile, marker)
    if pid is not None:
        procs.kill(pid)
    pidfile.unlink(missing_ok=True)
    return [f"{what} {pid}"] if pid is not None else []


# ----------------------------------------------------------------------------- ipmi_sim


def ipmi_dir(lab, name: str) -> Path:
    return lab.dir / "ipmi" / name


def ipmi_pidfile(lab, name: str) -> Path:
    return lab.dir / f"ipmi-{name}.pid"


def ipmi_boot_file(lab, name: str) -> Path:
    return lab.dir / f"{name}.ipmi-boot"


def _conf_word(value: str, what: str) -> str:
    """A lan.conf quoted string: OpenIPMI's parser has no escapes, so refuse what would break it."""
    if not value or any(c in value for c in '"\\\n\r') or not value.isprintable():
        raise BmcsError(f"lab.bmc ipmi_sim: {what} must be printable and contain no quote or backslash")
    return f'"{value}"'


def ipmi_lan_conf(lab, node, host: str, port: int, user: str, password: str) -> str:
    """The ``lan.conf`` of ``node``'s ipmi_sim (see ``man 5 ipmi_lan``)."""
    cmd = " ".join(shlex.quote(w) for w in [sys.executable, "-m", "orchestrator.lab.ipmi_chassis",
                                             str(lab.qmp(node)), str(ipmi_boot_file(lab, node.name))])
    guid = uuid.uuid5(uuid.NAMESPACE_URL, f"bootorch-lab-bmc:{node.mac}").hex
    return "\n".join([
        f"# node {node.name}: written by bootorch lab up (orchestrator/lab/bmcs.py)",
        f'name "bootorch-{node.name}"',
        "set_working_mc 0x20",
        "  startlan 1",
        f"    addr {host} {port}",
        "    priv_limit admin",
        # IPMI 1.5 sessions: MD5 only (no "none", no "straight" clear-text passwords); bootorch speaks 2.0 (lanplus).
        "    allowed_auths_callback md5",
        "    allowed_auths_user md5",
        "    allowed_auths_operator md5",
        "    allowed_auths_admin md5",
        f"    guid {guid}",
        "  endlan",
        f"  chassis_control {_conf_word(cmd, 'the chassis control command (state_dir path)')}",
        # user 1 is the anonymous user: disabled; user 2 is the plan's.
        f"  user 2 true {_conf_word(user, 'power.bmc.username')} {_conf_word(password, 'the BMC password')} admin 4 md5",
        "",
    ])


IPMI_EMU = """# one BMC (management controller 0x20), as OpenIPMI's ipmisim1.emu
mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02
mc_enable 0x20
"""


def _ipmi_up(lab) -> None:
    plan = lab.plan
    if shutil.which(IPMI_SIM) is None:
        raise BmcsError("lab.bmc ipmi_sim needs OpenIPMI's ipmi_sim (Debian: apt-get install openipmi ipmitool)")
    b = plan.model.power.bmc
    if b.driver != "ipmi":
        raise BmcsError(f"lab.bmc ipmi_sim needs power.bmc.driver: ipmi (it is {b.driver})")
    if b.cipher_suite != 3:
        raise BmcsError("lab.bmc ipmi_sim: OpenIPMI's ipmi_sim 2.0.33 offers cipher suite 3 only: "
                        "set power.bmc.cipher_suite: 3")
    user, password = _credentials(lab)
    if not user or not password:
        raise BmcsError("lab.bmc ipmi_sim needs power.bmc.username and power.bmc.password (an IPMI 2.0 session "
                        "always authenticates)")
    if len(password.encode()) > IPMI_SIM_MAX_PASSWORD:
        raise BmcsError(f"lab.bmc ipmi_sim: the BMC password has {len(password.encode())} bytes; ipmi_sim keeps at most "
                        f"{IPMI_SIM_MAX_PASSWORD} (IPMI 2.0: 20, many BMCs: 16): use a shorter one")
    eps = ipmi_endpoints(plan)
    for node in plan.nodes:
        host, port = eps[node.name]
        d = ipmi_dir(lab, node.name)
        (d / "state").mkdir(parents=True, exist_ok=True)
        conf, emu = d / "lan.conf", d / "sim.emu"
        text = ipmi_lan_conf(lab, node, host, port, user, password)
        pidfile = ipmi_pidfile(lab, node.name)
        pid = _pid(pidfile, str(conf))
        if pid is not None and conf.exists() and conf.read_text() == text:
            continue
        if pid is not None:
            _stop(pidfile, str(conf), "ipmi_sim")
        _ensure_address(lab, host)
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the password
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(conf, 0o600)
        emu.write_text(IPMI_EMU)
        shutil.rmtree(d / "state", ignore_errors=True)  # persisted users would override lan.conf's
        (d / "state").mkdir()
        # -n: no console on stdin/stdout; -s: its persistence here, not /var/ipmi_sim.
        argv = [IPMI_SIM, "-c", str(conf), "-f", str(emu), "-s", str(d / "state"), "-n"]
        pid = _start(lab, argv, pidfile, lab.dir / f"ipmi-{node.name}.log",
                     lambda h=host, p=port: _bound(lab, "udp", h, p), f"ipmi_sim for {node.name}")
        _lab_mod()._say(f"{node.name}: ipmi_sim pid {pid} on {host}:{port}/udp (IPMI 2.0, cipher suite 3)")


def _ipmi_down(lab) -> list[str]:
    done = []
    for pidfile in sorted(lab.dir.glob("ipmi-*.pid")):
        name = pidfile.name[len("ipmi-"):-len(".pid")]
        done += _stop(pidfile, str(ipmi_dir(lab, name) / "lan.conf"), f"ipmi_sim {name}")
    return done


# ----------------------------------------------------------------------------- sushy


def sushy_files(lab) -> dict[str, Path]:
    return {k: lab.dir / v for k, v in (("conf", "sushy.conf"), ("htpasswd", "sushy.htpasswd"), ("state", "sushy-state"),
                                        ("pid", "sushy.pid"), ("log", "sushy.log"))}


def system_uuid(node) -> str:
    """The UUID sushy names a node's system by (stable: from its MAC)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"bootorch-lab-system:{node.mac}"))


def sushy_conf(lab, host: str, port: int, auth_file: Path | None) -> str:
    """sushy's config (a Python file of settings) for the lab's nodes."""
    lm = _lab_mod()
    systems = [{"name": n.name, "uuid": system_uuid(n), "qmp": str(lab.qmp(n)), "mac": n.mac, "boot_device": "Pxe",
                "boot_mode": "UEFI" if lab.firmware(n) in lm.UEFI_FIRMWARES else "Legacy"}
               for n in lab.plan.nodes]
    lines = [
        "# written by bootorch lab up (orchestrator/lab/bmcs.py): sushy-emulator for the lab's VMs",
        f"SUSHY_EMULATOR_LISTEN_IP = {host!r}",
        f"SUSHY_EMULATOR_LISTEN_PORT = {port!r}",
        f"SUSHY_EMULATOR_STATE_DIR = {str(sushy_files(lab)['state'])!r}",
        "SUSHY_EMULATOR_FEATURE_SET = 'full'",
        f"BOOTORCH_QMP_SYSTEMS = {json.dumps(systems)}",
    ]
    if auth_file is not None:
        lines.append(f"SUSHY_EMULATOR_AUTH_FILE = {str(auth_file)!r}")
    return "\n".join(lines) + "\n"


def htpasswd_line(user: str, password: str) -> str:
    """An Apache htpasswd line with a bcrypt digest (the only kind sushy accepts)."""
    import bcrypt

    if ":" in user or "\n" in user:
        raise BmcsError("power.bmc.username must not contain ':' or a newline")
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()}\n"


def _sushy_up(lab) -> None:
    b = lab.plan.model.power.bmc
    if b.driver != "redfish":
        raise BmcsError(f"lab.bmc sushy needs power.bmc.driver: redfish (it is {b.driver})")
    try:
        import sushy_tools  # noqa: F401
    except ImportError:
        raise BmcsError("lab.bmc sushy needs sushy-tools (pip install 'sushy-tools>=1,<3', in the test extras)") from None
    host, port = sushy_endpoint(lab.plan)
    f = sushy_files(lab)
    user, password = _credentials(lab)
    auth = f["htpasswd"] if password else None
    text = sushy_conf(lab, host, port, auth)
    pid = _pid(f["pid"], str(f["conf"]))
    # The digest is salted: the config says whether auth is on; the password's fingerprint says whether it changed.
    stamp = f"# credentials {uuid.uuid5(uuid.NAMESPACE_URL, f'{user}:{password}')}\n" if password else ""
    if pid is not None and f["conf"].exists() and f["conf"].read_text() == text + stamp:
        return
    if pid is not None:
        _stop(f["pid"], str(f["conf"]), "sushy-emulator")
    _ensure_address(lab, host)
    if auth is not None:
        fd = os.open(auth, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(htpasswd_line(user or "admin", password or ""))
    f["state"].mkdir(mode=0o700, exist_ok=True)
    f["conf"].write_text(text + stamp)
    argv = [sys.executable, "-m", "orchestrator.lab.sushy_qmp", "--config", str(f["conf"])]
    pid = _start(lab, argv, f["pid"], f["log"], lambda: _bound(lab, "tcp", host, port), "sushy-emulator")
    _lab_mod()._say(f"sushy-emulator pid {pid} on http://{host}:{port}/redfish/v1/Systems/ "
                    f"({len(lab.plan.nodes)} systems, {'basic auth' if auth else 'no auth'})")


def _sushy_down(lab) -> list[str]:
    f = sushy_files(lab)
    return _stop(f["pid"], str(f["conf"]), "sushy-emulator")


# ----------------------------------------------------------------------------- the service


def up(lab: Any) -> None:
    """Start what ``lab.bmc`` asks for; stop BMCs of another kind an earlier plan started."""
    kind = lab.plan.model.lab.bmc
    try:
        if kind != "ipmi_sim":
            _ipmi_down(lab)
        if kind != "sushy":
            _sushy_down(lab)
        if kind == "ipmi_sim":
            _ipmi_up(lab)
        elif kind == "sushy":
            _sushy_up(lab)
    except BmcsError as e:
        raise _lab_mod().LabError(str(e)) from None


def down(lab: Any) -> list[str]:
    """Stop what :func:`up` started; returns what was stopped."""
    return _ipmi_down(lab) + _sushy_down(lab)


def status(lab: Any) -> dict[str, Any]:
    kind = lab.plan.model.lab.bmc
    out: dict[str, Any] = {"kind": kind}
    if kind == "ipmi_sim":
        try:
            eps = ipmi_endpoints(lab.plan)
        except BmcsError as e:
            return {**out, "problem": str(e)}
        out["nodes"] = {n.name: {"address": f"{eps[n.name][0]}:{eps[n.name][1]}",
                                 "pid": _pid(ipmi_pidfile(lab, n.name), str(ipmi_dir(lab, n.name) / "lan.conf"))}
                        for n in lab.plan.nodes}
    elif kind == "sushy":
        f = sushy_files(lab)
        try:
            host, port = sushy_endpoint(lab.plan)
        except BmcsError as e:
            return {**out, "problem": str(e)}
        out.update(address=f"http://{host}:{port}/redfish/v1/Systems/", pid=_pid(f["pid"], str(f["conf"])),
                   log=str(f["log"]))
    return out
