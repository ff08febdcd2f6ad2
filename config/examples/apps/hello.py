#!/usr/bin/env python3
"""meshlet demo app (stdlib only): answers "<GREETING> from <instance>" on $HOST:$PORT.

    GET /         200 "hello from <instance>\n"  (header X-Request-Path: the path received)
    GET /healthz  200 "ok\n"

Environment: PORT (default 8080), HOST (default 127.0.0.1), GREETING (default "hello"),
MESHLET_INSTANCE (default <hostname>-<pid>). SIGTERM and SIGINT stop it cleanly (exit 0).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTANCE = os.environ.get("MESHLET_INSTANCE") or f"{socket.gethostname()}-{os.getpid()}"
GREETING = os.environ.get("GREETING", "hello")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"ok\n" if self.path == "/healthz" else f"{GREETING} from {INSTANCE}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Instance", INSTANCE)
        self.send_header("X-Request-Path", self.path)
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{INSTANCE} {self.address_string()} {format % args}\n")


def main() -> int:
    server = ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8080"))), Handler)
    server.daemon_threads = True

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"{INSTANCE} listening on {server.server_address[0]}:{server.server_address[1]}",
          file=sys.stderr, flush=True)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
