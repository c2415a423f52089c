"""Simulated PXE clients: many nodes on one veth, behaving like a PXE ROM, pxelinux and a kernel on the wire.

``bootorch sim up PLAN`` runs one simulated node per plan node; ``bootorch
rollout PLAN`` drives them unchanged (magic packets through the plan's ``wol``
driver, power cycles through the ``sim`` BMC driver) and serves them with the
real boot server. ``bench/storm.py`` uses it for the boot-storm benchmark.

Layout
------

* :mod:`~orchestrator.sim.machine` -- one node as a sans-IO state machine
  (PXE ROM DHCP with options 60/93/94/97 and the 4/8/16/32 s schedule, ROM
  TFTP of the loader, pxelinux's config lookup order and TimeoutTable, kernel
  and initrds from the config, the kernel's ``ip=dhcp`` round, then SSH),
  giving up like the real ones and staying stuck until the power is cut.
  Bytes and times in, effects out; unit-tested on a float clock.
* :mod:`~orchestrator.sim.runtime` -- trio I/O for all nodes of one namespace:
  the shared port-68 socket (demultiplexed by ``chaddr``, then ``xid``), one
  task and one TFTP socket per node bound to its leased address, addresses
  added as /32s over netlink, an SSH server per node that is up, the WoL
  listener and the control socket.
* :mod:`~orchestrator.sim.topology` -- the server and client namespaces, the
  veth, and ``tc tbf`` on the server's end (the boot server's link).
* :mod:`~orchestrator.sim.power` -- the ``sim`` BMC driver (control socket client).
* :mod:`~orchestrator.sim.plan` -- plans and boot files for simulated clusters.
* :mod:`~orchestrator.sim.cli` -- ``bootorch sim up|status``.

Decisions, and where they depart from the first sketch
------------------------------------------------------

* **Readiness is real SSH, not a banner.** ``rollout``'s readiness probes TCP
  22 and then logs in with paramiko (host key TOFU, public-key auth) and runs
  the plan's checks. A bare banner would need a readiness mode that skips the
  login (a change to ``readiness.py`` and a new plan key, and a readiness path
  that production never uses). Instead each simulated node that is up runs a
  small paramiko *server* (in a worker thread per connection): any public key
  is accepted, ``uname -r`` answers ``6.1.0-bootorch-sim``, ``pidof sshd`` /
  ``pidof dropbear`` succeed, ``true`` succeeds, anything else exits 127
  ("not simulated"), so a plan check the simulator cannot honestly answer
  fails instead of passing. Cost: one SSH handshake per node (~20 ms of CPU
  on each side); cheaper and simpler than a dropbear process per node.
* **One process, many nodes.** The nodes share one trio loop; a node is a
  task and a socket, not a process, so 1 000 nodes fit on a 2-vCPU box. The
  per-packet path (recv, the machine's DATA handling, sendto of the ACK) stays
  in plain non-blocking sockets with one ``wait_readable`` per burst, like the
  boot server's.
* **Timeouts are real, in seconds, never scaled.** The sizes and the link
  are scaled together instead (``bench/storm.py``: a tenth of a 1 GbE link and
  a tenth of a 45 MB kernel+initrd keep every transfer *time* the same), so
  the ROMs' timers meet the same delays they would on the real site. Only the
  POST and the kernel's start are shortened (configurable): they are constant
  per-node latencies that do not touch the link.
* **The ROM's DHCP REQUEST** falls back to DISCOVER after two unanswered
  tries within the same 4/8/16/32 s budget (RFC 2131 §4.4.1 allows the
  restart; ROMs differ here).
* **ProxyDHCP is not simulated** (``dhcp.mode: full`` only): the ROM takes
  the boot file from the OFFER/ACK of the one server.
* **Magic packets** are heard with the lab's
  :class:`~orchestrator.lab.wol_listener.WolListener` on the clients' end of
  the veth, so the plan's ordinary ``power.wol`` driver works unchanged; a
  node that is on (or gave up, which is on) ignores them, as a real NIC does.
* **Per-node addresses** are /32s on the client interface next to one base
  address in the subnet: a /32 is its own primary address, so removing one
  never takes others with it (deleting a primary /16 drops its secondaries).
"""
