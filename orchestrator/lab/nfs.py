"""The lab's NFS server: what nfs-ganesha exports and how it is configured and run.

This module knows ganesha; :mod:`orchestrator.lab.lab` starts and stops it
(``lab up``/``down``, :func:`~orchestrator.lab.lab.nfs_start`,
:func:`~orchestrator.lab.lab.nfs_stop`) like the lab's other processes.

When a node of the plan boots a profile with ``root: nfs`` whose ``nfsroot``
names this lab's server (``{server}``, ``network.server``, or no server part at
all -- the kernel then uses the boot server ``ip=`` found), ``lab up`` runs
``ganesha.nfsd -F`` inside the lab namespace, bound to ``network.server:2049``,
with one EXPORT per such profile:

* ``Path``: ``plan.nfs_export(profile)``, the tree ``bootorch image build`` writes
  (missing: :class:`NfsError` telling to build it);
* ``Pseudo``: the path part of ``nfsroot`` (kernel syntax ``[server:]path[,options]``).
  The lab exports one tree per profile, so a per-node template (``{name}``,
  ``{ip}``, ``{mac}``) in that path is an error, and so are two profiles whose
  pseudo paths are equal or nested;
* read-only for the plan's subnet, no root squash, ``sec=sys``, TCP.

NFSv4 only (``Protocols = 4``): no MOUNT, NLM or RQUOTA, so nothing needs
rpcbind; ``NFSV4 { Graceless = true; }`` skips the 90 s grace period that would
stall every client at start; ``Only_Numeric_Owners`` makes owners travel as
``0``/``0`` instead of ``root@domain`` strings (a guest initramfs has no
idmapd: names would map to nobody). Client recovery records go to
``<state_dir>/lab/nfs-recovery/`` (``RecoveryRoot``), not ``/var/lib/nfs``.

Host-wide sockets: ganesha registers its programs with rpcbind through
``/run/rpcbind.sock`` and claims a name on the system D-Bus through
``/run/dbus/system_bus_socket``; both are Unix sockets, reachable from any
network namespace, and ganesha has no setting to skip either (at exit it would
also unregister NFSv4 at a host rpcbind, i.e. a host kernel nfsd's entry).
So the server starts through a small ``sh`` that bind-mounts ``/dev/null`` over
those sockets when they exist -- inside the private mount namespace ``ip netns
exec`` made for it, so the host sees nothing -- and ganesha logs that it cannot
register or reach D-Bus, and serves NFSv4 regardless. ``heartbeat_freq = 0``
stops its D-Bus heartbeat. Ganesha also creates an empty ``/run/ganesha/``.

Files in ``<state_dir>/lab/``: ``ganesha.conf`` (rendered at every start),
``nfs.pid`` (ganesha's PID; ``ip netns exec`` and the ``sh`` both exec, so the
PID started is ganesha's; ganesha writes it too and removes it at exit),
``nfs.log`` (ganesha's log and output), ``nfs-recovery/``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from orchestrator.plan import LoadedPlan

GANESHA = "ganesha.nfsd"
#: Where Debian's nfs-ganesha-vfs puts the VFS FSAL ganesha loads.
VFS_FSAL = Path("/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so")
NFS_PORT = 2049
#: Host-wide Unix sockets ganesha must not reach (see the module docstring).
HIDDEN_SOCKETS = ("/run/rpcbind.sock", "/run/dbus/system_bus_socket")

#: A pseudo path: absolute, plain components (it is written into ganesha.conf and named by clients).
_PSEUDO = re.compile(r"(/[A-Za-z0-9_+.-]+)+")
#: A profile name fit for a config comment.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")


class NfsError(RuntimeError):
    """A plan's NFS root the lab cannot serve; the message says why and what to do."""


@dataclass(frozen=True)
class Export:
    """One EXPORT block: a profile's tree at its pseudo path."""

    profile: str
    path: Path
    pseudo: str


def parse_nfsroot(spec: str) -> tuple[str, str, str]:
    """``[server:]path[,options]`` -> (server or "", path, options or "") as the kernel splits it."""
    head, _, options = spec.partition(",")
    if ":" in head:
        server, _, path = head.partition(":")
    else:
        server, path = "", head
    return server, path, options


def plan_exports(plan: LoadedPlan, *, check_dirs: bool = True) -> list[Export]:
    """The exports this plan's lab serves (maybe none); :class:`NfsError` when one cannot be served.

    ``check_dirs``: also require each tree to exist (``lab up``); off for rendering tests.
    """
    server = str(plan.model.network.server)
    used = sorted({n.profile for n in plan.nodes})
    out: list[Export] = []
    for name in used:
        prof = plan.model.profiles[name]
        if prof.root != "nfs" or not prof.nfsroot:
            continue
        host, path, _ = parse_nfsroot(prof.nfsroot)
        if host not in ("", "{server}", server):
            continue  # another server's export: not the lab's to serve
        where = f"profile {name}: nfsroot {prof.nfsroot!r}"
        templates = set(re.findall(r"\{([^}]*)\}", path))
        if templates:
            raise NfsError(f"{where}: the path has {', '.join('{' + t + '}' for t in sorted(templates))}, but the "
                           "lab exports one tree per profile (write a fixed path, e.g. /export/root)")
        if not _PSEUDO.fullmatch(path) or any(c in (".", "..") for c in path.split("/")):
            raise NfsError(f"{where}: the lab can export only a plain absolute path below / "
                           "(letters, digits, _ + . -; no . or .. components), e.g. /export/root")
        tree = Path(os.path.realpath(plan.nfs_export(name)))
        if any(c in str(tree) for c in '"\\') or not str(tree).isprintable():
            raise NfsError(f"{where}: the export directory {str(tree)!r} has characters ganesha.conf cannot quote")
        if check_dirs and not tree.is_dir():
            raise NfsError(f"{where}: the NFS root tree {tree} does not exist: run `bootorch image build "
                           f"{plan.path}` first")
        out.append(Export(name, tree, path))
    for i, a in enumerate(out):
        for b in out[i + 1:]:
            if a.pseudo == b.pseudo or a.pseudo.startswith(b.pseudo + "/") or b.pseudo.startswith(a.pseudo + "/"):
                raise NfsError(f"profiles {a.profile} and {b.profile}: NFS paths {a.pseudo} and {b.pseudo} overlap; "
                               "the lab exports one tree per profile, each at its own path")
    return out


# ----------------------------------------------------------------------------- files and command line


def conf_file(lab_dir: Path) -> Path:
    return lab_dir / "ganesha.conf"


def pid_file(lab_dir: Path) -> Path:
    return lab_dir / "nfs.pid"


def log_file(lab_dir: Path) -> Path:
    return lab_dir / "nfs.log"


def recovery_dir(lab_dir: Path) -> Path:
    return lab_dir / "nfs-recovery"


def render_config(plan: LoadedPlan, exports: list[Export], lab_dir: Path) -> str:
    """ganesha.conf for ``exports`` (see ganesha-core-config(8), ganesha-export-config(8))."""
    net = plan.model.network
    subnet = ipaddress.IPv4Network(net.subnet)
    lines = [
        f"# Written by `bootorch lab up` for plan {plan.model.name if _SAFE_NAME.fullmatch(plan.model.name) else '-'}"
        "; rewritten at every start.",
        "NFS_CORE_PARAM {",
        "    Protocols = 4;            # NFSv4 only: no MOUNT/NLM/RQUOTA, nothing for rpcbind",
        f"    Bind_addr = {net.server};",
        f"    NFS_Port = {NFS_PORT};",
        "    Enable_NLM = false;",
        "    Enable_RQUOTA = false;",
        "    Enable_UDP = false;",
        "    heartbeat_freq = 0;       # no D-Bus heartbeat",
        "}",
        "NFS_KRB5 { Active_krb5 = false; }",
        "NFSV4 {",
        "    Graceless = true;         # no 90 s grace period at start",
        "    Only_Numeric_Owners = true;",
        "    RecoveryBackend = fs;",
        f'    RecoveryRoot = "{recovery_dir(lab_dir)}";',
        "}",
    ]
    for i, ex in enumerate(exports, start=1):
        label = ex.profile if _SAFE_NAME.fullmatch(ex.profile) else f"#{i}"
        lines += [
            f"EXPORT {{                      # profile {label}",
            f"    Export_Id = {i};",
            f'    Path = "{ex.path}";',
            f'    Pseudo = "{ex.pseudo}";',
            "    Protocols = 4;",
            "    Transports = TCP;",
            "    Access_Type = None;",
            "    Squash = None;",
            "    SecType = sys;",
            "    FSAL { Name = VFS; }",
            f"    CLIENT {{ Clients = {subnet}; Access_Type = RO; Protocols = 4; }}",
            "}",
        ]
    return "\n".join(lines) + "\n"


#: Run inside the namespace: hide the host-wide sockets in this private mount namespace, then exec ganesha.
_WRAPPER = 'for s in {socks}; do if [ -S "$s" ]; then mount --bind /dev/null "$s" || exit 1; fi; done; exec "$@"'


def server_argv(lab_dir: Path, namespace: str) -> list[str]:
    """The command that runs ganesha in the foreground inside ``namespace`` (module docstring)."""
    ganesha = [GANESHA, "-F", "-f", str(conf_file(lab_dir)), "-L", str(log_file(lab_dir)),
               "-p", str(pid_file(lab_dir)), "-N", "NIV_EVENT"]
    return ["ip", "netns", "exec", namespace, "sh", "-c", _WRAPPER.format(socks=" ".join(HIDDEN_SOCKETS)),
            "bootorch-nfs", *ganesha]


def installed() -> bool:
    """ganesha.nfsd and its VFS module are there."""
    return shutil.which(GANESHA) is not None and VFS_FSAL.exists()


#: Run inside the namespace (``python -c PROBE HOST PORT SECONDS``): connect until it works or SECONDS pass.
PROBE = """
import socket, sys, time
host, port, end = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while True:
    try:
        socket.create_connection((host, port), timeout=1).close()
        break
    except OSError as e:
        if time.monotonic() > end:
            sys.exit(f"{host}:{port}: {e}")
        time.sleep(0.05)
"""
