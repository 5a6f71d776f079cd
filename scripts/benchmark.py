"""The defense benchmark: run the grid into a run store, and regenerate its document from that store.

    python scripts/benchmark.py run   [--defenses a,b] [--suspects badnets,blended,sig,wanet] [--presets quick,paper]
                                      [--seeds 3] [--runs bench-runs] [--pool-size N]
    python scripts/benchmark.py write [--runs bench-runs] [--out docs/defense-benchmarks.md]
    python scripts/benchmark.py all   (run, then write)

``run`` executes every (defense, test suspect, preset, seed) cell that the store does not hold yet, one at a time
(timings are only meaningful alone on the machine), each measured on the whole demo test split, with the run's
config, seconds and device stored beside it. An attack's test suspects are the zoo's (``suspects.zoo.test_suspects``;
seed 0 is the demo bundle's suspect), else ``demo:ATTACK``; a *cell* groups its (test suspect x seed) runs by the
zoo attack of their suspects (:func:`attack_of`: ``badnets_1pct`` is not ``badnets``, though both use its trigger).

``write`` reads the store only and writes the per-run CSV beside the document (with each run's suspect and preset
version) and a ``-meta.json`` with what the CSV cannot hold (runs left out, cells redone, the clean reference rows,
the capacity section); the document is then rendered from the CSV, so where the store is not at hand (it is not in
the repository) ``write`` regenerates the same document from the CSV (``--from-csv``, the default without a store).
Per attack a table of BA, BA drop, ASR, RA, DER and seconds as mean +- sd over the cell's runs, beside the median and
range (and the bootstrap 95% interval of the mean from 5 runs), k/n successes and the split flag (:mod:`runs.stats`);
the first row is the clean suspect measured under the attack's trigger; the Pareto front on the means (bold) and the
rows within noise of it (italic); the published numbers for the same method (tagged, another setting), and the goal
checks. Only runs on the suspects' *current* weights count (their before-metrics equal the suspect card's) made with
today's presets (their preset version is today's: a preset re-chosen after its cells ran makes them stale, and the
document lists the cells redone and those still stale).
Defenses never see the test split (the runner seals it); their presets were chosen on the development split
(``scripts/tune_on_dev.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")

from runs.compare import mean_sd_text  # noqa: E402 - after the path set-up above
from suspects.identity import ref_fingerprint  # noqa: E402
from suspects.zoo import default_zoo  # noqa: E402

# the benchmark's attacks: those of the suspect zoo's manifest (assets/zoo.json), whose test suspects make a cell
ATTACKS = tuple(a for a in default_zoo().manifest["attacks"] if a != "clean")
DOC = Path("docs/defense-benchmarks.md")


def dev_chosen() -> set[str]:
    """The defenses whose ``quick`` preset today is what ``scripts/choose_presets.py`` chose on the zoo's development
    suspects (read from its log, docs/dev-trials.jsonl); every other defense's quick rows carry a dagger (issue 28)."""
    from scripts.choose_presets import dev_chosen as chosen

    return chosen()


def post_training() -> tuple[str, ...]:
    """The registered defenses that repair a given model (those that need no poisoned training set)."""
    from defenses import get_defense
    from defenses.registry import list_defenses

    return tuple(d for d in list_defenses() if not get_defense(d).threat.poisoned_training_set)



def _cells_done(store, suspect_ref: str) -> set[tuple[str, str, str, int, int]]:
    from runs.compare import runs_table

    table = runs_table(store, suspect_ref)
    table = table[on_current_presets(store, table)]  # a cell run with an earlier version of its preset is redone
    return {(d, p, o, int(s), int(n)) for d, p, o, s, n in
            zip(table["defense"], table["preset"], table["overrides"], table["seed"], table["clean_images"],
                strict=True)}


def run_grid(args: argparse.Namespace) -> int:
    import suspects
    from backdoor_lens.cli import parse_sets
    from defenses import list_defenses
    from defenses.runner import resolve_pool_size
    from runs.jobs import create_run, execute
    from runs.store import RunStore

    store = RunStore(args.runs)
    out = Path(args.out)
    csv = out.with_name(out.stem + "-runs.csv")
    published = csv_rows(csv) if csv.is_file() else None  # read once, not per suspect
    names = [d for d in (args.defenses.split(",") if args.defenses else list_defenses()) if d]
    overrides = parse_sets(args.set)
    if overrides and len(names) != 1:
        print("--set overrides one defense's parameters: name exactly one with --defenses", file=sys.stderr)
        return 2
    label = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    failures = 0
    for attack in [s for s in args.suspects.split(",") if s]:
        # an attack's built test suspects, or one of them named as zoo:NAME; a cell is (test suspect x seed) runs
        for ref in ([attack] if attack.startswith("zoo:") else test_suspects(attack)):
            suspect = suspects.load(ref)
            pool_size = resolve_pool_size(args.pool_size, len(suspect.defense_pool))
            done = _cells_done(store, ref) | _csv_cells_done(published, ref)  # a run the CSV holds is not redone
            for defense in names:
                for preset in [p for p in args.presets.split(",") if p]:
                    for seed in range(args.seeds):
                        if (defense, preset, label, seed, pool_size) in done:
                            continue
                        t = time.time()
                        rid = create_run(store, defense, ref, preset, overrides, pool_size, seed, None,
                                         pid=os.getpid(), measure="full", suspect=suspect)
                        status = execute(store, rid, None, suspect=suspect)
                        rec = store.get(rid)
                        print(f"{defense:11s} {preset:6s} {ref:14s} seed {seed}: {status}"
                              + (f" ({rec.error})" if status != "finished" else "") + f", {time.time() - t:.0f} s",
                              flush=True)
                        failures += status != "finished"
    return 1 if failures else 0


def current_card(attack: str) -> dict:
    """The demo suspect's card as committed now (read from disk; the model is not loaded)."""
    from suspects.store import DEMO_SUSPECTS

    return json.loads((DEMO_SUSPECTS / attack / "suspect.json").read_text())


def on_current_weights(table, card: dict):
    """Rows whose before-metrics are the card's: runs on the suspect's current weights (the runner reads "before"
    from the card when the weights' fingerprint matches, or measures the same numbers)."""
    m = card["metrics"]
    keep = (table["ba_before"] - m["ba"]).abs() < 1e-6
    for key in ("asr", "ra"):
        if m.get(key) is not None:
            keep &= (table[f"{key}_before"] - m[key]).abs() < 1e-6
    return keep


NOT_RECORDED = "<missing>"  # a parameter the run did not record (it did not exist yet when the run was made)


def _overridden(overrides: str) -> set[str]:
    return {part.split("=", 1)[0] for part in overrides.split(", ") if part}


def _version_of(values: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _preset_now(defense: str, preset: str) -> dict:
    """Every parameter of today's preset (the dataclass with the preset applied); {} for a defense or preset that no
    longer exists."""
    from dataclasses import asdict

    from defenses.registry import get_defense

    try:
        return json.loads(json.dumps(asdict(get_defense(defense).make_params(preset, {})), default=str))
    except (ValueError, KeyError):
        return {}


def preset_version(defense: str, preset: str, overrides: str = "", used: dict | None = None) -> str:
    """A preset's version: a hash of the value of every parameter today's preset sets (those ``overrides`` sets
    are left out), taken from ``used`` (the parameters a run recorded; one it lacks counts as ``<missing>``) or,
    without ``used``, from today's preset. A run is on today's preset exactly when its version equals today's, so
    a preset re-chosen (or a parameter added) after its cells ran makes them stale; the runs CSV keeps each run's
    version, so the document regenerated from the CSV still knows."""
    now = _preset_now(defense, preset)
    if not now:
        return ""
    skip = _overridden(overrides)
    source = now if used is None else used
    return _version_of({k: source.get(k, NOT_RECORDED) for k in now if k not in skip})


def preset_versions(store, table):
    """Each row's preset version (:func:`preset_version` of the parameters its run recorded)."""
    import pandas as pd

    return pd.Series([preset_version(d, p, o, (store.report(r) or {}).get("params") or {})
                      for r, d, p, o in zip(table["run_id"], table["defense"], table["preset"], table["overrides"],
                                            strict=True)], index=table.index, dtype=object)


def on_current_presets(store, table, versions=None):
    """Rows whose run used today's preset: every parameter the preset sets (and that the row's overrides leave
    alone) has the value the preset gives now (the same :func:`preset_version`). A run made before a preset was
    re-chosen (or before a parameter existed) is left out: its numbers belong to another setting."""
    import pandas as pd

    if versions is None:
        versions = preset_versions(store, table)
    keep = [bool(v) and v == preset_version(d, p, o) for v, d, p, o in
            zip(versions, table["defense"], table["preset"], table["overrides"], strict=True)]
    return pd.Series(keep, index=table.index, dtype=bool)


def test_suspects(attack: str) -> list[str]:
    """The attack's test suspects (references ``suspects.load`` takes): the zoo's, from
    ``suspects.zoo.test_suspects(attack)`` when the zoo provides it (seed 0 there is the demo bundle's suspect), else
    the demo bundle's one, ``demo:ATTACK``. A benchmark cell groups the runs on all of them (suspects x seeds)."""
    try:
        from suspects import zoo
    except ImportError:
        return [f"demo:{attack}"]
    listed = getattr(zoo, "test_suspects", None)
    refs = [r if isinstance(r, str) else str(getattr(r, "ref", "") or f"zoo:{getattr(r, 'name', '')}")
            for r in (listed(attack) if callable(listed) else [])]
    return [r for r in refs if r] or [f"demo:{attack}"]


def card_of(ref: str) -> dict:
    """A suspect's card: ``demo:NAME`` (and a ``zoo:NAME`` whose folder is the bundle's) as committed now
    (:func:`current_card`), another ``zoo:NAME`` from its folder (the model not loaded), any other reference through
    ``suspects.load``."""
    if ref.startswith("demo:"):
        return current_card(ref.split(":", 1)[1])
    if ref.startswith("zoo:"):  # read from disk; a zoo suspect that is the bundle's (seed 0) is the demo card
        from suspects.store import DEMO_SUSPECTS
        from suspects.zoo import zoo_path

        path = zoo_path(ref)
        if path.resolve().parent == DEMO_SUSPECTS.resolve():
            return current_card(path.name)
        return json.loads((path / "suspect.json").read_text())
    import suspects

    return suspects.load(ref).card


def built_card(ref: str) -> dict | None:
    """:func:`card_of`, or None for a zoo suspect that is not built here (a fresh clone: the runs CSV still names it,
    and the manifest records its fingerprint)."""
    from suspects.store import SuspectLoadError

    try:
        return card_of(ref)
    except (FileNotFoundError, SuspectLoadError):
        return None


def weights_fingerprint(ref: str) -> str | None:
    """The fingerprint of ``ref``'s weights now: a zoo suspect's from its folder when built, else the one the
    manifest records (:func:`suspects.zoo.current_fingerprint`); any other reference's from its files."""
    if ref.startswith("zoo:"):
        from suspects.zoo import current_fingerprint

        try:
            return current_fingerprint(ref)
        except ValueError:  # no longer in the manifest
            return None
    return ref_fingerprint(ref)


def accepted_fingerprints(ref: str) -> set[str]:
    """The fingerprints a run on ``ref`` may name and still count: for a zoo suspect every build's (the manifest's,
    its recorded rebuilds' on other machines, the one on disk here: :func:`suspects.zoo.known_fingerprints`), for any
    other reference its weights' now."""
    if ref.startswith("zoo:"):
        from suspects.zoo import known_fingerprints

        try:
            return known_fingerprints(ref)
        except ValueError:  # no longer in the manifest
            return set()
    fp = ref_fingerprint(ref)
    return {fp} if fp else set()


def zoo_attacks() -> dict[str, str]:
    """``zoo:NAME`` -> its attack, for every suspect of the manifest (read once, not per run)."""
    return {e.ref: e.attack for e in default_zoo().entries()}


def attack_of(ref: str, default: str, attacks: dict[str, str] | None = None) -> str:
    """The attack a run's suspect belongs to: the zoo's attack for ``zoo:NAME`` (``zoo:badnets_1pct-s1`` is
    ``badnets_1pct``, though its trigger is BadNets'; ``attacks``: :func:`zoo_attacks`, read here when not given),
    ``NAME`` for ``demo:NAME``, else (and for a suspect no longer in the manifest) ``default``. Not the card's
    ``trigger.name``: BadNets at 1% and all-to-all BadNets share BadNets' trigger but are attacks of their own."""
    if ref.startswith("zoo:"):
        return (zoo_attacks() if attacks is None else attacks).get(ref, default)
    if ref.startswith("demo:"):
        return ref.split(":", 1)[1]
    return default


CELL_KEYS = ["attack", "defense", "preset", "overrides"]


def store_rows(store, attacks=ATTACKS):
    """Every finished run on the attacks' test suspects, with ``attack``, ``suspect``, ``ba_drop``,
    ``preset_version`` and two flags: ``current_weights`` (its before-metrics are the suspect card's) and
    ``current_preset`` (its preset version is today's)."""
    import pandas as pd

    from runs.compare import runs_table

    frames = []
    zoo_attack = zoo_attacks()
    for attack in attacks:
        seen: set[str] = set()
        for ref in test_suspects(attack):
            try:
                card = card_of(ref)
                table = runs_table(store, ref)
            except Exception as err:  # a listed suspect whose weights are not on disk: nothing to read
                print(f"skipping {ref}: {err}", file=sys.stderr)
                continue
            table = table[~table["run_id"].isin(seen)]  # one model under two names: count its runs once
            seen |= set(table["run_id"])
            if table.empty:
                continue
            versions = preset_versions(store, table)
            current = on_current_weights(table, card)
            machines = [machine_text((store.report(r) or {}).get("machine")) for r in table["run_id"]]
            frames.append(table.assign(
                attack=attack_of(ref, attack, zoo_attack), suspect=ref, ba_drop=table["ba_before"] - table["ba"],
                machine=machines,
                preset_version=versions, current_weights=current,
                fingerprint=current.map({True: ref_fingerprint(ref) or "", False: ""}),
                current_preset=on_current_presets(store, table, versions)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def preset_changes(rows) -> list[dict]:
    """The cells (on current weights) with runs made on an earlier version of their preset: ``runs_left_out`` of
    them, and ``redone`` when the cell also has runs on today's preset."""
    if rows.empty:
        return []
    rows = rows[rows["current_weights"]]
    out = []
    for key, g in rows.groupby(CELL_KEYS, sort=True):
        old = int((~g["current_preset"]).sum())
        if old:
            out.append({**dict(zip(CELL_KEYS, key, strict=True)), "runs_left_out": old,
                        "redone": bool(g["current_preset"].any())})
    return out


def before_text(before: dict) -> str:
    """The line above an attack's table: the test suspects' BA / ASR / RA before any defense, and which suspects
    have runs on more than one build of their weights (a rebuild on another machine, :mod:`suspects.zoo`)."""
    n = int(before.get("builds", 1))
    text = (f"Suspect{'s' if n > 1 else ''} before any defense{f' (mean over the {n} builds the runs were made on)' if n > 1 else ''}: "
            f"BA {before['ba']:.3f}, ASR {before['asr']:.3f}, RA {before['ra']:.3f}.")
    rebuilt = before.get("rebuilt") or {}
    if rebuilt:
        text += " Runs on more than one build of a suspect's weights (the same recipe and seed trained on another " \
                "machine; the CSV's `fingerprint` and `machine` say which run used which): " + "; ".join(
                    f"`{ref}`: {', '.join(f'`{fp[:12]}`' for fp in fps)}" for ref, fps in rebuilt.items()) + "."
    return text


def build_metrics(rows) -> list[dict]:
    """BA / ASR / RA before any defense of each build (weights, by fingerprint) the runs ``rows`` were made on, once
    per build (``demo:badnets`` and ``zoo:badnets-s0`` are one): the card's for the build on disk here, else what
    its runs recorded as their before-metrics (the card's then, to the CSV's 4 decimals)."""
    fps = rows["fingerprint"].fillna("").astype(str) if "fingerprint" in rows else rows["suspect"].map(lambda _: "")
    builds = fps.where(fps != "", "suspect:" + rows["suspect"].astype(str))  # no fingerprint: one build per name
    out = []
    for key in sorted(set(builds)):
        g = rows[builds == key]
        ref = str(g["suspect"].iloc[0])
        card = built_card(ref)
        if card is not None and (key.startswith("suspect:") or key == (weights_fingerprint(ref) or "")):
            out.append(card.get("metrics") or {})
            continue
        first = g.iloc[0]
        out.append({k: (None if f"{k}_before" not in g or first[f"{k}_before"] != first[f"{k}_before"]
                        else float(first[f"{k}_before"])) for k in ("ba", "asr", "ra")})
    return out


def summarise(rows, meta: dict | None = None):
    """Per attack: (the suspects' before-metrics, the cells: :func:`runs.compare.group_runs` over the attack's
    (test suspect x seed) runs on current weights and today's presets), and those runs. ``runs.attrs``: ``stale``
    and ``old_presets`` (runs left out), ``preset_changes`` (:func:`preset_changes`), adding what ``meta`` carries
    from the store the CSV was written from."""
    import numpy as np
    import pandas as pd

    from runs.compare import group_runs

    meta = meta or {}
    left = meta.get("left_out") or {}
    stale = int(left.get("earlier_weights", 0))
    old_presets = int(left.get("earlier_presets", 0))
    changes = {tuple(c[k] for k in CELL_KEYS): dict(c) for c in meta.get("preset_changes") or []}
    out = {}
    kept = []
    if not rows.empty:
        stale += int((~rows["current_weights"]).sum())
        old_presets += int((rows["current_weights"] & ~rows["current_preset"]).sum())
        for c in preset_changes(rows):
            key = tuple(c[k] for k in CELL_KEYS)
            prev = changes.get(key)
            if prev is not None:
                c = {**c, "runs_left_out": c["runs_left_out"] + int(prev["runs_left_out"]),
                     "redone": c["redone"] or bool(prev["redone"])}
            changes[key] = c
        current = rows[rows["current_weights"] & rows["current_preset"]]
        for key, c in changes.items():  # a cell redone since the store was written
            if not c["redone"] and ((current[CELL_KEYS] == pd.Series(key, index=CELL_KEYS)).all(axis=1)).any():
                changes[key] = {**c, "redone": True}
        for attack in [a for a in ATTACKS if a in set(current["attack"])] + sorted(
                set(current["attack"]) - set(ATTACKS)):
            table = current[current["attack"] == attack]
            kept.append(table)
            groups = group_runs(table)
            groups["n_suspects"] = [int(table[(table["defense"] == d) & (table["preset"] == p)
                                              & (table["overrides"] == o)]["suspect"].nunique())
                                    for d, p, o in zip(groups["defense"], groups["preset"], groups["overrides"],
                                                       strict=True)]
            groups["drop_mean"], groups["drop_sd"] = groups["ba_drop_mean"], groups["ba_drop_sd"]
            cards = build_metrics(table)
            # the suspects' metrics before any defense (the cards', which the runs' before-metrics equal); the mean
            # over the builds of the attack's test suspects where there are several
            before = {k: float(np.mean([float("nan") if m.get(k) is None else float(m[k]) for m in cards]))
                      for k in ("ba", "asr", "ra")}
            before["builds"] = len(cards)
            named = table[table["fingerprint"].fillna("") != ""] if "fingerprint" in table else table.iloc[:0]
            builds = named.groupby("suspect")["fingerprint"].agg(lambda f: sorted(set(f)))
            before["rebuilt"] = {ref: fps for ref, fps in builds.items() if len(fps) > 1}  # runs on several builds
            out[attack] = (before, groups)
    runs = pd.concat(kept) if kept else pd.DataFrame()
    runs.attrs["stale"] = stale
    runs.attrs["old_presets"] = old_presets
    runs.attrs["preset_changes"] = sorted(changes.values(), key=lambda c: tuple(c[k] for k in CELL_KEYS))
    return out, runs


def collect(store, attacks=ATTACKS):
    """Per attack: (the suspects' before-metrics, grouped runs with drop columns), from the store only, and the
    runs: those on the test suspects' current weights (``stale``: how many runs on earlier weights were left out)
    made with today's presets (``old_presets``: how many runs with an earlier version of a preset were left out;
    ``preset_changes``: which cells, and whether they were redone)."""
    return summarise(store_rows(store, attacks))


# the per-run CSV beside the document: what ``write`` regenerates the document from when no store is at hand
CSV_COLUMNS = ["attack", "defense", "preset", "overrides", "seed", "ba_before", "ba", "ba_drop", "asr_before",
               "ra_before", "asr", "ra", "der", "seconds", "failed", "device", "clean_images", "held_out", "date", "run_id", "suspect",
               "preset_version", "fingerprint", "machine"]
"""``fingerprint``: the weights the run repaired (:func:`suspects.identity.fingerprint`), for runs on the suspect's
current weights (the rows the document counts); tests/test_pages.py checks each is a current test suspect's."""
CSV_TOLERANCE = 6e-5  # the CSV keeps 4 decimals: a before-metric within this of the card's is the card's


def csv_rows(csv_path: Path):
    """The rows of a runs CSV written by ``write``, flagged as :func:`store_rows` flags a store's rows: against
    today's suspect cards (to the CSV's 4 decimals) and today's preset versions."""
    import pandas as pd

    rows = pd.read_csv(csv_path, dtype={"overrides": str, "suspect": str, "preset_version": str, "fingerprint": str})
    rows["overrides"] = rows["overrides"].fillna("")
    if "suspect" not in rows:
        rows["suspect"] = "demo:" + rows["attack"].astype(str)
    # a CSV written before cells were keyed by the zoo's attack filed BadNets-at-1% runs under badnets
    attacks = zoo_attacks()
    rows["attack"] = [attack_of(r, str(a), attacks) for r, a in zip(rows["suspect"], rows["attack"], strict=True)]
    rows["failed"] = rows["failed"].astype(str).str.lower() == "true"
    keep = pd.Series(True, index=rows.index)
    for ref in sorted(set(rows["suspect"])):
        card = built_card(ref)  # None: a zoo suspect not built here; its recorded fingerprint still decides
        sel = rows["suspect"] == ref
        ok = pd.Series(True, index=rows.index[sel])
        on_disk = pd.Series(True, index=rows.index[sel])  # rows on the weights the card here describes
        if "fingerprint" in rows:  # the weights the row names must be one of the suspect's builds
            fps = rows.loc[sel, "fingerprint"].fillna("")
            ok &= fps.isin(accepted_fingerprints(ref) or {""})
            on_disk = fps == (weights_fingerprint(ref) or "")
        elif card is None:
            ok &= False  # neither a card nor a fingerprint to check the row against
        if card is not None:  # a row on the build here must have the card's before-metrics
            m = card["metrics"]
            same = (rows.loc[sel, "ba_before"] - m["ba"]).abs() <= CSV_TOLERANCE
            for key in ("asr", "ra"):
                if m.get(key) is not None and f"{key}_before" in rows:
                    value = rows.loc[sel, f"{key}_before"]  # empty in rows written before the column existed
                    same &= value.isna() | ((value - m[key]).abs() <= CSV_TOLERANCE)
            ok &= ~on_disk | same
        keep[sel] = ok
    rows["current_weights"] = keep
    for column in ("fingerprint", "machine"):
        rows[column] = rows[column].fillna("").astype(str) if column in rows else ""
    rows["preset_version"] = rows["preset_version"].fillna("").astype(str) if "preset_version" in rows else ""
    rows["current_preset"] = [bool(v) and v == preset_version(d, p, o) for v, d, p, o in
                              zip(rows["preset_version"], rows["defense"], rows["preset"], rows["overrides"],
                                  strict=True)]
    return rows


RUN_KEYS = ["fingerprint", "defense", "preset", "overrides", "seed", "clean_images", "preset_version"]
"""What makes two runs the same run: the same weights (by fingerprint: ``demo:badnets`` is ``zoo:badnets-s0``),
defense, preset version, overrides, seed and pool size."""


def merge_with_csv(store_table, csv_table):
    """The store's runs plus the CSV's runs the store does not hold (by run id, then by :data:`RUN_KEYS`: a run the
    store made again replaces the CSV's). So a store that holds only new runs (a new machine, a re-chosen preset, new
    suspects) adds to the published runs instead of replacing them."""
    import pandas as pd

    if csv_table.empty:
        return store_table
    if store_table.empty:
        return csv_table
    older = csv_table[~csv_table["run_id"].isin(set(store_table["run_id"]))]
    key = lambda t: t[RUN_KEYS].astype(str).agg("|".join, axis=1)  # noqa: E731
    older = older[~key(older).isin(set(key(store_table)))]
    return pd.concat([store_table, older], ignore_index=True)


def _csv_cells_done(rows, suspect_ref: str) -> set[tuple[str, str, str, int, int]]:
    """The cells of ``suspect_ref``'s weights (under any name) the runs CSV's ``rows`` (:func:`csv_rows`, None: no
    CSV) already hold, on today's presets."""
    if rows is None:
        return set()
    same = (rows["suspect"] == suspect_ref) | (rows["fingerprint"] == (weights_fingerprint(suspect_ref) or "-"))
    rows = rows[same & rows["current_weights"] & rows["current_preset"]]  # the same weights under any name
    return {(d, p, o, int(s), int(n)) for d, p, o, s, n in
            zip(rows["defense"], rows["preset"], rows["overrides"], rows["seed"], rows["clean_images"], strict=True)}


def _measured_on_builds_of(prev: dict, refs: list[str]) -> bool:
    """Whether an earlier reference measurement covers the clean suspects ``refs`` (those built here; it may cover
    more, e.g. all three where this machine built one) and was made on one of each suspect's builds."""
    named = dict(zip(prev.get("clean") or [], prev.get("clean_fingerprints") or [], strict=False))
    return bool(named) and all(ref in named for ref in refs) and all(
        fp in accepted_fingerprints(ref) for ref, fp in named.items())


def reference_rows(attacks, known: dict | None = None) -> dict[str, dict]:
    """Per attack, the clean test suspects (``test_suspects("clean")``) measured under the attack's trigger (the
    trigger of the attack's first test suspect): BA, ASR and RA on the whole test split (``suspects.evaluate``),
    the baseline a defended model's numbers are read against (an RA near the clean model's is as good as it gets).
    ``known``: earlier measurements, reused where the trigger is the same and they cover the clean suspects built
    here, each on one of its builds (:func:`accepted_fingerprints`): a machine that has built only the bundle's clean
    suspect keeps the measurement over all three instead of replacing it with one."""
    import suspects
    from suspects.identity import fingerprint

    known = known or {}
    out = {}
    refs = test_suspects("clean")
    clean: list = []
    for attack in attacks:
        source = test_suspects(attack)[0]
        spec = card_of(source).get("trigger")
        prev = known.get(attack) or {}
        if prev.get("trigger") == spec and _measured_on_builds_of(prev, refs):
            out[attack] = prev
            continue
        if not clean:
            clean = [suspects.load(ref) for ref in refs]
            prints = [fingerprint(c) for c in clean]
        trigger = suspects.load(source).trigger
        measured = [suspects.evaluate(c.model, c.test, trigger) for c in clean]
        out[attack] = {"clean": test_suspects("clean"), "clean_fingerprints": prints, "trigger_of": source,
                       "trigger": spec, **{k: [round(float(getattr(m, k)), 6) for m in measured]
                                           for k in ("ba", "asr", "ra")}}
    return out


def _front(groups) -> set[tuple[str, str]]:
    from runs.compare import pareto_front

    gave_up = groups["n_failed"] >= groups["n_seeds"] if "n_failed" in groups else None  # every seed gave up
    mask = pareto_front(groups["ba_mean"], groups["asr_mean"], eligible=None if gave_up is None else ~gave_up)
    return {(d, _label(p, o)) for d, p, o, m in
            zip(groups["defense"], groups["preset"], groups["overrides"], mask, strict=True) if m}


def _near(groups) -> set[tuple[str, str]]:
    """The rows near the front (:func:`runs.stats.front_marks`: the interval reaches the front of the means)."""
    if "near_front" not in groups:
        return set()
    return {(d, _label(p, o)) for d, p, o, m in
            zip(groups["defense"], groups["preset"], groups["overrides"], groups["near_front"], strict=True) if m}


def _label(preset: str, overrides: str) -> str:
    return f"{preset} ({overrides})" if overrides else preset


WEAK_ASR = 0.5
"""Below this ASR before any defense a suspect's backdoor is weak (BadNets at 1%: 0.27): the goal line says so."""


def goal_lines(results) -> list[str]:
    """The issues' goals, checked on the stored numbers (means over a cell's runs)."""
    lines = []
    for attack, (before, g) in results.items():
        quick = g[(g["preset"] == "quick") & (g["overrides"] == "") & g["defense"].isin(post_training())]
        front = _front(g)
        hits = [f"{d} ({mean_sd_text(a, s)} ASR, drop {dr:.3f})" for d, a, s, dr in
                zip(quick["defense"], quick["asr_mean"], quick["asr_sd"], quick["drop_mean"], strict=True)
                if a <= 0.05 and dr <= 0.03 and (d, "quick") in front]
        lines.append(f"- {attack}: a post-training `quick` preset with mean ASR <= 0.05 at a mean BA drop <= 0.03 on "
                     f"the Pareto front: **{'met' if hits else 'not met'}**" + (f" by {', '.join(hits)}" if hits else "")
                     + (f" (its suspects' own ASR before any defense is only {before['asr']:.3f}: a weak backdoor, so "
                        "an ASR <= 0.05 after a defense removes little)" if before.get("asr", 1.0) < WEAK_ASR else ""))
    slow = []
    for attack, (_, g) in results.items():
        for d, p, o, sec in zip(g["defense"], g["preset"], g["overrides"], g["seconds_mean"], strict=True):
            if p == "quick" and not o and d in post_training() and sec > 120:
                slow.append(f"{d} on {attack} ({sec:.0f} s)")
    lines.append(f"- post-training `quick` presets <= 120 s: **{'met' if not slow else 'not met'}**"
                 + (f": over on {', '.join(slow)}" if slow else ""))
    lines += retraining_goal_lines(results)
    lines.append(paper_goal_line(results))
    lines.append(coverage_line(results))
    if "badnets" in results:
        g = results["badnets"][1]
        new = g[(g["preset"] == "quick") & (g["overrides"] == "") & g["defense"].isin(["sau", "fst", "ibau"])]
        if len(new):
            ok = all(new["asr_mean"] <= 0.10) and len(new) == 3
            lines.append(f"- BadNets, SAU, FST and i-BAU `quick` all at mean ASR <= 0.10: **{'met' if ok else 'not met'}** "
                         f"({', '.join(f'{d} {a:.3f}' for d, a in zip(new['defense'], new['asr_mean'], strict=True))})")
    if "blended" in results:
        g = results["blended"][1]
        new = g[(g["preset"] == "quick") & (g["overrides"] == "") & g["defense"].isin(["sau", "fst", "ibau"])]
        if len(new):
            hits = [d for d, a, dr in zip(new["defense"], new["asr_mean"], new["drop_mean"], strict=True)
                    if a <= 0.10 and dr <= 0.04]
            lines.append(f"- Blended, one of SAU / FST / i-BAU `quick` at mean ASR <= 0.10 with a BA drop <= 0.04: "
                         f"**{'met by ' + ', '.join(hits) if hits else 'not met'}**")
    return lines


RETRAINING = ("dbd", "cbd")
# issue 13: these methods' ``paper`` presets should land in the published range on badnets and blended
PAPER_CHECKED = ("awm", "anp", "finetune", "fineprune", "shortcut")


def retraining_goal_lines(results) -> list[str]:
    """Issue 13's goals for DBD and CBD ``quick``: <= 10 minutes, BA sd over 3 seeds <= 0.03, and DBD on BadNets at
    ASR <= 0.10 with BA >= 0.82; "not run yet" while the store has no such runs."""
    lines = []
    for d in RETRAINING:
        rows = [(attack, r) for attack, (_, g) in results.items()
                for r in g[(g["defense"] == d) & (g["preset"] == "quick") & (g["overrides"] == "")].itertuples()]
        if not rows:
            lines.append(f"- {d.upper()} `quick` <= 10 minutes with a BA sd over 3 seeds <= 0.03: **not run yet** on "
                         "this bundle")
            continue
        slow = [f"{a} {r.seconds_mean:.0f} s" for a, r in rows if r.seconds_mean > 600]
        loose = [f"{a} sd {r.ba_sd:.3f}" for a, r in rows if r.n_seeds < 3 or not r.ba_sd <= 0.03]
        ok = not slow and not loose
        verdict = "met" if ok else "not met"
        lines.append(f"- {d.upper()} `quick` <= 10 minutes with a BA sd over 3 seeds <= 0.03: **{verdict}** "
                     f"on {', '.join(a for a, _ in rows)}" + (f" (over time: {', '.join(slow)})" if slow else "")
                     + (f" (spread or seeds: {', '.join(loose)})" if loose else ""))
        if d == "dbd":
            bad = [r for a, r in rows if a == "badnets"]
            if bad:
                r = bad[0]
                ok = r.asr_mean <= 0.10 and r.ba_mean >= 0.82
                verdict = "met" if ok else "not met"
                lines.append(f"- DBD `quick` on BadNets at mean ASR <= 0.10 with mean BA >= 0.82: **{verdict}** "
                             f"(BA {mean_sd_text(r.ba_mean, r.ba_sd)}, ASR {mean_sd_text(r.asr_mean, r.asr_sd)})")
    return lines


def paper_goal_line(results) -> str:
    """Which of the ``paper`` presets issue 13 compares with published numbers have 3 seeds on badnets and blended,
    and ANP's explicit goal (ASR <= 0.05 at a BA cost of at most 7 points, as BackdoorBench reports)."""
    have, missing = [], []
    for d in PAPER_CHECKED:
        for attack in ("badnets", "blended"):
            g = results.get(attack, (None, None))[1]
            hit = None if g is None else g[(g["defense"] == d) & (g["preset"] == "paper") & (g["overrides"] == "")]
            (have if hit is not None and len(hit) and int(hit["n_seeds"].iloc[0]) >= 3 else missing).append(
                f"{d}/{attack}")
    text = (f"- `paper` presets of {', '.join(PAPER_CHECKED)} on badnets and blended, 3 seeds, beside the published "
            f"numbers: {len(have)} of {len(have) + len(missing)} cells run"
            + (f" (not yet: {', '.join(missing)})" if missing else ""))
    anp = [(a, r) for a in ("badnets", "blended") if a in results
           for r in results[a][1][(results[a][1]["defense"] == "anp") & (results[a][1]["preset"] == "paper")
                                  & (results[a][1]["overrides"] == "")].itertuples()]
    if anp:
        ok = all(r.asr_mean <= 0.05 and r.drop_mean <= 0.07 for _, r in anp)
        text += (f"; ANP `paper` at ASR <= 0.05 with a BA drop <= 0.07: **{'met' if ok else 'not met'}** ("
                 + ", ".join(f"{a} ASR {r.asr_mean:.3f}, drop {r.drop_mean:.3f}" for a, r in anp) + ")")
    return text


def coverage_line(results) -> str:
    """How much of the grid (every defense x zoo attack x quick / paper, >= 3 runs: test suspect x seed) the store
    holds."""
    from defenses import list_defenses

    cells = [(d, a, p) for d in list_defenses() for a in ATTACKS for p in ("quick", "paper")]
    done = set()
    for attack, (_, g) in results.items():
        for r in g[(g["overrides"] == "") & (g["n_seeds"] >= 3)].itertuples():
            done.add((r.defense, attack, r.preset))
    defenses = list_defenses()
    post = set(post_training())
    missing = {a: [d for d in defenses if (d, a, "quick") not in done] for a in ATTACKS}
    complete = [a for a in ATTACKS if not post & set(missing[a])]
    gaps = [f"{a} ({'every defense' if len(m) == len(defenses) else ', '.join(m)})" for a, m in missing.items() if m]
    return (f"- grid coverage (defense x attack x preset with >= 3 runs, a run being one test suspect x one seed): "
            f"{len(done & set(cells))} of {len(cells)} cells; `quick` complete for every post-training defense on: "
            f"{', '.join(complete) or 'no attack yet'}; `quick` not yet complete: {'; '.join(gaps) or 'none'}; the "
            "`paper` presets are CPU-hours each on this machine and are run as time allows")


HEADER = ("# Defense benchmarks on the demo suspects", "",
          "Generated by `python scripts/benchmark.py write` from the benchmark run store (`bench-runs/`, filled by "
          "`python scripts/benchmark.py run`); do not edit by hand.")


def machine_text(info: dict | None) -> str:
    """One line for the machine a run ran on (:func:`suspects.device.machine_info` as the run recorded it); empty
    for a run made before runs recorded it."""
    if not isinstance(info, dict) or not info:
        return ""
    parts = [str(info.get("cpu") or "unknown CPU")]
    if info.get("cpu_capability"):
        parts.append(str(info["cpu_capability"]))
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']} (CUDA {info.get('cuda')})")
    parts.append(f"torch {info.get('torch', '?')} ({info.get('blas', '?')})")
    parts.append(f"{info.get('threads', '?')} threads")
    if info.get("deterministic"):
        parts.append("deterministic kernels")
    return ", ".join(parts)


# what the same command and seed gave on a second machine, where one was measured (issue 28.5, the reporter's runs)
SECOND_MACHINE = ("The same cell on a second machine: `backdoor-lens defend sau assets/demo/suspects/blended --preset "
                  "quick` (seed 0) gave ASR 0.141 on another 2-core machine (69 s) where this store has 0.005 (110 s); "
                  "BadNets reproduced (0.039 vs. 0.043), as reported in issue 28 (the reporter's runs, not ours). No "
                  "other cell has been measured on a second machine. On one machine a run repeats exactly at the same "
                  "thread count (`BACKDOOR_LENS_THREADS`); deterministic kernels change nothing on the CPU "
                  "(`suspects.device.deterministic`), so no switch makes two machines agree.")


def machines_text(runs) -> str:
    """Which machines the counted runs ran on (from the runs' records), and what is known across machines."""
    if runs is None or "machine" not in runs:
        return SECOND_MACHINE
    counts = runs["machine"].fillna("").astype(str).value_counts()
    named = [f"{m} ({n} runs)" for m, n in counts.items() if m]
    unknown = int(counts.get("", 0))
    text = "Machines: " + "; ".join(named) if named else "Machines"
    if unknown:
        text += (("; " if named else ": ") + f"{unknown} runs made before runs recorded their machine (the "
                 "project's 2-core CPU, `device` column)")
    return text + ". " + SECOND_MACHINE


def setting_text(runs) -> str:
    """The setting line, from the current demo cards and the runs' pools (never typed by hand)."""
    cards = [current_card(a) for a in ATTACKS]
    widths = sorted({int((c.get("training") or {}).get("width", 0)) for c in cards})
    split = cards[0].get("split") or {}
    kept_out = "kept out of" if split.get("pool_in_training") is False else "part of"
    pools = sorted({(int(n), int(h)) for n, h in zip(runs["clean_images"], runs["held_out"], strict=True)})
    pool_text = ", ".join(f"{n}-image clean pool ({n - h} to train on, {h} held out)" for n, h in pools)
    return (f"Setting: the demo suspects (Fashion-MNIST subset, PreAct-ResNet-18 width "
            f"{'/'.join(str(w) for w in widths)}, defense pool of {split.get('n_pool', '?')} images {kept_out} the "
            f"suspects' training, see `assets/demo/README.md`), a {pool_text}, every number measured on the whole demo "
            "test split (2,500 images; ASR and RA on the 2,250 non-target ones), 2 CPU cores.")


def _changes_text(changes: list[dict], redone: bool) -> str:
    """``sau `quick` (badnets, blended)``, per (defense, preset, overrides), for the cells redone or not."""
    cells: dict[tuple[str, str], list[str]] = {}
    for c in changes:
        if bool(c["redone"]) == redone:
            cells.setdefault((c["defense"], _label(c["preset"], c["overrides"])), []).append(c["attack"])
    return "; ".join(f"{d} `{p}` ({', '.join(a)})" for (d, p), a in sorted(cells.items()))


def preset_change_text(runs) -> str:
    """Which cells had runs on an earlier version of their preset: those redone with today's, and those still
    stale (left out of the tables until ``run`` redoes them)."""
    changes = list(runs.attrs.get("preset_changes") or []) if runs is not None else []
    redone, stale = _changes_text(changes, True), _changes_text(changes, False)
    return ((f" Redone with today's preset: {redone}." if redone else "")
            + (f" **Stale, not yet redone** (the preset changed after these cells ran; their runs are left out until "
               f"`python scripts/benchmark.py run` redoes them): {stale}." if stale else ""))


def spread_cell(median: float, lo: float, hi: float, ci_low: float, ci_high: float, n: int) -> str:
    """``0.020 [0.010, 0.900]`` (median [range]), with ``, CI [a, b]`` (the bootstrap 95% interval of the mean)
    where n >= 5."""
    from runs.stats import BOOTSTRAP_MIN_N, interval_text, range_text

    text = range_text(median, lo, hi)
    ci = interval_text(ci_low, ci_high) if n >= BOOTSTRAP_MIN_N else ""
    return text + (f", CI {ci}" if ci else "")


def successes_cell(row) -> str:
    """``2/3``, and ``, split: 1 of 3 removed`` when the cell's runs split (:mod:`runs.stats`)."""
    from runs.compare import split_flag_text
    from runs.stats import successes_text

    text = successes_text(int(row.successes), int(row.n_judged))
    flag = split_flag_text({"split": row.split, "removed": row.removed, "n_seeds": row.n_seeds})
    return text + (f", {flag}" if flag else "")


def stats_legend() -> str:
    from runs.stats import (
        BOOTSTRAP_MIN_N,
        BOOTSTRAP_RESAMPLES,
        NOT_REMOVED_MIN_ASR,
        REMOVED_MAX_ASR,
        SUCCESS_MAX_ASR,
        SUCCESS_MAX_BA_DROP,
    )

    return (f"runs = the cell's runs (test suspects x seeds). *median [range]* = the median and [min, max] over the "
            f"runs, with *CI* = the percentile-bootstrap 95% interval of the mean ({BOOTSTRAP_RESAMPLES:,} resamples, "
            f"seed 0) where a cell has {BOOTSTRAP_MIN_N} or more runs. *k/n* = runs that succeeded (ASR <= "
            f"{SUCCESS_MAX_ASR} at a BA drop <= {SUCCESS_MAX_BA_DROP}) of the runs; *split: k of n removed* = the "
            f"runs split into removed (ASR <= {REMOVED_MAX_ASR}) and not removed (ASR >= {NOT_REMOVED_MIN_ASR}), "
            "so the mean describes none of them. *italic* = near the Pareto front: not on it, but the best corner of "
            f"its interval (highest BA, lowest ASR; the range below {BOOTSTRAP_MIN_N} runs, the bootstrap interval "
            "from there) is dominated by no front row's means, so its distance from the front is within the runs' "
            "spread. The first row of each table is the clean suspect (no backdoor) measured under the attack's "
            "trigger on the same test split: the BA and RA a repaired model can hope for, and the ASR that the "
            "trigger's target class gets from a model that never learnt it.")


def _reference_line(attack: str, ref: dict | None) -> str | None:
    """The table's first row: the clean suspect(s) under ``attack``'s trigger (:func:`reference_rows`)."""
    import numpy as np

    if not ref:
        return None
    n = len(ref.get("ba") or [])

    def cell(key: str) -> str:
        v = [float(x) for x in ref.get(key) or []]
        if not v:
            return "n/a"
        return mean_sd_text(float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None)

    names = ", ".join(f"`{c}`" for c in ref.get("clean") or [])
    return (f"| clean suspect (reference) | none | {n} | {cell('ba')} |  |  | {cell('asr')} |  |  | "
            f"{cell('ra')} |  |  | measured: {names} under the trigger of `{ref.get('trigger_of')}` |")


def dagger_text(chosen: set[str]) -> str:
    """What a † on a ``quick`` row means, naming the defenses that carry one (every registered defense outside
    ``chosen``, the development suspects' choices)."""
    from defenses import get_defense, list_defenses

    daggered = [d for d in list_defenses() if d not in chosen and "quick" in get_defense(d).presets]
    if not daggered:
        return "every `quick` preset here is that choice"
    training = [d for d in daggered if get_defense(d).threat.poisoned_training_set]
    other = [d for d in daggered if d not in training]
    parts = []
    if training:
        parts.append(f"{', '.join(get_defense(d).title.split(' (')[-1].rstrip(')') for d in training)}: training-"
                     "time defenses, which the script does not tune; their `quick` presets were set on demo bundle "
                     "v2's development images but retrain on the BadNets bundle's poisoned training set, the data "
                     "of test suspect `zoo:badnets-s0` (their docstrings give every trial)")
    if other:
        parts.append(f"{', '.join(other)}: set in earlier rounds, partly with runs on these test suspects")
    return "a row marked † has a `quick` preset that is not (yet) that choice (" + "; ".join(parts) + ")"


def render(results, csv_name: str, runs=None, references: dict | None = None) -> str:
    from defenses import get_defense
    from runs.published import no_defense_text, none_recorded_text, published_for

    stale = int(runs.attrs.get("stale", 0)) if runs is not None else 0
    old_presets = int(runs.attrs.get("old_presets", 0)) if runs is not None else 0
    chosen = dev_chosen()

    out = [*HEADER[:-1], HEADER[-1] + f" Per-run rows: [`{csv_name}`]({csv_name}).", "",
           (setting_text(runs) if runs is not None else "") + " Each cell is the mean ± "
           "sample sd over its runs (a run: one test suspect x one defense seed; the seed draws the pool and the "
           "defense's randomness). A `quick` preset "
           "is chosen on the zoo's development suspects (`scripts/choose_presets.py`, docs/preset-choice.md), never "
           "on these numbers; " + dagger_text(chosen) + "; defenses never receive a test image (the runner "
           "seals the split). Seconds are the defense's wall "
           "time including the 'after' measurement, on an otherwise idle machine."
           + (f" {stale} runs of the store, made on earlier weights of the demo suspects, are left out." if stale else "")
           + (f" {old_presets} runs made with an earlier version of a preset (before it was re-chosen) are left out."
              if old_presets else "") + preset_change_text(runs),
           "",
           "BA = clean test accuracy; drop = BA before - BA after; ASR = share of triggered non-target test images "
           "classified as the target; RA = their accuracy w.r.t. the true label; DER = [max(0, ASR0 - ASR1) - "
           "max(0, BA0 - BA1) + 1] / 2. **bold** = on the attack's Pareto front (no other row has a higher mean BA "
           "and a lower mean ASR; a row whose defense gave up in every run, returning the suspect unchanged, is "
           "left out). *Published* numbers are on another setting (CIFAR-10, full-width ResNets): read "
           "them as what the method achieves where it was designed, not as a target for these models.", "",
           stats_legend(), "", machines_text(runs), ""]
    out += ["## Goals (checked on the numbers below)", "", *goal_lines(results), ""]
    for attack, (before, g) in results.items():
        front = _front(g)
        near = _near(g)
        out += [f"## {attack}", "",
                f"{before_text(before)} Published, before any defense (another setting): {no_defense_text(attack)}.",
                "",
                "| defense | preset | runs | BA | BA median [range] | BA drop | ASR | ASR median [range] | k/n | RA | DER | "
                "seconds | published (BA / ASR, tag, setting) |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        reference = _reference_line(attack, (references or {}).get(attack))
        if reference:
            out.append(reference)
        for row in g.sort_values(["defense", "preset", "overrides"]).itertuples():
            title = get_defense(row.defense).title
            pub = published_for(row.defense, attack)
            pub_text = "; ".join(p.text() for p in pub) or none_recorded_text(row.defense, attack)
            preset = _label(row.preset, row.overrides)
            name = (f"**{title}**" if (row.defense, preset) in front else
                    f"*{title}*" if (row.defense, preset) in near else title)
            if row.preset == "quick" and row.defense not in chosen:
                name += " †"
            if getattr(row, "n_failed", 0):
                name += f" (gave up in {row.n_failed} of {row.n_seeds} runs: model unchanged)"
            out.append(f"| {name} | {preset} | {row.n_seeds} | {mean_sd_text(row.ba_mean, row.ba_sd)} | "
                       f"{spread_cell(row.ba_median, row.ba_min, row.ba_max, row.ba_ci_low, row.ba_ci_high, row.n_seeds)}"
                       f" | {mean_sd_text(row.drop_mean, row.drop_sd)} | {mean_sd_text(row.asr_mean, row.asr_sd)} | "
                       f"{spread_cell(row.asr_median, row.asr_min, row.asr_max, row.asr_ci_low, row.asr_ci_high, row.n_seeds)}"
                       f" | {successes_cell(row)} | "
                       f"{mean_sd_text(row.ra_mean, row.ra_sd)} | {mean_sd_text(row.der_mean, row.der_sd)} | "
                       f"{mean_sd_text(row.seconds_mean, row.seconds_sd, 0)} | {pub_text} |")
        out.append("")
    return "\n".join(out) + "\n"


def capacity_section(root: Path) -> list[str]:
    """The capacity study's table (``scripts/capacity_study.py``), when it has results."""
    from scripts.capacity_study import load_results, summary

    df = load_results(root)
    if df is None:
        return []
    table = summary(df)
    widths = sorted(table["width"].unique())
    trained = []
    for card_file in sorted((root / "suspects").glob("*/suspect.json")):
        card = json.loads(card_file.read_text())
        m, t = card.get("metrics") or {}, card.get("training") or {}
        trained.append(f"| {card.get('name')} | {t.get('width')} | {m.get('ba', float('nan')):.4f} | "
                       f"{m.get('asr', float('nan')):.4f} | {t.get('seconds', float('nan')):.0f} |")
    out = ["## Capacity: does a wider demo model let the defenses work?", "",
           "`python scripts/capacity_study.py train|defend`: BadNets and Blended suspects trained with the demo recipe "
           "at each width, the defense pool (10%) kept out of training, each defense run with seeds 0-2 and measured "
           "on the **development split** (2,000 Fashion-MNIST images the demo never used), never the test split. "
           "Cells: BA drop / ASR (mean ± sd over the seeds), seconds.", "",
           *(["Suspects (test split; training seconds on 2 CPU cores):", "",
              "| suspect | width | BA | ASR | training seconds |", "|---|---|---|---|---|", *trained, ""]
             if trained else []),
           "| attack | defense | preset | " + " | ".join(f"width {w}" for w in widths) + " |",
           "|---|---|---|" + "---|" * len(widths)]
    keys = df[["attack", "defense", "preset"]].drop_duplicates().sort_values(["attack", "defense", "preset"])
    for attack, defense, preset in keys.itertuples(index=False):
        g = table[(table["attack"] == attack) & (table["defense"] == defense) & (table["preset"] == preset)]
        cells = []
        for w in widths:
            r = g[g["width"] == w]
            if r.empty:
                errors = df[(df["attack"] == attack) & (df["defense"] == defense) & (df["preset"] == preset)
                            & (df["width"] == w)] if "error" in df else df.iloc[0:0]
                errors = errors[errors["error"].notna()] if len(errors) else errors
                cells.append(f"refused or failed ({len(errors)}x): {str(errors['error'].iloc[0])[:80]}"
                             if len(errors) else "not run")
                continue
            r = r.iloc[0]
            cells.append(f"{mean_sd_text(r.drop_mean, r.drop_sd)} / {mean_sd_text(r.asr_mean, r.asr_sd)}, {r.seconds:.0f} s (n={r.n})")
        out.append(f"| {attack} | {defense} | {preset} | " + " | ".join(cells) + " |")
    return [*out, ""]


META_NOTE = ("What the benchmark run store said beyond the per-run rows of the CSV beside this file, kept so that "
             "`python scripts/benchmark.py write` regenerates the document from the CSV where the store is not at "
             "hand: the runs it left out (earlier weights, earlier preset versions) and which cells had runs on an "
             "earlier preset version; the clean reference rows (measured, reused while the clean suspects' "
             "fingerprints and the trigger stay the same); the capacity study's section as last written from the "
             "store (bench-runs/capacity).")


def _meta_path(out: Path) -> Path:
    return out.with_name(out.stem + "-meta.json")


def write_doc(args: argparse.Namespace) -> int:
    from runs.store import RunStore
    from suspects.atomic import write_text

    out = Path(args.out)
    csv = out.with_name(out.stem + "-runs.csv")
    meta_file = _meta_path(out)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    store = RunStore(args.runs) if Path(args.runs).is_dir() else None
    rows = store_rows(store) if store is not None else None
    from_csv = args.from_csv or ((rows is None or rows.empty) and csv.is_file())
    if from_csv:
        if not csv.is_file():
            print(f"no runs CSV at {csv}: write from a run store first", file=sys.stderr)
            return 2
        results, runs = summarise(csv_rows(csv), meta)
        capacity = list(meta.get("capacity") or [])
        print(f"regenerating {out} from {csv}"
              + ("" if args.from_csv else f" (the run store {args.runs} has no benchmark runs)"))
    else:
        if rows is None:
            import pandas as pd

            rows = pd.DataFrame()
        if csv.is_file():  # the CSV accumulates: runs of earlier stores stay unless the store redid them
            rows = merge_with_csv(rows, csv_rows(csv))
        results, runs = summarise(rows, meta if csv.is_file() else None)
        capacity = capacity_section(Path(args.runs) / "capacity") or list(meta.get("capacity") or [])
    if not results:
        stale = int(runs.attrs.get("stale", 0))
        old = int(runs.attrs.get("old_presets", 0))
        left_out = []
        if stale:
            left_out.append(f"{stale} on earlier weights")
        if old:
            left_out.append(f"{old} with an earlier version of a preset")
        print(f"no finished benchmark runs on the current demo suspects in {args.runs}"
              + (f" ({', '.join(left_out)})" if left_out else "") + ": run `python scripts/benchmark.py run` first",
              file=sys.stderr)
        if not capacity:
            return 2
        out.write_text("\n".join([
            *HEADER, "",
            "**No benchmark runs on the current demo suspects yet** (`python scripts/benchmark.py run` fills them)"
            + (f"; the store's {stale} runs were made on earlier weights of the demo suspects and are left out"
               if stale else "") + ".", "", *capacity]))
        print(f"wrote {out} (the capacity study only)")
        return 0
    if not from_csv:  # the store is the source: it writes the CSV and what the CSV cannot hold
        runs[CSV_COLUMNS].sort_values(["attack", "defense", "preset", "seed", "suspect"]).to_csv(
            csv, index=False, float_format="%.4f")
        meta = {"left_out": {"earlier_weights": int(runs.attrs.get("stale", 0)),
                             "earlier_presets": int(runs.attrs.get("old_presets", 0))},
                "preset_changes": runs.attrs.get("preset_changes") or [],
                "references": meta.get("references") or {}, "capacity": capacity}
        # the document always comes from the CSV, so regenerating it from the CSV gives the same bytes
        results, runs = summarise(csv_rows(csv), meta)
    known = meta.get("references") or {}
    references = known if args.no_measure else reference_rows(list(results), known)
    meta = {"note": META_NOTE, **{k: v for k, v in meta.items() if k != "note"}, "references": references}
    text = render(results, csv.name, runs, references)
    if capacity:
        text += "\n" + "\n".join(capacity)
    write_text(meta_file, json.dumps(meta, indent=1) + "\n")
    out.write_text(text)
    print(f"wrote {out} ({sum(len(g) for _, g in results.values())} groups, {len(runs)} runs)"
          + ("" if from_csv else f" and {csv}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("run", "write", "all"))
    ap.add_argument("--runs", default="bench-runs", help="the benchmark's run store (default ./bench-runs)")
    ap.add_argument("--out", default=str(DOC))
    ap.add_argument("--from-csv", action="store_true",
                    help="regenerate the document from the runs CSV beside --out (and its -meta.json), not the store; "
                         "the default when the store holds no benchmark runs")
    ap.add_argument("--no-measure", action="store_true",
                    help="do not measure the clean reference rows; use those the -meta.json holds")
    ap.add_argument("--defenses", default="", help="comma-separated (default: every registered defense)")
    ap.add_argument("--suspects", default=",".join(ATTACKS),
                    help="comma-separated attacks (each runs on its built test suspects) or zoo:NAME test suspects")
    ap.add_argument("--presets", default="quick,paper")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per cell")
    ap.add_argument("--pool-size", type=int, help="clean pool images per run (default: the suspect's pool, <= 1000)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="run with a parameter override (a separate row in the document, labelled with it)")
    args = ap.parse_args(argv)
    status = 0
    if args.action in ("run", "all"):
        status = run_grid(args)
    if args.action in ("write", "all"):
        status = write_doc(args) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
