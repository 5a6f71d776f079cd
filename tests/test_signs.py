"""Issue 27 item 6: a change gets the arrow of its sign and the colour of its direction (BA falling is red and points
down), and the critical block of the skip ablation carries a note when switching it off destroys clean accuracy."""

import pytest
import torch

from analysis.shortcuts import MAX_BA_DROP, skip_ablation
from dashboard.signs import HIGHER_IS_BETTER, delta_color, delta_points
from suspects.store import load


def test_delta_text_has_the_sign_of_after_minus_before_and_the_colour_of_its_direction():
    assert delta_points(0.89, 0.16) == "-73.0 pts"  # BA fell: a down arrow ...
    assert delta_color("ba") == "normal"  # ... drawn red (normal: a fall is red, a rise green)
    assert delta_points(0.10, 0.95, "vs. clean") == "+85.0 pts vs. clean"
    assert delta_color("asr") == "inverse" and delta_color("trigger_share") == "inverse"
    assert delta_points(0.5, 0.4999) == "+0.0 pts"  # no change is never a down arrow ("-0.0")
    assert delta_color("ra") == "normal" and delta_color("der") == "normal"
    assert {delta_color(k) for k in HIGHER_IS_BETTER} == {"normal", "inverse"}
    with pytest.raises(KeyError):
        delta_color("unknown quantity")


def test_critical_block_note_reads_ba_at_gamma_zero():
    s = load("demo:badnets")
    test = s.test.subset(torch.arange(200))
    trig = s.trigger
    mask = trig.test_mask(test.labels)
    x = test.images()
    res = skip_ablation(s.model, x, test.labels, trig(x[mask]), trig.target_labels(test.labels[mask]),
                        gammas=(1.0, 0.0), min_score=-1.0)  # min_score -1: some block is always named critical
    assert res.critical_block is not None
    eff = res.switched_off()
    t = res.curve(res.critical_block)
    assert eff == {"ba_before": float(t.ba.iloc[-1]), "asr_before": float(t.asr.iloc[-1]),
                   "ba_after": float(t.ba.iloc[0]), "asr_after": float(t.asr.iloc[0])}
    drop = eff["ba_before"] - eff["ba_after"]
    assert bool(res.critical_block_note()) == (drop > MAX_BA_DROP)
    # the note follows the measured drop: just under it names the block and both BAs, just over it stays silent
    note = res.critical_block_note(max_ba_drop=drop - 0.01)
    assert res.critical_block in note and f"{100 * eff['ba_after']:.1f}%" in note and "reads ASR only" in note
    assert res.critical_block_note(max_ba_drop=drop + 0.01) == ""
    assert res.switched_off("no.such.block") is None
