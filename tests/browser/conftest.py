"""Tier 4: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) on the ComfyUI
frontend that the tier-3 server (moa_testing.server_fixtures) serves, with this pack loaded.

Without Playwright or Chromium the tier skips with one line, and fails under MOA_REQUIRE_HOST=1
(as .ci/run sets). Playwright never downloads a browser here: it drives the system's Chromium.
"""

import json
import urllib.request

import pytest

from moa_testing.browser import CHROMIUM, CHROMIUM_ARGS, ComfyPage, missing_browser


@pytest.fixture(scope="module")
def browser():
    """Module-scoped, so Playwright's event loop is gone before tier 3 runs its own asyncio."""
    reason = missing_browser()
    if reason:  # only under MOA_REQUIRE_HOST=1: otherwise the test module skipped itself
        pytest.fail(f"MOA_REQUIRE_HOST=1 but {reason}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def comfy_page(browser, comfy_server):
    """The served frontend, loaded once per module; each test loads the graph it needs."""
    # A first visit shows the template browser over the canvas: this server's user has seen it.
    # No minimap nor canvas statistics over the screenshots.
    settings = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
    for setting, value in settings.items():
        request = urllib.request.Request(f"{comfy_server.url}/settings/{setting}", data=json.dumps(value).encode())
        urllib.request.urlopen(request, timeout=30).close()
    # 1920 px: wide enough that a whole example graph fits above the zoom where nodes lose their text
    context = browser.new_context(viewport={"width": 1920, "height": 1080})
    page = context.new_page()
    page.set_default_timeout(60_000)
    comfy = ComfyPage(page, comfy_server.url)
    page.goto(comfy_server.url)
    page.wait_for_function("window.app?.graph && document.querySelector('#graph-canvas')")
    yield comfy
    context.close()
