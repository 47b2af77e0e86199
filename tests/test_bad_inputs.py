"""A corpus of bad inputs, as a new user makes them, across configs, files, studies, storages,
checkpoints and the command line (issue 21). Every case is one ``nestar`` call in this process;
each checks the exit code, that stderr is one line naming the thing (one per problem for a
config; argparse's own usage errors keep their usage line), that no traceback is printed, and
that nothing was created or changed in the working directory (or the trained run) that could
block or damage a later run. More specific fault tests: test_faults_cli.py, test_faults_train.py.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from nestar_lab.cli import main
from nestar_lab.config.validation import validate_config
from nestar_lab.run.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny trained run (6 steps) that the checkpoint cases load."""
    raw = {**copy.deepcopy(TINY), "metrics": [{"name": "nearest_train_distance"}]}
    root = tmp_path_factory.mktemp("trained")
    raw["output_dir"] = str(root / "runs")
    return Path(train(validate_config(raw), root / "run", progress=False).run_dir)


def _closed_port() -> int:
    with socket.socket() as s:  # bound, then released: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _config(tmp: Path, **changes) -> Path:
    raw = {**copy.deepcopy(TINY), "metrics": [{"name": "nearest_train_distance"}], "output_dir": str(tmp / "runs")}
    raw.update(changes)
    return _write(tmp / "c.yaml", raw)


def _study(tmp: Path, **fields) -> Path:
    _config(tmp)
    spec = {"name": "s", "base": "c.yaml", "output_dir": str(tmp / "studies"),
            "space": {"generator.params.k": {"choices": [2, 4]}},
            "objectives": [{"metric": "nn_train_dist_generated"}], **fields}  # fmt: skip
    return _write(tmp / "s.yaml", spec)


def _fifo(tmp: Path) -> Path:
    os.mkfifo(tmp / "pipe.yaml")
    return tmp / "pipe.yaml"


# name -> (setup(tmp, run) -> argv, exit code, text the (first) line must hold)
CASES = {
    # ------------------------------------------------------------------ configs and files
    "config_is_a_fifo": (lambda t, r: ["describe", _fifo(t)], 2, "not a regular file"),
    "config_is_dev_null": (lambda t, r: ["describe", "/dev/null"], 2, "/dev/null: not a regular file"),
    "config_missing": (lambda t, r: ["describe", t / "nope.yaml"], 2, "nope.yaml: no such config file"),
    "config_duplicate_key": (lambda t, r: ["describe", _write(t / "d.yaml", "seed: 1\nseed: 2\n")], 2,
                             "duplicate key 'seed'"),
    "field_and_rule_together": (lambda t, r: ["describe", _config(t), "--set", "generator.params.k=3",
                                              "--set", "train.lr=-1"], 2, "train.lr: got -1"),
    "cuda_without_cuda": (lambda t, r: ["train", _config(t, device="cuda"), "--run-dir", t / "new" / "run"], 2,
                          "device: 'cuda' was asked for but no CUDA device is available"),
    "missing_reference_stats": (lambda t, r: ["train", _config(t, metrics=[{"name": "fidelity", "params": {
        "reference": str(t / "ref.npz")}}]), "--run-dir", t / "new" / "run"], 2, "reference statistics not found"),
    "data_root_missing": (lambda t, r: ["train", _config(t, dataset={"name": "image_folder", "params": {
        "root": str(t / "imgs"), "resolution": 8}}), "--run-dir", t / "new" / "run"], 2,
        "dataset.params: image_folder: no folder"),
    # ------------------------------------------------------------------ the command line
    "sample_num_zero": (lambda t, r: ["sample", r, "--num", "0"], 2, "usage:"),
    "train_distributed_zero": (lambda t, r: ["train", _config(t), "--distributed", "0"], 2, "usage:"),
    "study_trials_zero": (lambda t, r: ["study", "run", _study(t), "--trials", "0"], 2, "usage:"),
    "sample_out_directory": (lambda t, r: ["sample", r, "--out", t], 2, "a directory; name the image file"),
    "sample_out_unknown_extension": (lambda t, r: ["sample", r, "--out", t / "grid.foo"], 2,
                                     "unknown image extension '.foo'"),
    "table_binary_results": (lambda t, r: ["table", "--results-dir", _bytes(t, b"\x00\xff\xfe" * 50)], 2,
                             "results.csv: not a results table nestar can read"),
    "table_malformed_results": (lambda t, r: ["table", "--results-dir", _bytes(t, b'a,b\n1,2\n3,4,5,6\n"x\n')], 2,
                                "results.csv: not a results table nestar can read"),
    # ------------------------------------------------------------------ checkpoints that do not fit
    "sample_other_width": (lambda t, r: ["sample", r, "--out", t / "g.png", "--set", "scale_module.params.width=64"],
                           2, "scale_module.params.width 32 -> 64"),
    "eval_other_k": (lambda t, r: ["eval", r, "--set", "generator.params.k=8"], 2, "generator.params.k 4 -> 8"),
    # ------------------------------------------------------------------ studies and storages
    "study_value_no_config_allows": (lambda t, r: ["study", "run", _study(t, space={
        "generator.params.k": {"choices": [2, 3]}})], 2, "space.generator.params.k=3"),
    "study_unknown_key": (lambda t, r: ["study", "run", _study(t, space={"train.no_such_knob": {"choices": [1]}})], 2,
                          "space.train.no_such_knob: not a field of the base config"),
    "storage_sqlite_missing_dir": (lambda t, r: ["study", "run", _study(t), "--storage",
                                                 f"sqlite:///{t}/missing/study.db"], 2, "missing does not exist"),
    "storage_journal_missing_dir": (lambda t, r: ["study", "run", _study(t), "--storage",
                                                  f"journal:{t}/missing/j.log"], 2, "missing does not exist"),
    "storage_unknown_scheme": (lambda t, r: ["study", "run", _study(t), "--storage", "foo://host/db"], 2,
                               "unknown scheme 'foo'; supported: sqlite:///PATH"),
    "storage_not_a_url": (lambda t, r: ["study", "report", _study(t), "--storage", "not a url"], 2,
                          "not a storage URL"),
    "storage_unreachable_postgres": (lambda t, r: ["study", "run", _study(t), "--storage",
                                                   f"postgresql://bob:secret@127.0.0.1:{_closed_port()}/db"], 2,
                                     "cannot connect to 127.0.0.1:"),
}


def _bytes(tmp: Path, data: bytes) -> Path:
    (tmp / "store").mkdir()
    (tmp / "store" / "results.csv").write_bytes(data)
    return tmp / "store"


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under the roots with its size and modification time (a file's; a directory's
    changes when an entry is made and removed again, which leaves nothing)."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns) if not p.is_dir() else (0, 0)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(name, trained, tmp_path, monkeypatch, capsys):
    setup, code, text = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # the same answer on a GPU machine
    argv = [str(a) for a in setup(work, trained)]
    before = _snapshot(work, trained)
    try:
        got = main(argv)
    except SystemExit as exc:  # argparse's usage errors exit from the parser
        got = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, err
    assert "Traceback" not in err, err
    if text == "usage:":  # argparse's own usage error: the usage line, then one error line
        assert lines[0].startswith("usage:") and lines[-1].startswith("nestar") and "error:" in lines[-1], lines
    else:
        assert lines and text in lines[0], lines
        config_lines = all(line.startswith("config error: ") for line in lines)
        assert len(lines) == 1 or config_lines, lines
    if "secret" in " ".join(argv):
        assert "secret" not in err and "***" in err  # the password is masked
    assert _snapshot(work, trained) == before  # nothing made, nothing changed


def test_a_field_and_a_rule_across_parts_are_reported_in_one_pass(tmp_path, capsys):
    code = main(["describe", str(_config(tmp_path)), "--set", "generator.params.k=3", "--set", "train.lr=-1"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 2, lines
    assert lines[0] == "config error: train.lr: got -1; input should be greater than 0"
    assert lines[1].startswith("config error: generator.params: NestAR needs n = k^M tokens; got n=64, k=3")


def test_a_rule_reading_a_bad_field_waits_for_it(tmp_path, capsys):
    """A rule is not checked beside a bad field it reads (the field's default could mislead)."""
    code = main(["describe", str(_config(tmp_path)), "--set", "generator.params.k=3",
                 "--set", "tokenizer.params.patch_size=0"])  # fmt: skip
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and lines == ["config error: tokenizer.params.patch_size: got 0; input should be greater than or equal to 1"]


def test_the_checkpoint_mismatch_names_file_parameter_and_key(trained, tmp_path, capsys):
    code = main(["sample", str(trained), "--out", str(tmp_path / "g.png"), "--set", "scale_module.params.width=64"])
    (line,) = capsys.readouterr().err.splitlines()
    assert code == 2
    assert line.startswith(f"error: {trained / 'checkpoint.pt'}: parameter ")
    assert "in the checkpoint but" in line and "more differ" in line
    assert "changed from the run's config: scale_module.params.width 32 -> 64" in line
    assert line.endswith("drop the --set that changes them)")


def test_a_run_without_a_checkpoint_says_to_start_again(tmp_path, capsys):
    config = _config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")  # a run that failed before its first checkpoint
    assert main(["train", str(config), "--run-dir", str(run)]) == 2
    assert "never saved a checkpoint" in capsys.readouterr().err
    assert main(["train", str(config), "--run-dir", str(run), "--overwrite"]) == 0


def test_an_unreadable_results_store_is_kept_aside_when_a_run_adds_its_row(tmp_path, capsys):
    from nestar_lab.run import results

    cfg = validate_config({**copy.deepcopy(TINY), "output_dir": str(tmp_path / "runs")})
    store = Path(cfg.output_dir)
    store.mkdir(parents=True)
    (store / "results.csv").write_bytes(b"\x00\xff\xfe" * 50)
    results.append_run(cfg, tmp_path / "runs" / "r", {"fid": 1.0}, device="cpu")
    aside = list(store.glob("results.csv.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b"\x00\xff\xfe" * 50  # nothing lost
    assert len(results.load(store)) == 1
    assert "moved it to" in capsys.readouterr().err


@pytest.mark.parametrize("delay", [0.2, 0.5, 0.8, 1.2, 1.8])
def test_ctrl_c_at_any_moment_is_one_line_and_130(delay, tmp_path):
    """SIGINT while the command is still importing (torch, pydantic) or building the experiment."""
    proc = subprocess.Popen([sys.executable, "-m", "nestar_lab.cli", "describe", str(_config(tmp_path))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip(f"finished within {delay} s, before the signal")
    # 130, or death by SIGINT itself (CPython re-raises a KeyboardInterrupt that reached its top
    # level that way): a shell shows both as 130
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
    assert err.strip().splitlines() == ["interrupted"], err


def test_an_interrupt_is_held_while_a_native_package_imports(monkeypatch):
    """Ctrl-C while torch's C++ initialisation calls back into Python used to abort the process
    (``terminate called ... KeyboardInterrupt``, exit -6): the handler holds it until the import
    is done. Here: a module of a native package mid-import, and one done."""
    import importlib.machinery
    import types

    from nestar_lab.run import interrupts

    assert not interrupts.importing_native()
    fake = types.ModuleType("torch._nestar_fake")
    fake.__spec__ = importlib.machinery.ModuleSpec("torch._nestar_fake", None)
    fake.__spec__._initializing = True
    monkeypatch.setitem(sys.modules, "torch._nestar_fake", fake)
    assert interrupts.importing_native()
    fake.__spec__._initializing = False
    assert not interrupts.importing_native()
