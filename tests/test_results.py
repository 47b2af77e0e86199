"""The results store, tables, plots, and a row that survives a failing metric."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from nestar_lab.cli import main
from nestar_lab.config.validation import validate_config
from nestar_lab.run import results
from nestar_lab.run.evaluate import evaluate
from nestar_lab.run.train import load_trained, train
from nestar_lab.sweep.plots import higher_is_better, pareto_mask


def fake_rows(tiny_raw, tmp_path):
    for k, solver, fid, sec in [(4, "euler", 10.0, 0.01), (4, "rk4", 8.0, 0.03), (8, "euler", 12.0, 0.02), (8, "rk4", 7.0, 0.05)]:
        raw = {**tiny_raw, "generator": {"name": "nestar", "params": {"k": k}}, "ode_solver": {"name": solver}}
        results.append_run(validate_config(raw), tmp_path / f"run-k{k}-{solver}", {"fid_digits_cnn": fid, "sec_per_image": sec}, "cpu")
    return results.load(tiny_raw["output_dir"])


def test_rows_hold_ids_knobs_and_metrics(tiny_raw, tmp_path):
    df = fake_rows(tiny_raw, tmp_path)
    assert len(df) == 4
    assert {"run_id", "time", "config_hash", "device", "generator", "generator.k", "ode_solver.steps", "train.lr"} <= set(df.columns)
    assert df["config_hash"].nunique() == 4


def test_table_filters_groups_and_picks_metrics(tiny_raw, tmp_path):
    df = fake_rows(tiny_raw, tmp_path)
    only_k4 = results.table(df, where=["k=4"], metrics=["fid_digits_cnn"])
    assert list(only_k4.columns) == ["run_id", "fid_digits_cnn"] and len(only_k4) == 2
    by = results.table(df, by=["ode_solver"], metrics=["fid_digits_cnn", "sec_per_image"])
    rk4 = by[by["ode_solver"] == "rk4"].iloc[0]
    assert rk4["runs"] == 2 and rk4["fid_digits_cnn"] == pytest.approx(7.5)
    with pytest.raises(KeyError, match="no column 'kk'"):
        results.table(df, where=["kk=4"])
    assert "| ode_solver | runs |" in results.to_markdown(by)


def test_cli_table_and_plot(tiny_raw, tmp_path, capsys):
    fake_rows(tiny_raw, tmp_path)
    out_dir = tiny_raw["output_dir"]
    assert main(["table", "--results-dir", out_dir, "--by", "generator.k", "--metrics", "fid_digits_cnn", "--format", "csv"]) == 0
    frame = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out))
    assert frame.set_index("generator.k")["fid_digits_cnn"].to_dict() == {4: 9.0, 8: 9.5}
    png = tmp_path / "plot.png"
    assert main(["plot", "--results-dir", out_dir, "--y", "fid_digits_cnn", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert main(["table", "--results-dir", str(tmp_path / "no_such_dir")]) == 2  # a typo, most likely: an error
    (tmp_path / "empty").mkdir()
    assert main(["table", "--results-dir", str(tmp_path / "empty")]) == 1  # a store with no runs yet


def test_pareto_front():
    x = pd.Series([0.01, 0.03, 0.02, 0.05])  # seconds: lower is better
    y = pd.Series([10.0, 8.0, 12.0, 7.0])  # FID: lower is better
    assert pareto_mask(x, y, False, False).tolist() == [True, True, False, True]
    assert higher_is_better("class_accuracy") and higher_is_better("is_digits_cnn") and not higher_is_better("fid_x")


def test_failed_metric_is_recorded_and_the_row_kept(tiny_raw, tmp_path, monkeypatch):
    monkeypatch.delenv("NESTAR_INCEPTION_WEIGHTS", raising=False)
    tiny_raw["metrics"] = [
        {"name": "fidelity", "params": {"extractor": "inception"}},
        {"name": "nearest_train_distance"},
    ]
    cfg = validate_config(tiny_raw)
    run = train(cfg, tmp_path / "run", progress=False).run_dir
    row = evaluate(load_trained(run), run)
    assert "NESTAR_INCEPTION_WEIGHTS" in row["error_fidelity"]
    assert "nn_train_dist_generated" in row
    saved = json.loads((run / "metrics.json").read_text())["metrics"]
    assert saved["error_fidelity"] == row["error_fidelity"]
    df = results.load(cfg.output_dir)
    assert len(df) == 1 and df.iloc[0]["run_id"] == "run" and "error_fidelity" in df.columns


def test_a_row_says_where_and_in_which_precision_its_run_trained_and_sampled(tiny_raw, tmp_path):
    """Two rows are comparable only if they trained alike: ``auto`` precision is bf16 on a CPU with
    fast bf16 and fp32 on one without, so the store records what it resolved to, and the device."""
    cfg = validate_config({**tiny_raw, "train": {**tiny_raw["train"], "precision": "fp32"}})
    run = train(cfg, tmp_path / "run", progress=False).run_dir
    evaluate(load_trained(run), run)
    row = results.load(cfg.output_dir).iloc[0]
    assert row["device"] == "cpu" and row["hardware"].startswith("CPU (") and "threads" in row["hardware"]
    assert (row["train_precision"], row["sample_precision"]) == ("fp32", "fp32")
    assert row["train_hardware"] == row["hardware"]
    assert not {"hardware", "train_hardware", "train_precision", "sample_precision"} & set(results.metric_columns(
        results.load(cfg.output_dir)))  # fmt: skip


def seeded_rows(tiny_raw, tmp_path, arms: dict[str, list[float]]):
    """One run per (coordination weight arm, seed) with the given FIDs; seed effects shared by every arm."""
    for weight, fids in arms.items():
        for seed, fid in enumerate(fids):
            raw = {**tiny_raw, "seed": seed, "coordination": {"name": "velocity_matching", "params": {"weight": float(weight)}}}
            results.append_run(validate_config(raw), tmp_path / f"run-w{weight}-s{seed}",
                               {"fid_digits_cnn": fid, "class_accuracy": 0.9}, "cpu")  # fmt: skip
    return tiny_raw["output_dir"]


def test_table_reference_pairs_groups_over_seeds(tiny_raw, tmp_path, capsys):
    seed_effect = [0.0, 3.0, -2.0, 5.0, 1.0]
    out_dir = seeded_rows(tiny_raw, tmp_path, {
        "0": [10 + e for e in seed_effect],
        "0.5": [9 + e + j for e, j in zip(seed_effect, [0.1, -0.1, 0.05, 0.0, -0.05])],  # 1 lower, resolved
        "2": [10 + e + j for e, j in zip(seed_effect, [1.0, -1.0, 0.5, -0.5, 0.2])],  # no real change
    })  # fmt: skip
    assert main(["table", "--results-dir", out_dir, "--by", "coordination.weight", "--reference", "0",
                 "--metrics", "fid_digits_cnn", "--format", "csv"]) == 0  # fmt: skip
    frame = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out), dtype={"group": str}).set_index("group")
    assert frame.loc["0.5", "diff"] == pytest.approx(-1.0) and frame.loc["0.5", "diff_seeds"] == 5
    assert frame.loc["0.5", "resolved"] and frame.loc["0.5", "diff_hi"] < 0
    assert not frame.loc["2.0", "resolved"] and frame.loc["2.0", "diff_lo"] < 0 < frame.loc["2.0", "diff_hi"]
    # unpaired, the seed effect (std 2.7) swamps the 1.0 difference: the means' intervals overlap
    assert frame.loc["0.5", "hi"] > frame.loc["0.0", "lo"]
    assert main(["table", "--results-dir", out_dir, "--by", "coordination.weight", "--reference", "0.0",
                 "--metrics", "fid_digits_cnn"]) == 0  # fmt: skip
    md = capsys.readouterr().out
    assert "| 0.0 (reference) |" in md and "resolved: lower" in md and "not resolved at 5 seeds" in md


def test_table_reference_refuses_what_cannot_be_paired(tiny_raw, tmp_path, capsys):
    out_dir = seeded_rows(tiny_raw, tmp_path, {"0": [10.0, 11.0], "1": [9.0, 10.5]})
    base = ["table", "--results-dir", out_dir, "--metrics", "fid_digits_cnn"]
    # the same run evaluated again with the same settings counts once, with its last row
    raw = {**tiny_raw, "seed": 1, "coordination": {"name": "velocity_matching", "params": {"weight": 1.0}}}
    results.append_run(validate_config(raw), tmp_path / "run-w1-s1", {"fid_digits_cnn": 12.0}, "cpu")
    assert main(base + ["--by", "coordination.weight", "--reference", "0", "--format", "csv"]) == 0
    frame = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out), dtype={"group": str}).set_index("group")
    assert frame.loc["1.0", "mean"] == pytest.approx((9.0 + 12.0) / 2) and frame.loc["1.0", "diff_seeds"] == 2
    cases = [
        (["--by", "coordination.weight", "--reference", "3"], "--reference '3': no runs with coordination.weight = '3'"),
        (["--reference", "0"], "--reference: give --by too"),
        (["--by", "coordination", "--reference", "velocity_matching"], "more than one run at seed 0"),
        (["--by", "coordination", "--reference", "nope"], "--reference 'nope': no runs with coordination"),  # first
        (["--by", "coordination.weight", "--reference", "0", "--where", "seed=7"], "no runs left after --where"),
    ]
    for extra, want in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err


def test_table_reference_names_a_group_of_several_columns(tiny_raw, tmp_path, capsys):
    arms = [("none", None, [10.0, 12.0, 11.0]), ("velocity_matching", 0.1, [9.0, 11.2, 10.1]),
            ("velocity_matching", 1.0, [10.5, 12.1, 11.6])]  # fmt: skip
    for name, weight, fids in arms:
        for seed, fid in enumerate(fids):
            coordination = {"name": name, "params": {} if weight is None else {"weight": weight}}
            raw = {**tiny_raw, "seed": seed, "coordination": coordination}
            results.append_run(validate_config(raw), tmp_path / f"{name}-{weight}-{seed}", {"fid_digits_cnn": fid}, "cpu")
    base = ["table", "--results-dir", tiny_raw["output_dir"], "--by", "coordination,coordination.weight",
            "--metrics", "fid_digits_cnn"]  # fmt: skip
    for ref in ("none", "coordination=none"):  # a value of any --by column that picks one group
        assert main(base + ["--reference", ref]) == 0
        md = capsys.readouterr().out
        assert "| coordination=none, coordination.weight=nan (reference) |" in md
        assert "| coordination=velocity_matching, coordination.weight=0.1 | -0.9" in md
    assert main(base + ["--reference", "coordination=velocity_matching,weight=1"]) == 0
    assert "Paired differences from coordination=velocity_matching, coordination.weight=1.0" in capsys.readouterr().out
    assert main(base + ["--reference", "velocity_matching"]) == 2
    err = capsys.readouterr().err.strip()
    assert "2 groups (" in err and "name one with COL=VALUE" in err and len(err.splitlines()) == 1
    assert main(base + ["--reference", "seed=0"]) == 2
    assert "seed is not a --by column" in capsys.readouterr().err


def test_table_reference_shows_metrics_only_and_names_the_constant_ones_once(tiny_raw, tmp_path, capsys):
    """Config columns (``data.*``, ``distributed.*``, ``loggers``) were read as metrics, and metrics
    with one value in every run filled the paired table with ``+0 [+0, +0], not resolved``."""
    out_dir = seeded_rows(tiny_raw, tmp_path, {"0": [10.0, 11.0, 12.0], "1": [9.0, 10.5, 11.0]})
    df = results.load(out_dir)
    assert {"data.hflip", "data.num_workers", "distributed.backend", "loggers"} <= set(df.columns)
    assert results.metric_columns(df) == ["fid_digits_cnn", "class_accuracy"]
    assert main(["table", "--results-dir", out_dir, "--by", "coordination.weight", "--reference", "0"]) == 0
    md = capsys.readouterr().out
    assert "Δ fid_digits_cnn" in md and "class_accuracy |" not in md and "data." not in md
    assert md.rstrip().endswith("The same in every run (left out): class_accuracy 0.9")
    # asked for by name, a constant metric is shown
    assert main(["table", "--results-dir", out_dir, "--by", "coordination.weight", "--reference", "0",
                 "--metrics", "fid_digits_cnn,class_accuracy"]) == 0  # fmt: skip
    md = capsys.readouterr().out
    assert "Δ class_accuracy" in md and "left out" not in md
