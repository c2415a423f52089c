"""A fake link for sans-IO TFTP tests: a :class:`ReadClient` and a :class:`ReadTransfer`, no sockets, no clocks.

h11's ``tests/helpers.py`` shape: two protocol objects joined by an in-memory
network with an explicit clock and hooks to drop or duplicate datagrams.
Timers fire only when the test advances ``now``.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from orchestrator.bootserver.files import MemoryFile
from orchestrator.protocols import tftp as p

class Link:
    """Client <-> server transfer over an in-memory network with an explicit clock.

    ``drop(direction, pkt)`` returning True loses that datagram; ``dup`` likewise
    delivers it twice. ``direction`` is "s2c" or "c2s". ``log`` records every
    datagram that reached its destination.
    """

    def __init__(self, data: bytes, options: dict | None = None, mode: str = "octet", *, drop: Callable[[str, bytes], bool] | None = None, dup: Callable[[str, bytes], bool] | None = None, **server_kw) -> None:
        self.now = 0.0
        self.client = p.ReadClient("file", mode, options, timeout=1.0, retries=20)
        rrq = self.client.start(self.now)[0]
        req = p.parse_packet(rrq)
        assert isinstance(req, p.ReadRequest)
        self.server = p.ReadTransfer(req, MemoryFile("file", data), **server_kw)
        self.drop = drop or (lambda d, pkt: False)
        self.dup = dup or (lambda d, pkt: False)
        self.queue: deque[tuple[str, bytes]] = deque()
        self.log: list[tuple[str, bytes]] = []
        self.server_events: list = []
        self.client_events: list = []
        out, ev = self.server.start(self.now)
        self._push("s2c", out)
        self.server_events += ev

    def _push(self, direction: str, pkts) -> None:
        for pkt in pkts:
            pkt = bytes(pkt)
            if self.drop(direction, pkt):
                continue
            self.queue.append((direction, pkt))
            if self.dup(direction, pkt):
                self.queue.append((direction, pkt))

    def step(self) -> bool:
        if self.queue:
            direction, pkt = self.queue.popleft()
            self.log.append((direction, pkt))
            if direction == "s2c":
                out, ev = self.client.datagram(pkt, self.now)
                self.client_events += ev
                self._push("c2s", out)
            elif pkt[:2] == b"\x00\x01":
                pass  # a retransmitted RRQ goes to the listening port, which ignores it
            else:
                out, ev = self.server.datagram(pkt, self.now)
                self.server_events += ev
                self._push("s2c", out)
            return True
        deadlines = [d for d in (self.server.next_deadline, self.client.next_deadline) if d is not None]
        if not deadlines:
            return False
        self.now = min(deadlines)
        out, ev = self.server.timer(self.now)
        self.server_events += ev
        self._push("s2c", out)
        self._push("c2s", self.client.timer(self.now))
        return True

    def run(self, max_steps: int = 2_000_000) -> None:
        for _ in range(max_steps):
            if not self.step():
                return
        raise AssertionError("link did not settle")


def data_blocks(log, direction="s2c"):
    return [int.from_bytes(pkt[2:4], "big") for d, pkt in log if d == direction and pkt[:2] == b"\x00\x03"]
