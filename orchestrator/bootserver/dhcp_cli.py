"""``python -m orchestrator.bootserver.dhcp_cli``: the DHCP server alone, for tests and benchmarks.

Either from a plan (``--plan PLAN``) or from flags (``--subnet``, ``--server``,
``--host MAC,IP[,NAME]``, ``--pool START-END``). Logs one line per reply to
stderr with ``-v``; prints ``listening on HOST:PORT`` when ready.
"""

from __future__ import annotations

import argparse
import signal
import sys
from ipaddress import IPv4Address, IPv4Network

import trio

from orchestrator.bootserver.dhcp import DhcpPrivilegeError, DhcpStats, StaticPolicy, make_core, plan_config, plan_policy, serve_dhcp
from orchestrator.protocols.dhcp import ip_int
from orchestrator.protocols.dhcp_server import ClientKind, Reservation, ServerConfig, Subnet


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", help="serve the plan's network, reservations and boot files")
    p.add_argument("--interface", help="pin to this interface (SO_BINDTODEVICE); required to broadcast replies")
    p.add_argument("--listen", default="0.0.0.0", help="bind address (default 0.0.0.0: needed to receive broadcasts)")
    p.add_argument("--port", type=int, default=67, help="DHCP port (default 67)")
    p.add_argument("--pxe-port", type=int, default=4011, help="PXE boot server port (default 4011; -1 disables)")
    p.add_argument("--subnet", action="append", default=[], help="CIDR served (repeatable: relayed subnets)")
    p.add_argument("--server", help="this server's address (server identifier, next-server)")
    p.add_argument("--router", help="router option for the subnets")
    p.add_argument("--pool", action="append", default=[], help="START-END pool (repeatable; matched to its subnet)")
    p.add_argument("--host", action="append", default=[], metavar="MAC,IP[,NAME]", help="a reservation (repeatable)")
    p.add_argument("--boot-file", default="pxelinux.0", help="BIOS boot file (default pxelinux.0)")
    p.add_argument("--uefi-file", default="syslinux.efi", help="UEFI boot file")
    p.add_argument("--ipxe-script", default=None, help="URL handed to iPXE clients")
    p.add_argument("--mode", choices=["full", "proxy"], default="full")
    p.add_argument("--lease-time", type=int, default=3600)
    p.add_argument("--leases", default=None, help="lease journal file (default: in memory)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="one line per reply on stderr (without it no per-reply events are built: faster under load)")


def _from_flags(args: argparse.Namespace) -> tuple[ServerConfig, StaticPolicy]:
    if not args.subnet or not args.server:
        raise SystemExit("dhcp: give --plan, or --subnet and --server")
    nets = [IPv4Network(s) for s in args.subnet]
    pools: dict[IPv4Network, tuple[int, int]] = {}
    for spec in args.pool:
        a, _, b = spec.partition("-")
        lo, hi = ip_int(a), ip_int(b)
        net = next((n for n in nets if IPv4Address(lo) in n), None)
        if net is None:
            raise SystemExit(f"dhcp: pool {spec} is in no --subnet")
        pools[net] = (lo, hi)
    subnets = tuple(
        Subnet(network=n, router=IPv4Address(args.router) if args.router and IPv4Address(args.router) in n else None,
               pool=pools.get(n), lease_time=args.lease_time)
        for n in nets
    )
    res = {}
    for spec in args.host:
        parts = spec.split(",")
        res[parts[0].lower()] = Reservation(ip_int(parts[1]), parts[2] if len(parts) > 2 else None)
    policy = StaticPolicy(
        res, next_server=args.server,
        loaders={ClientKind.BIOS: args.boot_file, ClientKind.UEFI: args.uefi_file},
        ipxe_script=args.ipxe_script,
    )
    return ServerConfig(server_ip=IPv4Address(args.server), subnets=subnets, mode=args.mode), policy


def run(args: argparse.Namespace) -> int:
    if args.plan:
        from orchestrator.plan import PlanError, load_plan

        try:
            plan = load_plan(args.plan)
        except PlanError as e:
            print(e, file=sys.stderr)
            return 1
        config, policy = plan_config(plan), plan_policy(plan)
        interface = args.interface or plan.model.network.interface
    else:
        config, policy = _from_flags(args)
        interface = args.interface
    core = make_core(config, policy, args.leases)
    stats = DhcpStats()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            send, recv = trio.open_memory_channel(1024)
            ports = await nursery.start(
                lambda task_status: serve_dhcp(
                    core, host=args.listen, port=args.port, pxe_port=None if args.pxe_port < 0 else args.pxe_port,
                    interface=interface, events=send if args.verbose else None, stats=stats, task_status=task_status,
                )
            )
            print(f"listening on {args.listen}:{ports[0]}" + (f" and :{ports[1]}" if ports[1] else "")
                  + (f" ({interface})" if interface else ""), file=sys.stderr, flush=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                nursery.start_soon(_log, recv, args.verbose)
                async for _ in sigs:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except DhcpPrivilegeError as e:
        print(f"dhcp: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"dhcp: {e}", file=sys.stderr)
        return 1
    finally:
        core.leases.close()
    c = core.counters
    print(f"dhcp: stopped; in {c['packets_in']} malformed {c['malformed']} "
          f"offers {c['out_offer']} acks {c['out_ack']} naks {c['out_nak']} shed {dict(stats.shed)}", file=sys.stderr)
    return 0


async def _log(recv: trio.MemoryReceiveChannel, verbose: bool) -> None:
    async for ev in recv:
        if verbose and ev.detail.get("direction") == "out":
            print(f"dhcp: {ev.detail['msg']} {ev.mac} {ev.client_ip or '-'} {ev.detail.get('boot_file', '')}",
                  file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.bootserver.dhcp_cli", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
