"""Each node's own host key (orchestrator.hostkeys, made by orchestrator.image.keys): the archive a node
boots, the key files, the pins in readiness's known_hosts. How render serves the archives: test_render.py.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

from orchestrator.image.keys import ensure_user_key
from orchestrator.plan import load_plan
from tests.conftest import REPO, require_tool
from tests.image_helpers import busybox, parse_newc, tiny_plan


def test_host_key_archive_is_a_tiny_cpio_busybox_reads(tmp_path: Path) -> None:
    from orchestrator.hostkeys import HOST_KEY_PATH, host_key_archive

    archive = host_key_archive(b"secret key bytes")
    assert archive == host_key_archive(b"secret key bytes") and len(archive) % 4 == 0
    listing = subprocess.run([busybox(), "cpio", "-t"], input=archive, capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.decode().split() == ["etc", "etc/dropbear", HOST_KEY_PATH]
    assert HOST_KEY_PATH == "etc/dropbear/dropbear_ed25519_host_key"
    r = subprocess.run([busybox(), "cpio", "-i", "-d", "-m"], input=archive, cwd=tmp_path, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / HOST_KEY_PATH).read_bytes() == b"secret key bytes"
    assert stat.S_IMODE((tmp_path / HOST_KEY_PATH).stat().st_mode) == 0o600
    modes = {e["name"]: stat.S_IMODE(e["mode"]) for e in parse_newc(archive)}
    assert modes == {"etc": 0o755, "etc/dropbear": 0o700, HOST_KEY_PATH: 0o600}  # as in the image's root


def test_host_keys_one_per_node_made_once_and_pinned(tmp_path: Path) -> None:
    """Keys by the dropbearkey given (here the host's: an independent build of the same tool), kept across
    builds; each node's public key goes into known_hosts for its address, replacing an older entry."""
    from orchestrator.hostkeys import host_key_paths, pin_host_keys, pin_plan_host_keys
    from orchestrator.image.keys import ensure_host_keys

    dropbearkey = require_tool("dropbearkey")
    plan_file = tiny_plan(tmp_path)
    text = json.loads(plan_file.read_text())
    text["nodes"] = [{"name": "node[01-03]", "mac": "52:54:00:77:00:01", "ip": "10.0.2.15"},
                     {"name": "site01", "mac": "52:54:00:77:01:01", "ip": "10.0.2.40", "profile": "site"}]
    text["profiles"]["site"] = {"kernel": "vmlinuz", "host_key": "none"}
    text["nodes"][0]["profile"] = "ramdisk"
    plan_file.write_text(json.dumps(text))
    plan = load_plan(plan_file)
    known = plan.state_dir / "known_hosts"
    known.parent.mkdir(parents=True)
    old, keep = ensure_user_key(tmp_path / "old", log=lambda m: None), ensure_user_key(tmp_path / "keep", log=lambda m: None)
    known.write_text(f"10.0.2.16 {' '.join(old.split()[:2])}\n10.0.2.99 {' '.join(keep.split()[:2])}\n")
    pubs = ensure_host_keys(plan, [dropbearkey], log=lambda m: None)
    assert sorted(pubs) == ["node01", "node02", "node03"]  # site01's profile says host_key: none
    assert len(set(pubs.values())) == 3
    for node in plan.nodes[:3]:
        private, public = host_key_paths(plan, node)
        assert private.parent == plan.state_dir / "hostkeys" / node.name
        assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE((plan.state_dir / "hostkeys").stat().st_mode) == 0o700
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        y = subprocess.run([dropbearkey, "-y", "-f", str(private)], capture_output=True, text=True, timeout=30)
        line = next(x for x in y.stdout.splitlines() if x.startswith("ssh-ed25519 "))
        assert line.split()[:2] == pubs[node.name].split()[:2] == public.read_text().split()[:2]
    before = {n.name: host_key_paths(plan, n)[0].read_bytes() for n in plan.nodes[:3]}
    assert ensure_host_keys(plan, [dropbearkey], log=lambda m: None) == pubs  # kept, not made again
    assert {n.name: host_key_paths(plan, n)[0].read_bytes() for n in plan.nodes[:3]} == before

    pin_host_keys(plan, pubs)
    lines = known.read_text().splitlines()
    entries = {line.split()[0]: line.split()[2] for line in lines}
    assert entries == {"10.0.2.15": pubs["node01"].split()[1], "10.0.2.16": pubs["node02"].split()[1],
                       "10.0.2.17": pubs["node03"].split()[1],
                       "10.0.2.99": keep.split()[1]}
    assert len(lines) == 4  # node02's old key replaced, not added beside

    # A rollout pins them again from the key files before its readiness starts (known_hosts lost or edited meanwhile).
    from orchestrator.readiness import Readiness

    known.unlink()
    r = Readiness.from_plan(plan, pinned=pin_plan_host_keys(plan))
    assert sorted(line.split()[0] for line in known.read_text().splitlines()) == ["10.0.2.15", "10.0.2.16", "10.0.2.17"]
    assert "hostkeys/10.0.2.15.cpio" in r.pinned["10.0.2.15"] and "10.0.2.40" not in r.pinned
    assert r.known.lookup("10.0.2.16")["ssh-ed25519"].get_base64() == pubs["node02"].split()[1]


def test_hostkeys_and_the_image_builder_import_in_either_order() -> None:
    """The builder imports hostkeys, and hostkeys the builder's cpio writer (when it makes an archive)."""
    for first in ("orchestrator.hostkeys", "orchestrator.image.cpio"):
        code = f"import {first}; import orchestrator.hostkeys, orchestrator.image; orchestrator.hostkeys.host_key_archive(b'k')"
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (first, r.stderr)
