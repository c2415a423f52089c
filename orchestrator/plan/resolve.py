"""From a validated model to the cluster it describes, and the checks that need it all.

:func:`load_plan` is the one entry point: read the YAML (line-aware), validate it
against :mod:`orchestrator.plan.model`, expand node ranges and CSV inventories
into :class:`Node` values, and run the whole-plan checks. Every problem found is
collected -- a user fixing a plan wants the full list at once, not one error per
run -- and raised together as a :class:`PlanError` of ``file:line: message``.
"""

from __future__ import annotations

import csv
import os
import difflib
import io
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ValidationError

from orchestrator.nodeset import NodeSetError, expand
from orchestrator.plan.model import FileServer, Plan, RelayedSubnet, parse_mac
from orchestrator.plan.source import PlanError, Problem, Source, load_yaml

#: The plan's own boot server (embedded, or the site's servers whose logs it follows) in ``servers:`` terms.
MAIN_SERVER = "main"
INVENTORY_COLUMNS = ("name", "mac", "ip", "profile", "group", "rack", "bmc")


@dataclass(frozen=True, slots=True)
class Node:
    """One node of the cluster, fully resolved."""

    name: str
    mac: str
    ip: IPv4Address
    profile: str
    group: str | None = None
    rack: str | None = None
    bmc: str | None = None
    #: Position in the plan (0-based), for templates such as ``{index}``.
    index: int = 0
    #: Where the node was defined: (file, line).
    origin: tuple[str, int | None] = ("", None)


@dataclass(slots=True)
class LoadedPlan:
    """A plan that passed validation: the model plus the expanded cluster."""

    path: Path
    model: Plan
    nodes: list[Node]
    warnings: list[Problem] = field(default_factory=list)
    by_name: dict[str, Node] = field(default_factory=dict)
    by_mac: dict[str, Node] = field(default_factory=dict)
    by_ip: dict[IPv4Address, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {n.name: n for n in self.nodes}
        self.by_mac = {n.mac: n for n in self.nodes}
        self.by_ip = {n.ip: n for n in self.nodes}

    @property
    def base(self) -> Path:
        return self.path.parent

    def resolve_path(self, p: Path | str) -> Path:
        p = Path(p)
        return p if p.is_absolute() else Path(os.path.normpath(self.base / p))

    @property
    def boot_root(self) -> Path:
        return self.resolve_path(self.model.boot.root)

    @property
    def state_dir(self) -> Path:
        sd = self.model.state_dir or Path("var") / self.model.name
        return self.resolve_path(sd)

    def nfs_export(self, profile: str) -> Path:
        """Where ``bootorch image build`` writes the root tree of an NFS-root profile
        (``<state_dir>/nfsroot/<profile>``); the lab's NFS server exports it, a site copies it."""
        return self.state_dir / "nfsroot" / profile

    @property
    def groups(self) -> dict[str, list[str]]:
        """``@group`` and ``@rack`` names usable in node sets (waves, CLI)."""
        return node_groups(self.nodes)

    def server_entry(self, node: Node) -> FileServer | None:
        """The ``servers:`` entry whose racks hold ``node``; None: the plan's own server."""
        if node.rack is not None:
            for srv in self.model.servers:
                if node.rack in srv.racks:
                    return srv
        return None

    def server_of(self, node: Node) -> str:
        """The name of the boot server carrying ``node``'s downloads (``servers:`` by rack; else ``main``)."""
        srv = self.server_entry(node)
        return srv.name if srv is not None else MAIN_SERVER

    def relayed_subnet_of(self, node: Node | IPv4Address) -> RelayedSubnet | None:
        """The relayed subnet (``network.relayed``) a node's address lies in; None: the boot subnet."""
        ip = node.ip if isinstance(node, Node) else node
        return next((r for r in self.model.network.relayed if ip in r.subnet), None)

    def select(self, expr: str) -> list[Node]:
        """Nodes named by a node-set expression (``node[01-04]``, ``@rack1``), plan order kept."""
        names = set(expand(expr, self.groups))
        unknown = names - self.by_name.keys()
        if unknown:
            raise NodeSetError(f"not in the plan: {', '.join(sorted(unknown)[:5])}")
        return [n for n in self.nodes if n.name in names]

    def firmware_of(self, node: Node) -> str:
        """The lab firmware of ``node`` (``lab.firmware``)."""
        fw = self.model.lab.firmware
        if isinstance(fw, str):
            return fw
        got = "bios"
        for expr, name in fw.items():
            if node.name in expand(expr, self.groups):
                got = name
        return got

    def waves(self) -> list[tuple[str, list[Node]]]:
        """The rollout's waves in order; nodes in no wave form a last wave 'rest'."""
        out: list[tuple[str, list[Node]]] = []
        taken: set[str] = set()
        for w in self.model.rollout.waves:
            members = [n for n in self.select(w.nodes) if n.name not in taken]
            taken.update(n.name for n in members)
            out.append((w.name, members))
        rest = [n for n in self.nodes if n.name not in taken]
        if rest:
            out.append(("rest" if out else "all", rest))
        return out


def node_groups(nodes: Iterable[Node]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in nodes:
        for g in (n.group, n.rack):
            if g:
                groups.setdefault(g, []).append(n.name)
    return groups


# --------------------------------------------------------------------------- errors


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class a location points into (for 'allowed keys' hints)."""
    model: Any = Plan
    for part in loc:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        f = model.model_fields.get(str(part))
        if f is None:
            return None
        model = _inner_model(f.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _inner_model(ann: Any) -> Any:
    """Dig a BaseModel out of list[...], dict[str, ...], X | None."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _pydantic_problems(src: Source, err: ValidationError) -> list[Problem]:
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc if not (isinstance(p, str) and "[" in p)) or "plan"
        kind = e["type"]
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key {loc[-1]!r}"
            msg += f": did you mean {hint[0]!r}?" if hint else ""
            if allowed:
                msg += f" (allowed here: {', '.join(allowed)})"
            out.append(Problem(src.path, src.line_of(loc, key=True), msg))
            continue
        if kind == "missing":
            msg = f"{where}: required key is missing"
            line = src.line_of(loc[:-1])
        else:
            text = e["msg"]
            for prefix in ("Value error, ", "Assertion failed, "):
                text = text.removeprefix(prefix)
            msg = f"{where}: {text}"
            line = src.line_of(loc)
        out.append(Problem(src.path, line, msg))
    return out


# --------------------------------------------------------------------------- nodes


def _count_up_mac(mac: str, k: int) -> str:
    value = int(mac.replace(":", ""), 16) + k
    if value >= 1 << 48:
        raise ValueError("MAC range runs past ff:ff:ff:ff:ff:ff")
    h = f"{value:012x}"
    return ":".join(h[i : i + 2] for i in range(0, 12, 2))


def _read_inventory(path: Path, shown: str) -> tuple[list[dict[str, str]], list[Problem]]:
    problems: list[Problem] = []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        return [], [Problem(shown, None, f"cannot read inventory: {e.strerror or e}")]
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return [], [Problem(shown, 1, "inventory is empty: write a header row 'name,mac,ip' and one row per node")]
    reader = csv.reader(io.StringIO("\n".join(line for _, line in lines)))
    rows = list(reader)
    header = [h.strip().lower() for h in rows[0]]
    hline = lines[0][0]
    unknown = [h for h in header if h not in INVENTORY_COLUMNS]
    if unknown:
        problems.append(Problem(shown, hline, f"unknown column(s) {', '.join(unknown)}; columns are {', '.join(INVENTORY_COLUMNS)}"))
    for need in ("name", "mac", "ip"):
        if need not in header:
            problems.append(Problem(shown, hline, f"header lacks column {need!r} (needed: name,mac,ip)"))
    if problems:
        return [], problems
    out = []
    for (lineno, _), row in zip(lines[1:], rows[1:]):
        if len(row) != len(header):
            problems.append(Problem(shown, lineno, f"row has {len(row)} fields, header has {len(header)}"))
            continue
        rec = {h: v.strip() for h, v in zip(header, row)}
        rec["__line__"] = str(lineno)
        out.append(rec)
    return out, problems


def _expand_nodes(lp_path: Path, src: Source, plan: Plan) -> tuple[list[Node], list[Problem]]:
    nodes: list[Node] = []
    problems: list[Problem] = []
    only_profile = next(iter(plan.profiles)) if len(plan.profiles) == 1 else None

    def pick_profile(given: str | None, where: tuple[str, int | None], name: str) -> str | None:
        prof = given or only_profile
        if prof is None:
            problems.append(Problem(*where, f"node {name}: say which profile: (defined: {', '.join(plan.profiles)})"))
        elif prof not in plan.profiles:
            hint = difflib.get_close_matches(prof, list(plan.profiles), n=1)
            msg = f"node {name} refers to profile {prof!r}, which profiles: does not define"
            msg += f"; did you mean {hint[0]!r}?" if hint else f" (defined: {', '.join(plan.profiles)})"
            problems.append(Problem(*where, msg))
            return None
        return prof

    for i, entry in enumerate(plan.nodes):
        if entry.inventory is not None:
            ipath = entry.inventory if entry.inventory.is_absolute() else lp_path.parent / entry.inventory
            shown = str(ipath) if entry.inventory.is_absolute() else str(Path(src.path).parent / entry.inventory)
            rows, probs = _read_inventory(ipath, shown)
            if probs and not rows and any(p.line is None for p in probs):
                probs = [Problem(src.path, src.line_of(("nodes", i, "inventory")), f"{shown}: {p.message}") for p in probs]
            problems.extend(probs)
            for rec in rows:
                where = (shown, int(rec["__line__"]))
                try:
                    mac = parse_mac(rec["mac"])
                except ValueError as e:
                    problems.append(Problem(*where, str(e)))
                    continue
                try:
                    ip = ip_address(rec["ip"])
                    if not isinstance(ip, IPv4Address):
                        raise ValueError
                except ValueError:
                    problems.append(Problem(*where, f"{rec['ip']!r} is not an IPv4 address"))
                    continue
                if not rec["name"]:
                    problems.append(Problem(*where, "empty node name"))
                    continue
                prof = pick_profile(rec.get("profile") or entry.profile, where, rec["name"])
                if prof is None:
                    continue
                nodes.append(
                    Node(
                        rec["name"], mac, ip, prof,
                        group=rec.get("group") or entry.group,
                        rack=rec.get("rack") or entry.rack,
                        bmc=rec.get("bmc") or None,
                        origin=where,
                    )
                )
            continue

        where = (src.path, src.line_of(("nodes", i, "name")))
        assert entry.name is not None and entry.mac is not None and entry.ip is not None
        try:
            names = expand(entry.name)
        except NodeSetError as e:
            problems.append(Problem(*where, f"name: {e}; write a name or a range like node[01-16]"))
            continue
        n = len(names)
        macs, ips = entry.mac, entry.ip
        if len(macs) not in (1, n):
            problems.append(Problem(src.path, src.line_of(("nodes", i, "mac")), f"{entry.name} is {n} nodes but mac: lists {len(macs)}; give one MAC (counted up) or {n}"))
            continue
        if len(ips) not in (1, n):
            problems.append(Problem(src.path, src.line_of(("nodes", i, "ip")), f"{entry.name} is {n} nodes but ip: lists {len(ips)}; give one address (counted up) or {n}"))
            continue
        prof = pick_profile(entry.profile, (src.path, src.line_of(("nodes", i, "profile")) if entry.profile else where[1]), entry.name)
        if prof is None:
            continue
        try:
            for k, name in enumerate(names):
                mac = macs[k] if len(macs) == n else _count_up_mac(macs[0], k)
                ip = ips[k] if len(ips) == n else IPv4Address(int(ips[0]) + k)
                nodes.append(Node(name, mac, ip, prof, group=entry.group, rack=entry.rack, bmc=entry.bmc, origin=where))
        except (ValueError, Exception) as e:  # AddressValueError past 255.255.255.255, MAC overflow
            problems.append(Problem(*where, f"{entry.name}: {e}"))
    nodes = [Node(n.name, n.mac, n.ip, n.profile, n.group, n.rack, n.bmc, idx, n.origin) for idx, n in enumerate(nodes)]
    return nodes, problems


# --------------------------------------------------------------------------- checks


def _loc(n: Node) -> str:
    f, line = n.origin
    return f"{f}:{line}" if line else f


def _check_cluster(plan: LoadedPlan, src: Source) -> list[Problem]:
    model = plan.model
    net: IPv4Network = model.network.subnet
    out: list[Problem] = []

    def at(*loc: Any, key: bool = False) -> tuple[str, int | None]:
        return (src.path, src.line_of(loc, key=key))

    # The network itself.
    if model.network.server not in net:
        sev = "error" if model.dhcp.mode in ("full", "proxy") else "warning"
        out.append(Problem(*at("network", "server"), f"boot server {model.network.server} is outside subnet {net}; PXE clients on {net} must reach it directly", sev))
    if model.network.gateway is not None and model.network.gateway not in net:
        out.append(Problem(*at("network", "gateway"), f"gateway {model.network.gateway} is outside subnet {net}"))
    for msg in model.lab.site.conflicts(model.dhcp.mode):
        out.append(Problem(*at("lab", "site"), msg))

    # Duplicates and addresses. A range entry with a wrong address would give
    # one line per node; say it once per entry and count the rest.
    per_entry: dict[tuple[str, int | None, str], list[Any]] = {}

    def node_problem(n: Node, kind: str, msg: str) -> None:
        key = (*n.origin, kind)
        if key in per_entry:
            per_entry[key][1] += 1
            return
        per_entry[key] = [len(out), 0]
        out.append(Problem(*n.origin, msg))

    seen_name: dict[str, Node] = {}
    seen_mac: dict[str, Node] = {}
    seen_ip: dict[IPv4Address, Node] = {}
    warned: set[tuple[str, int | None]] = set()
    for n in plan.nodes:
        for table, key, what in ((seen_name, n.name, "name"), (seen_mac, n.mac, "MAC"), (seen_ip, n.ip, "IP")):
            other = table.get(key)  # type: ignore[call-overload]
            if other is not None:
                out.append(Problem(*n.origin, f"duplicate {what} {key}: node {n.name} and node {other.name} ({_loc(other)}); every node needs its own {what}"))
            else:
                table[key] = n  # type: ignore[index]
        home = plan.relayed_subnet_of(n)
        home_net = home.subnet if home is not None else net
        if n.ip not in home_net:
            relayed = ", ".join(str(r.subnet) for r in model.network.relayed)
            where_ok = f" and the relayed subnets ({relayed})" if relayed else ""
            node_problem(n, "outside", f"node {n.name}: IP {n.ip} is outside subnet {net}{where_ok}; use an address in "
                         f"{net[1]}-{net[-2]}" + (" or a relayed subnet" if relayed else "")
                         + ", or list its routed subnet under network.relayed")
        elif n.ip in (home_net.network_address, home_net.broadcast_address):
            node_problem(n, "netaddr", f"node {n.name}: IP {n.ip} is the subnet's {'network' if n.ip == home_net.network_address else 'broadcast'} address")
        if n.ip == model.network.server:
            node_problem(n, "server", f"node {n.name}: IP {n.ip} is the boot server's address")
        if model.network.gateway is not None and n.ip == model.network.gateway:
            node_problem(n, "gateway", f"node {n.name}: IP {n.ip} is the gateway's address")
        out.extend(_check_node_relayed(plan, n, home, node_problem, warned))
    for idx, extra in per_entry.values():
        if extra:
            p = out[idx]
            out[idx] = Problem(p.file, p.line, f"{p.message} (and {extra} more node{'s' if extra > 1 else ''} of this entry)")

    # The pool: the seed's own dhcpd.conf puts its reservations inside the pool's
    # range (ISC dhcpd only warns at run time). Two owners of one address is a
    # lease conflict waiting for the day a node's MAC changes.
    pool = model.dhcp.pool
    if pool is not None:
        if model.dhcp.mode != "full":
            out.append(Problem(*at("dhcp", "pool"), f"pool is ignored in dhcp mode {model.dhcp.mode} (only mode full hands out addresses)", "warning"))
        for end in ("start", "end"):
            addr = getattr(pool, end)
            if addr not in net:
                out.append(Problem(*at("dhcp", "pool", end), f"pool {end} {addr} is outside subnet {net}"))
        lo, hi = int(pool.start), int(pool.end)
        inside = [n for n in plan.nodes if lo <= int(n.ip) <= hi]
        if inside:
            shown = ", ".join(f"{n.name} {n.ip}" for n in inside[:3]) + (", ..." if len(inside) > 3 else "")
            free = _free_range_hint(net, plan.nodes, model)
            out.append(Problem(*at("dhcp", "pool"), f"pool {pool.start}-{pool.end} overlaps {len(inside)} reserved node address(es) ({shown}); move the pool off the reservations{free}"))
        for what, addr in (("boot server", model.network.server), ("gateway", model.network.gateway)):
            if addr is not None and lo <= int(addr) <= hi:
                out.append(Problem(*at("dhcp", "pool"), f"pool {pool.start}-{pool.end} contains the {what} address {addr}"))

    out.extend(_check_relayed(plan, src))

    if model.boot.default_profile and model.boot.default_profile not in model.profiles:
        out.append(Problem(*at("boot", "default_profile"), f"default_profile {model.boot.default_profile!r} is not a profile (defined: {', '.join(model.profiles)})"))

    # Waves.
    groups = plan.groups
    in_wave: dict[str, str] = {}
    for i, w in enumerate(model.rollout.waves):
        where = at("rollout", "waves", i, "nodes")
        try:
            names = expand(w.nodes, groups)
        except NodeSetError as e:
            out.append(Problem(*where, f"wave {w.name}: {e} (groups come from nodes' group:/rack:; known: {', '.join(sorted(groups)) or 'none'})"))
            continue
        unknown = [x for x in names if x not in plan.by_name]
        if unknown:
            out.append(Problem(*where, f"wave {w.name} names nodes the plan does not define: {', '.join(unknown[:5])}"))
        for x in names:
            if x in in_wave and x in plan.by_name:
                out.append(Problem(*where, f"node {x} is in wave {in_wave[x]} and wave {w.name}; a node boots in one wave"))
                break
            in_wave.setdefault(x, w.name)

    unknown_lab = [x for x in model.lab.wol_disabled if x not in plan.by_name]
    if unknown_lab:
        out.append(Problem(*at("lab", "wol_disabled"), f"lab.wol_disabled names nodes the plan does not define: {', '.join(unknown_lab)}"))

    for i, c in enumerate(model.readiness.checks):
        unknown_p = [x for x in c.profiles if x not in model.profiles]
        if unknown_p:
            out.append(Problem(*at("readiness", "checks", i, "profiles"), f"readiness check {c.name or i + 1} names profiles the plan does not define: {', '.join(unknown_p)} (defined: {', '.join(model.profiles)})"))

    if isinstance(model.lab.firmware, dict):
        for expr in model.lab.firmware:
            try:
                plan.select(expr)
            except (NodeSetError, ValueError) as e:
                out.append(Problem(*at("lab", "firmware", expr), f"lab.firmware: {expr!r} is not a node set of this plan ({e})"))

    budget = model.rollout.failure_budget
    if isinstance(budget, int) and plan.nodes and budget >= len(plan.nodes):
        out.append(Problem(*at("rollout", "failure_budget"), f"failure_budget {budget} is not less than the {len(plan.nodes)} nodes: the rollout could never fail", "warning"))

    # Files named by profiles must exist in the boot root.
    root = plan.boot_root
    if not root.is_dir():
        out.append(Problem(*at("boot", "root") if "root" in (src.data or {}).get("boot", {}) else at("boot"), f"boot root {root} does not exist here, so profile files were not checked (bootorch image build creates it)", "warning"))
    else:
        used_profiles = {n.profile for n in plan.nodes} | ({model.boot.default_profile} if model.boot.default_profile else set())
        for pname, prof in model.profiles.items():
            if pname not in used_profiles:
                continue
            for key, fname in [("kernel", prof.kernel)] + [("initrd", f) for f in prof.initrd]:
                if not (root / fname.lstrip("/")).is_file():
                    out.append(Problem(*at("profiles", pname, key), f"profile {pname}: {key} file {fname!r} is not in the boot root {root}"))
        loader = model.boot.loaders.bios
        if not (root / loader.lstrip("/")).is_file():
            out.append(Problem(*at("boot"), f"boot loader {loader!r} is not in the boot root {root} (copy it from /usr/lib/PXELINUX/)"))

    ssh = model.readiness.ssh
    if ssh.key is not None and not plan.resolve_path(ssh.key).exists():
        out.append(Problem(*at("readiness", "ssh", "key"), f"SSH key {plan.resolve_path(ssh.key)} does not exist here", "warning"))
    if ssh.key is None and not ssh.agent and model.readiness.checks:
        out.append(Problem(*at("readiness", "ssh", key=True), (
            "readiness.ssh sets neither key: nor agent: true, so readiness has no key to log in with and every "
            "node would fail its checks; set key: to the private key the image authorizes (bootorch image build "
            "puts key + .pub in the image), or agent: true to offer your SSH agent's keys"), "warning"))

    # The state directory holds the nodes' private SSH host keys (and the journal,
    # leases, known_hosts): inside the boot root, TFTP and HTTP would serve them to anyone.
    state, boot = os.path.realpath(plan.state_dir), os.path.realpath(plan.boot_root)
    if state == boot or state.startswith(boot.rstrip("/") + "/"):
        where = at("state_dir") if model.state_dir is not None else at("boot", "root")
        out.append(Problem(*where, (
            f"state_dir {plan.state_dir} is inside the boot root {plan.boot_root}: the boot server would serve the "
            "nodes' private host keys, the journal and the leases to anyone; put it outside (the default is "
            "var/<name> beside the plan)")))
    return out


def _check_node_relayed(plan: LoadedPlan, n: Node, home: RelayedSubnet | None, node_problem: Any,
                        warned: set[tuple[str, int | None]]) -> list[Problem]:
    """One node against ``network.relayed``: its rack's subnet holds its address; not a relay's address."""
    out: list[Problem] = []
    listed = [r for r in plan.model.network.relayed if n.rack is not None and n.rack in r.racks]
    if listed and home is not listed[0]:
        r = listed[0]
        node_problem(n, "rack-subnet", f"node {n.name}: rack {n.rack} is on relayed subnet {r.subnet} (network.relayed) "
                     f"but its IP {n.ip} is not in it; give it an address in {r.subnet[1]}-{r.subnet[-2]} or move "
                     f"{n.rack} to the right subnet's racks:")
    elif home is not None and n.rack is not None and not listed and n.origin not in warned:
        warned.add(n.origin)
        out.append(Problem(*n.origin, f"node {n.name}: IP {n.ip} is on relayed subnet {home.subnet} but its rack {n.rack} "
                           f"is not in that subnet's racks:; add it there (the plan says which subnet a rack is on)",
                           "warning"))
    for r in plan.model.network.relayed:
        if n.ip == r.gateway:
            node_problem(n, "relay-gw", f"node {n.name}: IP {n.ip} is the gateway (relay) address of {r.subnet}")
        if r.router is not None and n.ip == r.router:
            node_problem(n, "relay-router", f"node {n.name}: IP {n.ip} is the address of the router to {r.subnet}")
    return out


def _check_relayed(plan: LoadedPlan, src: Source) -> list[Problem]:
    """``network.relayed``: subnets apart from each other and the boot subnet, gateways, routers, racks, pools."""
    model = plan.model
    net = model.network.subnet
    out: list[Problem] = []
    rack_home: dict[str, int] = {}
    for i, r in enumerate(model.network.relayed):
        def at(*loc: Any, key: bool = False) -> tuple[str, int | None]:
            return (src.path, src.line_of(("network", "relayed", i, *loc), key=key))

        if r.subnet.overlaps(net):
            out.append(Problem(*at("subnet"), f"relayed subnet {r.subnet} overlaps the boot subnet {net} (network.subnet); "
                               "a relayed subnet is a different, routed network: give it its own range"))
        for j, other in enumerate(model.network.relayed[:i]):
            if r.subnet.overlaps(other.subnet):
                out.append(Problem(*at("subnet"), f"relayed subnet {r.subnet} overlaps relayed subnet {other.subnet} "
                                   f"(network.relayed entry {j + 1}); each routed rack network needs its own range"))
        if r.gateway not in r.subnet:
            out.append(Problem(*at("gateway"), f"gateway {r.gateway} is outside its relayed subnet {r.subnet}; it is the relay's "
                               f"address on that subnet (DHCP's giaddr), e.g. {r.subnet[1]}"))
        elif r.subnet.prefixlen < 31 and r.gateway in (r.subnet.network_address, r.subnet.broadcast_address):
            out.append(Problem(*at("gateway"), f"gateway {r.gateway} is the {'network' if r.gateway == r.subnet.network_address else 'broadcast'} "
                               f"address of {r.subnet}; use a host address such as {r.subnet[1]}"))
        if r.router is not None:
            if r.router not in net:
                out.append(Problem(*at("router"), f"router {r.router} is not on the boot subnet {net}; it is the router's "
                                   "address there, the next hop bootorch's host reaches the relayed subnet through"))
            elif r.router == model.network.server:
                out.append(Problem(*at("router"), f"router {r.router} is the boot server's own address (network.server)"))
            pool = model.dhcp.pool
            if pool is not None and int(pool.start) <= int(r.router) <= int(pool.end):
                out.append(Problem(*at("router"), f"router {r.router} is inside dhcp.pool {pool.start}-{pool.end}; "
                                   "move the pool off it"))
        for k, rack in enumerate(r.racks):
            if rack in rack_home and rack_home[rack] != i:
                out.append(Problem(*at("racks", k), f"rack {rack} is listed on two relayed subnets "
                                   f"({model.network.relayed[rack_home[rack]].subnet} and {r.subnet}); a rack is on one"))
            rack_home.setdefault(rack, i)
            if not any(n.rack == rack for n in plan.nodes):
                out.append(Problem(*at("racks", k), f"rack {rack} of relayed subnet {r.subnet} has no node (no node says "
                                   f"rack: {rack})", "warning"))
        if r.pool is not None:
            if model.dhcp.mode != "full":
                out.append(Problem(*at("pool"), f"pool is ignored in dhcp mode {model.dhcp.mode} (only mode full hands out addresses)", "warning"))
            for end in ("start", "end"):
                addr = getattr(r.pool, end)
                if addr not in r.subnet:
                    out.append(Problem(*at("pool", end), f"pool {end} {addr} is outside its relayed subnet {r.subnet}"))
            lo, hi = int(r.pool.start), int(r.pool.end)
            inside = [n for n in plan.nodes if lo <= int(n.ip) <= hi]
            if inside:
                shown = ", ".join(f"{n.name} {n.ip}" for n in inside[:3]) + (", ..." if len(inside) > 3 else "")
                out.append(Problem(*at("pool"), f"pool {r.pool.start}-{r.pool.end} overlaps {len(inside)} reserved node "
                                   f"address(es) ({shown}); move the pool off the reservations"))
            if lo <= int(r.gateway) <= hi:
                out.append(Problem(*at("pool"), f"pool {r.pool.start}-{r.pool.end} contains the gateway address {r.gateway}"))
        if r.wake == "bmc" and model.power.bmc.driver == "none":
            out.append(Problem(*at("wake"), f"relayed subnet {r.subnet} says wake: bmc but power.bmc.driver is none; "
                               "configure power.bmc, or use wake: directed-broadcast"))
    return out


def _check_servers(plan: LoadedPlan, src: Source) -> list[Problem]:
    """``servers:``: unique names (not ``main``), each rack on one server, racks that have nodes."""
    out: list[Problem] = []
    home: dict[str, str] = {}
    names: set[str] = set()
    for i, srv in enumerate(plan.model.servers):
        def at(*loc: Any, key: bool = False) -> tuple[str, int | None]:
            return (src.path, src.line_of(("servers", i, *loc), key=key))

        if srv.name == MAIN_SERVER:
            out.append(Problem(*at("name"), f"server name {MAIN_SERVER!r} is the plan's own boot server; "
                               "name this one after where it stands, e.g. row-b"))
        elif srv.name in names:
            out.append(Problem(*at("name"), f"server name {srv.name!r} is used twice in servers:; give each its own"))
        names.add(srv.name)
        for k, rack in enumerate(srv.racks):
            if home.get(rack) == srv.name:
                out.append(Problem(*at("racks", k), f"rack {rack} is listed twice on server {srv.name}; remove one"))
            elif rack in home:
                out.append(Problem(*at("racks", k), f"rack {rack} is listed on two servers ({home[rack]} and {srv.name}); "
                                   "a rack's nodes download from one server"))
            home.setdefault(rack, srv.name)
            if not any(n.rack == rack for n in plan.nodes):
                out.append(Problem(*at("racks", k), f"rack {rack} of server {srv.name} has no node (no node says rack: {rack})",
                                   "warning"))
    return out


def _free_range_hint(net: IPv4Network, nodes: list[Node], plan: Plan) -> str:
    used = {int(n.ip) for n in nodes if n.ip in net}
    for addr in (plan.network.server, plan.network.gateway):
        if addr is not None and addr in net:
            used.add(int(addr))
    top = max(used)
    if top + 1 < int(net.broadcast_address):
        return f", e.g. start: {IPv4Address(top + 1)} end: {net[-2]}"
    return ""


def load_plan(path: str | Path) -> LoadedPlan:
    """Load, validate and expand a plan. Raises PlanError listing every problem."""
    path = Path(path)
    src = load_yaml(path)
    if not isinstance(src.data, dict):
        raise PlanError([Problem(src.path, 1, "a plan is a YAML mapping (version:, network:, profiles:, nodes:, ...)")])
    if "version" not in src.data:
        raise PlanError([Problem(src.path, 1, "version: is missing; start the plan with 'version: 1'")])
    try:
        model = Plan.model_validate(src.data)
    except ValidationError as e:
        raise PlanError(_pydantic_problems(src, e)) from None
    nodes, problems = _expand_nodes(path, src, model)
    plan = LoadedPlan(path=path.resolve(), model=model, nodes=nodes)
    problems += _check_cluster(plan, src)
    problems += _check_servers(plan, src)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise PlanError(problems)
    plan.warnings = [p for p in problems if p.severity != "error"]
    return plan
