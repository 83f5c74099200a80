"""The page at `/` in a real headless Chromium (Debian's `chromium` package, driven by Playwright):
upload a shipped example image, see its caption, ask a question and watch the answer stream in,
match texts, and see clear errors for a file that is not an image. Screenshots at desktop and
phone widths are kept in tests/artifacts/ (gitignored) for a person to look at."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from serve_helpers import examples, reference, start_server

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("BLIP2_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def server():
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM}: install it with "
                    "`apt-get update && apt-get install -y --no-install-recommends chromium` "
                    "(CI does), or point $BLIP2_CHROMIUM at a Chromium binary")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        b.close()


def test_the_page_captions_chats_and_matches(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    img = examples()[0]
    cap, _ = reference(server.state, img, None, max_new_tokens=30)
    question = "what color is the small object?"
    ans, _ = reference(server.state, img, question, max_new_tokens=40)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/")
    page.wait_for_selector("#status.ok")

    page.set_input_files("[data-testid=file]", str(img))
    page.wait_for_selector("#preview:not([hidden])")
    page.click("#caption-btn")
    page.wait_for_function("document.querySelector('[data-testid=caption]').textContent.length > 0")
    assert page.text_content("[data-testid=caption]") == cap

    # the streamed answer: the bubble shows a cursor while tokens arrive, then the whole answer
    page.fill("[data-testid=chat-input]", question)
    page.press("[data-testid=chat-input]", "Enter")
    page.wait_for_selector(".msg.assistant:not(.streaming)")
    assert page.text_content(".msg.user") == question
    assert page.text_content(".msg.assistant") == ans
    # a follow-up keeps the conversation
    page.fill("[data-testid=chat-input]", "how many objects are there?")
    page.press("[data-testid=chat-input]", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant:not(.streaming)').length == 2")
    assert page.locator(".msg.user").count() == 2

    page.fill("[data-testid=match-texts]", f"{cap}\na large yellow triangle on a checker background")
    page.click("#match-btn")
    page.wait_for_selector("[data-testid=match-results] li")
    rows = page.locator("[data-testid=match-results] li")
    assert rows.count() == 2
    assert "match" in rows.nth(0).text_content() and "sim" in rows.nth(0).text_content()
    page.screenshot(path=str(ARTIFACTS / "page-desktop.png"), full_page=True)

    # a file that is not an image: a clear message, and the page goes on working
    bad = ARTIFACTS / "not-an-image.txt"
    bad.write_text("hello")
    page.set_input_files("[data-testid=file]", str(bad))
    page.wait_for_selector("#banner:not([hidden])")
    assert "not an image" in page.text_content("#banner")
    page.screenshot(path=str(ARTIFACTS / "page-error.png"))
    page.close()

    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    phone.goto(server.url + "/")
    phone.set_input_files("[data-testid=file]", str(examples()[3]))
    phone.click("#caption-btn")
    phone.wait_for_function("document.querySelector('[data-testid=caption]').textContent.length > 0")
    phone.screenshot(path=str(ARTIFACTS / "page-phone.png"), full_page=True)
    phone.close()

    assert not errors, errors
    assert all(u.startswith(server.url) or u.startswith("data:") for u in requests), "the page reached off the server"
