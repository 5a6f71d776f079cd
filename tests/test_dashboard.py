"""Dashboard checks: AppTest drives the script; a real headless Chromium renders the served page."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "dashboard" / "app.py")
CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if Path(p).exists()), None)


def test_overview_shows_card_and_metrics():
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params["suspect"] = "demo:badnets"
    at.run()
    assert not at.exception, at.exception
    assert "badnets" in at.title[0].value
    labels = [m.label for m in at.metric]
    assert labels == ["BA (benign accuracy)", "ASR (attack success rate)", "RA (robust accuracy)"]
    assert float(at.metric[1].value.rstrip("%")) >= 95.0
    captions = " ".join(c.value for c in at.caption)
    assert "excluded" in captions  # the ASR definition is on the page
    # the picker switches suspects and the choice is kept in the query params
    at.selectbox(key="suspect_picker").set_value("demo:clean").run()
    assert not at.exception and "clean" in at.title[0].value
    assert at.query_params["suspect"] == ["demo:clean"] or at.query_params["suspect"] == "demo:clean"
    assert at.metric[1].value == "n/a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = dict(os.environ, BACKDOOR_LENS_DEVICE="cpu")
    cmd = [sys.executable, "-m", "backdoor_lens.cli", "serve", "demo:badnets", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("dashboard did not come up: " + proc.stdout.read().decode(errors="replace")[-2000:])
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--no-first-run", "--disable-component-update", "--disable-sync"])


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None or shutil.which("chromium") is None, reason="Debian chromium not installed")
def test_served_dashboard_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server + "/?suspect=demo:badnets")
        page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]", timeout=90_000)
        page.wait_for_selector("text=Suspect: badnets", timeout=60_000)
        body = page.inner_text("body")
        assert "BA (benign accuracy)" in body and "ASR (attack success rate)" in body
        assert "Clean vs. triggered examples" in body
        assert page.locator("[data-testid=stImage]").count() >= 8
        page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
        browser.close()
