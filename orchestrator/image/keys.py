"""The SSH keys a build makes: the lab's login key and each node's own host key.

**The login key.** The image authorizes ``readiness.ssh.key`` + ``.pub`` for
root; when the private key does not exist yet (a fresh lab),
:func:`ensure_user_key` generates an ed25519 pair there.

**Host keys, one per node.** :func:`ensure_host_keys` makes each node whose
profile says ``host_key: per-node`` an ed25519 key with the packaged
``dropbearkey`` (run through the packaged loader), where
:mod:`orchestrator.hostkeys` keeps them, and keeps a key once made. They are
not in the image: the boot server sends each node its own.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable

from orchestrator.hostkeys import host_key_paths, host_keys_dir
from orchestrator.image.errors import ImageError
from orchestrator.plan import LoadedPlan


def ensure_user_key(private: Path, log: Callable[[str], None]) -> str:
    """The public key line for ``private`` (+ ``.pub``), generating an ed25519 pair if absent."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pub = private.with_name(private.name + ".pub")
    if not private.exists():
        log(f"image: generating the lab's SSH key {private} (ed25519, no passphrase)")
        private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        pub.write_bytes(line + b" bootorch-lab\n")
    if pub.exists():
        return pub.read_text().strip()
    # A private key without its .pub: derive the public half.
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line.decode()


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True)


def ensure_host_keys(plan: LoadedPlan, dropbearkey: list[str], log: Callable[[str], None] = print) -> dict[str, str]:
    """Node name -> host public key line for every node whose profile says ``host_key: per-node``.

    A missing key is made with ``dropbearkey`` (an argv prefix: the packaged one
    through its loader); an existing key is kept. Directories are 0700, private
    keys 0600; two builds at once never replace each other's key (hard link).
    """
    out: dict[str, str] = {}
    made = 0
    for node in plan.nodes:
        if plan.model.profiles[node.profile].host_key != "per-node":
            continue
        try:
            private, public = host_key_paths(plan, node)
        except ValueError as e:
            raise ImageError(f"{e}: rename the node, or give its profile host_key: none") from None
        for d in (private.parent.parent, private.parent):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)
        pub = ""
        if not private.exists():
            tmp = private.with_name(f".{private.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            r = _run([*dropbearkey, "-t", "ed25519", "-f", str(tmp)])
            if r.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise ImageError(f"dropbearkey (host key of {node.name}) failed: {r.stderr.strip()}")
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, private)  # never replaces a key a concurrent build already made
                pub = next((x for x in r.stdout.splitlines() if x.startswith("ssh-")), "")
                made += 1
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        elif public.exists():
            pub = public.read_text().strip()
        if not pub:
            r = _run([*dropbearkey, "-y", "-f", str(private)])
            pub = next((x for x in r.stdout.splitlines() if x.startswith("ssh-")), "")
            if r.returncode != 0 or not pub:
                raise ImageError(f"dropbearkey -y {private} failed: {r.stderr.strip()}")
        line = " ".join(pub.split()[:2]) + f" {node.name}"
        if not public.exists() or public.read_text().strip() != line:
            tmp_pub = public.with_name(f".{public.name}.{os.getpid()}.tmp")
            tmp_pub.write_text(line + "\n")
            os.replace(tmp_pub, public)
        out[node.name] = line
    if made:
        log(f"image: made {made} node host key(s) in {host_keys_dir(plan)}")
    return out
