"""Rendering: pxelinux lookup names as pxelinux 6 documents them, configs real daemons accept."""

from __future__ import annotations

import gzip
import re
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from orchestrator.bootserver.files import BootFiles
from orchestrator.cli import main
from orchestrator.plan import load_plan
from orchestrator.protocols.pxelinux import ip_hex, lookup_names, mac_config_name, parse_config_name
from orchestrator.render import boot_tree, dynamic_source, render_all, render_dhcpd, render_dnsmasq, write_tree
from tests.conftest import REPO, require_tool

FULL = REPO / "plans" / "full.yaml"
BEOWULF = REPO / "plans" / "examples" / "beowulf-64.yaml"
PXELINUX_README = Path("/usr/share/doc/pxelinux/README.txt.gz")


def documented_lookup_order() -> tuple[str, str, str, list[str]]:
    """The worked example in pxelinux's own README (Debian package pxelinux)."""
    if not PXELINUX_README.exists():
        require_tool("/usr/share/doc/pxelinux/README.txt.gz")
    text = gzip.open(PXELINUX_README, "rt", encoding="utf-8", errors="replace").read()
    m = re.search(
        r"UUID is ([0-9a-f-]{36}), the Ethernet MAC\s+address is ([0-9A-F:]{17}) and the IP address ([0-9.]+)",
        text,
    )
    assert m, "pxelinux README example not found"
    uuid, mac, ip = m.groups()
    names = re.findall(r"^\s*/mybootdir/pxelinux\.cfg/(\S+)$", text, re.M)
    assert names, "lookup list not found in the pxelinux README"
    return uuid, mac, ip, names


def test_lookup_order_matches_pxelinux_documentation():
    uuid, mac, ip, documented = documented_lookup_order()
    assert lookup_names(mac, ip, uuid) == documented
    assert documented[-1] == "default" and len(documented) == 11


def test_lookup_order_for_the_seed_example():
    # The seed: 192.168.1.2 -> C0A80102 first; the hex shrinks one digit at a time.
    names = lookup_names("fe:ed:fa:ce:de:ad", "192.168.1.2")
    assert names[:4] == ["01-fe-ed-fa-ce-de-ad", "C0A80102", "C0A8010", "C0A801"]
    assert names[-2:] == ["C", "default"]


def test_config_name_parsing():
    assert parse_config_name("01-52-54-00-aa-bb-cc") == ("mac", "52:54:00:aa:bb:cc")
    assert parse_config_name("C0A80102") == ("iphex", "C0A80102")
    assert parse_config_name("default") == ("default", "")
    assert parse_config_name("01-zz-54-00-aa-bb-cc") is None
    assert parse_config_name("c0a80102") is None  # pxelinux asks upper case


def test_rendered_names_are_the_first_names_pxelinux_asks_for():
    """Each node's file is the first candidate in its lookup list that exists."""
    for plan in (FULL, BEOWULF):
        lp = load_plan(plan)
        tree = boot_tree(lp)
        cfgs = {k.split("/", 1)[1] for k in tree if k.startswith("pxelinux.cfg/")}
        for node in lp.nodes:
            wanted = lookup_names(node.mac, node.ip)
            first_hit = next(n for n in wanted if n in cfgs)
            expected = mac_config_name(node.mac) if "mac" in lp.model.boot.config_names else ip_hex(node.ip)
            assert first_hit == expected
            assert node.name.encode() in tree[f"pxelinux.cfg/{first_hit}"]


def test_seed_style_config_content():
    lp = load_plan(BEOWULF)
    cfg = boot_tree(lp)["pxelinux.cfg/C0A80102"].decode()
    assert "DEFAULT beowulf" in cfg and "KERNEL linux" in cfg
    assert (
        "APPEND initrd=rootfs.gz root=/dev/ram0 rw ramdisk_size=65536 "
        "ip=192.168.1.2:192.168.1.1:192.168.1.1:255.255.255.0:node1:eth0:off"
    ) in cfg


def test_dynamic_source_serves_the_rendered_bytes(tmp_path):
    lp = load_plan(FULL)
    written = render_all(lp)
    files = BootFiles(None, dynamic_source(lp))
    for rel, data in written.items():
        if rel.startswith(("pxelinux.cfg/", "ipxe/")) or rel == "boot.ipxe":
            f = files.open(rel)
            assert f.pread(0, f.size + 1) == data
    # Names pxelinux tries before/after ours must be "not found", so it walks on.
    from orchestrator.bootserver.files import NotFound

    with pytest.raises(NotFound):
        files.open("pxelinux.cfg/C0A8")


def test_dhcpd_conf_has_pxe_class_hosts_and_no_pool():
    lp = load_plan(BEOWULF)
    conf = render_dhcpd(lp)
    assert 'match if substring (option vendor-class-identifier, 0, 9) = "PXEClient";' in conf
    assert "option PXE.mtftp-ip 0.0.0.0;" in conf and "next-server 192.168.1.1;" in conf
    assert conf.count("host node") == 64
    assert "hardware ethernet fe:ed:fa:ce:de:ad;" in conf and "fixed-address 192.168.1.2;" in conf
    assert "range " not in conf  # no pool: deny unknown clients
    assert 'log(info, concat("bootorch-pxe mac "' in conf  # evidence the iscdhcpd log parser reads


def dhcpd_check(path: Path) -> subprocess.CompletedProcess[str]:
    dhcpd = require_tool("dhcpd", "/usr/sbin/dhcpd")
    # -t: test the configuration only; -lf/-pf keep it away from system files.
    return subprocess.run(
        [dhcpd, "-4", "-t", "-cf", str(path), "-lf", str(path.parent / "leases"), "-pf", str(path.parent / "pid")],
        capture_output=True, text=True, timeout=30,
    )


def dnsmasq_check(path: Path) -> subprocess.CompletedProcess[str]:
    dnsmasq = require_tool("dnsmasq", "/usr/sbin/dnsmasq")
    return subprocess.run([dnsmasq, "--test", "-C", str(path)], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("plan", [FULL, BEOWULF], ids=["full", "beowulf-64"])
def test_real_daemons_accept_rendered_configs(tmp_path, plan):
    out = tmp_path / "out"
    assert main(["render", str(plan), "--out", str(out)]) == 0
    r = dhcpd_check(out / "dhcpd.conf")
    assert r.returncode == 0, r.stderr
    r = dnsmasq_check(out / "dnsmasq.conf")
    assert r.returncode == 0 and "syntax check OK" in (r.stdout + r.stderr), r.stderr


def test_real_daemons_reject_a_broken_config(tmp_path):
    """Control: the checks above can fail."""
    lp = load_plan(FULL)
    bad = tmp_path / "dhcpd.conf"
    bad.write_text(render_dhcpd(lp).replace("fixed-address", "fixed-adress", 1))
    assert dhcpd_check(bad).returncode != 0
    badd = tmp_path / "dnsmasq.conf"
    badd.write_text(render_dnsmasq(lp) + "dhcp-boot-typo=x\n")
    assert dnsmasq_check(badd).returncode != 0


def test_proxy_mode_dnsmasq(tmp_path):
    text = FULL.read_text().replace("mode: full", "mode: proxy")
    p = tmp_path / "plans" / "proxy.yaml"
    p.parent.mkdir()
    p.write_text(text)
    lp = load_plan(p)
    conf = render_dnsmasq(lp)
    assert "dhcp-range=10.77.0.0,proxy,255.255.255.0" in conf and "dhcp-host=" not in conf
    path = tmp_path / "dnsmasq.conf"
    path.write_text(conf)
    assert dnsmasq_check(path).returncode == 0


def test_render_writes_files_atomically_and_lists_them(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["render", str(FULL), "--out", str(out), "--json"]) == 0
    import json

    listed = json.loads(capsys.readouterr().out)["files"]
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert sorted(listed) == on_disk
    assert not [p for p in on_disk if Path(p).name.startswith(".")]  # no temp files left
    lp = load_plan(FULL)
    for node in lp.nodes:
        assert (out / "pxelinux.cfg" / mac_config_name(node.mac)).exists()
        assert (out / "pxelinux.cfg" / ip_hex(IPv4Address(node.ip))).exists()


def test_write_tree_replaces_existing_files(tmp_path):
    (tmp_path / "dhcpd.conf").write_text("old")
    write_tree({"dhcpd.conf": b"new"}, tmp_path)
    assert (tmp_path / "dhcpd.conf").read_text() == "new"
