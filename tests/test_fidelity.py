"""torch-fidelity metrics give the right numbers: closed forms and known orderings on real digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_metrics import context, make, real_test_images
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric


def frechet_closed_form(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), via eigenvalues of S_a S_b."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = np.sqrt(np.clip(np.linalg.eigvals(s_a @ s_b).real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def test_fid_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, size=(4000, 6))
    b = rng.normal(0.5, 1.0, size=(4000, 6)) @ np.diag([1, 2, 0.5, 1, 1, 3])
    stats = [fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)]
    got = fid_statistics_to_metric(*stats, verbose=False)
    assert got["frechet_inception_distance"] == pytest.approx(frechet_closed_form(a, b), rel=1e-6)
    # and the population value: ||0.5 s||^2 from the mean shift + sum (1 - s)^2 over the scales s
    scales = np.array([1, 2, 0.5, 1, 1, 3])
    population = (0.25 * scales**2).sum() + ((1 - scales) ** 2).sum()
    assert got["frechet_inception_distance"] == pytest.approx(population, rel=0.05)


def ctx_for(tmp_path, images_for, spc=30):
    return context(tmp_path, images_for, samples_per_class=spc)


def test_fid_orders_real_noise_and_a_repeated_image(tmp_path):
    metric = make("fidelity")
    real = metric.compute(ctx_for(tmp_path, real_test_images))
    noise = metric.compute(ctx_for(tmp_path, lambda ds, labels: torch.rand(len(labels), 1, 8, 8) * 2 - 1))
    single = metric.compute(ctx_for(tmp_path, lambda ds, labels: ds.split("test").images[:1].expand(len(labels), -1, -1, -1)))
    assert real["fid_digits_cnn"] * 5 < noise["fid_digits_cnn"]
    assert real["fid_digits_cnn"] * 5 < single["fid_digits_cnn"]
    assert real["is_digits_cnn"] > 5 > single["is_digits_cnn"]  # 10 classes, confidently recognised


def test_precision_recall_of_a_set_against_itself_and_of_dropped_modes(tmp_path):
    metric = make("fidelity", reference="test", fid=False, isc=False, kid=False)
    itself = metric.compute(ctx_for(tmp_path, real_test_images, spc=35))
    assert itself["precision_digits_cnn"] > 0.95 and itself["recall_digits_cnn"] > 0.95

    def half_the_classes(ds, labels):
        test = ds.split("test")
        keep = test.images[test.labels < 5]
        return keep[torch.arange(len(labels)) % len(keep)]

    dropped = metric.compute(ctx_for(tmp_path, half_the_classes, spc=35))
    assert dropped["precision_digits_cnn"] > 0.9
    assert dropped["recall_digits_cnn"] < 0.7


def test_reference_features_are_cached_once(tmp_path):
    metric = make("fidelity", isc=False, prc=False)
    metric.compute(ctx_for(tmp_path, real_test_images, spc=3))  # 30 samples: KID subset clamped
    cached = sorted((tmp_path / "fidelity").glob("nestar-digits-train-*"))
    assert cached, "reference statistics must be cached"
    stamps = [p.stat().st_mtime_ns for p in cached]
    metric.compute(ctx_for(tmp_path, real_test_images, spc=3))
    assert sorted((tmp_path / "fidelity").glob("nestar-digits-train-*")) == cached
    assert [p.stat().st_mtime_ns for p in cached] == stamps


def test_inception_without_local_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NESTAR_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="NESTAR_INCEPTION_WEIGHTS.*weights-inception"):
        make("fidelity", extractor="inception").compute(ctx_for(tmp_path, real_test_images, spc=2))
    with pytest.raises(FileNotFoundError, match="nope.pth: Inception weights file not found"):
        make("fidelity", extractor="inception", inception_weights=str(tmp_path / "nope.pth")).compute(
            ctx_for(tmp_path, real_test_images, spc=2)
        )


def test_mismatched_samples_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"generated images are \(1, 4, 4\)"):
        make("fidelity").compute(ctx_for(tmp_path, lambda ds, labels: torch.zeros(len(labels), 1, 4, 4), spc=2))


def test_within_class_diversity_of_real_images_is_about_one_and_collapse_is_low(tmp_path):
    metric = make("within_class_diversity")
    real = metric.compute(ctx_for(tmp_path, real_test_images, spc=30))
    assert 0.8 < real["diversity_ratio_digits_cnn"] < 1.2

    def one_per_class(ds, labels):
        test = ds.split("test")
        firsts = torch.stack([test.images[test.labels == c][0] for c in range(10)])
        return firsts[labels]

    assert metric.compute(ctx_for(tmp_path, one_per_class))["diversity_ratio_digits_cnn"] < 0.01


def test_inception_weights_of_the_wrong_shape_are_a_clear_error(tmp_path):
    bad = tmp_path / "wrong.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(8, 3, 3, 3)}, bad)
    with pytest.raises(ValueError, match=r"wrong.pth: not Inception weights \(Conv2d_1a_3x3.conv.weight is \(8, 3, 3, 3\)"):
        make("fidelity", extractor="inception", inception_weights=str(bad)).compute(ctx_for(tmp_path, real_test_images, spc=2))


def test_real_baseline_scores_held_out_images(tmp_path):
    out = make("fidelity", real_baseline=True, isc=False, prc=False).compute(
        ctx_for(tmp_path, lambda ds, labels: torch.rand(len(labels), 1, 8, 8) * 2 - 1)
    )
    assert out["fid_digits_cnn_real"] * 5 < out["fid_digits_cnn"]
