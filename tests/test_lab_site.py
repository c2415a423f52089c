"""The site's own DHCP/TFTP servers in the lab (``lab.site``, :mod:`orchestrator.lab.site`).

Fast tier: the configs the lab gives the site's daemons pass the daemons' own
checks (``dnsmasq --test``, ``dhcpd -t``) and say what they must (addresses only
in proxy mode: no boot file, next-server, option 60 or 43), and plan conflicts
are refused with their fix.

Slow tier (root, QEMU under TCG), one VM rollout each, every one ending with
each node ``ready`` and exit 0:

* proxy: dnsmasq as the site's address-only DHCP server, bootorch's ProxyDHCP and
  TFTP beside it; one BIOS (SeaBIOS + iPXE ROM) and one UEFI (OVMF + edk2 PXE) node.
  The address is the site's (dnsmasq's DHCPACK for the plan's IP), the boot bootorch's
  (its proxy's evidence in the timeline). ISC dhcpd as the proxy-mode site server is
  covered by the fast ``dhcpd -t`` test of its address-only config and a start in the
  namespace without a VM (a second VM rollout would cost ~60 s).
* external (a): dnsmasq with its own TFTP runs ``bootorch render``'s dnsmasq.conf; one
  BIOS node; the log is renamed (and dnsmasq told with SIGUSR2, as logrotate's
  postrotate would) once the node's first line is in it.
* external (b): ISC dhcpd + tftp-hpa logging to busybox syslogd's file, host key by
  tftp-hpa's map file; one BIOS node; the syslog file is copytruncated mid-rollout.

In external mode every stage between ``waking`` and ``ssh`` must come from the
site's log (source ``log:...``), with that log line's text as its evidence.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.plan import PlanError, load_plan
from tests.conftest import REPO, require_root, require_tool

EXE = [sys.executable, "-m", "orchestrator"]
FULL_PLAN = REPO / "plans" / "full.yaml"
SSH_KEY = REPO / "var" / "lab" / "ssh" / "id_ed25519"
SUBNET = "10.81.0"


def site_plan(tmp_path: Path, *, mode: str, dhcp: str = "none", tftp: str = "none", nodes: int = 1,
              firmware: dict[str, str] | None = None, logs: list[dict[str, str]] | None = None,
              host_key: str = "per-node", name: str = "plan.yaml") -> tuple[Path, str]:
    """plans/full.yaml made ours: namespace ``bt-site-<hex>``, 10.81.0.0/24, MACs 52:54:00:81:00:xx, tmp dirs."""
    ns = f"bt-site-{secrets.token_hex(3)}"
    p = yaml.safe_load(FULL_PLAN.read_text())
    p["state_dir"] = str(tmp_path / "state")
    p["network"].update(namespace=ns, subnet=f"{SUBNET}.0/24", server=f"{SUBNET}.1", gateway=f"{SUBNET}.1")
    p["dhcp"]["mode"] = mode
    p["boot"]["root"] = str(tmp_path / "tftpboot")
    p["profiles"]["ramdisk"]["host_key"] = host_key
    p["nodes"] = [{"name": f"node{i:02d}", "mac": f"52:54:00:81:00:{i:02x}", "ip": f"{SUBNET}.{10 + i}", "group": "site"}
                  for i in range(1, nodes + 1)]
    p["power"]["bmc"]["address"] = f"http://{SUBNET}.1:9200/redfish/v1/Systems/{{name}}"
    p["power"]["bmc"]["password"] = {"file": str(tmp_path / "bmc.password")}
    p["rollout"]["waves"] = [{"name": "site", "nodes": "@site"}]
    p["readiness"]["ssh"]["key"] = str(SSH_KEY)
    if host_key == "none":
        p["readiness"]["ssh"]["host_key_policy"] = "tofu"
    p["metrics"]["listen"] = "127.0.0.1:0"
    p["lab"].update(namespace=ns, site={"dhcp": dhcp, "tftp": tftp})
    if firmware:
        p["lab"]["firmware"] = firmware
    if logs:
        p["logs"] = logs
    path = tmp_path / name
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path, ns


# --------------------------------------------------------------------------- fast: configs


def _check(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def test_address_only_dnsmasq_config_passes_dnsmasq_test_and_has_no_boot_options(tmp_path):
    from orchestrator.lab.site import address_only_dnsmasq

    dnsmasq = require_tool("dnsmasq", "/usr/sbin/dnsmasq")
    plan, _ = site_plan(tmp_path, mode="proxy", dhcp="dnsmasq", nodes=3)
    text = address_only_dnsmasq(load_plan(plan))
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(text)
    r = _check([dnsmasq, "--test", "-C", str(conf)])
    assert r.returncode == 0 and "syntax check OK" in r.stderr, r.stderr
    assert [ln for ln in text.splitlines() if ln.startswith("dhcp-host=")] == [
        f"dhcp-host=52:54:00:81:00:0{i},{SUBNET}.1{i},node0{i}" for i in (1, 2, 3)]
    assert f"dhcp-option=option:router,{SUBNET}.1" in text.splitlines()
    body = [ln for ln in text.splitlines() if not ln.startswith("#")]
    for forbidden in ("dhcp-boot", "pxe-service", "enable-tftp", "vendor-class", "option:vendor", "43", "pxe-prompt"):
        assert not [ln for ln in body if forbidden in ln], (forbidden, text)


def test_address_only_dhcpd_config_passes_dhcpd_t_and_has_no_boot_options(tmp_path):
    from orchestrator.lab.site import address_only_dhcpd

    dhcpd = require_tool("dhcpd", "/usr/sbin/dhcpd")
    plan, _ = site_plan(tmp_path, mode="proxy", dhcp="iscdhcpd", nodes=2)
    text = address_only_dhcpd(load_plan(plan))
    conf = tmp_path / "dhcpd.conf"
    conf.write_text(text)
    r = _check([dhcpd, "-4", "-t", "-cf", str(conf)])
    assert r.returncode == 0, r.stderr
    assert "fixed-address 10.81.0.12;" in text and "hardware ethernet 52:54:00:81:00:02;" in text
    body = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    for forbidden in ("filename", "next-server", "vendor-class", "vendor-option-space", "PXE", "option arch"):
        assert not [ln for ln in body if forbidden in ln], (forbidden, text)
    # ... and dhcpd -t does catch a broken one (the check is not a no-op).
    conf.write_text(text.replace("fixed-address 10.81.0.12;", "fixed-address 10.81.0.12"))
    assert _check([dhcpd, "-4", "-t", "-cf", str(conf)]).returncode != 0


def test_site_servers_refused_where_they_conflict_with_dhcp_mode(tmp_path):
    from orchestrator.lab.lab import LabError, Lab
    from orchestrator.lab.site import up
    from orchestrator.plan.model import LabSite

    assert LabSite(dhcp="dnsmasq").conflicts("proxy") == []
    assert LabSite(dhcp="iscdhcpd", tftp="tftp-hpa").conflicts("external") == []
    (full,) = LabSite(dhcp="dnsmasq").conflicts("full")
    assert "dhcp.mode: proxy" in full and "lab.site.dhcp: none" in full
    (tftp,) = LabSite(dhcp="dnsmasq", tftp="dnsmasq").conflicts("proxy")
    assert "set dhcp.mode: external" in tftp
    # The plan check refuses it (file, line, the same words), before a lab could start.
    plan, _ = site_plan(tmp_path, mode="full", dhcp="dnsmasq")
    with pytest.raises(PlanError, match="two DHCP servers"):
        load_plan(plan)
    # dnsmasq's TFTP cannot hand a host key to its own node only.
    plan, _ = site_plan(tmp_path, mode="external", dhcp="dnsmasq", tftp="dnsmasq", name="p2.yaml")
    with pytest.raises(LabError, match="tftp: tftp-hpa"):
        up(Lab(load_plan(plan)))
    assert not (tmp_path / "state" / "lab" / "site").exists()


def test_external_mode_configs_split_between_dhcp_and_tftp_servers(tmp_path):
    """render's dnsmasq.conf without its TFTP lines (tftp-hpa serves), and a TFTP-only dnsmasq (dhcpd serves DHCP)."""
    from orchestrator.lab.site import TFTP_MAP, _wants, tftp_only_dnsmasq
    from orchestrator.render import render_dnsmasq

    dnsmasq = require_tool("dnsmasq", "/usr/sbin/dnsmasq")
    plan, _ = site_plan(tmp_path, mode="external", dhcp="dnsmasq", tftp="tftp-hpa")
    wants = _wants(load_plan(plan))
    assert set(wants) == {"dnsmasq", "tftpd", "syslogd", "_tree"}
    conf = wants["dnsmasq"]["files"]["dnsmasq.conf"]
    active = [ln for ln in conf.splitlines() if not ln.startswith("#")]
    assert not [ln for ln in active if "tftp" in ln] and "dhcp-host=52:54:00:81:00:01,10.81.0.11,node01" in active
    assert wants["dnsmasq"]["ports"] == (67,) and wants["tftpd"]["files"] == {"tftpd.map": TFTP_MAP}
    assert "pxelinux.cfg/01-52-54-00-81-00-01" in wants["_tree"]["tree_files"]
    assert conf.replace("# (TFTP by another server) ", "") == render_dnsmasq(load_plan(plan))
    for i, text in enumerate((conf, tftp_only_dnsmasq(load_plan(plan)))):
        f = tmp_path / f"d{i}.conf"
        f.write_text(text)
        r = _check([dnsmasq, "--test", "-C", str(f)])
        assert r.returncode == 0, (r.stderr, text)


def test_a_config_the_daemon_rejects_is_a_lab_error_in_its_own_words(tmp_path):
    from orchestrator.lab.lab import LabError
    from orchestrator.lab.site import _test_config

    dhcpd = require_tool("dhcpd", "/usr/sbin/dhcpd")
    conf = tmp_path / "dhcpd.conf"
    conf.write_text("subnet 10.81.0.0 netmask 255.255.255.0 { option routers 10.81.0.1 }\n")
    with pytest.raises(LabError, match=r"site's dhcpd rejects its config .*semicolon expected"):
        _test_config("dhcpd", [dhcpd, "-4", "-t", "-cf", str(conf)])


# --------------------------------------------------------------------------- slow: VM rollouts


STAGES_TO_SSH = ["pxe_dhcp", "loader", "config", "kernel", "initrd", "os_dhcp"]
FULL = ["waking", *STAGES_TO_SSH, "ssh", "ready"]


@pytest.fixture
def lab_ready():
    require_root()
    require_tool("qemu-system-x86_64")
    for tool in ("dnsmasq", "dhcpd", "in.tftpd", "busybox"):
        require_tool(tool, f"/usr/sbin/{tool}", f"/bin/{tool}")


def build(plan: Path) -> None:
    r = subprocess.run([*EXE, "image", "build", str(plan), "--json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


def lab_down(plan: Path) -> None:
    subprocess.run([*EXE, "lab", "down", str(plan)], capture_output=True, text=True, timeout=300)


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> str:
    """Poll ``path`` until a line matches ``pattern``; the line. Fails when ``proc`` ends or time runs out."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < deadline:
        try:
            for line in path.read_text(errors="replace").splitlines():
                if rx.search(line):
                    return line
        except FileNotFoundError:
            pass
        assert proc.poll() is None, f"rollout ended (exit {proc.returncode}) before {pattern!r} appeared in {path}"
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} did not appear in {path} within {timeout:.0f}s")


def rollout(plan: Path, tmp_path: Path, *, during=None) -> dict:
    """``bootorch rollout PLAN --json`` (lab.manage: the lab comes up and goes down); ``during(proc)`` runs meanwhile."""
    out, err = tmp_path / "rollout.json", tmp_path / "rollout.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        p = subprocess.Popen([*EXE, "rollout", str(plan), "--json"], stdout=fo, stderr=fe, text=True, start_new_session=True)
        try:
            if during is not None:
                during(p)
            rc = p.wait(timeout=600)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)  # the outer rollout takes the lab down on its way out
                p.wait(timeout=120)
    assert rc == 0, err.read_text()[-4000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["ready"] == result["total"], result
    return {n["name"]: n for n in result["nodes"]}


def assert_site_stopped(plan: Path, ns: str) -> None:
    from orchestrator.lab import site

    loaded = load_plan(plan)
    assert ns not in namespaces()
    assert all(site.daemon_pid(loaded, name) is None for name in site.ORDER)
    assert not list(site.site_dir(loaded).glob("*.pid"))


@pytest.mark.slow
@pytest.mark.root
def test_proxy_beside_site_dnsmasq_bios_and_uefi(tmp_path, lab_ready):
    """Addresses from the site's dnsmasq (address-only config), boot files from bootorch's ProxyDHCP and TFTP."""
    plan, ns = site_plan(tmp_path, mode="proxy", dhcp="dnsmasq", nodes=2, firmware={"node02": "uefi"})
    build(plan)
    site_log = tmp_path / "state" / "lab" / "site" / "dnsmasq.log"
    try:
        nodes = rollout(plan, tmp_path)
    finally:
        lab_down(plan)
    for name, node in nodes.items():
        assert node["result"] == "ready" and node["attempts"] == 1, node
        assert [t["to"] for t in node["timeline"]] == FULL, (name, node["timeline"])
        ev = {t["to"]: t for t in node["timeline"]}
        # The boot came from bootorch: its ProxyDHCP saw the PXE ROM, its TFTP server sent the files.
        assert ev["pxe_dhcp"]["evidence"].startswith("proxydhcp: DISCOVER"), ev["pxe_dhcp"]
        assert ev["loader"]["evidence"].startswith("tftp: read "), ev["loader"]
        assert ev["kernel"]["evidence"].startswith("tftp: read vmlinuz"), ev["kernel"]
    assert "PXEClient:Arch:00000" in {t["to"]: t for t in nodes["node01"]["timeline"]}["pxe_dhcp"]["evidence"]
    assert "PXEClient:Arch:00007" in {t["to"]: t for t in nodes["node02"]["timeline"]}["pxe_dhcp"]["evidence"]
    assert "syslinux.efi" in {t["to"]: t for t in nodes["node02"]["timeline"]}["loader"]["evidence"]
    # ... and the addresses from the site's dnsmasq: its ACKs for the plan's reservations, to the PXE ROM
    # (the vendor class it logged) and to the OS.
    text = site_log.read_text()
    for i in (1, 2):
        acks = re.findall(rf"(\d+) DHCPACK\(br-boot\) 10\.81\.0\.1{i} 52:54:00:81:00:0{i} node0{i}", text)
        assert len(acks) >= 2, text[-3000:]
        assert re.search(rf"{acks[0]} vendor class: PXEClient", text), text[-3000:]
    # The address-only config: dnsmasq never offered a boot file or option 60 of its own.
    assert "pxelinux.0" not in text and "vendor-class  50:58" not in text
    assert_site_stopped(plan, ns)


@pytest.mark.slow
@pytest.mark.root
def test_proxy_beside_site_iscdhcpd_bios(tmp_path, lab_ready):
    """The same with ISC dhcpd as the site's address-only server (both bind port 67 in the namespace)."""
    plan, ns = site_plan(tmp_path, mode="proxy", dhcp="iscdhcpd")
    build(plan)
    syslog = tmp_path / "state" / "lab" / "site" / "syslog.log"
    try:
        nodes = rollout(plan, tmp_path)
    finally:
        lab_down(plan)
    node = nodes["node01"]
    assert [t["to"] for t in node["timeline"]] == FULL, node["timeline"]
    ev = {t["to"]: t["evidence"] for t in node["timeline"]}
    assert ev["pxe_dhcp"].startswith("proxydhcp: DISCOVER") and ev["loader"] == "tftp: read pxelinux.0 to 10.81.0.11", ev
    text = syslog.read_text()
    assert len(re.findall(r"dhcpd\[\d+\]: DHCPACK on 10\.81\.0\.11 to 52:54:00:81:00:01 via br-boot", text)) >= 2, text
    assert_site_stopped(plan, ns)


def external_evidence(node: dict, log_texts: str, sources: set[str]) -> None:
    """Every stage from pxe_dhcp to os_dhcp came from the site's log: its source, and a line that log holds."""
    assert node["result"] == "ready" and node["attempts"] == 1, node
    assert [t["to"] for t in node["timeline"]] == FULL, node["timeline"]
    lines = set(log_texts.splitlines())
    for t in node["timeline"]:
        if t["to"] in STAGES_TO_SSH:
            assert t["source"] in sources, t
            assert t["evidence"] in lines, t


@pytest.mark.slow
@pytest.mark.root
def test_external_dnsmasq_with_its_tftp_and_a_rename_rotation(tmp_path, lab_ready):
    """dnsmasq runs render's dnsmasq.conf (DHCP + TFTP); its log renamed mid-rollout, dnsmasq told by SIGUSR2."""
    from orchestrator.lab import site

    site_dir = tmp_path / "state" / "lab" / "site"
    log = site_dir / "dnsmasq.log"
    plan, ns = site_plan(tmp_path, mode="external", dhcp="dnsmasq", tftp="dnsmasq", host_key="none",
                         logs=[{"source": "dnsmasq", "path": str(log)}])
    build(plan)
    loaded = load_plan(plan)

    def rotate(proc: subprocess.Popen) -> None:
        # The PXE ROM's DHCP is done (its ACK logged); its TFTP comes later, into the new file.
        wait_for(log, r"DHCPACK\(br-boot\) 10\.81\.0\.11 52:54:00:81:00:01", proc, 240)
        pid = site.daemon_pid(loaded, "dnsmasq")
        assert pid is not None
        os.rename(log, log.with_name("dnsmasq.log.1"))
        os.kill(pid, signal.SIGUSR2)  # logrotate's postrotate: dnsmasq reopens its log file
        wait_for(log, r"dnsmasq", proc, 30)

    try:
        nodes = rollout(plan, tmp_path, during=rotate)
    finally:
        lab_down(plan)
    old, new = log.with_name("dnsmasq.log.1").read_text(), log.read_text()
    node = nodes["node01"]
    external_evidence(node, old + new, {"log:dnsmasq"})
    ev = {t["to"]: t["evidence"] for t in node["timeline"]}
    assert ev["pxe_dhcp"] in old.splitlines() and "DHCPDISCOVER(br-boot) 52:54:00:81:00:01" in ev["pxe_dhcp"]
    for stage in ("loader", "config", "kernel", "initrd", "os_dhcp"):
        assert ev[stage] in new.splitlines(), (stage, ev[stage])  # read from the file dnsmasq reopened
    assert ev["loader"].endswith(f"sent {tmp_path}/tftpboot/pxelinux.0 to 10.81.0.11"), ev["loader"]
    # render's pxelinux.cfg was served by the site, from the boot root
    assert (tmp_path / "tftpboot" / "pxelinux.cfg" / "01-52-54-00-81-00-01").is_file()
    assert_site_stopped(plan, ns)


@pytest.mark.slow
@pytest.mark.root
def test_external_iscdhcpd_tftp_hpa_syslog_and_a_copytruncate_rotation(tmp_path, lab_ready):
    """dhcpd + tftp-hpa run render's config and map file, logging through syslog; the file copytruncated mid-rollout."""
    site_dir = tmp_path / "state" / "lab" / "site"
    log = site_dir / "syslog.log"
    plan, ns = site_plan(tmp_path, mode="external", dhcp="iscdhcpd", tftp="tftp-hpa",
                         logs=[{"source": "syslog", "path": str(log)}])
    build(plan)

    def rotate(proc: subprocess.Popen) -> None:
        wait_for(log, r"dhcpd\[\d+\]: DHCPACK on 10\.81\.0\.11 to 52:54:00:81:00:01", proc, 240)
        shutil.copyfile(log, log.with_name("syslog.log.1"))  # logrotate's copytruncate: copy, then truncate in place
        os.truncate(log, 0)

    try:
        nodes = rollout(plan, tmp_path, during=rotate)
    finally:
        lab_down(plan)
    old, new = log.with_name("syslog.log.1").read_text(), log.read_text()
    assert "\0" not in new  # syslogd appends (O_APPEND): the truncated file has no hole
    node = nodes["node01"]
    external_evidence(node, old + new, {"log:iscdhcpd", "log:tftp-hpa"})
    ev = {t["to"]: t for t in node["timeline"]}
    assert ev["pxe_dhcp"]["source"] == "log:iscdhcpd" and ev["pxe_dhcp"]["evidence"] in old.splitlines()
    assert ev["loader"]["source"] == "log:tftp-hpa" and ev["loader"]["evidence"].endswith(
        "RRQ from 10.81.0.11 filename pxelinux.0")
    for stage in ("loader", "config", "kernel", "initrd", "os_dhcp"):
        assert ev[stage]["evidence"] in new.splitlines(), (stage, ev[stage])
    # The node got its own host key through tftp-hpa's map file (readiness pinned it: strict policy).
    # (tftp-hpa logs "remapped to" only when the rule changed the name; here it is the node's own already.)
    assert "RRQ from 10.81.0.11 filename hostkeys/10.81.0.11.cpio" in new
    assert "sending NAK" not in old + new
    assert_site_stopped(plan, ns)


@pytest.mark.slow
@pytest.mark.root
def test_lab_up_restarts_a_site_daemon_whose_config_changed_and_down_stops_all(tmp_path, lab_ready):
    """No VM boots: the lab's VMs stay paused. dhcpd and syslogd in the namespace, then a changed lease time."""
    from orchestrator.lab import lab as lab_mod
    from orchestrator.lab import site

    plan, ns = site_plan(tmp_path, mode="proxy", dhcp="iscdhcpd")
    plan.write_text(plan.read_text().replace("  namespace: " + ns + "\n  memory_mib", "  namespace: " + ns
                                             + "\n  accel: tcg\n  memory_mib"))
    build(plan)
    try:
        loaded = load_plan(plan)
        assert loaded.model.lab.accel == "tcg"
        lab_mod.up(loaded)
        first = {name: site.daemon_pid(loaded, name) for name in ("syslogd", "dhcpd")}
        assert all(first.values()), first
        st = lab_mod.status(loaded)["services"]["site"]
        assert st["daemons"] == {"syslogd": {"pid": first["syslogd"]}, "dhcpd": {"pid": first["dhcpd"]}}
        assert st["logs"]["syslog"] == str(tmp_path / "state" / "lab" / "site" / "syslog.log")
        # The same plan again: nothing restarts.
        lab_mod.up(loaded)
        assert {name: site.daemon_pid(loaded, name) for name in first} == first
        # dhcpd's config changes: it restarts (syslogd does not), and its new config is what it runs.
        plan.write_text(plan.read_text().replace("lease_time: 1h", "lease_time: 2h"))
        loaded = load_plan(plan)
        lab_mod.up(loaded)
        now = {name: site.daemon_pid(loaded, name) for name in first}
        assert now["syslogd"] == first["syslogd"] and now["dhcpd"] not in (None, first["dhcpd"])
        assert not Path(f"/proc/{first['dhcpd']}").exists()
        assert "default-lease-time 7200;" in (site.site_dir(loaded) / "dhcpd.conf").read_text()
        syslog = wait_for_text(site.log_paths(loaded)["syslog"], f"dhcpd[{now['dhcpd']}]: Server starting service.")
        assert "syslogd started" in syslog
        removed = lab_mod.down(loaded)
        assert f"site dhcpd {now['dhcpd']}" in removed and f"site syslogd {now['syslogd']}" in removed
        assert not any(Path(f"/proc/{pid}").exists() for pid in now.values())
    finally:
        lab_down(plan)
    assert_site_stopped(plan, ns)


def wait_for_text(path: Path, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path} within {timeout}s")
