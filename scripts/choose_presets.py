"""Choose every post-training defense's ``quick`` preset on the zoo's development suspects (issues 28 and 31).

    python scripts/choose_presets.py run [--defenses a,b] [--attacks badnets,...] [--suspects-per-attack 1]
                                         [--seeds 1] [--images 1000] [--minutes M] [--log docs/dev-trials.jsonl]
    python scripts/choose_presets.py choose [--log docs/dev-trials.jsonl] [--out docs/preset-choice.md] [--json]

``run`` tries, for every post-training defense (registry order), then ABL (training-time, its own cap of ten
minutes: :data:`TRAINING_TIME_CAPS`), and each of its :data:`CANDIDATES` (override dicts
on today's ``quick`` preset; ``{}`` is today's preset), one trial of ``scripts/tune_on_dev.py`` per development
suspect (the first N built ones of each zoo attack) and defense seed (1000, 1001, ...). tune_on_dev refuses test
suspects and appends each trial to ``docs/dev-trials.jsonl``, with a note naming this script and the candidate. A
trial already in the log (same defense, parameters, suspect, fingerprint and seed) is skipped, so the command
resumes where it stopped; ``--minutes`` starts no trial after that many minutes; a setting whose logged trials
already average over ``--skip-over`` seconds (default 180) is not tried further (it cannot meet the cap).

``choose`` computes nothing. It reads the log, refuses every trial of a test suspect (role ``test``, a zoo test
suspect or demo bundle suspect by name, measured on the bundle's data, or a fingerprint of
:func:`suspects.zoo.test_fingerprints`) and every line that is not a development trial, groups the rest by
(defense, parameters) and applies :data:`RULE`; it writes ``docs/preset-choice.md`` and prints, per defense, the
overrides to apply to its ``quick`` preset.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

DEFAULT_LOG = ROOT / "docs" / "dev-trials.jsonl"
DEFAULT_OUT = ROOT / "docs" / "preset-choice.md"
NOTE = "choose_presets.py"  # every trial `run` logs has a note starting with this
CAP_SECONDS = 120.0  # issue 31: a post-training quick preset takes <= 120 s on the demo on 2 CPU cores
# a success: development ASR <= 0.05 at a development BA drop <= 0.03, the benchmark's k/n rule (runs.stats)
from runs.stats import SUCCESS_MAX_ASR as ASR_OK  # noqa: E402
from runs.stats import SUCCESS_MAX_BA_DROP as DROP_OK  # noqa: E402
from runs.stats import success_counts  # noqa: E402

SKIP_OVER = 180.0
# Training-time defenses this script also tunes, with their own cap (issue 31: ABL <= 10 minutes on the demo, 2 CPU
# cores); DBD and CBD are not tuned here (their quick presets already take about 9 minutes a run).
TRAINING_TIME_CAPS: dict[str, float] = {"abl": 600.0}

RULE = (f"Among the settings of a defense that were tried on every development trial of its candidates (suspect x "
        f"defense seed) and whose mean seconds are <= {CAP_SECONDS:.0f} (a training-time defense: its own cap, "
        f"ABL {TRAINING_TIME_CAPS['abl']:.0f}), pick the one with the most successes (a "
        f"trial succeeds when its development ASR is <= {ASR_OK} at a development BA drop <= {DROP_OK}); ties go to "
        f"the lowest mean (ASR + BA drop), then a current candidate over another logged setting, then the fewest mean "
        f"seconds, then the earlier candidate. On a suspect "
        f"without a trigger (clean) the ASR counts as 0. No setting qualifies: today's quick preset stays.")

# The quick preset of each defense as it was when its candidates were written (2026-12-06): a candidate is this base
# plus its overrides, so a setting (and the trials logged for it) stays the same setting after a chosen candidate
# becomes the defense's quick preset. ``run`` passes each candidate to tune_on_dev as overrides on *today's* quick.
BASE: dict[str, dict[str, Any]] = {
    "shortcut": {"steps": 70, "batch_size": 64, "lr": 0.02, "schedule": "cosine", "augment": "crop"},
    "linf_prune": {"max_ratio": 0.5, "target_asr": 0.05, "ba_tolerance": 0.15, "activation": "abs"},
    "awm": {"outer": 20, "steps": 9, "batch_size": 64},
    "anp": {"iterations": 300, "batch_size": 64},
    "fineprune": {"steps": 140, "lr": 0.05, "batch_size": 64},
    "finetune": {"steps": 80, "lr": 0.05, "batch_size": 64},
    "ftsam": {"steps": 60, "lr": 0.05, "batch_size": 64, "t_max": 0, "augment": "crop"},
    "nad": {"teacher_steps": 60, "steps": 60, "teacher_lr": 0.05, "lr": 0.01, "lr_drop_step": 30, "lr_after": 0.01,
            "augment": "crop"},
    "clp": {},
    "rnp": {"recover_epochs": 10, "augment": "crop"},
    "sau": {"n_rounds": 10, "lr": 0.0005, "lmd_1": 3.0, "batch_size": 128, "adv_steps": 3},
    "fst": {"steps": 70, "lr": 0.02, "batch_size": 64, "augment": "crop"},
    "ibau": {"n_rounds": 5, "K": 3, "batch_size": 64, "lr": 0.0003, "eta": 0.01, "radius": 3.0, "portion": 0.2},
    "npd": {"warmup_steps": 10, "steps": 150, "batch_size": 64},
    "btidbf": {"gen_filters": 16, "gen_blocks": 2, "residual": True, "preround": 5, "nround": 2, "mround": 3,
               "mask_lr": 0.05, "uround": 6, "ul_round": 5, "batch_size": 32, "gen_lr": 0.01, "augment": "crop"},
    "abl": {"isolation_epochs": 5, "finetune_epochs": 13, "unlearning_epochs": 20},
}

# Candidate overrides on BASE, per post-training defense (``{}`` is the base, the quick preset of 2026-12-06). Each varies the
# one or two knobs that trade BA for ASR or cost, read from the defense's docstring, Params and docs/fidelity.md
# (official values: ../shared/reference/defenses.md, methods-2.md); seconds are today's quick on the demo, 2 cores.
CANDIDATES: dict[str, list[dict[str, Any]]] = {
    # 47 s; the automatic block choice fails on the demo (it picks layer1.1); the last block (layer4.1 on the demo)
    # was tried once (BadNets ASR 0.25). 'last' rather than a block's name: a preset must run on any residual model
    "shortcut": [{}, {"block": "last"}, {"block": "last", "lr": 0.05}],
    # 22-25 s; today's held-out BA tolerance (0.15) lets it cost 6-9 BA points; relu is the paper's statistic
    "linf_prune": [{}, {"ba_tolerance": 0.03}, {"activation": "relu"}],
    # ~82 s at T = 9 x 64 over 20 outer epochs: the same budget in longer phases, or a little more of it
    "awm": [{}, {"outer": 15, "steps": 12}, {"steps": 11}],
    # 81-84 s; threshold 0.2 dates from round 1 (test split) and prunes 8-26 BA points; the held-out rule at a
    # tolerance above 0.03 (which picked threshold 0)
    "anp": [{}, {"threshold": 0.1}, {"auto_threshold": True, "ba_tolerance": 0.05}],
    # 45-49 s for 140 steps; stop pruning earlier, a gentler fine-tune, or twice the steps (~90 s)
    "fineprune": [{}, {"acc_ratio": 0.05}, {"lr": 0.02}, {"steps": 280}],
    # 18 s; lr 0.05 costs 5 BA points, lr 0.02 left BadNets; more steps at a lower lr
    "finetune": [{}, {"lr": 0.03}, {"steps": 160}, {"steps": 160, "lr": 0.03}],
    # ~30 s CPU (two passes a step); lr 0.05 buys removal with ~10 BA points, 0.02 left ASR 0.82
    "ftsam": [{}, {"lr": 0.03}, {"steps": 100, "lr": 0.03}],
    # ~34 s CPU; a teacher fine-tuned too little keeps the backdoor; a longer teacher, or a longer student
    "nad": [{}, {"teacher_steps": 100, "lr_drop_step": 50}, {"steps": 120}],
    # seconds; u = 3 prunes 2 channels on the demo; lower u prunes more (CLP issue #4: very threshold-sensitive)
    "clp": [{}, {"u": 2.5}, {"u": 2.0}, {"u": 2.5, "pairing": "registration"}],
    # ~38 s CPU; at the official unlearn lr 0.01 the unlearning overshoots on the demo and nothing is pruned;
    # 0.002 recovered 0.69 in a pool-only diagnostic
    "rnp": [{}, {"unlearn_lr": 0.002}, {"unlearn_lr": 0.005}, {"unlearn_lr": 0.002, "recover_epochs": 20}],
    # 107-115 s for 10 rounds, near the cap: 8 rounds (88-105 s), with or without batch 64
    "sau": [{}, {"n_rounds": 8}, {"n_rounds": 8, "batch_size": 64}],
    # 13-16 s; the README's alpha 0.1, twice the steps, and the official lr 0.01 with them
    "fst": [{}, {"alpha": 0.1}, {"steps": 140}, {"steps": 140, "lr": 0.01}],
    # 75-78 s for 5 rounds; costs 3-5 BA points: a lower outer lr, then 7 rounds of it (~105 s)
    "ibau": [{}, {"lr": 0.0002}, {"n_rounds": 7, "lr": 0.0002}],
    # ~89 s CPU; the backdoor stayed at the scaled radius 1.52: the official 3.0, or a faster polarizer
    "npd": [{}, {"radius": 3.0}, {"lr": 0.02}],
    # ~101 s CPU; the target vote went wrong once: a slower generator, or a longer pre-training for fewer
    # inversion epochs (about the same work)
    "btidbf": [{}, {"gen_lr": 0.005}, {"preround": 8, "uround": 4}],
    # training-time, cap 600 s; a reduced run on the demo (5 + 4 + 20) isolated only poisoned samples, but its 20
    # unlearning passes at lr 5e-4 cost 28 BA points: half the passes, or a lower unlearning rate
    "abl": [{}, {"unlearning_epochs": 10}, {"unlearning_lr": 0.0002}],
}


class Refused(ValueError):
    """A suspect, defense or attack this script may not use."""


# --- parameters, keys, the log ----------------------------------------------------------------------------------


def post_training_defenses() -> list[str]:
    """Registered defenses that repair a given model (no poisoned training set), in registry order."""
    from defenses import get_defense
    from defenses.registry import list_defenses

    return [d for d in list_defenses() if not get_defense(d).threat.poisoned_training_set]


def tunable_defenses() -> list[str]:
    """The post-training defenses, then the training-time ones of :data:`TRAINING_TIME_CAPS` that are registered."""
    from defenses.registry import list_defenses

    return post_training_defenses() + [d for d in TRAINING_TIME_CAPS if d in list_defenses()]


def cap_of(defense: str, cap: float = CAP_SECONDS) -> float:
    """The most mean seconds a setting of ``defense`` may take: ``cap``, or a training-time defense's own."""
    return TRAINING_TIME_CAPS.get(defense, cap)


def params_of(defense: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full parameters of ``defense``'s quick preset with ``overrides``, as a trial logs them (JSON types)."""
    from defenses import get_defense

    return json.loads(json.dumps(asdict(get_defense(defense).make_params("quick", overrides)), default=str))


def candidate_params(defense: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The full parameters of a candidate: :data:`BASE` (the quick preset its candidates were written against) with
    ``overrides``, as a trial logs them. Independent of today's quick preset."""
    from defenses import get_defense
    from defenses.base import params_from

    base = BASE.get(defense)
    if base is None:
        return params_of(defense, overrides)
    params = params_from(get_defense(defense).Params, {**base, **overrides})
    return json.loads(json.dumps(asdict(params), default=str))


def params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def overrides_against_quick(defense: str, params: dict[str, Any]) -> dict[str, Any]:
    """What differs in ``params`` from today's quick preset (the overrides to apply to it)."""
    quick = params_of(defense)
    return {k: v for k, v in params.items() if quick.get(k) != v}


def read_log(path: Path) -> list[dict[str, Any]]:
    """The log's JSON lines (an unreadable line is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def trial_key(row: dict[str, Any]) -> tuple:
    """(defense, parameters, suspect, fingerprint, seed) of a logged trial: what makes two trials the same."""
    return (row.get("defense"), params_key(row.get("params") or {}), row.get("suspect"), row.get("fingerprint"),
            row.get("seed"))


# --- run ---------------------------------------------------------------------------------------------------------


def _tune():
    """scripts/tune_on_dev.py as a module."""
    from scripts import tune_on_dev

    return tune_on_dev


def dev_suspects(attack: str) -> list[str]:
    """The built development suspects of ``attack`` (:func:`suspects.zoo.dev_suspects`)."""
    from suspects.zoo import dev_suspects as listed

    return listed(attack)


def select_suspects(attacks: list[str], per_attack: int) -> list[tuple[str, str, str]]:
    """(attack, reference, fingerprint) of the first ``per_attack`` built development suspects of each attack, each
    checked by tune_on_dev (:class:`Refused` for a test suspect or a missing one) before anything runs."""
    from suspects.identity import fingerprint

    tune = _tune()
    out = []
    for attack in attacks:
        refs = dev_suspects(attack)[:per_attack]
        if not refs:
            raise Refused(f"no development suspect of {attack} is built; build them with "
                          f"`backdoor-lens zoo build --role dev --attack {attack}`")
        for ref in refs:
            try:
                sus = tune.check_suspect(ref)
            except tune.Refused as err:
                raise Refused(str(err)) from None
            out.append((attack, ref, fingerprint(sus)))
    return out


def run_trial(defense: str, ref: str, overrides: dict[str, Any], seed: int, images: int | None, log: Path,
              note: str) -> None:
    """One trial of scripts/tune_on_dev.py (which refuses test suspects and appends the trial to ``log``)."""
    argv = [defense, ref, "--seed", str(seed), "--log", str(log), "--note", note]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    if images:
        argv += ["--images", str(images)]
    rc = _tune().main(argv)
    if rc != 0:
        raise RuntimeError(f"tune_on_dev.py {' '.join(argv)} exited with {rc}")


clock: Callable[[], float] = time.monotonic


def default_attacks() -> list[str]:
    """The zoo's attacks with a backdoor (every one but clean) that have a built development suspect; the others are
    named on stderr (an attack added to the manifest joins once its development suspects are built)."""
    from suspects.zoo import default_zoo

    backdoored = [a for a in default_zoo().manifest["attacks"] if a != "clean"]
    built = [a for a in backdoored if dev_suspects(a)]
    if len(built) < len(backdoored):
        print("no development suspect built (left out): " + ", ".join(a for a in backdoored if a not in built),
              file=sys.stderr)
    return built


def run(defenses: list[str] | None = None, attacks: list[str] | None = None, per_attack: int = 1, seeds: int = 1,
        images: int | None = 1000, minutes: float | None = None, log: Path = DEFAULT_LOG,
        skip_over: float = SKIP_OVER) -> dict[str, Any]:
    """Every (defense, suspect, candidate, seed) trial not yet logged, until ``minutes`` have passed. Returns the
    counts: ``ran``, ``logged`` (skipped: already in the log), ``slow`` (skipped: the setting averages over
    ``skip_over`` s), ``failed``, ``left`` (not started: out of time) and ``stopped`` (the deadline was hit)."""
    start = clock()
    names = defenses or [d for d in tunable_defenses() if d in CANDIDATES]
    unknown = [d for d in names if d not in CANDIDATES]
    if unknown:
        raise Refused(f"no candidates for {', '.join(unknown)}; known: {', '.join(CANDIDATES)}")
    if per_attack < 1 or seeds < 1:
        raise Refused("--suspects-per-attack and --seeds must be at least 1")
    chosen_attacks = attacks or default_attacks()
    from suspects.zoo import default_zoo

    known = list(default_zoo().manifest["attacks"])
    bad = [a for a in chosen_attacks if a not in known]
    if bad:
        raise Refused(f"unknown attack(s) {', '.join(bad)}; the zoo has {', '.join(known)}")
    suspects = select_suspects(chosen_attacks, per_attack)
    base = _tune().DEV_SEED_BASE
    counts = {"ran": 0, "logged": 0, "slow": 0, "failed": 0, "left": 0, "stopped": False}
    for defense in names:
        cands = [(i, ov, candidate_params(defense, ov)) for i, ov in enumerate(CANDIDATES[defense])]
        for attack, ref, fp in suspects:
            for i, ov, params in cands:
                for seed in range(base, base + seeds):
                    rows = read_log(log)
                    key = (defense, params_key(params), ref, fp, seed)
                    if key in {trial_key(r) for r in rows}:
                        counts["logged"] += 1
                        continue
                    secs = [float(r["seconds"]) for r in rows if r.get("defense") == defense
                            and r.get("role") == "dev" and params_key(r.get("params") or {}) == params_key(params)
                            and isinstance(r.get("seconds"), (int, float))]
                    slow = max(skip_over, 1.5 * cap_of(defense)) if defense in TRAINING_TIME_CAPS else skip_over
                    if secs and statistics.mean(secs) > slow:
                        counts["slow"] += 1
                        print(f"skip {defense} candidate {i} {json.dumps(ov)} on {ref}: its trials average "
                              f"{statistics.mean(secs):.0f} s (> {slow:.0f})", flush=True)
                        continue
                    if minutes is not None and clock() - start >= minutes * 60:
                        counts["left"] += 1
                        counts["stopped"] = True
                        continue
                    note = f"{NOTE} candidate {i} of {defense}: {json.dumps(ov, sort_keys=True)}"
                    print(f"== {defense} candidate {i} {json.dumps(ov)} on {ref} ({attack}), seed {seed}", flush=True)
                    try:  # tune_on_dev applies overrides to today's quick preset
                        run_trial(defense, ref, overrides_against_quick(defense, params), seed, images, log, note)
                        counts["ran"] += 1
                    except (RuntimeError, ValueError) as err:  # e.g. not applicable: say so, go on
                        counts["failed"] += 1
                        print(f"failed: {defense} candidate {i} on {ref}: {err}", file=sys.stderr, flush=True)
    return counts


# --- choose ------------------------------------------------------------------------------------------------------


def refusal(row: dict[str, Any], test_fps: dict[str, str]) -> str | None:
    """Why ``row`` may not be used (a trial of a test suspect), or None."""
    from suspects.identity import bundle_name
    from suspects.zoo import PREFIX, default_zoo

    ref = str(row.get("suspect") or "")
    if row.get("role") == "test":
        return f"{ref}: role test"
    if ref.startswith("demo:") or bundle_name(ref):
        return f"{ref}: a demo bundle suspect (the zoo's test suspect of seed 0)"
    if ref.startswith(PREFIX):
        try:
            entry = default_zoo().entry(ref)
        except ValueError:
            entry = None
        if entry is not None and entry.role == "test":
            return f"{ref}: a test suspect of the zoo"
    fp = row.get("fingerprint")
    if fp and fp in test_fps:
        return f"{ref}: the weights of the test suspect {test_fps[fp]} (fingerprint {fp})"
    data = row.get("data")
    if (data.get("name") if isinstance(data, dict) else data) == "demo":
        return f"{ref}: measured on the demo bundle's data, whose test split is the benchmark's"
    return None


def attack_of(row: dict[str, Any]) -> str:
    """The zoo attack of a trial's suspect (``row['attack']`` or ``?`` outside the zoo)."""
    from suspects.zoo import PREFIX, default_zoo

    ref = str(row.get("suspect") or "")
    if ref.startswith(PREFIX):
        try:
            return default_zoo().entry(ref).attack
        except ValueError:
            pass
    return str(row.get("attack") or "?")


@dataclass
class Setting:
    """One (defense, parameters) group of development trials and what the rule makes of it."""

    params: dict[str, Any]
    overrides: dict[str, Any]  # against today's quick preset
    candidate: int | None  # its index in CANDIDATES[defense], if it is one
    trials: dict[tuple, dict[str, Any]] = field(default_factory=dict)  # (suspect, fingerprint, seed) -> last row
    counted: list[dict[str, Any]] = field(default_factory=list)  # the trials the rule compares
    complete: bool = False
    verdict: str = ""

    def stats(self, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        rows = self.counted if rows is None else rows
        if not rows:
            return {"n": 0, "k": 0, "asr": None, "drop": None, "seconds": None, "score": None}
        asr = [_asr(r) for r in rows]
        drop = [float(r["dev_ba_before"]) - float(r["dev_ba"]) for r in rows]
        return {"n": len(rows), "k": success_counts(asr, drop)[0],
                "asr": statistics.mean(asr), "drop": statistics.mean(drop),
                "seconds": statistics.mean(float(r["seconds"]) for r in rows),
                "score": statistics.mean(a + d for a, d in zip(asr, drop, strict=True))}


def _asr(row: dict[str, Any]) -> float:
    return 0.0 if row.get("dev_asr") is None else float(row["dev_asr"])


_NEEDED = ("defense", "params", "suspect", "seed", "dev_ba_before", "dev_ba", "seconds")


def choose(log: Path = DEFAULT_LOG, cap: float = CAP_SECONDS) -> dict[str, Any]:
    """Apply :data:`RULE` to the development trials of ``log``: per defense, its settings (with their statistics
    and verdicts) and the chosen one; plus the refused and unusable lines."""
    from suspects.zoo import test_fingerprints

    test_fps = test_fingerprints()
    rows = read_log(log)
    refused: list[dict[str, str]] = []
    not_dev = 0
    usable: list[dict[str, Any]] = []
    for row in rows:
        why = refusal(row, test_fps)
        if why is not None:
            refused.append({"suspect": str(row.get("suspect")), "defense": str(row.get("defense")), "why": why})
        elif row.get("role") != "dev" or any(row.get(k) is None for k in _NEEDED):
            not_dev += 1
        else:
            usable.append(row)
    out: dict[str, Any] = {"log": str(log), "lines": len(rows), "used": len(usable), "refused": refused,
                           "not_development": not_dev, "defenses": {},
                           "newest": max((str(r["when"]) for r in rows if r.get("when")), default="none")}
    for defense in tunable_defenses():  # DBD and CBD are not tuned; ABL has its own cap (TRAINING_TIME_CAPS)
        limit = cap_of(defense, cap)
        mine = [r for r in usable if r["defense"] == defense]
        settings: dict[str, Setting] = {}
        for i, ov in enumerate(CANDIDATES.get(defense, [])):
            p = candidate_params(defense, ov)
            settings.setdefault(params_key(p), Setting(p, overrides_against_quick(defense, p), i))
        for r in mine:
            k = params_key(r["params"])
            if k not in settings:
                settings[k] = Setting(r["params"], _safe_overrides(defense, r["params"]), None)
            settings[k].trials[(r["suspect"], r.get("fingerprint"), r["seed"])] = r  # the last one counts
        pool = [s for s in settings.values() if s.candidate is not None and s.trials] or \
            [s for s in settings.values() if s.trials]
        needed = set().union(*(s.trials for s in pool)) if pool else set()
        for s in settings.values():
            s.counted = [s.trials[t] for t in sorted(needed, key=str) if t in s.trials]
            s.complete = bool(needed) and needed <= set(s.trials)
            st = s.stats()
            if not s.trials:
                s.verdict = "not tried"
            elif not s.complete:
                s.verdict = f"incomplete: {st['n']} of the {len(needed)} trials"
            elif st["seconds"] > limit:
                s.verdict = f"over {limit:.0f} s"
            else:
                s.verdict = "eligible"
        eligible = [s for s in settings.values() if s.verdict == "eligible"]

        def rank(s: Setting) -> tuple:
            st = s.stats()
            # a current candidate before another logged setting with the same results (a retired candidate that
            # computes the same, e.g. a block named instead of 'last')
            return (-st["k"], round(st["score"], 9), s.candidate is None, st["seconds"],
                    s.candidate if s.candidate is not None else 10 ** 6)

        best = min(eligible, key=rank) if eligible else None
        if best is not None:
            best.verdict = "chosen"
        # decided: every candidate ran on every trial, or is too slow to win (skipped after its first trials)
        cands = [s for s in settings.values() if s.candidate is not None]
        decided = bool(cands) and all(s.complete or (s.trials and _mean_seconds(s) > limit) for s in cands)
        out["defenses"][defense] = {
            "settings": list(settings.values()), "trials": len(needed), "chosen": best,
            "overrides": best.overrides if best is not None else None,
            "differs": bool(best is not None and best.overrides),
            "decided": decided,
            "dev_chosen": bool(decided and best is not None and not best.overrides),
        }
    return out


def _mean_seconds(s: Setting) -> float:
    return statistics.mean(float(r["seconds"]) for r in s.trials.values())


def dev_chosen(log: Path = DEFAULT_LOG) -> set[str]:
    """The post-training defenses whose quick preset today *is* the setting the rule chose on development suspects,
    with every candidate decided (the benchmark marks the others' quick rows with a dagger)."""
    return {d for d, info in choose(log)["defenses"].items() if info["dev_chosen"]}


def _safe_overrides(defense: str, params: dict[str, Any]) -> dict[str, Any]:
    try:
        return overrides_against_quick(defense, params)
    except (KeyError, ValueError):  # a defense no longer registered
        return dict(params)


def _f(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def render(result: dict[str, Any], cap: float = CAP_SECONDS) -> str:
    """docs/preset-choice.md from :func:`choose`'s result."""
    from defenses import get_defense
    from suspects.zoo import default_zoo

    zoo_attacks = list(default_zoo().manifest["attacks"])
    when = f"newest trial {result['newest']}"  # not the clock: the same log renders the same page
    refused = result["refused"]
    lines = [
        "# Choosing the quick presets on development suspects",
        "",
        f"Generated by `python scripts/choose_presets.py choose` ({when}) from `{Path(result['log']).name}`; do not "
        "edit by hand. How the trials are run: [zoo.md](zoo.md#choosing-the-quick-presets).",
        "",
        f"**Rule.** {RULE}",
        "",
        f"The log has {result['lines']} lines: {result['used']} development trials used; {len(refused)} refused, "
        f"trials whose suspect is (or whose weights, role or data are) a test suspect's: "
        f"{_refused_summary(refused)}; {result['not_development']} other (no role `dev`, or results missing). "
        "Each cell: k/n successes, mean ASR / mean "
        "BA drop, mean seconds, on the development suspects of that attack (their own evaluation split); seconds "
        "are the trial's wall time on the machine it ran on, with its measurement.",
        "",
    ]
    for defense, d in result["defenses"].items():
        try:
            title = get_defense(defense).title
        except (KeyError, ValueError):
            title = defense
        lines += [f"## {title} (`{defense}`)", ""]
        tried = [s for s in d["settings"] if s.trials]
        if not tried:
            lines += ["No development trial yet: today's quick preset stays.", ""]
            continue
        attacks = [a for a in zoo_attacks if any(attack_of(r) == a for s in tried for r in s.counted)]
        attacks += sorted({attack_of(r) for s in tried for r in s.counted} - set(attacks))
        head = ["setting", "overrides on today's quick", *attacks, "all", "mean s", "verdict"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in d["settings"]:
            name = (f"candidate {s.candidate}" if s.candidate is not None else "other") + \
                (" (today's quick)" if not s.overrides else "")
            cells = []
            for a in attacks:
                st = s.stats([r for r in s.counted if attack_of(r) == a])
                cells.append("—" if not st["n"] else
                             f"{st['k']}/{st['n']}, {_f(st['asr'])} / {_f(st['drop'])}, {_f(st['seconds'], 0)} s")
            st = s.stats()
            total = "—" if not st["n"] else f"{st['k']}/{st['n']}, {_f(st['asr'])} / {_f(st['drop'])}"
            verdict = f"**{s.verdict}**" if s.verdict == "chosen" else s.verdict
            lines.append(f"| {name} | `{json.dumps(s.overrides, sort_keys=True)}` | " + " | ".join(cells) +
                         f" | {total} | {_f(st['seconds'], 0)} | {verdict} |")
        lines.append("")
        best = d["chosen"]
        if best is None:
            lines += [f"No setting qualifies (complete on the {d['trials']} trials and <= {cap_of(defense, cap):.0f} s): today's "
                      "quick preset stays.", ""]
        elif not d["decided"]:
            so_far = f"`{json.dumps(best.overrides, sort_keys=True)}`" if d["differs"] else "today's quick preset"
            lines += ["Not decided yet: a candidate has not run on every trial (`run` goes on); so far the rule "
                      f"prefers {so_far}.", ""]
        elif d["differs"]:
            which = f"candidate {best.candidate}" if best.candidate is not None else "a logged setting"
            lines += [f"Chosen: {which}, **different from today's quick preset**: apply "
                      f"`{json.dumps(best.overrides, sort_keys=True)}` to `{defense}`'s quick preset.", ""]
        else:
            lines += ["Chosen: today's quick preset (no change).", ""]
    return "\n".join(lines).rstrip() + "\n"


def _refused_summary(refused: list[dict[str, str]]) -> str:
    if not refused:
        return "none"
    counts: dict[str, int] = {}
    for r in refused:
        counts[r["suspect"]] = counts.get(r["suspect"], 0) + 1
    return ", ".join(f"`{ref}` x{n}" for ref, n in sorted(counts.items()))


def summary_json(result: dict[str, Any]) -> dict[str, Any]:
    """:func:`choose`'s result as plain JSON."""
    out = {k: v for k, v in result.items() if k != "defenses"}
    out["defenses"] = {}
    for defense, d in result["defenses"].items():
        out["defenses"][defense] = {
            "trials": d["trials"], "overrides": d["overrides"], "differs": d["differs"], "decided": d["decided"],
            "dev_chosen": d["dev_chosen"],
            "settings": [{"candidate": s.candidate, "overrides": s.overrides, "verdict": s.verdict, **s.stats()}
                         for s in d["settings"]],
        }
    return out


# --- command line ------------------------------------------------------------------------------------------------


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run", help="run the candidate trials on development suspects (resumable)")
    r.add_argument("--defenses", help="comma-separated (default: every post-training defense)")
    r.add_argument("--attacks", help="comma-separated zoo attacks (default: every one with a backdoor)")
    r.add_argument("--suspects-per-attack", type=int, default=1)
    r.add_argument("--seeds", type=int, default=1, help="defense seeds 1000..1000+N-1 per suspect")
    r.add_argument("--images", type=int, default=1000, help="measure on N random images of each suspect's "
                   "evaluation split (0: all)")
    r.add_argument("--minutes", type=float, help="start no trial after this many minutes")
    r.add_argument("--skip-over", type=float, default=SKIP_OVER, help="stop trying a setting whose trials average "
                   "more seconds than this")
    r.add_argument("--log", type=Path, default=DEFAULT_LOG)
    c = sub.add_parser("choose", help="apply the rule to the logged trials (no compute)")
    c.add_argument("--log", type=Path, default=DEFAULT_LOG)
    c.add_argument("--out", type=Path, default=DEFAULT_OUT)
    c.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = ap.parse_args(argv)

    if args.mode == "run":
        try:
            counts = run(_csv(args.defenses), _csv(args.attacks), args.suspects_per_attack, args.seeds,
                         args.images or None, args.minutes, args.log, args.skip_over)
        except Refused as err:
            print(f"choose_presets: refused: {err}", file=sys.stderr)
            return 2
        print("run: " + ", ".join(f"{k} {v}" for k, v in counts.items()) +
              (" (out of time: run again to go on)" if counts["stopped"] else ""))
        return 0
    result = choose(args.log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(result))
    if args.json:
        print(json.dumps(summary_json(result), indent=2, default=str))
    else:
        print(f"{result['used']} development trials used, {len(result['refused'])} refused (test suspects), "
              f"{result['not_development']} other lines; wrote {args.out}")
        for defense, d in result["defenses"].items():
            if d["chosen"] is None:
                tried = any(st.trials for st in d["settings"])
                print(f"{defense}: {'no setting qualifies' if tried else 'no development trial yet'} (keep quick)")
            elif not d["decided"]:
                print(f"{defense}: not decided yet (so far {json.dumps(d['overrides'], sort_keys=True)})")
            elif d["differs"]:
                print(f"{defense}: {json.dumps(d['overrides'], sort_keys=True)}")
            else:
                print(f"{defense}: keep quick")
    return 0


if __name__ == "__main__":
    sys.exit(main())
