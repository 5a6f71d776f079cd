"""Published numbers for the defenses we run, to show beside ours (never mixed with them).

Each entry is BA / ASR after the defense, as a fraction, on the publisher's own setting (CIFAR-10 with a
PreAct-ResNet-18 or ResNet-18, not our demo), with where it comes from and how sure we are of it, using the tags of
``../shared/reference/defenses.md``:

- ``README``: the official repository's README or BackdoorBench's leaderboard data (``results.csv`` of
  backdoorbench.github.io), checked there;
- ``3rd``: a named third-party source (an issue, a reimplementation), checked there;
- ``figure``: read off a figure in the official repository (approximate).

Values recalled from a paper but never checked against it are not listed. A defense with no entry has no verified
published number here (SAU, FST, CBD, shortcut suppression, l_inf pruning and NPD: see :data:`MISSING`;
what was searched for SAU, FST and CBD is listed in the comment above it).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Published", "PUBLISHED", "MISSING", "published_for", "published_records", "none_recorded_text",
           "NO_DEFENSE", "NO_DEFENSE_MISSING", "no_defense_for", "no_defense_text", "RETUNE_PUBLISHED",
           "RETUNE_NOT_FOUND", "retune_published_for"]

BACKDOORBENCH = "BackdoorBench leaderboard, CIFAR-10, PreAct-ResNet-18, 10% poisoning"
BACKDOORBENCH_5 = BACKDOORBENCH.replace("10%", "5%") + " (its no-defense numbers are not listed)"
BACKDOORBENCH_1 = BACKDOORBENCH.replace("10%", "1%")


@dataclass(frozen=True)
class Published:
    defense: str
    attack: str
    ba: float
    asr: float
    source: str
    tag: str  # README, 3rd or figure
    ba_before: float | None = None
    asr_before: float | None = None
    note: str = ""

    def text(self) -> str:
        """``BA / ASR [TAG] SOURCE (NOTE)``: how a page shows the entry."""
        return f"{self.ba:.3f} / {self.asr:.3f} [{self.tag}] {self.source}" + (f" ({self.note})" if self.note else "")


def _bb(defense: str, attack: str, ba: float, asr: float, before: tuple[float, float] | None = None,
        note: str = "") -> Published:
    b = before or _BB_BEFORE[attack]
    return Published(defense, attack, ba / 100, asr / 100, BACKDOORBENCH, "README", b[0] / 100, b[1] / 100, note)


def _bb1(defense: str, ba: float, asr: float, note: str = "") -> Published:
    """A BackdoorBench leaderboard cell at 1% poisoning (BadNets): our ``badnets_1pct`` suspects' setting (its
    no-defense row, results.csv #11522, is the "before")."""
    return Published(defense, "badnets_1pct", ba / 100, asr / 100, BACKDOORBENCH_1, "README", 0.9314, 0.7473,
                     note=note)


# BackdoorBench's no-defense BA / ASR (10% poisoning) of each attack, shown as "before"
_BB_BEFORE = {"badnets": (91.3, 95.0), "blended": (93.5, 99.9), "wanet": (91.2, 89.7), "sig": (84.5, 98.3),
              "inputaware": (90.67, 98.26), "bppattack": (90.69, 99.78)}


PUBLISHED: tuple[Published, ...] = (
    # plain fine-tuning
    _bb("finetune", "badnets", 89.96, 1.48), _bb("finetune", "blended", 92.78, 96.11),
    _bb("finetune", "wanet", 93.48, 17.10), _bb("finetune", "sig", 90.80, 2.37),
    # Fine-Pruning
    _bb("fineprune", "badnets", 91.31, 57.13), _bb("fineprune", "blended", 93.17, 99.26),
    _bb("fineprune", "wanet", 91.46, 1.09), _bb("fineprune", "sig", 89.10, 26.20),
    # ANP (BackdoorBench selects the pruning threshold with test-split numbers: an optimistic upper bound)
    *(_bb("anp", a, ba, asr, note="threshold selected on the test split (BackdoorBench issue #35)")
      for a, ba, asr in (("badnets", 84.17, 0.73), ("blended", 86.58, 2.19), ("wanet", 85.73, 0.43),
                         ("sig", 77.97, 0.01))),
    Published("anp", "badnets", 0.925, 0.03, "csdongxian/ANP_backdoor, _plot/ANP_overall.png (ResNet-18, 500 images, "
              "5% of neurons pruned)", "figure", 0.935, 1.0),
    # i-BAU
    _bb("ibau", "badnets", 89.16, 1.29), _bb("ibau", "blended", 87.0, 50.5), _bb("ibau", "wanet", 89.5, 5.2),
    _bb("ibau", "sig", 85.7, 3.7),
    # DBD
    _bb("dbd", "badnets", 89.65, 1.28), _bb("dbd", "blended", 69.91, 99.98), _bb("dbd", "wanet", 80.90, 6.61),
    _bb("dbd", "sig", 60.67, 100.0),
    Published("dbd", "badnets", 0.9250, 0.0088, "SCLBD/DBD README, CIFAR-10, ResNet-18, 5% poisoning", "README",
              0.9513, 1.0),
    Published("dbd", "blended", 0.9260, 0.0031, "SCLBD/DBD README, CIFAR-10, ResNet-18, 5% poisoning", "README",
              0.9426, 0.9815),
    # AWM
    Published("awm", "badnets", 0.8898, 0.3308, "jinghuichen/AWM issue #2 (ResNet-18, 10%, 500 images, defaults)",
              "3rd", 0.9210, 0.9971),
    # ABL (training-time; BackdoorBench at 10% poisoning, values from ../shared/reference/methods-2.md section 8)
    _bb("abl", "badnets", 83.32, 0.00), _bb("abl", "blended", 77.30, 0.73),
    _bb1("abl", 72.81, 53.20),
    Published("abl", "badnets", 0.8611, 0.0304, "bboylyg/ABL README leaderboard (WRN-16-1, BadNets grid trigger, "
              "CIFAR-10)", "README"),
    Published("abl", "badnets", 0.8187, 0.0048, "bboylyg/ABL README quick_unlearning_demo log (WRN-16-1, grid "
              "trigger, 500 isolated images, 5 unlearning epochs; unlearning only, from a backdoored model)", "README",
              0.8278, 0.9999),
    # RNP (not on BackdoorBench's leaderboard): the official README's log, every threshold printed on the test split
    Published("rnp", "badnets", 0.9280, 0.0661, "bboylyg/RNP README log (ResNet-18, BadNets 10%, 500 clean images, "
              "threshold 0.2, 24 neurons pruned)", "README", 0.9340, 1.0,
              "threshold read off the test split; at 0.3 (32 pruned): 92.77 / 1.72"),
    # NAD (../shared/reference/methods-2.md section 4; BackdoorBench hooks layer3, layer4 and the pooled 512x1x1 map)
    _bb("nad", "badnets", 89.87, 2.14), _bb("nad", "blended", 92.17, 97.69),
    Published("nad", "badnets", 0.9103, 0.0473, BACKDOORBENCH_5, "README"),
    Published("nad", "blended", 0.9310, 0.9906, BACKDOORBENCH_5, "README"),
    Published("nad", "badnets", 0.8212, 0.0357, "bboylyg/NAD README, CIFAR-10, WRN-16-1, 5% clean data (its BadNets "
              "model was trained without augmentation: plain fine-tuning gives 82.32 / 18.13 there)", "README",
              0.8565, 1.0),
    # CLP, u = 3 (methods-2.md section 5; BackdoorBench pairs BN and conv by registration order on PreAct blocks)
    _bb("clp", "badnets", 90.07, 77.56), _bb("clp", "blended", 91.32, 99.74),
    Published("clp", "badnets", 0.9132, 0.2449, BACKDOORBENCH_5, "README"),
    Published("clp", "blended", 0.9019, 0.7958, BACKDOORBENCH_5, "README"),
    _bb1("clp", 89.46, 3.51),
    # DBD at 1% (../shared/reference/defenses.md, DBD numbers)
    _bb1("dbd", 78.09, 2.99),
    # Input-aware dynamic attack at 10% (defenses.md: fine-tuning and Fine-Pruning rows; methods-2.md section 8: ABL;
    # the others read in BackdoorBench's results.csv, rows #11844-11894, 2026-12-07)
    _bb("finetune", "inputaware", 93.12, 1.72), _bb("fineprune", "inputaware", 91.74, 0.04),
    _bb("abl", "inputaware", 63.19, 90.16), _bb("nad", "inputaware", 93.18, 1.68),
    _bb("anp", "inputaware", 90.36, 1.64, note="threshold selected on the test split (BackdoorBench issue #35)"),
    _bb("clp", "inputaware", 90.30, 2.17), _bb("ibau", "inputaware", 89.17, 27.08),
    # NAD and CLP on SIG and WaNet at 10% (results.csv rows #12179, #12209, #12419, #12449, read 2026-12-07)
    _bb("nad", "sig", 90.02, 10.66), _bb("nad", "wanet", 93.17, 22.98),
    _bb("clp", "sig", 83.80, 98.91), _bb("clp", "wanet", 81.91, 78.42),
    # BadNets at 1% (results.csv rows #11522-11597, read 2026-12-07; no-defense 93.14 / 74.73)
    _bb1("finetune", 93.07, 10.36), _bb1("fineprune", 92.98, 20.18), _bb1("nad", 92.52, 8.33),
    _bb1("anp", 84.67, 0.29, note="threshold selected on the test split (BackdoorBench issue #35)"),
    _bb1("ibau", 87.63, 3.62),
)
# No defense cell of BackdoorBench's leaderboard was found for BppAttack (its results.csv rows are empty; the
# leaderboard page gives only its no-defense numbers: 90.69 / 99.78 at 10%), Adaptive-Blend (not in BackdoorBench;
# its README has no numbers) or an all-to-all BadNets, so those attacks' published column stays empty.

# SAU, FST and CBD were searched for again on 2026-12-06 (issue 28), in the stored copies of public material only:
# - BackdoorBench's leaderboard data (backdoorbench/backdoorbench.github.io static/data/results.csv and
#   leaderboard-cifar10.html): no SAU, FST or CBD column;
# - official repositories: the READMEs of shawkui/Shared_Adversarial_Unlearning, shawkui/MindTrojan (SAU's MindSpore
#   port), shawkui/Proactive_Defensive_Backdoor, shawkui/BackdoorBenchER, AISafety-HKUST/stable_backdoor_purification
#   and zaixizhang/CBD hold no result numbers (no notebook output or training log either);
# - the papers: the stored copies (arxiv.org/html/2310.01875v1, ar5iv 2307.10562, arxiv.org/abs/2303.06818, SPIQA's
#   extracted text of 2307.10562 and 2310.01875, papers.nips.cc, ri.k117.org, liner.com, emergentmind, tomesphere)
#   give only each page's beginning: abstract, introduction and setup sentences, never a results table; CBD's CVPR
#   paper has no stored full text;
# - GitHub issues and third-party code (BackdoorBench, BackdoorBox, backdoor-toolbox and reimplementations) hold no
#   SAU / FST / CBD result table; the paper-note files that name SAU's numbers are machine-written summaries that
#   misstate its method and arXiv id, so they were not used.
# The setup sentences that were readable (SAU: 5% clean data, 100 epochs, PGD 5 steps L_inf 0.2; FST: 2% clean data,
# SGD lr 0.01, 10 epochs, alpha 0.2 on CIFAR-10; both via ri.k117.org) agree with ../shared/reference/methods-2.md.
MISSING = {
    "sau": "not on BackdoorBench's leaderboard (results.csv has no SAU column); the paper's tables (arXiv 2307.10562) "
           "were not readable in any stored copy (ar5iv, SPIQA, ri.k117.org: abstract and setup only), the READMEs of "
           "shawkui/Shared_Adversarial_Unlearning and shawkui/MindTrojan give no numbers, and no issue or "
           "third-party table lists SAU (searched 2026-12-06)",
    "fst": "the official README (AISafety-HKUST/stable_backdoor_purification) gives no numbers and BackdoorBench's "
           "leaderboard does not list FST; the paper's tables (arXiv 2310.01875) were not readable in any stored copy "
           "(arxiv.org/html, SPIQA, ri.k117.org: abstract and setup only), and no issue or third-party table lists "
           "FST (searched 2026-12-06)",
    "cbd": "not on BackdoorBench's leaderboard and zaixizhang/CBD's README gives no numbers; the paper's Table 1 "
           "(CVPR 2023, arXiv 2303.06818) was not readable in any stored copy (abstract pages only), and no issue or "
           "third-party table lists CBD (searched 2026-12-06)",
    "shortcut": "the abstract is qualitative; no table was checked here",
    "linf_prune": "the abstract gives no numbers",
    "btidbf": "the official README gives no numbers and BackdoorBench's leaderboard does not list it; the paper's "
              "tables were not retrievable here",
    "ftsam": "not on BackdoorBench's leaderboard; the paper's tables were not retrievable here (methods-2.md)",
    "npd": "not on BackdoorBench's leaderboard (which holds the official code); the paper's tables were not checked "
           "here",
}


# --- the attacks themselves: published BA / ASR of the backdoored model, no defense -------------------------------

NO_DEFENSE: tuple[Published, ...] = (
    # BackdoorBench leaderboard (../shared/reference/methods-2.md, "LB setting"; defenses.md for SIG and WaNet)
    *(Published("none", a, ba / 100, asr / 100, BACKDOORBENCH, "README") for a, (ba, asr) in _BB_BEFORE.items()),
    Published("none", "inputaware", 0.9152, 0.9020, BACKDOORBENCH.replace("10%", "5%"), "README"),
    Published("none", "inputaware", 0.9465, 0.9932, "VinAIResearch/input-aware-backdoor-attack-release README, "
              "CIFAR-10, PreAct-ResNet-18 (clean accuracy / attack success; cross-trigger accuracy 88.16)", "README"),
    Published("none", "bppattack", 0.9147, 0.9934, BACKDOORBENCH.replace("10%", "5%"), "README"),
    Published("none", "bppattack", 0.9081, 0.8723, BACKDOORBENCH.replace("10%", "1%"), "README"),
    Published("none", "badnets_1pct", 0.9314, 0.7473, BACKDOORBENCH_1 + " (results.csv #11522)", "README"),
)
"""Published BA / ASR of each attack's backdoored model before any defense (``defense`` is ``"none"``): what the
attack reaches where it was designed, beside what our suspects reach (their cards)."""

NO_DEFENSE_MISSING = {
    "adaptive_blend": "Qi et al.'s repositories (Unispac/Circumventing-Backdoor-Defenses, vtu81/backdoor-toolbox) "
                      "give no numbers in their READMEs, and BackdoorBench does not run the attack "
                      "(../shared/reference/methods-2.md, section D)",
    "badnets_all2all": "../shared/reference holds no all-to-all row of BackdoorBench's leaderboard or of any "
                       "official README",
}


def no_defense_for(attack: str) -> list[Published]:
    """The published no-defense entries of ``attack`` (its backdoored model's BA / ASR)."""
    return [p for p in NO_DEFENSE if p.attack == attack]


def no_defense_text(attack: str) -> str:
    """One line: the published BA / ASR of ``attack`` before any defense, tagged, or why none is recorded."""
    entries = no_defense_for(attack)
    if not entries:
        return f"none recorded: {NO_DEFENSE_MISSING.get(attack, 'no source in ../shared/reference')}"
    return "; ".join(p.text() for p in entries)


def none_recorded_text(defense: str, attack: str) -> str:
    """Why a (defense, attack) cell has no published number: the defense's own reason (:data:`MISSING`), or, for a
    defense with published numbers on other attacks only, which attacks those are."""
    if defense in MISSING:
        return f"none recorded: {MISSING[defense]}"
    others = sorted({p.attack for p in PUBLISHED if p.defense == defense} - {attack})
    if others:
        return f"none recorded for {attack} (this defense's published numbers here are on {', '.join(others)})"
    return "none recorded"


def published_for(defense: str, attack: str | None = None) -> list[Published]:
    """The published entries for ``defense`` (and ``attack``, when given)."""
    return [p for p in PUBLISHED if p.defense == defense and (attack is None or p.attack == attack)]


def published_records(defenses, attack: str | None = None) -> list[dict]:
    """Rows for a table of the published numbers of ``defenses`` (on ``attack`` first when given; all attacks when
    it has none), and one "none recorded" row, with the reason, for a defense that has no entry."""
    rows = []
    for d in defenses:
        entries = published_for(d, attack) if attack else []
        entries = entries or published_for(d)
        if not entries and d in MISSING:
            rows.append({"defense": d, "attack": "", "BA": None, "ASR": None, "BA before": None, "ASR before": None,
                         "tag": "", "source": f"none recorded: {MISSING[d]}"})
        for p in entries:
            rows.append({"defense": d, "attack": p.attack, "BA": p.ba, "ASR": p.asr, "BA before": p.ba_before,
                         "ASR before": p.asr_before, "tag": p.tag,
                         "source": p.source + (f" ({p.note})" if p.note else "")})
    return rows


# --- after the retuning attack (the stress test) ---------------------------------------------------------------

RETUNE_PUBLISHED: tuple[Published, ...] = ()
"""Published ASR *after the retuning attack* (Min et al., NeurIPS 2024: ``asr`` is P-ASR, ``asr_before`` O-ASR) for
FT, ANP, SAU, FST and BTI-DBF, tagged as above. None is verified yet: see :data:`RETUNE_NOT_FOUND`."""

# Searched again on 2026-12-06: the stored NeurIPS 2024 summary of the paper (deep-diver/neurips2024
# content/posters/qZFshkbWDo/index.md) shows Fig. 1 and every table (tables_8_1, tables_15_1 ... tables_21_3) as
# images only, and ri.k117.org, liner.com and arxiv.org/html/2410.09838v2 give the abstract and setup only; no number
# could be read. That summary's machine-written captions name EP, ANP, BAU, SAM, FST, BTI and PAM as the compared
# methods (not SAU); this was not checked against the paper.
RETUNE_NOT_FOUND = ("not found for FT, ANP, SAU, FST or BTI-DBF: the official repository's README gives none, and the "
                    "paper's Fig. 1 (O-ASR vs. P-ASR, averaged over attacks) and Appendix C.1 tables were not "
                    "retrievable here (../shared/reference/methods-2.md, 'Stress test protocol'); no number is filled "
                    "from memory.")


def retune_published_for(defense: str, attack: str | None = None) -> list[Published]:
    """The published after-re-tuning entries for ``defense`` (and ``attack``, when given)."""
    return [p for p in RETUNE_PUBLISHED if p.defense == defense and (attack is None or p.attack == attack)]
