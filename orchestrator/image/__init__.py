"""``bootorch image build PLAN``: the boot files a plan's profiles name.

For every profile this writes into the plan's boot root:

- the **kernel**, Debian's ``linux-image-amd64`` (its dependency
  ``linux-image-<abi>-amd64`` carries ``/boot/vmlinuz-*`` and ``/lib/modules``),
  fetched with ``apt-get download`` into a cache and unpacked with ``dpkg -x``:
  no root, no network at boot time, and a warm cache needs no network at all;
- the **RAM-disk root** (the profile's first ``initrd`` name, ``rootfs.gz`` in
  our plans): a gzip'd newc cpio archive written here in Python, holding static
  busybox (with its applet links), dropbear with the shared libraries its ELF
  headers ask for (resolved from the Debian packages, not the build host), the
  profile's kernel modules with their dependencies (decompressed, loaded with
  ``insmod`` in dependency order), ``/root/.ssh/authorized_keys`` from
  ``readiness.ssh.key`` and an ``/init`` that brings the node up (network from
  the kernel's ``ip=`` parameter or DHCP, mounts, commands, SSH) and prints
  :data:`READY_MARKER` on the console. It holds **no host key**;
- for a ``root: nfs`` profile, the same image with the NFS client modules,
  whose ``/init`` mounts the kernel command line's ``nfsroot=`` (NFSv4) and
  ``switch_root``s into it, and the **NFS root** itself: that tree without
  device nodes or private keys, as a world-readable directory (outside the boot root) at
  ``<state_dir>/nfsroot/<profile>`` for an NFS server to export
  (:mod:`~orchestrator.image.nfsroot`);
- the **boot loaders** the plan names, from Debian's packages: BIOS
  ``pxelinux.0`` and its ``ldlinux.c32`` (pxelinux / syslinux-common), UEFI
  ``syslinux.efi`` and its ``ldlinux.e64`` (syslinux-efi / syslinux-common),
  UEFI HTTP Boot ``ipxe.efi`` (ipxe);

and, outside the boot root, for every node whose profile says ``host_key:
per-node`` (the default), **its own dropbear host key**, pinned in readiness's
known_hosts (:mod:`orchestrator.hostkeys` says where they live and how each
node gets its own).

**Reproducible**: the same cached packages, plan and authorized key give
byte-identical files (the host keys are not in them). The cpio is written in
sorted order with fixed inode numbers, uid/gid 0 and one mtime
(``SOURCE_DATE_EPOCH``, default 0); gzip gets no name and mtime 0. Nothing
reads the build host's clock, file times or user database.

**``root: ramdisk`` vs ``root: initramfs``.** The seed article's RAM disk is an
ext2 image the kernel copies into ``/dev/ram0``. Debian's kernel builds the RAM
disk driver as a module (``CONFIG_BLK_DEV_RAM=m``), so it cannot mount such a
root before it has a root. Both kinds of profile therefore get the same cpio
archive: the kernel recognises a cpio initrd, unpacks it into its RAM file
system and runs ``/init`` (the default ``rdinit=``); ``root=/dev/ram0 rw`` on a
``ramdisk`` profile's command line is then never used. The root lives in RAM
either way, which is what the seed's recipe is for.

The package, in the order a build uses it:

- :mod:`~orchestrator.image.build` -- :func:`build_images`, the whole build, and its report;
- :mod:`~orchestrator.image.debs` -- the Debian package cache (``apt-get download``, ``dpkg -x``);
- :mod:`~orchestrator.image.userland` -- busybox, dropbear and dropbear's libraries from the packages;
- :mod:`~orchestrator.image.elf` -- just enough of ELF: DT_NEEDED and ``.modinfo``;
- :mod:`~orchestrator.image.modules` -- a profile's kernel modules with their dependencies, in load order;
- :mod:`~orchestrator.image.rootfs` -- the root's file tree and ``/init``, from the shell code in ``templates/``;
- :mod:`~orchestrator.image.nfsroot` -- a ``root: nfs`` profile's tree written as the directory an NFS server exports;
- :mod:`~orchestrator.image.cpio` -- the in-memory tree, the newc writer, reproducible gzip;
- :mod:`~orchestrator.image.keys` -- the lab's login key and the nodes' host keys;
- :mod:`~orchestrator.image.cli` -- ``bootorch image build`` and ``python -m orchestrator.image``.
"""

from __future__ import annotations

from orchestrator.image.build import ImageReport, OutputFile, build_images
from orchestrator.image.cli import add_arguments, main, run
from orchestrator.image.errors import ImageError
from orchestrator.image.rootfs import READY_MARKER

__all__ = ["READY_MARKER", "ImageError", "ImageReport", "OutputFile", "add_arguments", "build_images", "main", "run"]
