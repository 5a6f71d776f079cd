"""``runs.stats``: the statistics of a group of runs (median and range, bootstrap interval, k/n successes, the split
flag, near the Pareto front), on synthetic run tables, and Compare showing them (``compare --json`` and text, the
HTML report's groups table)."""

from __future__ import annotations

import json
import math
from html import escape

import numpy as np
import pandas as pd
import pytest

import suspects
from runs.compare import GROUP_DISPLAY, format_groups, group_runs, groups_display, table_json
from runs.stats import (
    BOOTSTRAP_MIN_N,
    bootstrap_mean_interval,
    front_marks,
    split_counts,
    spread,
    success_counts,
)
from runs.store import RunStore

pytestmark = pytest.mark.usefixtures("one_thread")


def _table(cells: dict[str, list[tuple[float, float]]], ba_before: float = 0.9) -> pd.DataFrame:
    """Runs: defense -> [(BA, ASR), ...], one seed each."""
    rows = [{"run_id": f"{d}-{i}", "defense": d, "preset": "quick", "overrides": "", "seed": i, "ba": ba, "asr": asr,
             "ra": 1 - asr, "der": 0.5, "seconds": 10.0 + i, "ba_before": ba_before, "asr_before": 1.0}
            for d, runs in cells.items() for i, (ba, asr) in enumerate(runs)]
    return pd.DataFrame(rows)


def test_spread_gives_median_range_and_a_bootstrap_interval_from_five_runs():
    s = spread([0.1, 0.9, 0.3, None])
    assert (s.n, s.median, s.min, s.max) == (3, pytest.approx(0.3), 0.1, 0.9)
    assert s.mean == pytest.approx(13 / 30) and s.sd == pytest.approx(np.std([0.1, 0.9, 0.3], ddof=1))
    assert math.isnan(s.ci_low) and s.interval == (0.1, 0.9)  # n < 5: the range
    values = [0.02, 0.03, 0.9, 0.01, 0.05, 0.04]
    s = spread(values)
    assert s.n == 6 >= BOOTSTRAP_MIN_N
    assert s.min <= s.ci_low < s.mean < s.ci_high <= s.max and s.interval == (s.ci_low, s.ci_high)
    assert bootstrap_mean_interval(values) == bootstrap_mean_interval(values)  # seeded: the same every time
    assert bootstrap_mean_interval(values, seed=1) != bootstrap_mean_interval(values)
    # a wider interval for a wider level, and a narrower one for more evidence of the same spread
    lo90, hi90 = bootstrap_mean_interval(values, level=0.9)
    assert s.ci_low <= lo90 and hi90 <= s.ci_high
    lo, hi = bootstrap_mean_interval(values * 4)
    assert hi - lo < s.ci_high - s.ci_low


def test_successes_count_runs_that_remove_the_backdoor_at_a_small_cost():
    asr = [0.01, 0.05, 0.04, 0.2, float("nan")]
    drop = [0.02, 0.03, 0.031, 0.0, 0.0]
    assert success_counts(asr, drop) == (2, 4)  # 0.04 costs too much BA, 0.2 keeps the backdoor, nan is not judged


def test_a_bimodal_group_is_flagged_split_and_a_uniformly_poor_one_is_not():
    assert split_counts([0.0, 0.91, 1.0]) == (1, 2, 3)
    g = group_runs(_table({"awm": [(0.87, 0.0), (0.86, 0.91), (0.86, 1.0)],
                           "anp": [(0.8, 0.2), (0.8, 0.15), (0.8, 0.9)]})).set_index("defense")
    assert bool(g.loc["awm", "split"]) and not bool(g.loc["anp", "split"])
    assert (g.loc["awm", "successes"], g.loc["awm", "n_judged"]) == (1, 3)
    assert g.loc["awm", "asr_median"] == pytest.approx(0.91)
    assert (g.loc["awm", "asr_min"], g.loc["awm", "asr_max"]) == (0.0, 1.0)
    text = format_groups(group_runs(_table({"awm": [(0.87, 0.0), (0.86, 0.91), (0.86, 1.0)]})))
    assert "split: 1 of 3 removed" in text and "1/3" in text
    assert all(f"{col}: " in text for col in GROUP_DISPLAY)  # every column is defined under the table


def test_near_front_marks_rows_whose_interval_reaches_the_front_of_the_means():
    table = _table({
        "best": [(0.88, 0.02), (0.88, 0.03), (0.88, 0.04)],  # the front (means 0.88 / 0.03)
        "noisy": [(0.86, 0.01), (0.85, 0.20), (0.84, 0.30)],  # mean dominated, but its best corner (0.86, 0.01) is not
        "worse": [(0.80, 0.40), (0.81, 0.35), (0.80, 0.45)],  # dominated even at its best
        "single": [(0.87, 0.05)],  # one run: its range is a point, dominated by the front
    })
    g = group_runs(table).set_index("defense")
    assert g["pareto"].to_dict() == {"best": True, "noisy": False, "single": False, "worse": False}
    assert g["near_front"].to_dict() == {"best": False, "noisy": True, "single": False, "worse": False}
    # the same rule on a hand-made groups table; a group that gave up at every run is on neither
    front, near = front_marks(g.reset_index().assign(n=g["n_seeds"].to_numpy()),
                              eligible=[False, True, True, True])
    assert not front[0] and not near[0]
    # n >= 5: the bootstrap interval, narrower than the range, decides
    many = _table({"best": [(0.88, 0.03)] * 6,
                   "noisy": [(0.86, 0.01), (0.85, 0.2), (0.84, 0.3), (0.85, 0.25), (0.85, 0.22), (0.85, 0.28)]})
    g = group_runs(many).set_index("defense")
    assert g.loc["noisy", "asr_ci_low"] > 0.03 and not g.loc["noisy", "near_front"]  # the range alone would reach


def test_compare_shows_the_statistics_in_json_text_and_the_report(tmp_path, capsys):
    """``backdoor-lens compare --json`` carries every group statistic with its definition; the text and the HTML
    report's groups table show median [range], k/n and the split flag."""
    from backdoor_lens.cli import main
    from runs.report import _groups_html

    store = RunStore(tmp_path / "runs")
    model = suspects.load("demo:badnets")
    for seed, (ba, asr) in enumerate([(0.88, 0.01), (0.87, 0.95), (0.86, 0.03)]):
        rid = store.create("finetune", "demo:badnets", "quick", {}, 300, seed)
        store.finish(rid, {"defense": "finetune", "preset": "quick", "seed": seed, "pool_size": 300,
                           "ba_before": 0.9, "asr_before": 1.0, "ra_before": 0.0, "ba": ba, "asr": asr, "ra": 1 - asr,
                           "der": 0.5, "seconds": 5.0, "device": "cpu", "finished": "2026-12-01T10:00:00+00:00"}, model)
    assert main(["compare", "demo:badnets", "--runs", str(store.root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (g,) = data["groups"]
    assert g["n_seeds"] == 3 and g["split"] is True and (g["successes"], g["n_judged"]) == (1, 3)  # 0.03 costs 0.04 BA
    assert g["asr_median"] == pytest.approx(0.03) and g["asr_max"] == pytest.approx(0.95)
    assert g["asr_ci_low"] is None  # n < 5: no bootstrap interval
    assert {"asr_median", "asr_ci_low", "successes", "split", "near_front"} <= set(data["group_definitions"])
    assert main(["compare", "demo:badnets", "--runs", str(store.root)]) == 0
    text = capsys.readouterr().out
    assert "split: 2 of 3 removed" in text and "0.030 [0.010, 0.950]" in text and "1/3" in text
    html = _groups_html(pd.DataFrame(data["runs"]))
    assert "split: 2 of 3 removed" in html and f'title="{escape(GROUP_DISPLAY["k/n"])}"' in html
    assert json.loads(table_json(pd.DataFrame(data["runs"]), "x"))["groups"][0]["split"] is True
    assert list(groups_display(group_runs(pd.DataFrame(data["runs"]))).columns)[4:] == list(GROUP_DISPLAY)[1:]
