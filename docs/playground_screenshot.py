"""Make the playground's pictures in headless Chromium: docs/playground.png (the Complete tab after a streamed
sample) and docs/playground_chat.png (the Chat tab after a short conversation with a chat-tuned run).

The same setup as tests/serve/test_playground.py (Debian's chromium driven by the playwright client):

    .venv/bin/python docs/playground_screenshot.py RUN_DIR [--prompt TEXT] [--out docs/playground.png]
    .venv/bin/python docs/playground_screenshot.py CHAT_RUN --tab chat [--message TEXT ...]

The chat run of docs/playground_chat.png ("adder-chat") is benchmarks/chat_adder.py's model (its 320-token BPE,
2 layers, 128 wide) with a context of 80 tokens, room for two questions and their answers:
- base: `train --data DATA --n-layer 2 --n-head 4 --n-embd 128 --block-size 160 --batch-size 16 --max-iters 100
  --lr 3e-3 --min-lr 3e-4 --warmup-iters 20`;
- conversations: chat_adder's 9,000 training problems in order, one or two to a conversation
  (`random.Random(0).randint(1, 2)` each), its 1,000 held-out problems never among them;
- `train --init-from BASE --task chat --data CONVERSATIONS --block-size 80 --batch-size 64 --max-iters 100000
  --max-time 360 --decay-by-time --warmup-fraction 0.05 --lr 3e-3 --min-lr 3e-4 --weight-decay 0.0
  --adapt-threads`, then the same from that run with `--max-time 240 --warmup-fraction 0.03`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from gptlab.inference.loading import load_pretrained
from gptlab.serve import create_app, running_server

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS = Path(__file__).resolve().parent
# per tab: what is typed, how many tokens, the temperature (chat: greedy, so the picture shows the model's
# own answers), and the picture's file
TABS = {
    "complete": {"prompts": ["ROMEO:\nBut soft, what light"], "max_tokens": 200, "temperature": 0.8,
                 "out": DOCS / "playground.png"},
    "chat": {"prompts": ["What is 38 + 47?", "What is 86 + 25?"],
             "max_tokens": 8, "temperature": 0.0, "out": DOCS / "playground_chat.png"},
}


def send(page: Page) -> None:
    """Press the tab's button and wait for the streamed reply to finish; anything but `done` ends the script."""
    invalid = page.evaluate("() => { const bad = document.querySelector('#form :invalid'); "
                            "return bad ? `${bad.id}: ${bad.validationMessage}` : null; }")
    if invalid:
        raise SystemExit(f"the playground's form refuses {invalid}")
    page.click("#generate")
    page.wait_for_function("/^(done|error|stopped)/.test(document.getElementById('status').textContent)",
                           timeout=300_000)
    status = page.eval_on_selector("#status", "element => element.textContent")
    if not status.startswith("done"):
        raise SystemExit(f"the playground says: {status}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run directory or a Hugging Face GPT-2 directory (a chat-tuned run "
                                      "for --tab chat)")
    parser.add_argument("--tab", choices=sorted(TABS), default="complete", help="which tab to show")
    parser.add_argument("--prompt", help="the Complete tab's prompt")
    parser.add_argument("--message", action="append", help="a Chat message, sent in turn (repeat the option)")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tab = TABS[args.tab]
    prompts = [args.prompt] if args.prompt else args.message or tab["prompts"]
    if args.tab == "complete" and len(prompts) != 1:
        parser.error("the Complete tab takes one --prompt")
    out = args.out or tab["out"]

    name = Path(args.model).name
    app = create_app(*load_pretrained(args.model), name)
    with running_server(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 700})
        page.goto(url + "/")
        page.wait_for_function(f"document.getElementById('model').textContent.startsWith('model {name}')")
        page.check(f"input[name=mode][value={args.tab}]")
        temperature = tab["temperature"] if args.temperature is None else args.temperature
        page.eval_on_selector("#temperature", f"el => {{ el.value = '{temperature}'; "
                                              "el.dispatchEvent(new Event('input')); }")
        page.fill("#max-tokens", str(args.max_tokens or tab["max_tokens"]))
        page.fill("#seed", str(args.seed))
        for prompt in prompts:
            page.fill("#prompt", prompt)
            send(page)
        if args.tab == "chat":
            turns = page.eval_on_selector_all(".turn", "els => els.map(e => `${e.className}: ${e.textContent}`)")
            print("\n".join(turns))
        page.screenshot(path=str(out), full_page=True)  # the whole form, its hint too
        browser.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
