"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright (its
API only: no browser is downloaded, ``playwright install`` is never run), against a real
supervisor with process replicas and a real catalog.

The page is loaded once; a new revision is applied while it is open and the rollout's
progress changes on the page without a reload; Rollback (confirmed in the page's dialog)
brings the service back to the old revision; bad input from the page (a negative scale)
gets the API's message shown in the page.

Screenshot: the header and the services table of a settled service, every dynamic text
masked (elements marked ``data-dynamic``), compared with ``dashboard_reference.png`` beside
this file: at most ``MAX_DIFF_RATIO`` of the pixels may differ by more than
``PIXEL_TOLERANCE`` in a channel (anti-aliasing, a font hinting change). The reference is
rendered here, 1280x900 at scale 1, in DejaVu (fonts-dejavu-core, scripts/test.sh).
To regenerate it after a deliberate change of the page:

    MESHLET_UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest tests/supervisor/test_dashboard.py -k screenshot

and look at the new PNG before committing it. On a mismatch the test leaves the actual
and a difference image in its tmp_path and names them.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from PIL import Image, ImageChops
from playwright.async_api import async_playwright, expect

from supervisor.daemon.admin import AdminServer

pytestmark = pytest.mark.slow   # real processes, sockets or engines (tests/conftest.py)

APPS = Path(__file__).resolve().parent / "apps"
REFERENCE = Path(__file__).resolve().parent / "dashboard_reference.png"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}
PIXEL_TOLERANCE = 24          # of 255, per channel
MAX_DIFF_RATIO = 0.01
UI_TIMEOUT = 30_000           # ms


def web_yaml(mesh, version: str, replicas: int = 2) -> str:
    # min_ready 2s: each new replica counts as available 2 s after it is ready, so the
    # rollout shows "1/2 updated" for a few seconds
    return textwrap.dedent(f"""\
        services:
          web:
            command: [{sys.executable}, {APPS / 'flaky.py'}]
            replicas: {replicas}
            ports: [{{name: http}}]
            env: {{MARKERS: {mesh.markers}, VERSION: "{version}"}}
            update: {{drain_delay: 0s, max_surge: 1, max_unavailable: 0, min_ready: 2s}}
            stop_grace_period: 2s
            probes:
              readiness: {{http: {{path: /ready}}, period: 0.1s}}
        """)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator:
    async with async_playwright() as p:
        ctx = await p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport=VIEWPORT, device_scale_factor=1, locale="en-US", timezone_id="UTC", color_scheme="light")
        try:
            yield ctx
        finally:
            await ctx.close()


@pytest.fixture
async def dashboard(mesh, browser, caplog):
    """(supervisor, base URL, page) with web v1 running 2/2 and the page open; page errors
    fail the test."""
    await mesh.apply(web_yaml(mesh, "1"))
    sup = await mesh.start()
    server = AdminServer(sup, on_down=lambda: None)
    base = f"http://{await server.start('127.0.0.1:0')}"
    page = browser.pages[0] if browser.pages else await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "the server responded" not in m.text
            else None)
    try:
        await page.goto(base + "/")
        await expect(page.get_by_test_id("ready-web")).to_have_text("2/2", timeout=UI_TIMEOUT)
        await expect(page.get_by_test_id("phase-web")).to_have_text("complete", timeout=UI_TIMEOUT)
        await expect(page.locator("#conn")).to_have_text("live", timeout=UI_TIMEOUT)
        yield sup, base, page
        assert not errors, errors
        failed = [r.getMessage() for r in caplog.records if r.name == "supervisor" and r.levelname == "ERROR"]
        assert not failed, failed
    finally:
        await server.close()


def _template(sup) -> set[str]:
    web = next(s for s in sup.status()["services"] if s["name"] == "web")
    return {i["revision"] for i in web["instances"] if i["state"] != "exited"}


async def test_rollout_live_then_rollback_from_the_page(mesh, dashboard):
    sup, base, page = dashboard
    old = _template(sup)
    assert len(old) == 1
    await page.evaluate("window.__loadedOnce = true")      # gone if the page reloads

    # the page shows every node, replica, endpoint and event it should
    await expect(page.get_by_test_id("node-local")).to_have_text("ready")
    await expect(page.locator("#replicas tbody tr")).to_have_count(2)
    await expect(page.locator("#endpoints tr[data-endpoints=web]")).to_contain_text("web.service.meshlet")
    await expect(page.locator("#events li[data-kind=ready]")).to_have_count(2, timeout=UI_TIMEOUT)

    # a new revision applied while the page is open: the progress moves, no reload
    await mesh.apply(web_yaml(mesh, "2"))
    await expect(page.get_by_test_id("phase-web")).to_have_text("progressing", timeout=UI_TIMEOUT)
    await expect(page.get_by_test_id("progress-web")).to_contain_text("1/2 updated", timeout=UI_TIMEOUT)
    await expect(page.locator("#services progress")).to_have_attribute("value", "1")
    await expect(page.get_by_test_id("phase-web")).to_have_text("complete", timeout=UI_TIMEOUT)
    await expect(page.get_by_test_id("progress-web")).to_have_text("2/2 updated", timeout=UI_TIMEOUT)
    await expect(page.get_by_test_id("number-web")).to_have_text("#2 ")
    new = _template(sup)
    assert new and new != old
    await expect(page.locator("#events li[data-kind=rollout]", has_text="to " + next(iter(new))[:12])
                 .first).to_be_visible()
    await expect(page.locator("#events li[data-kind=rollout]", has_text="start 1 new").first).to_be_visible()

    # Rollback: the dialog asks, Cancel does nothing, Confirm rolls back
    rollback = page.locator("button[data-action=rollback][data-service=web]")
    await rollback.click()
    await expect(page.locator("#confirm")).to_be_visible()
    await expect(page.locator("#confirm-text")).to_have_text("Roll web back to its last complete revision?")
    await page.locator("#confirm-cancel").click()
    await expect(page.locator("#confirm")).to_be_hidden()
    assert _template(sup) == new
    await rollback.click()
    await page.locator("#confirm-ok").click()
    await expect(page.locator("#message")).to_contain_text("rolling back to revision 1", timeout=UI_TIMEOUT)
    await expect(page.get_by_test_id("revision-web")).to_have_text(next(iter(old))[:12], timeout=UI_TIMEOUT)
    await expect(page.get_by_test_id("phase-web")).to_have_text("complete", timeout=UI_TIMEOUT)
    await expect(page.get_by_test_id("ready-web")).to_have_text("2/2", timeout=UI_TIMEOUT)
    assert _template(sup) == old
    _, entry = await mesh.client.kv.get("meshlet/services/web")
    assert json.loads(entry["Value"])["spec"]["env"]["VERSION"] == "1"
    assert await page.evaluate("window.__loadedOnce === true"), "the page reloaded"


async def test_bad_input_from_the_page_is_named_and_good_input_acts(mesh, dashboard):
    sup, base, page = dashboard
    scale = page.locator("button[data-action=scale][data-service=web]")
    await scale.click()
    await page.locator("#scale-input").fill("-1")
    await page.locator("#confirm-ok").click()
    await expect(page.locator("#message")).to_have_text(
        "scale web: replicas: expected a whole number >= 0, got -1", timeout=UI_TIMEOUT)
    await scale.click()
    await page.locator("#scale-input").fill("1")
    await page.locator("#confirm-ok").click()
    await expect(page.locator("#message")).to_have_text("web: scaled (replicas 2 → 1)", timeout=UI_TIMEOUT)
    await expect(page.get_by_test_id("ready-web")).to_have_text("1/1", timeout=UI_TIMEOUT)

    # pause, and the button becomes Resume
    await page.locator("button[data-action=pause][data-service=web]").click()
    await page.locator("#confirm-ok").click()
    await expect(page.locator("#message")).to_contain_text("web: rollout paused", timeout=UI_TIMEOUT)
    await page.locator("button[data-action=resume][data-service=web]").click(timeout=UI_TIMEOUT)
    await page.locator("#confirm-ok").click()
    await expect(page.locator("#message")).to_have_text("web: rollout resumed", timeout=UI_TIMEOUT)

    # the same API refuses what a page of another site could send, naming why
    async with aiohttp.ClientSession() as http:
        url = base + "/v1/services/web/restart"
        async with http.post(url, data="{}", headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 400 and "Content-Type: application/json" in (await r.json())["error"]
        async with http.post(url, json={}, headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 403 and "evil.example" in (await r.json())["error"]
        async with http.post(base + "/v1/services/nope/restart", json={}) as r:
            assert r.status == 404 and "no service 'nope'" in (await r.json())["error"]
        async with http.post(base + "/v1/services/web/explode", json={}) as r:
            assert r.status == 404 and "explode" in (await r.json())["error"]
        async with http.post(base + "/v1/services/web/rollback", json={"to": "x"}) as r:
            assert r.status == 400 and (await r.json())["error"].startswith("to: ")


def _compare(actual: Path, reference: Path, out_dir: Path) -> tuple[float, str]:
    a = Image.open(actual).convert("RGB")
    b = Image.open(reference).convert("RGB")
    if a.size != b.size:
        return 1.0, f"size {a.size} differs from the reference's {b.size}"
    diff = ImageChops.difference(a, b)
    # a pixel differs when any channel differs by more than the tolerance
    mask = diff.point(lambda v: 255 if v > PIXEL_TOLERANCE else 0).convert("L").point(lambda v: 255 if v else 0)
    changed = mask.histogram()[255]
    ratio = changed / (a.size[0] * a.size[1])
    diff_path = out_dir / "dashboard_diff.png"
    mask.save(diff_path)
    return ratio, f"{changed} pixels differ ({ratio:.2%}); difference: {diff_path}"


async def test_screenshot_of_a_settled_service_matches_the_reference(mesh, dashboard, tmp_path):
    sup, base, page = dashboard
    await expect(page.get_by_test_id("progress-web")).to_have_text("2/2 updated", timeout=UI_TIMEOUT)
    await expect(page.locator("#message")).to_be_hidden()
    header = await page.locator("header").bounding_box()
    services = await page.locator("#services-section").bounding_box()
    assert header and services
    clip = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": services["y"] + services["height"] + 8}
    actual = tmp_path / "dashboard_actual.png"
    await page.screenshot(path=str(actual), clip=clip, mask=[page.locator("[data-dynamic]")],
                          mask_color="#ff00ff", animations="disabled", caret="hide")
    if os.environ.get("MESHLET_UPDATE_SCREENSHOTS"):
        REFERENCE.write_bytes(actual.read_bytes())
    assert REFERENCE.exists(), (f"no reference screenshot {REFERENCE}; make it with "
                                "MESHLET_UPDATE_SCREENSHOTS=1 (see the module)")
    ratio, why = _compare(actual, REFERENCE, tmp_path)
    assert ratio <= MAX_DIFF_RATIO, f"the dashboard looks different from {REFERENCE.name}: {why}; actual: {actual}"
