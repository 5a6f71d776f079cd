"""DBD stage 3: semi-supervised fine-tuning of the whole model with MixMatch (Berthelot et al., "MixMatch: A
Holistic Approach to Semi-Supervised Learning", NeurIPS 2019) on the labelled / label-dropped split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from suspects.device import to_device
from suspects.training import FitStep, augment_batch, fit

from ..common import head
from ..retrain import TrainingSet

__all__ = ["lambda_u_at", "mixmatch_epoch"]


def lambda_u_at(t: float, lambda_u: float, rampup: int) -> float:
    """lambda_u(t) = lambda_u * clip(t / rampup, 0, 1), t in epochs from the start of stage 2."""
    if rampup <= 0:
        return float(lambda_u)
    return float(lambda_u) * min(max(t / rampup, 0.0), 1.0)


class _Cycler:
    """Endless random batches without replacement from ``index`` (reshuffled after each pass)."""

    def __init__(self, index: torch.Tensor, batch_size: int, gen: torch.Generator):
        self.index, self.bs, self.gen = index, min(batch_size, len(index)), gen
        self.perm, self.pos = index[torch.randperm(len(index), generator=gen)], 0

    def next(self) -> torch.Tensor:
        if self.pos + self.bs > len(self.perm):
            self.perm, self.pos = self.index[torch.randperm(len(self.index), generator=self.gen)], 0
        out = self.perm[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return out


def mixmatch_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: TrainingSet, labelled: torch.Tensor,
                   device, iterations: int, batch_size: int, T: float, mix_alpha: float, lambda_u: float,
                   rampup: int, t0: float, augment: str, gen: torch.Generator, tick=None,
                   label: str = "", scheduler=None) -> dict:
    """One MixMatch epoch on the whole model: ``labelled`` keep their labels, the others are unlabelled.
    ``scheduler`` (optional) is stepped after every iteration."""
    num_classes = head(model).out_features
    xi = torch.nonzero(labelled).flatten()
    ui = torch.nonzero(~labelled).flatten()
    xs = _Cycler(xi, batch_size, gen)
    us = _Cycler(ui, batch_size, gen) if len(ui) >= 2 else None
    beta = torch.distributions.Beta(torch.tensor(float(mix_alpha)), torch.tensor(float(mix_alpha)))
    acc = {"x": 0.0, "u": 0.0, "lambda_u": 0.0}

    def loss_fn(it: int) -> torch.Tensor:
        bx = xs.next()
        x1 = augment_batch(data.x[bx], augment, gen)
        tx = F.one_hot(data.y[bx], num_classes).float()
        inputs, targets = [x1], [tx]
        if us is not None:
            bu = us.next()
            u1 = augment_batch(data.x[bu], augment, gen)
            u2 = augment_batch(data.x[bu], augment, gen)
            with torch.no_grad():
                p = (F.softmax(model(to_device(u1, device)).float(), 1)
                     + F.softmax(model(to_device(u2, device)).float(), 1)) / 2
            p = p.cpu() ** (1.0 / T)
            q = p / p.sum(1, keepdim=True)
            inputs += [u1, u2]
            targets += [q, q]
        all_x, all_t = torch.cat(inputs), torch.cat(targets)
        lam = float(beta.sample())
        lam = max(lam, 1.0 - lam)
        perm = torch.randperm(len(all_x), generator=gen)
        mixed_x = to_device(lam * all_x + (1 - lam) * all_x[perm], device)
        mixed_t = (lam * all_t + (1 - lam) * all_t[perm]).to(device)
        logits = model(mixed_x).float()
        nx = len(bx)
        loss_x = -(F.log_softmax(logits[:nx], 1) * mixed_t[:nx]).sum(1).mean()
        if us is not None:
            loss_u = ((F.softmax(logits[nx:], 1) - mixed_t[nx:]) ** 2).mean()
        else:
            loss_u = torch.zeros((), device=logits.device)
        acc["lambda_u"] = lambda_u_at(t0 + it / iterations, lambda_u, rampup)
        acc["x"] += float(loss_x.detach())
        acc["u"] += float(loss_u.detach())
        return loss_x + acc["lambda_u"] * loss_u

    def on_step(s: FitStep) -> None:
        if tick is not None:
            tick((s.batch + 1) / iterations, label)

    fit(model, range(iterations), loss_fn, opt, device=device, scheduler=scheduler, tick=on_step)
    return {"loss_x": acc["x"] / iterations, "loss_u": acc["u"] / iterations, "lambda_u": acc["lambda_u"]}
