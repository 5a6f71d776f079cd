"""``backdoor-lens evaluate``: BA, ASR and RA of a suspect on its test split."""

from __future__ import annotations

import argparse

from backdoor_lens.cli import add_suspect_args, load_suspect, print_json

ORDER = 30


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="print BA, ASR and RA of a suspect",
                              description="Measure BA, ASR and RA on the suspect's test split.")
    add_suspect_args(p)
    p.add_argument("--json", action="store_true", help="print JSON (ba, asr, ra, n_clean, n_poisoned)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--limit", type=int, help="only the first N test images")
    p.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import suspects
    from suspects.device import pick_device, prepare_model
    from suspects.metrics import metric_definitions

    suspect = load_suspect(args)
    device = pick_device(args.device)
    model = prepare_model(suspect.model, device)
    definitions = metric_definitions(suspect.trigger)
    m = suspects.evaluate(model, suspect.test, suspect.trigger, batch_size=args.batch_size, device=device,
                          limit=args.limit)
    from suspects.store import normalization_label

    norm = dict(suspect.card.get("normalization") or {})
    result = {"suspect": suspect.name, **m.to_dict(), "device": str(device),
              "trigger": suspect.trigger.spec() if suspect.trigger else None,
              "normalization": {"label": normalization_label(suspect.card), "mean": norm.get("mean"),
                                "std": norm.get("std"), "assumed": bool(norm.get("assumed", False))}}
    if args.json:
        print_json(result)
        return 0
    print(f"suspect  {suspect.name}  ({suspect.card.get('arch')}, {len(suspect.classes)} classes, device {device})")
    print(f"BA   {m.ba:.4f}   {definitions['ba']} (n={m.n_clean})")
    print(f"     input normalisation: {normalization_label(suspect.card)}"
          + ("  (name another with --normalize)" if norm.get("assumed") else ""))
    if m.asr is None:
        print("ASR  n/a      no trigger known for this suspect")
    else:
        print(f"ASR  {m.asr:.4f}   {definitions['asr']} (n={m.n_poisoned})")
        print(f"RA   {m.ra:.4f}   {definitions['ra']}")
    return 0
