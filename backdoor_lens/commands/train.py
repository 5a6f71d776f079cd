"""``backdoor-lens train``: train a model on a poisoned training set and write a suspect folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from backdoor_lens.cli import TqdmProgress, parse_sets, print_json

ORDER = 20


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a (backdoored) suspect",
                              description="Train a model on a poisoned training set and write a suspect folder.")
    p.add_argument("--data", default="demo", help="demo, fashion-mnist, mnist, cifar10, gtsrb, or an ImageFolder path")
    p.add_argument("--data-root", help="folder holding the dataset files")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10/GTSRB (needs internet)")
    p.add_argument("--attack", default="badnets", help="attack name, or 'none' for a clean model")
    p.add_argument("--attack-param", action="append", metavar="NAME=VALUE", help="attack parameter, e.g. size=3")
    p.add_argument("--target", type=int, default=0, help="target class (default 0)")
    p.add_argument("--mapping", default="all-to-one", choices=["all-to-one", "all-to-all"])
    p.add_argument("--poison-rate", type=float, default=0.1, help="share of the training set poisoned (default 0.1)")
    p.add_argument("--model", default="preact_resnet18", help="architecture (see `backdoor-lens models`)")
    p.add_argument("--width", type=int, default=64, help="base channels (64 = the papers' size)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--augment", default="crop", choices=["none", "crop", "crop-flip"])
    p.add_argument("--pool-fraction", type=float, default=0.05, help="clean defense pool share of the training split")
    p.add_argument("--keep-pool-out", action="store_true",
                   help="do not train on the clean defense pool (it stays unseen, like a reviewer's own clean data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (quick tries)")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.add_argument("--name", help="suspect name (default: the output folder's name)")
    p.add_argument("--out", required=True, help="suspect folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing suspect folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from suspects.data import list_sources
    from suspects.training import TrainConfig, train_suspect

    data: dict[str, Any] = {"name": args.data} if args.data in list_sources() else {"name": "imagefolder",
                                                                                   "root": args.data}
    if args.data_root:
        data["root"] = args.data_root
    if args.download:
        data["download"] = True
    attack = None if args.attack in ("none", "clean") else args.attack
    attack_params = parse_sets(args.attack_param)
    cfg = TrainConfig(data=data, model=args.model, width=args.width, attack=attack, attack_params=attack_params,
                      target=args.target, mapping=args.mapping, poison_rate=args.poison_rate, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, schedule=args.schedule,
                      augment=args.augment, pool_fraction=args.pool_fraction,
                      train_on_pool=not args.keep_pool_out, seed=args.seed,
                      max_steps=args.max_steps, device=args.device, name=args.name)
    bar = TqdmProgress("training", disable=args.quiet)
    try:
        suspect = train_suspect(cfg, args.out, progress=bar, overwrite=args.overwrite)
    finally:
        bar.close()
    m = suspect.card["metrics"]
    print_json({"suspect": str(Path(args.out).resolve()), **{k: m[k] for k in ("ba", "asr", "ra")}})
    return 0
