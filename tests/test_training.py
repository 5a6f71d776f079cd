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


# --- the one training loop ---------------------------------------------------------------------------------------


def _toy_problem(seed: int = 0):
    """Two Gaussian blobs in 8 dimensions and a small MLP (a few steps of SGD separate them)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(64) % 2
    x = torch.randn(64, 8, generator=g) + 2.0 * (2 * y[:, None] - 1).float()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return model, x, y


def _batches(x, y, bs=16):
    return lambda epoch: ((x[s:s + bs], y[s:s + bs]) for s in range(0, len(x), bs))


class _CountingScaler(torch.amp.GradScaler):
    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaled = 0
        _CountingScaler.made.append(self)

    def scale(self, outputs):
        self.scaled += 1
        return super().scale(outputs)


def test_fit_runs_bf16_autocast_on_the_cpu_without_a_scaler(monkeypatch):
    """The AMP path on a CPU: bfloat16 autocast (the forward really runs in bf16), loss falls, gradients finite,
    and no gradient scaler is ever made (bf16 has float32's exponent range)."""
    import torch.nn.functional as F

    from suspects.training import fit

    _CountingScaler.made = []
    monkeypatch.setattr(torch.amp, "GradScaler", _CountingScaler)
    model, x, y = _toy_problem()
    dtypes = []

    def loss_fn(batch):
        xb, yb = batch
        logits = model(xb)
        dtypes.append(logits.dtype)
        return F.cross_entropy(logits.float(), yb), len(yb)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = fit(model, _batches(x, y), loss_fn, opt, device="cpu", epochs=4, amp=torch.bfloat16)
    assert set(dtypes) == {torch.bfloat16}
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert _CountingScaler.made == []


def test_float16_is_the_choice_that_gets_a_scaler(monkeypatch):
    """amp_dtype picks bf16 where a GPU supports it, fp16 on older GPUs, nothing on the CPU; only fp16 is scaled,
    and fit then really steps through the scaler (CPU float16 autocast with torch's CPU GradScaler)."""
    import torch.nn.functional as F

    from suspects.device import amp_dtype, grad_scaler, needs_grad_scaler
    from suspects.training import fit

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_dtype("cuda") == torch.float16 and needs_grad_scaler(amp_dtype("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype("cuda") == torch.bfloat16 and not needs_grad_scaler(amp_dtype("cuda"))
    assert amp_dtype("cuda", enabled=False) is None and amp_dtype("cpu") is None and amp_dtype("mps") is None
    assert isinstance(grad_scaler("cpu", torch.float16), torch.amp.GradScaler)
    assert grad_scaler("cpu", torch.bfloat16) is None and grad_scaler("cpu", None) is None

    _CountingScaler.made = []
    monkeypatch.setattr(torch.amp, "GradScaler", _CountingScaler)
    model, x, y = _toy_problem(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = fit(model, _batches(x, y), lambda b: F.cross_entropy(model(b[0]).float(), b[1]), opt, device="cpu",
                 epochs=3, amp=torch.float16)
    assert len(_CountingScaler.made) == 1 and _CountingScaler.made[0].scaled == 3 * 4
    assert losses[-1] < losses[0]


def test_fit_order_of_hooks_weights_and_stopping():
    """Per-epoch means weighted by what loss_fn returns; hooks in their documented order; max_steps and
    should_stop end the run before the next batch is drawn, the epoch in progress still being closed."""
    import torch.nn.functional as F

    from suspects.training import fit

    model, x, y = _toy_problem(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    events, drawn = [], []

    def batches(epoch):
        for s in (0, 40):  # a batch of 40 and one of 24
            drawn.append((epoch, s))
            yield x[s:s + 40], y[s:s + 40]

    def loss_fn(batch):
        assert model.training
        return F.cross_entropy(model(batch[0]), batch[1]), len(batch[1])

    per_batch = []
    losses = fit(model, batches, loss_fn, opt, device="cpu", epochs=3, max_steps=5,
                 after_step=lambda: events.append("after_step"),
                 tick=lambda s: (events.append("tick"), per_batch.append((s.loss, s.step))),
                 end_epoch=lambda e, loss: (events.append(f"end {e}"), model.eval()))
    assert events[:3] == ["after_step", "tick", "after_step"] and events.count("tick") == 5
    assert [e for e in events if e.startswith("end")] == ["end 0", "end 1", "end 2"]
    assert drawn == [(0, 0), (0, 40), (1, 0), (1, 40), (2, 0)]  # the 6th batch is never drawn
    (l1, _), (l2, _) = per_batch[:2]
    assert abs(losses[0] - (40 * l1 + 24 * l2) / 64) < 1e-6
    assert len(losses) == 3 and abs(losses[2] - per_batch[4][0]) < 1e-6  # the partial epoch's mean
    calls = []
    out = fit(model, batches, loss_fn, opt, device="cpu", epochs=3, should_stop=lambda: len(calls) >= 3,
              tick=lambda s: calls.append(s))
    assert len(calls) == 3 and len(out) == 2


def test_keep_pool_out_trains_without_the_defense_pool(tmp_path, monkeypatch):
    """``train_on_pool=False``: the clean defense pool is never a training image, and the training-time defenses'
    view of the poisoned training set leaves it out too."""
    import suspects.training as training
    from defenses.retrain import poisoned_training_set
    from defenses.runner import defense_pool

    sizes = []
    real = training.augment_batch
    monkeypatch.setattr(training, "augment_batch", lambda x, *a, **k: (sizes.append(len(x)), real(x, *a, **k))[1])
    cfg = TrainConfig(data={"name": "demo"}, model="preact_resnet18", width=4, attack="badnets", poison_rate=0.1,
                      epochs=1, batch_size=1000, lr=0.05, augment="none", pool_fraction=0.1, train_on_pool=False,
                      seed=0)
    suspect = train_suspect(cfg, tmp_path / "s")
    assert sum(sizes) == 9000  # 10,000 demo training images minus the 1,000-image pool
    again = load(tmp_path / "s")
    assert again.card["split"]["pool_in_training"] is False and again.card["split"]["n_pool"] == 1000
    pool = defense_pool(again, 500, seed=0)
    seen = set(poisoned_training_set(again, pool).index.tolist())
    assert len(seen) == 9000 and not seen & set(again.split[1].tolist())
    assert suspect.card["training"]["train_on_pool"] is False
