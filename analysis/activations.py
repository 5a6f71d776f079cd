"""Per-channel activation statistics, clean vs. triggered (after Xu et al., arXiv 2002.12162).

For each chosen layer and channel k, the activation map A_k(x) of every sample is reduced to three norms:
l1 = sum |A_k|, l2 = (sum A_k^2)^(1/2) and l_inf = max |A_k|. A trigger causes a spatially sparse spike in a
few channels, which dominates l_inf but is diluted in l1 and l2. The *l_inf bias* of a channel is how much
more its l_inf grows under the trigger than its l1 does (a log-ratio, 0 = grows equally); the pruning
score is s_k = E||A_k(x + trigger)||_inf - E||A_k(x)||_inf.

Pre-activation blocks output a sum that is not passed through a ReLU; its absolute value is used.

:func:`activation_stats` is the view's one computation (:func:`activation_summary` its per-layer summary, as the
Compare page and the HTML report show it); :mod:`analysis.figures` draws it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from suspects.device import to_device
from suspects.models import list_residual_blocks

from .samples import PairedSample

__all__ = ["NORMS", "default_layers", "channel_norms", "ActivationStats", "activation_stats", "activation_summary",
           "channel_maps"]

NORMS = ("l1", "l2", "linf")


def default_layers(model: nn.Module) -> list[str]:
    """Every residual block's output (a transformer's blocks: tokens x channels); for a network without skips, the
    activations after convolutions."""
    blocks = list_residual_blocks(model)
    if blocks:
        return blocks
    from .gradcam import candidate_layers

    return candidate_layers(model)


@torch.no_grad()
def channel_norms(model: nn.Module, images: torch.Tensor, layers: list[str], batch_size: int = 500
                  ) -> dict[str, np.ndarray]:
    """For each layer an array (N, C, 3) of per-sample, per-channel l1, l2 and l_inf norms of the activation map."""
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"unknown layer(s) {missing}; try {', '.join(default_layers(model))}")
    device = next(model.parameters()).device
    current: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, inputs, output):
            a = output.detach().float().abs()
            # (B, C, HW) from a map; a transformer's (B, T, D) tokens are D channels over T positions
            a = a.transpose(1, 2) if a.dim() == 3 else a.flatten(2)
            current[name] = torch.stack([a.sum(2), a.pow(2).sum(2).sqrt(), a.amax(2)], dim=2).cpu()
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    try:
        for start in range(0, len(images), batch_size):
            model(to_device(images[start:start + batch_size], device))
            for n in layers:
                out[n].append(current[n])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: torch.cat(v).numpy() for n, v in out.items()}


@dataclass
class ActivationStats:
    """Raw per-sample norms and the per-channel summary table."""

    layers: list[str]
    clean: dict[str, np.ndarray]
    triggered: dict[str, np.ndarray]
    table: pd.DataFrame

    def ranking(self, layer: str | None = None, top: int = 20) -> pd.DataFrame:
        """Channels with the largest l_inf bias (the l_inf pruning signal), optionally within one layer."""
        t = self.table if layer is None else self.table[self.table.layer == layer]
        return t.sort_values("linf_bias", ascending=False).head(top).reset_index(drop=True)

    def layer_summary(self, top_fraction: float = 0.05) -> pd.DataFrame:
        """Per layer: mean l_inf bias of its top ``top_fraction`` channels, and the largest pruning score."""
        rows = []
        for layer, t in self.table.groupby("layer", sort=False):
            k = max(1, int(round(len(t) * top_fraction)))
            rows.append({
                "layer": layer,
                "channels": len(t),
                "top_linf_bias": float(t.linf_bias.nlargest(k).mean()),
                "max_linf_bias": float(t.linf_bias.max()),
                "max_linf_score": float(t.linf_score.max()),
            })
        return pd.DataFrame(rows)


def activation_stats(model: nn.Module, clean: torch.Tensor, triggered: torch.Tensor,
                     layers: list[str] | None = None, batch_size: int = 500) -> ActivationStats:
    """Norms of clean and triggered images per layer and channel, aggregated into a tidy table.

    Table columns: layer, channel, {l1,l2,linf}_{clean,trig}_{mean,std}, growth_{l1,l2,linf} (triggered mean /
    clean mean), linf_bias = log(growth_linf) - log(growth_l1), linf_score = linf_trig_mean - linf_clean_mean.
    """
    layers = layers or default_layers(model)
    c = channel_norms(model, clean, layers, batch_size)
    t = channel_norms(model, triggered, layers, batch_size)
    frames = []
    for layer in layers:
        cm, cs = c[layer].mean(0), c[layer].std(0)
        tm, ts = t[layer].mean(0), t[layer].std(0)
        eps = 1e-3 * np.maximum(cm.mean(0), 1e-8)  # per norm: keeps dead channels from dividing by ~0
        growth = (tm + eps) / (cm + eps)
        df = pd.DataFrame({"layer": layer, "channel": np.arange(cm.shape[0])})
        for j, norm in enumerate(NORMS):
            df[f"{norm}_clean_mean"], df[f"{norm}_clean_std"] = cm[:, j], cs[:, j]
            df[f"{norm}_trig_mean"], df[f"{norm}_trig_std"] = tm[:, j], ts[:, j]
            df[f"growth_{norm}"] = growth[:, j]
        df["linf_bias"] = np.log(growth[:, 2]) - np.log(growth[:, 0])
        df["linf_score"] = tm[:, 2] - cm[:, 2]
        frames.append(df)
    return ActivationStats(layers, c, t, pd.concat(frames, ignore_index=True))


def activation_summary(model: nn.Module, sample: PairedSample) -> pd.DataFrame:
    """Per layer: the mean l_inf bias of its top 5% channels (:meth:`ActivationStats.layer_summary`) on the clean
    and triggered images of ``sample``."""
    return activation_stats(model, sample.clean, sample.triggered).layer_summary()


@torch.no_grad()
def channel_maps(model: nn.Module, images: torch.Tensor, layer: str, channels: list[int]) -> np.ndarray:
    """Activation maps (N, len(channels), h, w) of selected channels, for display (a transformer's tokens laid on
    their patch grid)."""
    from suspects.adapters import tokens_to_grid

    modules = dict(model.named_modules())
    captured: list[torch.Tensor] = []

    def keep(m: nn.Module, i: tuple, o: torch.Tensor) -> None:
        o = o.detach().float()
        captured.append((tokens_to_grid(o) if o.dim() == 3 else o)[:, channels].cpu())

    handle = modules[layer].register_forward_hook(keep)
    was = model.training
    model.eval()
    try:
        model(to_device(images, next(model.parameters()).device))
    finally:
        handle.remove()
        model.train(was)
    return captured[0].abs().numpy()
