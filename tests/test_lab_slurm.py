"""A real Slurm (slurmctld + munge, Slurm 22.05) whose power saving runs bootorch, in the lab.

The slow test is the issue's acceptance: two BIOS lab nodes start powered down in Slurm; a job
for node01 makes slurmctld run ResumeProgram -- the documented wrapper (scripts/bootorch-slurm),
as SlurmUser ``slurm``, through sudo -- which asks the running ``bootorch serve`` to boot the node;
the node's slurmd registers once its VM booted and the job runs there (its output is the node's
hostname). node02 cannot boot (Wake-on-LAN off on its NIC, and its BMC address answers 404):
bootorch fails it, Slurm's ResumeTimeout passes, slurmctld runs ResumeFailProgram, and the node
ends DOWN in Slurm with bootorch's reason, set by SlurmUser. While node02 waits, node01 is
powered down through SuspendProgram and its slurmd goes with the VM.

The fast tests check the generated slurm.conf, the wrapper the lab installs against the
repository's file and docs/oncall.md, and the reasons ``bootorch slurm`` hands Slurm.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, require_root, require_tool

EXE = [sys.executable, "-m", "orchestrator"]
WRAPPER = REPO / "scripts" / "bootorch-slurm"


#: The slow test's ResumeTimeout (s).
RESUME_TIMEOUT = 80


def slurm_plan(where: Path, state: Path, *, ns: str = "bt-slurm-test", user: str = "slurm", resume_timeout: int = 120) -> Path:
    """Two BIOS nodes from plans/full.yaml's shape: node01 boots; node02 cannot (no WoL, its BMC answers 404)."""
    text = f"""\
version: 1
name: slurmlab
state_dir: {state}
network:
  namespace: {ns}
  interface: br-boot
  subnet: 10.86.0.0/24
  server: 10.86.0.1
  gateway: 10.86.0.1
dhcp: {{mode: full, lease_time: 1h}}
boot:
  root: {where / 'tftpboot'}
  config_names: [mac, ip]
  ipxe: loader
bootserver: {{router_advertisements: true}}
profiles:
  ramdisk: {{kernel: vmlinuz, initrd: rootfs.gz, root: initramfs, ip: dhcp, append: console=ttyS0 panic=10}}
nodes:
  - {{name: node01, mac: "52:54:00:86:00:01", ip: 10.86.0.11}}
  - {{name: node02, mac: "52:54:00:86:00:02", ip: 10.86.0.12, bmc: "http://10.86.0.1:9286/redfish/v1/Systems/no-such-node"}}
power:
  wol: {{method: raw, repeat: 3, interval: 100ms}}
  bmc:
    driver: redfish
    address: http://10.86.0.1:9286/redfish/v1/Systems/{{name}}
    username: admin
    password: {{file: {where / 'bmc.password'}}}
    verify_tls: false
rollout:
  admission: {{max_downloading: 2, power_on_rate: 1}}
  timeouts: {{waking: 45s, kernel: 5m, initrd: 5m, ssh: 5m}}
  retries: {{wake: 0, power_cycle: 1}}
readiness:
  ssh:
    user: root
    key: {REPO / 'var' / 'lab' / 'ssh' / 'id_ed25519'}
    host_key_policy: strict
  checks:
    - {{name: kernel, kernel: '^6\\.'}}
control:
  socket: {where / 'control' / 'control.sock'}
metrics: {{listen: "127.0.0.1:0"}}
lab:
  manage: true
  namespace: {ns}
  memory_mib: 256
  bmc_port: 9286
  wol_disabled: [node02]
  slurm:
    enabled: true
    user: {user}
    partition: lab
    suspend_time: 1h
    suspend_timeout: 60s
    resume_timeout: {resume_timeout}s
"""
    p = where / "plan.yaml"
    p.write_text(text)
    return p


# ----------------------------------------------------------------------------- fast


def test_slurm_conf_has_every_node_powered_down_on_its_own_port(tmp_path):
    from orchestrator.lab.lab import Lab
    from orchestrator.lab.slurm import files, render_conf
    from orchestrator.plan import load_plan

    plan = load_plan(slurm_plan(tmp_path, tmp_path / "state"))
    f = files(Lab(plan))
    conf = render_conf(plan, f, controller="ctl")
    keys = dict(line.split("=", 1) for line in conf.splitlines() if line and not line.startswith(("#", "NodeName", "PartitionName")))
    assert keys["SlurmctldHost"] == "ctl(10.86.0.1)" and keys["SlurmUser"] == "slurm" and keys["SlurmdUser"] == "root"
    assert keys["AuthInfo"] == f"socket={f.munge_socket}"
    assert keys["ResumeProgram"] == str(f.dir / "bin" / "bootorch-slurm-resume")
    assert keys["ResumeFailProgram"] == str(f.dir / "bin" / "bootorch-slurm-fail")
    assert keys["SuspendProgram"] == str(f.dir / "bin" / "bootorch-slurm-suspend")
    assert (keys["SuspendTime"], keys["SuspendTimeout"], keys["ResumeTimeout"]) == ("3600", "60", "120")
    nodes = [line for line in conf.splitlines() if line.startswith("NodeName=")]
    assert nodes == [
        "NodeName=node01 NodeHostname=node01 NodeAddr=10.86.0.1 Port=6819 CPUs=1 RealMemory=128 State=CLOUD",
        "NodeName=node02 NodeHostname=node02 NodeAddr=10.86.0.1 Port=6820 CPUs=1 RealMemory=128 State=CLOUD",
    ]
    assert "PartitionName=lab Nodes=node01,node02 Default=YES MaxTime=60 State=UP" in conf


def test_slurm_conf_parses_with_slurms_own_reader(tmp_path):
    """scontrol reads the generated file (no controller needed for ``show config``'s parse errors)."""
    scontrol = require_tool("scontrol")
    from orchestrator.lab.lab import Lab
    from orchestrator.lab.slurm import files, render_conf
    from orchestrator.plan import load_plan

    plan = load_plan(slurm_plan(tmp_path, tmp_path / "state"))
    f = files(Lab(plan))
    f.dir.mkdir(parents=True)
    f.conf.write_text(render_conf(plan, f))
    # `scontrol show hostnames` parses slurm.conf first; a bad key is a fatal error before it answers.
    cp = subprocess.run([scontrol, "show", "hostnames", "node[01-02]"], env={**os.environ, "SLURM_CONF": str(f.conf)},
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["node01", "node02"]


def test_the_lab_installs_the_documented_wrapper_with_only_its_site_lines_changed(tmp_path):
    from orchestrator.lab.slurm import SITE_BOOTORCH, SITE_PLAN, render_wrapper
    from orchestrator.plan import load_plan

    plan = load_plan(slurm_plan(tmp_path, tmp_path / "state"))
    repo = WRAPPER.read_text()
    lab = render_wrapper(plan, bootorch="/venv/bin/bootorch")
    changed = [(a, b) for a, b in zip(repo.splitlines(), lab.splitlines()) if a != b]
    assert changed == [(SITE_BOOTORCH, "BOOTORCH=/venv/bin/bootorch"), (SITE_PLAN, f"BOOTORCH_PLAN={tmp_path / 'plan.yaml'}")]
    assert os.access(WRAPPER, os.X_OK)
    # docs/oncall.md shows the same file, byte for byte, in its one ```sh block of the Slurm section.
    docs = (REPO / "docs" / "oncall.md").read_text()
    section = docs.split("## Slurm power saving", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert repo in blocks


def test_the_wrapper_refuses_anything_but_its_three_actions(tmp_path):
    sh = require_tool("sh")
    for argv in (["bogus", "node01"], ["resume"], ["resume", "a", "b"], ["--as-root", "rm", "x"]):
        cp = subprocess.run([sh, str(WRAPPER), *argv], capture_output=True, text=True, timeout=10)
        assert cp.returncode == 2 and "usage" in cp.stderr, argv


def test_slurm_reasons_fail_carries_the_diagnosis_and_resume_only_failures():
    from orchestrator.cli.oncall import SLURM_REASON_MAX, _slurm_reasons

    answer = {"results": {"n1": {"result": "off", "reason": "bmc ForceOff"},
                          "n2": {"result": "failed", "reason": "bmc: HTTP 404\tgone\nx"}}, "busy": {}}
    got = _slurm_reasons("fail", ["n1", "n2"], answer, {"n1": "failed: waking: no DHCP\tafter 2 wakes", "n2": "waking"})
    # Control characters arrive escaped (safetext): one line per node, no tab but the separator.
    assert got == {"n1": "bootorch: failed: waking: no DHCP\\x09after 2 wakes",
                   "n2": "bootorch: waking; power off failed: bmc: HTTP 404\\x09gone\\x0ax"}
    assert _slurm_reasons("resume", ["n1", "n2"], {"results": {"n1": {"result": "ready"}}, "busy": {"n2": "held by x"}}, {}) \
        == {"n2": "bootorch resume: busy: held by x"}
    long = _slurm_reasons("resume", ["n1"], {"results": {"n1": {"result": "failed", "reason": "y" * 1000}}, "busy": {}}, {})
    assert len(long["n1"]) == SLURM_REASON_MAX


# ----------------------------------------------------------------------------- slow: the real thing


def _wait(cond, what: str, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@pytest.fixture
def slurm_lab(tmp_path):
    """A built plan, a state directory SlurmUser can reach, and everything torn down by PID afterwards."""
    require_root()
    require_tool("qemu-system-x86_64")
    for tool in ("slurmctld", "slurmd", "munged", "sbatch", "nsenter"):
        require_tool(tool)
    # SlurmUser (not root) needs to reach <state_dir>/lab/slurm: pytest's own directories are root's only.
    state_root = Path(tempfile.mkdtemp(prefix="bt-slurm-", dir="/tmp"))
    os.chmod(state_root, 0o711)
    ns = f"bt-slurm-{secrets.token_hex(3)}"
    # Without sudo the lab runs SlurmUser root (the wrapper's root branch): the site's sudo path is then untested.
    user = "slurm" if shutil.which("sudo") else "root"
    # ResumeTimeout: above bootorch's worst case for node02 (45 s waking + a failed BMC cycle), with room for
    # node01's boot (~30 s under TCG) on a loaded CI machine.
    plan = slurm_plan(tmp_path, state_root / "state", ns=ns, user=user, resume_timeout=RESUME_TIMEOUT)
    # The BMC credential a site keeps for `bootorch serve` (the lab daemon reads it at `lab up`).
    fd = os.open(tmp_path / "bmc.password", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(18) + "\n")
    procs: list[subprocess.Popen] = []

    def serve() -> subprocess.Popen:
        """`bootorch serve PLAN` as docs/oncall.md tells a site to run it, inside the lab's namespace."""
        with open(tmp_path / "serve.out", "wb") as out:
            p = subprocess.Popen(["ip", "netns", "exec", ns, *EXE, "serve", str(plan)], env={**os.environ, "BOOTORCH_NETNS": ns},
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        r = subprocess.run([*EXE, "image", "build", str(plan)], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        yield {"plan": plan, "ns": ns, "state": state_root / "state", "user": user, "tmp": tmp_path, "serve": serve}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        subprocess.run([*EXE, "lab", "down", str(plan)], capture_output=True, text=True, timeout=300)
        shutil.rmtree(state_root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.root
def test_sbatch_on_powered_down_nodes_boots_them_through_bootorch(slurm_lab):
    plan, ns, state, tmp = slurm_lab["plan"], slurm_lab["ns"], slurm_lab["state"], slurm_lab["tmp"]
    sdir = state / "lab" / "slurm"
    env = {**os.environ, "SLURM_CONF": str(sdir / "slurm.conf")}

    def slurm(*argv: str) -> str:
        cp = subprocess.run(["ip", "netns", "exec", ns, *argv], env=env, capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, (argv, cp.stderr)
        return cp.stdout

    def node(name: str) -> dict[str, str]:
        out = slurm("scontrol", "show", "node", name, "--oneliner")
        return dict(re.findall(r"(\w+)=(.*?)(?= \w+=|$)", out.strip()))

    t0 = time.monotonic()
    r = subprocess.run([*EXE, "lab", "up", str(plan)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("node01", "node02"):
        assert node(name)["State"] == "IDLE+CLOUD+POWERED_DOWN", node(name)
    slurm_lab["serve"]()
    from orchestrator import control
    from orchestrator.plan import load_plan

    sock = control.socket_path(load_plan(plan))
    _wait(lambda: control.ping(sock), "bootorch serve's control socket", 60, 0.3)

    out1, out2 = tmp / "job-node01.out", tmp / "job-node02.out"
    t_submit = time.monotonic()
    job1 = slurm("sbatch", "--parsable", "-w", "node01", "-o", str(out1), "--wrap", "hostname; cat /proc/uptime").strip()
    slurm("sbatch", "--parsable", "-w", "node02", "-o", str(out2), "--wrap", "hostname")

    # node01: resumed through bootorch, its slurmd registered once the VM booted, the job ran there.
    def job_done():
        return out1.exists() and out1.read_text().strip() and not slurm("squeue", "-h", "-j", job1).strip()
    _wait(job_done, "job 1 on node01", 240)
    took = time.monotonic() - t_submit
    lines = out1.read_text().split("\n")
    assert lines[0] == "node01"
    assert float(lines[1].split()[0]) < took  # the node's clock: booted after the job was submitted
    ctld = (sdir / "slurmctld.log").read_text()
    woken = [line.split("waking nodes", 1)[1].strip() for line in ctld.splitlines() if "waking nodes" in line]
    assert any("node01" in slurm("scontrol", "show", "hostnames", h).split() for h in woken), \
        [line for line in ctld.splitlines() if "power" in line.lower()]
    slog = (state / "slurm.log").read_text()
    # slurmctld batches: both jobs' nodes in one `resume node[01-02]`, which returns once both are done.
    assert re.search(r"slurm resume (node01|node\[01-02\])$", slog, re.M), slog
    assert re.search(r"node01 +ssh -> ready", slog), slog
    agent = (sdir / "agent.log").read_text()
    assert "node01: its VM answers on 10.86.0.11:22: slurmd started" in agent
    hist = json.loads(subprocess.run([*EXE, "history", str(plan), "node01", "--json"], capture_output=True, text=True,
                                     timeout=30).stdout)
    assert any(h["kind"] == "action" and h["actor"].startswith("slurm@") for h in hist)
    assert any(h["what"].endswith("-> ready") for h in hist)
    print(f"job on node01 done {took:.0f}s after sbatch", file=sys.stderr)

    # SuspendProgram: node01 powered down by bootorch; its slurmd goes with the VM.
    slurm("scontrol", "update", "NodeName=node01", "State=POWER_DOWN")
    _wait(lambda: "suspend node01" in (state / "slurm.log").read_text() and "node01: off" in (state / "slurm.log").read_text(),
          "bootorch slurm suspend node01", 90)
    _wait(lambda: "node01: its VM stopped answering" in (sdir / "agent.log").read_text(), "node01's slurmd to stop", 30)

    # node02: bootorch cannot boot it; at ResumeTimeout Slurm runs ResumeFailProgram; DOWN with bootorch's reason.
    def failed():
        n = node("node02")
        return n if n.get("Reason", "").startswith("bootorch:") else None
    n2 = _wait(failed, "node02 DOWN with bootorch's reason", 240, 2)
    assert "DOWN" in n2["State"], n2
    assert re.search(rf"node node02 not resumed by ResumeTimeout\({RESUME_TIMEOUT}\)", (sdir / "slurmctld.log").read_text())
    assert "handle failed nodes node02" in (sdir / "slurmctld.log").read_text()
    slog = (state / "slurm.log").read_text()
    assert re.search(r"slurm resume (node02|node\[01-02\])$", slog, re.M), slog
    assert "node02: failed" in slog and "slurm fail node02" in slog
    assert "failed" in n2["Reason"]
    # The reason was set by SlurmUser (scontrol as that user, never as root).
    assert n2["Reason"].endswith(f"[{slurm_lab['user']}@" + n2["Reason"].rsplit("@", 1)[1]), n2["Reason"]
    assert not out2.exists() or "node02" not in out2.read_text()
    print(f"node02 DOWN with {n2['Reason']!r}; whole test {time.monotonic() - t0:.0f}s", file=sys.stderr)

