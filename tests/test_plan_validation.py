"""Every validation error: right file, right line, a message that says what to fix."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.plan import PlanError, load_plan

BASE = """\
version: 1
network:
  subnet: 10.9.0.0/24
  server: 10.9.0.1
profiles:
  p:
    kernel: vmlinuz
    initrd: rootfs.gz
nodes:
  - name: n[1-3]
    mac: 52:54:00:00:00:01
    ip: 10.9.0.11
"""


def write(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems(path: Path) -> list[tuple[int | None, str, str]]:
    with pytest.raises(PlanError) as ei:
        load_plan(path)
    return [(p.line, p.message, p.file) for p in ei.value.errors]


def one(path: Path) -> tuple[int | None, str]:
    errs = problems(path)
    assert len(errs) == 1, errs
    return errs[0][0], errs[0][1]


def test_base_plan_is_valid_and_expands(tmp_path):
    plan = load_plan(write(tmp_path, BASE))
    assert [(n.name, n.mac, str(n.ip)) for n in plan.nodes] == [
        ("n1", "52:54:00:00:00:01", "10.9.0.11"),
        ("n2", "52:54:00:00:00:02", "10.9.0.12"),
        ("n3", "52:54:00:00:00:03", "10.9.0.13"),
    ]
    assert plan.nodes[0].origin[1] == 10


def test_yaml_syntax_error_has_line(tmp_path):
    line, msg = one(write(tmp_path, BASE + "extra: value: other\n"))
    assert line == 13 and "YAML syntax error: mapping values are not allowed here" in msg


def test_tab_indentation_is_a_syntax_error(tmp_path):
    line, msg = one(write(tmp_path, BASE.replace("  server:", "\tserver:")))
    assert line == 4 and "YAML" in msg


def test_unknown_key_points_at_key_and_suggests(tmp_path):
    line, msg = one(write(tmp_path, BASE.replace("    mac:", "    macc:")))
    assert line == 11
    assert "unknown key 'macc'" in msg and "did you mean 'mac'" in msg


def test_unknown_top_level_section(tmp_path):
    line, msg = one(write(tmp_path, BASE + "rollot: {}\n"))
    assert line == 13 and "did you mean 'rollout'" in msg


def test_duplicate_yaml_key_is_rejected(tmp_path):
    line, msg = one(write(tmp_path, BASE + "    mac: 52:54:00:00:00:09\n"))
    assert line == 13 and "duplicate key 'mac'" in msg and "first on line 11" in msg


def test_unquoted_mac_is_not_read_as_base60(tmp_path):
    # YAML 1.1 reads 52:54:00:00:00:01 as an integer; our loader must not.
    plan = load_plan(write(tmp_path, BASE))
    assert plan.nodes[0].mac == "52:54:00:00:00:01"


@pytest.mark.parametrize("mac", ["52:54:00:00:00", "zz:54:00:00:00:01", "5254.0000.0001", "52:54:00-00:00:01"])
def test_bad_mac(tmp_path, mac):
    line, msg = one(write(tmp_path, BASE.replace("52:54:00:00:00:01", f"'{mac}'")))
    assert line == 11 and "is not a MAC address" in msg


def test_bad_ip(tmp_path):
    line, msg = one(write(tmp_path, BASE.replace("ip: 10.9.0.11", "ip: 10.9.0.300")))
    assert line == 12 and "nodes.0.ip" in msg


def test_subnet_with_host_bits_suggests_network(tmp_path):
    line, msg = one(write(tmp_path, BASE.replace("10.9.0.0/24", "10.9.0.5/24")))
    assert line == 3 and "did you mean 10.9.0.0/24" in msg


def test_ip_outside_subnet_reported_once_per_entry(tmp_path):
    line, msg = one(write(tmp_path, BASE.replace("ip: 10.9.0.11", "ip: 10.10.0.11")))
    assert line == 10 and "outside subnet 10.9.0.0/24" in msg
    assert "and 2 more nodes of this entry" in msg


def test_range_running_past_subnet(tmp_path):
    errs = problems(write(tmp_path, BASE.replace("ip: 10.9.0.11", "ip: 10.9.0.254")))
    assert [e[0] for e in errs] == [10, 10]
    assert "broadcast address" in errs[0][1] and "outside subnet" in errs[1][1]


def test_duplicate_mac_names_both_lines(tmp_path):
    text = BASE + "  - name: other\n    mac: 52:54:00:00:00:02\n    ip: 10.9.0.50\n"
    line, msg = one(write(tmp_path, text))
    assert line == 13
    assert "duplicate MAC 52:54:00:00:00:02" in msg and "n2" in msg and ":10)" in msg


def test_duplicate_ip(tmp_path):
    text = BASE + "  - name: other\n    mac: 52:54:00:00:00:99\n    ip: 10.9.0.13\n"
    line, msg = one(write(tmp_path, text))
    assert line == 13 and "duplicate IP 10.9.0.13" in msg


def test_duplicate_name(tmp_path):
    text = BASE + "  - name: n2\n    mac: 52:54:00:00:00:99\n    ip: 10.9.0.99\n"
    line, msg = one(write(tmp_path, text))
    assert line == 13 and "duplicate name n2" in msg


def test_missing_profile_suggests(tmp_path):
    text = BASE + "    profile: pp\n"
    line, msg = one(write(tmp_path, text))
    assert line == 13 and "profile 'pp'" in msg and "did you mean 'p'" in msg


def test_profile_needed_when_several(tmp_path):
    text = BASE.replace("nodes:", "  q:\n    kernel: k2\nnodes:")
    line, msg = one(write(tmp_path, text))
    assert line == 12 and "say which profile" in msg


def test_pool_overlapping_reservations(tmp_path):
    text = BASE + "dhcp:\n  pool: {start: 10.9.0.2, end: 10.9.0.254}\n"
    line, msg = one(write(tmp_path, text))
    assert line == 14
    assert "overlaps 3 reserved node address(es)" in msg and "move the pool" in msg


def test_pool_outside_subnet_and_reversed(tmp_path):
    errs = problems(write(tmp_path, BASE + "dhcp:\n  pool: {start: 10.9.0.200, end: 10.9.0.100}\n"))
    assert errs[0][0] == 14 and "after its end" in errs[0][1]


def test_pool_containing_server(tmp_path):
    line, msg = one(write(tmp_path, BASE + "dhcp:\n  pool: {start: 10.9.0.1, end: 10.9.0.5}\n"))
    assert "boot server address 10.9.0.1" in msg


def test_missing_files_in_existing_boot_root(tmp_path):
    root = tmp_path / "tftpboot"
    root.mkdir()
    (root / "pxelinux.0").write_bytes(b"x")
    (root / "vmlinuz").write_bytes(b"k")
    errs = problems(write(tmp_path, BASE))
    assert len(errs) == 1
    line, msg, _ = errs[0]
    assert line == 8 and "initrd file 'rootfs.gz' is not in the boot root" in msg
    (root / "rootfs.gz").write_bytes(b"i")
    plan = load_plan(tmp_path / "plan.yaml")
    assert plan.warnings == []


def test_absent_boot_root_is_only_a_warning(tmp_path):
    plan = load_plan(write(tmp_path, BASE))
    assert len(plan.warnings) == 1 and "does not exist here" in plan.warnings[0].message


def test_inline_password_rejected(tmp_path):
    text = BASE + "power:\n  bmc:\n    driver: ipmi\n    address: '{name}-bmc'\n    password: hunter2\n"
    line, msg = one(write(tmp_path, text))
    assert line == 17 and "never written inline" in msg and "{env: VARIABLE}" in msg


def test_password_by_env_accepted(tmp_path):
    text = BASE + "power:\n  bmc:\n    driver: ipmi\n    address: '{name}-bmc'\n    password: {env: BMC_PW}\n"
    assert load_plan(write(tmp_path, text)).model.power.bmc.password.env == "BMC_PW"


def test_version_missing_and_wrong(tmp_path):
    line, msg = one(write(tmp_path, BASE.replace("version: 1\n", "")))
    assert line == 1 and "version: 1" in msg
    line, msg = one(write(tmp_path, BASE.replace("version: 1", "version: 2")))
    assert line == 1 and "plan version 1" in msg


def test_required_section_missing(tmp_path):
    text = "version: 1\nprofiles: {p: {kernel: k}}\nnodes: [{name: a, mac: '52:54:00:00:00:01', ip: 10.0.0.2}]\n"
    errs = problems(write(tmp_path, text))
    assert any("network: required key is missing" in m for _, m, _ in errs)


def test_bad_nodeset_name(tmp_path):
    line, msg = one(write(tmp_path, BASE.replace("n[1-3]", "n[3-1")))
    assert line == 10 and "range like node[01-16]" in msg


def test_mac_list_length_mismatch(tmp_path):
    line, msg = one(write(tmp_path, BASE.replace("mac: 52:54:00:00:00:01", "mac: [52:54:00:00:00:01, 52:54:00:00:00:02]")))
    assert line == 11 and "is 3 nodes but mac: lists 2" in msg


def test_wave_with_unknown_group(tmp_path):
    text = BASE + "rollout:\n  waves:\n    - {name: a, nodes: '@nope'}\n"
    line, msg = one(write(tmp_path, text))
    assert line == 15 and "unknown group @nope" in msg


def test_node_in_two_waves(tmp_path):
    text = BASE + "rollout:\n  waves:\n    - {name: a, nodes: 'n1'}\n    - {name: b, nodes: 'n[1-2]'}\n"
    line, msg = one(write(tmp_path, text))
    assert line == 16 and "in wave a and wave b" in msg


def test_bad_duration_and_budget(tmp_path):
    text = BASE + "rollout:\n  timeouts: {kernel: soon}\n  failure_budget: 150%\n"
    errs = problems(write(tmp_path, text))
    assert {e[0] for e in errs} == {14, 15}
    assert any("is not a duration" in m for _, m, _ in errs)
    assert any("is not a failure budget" in m for _, m, _ in errs)


def test_nfs_profile_needs_nfsroot(tmp_path):
    line, msg = one(write(tmp_path, BASE.replace("    initrd: rootfs.gz", "    root: nfs")))
    assert line == 7 and "nfsroot" in msg


def test_check_needs_exactly_one_kind(tmp_path):
    text = BASE + "readiness:\n  checks:\n    - {kernel: '6', mount: /usr}\n"
    line, msg = one(write(tmp_path, text))
    assert line == 15 and "exactly one of" in msg


def test_csv_inventory_errors_point_into_the_csv(tmp_path):
    (tmp_path / "inv.csv").write_text("# comment\nname,mac,ip\na1,52:54:00:00:01:01,10.9.0.21\na2,not-a-mac,10.9.0.22\na3,52:54:00:00:01:03,10.9.0.300\n")
    text = BASE + "  - inventory: inv.csv\n"
    errs = problems(write(tmp_path, text))
    assert [(Path(f).name, line) for line, _, f in errs] == [("inv.csv", 4), ("inv.csv", 5)]
    assert "is not a MAC address" in errs[0][1] and "not an IPv4 address" in errs[1][1]


def test_csv_inventory_missing_file_points_at_plan(tmp_path):
    line, msg = one(write(tmp_path, BASE + "  - inventory: missing.csv\n"))
    assert line == 13 and "cannot read inventory" in msg


def test_csv_inventory_bad_header(tmp_path):
    (tmp_path / "inv.csv").write_text("name,mac,addr\n")
    errs = problems(write(tmp_path, BASE + "  - inventory: inv.csv\n"))
    assert all(line == 1 for line, _, _ in errs)
    assert any("unknown column(s) addr" in m for _, m, _ in errs)


def test_all_problems_reported_at_once(tmp_path):
    text = BASE + "  - name: bad\n    mac: 52:54:00:00:00:01\n    ip: 10.8.0.1\n"
    errs = problems(write(tmp_path, text))
    assert len(errs) == 2  # duplicate MAC and outside subnet, both on line 13
    assert {e[0] for e in errs} == {13}


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True, timeout=60)


def test_cli_duplicate_mac_exit_1_names_line(tmp_path):
    text = BASE + "  - name: other\n    mac: 52:54:00:00:00:02\n    ip: 10.9.0.50\n"
    p = write(tmp_path, text)
    r = run_cli("validate", str(p))
    assert r.returncode == 1
    assert re.search(rf"^{re.escape(str(p))}:13: duplicate MAC", r.stderr, re.M), r.stderr
    assert "Traceback" not in r.stderr


def test_cli_broken_yaml_exit_1_no_traceback(tmp_path):
    p = write(tmp_path, "version: 1\nnetwork: {subnet: [\n")
    r = run_cli("validate", str(p))
    assert r.returncode == 1
    assert "YAML syntax error" in r.stderr and "Traceback" not in r.stderr


def test_cli_binary_garbage_no_traceback(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage\x00")
    r = run_cli("validate", str(p))
    assert r.returncode == 1 and "Traceback" not in r.stderr


def test_cli_json_problems(tmp_path):
    import json

    p = write(tmp_path, BASE.replace("    mac:", "    macc:"))
    r = run_cli("validate", "--json", str(p))
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["ok"] is False and out["problems"][0]["line"] == 11


def test_cli_usage_error_exit_2():
    r = run_cli("validate")
    assert r.returncode == 2


# --------------------------------------------------------------------------- SSH trust


def test_checks_without_key_or_agent_say_what_to_set(tmp_path):
    """Readiness offers no key it was not given (no agent, no ~/.ssh): say so before a rollout fails every node."""
    text = BASE + "readiness:\n  checks:\n    - {kernel: '6'}\n"
    plan = load_plan(write(tmp_path, text))
    said = [w for w in plan.warnings if "readiness.ssh" in w.message]
    assert len(said) == 1 and said[0].line == 13, plan.warnings
    assert "key:" in said[0].message and "agent: true" in said[0].message
    for ssh in ("{key: id_ed25519}", "{agent: true}"):
        plan = load_plan(write(tmp_path, BASE + f"readiness:\n  ssh: {ssh}\n  checks:\n    - {{kernel: '6'}}\n"))
        assert not [w for w in plan.warnings if "readiness.ssh" in w.message], plan.warnings
    assert load_plan(write(tmp_path, BASE)).model.readiness.ssh.agent is False  # the default


def test_host_key_is_per_node_unless_the_profile_says_none(tmp_path):
    assert load_plan(write(tmp_path, BASE)).model.profiles["p"].host_key == "per-node"
    text = BASE.replace("    initrd: rootfs.gz\n", "    initrd: rootfs.gz\n    host_key: none\n")
    assert load_plan(write(tmp_path, text)).model.profiles["p"].host_key == "none"
    line, msg = one(write(tmp_path, BASE.replace("    initrd: rootfs.gz\n", "    initrd: rootfs.gz\n    host_key: shared\n")))
    assert line == 9 and "per-node" in msg and "none" in msg


def test_state_dir_inside_the_boot_root_is_refused(tmp_path):
    """The state directory holds the nodes' private host keys: the boot server must never serve it."""
    (tmp_path / "tftpboot").mkdir()
    for f in ("pxelinux.0", "vmlinuz", "rootfs.gz"):
        (tmp_path / "tftpboot" / f).write_bytes(b"x")
    line, msg = one(write(tmp_path, "state_dir: tftpboot/state\n" + BASE))
    assert line == 1 and "inside the boot root" in msg and "host keys" in msg


def test_lab_firmware_by_node_set(tmp_path):
    plan = load_plan(write(tmp_path, BASE + 'lab:\n  firmware: {"n[2-3]": uefi, n3: uefi-http}\n'))
    assert [plan.firmware_of(n) for n in plan.nodes] == ["bios", "uefi", "uefi-http"]
    line, msg = one(write(tmp_path, BASE + "lab:\n  firmware: {n9: uefi}\n"))
    assert line == 14 and "lab.firmware" in msg and "n9" in msg
    errs = problems(write(tmp_path, BASE + "lab:\n  firmware: efi\n"))
    assert errs[0][0] == 14 and "'uefi-http'" in errs[0][1]  # the allowed names are listed


def test_readiness_check_profiles_must_exist(tmp_path):
    text = BASE + "readiness:\n  checks:\n    - {name: nfs, profiles: [q], mount: /}\n"
    line, msg = one(write(tmp_path, text))
    assert line == 15 and "profiles the plan does not define: q" in msg and "defined: p" in msg


# --------------------------------------------------------------------------- network.relayed

RELAYED = """\
version: 1
network:
  subnet: 10.9.0.0/24
  server: 10.9.0.1
  relayed:
    - subnet: 10.10.0.0/24
      gateway: 10.10.0.1
      router: 10.9.0.254
      racks: [r1]
profiles:
  p:
    kernel: vmlinuz
nodes:
  - name: n1
    mac: 52:54:00:00:00:01
    ip: 10.9.0.11
  - name: n[2-3]
    mac: 52:54:00:00:00:02
    ip: 10.10.0.12
    rack: r1
"""


def test_relayed_subnet_plan_is_valid(tmp_path):
    plan = load_plan(write(tmp_path, RELAYED))
    assert plan.warnings == [] or all("boot root" in w.message for w in plan.warnings), plan.warnings
    assert plan.relayed_subnet_of(plan.by_name["n1"]) is None
    assert str(plan.relayed_subnet_of(plan.by_name["n3"]).subnet) == "10.10.0.0/24"
    assert plan.model.network.relayed[0].wake == "directed-broadcast"


def test_node_outside_boot_and_relayed_subnets(tmp_path):
    line, msg = one(write(tmp_path, RELAYED.replace("ip: 10.9.0.11", "ip: 10.11.0.11")))
    assert line == 14 and "outside subnet 10.9.0.0/24 and the relayed subnets (10.10.0.0/24)" in msg


def test_rack_on_a_relayed_subnet_needs_an_address_there(tmp_path):
    text = RELAYED.replace("    ip: 10.9.0.11\n", "    ip: 10.9.0.11\n    rack: r1\n")
    line, msg = one(write(tmp_path, text))
    assert line == 14 and "rack r1 is on relayed subnet 10.10.0.0/24" in msg and "10.10.0.1-10.10.0.254" in msg


def test_relayed_node_of_an_unlisted_rack_is_a_warning(tmp_path):
    plan = load_plan(write(tmp_path, RELAYED.replace("    rack: r1\n", "    rack: r2\n")))
    said = [w for w in plan.warnings if "rack r2 is not in that subnet's racks" in w.message]
    assert len(said) == 1 and said[0].line == 17, plan.warnings  # once per entry, not per node


def test_relayed_subnet_overlaps(tmp_path):
    line, msg = one(write(tmp_path, RELAYED.replace("subnet: 10.10.0.0/24", "subnet: 10.9.0.0/23")
                          .replace("ip: 10.10.0.12", "ip: 10.9.1.12").replace("gateway: 10.10.0.1", "gateway: 10.9.1.1")))
    assert line == 6 and "overlaps the boot subnet 10.9.0.0/24" in msg
    text = RELAYED.replace("      racks: [r1]\n", "      racks: [r1]\n    - {subnet: 10.10.0.128/25, gateway: 10.10.0.129}\n")
    line, msg = one(write(tmp_path, text))
    assert line == 10 and "overlaps relayed subnet 10.10.0.0/24" in msg


def test_relayed_gateway_router_and_rack_lists(tmp_path):
    line, msg = one(write(tmp_path, RELAYED.replace("gateway: 10.10.0.1", "gateway: 10.9.0.1")))
    assert line == 7 and "outside its relayed subnet 10.10.0.0/24" in msg and "giaddr" in msg
    line, msg = one(write(tmp_path, RELAYED.replace("gateway: 10.10.0.1", "gateway: 10.10.0.255")))
    assert line == 7 and "broadcast address" in msg
    line, msg = one(write(tmp_path, RELAYED.replace("router: 10.9.0.254", "router: 10.10.0.254")))
    assert line == 8 and "not on the boot subnet 10.9.0.0/24" in msg
    line, msg = one(write(tmp_path, RELAYED.replace("router: 10.9.0.254", "router: 10.9.0.11")))
    assert line == 14 and "address of the router to 10.10.0.0/24" in msg
    errs = problems(write(tmp_path, RELAYED.replace("ip: 10.10.0.12", "ip: 10.10.0.0")))  # n2 .0, n3 .1
    assert [e[0] for e in errs] == [17, 17] and "network address" in errs[0][1], errs
    assert "n3: IP 10.10.0.1 is the gateway (relay) address of 10.10.0.0/24" in errs[1][1]
    text = RELAYED.replace("      racks: [r1]\n", "      racks: [r1]\n    - {subnet: 10.11.0.0/24, gateway: 10.11.0.1, racks: [r1]}\n")
    line, msg = one(write(tmp_path, text))
    assert line == 10 and "rack r1 is listed on two relayed subnets" in msg


def test_relayed_pool_and_wake(tmp_path):
    text = RELAYED.replace("      racks: [r1]\n", "      racks: [r1]\n      pool: {start: 10.10.0.1, end: 10.10.0.20}\n")
    errs = problems(write(tmp_path, text))
    assert [e[0] for e in errs] == [10, 10], errs
    assert "overlaps 2 reserved node address(es) (n2 10.10.0.12, n3 10.10.0.13)" in errs[0][1]
    assert "contains the gateway address 10.10.0.1" in errs[1][1]
    line, msg = one(write(tmp_path, text.replace("end: 10.10.0.20", "end: 10.11.0.20").replace("start: 10.10.0.1,", "start: 10.10.0.100,")))
    assert line == 10 and "pool end 10.11.0.20 is outside its relayed subnet" in msg
    line, msg = one(write(tmp_path, RELAYED.replace("      racks: [r1]\n", "      racks: [r1]\n      wake: bmc\n")))
    assert line == 10 and "wake: bmc but power.bmc.driver is none" in msg
    line, msg = one(write(tmp_path, RELAYED.replace("      racks: [r1]\n", "      racks: [r1]\n      wake: etherwake\n")))
    assert line == 10 and "directed-broadcast" in msg


def test_site_dhcp_beside_full_mode_is_rejected_with_the_fix(tmp_path):
    """The lab's site DHCP server and bootorch's full DHCP would both answer: `validate` says so, at lab.site."""
    text = (Path(__file__).resolve().parents[1] / "plans" / "full.yaml").read_text()
    text = text.replace("\nlab:\n", "\nlab:\n  site: {dhcp: dnsmasq}\n", 1)
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    with pytest.raises(PlanError) as e:
        load_plan(p)
    [problem] = [x for x in e.value.problems if "lab.site.dhcp" in x.message]
    assert problem.severity == "error"
    assert "dhcp.mode: proxy" in problem.message and problem.line == text.splitlines().index("  site: {dhcp: dnsmasq}") + 1
