#!/usr/bin/env python3
"""meshlet stateful example (stdlib only): a key-value store that keeps its data in a volume.

    PUT /kv/<key>   body -> stored in $MESHLET_VOLUME_DATA/<key> (written, fsynced, renamed)
    GET /kv/<key>   200 the value, 404 when there is none
    GET /           200 "<instance> slot <slot>\n"
    GET /healthz    200 "ok\n"

Each replica has its own data (a ``per_replica`` volume): slot 2 finds slot 2's keys again
after a crash, a rollout, a supervisor restart or a scale-down and up. $MESHLET_VOLUME_DATA
is the volume's directory for a process replica and its mount target in a container.
Environment: PORT, HOST (default 127.0.0.1), MESHLET_INSTANCE, MESHLET_SLOT. SIGTERM
stops it cleanly (exit 0).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DATA = Path(os.environ.get("MESHLET_VOLUME_DATA", "data"))
INSTANCE = os.environ.get("MESHLET_INSTANCE", f"kv-{os.getpid()}")
SLOT = os.environ.get("MESHLET_SLOT", "0")
KEY = re.compile(r"/kv/([A-Za-z0-9_.-]{1,100})")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance", INSTANCE)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            return self._answer(200, b"ok\n")
        m = KEY.fullmatch(self.path)
        if m is None:
            return self._answer(200, f"{INSTANCE} slot {SLOT}\n".encode())
        try:
            return self._answer(200, (DATA / m.group(1)).read_bytes())
        except FileNotFoundError:
            return self._answer(404, b"no such key\n")

    def do_PUT(self) -> None:
        m = KEY.fullmatch(self.path)
        if m is None:
            return self._answer(404, b"PUT /kv/<key>\n")
        value = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        tmp = DATA / f".{m.group(1)}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(value)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, DATA / m.group(1))
        return self._answer(201, b"stored\n")

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{INSTANCE} {self.address_string()} {format % args}\n")


def main() -> int:
    DATA.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8080"))), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"{INSTANCE}: serving slot {SLOT} from {DATA} on port {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
