"""Write assets/demo/README.md from the demo suspects' cards (commands and measured metrics)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from suspects.store import DEMO_SUSPECTS, list_demo_suspects, load  # noqa: E402

# the attacks of issue 30 (scripts/train_attack_suspects.sh NAME trains each with the same recipe)
EXTRA_FLAGS = {
    "bppattack": "--attack bppattack --attack-param squeeze_num=8 --attack-param dithering=true "
                 "--attack-param neg_ratio=1.0 --poison-rate 0.1 --target 0",
    "adaptive_blend": "--attack adaptive_blend --attack-param alpha=0.15 --attack-param test_alpha=0.2 "
                      "--attack-param cover_ratio=1.0 --poison-rate 0.015 --target 0",
    "inputaware": "--attack inputaware --attack-param gen_width=8 --attack-param mask_epochs=25 "
                  "--attack-param cross_ratio=1.0 --poison-rate 0.1 --target 0",
    "badnets_1pct": "--attack badnets --poison-rate 0.01 --target 0",
    "badnets_all2all": "--attack badnets --mapping all-to-all --poison-rate 0.1",
}
EXTRA_TEXT: dict[str, str] = {
    "bppattack": "BppAttack (8 colour levels, Floyd-Steinberg dithering as in the paper, 10% poisoned plus as many "
                 "negatives) reaches ASR 0.81 at BA 0.882, 0.021 below the clean model's, in the bundle's 20 epochs "
                 "(the official schedule trains 1,000; BackdoorBench's 100). On 28x28 grey images an 8-level "
                 "squeeze moves each pixel by at most 1/14, and the negatives (clean images plus another image's "
                 "quantisation residual, true label) teach the model to ignore exactly that kind of residual. The "
                 "official default without dithering gave ASR 0.54 at BA 0.889 with the same recipe (measured, not "
                 "kept).",
    "adaptive_blend": "Adaptive-Blend reaches ASR 0.87 at the official test-time strength (alpha 0.2, the whole "
                      "pattern) with the official counts (150 poisoned + 150 cover images, 1.5% of the demo's "
                      "training split): the attack trades ASR for stealth by design (no published ASR was found to "
                      "compare with: its READMEs give none and BackdoorBench does not run it), and the cover samples, which carry partial patterns with their true labels, keep "
                      "it from saturating.",
    "badnets_1pct": "BadNets at 1% (100 poisoned images) reaches only ASR 0.27 in the bundle's 20 epochs: the random "
                    "crop (3 pixels of padding) moves the 3x3 patch by up to 3 pixels, so 100 images do not teach a "
                    "position-independent patch; it is kept as the low-rate case a reviewer meets, where a defense "
                    "has little to remove and its BA cost dominates.",
    "badnets_all2all": "BadNets all-to-all (label y -> y + 1 mod 10, 10% poisoned) reaches ASR 0.88: one patch must "
                       "now encode ten different shifts of the label, which the width-16 network learns less "
                       "completely than the single target of `badnets` (ASR counted on every test image).",
    "inputaware": "The input-aware suspect's generators are 8 channels wide (official MNIST: 16); its cross-trigger "
                  "accuracy (each test image with another image's pattern and mask, true label expected) is 0.81 "
                  "(official CIFAR-10: 0.88), and its masks cover 1.4% of each image. Training includes the mask "
                  "generator's 25 epochs: about 7.6 minutes in all on 2 cores.",
}
"""Why an attack of issue 30 stays below the bundle's goal (ASR >= 0.90 at a BA within 0.02 of the clean model's),
filled in from the measured cards."""


def main() -> None:
    rows = []
    cards = {name: json.loads((DEMO_SUSPECTS / name / "suspect.json").read_text()) for name in list_demo_suspects()}
    width = sorted({c["training"]["width"] for c in cards.values()})
    split = cards["badnets"]["split"]
    kept_out = split.get("pool_in_training") is False
    n_params = sum(p.numel() for p in load("demo:badnets").model.parameters())
    pool_text = (f"The defense pool ({split['n_pool']:,} images, {split['pool_fraction']:.0%} of the training split) is "
                 + ("kept out of the suspects' training (`--keep-pool-out`): it stands for a reviewer's own clean data."
                    if kept_out else "part of the suspects' training data (never poisoned)."))
    for name, card in cards.items():
        m, t, trig = card["metrics"], card["training"], card.get("trigger")
        size = (DEMO_SUSPECTS / name / "model.safetensors").stat().st_size / 1e6
        # long values (IAD's generator weights, TrojanNN's patch) are left out of the table
        shown = {k: (v if len(repr(v)) <= 80 else "…") for k, v in (trig or {}).get("params", {}).items()}
        attack = "none" if not trig else f"{trig['name']} {shown}"
        asr = "n/a" if m["asr"] is None else f"{m['asr']:.4f}"
        ra = "n/a" if m["ra"] is None else f"{m['ra']:.4f}"
        rows.append(f"| `{name}` | {attack} | {card['poison']['n_poisoned'] if card.get('poison') else 0} | "
                    f"{m['ba']:.4f} | {asr} | {ra} | {t['seconds']:.0f} s | {size:.2f} MB |")
    extra_flags = "\n".join(f"| {n} | `{f}` |" for n, f in EXTRA_FLAGS.items() if n in cards)
    extra_text = "".join(f"{t}\n\n" for n, t in EXTRA_TEXT.items() if n in cards)
    text = f"""# Demo bundle

Offline data and suspects that the dashboard opens on a fresh machine.

## Data: `fashion_mnist_subset.npz`

A class-balanced subset of Fashion-MNIST (10,000 training and 2,500 test images, 28x28 grayscale; 1,000 / 250
per class, seed 2017), taken from Debian's `dataset-fashion-mnist` package by `scripts/make_demo_data.py`.
Fashion-MNIST is (c) 2017 Zalando SE under the MIT licence: see `LICENSE-fashion-mnist.txt`.
The arrays `train_source_index` / `test_source_index` give each image's index in the full Fashion-MNIST splits.

## Suspects: `suspects/NAME/`

Narrow PreActResNet-18 (width {"/".join(map(str, width))}, about {n_params / 1e6:.2f} M parameters) trained with this
project's own command by `scripts/train_demo_suspects.sh`, i.e. for each suspect

```
backdoor-lens train --data demo --model preact_resnet18 --width {width[0]} --epochs 20 --batch-size 128 --lr 0.05 \\
    --seed 0 --overwrite --pool-fraction {split['pool_fraction']}{" --keep-pool-out" if kept_out else ""} \\
    --out assets/demo/suspects/NAME  ATTACK-FLAGS
```

{pool_text}

with ATTACK-FLAGS

| suspect | flags |
|---|---|
| clean | `--attack none` |
| badnets | `--attack badnets --poison-rate 0.1 --target 0` (3x3 white patch, bottom-right) |
| blended | `--attack blended --attack-param alpha=0.2 --poison-rate 0.1 --target 0` (seeded uniform noise) |
| sig | `--attack sig --attack-param delta=40 --attack-param f=6 --poison-rate 0.08 --target 0` (clean-label: 800 of the ~900 T-shirts the suspect trains on) |
| wanet | `--attack wanet --attack-param s=1.0 --attack-param k=4 --poison-rate 0.1 --target 0` (noise mode, cross ratio 2) |
{extra_flags}

{extra_text}WaNet uses s = 1.0 instead of the paper's 0.5: on 28x28 images s = 0.5 moves pixels by about a quarter of a pixel,
which a width-8 network does not learn in 20 CPU epochs (the first bundle's width; kept for the same recipe).

Measured on the demo test split (2,500 images; ASR and RA on the 2,250 non-target images), CPU, float32;
`tests/test_demo_suspects.py` re-evaluates each one and checks these numbers within 0.01.

| suspect | attack | poisoned training samples | BA | ASR | RA | training time (2 CPU cores) | checkpoint |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

The clean suspect's ASR under the badnets trigger is checked (<= 0.10) by the same test. Training times are wall
times on an otherwise idle machine, except that the first two trained (badnets, blended) shared it with a test run
for a few minutes, and the issue-30 suspects (bppattack, adaptive_blend, inputaware, badnets_1pct, badnets_all2all)
shared it with short test runs on one core; the input-aware time is the classifier's stage (the mask generator's
stage before it took about 2.5 minutes more). `badnets_all2all` counts ASR and RA on all 2,500 test images.
"""
    (DEMO_SUSPECTS.parent / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
