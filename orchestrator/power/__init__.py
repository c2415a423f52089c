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

Every action returns a :class:`PowerResult`; drivers never raise for an
expected failure (BMC unreachable, command failed): the scheduler journals the
result and escalates. Credentials are resolved at the moment of use from the
plan's references (:func:`resolve_secret`), never stored in the plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PowerResult:
    ok: bool
    detail: str = ""


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


class SecretError(RuntimeError):
    pass


def resolve_secret(secret, base: Path | None = None) -> str | None:
    """Read a credential reference ({env: NAME} or {file: PATH}) now; None when none is configured."""
    if secret is None:
        return None
    if secret.env is not None:
        value = os.environ.get(secret.env)
        if value is None:
            raise SecretError(f"environment variable {secret.env} is not set (the plan reads a credential from it)")
        return value
    path = secret.file if secret.file.is_absolute() or base is None else base / secret.file
    try:
        return path.read_text().rstrip("\r\n")
    except OSError as e:
        raise SecretError(f"cannot read credential file {path}: {e.strerror or e}") from None


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
