"""An S3-like store for benchmarks: nginx on loopback serving a directory with path-style URLs.

HEAD, GET, Range and If-Match work natively; auth headers are ignored; bucket HEADs get 200.
``rate`` adds ``limit_rate`` per connection to mimic S3's per-connection throughput cap.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

_CONF = """
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format s3 '$request_method $uri $status $body_bytes_sent';
    access_log {prefix}/access.log s3;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {limit}
        location ~ ^/[^/]+/?$ {{ return 200; }}
        location / {{ try_files $uri =404; }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NginxStore:
    def __init__(self, root: Path, prefix: Path, rate: str | None = None) -> None:
        self.root, self.prefix, self.rate = root, prefix, rate
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> NginxStore:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        limit = f"limit_rate {self.rate};" if self.rate else ""
        conf.write_text(_CONF.format(prefix=self.prefix, port=self.port, root=self.root,
                                     limit=limit))
        self.proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(self.prefix),
                                      "-g", "daemon off;"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError("nginx did not start; see its output above")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            self.proc.wait(10)

    def reset_log(self) -> None:
        log = self.prefix / "access.log"
        log.write_text("")
        if self.proc is not None:
            self.proc.send_signal(signal.SIGUSR1)  # reopen logs
            time.sleep(0.1)

    def body_bytes(self) -> Counter[str]:
        """GET body bytes per URI since the last ``reset_log`` (nginx flushes per request)."""
        counts: Counter[str] = Counter()
        for line in (self.prefix / "access.log").read_text().splitlines():
            m = re.match(r"GET (\S+) \d+ (\d+)", line)
            if m:
                counts[m.group(1)] += int(m.group(2))
        return counts
