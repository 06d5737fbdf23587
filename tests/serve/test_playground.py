"""The browser playground at `/`, driven in headless Chromium (Debian's package, through Playwright).

Where no browser is installed (a laptop without Debian's chromium) the test skips and says why; under
CI it fails instead, because `make test` installs the browser there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gptlab.checkpoint import load_model
from gptlab.serve.limits import ServerLimits
from gptlab.inference import SamplingParams, complete
from gptlab.serve import create_app, running_server
from gptlab.tokenizers import load_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
# --headless without a sandbox (we run as root), and nothing that reaches for the network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _missing_browser() -> str | None:
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; `make test` does it as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python client is not installed (pip install playwright)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    reason = _missing_browser()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the playground test: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def served(tiny_run: Path) -> Iterator[tuple[str, object, object]]:
    model, tokenizer = load_model(tiny_run), load_tokenizer(tiny_run)
    app = create_app(model, tokenizer, "tiny", ServerLimits(max_tokens=5000))
    with running_server(app) as url:
        yield url, load_model(tiny_run).eval(), tokenizer


def _text(page, selector: str) -> str:
    return page.eval_on_selector(selector, "element => element.textContent")


def test_playground_streams_the_text_and_stops(browser, served) -> None:
    url, reference, tokenizer = served
    page = browser.new_page()
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('model tiny')")
    prompt = "First Citizen:\n"
    page.fill("#prompt", prompt)

    # a long generation: the text shows up and grows while the response is still arriving
    page.fill("#max-tokens", "5000")
    page.click("#generate")
    page.wait_for_function("document.getElementById('out-text').textContent.length > 20", timeout=120_000)
    assert _text(page, "#status") == "generating…"
    seen = len(_text(page, "#out-text"))
    page.wait_for_function(f"document.getElementById('out-text').textContent.length > {seen + 20}")
    assert _text(page, "#status") == "generating…"
    assert _text(page, "#out-prompt") == prompt

    # Stop: the browser aborts the request, and the server stops generating
    before = httpx.get(url + "/health").json()["stats"]["cancelled"]
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('stopped')")
    page.wait_for_function(
        f"fetch('/health').then(r => r.json()).then(h => h.stats.cancelled > {before})",
        timeout=60_000, polling=100,
    )
    assert page.is_enabled("#generate") and not page.is_enabled("#stop")

    # a greedy generation to the end: exactly the model's text, with the finish reason and token count
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    assert _text(page, "#temperature-value") == "0.00"
    page.fill("#max-tokens", "60")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=120_000)
    expected = complete(reference, tokenizer, [tokenizer.encode(prompt)],
                        SamplingParams(max_new_tokens=60, temperature=0))[0]
    assert _text(page, "#out-text") == expected.text
    status = _text(page, "#status")
    assert "finish_reason length · 60 tokens" in status
    assert int(status.split(" chunks")[0].split("· ")[-1]) > 10  # many pieces, not one at the end


def test_playground_shows_a_refusal(browser, served) -> None:
    url, _, _ = served
    page = browser.new_page()
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('model tiny')")
    page.fill("#prompt", "A" * 40)  # longer than tiny_run's 32-token context
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('error')")
    assert "at most 32" in _text(page, "#status")
