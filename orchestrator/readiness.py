"""Readiness: is the node up (TCP 22 answers) and healthy (the plan's checks pass over SSH)?

paramiko is blocking, so each SSH session runs in ``trio.to_thread.run_sync``
under one :class:`trio.CapacityLimiter` sized from the plan
(``readiness.ssh.concurrency``): trio's default limiter of 40 threads would
silently queue the 41st node behind the others.

Every step has a deadline. paramiko's own defaults are generous (the channel
open waits up to an hour) and ``recv_exit_status()`` has no timeout at all, so:

* ``connect(timeout=, banner_timeout=, auth_timeout=, channel_timeout=)`` bound
  the connection;
* a command's completion is awaited on ``channel.status_event.wait(timeout)``
  instead of ``recv_exit_status()``;
* and because a thread cannot be cancelled, when trio's deadline passes first
  we close the SSH transport *from outside the thread* (:class:`_Session`),
  which makes whatever paramiko call is blocked fail at once.

Host keys: ``strict`` accepts only keys already in ``known_hosts``; ``tofu``
records a new host's key on first sight and refuses a changed one (a
re-imaged node, or someone in the middle), reporting the command that accepts
the new key. There is no blind auto-add. Keys for non-22 ports are stored as
``[host]:port`` like OpenSSH. The known_hosts file is rewritten atomically
(temp file + fsync + rename) under a lock: paramiko's own ``save_host_keys`` is
neither atomic nor safe against concurrent writers.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import paramiko
import trio

# --------------------------------------------------------------------------- checks


@dataclass(frozen=True, slots=True)
class CheckSpec:
    name: str
    command: str
    expect: str | None = None  # regex on stdout
    expect_exit: int = 0


def check_specs(checks) -> list[CheckSpec]:
    """Turn the plan's readiness checks into shell commands (busybox-compatible)."""
    out = []
    for i, c in enumerate(checks):
        if c.command is not None:
            out.append(CheckSpec(c.name or f"check{i + 1}", c.command, c.expect))
        elif c.kernel is not None:
            out.append(CheckSpec(c.name or "kernel", "uname -r", c.kernel))
        elif c.mount is not None:
            mp = shlex.quote(c.mount)
            out.append(CheckSpec(c.name or f"mount {c.mount}", f"awk -v m={mp} '$2 == m {{f=1}} END {{exit !f}}' /proc/mounts"))
        elif c.service is not None:
            out.append(CheckSpec(c.name or f"service {c.service}", f"pidof {shlex.quote(c.service)}"))
    return out


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    exit_status: int | None
    output: str
    reason: str = ""


@dataclass(slots=True)
class Verdict:
    """The outcome of one readiness attempt."""

    ok: bool
    reachable: bool
    checks: list[CheckResult] = field(default_factory=list)
    error: str = ""
    #: A host-key problem is final: retrying will not fix it.
    host_key_error: bool = False

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.ok]


# --------------------------------------------------------------------------- host keys


class HostKeyError(paramiko.SSHException):
    pass


def host_key_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class KnownHosts:
    """One known_hosts file shared by every SSH thread; writes are atomic and serialised."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.keys = paramiko.HostKeys()
        if path.exists():
            self.keys.load(str(path))

    def lookup(self, name: str) -> dict[str, paramiko.PKey] | None:
        with self._lock:
            entry = self.keys.lookup(name)
            return dict(entry) if entry else None

    def add(self, name: str, key: paramiko.PKey) -> None:
        with self._lock:
            self.keys.add(name, key.get_name(), key)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".known_hosts.")
            try:
                with os.fdopen(fd, "w") as f:
                    for host, entry in self.keys.items():
                        for ktype, k in entry.items():
                            f.write(f"{host} {ktype} {k.get_base64()}\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise


class _Policy(paramiko.MissingHostKeyPolicy):
    def __init__(self, known: KnownHosts, policy: str) -> None:
        self.known, self.policy = known, policy

    def missing_host_key(self, client, hostname, key):  # noqa: D401 - paramiko API
        if self.policy == "tofu":
            self.known.add(hostname, key)
            return
        raise HostKeyError(
            f"host key for {hostname} is not in {self.known.path} and host_key_policy is strict; "
            f"add it (ssh-keyscan) or use host_key_policy: tofu"
        )


# --------------------------------------------------------------------------- one session


@dataclass(frozen=True, slots=True)
class SshTarget:
    host: str
    port: int = 22
    user: str = "root"
    key_file: Path | None = None


class _Session:
    """A paramiko client whose transport can be closed from another thread."""

    def __init__(self) -> None:
        self.client = paramiko.SSHClient()
        self.closed = False

    def close(self) -> None:
        self.closed = True
        try:
            self.client.close()
        except Exception:
            pass


def _run_checks_blocking(session: _Session, target: SshTarget, known: KnownHosts, policy: str,
                         checks: Sequence[CheckSpec], step_timeout: float) -> Verdict:
    client = session.client
    name = host_key_name(target.host, target.port)
    entry = known.lookup(name)
    if entry:
        for ktype, key in entry.items():
            client.get_host_keys().add(name, ktype, key)
    client.set_missing_host_key_policy(_Policy(known, policy))
    try:
        client.connect(
            target.host, port=target.port, username=target.user,
            key_filename=str(target.key_file) if target.key_file else None,
            timeout=step_timeout, banner_timeout=step_timeout, auth_timeout=step_timeout,
            channel_timeout=step_timeout, allow_agent=target.key_file is None, look_for_keys=target.key_file is None,
        )
    except paramiko.BadHostKeyException as e:
        return Verdict(False, True, error=(
            f"host key for {name} CHANGED (got {e.key.get_name()} {e.key.get_fingerprint().hex()}); "
            f"if the node was re-imaged, accept the new key with: ssh-keygen -f {known.path} -R '{name}'"),
            host_key_error=True)
    except HostKeyError as e:
        return Verdict(False, True, error=str(e), host_key_error=True)
    except paramiko.AuthenticationException as e:
        return Verdict(False, True, error=f"SSH authentication failed as {target.user}: {e}")
    except (OSError, paramiko.SSHException, EOFError) as e:
        return Verdict(False, False, error=f"SSH connect to {name} failed: {e}")
    results = []
    try:
        for spec in checks:
            results.append(_one_check(client, spec, step_timeout))
    except (OSError, paramiko.SSHException, EOFError) as e:
        return Verdict(False, True, results, error=f"SSH session to {name} broke: {e}")
    finally:
        session.close()
    return Verdict(all(r.ok for r in results), True, results)


def _one_check(client: paramiko.SSHClient, spec: CheckSpec, timeout: float) -> CheckResult:
    transport = client.get_transport()
    assert transport is not None
    chan = transport.open_session(timeout=timeout)
    chan.settimeout(timeout)
    chan.exec_command(spec.command)
    chan.shutdown_write()
    out = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        if chan.recv_ready():
            out += chan.recv(65536)
            continue
        if chan.exit_status_ready() and not chan.recv_ready():
            break
        left = deadline - time.monotonic()
        if left <= 0:
            chan.close()
            return CheckResult(spec.name, False, None, out.decode(errors="replace")[-2000:], f"timed out after {timeout:g}s")
        chan.status_event.wait(min(left, 0.05))  # recv_exit_status() would wait forever
    while chan.recv_ready():
        out += chan.recv(65536)
    status = chan.recv_exit_status()
    chan.close()
    text = out.decode(errors="replace")
    if status != spec.expect_exit:
        return CheckResult(spec.name, False, status, text[-2000:], f"exit status {status}, expected {spec.expect_exit}")
    if spec.expect is not None and not re.search(spec.expect, text, re.M):
        return CheckResult(spec.name, False, status, text[-2000:], f"output does not match {spec.expect!r}")
    return CheckResult(spec.name, True, status, text[-2000:])


# --------------------------------------------------------------------------- trio API


class Readiness:
    """Readiness checks for many nodes, bounded in concurrency and time."""

    def __init__(self, *, known_hosts: Path, policy: str, checks: Sequence[CheckSpec], user: str = "root",
                 port: int = 22, key_file: Path | None = None, concurrency: int = 32, step_timeout: float = 10.0) -> None:
        self.known = KnownHosts(known_hosts)
        self.policy = policy
        self.checks = list(checks)
        self.user, self.port, self.key_file = user, port, key_file
        self.limiter = trio.CapacityLimiter(concurrency)
        self.step_timeout = step_timeout

    @classmethod
    def from_plan(cls, lp) -> "Readiness":
        ssh = lp.model.readiness.ssh
        return cls(
            known_hosts=lp.resolve_path(ssh.known_hosts) if ssh.known_hosts else lp.state_dir / "known_hosts",
            policy=ssh.host_key_policy, checks=check_specs(lp.model.readiness.checks), user=ssh.user, port=ssh.port,
            key_file=lp.resolve_path(ssh.key) if ssh.key else None, concurrency=ssh.concurrency,
            step_timeout=ssh.connect_timeout,
        )

    async def port_open(self, host: str, timeout: float | None = None) -> bool:
        """Does TCP ``port`` answer (the ``ssh`` stage)? Never raises."""
        with trio.move_on_after(timeout or self.step_timeout):
            try:
                stream = await trio.open_tcp_stream(host, self.port)
            except OSError:
                return False
            await stream.aclose()
            return True
        return False

    async def check(self, host: str, timeout: float | None = None) -> Verdict:
        """One attempt: connect, verify the host key, run every check. Bounded by ``timeout``."""
        target = SshTarget(host, self.port, self.user, self.key_file)
        session = _Session()
        budget = timeout if timeout is not None else self.step_timeout * (3 + len(self.checks))
        with trio.move_on_after(budget) as scope:
            try:
                return await trio.to_thread.run_sync(
                    _run_checks_blocking, session, target, self.known, self.policy, self.checks, self.step_timeout,
                    limiter=self.limiter, abandon_on_cancel=True)
            finally:
                if scope.cancelled_caught or scope.cancel_called:
                    session.close()  # unblock the abandoned thread
        return Verdict(False, False, error=f"readiness of {host} timed out after {budget:g}s")

    async def until_ready(self, host: str, deadline: float, *, retry_every: float = 2.0) -> Verdict:
        """Retry until every check passes or ``deadline`` (trio clock); host-key errors are final."""
        last = Verdict(False, False, error="not tried")
        ran: Verdict | None = None  # the latest attempt whose checks ran: the reason worth reporting
        while trio.current_time() < deadline:
            left = deadline - trio.current_time()
            if ran is not None and left < 1.0:
                break  # a sliver of time left: an attempt cut short would only say "timed out"
            last = await self.check(host, timeout=left)
            if last.ok or last.host_key_error:
                return last
            if last.checks:
                ran = last
            await trio.sleep(min(retry_every, max(0.0, deadline - trio.current_time())))
        # A last attempt cut off by the deadline says less than the failing check before it.
        return last if last.checks or ran is None else ran
