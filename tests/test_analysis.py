"""Each analysis on the real demo suspects: the backdoored model must look different from the clean one."""

import numpy as np
import pytest
import torch

from analysis.activations import activation_stats, channel_norms, default_layers
from analysis.features import feature_set, pca_2d, separation_score, umap_2d
from analysis.gradcam import attention_share, compare_gradcam, compute_cams, map_shift, strongest_pixels
from analysis.samples import balanced_indices, paired_sample
from analysis.shortcuts import MIN_CRITICAL_SCORE, NoSkipConnectionsError, critical_block_score, skip_ablation
from defenses.common import head
from suspects.metrics import evaluate
from suspects.models import create_model
from suspects.store import load
from suspects.triggers import make_trigger


@pytest.fixture(scope="module")
def badnets():
    return load("demo:badnets")


@pytest.fixture(scope="module")
def clean():
    return load("demo:clean")


def badnets_trigger(s):
    return make_trigger("badnets", s.input_shape, s.num_classes, target=0)


def test_whole_image_triggers_get_a_measure_that_means_something(badnets):
    """Issue 12 item 6: the footprint share is ~100% for a blended trigger, so the view flags it and measures the
    map's shift and the share on the trigger's strongest pixels instead."""
    a = np.zeros((2, 4, 4), dtype=np.float32)
    a[:, 0, 0] = 1.0
    b = np.zeros_like(a)
    b[0, 0, 0], b[1, 3, 3] = 1.0, 1.0
    assert np.allclose(map_shift(a, b), [0.0, 1.0])  # same place / somewhere else entirely
    patch = badnets_trigger(badnets)
    x = badnets.test.images(torch.arange(8))
    strong = strongest_pixels(patch, x, fraction=9 / 784)
    assert strong.sum() == 9 and (strong & patch.footprint(x).numpy()).sum() == 9  # the 3x3 patch itself
    blended = load("demo:blended")
    res = compare_gradcam(blended.model, paired_sample(blended.test, blended.trigger, 16), blended.trigger)
    assert res.whole_image and res.mean_triggered_share > 0.95  # the old share says nothing here
    assert 0.0 < res.mean_shift <= 1.0 and res.shift.shape == (16,)
    assert res.strongest_fraction == pytest.approx(0.1, abs=0.01)
    assert not compare_gradcam(badnets.model, paired_sample(badnets.test, patch, 8), patch).whole_image


def test_paired_sample_is_balanced_and_excludes_target(badnets):
    smp = paired_sample(badnets.test, badnets.trigger, 45)
    assert len(smp) == 45 and (smp.labels != 0).all()
    assert smp.labels.bincount(minlength=10)[1:].tolist() == [5] * 9
    assert torch.equal(smp.triggered, badnets.trigger(smp.clean))
    assert torch.equal(balanced_indices(badnets.test.labels, 45, 0, badnets.trigger.test_mask(badnets.test.labels)),
                       smp.index)


def test_gradcam_attends_to_the_trigger_on_badnets_not_on_clean(badnets, clean):
    trig = badnets_trigger(badnets)
    smp = paired_sample(badnets.test, trig, 24)
    bad = compare_gradcam(badnets.model, smp, trig)
    ok = compare_gradcam(clean.model, smp, trig)
    assert bad.layer == "layer3.1"  # deepest block with a 7x7 map on 28x28 inputs
    assert bad.clean_cams.shape == (24, 28, 28) and 0 <= bad.clean_cams.min() and bad.clean_cams.max() <= 1
    assert (bad.triggered_pred == 0).mean() > 0.9
    # the backdoored model puts clearly more of its attention on the 3x3 patch than the clean model does
    assert bad.mean_triggered_share > 2 * ok.mean_triggered_share
    assert bad.mean_triggered_share > bad.footprint_fraction * 3


def test_gradcam_methods_and_targets(badnets):
    smp = paired_sample(badnets.test, badnets.trigger, 4)
    for method in ("GradCAM++", "XGradCAM", "LayerCAM", "EigenCAM"):
        cams = compute_cams(badnets.model, smp.triggered, "layer3.1", method, targets=[0] * 4)
        assert cams.shape == (4, 28, 28) and np.isfinite(cams).all()
    res = compare_gradcam(badnets.model, smp, badnets.trigger, target_kind="true")
    assert res.target_kind == "true"
    with pytest.raises(ValueError, match="unknown CAM method"):
        compute_cams(badnets.model, smp.clean, "layer3.1", "MagicCAM")
    with pytest.raises(ValueError, match="no layer"):
        compute_cams(badnets.model, smp.clean, "layer9", "GradCAM")
    assert not any(p.grad is not None for p in badnets.model.parameters())  # gradients are cleared


def test_attention_share_definition():
    cams = np.zeros((2, 4, 4), dtype=np.float32)
    cams[0, 0, 0] = 1.0
    cams[1] = 1.0
    fp = np.zeros((4, 4), dtype=bool)
    fp[0, 0] = True
    assert attention_share(cams, fp).tolist() == [1.0, 1 / 16]


def test_channel_norms_match_hand_computation(badnets):
    x = badnets.test.images(torch.arange(3))
    norms = channel_norms(badnets.model, x, ["layer4.1"])["layer4.1"]
    captured = []
    h = badnets.model.layer4[1].register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    with torch.no_grad():
        badnets.model(x)
    h.remove()
    a = captured[0].abs().flatten(2)
    assert np.allclose(norms[..., 0], a.sum(2).numpy(), rtol=1e-5)
    assert np.allclose(norms[..., 1], a.pow(2).sum(2).sqrt().numpy(), rtol=1e-5)
    assert np.allclose(norms[..., 2], a.amax(2).numpy(), rtol=1e-5)


def test_linf_bias_is_larger_for_the_backdoored_suspect(badnets, clean):
    trig = badnets_trigger(badnets)
    smp = paired_sample(badnets.test, trig, 300)
    bad = activation_stats(badnets.model, smp.clean, smp.triggered)
    ok = activation_stats(clean.model, smp.clean, smp.triggered)
    assert bad.layers == default_layers(badnets.model) and len(bad.layers) == 8
    deep = ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    b = bad.layer_summary().set_index("layer").loc[deep, "top_linf_bias"]
    c = ok.layer_summary().set_index("layer").loc[deep, "top_linf_bias"]
    assert b.max() > 1.5 * c.max(), (b.to_dict(), c.to_dict())
    top = bad.ranking(top=5)
    assert (top.linf_bias.diff().dropna() <= 0).all()
    assert {"l1_clean_mean", "linf_trig_std", "growth_l2", "linf_score"} <= set(bad.table.columns)


def test_gamma_one_ablation_equals_evaluate(badnets):
    test = badnets.test.subset(torch.arange(300))
    trig = badnets.trigger
    mask = trig.test_mask(test.labels)
    x = test.images()
    res = skip_ablation(badnets.model, x, test.labels, trig(x[mask]), trig.target_labels(test.labels[mask]),
                        gammas=(1.0, 0.5, 0.0), blocks=["layer2.0", "layer4.1"])
    m = evaluate(badnets.model, test, trig)
    at1 = res.table[res.table.gamma == 1.0]
    assert np.allclose(at1.ba, m.ba, atol=1e-6) and np.allclose(at1.asr, m.asr, atol=1e-6)
    # ASR stays 1.0 down to gamma = 0 on both blocks: no score exceeds the threshold, so no block is critical
    assert len(res.table) == 6 and max(res.scores.values()) <= MIN_CRITICAL_SCORE and res.critical_block is None
    # the fast prefix/suffix path agrees with a plain forward with the gamma set
    from suspects.models import reset_skip_gammas, set_skip_gamma

    set_skip_gamma(badnets.model, "layer2.0", 0.5)
    m_half = evaluate(badnets.model, test, trig)
    reset_skip_gammas(badnets.model)
    row = res.table[(res.table.block == "layer2.0") & (res.table.gamma == 0.5)].iloc[0]
    assert abs(row.ba - m_half.ba) < 1e-6 and abs(row.asr - m_half.asr) < 1e-6
    assert all(g == 1.0 for g in [b.gamma for _, b in __import__("suspects.models").models.residual_blocks(badnets.model)])


def test_critical_block_rule():
    assert critical_block_score([0.0, 0.5, 1.0], [0.0, 0.0, 1.0]) == pytest.approx(1.0)
    assert critical_block_score([1.0, 0.5, 0.0], [1.0, 0.9, 0.8]) == pytest.approx(0.1 / np.exp(0.8))
    assert critical_block_score([0.0, 1.0], [0.5, 0.5]) == 0.0


def test_ablation_refuses_a_model_without_skips():
    vgg = create_model("vgg11_bn", num_classes=10, in_channels=1, width=4)
    x = torch.rand(4, 1, 28, 28)
    with pytest.raises(NoSkipConnectionsError, match="no skip connections"):
        skip_ablation(vgg, x, torch.zeros(4, dtype=torch.long), x, torch.zeros(4, dtype=torch.long))


def test_poisoned_points_separate_in_feature_space(badnets, clean):
    fs = feature_set(badnets, n_clean=300, n_triggered=150, n_train=200)
    kinds = set(fs.kind.tolist())
    assert kinds == {"clean test", "triggered test", "clean train", "poisoned train"}
    assert fs.features.shape == (len(fs), head(badnets.model).in_features) and fs.images.dtype == np.uint8
    assert fs.poisoned[fs.kind == "poisoned train"].all() and not fs.poisoned[fs.kind == "clean test"].any()
    emb = umap_2d(fs.features, seed=0)
    assert emb.shape == (len(fs), 2)
    sep = separation_score(emb, fs.poisoned)
    assert sep["score"] > 0.8 and sep["score"] > 2 * sep["chance"], sep
    # the clean model does not pull its triggered inputs together
    fs_clean = feature_set(clean, n_clean=300, n_triggered=0, n_train=0)
    trig = badnets_trigger(clean)
    smp = paired_sample(clean.test, trig, 150, seed=1)
    from analysis.features import extract_features

    f_trig, _ = extract_features(clean.model, smp.triggered)
    feats = np.concatenate([fs_clean.features, f_trig])
    flags = np.r_[np.zeros(len(fs_clean), bool), np.ones(len(f_trig), bool)]
    assert separation_score(pca_2d(feats), flags)["score"] < sep["score"]
