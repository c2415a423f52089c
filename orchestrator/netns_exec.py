"""Running bootorch inside the boot network's namespace, and the managed lab around a rollout.

A plan whose ``network.namespace`` is set (the lab's is) has its boot network
inside a network namespace: the DHCP server must bind to the bridge there and
magic packets must leave there. Python 3.11 has no ``os.setns``, so bootorch
re-executes itself under ``ip netns exec NS`` with ``BOOTORCH_NETNS=NS`` in the
environment (which marks the child as inside, so it does not recurse).

With ``lab.manage: true`` the outer process also builds missing boot files,
brings the lab up first and takes it down afterwards (unless ``--keep-lab``),
also when the rollout fails or is interrupted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from orchestrator import EXIT_FAILED
from orchestrator.plan import LoadedPlan

ENV = "BOOTORCH_NETNS"


def needs_reexec(plan: LoadedPlan) -> bool:
    ns = plan.model.network.namespace
    return bool(ns) and os.environ.get(ENV) != ns


def _missing_boot_files(plan: LoadedPlan) -> list[str]:
    """Boot files, and nodes' own host keys, that ``bootorch image build`` would make and that are missing."""
    from orchestrator.hostkeys import host_key_paths

    root = plan.boot_root
    loaders = plan.model.boot.loaders
    names = {loaders.bios, loaders.uefi, loaders.uefi_http}
    for prof in plan.model.profiles.values():
        names.add(prof.kernel)
        names.update(prof.initrd)
    missing = sorted(n for n in names if not (root / n.lstrip("/")).is_file())
    missing += [f"profile {p}'s NFS root" for p, prof in sorted(plan.model.profiles.items())
                if prof.root == "nfs" and not (plan.nfs_export(p) / "init").is_file()]
    for n in plan.nodes:
        if plan.model.profiles[n.profile].host_key == "per-node" and not host_key_paths(plan, n)[0].is_file():
            missing.append(f"{n.name}'s host key")
    return missing


def archive_journal(plan: LoadedPlan) -> None:
    """New VMs, new rollout: the journal of VMs that no longer exist moves aside.

    When the lab was already up (a rollout killed with -9, say), the journal is
    kept and the rerun resumes from it.
    """
    import time

    db = plan.state_dir / "state.db"
    if db.exists():
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = db.with_name(db.name + suffix)
            if old.exists():
                old.rename(db.with_name(f"state.{stamp}.db{suffix}"))
        print(f"bootorch rollout: the lab's VMs are new: previous journal kept as state.{stamp}.db", file=sys.stderr)


def rollout_in_namespace(plan: LoadedPlan, args: argparse.Namespace) -> int:
    ns = plan.model.network.namespace
    assert ns
    if os.geteuid() != 0:
        print(f"bootorch rollout: the plan's boot network is in network namespace {ns}; "
              "entering it (ip netns exec) needs root", file=sys.stderr)
        return EXIT_FAILED
    manage = plan.model.lab.manage
    lab = None
    if manage:
        from orchestrator.lab import lab as lab_mod

        lab = lab_mod
        missing = _missing_boot_files(plan)
        if missing:
            from orchestrator import image

            print(f"bootorch rollout: building boot files ({', '.join(missing)} missing)", file=sys.stderr)
            image.build_images(plan)
        lab.ensure_secret(plan)
        fresh = not any(lab.qemu_pid(lab.Lab(plan), n) is not None for n in plan.nodes)
        print(f"bootorch rollout: bringing up the lab ({len(plan.nodes)} VMs in namespace {ns})", file=sys.stderr)
        lab.up(plan)
        if fresh:
            archive_journal(plan)
    argv = ["rollout", str(plan.path)]
    if args.json:
        argv.append("--json")
    try:
        return reexec_in_namespace(plan, argv)
    finally:
        if lab is not None and not args.keep_lab:
            print("bootorch rollout: taking the lab down (--keep-lab keeps it)", file=sys.stderr)
            lab.down(plan)


def reexec_in_namespace(plan: LoadedPlan, argv: list[str]) -> int:
    """Run ``bootorch ARGV`` again inside the plan's namespace and return its exit code."""
    ns = plan.model.network.namespace
    assert ns
    if os.geteuid() != 0:
        print(f"bootorch: the plan's boot network is in network namespace {ns}; entering it (ip netns exec) needs root",
              file=sys.stderr)
        return EXIT_FAILED
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "orchestrator", *argv]
    try:
        return subprocess.call(cmd, env={**os.environ, ENV: ns})
    except KeyboardInterrupt:
        return 130


def lab_down_problem(plan: LoadedPlan) -> str | None:
    """For a managed lab: why an on-call command cannot act (the lab is not up), else None."""
    if not plan.model.lab.manage:
        return None
    from orchestrator.lab import lab as lab_mod

    lab = lab_mod.Lab(plan)
    if not any(lab_mod.qemu_pid(lab, n) is not None for n in plan.nodes):
        return (f"the lab is not up (no VM of plan {plan.path} runs): `bootorch rollout {plan.path} --keep-lab` "
                f"or `bootorch lab up {plan.path}` first")
    return None
