"""The lab's login key (orchestrator.image.keys); the nodes' host keys are in test_hostkeys.py."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from orchestrator.image.keys import ensure_user_key


def test_user_key_generated_once_and_usable(tmp_path: Path) -> None:
    paramiko = pytest.importorskip("paramiko")
    key = tmp_path / "ssh" / "id_ed25519"
    pub = ensure_user_key(key, log=lambda m: None)
    assert pub.startswith("ssh-ed25519 ")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert ensure_user_key(key, log=lambda m: None) == pub  # not regenerated
    loaded = paramiko.Ed25519Key.from_private_key_file(str(key))
    assert pub.split()[1] == loaded.get_base64()
    # a private key without its .pub: the public half is derived
    (tmp_path / "ssh" / "id_ed25519.pub").unlink()
    assert ensure_user_key(key, log=lambda m: None).split()[:2] == pub.split()[:2]
