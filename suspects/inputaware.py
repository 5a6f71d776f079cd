"""Input-aware dynamic attack (IAD; Nguyen & Tran, NeurIPS 2020; ``VinAIResearch/input-aware-backdoor-attack-release``,
``train.py`` / ``networks/models.py`` / ``config.py``, read and not copied).

The trigger is made per image by two small networks: a pattern generator ``G`` and a mask generator ``M``,

    x_bd = x + (G(x) - x) * m(x),   m(x) = tanh(20 M(x) - 10) / (2 + eps) + 0.5,

where both networks end in ``tanh(.) / (2 + eps) + 0.5`` (outputs in [0, 1]). The generators are trained with the
classifier, so :class:`InputAware` is a *jointly trained* trigger (``joint_training``):
:func:`suspects.training.train_suspect` gives the classifier clean images and asks :meth:`InputAware.joint_trainer`
for the per-batch loss, and :func:`suspects.training.fit` stays the one loop.

1. **Mask generator** (``mask_epochs``, official 25): ``M`` alone, on ``lambda_norm * mean(relu(m - mask_density)) +
   lambda_div * diversity(m)`` (Adam ``lr_m``, betas (0.5, 0.9), the learning rate divided by 10 at 40% and 80% of
   the stage: the official [10, 20] of 25 epochs); then frozen.
2. **Classifier and pattern generator together**: each training batch holds the poisoned samples (labels by the
   trigger's rule: target class, or ``(y + 1) % K`` for all-to-all), the *cross-trigger* samples (the image with the
   pattern and mask of another image of the batch, true label kept; ``cross_ratio`` per poisoned sample, official
   1) and clean ones. Loss: cross-entropy + ``lambda_div * mean(||x1 - x2|| / ||G(x1) - G(x2)||)`` over the poisoned
   images ``x1`` and the cross samples' partner images ``x2`` (root mean squares, as the official code). The
   classifier has the suspect's own optimiser; ``G`` has Adam ``lr_g`` (0.01), betas (0.5, 0.9), divided by 10 at
   1/3, 1/2, 2/3 and 5/6 of the steps (the official [200, 300, 400, 500] of 600 epochs).

Differences from the official code, all for small CPU-trainable suspects and exact reproduction from a card:

- Which samples are poisoned / cross is a fixed plan drawn once (``poison_rate`` and ``cross_ratio`` of the training
  set, as the other attacks here), not re-drawn per batch; each batch's share is the rate on average. The poisoned
  and cross images themselves are made afresh in every batch by the current ``G``, as in the official training.
  The poisoned training set a defense sees (:meth:`~suspects.poison.PoisonedDataset.materialize`) is made by the
  final generators.
- Both generators have the official MNIST layout (two levels of two 3x3 convolutions, a middle one, two levels back
  up; ``gen_width`` channels at the top, official 16 for MNIST, 32 with three levels for CIFAR-10) for grey and RGB
  alike, with the official conv-BN(momentum 0.05)-ReLU blocks. Every use outside training runs them in eval mode
  (running statistics), so an image's trigger does not depend on the rest of its batch. Odd sizes work (the decoder
  returns to the encoder's sizes).
- Inputs are [0, 1] images (the suspect's model normalises them itself), so patterns are not re-normalised.
- Augmentation (the suspect's ``--augment``) is applied to the clean images before the trigger, as the official
  data loader does.

The generators' weights are part of the trigger spec (``params.generators``: a base64 safetensors blob, float32,
exact), so a suspect card rebuilds the same trigger everywhere (:func:`~suspects.triggers.trigger_from_spec`); a
spec without them builds freshly initialised generators (``init_seed``), which is what training starts from.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .triggers import Trigger, register_trigger

__all__ = ["InputAware", "PatternNet", "threshold", "diversity_loss", "IADTrainer"]

EPS = 1e-7
FOOTPRINT_THRESHOLD = 0.5  # a pixel belongs to an image's trigger where its mask is above this
MAX_BLOB_CHARS = 64 * 1024 * 1024


def threshold(z: torch.Tensor) -> torch.Tensor:
    """IAD's mask squashing: ``tanh(20 z - 10) / (2 + eps) + 0.5`` (near 0 below z = 0.5, near 1 above)."""
    return torch.tanh(z * 20 - 10) / (2 + EPS) + 0.5


def _rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # clamped before the root: sqrt's gradient at 0 (two identical images) would turn every gradient into NaN
    return (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-12).sqrt()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor) -> torch.Tensor:
    """``mean(rms(x1 - x2) / (rms(out1 - out2) + eps))``: small when different images get different outputs. Pairs of
    identical images (a random partner can be the image itself) are left out."""
    d_in = (x1 - x2).pow(2).flatten(1).mean(1)
    keep = d_in > 0
    if not bool(keep.any()):
        return out1.new_zeros(()).float()
    return (d_in[keep].sqrt() / (_rms(out1[keep], out2[keep]) + EPS)).mean()


def _block(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    """The official generators' block: a 3x3 convolution, batch normalisation (momentum 0.05), ReLU (not after the
    last convolution)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PatternNet(nn.Module):
    """Small convolutional encoder-decoder with outputs in [0, 1] (``tanh / (2 + eps) + 0.5``), the official MNIST
    generator's layout: two levels of two conv-BN-ReLU blocks (``width``, ``2 * width`` channels) with 2x2
    max-pooling, a middle block, nearest upsampling back to each level's size with two blocks each, the last without
    ReLU. Batch normalisation (as the official ``Conv2dBlock``) keeps the generators from collapsing: without it, the
    mask generator's norm penalty drove every mask to exactly 0 within the 25 official epochs on the demo (a trigger
    that changes nothing; measured: ASR 0.035). In eval mode (every use but training) it uses running statistics, so
    an image's trigger does not depend on the rest of its batch."""

    def __init__(self, in_channels: int, out_channels: int, width: int):
        super().__init__()
        w = int(width)
        self.down1 = nn.Sequential(_block(in_channels, w), _block(w, w))
        self.down2 = nn.Sequential(_block(w, 2 * w), _block(2 * w, 2 * w))
        self.middle = _block(2 * w, 2 * w)
        self.up2 = nn.Sequential(_block(2 * w, 2 * w), _block(2 * w, w))
        self.up1 = nn.Sequential(_block(w, w), _block(w, out_channels, relu=False))
        # He initialisation (official: PyTorch's default): in eval mode a fresh generator's BN layers are the
        # identity, and the default initialisation shrinks the activations layer by layer, so an untrained
        # generator would give nearly the same output for every image
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.down1(x)
        size1 = a.shape[-2:]
        a = self.down2(F.max_pool2d(a, 2, ceil_mode=True))
        size2 = a.shape[-2:]
        a = self.middle(F.max_pool2d(a, 2, ceil_mode=True))
        a = self.up2(F.interpolate(a, size=size2, mode="nearest"))
        a = self.up1(F.interpolate(a, size=size1, mode="nearest"))
        return torch.tanh(a) / (2 + EPS) + 0.5


def _number(params: dict, key: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
    try:
        value = float(params[key])
    except (TypeError, ValueError):
        raise ValueError(f"inputaware {key} must be a number, got {params[key]!r}") from None
    bad = not math.isfinite(value) or value > high or (value <= low if low_open else value < low)
    if bad:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
        raise ValueError(f"inputaware {key} must lie in {span}, got {params[key]!r}")
    return value


def _integer(params: dict, key: str, low: int, high: int) -> int:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or not low <= value <= high:
        raise ValueError(f"inputaware {key} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


@register_trigger
class InputAware(Trigger):
    """Input-aware dynamic attack (Nguyen & Tran, NeurIPS 2020): every image gets its own pattern and mask from
    generator networks trained with the classifier (see the module docstring)."""

    name = "inputaware"
    description = "a per-image pattern and mask from generator networks trained with the model (input-aware dynamic)"
    defaults = {"lambda_div": 1.0, "lambda_norm": 100.0, "mask_density": 0.032, "cross_ratio": 1.0,
                "mask_epochs": 25, "lr_g": 0.01, "lr_m": 0.01, "betas": [0.5, 0.9], "gen_width": 8,
                "init_seed": 0, "generators": None}
    noise_partners = True
    joint_training = True

    def _validate(self) -> None:
        p = self.params
        _number(p, "lambda_div", 0.0)
        _number(p, "lambda_norm", 0.0)
        _number(p, "mask_density", 0.0, 1.0, low_open=True)
        _number(p, "cross_ratio", 0.0, 1e3)
        _number(p, "lr_g", 0.0, 10.0, low_open=True)
        _number(p, "lr_m", 0.0, 10.0, low_open=True)
        _integer(p, "mask_epochs", 0, 100_000)
        width = _integer(p, "gen_width", 1, 256)
        seed = _integer(p, "init_seed", 0, 2**63 - 1)
        betas = p["betas"]
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"inputaware betas must be two numbers in [0, 1) (Adam's), got {betas!r}")
        p["betas"] = [float(b) for b in betas]
        c, h, w = self.input_shape
        if min(h, w) < 4:
            raise ValueError(f"inputaware needs images of at least 4x4 pixels, got {h}x{w}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.pattern_net = PatternNet(c, c, width)
            self.mask_net = PatternNet(c, 1, width)
        blob = p.pop("generators")  # kept out of ``params`` (shown in the UI); :meth:`spec` puts it back
        if blob is not None:
            self._load_blob(blob)
        for net in (self.pattern_net, self.mask_net):
            net.eval().requires_grad_(False)

    # -- the generators' weights in the spec ---------------------------------------------------------------------
    def _state(self) -> dict[str, torch.Tensor]:
        out = {f"pattern.{k}": v for k, v in self.pattern_net.state_dict().items()}
        out.update({f"mask.{k}": v for k, v in self.mask_net.state_dict().items()})
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def _blob(self) -> str:
        from safetensors.torch import save

        return base64.b64encode(save(self._state(), metadata={"format": "inputaware-generators-v2"})).decode("ascii")

    def _load_blob(self, blob: Any) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load

        if not isinstance(blob, str) or len(blob) > MAX_BLOB_CHARS:
            raise ValueError("inputaware generators must be the base64 text a trained suspect's card holds")
        try:
            state = load(base64.b64decode(blob.encode("ascii"), validate=True))
        except (binascii.Error, UnicodeEncodeError, SafetensorError, ValueError) as err:
            raise ValueError(f"inputaware generators are not a base64 safetensors blob: {err}") from None
        parts: dict[str, dict[str, torch.Tensor]] = {"pattern": {}, "mask": {}}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head not in parts:
                raise ValueError(f"inputaware generators hold an unknown tensor {key!r}")
            if not torch.isfinite(value).all():
                raise ValueError(f"inputaware generators: tensor {key!r} is not finite")
            parts[head][rest] = value.float()
        for head, net in (("pattern", self.pattern_net), ("mask", self.mask_net)):
            try:
                net.load_state_dict(parts[head], strict=True)
            except RuntimeError:
                raise ValueError(f"inputaware generators do not fit gen_width={self.params['gen_width']} and "
                                 f"{self.input_shape[0]} input channel(s) (or are of the earlier layout without "
                                 "batch normalisation: retrain the suspect)") from None

    def digest(self) -> str:
        """Short sha256 of the generators' weights (they are not in ``params``)."""
        h = hashlib.sha256()
        for k, v in sorted(self._state().items()):
            h.update(k.encode())
            h.update(v.numpy().tobytes())
        return h.hexdigest()[:12]

    def __repr__(self) -> str:
        return (f"InputAware(target={self.target}, mapping={self.mapping!r}, params={self.params}, "
                f"generators={self.digest()})")

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        spec["params"]["generators"] = self._blob()
        return spec

    # -- the trigger ----------------------------------------------------------------------------------------------
    def _run(self, fn: Callable[..., torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        """``fn(*xs)`` where the generators live, in float32 without autocast or gradients; on the first input's
        device and dtype."""
        from .device import full_precision

        dev = next(self.pattern_net.parameters()).device
        nets = (self.pattern_net, self.mask_net)
        modes = [n.training for n in nets]
        for n in nets:  # running statistics, never the batch's (and never updating them), even mid-training
            n.eval()
        try:
            with torch.no_grad(), full_precision(dev):
                out = fn(*(v.detach().to(device=dev, dtype=torch.float32) for v in xs))
        finally:
            for n, mode in zip(nets, modes, strict=True):
                n.train(mode)
        return out.to(device=xs[0].device, dtype=xs[0].dtype)

    def masks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) per-image masks m(x) in [0, 1] of a batch ``x`` (B, C, H, W)."""
        x = x if x.dim() == 4 else x.unsqueeze(0)
        return self._run(lambda v: threshold(self.mask_net(v))[:, 0], x)

    def patterns(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) per-image patterns G(x) in [0, 1]."""
        x = x if x.dim() == 4 else x.unsqueeze(0)
        return self._run(self.pattern_net, x)

    def _stamp(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``x`` with the pattern and mask that ``source`` (same shape) gets."""
        return self._run(lambda v, s: v + (self.pattern_net(s) - v) * threshold(self.mask_net(s)), x, source)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._stamp(x, x)

    def _noise_plan(self, labels, poison, exclude, gen) -> torch.Tensor:
        return self._extra_plan(labels, poison, exclude, gen, float(self.params["cross_ratio"]))

    def apply_noise(self, x: torch.Tensor, seeds: Sequence[int], partners: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-trigger samples: each image with the pattern and mask of its partner (another training image)."""
        if partners is None:
            raise ValueError("inputaware cross samples need one partner image per sample")
        return self._stamp(x, partners).clamp(0, 1)

    def footprint(self, x: torch.Tensor | None = None, tol: float = 1.0 / 255) -> torch.Tensor:
        """(H, W): where the mask of ``x`` (one image: its own trigger; a batch: any of them) exceeds 0.5; without
        ``x``, on mid-grey and four random images as the base class."""
        if x is None:
            g = torch.Generator().manual_seed(0)
            x = torch.cat([torch.full((1, *self.input_shape), 0.5), torch.rand((4, *self.input_shape), generator=g)])
        return (self.masks(x) > FOOTPRINT_THRESHOLD).any(dim=0)

    sample_specific = True

    def footprints(self, x: torch.Tensor, tol: float = 1.0 / 255) -> torch.Tensor:
        """(B, H, W): each image's own trigger pixels (its mask above 0.5), not the batch's union."""
        return self.masks(x) > FOOTPRINT_THRESHOLD

    # -- training (stage 1 here; stage 2 per batch in IADTrainer) ---------------------------------------------------
    def joint_trainer(self, images: torch.Tensor, *, device: torch.device | str, batch_size: int, seed: int,
                      max_steps: int | None = None, total_steps: int | None = None,
                      augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      progress: Callable[[float, str, dict], None] | None = None) -> IADTrainer:
        """Train the mask generator on ``images`` (the classifier's clean training images; ``mask_epochs`` epochs, at
        most ``max_steps`` steps), freeze it, and return the per-batch trainer of the classifier and ``G``
        (``total_steps``: the classifier's steps, for ``G``'s schedule)."""
        from .training import fit

        p = self.params
        device = torch.device(device)
        gen = torch.Generator().manual_seed(int(seed) + 101)
        n = len(images)
        steps_per_epoch = max(1, math.ceil(n / batch_size))
        epochs = int(p["mask_epochs"])
        mask_steps = epochs * steps_per_epoch
        if max_steps is not None:
            mask_steps = min(mask_steps, int(max_steps))
        self.mask_net.to(device).train().requires_grad_(True)
        self.pattern_net.to(device)
        if mask_steps > 0:
            opt = torch.optim.Adam(self.mask_net.parameters(), lr=float(p["lr_m"]), betas=tuple(p["betas"]))
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(0.4 * mask_steps), int(0.8 * mask_steps)], 0.1)
            lambda_norm, lambda_div, density = float(p["lambda_norm"]), float(p["lambda_div"]), float(p["mask_density"])

            def batches(epoch: int):
                perm1, perm2 = torch.randperm(n, generator=gen), torch.randperm(n, generator=gen)
                for start in range(0, n, batch_size):
                    x1, x2 = images[perm1[start:start + batch_size]], images[perm2[start:start + batch_size]]
                    if augment is not None:
                        x1, x2 = augment(x1), augment(x2)
                    yield x1.to(device), x2.to(device)

            def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
                x1, x2 = batch
                m1, m2 = threshold(self.mask_net(x1)), threshold(self.mask_net(x2))
                return lambda_norm * F.relu(m1 - density).mean() + lambda_div * diversity_loss(x1, x2, m1, m2)

            def tick(s) -> None:
                if progress is not None and s.step % 10 == 0:
                    progress(0.0, f"mask generator: epoch {s.epoch + 1}/{epochs}", {"mask_loss": s.epoch_loss})

            fit(self.mask_net, batches, loss_fn, opt, device=device, epochs=epochs, scheduler=sched, amp=False,
                max_steps=mask_steps, tick=tick)
        self.mask_net.eval().requires_grad_(False)
        return IADTrainer(self, device, int(seed), total_steps)


class IADTrainer:
    """Stage 2 of IAD, one batch at a time inside :func:`suspects.training.fit`: :meth:`loss` builds the batch's
    poisoned and cross images with the current ``G`` and returns cross-entropy + diversity; :meth:`after_step`
    (fit's ``after_step``) steps ``G``'s own optimiser; :meth:`finish` freezes ``G`` and moves both to the CPU."""

    def __init__(self, trigger: InputAware, device: torch.device, seed: int, total_steps: int | None):
        p = trigger.params
        self.trigger = trigger
        self.device = device
        self.gen = torch.Generator().manual_seed(seed + 202)
        self.lambda_div = float(p["lambda_div"])
        net = trigger.pattern_net.to(device).train().requires_grad_(True)
        self.opt = torch.optim.Adam(net.parameters(), lr=float(p["lr_g"]), betas=tuple(p["betas"]))
        steps = max(1, int(total_steps or 1))
        milestones = sorted({max(1, int(steps * f)) for f in (1 / 3, 1 / 2, 2 / 3, 5 / 6)})
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones, 0.1)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, roles: torch.Tensor) -> torch.Tensor:
        """``roles``: 0 clean, 1 poisoned (``y`` already the attack's label), 2 cross-trigger (true label)."""
        t = self.trigger
        roles = roles.to(x.device)
        bd = torch.nonzero(roles == 1).flatten()
        cross = torch.nonzero(roles == 2).flatten()
        inputs = x
        div = x.new_zeros(())
        if len(bd):
            xb = x[bd]
            pat_bd = t.pattern_net(xb)
            with torch.no_grad():
                m_bd = threshold(t.mask_net(xb))
            inputs = inputs.index_put((bd,), xb + (pat_bd - xb) * m_bd)
        if len(cross):
            b = len(x)
            # each cross sample's partner: another image of the batch (a random cyclic shift of a random order)
            order = torch.randperm(b, generator=self.gen)
            partner_of = torch.empty(b, dtype=torch.long)
            partner_of[order] = order.roll(-1)
            partners = x[partner_of.to(x.device)[cross]] if b > 1 else x[cross]
            pat_x2 = t.pattern_net(partners)
            with torch.no_grad():
                m_x2 = threshold(t.mask_net(partners))
            xc = x[cross]
            inputs = inputs.index_put((cross,), xc + (pat_x2 - xc) * m_x2)
            k = min(len(bd), len(cross))
            if k and self.lambda_div > 0:  # the poisoned images against the cross partners, as the official code
                div = diversity_loss(x[bd[:k]], partners[:k], pat_bd[:k], pat_x2[:k])
        return F.cross_entropy(model(inputs), y) + self.lambda_div * div

    def after_step(self) -> None:
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def finish(self) -> None:
        for net in (self.trigger.pattern_net, self.trigger.mask_net):
            net.cpu().eval().requires_grad_(False)
