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
(temp file + fsync + rename) under a thread lock and an ``flock`` on
``<known_hosts>.lock``, re-reading the file first, so a ``bootorch image build``
and a running rollout do not lose each other's entries: paramiko's own
``save_host_keys`` is neither atomic nor safe against concurrent writers.

Nodes booting a bootorch image with ``host_key: per-node`` (the default) have
their own host key, which :mod:`orchestrator.hostkeys` pins into this
known_hosts for the node's address (:meth:`KnownHosts.pin` replaces any older
entry), so under ``tofu`` as under ``strict`` such a node is accepted with
exactly that key and any other key is refused as CHANGED. :class:`Readiness`'s
``pinned`` (host -> where its key comes from) turns that refusal's advice to
accept the new key into the likely cause (the node did not get its key archive
and made a key at boot).

Authentication offers only what the plan names: ``readiness.ssh.key``, and the
SSH agent's keys only with ``readiness.ssh.agent: true``. ``~/.ssh`` keys are
never offered: under ``tofu`` a first connection reaches whatever answers at a
node's address before anything about it is verified.

What a node sends back is untrusted: a check's output is read up to
:data:`OUTPUT_CAP` bytes (stdout and stderr together; more fails the check
with "output exceeds 64 KiB" and the channel is closed), paramiko's buffer per
check is bounded by a small channel window, and :class:`CheckResult` and
:class:`Verdict` pass their texts through :func:`~orchestrator.safetext.safe_text`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import paramiko
import trio

from orchestrator.safetext import safe_text

#: Most bytes of one check's output (stdout and stderr together) that readiness reads; more fails the check.
OUTPUT_CAP = 64 * 1024
#: Characters of a check's output kept in its result: the tail, where errors are.
OUTPUT_SHOWN = 2000
#: Characters kept of an error or a reason.
ERROR_SHOWN = 2000
#: SSH channel window of a check: paramiko buffers at most this much that we have not read yet.
CHANNEL_WINDOW = 2 * OUTPUT_CAP

# --------------------------------------------------------------------------- checks


@dataclass(frozen=True, slots=True)
class CheckSpec:
    name: str
    command: str
    expect: str | None = None  # regex on stdout
    expect_exit: int = 0
    #: Addresses of the nodes the check runs on; None: every node.
    hosts: frozenset[str] | None = None


def check_specs(checks, hosts_of_profile: Mapping[str, Iterable[str]] | None = None) -> list[CheckSpec]:
    """Turn the plan's readiness checks into shell commands (busybox-compatible).

    ``hosts_of_profile`` (profile -> node addresses) scopes a check that names ``profiles:``.
    """
    out = []
    for i, c in enumerate(checks):
        hosts = None
        if getattr(c, "profiles", None):
            hosts = frozenset(h for p in c.profiles for h in (hosts_of_profile or {}).get(p, ()))
        if c.command is not None:
            spec = CheckSpec(c.name or f"check{i + 1}", c.command, c.expect)
        elif c.kernel is not None:
            spec = CheckSpec(c.name or "kernel", "uname -r", c.kernel)
        elif c.mount is not None:
            mp = shlex.quote(c.mount)
            spec = CheckSpec(c.name or f"mount {c.mount}", f"awk -v m={mp} '$2 == m {{f=1}} END {{exit !f}}' /proc/mounts")
        elif c.service is not None:
            spec = CheckSpec(c.name or f"service {c.service}", f"pidof {shlex.quote(c.service)}")
        else:
            continue
        out.append(replace(spec, hosts=hosts) if hosts is not None else spec)
    return out


def checks_for(checks: Sequence[CheckSpec], host: str) -> list[CheckSpec]:
    """The checks that run on ``host``."""
    return [c for c in checks if c.hosts is None or host in c.hosts]


def _tail(text: str) -> str:
    """The last :data:`OUTPUT_SHOWN` characters of ``text``, made safe (escaping lengthens it: the tail is kept)."""
    shown = safe_text(text[-OUTPUT_SHOWN:], OUTPUT_SHOWN * 10)  # \UXXXXXXXX is the longest escape: never cut here
    return shown if len(shown) <= OUTPUT_SHOWN else "..." + shown[-(OUTPUT_SHOWN - 3):]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check on one node. ``output`` (the tail of its stdout) and ``reason`` are safe text."""

    name: str
    ok: bool
    exit_status: int | None
    output: str
    reason: str = ""

    def __post_init__(self) -> None:
        # The node wrote the output; paramiko's messages quote the server.
        object.__setattr__(self, "name", safe_text(self.name, 200))
        object.__setattr__(self, "output", safe_text(self.output, OUTPUT_SHOWN))
        object.__setattr__(self, "reason", safe_text(self.reason, ERROR_SHOWN))


@dataclass(slots=True)
class Verdict:
    """The outcome of one readiness attempt. ``error`` is safe text."""

    ok: bool
    reachable: bool
    checks: list[CheckResult] = field(default_factory=list)
    error: str = ""
    #: A host-key problem is final: retrying will not fix it.
    host_key_error: bool = False

    def __post_init__(self) -> None:
        self.error = safe_text(self.error, ERROR_SHOWN)

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.ok]


# --------------------------------------------------------------------------- host keys


class HostKeyError(paramiko.SSHException):
    pass


def host_key_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's form: ``SHA256:`` and the unpadded base64 of the key blob's SHA-256."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class KnownHosts:
    """One known_hosts file shared by every SSH thread and process; every write is serialised and durable.

    The file is parsed once into an index (plain host name -> key type -> key,
    plus OpenSSH's hashed ``|1|`` names, checked by HMAC), and parsed again only
    when another writer changed it (its inode, size or mtime differ from what we
    last read or wrote). A first-seen key (:meth:`add`, ``tofu``) is one
    appended line; :meth:`pin` rewrites the file atomically. Each costs O(1) or
    O(hosts), never a re-parse per node (paramiko's own ``HostKeys.load`` is
    quadratic in the file's length). Lines that do not parse are skipped, as
    paramiko and OpenSSH skip them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._plain: dict[str, dict[str, paramiko.PKey]] = {}
        self._hashed: list[tuple[str, paramiko.PKey]] = []
        #: (device, inode, size, mtime) of the file as last read or written; None: no file.
        self._seen: tuple[int, int, int, int] | None = None
        self._load()

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _load(self) -> None:
        plain: dict[str, dict[str, paramiko.PKey]] = {}
        hashed: list[tuple[str, paramiko.PKey]] = []
        seen = self._stat()
        if seen is not None:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    try:
                        entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
                    except (paramiko.SSHException, paramiko.hostkeys.InvalidHostKey, ValueError):
                        continue  # paramiko's own load raises on a line with bad base64
                    if entry is None or entry.key is None:
                        continue
                    for host in entry.hostnames:
                        if host.startswith("|1|"):
                            hashed.append((host, entry.key))
                        else:  # the first key per host and type counts, as in paramiko's lookup
                            plain.setdefault(host, {}).setdefault(entry.key.get_name(), entry.key)
        self._plain, self._hashed, self._seen = plain, hashed, seen

    def _find(self, name: str) -> dict[str, paramiko.PKey] | None:
        out = dict(self._plain.get(name, {}))
        for hashed, key in self._hashed:
            if key.get_name() not in out and paramiko.HostKeys.hash_host(name, hashed) == hashed:
                out[key.get_name()] = key
        return out or None

    def lookup(self, name: str) -> dict[str, paramiko.PKey] | None:
        with self._lock:
            return self._find(name)

    def add(self, name: str, key: paramiko.PKey) -> None:
        """Record a first-seen key (``tofu``) beside the host's others: one line appended."""
        with self._locked():
            if self._stat() != self._seen:
                self._load()  # another process wrote it since
            have = self._find(name) or {}
            if key.get_name() in have and have[key.get_name()].asbytes() == key.asbytes():
                return
            line = f"{name} {key.get_name()} {key.get_base64()}\n".encode()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line  # a file edited by hand without its last newline
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._plain.setdefault(name, {}).setdefault(key.get_name(), key)
            self._seen = self._stat()

    def pin(self, entries: Mapping[str, paramiko.PKey]) -> bool:
        """Make ``entries`` each host's only key, replacing older ones; True when the file changed."""

        def same(have: Mapping[str, paramiko.PKey] | None, key: paramiko.PKey) -> bool:
            return have is not None and len(have) == 1 and key.get_name() in have and \
                have[key.get_name()].asbytes() == key.asbytes()

        with self._lock:
            self._load()
            if all(same(self._find(n), k) for n, k in entries.items()):
                return False  # already pinned: no lock file, no write (a reader may not own the state directory)
        with self._locked():
            self._load()
            if all(same(self._find(n), k) for n, k in entries.items()):
                return False
            lines = [f"{host} {ktype} {k.get_base64()}\n" for host, keys in self._plain.items() if host not in entries
                     for ktype, k in keys.items()]
            lines += [f"{hashed} {k.get_name()} {k.get_base64()}\n" for hashed, k in self._hashed]
            lines += [f"{n} {k.get_name()} {k.get_base64()}\n" for n, k in entries.items()]
            self._write("".join(lines))
            self._load()
            return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This object's lock and the file's ``.lock`` (another process -- image build, a second rollout -- may write)."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield

    def _write(self, text: str) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".known_hosts.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def known_hosts_path(plan) -> Path:
    """The known_hosts file readiness keeps for ``plan``."""
    ssh = plan.model.readiness.ssh
    return plan.resolve_path(ssh.known_hosts) if ssh.known_hosts else plan.state_dir / "known_hosts"


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
    #: Offer the SSH agent's keys too (the plan's readiness.ssh.agent).
    agent: bool = False
    #: Where the host's key comes from, when bootorch made it (for the CHANGED message).
    pinned: str | None = None


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
    if target.key_file is None and not target.agent:
        return Verdict(False, True, error=(
            "no key to log in with: set readiness.ssh.key (the private key the image authorizes) or "
            "readiness.ssh.agent: true (offer your SSH agent's keys)"))
    try:
        client.connect(
            target.host, port=target.port, username=target.user,
            key_filename=str(target.key_file) if target.key_file else None,
            timeout=step_timeout, banner_timeout=step_timeout, auth_timeout=step_timeout,
            # Only the keys the plan names: under tofu this server is not verified yet.
            channel_timeout=step_timeout, allow_agent=target.agent, look_for_keys=False,
        )
    except paramiko.BadHostKeyException as e:
        got = f"got {e.key.get_name()} {fingerprint(e.key)}"
        if target.pinned:
            return Verdict(False, True, error=(
                f"host key for {name} CHANGED ({got}): {target.host} should present {target.pinned}. Most likely "
                f"the node did not get its host key at boot and made one (its console says so: check that the boot "
                f"server served the key archive to {target.host}, then reboot the node); otherwise another machine "
                f"answers at {target.host}"), host_key_error=True)
        return Verdict(False, True, error=(
            f"host key for {name} CHANGED ({got}); "
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
    # A small window: paramiko buffers what the node sends until we read it, up to the window.
    chan = transport.open_session(window_size=CHANNEL_WINDOW, timeout=timeout)
    chan.settimeout(timeout)
    chan.exec_command(spec.command)
    chan.shutdown_write()
    out = bytearray()  # stdout, what expect matches and the result shows
    received = 0  # stdout and stderr: stderr is read (so the window stays open) but not kept
    deadline = time.monotonic() + timeout

    def text() -> str:
        return bytes(out).decode("utf-8", "surrogateescape")  # invalid bytes stay visible as \xNN

    while True:
        got = False
        if chan.recv_ready():
            data = chan.recv(65536)
            out += data
            received += len(data)
            got = True
        if chan.recv_stderr_ready():
            received += len(chan.recv_stderr(65536))
            got = True
        if received > OUTPUT_CAP:
            chan.close()  # stop reading: the node may send forever
            return CheckResult(spec.name, False, None, _tail(text()[:OUTPUT_CAP]), f"output exceeds {OUTPUT_CAP // 1024} KiB")
        if got:
            continue
        if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
            break
        left = deadline - time.monotonic()
        if left <= 0:
            chan.close()
            return CheckResult(spec.name, False, None, _tail(text()), f"timed out after {timeout:g}s")
        chan.status_event.wait(min(left, 0.05))  # recv_exit_status() would wait forever
    status = chan.recv_exit_status()
    chan.close()
    shown = _tail(text())
    if status != spec.expect_exit:
        return CheckResult(spec.name, False, status, shown, f"exit status {status}, expected {spec.expect_exit}")
    if spec.expect is not None and not re.search(spec.expect, text(), re.M):
        # The output's tail says why (e.g. a node whose NFS root failed prints the reason).
        got = shown if len(shown) <= 300 else "..." + shown[-297:]
        return CheckResult(spec.name, False, status, shown, f"output does not match {spec.expect!r}: {got}")
    return CheckResult(spec.name, True, status, shown)


# --------------------------------------------------------------------------- trio API


def _hosts_of_profile(plan) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in plan.nodes:
        out.setdefault(n.profile, []).append(str(n.ip))
    return out


class Readiness:
    """Readiness checks for many nodes, bounded in concurrency and time."""

    def __init__(self, *, known_hosts: Path, policy: str, checks: Sequence[CheckSpec], user: str = "root",
                 port: int = 22, key_file: Path | None = None, agent: bool = False,
                 pinned: Mapping[str, str] | None = None, concurrency: int = 32, step_timeout: float = 10.0) -> None:
        """``agent``: offer the SSH agent's keys too. ``pinned``: host -> a description of the key bootorch
        made for it (already in ``known_hosts``), for the message when the host presents another."""
        self.known = KnownHosts(known_hosts)
        self.policy = policy
        self.checks = list(checks)
        self.user, self.port, self.key_file, self.agent = user, port, key_file, agent
        self.pinned = dict(pinned or {})
        self.limiter = trio.CapacityLimiter(concurrency)
        self.step_timeout = step_timeout

    @classmethod
    def from_plan(cls, plan, *, pinned: Mapping[str, str] | None = None) -> "Readiness":
        """Readiness for ``plan``. ``pinned``: what :func:`orchestrator.hostkeys.pin_plan_host_keys`
        returned, having pinned the nodes' own host keys into :func:`known_hosts_path`."""
        ssh = plan.model.readiness.ssh
        return cls(
            known_hosts=known_hosts_path(plan), policy=ssh.host_key_policy,
            checks=check_specs(plan.model.readiness.checks, _hosts_of_profile(plan)),
            user=ssh.user, port=ssh.port, key_file=plan.resolve_path(ssh.key) if ssh.key else None, agent=ssh.agent,
            pinned=pinned, concurrency=ssh.concurrency, step_timeout=ssh.connect_timeout,
        )

    def derive(self, checks: Sequence[CheckSpec], *, concurrency: int | None = None) -> "Readiness":
        """The same login and trust (known_hosts, key, agent, pins) with other checks (the SSH power driver's)."""
        return Readiness(known_hosts=self.known.path, policy=self.policy, checks=checks, user=self.user, port=self.port,
                         key_file=self.key_file, agent=self.agent, pinned=self.pinned,
                         concurrency=concurrency if concurrency is not None else self.limiter.total_tokens,
                         step_timeout=self.step_timeout)

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
        target = SshTarget(host, self.port, self.user, self.key_file, self.agent, self.pinned.get(host))
        session = _Session()
        checks = checks_for(self.checks, host)
        budget = timeout if timeout is not None else self.step_timeout * (3 + len(checks))
        with trio.move_on_after(budget) as scope:
            try:
                return await trio.to_thread.run_sync(
                    _run_checks_blocking, session, target, self.known, self.policy, checks, self.step_timeout,
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
