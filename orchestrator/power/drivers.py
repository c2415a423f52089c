"""The power drivers (see :mod:`orchestrator.power` for the table)."""

from __future__ import annotations

import ipaddress
import shlex
from typing import Any, Collection

import httpx
import trio

from orchestrator.power import ActionDriver, PowerResult, Target, child_env, fill, resolve_secret, secret_env_names
from orchestrator.safetext import safe_text

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


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what a credential is bound to."""
    return url.scheme, url.host, url.port if url.port is not None else _DEFAULT_PORTS.get(url.scheme)


def _origin_text(url: httpx.URL) -> str:
    scheme, host, port = _origin(url)
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" if port == _DEFAULT_PORTS.get(scheme) else f"{scheme}://{host}:{port}"


class Refused(Exception):
    """A BMC answer the Redfish driver will not act on (another origin, a redirect); the message says why."""


def _json_object(r: httpx.Response) -> dict[str, Any]:
    body = r.json()  # ValueError when it is not JSON
    if not isinstance(body, dict):
        raise ValueError(f"{r.request.url}: expected a JSON object, got {type(body).__name__}")
    return body


class RedfishDriver:
    """Redfish ``ComputerSystem.Reset``.

    ``address`` is either a system URL (``https://bmc/redfish/v1/Systems/1``,
    templates allowed) or a host (``{name}-bmc``), in which case the first
    member of ``/redfish/v1/Systems`` is used. Authentication: a Redfish session
    (``POST /redfish/v1/SessionService/Sessions``, then ``X-Auth-Token``) when
    the BMC offers one, else HTTP basic. TLS is verified unless the plan says
    ``verify_tls: false``. The reset is posted to the action ``target`` the
    system advertises, else to ``{system}/Actions/ComputerSystem.Reset``.

    Every request carries a credential, so every request stays on the origin
    (scheme, host, port) of the address the plan gave. The BMC's answers are
    untrusted: a system ``@odata.id`` or an action ``target`` on another origin
    (an absolute URL, ``//host/...``, ``http`` for an ``https`` BMC, another
    port) is refused, and so is any redirect (never followed; the result names
    its ``Location``). Refusals, malformed answers and an action that takes
    longer than ``deadline`` (four times ``timeout``) are failed results.
    """

    name = "redfish"

    def __init__(self, *, address: str, username: str | None, password: str | None, verify_tls: bool = True,
                 timeout: float = 10.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.address, self.username, self.password = address, username, password
        self.verify, self.timeout, self.transport = verify_tls, timeout, transport
        # httpx's timeout bounds each read, so a BMC trickling an endless answer would never time out:
        # a whole action (login, discovery, reset: up to four requests) gets this long.
        self.deadline = 4 * timeout
        self._tokens: dict[str, str] = {}

    def _system_url(self, t: Target) -> str:
        addr = t.bmc or fill(self.address, t)
        if "://" not in addr:
            addr = "https://" + addr
        return addr.rstrip("/")

    async def _client(self, base: str) -> httpx.AsyncClient:
        # follow_redirects=False is httpx's default, spelled out: a redirect would carry the credentials to its Location.
        return httpx.AsyncClient(verify=self.verify, timeout=self.timeout, transport=self.transport, follow_redirects=False)

    @staticmethod
    def _same_origin(base: str, ref: Any, what: str, relative_to: str | None = None) -> str:
        """``ref``, a URL the BMC at ``base`` named (``what`` it is), resolved; refused unless on ``base``'s origin."""
        if not isinstance(ref, str) or not ref:
            raise ValueError(f"{what} is not a URL: {ref!r}")
        b = httpx.URL(base)
        try:
            url = httpx.URL(relative_to or base).join(ref)
        except httpx.InvalidURL as e:
            raise ValueError(f"{what} is not a URL: {ref!r} ({e})") from None
        if _origin(url) != _origin(b):
            raise Refused(f"BMC at {_origin_text(b)} named {what} on another host {_origin_text(url)}: refused "
                          f"(credentials go only to the address the plan gives)")
        # user:password@ in a URL would become httpx's basic auth: the credentials are ours to choose, not the BMC's.
        return str(url.copy_with(userinfo=b"", fragment=None))

    @staticmethod
    def _no_redirect(r: httpx.Response) -> httpx.Response:
        if 300 <= r.status_code < 400:
            raise Refused(f"BMC at {_origin_text(r.request.url)} answered HTTP {r.status_code} to {r.request.method} "
                          f"{r.request.url.path}, redirecting to {r.headers.get('Location', '(no Location)')!r}: refused "
                          f"(redirects are not followed with credentials)")
        return r

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
                return self._no_redirect(r)
            self._tokens.pop(root, None)  # session expired: fall through to basic
        auth = httpx.BasicAuth(self.username, self.password or "") if self.username else None
        return self._no_redirect(await client.request(method, url, headers=headers, auth=auth, **kw))

    async def _login(self, client: httpx.AsyncClient, root: str) -> str | None:
        try:
            r = await client.post(f"{root}/redfish/v1/SessionService/Sessions",
                                  json={"UserName": self.username, "Password": self.password or ""})
        except httpx.HTTPError:
            return None
        self._no_redirect(r)
        token = r.headers.get("X-Auth-Token") if r.status_code in (200, 201) else None
        if token:
            self._tokens[root] = token
        return token

    async def _resolve(self, client: httpx.AsyncClient, url: str) -> str:
        if "/redfish/v1/Systems/" in url:
            return url
        collection = f"{url}/redfish/v1/Systems"
        r = await self._request(client, "GET", collection)
        r.raise_for_status()
        members = _json_object(r).get("Members")
        if not isinstance(members, list) or not members:
            raise ValueError(f"{collection} lists no systems")
        first = members[0]
        return self._same_origin(url, first.get("@odata.id") if isinstance(first, dict) else None, "a system",
                                 relative_to=collection)

    async def _reset_action(self, client: httpx.AsyncClient, system: str) -> tuple[str, set[str] | None]:
        """(URL to post the reset to, reset types the BMC allows or None when it does not say)."""
        default = f"{system}/Actions/ComputerSystem.Reset"
        try:
            body = _json_object(await self._request(client, "GET", system))
        except (httpx.HTTPError, ValueError):
            return default, None
        actions = body.get("Actions")
        action = actions.get("#ComputerSystem.Reset") if isinstance(actions, dict) else None
        if not isinstance(action, dict):
            return default, None
        values = action.get("ResetType@Redfish.AllowableValues")
        allowed = {v for v in values if isinstance(v, str)} if isinstance(values, list) else set()
        target = action.get("target")
        try:
            url = self._same_origin(system, target, "a reset action") if target is not None else default
        except ValueError:  # not a URL: the conventional path is worth a try
            url = default
        return url, allowed or None

    async def _reset(self, t: Target, kinds: list[str]) -> PowerResult:
        url = self._system_url(t)
        with trio.move_on_after(self.deadline):
            return await self._reset_once(url, kinds)
        return PowerResult(False, f"Redfish {url}: no complete answer within {self.deadline:g}s")

    async def _reset_once(self, url: str, kinds: list[str]) -> PowerResult:
        try:
            async with await self._client(url) as client:
                system = await self._resolve(client, url)
                action, allowed = await self._reset_action(client, system)
                kind = next((k for k in kinds if allowed is None or k in allowed), None)
                if kind is None:
                    return PowerResult(False, f"BMC offers none of {kinds} (allowed: {sorted(allowed or [])})")
                r = await self._request(client, "POST", action, json={"ResetType": kind})
                if r.status_code in (200, 202, 204):
                    return PowerResult(True, f"Redfish {kind} on {system}: HTTP {r.status_code}")
                return PowerResult(False, f"Redfish {kind} on {system}: HTTP {r.status_code} {r.text[:200]}")
        except Refused as e:
            return PowerResult(False, f"Redfish {url}: {e}")
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            return PowerResult(False, f"Redfish {url}: {type(e).__name__}: {e}")
        except (ValueError, KeyError, TypeError) as e:
            return PowerResult(False, f"Redfish {url}: unexpected answer: {e}")

    async def on(self, t: Target) -> PowerResult:
        return await self._reset(t, ["On"])

    async def off(self, t: Target) -> PowerResult:
        return await self._reset(t, ["ForceOff"])

    async def cycle(self, t: Target) -> PowerResult:
        return await self._reset(t, ["PowerCycle", "ForceRestart"])

    async def status(self, t: Target) -> str | None:
        url = self._system_url(t)
        with trio.move_on_after(self.deadline):
            try:
                async with await self._client(url) as client:
                    r = await self._request(client, "GET", await self._resolve(client, url))
                    state = _json_object(r).get("PowerState")
                    return safe_text(state.lower(), 32) if isinstance(state, str) else None
            except (Refused, httpx.HTTPError, httpx.InvalidURL, ValueError, KeyError, TypeError):
                return None
        return None


# --------------------------------------------------------------------------- ipmi / command


async def _run(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run ``argv`` with exactly ``env`` (see :func:`~orchestrator.power.child_env`): (exit code or None, output tail)."""
    with trio.move_on_after(timeout):
        try:
            p = await trio.run_process(argv, env=env, check=False, capture_stdout=True, capture_stderr=True)
        except FileNotFoundError:
            return None, f"{argv[0]}: command not found"
        # The tail says what went wrong: keep the last 400 characters once escaped, so escapes cannot push it out.
        out = (p.stdout + p.stderr)[-4096:].decode(errors="replace").strip()
        return p.returncode, safe_text(out, 10 * len(out) + 3)[-400:]  # room for every character escaped
    return None, f"{argv[0]} timed out after {timeout:g}s"


class IpmiDriver(ActionDriver):
    """``ipmitool -I lanplus -H HOST -U USER -E chassis power ...``.

    ``-E`` makes ipmitool read the password from ``IPMI_PASSWORD``: it never
    appears on a command line (where ``ps`` and /proc would show it). ipmitool
    runs without the variables named in ``secret_env`` (the plan's credential
    variables): ``IPMI_PASSWORD`` is the only credential it gets.
    """

    name = "ipmi"

    def __init__(self, *, address: str, username: str | None, password: str | None, ipmitool: str = "ipmitool",
                 timeout: float = 20.0, secret_env: Collection[str] = ()) -> None:
        self.address, self.username, self.password = address, username, password
        self.ipmitool, self.timeout, self.secret_env = ipmitool, timeout, frozenset(secret_env)

    def _argv(self, t: Target, *cmd: str) -> list[str]:
        argv = [self.ipmitool, "-I", "lanplus", "-H", t.bmc or fill(self.address, t)]
        if self.username:
            argv += ["-U", self.username]
        return argv + ["-E", *cmd]

    async def _power(self, t: Target, what: str) -> tuple[int | None, str]:
        env = child_env(self.secret_env, IPMI_PASSWORD=self.password or "")
        return await _run(self._argv(t, "chassis", "power", what), env, self.timeout)

    async def _act(self, t: Target, action: str) -> PowerResult:
        code, out = await self._power(t, action)
        return PowerResult(code == 0, f"ipmitool chassis power {action}: {out or code}")

    async def status(self, t: Target) -> str | None:
        code, out = await self._power(t, "status")
        if code != 0:
            return None
        return "on" if out.rstrip().endswith("on") else "off" if out.rstrip().endswith("off") else None


class CommandDriver(ActionDriver):
    """A site's own tool: ``command: "pdu-ctl {action} {name}"``; exit 0 means done.

    The template is split like a shell would (``shlex``) and each word filled in
    separately: no shell runs, so node fields cannot inject commands.

    The command runs without the variables named in ``secret_env`` (the plan's
    credential variables). Its own credential, ``power.bmc.password`` when the
    plan gives one, arrives as ``BOOTORCH_BMC_PASSWORD`` (never on the command line).
    """

    name = "command"
    #: The variable the command finds ``power.bmc.password`` in.
    PASSWORD_ENV = "BOOTORCH_BMC_PASSWORD"

    def __init__(self, *, command: str, timeout: float = 60.0, password: str | None = None,
                 secret_env: Collection[str] = ()) -> None:
        self.words = shlex.split(command)
        self.timeout, self.password, self.secret_env = timeout, password, frozenset(secret_env)

    async def _act(self, t: Target, action: str) -> PowerResult:
        argv = [fill(w, t).replace("{action}", action) for w in self.words]
        own = {self.PASSWORD_ENV: self.password} if self.password is not None else {}
        code, out = await _run(argv, child_env(self.secret_env | {self.PASSWORD_ENV}, **own), self.timeout)
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
        # The same login and trust as readiness (key or agent, known_hosts, the nodes' pinned host keys).
        once = r.derive([CheckSpec(command, f"({command}) >/dev/null 2>&1 &")], concurrency=1)
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


def plan_drivers(plan) -> tuple[WolDriver, Any | None]:
    """(wake driver, BMC driver or None) for a LoadedPlan. Raises SecretError for a missing credential.

    Drivers that run programs are told every variable the plan's credential
    references name (:func:`~orchestrator.power.secret_env_names`), to keep them
    out of those programs' environments.
    """
    power = plan.model.power
    secrets = secret_env_names(plan.model)
    net = plan.model.network
    w = power.wol
    base = plan.base
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
        return wake, IpmiDriver(address=b.address or "", username=b.username, password=resolve_secret(b.password, base),
                                secret_env=secrets)
    if b.driver == "command":
        return wake, CommandDriver(command=b.command or "", password=resolve_secret(b.password, base), secret_env=secrets)
    return wake, plugin_driver(b.driver, plan)


#: The entry-point group through which a package adds a BMC driver: ``name = "module:factory"``, where
#: ``factory(plan) -> PowerDriver`` builds it from ``plan.model.power.bmc`` (the simulator's ``sim`` is one).
DRIVER_ENTRY_POINTS = "bootorch.power_drivers"


def plugin_driver(name: str, plan) -> Any:
    """The BMC driver ``name`` that an installed package registers (:data:`DRIVER_ENTRY_POINTS`)."""
    from importlib.metadata import entry_points

    found = entry_points(group=DRIVER_ENTRY_POINTS, name=name)
    if not found:
        raise ValueError(f"no power driver {name!r} is installed (entry point group {DRIVER_ENTRY_POINTS})")
    return next(iter(found)).load()(plan)


def target(node) -> Target:
    return Target(node.name, node.mac, str(node.ip), node.index, node.bmc)


__all__ = ["CommandDriver", "IpmiDriver", "RedfishDriver", "SshPowerDriver", "WolDriver", "plan_drivers", "target"]
