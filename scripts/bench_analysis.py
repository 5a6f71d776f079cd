"""Speed of the analysis views on the demo suspect (a benchmark, not a test).

    python scripts/bench_analysis.py [--suspect demo:badnets] [--no-browser]

Prints, for this machine: first page rendered after `serve` (real headless Chromium), Grad-CAM of 32 images,
activation statistics of 1,000 clean + 1,000 triggered images over all blocks, PCA and UMAP of 2,000 points
(first fit in this process, then a cached call), and the full skip ablation (8 blocks x 11 gammas on
1,000 + 1,000 images), each next to its goal.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

RESULTS: list[tuple[str, float, float]] = []


def record(name: str, seconds: float, goal: float) -> None:
    RESULTS.append((name, seconds, goal))
    print(f"{name:62s} {seconds:7.2f} s   goal <= {goal:g} s   {'ok' if seconds <= goal else 'SLOW'}", flush=True)


def bench_first_page(suspect: str) -> None:
    chromium = next((p for p in ("/usr/lib/chromium/chromium", "/usr/bin/chromium") if Path(p).exists()), None)
    if chromium is None:
        print("first page: skipped (no chromium)")
        return
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with sync_playwright() as p:  # the user's browser is already open when they run `serve`
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"])
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "backdoor_lens.cli", "serve", suspect, "--port", str(port)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            while True:
                try:
                    urllib.request.urlopen(url + "/_stcore/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("text=Suspect:", timeout=120_000)
            page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]", timeout=120_000)
            record("first page rendered after `serve` (Overview, Chromium)", time.time() - t0, 10)
        finally:
            proc.terminate()
            proc.wait(10)
            browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suspect", default="demo:badnets")
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()
    import torch

    if not args.no_browser:
        bench_first_page(args.suspect)

    import suspects
    from analysis.activations import activation_stats
    from analysis.features import extract_features, pca_2d, umap_2d
    from analysis.gradcam import compare_gradcam
    from analysis.samples import paired_sample
    from analysis.shortcuts import skip_ablation
    from suspects.device import describe_device, pick_device, prepare_model

    device = pick_device()
    s = suspects.load(args.suspect)
    s.model = prepare_model(s.model, device)
    print(f"suspect {args.suspect} on {describe_device(device)}, torch {torch.__version__}")

    smp32 = paired_sample(s.test, s.trigger, 32)
    compare_gradcam(s.model, paired_sample(s.test, s.trigger, 2), s.trigger)  # warm-up
    t = time.time()
    compare_gradcam(s.model, smp32, s.trigger)
    record("Grad-CAM of 32 images (clean + triggered copies, 64 maps)", time.time() - t, 3)

    smp = paired_sample(s.test, s.trigger, 1000)
    t = time.time()
    activation_stats(s.model, smp.clean, smp.triggered)
    record("activation statistics, 1,000 clean + 1,000 triggered, 8 blocks", time.time() - t, 5)

    clean_idx = paired_sample(s.test, None, 1000).index
    feats, _ = extract_features(s.model, torch.cat([s.test.images(clean_idx), smp.triggered]))
    t = time.time()
    pca_2d(feats)
    record("PCA of 2,000 points", time.time() - t, 0.5)

    @functools.lru_cache(maxsize=4)
    def cached_umap(key: str):
        return umap_2d(feats, seed=0)

    t = time.time()
    cached_umap(args.suspect)
    record("UMAP of 2,000 points, first fit in a fresh process", time.time() - t, 20)
    t = time.time()
    cached_umap(args.suspect)
    record("UMAP of 2,000 points, cached", time.time() - t, 0.5)

    t = time.time()
    res = skip_ablation(s.model, s.test.images(clean_idx), s.test.labels[clean_idx], smp.triggered, smp.attack_labels)
    record("skip ablation, 8 blocks x 11 gammas on 1,000 + 1,000 images", time.time() - t, 60)
    print(f"critical block: {res.critical_block}")


if __name__ == "__main__":
    main()
