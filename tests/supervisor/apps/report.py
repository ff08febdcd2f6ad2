#!/usr/bin/env python3
"""Test app: reports what it was given.

    GET /ready   200
    GET /        200 JSON {"instance", "env": {names starting with APP_ or MESHLET_},
                 "files": {"secrets/<name>" or "configs/<name>": {"data", "mode"}}}

The files are those in $MESHLET_SECRETS_DIR and $MESHLET_CONFIGS_DIR (text, as read now).
"""

from __future__ import annotations

import json
import os
import stat
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def report() -> dict:
    files = {}
    for var, kind in (("MESHLET_SECRETS_DIR", "secrets"), ("MESHLET_CONFIGS_DIR", "configs")):
        d = os.environ.get(var)
        for name in sorted(os.listdir(d)) if d else ():
            path = os.path.join(d, name)
            with open(path, encoding="utf-8", errors="replace") as f:
                files[f"{kind}/{name}"] = {"data": f.read(), "mode": oct(stat.S_IMODE(os.stat(path).st_mode))}
    return {"instance": os.environ.get("MESHLET_INSTANCE"), "files": files,
            "env": {k: v for k, v in os.environ.items() if k.startswith(("APP_", "MESHLET_"))}}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ok\n" if self.path == "/ready" else json.dumps(report()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
