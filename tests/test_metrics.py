"""Contract tests over every metric, fed by a 'perfect generator' that returns real test images."""

from __future__ import annotations

import math

import pytest
import torch
from nestar_plugins.datasets.digits import Digits

from nestar_lab.config.registry import get_registry
from nestar_lab.interfaces import EvalContext, Samples, SampleStats

reg = get_registry()
FAST = {
    "class_accuracy": {"epochs": 8},
    "fidelity": {"classifier_epochs": 8, "kid_subsets": 10},
    "within_class_diversity": {"classifier_epochs": 8},
    "speed": {"batch_size": 8, "repeats": 2},
}


def context(tmp_path, images_for, samples_per_class=10):
    ds = Digits()

    def sampler(labels, seed=0, batch_size=None):
        images = images_for(ds, labels)
        return Samples(images, labels, SampleStats(len(labels), 10, 20, 1.0))

    return EvalContext(
        dataset=ds,
        sampler=sampler,
        device=torch.device("cpu"),
        cache_dir=tmp_path,
        dataset_name="digits",
        model=torch.nn.Linear(3, 2),
        samples_per_class=samples_per_class,
    )


def real_test_images(ds, labels):
    test = ds.split("test")
    return torch.cat([test.images[test.labels == c][: int((labels == c).sum())] for c in labels.unique()])


def make(name, **params):
    cls = reg.get("metric", name)
    return cls(cls.Params(**{**FAST.get(name, {}), **params}))


@pytest.mark.parametrize("name", reg.names("metric"))
def test_metric_returns_finite_named_numbers(name, tmp_path):
    metric = make(name)
    values = metric.compute(context(tmp_path, real_test_images))
    assert values and all(isinstance(v, float) and math.isfinite(v) for v in values.values())
    named = metric.names("digits")  # what a study checks its objectives against before any trial
    if named is not None:
        assert set(values) - {f"nfe_module_{i}" for i in range(1, 10)} == named


def test_fidelity_names_follow_its_switches_and_extractor():
    named = make("fidelity", isc=False, kid=False, real_baseline=False).names("digits")
    assert named == {"fid_digits_cnn", "precision_digits_cnn", "recall_digits_cnn"}
    assert "fid_inception_real" in make("fidelity", extractor="inception").names("imagenet")


def test_class_accuracy_of_real_images_matches_the_reference_and_noise_fails(tmp_path):
    metric = make("class_accuracy")
    real = metric.compute(context(tmp_path, real_test_images))
    assert real["class_accuracy_real_test"] > 0.9
    assert abs(real["class_accuracy"] - real["class_accuracy_real_test"]) < 0.08
    cached = list(tmp_path.glob("classifier-*.pt"))
    assert len(cached) == 1
    noise = metric.compute(context(tmp_path, lambda ds, labels: torch.rand(len(labels), 1, 8, 8) * 2 - 1))
    assert noise["class_accuracy"] < 0.4
    assert list(tmp_path.glob("classifier-*.pt")) == cached, "the classifier is trained once and cached"


def test_nearest_train_distance_flags_copies(tmp_path):
    metric = make("nearest_train_distance")
    real = metric.compute(context(tmp_path, real_test_images))
    assert real["nn_train_dist_generated"] == pytest.approx(real["nn_train_dist_real_test"], rel=0.2)

    def copies(ds, labels):
        return ds.split("train").images[: len(labels)]

    copied = metric.compute(context(tmp_path, copies))
    assert copied["copy_rate"] == 1.0 and copied["nn_train_dist_generated"] == 0.0
