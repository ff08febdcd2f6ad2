#!/usr/bin/env python3
"""Test app: like the demo app, with health switched by marker files in $MARKERS.

    GET /        200 "<instance>\n"
    GET /ready   503 while $MARKERS/unready exists, else 200
    GET /live    500 while $MARKERS/dead exists, else 200
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTANCE = os.environ.get("MESHLET_INSTANCE", "?")
MARKERS = os.environ.get("MARKERS", "/nonexistent")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        code = 200
        if self.path == "/ready" and os.path.exists(os.path.join(MARKERS, "unready")):
            code = 503
        elif self.path == "/live" and os.path.exists(os.path.join(MARKERS, "dead")):
            code = 500
        body = f"{INSTANCE}\n".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    server = ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"), int(os.environ["PORT"])), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"{INSTANCE} listening on {server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
