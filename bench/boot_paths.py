"""Per-path boot time against a peer: every node of a lab plan booted through bootorch and through dnsmasq + nginx.

    sudo .venv/bin/python bench/boot_paths.py                                    # plans/full.yaml, both servers
    sudo .venv/bin/python bench/boot_paths.py plans/examples/lab-matrix.yaml --json out.json
    sudo .venv/bin/python bench/boot_paths.py --servers dnsmasq --keep            # one server, keep the work dir

A node of a lab plan is a boot path (its ``lab.firmware`` and its profile:
SeaBIOS + iPXE -> pxelinux, edk2 PXE -> syslinux.efi, edk2 HTTP Boot ->
ipxe.efi, ...). For each server, one after the other in one run, the same VMs
boot the same files:

* ``bootorch``: ``bootorch rollout .<stem>.bench-bootorch.yaml --json``
  (bootorch's own DHCP/TFTP/HTTP);
* ``dnsmasq``: ``bootorch rollout .<stem>.bench-dnsmasq.yaml --json`` with
  ``dhcp.mode: external``, ``boot.root`` a copy of PLAN's boot root plus what
  ``bootorch render`` writes (pxelinux.cfg/, iPXE scripts, host-key archives)
  and ``logs:`` dnsmasq's log and nginx's access log. dnsmasq (the rendered
  dnsmasq.conf: DHCP + TFTP, ``--log-dhcp``) and nginx (the copy on
  ``network.server:bootserver.http_port``, ``combined`` access log) run inside
  the lab's namespace; the rollout wakes the nodes and tracks them from those
  two logs alone.

The ``.<stem>.bench-<server>.yaml`` plans are PLAN written next to it (so its
relative paths hold; removed at the end) with ``lab.manage: false`` and
``rollout.failure_budget: 100%`` (a path that fails must not stop the others
from being measured; ``--stop-on-failure`` keeps PLAN's budget).

Around each rollout the bench brings the lab up itself (``bootorch lab up``;
the previous journal is archived as a fresh lab's would be), captures the lab
bridge with tcpdump and timestamps every node's serial console as it is
written (QEMU's ``-serial file:`` has no clock), and takes the lab down after.

Figures per node (= per path), for both servers:

* ``wake_to_ready``: the rollout's own timeline, ``waking`` (the magic packet)
  to ``ready`` (SSH checks passed): the number the comparison is about;
* ``stages``: seconds per stage from the WIRE, the same for both servers:
  bootorch's tracker fed with what the capture shows (the client's DHCP
  messages, TFTP read requests, HTTP GETs; the node's first SYN-ACK on port 22
  is ``ssh``; ``waking`` and ``ready`` from the rollout). The rollout's own
  per-stage timeline is in the JSON too (``rollout_stages``), but through
  dnsmasq it comes from logs with whole-second stamps written when a transfer
  ENDS, so its stage boundaries are not comparable with bootorch's;
* ``transfers``: every file the node fetched, from the wire: protocol, seconds
  from request to last data packet, bytes, and for TFTP the blksize and
  windowsize the server agreed to in its OACK (dnsmasq 2.90 ignores
  windowsize: its transfers show 1);
* ``serial``: seconds from wake to console markers (iPXE's "Configuring ...
  ok", edk2's "Station IP address", pxelinux's banner, "Linux version", the
  image's "ready", ...): where the firmware waits.

Output: the markdown tables on stdout (progress on stderr), everything in
``--json FILE`` (default ``<out>/boot-paths.json``), the serial logs of every
node and run in ``--out`` (default ``var/bench/boot-paths-<time>``).

How it stays safe: root only (namespaces, QEMU taps); refuses to start when
the plan's lab namespace already exists (someone's lab is up) or other QEMU
VMs run (two labs on 2 cores slow each other; ``--ignore-other-vms``). dnsmasq, nginx and
tcpdump are started by the bench inside the lab's namespace and stopped by
PID; the rollout runs in its own session and is killed as a group on timeout;
the lab is taken down and the derived plan and the work directory removed on
any exit (``--keep`` keeps the work directory: boot-root copy, configs, logs,
capture). dnsmasq leases go to the work directory, not the host's. Host-key
archives are readable only by root: dnsmasq running as root serves only
world-readable files, so the copy makes them 0644 inside a 0700 directory
(dnsmasq hands any node's key to anyone who asks by name -- why bootorch serves
each key to its own node's address only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from orchestrator.events import BootEvent, EventKind  # noqa: E402
from orchestrator.plan import LoadedPlan, load_plan  # noqa: E402
from orchestrator.tracker import Tracker, plan_nodes  # noqa: E402

SERVERS = ("bootorch", "dnsmasq")
CLI = [sys.executable, "-m", "orchestrator"]
STAGES = ["waking", "pxe_dhcp", "loader", "config", "kernel", "initrd", "os_dhcp", "ssh"]
#: Console markers, in boot order: (label, regex on the raw serial bytes). The time is when the match was complete.
MARKERS: list[tuple[str, bytes]] = [
    ("seabios", rb"SeaBIOS \(version"),
    ("edk2_bds", rb"BdsDxe: (?:loading|starting) Boot"),
    ("edk2_pxe_start", rb">>Start PXE over IPv4"),
    ("edk2_http_start", rb">>Start HTTP Boot over IPv4"),
    ("edk2_station_ip", rb"Station IP address is"),
    ("edk2_nbp_done", rb"NBP file downloaded successfully|Downloading\.\.\.100%"),
    ("ipxe_init", rb"iPXE initialising devices\.\.\.ok"),
    ("ipxe_banner", rb"iPXE \d[^\r\n]{0,80}Open Source Network Boot Firmware"),
    ("ipxe_net0_open", rb"net0: [0-9a-f:]{17} using"),
    ("ipxe_configuring", rb"Configuring \(net0"),
    ("ipxe_configured", rb"Configuring \(net0[^\r\n]{0,400}? ok"),
    ("ipxe_script", rb"#!ipxe|\.ipxe\.\.\. ok"),
    ("syslinux_banner", rb"(?:PXELINUX|SYSLINUX) \d\.\d\d"),
    ("loading_kernel", rb"Loading vmlinuz"),
    ("linux_version", rb"Linux version \d"),
    ("run_init", rb"Run /init as init process"),
    ("link_up", rb"NIC Link is Up"),
    ("os_dhcp_start", rb"udhcpc: started"),
    ("os_dhcp_bound", rb"udhcpc: lease of|dhcp bound:"),
    ("nfs_root", rb"bootorch-image: [^\r\n]{0,40}nfs"),
    ("image_ready", rb"bootorch-image: ready"),
]


def say(text: str) -> None:
    print(f"boot_paths: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def run_cli(args: list[str], *, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"bootorch {' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def stop(proc: subprocess.Popen | None, *, sig: int = signal.SIGTERM, grace: float = 10, group: bool = False) -> None:
    """Stop a process we started, by its PID (its process group when we made one for it)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        (os.killpg if group else os.kill)(proc.pid, sig)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def wait_for(what: str, test, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``test()`` until true; fail if ``proc`` died or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while not test():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:g}s")
        time.sleep(0.05)


def netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def other_vms() -> list[str]:
    out = subprocess.run(["pgrep", "-a", "qemu-system"], capture_output=True, text=True).stdout
    return [line[:120] for line in out.splitlines()]


# --------------------------------------------------------------------------- serial consoles


class SerialTap(threading.Thread):
    """Timestamps what QEMU writes to each node's serial log, polling every 20 ms."""

    LIMIT = 8 << 20

    def __init__(self, paths: dict[str, Path]) -> None:
        super().__init__(daemon=True)
        self.paths = paths
        self.data: dict[str, bytearray] = {n: bytearray() for n in paths}
        self.chunks: dict[str, list[tuple[float, int]]] = {n: [] for n in paths}  # (time, end offset)
        self.halt = threading.Event()

    def run(self) -> None:
        files: dict[str, Any] = {}
        try:
            while not self.halt.is_set():
                for name, path in self.paths.items():
                    f = files.get(name)
                    if f is None:
                        try:
                            f = files[name] = open(path, "rb")
                        except FileNotFoundError:
                            continue
                    chunk = f.read(1 << 20)
                    if chunk and len(self.data[name]) < self.LIMIT:
                        self.data[name] += chunk
                        self.chunks[name].append((time.time(), len(self.data[name])))
                self.halt.wait(0.02)
        finally:
            for f in files.values():
                f.close()

    def markers(self, name: str, t0: float) -> dict[str, float]:
        data, chunks = bytes(self.data[name]), self.chunks[name]
        out: dict[str, float] = {}
        for label, pattern in MARKERS:
            m = re.search(pattern, data)
            if m is None:
                continue
            end = m.end()
            for t, upto in chunks:
                if upto >= end:
                    out[label] = round(t - t0, 2)
                    break
        return out


# --------------------------------------------------------------------------- the wire


def read_pcap(path: Path):
    """(time, ethernet frame, length on the wire) for each packet of a classic pcap file."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            return
        magic = struct.unpack("<I", head[:4])[0]
        endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
        if struct.unpack(endian + "I", head[20:24])[0] != 1:
            raise RuntimeError("capture is not Ethernet")
        while True:
            rec = f.read(16)
            if len(rec) < 16:
                return
            sec, frac, incl, orig = struct.unpack(endian + "IIII", rec)
            frame = f.read(incl)
            yield sec + frac / (1e9 if nano else 1e6), frame, orig


@dataclass
class Transfer:
    node: str
    proto: str  # tftp | http
    file: str
    start: float
    method: str = "GET"
    requested: dict[str, str] = field(default_factory=dict)
    agreed: dict[str, str] = field(default_factory=dict)
    first_data: float | None = None
    last_data: float | None = None
    bytes: int = 0
    error: str | None = None
    #: Data packets sent again (a TFTP block number seen before; TCP data below the highest sequence sent).
    resent: int = 0
    #: Highest TFTP block, or TCP sequence end, seen from the server (resends move nothing).
    high: int = 0

    def data(self, t: float, position: int, length: int) -> None:
        """The server sent data up to ``position``; only new data counts (not a resend)."""
        if position <= self.high:
            self.resent += 1
            return
        self.high = position
        self.first_data = self.first_data or t
        self.last_data = t
        self.bytes += length

    def row(self, t0: float) -> dict[str, Any]:
        r: dict[str, Any] = {"file": self.file, "proto": self.proto, "at": round(self.start - t0, 3),
                             "seconds": round((self.last_data or self.start) - self.start, 3), "bytes": self.bytes,
                             "resent": self.resent}
        if self.proto == "tftp":
            # RFC 2348/7440: an option the server's OACK leaves out (or no OACK at all) is the default.
            answered = bool(self.agreed) or self.first_data is not None
            r["blksize"] = _int(self.agreed.get("blksize"), 512) if answered else None
            r["windowsize"] = _int(self.agreed.get("windowsize"), 1) if answered else None
            r["asked"] = self.requested
        else:
            r["method"] = self.method
        if self.error:
            r["error"] = self.error
        return r


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


@dataclass
class Wire:
    """What the capture of the lab bridge says, per node."""

    dhcp: list[BootEvent] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    ssh_up: dict[str, float] = field(default_factory=dict)


def _tftp_options(payload: bytes) -> tuple[str, dict[str, str]]:
    parts = payload[2:].split(b"\0")
    name = parts[0].decode("utf-8", "replace")
    opts = {}
    for i in range(2, len(parts) - 1, 2):
        opts[parts[i].decode("ascii", "replace").lower()] = parts[i + 1].decode("ascii", "replace")
    return name, opts


def analyse_capture(path: Path, plan: LoadedPlan) -> Wire:
    from orchestrator.bootserver.http import BadTarget, request_name
    from orchestrator.protocols import dhcp

    server = str(plan.model.network.server)
    http_port = plan.model.bootserver.http_port
    by_ip = {str(n.ip): n.name for n in plan.nodes}
    by_mac = {n.mac: n.name for n in plan.nodes}
    wire = Wire()
    tftp: dict[tuple[str, int], Transfer] = {}
    http: dict[tuple[str, int], Transfer] = {}
    conn_base: dict[tuple[str, int], int] = {}  # TCP connection -> sequence number of its first data byte
    conn_high: dict[tuple[str, int], int] = {}  # TCP connection -> end of the data sent so far (relative)
    for t, frame, _orig in read_pcap(path):
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        proto, src, dst = ip[9], ".".join(map(str, ip[12:16])), ".".join(map(str, ip[16:20]))
        l4 = ip[ihl:]
        if proto == 17 and len(l4) >= 8:
            sport, dport = struct.unpack("!HH", l4[:4])
            payload = l4[8:]
            wire_len = total - ihl - 8
            if dport == 67 and sport == 68:
                try:
                    pkt = dhcp.parse(payload)
                except Exception:  # noqa: BLE001 -- truncated by the snap length, or not DHCP
                    continue
                mtype = pkt.msg_type
                if pkt.mac in by_mac and mtype is not None:
                    wire.dhcp.append(BootEvent(time=t, wall=t, source="wire", kind=EventKind.DHCP, mac=pkt.mac,
                                               detail={"msg": mtype.name, "direction": "in", "pxe": pkt.is_pxe,
                                                       "vendor_class": pkt.vendor_class or ""}))
            elif dst == server and dport == 69 and payload[:2] == b"\x00\x01" and src in by_ip:
                name, opts = _tftp_options(payload)
                tftp[(src, sport)] = x = Transfer(by_ip[src], "tftp", name, t, requested=opts)
                wire.transfers.append(x)
            elif src == server and (dst, dport) in tftp:
                x = tftp[(dst, dport)]
                op = payload[:2]
                if op == b"\x00\x06":
                    x.agreed = _oack(payload)
                elif op == b"\x00\x03" and len(payload) >= 4:
                    # Block numbers wrap at 65536 (RFC 7440 §4 rollover): count wraps to keep them increasing.
                    block = x.high - (x.high & 0xFFFF) + struct.unpack("!H", payload[2:4])[0]
                    if block < x.high - 32768:
                        block += 65536
                    x.data(t, block, max(0, wire_len - 4))
                elif op == b"\x00\x05":
                    x.error = f"server error {struct.unpack('!H', payload[2:4])[0] if len(payload) >= 4 else '?'}"
            elif dst == server and (src, sport) in tftp and payload[:2] == b"\x00\x05":
                x = tftp[(src, sport)]
                x.error = f"client error {struct.unpack('!H', payload[2:4])[0] if len(payload) >= 4 else '?'}"
        elif proto == 6 and len(l4) >= 20:
            sport, dport = struct.unpack("!HH", l4[:4])
            flags = l4[13]
            off = (l4[12] >> 4) * 4
            payload = l4[off:]
            data_len = total - ihl - off
            if sport == 22 and src in by_ip and flags & 0x12 == 0x12:
                wire.ssh_up.setdefault(by_ip[src], t)
            elif dst == server and dport == http_port and src in by_ip and payload[:4] in (b"GET ", b"HEAD"):
                line = payload.split(b"\r\n", 1)[0].split(b" ")
                if len(line) < 2:
                    continue
                try:
                    name = request_name(line[1])
                except (BadTarget, ValueError):
                    name = line[1].decode("latin-1")
                x = Transfer(by_ip[src], "http", name, t, method=line[0].decode("ascii", "replace"))
                x.high = conn_high.get((src, sport), 0)  # a keep-alive connection: later data is this answer's
                http[(src, sport)] = x
                wire.transfers.append(x)
            elif src == server and sport == http_port and (dst, dport) in http and data_len > 0:
                x = http[(dst, dport)]
                seq = struct.unpack("!I", l4[4:8])[0]
                base = conn_base.setdefault((dst, dport), seq)
                end = (seq + data_len - base) % 2**32  # relative to the connection's first data byte
                conn_high[(dst, dport)] = max(conn_high.get((dst, dport), 0), end)
                x.data(t, end, data_len)
    return wire


def _oack(payload: bytes) -> dict[str, str]:
    parts = payload[2:].split(b"\0")
    return {parts[i].decode("ascii", "replace").lower(): parts[i + 1].decode("ascii", "replace")
            for i in range(0, len(parts) - 1, 2)}


def wire_stages(plan: LoadedPlan, wire: Wire, rollout: dict[str, Any]) -> dict[str, list[tuple[str, float]]]:
    """Per node, (stage, time) from the wire: bootorch's tracker rules fed with the capture."""
    tracker = Tracker(plan_nodes(plan))
    nodes = {n["name"]: n for n in rollout.get("nodes", [])}
    events: list[tuple[float, int, Any]] = []
    for node in plan.nodes:
        n = nodes.get(node.name)
        if not n:
            continue
        woke = [t["time"] for t in n["timeline"] if t["to"] == "waking"]
        ready = [t["time"] for t in n["timeline"] if t["to"] == "ready"]
        if woke:
            events.append((woke[0], 0, ("wake", node.mac)))
        if node.name in wire.ssh_up:
            events.append((wire.ssh_up[node.name], 2, ("ssh", node.mac)))
        if ready:
            events.append((ready[-1], 3, ("ready", node.mac)))
    for ev in wire.dhcp:
        events.append((ev.time, 1, ev))
    for x in wire.transfers:
        if x.method == "GET":
            events.append((x.start, 1, BootEvent(time=x.start, wall=x.start, source="wire", kind=EventKind.FILE_REQUEST,
                                                 client_ip=str(next(n.ip for n in plan.nodes if n.name == x.node)),
                                                 filename=x.file)))
    for t, _, what in sorted(events, key=lambda e: (e[0], e[1])):
        if isinstance(what, BootEvent):
            tracker.feed(what)
        elif what[0] == "wake":
            tracker.wake(what[1], t)
        elif what[0] == "ssh":
            tracker.ssh_up(what[1], t)
        else:
            tracker.ready(what[1], t)
    return {st.node: [(tr.to_stage.value, tr.time) for tr in st.history] for st in tracker.nodes.values()}


def stage_seconds(timeline: list[tuple[str, float]]) -> dict[str, float]:
    """Seconds in each stage of the LAST attempt (its ``waking`` .. ``ready``); repeated entries add up."""
    starts = [i for i, (s, _) in enumerate(timeline) if s == "waking"]
    tl = timeline[starts[-1]:] if starts else timeline
    out: dict[str, float] = {}
    for (stage, t), (_, t_next) in zip(tl, tl[1:]):
        out[stage] = round(out.get(stage, 0.0) + t_next - t, 3)
    return out


def wake_to(stage: str, timeline: list[dict[str, Any]]) -> float | None:
    """Seconds from the first wake to the last entry into ``stage``, or None."""
    woke = [t["time"] for t in timeline if t["to"] == "waking"]
    reached = [t["time"] for t in timeline if t["to"] == stage]
    return round(reached[-1] - woke[0], 2) if woke and reached else None


# --------------------------------------------------------------------------- one server


@dataclass
class Run:
    server: str
    plan: LoadedPlan
    work: Path
    out: Path
    rollout_plan: Path
    keep_going: bool = True
    procs: list[tuple[subprocess.Popen, bool]] = field(default_factory=list)  # (process, own group)

    def start(self, argv: list[str], *, name: str, group: bool = False, **kw: Any) -> subprocess.Popen:
        log = open(self.work / f"{name}.out", "wb")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=kw.pop("stdout", log), stderr=log,
                                start_new_session=group, **kw)
        log.close()
        self.procs.append((proc, group))
        return proc


def derived_plan(plan: LoadedPlan, server: str, *, boot_root: Path | None = None, logs: Path | None = None,
                 keep_going: bool = True) -> Path:
    """PLAN as the bench runs it, written next to PLAN (its relative paths hold).

    Both servers: ``lab.manage: false`` (the bench brings the lab up and down) and,
    with ``keep_going``, ``rollout.failure_budget: 100%`` (one broken path must not
    stop the others from being measured). ``dnsmasq``: ``dhcp.mode: external``,
    ``boot.root`` the bench's copy and ``logs:`` dnsmasq's log and nginx's.
    """
    data = yaml.safe_load(plan.path.read_text())
    data.setdefault("lab", {})["manage"] = False
    if keep_going:
        data.setdefault("rollout", {})["failure_budget"] = "100%"
    if server == "dnsmasq":
        assert boot_root is not None and logs is not None
        data.setdefault("dhcp", {})["mode"] = "external"
        data.setdefault("boot", {})["root"] = str(boot_root)
        data["logs"] = [{"source": "dnsmasq", "path": str(logs / "dnsmasq.log")},
                        {"source": "nginx", "path": str(logs / "access.log")}]
    path = plan.path.with_name(f".{plan.path.stem}.bench-{server}.yaml")
    path.write_text(f"# written by bench/boot_paths.py from {plan.path.name}; removed when it ends\n"
                    + yaml.safe_dump(data, sort_keys=False))
    return path


def nginx_conf(work: Path, root: Path, listen: str, logs: Path) -> str:
    tmp = work / "nginx-tmp"
    tmp.mkdir(exist_ok=True)
    return f"""# bench/boot_paths.py: one process, the boot root on {listen}, the default combined access log
daemon off;
master_process off;
pid {work}/nginx.pid;
error_log {logs}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    types {{ application/efi efi; }}
    client_body_temp_path {tmp};
    proxy_temp_path {tmp};
    fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp};
    scgi_temp_path {tmp};
    access_log {logs}/access.log combined;
    server {{
        listen {listen};
        root {root};
    }}
}}
"""


def prepare_dnsmasq(run: Run) -> tuple[Path, Path]:
    """The boot-root copy with the rendered tree, the derived plan; returns (derived plan, dnsmasq.conf)."""
    plan, work = run.plan, run.work
    root, logs, rendered = work / "tftpboot", work / "logs", work / "render"
    logs.mkdir()
    shutil.copytree(plan.boot_root, root, symlinks=False)
    derived = derived_plan(plan, "dnsmasq", boot_root=root, logs=logs, keep_going=run.keep_going)
    run.rollout_plan = derived
    run_cli(["render", str(derived), "--out", str(rendered)])
    for item in rendered.iterdir():
        if item.name in ("dnsmasq.conf", "dhcpd.conf"):
            continue
        if item.is_dir():
            shutil.copytree(item, root / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, root / item.name)
    for p in root.rglob("*"):  # dnsmasq as root serves world-readable files only; the work dir is 0700
        if p.is_file():
            p.chmod(0o644)
    return derived, rendered / "dnsmasq.conf"


def start_peers(run: Run, conf: Path) -> None:
    plan, work = run.plan, run.work
    ns = plan.model.lab.namespace
    logs = work / "logs"
    dnsmasq_log = logs / "dnsmasq.log"
    dns = run.start(["ip", "netns", "exec", ns, "dnsmasq", f"--conf-file={conf}", "--keep-in-foreground",
                     f"--log-facility={dnsmasq_log}", "--user=root", "--group=root",
                     f"--dhcp-leasefile={work / 'dnsmasq.leases'}", f"--pid-file={work / 'dnsmasq.pid'}"], name="dnsmasq")
    wait_for("dnsmasq", lambda: dnsmasq_log.exists() and b"TFTP root is" in dnsmasq_log.read_bytes(), 15, dns)
    listen = f"{plan.model.network.server}:{plan.model.bootserver.http_port}"
    (work / "nginx.conf").write_text(nginx_conf(work, work / "tftpboot", listen, logs))
    ngx = run.start(["ip", "netns", "exec", ns, "nginx", "-p", str(work), "-c", str(work / "nginx.conf"),
                     "-e", str(logs / "nginx-error.log")], name="nginx")
    # nginx writes its pid file after it has bound its listening sockets.
    wait_for("nginx", lambda: (work / "nginx.pid").exists(), 15, ngx)
    say(f"dnsmasq pid {dns.pid}, nginx pid {ngx.pid} on {listen} in namespace {ns}")


def run_server(server: str, plan: LoadedPlan, args: argparse.Namespace, base_work: Path, out: Path) -> dict[str, Any]:
    from orchestrator.lab import lab as lab_mod
    from orchestrator.netns_exec import archive_journal, ensure_lab_secret

    work = base_work / server
    work.mkdir(mode=0o700)
    run = Run(server, plan, work, out, plan.path, keep_going=not args.stop_on_failure)
    ns, bridge = plan.model.lab.namespace, plan.model.network.interface
    lab = lab_mod.Lab(plan)
    tap = SerialTap({n.name: lab.serial(n) for n in plan.nodes})
    result: dict[str, Any] = {"server": server}
    lab_up = False
    try:
        if server == "dnsmasq":
            prepare_dnsmasq(run)
        else:
            run.rollout_plan = derived_plan(plan, server, keep_going=run.keep_going)
        ensure_lab_secret(plan)
        say(f"{server}: lab up")
        lab_up = True
        run_cli(["lab", "up", str(plan.path)])
        archive_journal(plan)  # new VMs: the rollout starts from a fresh journal, as with a managed lab
        tap.start()
        pcap = work / "bridge.pcap"
        dump = run.start(["ip", "netns", "exec", ns, "tcpdump", "-i", bridge, "-U", "-s", "700", "-w", str(pcap)], name="tcpdump")
        wait_for("tcpdump", lambda: b"listening on" in (work / "tcpdump.out").read_bytes(), 15, dump)
        if server == "dnsmasq":
            start_peers(run, work / "render" / "dnsmasq.conf")
        say(f"{server}: rollout {run.rollout_plan.name}")
        t0 = time.time()
        stdout = open(work / "rollout.json", "wb")
        rollout = run.start([*CLI, "rollout", str(run.rollout_plan), "--json"], name="rollout",
                            group=True, stdout=stdout, cwd=REPO)
        stdout.close()
        try:
            rollout.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            say(f"{server}: rollout still running after {args.timeout:g}s: killed")
            stop(rollout, group=True)
        result["seconds"] = round(time.time() - t0, 1)
        result["exit"] = rollout.returncode
        time.sleep(1.0)  # the last packets and console lines
        for proc, group in reversed(run.procs):
            stop(proc, group=group)
        tap.halt.set()
        tap.join(5)
        try:
            data = json.loads((work / "rollout.json").read_text())
        except ValueError:
            data = {"ok": False, "nodes": []}
            say(f"{server}: no rollout JSON; its stderr:\n{(work / 'rollout.out').read_text(errors='replace')[-3000:]}")
        result["ok"] = bool(data.get("ok"))
        wire = analyse_capture(pcap, plan) if pcap.exists() else Wire()
        stages = wire_stages(plan, wire, data)
        nodes = {}
        for n in data.get("nodes", []):
            name = n["name"]
            woke = next((t["time"] for t in n["timeline"] if t["to"] == "waking"), t0)
            nodes[name] = {
                "result": n["result"], "attempts": n["attempts"], "reason": n.get("reason", ""),
                "wake_to_ready": wake_to("ready", n["timeline"]),
                "wake_to_ssh": wake_to("ssh", n["timeline"]),
                "stages": stage_seconds(stages.get(name, [])),
                "rollout_stages": stage_seconds([(t["to"], t["time"]) for t in n["timeline"]]),
                "rollout_sources": sorted({t["source"] for t in n["timeline"]}),
                "transfers": [x.row(woke) for x in wire.transfers if x.node == name],
                "dhcp": [{"at": round(e.time - woke, 3), "msg": e.detail["msg"], "pxe": e.detail["pxe"],
                          "vendor_class": e.detail.get("vendor_class", "")} for e in wire.dhcp if e.mac == n["mac"]],
                "serial": tap.markers(name, woke),
            }
        result["nodes"] = nodes
        for name in tap.data:
            (out / f"{server}-{name}.serial.log").write_bytes(bytes(tap.data[name]))
        shutil.copy2(work / "rollout.out", out / f"{server}-rollout.stderr.log")
        if server == "dnsmasq":
            for f in ("dnsmasq.log", "access.log"):
                if (work / "logs" / f).exists():
                    shutil.copy2(work / "logs" / f, out / f"{server}-{f}")
        return result
    finally:
        for proc, group in reversed(run.procs):
            stop(proc, group=group, sig=signal.SIGKILL if proc.poll() is None else signal.SIGTERM)
        tap.halt.set()
        if lab_up:
            say(f"{server}: lab down")
            run_cli(["lab", "down", str(plan.path)], check=False)
        if run.rollout_plan != plan.path:
            run.rollout_plan.unlink(missing_ok=True)


# --------------------------------------------------------------------------- report


def path_name(plan: LoadedPlan, node) -> str:
    fw = plan.firmware_of(node)
    prof = plan.model.profiles[node.profile]
    return f"{fw} / {node.profile} ({prof.root})"


def tables(plan: LoadedPlan, results: list[dict[str, Any]]) -> str:
    by = {r["server"]: r for r in results}
    servers = [s for s in SERVERS if s in by]
    lines = [f"Plan `{plan.path.name}` ({len(plan.nodes)} nodes); wake to ready in seconds, from each rollout's own timeline.", ""]
    head = "| node | firmware / profile | " + " | ".join(servers)
    if len(servers) == 2:
        head += " | bootorch / dnsmasq"
    lines += [head + " | TFTP windowsize (bootorch) |", "|" + "---|" * (head.count("|") + 1)]
    for node in plan.nodes:
        cells = []
        vals = []
        for s in servers:
            n = by[s]["nodes"].get(node.name, {})
            v = n.get("wake_to_ready")
            vals.append(v)
            if v is None:
                ssh = n.get("wake_to_ssh")
                cells.append(n.get("result", "—") + (f" (ssh at {ssh:.1f})" if ssh is not None else ""))
            else:
                cells.append(f"{v:.1f}" + ("" if n.get("attempts", 1) == 1 else f" ({n['attempts']} attempts)"))
        row = f"| {node.name} | {path_name(plan, node)} | " + " | ".join(cells)
        if len(servers) == 2:
            row += " | " + (f"{vals[0] / vals[1]:.2f}" if all(vals) else "—")
        ws = sorted({x["windowsize"] for x in by.get("bootorch", {}).get("nodes", {}).get(node.name, {}).get("transfers", [])
                     if x["proto"] == "tftp" and x.get("windowsize")})
        lines.append(row + " | " + (", ".join(map(str, ws)) or "—") + " |")
    lines += ["", "Seconds per stage, from the capture of the lab bridge (same rules for both servers):", ""]
    lines += ["| node | server | " + " | ".join(STAGES) + " |", "|" + "---|" * (len(STAGES) + 2)]
    for node in plan.nodes:
        for s in servers:
            st = by[s]["nodes"].get(node.name, {}).get("stages", {})
            lines.append(f"| {node.name} | {s} | " + " | ".join(f"{st[k]:.1f}" if k in st else "—" for k in STAGES) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", nargs="?", default=str(REPO / "plans" / "full.yaml"), help="a lab plan (default plans/full.yaml)")
    ap.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, in run order (default bootorch,dnsmasq)")
    ap.add_argument("--out", type=Path, help="results directory (default var/bench/boot-paths-TIME)")
    ap.add_argument("--json", type=Path, help="the results as JSON (default OUT/boot-paths.json)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds one rollout may take (default 1200)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (boot-root copy, configs, logs, capture)")
    ap.add_argument("--stop-on-failure", action="store_true",
                    help="keep the plan's failure_budget (default: 100%%, so every path is measured)")
    ap.add_argument("--ignore-other-vms", action="store_true", help="run even while other QEMU VMs run on this machine")
    args = ap.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in args.servers if s not in SERVERS]
    if bad:
        ap.error(f"unknown server(s) {', '.join(bad)}; choose from {', '.join(SERVERS)}")
    return args


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        say("needs root (the lab's namespace, taps and QEMU)")
        return 2
    for tool in ("qemu-system-x86_64", "tcpdump", *(["dnsmasq", "nginx"] if "dnsmasq" in args.servers else [])):
        if shutil.which(tool) is None:
            say(f"{tool} is not installed (scripts/setup installs it)")
            return 2
    plan = load_plan(Path(args.plan))
    ns = plan.model.lab.namespace
    if ns in netns_list():
        say(f"namespace {ns} exists: a lab of this plan is up (bootorch lab down {args.plan}) or another run is on")
        return 1
    vms = other_vms()
    if vms:
        say(f"{len(vms)} other QEMU process(es) running (two labs on 2 cores: both slow, figures noisy)"
            + ("; going on (--ignore-other-vms)" if args.ignore_other_vms else "; not starting (--ignore-other-vms to go on)")
            + ":\n  " + "\n  ".join(vms))
        if not args.ignore_other_vms:
            return 1
    # SIGTERM as Ctrl-C: the finally clauses stop what was started and take the lab down.
    signal.signal(signal.SIGTERM, _interrupted)
    from orchestrator.netns_exec import _missing_boot_files

    missing = _missing_boot_files(plan)
    if missing:
        say(f"building boot files ({', '.join(missing)} missing)")
        run_cli(["image", "build", str(plan.path)], timeout=3600)
    out = args.out or REPO / "var" / "bench" / f"boot-paths-{time.strftime('%Y%m%dT%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="bt-bootpaths-"))
    results = []
    try:
        for server in args.servers:
            results.append(run_server(server, plan, args, base, out))
    finally:
        if args.keep:
            say(f"work directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    doc = {
        "plan": str(plan.path), "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "nodes": [{"name": n.name, "firmware": plan.firmware_of(n), "profile": n.profile, "mac": n.mac, "ip": str(n.ip)}
                  for n in plan.nodes],
        "results": results,
    }
    (args.json or out / "boot-paths.json").write_text(json.dumps(doc, indent=2))
    print(tables(plan, results))
    say(f"results in {out}")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
