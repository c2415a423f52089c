"""The lab BMC: a small Redfish subset in front of every lab VM's QMP socket.

One HTTP server on ``network.server:lab.bmc_port`` inside the lab namespace
serves all VMs, one Redfish ComputerSystem per plan node, named by node name
(so ``plans/full.yaml``'s ``http://10.77.0.1:9200/redfish/v1/Systems/{name}``
addresses each node's "BMC"):

* ``GET  /redfish/v1``, ``/redfish/v1/Systems``: service root and collection.
* ``GET  /redfish/v1/Systems/{id}``: ``PowerState`` ``On``/``Off`` from QMP
  ``query-status`` (running = On; paused/prelaunch/shutdown = Off).
* ``POST /redfish/v1/Systems/{id}/Actions/ComputerSystem.Reset`` with
  ``{"ResetType": ...}``: ``On``/``ForceOn`` -> ``cont``; ``ForceOff``/
  ``GracefulShutdown`` -> ``stop`` + ``system_reset`` (the VM stays "off",
  paused, and the next On is a cold boot); ``ForceRestart``/``GracefulRestart``
  -> ``system_reset`` (+ ``cont`` if it was off); ``PowerCycle`` -> ForceOff,
  half a second, On. Answers ``204 No Content``, as Redfish services do.
* ``PATCH /redfish/v1/Systems/{id}`` with ``{"Boot": {"BootSourceOverrideTarget":
  ..., "BootSourceOverrideEnabled": ...}}``: the boot-source override, kept and
  shown in the system resource (the lab's VMs boot from the network anyway:
  QEMU's ``-boot order=n``). The system resource carries an ``ETag``; a PATCH
  with a stale ``If-Match`` gets 412, as on BMCs that version resources.

Like real services, and no kinder (the shapes measured on sushy-emulator 2.2):

* with ``delay`` > 0 (the lab daemon uses :data:`ACTION_DELAY`) a reset is
  answered 204 at once and carried out ``delay`` seconds later, in order per
  system: a client must poll ``PowerState``, as with real BMCs (sushy's fake
  driver: 1-11 s);
* ``/redfish`` and ``/redfish/v1`` are readable without credentials (the
  Redfish spec requires it); everything else answers 401 with
  ``WWW-Authenticate`` and a Redfish error body to missing or wrong credentials;
* an unknown system is a 404 with a Redfish error body naming it; an unknown
  ``ResetType`` a 400.

Authentication: HTTP Basic with the plan's ``power.bmc.username`` and the
password its credential reference names (``{env: ...}`` / ``{file: ...}``).
When that reference resolves to nothing (the variable is unset), the lab BMC
accepts any credentials, so ``lab up`` works without setup; it listens only
inside the lab namespace. Wrong credentials when a password *is* set: 401.

Why ``http.server``: this is a test double with a handful of JSON routes and
one client at a time (the orchestrator), running in a thread of the lab
daemon beside blocking raw-socket listeners. The standard library's
``ThreadingHTTPServer`` is maintained, needs no event loop, and handles
keep-alive and request parsing; with h11 we would be writing the socket and
connection loop ourselves for no gain. The product's Redfish *client* is a
separate matter.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping

from orchestrator.lab import qmp as q

log = logging.getLogger("bootorch.lab.bmc")

RESET_TYPES = ("On", "ForceOn", "ForceOff", "GracefulShutdown", "ForceRestart", "GracefulRestart", "PowerCycle")
BOOT_TARGETS = ("None", "Pxe", "Hdd", "Cd", "BiosSetup")
BOOT_ENABLED = ("Disabled", "Once", "Continuous")
SYSTEMS = "/redfish/v1/Systems"
#: Seconds between a reset's 204 and its effect in the lab daemon's BMC (real BMCs answer first, act after).
ACTION_DELAY = 1.0
#: Most bytes of a request body read (a reset or a boot override is a few dozen).
MAX_BODY = 65536


def reset(qmp_path: str, reset_type: str) -> None:
    """Carry out one Redfish ResetType on the VM behind ``qmp_path``."""
    if reset_type in ("On", "ForceOn"):
        q.power_on(qmp_path)
    elif reset_type in ("ForceOff", "GracefulShutdown"):
        q.force_off(qmp_path)
    elif reset_type in ("ForceRestart", "GracefulRestart"):
        q.force_restart(qmp_path)
    elif reset_type == "PowerCycle":
        q.power_cycle(qmp_path)
    else:
        raise ValueError(reset_type)


def system_resource(name: str, power: str, boot: Mapping[str, str] | None = None) -> dict:
    boot = boot or {}
    return {
        "@odata.id": f"{SYSTEMS}/{name}",
        "@odata.type": "#ComputerSystem.v1_13_0.ComputerSystem",
        "Id": name,
        "Name": name,
        "SystemType": "Virtual",
        "PowerState": power,
        "Boot": {
            "BootSourceOverrideTarget": boot.get("BootSourceOverrideTarget", "None"),
            "BootSourceOverrideEnabled": boot.get("BootSourceOverrideEnabled", "Disabled"),
            "BootSourceOverrideTarget@Redfish.AllowableValues": list(BOOT_TARGETS),
        },
        "Actions": {
            "#ComputerSystem.Reset": {
                "target": f"{SYSTEMS}/{name}/Actions/ComputerSystem.Reset",
                "ResetType@Redfish.AllowableValues": list(RESET_TYPES),
            }
        },
    }


class LabBmc:
    """The server: ``systems`` maps node name -> QMP socket path."""

    def __init__(self, host: str, port: int, systems: Mapping[str, str], *, username: str | None = None,
                 password: str | None = None, on_action: Callable[[str, str], None] | None = None,
                 delay: float = 0.0) -> None:
        self.systems = dict(systems)
        self.username = username
        self.password = password
        self.on_action = on_action
        self.delay = delay
        #: Boot-source override per system (what PATCH Boot set), and a version per system for its ETag.
        self.boot: dict[str, dict[str, str]] = {n: {} for n in self.systems}
        self.versions: dict[str, int] = {n: 0 for n in self.systems}
        self._locks = {n: threading.Lock() for n in self.systems}
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[:2]  # type: ignore[return-value]

    def start(self) -> None:
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="lab-bmc", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def etag(self, name: str) -> str:
        return f'W/"{self.versions[name]}"'

    def act(self, name: str, reset_type: str) -> None:
        """Carry out a reset now (``delay`` 0) or ``delay`` seconds from now, in order per system."""
        def run() -> None:
            if self.delay:
                time.sleep(self.delay)
            with self._locks[name]:
                try:
                    reset(self.systems[name], reset_type)
                except q.QmpError as e:
                    log.warning("bmc %s %s failed: %s", name, reset_type, e)
                    return
            log.info("bmc %s %s", name, reset_type)
            if self.on_action is not None:
                self.on_action(name, reset_type)

        if self.delay:
            threading.Thread(target=run, name=f"lab-bmc-{name}", daemon=True).start()
        else:
            with self._locks[name]:
                reset(self.systems[name], reset_type)  # QmpError: the handler answers 503
            log.info("bmc %s %s", name, reset_type)
            if self.on_action is not None:
                self.on_action(name, reset_type)

    def authorized(self, header: str | None) -> bool:
        if not self.password:
            return True  # no password configured: the lab accepts anyone (documented above)
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        ok_user = self.username is None or hmac.compare_digest(user, self.username)
        return ok_user and hmac.compare_digest(pw, self.password)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        bmc = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "bootorch-lab-bmc"

            def log_message(self, fmt: str, *args: object) -> None:
                log.info("%s %s", self.client_address[0], fmt % args)

            def _send(self, code: int, body: dict | None = None, headers: Mapping[str, str] = {}) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("OData-Version", "4.0")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _error(self, code: int, msg: str, **headers: str) -> None:
                self._send(code, {"error": {"code": "Base.1.0.GeneralError", "message": msg, "@Message.ExtendedInfo": [
                    {"MessageId": "Base.1.0.GeneralError", "Message": msg}]}}, headers)

            def _gate(self) -> bool:
                if bmc.authorized(self.headers.get("Authorization")):
                    return True
                self._error(401, "authentication required: wrong or missing credentials",
                            **{"WWW-Authenticate": 'Basic realm="bootorch lab"'})
                return False

            def _parts(self) -> list[str]:
                return [p for p in self.path.split("?", 1)[0].split("/") if p]

            def _body(self) -> bytes | None:
                """The request body (bounded); None when too long (the connection closes after the answer)."""
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY:
                    self.close_connection = True
                    return None
                return self.rfile.read(length) if length else b""

            def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
                parts = self._parts()
                # The service root is open to anyone (Redfish spec; sushy-emulator and real BMCs do the same).
                if parts in (["redfish"],):
                    return self._send(200, {"v1": "/redfish/v1/"})
                if parts == ["redfish", "v1"]:
                    return self._send(200, {"@odata.id": "/redfish/v1", "Id": "RootService", "Name": "bootorch lab BMC",
                                            "RedfishVersion": "1.6.0", "Systems": {"@odata.id": SYSTEMS}})
                if not self._gate():
                    return
                if parts == ["redfish", "v1", "Systems"]:
                    members = [{"@odata.id": f"{SYSTEMS}/{n}"} for n in bmc.systems]
                    return self._send(200, {"@odata.id": SYSTEMS, "Name": "Computer System Collection",
                                            "Members@odata.count": len(members), "Members": members})
                if len(parts) == 4 and parts[:3] == ["redfish", "v1", "Systems"]:
                    name = parts[3]
                    if name not in bmc.systems:
                        return self._error(404, f"System {name} was not found")
                    try:
                        power = q.power_state(bmc.systems[name])
                    except q.QmpError as e:
                        return self._error(503, f"{name}: VM not reachable: {e}")
                    return self._send(200, system_resource(name, power, bmc.boot[name]), {"ETag": bmc.etag(name)})
                self._error(404, f"no resource {self.path}")

            def do_PATCH(self) -> None:  # noqa: N802
                raw = self._body()
                if not self._gate():
                    return
                if raw is None:
                    return self._error(413, f"request body larger than {MAX_BODY} bytes")
                parts = self._parts()
                if not (len(parts) == 4 and parts[:3] == ["redfish", "v1", "Systems"]):
                    return self._error(405, f"PATCH is not allowed on {self.path}")
                name = parts[3]
                if name not in bmc.systems:
                    return self._error(404, f"System {name} was not found")
                match = self.headers.get("If-Match")
                if match is not None and match not in (bmc.etag(name), "*"):
                    return self._error(412, f"If-Match {match[:40]!r} is not the current ETag of {name}: read it again")
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = None
                boot = body.get("Boot") if isinstance(body, dict) else None
                if not isinstance(boot, dict) or not boot:
                    return self._error(400, "PATCH takes {\"Boot\": {\"BootSourceOverrideTarget\": ...}}")
                target, enabled = boot.get("BootSourceOverrideTarget"), boot.get("BootSourceOverrideEnabled")
                if target is not None and target not in BOOT_TARGETS:
                    return self._error(400, f"BootSourceOverrideTarget must be one of {', '.join(BOOT_TARGETS)}")
                if enabled is not None and enabled not in BOOT_ENABLED:
                    return self._error(400, f"BootSourceOverrideEnabled must be one of {', '.join(BOOT_ENABLED)}")
                with bmc._locks[name]:
                    new = dict(bmc.boot[name])
                    if target is not None:
                        new["BootSourceOverrideTarget"] = target
                        new.setdefault("BootSourceOverrideEnabled", "Once")
                    if enabled is not None:
                        new["BootSourceOverrideEnabled"] = enabled
                    bmc.boot[name] = new
                    bmc.versions[name] += 1
                log.info("bmc %s boot override %s (%s)", name, new.get("BootSourceOverrideTarget"),
                         new.get("BootSourceOverrideEnabled"))
                self._send(204)

            def do_POST(self) -> None:  # noqa: N802
                raw = self._body()
                if not self._gate():
                    return
                if raw is None:
                    return self._error(413, f"request body larger than {MAX_BODY} bytes")
                parts = self._parts()
                if not (len(parts) == 6 and parts[:3] == ["redfish", "v1", "Systems"]
                        and parts[4:] == ["Actions", "ComputerSystem.Reset"]):
                    return self._error(404, f"no action {self.path}")
                name = parts[3]
                if name not in bmc.systems:
                    return self._error(404, f"System {name} was not found")
                try:
                    body = json.loads(raw or b"{}")
                    reset_type = body.get("ResetType", "On") if isinstance(body, dict) else None
                except ValueError:
                    reset_type = None
                if reset_type not in RESET_TYPES:
                    return self._error(400, f"ResetType must be one of {', '.join(RESET_TYPES)}")
                try:
                    bmc.act(name, reset_type)
                except q.QmpError as e:
                    return self._error(503, f"{name}: {e}")
                self._send(204)

        return Handler
