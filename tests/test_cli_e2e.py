"""End to end through the command line: run, sample, eval on a tiny config."""

from __future__ import annotations

import json

import yaml

from nestar_lab.cli import main


def test_run_then_sample_then_eval(tiny_raw, tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_raw))
    run = tmp_path / "run"
    assert main(["run", str(cfg_path), "--run-dir", str(run), "--set", "train.steps=4"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert metrics["sequential_steps"] == 10 and metrics["eval_num_samples"] == 20
    assert {"class_accuracy", "class_accuracy_real_test", "nn_train_dist_generated"} <= set(metrics)
    assert (run / "samples.png").stat().st_size > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 4

    out = tmp_path / "grid.png"
    swap = ["--set", "ode_solver.name=midpoint", "--set", "ode_solver.params.steps=2"]  # params kept: same call
    assert main(["sample", str(run), "--num", "20", "--out", str(out), *swap]) == 0
    assert out.is_file() and "40 NFE/image" in capsys.readouterr().out  # 10 patches x 2 steps x 2 evals

    assert main(["eval", str(run)]) == 0


def test_sample_on_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a run directory" in err and "\n" not in err
