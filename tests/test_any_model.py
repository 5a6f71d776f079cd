"""Any model a user brings (issue 26): torchvision / timm families built small in the test, loaded from a state dict
with the library's key names, every view computed or declared not applicable, defenses run a step or say why not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import suspects
from analysis.activations import activation_stats
from analysis.applicability import VIEW_NEEDS
from analysis.features import feature_set
from analysis.gradcam import compare_gradcam
from analysis.samples import paired_sample
from analysis.shortcuts import skip_ablation
from defenses import get_defense, list_defenses, run_defense
from suspects.models import (
    NotApplicableError,
    create_model,
    list_residual_blocks,
    missing_capabilities,
    set_skip_gamma,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TRIGGER = {"name": "badnets", "target": 0, "mapping": "all-to-one", "params": {"size": 3}}
# small members of each family, on the demo's 1 x 28 x 28 images
FAMILIES = {
    "torchvision:resnet18": {},
    "torchvision:mobilenet_v3_small": {},
    "timm:convnext_atto": {"dims": (16, 32, 48, 64), "resize_to": 32},
    "timm:vit_tiny_patch16_224": {"depth": 2, "patch_size": 7, "embed_dim": 32, "num_heads": 2},
    "torchvision:densenet121": {"resize_to": 32},  # no skip connections; too deep for 28 pixels: resized to 32
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(arch, suspect loaded from a plain library state dict, the library module it came from)."""
    arch = request.param
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=1, input_size=28, **FAMILIES[arch]).eval()
    path = tmp_path_factory.mktemp("family") / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(path))  # the library's key names
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in FAMILIES[arch].items()}
    s = suspects.load(path, arch=arch, data="demo", trigger=TRIGGER, arch_kwargs=kwargs)
    return arch, s, model


def test_loads_from_library_keys_with_the_same_outputs(family):
    arch, s, model = family
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert s.card["normalization"]["assumed"] is True and s.card["normalization"]["label"].startswith("demo")
    x = torch.rand(3, 1, 28, 28)
    model.normalize.mean.fill_(s.card["normalization"]["mean"][0])
    model.normalize.std.fill_(s.card["normalization"]["std"][0])
    with torch.no_grad():
        assert torch.allclose(s.model(x), model(x), atol=1e-5)


def test_every_view_computes_or_says_why_not(family):
    arch, s, _ = family
    smp = paired_sample(s.test, s.trigger, 6)
    cams = compare_gradcam(s.model, smp, s.trigger)
    assert cams.clean_cams.shape == (6, 28, 28) and float(cams.triggered_cams.max()) <= 1.0 + 1e-6
    stats = activation_stats(s.model, smp.clean, smp.triggered)
    assert len(stats.table) > 0 and {"layer", "channel"} <= set(stats.table.columns)
    fs = feature_set(s, n_clean=20, n_triggered=10)
    assert fs.features.shape[0] == 30 and fs.features.shape[1] == s.model.get_classifier().in_features
    blocks = list_residual_blocks(s.model)
    if missing_capabilities(s.model, VIEW_NEEDS["skip ablation"]):
        assert not blocks and arch == "torchvision:densenet121"
        return
    result = skip_ablation(s.model, smp.clean, s.test.labels[smp.index], smp.triggered, smp.attack_labels,
                           gammas=(1.0, 0.0), blocks=blocks[-1:])
    assert set(result.table.block) == {blocks[-1]} and len(result.table) == 2


def test_skip_scale_is_exact_and_restorable(family):
    """gamma = 1 is the library's forward bit for bit; gamma = 0 on a block removes its skip (the output changes)."""
    arch, s, model = family
    blocks = list_residual_blocks(s.model)
    if not blocks:
        pytest.skip(f"{arch} has no residual blocks")
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        before = s.model(x)
        set_skip_gamma(s.model, blocks[0], 0.0)
        ablated = s.model(x)
        set_skip_gamma(s.model, blocks[0], 1.0)
        assert torch.equal(s.model(x), before)
    # relative: a freshly initialised MobileNetV3 gives logits of about 1e-11
    assert (ablated - before).abs().max() > 1e-3 * before.abs().max()


def test_post_activation_skip_scale_matches_the_residual_branch():
    """torchvision's BasicBlock with gamma = 0 computes relu(bn2(conv2(relu(bn1(conv1(x)))))), its residual alone."""
    torch.manual_seed(0)
    m = create_model("torchvision:resnet18", num_classes=10, in_channels=3, input_size=32).eval()
    block = m.net.layer2[1]
    set_skip_gamma(m, "net.layer2.1", 0.0)
    x = torch.rand(2, 128, 4, 4)
    with torch.no_grad():
        expected = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))))
        assert torch.allclose(block(x), expected, atol=1e-6)
        set_skip_gamma(m, "net.layer2.1", 0.5)
        assert torch.allclose(block(x), torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
                                                   + 0.5 * x), atol=1e-6)


def test_each_defense_runs_a_step_or_says_why_not(family):
    """Every defense either declares the model unfit (one clear reason) or runs; fine-tuning runs one step."""
    arch, s, _ = family
    for name in list_defenses():
        reason = get_defense(name).not_applicable(s.model)
        if reason:
            assert "not applicable to this model" in reason and arch in reason
            with pytest.raises(NotApplicableError):
                run_defense(name, s, "quick", pool_size=20, measure="subset:16")
    report = run_defense("finetune", s, "quick", {"steps": 1}, pool_size=20, measure="subset:16")
    assert 0.0 <= report["ba"] <= 1.0 and report.suspect.card["arch"] == arch


def test_cli_evaluates_a_library_checkpoint_and_the_demo_file(tmp_path):
    torch.manual_seed(0)
    model = create_model("torchvision:mobilenet_v3_small", num_classes=10, in_channels=1, input_size=28)
    path = tmp_path / "mnv3.pth"
    torch.save(model.net.state_dict(), path)
    cmd = [sys.executable, "-m", "backdoor_lens.cli", "evaluate", str(path), "--arch", "torchvision:mobilenet_v3_small",
           "--data", "demo", "--attack", "badnets", "--limit", "64", "--json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert 0.0 <= out["ba"] <= 1.0 and out["asr"] is not None and out["normalization"]["assumed"] is True
    demo = "assets/demo/suspects/badnets/model.safetensors"
    card_ba = json.load(open("assets/demo/suspects/badnets/suspect.json"))["metrics"]["ba"]
    cmd = [sys.executable, "-m", "backdoor_lens.cli", "evaluate", demo, "--arch", "preact_resnet18", "--data", "demo",
           "--normalize", "0.2867/0.3534", "--json"]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert abs(out["ba"] - card_ba) < 1e-6 and out["normalization"]["assumed"] is False
    # without --normalize the data source's standard one is assumed, and said so next to BA
    cmd = cmd[:-3]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "input normalisation: demo" in text and "assumed" in text


def test_exported_program_loads_without_its_code_and_refuses_code(tmp_path):
    import pickle
    import zipfile

    torch.manual_seed(0)
    net = create_model("timm:resnet18", num_classes=10, in_channels=1, input_size=28).net.eval()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(1, 1, 28, 28),)), str(path))  # a batch of one
    s = suspects.load(path, data="demo", normalize="none")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(s.model(x), net(x), atol=1e-5)
    assert "module_hooks" in missing_capabilities(s.model, ["module_hooks"])
    assert get_defense("finetune").not_applicable(s.model) is not None

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.namelist():
            dst.writestr(item, src.read(item))
        dst.writestr("m/extra/payload.pkl", pickle.dumps(Evil()))
    with pytest.raises(suspects.CheckpointError, match="asks to run code"):
        suspects.load(bad, data="demo")


def test_every_page_renders_on_library_models(tmp_path, runs_dir):
    """Every page on a timm ViT (tokens, no BatchNorm) and a torchvision DenseNet (no skips), saved as suspect folders:
    each renders without an exception, and a view that cannot apply says why."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    app = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")

    torch.manual_seed(0)
    folders = {}
    for arch, kw in (("timm:vit_tiny_patch16_224", FAMILIES["timm:vit_tiny_patch16_224"]),
                     ("torchvision:densenet121", FAMILIES["torchvision:densenet121"])):
        model = create_model(arch, num_classes=10, in_channels=1, input_size=28, **kw).eval()
        path = tmp_path / f"{arch.replace(':', '_')}.safetensors"
        save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(path))
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
        s = suspects.load(path, arch=arch, data="demo", trigger=TRIGGER, arch_kwargs=kwargs)
        folders[arch] = suspects.save(s, runs_dir / "uploads" / path.stem)
    pages = ["overview", "gradcam", "activations", "features", "shortcuts", "detection", "screening", "defenses"]
    for arch, folder in folders.items():
        at = AppTest.from_file(app, default_timeout=240)
        at.query_params["suspect"] = str(folder)
        at.session_state["sample_size"] = 50
        at.run()
        assert not at.exception, (arch, at.exception)
        for page in pages:
            at.switch_page(f"views/{page}.py").run()
            assert not at.exception, (arch, page, at.exception)
            if page == "shortcuts" and arch == "torchvision:densenet121":
                assert any("not applicable to this model" in i.value for i in at.info), [i.value for i in at.info]
        if arch == "timm:vit_tiny_patch16_224":  # ANP needs BatchNorm: its card says so
            assert any("not applicable to this model" in str(c.value) for c in [*at.info, *at.caption, *at.warning,
                                                                                 *at.markdown])


def test_architecture_table_in_docs_is_current():
    """The cheap rows of docs/bring-your-own-model.md's table regenerate verbatim (scripts/model_table.py)."""
    from pathlib import Path

    from scripts import model_table as mod

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "bring-your-own-model.md").read_text()
    cheap = [f for f in mod.FAMILIES if f[0] in ("preact_resnet18", "vgg11_bn", "timm:resnet18",
                                                  "timm:vit_tiny_patch16_224")]
    for arch, row in mod.rows(cheap, exported=True):
        assert mod.markdown_row(arch, row) in doc, arch


def test_defend_takes_a_checkpoint_with_the_same_flags(tmp_path, runs_dir):
    """Issue 27.3: `defend` takes a bare checkpoint with --arch / --data / --normalize like `evaluate`; the file is
    kept as one suspect folder (the same file, the same folder), so its run is found again by `compare`."""
    demo = "assets/demo/suspects/badnets/model.safetensors"
    flags = ["--arch", "preact_resnet18", "--data", "demo", "--normalize", "demo", "--attack", "badnets"]
    cmd = [sys.executable, "-m", "backdoor_lens.cli", "defend", "finetune", demo, *flags[:6], "--preset", "quick",
           "--set", "steps=1", "--pool-size", "20", "--measure", "subset:32", "--no-estimate", "--json",
           "--runs", str(runs_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    uploads = list((runs_dir / "uploads").glob("model-*"))
    assert len(uploads) == 1 and json.loads((uploads[0] / "suspect.json").read_text())["normalization"]["label"] == "demo"
    listed = subprocess.run([sys.executable, "-m", "backdoor_lens.cli", "compare", str(uploads[0]), "--json",
                             "--runs", str(runs_dir)], capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout.count('"finetune"') >= 1
    # a file's own problem comes first, named, even without --arch
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    out = subprocess.run([sys.executable, "-m", "backdoor_lens.cli", "defend", "finetune", str(bad),
                          "--runs", str(runs_dir)], capture_output=True, text=True)
    assert out.returncode == 2 and "not a checkpoint" in out.stderr


@pytest.mark.parametrize("size,arch,kw", [
    (64, "torchvision:resnet18", {}),  # Tiny-ImageNet's size
    (224, "timm:vit_tiny_patch16_224", {"depth": 1, "embed_dim": 32, "num_heads": 2}),  # an ImageFolder at 224
])
def test_views_at_other_input_sizes(tmp_path, size, arch, kw):
    """Input sizes other than 28 / 32 go through every view: an ImageFolder of RGB images at 64 and 224 pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b", "c"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    data = {"name": "imagefolder", "root": str(tmp_path), "size": size}
    torch.manual_seed(0)
    model = create_model(arch, num_classes=3, in_channels=3, input_size=size, **kw).eval()
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(path))
    s = suspects.load(path, arch=arch, data=data, trigger={**TRIGGER, "params": {"size": 8}},
                      arch_kwargs={k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
                      normalize="imagenet")
    assert s.input_shape == (3, size, size)
    smp = paired_sample(s.test, s.trigger, 4)
    cams = compare_gradcam(s.model, smp, s.trigger)
    assert cams.clean_cams.shape == (4, size, size)
    assert len(activation_stats(s.model, smp.clean, smp.triggered).table) > 0
    assert feature_set(s, n_clean=6, n_triggered=3).features.shape[0] == 9
    blocks = list_residual_blocks(s.model)
    result = skip_ablation(s.model, smp.clean, s.test.labels[smp.index], smp.triggered, smp.attack_labels,
                           gammas=(1.0, 0.0), blocks=blocks[-1:])
    assert len(result.table) == 2


def test_an_upload_asks_what_the_card_needs_and_overview_measures_it(runs_dir):
    """Issue 27.4: an upload names its data source, normalisation and attack (or 'unknown'); Overview measures BA / ASR
    for it instead of showing n/a and "?" images, and names the normalisation."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from runs.uploads import save_upload

    raw = Path("assets/demo/suspects/badnets/model.safetensors").read_bytes()
    folder, s = save_upload(raw, "mine.safetensors", "preact_resnet18", "demo", root=runs_dir, normalize="demo",
                            trigger=TRIGGER)
    assert s.card["normalization"]["label"] == "demo" and s.trigger is not None
    app = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
    at = AppTest.from_file(app, default_timeout=240)
    at.query_params["suspect"] = str(folder)
    at.run()
    assert not at.exception, at.exception
    values = [m.value for m in at.metric]
    assert values[0] != "n/a" and values[1] != "n/a", values
    assert float(values[1].rstrip("%")) > 90  # the demo BadNets weights under their own trigger
    assert any("measured when the model was opened" in c.value for c in at.caption)
    # the upload form has the fields the card needs
    labels = {w.label for w in [*at.sidebar.selectbox, *at.sidebar.text_input]}
    assert {"Architecture", "Measure on", "Input normalisation", "Attack"} <= labels, labels
