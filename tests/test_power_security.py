"""Power drivers facing hostile peers and careless files.

* A BMC's answer is untrusted: the URLs in it (``@odata.id``, an action's
  ``target``, a redirect's ``Location``) may only lead back to the origin the
  plan gave (scheme, host, port). The Redfish driver is tested against an
  in-process responder (httpx.MockTransport) that plays both the node's BMC and
  a foreign host recording every request it gets: the foreign host must get none.
* Credentials read from the environment stay in bootorch: the children it runs
  (the ``command`` driver's tool, ipmitool) are real processes here that dump
  the environment they got.
* Credential files must be private (mode 0600 or stricter), checked on the
  opened descriptor.
* Text from a BMC or a tool reaches ``PowerResult.detail`` printable and bounded.
"""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from orchestrator.plan import load_plan
from orchestrator.plan.model import Secret
from orchestrator.power import PowerResult, SecretError, Target, resolve_secret
from orchestrator.power.drivers import CommandDriver, IpmiDriver, RedfishDriver, plan_drivers
from tests.test_power import FakeBmc

T = Target("node07", "52:54:00:00:00:07", "10.0.0.17", 6)
BMC = "https://node07-bmc"
SYSTEM = BMC + "/redfish/v1/Systems/1"
RESET = "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset"


# --------------------------------------------------------------------------- redfish: one origin


class TwoHosts:
    """The node's BMC (a FakeBmc, some answers replaced) and every other origin, which records what it got.

    The other origin answers like a willing BMC, so a driver that followed a
    reference there would succeed: only the recorded requests tell.
    """

    def __init__(self, answers: dict[tuple[str, str], Any] | None = None) -> None:
        self.bmc = FakeBmc()
        self.answers = answers or {}
        self.foreign: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        u = request.url
        if (u.scheme, u.host, u.port) != ("https", "node07-bmc", None):
            self.foreign.append(request)
            if request.method == "POST" and u.path.endswith("/Sessions"):
                return httpx.Response(201, headers={"X-Auth-Token": "tok-foreign"})
            if request.method == "POST":
                return httpx.Response(204)
            if u.path.endswith("/Systems"):
                return httpx.Response(200, json={"Members": [{"@odata.id": "/redfish/v1/Systems/1"}]})
            return httpx.Response(200, json={"PowerState": "On"})
        answer = self.answers.get((request.method, u.path))
        if callable(answer):  # a fresh streamed answer per request
            answer = answer()
        if answer is not None:
            self.bmc(request)  # recorded like any other request
            return answer
        return self.bmc(request)

    def credentials_sent_abroad(self) -> list[str]:
        return [str(r.url) for r in self.foreign
                if r.headers.get("X-Auth-Token") or r.headers.get("Authorization") or b"s3cret" in r.content]


def driver(peer: TwoHosts, address: str = "https://{name}-bmc") -> RedfishDriver:
    return RedfishDriver(address=address, username="admin", password="s3cret", transport=httpx.MockTransport(peer))


def systems(ref: object) -> dict[tuple[str, str], httpx.Response]:
    return {("GET", "/redfish/v1/Systems"): httpx.Response(200, json={"Members": [{"@odata.id": ref}]})}


@pytest.mark.parametrize("ref", [
    "http://evil.example/redfish/v1/Systems/1",          # another host
    "https://evil.example/redfish/v1/Systems/1",
    "//evil.example/redfish/v1/Systems/1",               # scheme-relative: another host too
    "http://node07-bmc/redfish/v1/Systems/1",            # same host, plain HTTP: a downgrade
    "https://node07-bmc:8443/redfish/v1/Systems/1",      # same host, another port
])
async def test_redfish_refuses_a_system_on_another_origin_and_sends_it_nothing(ref):
    peer = TwoHosts(systems(ref))
    d = driver(peer)
    with trio.fail_after(10):
        r = await d.cycle(T)
        state = await d.status(T)
    assert not r.ok
    assert "BMC at https://node07-bmc named a system on another host" in r.detail and "refused" in r.detail
    assert state is None
    assert peer.foreign == [] and peer.credentials_sent_abroad() == []
    assert not any(c[1].endswith("ComputerSystem.Reset") for c in peer.bmc.calls)  # nothing was reset either


@pytest.mark.parametrize("ref", ["https://node07-bmc/redfish/v1/Systems/1", "https://NODE07-BMC:443/redfish/v1/Systems/1",
                                 "/redfish/v1/Systems/1"])
async def test_redfish_follows_a_system_on_the_same_origin(ref):
    peer = TwoHosts(systems(ref))
    r = await driver(peer).cycle(T)
    assert r.ok and "PowerCycle" in r.detail and peer.foreign == []


async def test_redfish_refuses_a_reset_target_on_another_host():
    peer = TwoHosts({("GET", "/redfish/v1/Systems/1"): httpx.Response(200, json={"Actions": {"#ComputerSystem.Reset": {
        "target": "http://evil.example/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
        "ResetType@Redfish.AllowableValues": ["On", "ForceOff"]}}})})
    r = await driver(peer, SYSTEM).on(T)
    assert not r.ok and "BMC at https://node07-bmc named a reset action on another host http://evil.example" in r.detail
    assert peer.foreign == []


async def test_redfish_posts_to_the_reset_target_the_bmc_advertises():
    # iLO and others advertise the action with a trailing slash; the advertised target is the one to use.
    target = RESET + "/"
    peer = TwoHosts({("GET", "/redfish/v1/Systems/1"): httpx.Response(200, json={"Actions": {"#ComputerSystem.Reset": {
        "target": target, "ResetType@Redfish.AllowableValues": ["On"]}}}),
        ("POST", target): httpx.Response(204)})
    r = await driver(peer, SYSTEM).on(T)
    assert r.ok and [c[1] for c in peer.bmc.calls if c[0] == "POST" and "Actions" in c[1]] == [target]


@pytest.mark.parametrize("where", [("POST", RESET), ("GET", "/redfish/v1/Systems")])
async def test_redfish_does_not_follow_a_redirect_and_names_its_location(where):
    peer = TwoHosts({where: httpx.Response(307, headers={"Location": "http://evil.example/steal"})})
    address = SYSTEM if where[0] == "POST" else "https://{name}-bmc"
    r = await driver(peer, address).cycle(T)
    assert not r.ok
    assert "HTTP 307" in r.detail and "http://evil.example/steal" in r.detail and "refused" in r.detail
    assert peer.foreign == []


@pytest.mark.parametrize("answers", [
    {("GET", "/redfish/v1/Systems"): httpx.Response(200, json=[])},
    {("GET", "/redfish/v1/Systems"): httpx.Response(200, json={"Members": "x"})},
    {("GET", "/redfish/v1/Systems"): httpx.Response(200, json={"Members": ["x"]})},
    {("GET", "/redfish/v1/Systems"): httpx.Response(200, json={"Members": [{"@odata.id": 5}]})},
    {("GET", "/redfish/v1/Systems"): httpx.Response(200, content=b"\xff\xfe not json")},
    {("GET", "/redfish/v1/Systems"): httpx.Response(200, json={"Members": [{"@odata.id": "http://[::1"}]})},
    {("GET", "/redfish/v1/Systems/1"): httpx.Response(200, json=["On"])},
    {("GET", "/redfish/v1/Systems/1"): httpx.Response(200, json={"PowerState": 1, "Actions": []})},
    {("GET", "/redfish/v1/Systems/1"): httpx.Response(200, json={"Actions": {"#ComputerSystem.Reset": {
        "target": 7, "ResetType@Redfish.AllowableValues": 3}}})},
], ids=["list", "members-str", "member-str", "odata-int", "not-json", "bad-url", "system-list", "actions-list", "odd-action"])
async def test_redfish_hostile_answers_are_results_not_exceptions(answers):
    d = driver(TwoHosts(answers))
    r = await d.cycle(T)
    assert isinstance(r, PowerResult) and r.detail
    assert await d.status(T) in (None, "on", "off")


# --------------------------------------------------------------------------- untrusted text in results


def test_power_result_detail_is_printable_and_bounded():
    r = PowerResult(False, "\x1b[2J\x1b]52;c;cm0gLXJmIC8=\x07" + "x" * 5000)
    assert r.detail.isprintable() and "\\x1b[2J" in r.detail and len(r.detail) <= 500
    assert PowerResult(True, "ok").detail == "ok"


async def test_redfish_error_body_reaches_the_detail_escaped():
    peer = TwoHosts({("POST", RESET): httpx.Response(500, content=b"\x1b]8;;http://x\x07click\x1b]8;;\x07\xff")})
    peer.bmc.state = "Off"
    r = await driver(peer, SYSTEM).on(T)
    assert not r.ok and "HTTP 500" in r.detail
    assert "\x1b" not in r.detail and "\\x1b]8;;http://x\\x07click" in r.detail and r.detail.isprintable()


async def test_ipmitool_output_reaches_the_detail_escaped(tmp_path):
    exe = tmp_path / "ipmitool"
    filler = "x" * 3000  # a long output: the tail, with the escapes, is what matters
    exe.write_text(f"#!/bin/sh\necho {filler}\nprintf 'Error: \\033[2J\\033]52;c;eA==\\007 no session\\n'\nexit 1\n")
    exe.chmod(0o755)
    r = await IpmiDriver(address="{name}-ipmi", username="admin", password="pw", ipmitool=str(exe)).off(T)
    assert not r.ok and r.detail.startswith("ipmitool chassis power off: ")
    assert "\x1b" not in r.detail and r.detail.isprintable() and len(r.detail) <= 500
    assert "Error: \\x1b[2J\\x1b]52;c;eA==\\x07 no session" in r.detail


# --------------------------------------------------------------------------- secrets stay out of children


SECRETS = {"BT_T_BMC_PW": "bmc-pw-1", "BT_T_TOKEN": "control-token-2", "BT_T_SECUREON": "01:02:03:04:05:06"}


def secret_plan(tmp_path: Path, bmc: str):
    p = tmp_path / "plan.yaml"
    p.write_text(textwrap.dedent(f"""\
        version: 1
        network: {{subnet: 10.9.0.0/24, server: 10.9.0.1}}
        profiles: {{p: {{kernel: vmlinuz, initrd: rootfs.gz}}}}
        nodes:
          - {{name: node07, mac: '52:54:00:00:00:07', ip: 10.9.0.17}}
        power:
          wol: {{secureon: {{env: BT_T_SECUREON}}}}
          bmc: {bmc}
        control: {{token: {{env: BT_T_TOKEN}}}}
        """))
    return load_plan(p)


@pytest.fixture
def secret_env(monkeypatch):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BT_T_HARMLESS", "visible")


def dumped_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_secret_env_names_are_every_env_secret_of_the_plan(tmp_path, secret_env):
    from orchestrator.power import secret_env_names

    plan = secret_plan(tmp_path, "{driver: ipmi, address: '{name}-bmc', password: {env: BT_T_BMC_PW}}")
    assert secret_env_names(plan.model) == set(SECRETS)


async def test_command_driver_child_gets_no_plan_secret(tmp_path, secret_env):
    out = tmp_path / "env"
    plan = secret_plan(tmp_path, f"{{driver: command, command: \"/bin/sh -c 'env > {out}' {{action}}\", "
                               "password: {env: BT_T_BMC_PW}}")
    _, bmc = plan_drivers(plan)
    assert isinstance(bmc, CommandDriver)
    assert (await bmc.cycle(T)).ok
    env = dumped_env(out)
    assert not set(SECRETS) & set(env), "a plan secret reached the command's environment"
    assert env["BT_T_HARMLESS"] == "visible" and env["PATH"] == os.environ["PATH"]
    # The BMC password is the tool's own credential: it gets it, under one documented name, and no other.
    assert env["BOOTORCH_BMC_PASSWORD"] == SECRETS["BT_T_BMC_PW"]
    assert [k for k, v in env.items() if v in SECRETS.values()] == ["BOOTORCH_BMC_PASSWORD"]


async def test_ipmitool_child_gets_only_its_own_password(tmp_path, secret_env, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "ipmitool"  # a stand-in (no IPMI BMC can run here) that dumps the environment it got
    exe.write_text(f"#!/bin/sh\nenv > {tmp_path}/env\necho 'Chassis Power Control: Cycle'\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    plan = secret_plan(tmp_path, "{driver: ipmi, address: '{name}-bmc', username: admin, password: {env: BT_T_BMC_PW}}")
    _, bmc = plan_drivers(plan)
    assert isinstance(bmc, IpmiDriver)
    assert (await bmc.cycle(T)).ok
    env = dumped_env(tmp_path / "env")
    assert not set(SECRETS) & set(env), "a plan secret reached ipmitool's environment"
    assert env["IPMI_PASSWORD"] == SECRETS["BT_T_BMC_PW"]
    assert [k for k, v in env.items() if v in SECRETS.values()] == ["IPMI_PASSWORD"]
    assert env["BT_T_HARMLESS"] == "visible"


async def test_command_driver_without_a_plan_keeps_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BT_T_HARMLESS", "visible")
    out = tmp_path / "env"
    assert (await CommandDriver(command=f"/bin/sh -c 'env > {out}'").on(T)).ok
    env = dumped_env(out)
    assert env["BT_T_HARMLESS"] == "visible" and "BOOTORCH_BMC_PASSWORD" not in env


# --------------------------------------------------------------------------- credential files are private


def secret_file(tmp_path: Path, mode: int, text: str = "hunter2\n") -> Path:
    p = tmp_path / "bmc.password"
    p.write_text(text)
    p.chmod(mode)
    return p


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602, 0o606, 0o610, 0o601])
def test_secret_file_open_to_group_or_others_is_refused(tmp_path, mode):
    p = secret_file(tmp_path, mode)
    with pytest.raises(SecretError) as ei:
        resolve_secret(Secret(file=p))
    msg = str(ei.value)
    assert f"chmod 600 {p}" in msg and f"{mode:04o}" in msg and "hunter2" not in msg


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_private_secret_file_is_read(tmp_path, mode):
    p = secret_file(tmp_path, mode)
    assert resolve_secret(Secret(file=Path(p.name)), tmp_path) == "hunter2"


def test_secret_file_mode_is_that_of_the_file_a_symlink_names(tmp_path):
    p = secret_file(tmp_path, 0o600)
    link = tmp_path / "link"
    link.symlink_to(p)  # a symlink's own mode (0777 on Linux) means nothing
    assert resolve_secret(Secret(file=link)) == "hunter2"
    p.chmod(0o644)
    with pytest.raises(SecretError, match=f"chmod 600 {link}"):
        resolve_secret(Secret(file=link))


async def test_secret_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    try:
        with trio.fail_after(5):  # opening a FIFO for reading would wait for a writer forever
            with pytest.raises(SecretError, match="not a regular file"):
                await trio.to_thread.run_sync(resolve_secret, Secret(file=fifo), abandon_on_cancel=True)
    finally:
        try:  # a reader still blocked in open() (the test failed) is released by a writer
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert stat.S_ISFIFO(fifo.stat().st_mode)


async def test_redfish_answer_that_never_ends_is_a_failed_result(autojump_clock):
    async def trickle():
        while True:  # a byte every few seconds: each read is on time, the answer never ends
            await trio.sleep(3)
            yield b" "

    peer = TwoHosts({("GET", "/redfish/v1/Systems"): lambda: httpx.Response(200, content=trickle())})
    d = driver(peer)
    with trio.fail_after(3600):
        r = await d.on(T)
        assert await d.status(T) is None
    assert not r.ok and f"no complete answer within {d.deadline:g}s" in r.detail
    assert trio.current_time() < 2 * 2 * d.deadline  # two actions, each stopped at its deadline


async def test_redfish_driver_discovers_and_resets_through_the_lab_bmc_over_http(tmp_path):
    """The project's own Redfish peer (orchestrator.lab.bmc) over loopback: discovery from a bare host, the
    advertised reset target, basic auth (it has no sessions) -- all on the one origin the plan gave."""
    from orchestrator.lab import bmc as bmc_mod
    from tests.test_lab import FakeQemu

    vm = FakeQemu(tmp_path / "n7.qmp")
    server = bmc_mod.LabBmc("127.0.0.1", 0, {"node07": str(tmp_path / "n7.qmp")}, username="admin", password="s3cret")
    server.start()
    try:
        d = RedfishDriver(address=f"http://127.0.0.1:{server.address[1]}", username="admin", password="s3cret", timeout=5)
        with trio.fail_after(30):
            assert await d.status(T) == "off"
            r = await d.on(T)
            assert r.ok and "/redfish/v1/Systems/node07" in r.detail and vm.status == "running"
            assert await d.status(T) == "on"
    finally:
        server.stop()
        vm.close()


# --------------------------------------------------------------------------- real BMC behaviour (redirects, errors, delays)


async def test_redfish_follows_a_same_origin_307_with_method_and_body():
    # sushy-emulator: /Systems/<name> answers 307 to /Systems/<uuid>, for GET and for the reset POST alike.
    moved = {("GET", "/redfish/v1/Systems/node07"): httpx.Response(307, headers={"Location": "/redfish/v1/Systems/1"}),
             ("POST", "/redfish/v1/Systems/node07/Actions/ComputerSystem.Reset"):
                 httpx.Response(307, headers={"Location": RESET})}
    peer = TwoHosts(moved)
    r = await driver(peer, BMC + "/redfish/v1/Systems/{name}").cycle(T)
    assert r.ok and "PowerCycle on /redfish/v1/Systems/1" in r.detail, r.detail
    posts = [c for c in peer.bmc.calls if c[0] == "POST" and c[1] == RESET]
    assert posts and posts[-1][2] == {"ResetType": "PowerCycle"} and peer.foreign == []


@pytest.mark.parametrize("answers, why", [
    ({("GET", "/redfish/v1/Systems/1"): httpx.Response(302, headers={"Location": "/redfish/v1/Systems/1"})},
     "more than 5 redirects"),
    ({("POST", RESET): httpx.Response(302, headers={"Location": RESET + "2"})}, "only 307/308 redirect a POST"),
    ({("GET", "/redfish/v1/Systems/1"): httpx.Response(307)}, "(no Location)"),
], ids=["loop", "post-302", "no-location"])
async def test_redfish_redirects_that_are_not_followed(answers, why):
    peer = TwoHosts(answers)
    r = await driver(peer, SYSTEM).cycle(T)
    assert not r.ok and why in r.detail and "refused" in r.detail, r.detail
    assert peer.foreign == []


async def test_redfish_answer_larger_than_the_cap_is_refused():
    from orchestrator.power.drivers import MAX_BODY

    async def big():
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    peer = TwoHosts({("GET", "/redfish/v1/Systems/1"): lambda: httpx.Response(200, content=big())})
    r = await driver(peer, SYSTEM).on(T)
    assert not r.ok and f"more than {MAX_BODY} bytes" in r.detail and "refused" in r.detail, r.detail


@pytest.mark.parametrize("status, words", [
    (401, ["BMC at https://node07-bmc rejected the credentials of user 'admin'", "power.bmc.password"]),
    (403, ["refused GET /redfish/v1/Systems/1 to user 'admin' (HTTP 403", "ConfigureComponents"]),
])
async def test_redfish_auth_failures_say_what_to_fix(status, words):
    peer = TwoHosts({("GET", "/redfish/v1/Systems/1"): httpx.Response(status, json={"error": {"message": "no"}})})
    r = await driver(peer, SYSTEM).on(T)
    assert not r.ok and all(w in r.detail for w in words), r.detail
    assert "s3cret" not in r.detail


async def test_redfish_unknown_system_lists_the_systems_the_bmc_has():
    peer = TwoHosts({("GET", "/redfish/v1/Systems/node99"): httpx.Response(404, json={"error": {"message": "System node99 was not found"}})})
    r = await driver(peer, BMC + "/redfish/v1/Systems/node99").on(T)
    assert not r.ok and "BMC at https://node07-bmc has no system /redfish/v1/Systems/node99 (HTTP 404: System node99 was " \
                       "not found); it has 1: 1: check power.bmc.address" in r.detail, r.detail


async def test_redfish_on_waits_for_the_state_and_fails_when_it_never_comes(autojump_clock):
    peer = TwoHosts()
    peer.bmc.state = "Off"
    # The BMC accepts the reset (204) and goes on reporting Off.
    stuck = TwoHosts({("GET", "/redfish/v1/Systems/1"): lambda: httpx.Response(200, json={"PowerState": "Off"})})
    d = RedfishDriver(address=SYSTEM, username="admin", password="s3cret", transport=httpx.MockTransport(stuck), settle=30)
    r = await d.on(T)
    assert not r.ok and "still reports off after 30s (power.bmc.settle)" in r.detail, r.detail
    ok = await driver(peer, SYSTEM).on(T)
    assert ok.ok and "On after 0.0s" in ok.detail


async def test_redfish_boot_override_rereads_the_etag_on_412():
    peer = TwoHosts()
    peer.bmc.state = "Off"
    etags = iter(['W/"1"', 'W/"2"'])
    patches: list[str | None] = []

    def system(request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH":
            patches.append(request.headers.get("If-Match"))
            assert json.loads(request.content) == {"Boot": {"BootSourceOverrideTarget": "Pxe",
                                                            "BootSourceOverrideEnabled": "Once"}}
            return httpx.Response(412 if len(patches) == 1 else 204)
        return httpx.Response(200, headers={"ETag": next(etags, 'W/"2"')}, json={"PowerState": peer.bmc.state, "Boot": {
            "BootSourceOverrideTarget": "Hdd", "BootSourceOverrideTarget@Redfish.AllowableValues": ["Pxe", "Hdd"]}})

    class Peer(TwoHosts):
        def __call__(self, request):
            if request.url.path == "/redfish/v1/Systems/1" and request.method in ("GET", "PATCH"):
                self.bmc.calls.append((request.method, request.url.path, {}, None))
                return system(request)
            return super().__call__(request)

    p = Peer()
    p.bmc = peer.bmc
    d = RedfishDriver(address=SYSTEM, username="admin", password="s3cret", transport=httpx.MockTransport(p),
                      boot_override="pxe")
    r = await d.on(T)
    assert r.ok and "boot override Pxe (once)" in r.detail, r.detail
    assert patches == ['W/"1"', 'W/"2"']


async def test_redfish_boot_override_not_offered_fails_before_power_on():
    peer = TwoHosts({("GET", "/redfish/v1/Systems/1"): httpx.Response(200, json={"PowerState": "Off", "Boot": {
        "BootSourceOverrideTarget@Redfish.AllowableValues": ["Hdd", "Cd"]}})})
    d = RedfishDriver(address=SYSTEM, username="admin", password="s3cret", transport=httpx.MockTransport(peer),
                      boot_override="pxe")
    r = await d.on(T)
    assert not r.ok and "offers no boot override to Pxe" in r.detail and "boot_override: none" in r.detail
    assert not any(c[1].endswith("ComputerSystem.Reset") for c in peer.bmc.calls)


# --------------------------------------------------------------------------- ipmi: addresses, password length


def test_ipmi_address_with_port_and_ipv6():
    from orchestrator.power.drivers import split_host_port

    assert split_host_port("10.0.0.5") == ("10.0.0.5", None)
    assert split_host_port("10.0.0.5:6230", 623) == ("10.0.0.5", 6230)
    assert split_host_port("[fd00::5]:6230") == ("fd00::5", 6230) and split_host_port("fd00::5", 623) == ("fd00::5", 623)
    with pytest.raises(ValueError, match="1-65535"):
        split_host_port("bmc:99999")
    d = IpmiDriver(address="{name}-ipmi:6231", username="op", password="pw", cipher_suite=3)
    argv = d._argv(T, "chassis", "power", "status")
    assert argv[argv.index("-H") + 1] == "node07-ipmi" and argv[argv.index("-p") + 1] == "6231"
    assert argv[argv.index("-C") + 1] == "3" and argv[argv.index("-L") + 1] == "OPERATOR" and "pw" not in argv


async def test_ipmi_password_longer_than_ipmi_allows_is_refused_before_ipmitool(tmp_path):
    exe = tmp_path / "ipmitool"
    exe.write_text(f"#!/bin/sh\ntouch {tmp_path}/ran\n")
    exe.chmod(0o755)
    r = await IpmiDriver(address="bmc", username="admin", password="x" * 21, ipmitool=str(exe)).on(T)
    assert not r.ok and "21 bytes" in r.detail and "at most 20" in r.detail and not (tmp_path / "ran").exists()
