"""torch.distributed on the CPU: two gloo processes train in lock-step, rank 0 writes the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from nestar_lab.run.data import batch_indices

pytestmark = pytest.mark.slow


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_gloo_ranks_hold_identical_weights(tiny_raw, tmp_path):
    tiny_raw["train"].update(steps=4, batch_size=16)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw))
    run_dir = tmp_path / "run"
    proc = _torchrun(str(Path(__file__).with_name("ddp_worker.py")), str(config), str(run_dir), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert (run_dir / "checkpoint.pt").is_file()
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["effective_batch_size"] == 32
    assert "effective batch 32" in proc.stdout


def test_ranks_see_disjoint_halves_of_the_single_process_batch():
    halves = [batch_indices(7, 1437, 16, seed=0, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat(halves), batch_indices(7, 1437, 32, seed=0))


def test_run_under_torchrun_shards_sampling_and_rank0_evaluates(tiny_raw, tmp_path):
    tiny_raw["train"].update(steps=2, batch_size=16)
    tiny_raw["metrics"] = [{"name": "nearest_train_distance"}]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw))
    proc = _torchrun("-m", "nestar_lab.cli", "run", str(config), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert metrics["eval_num_samples"] == 20 and "nn_train_dist_generated" in metrics
    assert (tmp_path / "run" / "samples.png").is_file()


def test_train_distributed_flag_launches_torchrun(tiny_raw, tmp_path):
    tiny_raw["train"].update(steps=2, batch_size=16)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_raw))
    cmd = [sys.executable, "-m", "nestar_lab.cli", "train", str(config), "--distributed", "2",
           "--run-dir", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["world_size"] == 2
