"""Measure how long a readiness flip takes to reach the catalog (not a test).

    .venv/bin/python tests/supervisor/measure_readiness.py [flips]

Starts a catalog and a Supervisor running tests/supervisor/apps/flaky.py with a 50 ms
readiness probe, flips the app's readiness N times and reports the time from the probe's
verdict inside the supervisor to the catalog answering the new status (a blocking query
returning), and from the marker file to the catalog (adds up to one probe period).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _util import async_wait_for, start_server, stop_process  # noqa: E402
from conftest import Mesh  # noqa: E402


class _Catalog:
    def __init__(self, data: Path) -> None:
        self.proc, ready = start_server([sys.executable, "-m", "discovery.catalog", "--listen",
                                         "127.0.0.1:0", "--data-dir", str(data)], cwd=str(REPO))
        self.url = "http://" + ready["http"]


async def main(flips: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cat = _Catalog(Path(tmp) / "cat")
        mesh = Mesh(cat, Path(tmp))
        try:
            await mesh.apply(mesh.service_yaml(replicas=1, probes="""\
                probes:
                  readiness: {http: {path: /ready}, period: 0.05s, failure_threshold: 1}
                """))
            sup = await mesh.start()
            await async_wait_for(lambda: _n(mesh, 1), timeout=15)
            index, _ = await mesh.client.health.service("web")
            push, total = [], []
            marker = mesh.markers / "unready"
            for i in range(flips):
                want = "critical" if i % 2 == 0 else "passing"
                t0 = time.monotonic()
                marker.touch() if want == "critical" else marker.unlink()
                while True:
                    index, entries = await mesh.client.health.service("web", index=index, wait="5s")
                    if entries and entries[0]["Checks"][-1]["Status"] == want:
                        break
                seen_wall, seen = time.time(), time.monotonic()
                total.append((seen - t0) * 1000)
                verdict = max(t for t, _kind, what in sup.history if what in ("ready", "not"))
                push.append((seen_wall - verdict) * 1000)
            for name, values in (("probe verdict -> catalog", push), ("marker file -> catalog", total)):
                print(f"{name}: p50 {statistics.median(values):.1f} ms, "
                      f"max {max(values):.1f} ms ({flips} flips, 50 ms probe period)")
        finally:
            await mesh.close()
            stop_process(cat.proc)


async def _n(mesh, n):
    return len(await mesh.passing("web")) == n


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20))
