"""Make docs/playground.png: the playground of a served model after a streamed sample, in headless Chromium.

The same setup as tests/test_playground.py (Debian's chromium driven by the playwright client):

    .venv/bin/python docs/playground_screenshot.py RUN_DIR [--prompt TEXT] [--out docs/playground.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

from gptlab.inference.loading import load_pretrained
from gptlab.serve import create_app, running_server

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run directory or a Hugging Face GPT-2 directory")
    parser.add_argument("--prompt", default="ROMEO:\nBut soft, what light")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "playground.png")
    args = parser.parse_args()

    name = Path(args.model).name
    app = create_app(*load_pretrained(args.model), name)
    with running_server(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 700})
        page.goto(url + "/")
        page.wait_for_function(f"document.getElementById('model').textContent.startsWith('model {name}')")
        page.fill("#prompt", args.prompt)
        page.fill("#max-tokens", str(args.max_tokens))
        page.fill("#seed", str(args.seed))
        invalid = page.evaluate("() => { const bad = document.querySelector('#form :invalid'); "
                                "return bad ? `${bad.id}: ${bad.validationMessage}` : null; }")
        if invalid:
            raise SystemExit(f"the playground's form refuses {invalid}")
        page.click("#generate")
        page.wait_for_function("/^(done|error)/.test(document.getElementById('status').textContent)",
                               timeout=300_000)
        status = page.eval_on_selector("#status", "element => element.textContent")
        if not status.startswith("done"):
            raise SystemExit(f"the playground says: {status}")
        page.screenshot(path=str(args.out))
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
