"""Write assets/demo/README.md from the demo suspects' cards (commands and measured metrics)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from suspects.store import DEMO_SUSPECTS, list_demo_suspects, load  # noqa: E402


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

WaNet uses s = 1.0 instead of the paper's 0.5: on 28x28 images s = 0.5 moves pixels by about a quarter of a pixel,
which a width-8 network does not learn in 20 CPU epochs (the first bundle's width; kept for the same recipe).

Measured on the demo test split (2,500 images; ASR and RA on the 2,250 non-target images), CPU, float32;
`tests/test_demo_suspects.py` re-evaluates each one and checks these numbers within 0.01.

| suspect | attack | poisoned training samples | BA | ASR | RA | training time (2 CPU cores) | checkpoint |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

The clean suspect's ASR under the badnets trigger is checked (<= 0.10) by the same test. Training times are wall
times on an otherwise idle machine, except that the first two trained (badnets, blended) shared it with a test run
for a few minutes.
"""
    (DEMO_SUSPECTS.parent / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
