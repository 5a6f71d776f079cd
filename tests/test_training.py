import torch

from suspects.metrics import der, evaluate, predict
from suspects.store import load
from suspects.training import TrainConfig, augment_batch, train_suspect


def test_tiny_training_run_plants_a_backdoor(tmp_path):
    """A few dozen SGD steps on the demo data with BadNets: ASR rises well above chance."""
    cfg = TrainConfig(data={"name": "demo"}, model="preact_resnet18", width=8, attack="badnets",
                      attack_params={"size": 5}, poison_rate=0.3, epochs=1, max_steps=80, batch_size=128, lr=0.05,
                      augment="none", seed=0)
    seen = []
    suspect = train_suspect(cfg, tmp_path / "s", progress=lambda f, msg, m: seen.append((f, msg, m)))
    assert seen and seen[-1][0] == 1.0 and "ba" in seen[-1][2]
    m = evaluate(suspect.model, suspect.test, suspect.trigger, limit=600)
    # chance level: how often the same model says "target" on clean non-target images
    test = suspect.test.subset(torch.arange(600))
    non_target = test.labels != 0
    clean_target_rate = float((predict(suspect.model, test.images()[non_target]) == 0).float().mean())
    assert m.asr > 0.5, m
    assert m.asr > clean_target_rate + 0.3, (m.asr, clean_target_rate)
    # the folder is a complete suspect: card, poisoned indices, metrics that match a re-evaluation
    again = load(tmp_path / "s")
    card = again.card
    assert card["poison"]["n_poisoned"] == 3000 and len(again.poisoned_train().poison_idx) == 3000
    assert not set(again.poisoned_train().poison_idx.tolist()) & set(again.split[1].tolist())
    full = evaluate(again.model, again.test, again.trigger)
    assert abs(full.ba - card["metrics"]["ba"]) < 1e-6 and abs(full.asr - card["metrics"]["asr"]) < 1e-6
    assert card["training"]["seed"] == 0 and card["metric_definitions"]["asr"].startswith("attack success rate")


def test_augment_batch_shapes_and_identity():
    x = torch.rand(5, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, "none", g), x)
    y = augment_batch(x, "crop-flip", g)
    assert y.shape == x.shape
    # pad 0 crop is the identity
    assert torch.equal(augment_batch(x, "crop", g, pad=0), x)


def test_der_definition():
    assert der(0.9, 1.0, 0.9, 0.0) == 1.0
    assert der(0.9, 1.0, 0.9, 1.0) == 0.5
    assert abs(der(0.9, 0.95, 0.85, 0.05) - ((0.9 - 0.05) + 1) / 2) < 1e-9
    assert der(0.9, 0.2, 0.95, 0.4) == 0.5  # improvements in BA and rises in ASR are clipped at 0
