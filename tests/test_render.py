"""Rendering: pxelinux lookup names as pxelinux 6 documents them, configs real daemons accept."""

from __future__ import annotations

import gzip
import re
import subprocess
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio

from orchestrator.bootserver.files import BootFiles
from orchestrator.cli import main
from orchestrator.plan import load_plan
from orchestrator.protocols.pxelinux import ip_hex, lookup_names, mac_config_name, parse_config_name
from orchestrator.render import boot_tree, dynamic_source, render_all, render_dhcpd, render_dnsmasq, write_tree
from tests.conftest import REPO, require_tool

FULL = REPO / "plans" / "full.yaml"
MATRIX = REPO / "plans" / "examples" / "lab-matrix.yaml"
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
    for path in (FULL, BEOWULF):
        plan = load_plan(path)
        tree = boot_tree(plan)
        cfgs = {k.split("/", 1)[1] for k in tree if k.startswith("pxelinux.cfg/")}
        for node in plan.nodes:
            wanted = lookup_names(node.mac, node.ip)
            first_hit = next(n for n in wanted if n in cfgs)
            expected = mac_config_name(node.mac) if "mac" in plan.model.boot.config_names else ip_hex(node.ip)
            assert first_hit == expected
            assert node.name.encode() in tree[f"pxelinux.cfg/{first_hit}"]


def test_seed_style_config_content():
    plan = load_plan(BEOWULF)
    cfg = boot_tree(plan)["pxelinux.cfg/C0A80102"].decode()
    assert "DEFAULT beowulf" in cfg and "KERNEL linux" in cfg
    assert (
        "APPEND initrd=rootfs.gz root=/dev/ram0 rw ramdisk_size=65536 "
        "ip=192.168.1.2:192.168.1.1:192.168.1.1:255.255.255.0:node1:eth0:off"
    ) in cfg


def test_dynamic_source_serves_the_rendered_bytes(tmp_path):
    plan = load_plan(FULL)
    written = render_all(plan)
    files = BootFiles(None, dynamic_source(plan))
    for rel, data in written.items():
        if rel.startswith(("pxelinux.cfg/", "ipxe/")) or rel == "boot.ipxe":
            f = files.open(rel)
            assert f.pread(0, f.size + 1) == data
    # Names pxelinux tries before/after ours must be "not found", so it walks on.
    from orchestrator.bootserver.files import NotFound

    with pytest.raises(NotFound):
        files.open("pxelinux.cfg/C0A8")


def test_dhcpd_conf_has_pxe_class_hosts_and_no_pool():
    plan = load_plan(BEOWULF)
    conf = render_dhcpd(plan)
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


@pytest.mark.parametrize("plan", [FULL, BEOWULF, MATRIX], ids=["full", "beowulf-64", "lab-matrix"])
def test_real_daemons_accept_rendered_configs(tmp_path, plan):
    out = tmp_path / "out"
    assert main(["render", str(plan), "--out", str(out)]) == 0
    r = dhcpd_check(out / "dhcpd.conf")
    assert r.returncode == 0, r.stderr
    r = dnsmasq_check(out / "dnsmasq.conf")
    assert r.returncode == 0 and "syntax check OK" in (r.stdout + r.stderr), r.stderr


def test_every_client_kind_in_the_rendered_configs():
    """The site daemons' configs give each client kind what the embedded server gives it."""
    plan = load_plan(MATRIX)
    dnsmasq = render_dnsmasq(plan)
    assert "dhcp-boot=tag:efihttp,tag:!ipxe,http://10.78.0.1:8080/ipxe.efi" in dnsmasq
    assert "dhcp-option-force=tag:efihttp,tag:!ipxe,option:vendor-class,HTTPClient" in dnsmasq
    # m01, m05 (profile ipxe: loader) and m06 get a loader from iPXE; m03, m04 their script.
    tagged = sorted(line.split(",")[1] for line in dnsmasq.splitlines() if line.startswith("dhcp-mac=set:ipxeloader"))
    assert tagged == [plan.by_name[n].mac for n in ("m01", "m05", "m06")]
    dhcpd = render_dhcpd(plan)
    assert 'match if substring (option vendor-class-identifier, 0, 10) = "HTTPClient";' in dhcpd
    host_m01 = dhcpd[dhcpd.index("host m01 {"):dhcpd.index("host m02 {")]
    assert 'filename "pxelinux.0"' in host_m01 and "ipxe: loader" in host_m01
    assert "ipxe" not in dhcpd[dhcpd.index("host m03 {"):dhcpd.index("host m04 {")]


def test_real_daemons_reject_a_broken_config(tmp_path):
    """Control: the checks above can fail."""
    plan = load_plan(FULL)
    bad = tmp_path / "dhcpd.conf"
    bad.write_text(render_dhcpd(plan).replace("fixed-address", "fixed-adress", 1))
    assert dhcpd_check(bad).returncode != 0
    badd = tmp_path / "dnsmasq.conf"
    badd.write_text(render_dnsmasq(plan) + "dhcp-boot-typo=x\n")
    assert dnsmasq_check(badd).returncode != 0


def test_proxy_mode_dnsmasq(tmp_path):
    text = FULL.read_text().replace("mode: full", "mode: proxy")
    p = tmp_path / "plans" / "proxy.yaml"
    p.parent.mkdir()
    p.write_text(text)
    plan = load_plan(p)
    conf = render_dnsmasq(plan)
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
    plan = load_plan(FULL)
    for node in plan.nodes:
        assert (out / "pxelinux.cfg" / mac_config_name(node.mac)).exists()
        assert (out / "pxelinux.cfg" / ip_hex(IPv4Address(node.ip))).exists()


def test_write_tree_replaces_existing_files(tmp_path):
    (tmp_path / "dhcpd.conf").write_text("old")
    write_tree({"dhcpd.conf": b"new"}, tmp_path)
    assert (tmp_path / "dhcpd.conf").read_text() == "new"


# --------------------------------------------------------------------------- per-node host keys


def plan_with_keys(tmp_path, *, nodes=("node01", "node03"), profile_extra: str = "", text: str | None = None):
    """plans/full.yaml with its own state directory, and host keys made for ``nodes`` (fake key bytes:
    render only wraps them)."""
    from orchestrator.hostkeys import host_key_paths

    text = text if text is not None else FULL.read_text()
    text = text.replace("state_dir: ../var/lab/state", f"state_dir: {tmp_path / 'state'}")
    text = text.replace("root: ../var/lab/tftpboot", f"root: {tmp_path / 'root'}")
    text = text.replace("    append: console=ttyS0 panic=10\n", "    append: console=ttyS0 panic=10\n" + profile_extra)
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    plan = load_plan(p)
    for node in plan.nodes:
        if node.name in nodes:
            private, public = host_key_paths(plan, node)
            private.parent.mkdir(parents=True, exist_ok=True)
            private.write_bytes(f"dropbear key of {node.name}".encode())
            public.write_text(f"ssh-ed25519 AAAA{node.name} {node.name}\n")
    return plan


def test_node_with_a_host_key_boots_it_as_a_second_initrd(tmp_path):
    plan = plan_with_keys(tmp_path)
    tree = boot_tree(plan)
    by_name = {n.name: n for n in plan.nodes}
    n1, n2 = by_name["node01"], by_name["node02"]
    cfg1 = tree[f"pxelinux.cfg/{mac_config_name(n1.mac)}"].decode()
    assert "APPEND initrd=rootfs.gz,hostkeys/10.77.0.11.cpio ip=::::node01:eth0:dhcp" in cfg1
    assert tree[f"pxelinux.cfg/{ip_hex(n1.ip)}"].decode() == cfg1
    script = tree[f"ipxe/{n1.mac.replace(':', '-')}.ipxe"].decode().splitlines()
    assert script[-3:] == ["initrd http://10.77.0.1:8080/rootfs.gz",
                           "initrd http://10.77.0.1:8080/hostkeys/10.77.0.11.cpio", "boot"]
    assert "initrd=rootfs.gz initrd=10.77.0.11.cpio " in script[-4]
    # node02 has no key yet (image build not run for it): nothing to fetch that does not exist
    assert "APPEND initrd=rootfs.gz ip=" in tree[f"pxelinux.cfg/{mac_config_name(n2.mac)}"].decode()
    # the archives are not in the public tree
    assert not [k for k in tree if k.startswith("hostkeys/")]


def test_profile_host_key_none_adds_nothing(tmp_path):
    plan = plan_with_keys(tmp_path, profile_extra="    host_key: none\n")
    cfg = boot_tree(plan)[f"pxelinux.cfg/{mac_config_name(plan.nodes[0].mac)}"].decode()
    assert "initrd=rootfs.gz ip=" in cfg and "hostkeys" not in cfg
    assert not [k for k in render_all(plan) if k.startswith("hostkeys/")]


def test_host_key_archive_is_served_only_to_its_node(tmp_path):
    """Other clients get not-found, even when the boot root holds a file of that name."""
    from orchestrator.bootserver.files import NotFound
    from orchestrator.hostkeys import host_key_archive

    plan = plan_with_keys(tmp_path)
    root = tmp_path / "root"
    (root / "hostkeys").mkdir(parents=True)
    (root / "hostkeys" / "10.77.0.11.cpio").write_bytes(b"planted")
    (root / "hostkeys" / "10.77.0.12.cpio").write_bytes(b"planted")
    files = BootFiles(root, dynamic_source(plan))
    want = host_key_archive(b"dropbear key of node01")
    f = files.open("hostkeys/10.77.0.11.cpio", "10.77.0.11")
    assert f.pread(0, f.size + 1) == want
    f = files.open("/hostkeys//10.77.0.11.cpio", "::ffff:10.77.0.11")  # an IPv4-mapped peer address
    assert f.pread(0, f.size + 1) == want
    for name, client in [("hostkeys/10.77.0.11.cpio", "10.77.0.13"), ("hostkeys/10.77.0.11.cpio", None),
                         ("hostkeys/10.77.0.12.cpio", "10.77.0.12"), ("hostkeys/10.77.0.99.cpio", "10.77.0.99")]:
        with pytest.raises(NotFound):
            files.open(name, client)
    # the rest of the tree is for everyone, as before
    cfg = f"pxelinux.cfg/{mac_config_name(plan.nodes[0].mac)}"
    assert files.open(cfg, "10.77.0.99").size == len(boot_tree(plan)[cfg])


def test_render_writes_the_archives_the_live_server_serves(tmp_path):
    from orchestrator.hostkeys import host_key_archive

    plan = plan_with_keys(tmp_path)
    files = render_all(plan)
    assert sorted(k for k in files if k.startswith("hostkeys/")) == ["hostkeys/10.77.0.11.cpio", "hostkeys/10.77.0.13.cpio"]
    assert files["hostkeys/10.77.0.13.cpio"] == host_key_archive(b"dropbear key of node03")
    live = BootFiles(None, dynamic_source(plan))
    for rel, data in files.items():
        if rel.startswith(("pxelinux.cfg/", "ipxe/", "hostkeys/")):
            f = live.open(rel, rel.removeprefix("hostkeys/").removesuffix(".cpio") if rel.startswith("hostkeys/") else None)
            assert f.pread(0, f.size + 1) == data, rel
    out = tmp_path / "out"
    write_tree(files, out)
    assert (out / "hostkeys" / "10.77.0.11.cpio").stat().st_mode & 0o077 == 0  # not world-readable on disk


async def test_real_clients_get_a_host_key_only_from_their_own_address(tmp_path):
    """curl over TFTP and HTTP, bound to a node's loopback address and to another one."""
    from orchestrator.bootserver.serve import Ports, serve_plan
    from orchestrator.hostkeys import host_key_archive

    curl = require_tool("curl")
    text = FULL.read_text().replace("subnet: 10.77.0.0/24", "subnet: 127.77.0.0/24").replace("10.77.0.", "127.77.0.")
    text = text.replace("namespace: bootorch-lab     #", "#")
    plan = plan_with_keys(tmp_path, nodes=("node01",), text=text)
    node = plan.by_name["node01"]
    name = f"hostkeys/{node.ip}.cpio"
    want = host_key_archive(b"dropbear key of node01")

    async def fetch(url: str, source: str) -> tuple[int, bytes]:
        r = await trio.run_process([curl, "-sS", "--fail", "--max-time", "10", "--interface", source, url],
                                   capture_stdout=True, capture_stderr=True, check=False)
        return r.returncode, r.stdout

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = await nursery.start(lambda task_status: serve_plan(
                plan, Ports(host="127.0.0.1", tftp=0, http=0, interface=""), dhcp=False, task_status=task_status))
            for url in (f"tftp://127.0.0.1:{run.tftp}/{name}", f"http://127.0.0.1:{run.http}/{name}"):
                assert await fetch(url, str(node.ip)) == (0, want), url
                rc, body = await fetch(url, "127.77.0.12")  # node02's address
                assert rc != 0 and body == b"", url
                rc, body = await fetch(url, "127.0.0.1")
                assert rc != 0 and body == b"", url
            nursery.cancel_scope.cancel()


@pytest.mark.slow
def test_tftp_hpa_remap_rule_from_the_docs_gives_each_client_its_own_key(tmp_path):
    """What docs/plan.md tells a site with its own tftp-hpa: render, then the --map-file rule
    ``re ^/?hostkeys/.* hostkeys/\\i.cpio``; whatever a client asks under hostkeys/, it gets its own key."""
    import socket
    import time

    from orchestrator.hostkeys import host_key_archive

    tftpd = require_tool("in.tftpd", "/usr/sbin/in.tftpd")
    curl = require_tool("curl")
    text = FULL.read_text().replace("subnet: 10.77.0.0/24", "subnet: 127.77.0.0/24").replace("10.77.0.", "127.77.0.")
    plan = plan_with_keys(tmp_path, nodes=("node01", "node02"), text=text.replace("namespace: bootorch-lab     #", "#"))
    out = tmp_path / "srv"
    write_tree(render_all(plan), out)
    for p in [out, *out.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)  # tftp-hpa serves world-readable files only (unless -p)
    (tmp_path / "map").write_text("re ^/?hostkeys/.* hostkeys/\\i.cpio\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([tftpd, "-L", "-a", f"127.0.0.1:{port}", "-s", str(out), "-m", str(tmp_path / "map")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def fetch(name: str, source: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run([curl, "-sS", "--max-time", "5", "--interface", source, f"tftp://127.0.0.1:{port}/{name}"],
                                  capture_output=True, timeout=30)

        deadline = time.monotonic() + 10
        while (r := fetch("hostkeys/127.77.0.11.cpio", "127.77.0.11")).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.1)  # in.tftpd is starting
        own = host_key_archive(b"dropbear key of node01")
        assert r.returncode == 0 and r.stdout == own, r.stderr
        # node02's name asked from node01's address: node01's own key, not node02's
        assert fetch("hostkeys/127.77.0.12.cpio", "127.77.0.11").stdout == own
        assert fetch("/hostkeys/127.77.0.12.cpio", "127.77.0.12").stdout == host_key_archive(b"dropbear key of node02")
        stranger = fetch("hostkeys/127.77.0.11.cpio", "127.77.0.99")
        assert stranger.returncode != 0 and stranger.stdout == b""
    finally:
        proc.kill()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- network.relayed

RELAYED_BLOCK = """\
  relayed:
    - subnet: 10.78.0.0/24
      gateway: 10.78.0.1
      router: 10.77.0.254
      racks: [r1]
      pool: {start: 10.78.0.100, end: 10.78.0.120}
"""


def relayed_plan(tmp_path: Path, mode: str = "full") -> Path:
    """plans/full.yaml with node04 on a relayed rack subnet (and a pool there)."""
    text = FULL.read_text().replace("  gateway: 10.77.0.1\n", "  gateway: 10.77.0.1\n" + RELAYED_BLOCK, 1)
    text = text.replace("mode: full", f"mode: {mode}")
    text = text.replace("  - name: node[02-04]\n    mac: 52:54:00:77:00:02    # counted up: ...:02, :03, :04\n"
                        "    ip: 10.77.0.12            # counted up: .12, .13, .14\n",
                        "  - name: node[02-03]\n    mac: 52:54:00:77:00:02\n    ip: 10.77.0.12\n"
                        "  - name: node04\n    mac: 52:54:00:77:00:04\n    ip: 10.78.0.14\n    rack: r1\n    profile: ramdisk\n")
    assert "10.78.0.14" in text
    p = tmp_path / "plans" / "relayed.yaml"
    p.parent.mkdir(exist_ok=True)
    p.write_text(text)
    return p


def test_relayed_subnets_in_dhcpd_conf(tmp_path):
    plan = load_plan(relayed_plan(tmp_path))
    conf = render_dhcpd(plan)
    block = conf[conf.index("subnet 10.78.0.0 netmask 255.255.255.0 {"):]
    block = block[:block.index("\n}\n")]
    assert "option routers 10.78.0.1;" in block and "range 10.78.0.100 10.78.0.120;" in block
    host4 = conf[conf.index("host node04 {"):]
    assert "fixed-address 10.78.0.14;" in host4
    # The PXE classes are global (before every subnet): inside the boot subnet they would bring its routers
    # option to relayed clients (dhcpd runs a class's enclosing scope after the client's subnet).
    assert conf.index('class "pxeclients"') < conf.index("\nsubnet ") and conf.index('class "httpclients"') < conf.index("\nsubnet ")
    path = tmp_path / "dhcpd.conf"
    path.write_text(conf)
    r = dhcpd_check(path)
    assert r.returncode == 0, r.stderr


def test_relayed_subnets_in_dnsmasq_conf(tmp_path):
    plan = load_plan(relayed_plan(tmp_path))
    conf = render_dnsmasq(plan)
    assert "dhcp-range=set:relayed1,10.78.0.0,static,255.255.255.0,60m" in conf
    assert "dhcp-range=set:relayed1,10.78.0.100,10.78.0.120,255.255.255.0,60m" in conf
    assert "dhcp-option=tag:relayed1,option:router,10.78.0.1" in conf
    assert "dhcp-host=52:54:00:77:00:04,10.78.0.14,node04" in conf
    path = tmp_path / "dnsmasq.conf"
    path.write_text(conf)
    r = dnsmasq_check(path)
    assert r.returncode == 0 and "syntax check OK" in (r.stdout + r.stderr), r.stderr
    proxy = render_dnsmasq(load_plan(relayed_plan(tmp_path, "proxy")))
    assert "dhcp-range=10.78.0.0,proxy,255.255.255.0" in proxy
    path.write_text(proxy)
    assert dnsmasq_check(path).returncode == 0


def test_relayed_node_static_ip_uses_its_subnet_gateway_and_mask(tmp_path):
    p = relayed_plan(tmp_path)
    p.write_text(p.read_text().replace("    ip: dhcp ", "    ip: static "))
    plan = load_plan(p)
    tree = boot_tree(plan)
    cfg4 = next(v for k, v in tree.items() if k.endswith(plan.by_name["node04"].mac.replace(":", "-")))
    cfg1 = next(v for k, v in tree.items() if k.endswith(plan.by_name["node01"].mac.replace(":", "-")))
    assert "ip=10.78.0.14:10.77.0.1:10.78.0.1:255.255.255.0:node04:" in cfg4.decode(), cfg4
    assert "ip=10.77.0.11:10.77.0.1:10.77.0.1:255.255.255.0:node01:" in cfg1.decode(), cfg1


def test_dnsmasq_offer_to_a_pxe_client_says_pxeclient():
    """iPXE waits ~3 s for a ProxyDHCP offer after an offer without option 60 PXEClient (measured in the lab)."""
    dnsmasq = render_dnsmasq(load_plan(MATRIX)).splitlines()
    assert "dhcp-vendorclass=set:pxeclient,PXEClient" in dnsmasq
    assert "dhcp-option-force=tag:pxeclient,option:vendor-class,PXEClient" in dnsmasq
