"""The image's shell code (orchestrator.image.rootfs and templates/): busybox ``sh`` runs lib.sh's
functions, checks the rendered /init and the udhcpc script.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from orchestrator.image import READY_MARKER, rootfs
from orchestrator.image.rootfs import render_init
from orchestrator.plan import load_plan
from tests.image_helpers import busybox, lib_sh, run_sh, tiny_plan


@pytest.mark.parametrize(
    "spec, expect",
    [
        ("10.77.0.11:10.77.0.1:10.77.0.1:255.255.255.0:node01:eth0:off",
         "static|10.77.0.11|10.77.0.1|255.255.255.0|node01|eth0"),
        ("10.77.0.11:10.77.0.1::255.255.0.0:node01:eth1:off:10.77.0.53",
         "static|10.77.0.11||255.255.0.0|node01|eth1"),
        ("::::node02:eth0:dhcp", "dhcp||||node02|eth0"),
        ("dhcp", "dhcp|||||eth0"),
        ("", "dhcp|||||eth0"),
        ("off", "none|||||eth0"),
        (":::::eth0:off", "none|||||eth0"),
    ],
    ids=["static", "static-dns", "kernel-dhcp-form", "dhcp", "absent", "off", "no-client"],
)
def test_parse_ip(tmp_path: Path, spec: str, expect: str) -> None:
    out = run_sh(f'. {lib_sh(tmp_path)}; parse_ip "{spec}"; '
                 'echo "$ip_mode|$ip_client|$ip_gw|$ip_mask|$ip_host|$ip_dev"').strip()
    assert out == expect


def test_cmdline_ip_and_mask_bits(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("BOOT_IMAGE=vmlinuz initrd=rootfs.gz root=/dev/ram0 rw ip=1.2.3.4:::255.255.255.0:n:eth0:off console=ttyS0 *\n")
    lib = lib_sh(tmp_path)
    assert run_sh(f". {lib}; cmdline_ip {cmdline}").strip() == "1.2.3.4:::255.255.255.0:n:eth0:off"
    assert run_sh(f". {lib}; mask_bits 255.255.255.0; mask_bits 255.255.240.0; mask_bits 255.0.0.0").split() == [
        "24", "20", "8"]


def test_do_mount_completes_nfs_options(tmp_path: Path) -> None:
    """busybox-static has no NFS helper: the kernel gets text options and needs addr= (and vers=3)."""
    lib = lib_sh(tmp_path)
    out = run_sh(
        f'. {lib}; MOUNT="echo mount"; '
        f'do_mount 10.0.2.2:/usr {tmp_path}/usr nfs ro,nolock; '
        f'do_mount 10.0.2.2:/home {tmp_path}/home nfs rw,vers=4.2,addr=10.0.2.9; '
        f'do_mount tmpfs {tmp_path}/scratch tmpfs size=8m; '
        'run_command "exit 3"; run_command true'
    ).splitlines()
    assert out == [
        f"mount -t nfs -o ro,nolock,addr=10.0.2.2,vers=3 10.0.2.2:/usr {tmp_path}/usr",
        f"bootorch-image: mount: 10.0.2.2:/usr on {tmp_path}/usr",
        f"mount -t nfs -o rw,vers=4.2,addr=10.0.2.9 10.0.2.2:/home {tmp_path}/home",
        f"bootorch-image: mount: 10.0.2.2:/home on {tmp_path}/home",
        f"mount -t tmpfs -o size=8m tmpfs {tmp_path}/scratch",
        f"bootorch-image: mount: tmpfs on {tmp_path}/scratch",
        "bootorch-image: command failed (exit 3): exit 3",
    ]
    assert (tmp_path / "usr").is_dir()


def test_init_script_is_valid_shell_with_quoted_templates(tmp_path: Path) -> None:
    plan = load_plan(tiny_plan(
        tmp_path,
        mounts=[{"source": "{server}:/export/$home \"{name}\"", "target": "/mnt/{name}", "type": "nfs"}],
        commands=["echo 'it''s' \"$NODE_NAME\" > /run/x", "awk '{print $1}' /proc/loadavg"],
    ))
    prof = plan.model.profiles["ramdisk"]
    text = render_init(plan, "ramdisk", prof, "6.1.0-test", ["e1000"])
    script = tmp_path / "init"
    script.write_text(text)
    r = subprocess.run([busybox(), "sh", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert 'do_mount "10.0.2.2:/export/\\$home \\"${NODE_NAME}\\"" "/mnt/${NODE_NAME}" nfs ro,nolock' in text
    assert "run_command 'awk '\"'\"'{print $1}'\"'\"' /proc/loadavg'" in text
    assert READY_MARKER.split(": ")[1] in text
    # the quoting survives a real shell: the mount source becomes what the plan says
    line = next(x for x in text.splitlines() if x.startswith('do_mount "'))
    words = run_sh("NODE_NAME=n1; set -- " + line.removeprefix("do_mount ") + '; printf "%s\\n" "$@"')
    assert words.splitlines() == ['10.0.2.2:/export/$home "n1"', "/mnt/n1", "nfs", "ro,nolock"]
    udhcpc = tmp_path / "udhcpc.script"
    udhcpc.write_text(rootfs.UDHCPC_SCRIPT)
    assert subprocess.run([busybox(), "sh", "-n", str(udhcpc)], timeout=30).returncode == 0


def test_start_ssh_uses_the_delivered_key_else_generates_one(tmp_path: Path) -> None:
    """The node's own key when its key archive arrived; otherwise dropbear -R, and the console says why."""
    lib = lib_sh(tmp_path)
    key = tmp_path / "dropbear_ed25519_host_key"
    key.write_bytes(b"k" * 83)
    out = run_sh(f'. {lib}; DROPBEAR="echo dropbear"; start_ssh {key}; wait').splitlines()
    assert out[0] == "bootorch-image: ssh: this node's own host key (delivered by the boot server)"
    assert out[1] == f"dropbear -r {key} -p 22 -s -E -F -P /run/dropbear.pid"
    out = run_sh(f'. {lib}; DROPBEAR="echo dropbear"; start_ssh {tmp_path}/absent; wait').splitlines()
    assert "no host key was delivered" in out[0] and "dropbear -R" in out[0] and "refuse" in out[0]
    assert out[1] == "dropbear -R -p 22 -s -E -F -P /run/dropbear.pid"


def test_build_tree_makes_static_mount_targets(tmp_path: Path) -> None:
    """A read-only NFS root cannot make mount points at boot: the tree has the ones that name no per-node field."""
    from orchestrator.image.modules import ModuleSet
    from orchestrator.image.rootfs import build_tree
    from orchestrator.image.userland import Userland

    plan = load_plan(tiny_plan(tmp_path, mounts=[
        {"source": "tmpfs", "target": "/scratch/a", "type": "tmpfs"},
        {"source": "{server}:/home", "target": "/home/{name}", "type": "nfs"},
        {"source": "tmpfs", "target": "/var/run/x", "type": "tmpfs"},  # under a symlink: made at boot
        {"source": "tmpfs", "target": "/../etc/../opt", "type": "tmpfs"},
    ]))
    user = Userland(busybox=b"bb", applets=["bin/sh"], dropbear=b"db", libs={}, dropbearkey=[])
    tree = build_tree(plan, "ramdisk", plan.model.profiles["ramdisk"], user, ModuleSet([], []), "6.1.0-test", None)
    assert stat.S_ISDIR(tree.entries["scratch/a"].mode) and "scratch" in tree.entries
    assert "home" not in tree.entries and "var/run/x" not in tree.entries
    assert stat.S_ISDIR(tree.entries["opt"].mode)  # normalised: /../etc/../opt is /opt


def test_fetch_host_key_over_http_when_no_loader_delivered_it(tmp_path):
    """The EFI stub under Debian's 2019 ipxe.efi unpacks only the first initrd: /init then fetches the
    node's own archive from the boot server's HTTP and unpacks it (real busybox wget and cpio)."""
    import functools
    import http.server
    import threading

    from orchestrator.hostkeys import HOST_KEY_PATH, host_key_archive
    from tests.image_helpers import busybox, lib_sh

    served = tmp_path / "srv" / "hostkeys"
    served.mkdir(parents=True)
    (served / "127.0.0.1.cpio").write_bytes(host_key_archive(b"KEY-BYTES"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "srv"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/hostkeys"
        key = root / HOST_KEY_PATH

        def fetch(ip: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([busybox(), "sh", "-c", f'. {lib_sh(tmp_path)}; fetch_host_key {key} {url} {ip} {root}'],
                                  capture_output=True, text=True, timeout=60)

        r = fetch("10.9.9.9")  # not served: no key, says nothing, fails
        assert r.returncode != 0 and not key.exists() and r.stdout == ""
        r = fetch("127.0.0.1")
        assert r.returncode == 0, r.stderr
        assert key.read_bytes() == b"KEY-BYTES" and (key.stat().st_mode & 0o777) == 0o600
        assert f"host key fetched from {url}/127.0.0.1.cpio" in r.stdout
        assert not (root / "run" / "hostkey.cpio").exists()
        r = fetch("10.9.9.9")  # a key is there: nothing to fetch
        assert r.returncode == 0 and r.stdout == ""
    finally:
        httpd.shutdown()
        httpd.server_close()
