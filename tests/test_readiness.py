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
    r = Readiness(known_hosts=tmp_path / "kh", policy="tofu", checks=[], port=port, step_timeout=30, concurrency=1)
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
