"""The papers' protocol: FID against an ADM-layout ``.npz`` (``mu``, ``sigma``, ``arr_0``), the
bounded precision/recall reference set, ``nestar ref-stats``, and one-line errors for bad files."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import yaml
from nestar_plugins.metrics.extractors import to_uint8
from nestar_plugins.metrics.reference_stats import reference_subset
from test_metrics import FAST, context, make, real_test_images

from nestar_lab.cli import main
from nestar_lab.run.evaluate import cache_root

DIM = 128  # the digits CNN's penultimate width: 4 x classifier_width (32)
QUICK = {"isc": False, "real_baseline": False}


def ctx(tmp_path):
    """Real test digits as the 'samples'; the session cache, so the CNN is trained once."""
    return dataclasses.replace(context(tmp_path, real_test_images, samples_per_class=10), cache_dir=cache_root())


def write_config(tiny_raw, tmp_path, **params):
    tiny_raw["metrics"] = [{"name": "fidelity", "params": {**FAST["fidelity"], **params}}]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_raw))
    return path


def ref_stats(tiny_raw, tmp_path, name="ref.npz", **params):
    out = tmp_path / name
    assert main(["ref-stats", str(write_config(tiny_raw, tmp_path, **params)), "--out", str(out)]) == 0
    return out


def test_ref_stats_writes_the_adm_layout_and_fid_against_it_equals_fid_against_the_split(tiny_raw, tmp_path):
    out = ref_stats(tiny_raw, tmp_path)
    with np.load(out) as f:
        assert set(f.files) == {"mu", "sigma", "arr_0"}
        mu, sigma, arr = f["mu"], f["sigma"], f["arr_0"]
    train = ctx(tmp_path).dataset.split("train")
    assert mu.shape == (DIM,) and sigma.shape == (DIM, DIM) and mu.dtype == sigma.dtype == np.float64
    assert arr.shape == (len(train), 8, 8, 3) and arr.dtype == np.uint8  # NHWC, grey repeated to RGB
    assert np.array_equal(arr[..., 0], to_uint8(train.images)[:, 0].numpy()) and (arr[..., 1] == arr[..., 2]).all()

    split = make("fidelity", reference="train", **QUICK).compute(ctx(tmp_path))
    from_file = make("fidelity", reference=str(out), **QUICK).compute(ctx(tmp_path))
    assert from_file["fid_digits_cnn"] == pytest.approx(split["fid_digits_cnn"], rel=1e-6, abs=1e-9)
    for key in ("kid_digits_cnn", "precision_digits_cnn", "recall_digits_cnn"):  # arr_0 is the whole split here
        assert from_file[key] == pytest.approx(split[key], abs=1e-3), key


def test_precision_recall_subset_is_seeded_and_bounded(tiny_raw, tmp_path):
    a, b = reference_subset(1000, 50, seed=0), reference_subset(1000, 50, seed=0)
    other = reference_subset(1000, 50, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert len(a) == 50 and len(set(a.tolist())) == 50 and 0 <= int(a.min()) and int(a.max()) < 1000
    assert torch.equal(reference_subset(30, 50, seed=0), torch.arange(30))  # fewer than the limit: all of them

    out = ref_stats(tiny_raw, tmp_path, prc_reference_limit=50, prc_reference_seed=3)
    train = ctx(tmp_path).dataset.split("train")
    with np.load(out) as f:
        arr, mu = f["arr_0"], f["mu"]
    assert arr.shape[0] == 50 and mu.shape == (DIM,)  # mu, sigma still over the whole split
    want = to_uint8(train.images[reference_subset(len(train), 50, 3)])[:, 0].numpy()
    assert np.array_equal(arr[..., 0], want)
    # the metric's own split subset is the same one: precision/recall agree with the file's
    params = dict(QUICK, fid=False, kid=False, prc_reference_limit=50, prc_reference_seed=3)
    split = make("fidelity", reference="train", **params).compute(ctx(tmp_path))
    from_file = make("fidelity", reference=str(out), **params).compute(ctx(tmp_path))
    assert from_file["precision_digits_cnn"] == pytest.approx(split["precision_digits_cnn"], abs=1e-3)
    assert from_file["recall_digits_cnn"] == pytest.approx(split["recall_digits_cnn"], abs=1e-3)


def test_a_file_without_reference_images_gives_fid_and_marks_kid_and_pr_not_computable(tiny_raw, tmp_path):
    full = ref_stats(tiny_raw, tmp_path)
    stats_only = tmp_path / "stats_only.npz"
    with np.load(full) as f:
        np.savez(stats_only, mu=f["mu"], sigma=f["sigma"])
    with pytest.warns(UserWarning, match="stats_only.npz has no arr_0"):
        out = make("fidelity", reference=str(stats_only), **QUICK).compute(ctx(tmp_path))
    assert math.isfinite(out["fid_digits_cnn"])
    assert all(math.isnan(out[f"{k}_digits_cnn"]) for k in ("kid", "kid_std", "precision", "recall"))


def _bad_files(tmp_path):
    mu, sigma, images = np.zeros(DIM), np.eye(DIM), np.zeros((4, 8, 8, 3), np.uint8)
    cases = {
        "no_mu": ({"sigma": sigma}, "no 'mu' array"),
        "no_sigma": ({"mu": mu}, "no 'sigma' array"),
        "wrong_dim": ({"mu": np.zeros(7), "sigma": np.eye(7)}, rf"expected float mu \({DIM},\) and sigma"),
        "nchw": ({"mu": mu, "sigma": sigma, "arr_0": images.transpose(0, 3, 1, 2)}, r"\(N, H, W, 3\) uint8"),
        "float_images": ({"mu": mu, "sigma": sigma, "arr_0": images.astype(np.float32)}, r"\(N, H, W, 3\) uint8"),
        "grey_images": ({"mu": mu, "sigma": sigma, "arr_0": images[..., :1]}, r"\(N, H, W, 3\) uint8"),
    }
    for name, (arrays, expected) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        yield tmp_path / f"{name}.npz", expected
    (tmp_path / "not_npz.npz").write_text("hello")
    yield tmp_path / "not_npz.npz", "not a readable .npz"
    yield tmp_path / "missing.npz", "reference statistics not found.*nestar ref-stats"


def test_bad_reference_files_are_one_line_errors_naming_the_file(tmp_path):
    for path, expected in _bad_files(tmp_path):
        with pytest.raises((ValueError, FileNotFoundError), match=expected) as info:
            make("fidelity", reference=str(path))  # at construction: before any training or sampling
        message = str(info.value)
        assert message.startswith(str(path)) and "\n" not in message, message


def test_a_bad_reference_stops_nestar_run_before_training(tiny_raw, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(7), sigma=np.eye(7))
    config = write_config(tiny_raw, tmp_path, reference=str(bad))
    assert main(["run", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: mu is (7,)") and "\n" not in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_ref_stats_needs_a_fidelity_metric(tiny_raw, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(tiny_raw))  # class_accuracy and nearest_train_distance only
    assert main(["ref-stats", str(config), "--out", str(tmp_path / "x.npz")]) == 2
    assert "no fidelity metric" in capsys.readouterr().err
