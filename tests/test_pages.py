"""Generated pages (docs/detection.md, docs/screening.md, docs/stress.md): each is what its script writes from its
store, and each store names only weights that are a current test suspect's (the demo bundle's or the zoo's)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from runs.pages import recorded_fingerprints, splice, unknown_fingerprints

ROOT = Path(__file__).resolve().parent.parent
STORES = ("docs/stress-grid.json", "docs/detection-grid.json", "docs/screening-grid.json")


def _script(name: str):
    return importlib.import_module(f"scripts.{name}")


@pytest.mark.parametrize("path", STORES)
def test_every_page_names_only_current_weights(path):
    """A page measured on weights that are no longer the bundle's or the zoo's fails here: rerun its script."""
    file = ROOT / path
    if not file.is_file():
        pytest.skip(f"{path} not written yet")
    store = json.loads(file.read_text())
    assert not unknown_fingerprints(store), f"{path} names weights that are no test suspect's: re-measure them"


def test_every_stress_cell_names_its_weights():
    store = json.loads((ROOT / "docs" / "stress-grid.json").read_text())
    missing = [k for k, c in store["cells"].items() if not (c.get("fingerprint") and c.get("reference_fingerprint"))]
    assert not missing, f"stress cells without the fingerprints of the weights they measured: {missing}"


@pytest.mark.parametrize("name", ["detection_doc", "screening_doc"])
def test_the_page_block_is_what_the_store_gives(name):
    doc = _script(name)
    from runs.pages import load_store

    page = doc.DOC.read_text()
    assert doc.render(load_store(doc.STORE), page) == page, f"{doc.DOC.name} is stale: run python scripts/{name}.py"


def test_splice_replaces_only_the_block_and_refuses_a_page_without_markers():
    page = ("# Title\n\nprose\n\n<!-- BEGIN GENERATED: x (s.py; edit the script, not this block) -->\n\nold\n\n"
            "<!-- END GENERATED: x -->\n\ntail\n")
    out = splice(page, "x", "s.py", "new table")
    assert out.startswith("# Title\n\nprose\n\n") and out.endswith("<!-- END GENERATED: x -->\n\ntail\n")
    assert "new table" in out and "old" not in out
    assert splice(out, "x", "s.py", "new table") == out
    with pytest.raises(ValueError, match="no generated block 'y'"):
        splice(page, "y", "s.py", "table")


def test_a_scan_on_other_weights_is_stale_and_flagged_by_the_guard():
    det = _script("detection_doc")
    fp = det.current_fingerprint("zoo:badnets-s0")
    assert fp  # the bundle's badnets weights
    cell = {"attack": "badnets", "ref": "zoo:badnets-s0", "fingerprint": fp, "config": det.scan_config()}
    store = {"cells": {"zoo:badnets-s0": cell}}
    assert det.cell_state(store, "zoo:badnets-s0") == "measured" and not unknown_fingerprints(store)
    store["cells"]["zoo:badnets-s0"] = {**cell, "fingerprint": "0" * 32}
    assert det.cell_state(store, "zoo:badnets-s0") == "stale"
    assert unknown_fingerprints(store) == {"0" * 32} == recorded_fingerprints(store)
    store["cells"]["zoo:badnets-s0"] = {**cell, "config": {**cell["config"], "steps": 1}}
    assert det.cell_state(store, "zoo:badnets-s0") == "stale"
    assert det.cell_state({"cells": {}}, "zoo:badnets-s0") == "missing"


def test_detection_rates_count_levels_from_the_most_alarming():
    det = _script("detection_doc")
    cells = [{"level": "flagged", "most_suspicious": 0, "target": 0},
             {"level": "suspicious", "most_suspicious": 3, "target": 0},
             {"level": "clean", "most_suspicious": 0, "target": 0},
             {"level": "inconclusive", "most_suspicious": 1, "target": 0}]
    r = det.rates(cells)
    assert r == {"n": 4, "flagged": 1, "suspicious_or_flagged": 2, "inconclusive": 1, "target_found": 2}
    assert "target_found" not in det.rates([{"level": "clean", "most_suspicious": 2, "target": None}])


def test_detection_pools_complete_attacks_apart_from_partly_scanned_ones():
    """An attack with 1 of its 3 test suspects scanned must not weigh like one with 3: when some attack is
    incomplete, the page has a pooled row over the complete attacks only, and says which attacks are partial."""
    det = _script("detection_doc")
    from runs.pages import load_store

    store = load_store(det.STORE)
    cells = det.grid()
    counts: dict[str, list[int]] = {}
    for attack, ref in cells:
        counts.setdefault(attack, [0, 0])[1] += 1
        counts[attack][0] += det.cell_state(store, ref) == "measured"
    complete = [a for a, (k, n) in counts.items() if a != "clean" and k == n]
    partial = [a for a, (k, n) in counts.items() if a != "clean" and 0 < k < n]
    block = det.render_block(store)
    row = next((line for line in block.splitlines() if "every test suspect scanned" in line), None)
    if complete and partial:
        assert row is not None and row.split(" | ")[1] == str(sum(counts[a][1] for a in complete))
        assert all(f"{a}: {counts[a][0]} of {counts[a][1]}" in block for a in partial)
    else:
        assert row is None


def test_the_defense_benchmark_names_only_current_weights():
    """Every run the benchmark document counts names the weights it repaired, and they are a current test
    suspect's (runs on other weights are left out of the document, and their fingerprint column is empty)."""
    import pandas as pd

    from suspects.zoo import test_fingerprints

    rows = pd.read_csv(ROOT / "docs" / "defense-benchmarks-runs.csv", dtype=str, keep_default_na=False)
    named = set(rows["fingerprint"]) - {""}
    assert named and named <= set(test_fingerprints()), "the benchmark names weights that are no test suspect's"
