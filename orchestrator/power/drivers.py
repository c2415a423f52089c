"""The power drivers (see :mod:`orchestrator.power` for the table)."""

from __future__ import annotations

import ipaddress
import os
import shlex
from typing import Any

import httpx
import trio

from orchestrator.power import PowerResult, Target, fill, resolve_secret

# --------------------------------------------------------------------------- wol


class WolDriver:
    """Wake-on-LAN: ``on`` only. Repeated sends with spacing (magic packets are unacknowledged)."""

    name = "wol"

    def __init__(self, *, interface: str | None, method: str = "raw", repeat: int = 3, interval: float = 0.1,
                 broadcast: str = "255.255.255.255", port: int = 9, password: str | None = None) -> None:
        self.interface, self.method, self.repeat, self.interval = interface, method, repeat, interval
        self.broadcast, self.port, self.password = broadcast, port, password
        self.sent = 0

    async def on(self, t: Target) -> PowerResult:
        from orchestrator.power import wol

        if not self.interface and not ipaddress.ip_address(self.broadcast).is_loopback:
            # Without SO_BINDTODEVICE a broadcast leaves by the default route: never that.
            return PowerResult(False, "refusing to send magic packets without an interface to pin them to")
        try:
            for i in range(self.repeat):
                if self.method == "raw":
                    wol.send_raw(self.interface, [t.mac], password=self.password)
                else:
                    wol.send_udp([t.mac], broadcast=self.broadcast, port=self.port, interface=self.interface,
                                 password=self.password)
                self.sent += 1
                if i + 1 < self.repeat:
                    await trio.sleep(self.interval)
        except (OSError, ValueError) as e:
            return PowerResult(False, f"magic packet not sent: {e}")
        return PowerResult(True, f"{self.repeat} magic packet(s) ({self.method}) to {t.mac} on {self.interface}")

    async def off(self, t: Target) -> PowerResult:
        return PowerResult(False, "Wake-on-LAN cannot power a node off")

    async def cycle(self, t: Target) -> PowerResult:
        return PowerResult(False, "Wake-on-LAN cannot power-cycle a node")

    async def status(self, t: Target) -> str | None:
        return None


# --------------------------------------------------------------------------- redfish


class RedfishDriver:
    """Redfish ``ComputerSystem.Reset``.

    ``address`` is either a system URL (``https://bmc/redfish/v1/Systems/1``,
    templates allowed) or a host (``{name}-bmc``), in which case the first
    member of ``/redfish/v1/Systems`` is used. Authentication: a Redfish session
    (``POST /redfish/v1/SessionService/Sessions``, then ``X-Auth-Token``) when
    the BMC offers one, else HTTP basic. TLS is verified unless the plan says
    ``verify_tls: false``.
    """

    name = "redfish"

    def __init__(self, *, address: str, username: str | None, password: str | None, verify_tls: bool = True,
                 timeout: float = 10.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.address, self.username, self.password = address, username, password
        self.verify, self.timeout, self.transport = verify_tls, timeout, transport
        self._tokens: dict[str, str] = {}

    def _system_url(self, t: Target) -> str:
        addr = t.bmc or fill(self.address, t)
        if "://" not in addr:
            addr = "https://" + addr
        return addr.rstrip("/")

    async def _client(self, base: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(verify=self.verify, timeout=self.timeout, transport=self.transport)

    async def _request(self, client: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
        root = url.split("/redfish/", 1)[0]
        headers = kw.pop("headers", {})
        token = self._tokens.get(root)
        if token is None and self.username:
            token = await self._login(client, root)
        if token:
            headers["X-Auth-Token"] = token
            r = await client.request(method, url, headers=headers, **kw)
            if r.status_code != 401:
                return r
            self._tokens.pop(root, None)  # session expired: fall through to basic
        auth = httpx.BasicAuth(self.username, self.password or "") if self.username else None
        return await client.request(method, url, headers=headers, auth=auth, **kw)

    async def _login(self, client: httpx.AsyncClient, root: str) -> str | None:
        try:
            r = await client.post(f"{root}/redfish/v1/SessionService/Sessions",
                                  json={"UserName": self.username, "Password": self.password or ""})
        except httpx.HTTPError:
            return None
        token = r.headers.get("X-Auth-Token") if r.status_code in (200, 201) else None
        if token:
            self._tokens[root] = token
        return token

    async def _resolve(self, client: httpx.AsyncClient, url: str) -> str:
        if "/redfish/v1/Systems/" in url:
            return url
        r = await self._request(client, "GET", f"{url}/redfish/v1/Systems")
        r.raise_for_status()
        members = r.json().get("Members") or []
        if not members:
            raise httpx.HTTPError(f"{url} lists no systems")
        return url + members[0]["@odata.id"] if members[0]["@odata.id"].startswith("/") else members[0]["@odata.id"]

    async def _reset(self, t: Target, kinds: list[str]) -> PowerResult:
        url = self._system_url(t)
        try:
            async with await self._client(url) as client:
                system = await self._resolve(client, url)
                allowed = await self._allowed(client, system)
                kind = next((k for k in kinds if allowed is None or k in allowed), None)
                if kind is None:
                    return PowerResult(False, f"BMC offers none of {kinds} (allowed: {sorted(allowed or [])})")
                r = await self._request(client, "POST", f"{system}/Actions/ComputerSystem.Reset", json={"ResetType": kind})
                if r.status_code in (200, 202, 204):
                    return PowerResult(True, f"Redfish {kind} on {system}: HTTP {r.status_code}")
                return PowerResult(False, f"Redfish {kind} on {system}: HTTP {r.status_code} {r.text[:200]}")
        except httpx.HTTPError as e:
            return PowerResult(False, f"Redfish {url}: {type(e).__name__}: {e}")
        except (ValueError, KeyError) as e:
            return PowerResult(False, f"Redfish {url}: unexpected answer: {e}")

    async def _allowed(self, client: httpx.AsyncClient, system: str) -> set[str] | None:
        try:
            r = await self._request(client, "GET", system)
            action = r.json().get("Actions", {}).get("#ComputerSystem.Reset", {})
            values = action.get("ResetType@Redfish.AllowableValues")
            return set(values) if values else None
        except (httpx.HTTPError, ValueError):
            return None

    async def on(self, t: Target) -> PowerResult:
        return await self._reset(t, ["On"])

    async def off(self, t: Target) -> PowerResult:
        return await self._reset(t, ["ForceOff"])

    async def cycle(self, t: Target) -> PowerResult:
        return await self._reset(t, ["PowerCycle", "ForceRestart"])

    async def status(self, t: Target) -> str | None:
        url = self._system_url(t)
        try:
            async with await self._client(url) as client:
                r = await self._request(client, "GET", await self._resolve(client, url))
                state = r.json().get("PowerState")
                return state.lower() if isinstance(state, str) else None
        except (httpx.HTTPError, ValueError):
            return None


# --------------------------------------------------------------------------- ipmi / command


async def _run(argv: list[str], env: dict[str, str] | None, timeout: float) -> tuple[int | None, str]:
    with trio.move_on_after(timeout):
        try:
            p = await trio.run_process(argv, env=env, check=False, capture_stdout=True, capture_stderr=True)
        except FileNotFoundError:
            return None, f"{argv[0]}: command not found"
        return p.returncode, (p.stdout + p.stderr).decode(errors="replace").strip()[-500:]
    return None, f"{argv[0]} timed out after {timeout:g}s"


class _ActionDriver:
    """on/off/cycle as one ``_act(target, action)``: for drivers whose actions differ only by a word."""

    async def _act(self, t: Target, action: str) -> PowerResult:
        raise NotImplementedError

    async def on(self, t: Target) -> PowerResult:
        return await self._act(t, "on")

    async def off(self, t: Target) -> PowerResult:
        return await self._act(t, "off")

    async def cycle(self, t: Target) -> PowerResult:
        return await self._act(t, "cycle")


class IpmiDriver(_ActionDriver):
    """``ipmitool -I lanplus -H HOST -U USER -E chassis power ...``.

    ``-E`` makes ipmitool read the password from ``IPMI_PASSWORD``: it never
    appears on a command line (where ``ps`` and /proc would show it).
    """

    name = "ipmi"

    def __init__(self, *, address: str, username: str | None, password: str | None, ipmitool: str = "ipmitool",
                 timeout: float = 20.0) -> None:
        self.address, self.username, self.password = address, username, password
        self.ipmitool, self.timeout = ipmitool, timeout

    def _argv(self, t: Target, *cmd: str) -> list[str]:
        argv = [self.ipmitool, "-I", "lanplus", "-H", t.bmc or fill(self.address, t)]
        if self.username:
            argv += ["-U", self.username]
        return argv + ["-E", *cmd]

    async def _power(self, t: Target, what: str) -> tuple[int | None, str]:
        env = {**os.environ, "IPMI_PASSWORD": self.password or ""}
        return await _run(self._argv(t, "chassis", "power", what), env, self.timeout)

    async def _act(self, t: Target, action: str) -> PowerResult:
        code, out = await self._power(t, action)
        return PowerResult(code == 0, f"ipmitool chassis power {action}: {out or code}")

    async def status(self, t: Target) -> str | None:
        code, out = await self._power(t, "status")
        if code != 0:
            return None
        return "on" if out.rstrip().endswith("on") else "off" if out.rstrip().endswith("off") else None


class CommandDriver(_ActionDriver):
    """A site's own tool: ``command: "pdu-ctl {action} {name}"``; exit 0 means done.

    The template is split like a shell would (``shlex``) and each word filled in
    separately: no shell runs, so node fields cannot inject commands.
    """

    name = "command"

    def __init__(self, *, command: str, timeout: float = 60.0) -> None:
        self.words = shlex.split(command)
        self.timeout = timeout

    async def _act(self, t: Target, action: str) -> PowerResult:
        argv = [fill(w, t).replace("{action}", action) for w in self.words]
        code, out = await _run(argv, None, self.timeout)
        return PowerResult(code == 0, f"{shlex.join(argv)}: {'ok' if code == 0 else out or code}")

    async def status(self, t: Target) -> str | None:
        return None


class SshPowerDriver:
    """``reboot`` / ``poweroff`` in the running OS, through readiness's SSH settings."""

    name = "ssh"

    def __init__(self, readiness) -> None:
        self.readiness = readiness

    async def _act(self, t: Target, command: str) -> PowerResult:
        from orchestrator.readiness import CheckSpec, Readiness

        r: Readiness = self.readiness
        once = Readiness(known_hosts=r.known.path, policy=r.policy, checks=[CheckSpec(command, f"({command}) >/dev/null 2>&1 &")],
                         user=r.user, port=r.port, key_file=r.key_file, concurrency=1, step_timeout=r.step_timeout)
        v = await once.check(t.ip)
        return PowerResult(v.ok, f"ssh {command}: {'sent' if v.ok else v.error or v.failed_checks[0].reason}")

    async def on(self, t: Target) -> PowerResult:
        return PowerResult(False, "an SSH session cannot power a node on")

    async def off(self, t: Target) -> PowerResult:
        return await self._act(t, "poweroff")

    async def cycle(self, t: Target) -> PowerResult:
        return await self._act(t, "reboot")

    async def status(self, t: Target) -> str | None:
        return "on" if await self.readiness.port_open(t.ip, timeout=3) else None


# --------------------------------------------------------------------------- from the plan


def plan_drivers(lp) -> tuple[WolDriver, Any | None]:
    """(wake driver, BMC driver or None) for a LoadedPlan. Raises SecretError for a missing credential."""
    power = lp.model.power
    net = lp.model.network
    w = power.wol
    base = lp.base
    wake = WolDriver(
        interface=w.interface or net.interface, method=w.method, repeat=w.repeat, interval=w.interval,
        broadcast=str(w.broadcast or net.subnet.broadcast_address), port=w.udp_port,
        password=resolve_secret(w.secureon, base),
    )
    b = power.bmc
    if b.driver == "none":
        return wake, None
    if b.driver == "redfish":
        return wake, RedfishDriver(address=b.address or "", username=b.username, password=resolve_secret(b.password, base),
                                   verify_tls=b.verify_tls)
    if b.driver == "ipmi":
        return wake, IpmiDriver(address=b.address or "", username=b.username, password=resolve_secret(b.password, base))
    if b.driver == "sim":
        from orchestrator.sim.power import SimPowerDriver

        return wake, SimPowerDriver(lp.resolve_path(b.address or ""))
    return wake, CommandDriver(command=b.command or "")


def target(node) -> Target:
    return Target(node.name, node.mac, str(node.ip), node.index, node.bmc)


__all__ = ["CommandDriver", "IpmiDriver", "RedfishDriver", "SshPowerDriver", "WolDriver", "plan_drivers", "target"]
