"""``bootorch sim``: simulated PXE clients for a plan's nodes.

``bootorch sim up PLAN`` builds the topology (:mod:`orchestrator.sim.topology`),
enters the clients' namespace, and runs one simulated node per plan node in the
foreground until SIGINT/SIGTERM; everything it made is removed on the way out,
also on errors. When it is ready it prints one line to stdout::

    sim ready: 20 nodes, server namespace bt-sims-123 (veth bts123 tbf 100mbit), clients in bt-simc-123, control /tmp/x/sim.sock

``bootorch sim status PLAN`` asks a running simulator (through the control
socket) for its counters. The plan says where things are: ``network.namespace``
is the boot server's namespace (made if missing), ``network.interface`` the
server's end of the veth, ``power.bmc.address`` (with ``driver: sim``) the
control socket, unless ``--control`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from orchestrator import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from orchestrator.sim import machine as m


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sim_cmd", required=True)
    up = sub.add_parser("up", help="run simulated PXE clients for the plan's nodes (foreground, until killed)")
    up.add_argument("plan")
    up.add_argument("--rate", default="100mbit", help="tbf rate of the boot server's link (tc syntax; 'none': unlimited)")
    up.add_argument("--burst", default="64kb", help="tbf burst (tc syntax)")
    up.add_argument("--limit", default=None, help="tbf queue in bytes (tc syntax, e.g. 256kb); default: --latency")
    up.add_argument("--latency", default="50ms", help="tbf queue as the longest wait (when --limit is not given)")
    up.add_argument("--client-ns", default=None, help="the clients' namespace (default bt-simc-<pid>)")
    up.add_argument("--client-dev", default=None, help="the clients' end of the veth (default btc<pid>)")
    up.add_argument("--control", default=None, help="control socket path (default: power.bmc.address of a sim plan)")
    up.add_argument("--post-delay", type=float, default=2.0, help="seconds from power-on to the first DHCP")
    up.add_argument("--post-jitter", type=float, default=0.5, help="uniform extra POST seconds per boot")
    up.add_argument("--kernel-delay", type=float, default=1.0, help="seconds from the last initrd block to the OS DHCP")
    up.add_argument("--ssh-delay", type=float, default=0.5, help="seconds from the OS lease to the SSH answer")
    up.add_argument("--fault", action="append", default=[], metavar="NODE:FAULT",
                    help="NODE:drop_dhcp[=BOOTS] (its first BOOTS boots send no DHCP) or NODE:wol_disabled")
    up.add_argument("--seed", type=int, default=1)
    up.add_argument("--stats-out", default=None, help="write the simulator's counters as JSON here on exit")
    up.add_argument("--no-wol", action="store_true", help="do not listen for magic packets (BMC power only)")
    st = sub.add_parser("status", help="counters of a running simulator")
    st.add_argument("plan")
    st.add_argument("--control", default=None)


def _control_path(plan, given: str | None) -> Path | None:
    if given:
        return Path(given)
    bmc = plan.model.power.bmc
    if bmc.driver == "sim" and bmc.address:
        return plan.resolve_path(bmc.address)
    return None


def _faults(plan, specs: list[str]) -> dict[str, m.Faults]:
    names = {n.name for n in plan.nodes}
    out: dict[str, m.Faults] = {}
    for spec in specs:
        node, sep, fault = spec.partition(":")
        if not sep or node not in names:
            raise ValueError(f"--fault {spec!r}: write NODE:FAULT with a node of the plan")
        f = out.setdefault(node, m.Faults())
        kind, _, val = fault.partition("=")
        if kind == "drop_dhcp":
            f.drop_dhcp_boots = int(val or 1)
        elif kind == "wol_disabled":
            f.wol_disabled = True
        else:
            raise ValueError(f"--fault {spec!r}: unknown fault {kind!r} (drop_dhcp, wol_disabled)")
    return out


def _up(args: argparse.Namespace) -> int:
    import trio

    from orchestrator.lab.netns import NetnsError
    from orchestrator.plan import load_plan
    from orchestrator.sim.runtime import SimOptions, Simulator
    from orchestrator.sim.topology import Topology, client_address, enter_netns

    if os.geteuid() != 0:
        print("bootorch sim: network namespaces and tc need root", file=sys.stderr)
        return EXIT_FAILED
    plan = load_plan(args.plan)
    net = plan.model.network
    if not net.namespace:
        print("bootorch sim: the plan needs network.namespace (the boot server's namespace, made if missing)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        faults = _faults(plan, args.fault)
    except ValueError as e:
        print(f"bootorch sim: {e}", file=sys.stderr)
        return EXIT_USAGE
    pid = os.getpid()
    taken = {n.ip for n in plan.nodes} | {net.server}
    topo = Topology(
        server_ns=net.namespace, client_ns=args.client_ns or f"bt-simc-{pid}", server_dev=net.interface,
        client_dev=args.client_dev or f"btc{pid}"[:15], subnet=net.subnet, server_ip=net.server,
        client_ip=client_address(net.subnet, taken), rate=None if args.rate == "none" else args.rate,
        burst=args.burst, limit=args.limit, latency=args.latency)
    control = _control_path(plan, args.control)
    timing = m.Timing(post_delay=args.post_delay, post_jitter=args.post_jitter, kernel_delay=args.kernel_delay,
                      ssh_delay=args.ssh_delay)
    nodes = [(n.name, n.mac, faults.get(n.name, m.Faults())) for n in plan.nodes]
    sim = Simulator(nodes, SimOptions(interface=topo.client_dev, control=control, timing=timing, seed=args.seed,
                                      wol=not args.no_wol))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(sim.run)
            shaped = f"tbf {topo.rate}" if topo.rate else "unshaped"
            print(f"sim ready: {len(nodes)} nodes, server namespace {topo.server_ns} (veth {topo.server_dev} {shaped}), "
                  f"clients in {topo.client_ns}, control {control}", flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                async for _ in sigs:
                    break
            nursery.cancel_scope.cancel()

    # SIGTERM before trio's receiver is installed must still clean up.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        topo.up()
        enter_netns(topo.client_ns)
        trio.run(main)
    except KeyboardInterrupt:
        pass
    except (NetnsError, OSError) as e:
        print(f"bootorch sim: {e}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if args.stats_out:
            try:
                stats = sim.stats() if sim.t0 else {}
            except Exception:  # noqa: BLE001 -- outside trio: compute without the clock
                stats = {}
            stats["qdisc"] = topo.qdisc_stats() if topo.created or topo._up else ""
            Path(args.stats_out).write_text(json.dumps(stats, indent=2))
        topo.down()
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    import trio

    from orchestrator.plan import load_plan
    from orchestrator.sim.power import control_request

    plan = load_plan(args.plan)
    path = _control_path(plan, args.control)
    if path is None:
        print("bootorch sim status: no control socket (give --control or power.bmc {driver: sim, address: PATH})",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        r = trio.run(control_request, path, {"action": "stats"})
    except (OSError, trio.TooSlowError) as e:
        print(f"bootorch sim status: {path}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(r, indent=2))
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    if args.sim_cmd == "up":
        return _up(args)
    return _status(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bootorch sim", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
