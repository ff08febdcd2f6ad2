#!/usr/bin/env python3
"""Test app: like the demo app, with health switched by marker files in $MARKERS.

    GET /        200 "<instance>\n"
    GET /ready   503 while $MARKERS/unready exists, else 200
    GET /live    500 while $MARKERS/dead exists, else 200

With $TERM_SERVE (seconds) it keeps serving that long after SIGTERM, like an app that
drains, and then writes $MARKERS/term-<instance>: the number of requests (other than
probes) that arrived after SIGTERM. A replica retired by a rollout must see none: it
left the catalog, and every proxy dropped it, before it was signalled.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTANCE = os.environ.get("MESHLET_INSTANCE", "?")
MARKERS = os.environ.get("MARKERS", "/nonexistent")
TERM_SERVE = float(os.environ.get("TERM_SERVE", "0"))
terminating = threading.Event()
late = [0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if terminating.is_set() and self.path not in ("/ready", "/live"):
            late[0] += 1
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

    def stop() -> None:
        if TERM_SERVE:
            terminating.set()
            time.sleep(TERM_SERVE)
            with open(os.path.join(MARKERS, f"term-{INSTANCE}"), "w") as f:
                f.write(str(late[0]))
        server.shutdown()

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=stop, daemon=True).start())
    print(f"{INSTANCE} listening on {server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
