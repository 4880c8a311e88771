"""The chat page in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright's Python
package) types a message, sees the answer stream in, stops one, clears, and takes a screenshot."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from baichuan.generate import chat  # noqa: E402
from baichuan.serve.app import create_app  # noqa: E402
from tests.serve import running_server  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MESSAGE = "你好！Hello, 百川 — can you stream?"


@pytest.fixture(scope="module")
def page(loaded):
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium); the browser test needs one")
    app = create_app(loaded, model_name="tiny", max_batch=4, max_queue=8)
    with running_server(app) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.set_default_timeout(15_000)
            page.goto(url)
            yield page
        finally:
            browser.close()


def test_chat_page_streams_an_answer(page, loaded, tmp_path):
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    page.fill("#input", MESSAGE)
    page.click("#send")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")

    assert page.inner_text(".msg.user") == MESSAGE  # Chinese, English and punctuation come back unchanged
    sampling = loaded.sampling.replace(do_sample=False, max_new_tokens=40)
    expected = chat(loaded.model, loaded.tokenizer, [{"role": "user", "content": MESSAGE}], sampling)
    answer = page.eval_on_selector(".msg.assistant", "el => el.firstChild ? el.firstChild.textContent : ''")
    assert answer == expected
    screenshot = tmp_path / "chat-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")


def test_stop_and_clear(page):
    page.click("#clear")
    assert page.locator(".msg").count() == 0
    # A slow network, so that the answer is still arriving when Stop is pressed.
    cdp = page.context.new_cdp_session(page)
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": 4000, "uploadThroughput": -1},
    )
    try:
        page.fill("#max_tokens", "200")
        page.fill("#input", "a long answer please")
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent === 'streaming…'")
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
    finally:
        cdp.send(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )
    assert "(stopped)" in page.inner_text(".msg.assistant")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
