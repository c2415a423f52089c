"""``bootorch serve`` as a system service: readiness, the journal, reloads and the units.

Four parts, none of which needs systemd at import time or a library beyond the
standard one:

* :class:`Notifier` speaks systemd's notify protocol (``sd_notify(3)``): one
  ``AF_UNIX`` datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET`` (a path,
  or ``@name`` for an abstract socket). ``serve`` sends ``READY=1`` once
  DHCP, TFTP, HTTP and the control socket listen, ``RELOADING=1`` (with
  ``MONOTONIC_USEC``) then ``READY=1`` around a reload, ``STOPPING=1`` on
  SIGTERM/SIGINT, and ``STATUS=`` lines a person reads in ``systemctl
  status``. Without ``$NOTIFY_SOCKET`` every call is a no-op.
* :class:`JournalLog` writes entries with fields by the journal's native
  protocol (``systemd.journal-fields(7)``, one datagram to
  ``/run/systemd/journal/socket``): ``MESSAGE``, ``PRIORITY``,
  ``SYSLOG_IDENTIFIER`` and bootorch's own ``NODE``, ``MAC``, ``STAGE``,
  ``FROM_STAGE``, ``ATTEMPT``, ``EVENT``, ``PLAN``, so ``journalctl -u
  bootorch@site1 NODE=node07`` or ``STAGE=failed`` filter. :func:`log_target`
  chooses it when ``$JOURNAL_STREAM`` names our stderr (systemd connected
  stderr to the journal) and the socket exists; otherwise lines go to stderr as
  before (a terminal). Every value is made printable and bounded
  (:func:`~orchestrator.safetext.safe_text`) where it is written: evidence
  carries text from the boot LAN.
* :func:`fingerprint` and :func:`diff` (from :mod:`orchestrator.plan.diff`,
  where the control API's ``plan`` request also takes them) say what a reload would change: the
  nodes added, removed and changed, the profiles and boot settings changed, and
  the settings that only a restart applies (:data:`RESTART_SECTIONS`). ``serve``
  refuses a reload that touches those (the running configuration stays);
  ``bootorch validate --against-running`` prints the same diff against the
  fingerprint a running ``serve`` reports on its control socket.
* :func:`install` writes the shipped units (``systemd/``) into a root
  directory, with ``ExecStart`` pointing at this installation's ``bootorch``,
  and checks that the plan keeps its state where the unit lets it write.

Nothing here is on a hot path: a journal entry costs one ``sendto``.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from orchestrator.plan.diff import RESTART_SECTIONS, PlanDiff, diff, fingerprint
from orchestrator.safetext import safe_text

__all__ = [
    "JournalLog", "Notifier", "PlanDiff", "RESTART_SECTIONS", "StderrLog", "diff", "fingerprint", "install",
    "journal_stream_is_stderr", "log_target",
]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "bootorch"
#: Longest MESSAGE written to the journal (characters); other fields get :data:`FIELD_MAX`.
MESSAGE_MAX = 4096
FIELD_MAX = 256

# syslog priorities (journal PRIORITY=, stderr "<N>" prefix)
ERR, WARNING, NOTICE, INFO, DEBUG = 3, 4, 5, 6, 7


# --------------------------------------------------------------------------- sd_notify


class Notifier:
    """``sd_notify`` without libsystemd: datagrams of ``KEY=value`` lines to ``$NOTIFY_SOCKET``.

    ``address`` defaults to the environment's ``NOTIFY_SOCKET``; None or an
    unusable value (not absolute, not ``@abstract``) disables it. A send that
    fails (systemd gone, socket full) is counted in :attr:`errors`, never
    raised: readiness reporting must not take the boot server down.
    """

    def __init__(self, address: str | None = None, *, from_env: bool = True) -> None:
        if address is None and from_env:
            address = os.environ.get("NOTIFY_SOCKET")
        self.address: str | None = None
        if address and (address.startswith("/") or (address.startswith("@") and len(address) > 1)):
            # An abstract socket's name starts with a NUL byte; systemd writes it as '@'.
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self.errors = 0
        self.sent = 0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: Any) -> bool:
        """Send one message (``notify(READY=1, STATUS="...")``); True when it was sent."""
        if self.address is None:
            return False
        text = "".join(f"{k}={_one_line(v)}\n" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(text.encode("utf-8", "replace"), self.address)
        except OSError:
            self.errors += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY=1, STATUS=status)

    def reloading(self, status: str = "reloading the plan") -> bool:
        # MONOTONIC_USEC: what systemd >= 253 wants with RELOADING=1 (Type=notify-reload); older ones ignore it.
        return self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000, STATUS=status)

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify(STOPPING=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(v: Any) -> str:
    """A notify value: one line (the protocol is line-based), bounded."""
    return safe_text(str(v), 1024)


# --------------------------------------------------------------------------- logging


def journal_stream_is_stderr(env: Mapping[str, str] | None = None, fd: int = 2) -> bool:
    """True when ``$JOURNAL_STREAM`` (``dev:inode``) names ``fd``: systemd connected it to the journal."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class StderrLog:
    """Lines on stderr for a person at a terminal (fields dropped; ``prefix=True`` adds ``<N>`` priorities)."""

    def __init__(self, stream: Any = None, *, prefix: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = prefix

    def __call__(self, message: str, priority: int = INFO, **fields: Any) -> None:
        line = f"<{priority}>{message}" if self.prefix else message
        try:
            print(line, file=self.stream, flush=True)
        except (OSError, ValueError):
            pass


class JournalLog:
    """Journal entries with fields, by the native protocol (module docstring).

    ``log(message, priority, NODE=..., MAC=..., STAGE=...)``: field names are
    bootorch's own (upper-case ASCII); values are made printable and bounded.
    When a datagram cannot be sent (journald restarting, buffer full) the line
    goes to ``fallback`` with a ``<N>`` priority prefix, which journald reads
    from stderr too, so nothing is lost but the fields.
    """

    def __init__(self, socket_path: str = JOURNAL_SOCKET, *, identifier: str = SYSLOG_IDENTIFIER,
                 fallback: StderrLog | None = None, extra: Mapping[str, str] | None = None) -> None:
        self.socket_path = socket_path
        self.identifier = identifier
        self.fallback = fallback or StderrLog(prefix=True)
        self.extra = dict(extra or {})
        self.errors = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    def encode(self, message: str, priority: int = INFO, **fields: Any) -> bytes:
        """One entry in the native format: ``KEY=value\\n``; values with a newline as ``KEY\\n<u64 le len>value\\n``."""
        items: list[tuple[str, str]] = [("MESSAGE", safe_text(message, MESSAGE_MAX)), ("PRIORITY", str(int(priority))),
                                        ("SYSLOG_IDENTIFIER", self.identifier)]
        for k, v in {**self.extra, **fields}.items():
            if v is None or not _field_name_ok(k):
                continue
            items.append((k, safe_text(v, FIELD_MAX)))
        out = bytearray()
        for k, v in items:
            data = v.encode("utf-8")
            if b"\n" in data:  # safe_text escapes newlines; kept for values we may not escape one day
                out += k.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
            else:
                out += k.encode() + b"=" + data + b"\n"
        return bytes(out)

    def __call__(self, message: str, priority: int = INFO, **fields: Any) -> None:
        try:
            self._sock.sendto(self.encode(message, priority, **fields), self.socket_path)
        except OSError:
            self.errors += 1
            self.fallback(message, priority)

    def close(self) -> None:
        self._sock.close()


def _field_name_ok(name: str) -> bool:
    """journald's rule: A-Z, 0-9, '_', not starting with '_' (trusted fields) or a digit, at most 64."""
    return (0 < len(name) <= 64 and not name[0].isdigit() and name[0] != "_"
            and all(c.isascii() and (c.isupper() or c.isdigit() or c == "_") for c in name))


def log_target(mode: str = "auto", *, socket_path: str = JOURNAL_SOCKET, extra: Mapping[str, str] | None = None) -> StderrLog | JournalLog:
    """Where ``serve`` logs: ``journal`` (native protocol), ``plain`` (stderr lines), or ``auto``:
    the journal when ``$JOURNAL_STREAM`` says stderr goes there and the socket exists."""
    if mode == "plain":
        return StderrLog()
    if mode == "journal" or (mode == "auto" and journal_stream_is_stderr() and os.path.exists(socket_path)):
        return JournalLog(socket_path, extra=extra)
    return StderrLog()


# --------------------------------------------------------------------------- install

UNIT_NAME = "bootorch@.service"
SYSUSERS_NAME = "bootorch.conf"
SYSCTL_NAME = "60-bootorch.conf"
#: Where the unit reads plans and keeps state; a plan installed for instance ``I`` lives at CONFIG_DIR/I.yaml.
CONFIG_DIR = Path("/etc/bootorch")
STATE_BASE = Path("/var/lib/bootorch")
RUNTIME_BASE = Path("/run/bootorch")


def units_dir() -> Path:
    """The shipped units: ``orchestrator/_systemd`` in a wheel that force-includes them, else
    ``systemd/`` beside the package (a checkout, an editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "_systemd"
    return packaged if packaged.is_dir() else here.parent / "systemd"


def bootorch_executable() -> str:
    """This installation's ``bootorch`` (the unit's ExecStart): next to the running Python, else on PATH."""
    here = Path(sys.executable).parent / "bootorch"
    if here.exists():
        return str(here)
    found = shutil.which("bootorch")
    return found or "/usr/bin/bootorch"


def plan_problems(plan, instance: str) -> list[str]:
    """Why ``plan`` cannot run as ``bootorch@<instance>``: its state or control socket outside the unit's directories."""
    problems = []
    want_state = STATE_BASE / instance
    if plan.state_dir != want_state:
        problems.append(f"state_dir is {plan.state_dir}; the unit may write only {want_state}: set `state_dir: {want_state}`")
    from orchestrator.control import socket_path

    sock = socket_path(plan)
    if not (sock.parent == RUNTIME_BASE / instance or sock.is_relative_to(want_state)):
        problems.append(f"control.socket is {sock}; put it in {RUNTIME_BASE / instance}/ "
                        f"(`control: {{socket: {RUNTIME_BASE / instance}/control.sock}}`) or under state_dir")
    return problems


def render_unit(executable: str | None = None) -> str:
    """The shipped template unit with ``ExecStart`` pointing at ``executable`` (default: this installation's)."""
    text = (units_dir() / UNIT_NAME).read_text()
    return text.replace("/usr/bin/bootorch ", f"{executable or bootorch_executable()} ")


def install(root: Path, *, executable: str | None = None, plan_path: Path | None = None,
            instance: str | None = None) -> list[Path]:
    """Write the unit, the sysusers.d and sysctl.d files under ``root`` (``/`` on a real host).

    With ``plan_path`` and ``instance``: when the plan is not ``/etc/bootorch/<instance>.yaml``,
    a drop-in ``bootorch@<instance>.service.d/plan.conf`` points ``ExecStart`` at it (a plan
    under /home or /root stays invisible: ``ProtectHome=yes``). Returns the files written.
    Creates no user (``systemd-sysusers`` does, from the file written here) and starts nothing.
    """
    written = []
    exe = executable or bootorch_executable()

    def put(rel: str, text: str, mode: int = 0o644) -> None:
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        written.append(path)

    put(f"etc/systemd/system/{UNIT_NAME}", render_unit(exe))
    put(f"etc/sysusers.d/{SYSUSERS_NAME}", (units_dir() / "bootorch.sysusers").read_text())
    put(f"etc/sysctl.d/{SYSCTL_NAME}", (units_dir() / SYSCTL_NAME).read_text())
    if plan_path is not None and instance:
        plan_path = Path(os.path.abspath(plan_path))
        if plan_path != CONFIG_DIR / f"{instance}.yaml":
            put(f"etc/systemd/system/bootorch@{instance}.service.d/plan.conf",
                f"# Written by `bootorch service install`: this instance serves {plan_path}.\n"
                f"[Service]\nExecStart=\nExecStart={exe} serve {_unit_quote(str(plan_path))}\n")
    return written


def _unit_quote(s: str) -> str:
    """A path as one word of a unit's command line (quotes, backslashes, '%' and '$' escaped)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$") + '"'
