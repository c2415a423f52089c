"""bootorch as a systemd service: the units, sd_notify, the journal's native protocol, reload diffs.

systemd is not PID 1 here, so each test stands in for the part of systemd it
needs with the real kernel object systemd would use: an ``AF_UNIX`` datagram
socket receives what ``sd_notify`` sends (an abstract name, as systemd's
``$NOTIFY_SOCKET`` often is) and what journald would read. The unit files are
checked with ``systemd-analyze verify``. The end-to-end reload tests, with real
``bootorch serve`` processes, are in ``tests/test_service_reload.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from orchestrator import service
from orchestrator.plan import load_plan
from orchestrator.service import JournalLog, Notifier, diff, fingerprint, journal_stream_is_stderr
from tests.conftest import REPO, require_tool

BOOTORCH = str(REPO / ".venv" / "bin" / "bootorch")

PLAN = """\
version: 1
name: svc
state_dir: state
network:
  subnet: 127.0.0.0/24
  server: 127.0.0.1
dhcp:
  mode: full
  lease_time: 1h
boot:
  root: root
  config_names: [mac]
bootserver:
  tftp_port: 0
  http_port: 0
  dhcp_port: 0
  proxy_port: 0
profiles:
  ramdisk:
    kernel: vmlinuz
    initrd: rootfs.gz
    root: initramfs
    host_key: none
nodes:
  - name: node[01-03]
    mac: 52:54:00:78:00:01
    ip: 127.0.0.11
metrics:
  listen: ""
"""


def write_plan(tmp_path, text: str = PLAN, name: str = "plan.yaml"):
    root = tmp_path / "root"
    if not root.exists():
        root.mkdir()
        for f, size in (("pxelinux.0", 4096), ("vmlinuz", 300_000), ("rootfs.gz", 70_000), ("extra.gz", 1000)):
            (root / f).write_bytes(os.urandom(size))
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- units


def test_shipped_unit_passes_systemd_analyze_verify(tmp_path):
    """The shipped template, with ExecStart at this checkout's bootorch (verify checks the binary exists)."""
    analyze = require_tool("systemd-analyze")
    unit = tmp_path / "bootorch@.service"
    unit.write_text(service.render_unit(BOOTORCH))
    assert f"ExecStart={BOOTORCH} serve /etc/bootorch/%i.yaml" in unit.read_text()
    r = subprocess.run([analyze, "verify", "bootorch@site1.service"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # and it would fail on a real mistake (a check that can fail)
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notfy"))
    r = subprocess.run([analyze, "verify", "bootorch@site1.service"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "notfy" in r.stderr


def test_unit_hardening_is_what_the_docs_say():
    text = (REPO / "systemd" / "bootorch@.service").read_text()
    lines = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in text.splitlines() if "=" in ln and not ln.startswith("#")}
    assert set(lines["CapabilityBoundingSet"].split()) == {"CAP_NET_BIND_SERVICE", "CAP_NET_RAW"}
    assert lines["AmbientCapabilities"] == lines["CapabilityBoundingSet"]
    for key, value in (("Type", "notify"), ("Restart", "on-failure"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                       ("NoNewPrivileges", "yes"), ("ExecReload", "/bin/kill -HUP $MAINPID"), ("UMask", "0027"),
                       ("StateDirectory", "bootorch/%i"), ("RuntimeDirectory", "bootorch/%i"), ("RuntimeDirectoryMode", "0750")):
        assert lines[key] == value, key


def test_service_install_writes_verifiable_units_and_a_drop_in(tmp_path):
    analyze = require_tool("systemd-analyze")
    text = PLAN.replace("state_dir: state", "state_dir: /var/lib/bootorch/site1") + \
        "control:\n  socket: /run/bootorch/site1/control.sock\n"
    plan = write_plan(tmp_path, text)
    root = tmp_path / "root-fs"
    r = subprocess.run([BOOTORCH, "service", "install", str(plan), "--instance", "site1", "--root", str(root),
                        "--executable", BOOTORCH], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    unit_dir = root / "etc/systemd/system"
    drop_in = unit_dir / "bootorch@site1.service.d" / "plan.conf"
    assert f'ExecStart={BOOTORCH} serve "{plan}"' in drop_in.read_text()
    assert (root / "etc/sysusers.d/bootorch.conf").read_text().count("u     bootorch") == 1
    r = subprocess.run([analyze, "verify", "bootorch@site1.service"], cwd=unit_dir, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # A plan keeping its state where the unit may not write is refused, and nothing is written.
    other = write_plan(tmp_path, PLAN, "other.yaml")
    r = subprocess.run([BOOTORCH, "service", "install", str(other), "--root", str(tmp_path / "r2")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "state_dir: /var/lib/bootorch/svc" in r.stderr
    assert not (tmp_path / "r2").exists()


# --------------------------------------------------------------------------- sd_notify


def _datagram_socket(address: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(address)
    s.settimeout(10)
    return s


def _fields(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().splitlines())


@pytest.mark.parametrize("abstract", [True, False])
def test_notifier_sends_to_a_real_notify_socket(tmp_path, abstract):
    """A real AF_UNIX datagram socket stands in for systemd's (abstract '@name' or a path)."""
    name = f"bootorch-test-{os.getpid()}-{abstract}"
    listener = _datagram_socket("\0" + name if abstract else str(tmp_path / "notify"))
    n = Notifier("@" + name if abstract else str(tmp_path / "notify"))
    try:
        assert n.ready("serving 3 nodes")
        assert _fields(listener.recv(4096)) == {"READY": "1", "STATUS": "serving 3 nodes"}
        assert n.reloading()
        got = _fields(listener.recv(4096))
        assert got["RELOADING"] == "1" and int(got["MONOTONIC_USEC"]) > 0
        assert n.stopping("stopping (SIGTERM)")
        assert _fields(listener.recv(4096)) == {"STOPPING": "1", "STATUS": "stopping (SIGTERM)"}
        # A STATUS carrying a newline cannot forge a second assignment (the protocol is line-based).
        assert n.status("x\nREADY=1")
        assert _fields(listener.recv(4096)) == {"STATUS": "x\\x0aREADY=1"}
    finally:
        n.close()
        listener.close()


def test_notifier_without_socket_or_with_systemd_gone(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().enabled and not Notifier().ready("x")
    assert not Notifier("relative/path").enabled  # sd_notify accepts only absolute paths and '@'
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert not gone.ready("x") and gone.errors == 1  # counted, never raised


# --------------------------------------------------------------------------- journal


def _parse_native(data: bytes) -> dict[str, str]:
    """journald's native format, parsed independently of the encoder: KEY=value lines, or KEY\\n<u64 le>value\\n."""
    out, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            size = int.from_bytes(data[nl + 1:nl + 9], "little")
            out[line.decode()] = data[nl + 9:nl + 9 + size].decode()
            assert data[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return out


def test_journal_entries_carry_fields_and_hostile_text_stays_escaped(tmp_path):
    """A datagram socket stands in for /run/systemd/journal/socket."""
    path = str(tmp_path / "journal.socket")
    journald = _datagram_socket(path)
    log = JournalLog(path, extra={"PLAN": "svc"})
    try:
        log("node07 kernel -> initrd (attempt 1): tftp: done rootfs.gz", 6, NODE="node07", MAC="52:54:00:78:00:07",
            STAGE="initrd", ATTEMPT=1, bad_name="dropped", _TRUSTED="dropped")
        got = _parse_native(journald.recv(65536))
        assert got == {"MESSAGE": "node07 kernel -> initrd (attempt 1): tftp: done rootfs.gz", "PRIORITY": "6",
                       "SYSLOG_IDENTIFIER": "bootorch", "PLAN": "svc", "NODE": "node07", "MAC": "52:54:00:78:00:07",
                       "STAGE": "initrd", "ATTEMPT": "1"}
        # Text from the boot LAN (a vendor class, a file name): escapes, newlines, a forged field, any length.
        hostile = "\x1b[2J\nPRIORITY=0\nNODE=root " + "A" * 10000
        log(hostile, 4, FILE=hostile)
        got = _parse_native(journald.recv(65536))
        assert got["PRIORITY"] == "4" and "NODE" not in got
        assert got["MESSAGE"].startswith("\\x1b[2J\\x0aPRIORITY=0\\x0aNODE=root AAA")
        assert len(got["MESSAGE"]) <= service.MESSAGE_MAX and len(got["FILE"]) <= service.FIELD_MAX
    finally:
        log.close()
        journald.close()


def test_journal_falls_back_to_stderr_with_priority_prefix(tmp_path):
    out = tmp_path / "err.txt"
    with open(out, "w") as f:
        log = JournalLog(str(tmp_path / "no-journald"), fallback=service.StderrLog(f, prefix=True))
        log("reload refused", 3, NODE="x")
        log.close()
    assert out.read_text() == "<3>reload refused\n" and log.errors == 1


def test_journal_stream_detection(tmp_path):
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert journal_stream_is_stderr({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd=f.fileno())
        assert not journal_stream_is_stderr({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fd=f.fileno())
        assert not journal_stream_is_stderr({"JOURNAL_STREAM": "garbage"}, fd=f.fileno())
        assert not journal_stream_is_stderr({}, fd=f.fileno())


def test_serve_logs_to_the_journal_socket_with_node_fields(tmp_path):
    """`serve --log-format journal` with the journal socket path replaced by a test socket (env)."""
    path = str(tmp_path / "journal.socket")
    journald = _datagram_socket(path)
    plan = write_plan(tmp_path)
    # log_target's socket_path default was bound at import: call through a wrapper that passes the test path
    code = ("import sys, orchestrator.service as s; orig = s.log_target; "
            "s.log_target = lambda mode='auto', **kw: orig(mode, socket_path=sys.argv[1], **kw); "
            "from orchestrator.cli import main; sys.exit(main(sys.argv[2:]))")
    p = subprocess.Popen([sys.executable, "-c", code, path, "serve", str(plan), "--interface", "", "--log-format", "journal"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        entries = []
        while not any("serving tftp" in e["MESSAGE"] for e in entries):
            entries.append(_parse_native(journald.recv(65536)))
        assert all(e["SYSLOG_IDENTIFIER"] == "bootorch" and e["PLAN"] == "svc" for e in entries)
    finally:
        p.terminate()
        p.wait(timeout=20)
        journald.close()
    assert p.stderr.read() == ""  # nothing fell back to stderr


# --------------------------------------------------------------------------- what a reload changes


def test_fingerprint_diff_names_added_removed_changed_and_restart_only(tmp_path):
    old = load_plan(write_plan(tmp_path))
    text = PLAN.replace("node[01-03]", "node[02-05]").replace("52:54:00:78:00:01", "52:54:00:78:00:02")
    text = text.replace("ip: 127.0.0.11", "ip: 127.0.0.12").replace("initrd: rootfs.gz", "initrd: [rootfs.gz, extra.gz]")
    new = load_plan(write_plan(tmp_path, text, "new.yaml"))
    d = diff(fingerprint(old), fingerprint(new))
    assert d.removed == ["node01"] and d.added == ["node04", "node05"]
    assert d.profiles_changed == ["ramdisk"] and set(d.changed) == {"node02", "node03"}
    assert d.needs_restart == [] and not d.empty
    # node02 keeps its MAC and address here (both counted up by one from a start one higher)
    assert d.changed["node02"] == ["profile contents"]
    restart = load_plan(write_plan(tmp_path, PLAN.replace("lease_time: 1h", "lease_time: 2h"), "r.yaml"))
    d = diff(fingerprint(old), fingerprint(restart))
    assert d.needs_restart == ["dhcp"] and "restart" in " ".join(d.lines())
    assert diff(fingerprint(old), fingerprint(old)).empty


def test_store_compact_keeps_each_nodes_recent_attempts_and_current_stage(tmp_path):
    from orchestrator.store import Store
    from orchestrator.tracker import Stage, Transition

    store = Store(tmp_path / "state.db")
    rows = []
    for attempt in range(1, 51):  # 50 boots of two nodes: 3 transitions each
        for mac, node in (("52:54:00:00:00:01", "n1"), ("52:54:00:00:00:02", "n2")):
            for a, b in ((Stage.PENDING, Stage.WAKING), (Stage.WAKING, Stage.PXE_DHCP), (Stage.PXE_DHCP, Stage.READY)):
                rows.append(Transition(mac, node, a, b, float(attempt), attempt, "e", "test", ()))
    store.append(rows)
    for i in range(300):
        store.record_action("n1", "wake", "r", "ok", when=float(i))
    before = store.current()
    removed = store.compact(keep_attempts=5, keep_actions=10)
    assert removed == (2 * 45 * 3, 290)
    assert store.current() == before
    assert {t.attempt for t in store.transitions("52:54:00:00:00:01")} == set(range(46, 51))
    assert len(store.actions("n1")) == 10
    store.close()
    # A reader without write permission (an operator in the service's group) opens it read-only;
    # root may write anything, so the test asks for it. Writing through it fails.
    import sqlite3

    ro = Store(tmp_path / "state.db", readonly=True)
    assert ro.readonly and ro.current() == before
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.record_action("n1", "wake", "r", "ok")
    ro.close()


async def test_serve_compacts_the_journal_once_a_day(tmp_path, autojump_clock):
    """The daily compaction task of a `serve` orchestrator, on trio's MockClock."""
    import trio

    from orchestrator.app import JOURNAL_COMPACT_EVERY, Mode, Orchestrator
    from orchestrator.tracker import Stage, Transition

    plan = load_plan(write_plan(tmp_path))
    lines: list[str] = []
    orch = Orchestrator.assemble(plan, Mode.SERVE, log=lines.append)
    mac = plan.nodes[0].mac
    orch.store.append([Transition(mac, "node01", Stage.PENDING, Stage.WAKING, float(a), a, "e", "test", ()) for a in range(1, 31)])
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(orch._compact_daily)
            await trio.sleep(JOURNAL_COMPACT_EVERY - 1)
            assert len(orch.store.transitions(mac)) == 30  # not before a day has passed
            await trio.sleep(2)
            assert [t.attempt for t in orch.store.transitions(mac)] == list(range(11, 31))
            assert lines[-1] == "journal compacted: 10 old transitions, 0 old actions removed"
            nursery.cancel_scope.cancel()
    finally:
        orch.store.close()
