"""OpenIPMI ``ipmi_sim``'s chassis control program for one lab VM: IPMI chassis commands -> QMP.

ipmi_sim's ``chassis_control "PROGRAM"`` (lan.conf) runs ``PROGRAM get PARM...``
and ``PROGRAM set PARM VALUE...`` through ``/bin/sh`` (OpenIPMI 2.0.33,
``lanserv/extcmd.c``; values arrive double-quoted, so the shell hands them over
as plain words). :mod:`orchestrator.lab.bmcs` writes, per node::

    chassis_control "'PYTHON' -m orchestrator.lab.ipmi_chassis 'NODE.qmp' 'NODE.ipmi-boot'"

What ipmi_sim asks and what this does (the lab's power model: "off" is a paused
QEMU, :mod:`orchestrator.lab.qmp`):

==================  =================================================================
``get power``        prints ``power:1`` (running) or ``power:0``
``set power 1``      :func:`~orchestrator.lab.qmp.power_on` (``chassis power on``;
                     ``chassis power cycle`` is ``set power 0`` now and
                     ``set power 1`` one second later, by ipmi_sim's own timer)
``set power 0``      :func:`~orchestrator.lab.qmp.force_off` (``chassis power off``)
``set reset 1``      :func:`~orchestrator.lab.qmp.force_restart` (``chassis power reset``)
``set shutdown 1``   QMP ``system_powerdown``: an ACPI request the guest may ignore
                     (``chassis power soft``), as on real hardware
``get boot``         prints ``boot:<device>`` from the boot file (``default`` when unset)
``set boot DEV``     writes DEV (``none``, ``pxe``, ``default``, ``cdrom``, ``bios``) to the
                     boot file: ``chassis bootdev pxe``. The lab's VMs boot from the
                     network anyway (QEMU ``-boot order=n``); the file is what a test
                     reads to see the override arrive.
``set identify ..``  accepted (one value, "INTERVAL FORCE"), nothing to light
==================  =================================================================

Anything else, or a QMP failure, prints the reason on stdout (ipmi_sim logs it)
and exits 1, which ipmi_sim answers with completion code 0xff.
"""

from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.lab import qmp as q

BOOT_DEVICES = ("none", "pxe", "default", "cdrom", "bios")


def get(qmp_path: str, boot_file: Path, parm: str) -> str:
    if parm == "power":
        return f"power:{1 if q.power_state(qmp_path) == 'On' else 0}"
    if parm == "boot":
        try:
            dev = boot_file.read_text().strip()
        except FileNotFoundError:
            dev = "default"
        return f"boot:{dev if dev in BOOT_DEVICES else 'default'}"
    raise ValueError(f"cannot get {parm!r}")


def set_(qmp_path: str, boot_file: Path, parm: str, value: str) -> None:
    if parm == "power":
        if value == "1":
            q.power_on(qmp_path)
        elif value == "0":
            q.force_off(qmp_path)
        else:
            raise ValueError(f"power {value!r}: 0 or 1")
    elif parm == "reset":
        if value == "1":  # a pulse of the reset line
            q.force_restart(qmp_path)
    elif parm == "shutdown":
        if value == "1":
            q.qmp(qmp_path, "system_powerdown")
    elif parm == "boot":
        if value not in BOOT_DEVICES:
            raise ValueError(f"boot device {value!r}: one of {', '.join(BOOT_DEVICES)}")
        tmp = boot_file.with_suffix(".tmp")
        tmp.write_text(value + "\n")
        tmp.replace(boot_file)
    elif parm == "identify":
        pass
    else:
        raise ValueError(f"cannot set {parm!r}")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3:
        print("usage: python -m orchestrator.lab.ipmi_chassis QMP BOOTFILE get PARM... | set PARM VALUE...")
        return 1
    qmp_path, boot_file, op, parms = args[0], Path(args[1]), args[2], args[3:]
    try:
        if op == "get":
            print("\n".join(get(qmp_path, boot_file, p) for p in parms))
        elif op == "set":
            if not parms or len(parms) % 2:
                raise ValueError("set takes PARM VALUE pairs")
            for parm, value in zip(parms[::2], parms[1::2]):  # identify's "INTERVAL FORCE" is one quoted value
                set_(qmp_path, boot_file, parm, value)
        else:  # "check" and anything else: not supported (OpenIPMI's example script does the same)
            raise ValueError(f"operation {op!r} is not supported")
    except (ValueError, IndexError, q.QmpError, OSError) as e:
        print(f"{Path(qmp_path).stem}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
