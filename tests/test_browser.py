"""Real-browser checks (headless Debian Chromium via Playwright): every page renders, the scatter's lasso works.

Screenshots go to a temporary folder, or to ``$BACKDOOR_LENS_SCREENSHOTS`` (e.g. assets/screenshots) when set.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next((p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if Path(p).exists()), None)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None or shutil.which("chromium") is None, reason="Debian chromium not installed"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """The run store the dashboard under test reads (tests may add runs to it directly)."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def server(runs_root):
    port = free_port()
    env = dict(os.environ, BACKDOOR_LENS_DEVICE="cpu", BACKDOOR_LENS_RUNS=str(runs_root))
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


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--no-first-run", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    target = os.environ.get("BACKDOOR_LENS_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("shots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def settle(page, timeout=180_000):
    """Wait until the script has stopped running and stays stopped for a second (no spinner either)."""
    deadline = time.time() + timeout / 1000
    while time.time() < deadline:
        page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]", timeout=timeout)
        page.wait_for_function("() => !document.querySelector('[data-testid=stSpinner]')", timeout=timeout)
        page.wait_for_timeout(1000)
        if page.locator("[data-testid=stApp][data-test-script-state=notRunning]").count() and \
                not page.locator("[data-testid=stSpinner]").count():
            return
    raise TimeoutError("the page did not settle")


def wait_for_upload(page, suffix: str, timeout=120_000) -> None:
    """Wait until the sidebar's uploader shows a finished file ending in ``suffix`` (no upload spinner), then settle:
    a click that lands while the upload is still in flight runs with the previous file."""
    page.wait_for_function(
        """(suffix) => {
            const bar = document.querySelector('[data-testid=stSidebar]');
            const names = [...bar.querySelectorAll('[data-testid=stFileChipName]')];
            return names.some(n => (n.getAttribute('title') || n.textContent).trim().endsWith(suffix))
                && !bar.querySelector('[data-testid=stFileChipIconSpinner]');
        }""", arg=suffix, timeout=timeout)
    settle(page)


def picker_text(page) -> str:
    """What the sidebar's suspect picker shows (its label, its text and its input's value)."""
    return page.locator("[data-testid=stSidebar] [data-testid=stSelectbox]").first.evaluate(
        "e => e.innerText + ' ' + Array.from(e.querySelectorAll('input')).map(i => i.value).join(' ') + ' ' + "
        "Array.from(e.querySelectorAll('[title]')).map(t => t.title).join(' ')")


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    page.goto(url)
    settle(page)
    return page


def test_overview(server, browser, shots):
    page = open_page(browser, server + "/?suspect=demo:badnets")
    page.wait_for_selector("text=Suspect: badnets")
    page.wait_for_selector("text=triggered · pred", timeout=120_000)
    settle(page)
    body = page.inner_text("body")
    assert "BA (benign accuracy)" in body and "ASR (attack success rate)" in body
    assert page.locator("[data-testid=stImage]").count() >= 8
    # a reload keeps the selected suspect (it lives in the query params)
    page.reload()
    settle(page)
    assert "Suspect: badnets" in page.inner_text("body")
    assert page.get_by_role("button", name="Deploy").count() == 0  # a local tool: no "Deploy" in the toolbar
    page.screenshot(path=str(shots / "overview.png"), full_page=True)
    page.close()


@pytest.mark.parametrize("path,marker", [
    ("gradcam", "Trigger-attention share, triggered inputs"),
    ("activations", "Top channels by l_inf bias"),
    ("shortcuts", "ASR with that block off (γ = 0)"),
])
def test_analysis_pages_render(server, browser, shots, path, marker):
    page = open_page(browser, f"{server}/{path}?suspect=demo:badnets")
    if path == "shortcuts":  # a long computation waits for its button (with the estimate)
        page.get_by_role("button", name="Run the ablation").click()
    page.wait_for_selector(f"text={marker}", timeout=180_000)
    settle(page)
    assert "Traceback" not in page.inner_text("body")
    if path != "gradcam":  # plotly's bundle loads lazily: the chart comes a moment after the text
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 1", timeout=60_000)
    page.screenshot(path=str(shots / f"{path}.png"), full_page=True)
    page.close()


def test_feature_scatter_lasso_selection(server, browser, shots):
    page = open_page(browser, f"{server}/features?suspect=demo:badnets")
    page.wait_for_selector(".js-plotly-plot .nsewdrag", timeout=180_000)
    settle(page)
    drag = page.locator(".js-plotly-plot .nsewdrag").first
    box = drag.bounding_box()
    # a lasso around the whole plotting area selects every point
    x0, y0, x1, y1 = box["x"] + 3, box["y"] + 3, box["x"] + box["width"] - 3, box["y"] + box["height"] - 3
    page.mouse.move(x0, y0)
    page.mouse.down()
    for x, y in [(x1, y0), (x1, y1), (x0, y1), (x0, y0 + 2)]:
        page.mouse.move(x, y, steps=12)
    page.mouse.up()
    page.wait_for_selector("text=points selected", timeout=60_000)
    settle(page)
    body = page.inner_text("body")
    assert "Traceback" not in body and "poisoned" in body
    assert page.locator("[data-testid=stImage]").count() >= 8
    page.screenshot(path=str(shots / "features.png"), full_page=True)
    page.close()


def test_defenses_page_run_button_shows_the_result_card(server, browser, shots):
    page = open_page(browser, f"{server}/defenses?suspect=demo:badnets")
    page.wait_for_selector("text=l_inf neuron pruning", timeout=120_000)
    button = page.get_by_role("button", name="Run l_inf neuron pruning")
    button.click()
    # the run goes to the background worker; the card polls it and then shows before/after metrics
    open_button = page.get_by_role("button", name="Open the repaired model in the analysis pages")
    open_button.wait_for(timeout=300_000)
    settle(page)
    body = page.inner_text("body")
    assert "Traceback" not in body
    assert "DER" in body and "Before: BA" in body
    open_button.click()
    page.wait_for_selector("text=Suspect: badnets+linf_prune", timeout=120_000)
    settle(page)
    # issue 12 items 1 and 8: the picker names the repaired model, on this page and the next; its card names the run
    assert "badnets+linf_prune" in picker_text(page)
    body = page.inner_text("body")
    assert "defense run" in body and "of the original suspect" in body
    page.get_by_role("link", name="Grad-CAM").click()
    page.wait_for_selector("text=Grad-CAM: where the model looks", timeout=120_000)
    settle(page)
    assert "badnets+linf_prune" in picker_text(page)
    assert "Model: badnets+linf_prune" in page.inner_text("body")
    page.goto(f"{server}/defenses?suspect=demo:badnets")
    settle(page)
    page.get_by_role("button", name="Open the repaired model in the analysis pages").wait_for(timeout=120_000)
    page.screenshot(path=str(shots / "defenses.png"), full_page=False)
    page.close()


def test_detection_page_scans_and_shows_the_verdict(server, browser, shots):
    page = open_page(browser, f"{server}/detection?suspect=demo:badnets")
    page.wait_for_selector("text=Detection: recover the trigger", timeout=120_000)
    page.wait_for_selector("text=No scan of this suspect")
    for label, value in (("Images (defense pool)", "50"), ("Epochs per class", "10")):
        box = page.locator(f"input[aria-label='{label}']")
        box.fill(value)
        box.press("Tab")  # commit the value to the form before it is submitted
    page.get_by_role("button", name="Scan all classes").click()
    page.wait_for_selector("text=Verdict", timeout=600_000)
    settle(page)
    body = page.inner_text("body")
    assert "Traceback" not in body
    # plotly's bundle loads lazily: the two bar charts (anomaly index, mask L1) are drawn a moment after the text
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 2", timeout=120_000)
    assert "Anomaly index per class" in page.locator(".js-plotly-plot").first.inner_text()
    assert "Recovered masks and patterns" in body and "known trigger" in body
    page.screenshot(path=str(shots / "detection.png"), full_page=False)
    page.get_by_role("button", name="Adopt this trigger").click()
    page.wait_for_selector("text=not known", timeout=120_000)
    settle(page)
    page.close()


def test_compare_page_shows_the_runs_table_and_charts(server, browser, shots, runs_root):
    import torch

    from runs.jobs import create_run, execute
    from runs.store import RunStore

    store = RunStore(runs_root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server shares the 2 cores
    try:
        for defense, overrides in (("linf_prune", {}), ("finetune", {"steps": 4})):
            run_id = create_run(store, defense, "demo:badnets", "quick", overrides, pool_size=300, pid=os.getpid())
            assert execute(store, run_id) == "finished", store.get(run_id).error
    finally:
        torch.set_num_threads(threads)
    page = browser.new_page(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
    page.goto(f"{server}/compare?suspect=demo:badnets")
    page.wait_for_selector("text=Stored runs", timeout=120_000)
    page.wait_for_selector("text=Trigger-attention share, triggered inputs", timeout=180_000)
    settle(page)
    body = page.inner_text("body")
    assert "Traceback" not in body and "Before / after, side by side" in body
    # the runs and the published numbers (expander); the groups' statistics too once a setting has several runs
    # (earlier tests of the session may have stored some)
    assert page.locator("[data-testid=stDataFrame]").count() in (2, 3)
    assert page.locator(".js-plotly-plot").count() >= 2  # BA vs. ASR with its Pareto front, bars per metric
    assert "Pareto front" in page.locator(".js-plotly-plot").first.inner_text()
    assert page.get_by_role("button", name="HTML report").count() == 1
    with page.expect_download(timeout=60_000) as download:
        page.get_by_role("button", name="Table (CSV)").click()
    csv = Path(download.value.path()).read_text()
    assert csv.startswith("run_id,defense,preset,") and ",linf_prune,quick," in csv and ",finetune,quick," in csv
    page.set_viewport_size({"width": 1500, "height": 2000})  # the app scrolls inside its own container
    settle(page)
    page.screenshot(path=str(shots / "compare.png"), full_page=True)
    page.close()


def test_bad_uploads_say_one_line_and_the_demo_weights_load(server, browser, shots, tmp_path):
    """Issue 12 items 2 and 3 in the browser: a text file renamed to .pt gives one line in the sidebar and no
    traceback; the demo's own weights then load with the width left empty, and the picker names them."""
    from suspects.store import DEMO_SUSPECTS

    notes = tmp_path / "notes.pt"
    notes.write_text("these are my notes, not a model\n")
    page = open_page(browser, f"{server}/?suspect=demo:badnets")
    sidebar = page.locator("[data-testid=stSidebar]")
    sidebar.get_by_text("Upload a checkpoint").click()
    upload = sidebar.locator("input[type=file]")
    upload.set_input_files(str(notes))
    wait_for_upload(page, ".pt")
    sidebar.get_by_role("button", name="Load checkpoint").click()
    page.wait_for_selector("[data-testid=stSidebar] [data-testid=stAlert]", timeout=120_000)
    settle(page)
    alert = sidebar.locator("[data-testid=stAlert]").first.inner_text()
    assert alert.strip().startswith("notes.pt: not a checkpoint") and "\n" not in alert.strip()
    assert "Traceback" not in page.inner_text("body") and "Suspect: badnets" in page.inner_text("body")
    weights = tmp_path / "badnets-weights.safetensors"
    weights.write_bytes((DEMO_SUSPECTS / "badnets" / "model.safetensors").read_bytes())
    upload.set_input_files(str(weights))
    wait_for_upload(page, ".safetensors")
    sidebar.get_by_role("button", name="Load checkpoint").click()
    try:
        page.wait_for_selector("text=Suspect: badnets-weights", timeout=240_000)  # the shared server may be busy
    except Exception:
        page.screenshot(path=str(shots / "upload-failed.png"), full_page=True)  # what the page said instead
        raise
    settle(page)
    assert "badnets-weights" in picker_text(page)
    assert "Traceback" not in page.inner_text("body")
    page.close()
