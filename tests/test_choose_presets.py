"""scripts/choose_presets.py (issues 28, 31): every candidate validates; ``choose`` applies the rule (most successes,
the tie-break, the 120 s cap, complete settings only) and refuses trials of test suspects; ``run`` skips logged
trials, stops at its deadline and refuses test suspects. No defense runs here: the trial runner is faked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cp():
    from scripts import choose_presets

    return choose_presets


@pytest.fixture(autouse=True)
def base_presets(cp, monkeypatch):
    """Each defense's quick preset as the candidates' base (the expectations below are written against it; a preset
    chosen since would shift today's overrides)."""
    from defenses import get_defense

    for name, base in cp.BASE.items():
        monkeypatch.setitem(get_defense(name).presets, "quick", dict(base))


def _row(cp, defense, overrides, suspect, asr, drop, seconds, seed=1000, fp=None, role="dev", params=None, **extra):
    """A logged trial of the candidate ``overrides`` (on the candidates' base), or of ``params`` when given."""
    return {"defense": defense, "suspect": suspect, "fingerprint": fp or f"fp-{suspect}", "role": role,
            "data": {"name": "fashion-mnist-dev"}, "preset": "quick", "overrides": overrides,
            "params": params or cp.candidate_params(defense, overrides), "seed": seed, "dev_ba_before": 0.90, "dev_ba": 0.90 - drop,
            "dev_asr_before": None if asr is None else 0.99, "dev_asr": asr, "seconds": seconds,
            "note": "synthetic", **extra}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_post_training_defense_has_valid_candidates(cp):
    from backdoor_lens.cli import parse_sets
    from defenses import get_defense
    from defenses.base import ParamError

    # registry order, then ABL: the one training-time defense tuned here (DBD and CBD are not)
    assert list(cp.CANDIDATES) == cp.tunable_defenses() == cp.post_training_defenses() + ["abl"]
    assert len(cp.CANDIDATES) == 16 and set(cp.BASE) == set(cp.CANDIDATES)
    for name, cands in cp.CANDIDATES.items():
        assert 2 <= len(cands) <= 4 and cands[0] == {}, name
        keys = {cp.params_key(cp.candidate_params(name, ov)) for ov in cands}  # params_from raises on a bad value
        assert len(keys) == len(cands), f"{name}: two candidates are the same setting"
        for ov in cands[1:]:
            assert cp.candidate_params(name, ov) != cp.candidate_params(name, {}), (name, ov)
        for ov in cands:  # run_trial passes them to tune_on_dev as --set NAME=JSON: they come back the same
            assert parse_sets([f"{k}={json.dumps(v)}" for k, v in ov.items()]) == ov, (name, ov)
    with pytest.raises(ParamError):  # what the check above relies on
        get_defense("clp").make_params("quick", {"u": -1})


def test_choose_applies_the_rule_and_refuses_test_suspects(cp, tmp_path):
    from suspects.zoo import test_fingerprints

    b, bl, clean = "zoo:badnets-dev-s10", "zoo:blended-dev-s10", "zoo:clean-dev-s10"
    test_fp = next(iter(test_fingerprints()))
    rows = [
        # finetune: candidates 0 and 1 both 2/2; 1 has the lower mean (ASR + drop); 2 is better still but too slow;
        # 3 was tried on one suspect only
        _row(cp, "finetune", {}, b, 0.04, 0.02, 20), _row(cp, "finetune", {}, bl, 0.03, 0.03, 22),
        _row(cp, "finetune", {"lr": 0.03}, b, 0.02, 0.01, 20), _row(cp, "finetune", {"lr": 0.03}, bl, 0.01, 0.02, 21),
        _row(cp, "finetune", {"steps": 160}, b, 0.0, 0.0, 125), _row(cp, "finetune", {"steps": 160}, bl, 0.0, 0.0, 130),
        _row(cp, "finetune", {"steps": 160, "lr": 0.03}, b, 0.0, 0.0, 30),
        # fst: candidate 1 has more successes (2 of 3, the clean suspect's missing ASR counts as 0) though its mean
        # ASR + drop is worse than today's (1 of 3)
        _row(cp, "fst", {}, b, 0.01, 0.01, 15), _row(cp, "fst", {}, bl, 0.06, 0.0, 15),
        _row(cp, "fst", {}, clean, None, 0.04, 15),
        _row(cp, "fst", {"alpha": 0.1}, b, 0.05, 0.03, 15), _row(cp, "fst", {"alpha": 0.1}, bl, 0.9, 0.0, 15),
        _row(cp, "fst", {"alpha": 0.1}, clean, None, 0.01, 15),
        # sau: every setting over the cap, nothing chosen
        _row(cp, "sau", {}, b, 0.0, 0.0, 121),
        # planted: trials of test suspects, one disguised as role dev with a test suspect's fingerprint
        _row(cp, "clp", {}, "zoo:badnets-dev-s11", 0.0, 0.0, 5, fp=test_fp),
        _row(cp, "clp", {}, "zoo:badnets-s1", 0.0, 0.0, 5),
        _row(cp, "clp", {}, "demo:badnets", 0.0, 0.0, 5),
        _row(cp, "clp", {"u": 2.0}, b, 0.0, 0.0, 5, role="test"),
        _row(cp, "clp", {"u": 2.5}, "/tmp/x", 0.0, 0.0, 5, data={"name": "demo"}),
        # not a development trial: no role (earlier rounds' lines)
        {k: v for k, v in _row(cp, "nad", {}, b, 0.0, 0.0, 5).items() if k != "role"},
    ]
    log = _write(tmp_path / "trials.jsonl", rows)
    result = cp.choose(log)
    assert result["used"] == 14 and result["not_development"] == 1 and len(result["refused"]) == 5
    assert any("test suspect" in r["why"] and test_fp in r["why"] for r in result["refused"])

    ft = result["defenses"]["finetune"]
    verdicts = {s.candidate: s.verdict for s in ft["settings"]}
    assert verdicts == {0: "eligible", 1: "chosen", 2: "over 120 s", 3: "incomplete: 1 of the 2 trials"}
    assert ft["overrides"] == {"lr": 0.03} and ft["differs"]

    fst = result["defenses"]["fst"]
    assert fst["chosen"].candidate == 1 and fst["overrides"] == {"alpha": 0.1}
    assert [s.stats()["k"] for s in fst["settings"][:2]] == [1, 2]
    assert result["defenses"]["sau"]["chosen"] is None
    assert result["defenses"]["clp"]["chosen"] is None  # its only trials were refused
    assert all(s.trials == {} for s in result["defenses"]["clp"]["settings"])
    assert result["defenses"]["nad"]["chosen"] is None
    assert cp.choose(log, cap=200)["defenses"]["finetune"]["chosen"].candidate == 2  # the cap alone excluded it

    # the same choice with today's preset winning: drop candidate 1's better trials
    keep = [r for r in rows if not (r["defense"] == "finetune" and r["overrides"] != {}
                                    and r["overrides"] != {"steps": 160})]
    again = cp.choose(_write(tmp_path / "t2.jsonl", keep))["defenses"]["finetune"]
    assert again["chosen"].candidate == 0 and not again["differs"] and again["overrides"] == {}

    out = tmp_path / "preset-choice.md"
    assert cp.main(["choose", "--log", str(log), "--out", str(out)]) == 0
    doc = out.read_text()
    assert "**Rule.**" in doc and "5 refused" in doc and "`zoo:badnets-s1` x1" in doc
    section = doc.split("(`finetune`)")[1].split("\n## ")[0]
    assert "| candidate 1 | `{\"lr\": 0.03}` | 1/1, 0.020 / 0.010, 20 s | 1/1, 0.010 / 0.020, 21 s | 2/2" in section
    assert "**chosen**" in section and "over 120 s" in section  # candidate 3 ran on one suspect: not decided yet
    assert "Not decided yet" in section and 'prefers `{"lr": 0.03}`' in section and not ft["decided"]
    assert "No setting qualifies" in doc.split("(`sau`)")[1].split("\n## ")[0]
    assert "No development trial yet" in doc.split("(`clp`)")[1].split("\n## ")[0]


def _fake_runner(cp, monkeypatch, seconds=10.0, step=60.0):
    """A run_trial that logs a trial without running anything, each taking ``step`` seconds of a fake clock."""
    now = [0.0]
    calls = []
    monkeypatch.setattr(cp, "clock", lambda: now[0])
    monkeypatch.setattr(cp, "select_suspects", lambda attacks, n: [
        (a, f"zoo:{a}-dev-s10", f"fp-{a}") for a in attacks][: len(attacks) * n])

    def fake(defense, ref, overrides, seed, images, log, note):
        assert note.startswith("choose_presets.py candidate ")
        secs = seconds(overrides) if callable(seconds) else seconds
        row = _row(cp, defense, overrides, ref, 0.0, 0.0, secs, seed=seed, fp=f"fp-{ref[4:].split('-')[0]}",
                   params=cp.params_of(defense, overrides))  # what tune_on_dev runs: today's quick + overrides
        with Path(log).open("a") as fh:
            fh.write(json.dumps({**row, "note": note}) + "\n")
        calls.append((defense, json.dumps(overrides), ref, seed))
        now[0] += step

    monkeypatch.setattr(cp, "run_trial", fake)
    return calls


def test_run_skips_logged_trials_and_stops_at_the_deadline(cp, tmp_path, monkeypatch):
    calls = _fake_runner(cp, monkeypatch)
    log = _write(tmp_path / "trials.jsonl", [_row(cp, "finetune", {}, "zoo:badnets-dev-s10", 0.1, 0.0, 9,
                                                  fp="fp-badnets")])
    # 4 candidates x 2 suspects; one already logged; the deadline (2.5 fake minutes) lets 3 trials start
    counts = cp.run(["finetune"], ["badnets", "blended"], minutes=2.5, log=log)
    assert counts == {"ran": 3, "logged": 1, "slow": 0, "failed": 0, "left": 4, "stopped": True}
    assert calls[0] == ("finetune", '{"lr": 0.03}', "zoo:badnets-dev-s10", 1000)
    counts = cp.run(["finetune"], ["badnets", "blended"], log=log)  # resumes
    assert counts == {"ran": 4, "logged": 4, "slow": 0, "failed": 0, "left": 0, "stopped": False}
    assert len({c for c in calls}) == 7 == len(calls)
    assert cp.run(["finetune"], ["badnets", "blended"], log=log)["ran"] == 0
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert sum(r["note"].startswith("choose_presets.py candidate 1 of finetune") for r in rows) == 2


def test_run_stops_trying_a_slow_setting(cp, tmp_path, monkeypatch):
    calls = _fake_runner(cp, monkeypatch, seconds=lambda ov: 300.0 if ov else 10.0)
    counts = cp.run(["fst"], ["badnets", "blended"], log=tmp_path / "t.jsonl")
    assert counts["ran"] == 5 and counts["slow"] == 3  # each slow candidate ran on the first suspect only
    assert sum(c[2] == "zoo:blended-dev-s10" for c in calls) == 1


def test_run_refuses_a_test_suspect_before_anything_runs(cp, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cp, "dev_suspects", lambda attack: ["zoo:badnets-s1"])  # a test suspect slipped in

    def never(*a, **k):
        raise AssertionError("a trial ran")

    real_trial = cp.run_trial
    monkeypatch.setattr(cp, "run_trial", never)
    log = tmp_path / "t.jsonl"
    assert cp.main(["run", "--defenses", "finetune", "--attacks", "badnets", "--log", str(log)]) == 2
    assert "refused" in capsys.readouterr().err and not log.exists()
    # tune_on_dev itself, as run_trial calls it, refuses too and logs nothing
    with pytest.raises(RuntimeError, match="exited with 2"):
        real_trial("finetune", "zoo:badnets-s1", {"lr": 0.03}, 1000, 100, log, "test")
    assert "role test" in capsys.readouterr().err and not log.exists()
    assert cp.main(["run", "--defenses", "nosuch", "--log", str(log)]) == 2
    assert "no candidates for nosuch" in capsys.readouterr().err


def test_default_attacks_are_those_with_a_built_development_suspect(cp, monkeypatch, capsys):
    from suspects.zoo import default_zoo

    backdoored = [a for a in default_zoo().manifest["attacks"] if a != "clean"]
    monkeypatch.setattr(cp, "dev_suspects", lambda attack: [f"zoo:{attack}-dev-s10"] if attack == "sig" else [])
    assert cp.default_attacks() == ["sig"]
    err = capsys.readouterr().err
    assert "left out" in err and all(a in err for a in backdoored if a != "sig")
    monkeypatch.setattr(cp, "dev_suspects", lambda attack: [f"zoo:{attack}-dev-s10"])
    assert cp.default_attacks() == backdoored and not capsys.readouterr().err


def test_a_chosen_candidate_applied_as_quick_stays_the_same_setting(cp, tmp_path, monkeypatch):
    """Candidates are settings on a frozen base: once the chosen one becomes the quick preset, the logged trials
    still belong to the same candidates, the choice reads "today's quick" and the defense counts as chosen on
    development suspects; ``run`` then passes each candidate to tune_on_dev as overrides on the new quick."""
    from defenses import get_defense

    b, bl = "zoo:badnets-dev-s10", "zoo:blended-dev-s10"
    outcome = {0: (0.2, 0.02), 1: (0.1, 0.03), 2: (0.01, 0.01), 3: (0.02, 0.05)}  # candidate 2 wins on both
    rows = [_row(cp, "finetune", ov, ref, *outcome[i], 20, fp=f"fp-{ref[4:].split('-')[0]}")
            for i, ov in enumerate(cp.CANDIDATES["finetune"]) for ref in (b, bl)]
    log = _write(tmp_path / "trials.jsonl", rows)
    base = cp.BASE["finetune"]
    monkeypatch.setitem(get_defense("finetune").presets, "quick", dict(base))  # as when the candidates were written
    before = cp.choose(log)["defenses"]["finetune"]
    assert before["decided"] and before["chosen"].candidate == 2 and before["differs"] and not before["dev_chosen"]
    assert "finetune" not in cp.dev_chosen(log)
    assert "different from today's quick preset" in cp.render(cp.choose(log)).split("(`finetune`)")[1]

    monkeypatch.setitem(get_defense("finetune").presets, "quick", {**base, **cp.CANDIDATES["finetune"][2]})
    after = cp.choose(log)["defenses"]["finetune"]
    assert after["chosen"].candidate == 2 and after["overrides"] == {} and after["dev_chosen"]
    assert {s.candidate: s.overrides for s in after["settings"]}[0] == {"steps": base["steps"]}
    assert "finetune" in cp.dev_chosen(log)
    doc = cp.render(cp.choose(log))
    assert "Chosen: today's quick preset (no change)." in doc.split("(`finetune`)")[1].split("\n## ")[0]

    calls = _fake_runner(cp, monkeypatch)
    counts = cp.run(["finetune"], ["badnets", "blended", "sig"], log=log)
    assert counts["ran"] == 4 and counts["logged"] == 8  # only the new suspect's trials ran
    sent = [json.loads(c[1]) for c in calls]
    assert sent[0] == {"steps": base["steps"]} and sent[2] == {}  # candidate 0 and candidate 2 (today's quick)


def test_an_incomplete_or_unfinished_choice_is_not_counted_as_chosen(cp, tmp_path):
    b = "zoo:badnets-dev-s10"
    rows = [_row(cp, "fst", ov, b, 0.0, 0.0, 10) for ov in cp.CANDIDATES["fst"][:2]]  # two of four candidates
    result = cp.choose(_write(tmp_path / "t.jsonl", rows))["defenses"]["fst"]
    assert result["chosen"].candidate == 0 and not result["decided"] and not result["dev_chosen"]
    assert "Not decided yet" in cp.render(cp.choose(tmp_path / "t.jsonl"))
    # the other two are too slow to win: skipped after their first trial, decided all the same
    rows += [_row(cp, "fst", ov, b, 0.0, 0.0, 300) for ov in cp.CANDIDATES["fst"][2:]]
    rows += [_row(cp, "fst", ov, "zoo:sig-dev-s10", 0.0, 0.0, 10) for ov in cp.CANDIDATES["fst"][:2]]
    result = cp.choose(_write(tmp_path / "t.jsonl", rows))["defenses"]["fst"]
    assert result["decided"] and result["dev_chosen"] and result["chosen"].candidate == 0


def test_a_current_candidate_wins_a_tie_with_a_retired_setting(cp, tmp_path):
    """A logged setting that is no longer a candidate (a block once named, now 'last') with the same results and
    fewer seconds does not take the choice from the candidate."""
    b = "zoo:badnets-dev-s10"
    rows = [_row(cp, "shortcut", ov, b, 0.3, 0.01, 6) for ov in cp.CANDIDATES["shortcut"]]
    rows.append(_row(cp, "shortcut", {"block": "layer4.1", "lr": 0.05}, b, 0.3, 0.01, 5))
    rows[0] = _row(cp, "shortcut", {}, b, 0.9, 0.0, 6)
    result = cp.choose(_write(tmp_path / "t.jsonl", rows))["defenses"]["shortcut"]
    assert result["chosen"].candidate == 1 and result["overrides"] == {"block": "last"}


def test_abl_is_tuned_under_its_own_ten_minute_cap(cp, tmp_path):
    """Issue 31: ABL's quick preset may take 10 minutes on the demo; a post-training setting as slow is over its cap."""
    b, g = "zoo:badnets-dev-s10", "zoo:blended-dev-s10"
    abl = cp.CANDIDATES["abl"]
    rows = [_row(cp, "abl", ov, ref, 0.9, 0.0, 500) for ov in abl for ref in (b, g)]
    rows[2] = _row(cp, "abl", abl[1], b, 0.01, 0.02, 450)  # half the unlearning passes: removes it on BadNets
    rows += [_row(cp, "abl", abl[2], ref, 0.0, 0.0, 700) for ref in (b, g)]  # removes both, but over 600 s
    rows += [_row(cp, "fst", ov, b, 0.0, 0.0, 500) for ov in cp.CANDIDATES["fst"]]
    result = cp.choose(_write(tmp_path / "t.jsonl", rows))["defenses"]
    assert result["abl"]["decided"] and result["abl"]["chosen"].candidate == 1
    assert result["abl"]["overrides"] == {"unlearning_epochs": 10} and not result["abl"]["dev_chosen"]
    assert [s.verdict for s in result["abl"]["settings"]] == ["eligible", "chosen", "over 600 s"]
    assert result["fst"]["chosen"] is None and {s.verdict for s in result["fst"]["settings"]} == {"over 120 s"}
    text = cp.render(cp.choose(tmp_path / "t.jsonl"))
    assert "## Anti-Backdoor Learning" in text or "(`abl`)" in text
    assert "ABL 600" in cp.RULE
    assert text == cp.render(cp.choose(tmp_path / "t.jsonl"))  # the same log renders the same page
