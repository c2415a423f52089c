"""``bootorch image build`` for real (orchestrator.image.build): builds from Debian's packages and a QEMU
boot of the result (slow tier: the first build downloads ~75 MB of .debs into var/cache/debs; later
builds take seconds), and the checks a build makes before any download (fast tier).

Independent decoders: a separate newc reader lists the image, paramiko logs into the booted image.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import image
from orchestrator.hostkeys import host_key_archive
from orchestrator.image import READY_MARKER, ImageError
from orchestrator.image.elf import elf_needed
from orchestrator.plan import load_plan
from tests.conftest import REPO, require_tool
from tests.image_helpers import parse_newc, tiny_plan


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, image.ImageReport]:
    """One real build into a temporary plan directory, from the shared package cache."""
    require_tool("apt-get")
    require_tool("dpkg")
    d = tmp_path_factory.mktemp("image")
    plan = tiny_plan(
        d,
        mounts=[{"source": "tmpfs", "target": "/scratch", "type": "tmpfs", "options": "size=8m"}],
        commands=["echo hello from $NODE_NAME at $NODE_IP > /run/hello"],
    )
    report = image.build_images(load_plan(plan), log=lambda m: print(m, file=sys.stderr))
    return d, report


@pytest.mark.slow
def test_build_writes_every_file(built: tuple[Path, image.ImageReport]) -> None:
    d, report = built
    names = {f.name for f in report.files}
    # the plan's default loaders: BIOS pxelinux.0, UEFI syslinux.efi (+ its ldlinux.e64), UEFI HTTP ipxe.efi
    assert names == {"vmlinuz", "rootfs.gz", "pxelinux.0", "ldlinux.c32", "syslinux.efi", "ldlinux.e64", "ipxe.efi"}
    assert {f.name: f.source.split("_")[0] for f in report.files if f.role == "loader"} == {
        "pxelinux.0": "pxelinux", "ldlinux.c32": "syslinux-common", "syslinux.efi": "syslinux-efi",
        "ldlinux.e64": "syslinux-common", "ipxe.efi": "ipxe"}
    assert (d / "tftpboot" / "ipxe.efi").read_bytes()[:2] == b"MZ"  # the package's PE image, not its symlink's host target
    assert not report.warnings
    for f in report.files:
        path = d / "tftpboot" / f.name
        assert path.is_file() and not path.is_symlink()
        assert path.stat().st_size == f.size and sha256_of(path) == f.sha256
    assert report.kernel_release.startswith("6.")
    assert (d / "ssh" / "id_ed25519").exists() and (d / "ssh" / "id_ed25519.pub").exists()

    entries = {e["name"]: e for e in parse_newc(gzip.decompress((d / "tftpboot" / "rootfs.gz").read_bytes()))}
    for must in ("init", "bin/busybox", "bin/sh", "sbin/udhcpc", "usr/sbin/dropbear",
                 "lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                 "lib64/ld-linux-x86-64.so.2", "etc/dropbear",
                 "root/.ssh/authorized_keys", "etc/bootorch/modules", "dev/console"):
        assert must in entries, must
    # The shared image holds no host key: each node has its own, outside the boot root, pinned for readiness.
    assert not [n for n in entries if "host_key" in n]
    assert report.host_key is None and list(report.host_keys) == ["node01"]
    private = d / "state" / "hostkeys" / "node01" / "dropbear_ed25519_host_key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and not private.is_relative_to(d / "tftpboot")
    assert (d / "state" / "known_hosts").read_text().split() == ["10.0.2.15", *report.host_keys["node01"].split()[:2]]
    assert report.known_hosts == str(d / "state" / "known_hosts")
    assert entries["root/.ssh/authorized_keys"]["data"].decode().strip() == report.authorized_key
    mods = entries["etc/bootorch/modules"]["data"].decode().split()
    assert any(m.endswith("/e1000.ko") for m in mods)
    assert all(f"lib/modules/{report.kernel_release}/{m}" in entries for m in mods)
    # every library dropbear (and its libraries) need is in the image
    for name, e in entries.items():
        if name.startswith(("usr/sbin/dropbear", "lib/x86_64-linux-gnu/")) and e["data"][:4] == b"\x7fELF":
            for so in elf_needed(e["data"])[1]:
                assert f"lib/x86_64-linux-gnu/{so}" in entries, (name, so)


@pytest.mark.slow
def test_build_twice_gives_identical_sha256(built: tuple[Path, image.ImageReport], tmp_path: Path) -> None:
    d, first = built
    # Same plan, fresh boot root, through the command line this time.
    plan = d / "plan.yaml"
    other = tmp_path / "plan.yaml"
    text = json.loads(plan.read_text())
    text["boot"]["root"] = str(tmp_path / "tftpboot2")
    text["readiness"]["ssh"]["key"] = str(d / "ssh" / "id_ed25519")
    other.write_text(json.dumps(text))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "orchestrator.image", "build", str(other), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    warm = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    second = json.loads(r.stdout)
    assert second["ok"] is True
    assert {f["name"]: f["sha256"] for f in second["files"]} == {f.name: f.sha256 for f in first.files}
    for f in first.files:
        assert sha256_of(tmp_path / "tftpboot2" / f.name) == f.sha256
    # Another state directory, so other host keys: the shared files do not change with them.
    assert second["host_keys"]["node01"] != first.host_keys["node01"]
    assert second["known_hosts"] == str(tmp_path / "state" / "known_hosts")
    assert warm < 120, f"a warm-cache build took {warm:.0f} s"


@pytest.mark.slow
def test_source_date_epoch_changes_only_the_image(built: tuple[Path, image.ImageReport],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    d, first = built
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    text = json.loads((d / "plan.yaml").read_text())
    text["boot"]["root"] = "tftpboot-sde"
    (d / "plan-sde.yaml").write_text(json.dumps(text))
    report = image.build_images(load_plan(d / "plan-sde.yaml"), log=lambda m: None)
    before = {f.name: f.sha256 for f in first.files}
    after = {f.name: f.sha256 for f in report.files}
    assert after["vmlinuz"] == before["vmlinuz"] and after["rootfs.gz"] != before["rootfs.gz"]
    assert report.host_keys == first.host_keys  # same state directory: the node keeps its key across builds
    entries = parse_newc(gzip.decompress((d / "tftpboot-sde" / "rootfs.gz").read_bytes()))
    assert {e["mtime"] for e in entries} == {1700000000}


def test_ramdisk_profile_without_initrd_fails_before_any_download(tmp_path: Path) -> None:
    plan = load_plan(tiny_plan(tmp_path, initrd=[], root="ramdisk"))
    with pytest.raises(ImageError, match="needs an initrd"):
        image.build_images(plan, cache_dir=tmp_path / "cache", log=lambda m: None)
    assert not list((tmp_path / "cache").glob("*.deb")) if (tmp_path / "cache").exists() else True


# --------------------------------------------------------------------------- booting it (slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BOOT_TIMEOUT = 150.0


def initrds_as_a_loader_concatenates_them(parts: list[bytes]) -> bytes:
    """What pxelinux and iPXE hand the kernel for ``initrd=a,b``: each file from a 4-byte boundary, zero-padded."""
    return b"".join(p + b"\0" * (-len(p) % 4) for p in parts)


@pytest.mark.slow
@pytest.mark.parametrize(
    "cmdline, with_key",
    [
        # plans/full.yaml's profile: initramfs root, the kernel's ip=dhcp form -> udhcpc; the node's key delivered
        ("console=ttyS0 panic=10 ip=::::node01:eth0:dhcp", True),
        # the seed's form: root: ramdisk, static ip= (no second DHCP round); the key archive did not arrive
        ("console=ttyS0 panic=10 root=/dev/ram0 rw ramdisk_size=65536 "
         "ip=10.0.2.15:10.0.2.2:10.0.2.2:255.255.255.0:node01:eth0:off", False),
    ],
    ids=["dhcp-own-key", "static-ramdisk-no-key"],
)
def test_image_boots_to_ssh(built: tuple[Path, image.ImageReport], tmp_path: Path, cmdline: str, with_key: bool) -> None:
    """QEMU (TCG) boots the kernel + image (+ the node's key archive, concatenated as a
    loader does) directly; the console shows the ready marker and SSH through user-mode
    networking (restrict=on, host forward on 127.0.0.1 only) presents node01's own host
    key and runs commands with the plan's key. Without the archive the node makes a key
    at boot, and readiness refuses it, naming that cause."""
    import trio

    from orchestrator.readiness import Readiness

    qemu = require_tool("qemu-system-x86_64")
    paramiko = pytest.importorskip("paramiko")
    d, report = built
    boot = d / "tftpboot"
    port = free_port()
    log = tmp_path / "serial.log"
    initrd = tmp_path / "initrd"
    parts = [(boot / "rootfs.gz").read_bytes()]
    if with_key:
        key = (d / "state" / "hostkeys" / "node01" / "dropbear_ed25519_host_key").read_bytes()
        parts.append(host_key_archive(key))
    initrd.write_bytes(initrds_as_a_loader_concatenates_them(parts))
    cmd = [
        qemu, "-accel", "tcg", "-m", "256", "-smp", "1", "-display", "none", "-monitor", "none",
        "-no-reboot", "-serial", f"file:{log}",
        "-kernel", str(boot / "vmlinuz"), "-initrd", str(initrd), "-append", cmdline,
        "-nic", f"user,model=e1000,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while True:
            text = log.read_text(errors="replace") if log.exists() else ""
            if READY_MARKER in text:
                break
            assert proc.poll() is None, f"QEMU exited ({proc.returncode}):\n{text[-3000:]}"
            assert time.monotonic() - t0 < BOOT_TIMEOUT, f"no ready marker in {BOOT_TIMEOUT} s:\n{text[-3000:]}"
            time.sleep(0.5)
        ready_after = time.monotonic() - t0
        print(f"boot to ready marker: {ready_after:.1f} s (TCG)", file=sys.stderr)
        assert "Run /init as init process" in text
        assert "insmod" not in text.split(READY_MARKER)[0]  # init reports only failed insmods
        if "dhcp" in cmdline.split("ip=")[1]:
            assert "bootorch-image: dhcp bound: 10.0.2.15" in text
        else:
            assert "bootorch-image: network: static 10.0.2.15/24 on eth0" in text

        host_type, host_b64 = report.host_keys["node01"].split()[:2]
        client = paramiko.SSHClient()
        if with_key:
            assert "bootorch-image: ssh: this node's own host key" in text
            # strict: the host key must be node01's own, as the build reported it
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            client.get_host_keys().add(f"[127.0.0.1]:{port}", host_type, paramiko.Ed25519Key(data=base64.b64decode(host_b64)))
        else:
            assert "no host key was delivered" in text
            known = tmp_path / "known_hosts"
            known.write_text(f"[127.0.0.1]:{port} {host_type} {host_b64}\n")
            hint = "node01's own host key"
            r = Readiness(known_hosts=known, policy="tofu", checks=[], port=port, key_file=d / "ssh" / "id_ed25519",
                          pinned={"127.0.0.1": hint}, step_timeout=60)
            v = trio.run(r.check, "127.0.0.1")
            assert v.host_key_error and "CHANGED" in v.error and hint in v.error and "did not get its host key" in v.error
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # the rest: what the image does anyway
        client.connect("127.0.0.1", port=port, username="root", key_filename=str(d / "ssh" / "id_ed25519"),
                       allow_agent=False, look_for_keys=False, timeout=30, banner_timeout=60, auth_timeout=60)
        try:
            def run(c: str) -> str:
                _i, out, _e = client.exec_command(c, timeout=30)
                data = out.read().decode()
                assert out.channel.recv_exit_status() == 0, c
                return data.strip()

            assert run("uname -r") == report.kernel_release
            assert run("awk '$2 == \"/\" {print $3}' /proc/mounts") == "rootfs"
            assert run("pidof dropbear")
            assert run("hostname") == "node01"
            assert run("cat /run/hello") == "hello from node01 at 10.0.2.15"
            assert run("awk '$2 == \"/scratch\" {print $3}' /proc/mounts") == "tmpfs"
            assert "e1000" in run("lsmod")
        finally:
            client.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.slow
def test_pxe_chain_boots_the_image(built: tuple[Path, image.ImageReport], tmp_path: Path) -> None:
    """The whole BIOS path with the files the build placed: QEMU's iPXE ROM
    (Debian's ipxe-qemu) gets pxelinux.0 from user-mode networking's TFTP,
    pxelinux loads ldlinux.c32 and the node's rendered config, then the kernel,
    the image and the node's host-key archive (``initrd=rootfs.gz,hostkeys/...``),
    and the node comes up to the ready marker presenting its own host key."""
    import paramiko

    from orchestrator.protocols.pxelinux import mac_config_name
    from orchestrator.render import render_all

    qemu = require_tool("qemu-system-x86_64")
    d, report = built
    plan = load_plan(d / "plan.yaml")
    node = plan.nodes[0]
    root = tmp_path / "tftp"
    root.mkdir()
    for f in ("pxelinux.0", "ldlinux.c32", "vmlinuz", "rootfs.gz"):
        (root / f).write_bytes((d / "tftpboot" / f).read_bytes())
    rendered = render_all(plan)  # the bytes bootorch's server answers this node with
    cfg_name = f"pxelinux.cfg/{mac_config_name(node.mac)}"
    assert "initrd=rootfs.gz,hostkeys/10.0.2.15.cpio " in rendered[cfg_name].decode()
    for name in (cfg_name, "hostkeys/10.0.2.15.cpio"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(rendered[name])
    # SERIAL: pxelinux's own messages go to the VGA console unless told.
    (root / cfg_name).write_bytes(b"SERIAL 0 115200\n" + rendered[cfg_name])
    log = tmp_path / "serial.log"
    port = free_port()
    cmd = [
        qemu, "-accel", "tcg", "-m", "256", "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{log}", "-boot", "n",
        "-nic", f"user,model=e1000,mac={node.mac},restrict=on,tftp={root},bootfile=pxelinux.0,"
                f"hostfwd=tcp:127.0.0.1:{port}-:22",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while True:
            text = log.read_text(errors="replace") if log.exists() else ""
            if READY_MARKER in text:
                break
            assert proc.poll() is None, f"QEMU exited ({proc.returncode}):\n{text[-3000:]}"
            assert time.monotonic() - t0 < BOOT_TIMEOUT + 60, f"no ready marker:\n{text[-3000:]}"
            time.sleep(0.5)
        print(f"PXE boot to ready marker: {time.monotonic() - t0:.1f} s (TCG)", file=sys.stderr)
        assert "PXELINUX 6" in text and "Loading vmlinuz" in text and "Loading rootfs.gz" in text
        assert "Loading hostkeys/10.0.2.15.cpio" in text
        assert "ip=::::node01:eth0:dhcp" in text  # the rendered command line reached the kernel
        assert "bootorch-image: dhcp bound:" in text
        assert "bootorch-image: ssh: this node's own host key" in text
        host_type, host_b64 = report.host_keys["node01"].split()[:2]
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.get_host_keys().add(f"[127.0.0.1]:{port}", host_type, paramiko.Ed25519Key(data=base64.b64decode(host_b64)))
        client.connect("127.0.0.1", port=port, username="root", key_filename=str(d / "ssh" / "id_ed25519"),
                       allow_agent=False, look_for_keys=False, timeout=30, banner_timeout=60, auth_timeout=60)
        client.close()
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()
