"""The power drivers (see :mod:`orchestrator.power` for the table)."""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
from dataclasses import dataclass
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
#
# What real Redfish services do that a naive client trips over, each handled below:
#
# * sushy-emulator (OpenStack's, in front of libvirt or its fake driver) names systems by UUID and
#   answers a request by name with ``307 Temporary Redirect`` to ``/redfish/v1/Systems/<uuid>``
#   (also for the reset POST): same-origin redirects are followed, a bounded number of times.
# * A reset is answered (204) before it happens: sushy's fake driver applies it 1-11 s later,
#   libvirt's and our lab BMC's within a second, real servers within seconds. ``on``/``off``
#   poll ``PowerState`` until it changed (``settle`` seconds) before they report success.
# * ``ForceRestart`` (and ``GracefulRestart``) of a system that is Off does nothing in sushy's libvirt
#   driver and is refused by some BMCs; a cycle of a system that reports Off is an ``On``.
# * ``On`` of a system that is On is a 409 Conflict on some BMCs: the state is read first.
# * Boot-source override (``power.bmc.boot_override: pxe``): ``PATCH`` the system's
#   ``Boot.BootSourceOverrideTarget = Pxe`` (``Once``) before a power-on; BMCs that version their
#   resources (ETag) want ``If-Match``, and answer 412/428 without it.
# * The service root is readable without credentials (the Redfish spec demands it); everything
#   else answers 401 to bad credentials and 404 to an unknown system: both become a result that
#   names the BMC and what to fix in the plan.

#: Redirects followed for one request (same origin only).
MAX_REDIRECTS = 5
#: Most bytes of one BMC answer read (after content decoding: a compressed bomb stops here too).
MAX_BODY = 1024 * 1024
#: Seconds between power-state reads while an action settles.
SETTLE_POLL = 1.0
_REDIRECTS = (301, 302, 303, 307, 308)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in: what a credential is bound to."""
    return url.scheme, url.host, url.port if url.port is not None else _DEFAULT_PORTS.get(url.scheme)


def _origin_text(url: httpx.URL) -> str:
    scheme, host, port = _origin(url)
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" if port == _DEFAULT_PORTS.get(scheme) else f"{scheme}://{host}:{port}"


class Refused(Exception):
    """A BMC answer the Redfish driver will not act on, or a failure it explains; the message says why and what to fix."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One BMC answer, read whole but bounded (:data:`MAX_BODY`), from the URL it finally came from."""

    method: str
    url: httpx.URL
    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> dict[str, Any]:
        try:
            body = json.loads(self.body)
        except ValueError:
            raise ValueError(f"{self.url.path}: not JSON") from None
        if not isinstance(body, dict):
            raise ValueError(f"{self.url.path}: expected a JSON object, got {type(body).__name__}")
        return body

    def error_text(self) -> str:
        """What the BMC says went wrong: a Redfish error's message, else the start of the body."""
        try:
            err = self.json().get("error")
        except ValueError:
            err = None
        if isinstance(err, dict):
            info = err.get("@Message.ExtendedInfo")
            first = info[0] if isinstance(info, list) and info and isinstance(info[0], dict) else {}
            msg = err.get("message") or first.get("Message") or err.get("code")
            if isinstance(msg, str):
                return safe_text(msg, 200)
        return safe_text(self.body[:200].decode(errors="replace"), 200)


def _power_state(body: dict[str, Any]) -> str | None:
    """Redfish ``PowerState`` in lower case (on, off, poweringon, poweringoff, paused), or None."""
    state = body.get("PowerState")
    return safe_text(state.lower(), 32) if isinstance(state, str) else None


class RedfishDriver:
    """Redfish ``ComputerSystem.Reset``.

    ``address`` is either a system URL (``https://bmc/redfish/v1/Systems/1``,
    templates allowed) or a host (``{name}-bmc``), in which case the first
    member of ``/redfish/v1/Systems`` is used. Authentication: a Redfish session
    (``POST /redfish/v1/SessionService/Sessions``, then ``X-Auth-Token``) when
    the BMC offers one, else HTTP basic (a BMC that refuses the session login is
    not asked again). TLS is verified unless the plan says ``verify_tls: false``.
    The reset is posted to the action ``target`` the system advertises, else to
    ``{system}/Actions/ComputerSystem.Reset``. What real services do and how it
    is handled: the comment above this class.

    Every request carries a credential, so every request stays on the origin
    (scheme, host, port) of the address the plan gave. The BMC's answers are
    untrusted: a system ``@odata.id``, an action ``target`` or a redirect
    ``Location`` on another origin (an absolute URL, ``//host/...``, ``http``
    for an ``https`` BMC, another port) is refused and nothing is sent there;
    same-origin redirects are followed up to :data:`MAX_REDIRECTS` times (307/308
    keep the method, 301/302/303 only for GET). An answer is read up to
    :data:`MAX_BODY` bytes. Refusals, malformed answers and requests that take
    longer than ``deadline`` (four times ``timeout``) are failed results.
    """

    name = "redfish"

    def __init__(self, *, address: str, username: str | None, password: str | None, verify_tls: bool = True,
                 timeout: float = 10.0, transport: httpx.AsyncBaseTransport | None = None,
                 boot_override: str = "none", settle: float = 60.0, poll: float = SETTLE_POLL) -> None:
        self.address, self.username, self.password = address, username, password
        self.verify, self.timeout, self.transport = verify_tls, timeout, transport
        self.boot_override, self.settle, self.poll = boot_override, settle, poll
        # httpx's timeout bounds each read, so a BMC trickling an endless answer would never time out:
        # the requests of one action (login, discovery, override, reset) get this long together.
        self.deadline = 4 * timeout
        self._tokens: dict[str, str] = {}
        self._basic_only: set[str] = set()

    def _system_url(self, t: Target) -> str:
        addr = t.bmc or fill(self.address, t)
        if "://" not in addr:
            addr = "https://" + addr
        return addr.rstrip("/")

    async def _client(self, base: str) -> httpx.AsyncClient:
        # follow_redirects=False is httpx's default, spelled out: redirects are followed by _send, same origin only.
        return httpx.AsyncClient(verify=self.verify, timeout=self.timeout, transport=self.transport, follow_redirects=False)

    @staticmethod
    def _same_origin(base: str | httpx.URL, ref: Any, what: str, relative_to: str | httpx.URL | None = None) -> str:
        """``ref``, a URL the BMC at ``base`` named (``what`` it is), resolved; refused unless on ``base``'s origin."""
        if not isinstance(ref, str) or not ref:
            raise ValueError(f"{what} is not a URL: {ref!r}")
        b = httpx.URL(str(base))
        try:
            url = httpx.URL(str(relative_to or base)).join(ref)
        except httpx.InvalidURL as e:
            raise ValueError(f"{what} is not a URL: {ref!r} ({e})") from None
        if _origin(url) != _origin(b):
            raise Refused(f"BMC at {_origin_text(b)} named {what} on another host {_origin_text(url)}: refused "
                          f"(credentials go only to the address the plan gives)")
        # user:password@ in a URL would become httpx's basic auth: the credentials are ours to choose, not the BMC's.
        return str(url.copy_with(userinfo=b"", fragment=None))

    async def _send(self, client: httpx.AsyncClient, method: str, url: str, *, headers: dict[str, str],
                    auth: httpx.Auth | None = None, body: Any = None) -> Answer:
        """One request, following same-origin redirects; the answer read up to :data:`MAX_BODY` bytes."""
        start = url
        for _ in range(MAX_REDIRECTS + 1):
            req = client.build_request(method, url, headers=headers, json=body)
            r = await client.send(req, auth=auth, stream=True)
            try:
                data = bytearray()
                async for chunk in r.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_BODY:
                        raise Refused(f"BMC at {_origin_text(r.request.url)} answered {method} {r.request.url.path} "
                                      f"with more than {MAX_BODY} bytes: refused")
            finally:
                await r.aclose()
            if r.status_code not in _REDIRECTS:
                return Answer(method, r.request.url, r.status_code, r.headers, bytes(data))
            location = r.headers.get("Location")
            where = (f"BMC at {_origin_text(r.request.url)} answered HTTP {r.status_code} to {method} "
                     f"{r.request.url.path}, redirecting to {safe_text(location or '(no Location)', 200)!r}")
            if not location:
                raise Refused(f"{where}: refused")
            try:
                url = self._same_origin(start, location, "a redirect", relative_to=r.request.url)
            except Refused:
                raise Refused(f"{where}: refused (redirects are followed only on the origin the plan gives, "
                              "credentials never leave it)") from None
            except ValueError as e:
                raise Refused(f"{where}: refused ({e})") from None
            if method != "GET" and r.status_code not in (307, 308):
                raise Refused(f"{where}: refused (only 307/308 redirect a {method} with its body)")
        raise Refused(f"BMC at {_origin_text(httpx.URL(start))}: more than {MAX_REDIRECTS} redirects from "
                      f"{httpx.URL(start).path}: refused")

    async def _request(self, client: httpx.AsyncClient, method: str, url: str, *, body: Any = None,
                       headers: dict[str, str] | None = None) -> Answer:
        """A request with the plan's credentials; 401 and 403 raise :class:`Refused` saying what to fix."""
        u = httpx.URL(url)
        root = _origin_text(u)
        headers = dict(headers or {})
        token = self._tokens.get(root)
        if token is None and self.username and root not in self._basic_only:
            token = await self._login(client, root)
        if token:
            a = await self._send(client, method, url, headers={**headers, "X-Auth-Token": token}, body=body)
            if a.status != 401:
                return self._authorized(a)
            self._tokens.pop(root, None)  # session expired: fall through to basic
        auth = httpx.BasicAuth(self.username, self.password or "") if self.username else None
        a = self._authorized(await self._send(client, method, url, headers=headers, auth=auth, body=body))
        if token is None:
            self._basic_only.add(root)  # basic works where the session login did not: no more logins here
        return a

    def _authorized(self, a: Answer) -> Answer:
        where = _origin_text(a.url)
        if a.status == 401:
            if not self.username:
                raise Refused(f"BMC at {where} wants credentials (HTTP 401 to {a.method} {a.url.path}): set "
                              "power.bmc.username and power.bmc.password")
            raise Refused(f"BMC at {where} rejected the credentials of user {self.username!r} (HTTP 401 to {a.method} "
                          f"{a.url.path}): check power.bmc.username and the password power.bmc.password names")
        if a.status == 403:
            raise Refused(f"BMC at {where} refused {a.method} {a.url.path} to user {self.username!r} (HTTP 403: "
                          f"{a.error_text()}): the account needs a role that may reset systems "
                          "(Redfish ConfigureComponents, e.g. Operator)")
        return a

    async def _login(self, client: httpx.AsyncClient, root: str) -> str | None:
        try:
            a = await self._send(client, "POST", f"{root}/redfish/v1/SessionService/Sessions", headers={},
                                 body={"UserName": self.username, "Password": self.password or ""})
        except httpx.HTTPError:
            return None
        token = a.headers.get("X-Auth-Token") if a.status in (200, 201) else None
        if token:
            self._tokens[root] = token
        elif a.status != 401:
            # No session service (404/405/501, ...): basic auth from now on. A 401 may be a service that
            # wants basic auth for the login itself (sushy-emulator): basic decides below, and says why.
            self._basic_only.add(root)
        return token

    async def _first_system(self, client: httpx.AsyncClient, url: str) -> str:
        collection = f"{url}/redfish/v1/Systems"
        a = await self._request(client, "GET", collection)
        if a.status != 200:
            raise Refused(f"BMC at {_origin_text(a.url)}: GET {a.url.path}: HTTP {a.status} {a.error_text()} "
                          "(is power.bmc.address a Redfish service?)")
        members = a.json().get("Members")
        if not isinstance(members, list) or not members:
            raise ValueError(f"{collection} lists no systems")
        first = members[0]
        return self._same_origin(url, first.get("@odata.id") if isinstance(first, dict) else None, "a system",
                                 relative_to=a.url)

    async def _unknown_system(self, client: httpx.AsyncClient, a: Answer) -> str:
        """The message for a 404 on a system URL: which BMC, which path, which systems it has."""
        where = _origin_text(a.url)
        have = ""
        try:
            listing = await self._request(client, "GET", f"{where}/redfish/v1/Systems")
            members = listing.json().get("Members") if listing.status == 200 else None
            if isinstance(members, list):
                ids = [safe_text(m["@odata.id"].rstrip("/").rsplit("/", 1)[-1], 64) for m in members[:8]
                       if isinstance(m, dict) and isinstance(m.get("@odata.id"), str)]
                have = f"; it has {len(members)}: {', '.join(ids)}{', ...' if len(members) > 8 else ''}"
        except (Refused, httpx.HTTPError, ValueError):
            pass
        return (f"BMC at {where} has no system {safe_text(a.url.path, 200)} (HTTP 404: {a.error_text()}){have}: "
                "check power.bmc.address or the node's bmc: value")

    async def _system(self, client: httpx.AsyncClient, url: str) -> Answer:
        """The node's ComputerSystem resource (its ``url`` is where it really is, after redirects)."""
        if "/redfish/v1/Systems/" not in url:
            url = await self._first_system(client, url)
        a = await self._request(client, "GET", url)
        if a.status == 404:
            raise Refused(await self._unknown_system(client, a))
        if a.status != 200:
            raise Refused(f"BMC at {_origin_text(a.url)}: GET {a.url.path}: HTTP {a.status} {a.error_text()}")
        return a

    def _reset_action(self, system: Answer, body: dict[str, Any]) -> tuple[str, set[str] | None]:
        """(URL to post the reset to, reset types the BMC allows or None when it does not say)."""
        default = f"{str(system.url).rstrip('/')}/Actions/ComputerSystem.Reset"
        actions = body.get("Actions")
        action = actions.get("#ComputerSystem.Reset") if isinstance(actions, dict) else None
        if not isinstance(action, dict):
            return default, None
        values = action.get("ResetType@Redfish.AllowableValues")
        allowed = {v for v in values if isinstance(v, str)} if isinstance(values, list) else set()
        target = action.get("target")
        try:
            url = self._same_origin(system.url, target, "a reset action") if target is not None else default
        except ValueError:  # not a URL: the conventional path is worth a try
            url = default
        return url, allowed or None

    async def _override_pxe(self, client: httpx.AsyncClient, system: Answer, body: dict[str, Any]) -> str:
        """Set the one-time boot-source override to PXE; what was done, or :class:`Refused`."""
        where = _origin_text(system.url)
        boot = body.get("Boot") if isinstance(body.get("Boot"), dict) else {}
        offered = boot.get("BootSourceOverrideTarget@Redfish.AllowableValues")
        if isinstance(offered, list) and "Pxe" not in offered:
            raise Refused(f"BMC at {where} offers no boot override to Pxe for {system.url.path} (it offers "
                          f"{safe_text(str(offered), 120)}): set power.bmc.boot_override: none")
        if boot.get("BootSourceOverrideTarget") == "Pxe" and boot.get("BootSourceOverrideEnabled") in ("Once", "Continuous"):
            return "boot override already Pxe"
        patch = {"Boot": {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}}
        etag = system.headers.get("ETag")
        for attempt in range(2):
            a = await self._request(client, "PATCH", str(system.url), body=patch, headers={"If-Match": etag} if etag else {})
            if a.status in (200, 202, 204):
                return "boot override Pxe (once)"
            if a.status in (412, 428) and attempt == 0:
                # Its resource changed since we read it, or it wants If-Match: read the current ETag, once.
                etag = (await self._system(client, str(system.url))).headers.get("ETag")
                continue
            break
        raise Refused(f"BMC at {where} refused the boot override to Pxe on {system.url.path}: HTTP {a.status} "
                      f"{a.error_text()}")

    async def _act(self, t: Target, action: str) -> PowerResult:
        url = self._system_url(t)
        outcome: tuple[PowerResult, str, str | None] | None = None
        with trio.move_on_after(self.deadline):
            outcome = await self._act_once(url, action)
        if outcome is None:
            return PowerResult(False, f"Redfish {url}: no complete answer within {self.deadline:g}s")
        result, system, want = outcome
        if not result.ok or want is None:
            return result
        return await self._settle(url, system, want, result)

    async def _act_once(self, url: str, action: str) -> tuple[PowerResult, str, str | None]:
        """(result, system URL, power state to wait for or None)."""
        try:
            async with await self._client(url) as client:
                system = await self._system(client, url)
                body = system.json()
                path = system.url.path
                state = _power_state(body)
                if action == "on" and state == "on":
                    return PowerResult(True, f"Redfish {path}: already On"), str(system.url), None
                if action == "off" and state == "off":
                    return PowerResult(True, f"Redfish {path}: already Off"), str(system.url), None
                kinds = {"on": ["On"], "off": ["ForceOff"], "cycle": ["PowerCycle", "ForceRestart"]}[action]
                note = ""
                if action == "cycle" and state == "off":
                    # A restart of an Off system is a no-op (sushy/libvirt) or refused (some BMCs): power it on.
                    kinds, note = ["On"], " (it was Off: On instead of a cycle)"
                if self.boot_override == "pxe" and action in ("on", "cycle"):
                    note += "; " + await self._override_pxe(client, system, body)
                target, allowed = self._reset_action(system, body)
                kind = next((k for k in kinds if allowed is None or k in allowed), None)
                if kind is None:
                    return PowerResult(False, f"BMC offers none of {kinds} (allowed: {sorted(allowed or [])})"), "", None
                a = await self._request(client, "POST", target, body={"ResetType": kind})
                if a.status == 404:
                    raise Refused(await self._unknown_system(client, a))
                if a.status in (200, 202, 204):
                    want = "on" if kind == "On" else "off" if kind == "ForceOff" else None
                    if want is not None and state is None:
                        want, note = None, note + " (the system reports no PowerState: not confirmed)"
                    return PowerResult(True, f"Redfish {kind} on {path}: HTTP {a.status}{note}"), str(system.url), want
                return (PowerResult(False, f"Redfish {kind} on {path}: HTTP {a.status} {a.error_text()}"), "", None)
        except Refused as e:
            return PowerResult(False, f"Redfish {url}: {e}"), "", None
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            return PowerResult(False, f"Redfish {url}: {type(e).__name__}: {e}"), "", None
        except (ValueError, KeyError, TypeError) as e:
            return PowerResult(False, f"Redfish {url}: unexpected answer: {e}"), "", None

    async def _settle(self, url: str, system: str, want: str, result: PowerResult) -> PowerResult:
        """Poll the system's PowerState until it is ``want`` (``settle`` seconds at most)."""
        start = trio.current_time()
        last: str | None = None
        with trio.move_on_after(self.settle):
            while True:
                last = await self._state(system)
                if last == want:
                    return PowerResult(True, f"{result.detail}; {want.capitalize()} after "
                                             f"{trio.current_time() - start:.1f}s")
                await trio.sleep(self.poll)
        return PowerResult(False, f"{result.detail}, but the BMC still reports {last or 'no power state'} after "
                                  f"{self.settle:g}s (power.bmc.settle)")

    async def _state(self, url: str) -> str | None:
        with trio.move_on_after(self.deadline):
            try:
                async with await self._client(url) as client:
                    return _power_state((await self._system(client, url)).json())
            except (Refused, httpx.HTTPError, httpx.InvalidURL, ValueError, KeyError, TypeError):
                return None
        return None

    async def on(self, t: Target) -> PowerResult:
        return await self._act(t, "on")

    async def off(self, t: Target) -> PowerResult:
        return await self._act(t, "off")

    async def cycle(self, t: Target) -> PowerResult:
        return await self._act(t, "cycle")

    async def status(self, t: Target) -> str | None:
        return await self._state(self._system_url(t))


# --------------------------------------------------------------------------- ipmi / command


async def _run(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run ``argv`` with exactly ``env`` (see :func:`~orchestrator.power.child_env`): (exit code or None, output tail)."""
    with trio.move_on_after(timeout):
        try:
            p = await trio.run_process(argv, env=env, check=False, capture_stdout=True, capture_stderr=True)
        except FileNotFoundError:
            return None, f"{argv[0]}: command not found"
        # The tail says what went wrong: keep the last 400 characters once escaped, so escapes cannot push it out.
        out = (p.stdout[-4096:] + p.stderr[-4096:]).decode(errors="replace").strip()
        return p.returncode, safe_text(out, 10 * len(out) + 3)[-400:]  # room for every character escaped
    return None, f"{argv[0]} timed out after {timeout:g}s"


def split_host_port(address: str, default: int | None = None) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, port or ``default``); a bare IPv6 address is a host."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    else:
        host, port = address, ""
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{address!r}: the port must be a number 1-65535")
        return host, int(port)
    return host, default


#: ipmitool's output -> what went wrong and what to fix ({where}: host:port, {user}, {cipher}). Measured with
#: ipmitool 1.8.19 -v against OpenIPMI's ipmi_sim 2.0.33; the texts are ipmitool's, so real BMCs give the same.
_IPMI_PROBLEMS = (
    ("RAKP 2 HMAC is invalid", "the BMC at {where} rejected the password of user {user!r}: check the password "
                               "power.bmc.password names"),
    ("unauthorized name", "the BMC at {where} has no user {user!r} (RAKP: unauthorized name): check power.bmc.username"),
    ("invalid authentication algorithm", "the BMC at {where} does not offer cipher suite {cipher}: set "
                                         "power.bmc.cipher_suite to one it offers (`ipmitool ... channel getciphers ipmi`)"),
    ("no matching cipher suite", "the BMC at {where} does not offer cipher suite {cipher}: set power.bmc.cipher_suite "
                                 "to one it offers (`ipmitool ... channel getciphers ipmi`)"),
    ("privilege level", "user {user!r} may not control power on the BMC at {where} (insufficient privilege): the "
                        "account needs OPERATOR or ADMINISTRATOR"),
    ("Get Auth Capabilities error", "no IPMI answer from {where} (UDP): check power.bmc.address and that IPMI over LAN "
                                    "is enabled on the BMC"),
    ("Unable to establish", "no IPMI session with {where} for user {user!r}"),
)


class IpmiDriver:
    """``ipmitool -I lanplus -C SUITE -L OPERATOR -H HOST [-p PORT] -U USER -E -v chassis ...``.

    ``-E`` makes ipmitool read the password from ``IPMI_PASSWORD``: it never
    appears on a command line (where ``ps`` and /proc would show it). ipmitool
    runs without the variables named in ``secret_env`` (the plan's credential
    variables): ``IPMI_PASSWORD`` is the only credential it gets.

    The cipher suite is always given (``power.bmc.cipher_suite``): without ``-C``
    ipmitool first asks the BMC for its suites, which ipmi_sim does not answer
    (10 s lost). ``-L OPERATOR`` asks for the least privilege that may control
    power. ``-v`` makes ipmitool say why a session failed (a wrong password and
    an unknown user differ only there); :data:`_IPMI_PROBLEMS` turns that into a
    message naming the BMC and the plan key to fix.

    ``on``/``off`` poll ``chassis power status`` until it changed (``settle``);
    ``cycle`` of a chassis that is off is a power-on (IPMI's power cycle has no
    effect on an off chassis on some BMCs); with ``boot_override: pxe`` a
    power-on is preceded by ``chassis bootdev pxe`` (next boot only; BMCs drop
    the flag ~60 s after it is set unless a power-on follows, so it is set just
    before).
    """

    name = "ipmi"

    def __init__(self, *, address: str, username: str | None, password: str | None, ipmitool: str = "ipmitool",
                 timeout: float = 30.0, secret_env: Collection[str] = (), cipher_suite: int = 17,
                 boot_override: str = "none", settle: float = 60.0, poll: float = SETTLE_POLL, retries: int = 3,
                 retry_interval: int = 2) -> None:
        self.address, self.username, self.password = address, username, password
        self.ipmitool, self.timeout, self.secret_env = ipmitool, timeout, frozenset(secret_env)
        self.cipher_suite, self.boot_override, self.settle, self.poll = cipher_suite, boot_override, settle, poll
        # ipmitool -R/-N: UDP retries and seconds between them (a BMC that never answers costs ~18 s at 3/2).
        self.retries, self.retry_interval = retries, retry_interval

    def _where(self, t: Target) -> tuple[str, int | None]:
        return split_host_port(t.bmc or fill(self.address, t))

    def _argv(self, t: Target, *cmd: str) -> list[str]:
        host, port = self._where(t)
        argv = [self.ipmitool, "-I", "lanplus", "-C", str(self.cipher_suite), "-L", "OPERATOR",
                "-N", str(self.retry_interval), "-R", str(self.retries), "-H", host]
        if port is not None:
            argv += ["-p", str(port)]
        if self.username:
            argv += ["-U", self.username]
        return argv + ["-E", "-v", *cmd]

    async def _ipmitool(self, t: Target, *cmd: str) -> tuple[int | None, str]:
        if len((self.password or "").encode()) > 20:
            return None, (f"the BMC password has {len((self.password or '').encode())} bytes: IPMI 2.0 allows at most 20 "
                          "(many BMCs 16), ipmitool refuses longer ones")
        env = child_env(self.secret_env, IPMI_PASSWORD=self.password or "")
        try:
            argv = self._argv(t, *cmd)
        except ValueError as e:
            return None, f"power.bmc.address: {e}"
        return await _run(argv, env, self.timeout)

    def _problem(self, t: Target, what: str, code: int | None, out: str) -> str:
        try:
            host, port = self._where(t)
            where = f"{host}:{port or 623}"
        except ValueError:
            where = t.bmc or fill(self.address, t)
        for needle, text in _IPMI_PROBLEMS:
            if needle in out and (needle != "privilege level" or "failed" in out):
                return f"ipmitool {what}: " + text.format(where=where, user=self.username or "", cipher=self.cipher_suite)
        return f"ipmitool {what}: {_ipmi_tail(out) or code}"

    async def status(self, t: Target) -> str | None:
        code, out = await self._ipmitool(t, "chassis", "power", "status")
        m = re.search(r"Chassis Power is (on|off)", out) if code == 0 else None
        return m.group(1) if m else None

    async def _power(self, t: Target, what: str) -> PowerResult:
        code, out = await self._ipmitool(t, "chassis", "power", what)
        if code != 0:
            return PowerResult(False, self._problem(t, f"chassis power {what}", code, out))
        return PowerResult(True, f"ipmitool chassis power {what}: {_ipmi_tail(out) or 'ok'}")

    async def _bootdev(self, t: Target) -> PowerResult | None:
        """With ``boot_override: pxe``: ``chassis bootdev pxe``; a failed result, or None when done or not asked."""
        if self.boot_override != "pxe":
            return None
        code, out = await self._ipmitool(t, "chassis", "bootdev", "pxe")
        return None if code == 0 else PowerResult(False, self._problem(t, "chassis bootdev pxe", code, out))

    async def _settle(self, t: Target, want: str, result: PowerResult) -> PowerResult:
        start = trio.current_time()
        last: str | None = None
        with trio.move_on_after(self.settle):
            while True:
                last = await self.status(t)
                if last == want:
                    return PowerResult(True, f"{result.detail}; {want} after {trio.current_time() - start:.1f}s")
                await trio.sleep(self.poll)
        return PowerResult(False, f"{result.detail}, but the BMC still reports {last or 'no power state'} after "
                                  f"{self.settle:g}s (power.bmc.settle)")

    async def on(self, t: Target) -> PowerResult:
        failed = await self._bootdev(t)
        if failed is not None:
            return failed
        r = await self._power(t, "on")
        return await self._settle(t, "on", r) if r.ok else r

    async def off(self, t: Target) -> PowerResult:
        r = await self._power(t, "off")
        return await self._settle(t, "off", r) if r.ok else r

    async def cycle(self, t: Target) -> PowerResult:
        if await self.status(t) == "off":
            r = await self.on(t)
            return PowerResult(r.ok, f"{r.detail} (it was off: on instead of a cycle)")
        failed = await self._bootdev(t)
        return failed if failed is not None else await self._power(t, "cycle")


def _ipmi_tail(out: str) -> str:
    """ipmitool's last meaningful line (``-v`` adds chatter: the IANA registry, HPM/VSO capability probes)."""
    noise = ("Loading IANA PEN Registry", "HPM.x Capabilities", "VSO Capabilities", "Invalid completion code received",
             "Discovered IPMB address")
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and not any(n in ln for n in noise)]
    return lines[-1] if lines else ""


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
                                   verify_tls=b.verify_tls, boot_override=b.boot_override, settle=b.settle)
    if b.driver == "ipmi":
        return wake, IpmiDriver(address=b.address or "", username=b.username, password=resolve_secret(b.password, base),
                                secret_env=secrets, cipher_suite=b.cipher_suite, boot_override=b.boot_override,
                                settle=b.settle)
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
