"""``bootorch tftpd``: the TFTP server alone, a drop-in for ``in.tftpd -L -s DIR``.

Foreground, one log line per transfer on stderr, ``listening on HOST:PORT`` once
bound (so a caller that asked for port 0 learns the port), exit 0 on SIGINT or
SIGTERM. Also runs standalone: ``python -m orchestrator.bootserver.tftpd_cli
--root DIR --listen 127.0.0.1:0``.
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio

from orchestrator.bootserver import lockstep_native
from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.tftp import TftpCounters, serve_tftp
from orchestrator.events import BootEvent, EventKind
from orchestrator.protocols import tftp as proto


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` (all IPv4) or ``HOST`` (port 69)."""
    host, port = value, "69"
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise argparse.ArgumentTypeError(f"bad address {value!r}")
        host, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"bad address {value!r}")
            port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    host = host or "0.0.0.0"
    try:
        p = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {value!r}") from None
    if not 0 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {value!r}")
    return host, p


def _bounded(lo: int, hi: int):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}")
        return v

    return conv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", "-s", required=True, help="directory to serve (read-only, confined)")
    parser.add_argument("--listen", "-l", type=parse_listen, default=("0.0.0.0", 69), metavar="HOST:PORT", help="address to listen on (default 0.0.0.0:69)")
    parser.add_argument("--blksize-max", type=_bounded(proto.BLKSIZE_MIN, proto.BLKSIZE_MAX), default=proto.PATH_MTU_BLKSIZE, metavar="N", help="largest RFC 2348 blksize granted (default 1468: no IP fragmentation on Ethernet)")
    parser.add_argument("--windowsize-max", type=_bounded(proto.WINDOWSIZE_MIN, proto.WINDOWSIZE_MAX), default=64, metavar="N", help="largest RFC 7440 windowsize granted (default 64)")
    parser.add_argument("--max-transfers", type=_bounded(1, 1_000_000), default=50, metavar="N", help="concurrent transfers, all clients (default 50, as dnsmasq)")
    parser.add_argument("--max-per-client", type=_bounded(1, 1_000_000), default=8, metavar="N", help="concurrent transfers per client IP (default 8)")
    parser.add_argument("--timeout", type=float, default=1.0, metavar="SECONDS", help="retransmit timeout unless the client negotiates one (default 1)")
    parser.add_argument("--retries", type=_bounded(0, 1000), default=5, metavar="N", help="retransmits without progress before giving up (default 5)")
    parser.add_argument("--spin-us", type=_bounded(0, 10_000), default=None, metavar="US",
                        help="cap, in microseconds, on how long a fast transfer's thread polls for the next ACK before it "
                             f"sleeps (default {lockstep_native.SPIN_US_DEFAULT} or $BOOTORCH_TFTP_SPIN_US; 0: never poll). "
                             "Polling saves a wakeup per ACK on fast clients at the cost of CPU")


def format_event(ev: BootEvent) -> str | None:
    """One line per finished transfer (tftp-hpa's -v log, in our words)."""
    if ev.kind is EventKind.FILE_REQUEST:
        return None
    where = f"{ev.client_ip}:{ev.client_port}"
    if ev.kind is EventKind.FILE_DONE:
        status = "ok" if ev.result in (None, "ok") else str(ev.result)
    else:
        status = f"failed ({ev.result})"
    dur = f" in {ev.duration:.3f}s" if ev.duration is not None else ""
    rate = ""
    if ev.duration and ev.bytes:
        rate = f" {ev.bytes / ev.duration / 1e6:.1f} MB/s"
    extra = f" retransmits={ev.retransmits}" if ev.retransmits else ""
    msg = ev.detail.get("error_message") if ev.detail else None
    if msg:
        extra += f" peer said {msg!r}"
    return f"tftp: {where} {ev.filename!r} {status} {ev.bytes} bytes{dur}{rate}{extra}"


async def _main(args: argparse.Namespace) -> int:
    files = BootFiles(args.root)
    host, port = args.listen
    send, recv = trio.open_memory_channel[BootEvent](1024)
    counters = TftpCounters()

    async def log_events() -> None:
        async for ev in recv:
            line = format_event(ev)
            if line:
                print(line, file=sys.stderr, flush=True)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:
            outer.start_soon(log_events)  # ends when the channel is closed and drained
            with send:
                async with trio.open_nursery() as nursery:
                    if args.spin_us is not None:
                        lockstep_native.spin_us = args.spin_us
                    bound = await nursery.start(
                        lambda task_status: serve_tftp(
                            files, host, port, events=send, blksize_max=args.blksize_max,
                            windowsize_max=args.windowsize_max, max_transfers=args.max_transfers,
                            max_per_client=args.max_per_client, timeout=args.timeout,
                            retries=args.retries, counters=counters, task_status=task_status,
                        )
                    )
                    bhost, bport = bound
                    shown = f"[{bhost}]" if ":" in bhost else bhost
                    print(f"listening on {shown}:{bport}", file=sys.stderr, flush=True)
                    native = "native" if lockstep_native.AVAILABLE else f"pure Python ({lockstep_native.why_unavailable()})"
                    print(f"tftp: transfer loop: {native}", file=sys.stderr, flush=True)
                    async for signum in signals:
                        print(f"tftp: {signal.Signals(signum).name}, exiting", file=sys.stderr, flush=True)
                        nursery.cancel_scope.cancel()
                        break
            # The server has stopped (transfers in flight were reported "aborted");
            # the events already queued are still logged before we exit.
        print(f"tftp: {counters.transfers_ok} ok, {counters.transfers_unconfirmed} unconfirmed, {counters.transfers_failed} failed", file=sys.stderr, flush=True)
    return 0


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


def run(args: argparse.Namespace) -> int:
    try:
        try:
            return trio.run(_main, args)
        except BaseExceptionGroup as eg:
            # Errors from inside the nursery (e.g. the bind) arrive grouped.
            leaves = list(_leaves(eg))
            if len(leaves) == 1 and isinstance(leaves[0], OSError):
                raise leaves[0] from None
            raise
    except FileNotFoundError as e:
        print(f"bootorch tftpd: no such root directory: {e.filename or args.root}", file=sys.stderr)
        return 2
    except NotADirectoryError:
        print(f"bootorch tftpd: not a directory: {args.root}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(f"bootorch tftpd: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"bootorch tftpd: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bootorch tftpd", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
