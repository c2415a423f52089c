"""tftp-hpa's log (``in.tftpd -v`` / ``-vv``, tag ``in.tftpd``).

``RRQ from IP filename NAME`` is logged when a request arrives, BEFORE the
name is validated: a FILE_REQUEST, never a completion (``-m`` remap rules add
``remapped to NAME``, kept as ``remapped_to``). ``-vv`` adds ``sending NAK
(CODE, TEXT) to IP``: a FILE_FAILED, tied to its request by the forked
child's PID (failing that, by the client's address).

tftp-hpa never logs a completion (nor a timeout or a client abort): from
tftp-hpa alone there is no FILE_DONE. The tracker has to read the next step's
evidence as the completion of the previous one (a FILE_REQUEST for the next
file, or the OS DHCP, means the previous transfer ended; that it succeeded is
only known because the client moved on to what needs it).
"""

from __future__ import annotations

import re
from typing import Any

from orchestrator.events import BootEvent, EventKind
from orchestrator.logwatch.parsers.common import IP_PATTERN, LRU, LineParser, Record, valid_ip

__all__ = ["TftpHpaParser"]

_TFTP_ERRORS = {0: "error", 1: "not_found", 2: "access_violation", 3: "error", 4: "error",
                5: "error", 6: "error", 7: "error", 8: "refused"}  # RFC 1350 §5, RFC 2347 (8)
_HPA_RRQ = re.compile(rf"RRQ from ({IP_PATTERN}) filename (.*)", re.S)
_HPA_NAK = re.compile(rf"sending NAK \((\d{{1,5}}), (.*)\) to ({IP_PATTERN})", re.S)


class TftpHpaParser(LineParser):
    """tftp-hpa ``in.tftpd -v`` / ``-vv`` lines."""

    source = "log:tftp-hpa"
    idents = ("in.tftpd", "tftpd", "tftp")

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._by_pid: LRU = LRU()  # forked child's pid -> (ip, filename)
        self._by_ip: LRU = LRU()  # ip -> last filename asked (when there is no pid)

    def record(self, rec: Record) -> list[BootEvent]:
        msg = rec.message.rstrip("\n")
        m = _HPA_RRQ.fullmatch(msg)
        if m:
            ip = valid_ip(m.group(1))
            name = m.group(2)
            detail: dict[str, Any] = {"op": "rrq"}
            # "... filename A remapped to B" (with -m rules). A name holding
            # " remapped to " is ambiguous; the first split keeps what the
            # client asked for, as the embedded server reports it.
            if " remapped to " in name:
                name, _, remapped = name.partition(" remapped to ")
                detail["remapped_to"] = remapped
            if rec.pid is not None:
                self._by_pid.put(rec.pid, (ip, name))
            if ip:
                self._by_ip.put(ip, name)
            return [self.file_event(rec, EventKind.FILE_REQUEST, ip, name, **detail)]
        m = _HPA_NAK.fullmatch(msg)
        if m:
            code = int(m.group(1))
            ip = valid_ip(m.group(3))
            name = None
            if rec.pid is not None and rec.pid in self._by_pid:
                pip, pname = self._by_pid.pop(rec.pid)
                if pip == ip:
                    name = pname
            if name is None and ip is not None:
                name = self._by_ip.get(ip)
            return [self.file_event(rec, EventKind.FILE_FAILED, ip, name, result=_TFTP_ERRORS.get(code, "error"),
                                    error_code=code, error_message=m.group(2))]
        return []
