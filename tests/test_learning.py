"""Integration: a small NestAR really learns class-conditional digits in a short CPU run."""

from __future__ import annotations

from nestar_lab.config.validation import validate_config
from nestar_lab.run.evaluate import evaluate
from nestar_lab.run.train import load_trained, train


def test_short_run_generates_recognisable_new_digits(tiny_raw, tmp_path):
    tiny_raw["scale_module"]["params"] = {
        "width": 64, "depth": 2, "heads": 4, "prefix_tokens": 2, "head_width": 64, "head_depth": 2,
    }  # fmt: skip
    tiny_raw["flow"] = {"batch_mul": 2}
    tiny_raw["ode_solver"] = {"name": "euler", "params": {"steps": 8}}
    tiny_raw["train"].update(steps=200, batch_size=64, lr=2e-3, warmup_steps=20, ema_decay=0.99, checkpoint_every=200)
    tiny_raw["eval"] = {"samples_per_class": 20}
    tiny_raw["metrics"] = [{"name": "class_accuracy"}, {"name": "nearest_train_distance"}]
    result = train(validate_config(tiny_raw), tmp_path / "run", progress=False)
    metrics = evaluate(load_trained(result.run_dir), result.run_dir)
    print(metrics)
    assert metrics["class_accuracy"] > 0.6  # chance is 0.1
    assert metrics["copy_rate"] < 0.05
    assert metrics["nn_train_dist_generated"] < 2 * metrics["nn_train_dist_real_test"]
