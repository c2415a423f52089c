"""The application root: rollout, serve and an on-call command build the same orchestrator for a plan."""

from __future__ import annotations

import textwrap

import pytest

from orchestrator.app import Mode, Orchestrator
from orchestrator.plan import load_plan
from orchestrator.power import SecretError, Unavailable


def _plan(tmp_path, *, bmc: str = "{driver: command, command: 'true'}"):
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    text = textwrap.dedent(f"""\
    version: 1
    state_dir: {tmp_path / 'state'}
    network: {{subnet: 127.77.0.0/24, server: 127.77.0.1, interface: ""}}
    profiles: {{p: {{kernel: vmlinuz, initrd: rootfs.gz, ip: dhcp}}}}
    nodes:
      - {{name: "n[1-3]", mac: "52:54:00:00:00:01", ip: 127.77.0.11}}
    power:
      wol: {{method: udp, broadcast: 127.255.255.255, udp_port: 9}}
      bmc: {bmc}
    rollout:
      admission: {{max_downloading: 5, power_on_rate: 3}}
      timeouts: {{waking: 20, pxe_dhcp: 30}}
      retries: {{wake: 1, power_cycle: 2}}
      failure_budget: 1
    readiness: {{ssh: {{port: 1, key: {tmp_path / 'id'}}}}}
    control: {{listen: "127.0.0.1:0", token: {{file: {token}}}}}
    metrics: {{listen: ""}}
    """)
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return load_plan(p)


def _shape(o: Orchestrator) -> dict:
    """What a plan decides about an orchestrator, apart from its job."""
    s, c = o.scheduler, o.control

    def driver(d):
        return None if d is None else (type(d).__name__, {k: v for k, v in vars(d).items() if not k.startswith("_")})

    return {
        "wake": driver(o.wake), "bmc": driver(o.bmc),
        "readiness": (o.readiness.user, o.readiness.port, o.readiness.key_file, o.readiness.policy, o.readiness.known.path,
                      [(k.name, k.command) for k in o.readiness.checks]),
        "scheduler": (s.max_window, s.window, s.budget, dict(s.timeouts.model_dump()), s.retries.model_dump(),
                      s.adm.model_dump(), s.load is not None),
        "control": (c.token, c.max_connections, c.max_per_client, c.request_timeout),
        "timeouts": dict(o.tracker.timeouts), "nodes": sorted(o.tracker.nodes),
    }


@pytest.mark.parametrize("other", [Mode.SERVE, Mode.ONCALL])
def test_serve_and_oncall_build_what_rollout_builds(tmp_path, other):
    plan = _plan(tmp_path)
    rollout = Orchestrator.assemble(plan, Mode.ROLLOUT)
    rollout.store.close()
    same = Orchestrator.assemble(plan, other)
    same.store.close()
    assert _shape(same) == _shape(rollout)
    assert rollout.bmc is not None and rollout.control.token == "t0ken"
    # Only the job differs.
    assert (rollout.scheduler.rollout, rollout.scheduler.standing) == (True, False)
    assert (same.scheduler.rollout, same.scheduler.standing) == (False, other is Mode.SERVE)
    assert same.control.mode == other.value


def test_a_missing_credential_stops_a_rollout_but_not_serve(tmp_path, monkeypatch):
    monkeypatch.delenv("BMC_PW", raising=False)
    plan = _plan(tmp_path, bmc="{driver: ipmi, address: '{name}-bmc', username: admin, password: {env: BMC_PW}}")
    with pytest.raises(SecretError, match="BMC_PW"):
        Orchestrator.assemble(plan, Mode.ROLLOUT)
    lines: list[str] = []
    serve = Orchestrator.assemble(plan, Mode.SERVE, log=lines.append)
    serve.store.close()
    assert isinstance(serve.bmc, Unavailable) and "BMC_PW" in lines[0]


def test_readiness_enabled_false_checks_no_node(tmp_path):
    """A satellite's plan (``readiness.enabled: false``): its scheduler probes no SSH and has no SSH power driver."""
    plan = _plan(tmp_path)
    assert Orchestrator.assemble(plan, Mode.SERVE).scheduler.readiness is not None
    text = plan.path.read_text().replace("readiness: {ssh:", "readiness: {enabled: false, ssh:")
    plan.path.write_text(text)
    off = Orchestrator.assemble(load_plan(plan.path), Mode.SERVE)
    assert off.scheduler.readiness is None and off.scheduler.ssh_power is None
