"""readiness.KnownHosts: the index, one appended line per first-seen key, and other writers' changes noticed."""

from __future__ import annotations

import paramiko

from orchestrator.readiness import KnownHosts


def key() -> paramiko.PKey:
    return paramiko.ECDSAKey.generate()


def test_tofu_appends_one_line_per_host_and_parses_the_file_once(tmp_path, monkeypatch):
    path = tmp_path / "known_hosts"
    kh = KnownHosts(path)
    loads = []
    real = KnownHosts._load
    monkeypatch.setattr(KnownHosts, "_load", lambda self: (loads.append(1), real(self))[1])
    keys = {f"10.0.{i // 250}.{i % 250 + 1}": key() for i in range(300)}
    for name, k in keys.items():
        assert kh.lookup(name) is None
        kh.add(name, k)
        kh.add(name, k)  # the same key again: nothing written
    assert loads == []  # only this object wrote: never re-read
    lines = path.read_text().splitlines()
    assert len(lines) == 300
    assert lines[0] == f"10.0.0.1 {keys['10.0.0.1'].get_name()} {keys['10.0.0.1'].get_base64()}"
    fresh = KnownHosts(path)  # another process reading the file
    for name, k in keys.items():
        assert fresh.lookup(name)[k.get_name()].asbytes() == k.asbytes()
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_key_pinned_by_another_writer_is_seen_before_an_add(tmp_path):
    path = tmp_path / "known_hosts"
    mine, other = KnownHosts(path), KnownHosts(path)
    a, b, c = key(), key(), key()
    mine.add("10.0.0.1", a)
    assert other.pin({"10.0.0.2": b})  # image build pins a node's own key: the file is rewritten
    mine.add("10.0.0.3", c)  # re-reads first: the pinned line is kept, not overwritten
    fresh = KnownHosts(path)
    assert fresh.lookup("10.0.0.2")[b.get_name()].asbytes() == b.asbytes()
    assert {n for n in ("10.0.0.1", "10.0.0.2", "10.0.0.3") if fresh.lookup(n)} == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert mine.lookup("10.0.0.2") is not None
    assert not other.pin({"10.0.0.2": b})  # already pinned: nothing written


def test_pin_replaces_a_hosts_older_keys_and_keeps_the_rest(tmp_path):
    path = tmp_path / "known_hosts"
    kh = KnownHosts(path)
    old, new, keep = key(), key(), key()
    kh.add("10.0.0.5", old)
    kh.add("10.0.0.6", keep)
    assert kh.pin({"10.0.0.5": new})
    text = path.read_text()
    assert old.get_base64() not in text and new.get_base64() in text and keep.get_base64() in text
    assert kh.lookup("10.0.0.5")[new.get_name()].asbytes() == new.asbytes()


def test_hashed_names_and_hand_edited_files(tmp_path):
    path = tmp_path / "known_hosts"
    hashed, plain = key(), key()
    name = paramiko.HostKeys.hash_host("10.0.0.9")
    # An operator's file: a comment, a hashed entry, a broken line, no newline at the end.
    path.write_text(f"# site hosts\n{name} {hashed.get_name()} {hashed.get_base64()}\nnot a key line\n"
                    f"10.0.0.8 {plain.get_name()} {plain.get_base64()}")
    kh = KnownHosts(path)
    assert kh.lookup("10.0.0.9")[hashed.get_name()].asbytes() == hashed.asbytes()
    assert kh.lookup("10.0.0.8")[plain.get_name()].asbytes() == plain.asbytes()
    assert kh.lookup("10.0.0.7") is None
    added = key()
    kh.add("10.0.0.7", added)
    lines = path.read_text().splitlines()
    assert lines[-2].startswith("10.0.0.8 ") and lines[-1].startswith("10.0.0.7 ")  # not glued onto the last line
    assert KnownHosts(path).lookup("10.0.0.7")[added.get_name()].asbytes() == added.asbytes()
