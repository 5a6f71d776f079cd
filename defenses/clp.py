"""Channel Lipschitzness-based Pruning (CLP), Zheng, Tang, Li & Liu, "Data-free Backdoor Removal based on Channel
Lipschitzness", ECCV 2022 (arXiv 2208.03111); official code ``rkteddy/channel-Lipschitzness-based-pruning``
(``defense.py``, ``test.py``), read, not copied.

A backdoor channel has to amplify a small trigger into a large response, so its upper bound of the channel
Lipschitz constant (UCLC) stands out. For a convolution followed by BatchNorm, channel k computes
``gamma_k / sigma_k * (W_k * x) + const``; its UCLC is the largest singular value of ``W_k`` (reshaped to
C_in x kh*kw) times ``|gamma_k / sigma_k|`` (sigma_k = sqrt(running_var_k)). Within each layer the channels with
``UCLC_k > mean + u * std`` are pruned by zeroing the BatchNorm's gamma_k and beta_k. No data, no fine-tuning: the
defense reads the weights only and never touches the defense pool.

Defaults (``paper`` preset): u = 3 (``test.py``; BackdoorBench ``config/defense/clp/cifar10.yaml`` saves the model at
u = 3 too).

Deviations from the official code:
- **Pairing of BatchNorm and convolution** (``pairing``). The official code walks ``named_modules()`` and pairs
  each BatchNorm2d with the last Conv2d registered before it, assuming every convolution is followed by its own
  BatchNorm. Pre-activation blocks break that assumption (BN comes before the convolution; CLP issue #2: on a
  PreAct-ResNet the author advises architecture-specific code, and BackdoorBench uses the same pairing on its
  PreAct-ResNet-18). By default (``dataflow``) we pair a BatchNorm with a convolution only when the BatchNorm's
  input *is* that convolution's output, found by one forward pass of a zero image (no data) with hooks; a
  BatchNorm whose input is a sum (the input of a pre-activation block) or anything else is skipped and counted
  (``skipped_layers``). On post-activation networks (ResNet, VGG-BN) both pairings are the same. ``registration``
  is the official rule, kept as an option; it also skips a BatchNorm whose width differs from its convolution's
  (the official code would index out of range).
- sigma_k is floored at 1e-12 (the official divides by sqrt(running_var) as is).
- The demo suspects are PreAct-ResNet-18s: with ``dataflow`` only the BatchNorm after each block's first convolution
  (and the one right after the stem) is scored; the residual stream's BatchNorms are not.

``quick`` is ``paper`` (u = 3): CLP costs seconds, so there is nothing to cut. Kept after the choice on the zoo's
development suspects (``scripts/choose_presets.py``, docs/preset-choice.md; u = 3, 2.5, 2 and the registration
pairing at 2.5, one suspect per attack): no setting removes a backdoor (dev ASR >= 0.83 everywhere), and lower u only
costs BA (WaNet's suspect loses 0.37 at u = 2.5, 0.82 at u = 2), so u = 3 has the lowest mean ASR + BA drop. The
demo backdoors are not carried by a few high-UCLC channels (see ``docs/fidelity.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Defense, DefenseOutput, ThreatModel, param
from .context import RepairContext
from .registry import register_defense


@dataclass
class CLPParams:
    u: float = param(3.0, help="u: prune the channels whose UCLC exceeds mean + u * std of their layer (the paper's "
                               "threshold; smaller prunes more)", min=0.0, max=20.0)
    pairing: str = param("dataflow", help="which convolution a BatchNorm belongs to: 'dataflow' (the one whose output "
                                          "is the BatchNorm's input; pre-activation BatchNorms are skipped) or "
                                          "'registration' (the last conv registered before it: the official code)",
                         choices=("dataflow", "registration"))


def _input_shape(model: nn.Module, ctx: RepairContext) -> tuple[int, ...]:
    shape = ctx.suspect.card.get("input_shape") if ctx.suspect is not None else None
    if shape:
        return tuple(int(s) for s in shape)
    x = ctx.pool.x
    if len(x):
        return tuple(x.shape[1:])
    raise ValueError("CLP (dataflow pairing) needs the model's input shape (the suspect card has none)")


@torch.no_grad()
def pair_by_dataflow(model: nn.Module, input_shape: tuple[int, ...], device) -> tuple[list[tuple[str, str]], int]:
    """(BatchNorm name, conv name) pairs where the BatchNorm's input is exactly the conv's output, found with one
    forward pass of a zero image (data-free); and the number of BatchNorm2d layers left unpaired."""
    modules = dict(model.named_modules())
    outputs: list[tuple[torch.Tensor, str]] = []
    inputs: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, m in modules.items():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(lambda mod, i, o, n=name: outputs.append((o, n))))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(lambda mod, i, n=name: inputs.append((n, i[0]))))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((2, *input_shape), device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    pairs, seen = [], set()
    for bn_name, x in inputs:
        if bn_name in seen:
            continue
        seen.add(bn_name)
        conv = next((n for o, n in outputs if o is x), None)
        if conv is not None and modules[conv].out_channels == modules[bn_name].num_features:
            pairs.append((bn_name, conv))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in modules.values())
    return pairs, n_bn - len(pairs)


def pair_by_registration(model: nn.Module) -> tuple[list[tuple[str, str]], int]:
    """The official rule: each BatchNorm2d with the last Conv2d registered before it (of the same width)."""
    pairs, skipped, conv = [], 0, None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            conv = (name, m)
        elif isinstance(m, nn.BatchNorm2d):
            if conv is not None and conv[1].out_channels == m.num_features:
                pairs.append((name, conv[0]))
            else:
                skipped += 1
    return pairs, skipped


@torch.no_grad()
def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC_k = sigma_max(W_k) * |gamma_k / sigma_k| for every output channel k (W_k: C_in/groups x kh*kw)."""
    w = conv.weight.detach().float()
    w = w.reshape(w.shape[0], w.shape[1], -1)
    spectral = torch.linalg.matrix_norm(w.cpu(), ord=2)  # largest singular value per channel
    gamma = bn.weight.detach().float().cpu() if bn.weight is not None else torch.ones(bn.num_features)
    sigma = bn.running_var.detach().float().cpu().clamp_min(0).sqrt().clamp_min(1e-12)
    return spectral * (gamma / sigma).abs()


@register_defense
class CLP(Defense):
    name = "clp"
    title = "Channel Lipschitzness-based Pruning (CLP)"
    paper = "Zheng et al., ECCV 2022 (arXiv 2208.03111)"
    order = 66
    needs = ("batchnorm", "convolutions", "module_hooks", "rebuildable")
    summary = ("Data-free: in every convolution + BatchNorm layer, scores each channel by an upper bound of its "
               "Lipschitz constant (how much it can amplify a small input change) and prunes the outliers, which a "
               "trigger needs to turn a small patch into a strong response. Reads the weights only; no clean data.")
    threat = ThreatModel(clean_pool=False, note="reads the weights only: no clean data, no trigger")
    Params = CLPParams
    presets = {"quick": {}, "paper": {}}
    artifact_labels = {"pruned_channels": "channels pruned (BatchNorm gamma and beta zeroed)",
                       "pruned_per_layer": "channels pruned per BatchNorm layer",
                       "scored_layers": "convolution + BatchNorm layers scored",
                       "skipped_layers": "BatchNorm layers not scored (no convolution feeds them directly)"}
    curve_labels = {"max_over_mean_uclc": "largest UCLC over the layer's mean, per scored layer"}

    def repair(self, model, params: CLPParams, ctx: RepairContext) -> DefenseOutput:
        if params.pairing == "dataflow":
            pairs, skipped = pair_by_dataflow(model, _input_shape(model, ctx), ctx.device)
        else:
            pairs, skipped = pair_by_registration(model)
        if not pairs:
            raise ValueError("CLP: no BatchNorm2d of this model follows a convolution directly, so no channel can "
                             "be scored (try --set pairing=registration)")
        modules = dict(model.named_modules())
        per_layer: dict[str, int] = {}
        ratios: list[float] = []
        for i, (bn_name, conv_name) in enumerate(pairs):
            bn = modules[bn_name]
            uclc = channel_lipschitz(modules[conv_name], bn)
            limit = uclc.mean() + params.u * uclc.std() if len(uclc) > 1 else torch.tensor(float("inf"))
            index = torch.nonzero(uclc > limit).flatten()
            if len(index):
                with torch.no_grad():
                    idx = index.to(bn.weight.device if bn.weight is not None else "cpu")
                    if bn.weight is not None:
                        bn.weight[idx] = 0.0
                    if bn.bias is not None:
                        bn.bias[idx] = 0.0
            per_layer[bn_name] = int(len(index))
            ratios.append(float(uclc.max() / uclc.mean().clamp_min(1e-12)))
            ctx.tick((i + 1) / len(pairs), f"CLP: layer {i + 1}/{len(pairs)} ({bn_name}), {len(index)} pruned",
                     {"pruned": sum(per_layer.values())})
        model.eval()
        return DefenseOutput(model, {
            "pruned_channels": sum(per_layer.values()),
            "pruned_per_layer": per_layer,
            "scored_layers": len(pairs),
            "skipped_layers": skipped,
            "pairing": params.pairing,
        }, {"max_over_mean_uclc": ratios})
