"""Each node's own SSH host key: where it is kept, how the node gets it, and readiness's trust in it.

A node whose profile says ``host_key: per-node`` (the default) has an ed25519
dropbear key in ``<state_dir>/hostkeys/<node>/dropbear_ed25519_host_key``
(0600, the directories 0700) with the OpenSSH public line beside it
(``.pub``), made once by ``bootorch image build``
(:func:`orchestrator.image.keys.ensure_host_keys`) and kept, so a node presents
the same key across reboots and rebuilds. This module is the one place that
knows that layout:

- :func:`host_key_paths`: a node's key files;
- :func:`host_key_archive`: the second initrd a node boots, a tiny newc cpio
  holding only ``etc/dropbear/dropbear_ed25519_host_key`` (:data:`HOST_KEY_PATH`,
  where the image's ``/init`` looks);
- :func:`host_key_file_name`: the name it is served by, ``hostkeys/<ip>.cpio``,
  listed after the profile's initrds in the node's boot config (the kernel
  unpacks initrds in order into the same root); :func:`host_key_tree` gives
  every node's archive and the only address it is served to
  (:func:`orchestrator.render.dynamic_source` answers that name to that
  address only);
- :func:`plan_host_keys` and :func:`pin_host_keys`: the public keys, written
  into readiness's known_hosts for each node's address, replacing older
  entries, so readiness accepts such a node with exactly that key and no
  other, under ``tofu`` as under ``strict``. :func:`pin_plan_host_keys` does
  both from the key files and returns what
  :class:`orchestrator.readiness.Readiness` says when a node presents another
  key; whoever assembles a rollout calls it before readiness starts
  (known_hosts may have been lost or edited since the build).

The shared image carries no host key. When a node did not get its archive,
its ``/init`` says so on the console and starts ``dropbear -R``, which makes a
key at boot, and readiness refuses that key as changed, naming the likely cause.

Limits: a netboot cannot deliver a secret confidentially. TFTP and HTTP are
clear text without client authentication, so the key goes to whoever holds the
node's IP address when it asks (a machine that takes over the address, e.g. by
answering ARP for it while the node is off, gets it) and to anyone who can read
the boot LAN's traffic. A key is sent only to its own node's address, a stolen
key impersonates that one node, and a node that comes up with any other key is
refused. A site that needs more puts host keys on the node's own disk or TPM
and says ``host_key: none``.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Mapping

import paramiko

from orchestrator.plan import LoadedPlan, Node
from orchestrator.readiness import KnownHosts, host_key_name, known_hosts_path

HOST_KEY_FILE = "dropbear_ed25519_host_key"
#: Where the image's /init looks for the node's host key (the key archive's one file).
HOST_KEY_PATH = f"etc/dropbear/{HOST_KEY_FILE}"
#: The directory the archives are served under: ``hostkeys/<ip>.cpio``.
HOST_KEY_DIR = "hostkeys"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def host_keys_dir(plan: LoadedPlan) -> Path:
    """Where the plan's nodes keep their host keys: ``<state_dir>/hostkeys``, one directory per node."""
    return plan.state_dir / "hostkeys"


def host_key_paths(plan: LoadedPlan, node: Node) -> tuple[Path, Path]:
    """(private key, ``.pub``) of ``node``'s host key: ``<state_dir>/hostkeys/<node>/``.

    Raises ValueError for a node name that cannot be a directory name.
    """
    if not _SAFE_NAME.fullmatch(node.name):
        raise ValueError(f"node name {node.name!r} cannot name a host-key directory (letters, digits, '.', '_', '-')")
    d = host_keys_dir(plan) / node.name
    return d / HOST_KEY_FILE, d / f"{HOST_KEY_FILE}.pub"


# --------------------------------------------------------------------------- what the boot server sends


def host_key_archive(private_key: bytes) -> bytes:
    """The second initrd a node boots: a newc cpio holding only its host key (0600 in a 0700 dir).

    Uncompressed (a few hundred bytes) and a multiple of 4 bytes long; the
    kernel unpacks it after the image into the same root
    (Documentation/driver-api/early-userspace/buffer-format.rst).
    """
    # Imported here, not at the top: the image builder imports this module, and importing
    # orchestrator.image.cpio runs orchestrator.image's __init__, which loads the builder.
    from orchestrator.image.cpio import Tree, newc_archive

    t = Tree()
    t.dir("etc", 0o755)
    t.dir("etc/dropbear", 0o700)
    t.file(HOST_KEY_PATH, private_key, 0o600)
    return newc_archive(t)


def host_key_file_name(node: Node) -> str:
    """The name the node fetches its host-key archive by: ``hostkeys/<ip>.cpio`` (the address it is served to)."""
    return f"{HOST_KEY_DIR}/{node.ip}.cpio"


def node_host_key(plan: LoadedPlan, node: Node) -> bytes | None:
    """The node's private host key, when its profile is ``host_key: per-node`` and image build made one."""
    if plan.model.profiles[node.profile].host_key != "per-node":
        return None
    private, _public = host_key_paths(plan, node)
    try:
        return private.read_bytes()
    except FileNotFoundError:
        return None


def host_key_tree(plan: LoadedPlan) -> dict[str, tuple[str, bytes]]:
    """Every node's host-key archive: name -> (the only client address it is served to, archive)."""
    out: dict[str, tuple[str, bytes]] = {}
    for node in plan.nodes:
        key = node_host_key(plan, node)
        if key is not None:
            out[host_key_file_name(node)] = (str(node.ip), host_key_archive(key))
    return out


# --------------------------------------------------------------------------- readiness's trust


def _public_key(line: str) -> paramiko.PKey:
    ktype, b64 = line.split()[:2]
    return paramiko.PKey.from_type_string(ktype, base64.b64decode(b64))


def plan_host_keys(plan: LoadedPlan) -> dict[str, str]:
    """Node name -> public key line of every node with a bootorch per-node host key (made by image build)."""
    out = {}
    for node in plan.nodes:
        if plan.model.profiles[node.profile].host_key != "per-node":
            continue
        try:
            private, public = host_key_paths(plan, node)
            if private.is_file() and public.is_file():
                line = public.read_text().strip()
                _public_key(line)
                out[node.name] = line
        except (ValueError, paramiko.SSHException, paramiko.pkey.UnknownKeyType):  # a refused name, a damaged .pub
            continue
    return out


def pin_host_keys(plan: LoadedPlan, pubs: Mapping[str, str]) -> bool:
    """Write node name -> public key line ``pubs`` into the plan's known_hosts, one entry per node's
    address (``[ip]:port`` off port 22), replacing older entries for those addresses. True when it changed."""
    port = plan.model.readiness.ssh.port
    entries = {host_key_name(str(plan.by_name[n].ip), port): _public_key(line) for n, line in pubs.items()}
    return KnownHosts(known_hosts_path(plan)).pin(entries) if entries else False


def pin_plan_host_keys(plan: LoadedPlan) -> dict[str, str]:
    """Pin every node's own host key from its key files (:func:`plan_host_keys`, :func:`pin_host_keys`);
    node address -> where that key comes from, for :class:`~orchestrator.readiness.Readiness`'s ``pinned``."""
    pubs = plan_host_keys(plan)
    pin_host_keys(plan, pubs)
    return {
        str(plan.by_name[n].ip): f"{n}'s own host key ({host_keys_dir(plan) / n}), "
                               f"which the boot server sends it as {host_key_file_name(plan.by_name[n])}"
        for n in pubs
    }
