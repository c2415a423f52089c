"""`bootorch render`'s nginx cache config, run by a real nginx in front of bootorch's HTTP server.

nginx (Debian's nginx-light) runs on 127.0.0.1 with the rendered ``server`` block
included as it is; bootorch's HTTP server (in this process) is its upstream. Many
clients at once get the kernel byte-identical while one request goes upstream
(``proxy_cache_lock``); host-key archives are refused; the access log gives
our nginx parser one FILE_DONE per client. The per-node scripts name the cache
for kernel and initrd and bootorch itself for the host key.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import trio

from orchestrator.bootserver.files import BootFiles
from orchestrator.bootserver.http import serve_http
from orchestrator.events import EventKind
from orchestrator.lab.caches import nginx_conf
from orchestrator.logwatch.parsers import parser_for
from orchestrator.plan import load_plan
from orchestrator.render import boot_tree, render_all, render_nginx_cache
from tests.conftest import require_tool

KERNEL = os.urandom(3 << 20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan(tmp_path, http_port: int, cache_port: int):
    root = tmp_path / "tftpboot"
    root.mkdir()
    (root / "vmlinuz").write_bytes(KERNEL)
    (root / "rootfs.gz").write_bytes(b"initrd" * 1000)
    for loader in ("pxelinux.0", "syslinux.efi", "ipxe.efi"):
        (root / loader).write_bytes(b"loader")
    (tmp_path / "plan.yaml").write_text(textwrap.dedent(f"""\
    version: 1
    network: {{subnet: 127.0.0.0/8, server: 127.0.0.1}}
    bootserver: {{http_port: {http_port}}}
    boot: {{root: tftpboot}}
    profiles: {{p: {{kernel: vmlinuz, initrd: rootfs.gz, ip: dhcp}}}}
    nodes:
      - {{name: a1, mac: "52:54:00:00:00:01", ip: 127.0.0.11, rack: ra}}
      - {{name: b1, mac: "52:54:00:00:01:01", ip: 127.0.0.21, rack: rb}}
    servers:
      - {{name: rb, racks: [rb], http: "http://127.0.0.1:{cache_port}"}}
    """))
    return load_plan(tmp_path / "plan.yaml")


def test_scripts_name_the_cache_for_the_rack_and_the_server_for_the_rest(tmp_path):
    plan = _plan(tmp_path, 8080, 8081)
    tree = boot_tree(plan)
    b1 = tree["ipxe/52-54-00-00-01-01.ipxe"].decode()
    a1 = tree["ipxe/52-54-00-00-00-01.ipxe"].decode()
    assert "kernel http://127.0.0.1:8081/vmlinuz" in b1 and "initrd http://127.0.0.1:8081/rootfs.gz" in b1
    assert "kernel http://127.0.0.1:8080/vmlinuz" in a1 and "8081" not in a1
    assert "nginx/rb.conf" in render_all(plan)


def test_a_real_nginx_caches_for_the_rack_and_fetches_upstream_once(tmp_path):
    exe = require_tool("nginx", "/usr/sbin/nginx")
    http_port, cache_port = _free_port(), _free_port()
    plan = _plan(tmp_path, http_port, cache_port)
    ngx = tmp_path / "nginx"
    (ngx / "tmp").mkdir(parents=True)
    (ngx / "bootorch-rb.conf").write_text(render_nginx_cache(plan, "rb", cache_dir=str(ngx / "cache"),
                                                             access_log=str(ngx / "access.log")))
    (ngx / "nginx.conf").write_text(nginx_conf("rb", ngx))  # the lab's wrapper: render's block included unchanged
    check = subprocess.run([exe, "-t", "-p", str(ngx), "-c", str(ngx / "nginx.conf"), "-e", str(ngx / "error.log")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr  # nginx itself accepts the rendered config

    upstream_gets: list[str] = []
    result: dict = {}

    async def main() -> None:
        send, recv = trio.open_memory_channel(10_000)
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_http(BootFiles(plan.boot_root), "127.0.0.1", http_port, events=send,
                                                               task_status=task_status))

            async def collect() -> None:
                async for ev in recv:
                    if ev.kind == EventKind.FILE_REQUEST:
                        upstream_gets.append(ev.filename)

            nursery.start_soon(collect)
            result.update(await trio.to_thread.run_sync(_run_nginx_and_fetch, exe, ngx, cache_port))
            nursery.cancel_scope.cancel()

    trio.run(main)
    bodies, forbidden, log_lines = result["bodies"], result["forbidden"], result["log"]
    assert len(bodies) == 24 and all(b == KERNEL for b in bodies)
    assert upstream_gets.count("vmlinuz") == 1  # 24 clients at once, one fetch upstream
    assert forbidden == 403 and "hostkeys/127.0.0.21.cpio" not in upstream_gets
    p = parser_for("nginx")
    done = [e for line in log_lines for e in p.feed(line) if e.kind == EventKind.FILE_DONE and e.filename == "vmlinuz"]
    assert len(done) == 24 and all(e.bytes == len(KERNEL) and e.client_ip == "127.0.0.1" for e in done)


def _run_nginx_and_fetch(exe: str, ngx, port: int) -> dict:
    proc = subprocess.Popen([exe, "-p", str(ngx), "-c", str(ngx / "nginx.conf"), "-e", str(ngx / "error.log")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (ngx / "error.log").read_text()[-2000:]
                time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        with ThreadPoolExecutor(24) as pool:
            bodies = list(pool.map(lambda _: urllib.request.urlopen(f"{url}/vmlinuz", timeout=30).read(), range(24)))
        try:
            urllib.request.urlopen(f"{url}/hostkeys/127.0.0.21.cpio", timeout=10)
            forbidden = 200
        except urllib.error.HTTPError as e:
            forbidden = e.code
    finally:
        os.kill(proc.pid, signal.SIGQUIT)  # graceful: the access log is complete when it exits
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"bodies": bodies, "forbidden": forbidden, "log": (ngx / "access.log").read_text().splitlines()}
