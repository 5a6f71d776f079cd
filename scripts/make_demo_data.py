"""Build the demo bundle's data: a class-balanced Fashion-MNIST subset from Debian's package.

    python scripts/make_demo_data.py [--root /usr/share/datasets/fashion-mnist]

Writes assets/demo/fashion_mnist_subset.npz: 10,000 training and 2,500 test images (28x28 uint8),
1,000 / 250 per class, drawn with a fixed seed. Fashion-MNIST is (c) Zalando SE, MIT licence.
"""

from __future__ import annotations

import argparse

import numpy as np

from suspects.data import DEMO_DATA, FASHION_MNIST_CLASSES, load_dataset


def balanced(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    idx = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(idx))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="folder with the IDX files (default: Debian's location)")
    ap.add_argument("--train-per-class", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=250)
    ap.add_argument("--seed", type=int, default=2017)
    args = ap.parse_args()
    pair = load_dataset({"name": "fashion-mnist", "root": args.root})
    rng = np.random.default_rng(args.seed)
    tr_y, te_y = pair.train.labels.numpy(), pair.test.labels.numpy()
    tr = balanced(tr_y, args.train_per_class, rng)
    te = balanced(te_y, args.test_per_class, rng)
    DEMO_DATA.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        DEMO_DATA,
        train_x=pair.train.pixels[tr, 0].numpy(), train_y=tr_y[tr].astype(np.uint8),
        test_x=pair.test.pixels[te, 0].numpy(), test_y=te_y[te].astype(np.uint8),
        train_source_index=tr.astype(np.int32), test_source_index=te.astype(np.int32),
        classes=np.array(FASHION_MNIST_CLASSES),
    )
    print(f"wrote {DEMO_DATA} ({DEMO_DATA.stat().st_size / 1e6:.1f} MB): {len(tr)} train, {len(te)} test")


if __name__ == "__main__":
    main()
