import pytest
import torch

from suspects.poison import PoisonedDataset
from suspects.triggers import list_triggers, make_trigger, trigger_from_spec

SHAPE = (1, 28, 28)


def rand_images(n=6, shape=SHAPE, seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def test_registry_lists_all_attacks():
    assert {"badnets", "blended", "sig", "wanet", "trojan"} <= set(list_triggers())
    with pytest.raises(ValueError, match="unknown attack"):
        make_trigger("nope", SHAPE, 10)


def test_badnets_default_is_3x3_white_bottom_right_pixel_exact():
    trig = make_trigger("badnets", (3, 32, 32), 10)
    x = rand_images(4, (3, 32, 32))
    y = trig(x)
    assert torch.equal(y[:, :, -3:, -3:], torch.ones(4, 3, 3, 3))
    untouched = torch.ones(32, 32, dtype=torch.bool)
    untouched[-3:, -3:] = False
    assert torch.equal(y[:, :, untouched], x[:, :, untouched])
    assert trig.footprint().sum() == 9 and trig.footprint()[-3:, -3:].all()


def test_badnets_position_size_pattern():
    trig = make_trigger("badnets", SHAPE, 10, size=4, position=[2, 5], pattern="checkerboard")
    x = torch.full((1, *SHAPE), 0.5)
    y = trig(x)
    patch = y[0, 0, 2:6, 5:9]
    assert torch.equal(patch, torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.float))
    assert (y - x).abs().sum() > 0 and y[0, 0, 0, 0] == 0.5
    with pytest.raises(ValueError, match="does not fit"):
        make_trigger("badnets", SHAPE, 10, size=4, position=[26, 26])


def test_blended_alpha_is_exact():
    trig = make_trigger("blended", SHAPE, 10, alpha=0.3, pattern_seed=5)
    x = rand_images()
    y = trig(x)
    expected = 0.7 * x + 0.3 * trig.pattern
    assert torch.allclose(y, expected, atol=1e-6)
    # same seed, same pattern; another seed, another pattern
    assert torch.equal(make_trigger("blended", SHAPE, 10, pattern_seed=5).pattern, trig.pattern)
    assert not torch.equal(make_trigger("blended", SHAPE, 10, pattern_seed=6).pattern, trig.pattern)
    with pytest.raises(ValueError, match="alpha"):
        make_trigger("blended", SHAPE, 10, alpha=1.5)


def test_blended_from_image_file(tmp_path):
    from PIL import Image

    Image.new("L", (10, 10), color=255).save(tmp_path / "p.png")
    trig = make_trigger("blended", SHAPE, 10, alpha=0.5, pattern=str(tmp_path / "p.png"))
    y = trig(torch.zeros(1, *SHAPE))
    assert torch.allclose(y, torch.full_like(y, 0.5))


def test_sig_is_clean_label_and_poisons_only_target_class():
    trig = make_trigger("sig", SHAPE, 10, target=3)
    labels = torch.arange(100) % 10
    plan = trig.plan(labels, rate=0.05, seed=1)
    assert len(plan.poison_idx) == 5
    assert (labels[plan.poison_idx] == 3).all()
    base_pixels = (torch.rand(100, *SHAPE) * 255).byte()
    from suspects.data import ImageSet

    ds = PoisonedDataset(ImageSet(base_pixels, labels, [str(i) for i in range(10)]), trig, 0.05, 1)
    assert torch.equal(ds.labels, labels)  # clean-label: labels untouched
    x, _, _, flag = ds[int(plan.poison_idx[0])]
    assert flag
    with pytest.raises(ValueError, match="only 10 are eligible"):
        trig.plan(labels, rate=0.5)
    with pytest.raises(ValueError, match="clean-label"):
        make_trigger("sig", SHAPE, 10, mapping="all-to-all")


def test_sig_signal_shape():
    trig = make_trigger("sig", SHAPE, 10, delta=20, f=6)
    x = torch.full((1, *SHAPE), 0.5)
    d = trig(x) - x
    assert torch.allclose(d[0, 0, 0], d[0, 0, 13])  # same in every row
    assert abs(d.max().item() - 20 / 255) < 2e-3


def test_all_to_one_and_all_to_all_label_rules():
    labels = torch.tensor([0, 1, 2, 9])
    one = make_trigger("badnets", SHAPE, 10, target=2)
    assert one.target_labels(labels).tolist() == [2, 2, 2, 2]
    assert one.test_mask(labels).tolist() == [True, True, False, True]
    allall = make_trigger("badnets", SHAPE, 10, mapping="all-to-all")
    assert allall.target_labels(labels).tolist() == [1, 2, 3, 0]
    assert allall.test_mask(labels).all()
    plan = one.plan(torch.arange(50) % 10, rate=0.2, seed=0)
    assert ((torch.arange(50) % 10)[plan.poison_idx] != 2).all()


def test_wanet_deterministic_small_warp_and_noise_mode():
    trig = make_trigger("wanet", SHAPE, 10, s=0.5, k=4)
    x = rand_images()
    y1, y2 = trig(x), trig(x)
    assert torch.equal(y1, y2)
    assert 0 < (y1 - x).abs().mean() < 0.2
    assert torch.equal(make_trigger("wanet", SHAPE, 10).grid, trig.grid)
    plan = trig.plan(torch.arange(200) % 10, rate=0.1, seed=0)
    assert len(plan.noise_idx) == 2 * len(plan.poison_idx)
    assert not set(plan.noise_idx.tolist()) & set(plan.poison_idx.tolist())
    n1 = trig.apply_noise(x[:2], [1, 2])
    assert torch.equal(n1, trig.apply_noise(x[:2], [1, 2])) and not torch.equal(n1, y1[:2])


def test_trojan_patch_and_spec_round_trip():
    trig = make_trigger("trojan", (3, 32, 32), 10, target=4)
    x = torch.zeros(2, 3, 32, 32)
    y = trig(x)
    fp = trig.footprint()
    assert fp.sum() > 5 and (y[:, :, ~fp] == 0).all() and (y[:, :, fp] == 1).all()
    again = trigger_from_spec(trig.spec(), (3, 32, 32), 10)
    assert torch.equal(again(x), y) and again.target == 4


def test_poison_plan_respects_exclusion_and_rate():
    trig = make_trigger("badnets", SHAPE, 10)
    labels = torch.arange(1000) % 10
    exclude = torch.arange(0, 1000, 2)
    plan = trig.plan(labels, 0.1, seed=3, exclude=exclude)
    assert len(plan.poison_idx) == 100
    assert not set(plan.poison_idx.tolist()) & set(exclude.tolist())
    assert torch.equal(plan.poison_idx, trig.plan(labels, 0.1, seed=3, exclude=exclude).poison_idx)


def test_poisoned_dataset_items_and_materialize_agree(demo_pair):
    from suspects.data import defense_pool_split

    train = demo_pair.train.subset(torch.arange(300))
    trig = make_trigger("wanet", train.input_shape, 10, target=1)
    _, pool = defense_pool_split(len(train), 0.1, 0)
    ds = PoisonedDataset(train, trig, 0.1, seed=0, exclude=pool)
    x_all, y_all, flags = ds.materialize()
    for i in [int(ds.poison_idx[0]), int(ds.plan.noise_idx[0]), int(pool[0])]:
        x, y, y0, flag = ds[i]
        assert torch.allclose(x, x_all[i], atol=1e-6) and y == int(y_all[i]) and flag == bool(flags[i])
        assert y0 == int(train.labels[i])
    assert (y_all[ds.poison_idx] == 1).all() and flags.sum() == 30
    assert not flags[pool].any()
