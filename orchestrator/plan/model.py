"""The plan model: what one YAML file may say, with types, ranges and defaults.

Every section is a pydantic model with ``extra="forbid"`` so a misspelt key is an
error with a line number, not a silently ignored setting. Defaults are chosen so
a minimal plan is short: a network, one profile and some nodes. ``docs/plan.md``
documents every key; keep the two in step (``tests/test_plan_docs.py`` checks
that every field here is mentioned there).

Cross-field rules that need the whole plan (duplicate MACs, IPs outside the
subnet, pools overlapping reservations, missing files) live in
:mod:`orchestrator.plan.resolve`, which also expands node ranges.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

PLAN_VERSION = 1

# --------------------------------------------------------------------------- scalars

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(v: Any) -> float:
    """``90``, ``"90s"``, ``"1.5m"``, ``"250ms"``, ``"2h"`` -> seconds."""
    if isinstance(v, bool):
        raise ValueError("a duration is a number of seconds or a string like '90s', '5m', '250ms'")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        m = _DURATION.match(v)
        if m:
            return float(m.group(1)) * _UNIT[m.group(2)]
    raise ValueError(f"{v!r} is not a duration: write seconds (90) or '90s', '5m', '250ms', '2h'")


_MAC = re.compile(r"^[0-9a-fA-F]{2}([:-])(?:[0-9a-fA-F]{2}\1){4}[0-9a-fA-F]{2}$")


def parse_mac(v: Any) -> str:
    """Normalise a MAC to lower-case colon form; accept ``-`` separators."""
    if not isinstance(v, str) or not _MAC.match(v):
        raise ValueError(f"{v!r} is not a MAC address: write six hex pairs like 52:54:00:12:34:56")
    return v.replace("-", ":").lower()


def parse_subnet(v: Any) -> IPv4Network:
    if isinstance(v, IPv4Network):
        return v
    if not isinstance(v, str) or "/" not in v:
        raise ValueError(f"{v!r} is not a subnet: write it in CIDR form like 192.168.1.0/24")
    try:
        return IPv4Network(v, strict=True)
    except ValueError as e:
        try:
            net = IPv4Network(v, strict=False)
        except ValueError:
            raise ValueError(f"{v!r} is not a subnet ({e}): write it like 192.168.1.0/24") from None
        raise ValueError(f"{v!r} has host bits set: did you mean {net}?") from None


def parse_failure_budget(v: Any) -> int | str:
    if isinstance(v, bool):
        raise ValueError("failure_budget is a node count (3) or a percentage ('5%')")
    if isinstance(v, int) and v >= 0:
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", v)
        if m and float(m.group(1)) <= 100:
            return f"{float(m.group(1)):g}%"
        if v.strip().isdigit():
            return int(v)
    raise ValueError(f"{v!r} is not a failure budget: write a node count (3) or a percentage ('5%')")


def _listify(v: Any) -> Any:
    return [v] if isinstance(v, (str, int)) and not isinstance(v, bool) else v


Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Mac = Annotated[str, BeforeValidator(parse_mac)]
Subnet = Annotated[IPv4Network, BeforeValidator(parse_subnet)]
Port = Annotated[int, Field(ge=0, le=65535)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --------------------------------------------------------------------------- secrets


class Secret(Strict):
    """A credential reference: never the secret itself.

    Plans end up in version control and in bug reports; a password written
    inline would leak with them. So credentials are only named here and read at
    the moment of use from an environment variable or a file (mode 0600).
    """

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_inline(cls, v: Any) -> Any:
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            raise ValueError(
                "credentials are never written inline: use {env: VARIABLE} or {file: /path/to/secret}"
            )
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> "Secret":
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env: or file:")
        return self


# --------------------------------------------------------------------------- sections


class RelayedSubnet(Strict):
    """A routed rack subnet whose DHCP traffic reaches bootorch through a relay (giaddr).

    The router between the rack and the boot network runs a DHCP relay (``ip
    helper-address``, ``dhcrelay``) pointing at ``network.server``; bootorch
    answers a relayed request from the subnet holding its giaddr, with this
    subnet's mask and ``gateway`` as the router option, and boot files still
    from ``network.server``. docs/site.md says what the network team configures.
    """

    #: The rack subnet (CIDR).
    subnet: Subnet
    #: The relay's (router's) address on that subnet: DHCP's giaddr and the nodes' gateway.
    gateway: IPv4Address
    #: Racks (node ``rack:`` values) on this subnet; their nodes' addresses must lie in it.
    racks: list[str] = []
    #: The router's address on the boot network (in network.subnet): the next hop to this
    #: subnet. The lab's router namespace takes it and the lab routes the subnet through it;
    #: at a site it is documentation (bootorch's host must already route the subnet).
    router: IPv4Address | None = None
    #: Addresses for clients the plan does not list, on this subnet (dhcp.mode full); absent: none.
    pool: Pool | None = None
    #: How bootorch wakes this subnet's nodes. Raw 0x0842 frames do not cross routers:
    #: directed-broadcast sends the UDP magic packet to the subnet's broadcast address,
    #: which the router forwards only when configured to (Cisco ``ip directed-broadcast``,
    #: Linux ``net.ipv4.conf.<if>.bc_forwarding=1``); bmc powers them on with power.bmc.
    wake: Literal["directed-broadcast", "bmc"] = "directed-broadcast"


class Network(Strict):
    """The boot network: where nodes PXE boot and where bootorch listens."""

    interface: str = "eth0"
    subnet: Subnet
    server: IPv4Address
    gateway: IPv4Address | None = None
    dns: list[IPv4Address] = []
    domain: str | None = None
    #: Network namespace the boot network lives in: bootorch runs its servers and
    #: power drivers inside it (re-executing itself with ``ip netns exec``).
    namespace: str | None = None
    #: MTU of the boot network, when not 1500: caps the TFTP block size (mtu - 32).
    mtu: int | None = Field(None, ge=576, le=9216)
    #: Routed rack subnets behind DHCP relays (their nodes are reached through routers).
    relayed: list[RelayedSubnet] = []


class Pool(Strict):
    start: IPv4Address
    end: IPv4Address

    @model_validator(mode="after")
    def _ordered(self) -> "Pool":
        if int(self.start) > int(self.end):
            raise ValueError(f"pool start {self.start} is after its end {self.end}")
        return self


class Dhcp(Strict):
    """How nodes get addresses.

    ``full``: bootorch answers DHCP for the boot subnet (reservations for plan
    nodes, plus the pool if one is given). ``proxy``: an existing DHCP server
    hands out addresses; bootorch only adds boot information (ProxyDHCP).
    ``external``: a site DHCP server does everything (use ``bootorch render`` for
    its config); bootorch follows its logs.
    """

    mode: Literal["full", "proxy", "external"] = "full"
    lease_time: Duration = 86400.0
    #: Absent pool = unknown clients get no answer (the seed's ``deny unknown clients``).
    pool: Pool | None = None


class Loaders(Strict):
    """Boot loader file per client kind (DHCP option 93 / 60 / user class)."""

    #: BIOS PXE ROMs (option 93 = 0), over TFTP.
    bios: str = "pxelinux.0"
    #: UEFI PXE (option 93 = 6/7/9: edk2's own network stack), over TFTP.
    uefi: str = "syslinux.efi"
    #: UEFI HTTP Boot (option 93 = 16, vendor class ``HTTPClient``): a file in the boot root,
    #: offered as its URL on bootorch's HTTP server. iPXE's EFI build, which then gets its script.
    uefi_http: str = "ipxe.efi"


class Boot(Strict):
    #: Directory served over TFTP/HTTP; relative paths are relative to the plan file.
    root: Path = Path("tftpboot")
    loaders: Loaders = Loaders()
    #: Which pxelinux.cfg names to render per node: "mac" -> 01-<mac>, "ip" -> C0A80102.
    config_names: list[Literal["mac", "ip"]] = ["mac"]
    #: Profile rendered as pxelinux.cfg/default (for unknown clients from the pool).
    default_profile: str | None = None
    #: What a client already running iPXE (user class "iPXE") is given: "script", its
    #: HTTP iPXE script (kernel and initrd over HTTP, no chainload loop); or "loader",
    #: the BIOS/UEFI loader over TFTP like any PXE ROM (QEMU's NIC ROMs are iPXE:
    #: this makes the lab walk the seed's pxelinux path).
    ipxe: Literal["script", "loader"] = "script"
    #: Netboot gate: once a node is ready, stop offering it a boot file (it boots
    #: from what it has; no boot loops). A wake or power cycle opens it again.
    gate_after_ready: bool = False

    @field_validator("config_names")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("config_names needs at least one of 'mac', 'ip'")
        return v


class BootServer(Strict):
    """The embedded boot server. Ports are settable so tests never need root."""

    listen: IPv4Address | None = None  # default: network.server
    dhcp_port: Port = 67
    proxy_port: Port = 4011
    tftp_port: Port = 69
    http_port: Port = 8080
    blksize_max: int = Field(1468, ge=512, le=65464)
    windowsize_max: int = Field(64, ge=1, le=65535)
    max_transfers: int = Field(200, ge=1)
    #: Answer IPv6 Router Solicitations on network.interface with a Router Advertisement
    #: that configures nothing (lifetime 0, no prefix, no DHCPv6): firmware that waits for
    #: IPv6 autoconfiguration before it boots (iPXE: ~16 s with no router) goes on at once.
    router_advertisements: bool = False


class Mount(Strict):
    source: str  # "{server}:/usr"
    target: str
    type: str = "nfs"
    options: str = "ro,nolock"


class Profile(Strict):
    """What a node boots: files, root file system and kernel command line."""

    kernel: str
    initrd: Annotated[list[str], BeforeValidator(_listify)] = []
    #: ramdisk: compressed RAM-disk root (root=/dev/ram0); initramfs: cpio root
    #: (no root=); nfs: NFS root (needs nfsroot); none: only what append says.
    root: Literal["ramdisk", "initramfs", "nfs", "none"] = "ramdisk"
    #: NFS root, a template: {server}, {name}, {ip}, {mac}.
    nfsroot: str | None = None
    #: RAM disk size in KiB (kernel ramdisk_size=) for root: ramdisk.
    ramdisk_size: int | None = Field(None, gt=0)
    #: Kernel-level IP configuration: static -> ip=client:server:gw:netmask:host:dev:off,
    #: dhcp -> ip=dhcp (a second DHCP round, the os_dhcp stage), none -> no ip=.
    ip: Literal["static", "dhcp", "none"] = "static"
    device: str = "eth0"
    append: str = ""
    #: File systems the booted node mounts (the RAM-disk image's init does this).
    mounts: list[Mount] = []
    #: What a node on this profile gets when it runs iPXE (user class "iPXE"):
    #: "script" or "loader", as ``boot.ipxe`` explains; unset: ``boot.ipxe``.
    ipxe: Literal["script", "loader"] | None = None
    #: Kernel modules the RAM-disk image carries and loads (NIC drivers): names as modprobe knows them.
    modules: list[str] = ["e1000", "virtio_net", "af_packet"]
    #: Shell commands the image's init runs after the network and mounts are up.
    commands: list[str] = []
    #: The SSH host key a node presents. per-node: its own dropbear key, made by
    #: ``bootorch image build`` under <state_dir>/hostkeys/<node>/ and sent by the
    #: boot server as a second initrd to that node's address only; readiness
    #: trusts exactly that key. none: nothing added (an image with its own keys).
    host_key: Literal["per-node", "none"] = "per-node"

    @model_validator(mode="after")
    def _nfs(self) -> "Profile":
        if self.root == "nfs" and not self.nfsroot:
            raise ValueError("root: nfs needs nfsroot: (e.g. '{server}:/export/nfsroot')")
        return self


class NodeEntry(Strict):
    """One node, a range of nodes (``node[01-64]``), or a CSV inventory file.

    For a range, ``mac`` and ``ip`` may be the first value (counted up per node
    in node-set order) or a list with one value per node.
    """

    name: str | None = None
    mac: Annotated[list[Mac], BeforeValidator(_listify)] | None = None
    ip: Annotated[list[IPv4Address], BeforeValidator(_listify)] | None = None
    profile: str | None = None
    group: str | None = None
    rack: str | None = None
    bmc: str | None = None
    #: CSV file with a header row: name,mac,ip[,profile,group,rack,bmc].
    inventory: Path | None = None

    @model_validator(mode="after")
    def _shape(self) -> "NodeEntry":
        if self.inventory is not None:
            extra = [k for k in ("name", "mac", "ip", "bmc") if getattr(self, k) is not None]
            if extra:
                raise ValueError(
                    f"an inventory entry takes its {', '.join(extra)} from the CSV file; "
                    "remove those keys or drop inventory:"
                )
        else:
            missing = [k for k in ("name", "mac", "ip") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"a node entry needs {', '.join(missing)} (or inventory: FILE.csv)")
        return self


class Wol(Strict):
    """Wake-on-LAN: etherwake's raw 0x0842 frame, or a UDP broadcast."""

    interface: str | None = None  # default: network.interface
    method: Literal["raw", "udp"] = "raw"
    repeat: int = Field(3, ge=1, le=20)
    interval: Duration = 0.1
    udp_port: Literal[7, 9] = 9
    broadcast: IPv4Address | None = None  # default: the subnet's broadcast address
    secureon: Secret | None = None


class Bmc(Strict):
    """Out-of-band power control for power cycles."""

    #: sim: the simulator's control socket (``bootorch sim``); address is its path.
    driver: Literal["none", "redfish", "ipmi", "command", "sim"] = "none"
    #: Template: {name}, {ip}, {mac}, {index}, or a node's own bmc: value.
    address: str | None = None
    username: str | None = None
    password: Secret | None = None
    verify_tls: bool = True
    #: For driver: command, e.g. "pdu-ctl {action} {name}"; {action} is on/off/cycle.
    command: str | None = None
    #: Before powering a node on (on, cycle): none, or pxe: the BMC's one-time boot-source
    #: override to network boot (Redfish Boot.BootSourceOverrideTarget Pxe, IPMI chassis bootdev pxe).
    boot_override: Literal["none", "pxe"] = "none"
    #: IPMI (lanplus) cipher suite: 17 (HMAC-SHA256, AES-128) or 3 (HMAC-SHA1, AES-128); never 0.
    cipher_suite: Literal[3, 8, 12, 17] = 17
    #: After on/off, how long to poll the BMC's power state for the change (BMCs answer before it happens).
    settle: Duration = 60.0

    @model_validator(mode="after")
    def _needs(self) -> "Bmc":
        if self.driver in ("redfish", "ipmi") and not self.address:
            raise ValueError(f"driver {self.driver} needs address: (a template such as '{{name}}-bmc')")
        if self.driver == "sim" and not self.address:
            raise ValueError("driver sim needs address: (the path of the simulator's control socket, "
                             "e.g. /run/bootorch-sim.sock, as `bootorch sim up` prints it)")
        if self.driver == "command" and not self.command:
            raise ValueError("driver command needs command: (e.g. 'pdu-ctl {action} {name}')")
        return self


class Power(Strict):
    wol: Wol = Wol()
    bmc: Bmc = Bmc()


class Wave(Strict):
    name: str
    nodes: str  # node set: node[01-08], @service


class Admission(Strict):
    """How fast nodes are let in. Queue, never reject."""

    #: Cap on nodes in the download stages (loader, config, kernel, initrd).
    max_downloading: int = Field(16, ge=1)
    #: Power-on rate, nodes per second (inrush current, switch MAC learning).
    power_on_rate: float = Field(2.0, gt=0)
    #: Power-on rate per rack (nodes per second) when nodes say rack:.
    rack_power_on_rate: float | None = Field(None, gt=0)
    #: Widen/shrink the download window from the boot server's retransmit rate (AIMD).
    adaptive: bool = True


#: ``http://host[:port]`` of a ``servers:`` entry (group 1 host, group 2 port).
_HTTP_URL = re.compile(r"http://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::(\d{1,5}))?/?")


class ServerAdmission(Strict):
    """Admission for one more boot server: its own window, fed by its own load."""

    #: Cap on this server's nodes in the download stages at once.
    max_downloading: int = Field(16, ge=1)
    #: Widen/shrink this server's window from its load (needs a load signal from that server;
    #: without one the window stays at max_downloading).
    adaptive: bool = True


class SatelliteLink(Strict):
    """How the orchestrator reaches a satellite boot server: another ``bootorch serve`` whose plan has
    ``control.listen`` and ``control.token``; its evidence and load stream over that control API."""

    #: ``host:port`` of the satellite's control API (its ``control.listen``).
    control: str
    #: The satellite's ``control.token`` ({env: NAME} or {file: PATH}).
    token: Secret
    #: PEM file of the CA that signed the satellite's ``control.tls`` certificate: the link uses TLS
    #: and verifies it (absent: plain TCP, the token in the clear: a trusted management network only).
    tls_ca: Path | None = None
    #: The name to verify in the satellite's certificate (default: the host of ``control``).
    server_name: str | None = None

    @field_validator("control")
    @classmethod
    def _control(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{v!r}: write host:port of the satellite's control.listen, e.g. 10.20.0.2:9811")
        return v


class FileServer(Strict):
    """One more boot server (or HTTP cache) carrying the downloads of some racks' nodes.

    Nodes whose ``rack:`` is listed here are admitted against this server's own
    window; every other node against the plan's own server (``rollout.admission``,
    named ``main``). The power-on rates (global, per rack) hold across all servers.
    """

    #: A short name for status, metrics and logs (``main`` is the plan's own server).
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    #: Racks (node ``rack:`` values) whose nodes download from this server.
    racks: list[str] = Field(min_length=1)
    admission: ServerAdmission = ServerAdmission()
    #: ``http://host[:port]``: where these racks' nodes fetch kernels and initrds over HTTP
    #: (an HTTP cache near the racks; ``bootorch render`` writes an nginx config for it).
    #: Their iPXE scripts (and lpxelinux configs) name files there; host-key archives still
    #: come from the plan's own server (they go to the node's own address only).
    http: str | None = None
    #: A satellite: a ``bootorch serve`` near these racks serving their DHCP/TFTP/HTTP; the
    #: orchestrator follows its event stream (evidence and load) over its control API.
    satellite: SatelliteLink | None = None

    @field_validator("http")
    @classmethod
    def _http(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = _HTTP_URL.fullmatch(v)
        if not m or (m.group(2) and not 0 < int(m.group(2)) < 65536):
            raise ValueError(f"{v!r}: write http://host or http://host:port (no path), e.g. http://10.20.0.1:8080")
        return v.rstrip("/")

    @property
    def http_address(self) -> tuple[str, int] | None:
        """``http`` as (host, port); None without it."""
        m = _HTTP_URL.fullmatch(self.http) if self.http else None
        return (m.group(1), int(m.group(2) or 80)) if m else None


class Timeouts(Strict):
    """Seconds a node may spend in each stage before it is stuck."""

    waking: Duration = 90.0
    pxe_dhcp: Duration = 30.0
    loader: Duration = 60.0
    config: Duration = 60.0
    kernel: Duration = 180.0
    initrd: Duration = 300.0
    os_dhcp: Duration = 120.0
    ssh: Duration = 180.0
    ready: Duration = 120.0


class Retries(Strict):
    #: Magic packets re-sent when no PXE DHCP follows a wake.
    wake: int = Field(2, ge=0, le=20)
    #: BMC power cycles before a node is marked failed.
    power_cycle: int = Field(1, ge=0, le=10)


class Rollout(Strict):
    #: In order; nodes not named by any wave form a last wave. Empty: one wave.
    waves: list[Wave] = []
    admission: Admission = Admission()
    timeouts: Timeouts = Timeouts()
    retries: Retries = Retries()
    #: Nodes allowed to fail before the rollout aborts: a count or "5%".
    failure_budget: Annotated[int | str, BeforeValidator(parse_failure_budget)] = 0


class Check(Strict):
    """One readiness check, run over SSH. Exactly one of command/kernel/mount/service."""

    name: str | None = None
    command: str | None = None
    #: Regular expression the stdout must match (for command: and kernel:).
    expect: str | None = None
    kernel: str | None = None  # regex on `uname -r`
    mount: str | None = None  # mount point that must be mounted
    service: str | None = None  # process name that must be running
    #: Run only on nodes of these profiles; empty: on every node.
    profiles: Annotated[list[str], BeforeValidator(_listify)] = []

    @model_validator(mode="after")
    def _one(self) -> "Check":
        given = [k for k in ("command", "kernel", "mount", "service") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a check needs exactly one of command:, kernel:, mount:, service:")
        if self.expect is not None:
            try:
                re.compile(self.expect)
            except re.error as e:
                raise ValueError(f"expect: is not a valid regular expression: {e}") from None
        return self


class Ssh(Strict):
    user: str = "root"
    port: Port = 22
    #: Private key file readiness logs in with (the image's authorized key).
    key: Path | None = None
    #: Also offer the SSH agent's keys (SSH_AUTH_SOCK). Off by default: they would be
    #: offered to whatever answers at a node's address. ~/.ssh keys are never offered.
    agent: bool = False
    #: known_hosts file bootorch keeps; default: <state_dir>/known_hosts.
    known_hosts: Path | None = None
    #: strict: the host key must already be in known_hosts; tofu (trust on first
    #: use, OpenSSH's StrictHostKeyChecking=accept-new, also accepted under that
    #: name): record a new host's key, refuse a changed one. Never blind auto-add.
    host_key_policy: Annotated[Literal["strict", "tofu"], BeforeValidator(lambda v: "tofu" if v == "accept-new" else v)] = "tofu"
    connect_timeout: Duration = 10.0
    #: Parallel SSH sessions.
    concurrency: int = Field(32, ge=1)


class Readiness(Strict):
    #: false: this bootorch never checks readiness (no SSH to nodes); its nodes stay at
    #: ``os_dhcp`` in its own status. For a satellite boot server: the orchestrator
    #: following it checks readiness, and a second SSH login per node only costs both ends.
    enabled: bool = True
    ssh: Ssh = Ssh()
    checks: list[Check] = []


class Metrics(Strict):
    #: host:port for the Prometheus endpoint; "" disables it.
    listen: str = "127.0.0.1:9810"

    @field_validator("listen")
    @classmethod
    def _hostport(cls, v: str) -> str:
        if v == "":
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{v!r}: write host:port, e.g. 127.0.0.1:9810 (or '' to disable)")
        return v


Firmware = Literal["bios", "uefi", "uefi-http", "uefi-ipxe"]


class LabSite(Strict):
    """The site's own boot servers, run by the lab in its namespace as a site would run them
    (:mod:`orchestrator.lab.site`). Which ``dhcp.mode`` they fit: :meth:`conflicts`."""

    #: The site's DHCP server. With dhcp.mode proxy it hands out addresses only (no PXE
    #: options); with dhcp.mode external it runs the config ``bootorch render`` wrote.
    dhcp: Literal["none", "dnsmasq", "iscdhcpd"] = "none"
    #: The site's TFTP server (external mode), serving the rendered boot tree.
    tftp: Literal["none", "dnsmasq", "tftp-hpa"] = "none"

    def conflicts(self, dhcp_mode: str) -> list[str]:
        """What is wrong with these servers beside ``dhcp.mode`` (each message says the fix); [] when nothing."""
        out = []
        if self.dhcp != "none" and dhcp_mode == "full":
            out.append(f"lab.site.dhcp is {self.dhcp} but dhcp.mode is full: two DHCP servers would answer the same "
                       "nodes; set dhcp.mode: proxy (the site hands out addresses, bootorch the boot file), "
                       "dhcp.mode: external (the site serves the boot from `bootorch render`'s configs), "
                       "or lab.site.dhcp: none")
        if self.tftp != "none" and dhcp_mode != "external":
            out.append(f"lab.site.tftp is {self.tftp} but dhcp.mode is {dhcp_mode}: bootorch serves the boot files "
                       "itself there; set dhcp.mode: external, or lab.site.tftp: none")
        return out


class LabSlurm(Strict):
    """A real Slurm controller (slurmctld + munge) for the lab's nodes, power saving through bootorch.

    ``lab up`` runs munged, slurmctld and a per-node slurmd supervisor in the lab namespace
    (:mod:`orchestrator.lab.slurm`); every node starts powered down in Slurm (``State=CLOUD``).
    """

    enabled: bool = False
    #: SlurmUser: the user slurmctld runs as and runs the power-saving programs as; the wrapper
    #: reaches the root-owned orchestrator through sudo (a sudoers rule the lab installs). root: no sudo.
    user: str = Field("slurm", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    #: The one partition holding every lab node (the default partition).
    partition: str = Field("lab", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    #: slurmctld's port on network.server (inside the namespace).
    ctld_port: Port = 6817
    #: First slurmd port: node N (its index in the plan, from 0) listens on slurmd_port + 1 + N.
    slurmd_port: Port = 6818
    #: Idle time before Slurm suspends a node (SuspendTime).
    suspend_time: Duration = 600.0
    #: Slurm's SuspendTimeout and ResumeTimeout (above the plan's worst case boot, or Slurm gives up first).
    suspend_timeout: Duration = 60.0
    resume_timeout: Duration = 600.0


class Lab(Strict):
    """The virtual lab cluster (``bootorch lab``): one QEMU VM per node, in a namespace."""

    #: ``bootorch rollout`` builds missing images, brings the lab up before and down after.
    manage: bool = False
    #: Network namespace holding the bridge, the taps and the VMs.
    namespace: str = "bootorch-lab"
    #: Memory per VM in MiB.
    memory_mib: int = Field(256, ge=64, le=16384)
    cpus: int = Field(1, ge=1, le=8)
    #: auto: KVM when it works (a probe VM must run), else TCG software emulation.
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    #: QEMU NIC model (its PXE ROM comes from Debian's ipxe-qemu).
    nic_model: str = "e1000"
    #: Port of the lab's Redfish BMC endpoint, on network.server inside the namespace.
    bmc_port: Port = 9200
    #: Which BMC implementation fronts the VMs: builtin (our Redfish subset), ipmi_sim
    #: (OpenIPMI's simulator, one per node), sushy (OpenStack's sushy-emulator, Redfish).
    bmc: Literal["builtin", "ipmi_sim", "sushy"] = "builtin"
    #: The site's own DHCP/TFTP servers (ProxyDHCP beside them, or external mode).
    site: LabSite = LabSite()
    #: A real Slurm controller whose power saving calls ``bootorch slurm``.
    slurm: LabSlurm = LabSlurm()
    #: nginx: run an HTTP cache (``bootorch render``'s nginx config) for each ``servers:`` entry with ``http``.
    caches: Literal["none", "nginx"] = "none"
    #: The VMs' firmware: one name for every node, or a map from node set to name
    #: (``{"node[02-03]": uefi, node04: uefi-http}``; later entries win, unnamed
    #: nodes get bios). bios: SeaBIOS + the NIC's iPXE ROM; uefi: OVMF with edk2's own
    #: PXE stack (virtio-net, no option ROM); uefi-http: the same, HTTP Boot tried
    #: first; uefi-ipxe: OVMF + the NIC's iPXE EFI ROM (e1000).
    firmware: Firmware | dict[str, Firmware] = "bios"
    #: Fault injection: nodes whose NIC ignores magic packets (Wake-on-LAN off in
    #: the BIOS); only a BMC power action starts them. Tests the escalation ladder.
    wol_disabled: list[str] = []


class ControlTls(Strict):
    #: PEM certificate (chain) of the control API's TCP listener.
    cert: Path
    #: PEM private key (mode 0600).
    key: Path


class Control(Strict):
    """The on-call control API of a running ``rollout``/``serve`` (``bootorch wake|reboot|slurm`` use it)."""

    #: Unix socket (created 0600; its directory 0700 when bootorch creates it); relative paths are relative to state_dir.
    socket: Path = Path("control/control.sock")
    #: Optional TCP listener ``host:port`` for remote on-call tools; "" = none. Needs ``token``.
    listen: str = ""
    #: Shared secret a TCP client must present ({env: NAME} or {file: PATH}).
    token: Secret | None = None
    #: TLS for the TCP listener: ``{cert: PEM, key: PEM}`` (clients verify it: a satellite's
    #: orchestrator with ``servers[].satellite.tls_ca``).
    tls: ControlTls | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v == "":
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{v!r}: write host:port, e.g. 127.0.0.1:9811 (or '' for the Unix socket only)")
        return v

    @model_validator(mode="after")
    def _token(self) -> "Control":
        if self.listen and self.token is None:
            raise ValueError("control.listen needs control.token ({env: NAME} or {file: PATH}): a TCP control port without a secret lets anyone reboot nodes")
        return self


class LogSource(Strict):
    """A log file of a site's own boot server, followed like ``tail -F`` for evidence."""

    source: Literal["dnsmasq", "iscdhcpd", "tftp-hpa", "kea", "syslog", "nginx"]
    path: Path


class Plan(Strict):
    """A whole plan file."""

    version: int
    name: str = "cluster"
    #: Journal, known_hosts, leases; relative paths are relative to the plan file.
    state_dir: Path | None = None
    network: Network
    dhcp: Dhcp = Dhcp()
    boot: Boot = Boot()
    bootserver: BootServer = BootServer()
    profiles: dict[str, Profile]
    nodes: list[NodeEntry]
    power: Power = Power()
    rollout: Rollout = Rollout()
    readiness: Readiness = Readiness()
    metrics: Metrics = Metrics()
    lab: Lab = Lab()
    #: The on-call control API (``bootorch wake``/``reboot``/``slurm`` talk to a running orchestrator).
    control: Control = Control()
    #: Logs of a site's own DHCP/TFTP servers to follow (dhcp.mode external, or beside ours).
    logs: list[LogSource] = []
    #: More boot servers or caches, each carrying some racks' downloads under its own admission window.
    servers: list[FileServer] = []

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != PLAN_VERSION:
            raise ValueError(f"this bootorch reads plan version {PLAN_VERSION}; the file says {v}")
        return v

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, v: dict[str, Profile]) -> dict[str, Profile]:
        if not v:
            raise ValueError("define at least one profile")
        return v

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, v: list[NodeEntry]) -> list[NodeEntry]:
        if not v:
            raise ValueError("list at least one node")
        return v
