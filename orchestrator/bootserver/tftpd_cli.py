"""``bootorch tftpd``: the TFTP server alone, a drop-in for ``in.tftpd -L -s DIR``.

Foreground, one log line per transfer on stderr, ``listening on HOST:PORT`` once
bound (so a caller that asked for port 0 learns the port), exit 0 on SIGINT or
SIGTERM. Also runs standalone: ``python -m orchestrator.bootserver.tftpd_cli
--root DIR --listen 127.0.0.1:0``.

As tftpd-hpa does, it serves only files that others may read (``S_IROTH``), and
when started as root it gives root up once the socket is bound: it switches to
``--user`` (default ``nobody``; tftpd-hpa's ``-u``) with no supplementary groups,
before ``listening on`` is printed. ``--user ''`` keeps running as root. There is
no chroot (the confinement of :mod:`~orchestrator.bootserver.files` needs
``/proc``), so that user must be able to reach the root directory through every
directory above it; if it cannot, the server exits with an error at start.
"""

from __future__ import annotations

import argparse
import os
import pwd
import signal
import sys

import trio

from orchestrator import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from orchestrator.bootserver import lockstep_native
from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.tftp import MAX_STALL, TIMEOUT_MAX, TftpCounters, serve_tftp
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


class UserError(Exception):
    """``--user`` cannot be honoured (no such user, or switching needs root)."""


def _lookup(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise UserError(f"no such user: {name!r}") from None


def user_to_run_as(name: str | None, euid: int) -> pwd.struct_passwd | None:
    """The account to switch to once bound, or None to stay as we are.

    ``name`` is ``--user``: None when not given. Started as root (``euid`` 0)
    the default is ``nobody``, and ``""`` means "stay root". Not root, there is
    nothing to give up: no switch, and asking for another user is an error.
    """
    if name == "":
        return None
    if euid != 0:
        if name is None or _lookup(name).pw_uid == euid:
            return None
        raise UserError(f"--user {name} needs root (running as uid {euid})")
    return _lookup(name or "nobody")


def drop_privileges(pw: pwd.struct_passwd) -> None:
    """Become ``pw`` for good: no supplementary groups, its group, its user (in that order).

    ``setuid`` as root sets the real, effective and saved user IDs, and glibc
    applies it to every thread (the transfer threads already run). Checked: if
    root could be regained afterwards, this raises rather than serve as root.
    """
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if pw.pw_uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise UserError(f"switched to {pw.pw_name} but could regain root: refusing to serve")


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
    parser.add_argument("--user", "-u", default=None, metavar="NAME",
                        help="user to run as once the port is bound (tftpd-hpa's -u; default nobody when started as root; "
                             "'' keeps the current user). Only files others may read are served, whoever runs the server")
    parser.add_argument("--timeout", type=float, default=1.0, metavar="SECONDS",
                        help="retransmit timeout unless the client negotiates one; until the client's first ACK "
                             "never longer than this (default 1)")
    parser.add_argument("--retries", type=_bounded(0, 1000), default=5, metavar="N",
                        help="retransmits without progress before giving up (default 5; until the client's first ACK one is "
                             "guaranteed and the rest come from a budget all transfers share, 50/s)")
    parser.add_argument("--timeout-max", type=_bounded(proto.TIMEOUT_MIN, proto.TIMEOUT_MAX), default=TIMEOUT_MAX, metavar="SECONDS",
                        help=f"largest RFC 2349 timeout a client may negotiate; a larger one is ignored (default {TIMEOUT_MAX})")
    parser.add_argument("--max-stall", type=float, default=MAX_STALL, metavar="SECONDS",
                        help=f"a transfer without progress for this long ends, whatever its timeout and retries "
                             f"(default {MAX_STALL:g}; at least --timeout and --timeout-max)")
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


async def _main(args: argparse.Namespace, run_as: pwd.struct_passwd | None) -> int:
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
                            retries=args.retries, timeout_max=args.timeout_max, max_stall=args.max_stall,
                            counters=counters, task_status=task_status,
                        )
                    )
                    if run_as is not None:
                        # Bound (port 69 needs root): nothing else needs it.
                        drop_privileges(run_as)
                        if files.root is not None and not os.access(files.root, os.X_OK):
                            # No chroot here (tftpd-hpa has one): the whole path must be searchable.
                            raise UserError(f"{run_as.pw_name} cannot enter {files.root} or a directory above it: "
                                            "let others search it (chmod o+x), or choose another --user")
                    bhost, bport = bound
                    shown = f"[{bhost}]" if ":" in bhost else bhost
                    print(f"listening on {shown}:{bport}", file=sys.stderr, flush=True)
                    if run_as is not None:
                        print(f"tftp: running as {run_as.pw_name} (uid {run_as.pw_uid}, gid {run_as.pw_gid})",
                              file=sys.stderr, flush=True)
                    native = "native" if lockstep_native.AVAILABLE else f"pure Python ({lockstep_native.why_unavailable()})"
                    print(f"tftp: transfer loop: {native}", file=sys.stderr, flush=True)
                    async for signum in signals:
                        print(f"tftp: {signal.Signals(signum).name}, exiting", file=sys.stderr, flush=True)
                        nursery.cancel_scope.cancel()
                        break
            # The server has stopped (transfers in flight were reported "aborted");
            # the events already queued are still logged before we exit.
        print(f"tftp: {counters.transfers_ok} ok, {counters.transfers_unconfirmed} unconfirmed, {counters.transfers_failed} failed", file=sys.stderr, flush=True)
    return EXIT_OK


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


def run(args: argparse.Namespace) -> int:
    try:
        # Before binding: a typo in --user must not leave a server running as root.
        run_as = user_to_run_as(args.user, os.geteuid())
    except UserError as e:
        print(f"bootorch tftpd: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            return trio.run(_main, args, run_as)
        except BaseExceptionGroup as eg:
            # Errors from inside the nursery (e.g. the bind) arrive grouped.
            leaves = list(_leaves(eg))
            if len(leaves) == 1 and isinstance(leaves[0], (OSError, UserError, ValueError)):
                raise leaves[0] from None
            raise
    except UserError as e:
        print(f"bootorch tftpd: {e}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as e:  # limits that contradict each other (TftpServer checks them)
        print(f"bootorch tftpd: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as e:
        print(f"bootorch tftpd: no such root directory: {e.filename or args.root}", file=sys.stderr)
        return EXIT_USAGE
    except NotADirectoryError:
        print(f"bootorch tftpd: not a directory: {args.root}", file=sys.stderr)
        return EXIT_USAGE
    except PermissionError as e:
        print(f"bootorch tftpd: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"bootorch tftpd: {e}", file=sys.stderr)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bootorch tftpd", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
