"""Two boot racks on two subnets, one behind an nginx HTTP cache (plan ``servers:`` with ``http``, ``lab.caches``).

Slow (root, TCG): rack r0's node boots from bootorch on the boot subnet (pxelinux
over TFTP); rack r1's node, behind the router namespace's dhcrelay, runs iPXE's
script and fetches its kernel and initrd from Debian's nginx in its rack's router
namespace, configured by ``bootorch render``'s nginx config; one ``bootorch
rollout`` brings both to ``ready``, the cached node's kernel and initrd stages
taken from nginx's access log, each rack admitted against its own server's window.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from orchestrator.lab.caches import access_log
from orchestrator.plan import load_plan
from tests.conftest import require_tool
from tests.test_lab_routed import EXE, FULL_STAGES, RACK_NET, build, lab, lab_tools, namespaces, routed_plan  # noqa: F401 (a fixture)


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.usefixtures("lab_tools")
def test_two_racks_one_behind_an_nginx_cache_boot_to_ready(tmp_path):
    require_tool("nginx", "/usr/sbin/nginx")
    plan, ns = routed_plan(tmp_path, nodes=("rt01", "rt02"))
    d = yaml.safe_load(plan.read_text())
    # iPXE fetches over HTTP: via the cache. Its own initrd name: image build makes one per profile.
    d["profiles"]["cached"] = {**d["profiles"]["ramdisk"], "ipxe": "script", "initrd": "rootfs-r1.gz"}
    d["nodes"][0]["profile"], d["nodes"][1]["profile"] = "ramdisk", "cached"
    d["servers"] = [{"name": "rack1", "racks": ["r1"], "http": f"http://{RACK_NET}.1:8080", "admission": {"max_downloading": 1}}]
    d["lab"]["caches"] = "nginx"
    plan.write_text(yaml.safe_dump(d, sort_keys=False))
    log = access_log(load_plan(plan), "rack1")
    d["logs"] = [{"source": "nginx", "path": str(log)}]
    plan.write_text(yaml.safe_dump(d, sort_keys=False))
    build(plan, tmp_path)
    try:
        r = lab("up", plan)
        assert r.returncode == 0, r.stderr[-3000:]
        st = json.loads(lab("status", plan, "--json").stdout)
        cache = st["services"]["caches"]["rack1"]
        assert cache["pid"] and cache["namespace"] == f"{ns}-r1" and cache["address"] == f"{RACK_NET}.1:8080", cache
        r = subprocess.run([*EXE, "rollout", str(plan), "--json", "--keep-lab"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        out = json.loads(r.stdout)
        assert out["ok"] and out["ready"] == 2, out
        nodes = {n["name"]: n for n in out["nodes"]}
        for name, n in nodes.items():
            assert n["result"] == "ready" and n["attempts"] == 1, (name, n)
        assert [t["to"] for t in nodes["rt01"]["timeline"]] == FULL_STAGES, nodes["rt01"]["timeline"]
        cached = {t["to"]: t for t in nodes["rt02"]["timeline"]}
        assert {"kernel", "initrd", "os_dhcp", "ssh", "ready"} <= cached.keys(), nodes["rt02"]["timeline"]
        # The cached rack's kernel and initrd stages: from nginx's access log, not from bootorch's own server.
        assert cached["kernel"]["source"] == "log:nginx" and "vmlinuz" in cached["kernel"]["evidence"], cached["kernel"]
        assert cached["initrd"]["source"] == "log:nginx" and "rootfs-r1.gz" in cached["initrd"]["evidence"], cached["initrd"]
        lines = log.read_text().splitlines()
        assert any(line.startswith(f"{RACK_NET}.12 ") and "GET /vmlinuz " in line for line in lines), lines
        assert any(line.startswith(f"{RACK_NET}.12 ") and "GET /rootfs-r1.gz " in line for line in lines), lines
        direct = {t["to"]: t for t in nodes["rt01"]["timeline"]}
        assert direct["initrd"]["source"] == "tftp", direct["initrd"]  # the other rack: bootorch's own TFTP
    finally:
        r = lab("down", plan)
    assert r.returncode == 0, r.stderr
    assert "nginx cache rack1" in r.stdout and ns not in namespaces()
