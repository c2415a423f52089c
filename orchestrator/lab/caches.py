"""HTTP caches in the lab (``lab.caches: nginx``): Debian's nginx in front of bootorch, one per ``servers:`` entry with ``http``.

A lab service (:data:`orchestrator.lab.lab.SERVICES`). For each of the plan's
``servers`` with an ``http`` address, ``up`` runs nginx with the config
``bootorch render`` writes for it (:func:`orchestrator.render.render_nginx_cache`,
included unchanged in a small top-level ``nginx.conf`` of the lab's), in the
namespace that holds the address:

* a relayed subnet's ``gateway`` (``network.relayed``): that rack's router
  namespace (:mod:`orchestrator.lab.router`), where the rack bridge has the
  address: the rack's nodes reach the cache on their own segment, as a cache
  on the rack's top-of-rack router or a server in the rack would be;
* any other address: the lab namespace, where it is added to ``lo`` as a /32
  when no interface has it yet.

Files under ``<state_dir>/lab/cache-<name>/``: ``nginx.conf``, the rendered
``bootorch-<name>.conf``, ``cache/``, ``access.log`` (what the plan's ``logs:``
entry with ``source: nginx`` names, for these nodes' kernel and initrd stages),
``error.log``, ``nginx.pid``. nginx runs in the foreground (``daemon off``,
one process), started with ``ip netns exec`` (the PID is nginx's), stopped by
PID after ``/proc/PID/cmdline`` names its config. ``nginx -t`` checks the
config first; ``up`` waits until the port is bound.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from orchestrator.lab import procs

NGINX = "nginx"
#: Seconds ``up`` waits for nginx to bind its port.
START_TIMEOUT = 15.0


class CacheError(RuntimeError):
    pass


def _lab_mod():
    from orchestrator.lab import lab as lab_mod

    return lab_mod


def cache_dir(lab: Any, name: str) -> Path:
    return lab.dir / f"cache-{name}"


def access_log(plan: Any, name: str) -> Path:
    """Where the lab's cache for server ``name`` writes its access log (for the plan's ``logs:``)."""
    return plan.state_dir / "lab" / f"cache-{name}" / "access.log"


def _caches(lab: Any) -> list[tuple[Any, str, int, str]]:
    """(server, host, port, namespace) for each cache the plan asks the lab to run."""
    if lab.plan.model.lab.caches != "nginx":
        return []
    from orchestrator.lab import router as rt

    out = []
    for srv in lab.plan.model.servers:
        if not srv.http:
            continue
        host, port = srv.http_address
        ns = next((r.namespace for r in rt.routers(lab) if str(r.gateway) == host), lab.namespace)
        out.append((srv, host, port, ns))
    return out


def nginx_conf(name: str, d: Path) -> str:
    """A top-level nginx.conf for one foreground nginx whose files live in ``d``, around ``d/bootorch-<name>.conf``."""
    return f"""# bootorch lab: nginx for the cache of server {name}; the server block is `bootorch render`'s.
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {d}/tmp;
    proxy_temp_path {d}/tmp;
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    include {d}/bootorch-{name}.conf;
}}
"""


def _bound(ns: str, host: str, port: int) -> bool:
    cp = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Htnl", f"sport = :{port}"], capture_output=True, text=True,
                        timeout=10, check=False)
    return f"{host}:{port}" in cp.stdout


def _ensure_address(lab: Any, ns: str, host: str) -> None:
    lm = _lab_mod()
    have = lm._run(["ip", "-n", ns, "-4", "-o", "addr", "show"]).stdout
    if not any(tok.split("/")[0] == host for tok in have.split()):
        lm._run(["ip", "-n", ns, "addr", "add", f"{host}/32", "dev", "lo"])


def _pid(d: Path) -> int | None:
    return procs.ours(d / "nginx.pid", str(d / "nginx.conf"))


def up(lab: Any) -> None:
    """Start a cache per ``servers:`` entry with ``http`` (``lab.caches: nginx``); stop caches the plan no longer has."""
    from orchestrator.render import render_nginx_cache

    wanted = _caches(lab)
    names = {srv.name for srv, *_ in wanted}
    down(lab, keep=names)
    if not wanted:
        return
    exe = shutil.which(NGINX) or "/usr/sbin/nginx"
    lm = _lab_mod()
    for srv, host, port, ns in wanted:
        d = cache_dir(lab, srv.name)
        if _pid(d) is not None:
            continue
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        (d / f"bootorch-{srv.name}.conf").write_text(
            render_nginx_cache(lab.plan, srv.name, cache_dir=str(d / "cache"), access_log=str(d / "access.log")))
        (d / "nginx.conf").write_text(nginx_conf(srv.name, d))
        argv = [exe, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")]
        if ns == lab.namespace:
            _ensure_address(lab, ns, host)
        # In the namespace: `nginx -t` also binds the listen address.
        check = subprocess.run(["ip", "netns", "exec", ns, *argv, "-t"], capture_output=True, text=True, timeout=30, check=False)
        if check.returncode != 0:
            raise lm.LabError(f"cache {srv.name}: nginx refused its config: {check.stderr.strip()[-500:]}")
        with open(d / "nginx.out", "ab") as out:
            p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not _bound(ns, host, port):
            if p.poll() is not None:
                raise lm.LabError(f"cache {srv.name}: nginx exited {p.returncode}; see {d / 'error.log'}: "
                                  f"{lm.tail_line(d / 'error.log')}")
            if time.monotonic() > deadline:
                procs.kill(p.pid)
                raise lm.LabError(f"cache {srv.name}: nginx did not listen on {host}:{port} within {START_TIMEOUT:.0f}s")
            time.sleep(0.05)
        lm._say(f"cache {srv.name}: nginx pid {p.pid} on {host}:{port} in {ns}")


def down(lab: Any, keep: set[str] = frozenset()) -> list[str]:
    """Stop the lab's caches (all, or those not in ``keep``); returns what was stopped."""
    done = []
    for d in sorted(lab.dir.glob("cache-*")):
        name = d.name.removeprefix("cache-")
        if name in keep:
            continue
        pid = _pid(d)
        if pid is not None:
            procs.kill(pid)
            done.append(f"nginx cache {name} {pid}")
        (d / "nginx.pid").unlink(missing_ok=True)
    return done


def status(lab: Any) -> dict[str, Any]:
    return {srv.name: {"address": f"{host}:{port}", "namespace": ns, "pid": _pid(cache_dir(lab, srv.name)),
                       "access_log": str(cache_dir(lab, srv.name) / "access.log")} for srv, host, port, ns in _caches(lab)}
