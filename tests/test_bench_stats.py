"""The statistics the quality benchmark's claims rest on: t-intervals, the verdicts drawn from
them, and the caveat for learning rates chosen at an edge of the search grid."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_quality  # noqa: E402
import quality_stats  # noqa: E402


def test_interval_is_the_t_interval_of_the_mean_clipped_to_bounds():
    n, mean, std, lo, hi = quality_stats.interval(pd.Series([1.0, 2.0, 3.0]))
    half = 4.302653 * 1.0 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n)
    assert (n, mean, std) == (3, 2.0, 1.0)
    assert lo == pytest.approx(2.0 - half, abs=1e-5) and hi == pytest.approx(2.0 + half, abs=1e-5)
    _, _, _, lo, hi = quality_stats.interval(pd.Series([0.9, 0.95, 1.0]), (0.0, 1.0))
    assert hi == 1.0 and lo < 0.95  # a fraction's interval stays in [0, 1]
    n, mean, std, lo, hi = quality_stats.interval(pd.Series([5.0, None]))
    assert n == 1 and mean == 5.0 and math.isnan(std) and math.isnan(lo)


def runs(variant: str, fids: list[float], accs: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"variant": variant, "train.lr": 1e-3, "seed": range(len(fids)), "train.steps": 300,
                         "num_parameters": 1000, "fid_digits_cnn": fids, "class_accuracy": accs})  # fmt: skip


def test_verdicts_name_the_better_variant_only_when_intervals_are_disjoint():
    table = pd.concat([
        runs("ref", [30.0, 31.0, 32.0], [0.90, 0.91, 0.92]),
        runs("worse", [50.0, 51.0, 52.0], [0.60, 0.61, 0.62]),  # FID higher, accuracy lower: both worse
        runs("noisy", [10.0, 30.0, 50.0], [0.5, 0.9, 1.0]),  # wide intervals overlapping ref's
    ])  # fmt: skip
    summary = quality_stats.summarize(table, ["ref", "worse", "noisy"])
    lines = dict(line.split(": ", 1) for line in quality_stats.comparisons(summary, "ref"))
    assert lines["- worse vs ref"] == ("FID (digits CNN) intervals disjoint: ref better; "
                                       "class accuracy intervals disjoint: ref better")  # fmt: skip
    assert lines["- noisy vs ref"].count("no difference claimed") == 2
    one_seed = quality_stats.summarize(runs("ref", [30.0], [0.9]), ["ref"])
    assert "(one seed)" in quality_stats.markdown(one_seed)
    assert quality_stats.comparisons(one_seed, "other") == ["(no rows for other: nothing to compare against)"]


def test_learning_rates_at_an_edge_of_the_grid_are_flagged():
    summary = pd.DataFrame({"variant": ["a", "b", "c"], "lr": [0.005, 0.0012, 0.0003]})
    note = bench_quality.grid_edges(summary, [0.0003, 0.0012, 0.005])
    assert "a (lr 0.005, the largest tried)" in note and "c (lr 0.0003, the smallest tried)" in note
    assert "b (" not in note
    assert bench_quality.grid_edges(summary.iloc[1:2], [0.0003, 0.0012, 0.005]) == ""


def test_shown_path_is_relative_inside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "q").mkdir(parents=True)
    assert bench_quality.shown_path(tmp_path / "runs" / "q") == "runs/q"
    outside = tmp_path.parent / "elsewhere"
    assert bench_quality.shown_path(outside) == str(outside)
