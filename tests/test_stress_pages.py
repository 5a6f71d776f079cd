"""AppTest checks of the stress-test panel (Compare page) and the Screen inputs page on the demo suspects."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from runs.store import RunStore
from runs.stress import latest_stress_job, run_stress
from tests.test_stress import SMALL, _fake_run

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
pytestmark = pytest.mark.usefixtures("one_thread")


def _page(page: str, suspect: str = "demo:badnets") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params["suspect"] = suspect
    at.session_state["sample_size"] = 50
    at.run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def test_compare_shows_the_stored_stress_result_and_queues_one(runs_dir, monkeypatch):
    import runs.jobs

    monkeypatch.setattr(runs.jobs, "ensure_worker", lambda store, device=None: None)  # no worker process here
    store = RunStore(runs_dir)
    tested, fresh = _fake_run(store), _fake_run(store)
    run_stress(tested, store, {**SMALL, "epochs": 1})
    at = _page("views/compare.py")
    table = at.dataframe[0].value
    assert "asr_after_retune" in table.columns
    assert table.set_index("run_id").loc[tested, "asr_after_retune"] > 0.5
    assert table["asr_after_retune"].isna().sum() == 1
    at.selectbox(key="cmp_stress_run").set_value(tested).run()
    assert any("not repaired" in e.value for e in at.error), [e.value for e in at.error]
    at.selectbox(key="cmp_stress_run").set_value(fresh).run()
    at.button(key=f"stress_cmp_{fresh}").click().run()
    assert not at.exception, at.exception
    assert latest_stress_job(store, fresh).status == "queued"
    # the Defenses page shows the newest finetune run's stress panel under its result (queued, so no button)
    at = _page("views/defenses.py")
    assert any("queued" in i.value for i in at.info), [i.value for i in at.info]
    assert not any(b.key == f"stress_def_{fresh}" and not b.disabled for b in at.button)


def test_screen_inputs_page():
    at = _page("views/screening.py")
    assert at.title[0].value == "Screen inputs"
    assert any("STRIP" in i.value for i in at.info)  # the method's teaching text
    at.number_input(key="scr_pool").set_value(60)
    at.number_input(key="scr_limit").set_value(100)
    at.button(key="scr_run").click().run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert float(metrics["AUROC"]) > 0.7
    assert len(at.get("plotly_chart")) == 2
