"""The statistics the quality benchmark's claims rest on: t-intervals, the verdicts drawn from
them, and the caveat for learning rates chosen at an edge of the search grid."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_quality  # noqa: E402
import quality_stats  # noqa: E402

from nestar_lab.sweep.paired import seeds_to_resolve  # noqa: E402


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


def test_a_learning_rate_at_an_edge_is_searched_past_it_until_bracketed():
    import lr_search

    from nestar_lab.sweep.bracket import neighbours, next_value

    grid = lr_search.lr_grid(3)
    assert grid == [0.0003, 0.0012, 0.005]

    def next_arm(scores, grid):
        return next_value(scores, grid, lr_search.BRACKET_FACTOR, lr_search.BRACKET_CAP)

    assert next_arm({0.0003: 30, 0.0012: 25, 0.005: 20}, grid) == 0.02  # best at the top: go up x4
    assert next_arm({0.0003: 10, 0.0012: 25, 0.005: 20}, grid) == 7.5e-05  # at the bottom: down /4
    assert next_arm({0.0003: 30, 0.0012: 20, 0.005: 25}, grid) is None  # bracketed inside the grid
    diverged = {0.0003: 30, 0.0012: 25, 0.005: 20, 0.02: math.inf}  # training above the best diverged
    assert next_arm(diverged, grid) is None
    assert lr_search.describe_bracket({"bracket": neighbours(diverged, 0.005)}) == "bracketed by 0.0012 and 0.02"
    capped = {0.0003: 30, 0.0012: 25, 0.005: 20, 0.02: 19, 0.08: 18, 0.32: 17}
    assert next_arm(capped, grid) is None  # BRACKET_CAP extensions on that side
    assert "NOT bracketed" in lr_search.describe_bracket({"bracket": neighbours(capped, 0.32)})
    assert next_arm({0.001: 5.0}, [0.001]) == 0.004  # a lone arm looks above first


def test_paired_differences_resolve_what_unpaired_intervals_cannot():
    """Seed effects shared by both variants cancel in the paired differences."""
    ref = runs("ref", [20.0, 30.0, 40.0, 25.0, 35.0], [0.9] * 5)
    better = runs("better", [18.0, 28.5, 38.0, 23.2, 33.1], [0.9] * 5)  # ~1.8 lower on every seed
    table = pd.concat([ref, better])
    summary = quality_stats.summarize(table, ["ref", "better"])
    lines = dict(line.split(": ", 1) for line in quality_stats.comparisons(summary, "ref"))
    assert "FID (digits CNN) intervals overlap" in lines["- better vs ref"]  # unpaired: nothing
    p = quality_stats.paired(table, "better", "ref", "fid_digits_cnn")
    assert p.n == 5 and p.mean == pytest.approx(-1.84) and p.resolved and p.hi < 0
    assert "resolved: better" in quality_stats.paired_cell(p, "fid_digits_cnn")
    noisy = runs("noisy", [21.0, 29.0, 41.0, 24.0, 36.5], [0.9] * 5)
    q = quality_stats.paired(pd.concat([ref, noisy]), "noisy", "ref", "fid_digits_cnn")
    assert not q.resolved and q.seeds_needed is not None and q.seeds_needed > 5
    assert f"not resolved at 5 seeds; about {q.seeds_needed} would be needed" in quality_stats.paired_cell(q, "fid_digits_cnn") \
        or "> 50 would be needed" in quality_stats.paired_cell(q, "fid_digits_cnn")
    assert seeds_to_resolve(1.0, 0.0) is None and seeds_to_resolve(0.01, 10.0) == 51
    table_md = quality_stats.paired_markdown(table, ["ref", "better"], "ref")
    assert "| better | 5 | -1.8 [" in table_md
    with pytest.raises(ValueError, match="reference variant 'NestAR k=4' has no runs"):
        quality_stats.paired_markdown(table, ["ref"], "NestAR k=4")


@pytest.mark.parametrize("flag, value, message", [
    ("--seeds", "0", "give no interval"), ("--seeds", "1,1,2", "repeats a seed"),
    ("--seeds", "0,x", "comma-separated integers"),
    ("--guidance", "1", "at least two scales"), ("--guidance", "0.5,2", "none below 1.0"),
    ("--guidance", "1,x", "comma-separated numbers"),
])  # fmt: skip
def test_a_budget_without_an_interval_or_a_choice_is_refused_before_any_work(flag, value, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_quality.py", flag, value])
    monkeypatch.setattr(bench_quality, "all_plans", lambda: pytest.fail("work started"))
    with pytest.raises(SystemExit) as info:
        bench_quality.main()
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_zero_samples_or_steps_are_refused(monkeypatch, capsys):
    for flag in ("--samples-per-class", "--steps", "--lr-trials"):
        monkeypatch.setattr(sys, "argv", ["bench_quality.py", flag, "0"])
        with pytest.raises(SystemExit):
            bench_quality.main()
        assert "expected an integer of at least 1" in capsys.readouterr().err


def test_shown_path_is_relative_inside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "q").mkdir(parents=True)
    assert bench_quality.shown_path(tmp_path / "runs" / "q") == "runs/q"
    outside = tmp_path.parent / "elsewhere"
    assert bench_quality.shown_path(outside) == str(outside)


def test_bench_sampling_pairs_each_setting_with_the_trained_one(tiny_raw, tmp_path, monkeypatch, capsys):
    import bench_sampling

    from nestar_lab.config.validation import validate_config
    from nestar_lab.run.train import train

    tiny_raw["metrics"] = [{"name": "fidelity", "params": {"extractor": "dataset_cnn", "reference": "train"}}]
    run = train(validate_config(tiny_raw), tmp_path / "run", progress=False).run_dir
    out = tmp_path / "diag.md"
    argv = ["bench_sampling.py", str(run), "--vary", "sample.cfg_scale=1", "--eval-seeds", "2",
            "--samples-per-class", "3", "--out", str(out), "--section", "diag"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    bench_sampling.main()
    text = out.read_text()
    assert "<!-- diag:start -->" in text and "| trained settings |" in text and "| sample.cfg_scale=1 |" in text
    assert "same 2 (run, evaluation seed) draws" in text and "draws" in text.split("| sample.cfg_scale=1 |")[1]
    assert not (tmp_path / "runs" / "results.csv").exists()  # nothing recorded in a store


@pytest.mark.parametrize("argv, message", [
    (["--vary", "train.lr=1e-3"], "--vary train.lr: not a sampling key"),
    (["--vary", "sample.cfg_scale"], "expected KEY=V1,V2"),
    ([], "--vary: give at least one"),
    (["--vary", "sample.cfg_scale=1", "--eval-seeds", "0"], "expected an integer of at least 1"),
])  # fmt: skip
def test_bench_sampling_refuses_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    import bench_sampling

    monkeypatch.setattr(sys, "argv", ["bench_sampling.py", str(tmp_path), *argv])
    monkeypatch.setattr(bench_sampling, "evaluate_setting", lambda *a: pytest.fail("work started"))
    with pytest.raises(SystemExit) as info:
        bench_sampling.main()
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_bench_sampling_refuses_a_directory_that_is_no_run(tmp_path, monkeypatch):
    import bench_sampling

    from nestar_lab.config.errors import BadInput

    monkeypatch.setattr(sys, "argv", ["bench_sampling.py", str(tmp_path), "--vary", "sample.cfg_scale=1"])
    monkeypatch.setattr(bench_sampling, "evaluate_setting", lambda *a: pytest.fail("work started"))
    with pytest.raises(BadInput, match=str(tmp_path)):
        bench_sampling.main()


def test_guidance_grid_is_evaluated_once_chosen_on_selection_draws_and_reported_on_the_runs_own(tiny_raw, tmp_path):
    import guidance

    from nestar_lab.config.validation import validate_config
    from nestar_lab.run import results
    from nestar_lab.run.evaluate import evaluate
    from nestar_lab.run.train import load_trained, train

    tiny_raw["metrics"] = [{"name": "fidelity", "params": {"extractor": "dataset_cnn", "reference": "train"}}]
    tiny_raw["eval"] = {"samples_per_class": 2, "seed": 1234 + tiny_raw.get("seed", 0)}
    cfg = validate_config(tiny_raw)
    run = train(cfg, tmp_path / "run", progress=False).run_dir
    evaluate(load_trained(run), run)  # the run's own row: trained scale 2.0, reported draw
    own = (run / "metrics.json").read_text()
    out_dir = tiny_raw["output_dir"]
    logged = []
    assert guidance.evaluate_grid(cfg, run, out_dir, grid=(1.0, 2.0), log=logged.append) == 3
    assert guidance.evaluate_grid(cfg, run, out_dir, grid=(1.0, 2.0), log=logged.append) == 0  # resumable
    store = results.load(out_dir)
    assert sorted(zip(store["sample.cfg_scale"], store["eval.seed"])) == [(1.0, 1234), (1.0, 9000), (2.0, 1234), (2.0, 9000)]
    assert store["train_precision"].notna().all() and store["train_hardware"].nunique() == 1  # grid rows too
    assert set(store["run_id"]) == {"run"} and (run / "metrics.json").read_text() == own  # the run's own, kept
    scale, means, seeds = guidance.choose(store, {cfg.seed: cfg}, grid=(1.0, 2.0))
    sel = store[store["eval.seed"] == 9000].set_index("sample.cfg_scale")["fid_digits_cnn"]
    assert seeds == [cfg.seed] and means == pytest.approx(sel.to_dict()) and scale == sel.idxmin()
    rows = guidance.reported(store, {cfg.seed: cfg}, scale)
    assert len(rows) == 1 and rows["eval.seed"].iloc[0] == 1234 and rows["sample.cfg_scale"].iloc[0] == scale
    # a run not evaluated over the whole grid gives no choice; it is evaluated if its checkpoint is
    # here, trained again if not (the store's row alone cannot be sampled at another scale)
    assert guidance.choose(store, {cfg.seed: cfg}, grid=(1.0, 1.5, 2.0))[0] is None
    assert guidance.missing(store, cfg, (1.0, 1.5, 2.0)) == 2 and guidance.missing(store, cfg, (1.0, 2.0)) == 0
    assert not bench_quality.needs_training(store, cfg, run, (1.0, 1.5, 2.0))
    assert bench_quality.needs_training(store, cfg, tmp_path / "gone", (1.0, 1.5, 2.0))
    assert not bench_quality.needs_training(store, cfg, tmp_path / "gone", (1.0, 2.0))
    assert bench_quality.needs_training(store.iloc[0:0], cfg, run, ())
    assert len(logged) == 3 and all(line.startswith("[guidance] run: scale ") for line in logged)



def test_resolving_cost_names_the_seeds_beyond_those_run_and_their_hours():
    from nestar_lab.sweep.paired import Paired

    open_fid = Paired(3, -2.0, 2.0, -7.0, 3.0, 8)  # not resolved: 8 seeds would be needed
    resolved = Paired(3, -5.0, 0.5, -6.2, -3.8, None)
    hopeless = Paired(3, 0.001, 0.2, -0.5, 0.5, 51)
    assert quality_stats.resolving_cost({"fid_digits_cnn": open_fid, "precision_digits_cnn": open_fid}, 1.5) == \
        "FID: 5 more seeds, about 7.5 h here"  # precision is not among the costed questions
    assert quality_stats.resolving_cost({"fid_digits_cnn": resolved, "recall_digits_cnn": hopeless}, None) == \
        "recall: more than 50 seeds"
    assert quality_stats.resolving_cost({"fid_digits_cnn": resolved}, 2.0) == "nothing unresolved"


def test_seeded_runs_share_one_precision_and_the_table_says_where_runs_trained():
    """``auto`` precision is bf16 on a CPU with fast bf16 and fp32 elsewhere: the quality table
    pins one precision for every seeded run, and its caption counts the runs per machine and
    precision (rows from before the store recorded it are counted apart)."""
    from types import SimpleNamespace

    import quality_store

    args = SimpleNamespace(steps=10, samples_per_class=2, out_dir="x", device="auto")
    assert bench_quality.seeded_config(["generator.params.k=4"], 1e-3, 3, args, "NestAR k=4").train.precision == "fp32"
    args.precision = "bf16"
    assert bench_quality.seeded_config([], 1e-3, 3, args, "v").train.precision == "bf16"
    rows = pd.DataFrame({"train_hardware": ["CPU (a)", "CPU (a)", "GPU", None],
                         "train_precision": ["fp32", "fp32", "bf16", None]})  # fmt: skip
    said = quality_store.provenance(rows)
    assert "2 runs on CPU (a) in fp32" in said and "1 run on GPU in bf16" in said and "1 not recorded" in said
    assert quality_store.provenance(pd.DataFrame({"seed": [0]})) == "1 not recorded (trained before the store recorded it)"
    pinned = pd.DataFrame({"train.precision": ["fp32", "auto"]})  # rows from before the columns existed
    assert quality_store.provenance(pinned) == "1 run on an unrecorded machine in fp32; 1 not recorded (trained before the store recorded it)"


def test_run_hours_time_each_variants_step_and_evaluation(monkeypatch, tiny_cfg):
    """A seeded run's hours: its steps at its own timed step, and each evaluation (the grid's
    included) at its own timed sampling plus the metrics, so a slow sampler (MAR) costs more."""
    from types import SimpleNamespace

    from nestar_lab.run.evaluate import time_sampling

    per_image, classes = time_sampling(tiny_cfg, images=4)
    assert per_image > 0 and classes == 10
    speed = [m for m in tiny_cfg.metrics if m.name != "speed"] + [
        tiny_cfg.metrics[0].model_copy(update={"name": "speed", "params": {"batch_size": 8, "repeats": 2}})]
    assert bench_quality.speed_images(tiny_cfg.model_copy(update={"metrics": speed})) == 8 * (1 + 2)
    assert bench_quality.speed_images(tiny_cfg.model_copy(update={"metrics": []})) == 0
    speeds = {"fast": (0.5, 0.01), "slow": (0.5, 0.3)}  # s/step, s/image
    monkeypatch.setattr(bench_quality, "_TIMED", {})
    monkeypatch.setattr(bench_quality, "seeded_config", lambda ov, *a: ov)
    monkeypatch.setattr(bench_quality, "time_step", lambda cfg: speeds[cfg][0])
    monkeypatch.setattr(bench_quality, "time_sampling", lambda cfg: (speeds[cfg][1], 10))
    monkeypatch.setattr(bench_quality, "speed_images", lambda cfg: 40)  # the run's own evaluation times sampling
    args = SimpleNamespace(steps=100, samples_per_class=10, grid=(1.0, 2.0))
    hours = bench_quality.run_hours({"a": "fast", "b": "slow"}, ["a", "b"], args)
    metrics = 100 * bench_quality.SEC_METRICS_PER_SAMPLE
    assert hours["a"] == pytest.approx((100 * 0.5 + 4 * (100 * 0.01 + metrics) + 40 * 0.01) / 3600)
    assert hours["b"] - hours["a"] == pytest.approx((4 * 100 + 40) * 0.29 / 3600)



def test_a_benchmark_refuses_bad_input_in_one_line_and_exit_2(capsys):
    import variants

    from nestar_lab.config.errors import ConfigError

    def main():
        raise ConfigError(["device: got 'tpu'; input should be 'auto', 'cpu' or 'cuda'"])

    with pytest.raises(SystemExit) as info:
        variants.run_main(main)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["config error: device: got 'tpu'; input should be 'auto', 'cpu' or 'cuda'"]


@pytest.mark.parametrize("raised, code, line", [
    ("study", 1, "error: study lr_x: 3 trials in a row failed"),
    ("interrupt", 143, "error: interrupted at step 7; resume with: nestar train --resume runs/x"),
    ("ctrl-c", 130, "interrupted"),
])  # fmt: skip
def test_a_benchmark_ends_a_failed_study_or_an_interruption_in_one_line(raised, code, line, capsys):
    import signal

    import variants

    from nestar_lab.run.train import TrainingInterrupted
    from nestar_lab.sweep.storage import StudyFailed

    def main():
        if raised == "study":
            raise StudyFailed("study lr_x: 3 trials in a row failed")
        if raised == "interrupt":
            raise TrainingInterrupted(Path("runs/x"), 7, signal.SIGTERM)
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        variants.run_main(main)
    assert info.value.code == code
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_a_benchmark_bug_keeps_its_traceback():
    import variants

    def main():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        variants.run_main(main)


@pytest.mark.parametrize("flag", ["--out-dir", "--out", "--runs-dir"])
def test_the_quality_benchmark_refuses_a_place_it_cannot_write_before_any_work(flag, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    target = str(blocker / "sub" / ("table.md" if flag == "--out" else ""))
    monkeypatch.setattr(bench_quality.lr_search, "choose_lr", lambda *a, **k: pytest.fail("searched"))
    monkeypatch.setattr(sys, "argv", ["bench_quality.py", "--variants", "NestAR k=4,AR (raster)", flag, target,
                                      *([] if flag == "--out-dir" else ["--out-dir", str(tmp_path / "store")])])
    import variants

    with pytest.raises(SystemExit) as info:
        variants.run_main(bench_quality.main)
    assert info.value.code == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "a part of this path is a file" in err and flag in err


def test_grid_evaluations_skip_what_the_tables_do_not_read_and_keep_the_runs_parameter_count(tiny_raw):
    import guidance

    from nestar_lab.config.validation import validate_config

    tiny_raw["metrics"] = [{"name": "speed"}, {"name": "fidelity", "params": {"extractor": "dataset_cnn"}},
                           {"name": "class_accuracy"}]  # fmt: skip
    cfg = validate_config(tiny_raw)
    g = guidance.guided(cfg, 1.5, 9003)
    assert [m.name for m in g.metrics] == ["fidelity", "class_accuracy"]
    assert g.metrics[0].params["real_baseline"] is False and g.metrics[0].params["extractor"] == "dataset_cnn"
    assert (g.sample.cfg_scale, g.eval.seed) == (1.5, 9003) and [m.name for m in cfg.metrics][0] == "speed"


def test_the_quality_tables_script_runs_the_headline_then_the_ablations_in_order(tmp_path):
    """``benchmarks/quality_tables.sh`` with stand-ins for python and nestar: the two headline
    processes, the summary, then each ablation's run and report; ``ONLY`` picks one table."""
    import subprocess

    calls = tmp_path / "calls"
    for name in ("py", "nestar"):
        fake = tmp_path / name
        fake.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
        fake.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PY": str(tmp_path / "py"), "NESTAR": str(tmp_path / "nestar"), "DEVICE": "cuda",
           "LOGS": str(tmp_path / "logs")}  # fmt: skip
    subprocess.run(["bash", str(root / "benchmarks" / "quality_tables.sh")], env=env, check=True, capture_output=True)
    lines = calls.read_text().splitlines()
    headline = sorted(line for line in lines[:2])
    assert headline[0].startswith("py benchmarks/bench_quality.py --variants NestAR k=4,AR (raster),DiT ")
    assert headline[1].startswith("py benchmarks/bench_quality.py --variants VAR,MAR ")
    more = sorted(lines[2:4])  # stage 2: the pair still open after seeds 0-4, seeds 0-9
    assert more[0].startswith("py benchmarks/bench_quality.py --variants AR (raster) --seeds 0,1,2,3,4,5,6,7,8,9 ")
    assert more[1].startswith("py benchmarks/bench_quality.py --variants NestAR k=4 --seeds 0,1,2,3,4,5,6,7,8,9 ")
    assert all("--device cuda" in line for line in lines[:5]) and "--summary-only" in lines[4]
    assert "--seeds 0,1,2,3,4,5,6,7,8,9" in lines[4]
    retime = {"k_ablation": "--by generator.k --reference 4",
              "first_module_ablation": "--by modules.1.scale_module.depth --reference 3"}  # speed is an objective
    expected = []
    for study in ("coordination_ablation", "k_ablation", "first_module_ablation"):
        expected += [f"nestar study run {study} --workers 2", f"nestar study report {study}"]
        if study in retime:
            expected.append(f"py benchmarks/bench_retime.py runs/studies/{study} {retime[study]} --device cuda "
                            f"--section {study}_speed --plot runs/studies/{study}/report/arms_retimed.png")  # fmt: skip
    assert lines[5:] == expected
    assert (tmp_path / "logs" / "k_ablation.report.md").is_file()
    calls.unlink()
    subprocess.run(["bash", str(root / "benchmarks" / "quality_tables.sh")], env={**env, "ONLY": "k_ablation"},
                   check=True, capture_output=True)  # fmt: skip
    assert calls.read_text().splitlines() == expected[2:5]  # k_ablation's run, report and re-timing

    import fcntl

    with open(tmp_path / "logs" / ".quality_tables.lock", "a") as held:  # a copy already running
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = subprocess.run(["bash", str(root / "benchmarks" / "quality_tables.sh")], env=env, capture_output=True,
                                text=True)  # fmt: skip
    assert second.returncode == 1 and "another one is running" in second.stderr
    assert calls.read_text().splitlines()[-1] == expected[4]  # it started nothing


def test_a_stopped_quality_tables_script_stops_both_processes_and_says_so(tmp_path):
    """TERM to ``quality_tables.sh`` while the two headline processes run: both get TERM, the
    script ends with 143 and one line saying the same command continues (it read "a process
    failed (exit 127)" before: its waits ran after the trap had reaped both)."""
    import signal
    import subprocess
    import time

    started, stopped = tmp_path / "started", tmp_path / "stopped"
    fake = tmp_path / "py"  # a benchmark process that runs until TERM, then stops at its "checkpoint"
    fake.write_text(f"#!/bin/sh\ntrap 'echo $$ >> {stopped}; exit 143' TERM\necho $$ >> {started}\n"
                    "while true; do sleep 0.1; done\n")  # fmt: skip
    fake.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PY": str(fake), "NESTAR": "false", "LOGS": str(tmp_path / "logs"), "ONLY": "headline"}
    script = subprocess.Popen(["bash", str(root / "benchmarks" / "quality_tables.sh")], env=env,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 30
    while (not started.exists() or len(started.read_text().split()) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    script.send_signal(signal.SIGTERM)
    err = script.communicate(timeout=30)[1]
    assert script.returncode == 143
    assert sorted(stopped.read_text().split()) == sorted(started.read_text().split())  # both stopped
    assert err.strip().splitlines()[-1] == "headline: stopped at a checkpoint; the same command continues"
    assert "not a child" not in err and "failed" not in err


def test_an_unknown_variant_is_refused_with_the_variants_it_may_mean(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_quality.py", "--variants", "NestAR"])
    with pytest.raises(SystemExit) as info:
        bench_quality.main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'NestAR' match no variant" in err and "did you mean 'NestAR k=4' or 'NestAR k=8'" in err


def trained_store(tiny_raw, tmp_path, groups=(2, 4), seeds=(0, 1)):
    """A results store of tiny trained runs: one per (k, seed), each with its run_dir."""
    from nestar_lab.config.validation import validate_config
    from nestar_lab.run import results
    from nestar_lab.run.train import train

    tiny_raw["train"]["steps"] = 2
    for k in groups:
        for seed in seeds:
            raw = {**tiny_raw, "seed": seed, "generator": {"name": "nestar", "params": {"k": k}}}
            cfg = validate_config(raw)
            run = train(cfg, tmp_path / f"k{k}-s{seed}", progress=False).run_dir
            results.append_run(cfg, run, {"sec_per_image": 1.0}, "cpu")
    return tiny_raw["output_dir"]


def test_bench_retime_times_every_run_in_rotated_rounds_and_pairs_the_groups(tiny_raw, tmp_path, monkeypatch, capsys):
    import bench_retime

    store = trained_store(tiny_raw, tmp_path)
    peaks = {"size": 8, "bf16": None, "fp32": 1e10}
    monkeypatch.setattr(bench_retime, "matmul_peaks", lambda device, need_bf16=False: peaks)
    order = []
    real_time_runs = bench_retime.time_runs

    def recording(runs, images, rounds, device):
        timed = real_time_runs(runs, images, rounds, device)
        order.extend(runs)
        return timed

    monkeypatch.setattr(bench_retime, "time_runs", recording)
    out = tmp_path / "speed.md"
    monkeypatch.setattr(sys, "argv", ["bench_retime.py", store, "--by", "generator.k", "--reference", "4", "--images",
                                      "4", "--rounds", "2", "--out", str(out), "--section", "retime", "--plot",
                                      str(tmp_path / "arms.png"), "--quality", "sec_per_image"])  # fmt: skip
    bench_retime.main()
    assert (tmp_path / "arms.png").stat().st_size > 1000  # each k's stored metric against its re-timed speed
    text = out.read_text()
    assert "<!-- retime:start -->" in text and "results.csv` (4)" in text and "2 rounds" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith(("| 2", "| 4"))}
    assert set(rows) == {"2", "4 (reference)"}, rows
    assert "| 2 | " in rows["2"] and "(reference)" in rows["4 (reference)"]
    assert "x [" in rows["2"] and "resolved" in rows["2"] and "| fp32 |" in rows["2"]
    # another k is another schedule: its own sequential passes and FLOPs per image, from the runs
    passes = {k: float(rows[k].split(" | ")[4]) for k in rows}
    assert passes["2"] != passes["4 (reference)"] and all(p > 0 for p in passes.values())
    assert len(order) == 2  # the two groups


def test_bench_retime_rotates_the_order_each_round(monkeypatch):
    import types

    import bench_retime

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def __call__(self, labels, seed):
            calls.append(self.name)
            return types.SimpleNamespace(stats=types.SimpleNamespace(nfe_per_image=1, sequential_passes=1))

    runs = {"a": {0: "a0", 1: "a1"}, "b": {0: "b0"}}
    monkeypatch.setattr(bench_retime, "load_run_config", lambda d: types.SimpleNamespace(
        model_copy=lambda update: None, train=types.SimpleNamespace(precision="fp32")))
    monkeypatch.setattr(bench_retime, "load_trained", lambda d, cfg: types.SimpleNamespace(
        device="cpu", dataset=types.SimpleNamespace(num_classes=2), name=d))
    monkeypatch.setattr(bench_retime, "make_sampler", lambda exp: Fake(exp.name))
    monkeypatch.setattr(bench_retime, "count_flops", lambda fn: (fn(), 8))
    timed = bench_retime.time_runs(runs, 2, 3, __import__("torch").device("cpu"))
    assert calls[:3] == ["a0", "a1", "b0"]  # the counted warm-up calls
    assert calls[3:] == ["a0", "a1", "b0", "a1", "b0", "a0", "b0", "a0", "a1"]  # each round starts one later
    assert set(timed) == {("a", 0), ("a", 1), ("b", 0)} and timed[("a", 0)]["flops"] == 4


@pytest.mark.parametrize("argv, message", [
    (["--by", "generator.k", "--reference", "3"], "--reference '3': no runs with generator.k = '3'"),
    (["--by", "nope", "--reference", "4"], "no column 'nope'"),
    (["--by", "generator.k", "--reference", "4", "--where", "seed=9"], "no runs (after --where)"),
    (["--by", "generator.k", "--reference", "4", "--plot", "a.png", "--quality", "fid"], "no column 'fid'"),
])  # fmt: skip
def test_bench_retime_refuses_before_loading_a_model(argv, message, tiny_raw, tmp_path, monkeypatch):
    import bench_retime

    from nestar_lab.config.errors import BadInput
    from nestar_lab.config.validation import validate_config
    from nestar_lab.run import results

    for k in (2, 4):
        for seed in (0, 1):
            cfg = validate_config({**tiny_raw, "seed": seed, "generator": {"name": "nestar", "params": {"k": k}}})
            results.append_run(cfg, tmp_path / f"gone-k{k}-s{seed}", {"sec_per_image": 1.0}, "cpu")
    monkeypatch.setattr(bench_retime, "load_trained", lambda *a, **kw: pytest.fail("work started"))
    monkeypatch.setattr(sys, "argv", ["bench_retime.py", tiny_raw["output_dir"], *argv])
    with pytest.raises((BadInput, KeyError), match=re.escape(message)):  # each one line under run_main
        bench_retime.main()
    monkeypatch.setattr(sys, "argv", ["bench_retime.py", tiny_raw["output_dir"], "--by", "generator.k",
                                      "--reference", "4"])  # fmt: skip
    with pytest.raises(BadInput, match=r"gone-k2-s0: no checkpoint.pt \(group 2, seed 0\)"):
        bench_retime.main()
    monkeypatch.setattr(sys, "argv", ["bench_retime.py", str(tmp_path / "nowhere"), "--by", "k", "--reference", "4"])
    with pytest.raises(BadInput, match="nowhere: no such directory"):
        bench_retime.main()
