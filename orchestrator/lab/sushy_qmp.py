"""sushy-emulator (OpenStack's sushy-tools) in front of the lab's QEMU VMs: ``lab.bmc: sushy``.

Run as ``python -m orchestrator.lab.sushy_qmp --config FILE`` (inside the lab
namespace; :mod:`orchestrator.lab.bmcs` writes FILE and starts it).

What is sushy's and what is ours:

* **sushy's** (sushy-tools 2.2, unchanged): the Flask application
  ``sushy_tools.emulator.main.app`` -- every route, the Redfish JSON templates,
  its error handling (a system named by its name answers ``307`` to
  ``/redfish/v1/Systems/<uuid>``, an unknown system ``404``), the HTTP basic
  auth middleware (bcrypt htpasswd file, ``SUSHY_EMULATOR_AUTH_FILE``; the
  service root stays open), its config loading (``--config`` is a Python file of
  ``SUSHY_EMULATOR_*`` settings, as for ``sushy-emulator --config``), and the
  werkzeug HTTP server it runs under (``app.run``, threaded), TLS included when
  the config names a certificate.
* **ours**: :class:`QmpSystems`, a systems driver (a subclass of sushy's
  ``AbstractSystemsDriver``) that does for the lab's QEMU processes what sushy's
  libvirt driver does for libvirt domains, through QMP
  (:mod:`orchestrator.lab.qmp`); and :func:`main`, which makes the app use it.
  sushy chooses its systems driver (libvirt, nova, ironic, fake) in the
  ``systems`` property of its ``Application`` class; :class:`QmpApplication`
  subclasses that class and overrides only that property, and :func:`main`
  switches sushy's one app instance (its routes are bound to it) to the
  subclass, then configures and runs it as sushy's own ``main()`` does.

Why not sushy's own drivers: its libvirt driver needs libvirtd and refuses
domains it did not define (the lab's VMs are bare QEMU processes with a QMP
socket each); its fake driver keeps power states in a table and moves no VM.

The driver follows the libvirt driver's semantics, not kinder ones: ``On`` /
``ForceOn`` power on; ``ForceOff`` powers off; ``GracefulShutdown`` is an ACPI
request (QMP ``system_powerdown``) the guest may ignore; ``ForceRestart`` and
``GracefulRestart`` reset a *running* VM and do nothing to one that is off;
``Nmi`` injects an NMI into a running VM. Each system is named by node name and
has a UUID (from the config); access by name is redirected to the UUID, as
sushy's libvirt and fake drivers do. The boot device (``PATCH Boot``) is kept
per system; the lab's VMs boot from the network whatever it says.

The config's ``BOOTORCH_QMP_SYSTEMS`` is a list of
``{"name", "uuid", "qmp", "mac", "boot_device", "boot_mode"}``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Any

from orchestrator.lab import qmp as q

log = logging.getLogger("bootorch.lab.sushy")

BOOT_DEVICES = ("Pxe", "Hdd", "Cd", "Floppy")


def _sushy():
    """sushy-tools' modules, imported late: only the sushy process needs them (and Flask)."""
    from sushy_tools import error
    from sushy_tools.emulator import main as sushy_main
    from sushy_tools.emulator.resources.systems.base import AbstractSystemsDriver

    return error, sushy_main, AbstractSystemsDriver


def make_driver_class() -> type:
    """:class:`QmpSystems`, built on sushy's ``AbstractSystemsDriver`` (imported only here)."""
    error, _, AbstractSystemsDriver = _sushy()

    class QmpSystems(AbstractSystemsDriver):
        """sushy systems driver: one lab VM per system, through its QMP socket."""

        @classmethod
        def initialize(cls, config: Any, logger: Any, *args: Any, **kwargs: Any) -> type:
            cls._config = config
            cls._logger = logger
            return cls

        def __init__(self) -> None:
            super().__init__()
            systems = self._config.get("BOOTORCH_QMP_SYSTEMS") or []
            self._by_uuid = {s["uuid"]: dict(s) for s in systems}
            self._by_name = {s["name"]: s["uuid"] for s in systems}
            self._lock = threading.Lock()

        def _get(self, identity: str) -> dict[str, Any]:
            system = self._by_uuid.get(identity)
            if system is not None:
                return system
            uuid = self._by_name.get(identity)
            if uuid is None:
                raise error.NotFound(f"System {identity} was not found")
            raise error.AliasAccessError(uuid)  # sushy answers 307 to /redfish/v1/Systems/<uuid>

        @property
        def driver(self) -> str:
            return "<bootorch-qmp>"

        @property
        def systems(self) -> list[str]:
            return list(self._by_uuid)

        def uuid(self, identity: str) -> str:
            try:
                return self._get(identity)["uuid"]
            except error.AliasAccessError as exc:
                return str(exc)

        def name(self, identity: str) -> str:
            try:
                return self._get(identity)["name"]
            except error.AliasAccessError:
                return identity

        def get_power_state(self, identity: str) -> str:
            system = self._get(identity)
            try:
                return q.power_state(system["qmp"])
            except q.QmpError as e:
                raise error.FishyError(f"System {system['name']}: its VM does not answer: {e}", code=503) from None

        def set_power_state(self, identity: str, state: str) -> None:
            system = self._get(identity)
            path = system["qmp"]
            try:
                with self._lock:
                    on = q.power_state(path) == "On"
                    if state in ("On", "ForceOn"):
                        q.power_on(path)
                    elif state == "ForceOff":
                        if on:
                            q.force_off(path)
                    elif state == "GracefulShutdown":
                        if on:
                            q.qmp(path, "system_powerdown")
                    elif state in ("ForceRestart", "GracefulRestart"):
                        if on:  # libvirt: only an active domain restarts
                            q.force_restart(path)
                    elif state == "Nmi":
                        if on:
                            q.qmp(path, "inject-nmi")
                    else:
                        raise error.BadRequest(f"Unknown ResetType {state}")
            except q.QmpError as e:
                raise error.FishyError(f"System {system['name']}: {state} failed: {e}", code=503) from None
            log.info("system %s: %s", system["name"], state)

        def get_boot_device(self, identity: str) -> str:
            return self._get(identity).get("boot_device") or "Pxe"

        def set_boot_device(self, identity: str, boot_source: str) -> None:
            if boot_source not in BOOT_DEVICES:
                raise error.BadRequest(f"Unknown boot device {boot_source}: one of {', '.join(BOOT_DEVICES)}")
            system = self._get(identity)
            with self._lock:
                system["boot_device"] = boot_source
            log.info("system %s: boot device %s", system["name"], boot_source)

        def get_boot_mode(self, identity: str) -> str:
            return self._get(identity).get("boot_mode") or "Legacy"

        def set_boot_mode(self, identity: str, boot_mode: str) -> None:
            raise error.NotSupportedError("the lab VM's firmware is fixed by the plan's lab.firmware")

        def get_nics(self, identity: str) -> list[dict[str, str]]:
            mac = self._get(identity).get("mac")
            return [{"id": mac, "mac": mac}] if mac else []

    return QmpSystems


def make_app() -> Any:
    """sushy's app instance, switched to :class:`QmpApplication` (its ``systems`` is a :class:`QmpSystems`)."""
    _, sushy_main, _ = _sushy()
    from sushy_tools.emulator import memoize

    driver = make_driver_class()

    class QmpApplication(sushy_main.Application):
        @property
        @memoize.memoize()
        def systems(self) -> Any:
            return driver.initialize(self.config, self.logger)()

    app = sushy_main.app
    app.__class__ = QmpApplication
    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m orchestrator.lab.sushy_qmp",
                                 description="sushy-emulator with a systems driver for the lab's QEMU VMs (QMP)")
    ap.add_argument("--config", required=True, help="sushy config file (SUSHY_EMULATOR_* and BOOTORCH_QMP_SYSTEMS)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    app = make_app()
    app.configure(config_file=os.path.abspath(args.config))  # sushy's own loading, auth middleware included
    ssl_context = None
    cert, key = app.config.get("SUSHY_EMULATOR_SSL_CERT"), app.config.get("SUSHY_EMULATOR_SSL_KEY")
    if cert and key:
        import ssl

        ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ssl_context.load_cert_chain(cert, key)
    log.info("serving %d system(s) on %s:%s", len(app.config.get("BOOTORCH_QMP_SYSTEMS") or []),
             app.config.get("SUSHY_EMULATOR_LISTEN_IP"), app.config.get("SUSHY_EMULATOR_LISTEN_PORT"))
    app.run(host=app.config.get("SUSHY_EMULATOR_LISTEN_IP"), port=app.config.get("SUSHY_EMULATOR_LISTEN_PORT", 8000),
            ssl_context=ssl_context, threaded=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
