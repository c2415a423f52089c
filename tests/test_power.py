"""Power drivers.

Real where a real peer can run here: the command driver runs real commands, the
WoL driver sends real datagrams (loopback). The Redfish driver's protocol logic
is tested here against an in-process Redfish responder (httpx.MockTransport);
against real implementations (sushy-emulator, OpenIPMI's ipmi_sim with the real
ipmitool, our lab BMC) in tests/test_bmc_real.py. Here ipmitool is replaced by a
recording stub only to read the exact command line and environment it gets (the
password never on the command line).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import httpx
import pytest
import trio

from orchestrator.power import SecretError, Target, resolve_secret
from orchestrator.power.drivers import CommandDriver, IpmiDriver, RedfishDriver, WolDriver

T = Target("node07", "52:54:00:00:00:07", "10.0.0.17", 6)


class FakeBmc:
    """A Redfish responder with sessions and AllowableValues, recording what it was asked."""

    def __init__(self, allowed=("On", "ForceOff", "ForceRestart", "PowerCycle"), sessions=True, state="On"):
        self.allowed, self.sessions = list(allowed), sessions
        self.calls: list[tuple[str, str, dict, str | None]] = []
        self.state = state

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.calls.append((request.method, request.url.path, body, request.headers.get("X-Auth-Token") or request.headers.get("Authorization")))
        path = request.url.path
        if path == "/redfish/v1/SessionService/Sessions":
            if not self.sessions:
                return httpx.Response(404)
            if body != {"UserName": "admin", "Password": "s3cret"}:
                return httpx.Response(401)
            return httpx.Response(201, headers={"X-Auth-Token": "tok123"})
        if request.headers.get("X-Auth-Token") != "tok123" and request.headers.get("Authorization") != httpx.BasicAuth("admin", "s3cret")._auth_header:
            return httpx.Response(401)
        if path == "/redfish/v1/Systems":
            return httpx.Response(200, json={"Members": [{"@odata.id": "/redfish/v1/Systems/1"}]})
        if path == "/redfish/v1/Systems/1" and request.method == "GET":
            return httpx.Response(200, json={"PowerState": self.state, "Actions": {"#ComputerSystem.Reset": {
                "target": "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset", "ResetType@Redfish.AllowableValues": self.allowed}}})
        if path == "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset":
            if body.get("ResetType") not in self.allowed:
                return httpx.Response(400)
            self.state = "Off" if body["ResetType"] == "ForceOff" else "On"
            return httpx.Response(204)
        return httpx.Response(404)


def redfish(bmc: FakeBmc, address="https://{name}-bmc") -> RedfishDriver:
    return RedfishDriver(address=address, username="admin", password="s3cret", transport=httpx.MockTransport(bmc))


async def test_redfish_session_auth_discovery_and_power_cycle():
    bmc = FakeBmc()
    d = redfish(bmc)
    r = await d.cycle(T)
    assert r.ok and "PowerCycle" in r.detail
    assert bmc.calls[0][:2] == ("POST", "/redfish/v1/SessionService/Sessions")
    assert all(c[3] == "tok123" for c in bmc.calls[1:])
    posts = [c for c in bmc.calls if c[1].endswith("ComputerSystem.Reset")]
    assert posts[0][2] == {"ResetType": "PowerCycle"}
    assert await d.status(T) == "on"
    assert (await d.off(T)).ok and await d.status(T) == "off"


async def test_redfish_falls_back_to_force_restart_and_basic_auth():
    bmc = FakeBmc(allowed=("On", "ForceOff", "ForceRestart"), sessions=False)
    d = redfish(bmc, address="https://bmc.example/redfish/v1/Systems/1")
    r = await d.cycle(T)
    assert r.ok and "ForceRestart" in r.detail
    assert any(c[3] and c[3].startswith("Basic ") for c in bmc.calls)


async def test_redfish_unreachable_is_a_result_not_an_exception():
    d = RedfishDriver(address="https://127.0.0.1:1/redfish/v1/Systems/1", username=None, password=None, timeout=2)
    with trio.fail_after(10):
        r = await d.on(T)
    assert not r.ok and "Redfish" in r.detail


def test_redfish_verifies_tls_by_default():
    d = RedfishDriver(address="x", username=None, password=None)
    assert d.verify is True


def stub_ipmitool(tmp_path: Path) -> Path:
    """A recording ipmitool stand-in (mock: no IPMI BMC can run here)."""
    exe = tmp_path / "ipmitool"
    exe.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/argv\nprintf '%s' \"$IPMI_PASSWORD\" > {tmp_path}/pw\n"
                   "case \"$*\" in *status*) echo 'Chassis Power is on';; esac\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


async def test_ipmi_password_by_environment_never_argv(tmp_path):
    d = IpmiDriver(address="{name}-ipmi", username="admin", password="hunter2", ipmitool=str(stub_ipmitool(tmp_path)))
    r = await d.cycle(T)
    argv = (tmp_path / "argv").read_text().split()
    assert r.ok and argv == ["-I", "lanplus", "-C", "17", "-L", "OPERATOR", "-N", "2", "-R", "3", "-H", "node07-ipmi",
                             "-U", "admin", "-E", "-v", "chassis", "power", "cycle"]
    assert "hunter2" not in argv and (tmp_path / "pw").read_text() == "hunter2"
    assert await d.status(T) == "on"


async def test_ipmi_missing_tool_is_a_failed_result():
    d = IpmiDriver(address="x", username=None, password=None, ipmitool="/nonexistent/ipmitool")
    r = await d.on(T)
    assert not r.ok and "not found" in r.detail


async def test_command_driver_fills_words_without_a_shell(tmp_path):
    out = tmp_path / "log"
    d = CommandDriver(command=f"/bin/sh -c 'printf \"%s %s\\n\" \"$0\" \"$1\" >> {out}' {{action}} {{name}}")
    assert (await d.cycle(T)).ok and (await d.on(Target("x;reboot", "m", "i"))).ok
    assert out.read_text().splitlines() == ["cycle node07", "on x;reboot"]  # the ';' stayed data
    bad = CommandDriver(command="/bin/false {action}")
    r = await bad.off(T)
    assert not r.ok


async def test_wol_udp_sends_repeat_magic_packets():
    from orchestrator.power.wol import parse_magic

    from tests.conftest import require_root

    require_root()  # port 9, the discard port magic packets go to
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    rx.bind(("127.0.0.1", 9))
    rx.settimeout(5)
    d = WolDriver(interface=None, method="udp", repeat=3, interval=0.01, broadcast="127.0.0.1", port=9)
    r = await d.on(T)
    got = [parse_magic(rx.recv(200))[0] for _ in range(3)]
    rx.close()
    assert r.ok and got == [T.mac] * 3 and d.sent == 3
    assert not (await d.cycle(T)).ok
    unpinned = WolDriver(interface=None, method="udp", broadcast="255.255.255.255")
    r = await unpinned.on(T)
    assert not r.ok and "refusing" in r.detail and unpinned.sent == 0


def test_resolve_secret(tmp_path, monkeypatch):
    from orchestrator.plan.model import Secret

    monkeypatch.setenv("BT_PW", "abc")
    assert resolve_secret(Secret(env="BT_PW")) == "abc"
    (tmp_path / "pw").write_text("xyz\n")
    (tmp_path / "pw").chmod(0o600)  # a credential file must be private (tests/test_power_security.py)
    assert resolve_secret(Secret(file=Path("pw")), tmp_path) == "xyz"
    monkeypatch.delenv("BT_PW")
    with pytest.raises(SecretError, match="BT_PW is not set"):
        resolve_secret(Secret(env="BT_PW"))
    with pytest.raises(SecretError, match="cannot read"):
        resolve_secret(Secret(file=tmp_path / "missing"))
    assert resolve_secret(None) is None
    assert os.environ.get("BT_PW") is None
