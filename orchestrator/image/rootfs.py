"""The image's root for one profile: the file tree, and the ``/init`` that brings the node up.

:func:`build_tree` lays out the root: busybox and its applet links, dropbear
and its libraries, the profile's kernel modules (listed in load order in
``/etc/bootorch/modules``), a minimal ``/etc``, root's ``authorized_keys``, an
empty ``/etc/dropbear`` (0700) where the node's own host key arrives in its
own archive (:func:`orchestrator.hostkeys.host_key_archive`), and a directory
for every mount target of the profile that names no per-node field (a
read-only NFS root cannot make them at boot). The same tree is the initramfs
of every profile and, for ``root: nfs``, the NFS root
(:func:`orchestrator.image.nfsroot.export_view`).

The image's shell code is in ``templates/``, read as package data:

- ``init.sh`` -- ``/init``, PID 1, in two stages. From the initramfs: mounts,
  kernel modules, the network (the kernel's ``ip=`` parameter, static or
  DHCP); with ``root=/dev/nfs`` it then mounts ``nfsroot=`` (NFSv4 unless the
  options say vers=3), gives that root tmpfs ``/run``, ``/tmp`` and
  ``/etc/dropbear`` (the host key copied in), moves ``/proc``, ``/sys`` and
  ``/dev`` there and ``switch_root``s into the NFS root's own ``/init`` with
  ``BOOTORCH_STAGE=nfsroot``, which skips modules and network; when the NFS
  root cannot be mounted it says ``nfsroot SERVER:PATH: mount failed: ...`` and
  stays in the initramfs without SSH. On the root the node runs on: the
  profile's mounts and commands, dropbear, then :data:`READY_MARKER` and
  busybox init. Its ``@NAME@`` fields are filled by :func:`render_init`;
- ``lib.sh`` -- ``/lib/bootorch.sh``, the shell functions ``/init`` uses
  (parsing ``ip=`` and ``nfsroot=``, mounts, the NFS root's mount and switch,
  commands, starting SSH); a file of its own so tests run them with the host's
  busybox;
- ``udhcpc.script`` -- ``/etc/udhcpc.script``, udhcpc's event script;
- ``inittab`` -- ``/etc/inittab`` for busybox init (a shell on the console).

The plan's mount and command templates become shell words here: ``{server}``
is filled in at build time, ``{name}``, ``{ip}`` and ``{mac}`` at boot from the
running system.
"""

from __future__ import annotations

import posixpath
import shlex
import stat
from importlib import resources

from orchestrator.hostkeys import HOST_KEY_DIR, HOST_KEY_PATH
from orchestrator.image.cpio import Tree
from orchestrator.image.modules import ModuleSet
from orchestrator.image.userland import MULTIARCH, Userland
from orchestrator.plan import LoadedPlan
from orchestrator.plan.model import Profile
from orchestrator.render import http_base

#: The line the image's init prints on the console once SSH accepts connections
#: (``say "ready ..."`` in templates/init.sh).
READY_MARKER = "bootorch-image: ready"


def _template(name: str) -> str:
    return resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


INIT_TEMPLATE = _template("init.sh")
LIB_SH = _template("lib.sh")
UDHCPC_SCRIPT = _template("udhcpc.script")
INITTAB = _template("inittab")


def _sh_template(template: str, server: str) -> str:
    """A plan template as a double-quoted shell word: {server} now, per-node fields at boot."""
    s = template.replace("{server}", server)
    s = s.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    for key, var in (("name", "NODE_NAME"), ("ip", "NODE_IP"), ("mac", "NODE_MAC")):
        s = s.replace("{" + key + "}", "${" + var + "}")
    return f'"{s}"'


def render_init(plan: LoadedPlan, pname: str, prof: Profile, kver: str, modules: list[str]) -> str:
    """``/init`` for profile ``pname``: templates/init.sh with the profile's values filled in."""
    server = str(plan.model.network.server)
    mounts = "\n".join(
        f"do_mount {_sh_template(m.source, server)} {_sh_template(m.target, server)} "
        f"{shlex.quote(m.type)} {shlex.quote(m.options)}"
        for m in prof.mounts
    ) or ": # no mounts"
    commands = "\n".join(f"run_command {shlex.quote(c)}" for c in prof.commands) or ": # no commands"
    text = INIT_TEMPLATE
    for k, v in {
        "@PROFILE@": pname,
        "@PLAN@": plan.path.name,
        "@KVER@": kver,
        "@SERVER@": server,
        "@MODULES@": " ".join(modules) or "none",
        "@MOUNTS@": mounts,
        "@COMMANDS@": commands,
        "@HOST_KEY_PATH@": HOST_KEY_PATH,
        "@HOST_KEY_URL@": f"{http_base(plan)}/{HOST_KEY_DIR}",
    }.items():
        text = text.replace(k, v)
    return text


def build_tree(
    plan: LoadedPlan,
    pname: str,
    prof: Profile,
    user: Userland,
    mods: ModuleSet,
    kver: str,
    authorized_key: str | None,
) -> Tree:
    """The RAM-disk root of profile ``pname``."""
    t = Tree()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "mnt", "var", "lib"):
        t.dir(d)
    t.dir("tmp", 0o1777)
    t.dir("root", 0o700)
    t.symlink("var/run", "/run")
    t.symlink("var/tmp", "/tmp")
    # /dev before devtmpfs is mounted: the kernel opens /dev/console for PID 1.
    t.chardev("dev/console", 5, 1, 0o600)
    t.chardev("dev/null", 1, 3, 0o666)

    t.file("bin/busybox", user.busybox, 0o755)
    for app in user.applets:
        if app != "bin/busybox" and not t.exists(app):
            t.symlink(app, "/bin/busybox")
    t.file("usr/sbin/dropbear", user.dropbear, 0o755)
    for path, data in user.libs.items():
        t.file(path, data, 0o755)
    t.symlink("lib64/ld-linux-x86-64.so.2", f"/lib/{MULTIARCH}/ld-linux-x86-64.so.2")

    for _name, rel, data in mods.load_order:
        t.file(f"lib/modules/{kver}/{rel}", data, 0o644)
    t.file("etc/bootorch/modules", "".join(f"{rel}\n" for _n, rel, _d in mods.load_order).encode())

    net = plan.model.network
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    t.file("etc/shadow", b"root:*:0:0:99999:7:::\n", 0o600)
    t.file("etc/group", b"root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    t.file("etc/shells", b"/bin/sh\n/bin/ash\n")
    t.file("etc/nsswitch.conf", b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n")
    t.file("etc/hosts", b"127.0.0.1\tlocalhost\n")
    resolv = "".join(f"nameserver {d}\n" for d in net.dns)
    if net.domain:
        resolv = f"search {net.domain}\n" + resolv
    t.file("etc/resolv.conf", resolv.encode())
    t.file("etc/profile", b'export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1="$(hostname):\\w# "\n')
    t.file("etc/inittab", INITTAB.encode())
    t.file("etc/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755)
    t.file("etc/bootorch/profile", f"{pname}\n".encode())
    t.file("lib/bootorch.sh", LIB_SH.encode())
    t.dir("etc/dropbear", 0o700)  # the node's host key arrives here in its own archive (hostkeys.host_key_archive)
    t.dir("root/.ssh", 0o700)
    if authorized_key:
        t.file("root/.ssh/authorized_keys", (authorized_key + "\n").encode(), 0o600)
    for m in prof.mounts:
        target = posixpath.normpath("/" + m.target.replace("{server}", str(net.server))).strip("/")
        if not target or "{" in target or ".." in target.split("/"):
            continue
        parts = target.split("/")
        along = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if all(p not in t.entries or stat.S_ISDIR(t.entries[p].mode) for p in along) and not t.exists(target):
            t.dir(target)
    names = [n for n, _r, _d in mods.load_order]
    t.file("init", render_init(plan, pname, prof, kver, names).encode(), 0o755)
    return t
