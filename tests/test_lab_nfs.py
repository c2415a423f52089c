"""The lab's NFS server: nfs-ganesha inside the lab namespace (:mod:`orchestrator.lab.nfs`, run by ``lab.py``).

Fast tier: which profiles the lab exports and at which pseudo path, the errors
for what it cannot serve, and the rendered ganesha.conf.

Slow tier (root, ganesha, libnfs's nfs-ls/nfs-cat/nfs-cp as an independent
NFSv4 client inside the namespace; the host kernel has no NFS client): ``lab
up`` with an NFS-root node serves a small tree read-only over NFSv4 (and not
over v3); a second ``up`` keeps the server; a changed nfsroot restarts it on the
new path; ``nfs_stop`` closes port 2049 and ``nfs_start`` opens it again;
``lab down`` leaves no process, PID file or namespace.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.lab import lab as labmod
from orchestrator.lab import nfs
from orchestrator.lab import procs
from orchestrator.plan import load_plan
from tests.conftest import require_root, require_tool
from tests.test_lab_firmware import write_plan

# ------------------------------------------------------------------------------ fast tier


def test_parse_nfsroot():
    assert nfs.parse_nfsroot("{server}:/export/root,vers=4,tcp") == ("{server}", "/export/root", "vers=4,tcp")
    assert nfs.parse_nfsroot("10.0.0.1:/r") == ("10.0.0.1", "/r", "")
    assert nfs.parse_nfsroot("/export/root,ro") == ("", "/export/root", "ro")


def _exports(tmp_path: Path, nfsroot: str, **kw) -> list[nfs.Export]:
    return nfs.plan_exports(load_plan(write_plan(tmp_path, nodes=2, profile="nfs", nfsroot=nfsroot, **kw)),
                            check_dirs=False)


@pytest.mark.parametrize("spec", ["{server}:/export/root,vers=4", "10.77.0.1:/export/root", "/export/root"])
def test_the_lab_serves_its_own_servers_nfsroot(tmp_path, spec):
    (ex,) = _exports(tmp_path, spec)
    assert ex == nfs.Export("nfs", tmp_path / "state" / "nfsroot" / "nfs", "/export/root")


def test_another_servers_nfsroot_and_unused_profiles_are_not_exported(tmp_path):
    assert _exports(tmp_path, "10.9.9.9:/export/root") == []
    # the nfs profile exists but no node boots it
    assert nfs.plan_exports(load_plan(write_plan(tmp_path, nodes=2)), check_dirs=False) == []


@pytest.mark.parametrize("spec, match", [
    ("{server}:/export/root/{name},rw", r"has \{name\}, but the lab exports one tree per profile"),
    ("{server}:/export/{ip}/{mac}", r"has \{ip\}, \{mac\}, but the lab exports one tree per profile"),
    ("{server}:/", "plain absolute path"),
    ("{server}:export/root", "plain absolute path"),
    ("{server}:/export/../etc", "plain absolute path"),
    ('{server}:/export/a\\"b', "plain absolute path"),
    ("{server}:/export/a b", "plain absolute path"),
])
def test_paths_the_lab_cannot_export(tmp_path, spec, match):
    with pytest.raises(nfs.NfsError, match=match):
        _exports(tmp_path, spec)


def test_overlapping_pseudo_paths_are_refused(tmp_path):
    extra = """  nfs2:
    kernel: vmlinuz
    root: nfs
    nfsroot: "{server}:/export/root/sub"
"""
    p = write_plan(tmp_path, nodes=2, profile="nfs", extra_profiles=extra)
    p.write_text(p.read_text().replace("lab:\n", "  - name: node09\n    mac: 52:54:00:77:30:09\n    ip: 10.77.0.39\n"
                                                  "    profile: nfs2\nlab:\n"))
    with pytest.raises(nfs.NfsError, match="overlap"):
        nfs.plan_exports(load_plan(p), check_dirs=False)


def test_missing_tree_says_to_build_it(tmp_path):
    plan = load_plan(write_plan(tmp_path, nodes=1, profile="nfs"))
    with pytest.raises(nfs.NfsError, match=r"does not exist: run `bootorch image build .*plan\.yaml` first"):
        nfs.plan_exports(plan)
    plan.nfs_export("nfs").mkdir(parents=True)
    assert [e.path for e in nfs.plan_exports(plan)] == [plan.nfs_export("nfs")]


def test_rendered_config(tmp_path):
    plan = load_plan(write_plan(tmp_path, nodes=1, profile="nfs"))
    lab = labmod.Lab(plan)
    text = nfs.render_config(plan, nfs.plan_exports(plan, check_dirs=False), lab.dir)
    flat = [ln.split("#")[0].strip() for ln in text.splitlines()]
    for line in ("Protocols = 4;", "Bind_addr = 10.77.0.1;", "NFS_Port = 2049;", "Enable_NLM = false;",
                 "Enable_RQUOTA = false;", "Enable_UDP = false;", "Graceless = true;", "Only_Numeric_Owners = true;",
                 f'RecoveryRoot = "{lab.dir}/nfs-recovery";', "Export_Id = 1;",
                 f'Path = "{tmp_path}/state/nfsroot/nfs";', 'Pseudo = "/export/root";', "Transports = TCP;",
                 "Squash = None;", "SecType = sys;", "FSAL { Name = VFS; }",
                 "CLIENT { Clients = 10.77.0.0/24; Access_Type = RO; Protocols = 4; }"):
        assert line in flat, line
    assert text.count("{") == text.count("}") and text.count("EXPORT {") == 1
    assert "/var/lib/nfs" not in text


def test_nothing_to_serve_for_a_bios_ramdisk_plan(tmp_path):
    plan = load_plan(write_plan(tmp_path, nodes=2))
    st = labmod.nfs_status(plan)
    assert st["exports"] == [] and not st["running"] and st["problem"] is None
    assert "nfs:" not in labmod.format_status(labmod.status(plan))


@pytest.mark.root
def test_up_stops_before_creating_anything_when_the_tree_is_missing(tmp_path):
    require_root()
    require_tool("qemu-system-x86_64")
    ns = f"bt-nfs-{secrets.token_hex(3)}"
    plan = load_plan(write_plan(tmp_path, ns=ns, nodes=1, profile="nfs"))
    with pytest.raises(labmod.LabError, match="bootorch image build"):
        labmod.up(plan)
    assert not labmod.namespace_exists(ns)


# ------------------------------------------------------------------------------ slow tier


def _in_ns(ns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout)


def _connects(ns: str, host: str, port: int) -> bool:
    cp = _in_ns(ns, sys.executable, "-c", f"import socket; socket.create_connection(({host!r}, {port}), timeout=3)")
    return cp.returncode == 0


def _alive(pid: int) -> bool:
    return bool(procs.cmdline(pid)) and procs.state(pid) not in ("Z", "")


@pytest.mark.slow
@pytest.mark.root
def test_nfs_server_lifecycle(tmp_path):
    require_root()
    require_tool("ganesha.nfsd")
    require_tool("nfs-ls")
    require_tool("qemu-system-x86_64")
    ns = f"bt-nfs-{secrets.token_hex(3)}"
    plan_file = write_plan(tmp_path, ns=ns, nodes=1, profile="nfs")
    plan = load_plan(plan_file)
    lab = labmod.Lab(plan)
    tree = plan.nfs_export("nfs")
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("from-the-lab\n")
    (tmp_path / "other" / "etc").mkdir(parents=True)
    (tmp_path / "other" / "etc" / "motd").write_text("second tree\n")
    url = "nfs://10.77.0.1/export/root"
    pids: list[int] = []
    try:
        st = labmod.up(plan)
        assert st["nfs"]["running"] and st["nfs"]["exports"][0]["pseudo"] == "/export/root", st["nfs"]
        pid = st["nfs"]["pid"]
        pids.append(pid)
        in_ns = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout.split()
        assert str(pid) in in_ns  # ganesha runs inside the lab namespace
        assert procs.cmdline(pid)[0] == "ganesha.nfsd"  # the sh wrapper exec'd it: the PID is ganesha's

        ls = _in_ns(ns, "nfs-ls", f"{url}/etc?version=4")
        assert ls.returncode == 0 and "hostname" in ls.stdout, ls
        assert ls.stdout.split()[2:4] == ["0", "0"], ls.stdout  # numeric owners: root stays root
        cat = _in_ns(ns, "nfs-cat", f"{url}/etc/hostname?version=4")
        assert cat.stdout == "from-the-lab\n", cat
        src = tmp_path / "new.txt"
        src.write_text("x")
        cp = _in_ns(ns, "nfs-cp", str(src), f"{url}/etc/new.txt?version=4")
        assert cp.returncode != 0 and "ROFS" in cp.stdout + cp.stderr, cp  # read-only export
        assert not (tree / "etc" / "new.txt").exists()
        v3 = _in_ns(ns, "nfs-ls", f"{url}/etc?version=3")
        assert v3.returncode != 0, v3  # NFSv4 only: no MOUNT protocol, no portmapper
        assert "Graceless is true" in nfs.log_file(lab.dir).read_text()

        # idempotent: a second up keeps the running server
        assert labmod.up(plan)["nfs"]["pid"] == pid

        # a changed nfsroot restarts the server on the new path
        plan_file.write_text(plan_file.read_text().replace("/export/root,vers=4", "/srv/root2"))
        plan2 = load_plan(plan_file)
        plan2.nfs_export("nfs").rename(tmp_path / "tree-keep")
        (tmp_path / "other").rename(plan2.nfs_export("nfs"))
        st = labmod.up(plan2)
        pid2 = st["nfs"]["pid"]
        pids.append(pid2)
        assert pid2 != pid and not _alive(pid)
        cat = _in_ns(ns, "nfs-cat", "nfs://10.77.0.1/srv/root2/etc/motd?version=4")
        assert cat.stdout == "second tree\n", cat
        assert _in_ns(ns, "nfs-ls", f"{url}?version=4").returncode != 0  # the old path is gone

        # stop mid-boot and start again
        assert labmod.nfs_stop(plan2) == pid2
        assert not _alive(pid2) and not nfs.pid_file(lab.dir).exists() and labmod.nfs_pid(plan2) is None
        assert not _connects(ns, "10.77.0.1", 2049)
        assert labmod.nfs_stop(plan2) is None  # nothing left to stop
        pid3 = labmod.nfs_start(plan2)
        pids.append(pid3)
        assert _connects(ns, "10.77.0.1", 2049) and labmod.nfs_pid(plan2) == pid3
        assert "motd" in _in_ns(ns, "nfs-ls", "nfs://10.77.0.1/srv/root2/etc?version=4").stdout

        removed = labmod.down(plan2)
        assert f"nfs {pid3}" in removed and f"namespace {ns}" in removed
    finally:
        labmod.down(load_plan(plan_file))
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    assert not any(_alive(p) for p in pids)
    assert not labmod.namespace_exists(ns)
    assert not nfs.pid_file(lab.dir).exists() and not nfs.recovery_dir(lab.dir).exists()
    assert nfs.conf_file(lab.dir).exists() and nfs.log_file(lab.dir).exists()  # kept for post-mortems
    # the socket hiding happened in ganesha's own mount namespace, never in ours
    assert not any(s in Path("/proc/self/mountinfo").read_text() for s in ("rpcbind.sock", "system_bus_socket"))


def test_server_argv_runs_ganesha_in_the_namespace_in_the_foreground(tmp_path):
    argv = nfs.server_argv(tmp_path, "ns1")
    assert argv[:6] == ["ip", "netns", "exec", "ns1", "sh", "-c"] and argv[7] == "bootorch-nfs"
    assert argv[8:] == ["ganesha.nfsd", "-F", "-f", f"{tmp_path}/ganesha.conf", "-L", f"{tmp_path}/nfs.log",
                        "-p", f"{tmp_path}/nfs.pid", "-N", "NIV_EVENT"]
    assert all(s in argv[6] for s in nfs.HIDDEN_SOCKETS)


@pytest.mark.root
def test_the_wrapper_hides_a_unix_socket_from_what_it_execs(tmp_path):
    """The sh wrapper, on a socket of our own in a mount namespace of its own: what it execs cannot connect."""
    import socket

    require_root()
    require_tool("unshare")
    path = tmp_path / "host.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    check = f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})"
    try:
        plain = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=30)
        assert plain.returncode == 0, plain.stderr
        hidden = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                 nfs._WRAPPER.format(socks=f"{path} {tmp_path}/absent.sock"), "bootorch-nfs",
                                 sys.executable, "-c", check], capture_output=True, text=True, timeout=30)
        assert hidden.returncode != 0 and "Connection refused" in hidden.stderr, hidden
        assert str(path) not in Path("/proc/self/mountinfo").read_text()  # only the child's mount namespace
    finally:
        srv.close()
