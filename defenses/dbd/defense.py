"""DBD, the defense: its parameters and the three stages put together (see :mod:`defenses.dbd`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..base import Defense, DefenseOutput, ParamError, ThreatModel, param
from ..common import head, pool_monitor
from ..context import RepairContext
from ..registry import register_defense
from ..retrain import (
    StageClock,
    histogram,
    knn_monitor,
    poisoned_training_set,
    reinitialize,
    split_quality,
    suspect_fingerprint,
)
from .mixmatch import mixmatch_epoch
from .simclr import BACKBONE_FILE, ProjectionHead, load_backbone, save_backbone, simclr_train
from .split import sce_split, warmup_train

__all__ = ["DBD", "DBDParams", "stage_steps"]


def stage_steps(params: DBDParams, n: int) -> dict[str, int]:
    """Each stage's budget in optimisation steps on ``n`` training images (issue 13): SimCLR drops the last partial
    batch (``simclr_epochs`` x floor(n / batch)), the linear head keeps it (``warmup_epochs`` x ceil(n / batch)),
    MixMatch counts iterations (``semi_epochs`` x ``iterations``, whatever n is).

    ``paper`` on CIFAR-10 (50,000 images): 9,700 + 3,910 + 194,560 steps; on the demo (9,000): 1,700 + 710 + 194,560.
    ``quick`` on the demo: 140 + 142 + 650.
    """
    return {"simclr": params.simclr_epochs * max(1, n // params.simclr_batch_size),
            "warmup": params.warmup_epochs * max(1, math.ceil(n / params.warmup_batch_size)),
            "semi": params.semi_epochs * params.iterations}


@dataclass
class DBDParams:
    simclr_epochs: int = param(100, help="stage 1: SimCLR epochs (the official fine-tune loads epoch 100)",
                               min=0, max=5000)
    simclr_batch_size: int = param(512, help="stage 1: images per SimCLR step (two views each)", min=2, max=8192)
    simclr_lr: float = param(0.4, help="stage 1: SGD learning rate (momentum 0.9, weight decay 1e-4)",
                             min=1e-6, max=10.0)
    simclr_schedule: int = param(1000, help="stage 1: length of the cosine schedule in epochs (official 1000 "
                                            "although epoch 100 is used; 0 = simclr_epochs)", min=0, max=100000)
    tau: float = param(0.5, help="stage 1: temperature of the NT-Xent loss", min=0.01, max=10.0)
    proj_dim: int = param(128, help="stage 1: output size of the projection head", min=2, max=4096)
    warmup_epochs: int = param(10, help="stage 2: epochs of the linear head on the frozen backbone", min=0, max=1000)
    warmup_batch_size: int = param(128, help="stage 2: images per step", min=1, max=8192)
    alpha: float = param(0.1, help="SCE weight of the cross-entropy term", min=0.0, max=100.0)
    beta: float = param(1.0, help="SCE weight of the reverse cross-entropy term", min=0.0, max=100.0)
    semi_epochs: int = param(190, help="stage 3: MixMatch epochs (the split is redone every epoch)", min=0, max=5000)
    iterations: int = param(1024, help="stage 3: MixMatch iterations per epoch", min=1, max=100000)
    batch_size: int = param(64, help="stage 3: labelled images per step (and as many unlabelled)", min=2, max=4096)
    epsilon: float = param(0.5, help="share of training samples (lowest SCE loss) that keep their labels",
                           min=0.01, max=1.0)
    T: float = param(0.5, help="stage 3: sharpening temperature of the guessed labels", min=0.01, max=10.0)
    mix_alpha: float = param(0.75, help="stage 3: MixUp coefficient lambda ~ Beta(mix_alpha, mix_alpha)",
                             min=0.01, max=10.0)
    lambda_u: float = param(15.0, help="stage 3: weight of the unlabelled loss after the ramp-up", min=0.0, max=1000.0)
    rampup: int = param(190, help="epochs from the start of stage 2 over which lambda_u ramps up linearly "
                                  "(0 = no ramp)", min=0, max=100000)
    lr: float = param(0.002, help="Adam learning rate of stages 2 and 3 (no weight decay)", min=1e-7, max=1.0)
    semi_schedule: str = param("constant", help="stage 3 learning rate: constant (official) or cosine (decays to 0 "
                                                "over stage 3's iterations, so a short run ends at a settled model)",
                               choices=("constant", "cosine"))
    split: str = param("global", help="global: the lowest-loss epsilon share of all samples keeps its labels (paper); "
                                      "per-class: the lowest-loss epsilon share of each (possibly poisoned) label",
                       choices=("global", "per-class"))
    augment: str = param("crop-flip", help="weak augmentation of stages 2 and 3", choices=("crop", "crop-flip"))
    subset: int = param(0, help="use a random subset of this many poisoned training images (0 = all)",
                        min=0, max=10**8)
    reuse_backbone_from: str = param("", help="run id or folder of an earlier DBD run on this suspect (or its "
                                              "dbd_backbone.safetensors): reuse its stage-1 backbone and run only "
                                              "stages 2 and 3; empty = train stage 1")

    def check(self) -> None:
        if self.semi_epochs > 0 and self.epsilon >= 1.0:
            raise ParamError("parameter 'epsilon' must be below 1 when stage 3 runs (someone must lose a label)")


def _loss_edges(loss: torch.Tensor, bins: int = 30) -> torch.Tensor:
    hi = float(loss.max()) if len(loss) else 1.0
    return torch.linspace(0.0, max(hi, 1e-3), bins + 1)


@register_defense
class DBD(Defense):
    name = "dbd"
    title = "Decoupling-based Backdoor Defense (DBD)"
    paper = "Huang et al., ICLR 2022 (arXiv 2202.03423)"
    order = 70
    needs = ("linear_head", "module_hooks", "rebuildable", "trainable")
    summary = ("Retrains the model from the poisoned training set in three stages: a self-supervised backbone "
               "(SimCLR, labels ignored, so features group by content rather than by trigger), a linear head with "
               "a noise-robust loss, then semi-supervised MixMatch fine-tuning where the high-loss half (where the "
               "poisoned samples land) loses its labels.")
    threat = ThreatModel(clean_pool=False, poisoned_training_set=True,
                         note="retrains from scratch; the clean pool only feeds the live held-out BA / ASR")
    Params = DBDParams
    presets = {
        "quick": {"simclr_epochs": 4, "simclr_batch_size": 256, "simclr_schedule": 0, "warmup_epochs": 2,
                  "semi_epochs": 5, "iterations": 130, "rampup": 7, "split": "per-class", "lr": 0.005,
                  "semi_schedule": "cosine"},
        "paper": {},
    }
    artifact_labels = {"split_precision": "share of label-dropped samples that are poisoned (last epoch)",
                       "split_recall": "share of poisoned samples whose label was dropped (last epoch)"}
    curve_labels = {"simclr": "stage 1: SimCLR loss and k-NN BA / ASR on the held-out pool",
                    "warmup": "stage 2: SCE loss of the linear head, held-out BA / ASR",
                    "split": "stage 3 split: precision / recall of the label-dropped samples vs. the known poison",
                    "semi": "stage 3: MixMatch losses, learning rate, held-out BA / ASR"}
    run_files = {"reuse_backbone_from": f"{BACKBONE_FILE}.safetensors"}

    def repair(self, model, params: DBDParams, ctx: RepairContext) -> DefenseOutput:
        suspect, pool, device = ctx.suspect, ctx.pool, ctx.device
        lin = head(model)
        data = poisoned_training_set(suspect, pool, params.subset, seed=0)
        if len(data) < 2:
            raise ValueError("DBD needs at least two training images")
        gen = torch.Generator().manual_seed(int(torch.initial_seed()) % 2**31)
        reinitialize(model)
        proj = ProjectionHead(lin.in_features, params.proj_dim).to(device)
        fingerprint = suspect_fingerprint(suspect)
        n = len(data)
        reuse = params.reuse_backbone_from.strip()
        simclr_cost = 0.0 if reuse else params.simclr_epochs * n * 2 * 3
        clock = StageClock(ctx, {
            "simclr": simclr_cost, "warmup": params.warmup_epochs * n,
            "semi": params.semi_epochs * (n + params.iterations * params.batch_size * 11)})
        warnings = []
        rate = data.poison_rate
        if params.semi_epochs and 1 - params.epsilon < rate:
            warnings.append(f"1 - epsilon = {1 - params.epsilon:.2f} is below the poisoning rate {rate:.2f}: "
                            "some poisoned samples must keep their labels")

        # stage 1
        t_stage = time.time()
        stage1: dict = {}
        simclr_rows: list[dict] = []
        if reuse:
            meta = load_backbone(reuse, model, proj, fingerprint)
            stage1 = {"reused_from": meta.get("path"), "simclr_epochs": meta.get("simclr_epochs"),
                      "trained_in_run": meta.get("run", "")}
            ctx.tick(clock.start["warmup"], f"stage 1/3: reused the backbone of {reuse}")
        else:
            simclr_rows = simclr_train(model, proj, data.x, device, params.simclr_epochs, params.simclr_batch_size,
                                       params.simclr_lr, params.tau, params.simclr_schedule, gen,
                                       tick=lambda f, m, d=None: clock.tick("simclr", f, m, d),
                                       monitor=knn_monitor(model, pool, suspect.trigger, device))
            stage1 = {"simclr_epochs": params.simclr_epochs, "seconds": round(time.time() - t_stage, 1)}
        backbone_file = None
        if ctx.artifacts is not None:  # kept with the run, so a later run can reuse it
            backbone_file = save_backbone(ctx.artifact_dir() / f"{BACKBONE_FILE}.safetensors", model, proj, {
                "kind": "dbd-simclr-backbone", "fingerprint": fingerprint, "suspect": suspect.name,
                "arch": suspect.card.get("arch", ""), "simclr_epochs": stage1.get("simclr_epochs"),
                "tau": params.tau, "proj_dim": params.proj_dim}).name
        del proj

        # stage 2
        opt = torch.optim.Adam(model.parameters(), lr=params.lr)
        monitor = pool_monitor(model, pool, suspect.trigger, device)
        warm_rows = warmup_train(model, opt, data, device, params.warmup_epochs, params.warmup_batch_size,
                                 params.alpha, params.beta, params.augment, gen,
                                 tick=lambda f, m, d=None: clock.tick("warmup", f, m, d), monitor=monitor)

        # stage 3
        split_rows, semi_rows, histos = [], [], []
        num_classes = lin.out_features
        per_class = torch.zeros(num_classes, dtype=torch.long)
        share = 1.0 / (params.iterations * params.batch_size * 11 / n + 1)  # split's share of an epoch's work
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, params.semi_epochs * params.iterations))
                 if params.semi_schedule == "cosine" else None)
        for epoch in range(params.semi_epochs):
            label = f"stage 3/3 MixMatch: epoch {epoch + 1}/{params.semi_epochs}"
            clock.tick("semi", epoch / params.semi_epochs, f"stage 3/3 split: epoch {epoch + 1}/{params.semi_epochs}")
            loss, labelled = sce_split(model, data, device, params.epsilon, params.alpha, params.beta,
                                       params.augment, gen, per_class=params.split == "per-class")
            q = split_quality(~labelled, data.poisoned)
            per_class = torch.bincount(data.y[labelled], minlength=num_classes)
            starved = [c for c in range(num_classes) if per_class[c] == 0 and (data.y == c).any()]
            if starved and not any("no labelled sample" in w for w in warnings):
                warnings.append(f"the split left classes {starved} without any labelled sample (epoch {epoch + 1}); "
                                "the model cannot learn them: consider split=per-class or a longer stage 1")
            split_rows.append({"epoch": epoch + 1, "precision": q["precision"], "recall": q["recall"]})
            if epoch == 0 or epoch == params.semi_epochs - 1:
                edges = _loss_edges(loss)
                histos.append({"epoch": epoch + 1, "clean": histogram(loss[~data.poisoned], edges),
                               "poisoned": histogram(loss[data.poisoned], edges),
                               "cut": float(loss[labelled].max()) if labelled.any() else 0.0,
                               "edges": edges.tolist()})
            clock.tick("semi", (epoch + share) / params.semi_epochs, label,
                       {"split_precision": q["precision"], "split_recall": q["recall"],
                        "poisoned_kept": q["poisoned_kept"]})
            res = mixmatch_epoch(
                model, opt, data, labelled, device, params.iterations, params.batch_size, params.T,
                params.mix_alpha, params.lambda_u, params.rampup, params.warmup_epochs + epoch, params.augment, gen,
                tick=lambda f, m, e=epoch: clock.tick("semi", (e + share + (1 - share) * f) / params.semi_epochs, m),
                label=label, scheduler=sched)
            row = {"epoch": epoch + 1, **{k: res[k] for k in ("loss_x", "loss_u")},
                   "lr": opt.param_groups[0]["lr"], **monitor()}
            semi_rows.append(row)
            clock.tick("semi", (epoch + 1) / params.semi_epochs, label, {**row, "lambda_u": res["lambda_u"]})
        model.eval()
        last = split_rows[-1] if split_rows else {}
        artifacts = {
            "n_train": n, "stage_steps": stage_steps(params, n), "n_poisoned_train": int(data.poisoned.sum()),
            "poison_rate_train": round(rate, 4),
            "stage1": stage1, "backbone_file": backbone_file,
            "split": params.split,
            "split_precision": last.get("precision"), "split_recall": last.get("recall"),
            "labelled_per_class": per_class.tolist(),
            "split_note": "precision / recall of the samples that lose their labels, against the known poisoned "
                          "indices (the defense never uses them)",
            "held_out_ba": (semi_rows or warm_rows or [{}])[-1].get("held_out_ba"),
            "held_out_asr": (semi_rows or warm_rows or [{}])[-1].get("held_out_asr"),
            "loss_histograms": {"x_label": "SCE loss at the split", "cut_label": "epsilon cut",
                                "series": histos},
            "warnings": warnings,
        }
        curves = {"simclr": simclr_rows, "warmup": warm_rows, "split": split_rows, "semi": semi_rows}
        return DefenseOutput(model, artifacts, {k: v for k, v in curves.items() if v})
