"""The TFTP servers the benchmark compares, and how to start each one.

Each :class:`ServerSpec` turns (root, host, port) into an argv. Nothing here
binds anything itself: ``bench/tftp.py`` starts the argv inside a network
namespace it created (or on 127.0.0.1 when not root) and kills it by PID.

Peers:

* **tftpd-hpa** -- ``in.tftpd -L -s ROOT -a HOST:PORT``: foreground, chroot to
  the root, one forked process per transfer, drops to ``nobody``. ``-B 65464``
  lets clients negotiate any RFC 2348 block size. No windowsize support.
* **dnsmasq** -- TFTP only: ``--port=0`` turns DNS off, no ``dhcp-range`` means
  no DHCP, ``--conf-file=/dev/null`` ignores ``/etc/dnsmasq.conf``, the pid file
  goes to our run directory. dnsmasq has no option for the TFTP *listen* port
  (it is always 69), so it can only run where we own port 69: inside the
  benchmark's own network namespace. ``--tftp-max=100`` lifts the default cap
  of 50 concurrent transfers so the 50-client scenario measures speed, not the
  cap. No windowsize support.
* **atftpd** -- threads, RFC 7440 windowsize. Its Debian package conflicts
  with tftpd-hpa, so :func:`ensure_atftpd` extracts the binary from the .deb
  into a cache directory instead of installing it.
* **ours** -- ``python -m orchestrator.bootserver.tftpd_cli``, with the
  blksize cap raised to 65464 (like tftpd-hpa's ``-B``; its default 1468 would
  make the blksize 8192 case a 1468 one) and the concurrency caps as dnsmasq's.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
IN_TFTPD = "/usr/sbin/in.tftpd"
OURS_MODULE = "orchestrator.bootserver.tftpd_cli"


def cache_dir() -> Path:
    """Where downloaded peer binaries live: ``$XDG_CACHE_HOME/bootorch`` or the repo's gitignored ``var/cache``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "bootorch" if xdg else REPO / "var" / "cache"


def ensure_atftpd(cache: Path | None = None, *, timeout: float = 120) -> Path:
    """Path of an ``atftpd`` binary, extracting it from Debian's package if needed.

    ``apt-get download atftpd`` fetches the .deb through apt's ordinary client
    (no install, so no conflict with tftpd-hpa) and ``dpkg -x`` unpacks it into
    ``CACHE/atftpd/x``. Idempotent: a cached binary is reused.
    """
    installed = shutil.which("atftpd") or (
        "/usr/sbin/atftpd" if os.access("/usr/sbin/atftpd", os.X_OK) else None
    )
    if installed:
        return Path(installed)
    base = (cache or cache_dir()) / "atftpd"
    binary = base / "x" / "usr" / "sbin" / "atftpd"
    if os.access(binary, os.X_OK):
        return binary
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"atftpd is not installed and {tool} is missing to fetch it")
    base.mkdir(parents=True, exist_ok=True)
    debs = glob.glob(str(base / "atftpd_*.deb"))
    if not debs:
        cp = subprocess.run(["apt-get", "download", "atftpd"], cwd=base, capture_output=True,
                            text=True, timeout=timeout)
        debs = glob.glob(str(base / "atftpd_*.deb"))
        if cp.returncode != 0 or not debs:
            raise RuntimeError(f"apt-get download atftpd failed: {cp.stderr.strip()[-500:]}")
    subprocess.run(["dpkg", "-x", sorted(debs)[-1], str(base / "x")], check=True, capture_output=True,
                   timeout=timeout)
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"{binary} not found after extracting {debs[-1]}")
    return binary


@dataclass(frozen=True)
class ServerSpec:
    name: str
    #: argv for (root, host, port, rundir)
    argv: Callable[[str, str, int, str], list[str]]
    #: listens on this port whatever we ask (dnsmasq: 69), else None
    fixed_port: int | None = None
    windowsize: bool = False
    needs_root: bool = False
    #: why the server cannot run here, or None
    unavailable: Callable[[], str | None] = lambda: None


def _tftpd_hpa(root: str, host: str, port: int, rundir: str) -> list[str]:
    return [IN_TFTPD, "-L", "-s", root, "-a", f"{host}:{port}", "-B", "65464"]


def _dnsmasq(root: str, host: str, port: int, rundir: str) -> list[str]:
    return [
        shutil.which("dnsmasq") or "dnsmasq", "-k", "--conf-file=/dev/null", "--port=0",
        "--no-hosts", "--no-resolv", "--bind-interfaces", f"--listen-address={host}",
        "--enable-tftp", f"--tftp-root={root}", "--tftp-max=100", "--quiet-tftp",
        f"--pid-file={rundir}/dnsmasq.pid", "--log-facility=-",
    ]


def _atftpd(root: str, host: str, port: int, rundir: str) -> list[str]:
    return [
        str(ensure_atftpd()), "--daemon", "--no-fork", "--port", str(port), "--bind-address", host,
        "--no-multicast", "--maxthread", "100", "--logfile", "-", "--verbose=1", root,
    ]


def _ours(root: str, host: str, port: int, rundir: str) -> list[str]:
    return [sys.executable, "-m", OURS_MODULE, "--root", root, "--listen", f"{host}:{port}",
            "--blksize-max", "65464", "--windowsize-max", "64",
            # All bench clients share one IP: lift the per-client cap (default 8) and
            # the global one to dnsmasq's --tftp-max=100 above, so the 50-client
            # scenario measures throughput, not the admission limits.
            "--max-transfers", "100", "--max-per-client", "100"]


def _missing(path: str) -> Callable[[], str | None]:
    return lambda: None if (shutil.which(path) or os.access(path, os.X_OK)) else f"{path} not installed"


def _ours_missing() -> str | None:
    if not (REPO / "orchestrator" / "bootserver" / "tftpd_cli.py").exists():
        return "orchestrator/bootserver/tftpd_cli.py does not exist yet"
    return None


def _atftpd_missing() -> str | None:
    try:
        ensure_atftpd()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return f"atftpd unavailable: {e}"
    return None


SERVERS: dict[str, ServerSpec] = {
    s.name: s
    for s in (
        ServerSpec("tftpd-hpa", _tftpd_hpa, unavailable=_missing(IN_TFTPD)),
        ServerSpec("dnsmasq", _dnsmasq, fixed_port=69, needs_root=True, unavailable=_missing("dnsmasq")),
        ServerSpec("atftpd", _atftpd, windowsize=True, unavailable=_atftpd_missing),
        ServerSpec("ours", _ours, windowsize=True, unavailable=_ours_missing),
    )
}
