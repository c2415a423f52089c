"""Null Router Advertisements: the sans-IO codec, and the server against the Linux kernel's own IPv6 stack."""

from __future__ import annotations

import struct
import subprocess
import sys
import time

import pytest

from orchestrator.protocols.ndp import is_router_solicitation, null_router_advertisement
from tests.conftest import require_root


def test_null_router_advertisement_configures_nothing():
    ra = null_router_advertisement(bytes.fromhex("5254007700ff"))
    typ, code, csum, hops, flags, lifetime, reachable, retrans = struct.unpack("!BBHBBHII", ra[:16])
    assert (typ, code, csum) == (134, 0, 0)  # the kernel fills the checksum in
    assert (hops, flags, lifetime, reachable, retrans) == (0, 0, 0, 0, 0)  # no router, no DHCPv6, nothing set
    assert ra[16:] == b"\x01\x01" + bytes.fromhex("5254007700ff")  # source link-layer address
    assert null_router_advertisement() == ra[:16]
    with pytest.raises(ValueError):
        null_router_advertisement(b"\x00" * 5)


@pytest.mark.parametrize("data, ok", [
    (b"\x85\x00\x00\x00" + b"\x00" * 4, True),
    (b"\x85\x00\x12\x34" + b"\x00" * 4 + b"\x01\x01" + b"\x52" * 6, True),
    (b"\x85\x01\x00\x00" + b"\x00" * 4, False),  # code must be 0
    (b"\x86\x00\x00\x00" + b"\x00" * 12, False),  # an advertisement
    (b"\x85\x00\x00\x00" + b"\x00" * 3, False),  # short
    (b"\x85\x00\x00\x00" + b"\x00" * 4 + b"\x01\x00" + b"\x00" * 6, False),  # option length 0
    (b"\x85\x00\x00\x00" + b"\x00" * 4 + b"\x01\x02" + b"\x00" * 6, False),  # option past the end
])
def test_router_solicitation_validation(data, ok):
    assert is_router_solicitation(data) is ok


SERVER = r"""
import sys, trio
from orchestrator.bootserver.ra import RaStats, serve_ra
stats = RaStats()
async def main():
    async with trio.open_nursery() as n:
        await n.start(lambda task_status: serve_ra("veth-s", stats=stats, task_status=task_status))
        print("up", flush=True)
        with trio.move_on_after(float(sys.argv[1])):
            while stats.answered < 1:
                await trio.sleep(0.05)
        print(stats.solicitations, stats.answered, stats.dropped, flush=True)
        n.cancel_scope.cancel()
trio.run(main)
"""


@pytest.mark.slow
def test_server_answers_the_kernels_solicitation_and_the_host_gets_no_router(tmp_path):
    """A Linux host (another namespace, accept_ra on) solicits when its link comes up: it gets our
    advertisement, and keeps no default route from it (router lifetime 0)."""
    require_root()
    from orchestrator.lab.netns import NetLab

    with NetLab() as lab:
        s, c = lab.namespace("ras"), lab.namespace("rac")
        subprocess.run(["ip", "link", "add", "veth-s", "netns", s.name, "type", "veth", "peer", "name", "veth-c",
                        "netns", c.name], check=True, timeout=10)
        for ns, dev in ((s, "veth-s"), (c, "veth-c")):
            for key in ("disable_ipv6=0", f"{dev}.accept_dad=0"):
                subprocess.run(["ip", "netns", "exec", ns.name, "sysctl", "-qw", f"net.ipv6.conf.{key}"], timeout=10)
        subprocess.run(["ip", "netns", "exec", c.name, "sysctl", "-qw", "net.ipv6.conf.veth-c.accept_ra=2",
                        "net.ipv6.conf.veth-c.router_solicitations=3", "net.ipv6.conf.veth-c.router_solicitation_interval=1"],
                       check=True, timeout=10)
        subprocess.run(["ip", "-n", s.name, "link", "set", "veth-s", "up"], check=True, timeout=10)
        server = lab.popen(s, [sys.executable, "-c", SERVER, "20"], stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        subprocess.run(["ip", "-n", c.name, "link", "set", "veth-c", "up"], check=True, timeout=10)  # the host solicits
        solicited, answered, dropped = map(int, server.stdout.readline().split())
        assert server.wait(timeout=30) == 0
        assert answered >= 1 and solicited >= answered and dropped == 0
        time.sleep(0.5)
        routes = subprocess.run(["ip", "-n", c.name, "-6", "route", "show", "default"], capture_output=True, text=True,
                                timeout=10).stdout
        assert routes.strip() == ""  # lifetime 0: not a default router
