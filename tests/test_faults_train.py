"""Training faults: non-finite steps, resume bookkeeping, run directories, checkpoint I/O.

Each failure is checked for its exit code, a one-line message on stderr, and that nothing was
lost (the last good checkpoint byte for byte, the log valid JSON with each step once).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY

from nestar_lab.cli import main
from nestar_lab.config.errors import ConfigError
from nestar_lab.config.schema import TrainConfig
from nestar_lab.config.validation import validate_config
from nestar_lab.method.losses import LossOutput
from nestar_lab.run import rundir
from nestar_lab.run.runbook import TrainingFailed
from nestar_lab.run.rundir import CHECKPOINT, load_checkpoint
from nestar_lab.run.train import train

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------- helpers


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    return lines[0]


def _strict_json(line: str):
    def no_constant(name):
        raise ValueError(f"non-JSON token {name}")

    return json.loads(line, parse_constant=no_constant)


def _log_rows(run: Path) -> list[dict]:
    return [_strict_json(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _files(run: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.iterdir()) if p.is_file()}


def _config_file(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _nan_at(monkeypatch, calls: set[int]):
    """Make the generator's loss NaN on the given training calls (0-based, counted per build)."""
    import nestar_lab.run.train as train_mod

    real_build = train_mod.build_experiment

    def build(cfg):
        exp = real_build(cfg)
        gen, forward, count = exp.generator, exp.generator.forward, [0]

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            i, count[0] = count[0], count[0] + 1
            if i in calls:
                return LossOutput(total=out.total * float("nan"), parts=out.parts)
            return out

        gen.forward = poisoned
        return exp

    monkeypatch.setattr(train_mod, "build_experiment", build)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny run of 6 steps (checkpoints at 3 and 6), trained once; tests copy it."""
    root = tmp_path_factory.mktemp("finished")
    raw = copy.deepcopy(TINY) | {"output_dir": str(root / "runs")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NESTAR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        train(validate_config(raw), root / "run", progress=False)
    return root / "run"


@pytest.fixture
def run(finished_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


# ---------------------------------------------------------------- non-finite guard


def test_nonfinite_steps_are_skipped_and_counted(tiny_cfg, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {1, 2})  # steps 2 and 3 (checkpoint_every=3: that checkpoint waits for step 4)
    weights = {}

    def snapshot(step, exp):
        weights[step] = {k: v.detach().clone() for k, v in exp.generator.state_dict().items()}

    saved = []
    real_save = rundir.save_checkpoint
    monkeypatch.setattr("nestar_lab.run.runbook.save_checkpoint", lambda d, s: (saved.append(s["step"]), real_save(d, s)))
    result = train(tiny_cfg, tmp_path / "run", progress=False, callbacks=[snapshot])
    assert result.nonfinite_skipped == 2 and result.steps == 6
    for step in (2, 3):  # skipped steps leave the weights as the last good step made them
        assert all(torch.equal(weights[1][k], weights[step][k]) for k in weights[1])
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])
    assert saved == [4, 6]  # none during the streak
    state = load_checkpoint(result.run_dir)  # refuses non-finite weights
    assert all(torch.equal(state["model"][k], weights[6][k]) for k in weights[6])
    rows = _log_rows(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r.get("skipped", False) for r in rows] == [False, True, True, False, False, False]
    assert rows[1]["total"] is None and rows[-1]["nonfinite_skipped"] == 2
    summary = _strict_json((result.run_dir / "train_summary.json").read_text())
    assert summary["nonfinite_skipped"] == 2 and summary["steps"] == 6


def test_a_streak_of_nonfinite_steps_fails_and_keeps_the_last_good_checkpoint(tiny_raw, tmp_path, monkeypatch, capsys):
    tiny_raw["train"].update(steps=12, max_nonfinite_steps=3)
    _nan_at(monkeypatch, set(range(4, 12)))  # from step 5 on
    written = []
    real_save = rundir.save_checkpoint

    def save(d, s):
        real_save(d, s)
        written.append((s["step"], (Path(d) / CHECKPOINT).read_bytes()))

    monkeypatch.setattr("nestar_lab.run.runbook.save_checkpoint", save)
    run = tmp_path / "run"
    code, _, err = _cli(capsys, "train", _config_file(tiny_raw, tmp_path / "c.yaml"), "--run-dir", run)
    assert code == 1
    line = _one_line(err)
    assert line.startswith("error: ") and "step 7" in line and f"{run / CHECKPOINT} (step 3)" in line
    assert [s for s, _ in written] == [3]  # nothing written once the streak began (step 6 was due)
    assert (run / CHECKPOINT).read_bytes() == written[0][1]
    assert load_checkpoint(run)["step"] == 3
    rows = _log_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 8)) and rows[-1]["nonfinite_skipped"] == 3
    assert not (run / "train_summary.json").exists()
    assert not list(run.glob("*.tmp"))


def test_a_huge_learning_rate_fails_without_a_non_finite_checkpoint(tiny_raw, tmp_path, capsys):
    tiny_raw["train"].update(steps=40, checkpoint_every=2, max_nonfinite_steps=2)
    run = tmp_path / "run"
    code, _, err = _cli(capsys, "train", _config_file(tiny_raw, tmp_path / "c.yaml"), "--run-dir", run,
                        "--set", "train.lr=1e30", "--set", "train.grad_clip=0")  # fmt: skip
    assert code == 1 and "train.lr" in _one_line(err)
    if (run / CHECKPOINT).exists():
        load_checkpoint(run)  # finite, or it would not load
    for line in (run / "train_log.jsonl").read_text().splitlines():
        _strict_json(line)


def test_max_nonfinite_steps_is_a_positive_integer():
    assert TrainConfig().max_nonfinite_steps == 10
    with pytest.raises(ValueError):
        TrainConfig(max_nonfinite_steps=0)
    with pytest.raises(ConfigError):
        validate_config(copy.deepcopy(TINY) | {"train": {"max_nonfinite_steps": 0}})


# ---------------------------------------------------------------- resume bookkeeping


class Killed(Exception):
    pass


def test_resume_after_a_kill_logs_each_step_once_and_accumulates_the_summary(tiny_cfg, tmp_path):
    def kill_at_5(step, exp):
        if step == 5:
            raise Killed  # as SIGKILL would: no checkpoint after step 3, steps 4-5 logged

    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(tiny_cfg, run, progress=False, callbacks=[kill_at_5])
    with open(run / "train_log.jsonl", "a") as f:
        f.write('{"step": 6, "lr": 0.00')  # half a line, cut by the kill
    assert load_checkpoint(run)["step"] == 3
    train(tiny_cfg, run, resume=True, progress=False)
    assert [r["step"] for r in _log_rows(run)] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["segments"] == 2
    assert [(s["start_step"], s["end_step"]) for s in summary["segment_history"]] == [(0, 3), (3, 6)]
    assert summary["seconds"] >= sum(s["seconds"] for s in summary["segment_history"]) - 1e-6
    assert summary["final_loss"]["total"] > 0


def test_resuming_a_finished_run_changes_nothing(run, capsys):
    before = _files(run)
    for extra in ([], ["--set", "train.lr=0.5"]):
        code, out, err = _cli(capsys, "train", "--resume", run, *extra)
        assert code == 0 and err == ""
        assert out.strip() == f"{run}: already finished (6 steps); nothing to do"
    assert _files(run) == before


def test_resume_with_overrides_records_them(run, capsys):
    first = json.loads((run / "train_summary.json").read_text())
    code, _, err = _cli(capsys, "train", "--resume", run, "--set", "train.steps=9")
    assert code == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 9
    (entry,) = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert entry["step"] == 6 and entry["overrides"] == ["train.steps=9"]
    assert entry["changes"] == {"train.steps": {"from": 6, "to": 9}} and entry["time"]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 9 and summary["segments"] == 2
    assert [(s["start_step"], s["end_step"]) for s in summary["segment_history"]] == [(0, 6), (6, 9)]
    assert summary["seconds"] > summary["segment_history"][0]["seconds"] > 0 and first["seconds"] > 0
    assert summary["segment_history"][-1]["changes"] == entry["changes"]
    assert [r["step"] for r in _log_rows(run)] == list(range(1, 10))


def test_a_shape_mismatch_on_resume_is_one_line(run, capsys):
    before = _files(run)
    code, _, err = _cli(capsys, "train", "--resume", run, "--set", "train.steps=9",
                        "--set", "scale_module.params.width=48")  # fmt: skip
    line = _one_line(err)
    assert code == 2 and str(run / CHECKPOINT) in line
    assert "parameter " in line and "32" in line and "48" in line, line
    assert _files(run) == before


# ---------------------------------------------------------------- run directories


def test_an_existing_run_is_refused_unless_overwrite(run, tiny_raw, tmp_path, capsys):
    config = _config_file(tiny_raw, tmp_path / "c.yaml")
    (run / "metrics.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    before = _files(run)
    code, _, err = _cli(capsys, "train", config, "--run-dir", run)
    line = _one_line(err)
    assert code == 2 and str(run) in line and "already holds a run" in line and "--overwrite" in line
    assert _files(run) == before
    code, _, err = _cli(capsys, "train", config, "--run-dir", run, "--overwrite")
    assert code == 0, err
    assert [r["step"] for r in _log_rows(run)] == [1, 2, 3, 4, 5, 6]
    assert not (run / "metrics.json").exists() and (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "train_summary.json").read_text())["segments"] == 1


def test_a_second_process_training_the_same_run_is_refused_before_it_changes_a_file(run, tiny_raw, tmp_path, capsys):
    """The same command started twice, or a study trial retried while its first process still
    trains: the second is one line (exit 2) and neither resume nor --overwrite touches a file."""
    from nestar_lab.run.rundir import LOCK, training_lock

    config = _config_file(tiny_raw, tmp_path / "c.yaml")
    with training_lock(run):  # another process, as far as flock can tell (a separate open file)
        before = _files(run)
        for argv in (["train", "--resume", run, "--set", "train.steps=9"],
                     ["train", config, "--run-dir", run, "--overwrite"]):  # fmt: skip
            code, _, err = _cli(capsys, *argv)
            line = _one_line(err)
            assert code == 2 and str(run) in line and f"pid {os.getpid()}" in line and "is training in it" in line
            assert _files(run) == before
    assert not (run / LOCK).exists()  # released: the directory as the holder found it
    code, _, err = _cli(capsys, "train", "--resume", run, "--set", "train.steps=9")
    assert code == 0, err
    assert [r["step"] for r in _log_rows(run)] == list(range(1, 10)) and not (run / LOCK).exists()


def test_a_started_run_without_checkpoint_is_refused_too(tiny_raw, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    code, _, err = _cli(capsys, "train", _config_file(tiny_raw, tmp_path / "c.yaml"), "--run-dir", run)
    line = _one_line(err)
    assert code == 2 and "holds a run that never saved a checkpoint (config.yaml)" in line and "--overwrite" in line


def test_a_run_that_fails_before_training_leaves_nothing_and_the_retry_runs(tiny_raw, tmp_path, capsys, monkeypatch):
    run = tmp_path / "new" / "run"
    config = _config_file({**tiny_raw, "device": "cuda"}, tmp_path / "c.yaml")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # a GPU machine's CI too
    code, _, err = _cli(capsys, "train", config, "--run-dir", run)
    line = _one_line(err)
    assert code == 2 and "device: 'cuda' was asked for but no CUDA device is available" in line, line
    assert not (tmp_path / "new").exists()  # nothing to block the retry
    code, _, err = _cli(capsys, "train", config, "--run-dir", run, "--set", "device=cpu")
    assert code == 0, err


@pytest.mark.parametrize("where", ["file", "under_file", "permission"])
def test_an_unwritable_run_dir_fails_before_any_work(where, tiny_raw, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    target = {"file": blocker, "under_file": blocker / "run", "permission": tmp_path / "ro" / "run"}[where]
    if where == "permission":  # tests run as root, where chmod does not stop writes
        real = Path.write_bytes

        def refuse(self, data):
            if self.name.startswith(".nestar-write-probe"):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", refuse)
    monkeypatch.setattr("nestar_lab.run.train.build_experiment", lambda cfg: pytest.fail("work started"))
    code, _, err = _cli(capsys, "train", _config_file(tiny_raw, tmp_path / "c.yaml"), "--run-dir", target)
    line = _one_line(err)
    assert code == 2 and str(target) in line
    if where == "permission":
        assert "Permission denied" in line
    assert blocker.read_text() == "a file"


# ---------------------------------------------------------------- checkpoint I/O


def _corrupt(kind: str, path: Path) -> None:
    good = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
                         .numpy().tobytes())  # fmt: skip
    elif kind == "missing_keys":
        torch.save({"step": 6, "model": {}}, path)
    elif kind == "not_a_dict":
        torch.save([1, 2, 3], path)
    elif kind == "nan_weights":
        state = torch.load(path, weights_only=True)
        name = next(iter(state["model"]))
        state["model"][name] = torch.full_like(state["model"][name], float("nan"))
        torch.save(state, path)


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "missing_keys", "not_a_dict", "nan_weights"])
def test_a_corrupt_checkpoint_is_one_line_exit_2(kind, run, capsys):
    _corrupt(kind, run / CHECKPOINT)
    before = _files(run)
    code, _, err = _cli(capsys, "train", "--resume", run, "--set", "train.steps=9")
    line = _one_line(err)
    assert code == 2 and f"{run / CHECKPOINT}: corrupt checkpoint" in line and "--overwrite" in line, line
    assert _files(run) == before


def test_sampling_from_a_corrupt_checkpoint_is_one_line(run, capsys):
    _corrupt("truncated", run / CHECKPOINT)
    code, _, err = _cli(capsys, "sample", run, "--num", "10", "--out", run / "g.png")
    assert code == 2 and "corrupt checkpoint" in _one_line(err)


@pytest.mark.parametrize("stage", ["save", "replace"])
def test_a_full_disk_keeps_the_previous_checkpoint(stage, run, monkeypatch, capsys):
    before = (run / CHECKPOINT).read_bytes()
    if stage == "save":
        def save(state, f):
            Path(f).write_bytes(b"partial")  # half a file, then the disk is full
            raise ENOSPC

        monkeypatch.setattr(rundir.torch, "save", save)
    else:
        real = os.replace

        def replace(src, dst):
            if Path(dst).name == CHECKPOINT:
                raise ENOSPC
            return real(src, dst)

        monkeypatch.setattr(rundir.os, "replace", replace)
    code, _, err = _cli(capsys, "train", "--resume", run, "--set", "train.steps=9")
    line = _one_line(err)
    assert code == 1 and "No space left on device" in line and str(run / CHECKPOINT) in line
    assert "(step 6) is intact" in line
    assert (run / CHECKPOINT).read_bytes() == before
    assert not list(run.glob("*.tmp"))
    assert load_checkpoint(run)["step"] == 6


def test_training_failed_is_a_run_failure():
    from nestar_lab.config.errors import RunFailed

    assert issubclass(TrainingFailed, RunFailed) and TrainingFailed("x").exit_code == 1
    assert issubclass(rundir.RunDirError, ValueError) and rundir.RunDirError("x").exit_code == 2
    assert issubclass(rundir.CheckpointError, ValueError) and rundir.CheckpointError("x").exit_code == 2


def test_sample_says_when_num_is_rounded_to_whole_rows(run, capsys):
    code, out, err = _cli(capsys, "sample", run, "--num", "25", "--out", run / "g.png")
    assert code == 0 and "--num 25: 10 classes, one row each, so 20 images (2 per class)" in err
    assert "20 images in" in out


@pytest.mark.parametrize("argv", [["sample", "RUN", "--num", "0"], ["sample", "RUN", "--num", "-5"],
                                  ["train", "CFG", "--distributed", "0"]])  # fmt: skip
def test_counts_below_one_are_refused_not_defaulted(argv, run, tiny_raw, tmp_path, capsys):
    argv = [str(run) if a == "RUN" else str(_config_file(tiny_raw, tmp_path / "c.yaml")) if a == "CFG" else a
            for a in argv]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "expected an integer of at least 1" in capsys.readouterr().err
    assert not (run / "grid.png").exists()


def test_a_key_given_twice_in_a_config_file_is_refused(tiny_raw, tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(tiny_raw) + "seed: 3\n")  # seed: 0 is already in the file
    code, _, err = _cli(capsys, "train", path, "--run-dir", tmp_path / "r")
    line = _one_line(err)
    assert code == 2 and "duplicate key 'seed'" in line and str(path) in line
    assert not (tmp_path / "r").exists()
