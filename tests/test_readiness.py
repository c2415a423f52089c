"""Readiness against a real OpenSSH sshd in a test network namespace."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio

from orchestrator.readiness import CheckSpec, Readiness, check_specs
from tests.conftest import require_root, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.root]


def keygen(path: Path) -> None:
    subprocess.run([require_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)


class Sshd:
    """sshd -D inside a namespace, on one veth address; restartable with another host key."""

    def __init__(self, lab, ns, addr: str, tmp: Path) -> None:
        self.lab, self.ns, self.addr, self.tmp = lab, ns, addr, tmp
        self.proc = None
        self.client_key = tmp / "client"
        keygen(self.client_key)
        (tmp / "authorized_keys").write_text((tmp / "client.pub").read_text())
        os.makedirs("/run/sshd", exist_ok=True)

    def start(self, hostkey_name: str = "hostkey") -> None:
        hostkey = self.tmp / hostkey_name
        if not hostkey.exists():
            keygen(hostkey)
        cfg = self.tmp / "sshd_config"
        cfg.write_text(
            f"ListenAddress {self.addr}\nPort 22\nHostKey {hostkey}\nPidFile {self.tmp}/sshd.pid\n"
            f"AuthorizedKeysFile {self.tmp}/authorized_keys\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
        )
        self.proc = self.lab.popen(self.ns, [require_tool("sshd", "/usr/sbin/sshd"), "-D", "-e", "-f", str(cfg)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((self.addr, 22)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("sshd did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.kill(self.proc)
            self.proc = None


@pytest.fixture
def sshd(tmp_path):
    require_root()
    from orchestrator.lab.netns import NetLab

    with NetLab() as lab:
        ns = lab.namespace("ssh")
        link = lab.veth(None, ns)  # root side <-> namespace, addresses only on these two ends
        server = Sshd(lab, ns, link.b_ip, tmp_path)
        server.start()
        try:
            yield server
        finally:
            server.stop()
            # sshd's per-connection children call setsid(): they are not in the process
            # group NetLab kills, so end whatever still runs in our namespace, by PID.
            pids = subprocess.run(["ip", "netns", "pids", ns.name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass


def readiness(sshd: Sshd, policy: str, checks=None, **kw) -> Readiness:
    return Readiness(known_hosts=sshd.tmp / "known_hosts", policy=policy, key_file=sshd.client_key,
                     checks=checks if checks is not None else [CheckSpec("kernel", "uname -r", r"\d+\.\d+")], **kw)


async def test_tofu_records_then_passes_checks(sshd):
    r = readiness(sshd, "tofu", [CheckSpec("kernel", "uname -r", r"^\d+\.\d+"), CheckSpec("sshd", "pidof sshd")])
    with trio.fail_after(30):
        assert await r.port_open(sshd.addr)
        v = await r.check(sshd.addr)
    assert v.ok, v
    assert [c.name for c in v.checks] == ["kernel", "sshd"]
    assert sshd.addr in (sshd.tmp / "known_hosts").read_text()


async def test_strict_refuses_unknown_key(sshd):
    r = readiness(sshd, "strict")
    with trio.fail_after(30):
        v = await r.check(sshd.addr)
    assert not v.ok and v.host_key_error and "strict" in v.error
    assert not (sshd.tmp / "known_hosts").exists()


async def test_tofu_refuses_changed_key_and_says_how_to_accept(sshd):
    r = readiness(sshd, "tofu")
    with trio.fail_after(60):
        assert (await r.check(sshd.addr)).ok
        sshd.stop()
        sshd.start("hostkey2")  # the node was "re-imaged"
        v = await readiness(sshd, "tofu").check(sshd.addr)
    assert not v.ok and v.host_key_error
    assert "CHANGED" in v.error and f"ssh-keygen -f {sshd.tmp / 'known_hosts'} -R '{sshd.addr}'" in v.error
    # until_ready gives up at once on a host-key error instead of retrying to the deadline
    with trio.fail_after(30):
        t0 = trio.current_time()
        v = await readiness(sshd, "tofu").until_ready(sshd.addr, trio.current_time() + 25)
        assert v.host_key_error and trio.current_time() - t0 < 10


async def test_failing_check_reported_with_reason(sshd):
    r = readiness(sshd, "tofu", [CheckSpec("kernel", "uname -r", r"^99\."), CheckSpec("false", "exit 3"),
                                 CheckSpec("mount", check_specs([_C(mount="/definitely-not-mounted")])[0].command)])
    with trio.fail_after(30):
        v = await r.check(sshd.addr)
    assert not v.ok
    reasons = {c.name: c.reason for c in v.failed_checks}
    assert "does not match" in reasons["kernel"] and reasons["false"] == "exit status 3, expected 0"
    assert reasons["kernel"].endswith(os.uname().release + "\\x0a")  # what the node said, made safe
    assert "exit status 1" in reasons["mount"]


async def test_command_timeout_fires(sshd):
    r = readiness(sshd, "tofu", [CheckSpec("slow", "sleep 30")], step_timeout=1.0)
    with trio.fail_after(20):
        t0 = time.monotonic()
        v = await r.check(sshd.addr)
    assert not v.ok and v.checks[0].reason.startswith("timed out") and time.monotonic() - t0 < 10


async def test_silent_server_times_out_and_thread_is_released(tmp_path):
    """A TCP listener that never sends a banner: the deadline closes the transport from outside."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    r = Readiness(known_hosts=tmp_path / "kh", policy="tofu", checks=[], port=port, step_timeout=30, concurrency=1,
                  key_file=tmp_path / "key-never-read")  # the banner never comes: authentication is never reached
    try:
        with trio.fail_after(20):
            t0 = trio.current_time()
            v = await r.check("127.0.0.1", timeout=1.5)
            assert not v.ok and "timed out" in v.error and trio.current_time() - t0 < 5
            # the limiter's only token came back: a second check can run
            v2 = await r.check("127.0.0.1", timeout=1.0)
            assert not v2.ok
            assert r.limiter.borrowed_tokens <= 1
    finally:
        srv.close()


async def test_port_open_false_when_nothing_listens(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = Readiness(known_hosts=tmp_path / "kh", policy="strict", checks=[], port=port)
    with trio.fail_after(10):
        assert not await r.port_open("127.0.0.1", timeout=2)


def test_check_specs_from_plan_checks():
    specs = check_specs([_C(kernel="^6"), _C(mount="/usr"), _C(service="dropbear"), _C(command="true", expect="x", name="c")])
    assert [s.name for s in specs] == ["kernel", "mount /usr", "service dropbear", "c"]
    assert specs[0].command == "uname -r" and specs[2].command == "pidof dropbear"


class _C:
    def __init__(self, **kw):
        self.name = kw.get("name")
        self.command = kw.get("command")
        self.expect = kw.get("expect")
        self.kernel = kw.get("kernel")
        self.mount = kw.get("mount")
        self.service = kw.get("service")


async def test_until_ready_reports_the_failing_check_not_a_last_attempt_cut_by_the_deadline(tmp_path, autojump_clock):
    """A lab rollout once failed a node with 'timed out after 0.1s' instead of its failing check."""
    from orchestrator.readiness import CheckResult, Readiness, Verdict

    class Scripted(Readiness):
        def __init__(self) -> None:
            super().__init__(known_hosts=tmp_path / "kh", policy="tofu", checks=[])
            self.calls = 0

        async def check(self, host, timeout=None):
            self.calls += 1
            if timeout is not None and timeout < 3:
                await trio.sleep(timeout)
                return Verdict(False, False, error=f"readiness of {host} timed out after {timeout:g}s")
            await trio.sleep(3)
            return Verdict(False, True, [CheckResult("hostname", False, 0, "node03", "does not match")])

    r = Scripted()
    v = await r.until_ready("10.0.0.3", trio.current_time() + 10.5)
    assert v.failed_checks and v.failed_checks[0].name == "hostname", v
    assert r.calls >= 2


# --------------------------------------------------------------------------- hostile nodes


async def test_unbounded_output_is_capped_and_fails_the_check(sshd):
    """`cat /dev/zero` once made one 10 s check keep 779 MiB: reading stops at the cap and the check fails."""
    import tracemalloc

    from orchestrator.readiness import OUTPUT_CAP

    r = readiness(sshd, "tofu", [CheckSpec("flood", "cat /dev/zero"), CheckSpec("after", "echo ok", "^ok$")],
                  step_timeout=10.0)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        with trio.fail_after(40):
            t0 = time.monotonic()
            v = await r.check(sshd.addr)
            took = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    flood = v.checks[0]
    assert OUTPUT_CAP == 64 * 1024
    assert not flood.ok and flood.reason == "output exceeds 64 KiB", flood
    assert took < 8, f"read until the deadline ({took:.1f} s) instead of stopping at the cap"
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated while reading one check"
    assert len(flood.output) <= 2000 and flood.output.isprintable()  # NULs shown as \x00, the tail only
    assert v.checks[1].ok, v  # the session survives: the next check still runs


async def test_check_output_and_node_errors_are_safe_text(sshd):
    """A node's output can carry terminal escapes and bytes that are not UTF-8: results hold them escaped."""
    r = readiness(sshd, "tofu", [CheckSpec("evil", r"printf '\033]52;c;aGk=\007\033[2J\377 boom\n'; exit 1")])
    with trio.fail_after(30):
        v = await r.check(sshd.addr)
    c = v.checks[0]
    assert not c.ok and c.reason == "exit status 1, expected 0"
    assert "\x1b" not in c.output and c.output.isprintable()
    assert "\\x1b]52;c;aGk=\\x07\\x1b[2J\\xff boom" in c.output


def test_results_made_safe_where_they_are_created():
    from orchestrator.readiness import CheckResult, Verdict

    c = CheckResult("n\x1b[31m", False, 1, "out\x1b[2J" + "x" * 50_000, "bad \x9b reason")
    assert c.name.isprintable() and c.output.isprintable() and c.reason.isprintable()
    assert "\\x1b[2J" in c.output and len(c.output) <= 2000 and c.reason == "bad \\x9b reason"
    v = Verdict(False, True, error="SSH session broke: \x1b]8;;http://evil\x07click\x1b]8;;\x07")
    assert v.error.isprintable() and "\\x1b]8;;http://evil\\x07" in v.error


class FakeAgent:
    """An ssh-agent socket that holds no keys and counts who connects (SSH_AUTH_SOCK points here)."""

    def __init__(self, path: Path) -> None:
        import threading

        self.path = str(path)
        self.connections = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import struct

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                try:
                    while True:
                        head = conn.recv(4)
                        if len(head) < 4:
                            break
                        conn.recv(struct.unpack(">I", head)[0])
                        conn.sendall(struct.pack(">IBI", 5, 12, 0))  # SSH2_AGENT_IDENTITIES_ANSWER, no keys
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


async def test_agent_and_home_keys_are_not_offered_unless_the_plan_says_agent(sshd, tmp_path, monkeypatch):
    """Without readiness.ssh.key, paramiko offered the agent's and ~/.ssh's keys to whatever answered
    at a node's address (under tofu before anything was verified). Now: only with agent: true."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    # The operator's own key in ~/.ssh is even authorized on this "node": it must still not be offered.
    (home / ".ssh" / "id_ed25519").write_bytes(sshd.client_key.read_bytes())
    (home / ".ssh" / "id_ed25519").chmod(0o600)
    agent = FakeAgent(tmp_path / "agent.sock")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SSH_AUTH_SOCK", agent.path)
    try:
        with trio.fail_after(60):
            no_key = Readiness(known_hosts=sshd.tmp / "known_hosts", policy="tofu", checks=[])
            v = await no_key.check(sshd.addr)
            assert not v.ok and "readiness.ssh.key" in v.error and "agent: true" in v.error, v
            assert agent.connections == 0

            with_key = readiness(sshd, "tofu")
            assert (await with_key.check(sshd.addr)).ok
            assert agent.connections == 0

            # Control: with the opt-in the agent is asked (it holds no keys, so the login fails).
            opted = Readiness(known_hosts=sshd.tmp / "known_hosts", policy="tofu", checks=[], agent=True)
            v = await opted.check(sshd.addr)
            assert agent.connections >= 1 and not v.ok
    finally:
        agent.close()


async def test_pinned_host_key_refused_with_the_likely_cause(sshd):
    """A node whose key bootorch made presents another one: CHANGED, naming the missing key archive."""
    other = sshd.tmp / "pinned"
    keygen(other)
    ktype, b64 = (sshd.tmp / "pinned.pub").read_text().split()[:2]
    (sshd.tmp / "known_hosts").write_text(f"{sshd.addr} {ktype} {b64}\n")
    hint = "node07's own key (hostkeys/node07 under the state directory), sent as hostkeys/10.0.0.7.cpio"
    for policy in ("tofu", "strict"):
        r = Readiness(known_hosts=sshd.tmp / "known_hosts", policy=policy, key_file=sshd.client_key, checks=[],
                      pinned={sshd.addr: hint})
        with trio.fail_after(30):
            v = await r.check(sshd.addr)
        assert not v.ok and v.host_key_error and "CHANGED" in v.error, v
        assert hint in v.error and "did not get its host key" in v.error
        assert "ssh-keygen" not in v.error  # accepting the new key is not the fix here
    assert (sshd.tmp / "known_hosts").read_text().split()[2] == b64  # nothing was re-learned


def test_checks_scoped_to_profiles_run_only_on_their_nodes():
    from orchestrator.plan import load_plan
    from orchestrator.readiness import Readiness, checks_for
    from tests.conftest import REPO

    plan = load_plan(REPO / "plans" / "examples" / "lab-matrix.yaml")
    r = Readiness.from_plan(plan)
    names = lambda host: [c.name for c in checks_for(r.checks, host)]  # noqa: E731
    assert names("10.78.0.15") == ["kernel", "root-is-nfs", "sshd"]  # m05, profile nfsroot
    assert names("10.78.0.12") == ["kernel", "root-in-ram", "sshd"]  # m02, profile ramdisk
    assert names("10.99.9.9") == ["kernel", "sshd"]  # not a plan node: only the unscoped checks
