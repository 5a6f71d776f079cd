"""Published results of the detectors we run (Neural Cleanse; STRIP, SCALE-UP, IBD-PSC), shown beside ours on
docs/detection.md and docs/screening.md, never mixed with them.

Each entry is what a source reports for one attack, on its own setting (CIFAR-10 or GTSRB, full-width ResNets),
tagged as in :mod:`runs.published`: ``README`` (an official repository's README or BackdoorBench's leaderboard data,
``backdoorbench/backdoorbench.github.io`` ``static/data/results.csv``), ``3rd`` (an issue or third-party run), or
``paper-text`` (a sentence of the paper read in a stored copy). Numbers recalled from a paper but not read in a stored
source are not listed; where nothing was found, :data:`NOT_FOUND` says what was searched (2026-12-07).

BackdoorBench runs Neural Cleanse as a *defense*: when no class is an outlier its ``defense/nc.py`` logs "This is not
a backdoor model" and returns the model unchanged, so a leaderboard row equal to the no-defense row means "not
flagged", and a row with another BA / ASR means a class was flagged and its trigger unlearned. Those verdicts are
read off the two rows (``note``), not printed by BackdoorBench.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PublishedResult", "DETECTION", "SCREENING", "NOT_FOUND", "SETTING", "detection_for", "screening_for",
           "published_text", "not_found_text"]

BB_CSV = "BackdoorBench leaderboard data (results.csv), CIFAR-10, PreAct-ResNet-18"
BB_NC_NOTE = "read off the NC and no-defense rows: NC changes the model only when it flags a class"


@dataclass(frozen=True)
class PublishedResult:
    method: str  # neural_cleanse, strip, scale-up or ibd-psc
    attack: str  # one of our attacks: the published attack that matches it
    result: str  # what was reported, in words and numbers
    source: str
    tag: str  # README, 3rd or paper-text
    note: str = ""

    def text(self) -> str:
        return f"{self.result} [{self.tag}] {self.source}" + (f" ({self.note})" if self.note else "")


def _bb_nc(attack: str, rate: str, flagged: bool, before: tuple[float, float], after: tuple[float, float],
           rows: str) -> PublishedResult:
    if flagged:
        result = f"flagged at {rate} (BA / ASR {before[0]:.2f} / {before[1]:.2f} -> {after[0]:.2f} / {after[1]:.2f})"
    else:
        result = f"not flagged at {rate} (BA / ASR {before[0]:.2f} / {before[1]:.2f} unchanged)"
    return PublishedResult("neural_cleanse", attack, result, f"{BB_CSV}, rows {rows}", "README", BB_NC_NOTE)


DETECTION: tuple[PublishedResult, ...] = (
    PublishedResult("neural_cleanse", "badnets", "anomaly index 3.65: infected (target found)",
                    "bolunwang/backdoor README, GTSRB, white 4x4 patch at the bottom right", "README"),
    _bb_nc("badnets", "10%", True, (91.32, 95.03), (89.05, 1.27), "#11524 / #11544"),
    _bb_nc("badnets_1pct", "1%", True, (93.14, 74.73), (91.64, 0.88), "#11522 / #11542"),
    _bb_nc("blended", "10%", False, (93.47, 99.92), (93.47, 99.92), "#11604 / #11624"),
    _bb_nc("sig", "10%", False, (84.48, 98.27), (84.48, 98.27), "#12164 / #12184"),
    _bb_nc("wanet", "10%", True, (91.25, 89.73), (91.80, 7.53), "#12404 / #12424"),
    PublishedResult("neural_cleanse", "wanet", "anomaly index above 3 on average (models retrained with the "
                    "official defaults)", "VinAIResearch/Warping-based_Backdoor_Attack-release issue #8, CIFAR-10 "
                    "and GTSRB", "3rd", "the official README itself calls Neural Cleanse unstable"),
    _bb_nc("inputaware", "10%", True, (90.67, 98.26), (92.61, 0.76), "#11844 / #11864"),
)
"""Neural Cleanse's published verdicts, per attack."""

SCREENING: tuple[PublishedResult, ...] = (
    PublishedResult("strip", "badnets", "FRR 0%, FAR 0% (patch triggers)", "STRIP paper (Gao et al., ACSAC 2019), "
                    "abstract, CIFAR-10 and GTSRB", "paper-text"),
    PublishedResult("scale-up", "badnets", "AUROC 0.527", "JunfengGo/SCALE-UP issue #5, CIFAR-10, ResNet-18",
                    "3rd", "a user's run of the official code, reported as failing to reproduce the paper"),
    PublishedResult("scale-up", "badnets", "AUROC 0.451 (TPR 0.155, FPR 0.195)", "THUYimingLi/BackdoorBox issue "
                    "#75, CIFAR-10", "3rd", "a user's run; the maintainer blames the trigger choice"),
    PublishedResult("ibd-psc", "badnets", "AUROC about 0.7", "THUYimingLi/BackdoorBox issue #89, CIFAR-10, "
                    "ResNet-18", "3rd", "a user's run, reported as poor"),
)
"""The input screens' published results, per attack (the papers' own tables were not readable here)."""

NOT_FOUND = {
    "neural_cleanse": "the input-aware and WaNet papers' Neural Cleanse figures and tables, BppAttack's and "
                      "Adaptive-Blend's READMEs (commands only) and BackdoorBench (no all-to-all, BppAttack or "
                      "Adaptive-Blend NC row) give no verdict for the other attacks",
    "strip": "garrisongys/STRIP's README has no numbers and the papers of the other attacks were not readable past "
             "their first page",
    "scale-up": "JunfengGo/SCALE-UP's README has no numbers and the paper's tables (ICLR 2023) were not readable in "
                "any stored copy",
    "ibd-psc": "no official IBD-PSC repository is stored, BackdoorBox's README has no numbers and the paper's tables "
               "(ICML 2024, arXiv 2405.09786) were not readable past its first page",
}
"""Per method: what was searched where no published result was found for an attack."""
SEARCHED = "2026-12-07"
SETTING = ("*Published* results are on another setting (CIFAR-10 or GTSRB, full-width ResNets, the official budget), "
           "tagged as in `runs/published_detection.py`: what the method reports where it was designed, not a target "
           "for these models.")
"""The sentence each page puts above its table with a published column."""


def detection_for(attack: str) -> list[PublishedResult]:
    return [p for p in DETECTION if p.attack == attack]


def screening_for(method: str, attack: str) -> list[PublishedResult]:
    return [p for p in SCREENING if p.method == method and p.attack == attack]


def published_text(entries: list[PublishedResult]) -> str:
    """The entries, tagged, or "none recorded" (the reason is :data:`NOT_FOUND`, printed once under the table)."""
    return "; ".join(p.text() for p in entries) or "none recorded"


def not_found_text(methods: list[str]) -> str:
    """The line under a page's table: what "none recorded" means for each of ``methods``."""
    if len(methods) == 1:
        return f"*none recorded*: {NOT_FOUND[methods[0]]} (searched {SEARCHED})."
    return f"*none recorded* (searched {SEARCHED}): " + "; ".join(f"{m}: {NOT_FOUND[m]}" for m in methods) + "."
