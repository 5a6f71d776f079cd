"""Input-aware dynamic attack (IAD, Nguyen & Tran, NeurIPS 2020; issue 30): per-image generated trigger, joint
training through ``fit``, generators carried by the suspect card."""

import json

import pytest
import torch

from suspects.inputaware import IADTrainer, InputAware, diversity_loss, threshold
from suspects.poison import PoisonedDataset
from suspects.triggers import list_triggers, make_trigger, trigger_from_spec

SHAPE = (1, 28, 28)
TINY = {"gen_width": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


def rand_images(n=6, shape=SHAPE, seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A suspect trained through the CLI for a few steps (mask generator and joint stage), saved and re-loaded."""
    from backdoor_lens.cli import main
    from suspects.store import load

    out = tmp_path_factory.mktemp("iad") / "iad"
    argv = ["train", "--data", "demo", "--attack", "inputaware", "--attack-param", "gen_width=4",
            "--attack-param", "mask_epochs=1", "--model", "preact_resnet18", "--width", "4", "--epochs", "1",
            "--batch-size", "64", "--max-steps", "4", "--seed", "0", "--pool-fraction", "0.1", "--keep-pool-out",
            "--quiet", "--out", str(out)]
    assert main(argv) == 0
    return load(out)


def test_registered_and_listed(capsys):
    from backdoor_lens.cli import main

    assert "inputaware" in list_triggers()
    assert main(["attacks"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("inputaware"))
    assert "'lambda_norm': 100.0" in line and "'mask_density': 0.032" in line and "'cross_ratio': 1.0" in line


def test_trigger_is_sample_specific_and_deterministic():
    trig = make_trigger("inputaware", SHAPE, 10, target=2, **TINY)
    x = rand_images(4)
    pats, masks = trig.patterns(x), trig.masks(x)
    assert pats.shape == x.shape and masks.shape == (4, 28, 28)
    assert (pats[0] - pats[1]).abs().max() > 1e-3 and (masks[0] - masks[1]).abs().max() > 1e-4  # per image
    y = trig(x)
    assert torch.allclose(y, x + (pats - x) * masks[:, None], atol=1e-6)
    assert torch.equal(trig(x), y)  # no randomness
    assert torch.allclose(trig(x[1:2]), y[1:2], atol=1e-6)  # no batch effect (up to the convolutions' rounding)
    assert not y.requires_grad and all(not p.requires_grad for p in trig.pattern_net.parameters())
    # a differently seeded initialisation is another trigger; the spec rebuilds this one exactly
    assert not torch.equal(make_trigger("inputaware", SHAPE, 10, init_seed=1, **TINY)(x), y)
    again = trigger_from_spec(json.loads(json.dumps(trig.spec())), SHAPE, 10)
    assert torch.equal(again(x), y) and repr(again) == repr(trig)
    assert "generators" not in trig.params  # the weights stay out of the parameters shown in the UI


def test_footprint_is_each_images_own_mask():
    trig = make_trigger("inputaware", SHAPE, 10, **TINY)
    trig.mask_net = torch.nn.Identity()  # a mask generator whose output is the image: bright pixels get the trigger
    x = torch.zeros(2, *SHAPE)
    x[0, :, :10] = 1.0
    x[1, :, 20:] = 1.0
    m = trig.masks(x)
    one, two = trig.footprint(x[0]), trig.footprint(x[1])
    assert torch.equal(one, m[0] > 0.5) and torch.equal(two, m[1] > 0.5)
    assert one.any() and two.any() and not (one & two).any()  # different pixels for different images
    assert torch.equal(trig.footprint(x), one | two)


def test_cross_samples_take_their_partners_pattern_and_mask():
    trig = make_trigger("inputaware", SHAPE, 10, **TINY)
    x, partners = rand_images(3), rand_images(3, seed=1)
    out = trig.apply_noise(x, [1, 2, 3], partners=partners)
    expected = x + (trig.patterns(partners) - x) * trig.masks(partners)[:, None]
    assert torch.allclose(out, expected.clamp(0, 1), atol=1e-6) and not torch.allclose(out, trig(x))
    with pytest.raises(ValueError, match="partner"):
        trig.apply_noise(x, [1, 2, 3])


@pytest.mark.parametrize("params, match", [
    ({"mask_density": 0.0}, "mask_density"), ({"mask_density": 1.5}, "mask_density"),
    ({"lambda_div": -1}, "lambda_div"), ({"lambda_norm": "x"}, "lambda_norm must be a number"),
    ({"cross_ratio": -0.5}, "cross_ratio"), ({"lr_g": 0}, "lr_g"), ({"mask_epochs": 1.5}, "mask_epochs"),
    ({"gen_width": 0}, "gen_width"), ({"betas": [0.5]}, "betas"), ({"betas": [0.5, 1.0]}, "betas"),
    ({"generators": "not base64!"}, "base64"), ({"generators": 3}, "base64"), ({"strength": 1}, "unknown parameter"),
])
def test_spec_validation_errors(params, match):
    with pytest.raises(ValueError, match=match):
        make_trigger("inputaware", SHAPE, 10, **params)


def test_generators_must_fit_the_spec():
    blob = make_trigger("inputaware", SHAPE, 10, gen_width=4).spec()["params"]["generators"]
    with pytest.raises(ValueError, match="do not fit gen_width=6"):
        make_trigger("inputaware", SHAPE, 10, gen_width=6, generators=blob)
    with pytest.raises(ValueError, match="input channel"):
        make_trigger("inputaware", (3, 28, 28), 10, gen_width=4, generators=blob)
    with pytest.raises(ValueError, match="at least 4x4"):
        make_trigger("inputaware", (1, 3, 3), 10)


def test_all_to_all_labels_and_cross_plan(demo_pair):
    train = demo_pair.train.subset(torch.arange(300))
    trig = make_trigger("inputaware", SHAPE, 10, mapping="all-to-all", cross_ratio=1.0, **TINY)
    labels = torch.tensor([0, 3, 9])
    assert torch.equal(trig.target_labels(labels), torch.tensor([1, 4, 0])) and bool(trig.test_mask(labels).all())
    ds = PoisonedDataset(train, trig, 0.1, seed=0)
    poison, cross = ds.poison_idx, ds.plan.noise_idx
    assert len(poison) == len(cross) == 30 and not set(poison.tolist()) & set(cross.tolist())
    assert torch.equal(ds.labels[poison], (train.labels[poison] + 1) % 10)  # y -> (y + 1) mod K
    assert torch.equal(ds.labels[cross], train.labels[cross])  # cross samples keep their label
    one = PoisonedDataset(train, make_trigger("inputaware", SHAPE, 10, target=4, **TINY), 0.1, seed=0)
    assert bool((one.labels[one.poison_idx] == 4).all()) and bool((train.labels[one.poison_idx] != 4).all())

def test_diversity_loss_skips_identical_pairs_and_keeps_gradients_finite():
    x = rand_images(3)
    out = torch.rand(3, 1, 28, 28, requires_grad=True)
    x2 = torch.stack([x[0], x[2], x[1]])  # the first pair is one image twice (a partner can be the image itself)
    out2 = torch.stack([out[0], out[2], out[1]])
    loss = diversity_loss(x, x2, out, out2)
    rms = lambda a, b: (a - b).pow(2).mean().sqrt()  # noqa: E731
    expected = (rms(x[1], x[2]) / (rms(out[1], out[2]) + 1e-7) + rms(x[2], x[1]) / (rms(out[2], out[1]) + 1e-7)) / 2
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.isfinite(out.grad).all()

def test_joint_step_poisons_with_current_generator_and_trains_it():
    trig = make_trigger("inputaware", SHAPE, 10, lambda_div=1.0, **TINY)
    trainer = IADTrainer(trig, torch.device("cpu"), seed=0, total_steps=10)
    trig.pattern_net.eval()  # batch normalisation on running statistics: each row's stamp is a function of its image
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(28 * 28, 10)

        def forward(self, v):
            seen.append(v)
            return self.lin(v.flatten(1))

    model = Recorder()
    x, y = rand_images(6), torch.tensor([0, 0, 5, 6, 7, 8])
    roles = torch.tensor([1, 1, 2, 2, 0, 0])
    loss = trainer.loss(model, x, y, roles)
    inputs = seen[0]
    with torch.no_grad():
        stamped = x[:2] + (trig.pattern_net(x[:2]) - x[:2]) * threshold(trig.mask_net(x[:2]))
    assert torch.allclose(inputs[:2], stamped, atol=1e-6)  # poisoned rows: their own pattern and mask
    assert torch.equal(inputs[4:], x[4:])  # clean rows untouched
    for i in (2, 3):  # cross rows: the pattern and mask of another image of the batch, not their own
        assert not torch.allclose(inputs[i], trig(x[i:i + 1])[0], atol=1e-6)
        assert any(torch.allclose(inputs[i], trig.apply_noise(x[i:i + 1], [0], partners=x[j:j + 1])[0], atol=1e-6)
                   for j in range(6) if j != i)
    before = [p.detach().clone() for p in trig.pattern_net.parameters()]
    mask_before = [p.detach().clone() for p in trig.mask_net.parameters()]
    loss.backward()
    assert all(p.grad is not None for p in trig.pattern_net.parameters())
    assert all(p.grad is None for p in trig.mask_net.parameters())  # the mask generator is frozen in stage 2
    trainer.after_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trig.pattern_net.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(mask_before, trig.mask_net.parameters(), strict=True))
    trainer.finish()
    assert all(not p.requires_grad for p in trig.pattern_net.parameters())


def test_few_step_training_saves_and_reloads_the_same_trigger(trained):
    from suspects.store import load

    card = trained.card
    spec = card["trigger"]
    assert spec["name"] == "inputaware" and isinstance(spec["params"]["generators"], str)
    assert card["poison"]["n_poisoned"] == card["poison"]["n_noise"] > 0  # cross ratio 1
    assert card["split"]["pool_in_training"] is False  # the roles follow the images when the pool is left out
    trig = trained.trigger
    assert isinstance(trig, InputAware) and trig.params["gen_width"] == 4 and trig.params["mask_epochs"] == 1
    x = trained.test.images(list(range(8)))
    y = trig(x)
    # the generators were trained (mask stage and joint stage): not the initialisation any more
    fresh = make_trigger("inputaware", SHAPE, 10, gen_width=4, mask_epochs=1)
    assert not torch.equal(fresh.patterns(x), trig.patterns(x)) and not torch.equal(fresh.masks(x), trig.masks(x))
    again = load(trained.path)
    assert torch.equal(again.trigger(x), y) and repr(again.trigger) == repr(trig)
    # the poisoned training set a defense sees is made by the stored generators
    ds = again.poisoned_train()
    i = int(ds.poison_idx[0])
    img, label, orig, flag = ds[i]
    assert flag and label == 0 and torch.allclose(img, trig(ds.base.images([i]))[0], atol=1e-6)


def test_cli_reports_a_bad_parameter_in_one_line(tmp_path, capsys):
    from backdoor_lens.cli import main

    code = main(["train", "--data", "demo", "--attack", "inputaware", "--attack-param", "mask_density=2",
                 "--max-steps", "1", "--quiet", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "mask_density must lie in (0, 1]" in err and "Traceback" not in err
