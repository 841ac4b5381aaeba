"""The browser demo in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) loads `python -m grounded_llava.demo` on a loopback port with the shipped default, uploads an
example, sends a prompt and waits for the answer and its overlay; a bad upload gets a message in the page.

The screenshot is saved as `demo.png` under the test's tmp dir. Every request the page makes must stay on
the demo's own server (no CDN, no analytics). `.ci/run` installs the browser and sets
GROUNDED_LLAVA_BROWSER_TESTS=required, so that a missing browser fails there instead of skipping.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
EXAMPLE = REPO / "examples" / "shapes_1.png"
PROMPT = "Find every circle."


def _missing() -> str | None:
    for module in ("gradio", "selenium"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install -e '.[demo,dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


if (reason := _missing()) is not None:
    if os.environ.get("GROUNDED_LLAVA_BROWSER_TESTS") == "required":
        raise RuntimeError(f"the browser test is required here but {reason}")
    pytest.skip(reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    port = _free_port()
    log = (tmp_path_factory.mktemp("demo") / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "grounded_llava.demo", "--port", str(port), "--quiet"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the demo did not start: {Path(log.name).read_text()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1280,1300", f"--user-data-dir={tmp_path / 'profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def _requested_urls(driver) -> set[str]:
    events = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    return {e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"}


def _upload(driver, wait, path: Path, expected: str) -> None:
    """Upload `path` through the page's file input and wait for `expected` in the status line (a timeout
    fails the test). Waiting for a given message, not for any text: a message left from before the upload
    (with gradio's timer over it while the upload is handled) is not the upload's answer."""
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))
    wait.until(lambda d: expected in d.find_element(By.ID, "status").text)


def test_the_demo_answers_an_uploaded_example_in_a_browser(demo_url, browser, tmp_path):
    from grounded_llava.inference.predictor import GroundedLlava

    expected = GroundedLlava.from_pretrained(device="cpu").chat(EXAMPLE, PROMPT).text
    wait = WebDriverWait(browser, 120)
    browser.get(demo_url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    _upload(browser, wait, EXAMPLE, "ask away")
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(PROMPT)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlay img"))
    chat = browser.find_element(By.ID, "chatbot").text
    assert PROMPT in chat and expected in chat.split(PROMPT, 1)[1]
    overlay = browser.find_element(By.CSS_SELECTOR, "#overlay img")
    wait.until(lambda d: int(overlay.get_attribute("naturalWidth") or 0) > 0)
    assert int(overlay.get_attribute("naturalWidth")) == 224
    assert int(overlay.get_attribute("naturalHeight")) > 224  # the answer panel sits below the image
    links = [a.get_attribute("href") or "" for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")]
    assert {Path(link).name for link in links} >= {"answer_1.png", "answer_1.json"}, links
    second = "Where is the star?"  # a second turn: the chat goes on about the same image
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(second)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: any("answer_2.png" in (a.get_attribute("href") or "") for a in d.find_elements(
        By.CSS_SELECTOR, "#downloads a")))  # fmt: skip
    assert second in browser.find_element(By.ID, "chatbot").text.split(PROMPT, 1)[1]
    browser.save_screenshot(str(tmp_path / "demo.png"))

    outside = {
        url for url in _requested_urls(browser)
        if url.split(":", 1)[0] in ("http", "https", "ws", "wss") and not url.startswith(demo_url)
    }  # fmt: skip
    assert not outside, f"the page loaded from outside the demo's server: {sorted(outside)[:5]}"


def test_a_file_that_is_not_an_image_gets_a_message_in_the_page(demo_url, browser, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    wait = WebDriverWait(browser, 60)
    browser.get(demo_url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
    _upload(browser, wait, tmp_path / "notes.png", "cannot read image notes.png: cannot identify image file")
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(PROMPT)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: "upload or pick an image first" in d.find_element(By.ID, "status").text)
    browser.save_screenshot(str(tmp_path / "demo_bad_upload.png"))
    shutil.copy(EXAMPLE, tmp_path / "again.png")  # the server is still there and answers the next upload
    _upload(browser, wait, tmp_path / "again.png", "ask away")
