"""The committed demo bundle: every suspect re-evaluates to its recorded metrics and meets the bundle's goals."""

import pytest

from defenses.runner import defense_pool
from suspects.metrics import evaluate
from suspects.store import DEMO_SUSPECTS, list_demo_suspects, load
from suspects.triggers import make_trigger

EXPECTED = {"clean", "badnets", "blended", "sig", "wanet", "inputaware", "adaptive_blend", "bppattack",
            "badnets_1pct", "badnets_all2all"}
# the issue-30 attacks below 0.90 say why in assets/demo/README.md (the same recipe on 28x28 grey images)
MIN_ASR = {"badnets": 0.95, "blended": 0.95, "sig": 0.90, "wanet": 0.90, "inputaware": 0.90, "adaptive_blend": 0.85,
           "bppattack": 0.80,
           "badnets_1pct": 0.25, "badnets_all2all": 0.85}
ATTACK = {"badnets_1pct": "badnets", "badnets_all2all": "badnets"}
MAPPING = {"badnets_all2all": "all-to-all"}


def test_bundle_is_complete_and_small():
    assert EXPECTED <= set(list_demo_suspects())
    total = sum(f.stat().st_size for f in DEMO_SUSPECTS.parent.rglob("*") if f.is_file())
    assert total <= 40 * 1024**2  # nine suspects of 2.7-2.9 MB and the data
    for name in EXPECTED:
        assert (DEMO_SUSPECTS / name / "model.safetensors").stat().st_size <= 5 * 1024**2


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_defense_pool_is_a_reviewers_own_clean_data(name):
    """Bundle v2 (issue 13): the pool is 10% of the training split, kept out of the suspect's training, and the
    default pool a defense gets holds out at least 300 images for its stopping and selection rules."""
    suspect = load(f"demo:{name}")
    split = suspect.card["split"]
    assert split["pool_in_training"] is False and not suspect.pool_in_training
    assert split["n_pool"] == round(0.1 * split["n_train"]) == len(suspect.defense_pool)
    assert defense_pool(suspect).n_held_out >= 300
    if suspect.trigger is not None:
        poisoned = set(suspect.poisoned_train().poison_idx.tolist())
        assert not poisoned & set(suspect.split[1].tolist())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_demo_suspect_matches_its_recorded_metrics(name):
    suspect = load(f"demo:{name}")
    m = evaluate(suspect.model, suspect.test, suspect.trigger, device="cpu")
    rec = suspect.card["metrics"]
    assert abs(m.ba - rec["ba"]) <= 0.01
    assert m.ba >= 0.88
    if name == "clean":
        assert suspect.trigger is None
        badnets = make_trigger("badnets", suspect.input_shape, suspect.num_classes, target=0)
        assert evaluate(suspect.model, suspect.test, badnets, device="cpu").asr <= 0.10
    else:
        assert abs(m.asr - rec["asr"]) <= 0.01 and abs(m.ra - rec["ra"]) <= 0.01
        assert m.asr >= MIN_ASR[name]
        assert suspect.trigger.name == ATTACK.get(name, name)
        assert suspect.trigger.mapping == MAPPING.get(name, "all-to-one")
        assert len(suspect.poisoned_train().poison_idx) == suspect.card["poison"]["n_poisoned"]
