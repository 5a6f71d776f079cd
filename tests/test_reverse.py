"""Neural-Cleanse-style reverse engineering on the demo suspects (small budget)."""

import numpy as np

import suspects
from analysis.reverse import anomaly_indices, neural_cleanse


def test_anomaly_index_definition():
    l1 = np.array([10.0, 10.0, 12.0, 8.0, 1.0])
    idx = anomaly_indices(l1)
    assert idx.argmax() == 4 and idx[4] == (10.0 - 1.0) / (1.4826 * 2.0)


def test_badnets_target_is_flagged_and_clean_is_not():
    bad = suspects.load("demo:badnets")
    x = bad.defense_pool.images()[:200]
    r = neural_cleanse(bad.model, x, bad.num_classes, steps=60)
    assert r.flagged == [0], r.to_dict()
    # the recovered mask sits on the true 3x3 trigger in the bottom-right corner
    fp = bad.trigger.footprint().numpy()
    on_trigger = float((r.masks[0] * fp).sum() / r.masks[0].sum())
    assert on_trigger > 20 * fp.mean(), on_trigger  # 9 of 784 pixels hold far more than their share
    clean = suspects.load("demo:clean")
    rc = neural_cleanse(clean.model, clean.defense_pool.images()[:200], clean.num_classes, steps=60)
    assert rc.flagged == [] and rc.anomaly.max() < 2.0, rc.to_dict()
