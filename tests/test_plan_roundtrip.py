"""Property tests: generated plans load to the cluster they describe, and survive a dump/load round trip."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.plan import load_plan
from orchestrator.plan.model import Plan


@st.composite
def plans(draw):
    prefix = draw(st.integers(20, 28))
    net = IPv4Network((draw(st.sampled_from(["10.0.0.0", "10.20.0.0", "172.16.0.0", "192.168.0.0"])), prefix), strict=False)
    hosts = net.num_addresses - 2
    server = net[1]
    # Split the usable range into entries of consecutive addresses.
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=6))
    while sum(sizes) > hosts - 2:
        sizes.pop()
    if not sizes:
        sizes = [1]
    entries = []
    expected = []
    next_ip = int(net[2])
    mac_base = draw(st.integers(0, 2**24 - 1000)) << 8
    k = 0
    profiles = draw(st.lists(st.sampled_from(["ram", "nfs", "cpio"]), min_size=1, max_size=3, unique=True))
    for i, n in enumerate(sizes):
        prefix_name = f"e{i}n"
        pad = draw(st.integers(1, 3))
        names = [f"{prefix_name}{j:0{pad}d}" for j in range(1, n + 1)]
        mac0 = 0x525400000000 + mac_base + k
        ip0 = next_ip
        prof = draw(st.sampled_from(profiles))
        entry = {"name": f"{prefix_name}[{1:0{pad}d}-{n:0{pad}d}]" if n > 1 else names[0],
                 "mac": ":".join(f"{(mac0 >> s) & 0xff:02x}" for s in range(40, -8, -8)),
                 "ip": str(IPv4Address(ip0)), "profile": prof}
        if draw(st.booleans()):
            entry["group"] = f"g{i % 2}"
        entries.append(entry)
        for j, name in enumerate(names):
            m = mac0 + j
            expected.append((name, ":".join(f"{(m >> s) & 0xff:02x}" for s in range(40, -8, -8)), str(IPv4Address(ip0 + j)), prof))
        k += n
        next_ip += n
    prof_defs = {
        "ram": {"kernel": "vmlinuz", "initrd": ["rootfs.gz"], "root": "ramdisk", "ramdisk_size": 65536},
        "nfs": {"kernel": "vmlinuz", "root": "nfs", "nfsroot": "{server}:/export/{name},rw", "ip": "static"},
        "cpio": {"kernel": "vmlinuz", "initrd": "initrd.img", "root": "initramfs", "ip": "dhcp", "append": "quiet"},
    }
    plan = {
        "version": 1,
        "name": "gen",
        "network": {"subnet": str(net), "server": str(server), "gateway": str(server)},
        "profiles": {p: prof_defs[p] for p in profiles},
        "nodes": entries,
        "rollout": {"failure_budget": draw(st.sampled_from([0, 1, "5%", "12.5%"])),
                    "timeouts": {"kernel": draw(st.sampled_from([30, "90s", "2m", "1.5m"]))}},
    }
    return plan, expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans())
def test_generated_plans_expand_to_their_nodes(tmp_path, case):
    spec, expected = case
    p = tmp_path / "gen.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    plan = load_plan(p)
    got = sorted((n.name, n.mac, str(n.ip), n.profile) for n in plan.nodes)
    assert got == sorted(expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans())
def test_model_dump_load_round_trip(tmp_path, case):
    plan, _ = case
    p = tmp_path / "a.yaml"
    p.write_text(yaml.safe_dump(plan, sort_keys=False))
    first = load_plan(p)
    dumped = first.model.model_dump(mode="json")
    q = tmp_path / "b.yaml"
    q.write_text(yaml.safe_dump(dumped, sort_keys=False))
    second = load_plan(q)
    assert second.model == first.model
    assert [(n.name, n.mac, n.ip, n.profile) for n in second.nodes] == [(n.name, n.mac, n.ip, n.profile) for n in first.nodes]


def test_shipped_plans_round_trip(tmp_path):
    root = Path(__file__).resolve().parent.parent / "plans"
    for name in ("full.yaml", "examples/beowulf-64.yaml"):
        plan = load_plan(root / name)
        again = Plan.model_validate(yaml.safe_load(yaml.safe_dump(plan.model.model_dump(mode="json"))))
        assert again == plan.model
