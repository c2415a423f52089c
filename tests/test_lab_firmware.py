"""The lab's VM firmware per node (``lab.firmware``): bios, uefi, uefi-http, uefi-ipxe.

Fast tier: the QEMU command line each firmware gets, the UEFI memory floor, the
missing-package errors, and ``lab status`` naming each node's firmware.

Slow tier (root, QEMU, OVMF): the OVMF KVM probe under TCG (it must see OVMF's
boot manager) and its timeout path; a three-node lab, one node per UEFI
firmware, woken over QMP, whose first DHCPDISCOVERs a plain UDP listener in
the lab namespace records and scapy decodes (never our codec): option 93 and
the vendor class (60) / user class (77) each firmware is known to send. Then a
QMP ``system_reset`` must bring the edk2 node back to PXE over IPv4. A second
``lab up`` after the plan changed one node's firmware restarts that VM only.
Each lab is taken down also when a step fails.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.lab import lab as labmod
from orchestrator.lab import qmp as q
from orchestrator.plan import load_plan
from tests.test_lab import _wait
from tests.conftest import IN_CI, require_root, require_tool


def write_plan(tmp_path: Path, *, ns: str = "bt-fw-test", nodes: int = 3, firmware: object = "bios",
               memory_mib: int = 256, profile: str = "ramdisk", nfsroot: str = "{server}:/export/root,vers=4",
               extra_profiles: str = "") -> Path:
    """A small lab plan (accel tcg: no KVM probe) with ``nodes`` nodes on ``profile``."""
    text = f"""\
version: 1
name: fwtest
state_dir: {tmp_path}/state
network:
  namespace: {ns}
  interface: br-boot
  subnet: 10.77.0.0/24
  server: 10.77.0.1
boot:
  root: {tmp_path}/tftpboot
profiles:
  ramdisk:
    kernel: vmlinuz
    initrd: rootfs.gz
    root: initramfs
  nfs:
    kernel: vmlinuz
    initrd: rootfs.gz
    root: nfs
    nfsroot: "{nfsroot}"
{extra_profiles}nodes:
  - name: node[01-{nodes:02d}]
    mac: 52:54:00:77:30:01
    ip: 10.77.0.31
    profile: {profile}
lab:
  namespace: {ns}
  accel: tcg
  memory_mib: {memory_mib}
  firmware: {json.dumps(firmware)}
"""
    p = tmp_path / "plan.yaml"
    p.write_text(text)
    return p


THREE = {"node01": "uefi", "node02": "uefi-http", "node03": "uefi-ipxe"}


# ------------------------------------------------------------------------------ fast tier


def _argv(tmp_path: Path, **kw) -> tuple[labmod.Lab, dict[str, list[str]]]:
    plan = load_plan(write_plan(tmp_path, **kw))
    lab = labmod.Lab(plan)
    return lab, {n.name: lab.qemu_argv(n, "tcg") for n in plan.nodes}


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_bios_argv_is_seabios_with_the_nics_ipxe_rom(tmp_path):
    lab, argv = _argv(tmp_path, nodes=1)
    a = argv["node01"]
    assert _opt(a, "-machine") == ["pc"] and _opt(a, "-m") == ["256"]
    assert _opt(a, "-nic") == ["tap,ifname=tap0,script=no,downscript=no,model=e1000,mac=52:54:00:77:30:01"]
    assert _opt(a, "-fw_cfg") == [f"name=etc/sercon-port,file={lab.sercon_file}"]
    assert "-drive" not in a and "OVMF" not in " ".join(a)


def test_uefi_argvs(tmp_path):
    lab, argv = _argv(tmp_path, firmware=THREE)
    plan = lab.plan
    for node in plan.nodes:
        a = argv[node.name]
        assert _opt(a, "-machine") == ["q35"]
        assert _opt(a, "-drive") == [
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd",
            f"if=pflash,format=raw,unit=1,file={lab.dir}/{node.name}.OVMF_VARS.fd",
        ]
        assert _opt(a, "-netdev") == [f"tap,ifname={lab.tap(node)},script=no,downscript=no,id=net0"]
        assert _opt(a, "-boot") == ["order=n"] and "-nic" not in a
        assert not any("sercon" in x for x in a)  # OVMF writes to the serial port by itself
        assert _opt(a, "-serial") == [f"file:{lab.serial(node)}"] and "-S" in a and "-daemonize" in a
        assert _opt(a, "-m") == [str(labmod.UEFI_MIN_MEMORY_MIB)]  # 256 in the plan: raised for UEFI
    n1, n2, n3 = (argv[f"node0{i}"] for i in (1, 2, 3))
    # edk2's own PXE: virtio-net with no option ROM
    assert _opt(n1, "-device") == ["virtio-net-pci,netdev=net0,mac=52:54:00:77:30:01,romfile=,bootindex=0"]
    assert "-fw_cfg" not in n1
    # HTTP Boot first: PXE off in OVMF's fw_cfg knobs
    assert _opt(n2, "-device") == ["virtio-net-pci,netdev=net0,mac=52:54:00:77:30:02,romfile=,bootindex=0"]
    assert _opt(n2, "-fw_cfg") == ["name=opt/org.tianocore/IPv4PXESupport,string=no",
                                   "name=opt/org.tianocore/IPv6PXESupport,string=no"]
    # iPXE's EFI ROM: an e1000 with QEMU's default ROM (no romfile= override)
    assert _opt(n3, "-device") == ["e1000,netdev=net0,mac=52:54:00:77:30:03,bootindex=0"]
    assert "-fw_cfg" not in n3


def test_firmware_map_and_memory(tmp_path):
    lab, argv = _argv(tmp_path, nodes=3, firmware={"node[02-03]": "uefi", "node03": "uefi-http"}, memory_mib=512)
    assert [lab.firmware(n) for n in lab.plan.nodes] == ["bios", "uefi", "uefi-http"]  # later entries win
    assert [_opt(argv[n], "-m") for n in ("node01", "node02", "node03")] == [["512"]] * 3  # above the floor: kept


def test_missing_firmware_names_the_package(tmp_path, monkeypatch):
    plan = load_plan(write_plan(tmp_path, firmware=THREE))
    labmod.check_firmware_files(plan)  # installed here
    monkeypatch.setattr(labmod, "OVMF_VARS", tmp_path / "absent" / "OVMF_VARS.fd")
    with pytest.raises(labmod.LabError, match=r"OVMF_VARS\.fd is missing \(Debian: apt-get install ovmf\)"):
        labmod.check_firmware_files(plan)
    monkeypatch.undo()
    monkeypatch.setattr(labmod, "IPXE_EFI_ROM", tmp_path / "absent.rom")
    with pytest.raises(labmod.LabError, match="ipxe-qemu"):
        labmod.check_firmware_files(plan)
    # BIOS-only plans need neither
    (tmp_path / "b").mkdir()
    labmod.check_firmware_files(load_plan(write_plan(tmp_path / "b", nodes=2)))


def test_status_shows_each_nodes_firmware(tmp_path):
    plan = load_plan(write_plan(tmp_path, nodes=4, firmware={**THREE, "node04": "bios"}))
    st = labmod.status(plan)
    assert [(n["name"], n["firmware"], n["memory_mib"]) for n in st["nodes"]] == [
        ("node01", "uefi", 384), ("node02", "uefi-http", 384), ("node03", "uefi-ipxe", 384), ("node04", "bios", 256)]
    json.dumps(st)
    text = labmod.format_status(st)
    assert "FIRMWARE" in text and "uefi-http" in text and "uefi-ipxe" in text
    assert next(ln for ln in text.splitlines() if ln.startswith("node04")).split()[4] == "bios"


# ------------------------------------------------------------------------------ slow tier


def _require_ovmf() -> None:
    if not (labmod.OVMF_CODE.is_file() and labmod.OVMF_VARS.is_file()):
        msg = "OVMF not installed (apt-get install ovmf)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.mark.slow
def test_ovmf_probe(tmp_path):
    require_tool("qemu-system-x86_64")
    _require_ovmf()
    ok, why = labmod.ovmf_runs(tmp_path, accel="tcg", timeout=30)
    assert ok, why
    assert why.startswith("OVMF reached its boot manager in")
    ok, why = labmod.ovmf_runs(tmp_path, accel="tcg", timeout=0.3)  # far too short for OVMF under TCG
    assert not ok and "did not reach its boot manager" in why, why
    assert not list(tmp_path.glob("*.OVMF_VARS.fd"))
    if Path("/dev/kvm").exists():
        t0 = time.monotonic()
        ok, why = labmod.ovmf_runs(tmp_path, accel="kvm")
        print(f"\nOVMF under KVM here: {ok}: {why} ({time.monotonic() - t0:.1f}s)")
        assert why


#: Inside the lab namespace: record every BOOTP request on UDP 67 of the bridge (hex, one a line)
#: until each MAC in argv[2] has sent one or argv[3] seconds pass. No answers: only what the firmware sends.
_LISTENER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[1].encode())
s.bind(("0.0.0.0", 67))
want, seen = set(sys.argv[2].split(",")), set()
end = time.monotonic() + float(sys.argv[3])
print("ready", flush=True)
while not want <= seen and time.monotonic() < end:
    s.settimeout(max(0.05, end - time.monotonic()))
    try:
        data, _ = s.recvfrom(4096)
    except socket.timeout:
        break
    if len(data) >= 240 and data[0] == 1:
        seen.add(data[28:34].hex(":"))
        print(data.hex(), flush=True)
"""


def _decode(hexline: str) -> tuple[str, dict[str, object]]:
    """(client MAC, {option name: value}) as scapy decodes the BOOTP request."""
    from scapy.layers.dhcp import BOOTP, DHCP

    pkt = BOOTP(bytes.fromhex(hexline))
    opts = {o[0]: o[1] for o in pkt[DHCP].options if isinstance(o, tuple) and len(o) >= 2}
    return bytes(pkt.chaddr)[:6].hex(":"), opts


def _arch(value: object) -> int:
    if isinstance(value, (bytes, bytearray)):
        return int.from_bytes(value[:2], "big")
    if isinstance(value, (list, tuple)):
        return int(value[0])
    return int(value)  # type: ignore[arg-type]




@pytest.mark.slow
@pytest.mark.root
def test_uefi_nodes_send_their_firmwares_dhcp_discover(tmp_path):
    require_root()
    require_tool("qemu-system-x86_64")
    _require_ovmf()
    ns = f"bt-fw-{secrets.token_hex(3)}"
    plan = load_plan(write_plan(tmp_path, ns=ns, firmware=THREE))
    lab = labmod.Lab(plan)
    macs = {n.mac: n.name for n in plan.nodes}
    listener = None
    try:
        st = labmod.up(plan)
        assert {n["name"]: n["firmware"] for n in st["nodes"]} == THREE
        for node in plan.nodes:
            pid = labmod.qemu_pid(lab, node)
            assert labmod._cmdline(pid) == lab.qemu_argv(node, "tcg")  # the running VM has its firmware's argv
            assert lab.ovmf_vars(node).read_bytes() == labmod.OVMF_VARS.read_bytes()  # fresh default NVRAM
        listener = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _LISTENER, "br-boot", ",".join(macs), "150"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready", listener.stderr
        t0 = time.monotonic()
        for node in plan.nodes:
            assert q.power_on(str(lab.qmp(node)))
        out, err = listener.communicate(timeout=170)
        took = time.monotonic() - t0
        first: dict[str, dict[str, object]] = {}
        for line in out.split():
            mac, opts = _decode(line)
            if opts.get("message-type") == 1 and mac in macs:
                first.setdefault(macs[mac], opts)
        print(f"\nfirst DHCPDISCOVER of all three {took:.1f}s after power-on: "
              + "; ".join(f"{k}: 93={_arch(v['pxe_client_architecture'])} 60={v.get('vendor_class_id')!r} "
                          f"77={v.get('user_class')!r}" for k, v in sorted(first.items())))
        assert set(first) == set(THREE), (first, err)
        # edk2's own PXE stack (RFC 4578 arch 7: EFI x86-64)
        u = first["node01"]
        assert _arch(u["pxe_client_architecture"]) == 7
        assert u["vendor_class_id"] == b"PXEClient:Arch:00007:UNDI:003000" and "user_class" not in u
        # edk2 HTTP Boot, first thing the firmware tries (arch 16: EFI x86-64 HTTP)
        h = first["node02"]
        assert _arch(h["pxe_client_architecture"]) == 16
        assert h["vendor_class_id"] == b"HTTPClient:Arch:00016:UNDI:003000"
        # iPXE's EFI build from the NIC ROM
        i = first["node03"]
        assert _arch(i["pxe_client_architecture"]) == 7
        assert b"iPXE" in bytes(i["user_class"]) and bytes(i["vendor_class_id"]).startswith(b"PXEClient:Arch:00007")

        # A reset (what the BMC's power cycle does) boots from the network again.
        serial = lab.serial(plan.nodes[0])
        starts = serial.read_bytes().count(b">>Start PXE over IPv4")
        assert starts >= 1
        q.qmp(str(lab.qmp(plan.nodes[0])), "system_reset")
        _wait(lambda: serial.read_bytes().count(b">>Start PXE over IPv4") > starts, 90,
              "node01 to start PXE over IPv4 again after system_reset")
    finally:
        if listener is not None and listener.poll() is None:
            listener.kill()
            listener.wait(timeout=10)
        labmod.down(plan)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    assert not labmod.namespace_exists(ns)
    assert not any(lab.ovmf_vars(n).exists() for n in plan.nodes)



@pytest.mark.slow
@pytest.mark.root
def test_up_restarts_a_vm_whose_firmware_the_plan_changed(tmp_path):
    require_root()
    require_tool("qemu-system-x86_64")
    _require_ovmf()
    ns = f"bt-fw-{secrets.token_hex(3)}"
    plan_file = write_plan(tmp_path, ns=ns, nodes=2)
    plan = load_plan(plan_file)
    try:
        pids = {n["name"]: n["pid"] for n in labmod.up(plan)["nodes"]}
        plan_file.write_text(plan_file.read_text().replace('firmware: "bios"', 'firmware: {"node02": "uefi"}'))
        plan = load_plan(plan_file)
        st = labmod.up(plan)
        now = {n["name"]: n["pid"] for n in st["nodes"]}
        assert now["node01"] == pids["node01"] and now["node02"] != pids["node02"]  # only the changed VM
        assert [n["state"] for n in st["nodes"]] == ["paused", "paused"]
        cmd = labmod._cmdline(now["node02"])
        assert cmd == labmod.Lab(plan).qemu_argv(plan.nodes[1], "tcg") and "q35" in cmd
        assert {n["name"]: n["pid"] for n in labmod.up(plan)["nodes"]} == now  # and nothing more on the next up
    finally:
        labmod.down(plan)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    assert not labmod.namespace_exists(ns)
