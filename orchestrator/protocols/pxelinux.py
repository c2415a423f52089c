"""pxelinux: the config-file lookup order and the config files themselves.

Pure functions, no I/O. The TFTP server answers ``pxelinux.cfg/<name>`` live from
:func:`render_config`, and ``bootorch render`` writes the same bytes to disk:
one implementation for both.

Lookup order (pxelinux 6, ``/usr/share/doc/pxelinux/README.txt``; our test
checks this module against the example in that very file):

1. the client UUID, if the PXE stack supplied one (``b8945908-d6a6-41a9-611d-74a6ab80b83d``);
2. ``01-`` + the MAC, lower-case hex with dashes (ARP hardware type 1 = Ethernet);
3. the IPv4 address in upper-case hex (``192.0.2.91`` -> ``C000025B``), then that
   string with one hex digit removed at a time down to one digit;
4. ``default``.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

CFG_DIR = "pxelinux.cfg"


def mac_config_name(mac: str, hwtype: int = 1) -> str:
    """``52:54:00:AB:CD:EF`` -> ``01-52-54-00-ab-cd-ef``."""
    return f"{hwtype:02x}-" + mac.lower().replace(":", "-")


def ip_hex(ip: IPv4Address | str) -> str:
    """``192.168.1.2`` -> ``C0A80102`` (what syslinux's ``gethostip -x`` prints)."""
    return f"{int(IPv4Address(ip)):08X}"


def lookup_names(mac: str | None, ip: IPv4Address | str | None, uuid: str | None = None) -> list[str]:
    """Every name pxelinux asks for under ``pxelinux.cfg/``, in order."""
    names: list[str] = []
    if uuid:
        names.append(uuid.lower())
    if mac:
        names.append(mac_config_name(mac))
    if ip is not None:
        h = ip_hex(ip)
        names.extend(h[:k] for k in range(len(h), 0, -1))
    names.append("default")
    return names


def parse_config_name(name: str) -> tuple[str, str] | None:
    """Classify a ``pxelinux.cfg/`` name: ("mac", mac) / ("iphex", prefix) / ("default", "")."""
    if name == "default":
        return ("default", "")
    parts = name.split("-")
    if len(parts) == 7 and parts[0] == "01" and all(len(p) == 2 for p in parts[1:]):
        try:
            bytes.fromhex("".join(parts[1:]))
        except ValueError:
            return None
        return ("mac", ":".join(parts[1:]).lower())
    if 1 <= len(name) <= 8 and all(c in "0123456789ABCDEF" for c in name):
        return ("iphex", name)
    return None


@dataclass(frozen=True, slots=True)
class BootEntry:
    """What one node boots: enough to write its pxelinux config or iPXE script."""

    label: str
    kernel: str
    initrd: tuple[str, ...]
    append: str  # kernel command line, without initrd=
    comment: str = ""
    #: (port, baud) for pxelinux's own messages, when the kernel logs to a serial console.
    serial: tuple[int, int] | None = None


def kernel_ip_param(
    mode: str,
    *,
    client: IPv4Address,
    server: IPv4Address,
    gateway: IPv4Address | None,
    subnet: IPv4Network,
    hostname: str,
    device: str,
) -> str:
    """Kernel-level IP configuration (Documentation/admin-guide/nfs/nfsroot.rst).

    ``ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>``;
    static uses autoconf ``off`` (the seed's form), dhcp asks the kernel for a
    second DHCP round.
    """
    if mode == "none":
        return ""
    if mode == "dhcp":
        return f"ip=::::{hostname}:{device}:dhcp"
    gw = gateway if gateway is not None else ""
    return f"ip={client}:{server}:{gw}:{subnet.netmask}:{hostname}:{device}:off"


def render_config(entry: BootEntry) -> bytes:
    """A pxelinux config that boots ``entry`` without a prompt."""
    lines = []
    if entry.serial is not None:
        # SERIAL must be the first directive (syslinux docs): pxelinux then
        # prints to the same serial console the kernel uses.
        lines.append(f"SERIAL {entry.serial[0]} {entry.serial[1]}")
    if entry.comment:
        lines += [f"# {line}" for line in entry.comment.splitlines()]
    lines += [
        f"DEFAULT {entry.label}",
        "PROMPT 0",
        "TIMEOUT 0",
        "",
        f"LABEL {entry.label}",
        f"  KERNEL {entry.kernel}",
    ]
    append = entry.append
    if entry.initrd:
        append = f"initrd={','.join(entry.initrd)} {append}".strip()
    if append:
        lines.append(f"  APPEND {append}")
    return ("\n".join(lines) + "\n").encode()


def serial_console(append: str) -> tuple[int, int] | None:
    """``console=ttyS1,57600n8`` -> (1, 57600); None without a serial console."""
    for word in append.split():
        if word.startswith("console=ttyS"):
            spec = word[len("console=ttyS"):]
            port, _, rest = spec.partition(",")
            if not port.isdigit():
                return None
            baud = "".join(c for c in rest if c.isdigit()) if rest else ""
            return int(port), int(baud[:6]) if baud else 115200
    return None


def render_ipxe(entry: BootEntry, base_url: str, *, direct: Collection[str] = (), direct_url: str | None = None) -> bytes:
    """The iPXE script for the same entry, fetching files over HTTP from ``base_url``.

    Files named in ``direct`` come from ``direct_url`` instead (a node's host-key
    archive from the boot server itself while its kernel comes through a cache).
    """
    base = base_url.rstrip("/")
    near = (direct_url or base_url).rstrip("/")
    lines = ["#!ipxe"]
    if entry.comment:
        lines += [f"# {line}" for line in entry.comment.splitlines()]
    args = entry.append
    if entry.initrd:
        args = " ".join(f"initrd={shlex.quote(f.rsplit('/', 1)[-1])}" for f in entry.initrd) + (" " + args if args else "")
    # kernel first, then its initrds: the order the files are fetched is the order
    # the stages are seen (kernel, then initrd).
    lines.append(f"kernel {near if entry.kernel in direct else base}/{entry.kernel.lstrip('/')} {args}".rstrip())
    for f in entry.initrd:
        lines.append(f"initrd {near if f in direct else base}/{f.lstrip('/')}")
    lines.append("boot")
    return ("\n".join(lines) + "\n").encode()
