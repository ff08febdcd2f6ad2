#!/usr/bin/env python3
"""Test app: like the demo app, with health switched by marker files in $MARKERS.

    GET /        200 "<instance>\n"
    GET /ready   503 while $MARKERS/unready exists, else 200
    GET /live    500 while $MARKERS/dead exists, else 200
    GET /slow?S  200 "<instance>\n" after S seconds (default 1)

With $TERM_SERVE (seconds) it keeps serving that long after SIGTERM, like an app that
drains, and then writes $MARKERS/term-<instance>, JSON: "late", the requests (other than
probes) that arrived after SIGTERM; "in_flight", those still running when SIGTERM came;
"slow", the /slow requests it served. A replica retired by a rollout must see no late
request (it left the catalog, and every proxy dropped it, before it was signalled) and,
when the supervisor knows the proxy, none in flight.
"""

from __future__ import annotations

import json
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
lock = threading.Lock()
counts = {"late": 0, "in_flight": 0, "slow": 0}
at_term = {"in_flight": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        probe = self.path in ("/ready", "/live")
        with lock:
            if not probe:
                counts["in_flight"] += 1
                counts["late"] += terminating.is_set()
        try:
            self.answer()
        finally:
            with lock:
                if not probe:
                    counts["in_flight"] -= 1

    def answer(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(float(self.path.partition("?")[2] or 1))
            with lock:
                counts["slow"] += 1
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
            with lock:
                terminating.set()
                at_term["in_flight"] = counts["in_flight"]
            time.sleep(TERM_SERVE)
            with lock:
                report = {"late": counts["late"], "in_flight": at_term["in_flight"], "slow": counts["slow"]}
            with open(os.path.join(MARKERS, f"term-{INSTANCE}"), "w") as f:
                f.write(json.dumps(report))
        server.shutdown()

    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=stop, daemon=True).start())
    print(f"{INSTANCE} listening on {server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
