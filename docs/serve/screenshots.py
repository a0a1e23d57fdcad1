"""Screenshots of the web app's four views, taken in a headless Chromium.

    python docs/serve/screenshots.py --model runs/demo/pretrain/model --model runs/demo/sft/model \
        --model runs/demo/ppo/model [--registry FILE] [--out docs/serve]

Starts `scalelab serve` on a loopback port (labels go to a temporary file), drives Debian's
chromium through selenium + chromium-driver, and writes chat.png, compare.png, label.png and
tracker.png.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--registry")
    ap.add_argument("--out", default="docs/serve")
    ap.add_argument("--prompt", default="What is 23 plus 19?")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "scalelab", "serve", "--port", str(port),
               "--labels", f"{tmp}/labels.jsonl"]
        cmd += [a for m in args.model for a in ("--model", m)]
        cmd += ["--registry", args.registry] if args.registry else []
        server = subprocess.Popen(cmd)
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            shoot(url, out, args.prompt)
        finally:
            server.terminate()
            server.wait(30)


def shoot(url: str, out: Path, prompt: str) -> None:
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,760",
              "--hide-scrollbars"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    wait = WebDriverWait(d, 120, poll_frequency=0.1)
    css = lambda sel: d.find_elements(By.CSS_SELECTOR, sel)  # noqa: E731
    setv = lambda i, v: d.execute_script(  # noqa: E731
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];", i, v)

    def view(name: str) -> None:
        d.get(f"{url}/#{name}")
        wait.until(lambda _: d.execute_script("return document.body.dataset.ready === '1'"))

    view("chat")
    names = [o.text for o in css("#chat-model option")]
    setv("chat-model", names[-1])
    setv("chat-temperature", "0")
    for question in (prompt, "Where does Mia live?"):
        css("#chat-input")[0].send_keys(question + "\n")
        wait.until(lambda _: len(css(".msg.assistant")) == len(css(".msg.user")) and
                   css(".msg.assistant:last-child .content.done"))
    d.save_screenshot(str(out / "chat.png"))

    view("compare")
    setv("compare-temperature", "0")
    css("#compare-input")[0].send_keys(prompt)
    css("#compare-send")[0].click()
    wait.until(lambda _: len(css("#compare-out .answer.done")) == len(names))
    d.save_screenshot(str(out / "compare.png"))

    view("label")
    setv("label-model", names[-1])
    css("#label-next")[0].click()
    for key in "ab":
        wait.until(lambda _: not css("#label-pair")[0].get_attribute("hidden"))
        first = css("#label-pair")[0].get_attribute("data-id")
        ActionChains(d).send_keys(key).perform()
        wait.until(lambda _, f=first: css("#label-pair")[0].get_attribute("data-id") != f and
                   not css("#label-pair")[0].get_attribute("hidden"))
    d.save_screenshot(str(out / "label.png"))

    view("tracker")
    wait.until(lambda _: css("#tracker-table tr"))
    css("#tracker-plots")[0].click()
    wait.until(lambda _: css("#tracker-images img") and d.execute_script(
        "return [...document.querySelectorAll('#tracker-images img')].every(i => i.complete)"))
    d.set_window_size(1200, 1400)
    d.save_screenshot(str(out / "tracker.png"))
    d.quit()
    print(f"screenshots written to {out}")


if __name__ == "__main__":
    main()
