"""Published detector results (``runs/published_detection.py``) stand beside ours on docs/detection.md and
docs/screening.md: tagged, on our attack names, one cell per attack (and method), "none recorded" with the reason
where nothing was found."""

from __future__ import annotations

from pathlib import Path

from runs.published_detection import (
    DETECTION,
    NOT_FOUND,
    SCREENING,
    detection_for,
    published_text,
    screening_for,
)
from scripts import screening_doc
from suspects.zoo import default_zoo

ROOT = Path(__file__).resolve().parent.parent
ATTACKS = [a for a in default_zoo().manifest["attacks"] if a != "clean"]


def test_every_entry_is_tagged_and_names_one_of_our_attacks_and_methods():
    assert DETECTION and SCREENING
    for p in DETECTION + SCREENING:
        assert p.tag in {"README", "3rd", "paper-text"} and p.source and p.result
        assert p.attack in ATTACKS, p
    assert {p.method for p in DETECTION} == {"neural_cleanse"}
    assert {p.method for p in SCREENING} <= set(screening_doc.METHODS)
    assert set(NOT_FOUND) == {"neural_cleanse", *screening_doc.METHODS}


def _row(text: str, *cells: str) -> str:
    prefix = "| " + " | ".join(cells) + " |"
    rows = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (cells, rows)
    return rows[0]


def test_the_detection_page_shows_each_attacks_published_verdict_beside_its_rates():
    text = (ROOT / "docs" / "detection.md").read_text().split("### Rates", 1)[1].split("### Per suspect", 1)[0]
    for attack in ATTACKS:
        row = _row(text, attack)
        assert row.endswith(f"| {published_text(detection_for(attack))} |")
    assert "flagged at 10% (BA / ASR 90.67 / 98.26 -> 92.61 / 0.76)" in _row(text, "inputaware")
    assert _row(text, "bppattack").endswith("| none recorded |") and NOT_FOUND["neural_cleanse"] in text
    assert "not flagged at 10%" in _row(text, "sig")


def test_the_screening_page_shows_each_published_result_beside_ours():
    text = (ROOT / "docs" / "screening.md").read_text().split("### Per suspect", 1)[0]
    for attack in ATTACKS:
        for method in screening_doc.METHODS:
            row = _row(text, attack, method)
            assert row.endswith(f"| {published_text(screening_for(method, attack))} |")
    assert "AUROC 0.527 [3rd]" in _row(text, "badnets", "scale-up")
    assert NOT_FOUND["ibd-psc"] in text
