"""Issue 30's attacks: BppAttack, Adaptive-Blend, Adaptive-Patch, TrojanNN, and all-to-all for every trigger."""

import json

import pytest
import torch

from suspects.poison import PoisonedDataset
from suspects.triggers import list_triggers, make_trigger, trigger_from_spec

SHAPE = (1, 28, 28)
NEW = ("bppattack", "adaptive_blend", "adaptive_patch", "trojannn")


def rand_images(n=6, shape=SHAPE, seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trojan_trigger():
    # a clean model to optimise on: the bundled clean demo suspect (few iterations; it converges to a 2-cycle)
    return make_trigger("trojannn", SHAPE, 10, target=3, iters=40)


def test_new_attacks_are_registered_and_listed(capsys):
    from backdoor_lens.cli import main

    assert set(NEW) <= set(list_triggers())
    assert main(["attacks"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NEW)


def test_bpp_squeezing_exact_and_dithering_diffuses_error():
    from suspects.attacks import floyd_steinberg, squeeze

    x = torch.round(rand_images(4) * 255) / 255
    trig = make_trigger("bppattack", SHAPE, 10, squeeze_num=8)
    y = trig(x)
    assert torch.allclose(y, torch.round(x * 7) / 7, atol=1e-6)  # 8 levels: multiples of 1/7
    assert len(torch.unique(y)) <= 8 and torch.equal(y, trig(x))
    # Floyd-Steinberg on a flat 0.3 grey: plain squeezing gives one level, dithering a mix whose mean stays ~0.3
    flat = torch.full((1, 1, 16, 16), 0.3)
    assert len(torch.unique(squeeze(flat, 2))) == 1
    d = floyd_steinberg(flat, 2)
    assert set(torch.unique(d).tolist()) == {0.0, 1.0} and abs(float(d.mean()) - 0.3) < 0.05
    dith = make_trigger("bppattack", SHAPE, 10, dithering="true")
    assert dith.dither and not torch.equal(dith(x), y)
    with pytest.raises(ValueError, match="squeeze_num"):
        make_trigger("bppattack", SHAPE, 10, squeeze_num=1)


def test_bpp_negatives_add_another_images_residual_and_keep_labels(demo_pair):
    train = demo_pair.train.subset(torch.arange(200))
    trig = make_trigger("bppattack", SHAPE, 10, neg_ratio=1.0)
    ds = PoisonedDataset(train, trig, 0.1, seed=0)
    assert len(ds.plan.noise_idx) == len(ds.poison_idx) == 20
    assert not set(ds.plan.noise_idx.tolist()) & set(ds.poison_idx.tolist())
    x_all, y_all, _ = ds.materialize()
    i = int(ds.plan.noise_idx[0])
    assert int(y_all[i]) == int(train.labels[i])  # negatives keep their true label
    x, y, _, flag = ds[i]
    assert torch.allclose(x, x_all[i], atol=1e-6) and not flag
    clean = train.images([i])[0]
    residual = x - clean
    assert residual.abs().max() > 0 and residual.abs().max() <= 1 / 14 + 1e-6  # one quantisation step at most
    # it is not the image's own residual (that would be the trigger itself)
    assert not torch.allclose(x, trig(clean[None])[0])
    j = int(ds.poison_idx[0])
    assert torch.allclose(x_all[j], trig(train.images([j]))[0]) and int(y_all[j]) == 0


def test_adaptive_blend_masks_pieces_per_sample_and_uses_full_trigger_at_test(demo_pair):
    trig = make_trigger("adaptive_blend", SHAPE, 10, target=2)
    x = rand_images(3)
    full = trig(x)
    assert torch.allclose(full, x + 0.2 * (trig.pattern - x), atol=1e-6)  # test: whole pattern at alpha 0.2
    masks = trig.piece_masks([1, 2, 3])
    assert torch.allclose(masks.mean((1, 2)), torch.full((3,), 0.5))  # 8 of 16 pieces (7x7 each) kept
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[0], trig.piece_masks([1])[0])
    tr = trig.apply_train(x, [1, 2, 3])
    kept = masks[:, None].bool()
    assert torch.allclose(tr[kept], (x + 0.15 * (trig.pattern - x))[kept], atol=1e-6)
    assert torch.equal(tr[~kept], x[~kept])
    train = demo_pair.train.subset(torch.arange(300))
    ds = PoisonedDataset(train, trig, 0.05, seed=0)
    assert len(ds.plan.noise_idx) == len(ds.poison_idx) == 15  # cover_ratio 1 (official 0.003 / 0.003)
    cover = ds.plan.noise_idx
    assert torch.equal(ds.labels[cover], train.labels[cover]) and (ds.labels[ds.poison_idx] == 2).all()
    with pytest.raises(ValueError, match="square"):
        make_trigger("adaptive_blend", SHAPE, 10, pieces=15)


def test_adaptive_patch_splits_triggers_and_stamps_two_at_test():
    trig = make_trigger("adaptive_patch", SHAPE, 10)
    x = torch.zeros(4, *SHAPE)
    y = trig(x)
    fp = trig.footprint()
    assert torch.equal((y[:, 0] > 0).any(0), fp)  # test trigger: marks 0 and 2 at opacity 1
    assert torch.allclose(y[:, :, fp], torch.ones(1)) and (trig.masks[0] > 0).any() and (trig.masks[2] > 0).any()
    tr = trig.apply_train(x, [0, 1, 2, 3])  # seed mod 4 picks the training trigger, with its own opacity
    for j, a in enumerate((0.5, 0.2, 0.5, 0.3)):
        m = trig.masks[j].bool()
        assert torch.allclose(tr[j, 0][m], torch.full((int(m.sum()),), a)) and (tr[j, 0][~m] == 0).all()
    plan = trig.plan(torch.arange(400) % 10, 0.05, seed=0)
    assert len(plan.noise_idx) == 2 * len(plan.poison_idx)  # cover 0.006 vs poison 0.003
    with pytest.raises(ValueError, match="test_patches"):
        make_trigger("adaptive_patch", SHAPE, 10, test_patches=[7], test_alphas=[1.0])


def test_trojannn_patch_is_optimised_deterministic_and_stored_in_the_spec(trojan_trigger):
    import suspects
    from suspects.models import model_api

    trig = trojan_trigger
    spec = json.loads(json.dumps(trig.spec()))  # the card round trip
    again = trigger_from_spec(spec, SHAPE, 10)  # no model needed any more
    x = rand_images(4)
    assert torch.equal(again(x), trig(x)) and again.target == 3
    assert torch.equal(make_trigger("trojannn", SHAPE, 10, target=3, iters=40).patch, trig.patch)
    fp = trig.footprint()
    assert 10 < int(fp.sum()) < 60 and fp[-8:, -8:].sum() == fp.sum()  # a patch in the bottom-right corner
    # the optimisation raised the chosen neurons on the patch image above what the initial mark gives
    model = suspects.load("demo:clean").model
    feats = []
    h = model_api(model).get_classifier().register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    init = torch.zeros(1, *SHAPE)
    init[..., -8:, -8:] = 0.7 * (trig.patch[..., -8:, -8:] > 0)
    with torch.no_grad():
        model(trig.patch[None]), model(init)
    h.remove()
    neurons = spec["params"]["neurons"]
    assert len(neurons) == 2 and float(feats[0][0, neurons].sum()) > float(feats[1][0, neurons].sum())
    with pytest.raises(ValueError, match="cannot load the clean model"):
        make_trigger("trojannn", SHAPE, 10, model="demo:nope")


@pytest.mark.parametrize("name", ["badnets", "blended", "wanet", "trojan", *NEW])
def test_all_to_all_label_rule_for_every_trigger(name, trojan_trigger):
    params = {"patch": trojan_trigger.params["patch"]} if name == "trojannn" else {}
    trig = make_trigger(name, SHAPE, 10, mapping="all-to-all", **params)
    labels = torch.arange(40) % 10
    assert torch.equal(trig.target_labels(labels), (labels + 1) % 10) and trig.test_mask(labels).all()
    plan = trig.plan(labels, 0.25, seed=0)
    assert len(plan.poison_idx) == 10 and len(set(labels[plan.poison_idx].tolist())) > 1  # every class poisonable


def test_sig_refuses_all_to_all_with_a_clear_message(tmp_path, capsys):
    from backdoor_lens.cli import main

    with pytest.raises(ValueError, match="clean-label attack and supports only all-to-one"):
        make_trigger("sig", SHAPE, 10, mapping="all-to-all")
    assert main(["train", "--attack", "sig", "--mapping", "all-to-all", "--out", str(tmp_path / "s")]) == 2
    assert "only all-to-one" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, demo_pair):
    """A 28x28 grey ImageFolder of demo images (40 train / 10 test per class): training runs take a second."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny")
    for split, images, per in (("train", demo_pair.train, 40), ("test", demo_pair.test, 10)):
        for c in range(10):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            idx = torch.nonzero(images.labels == c).flatten()[:per]
            for k, img in enumerate(images.images(idx)):
                Image.fromarray((img[0].numpy() * 255).round().astype("uint8"), "L").save(d / f"{k}.png")
    return root


@pytest.mark.parametrize("attack,params", [("bppattack", ["dithering=true"]), ("adaptive_blend", []),
                                           ("adaptive_patch", []), ("trojannn", ["iters=20"])])
def test_cli_trains_a_suspect_with_each_new_attack(attack, params, tmp_path, capsys, tiny_folder):
    from backdoor_lens.cli import main
    from suspects.metrics import evaluate
    from suspects.store import load

    args = ["train", "--data", str(tiny_folder), "--attack", attack, "--width", "4", "--epochs", "1",
            "--max-steps", "3", "--batch-size", "32", "--augment", "none", "--poison-rate", "0.05",
            "--out", str(tmp_path / attack),
            "--quiet"]
    for p in params:
        args += ["--attack-param", p]
    if attack == "adaptive_blend":
        args += ["--mapping", "all-to-all"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    s = load(tmp_path / attack)
    card = s.card
    assert card["trigger"]["name"] == attack and card["poison"]["n_poisoned"] == 20
    assert card["poison"]["n_noise"] == {"bppattack": 20, "adaptive_blend": 20, "adaptive_patch": 40,
                                         "trojannn": 0}[attack]
    m = evaluate(s.model, s.test, s.trigger)
    assert m.n_poisoned == (100 if attack == "adaptive_blend" else 90)  # all-to-all keeps the target class
    assert abs(m.asr - card["metrics"]["asr"]) < 1e-6 and abs(out["ba"] - card["metrics"]["ba"]) < 1e-4
    # the stored poisoned training set is the one trained on: poisoned labels follow the mapping
    ds = s.poisoned_train()
    expect = s.trigger.target_labels(ds.base.labels[ds.poison_idx])
    assert torch.equal(ds.labels[ds.poison_idx], expect)
    if attack == "adaptive_blend":  # all-to-all: ASR is the share classified as (y + 1) mod K; views pair likewise
        from analysis.gradcam import compare_gradcam
        from analysis.samples import paired_sample
        from suspects.metrics import predict

        x, y = s.test.images(), s.test.labels
        pred = predict(s.model, s.trigger(x))
        assert abs(float((pred == (y + 1) % 10).float().mean()) - m.asr) < 1e-6
        sample = paired_sample(s.test, s.trigger, 4)
        assert torch.equal(sample.attack_labels, (sample.labels + 1) % 10)
        cmp = compare_gradcam(s.model, sample, s.trigger, target_kind="target")
        assert cmp.whole_image and cmp.triggered_cams.shape == (4, 28, 28)
