"""Power drivers: one interface (on, off, cycle, status where possible) over many mechanisms.

==========  ======================================================  ===================
driver      mechanism                                               actions
==========  ======================================================  ===================
wol         magic packet: etherwake's raw 0x0842 frame or UDP 9/7   on
redfish     Redfish ``ComputerSystem.Reset`` (httpx, TLS verified)  on, off, cycle, status
ipmi        ``ipmitool -I lanplus ... -E`` (password by environment) on, off, cycle, status
command     a site's own command template                           on, off, cycle
ssh         ``reboot`` / ``poweroff`` in the running OS              off, cycle
==========  ======================================================  ===================

Drivers other than these (the simulator's ``sim``) come from installed
packages through the entry-point group ``bootorch.power_drivers``
(:func:`orchestrator.power.drivers.plugin_driver`): production code never
names them.

Every action returns a :class:`PowerResult`; drivers never raise for an
expected failure (BMC unreachable, command failed, a hostile answer): the
scheduler journals the result and escalates. A result's ``detail`` quotes text
from BMCs and tools, which bootorch does not trust: :class:`PowerResult` makes it
printable and bounded once (:func:`orchestrator.safetext.safe_text`).

Credentials are resolved at the moment of use from the plan's references
(:func:`resolve_secret`), never stored in the plan:

* ``{file: PATH}`` must be a regular file that only its owner may read or write
  (mode 0600 or stricter), as OpenSSH demands of private keys; the mode is
  checked on the opened descriptor, so the file read is the file checked.
* ``{env: NAME}`` is read from bootorch's environment. The children power
  drivers run (a site's command, ipmitool) get that environment without every
  variable a credential reference of the plan names (:func:`secret_env_names`,
  :func:`child_env`): each gets only its own credential, under its own name.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Protocol

from orchestrator.safetext import safe_text

#: Most characters of a :class:`PowerResult` detail (it may quote a BMC's answer or a tool's output).
MAX_DETAIL = 500
#: Most bytes read from a credential file (a password or token is a line; anything longer is not one).
MAX_SECRET_FILE = 64 * 1024


@dataclass(frozen=True, slots=True)
class PowerResult:
    """What a power action did; ``detail`` is made printable and bounded here, for every driver."""

    ok: bool
    detail: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "detail", safe_text(self.detail, MAX_DETAIL))


@dataclass(frozen=True, slots=True)
class Target:
    """What a driver needs to know about a node."""

    name: str
    mac: str
    ip: str
    index: int = 0
    bmc: str | None = None  # the node's own BMC address, overriding the template


class PowerDriver(Protocol):
    name: str

    async def on(self, t: Target) -> PowerResult: ...

    async def off(self, t: Target) -> PowerResult: ...

    async def cycle(self, t: Target) -> PowerResult: ...

    async def status(self, t: Target) -> str | None: ...


class ActionDriver:
    """on/off/cycle as one ``_act(target, action)``: the base of drivers whose actions differ only by a word."""

    async def _act(self, t: Target, action: str) -> PowerResult:
        raise NotImplementedError

    async def on(self, t: Target) -> PowerResult:
        return await self._act(t, "on")

    async def off(self, t: Target) -> PowerResult:
        return await self._act(t, "off")

    async def cycle(self, t: Target) -> PowerResult:
        return await self._act(t, "cycle")


class SecretError(RuntimeError):
    pass


def resolve_secret(secret, base: Path | None = None) -> str | None:
    """Read a credential reference ({env: NAME} or {file: PATH}) now; None when none is configured.

    Raises :class:`SecretError` (its message says how to fix it) for an unset
    variable, an unreadable file, and a file that is not private: not a regular
    file, or readable or writable by group or others.
    """
    if secret is None:
        return None
    if secret.env is not None:
        value = os.environ.get(secret.env)
        if value is None:
            raise SecretError(f"environment variable {secret.env} is not set (the plan reads a credential from it)")
        return value
    path = secret.file if secret.file.is_absolute() or base is None else base / secret.file
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below); regular files ignore it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise SecretError(f"cannot read credential file {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)  # the opened file itself: no window between checking one file and reading another
        if not stat.S_ISREG(st.st_mode):
            raise SecretError(f"credential file {path} is not a regular file: write the credential into a file of its own")
        if st.st_mode & 0o077:
            raise SecretError(f"credential file {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others can read "
                              f"or write it; make it private with `chmod 600 {path}`")
        data = os.read(fd, MAX_SECRET_FILE + 1)
    except OSError as e:
        raise SecretError(f"cannot read credential file {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:
        raise SecretError(f"credential file {path} is larger than {MAX_SECRET_FILE} bytes: it holds more than a credential")
    try:
        return data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise SecretError(f"credential file {path} is not UTF-8 text") from None


def secret_env_names(model: Any) -> frozenset[str]:
    """The environment variables that the credential references (``{env: NAME}``) in ``model`` name.

    ``model`` is a plan (``LoadedPlan.model``) or any part of it; the whole tree
    is walked, so a credential added to any section of the plan is found.
    """
    from pydantic import BaseModel

    from orchestrator.plan.model import Secret

    names: set[str] = set()
    stack: list[Any] = [model]
    while stack:
        v = stack.pop()
        if isinstance(v, Secret):
            if v.env is not None:
                names.add(v.env)
        elif isinstance(v, BaseModel):
            stack.extend(getattr(v, f) for f in type(v).model_fields)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return frozenset(names)


def child_env(secret_names: Collection[str], **own: str) -> dict[str, str]:
    """The environment for a child process: this one's without ``secret_names``, plus the child's ``own`` variables."""
    env = {k: v for k, v in os.environ.items() if k not in secret_names}
    env.update(own)
    return env


def fill(template: str, t: Target) -> str:
    for k, v in (("name", t.name), ("mac", t.mac), ("ip", t.ip), ("index", str(t.index))):
        template = template.replace("{" + k + "}", v)
    return template


class Unavailable:
    """A driver that cannot act (its credential is missing): every action fails with the reason."""

    name = "unavailable"

    def __init__(self, why: str) -> None:
        self.why = why

    async def on(self, t: Target) -> PowerResult:
        return PowerResult(False, self.why)

    async def off(self, t: Target) -> PowerResult:
        return PowerResult(False, self.why)

    async def cycle(self, t: Target) -> PowerResult:
        return PowerResult(False, self.why)

    async def status(self, t: Target) -> str | None:
        return None
