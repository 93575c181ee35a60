"""The README's screenshot of ``pixelwise serve`` (docs/serve.png), reproducibly:
``python scripts/serve_screenshot.py CHECKPOINT IMAGE --out docs/serve.png [--overwrite]``.

Serves CHECKPOINT on a free local port, uploads IMAGE through the page in Debian's headless
Chromium (``apt-get install chromium chromium-driver``; selenium from the test extra), sets the
opacity slider to 60 % and saves the window as PNG, atomically. Refuses an existing --out
unless --overwrite.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from pixelwise.fs import atomic_write_bytes
from pixelwise.serve import Predictor, make_server


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/serve_screenshot.py")
    ap.add_argument("checkpoint")
    ap.add_argument("image")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--score-threshold", type=float, default=0.5)
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.exists() and not a.overwrite:
        print(f"{out}: exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (browser and driver):
        print("needs chromium and chromedriver: apt-get install chromium chromium-driver", file=sys.stderr)
        return 1
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = make_server(Predictor(a.checkpoint, "cpu", score_threshold=a.score_threshold), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1400,900", f"--user-data-dir={profile}", "--no-first-run"):
            opts.add_argument(arg)
        drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))
        try:
            drv.get(server.url)
            wait = WebDriverWait(drv, 120)
            wait.until(lambda d: d.find_element(By.ID, "info").text.strip())
            drv.find_element(By.ID, "file").send_keys(str(Path(a.image).resolve()))
            wait.until(lambda d: d.execute_script(
                "const o = document.getElementById('overlay'); return !document.getElementById('result').hidden"
                " && o.complete && o.naturalWidth > 0;"))
            drv.execute_script("const s = document.getElementById('opacity'); s.value = 60;"
                               " s.dispatchEvent(new Event('input'));")
            atomic_write_bytes(out, drv.get_screenshot_as_png())
        finally:
            drv.quit()
            server.shutdown()
            server.server_close()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
