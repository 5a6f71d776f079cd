"""Neural Cleanse on the demo suspects, and the views with the recovered trigger (a benchmark, not a test).

    python scripts/bench_detection.py [--runs DIR] [--suspects badnets blended sig wanet clean]

Prints per suspect: flagged classes, the known target's anomaly index, the largest other index, the overlap of the
recovered mask with the known trigger, and the scan's seconds (default budget). Then, for the badnets and clean
suspects, the Grad-CAM trigger-attention share and the l_inf bias of the deepest block with the known trigger and
with the recovered one (the most suspicious class's mask and pattern).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

import suspects  # noqa: E402
from analysis.activations import activation_stats  # noqa: E402
from analysis.gradcam import compare_gradcam  # noqa: E402
from analysis.reverse import ScanConfig, known_trigger_overlap, recovered_trigger_spec, scan_images  # noqa: E402
from analysis.samples import paired_sample  # noqa: E402
from runs.scans import scan_suspect  # noqa: E402
from suspects.store import adopt_trigger  # noqa: E402


def view_numbers(suspect, trigger, n: int = 200) -> tuple[float, float, float]:
    """Grad-CAM trigger-attention share (clean, triggered inputs) and the deepest block's top-5% l_inf bias."""
    smp = paired_sample(suspect.test, trigger, n)
    cam = compare_gradcam(suspect.model, smp, trigger)
    stats = activation_stats(suspect.model, smp.clean, smp.triggered)
    deepest = stats.layer_summary().iloc[-1]
    return cam.mean_clean_share, cam.mean_triggered_share, float(deepest.top_linf_bias)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", default=None, help="where scans are stored (default: a temporary folder)")
    ap.add_argument("--suspects", nargs="+", default=["badnets", "blended", "sig", "wanet", "clean"])
    args = ap.parse_args()
    root = Path(args.runs or tempfile.mkdtemp(prefix="bl-detect-"))
    config = ScanConfig()
    print(f"Neural Cleanse, default budget: {config}")
    print(f"{'suspect':9s} {'flagged':>9s} {'target AI':>9s} {'max other':>9s} {'mass on trig':>12s} "
          f"{'IoU':>5s} {'seconds':>8s}  verdict")
    scans = {}
    for name in args.suspects:
        s = suspects.load(f"demo:{name}")
        r = scan_suspect(s, config, cache_root=root, recompute=args.runs is None)
        scans[name] = (s, r)
        trig = s.trigger
        tgt = trig.target if trig is not None else None
        others = [a for k, a in enumerate(r.anomaly) if k != tgt]
        own = scan_images(s, config) if trig is not None and trig.sample_specific else None
        ov = known_trigger_overlap(r.masks[tgt], trig, own) if trig is not None else None
        target_ai = f"{r.anomaly[tgt]:.2f}" if tgt is not None else "-"
        mass = f"{100 * ov['mass_on_trigger']:.0f}%" if ov else "-"
        iou = f"{ov['iou']:.2f}" if ov else "-"
        print(f"{name:9s} {str(r.flagged):>9s} {target_ai:>9s} {np.nanmax(others):9.2f} {mass:>12s} {iou:>5s} "
              f"{r.seconds:8.1f}  {r.verdict().level}", flush=True)
    if "badnets" in scans and "clean" in scans:
        print("\nViews with the known vs. the recovered trigger (200 test images; share = Grad-CAM mass on the "
              "trigger's pixels; l_inf bias = mean over the deepest block's top 5% channels)")
        print(f"{'suspect':9s} {'trigger':28s} {'share clean':>11s} {'share trig':>10s} {'linf bias':>9s}")
        known = scans["badnets"][0].trigger
        for name in ("badnets", "clean"):
            s, r = scans[name]
            k = r.most_suspicious
            rec = adopt_trigger(s, recovered_trigger_spec(r, k)).trigger
            for label, trig in ((f"known badnets (class {known.target})", known),
                                (f"recovered (class {k}, AI {r.anomaly[k]:.2f})", rec)):
                a, b, c = view_numbers(s, trig)
                print(f"{name:9s} {label:28s} {a:11.3f} {b:10.3f} {c:9.3f}", flush=True)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    raise SystemExit(main())
