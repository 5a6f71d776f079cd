"""Write the architecture x view / defense table of docs/bring-your-own-model.md (between its TABLE markers).

Every row is a model built here without weights (capabilities do not depend on them); each cell says "yes" or
what the model lacks, from what each view (analysis.applicability.VIEW_NEEDS) and defense (Defense.needs) declares.
Run: ``python scripts/model_table.py`` (``--check`` fails when the document differs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DOC = ROOT / "docs" / "bring-your-own-model.md"
BEGIN, END = "<!-- TABLE BEGIN (scripts/model_table.py) -->", "<!-- TABLE END -->"
# (architecture, constructor arguments): BackdoorBench's zoo, this project's own networks, timm's families
FAMILIES: list[tuple[str, dict]] = [
    ("preact_resnet18", {"width": 8}),
    ("resnet18_torchvision", {"width": 8}),
    ("vgg11_bn", {"width": 8}),
    ("torchvision:resnet18", {}),
    ("torchvision:vgg19_bn", {}),
    ("torchvision:mobilenet_v3_large", {}),
    ("torchvision:efficientnet_b3", {}),
    ("torchvision:densenet161", {}),
    ("torchvision:convnext_tiny", {}),
    ("torchvision:vit_b_16", {}),
    ("timm:resnet18", {}),
    ("timm:convnext_atto", {}),
    ("timm:vit_tiny_patch16_224", {"depth": 2}),
]


def build(arch: str, kwargs: dict) -> torch.nn.Module:
    from suspects.models import create_model

    if arch.startswith(("torchvision:", "timm:")):
        kwargs = {"input_size": 224 if "vit_b_16" in arch else 32, **kwargs}
    return create_model(arch, num_classes=10, in_channels=3, **kwargs).eval()


def exported_model() -> torch.nn.Module:
    """A torch.export program of a small network, as :mod:`suspects.exported` wraps it."""
    from suspects.exported import ExportedModel

    net = build("timm:resnet18", {}).net
    program = torch.export.export(net, (torch.zeros(1, 3, 32, 32),)).module()
    return ExportedModel(program, [0.0] * 3, [1.0] * 3, 10)


def rows(families: list[tuple[str, dict]] | None = None, exported: bool = True) -> list[tuple[str, dict[str, str]]]:
    from analysis.applicability import applicability_row
    from defenses.registry import all_defenses

    defenses = [(d.name, d.needs) for d in all_defenses()]
    out = [(arch, applicability_row(build(arch, kw), defenses)) for arch, kw in (families or FAMILIES)]
    if exported:
        out.append(("a .pt2 program", applicability_row(exported_model(), defenses)))
    return out


def markdown_row(arch: str, row: dict[str, str]) -> str:
    return "| `" + arch + "` | " + " | ".join("yes" if v == "yes" else "–" for v in row.values()) + " |"


def table(all_rows: list[tuple[str, dict[str, str]]]) -> str:
    header = list(all_rows[0][1])
    lines = ["| architecture | " + " | ".join(header) + " |", "|" + "---|" * (len(header) + 1)]
    lines += [markdown_row(arch, row) for arch, row in all_rows]
    from suspects.models import CAPABILITIES

    missing = sorted({m.strip() for _, row in all_rows for v in row.values() if v != "yes" for m in v[4:].split(",")})
    lines += ["", "A dash: the model lacks what the view or defense needs; here that is "
              + "; ".join(f"{m} ({CAPABILITIES[m.replace(' ', '_')]})" for m in missing) + "."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC} lacks the table markers")
    new = text.split(BEGIN)[0] + BEGIN + "\n" + table(rows()) + "\n" + END + text.split(END, 1)[1]
    if args.check:
        return 0 if new == text else 1
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
